// tests/layer_norm_test.cpp - attn::LayerNorm: by hand, against PyTorch (tests/data/layers/
// layer_norm_*, float64 torch.nn.LayerNorm), and its errors.
#include <attn/layer_norm.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "support/fixture.hpp"
#include "support/fixture_cases.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;
using attn_test::tolerance;
using attn_test::vec;

template <class T>
class LayerNormTest : public ::testing::Test {};
TYPED_TEST_SUITE(LayerNormTest, attn_test::Scalars, attn_test::ScalarName);

// x = [1, 2, 3], eps = 1/3, no affine:
//   mean = 2, var = ((1-2)^2 + 0 + (3-2)^2) / 3 = 2/3 (biased, as PyTorch), var + eps = 1
//   y = (x - 2) / 1 = [-1, 0, 1]
TYPED_TEST(LayerNormTest, OneByThreeByHand) {
  using T = TypeParam;
  attn::LayerNorm<T> norm(3, 1.0 / 3.0, /*elementwise_affine=*/false);
  EXPECT_TRUE(matrices_near(norm.forward(mat<T>({{1, 2, 3}})), mat<T>({{-1, 0, 1}}), tolerance<T>()));
}

// x = [[1, 2, 3, 4], [2, 2, 2, 2]], eps = 2.75, weight = [1, 2, -1, 0.5], bias = [0, 1, 2, -1]:
//   row 0: mean 2.5, deviations [-1.5, -0.5, 0.5, 1.5], var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25,
//          1 / sqrt(1.25 + 2.75) = 0.5, normalized [-0.75, -0.25, 0.25, 0.75],
//          * weight = [-0.75, -0.5, -0.25, 0.375], + bias = [-0.75, 0.5, 1.75, -0.625]
//   row 1: constant, deviations 0, so y = bias = [0, 1, 2, -1] (eps keeps 0 / sqrt(0 + eps) finite)
// Every number is exact in float.
TYPED_TEST(LayerNormTest, TwoByFourWithAffineByHand) {
  using T = TypeParam;
  attn::LayerNorm<T> norm(4, 2.75);
  norm.set_weight(vec<T>({1, 2, -1, 0.5}));
  norm.set_bias(vec<T>({0, 1, 2, -1}));
  const auto x = mat<T>({{1, 2, 3, 4}, {2, 2, 2, 2}});
  const auto want = mat<T>({{-0.75, 0.5, 1.75, -0.625}, {0, 1, 2, -1}});
  EXPECT_TRUE(matrices_near(norm.forward(x), want, 0));

  // In place, and into a block of a larger matrix.
  attn::Matrix<T> y = x;
  norm.forward_into(y, y);
  EXPECT_TRUE(matrices_near(y, want, 0));
  attn::Matrix<T> big = attn::Matrix<T>::Constant(2, 6, T(9));
  norm.forward_into(x, big.middleCols(1, 4));
  EXPECT_TRUE(matrices_near(big, mat<T>({{9, -0.75, 0.5, 1.75, -0.625, 9}, {9, 0, 1, 2, -1, 9}}), 0));

  // Without the bias: row 0 is [-0.75, -0.5, -0.25, 0.375], row 1 zeros.
  attn::LayerNorm<T> no_bias(4, 2.75, true, /*bias=*/false);
  no_bias.set_weight(vec<T>({1, 2, -1, 0.5}));
  EXPECT_TRUE(matrices_near(no_bias.forward(x), mat<T>({{-0.75, -0.5, -0.25, 0.375}, {0, 0, 0, 0}}), 0));
}

// x = [10001, 10002, 10003], eps = 1/3: the same row as [1, 2, 3] shifted, so y = [-1, 0, 1]. In
// float, E[x^2] - E[x]^2 = 100040004.67 - 100040004 needs digits a float does not have (its
// spacing at 1e8 is 8); the two-pass variance sees the deviations [-1, 0, 1] exactly.
TYPED_TEST(LayerNormTest, LargeCommonOffsetNeedsTwoPasses) {
  using T = TypeParam;
  attn::LayerNorm<T> norm(3, 1.0 / 3.0);
  EXPECT_TRUE(matrices_near(norm.forward(mat<T>({{10001, 10002, 10003}})), mat<T>({{-1, 0, 1}}), tolerance<T>()));
}

