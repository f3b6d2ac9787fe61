// tests/rms_norm_test.cpp - attn::RMSNorm: by hand, against PyTorch (tests/data/gpt/rms_norm_*,
// float64 LlamaRMSNorm written out in tools/gen_gpt_fixtures.py), its errors and its state_dict.
#include <attn/rms_norm.hpp>

#include <attn/io/state_dict.hpp>

#include <limits>
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
class RMSNormTest : public ::testing::Test {};
TYPED_TEST_SUITE(RMSNormTest, attn_test::Scalars, attn_test::ScalarName);

// x = [[1, 3, -1, -3], [0, 0, 0, 0]], eps = 11, weight = [1, 2, -1, 0.5]:
//   row 0: mean(x^2) = (1 + 9 + 1 + 9) / 4 = 5, 1 / sqrt(5 + 11) = 1/4,
//          x / 4 = [0.25, 0.75, -0.25, -0.75], * weight = [0.25, 1.5, 0.25, -0.375]
//   row 1: zeros: 0 / sqrt(0 + 11) = 0 (no centring, so no bias to fall back on as LayerNorm's)
// Every number is exact in float.
TYPED_TEST(RMSNormTest, TwoByFourByHand) {
  using T = TypeParam;
  attn::RMSNorm<T> norm(4, 11.0);
  norm.set_weight(vec<T>({1, 2, -1, 0.5}));
  const auto x = mat<T>({{1, 3, -1, -3}, {0, 0, 0, 0}});
  const auto want = mat<T>({{0.25, 1.5, 0.25, -0.375}, {0, 0, 0, 0}});
  EXPECT_TRUE(matrices_near(norm.forward(x), want, 0));

  // In place, and into a block of a larger matrix.
  attn::Matrix<T> y = x;
  norm.forward_into(y, y);
  EXPECT_TRUE(matrices_near(y, want, 0));
  attn::Matrix<T> big = attn::Matrix<T>::Constant(2, 6, T(9));
  norm.forward_into(x, big.middleCols(1, 4));
  EXPECT_TRUE(matrices_near(big, mat<T>({{9, 0.25, 1.5, 0.25, -0.375, 9}, {9, 0, 0, 0, 0, 9}}), 0));
}

// eps = 0: the result does not depend on the row's scale, and it is not centred.
//   x = [2, 6, -2, -6] + 0: mean(x^2) = (4 + 36 + 4 + 36) / 4 = 20, y = x / sqrt(20) = [1, 3, -1, -3] / sqrt(5)
//     = [0.4472135954999579, 1.3416407864998738, -0.4472135954999579, -1.3416407864998738]
//   1000 x: the same y.  x = [5, 5]: mean(x^2) = 25, y = [1, 1] (LayerNorm would give [0, 0]).
TYPED_TEST(RMSNormTest, ScaleInvariantAndNotCentredByHand) {
  using T = TypeParam;
  const attn::RMSNorm<T> norm(4, 0.0);
  const auto want = mat<T>({{0.4472135954999579, 1.3416407864998738, -0.4472135954999579, -1.3416407864998738}});
  EXPECT_TRUE(matrices_near(norm.forward(mat<T>({{2, 6, -2, -6}})), want, tolerance<T>()));
  EXPECT_TRUE(matrices_near(norm.forward(mat<T>({{2000, 6000, -2000, -6000}})), want, tolerance<T>()));
  EXPECT_TRUE(matrices_near(attn::RMSNorm<T>(2, 0.0).forward(mat<T>({{5, 5}})), mat<T>({{1, 1}}), 0));
}

TYPED_TEST(RMSNormTest, LlamaDefaults) {
  using T = TypeParam;
  const attn::RMSNorm<T> norm(5);
  EXPECT_EQ(norm.dim(), 5);
  EXPECT_EQ(norm.eps(), 1e-6);                                              // LlamaRMSNorm's eps
  EXPECT_TRUE(matrices_near(norm.weight(), attn::Vector<T>::Ones(5), 0));  // and its ones
}

