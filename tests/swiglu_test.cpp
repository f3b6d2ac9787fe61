// tests/swiglu_test.cpp - attn::SwiGLU: by hand, against PyTorch (tests/data/gpt/swiglu_*: float64
// LlamaMLP written out in tools/gen_gpt_fixtures.py), its errors and its state_dict.
#include <attn/swiglu.hpp>

#include <attn/io/state_dict.hpp>

#include <string>
#include <vector>

#include "support/fixture.hpp"
#include "support/fixture_cases.hpp"
#include "support/test_util.hpp"

namespace {

using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;
using attn_test::tolerance;
using attn_test::vec;

template <class T>
class SwiGLUTest : public ::testing::Test {};
TYPED_TEST_SUITE(SwiGLUTest, attn_test::Scalars, attn_test::ScalarName);

// d_model 2, ffn_dim 2, x = [1, -2]:
//   gate_proj = I            ->  g = [1, -2]
//   up_proj = [[1, 1], [2, 0]]  ->  u = [1 - 2, 2] = [-1, 2]
//   silu(g) = g / (1 + exp(-g)) = [1 / (1 + e^-1), -2 / (1 + e^2)] = [0.7310585786300049, -0.2384058440442351]
//   h = silu(g) * u = [-0.7310585786300049, -0.4768116880884702]
//   down_proj = [[1, 1], [0, -1]]  ->  y = [h0 + h1, -h1] = [-1.207870266718475, 0.4768116880884702]
template <class T>
attn::SwiGLU<T> small(bool bias) {
  attn::SwiGLU<T> mlp(2, 2, bias);
  mlp.gate_proj().set_weight(mat<T>({{1, 0}, {0, 1}}));
  mlp.up_proj().set_weight(mat<T>({{1, 1}, {2, 0}}));
  mlp.down_proj().set_weight(mat<T>({{1, 1}, {0, -1}}));
  return mlp;
}

TYPED_TEST(SwiGLUTest, TwoByTwoByHand) {
  using T = TypeParam;
  const auto mlp = small<T>(false);
  const auto want = mat<T>({{-1.207870266718475, 0.4768116880884702}});
  EXPECT_TRUE(matrices_near(mlp.forward(mat<T>({{1, -2}})), want, tolerance<T>()));
  // In place (x is read in full before y is written), and a zero row: silu(0) = 0, so y = 0.
  attn::Matrix<T> x = mat<T>({{1, -2}, {0, 0}});
  mlp.forward_into(x, x);
  EXPECT_TRUE(matrices_near(x, mat<T>({{-1.207870266718475, 0.4768116880884702}, {0, 0}}), tolerance<T>()));
}

// With biases: gate_proj.bias = [0, 2]  ->  g = [1, 0], silu(g) = [0.7310585786300049, 0];
// up_proj.bias = 0  ->  u = [-1, 2], h = [-0.7310585786300049, 0];
// down_proj.bias = [0.5, 0]  ->  y = [-0.7310585786300049 + 0.5, 0] = [-0.2310585786300049, 0].
TYPED_TEST(SwiGLUTest, WithBiasByHand) {
  using T = TypeParam;
  auto mlp = small<T>(true);
  mlp.gate_proj().set_bias(vec<T>({0, 2}));
  mlp.up_proj().set_bias(vec<T>({0, 0}));
  mlp.down_proj().set_bias(vec<T>({0.5, 0}));
  EXPECT_TRUE(matrices_near(mlp.forward(mat<T>({{1, -2}})), mat<T>({{-0.2310585786300049, 0}}), tolerance<T>()));
}

TYPED_TEST(SwiGLUTest, ShapesAndDefaults) {
  using T = TypeParam;
  const attn::SwiGLU<T> mlp(8, 24);
  EXPECT_EQ(mlp.d_model(), 8);
  EXPECT_EQ(mlp.ffn_dim(), 24);
  EXPECT_FALSE(mlp.has_bias());  // Llama's mlp_bias = false
  EXPECT_EQ(mlp.gate_proj().weight().rows(), 24);  // gate_proj.weight, up_proj.weight: [ffn_dim, d_model]
  EXPECT_EQ(mlp.gate_proj().weight().cols(), 8);
  EXPECT_EQ(mlp.up_proj().weight().rows(), 24);
  EXPECT_EQ(mlp.up_proj().weight().cols(), 8);
  EXPECT_EQ(mlp.down_proj().weight().rows(), 8);  // down_proj.weight: [d_model, ffn_dim]
  EXPECT_EQ(mlp.down_proj().weight().cols(), 24);
  EXPECT_FALSE(mlp.gate_proj().has_bias() || mlp.up_proj().has_bias() || mlp.down_proj().has_bias());
  const attn::SwiGLU<T> with_bias(8, 24, /*bias=*/true);
  EXPECT_TRUE(with_bias.gate_proj().has_bias() && with_bias.up_proj().has_bias() && with_bias.down_proj().has_bias());
  // The same generator seed draws the same parameters.
  attn::Generator g1(5), g2(5);
  EXPECT_TRUE(matrices_near(attn::SwiGLU<T>(4, 6, false, g1).up_proj().weight(),
                            attn::SwiGLU<T>(4, 6, false, g2).up_proj().weight(), 0));
}

TYPED_TEST(SwiGLUTest, BadArgumentsThrow) {
  using T = TypeParam;
  const attn::SwiGLU<T> mlp(4, 6);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)mlp.forward(attn::Matrix<T>::Zero(3, 5)); },
                                             {"attn::SwiGLU::forward", "x has shape [3, 5]", "[N, d_model] = [N, 4]"}));
  attn::Matrix<T> y(2, 4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { mlp.forward_into(attn::Matrix<T>::Zero(3, 4), y); },
                                             {"attn::SwiGLU::forward_into", "y has shape [2, 4]", "[3, 4]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([] { attn::SwiGLU<T>(4, 0); }, {"attn::SwiGLU", "ffn_dim = 0"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([] { attn::SwiGLU<T>(-1, 4); }, {"d_model = -1"}));
}

// Hugging Face's keys in LlamaMLP's order, and a round trip through a StateDict.
TYPED_TEST(SwiGLUTest, StateDictRoundTrip) {
  using T = TypeParam;
  attn::Generator gen(7);
  const attn::SwiGLU<T> src(4, 6, /*bias=*/true, gen);
  const attn::io::StateDict<T> sd = attn::io::state_dict(src, "layers.1.mlp");
  EXPECT_EQ(sd.names(), (std::vector<std::string>{"layers.1.mlp.gate_proj.weight", "layers.1.mlp.gate_proj.bias",
                                                  "layers.1.mlp.up_proj.weight", "layers.1.mlp.up_proj.bias",
                                                  "layers.1.mlp.down_proj.weight", "layers.1.mlp.down_proj.bias"}));
  EXPECT_EQ(sd.at("layers.1.mlp.down_proj.weight").shape(), (attn::io::TensorShape{4, 6}));
  EXPECT_EQ(attn::io::state_dict(attn::SwiGLU<T>(4, 6)).names(),
            (std::vector<std::string>{"gate_proj.weight", "up_proj.weight", "down_proj.weight"}));

  attn::SwiGLU<T> dst(4, 6, true);
  attn::io::load_state_dict(dst, sd, "layers.1.mlp");
  const auto x = mat<T>({{1, -2, 0.5, 3}, {0, 1, -1, 2}});
  EXPECT_TRUE(matrices_near(dst.forward(x), src.forward(x), 0));
  EXPECT_TRUE(matrices_near(dst.down_proj().bias(), src.down_proj().bias(), 0));

  // Strict: a module without biases does not take a state dict with them, and stays as it was.
  attn::SwiGLU<T> no_bias(4, 6);
  const attn::Matrix<T> before = no_bias.up_proj().weight();
  EXPECT_TRUE(throws_with<attn::format_error>([&] { attn::io::load_state_dict(no_bias, sd, "layers.1.mlp"); },
                                              {"load_state_dict(SwiGLU)", "unexpected keys",
                                               "layers.1.mlp.gate_proj.bias"}));
  EXPECT_TRUE(matrices_near(no_bias.up_proj().weight(), before, 0));
}

// --- against PyTorch ------------------------------------------------------------------------------

template <class T>
void run_swiglu_case(const std::string& name) {
  const attn_test::Fixture f = attn_test::Fixture::load("gpt/" + name + ".safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  ASSERT_EQ(f.meta("kind"), "swiglu");
  const bool bias = f.meta_bool("bias");
  attn::SwiGLU<T> mlp(f.meta_int("d_model"), f.meta_int("ffn_dim"), bias);
  // Through the file's own keys, as a checkpoint loads: x and y are the file's other tensors.
  const attn::io::LoadResult r = attn::io::load_state_dict(mlp, f.file(), "", /*strict=*/false);
  EXPECT_EQ(r.missing_keys, std::vector<std::string>{});
  EXPECT_EQ(r.unexpected_keys, (std::vector<std::string>{"x", "y"}));
  for (const std::string p : {"gate_proj.", "up_proj.", "down_proj."}) {
    f.mark_used(p + "weight");
    if (bias) f.mark_used(p + "bias");
  }
  const attn::Matrix<T> x = f.tensor<T>("x");
  const attn::Matrix<double> want = f.tensor<double>("y");
  EXPECT_TRUE(matrices_near(mlp.forward(x), want, tolerance<T>()));
  attn::Matrix<T> in_place = x;
  mlp.forward_into(in_place, in_place);
  EXPECT_TRUE(matrices_near(in_place, want, tolerance<T>())) << "in place";
  EXPECT_EQ(f.unused(), std::vector<std::string>{});
}

template <class T>
class SwiGLUPyTorch : public ::testing::Test {};
TYPED_TEST_SUITE(SwiGLUPyTorch, attn_test::Scalars, attn_test::ScalarName);

#define ATTN_SWIGLU_CASE(case_name)                                                 \
  [[maybe_unused]] const bool attn_case_##case_name = attn_test::cover(#case_name); \
  TYPED_TEST(SwiGLUPyTorch, case_name) { run_swiglu_case<TypeParam>(#case_name); }

ATTN_SWIGLU_CASE(swiglu_llama)
ATTN_SWIGLU_CASE(swiglu_bias)
ATTN_SWIGLU_CASE(swiglu_saturated)

TEST(SwiGLUPyTorchFiles, EveryFileHasATest) {
  EXPECT_EQ(attn_test::fixture_files("gpt", {"swiglu"}), attn_test::covered_cases());
}

}  // namespace