TYPED_TEST(LayerNormTest, PyTorchDefaults) {
  using T = TypeParam;
  const attn::LayerNorm<T> norm(5);
  EXPECT_EQ(norm.normalized_shape(), 5);
  EXPECT_EQ(norm.eps(), 1e-5);
  EXPECT_TRUE(norm.elementwise_affine());
  EXPECT_TRUE(norm.has_bias());
  EXPECT_TRUE(matrices_near(norm.weight(), attn::Vector<T>::Ones(5), 0));  // nn.LayerNorm: ones, zeros
  EXPECT_TRUE(matrices_near(norm.bias(), attn::Vector<T>::Zero(5), 0));

  const attn::LayerNorm<T> plain(5, 1e-5, /*elementwise_affine=*/false);
  EXPECT_FALSE(plain.elementwise_affine());
  EXPECT_FALSE(plain.has_bias());
  EXPECT_EQ(plain.weight().size(), 0);
  EXPECT_EQ(plain.bias().size(), 0);
}

TYPED_TEST(LayerNormTest, BadArgumentsThrow) {
  using T = TypeParam;
  attn::LayerNorm<T> norm(4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)norm.forward(attn::Matrix<T>::Zero(2, 3)); },
                                             {"attn::LayerNorm::forward", "x has shape [2, 3]", "[N, 4]"}));
  attn::Matrix<T> y(3, 4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { norm.forward_into(attn::Matrix<T>::Zero(2, 4), y); },
                                             {"y has shape [3, 4]", "[2, 4]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { norm.set_weight(attn::Vector<T>::Ones(3)); },
                                             {"weight has shape [3]", "[normalized_shape] = [4]"}));
  EXPECT_TRUE(
      throws_with<attn::shape_error>([&] { norm.set_bias(attn::Vector<T>::Ones(5)); }, {"bias has shape [5]", "[4]"}));
  attn::LayerNorm<T> plain(4, 1e-5, false);
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { plain.set_weight(attn::Vector<T>::Ones(4)); },
                                                {"weight does not exist", "elementwise_affine = false"}));
  attn::LayerNorm<T> no_bias(4, 1e-5, true, false);
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { no_bias.set_bias(attn::Vector<T>::Ones(4)); },
                                                {"bias does not exist", "bias = false"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([] { attn::LayerNorm<T>(0); }, {"normalized_shape must be positive"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([] { attn::LayerNorm<T>(4, -1e-5); }, {"eps", "-1e-05"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([] { attn::LayerNorm<T>(4, std::numeric_limits<double>::quiet_NaN()); },
                                                {"eps must be finite"}));
}

// --- against PyTorch ------------------------------------------------------------------------------

template <class T>
void run_layer_norm_case(const std::string& name) {
  const attn_test::Fixture f = attn_test::Fixture::load("layers/" + name + ".safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  ASSERT_EQ(f.meta("kind"), "layer_norm");
  const bool affine = f.meta_bool("elementwise_affine"), bias = f.meta_bool("bias");
  attn::LayerNorm<T> norm(f.meta_int("normalized_shape"), f.meta_double("eps"), affine, bias);
  ASSERT_EQ(norm.has_bias(), f.has("bias"));
  if (affine) norm.set_weight(f.vec<T>("weight"));
  if (norm.has_bias()) norm.set_bias(f.vec<T>("bias"));
  const attn::Matrix<T> x = f.tensor<T>("x");
  const attn::Matrix<double> want = f.tensor<double>("y");
  EXPECT_TRUE(matrices_near(norm.forward(x), want, tolerance<T>()));
  attn::Matrix<T> in_place = x;
  norm.forward_into(in_place, in_place);
  EXPECT_TRUE(matrices_near(in_place, want, tolerance<T>())) << "in place";
  EXPECT_EQ(f.unused(), std::vector<std::string>{});
}

template <class T>
class LayerNormPyTorch : public ::testing::Test {};
TYPED_TEST_SUITE(LayerNormPyTorch, attn_test::Scalars, attn_test::ScalarName);

#define ATTN_LAYER_NORM_CASE(case_name)                                             \
  [[maybe_unused]] const bool attn_case_##case_name = attn_test::cover(#case_name); \
  TYPED_TEST(LayerNormPyTorch, case_name) { run_layer_norm_case<TypeParam>(#case_name); }

ATTN_LAYER_NORM_CASE(layer_norm_affine)
ATTN_LAYER_NORM_CASE(layer_norm_no_affine)
ATTN_LAYER_NORM_CASE(layer_norm_no_bias)
ATTN_LAYER_NORM_CASE(layer_norm_large_offset)

TEST(LayerNormPyTorchFiles, EveryFileHasATest) {
  EXPECT_EQ(attn_test::fixture_files("layers", {"layer_norm"}), attn_test::covered_cases());
}

}  // namespace