TYPED_TEST(RMSNormTest, BadArgumentsThrow) {
  using T = TypeParam;
  attn::RMSNorm<T> norm(4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)norm.forward(attn::Matrix<T>::Zero(2, 3)); },
                                             {"attn::RMSNorm::forward", "x has shape [2, 3]", "[N, dim] = [N, 4]"}));
  attn::Matrix<T> y(3, 4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { norm.forward_into(attn::Matrix<T>::Zero(2, 4), y); },
                                             {"attn::RMSNorm::forward_into", "y has shape [3, 4]", "[2, 4]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { norm.set_weight(attn::Vector<T>::Ones(3)); },
                                             {"weight has shape [3]", "[dim] = [4]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([] { attn::RMSNorm<T>(0); }, {"dim must be positive, got 0"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([] { attn::RMSNorm<T>(4, -1e-5); }, {"eps", "-1e-05"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([] { attn::RMSNorm<T>(4, std::numeric_limits<double>::infinity()); },
                                                {"eps must be finite"}));
}

// Hugging Face's key (a Llama layer's input_layernorm.weight), and a round trip through a StateDict.
TYPED_TEST(RMSNormTest, StateDictRoundTrip) {
  using T = TypeParam;
  attn::RMSNorm<T> src(3, 1e-5);
  src.set_weight(vec<T>({0.5, -2, 3}));
  const attn::io::StateDict<T> sd = attn::io::state_dict(src, "layers.0.input_layernorm");
  EXPECT_EQ(sd.names(), std::vector<std::string>{"layers.0.input_layernorm.weight"});
  EXPECT_EQ(sd.at("layers.0.input_layernorm.weight").shape(), attn::io::TensorShape{3});

  attn::RMSNorm<T> dst(3, 1e-5);
  const attn::io::LoadResult r = attn::io::load_state_dict(dst, sd, "layers.0.input_layernorm.");
  EXPECT_TRUE(r.missing_keys.empty() && r.unexpected_keys.empty());
  EXPECT_TRUE(matrices_near(dst.weight(), src.weight(), 0));

  attn::RMSNorm<T> wrong(4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::io::load_state_dict(wrong, sd, "layers.0.input_layernorm"); },
                                             {"load_state_dict(RMSNorm)", "layers.0.input_layernorm.weight", "[3]",
                                              "[4]"}));
  EXPECT_TRUE(matrices_near(wrong.weight(), attn::Vector<T>::Ones(4), 0));  // unchanged
}

// --- against PyTorch ------------------------------------------------------------------------------

template <class T>
void run_rms_norm_case(const std::string& name) {
  const attn_test::Fixture f = attn_test::Fixture::load("gpt/" + name + ".safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  ASSERT_EQ(f.meta("kind"), "rms_norm");
  attn::RMSNorm<T> norm(f.meta_int("dim"), f.meta_double("eps"));
  // Through the file's own key, as a checkpoint loads: x and y are the file's other tensors.
  const attn::io::LoadResult r = attn::io::load_state_dict(norm, f.file(), "", /*strict=*/false);
  EXPECT_EQ(r.missing_keys, std::vector<std::string>{});
  EXPECT_EQ(r.unexpected_keys, (std::vector<std::string>{"x", "y"}));
  f.mark_used("weight");
  const attn::Matrix<T> x = f.tensor<T>("x");
  const attn::Matrix<double> want = f.tensor<double>("y");
  EXPECT_TRUE(matrices_near(norm.forward(x), want, tolerance<T>()));
  attn::Matrix<T> in_place = x;
  norm.forward_into(in_place, in_place);
  EXPECT_TRUE(matrices_near(in_place, want, tolerance<T>())) << "in place";
  EXPECT_EQ(f.unused(), std::vector<std::string>{});
}

template <class T>
class RMSNormPyTorch : public ::testing::Test {};
TYPED_TEST_SUITE(RMSNormPyTorch, attn_test::Scalars, attn_test::ScalarName);

#define ATTN_RMS_NORM_CASE(case_name)                                               \
  [[maybe_unused]] const bool attn_case_##case_name = attn_test::cover(#case_name); \
  TYPED_TEST(RMSNormPyTorch, case_name) { run_rms_norm_case<TypeParam>(#case_name); }

ATTN_RMS_NORM_CASE(rms_norm_llama)
ATTN_RMS_NORM_CASE(rms_norm_row_scales)

TEST(RMSNormPyTorchFiles, EveryFileHasATest) {
  EXPECT_EQ(attn_test::fixture_files("gpt", {"rms_norm"}), attn_test::covered_cases());
}

}  // namespace
