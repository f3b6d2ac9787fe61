// tests/feed_forward_test.cpp - attn::FeedForward: by hand, against PyTorch (tests/data/layers/
// feed_forward_*: float64 nn.Linear -> F.relu / F.gelu -> nn.Linear), and its errors.
#include <attn/feed_forward.hpp>

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
class FeedForwardTest : public ::testing::Test {};
TYPED_TEST_SUITE(FeedForwardTest, attn_test::Scalars, attn_test::ScalarName);

// d_model 2, dim_feedforward 3, x = [1, -2]:
//   linear1: W1 = [[1, 0], [0, 1], [1, 1]], b1 = [0, 0, -1]  ->  h = [1, -2, -2]
//   relu(h) = [1, 0, 0]
//   gelu(h) = h * Phi(h) = [0.8413447460685429, -2 * 0.02275013194817921, same]
//           = [0.8413447460685429, -0.04550026389635842, -0.04550026389635842]
//   linear2: W2 = [[1, 1, 1], [2, 0, -1]], b2 = [0.5, 0]
//     relu:  [1 + 0.5, 2]                                                       = [1.5, 2]
//     gelu:  [0.8413447460685429 - 2 * 0.04550026389635842 + 0.5, 2 * 0.8413447460685429 + 0.04550026389635842]
//          = [1.250344218275826, 1.7281897560334443]
template <class T>
attn::FeedForward<T> small(attn::Activation a) {
  attn::FeedForward<T> ff(2, 3, a);
  ff.linear1().set_weight(mat<T>({{1, 0}, {0, 1}, {1, 1}}));
  ff.linear1().set_bias(vec<T>({0, 0, -1}));
  ff.linear2().set_weight(mat<T>({{1, 1, 1}, {2, 0, -1}}));
  ff.linear2().set_bias(vec<T>({0.5, 0}));
  return ff;
}

TYPED_TEST(FeedForwardTest, ReluByHand) {
  using T = TypeParam;
  const auto ff = small<T>(attn::Activation::ReLU);
  EXPECT_TRUE(matrices_near(ff.forward(mat<T>({{1, -2}})), mat<T>({{1.5, 2}}), 0));
}

TYPED_TEST(FeedForwardTest, GeluByHand) {
  using T = TypeParam;
  const auto ff = small<T>(attn::Activation::GELU);
  EXPECT_TRUE(
      matrices_near(ff.forward(mat<T>({{1, -2}})), mat<T>({{1.250344218275826, 1.7281897560334443}}), tolerance<T>()));
  // In place: x is read in full before y is written.
  attn::Matrix<T> x = mat<T>({{1, -2}});
  ff.forward_into(x, x);
  EXPECT_TRUE(matrices_near(x, mat<T>({{1.250344218275826, 1.7281897560334443}}), tolerance<T>()));
}

TYPED_TEST(FeedForwardTest, ShapesAndDefaults) {
  using T = TypeParam;
  const attn::FeedForward<T> ff(8, 32);
  EXPECT_EQ(ff.d_model(), 8);
  EXPECT_EQ(ff.dim_feedforward(), 32);
  EXPECT_EQ(ff.activation(), attn::Activation::ReLU);
  EXPECT_EQ(ff.linear1().weight().rows(), 32);  // PyTorch's linear1.weight [dim_feedforward, d_model]
  EXPECT_EQ(ff.linear1().weight().cols(), 8);
  EXPECT_EQ(ff.linear2().weight().rows(), 8);
  EXPECT_EQ(ff.linear2().weight().cols(), 32);
  EXPECT_TRUE(ff.linear1().has_bias() && ff.linear2().has_bias());
  const attn::FeedForward<T> no_bias(8, 32, attn::Activation::GELU, /*bias=*/false);
  EXPECT_FALSE(no_bias.linear1().has_bias() || no_bias.linear2().has_bias());
}

TYPED_TEST(FeedForwardTest, BadArgumentsThrow) {
  using T = TypeParam;
  const attn::FeedForward<T> ff(4, 6);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)ff.forward(attn::Matrix<T>::Zero(3, 5)); },
                                             {"attn::FeedForward::forward", "x has shape [3, 5]", "[N, 4]"}));
  attn::Matrix<T> y(2, 4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { ff.forward_into(attn::Matrix<T>::Zero(3, 4), y); },
                                             {"y has shape [2, 4]", "[3, 4]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([] { attn::FeedForward<T>(4, 0); }, {"dim_feedforward = 0"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([] { attn::FeedForward<T>(-1, 4); }, {"d_model = -1"}));
}

// --- against PyTorch ------------------------------------------------------------------------------

template <class T>
void run_feed_forward_case(const std::string& name) {
  const attn_test::Fixture f = attn_test::Fixture::load("layers/" + name + ".safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  ASSERT_EQ(f.meta("kind"), "feed_forward");
  const std::string act = f.meta("activation");
  ASSERT_TRUE(act == "relu" || act == "gelu") << act;
  const bool bias = f.meta_bool("bias");
  attn::FeedForward<T> ff(f.meta_int("d_model"), f.meta_int("dim_feedforward"),
                          act == "relu" ? attn::Activation::ReLU : attn::Activation::GELU, bias);
  ff.linear1().set_weight(f.tensor<T>("linear1.weight"));
  ff.linear2().set_weight(f.tensor<T>("linear2.weight"));
  if (bias) {
    ff.linear1().set_bias(f.vec<T>("linear1.bias"));
    ff.linear2().set_bias(f.vec<T>("linear2.bias"));
  }
  EXPECT_TRUE(matrices_near(ff.forward(f.tensor<T>("x")), f.tensor<double>("y"), tolerance<T>()));
  EXPECT_EQ(f.unused(), std::vector<std::string>{});
}

template <class T>
class FeedForwardPyTorch : public ::testing::Test {};
TYPED_TEST_SUITE(FeedForwardPyTorch, attn_test::Scalars, attn_test::ScalarName);

#define ATTN_FEED_FORWARD_CASE(case_name)                                           \
  [[maybe_unused]] const bool attn_case_##case_name = attn_test::cover(#case_name); \
  TYPED_TEST(FeedForwardPyTorch, case_name) { run_feed_forward_case<TypeParam>(#case_name); }

ATTN_FEED_FORWARD_CASE(feed_forward_relu)
ATTN_FEED_FORWARD_CASE(feed_forward_gelu_no_bias)

TEST(FeedForwardPyTorchFiles, EveryFileHasATest) {
  EXPECT_EQ(attn_test::fixture_files("layers", {"feed_forward"}), attn_test::covered_cases());
}

}  // namespace
