#include <attn/linear.hpp>
#include <attn/threads.hpp>

#include <cmath>
#include <tuple>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;
using attn_test::vec;

template <class T>
class LinearTest : public ::testing::Test {};
TYPED_TEST_SUITE(LinearTest, attn_test::Scalars, attn_test::ScalarName);

// W = [[1, 2, 3], [4, 5, 6]], b = [0.5, -1], x = [[1, 0, -1], [2, 1, 0]]:
//   y00 = 1*1 + 2*0 + 3*(-1) + 0.5 = -1.5    y01 = 4*1 + 5*0 + 6*(-1) - 1 = -3
//   y10 = 1*2 + 2*1 + 3*0    + 0.5 =  4.5    y11 = 4*2 + 5*1 + 6*0    - 1 = 12
TYPED_TEST(LinearTest, TwoByThreeByHand) {
  using T = TypeParam;
  attn::Linear<T> fc(3, 2);
  fc.set_weight(mat<T>({{1, 2, 3}, {4, 5, 6}}));
  fc.set_bias(vec<T>({0.5, -1}));
  const auto y = fc.forward(mat<T>({{1, 0, -1}, {2, 1, 0}}));
  EXPECT_TRUE(matrices_near(y, mat<T>({{-1.5, -3}, {4.5, 12}}), 0));
}

// The same without the bias: [[-2, -2], [4, 13]].
TYPED_TEST(LinearTest, WithoutBias) {
  using T = TypeParam;
  attn::Linear<T> fc(3, 2, /*bias=*/false);
  EXPECT_FALSE(fc.has_bias());
  EXPECT_EQ(fc.bias().size(), 0);
  fc.set_weight(mat<T>({{1, 2, 3}, {4, 5, 6}}));
  EXPECT_TRUE(matrices_near(fc.forward(mat<T>({{1, 0, -1}, {2, 1, 0}})), mat<T>({{-2, -2}, {4, 13}}), 0));
}

// A Map over a caller's buffer passes without a copy, and forward_into writes into a block of a
// larger matrix (a strided output).
TYPED_TEST(LinearTest, MapInputAndStridedOutput) {
  using T = TypeParam;
  attn::Linear<T> fc(3, 2);
  fc.set_weight(mat<T>({{1, 2, 3}, {4, 5, 6}}));
  fc.set_bias(vec<T>({0.5, -1}));
  const T buffer[] = {1, 0, -1, 2, 1, 0};
  Eigen::Map<const attn::Matrix<T>> x(buffer, 2, 3);
  attn::Matrix<T> big = attn::Matrix<T>::Constant(2, 5, T(7));
  fc.forward_into(x, big.middleCols(1, 2));
  EXPECT_TRUE(matrices_near(big, mat<T>({{7, -1.5, -3, 7, 7}, {7, 4.5, 12, 7, 7}}), 0));
}

TYPED_TEST(LinearTest, ParametersReadBack) {
  using T = TypeParam;
  attn::Linear<T> fc(3, 2);
  const auto w = mat<T>({{1, 2, 3}, {4, 5, 6}});
  fc.set_weight(w);
  fc.set_bias(vec<T>({0.5, -1}));
  EXPECT_EQ(fc.weight(), w);
  EXPECT_EQ(fc.bias(), vec<T>({0.5, -1}));
  EXPECT_EQ(fc.in_features(), 3);
  EXPECT_EQ(fc.out_features(), 2);
}

// PyTorch's init: weight and bias in [-1/sqrt(in), 1/sqrt(in)]; the same seed the same numbers.
TYPED_TEST(LinearTest, DefaultInitIsPyTorchsAndReproducible) {
  using T = TypeParam;
  attn::Generator g1(7), g2(7), g3(8);
  attn::Linear<T> a(64, 32, true, g1), b(64, 32, true, g2), c(64, 32, true, g3);
  const double bound = 1.0 / std::sqrt(64.0);  // 0.125
  EXPECT_LE(a.weight().cwiseAbs().maxCoeff(), bound);
  EXPECT_LE(a.bias().cwiseAbs().maxCoeff(), bound);
  // 2048 draws from U(-0.125, 0.125): the largest is within 0.01 of the bound unless the
  // distribution is wrong (probability (1 - 0.01/0.25)^2048 ~ 1e-36).
  EXPECT_GT(a.weight().cwiseAbs().maxCoeff(), bound - 0.01);
  EXPECT_EQ(a.weight(), b.weight());
  EXPECT_EQ(a.bias(), b.bias());
  EXPECT_NE(a.weight(), c.weight());
}

TYPED_TEST(LinearTest, RejectsWrongShapes) {
  using T = TypeParam;
  attn::Linear<T> fc(3, 2);
  const attn::Matrix<T> x(2, 4);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)fc.forward(x); }, {"Linear::forward", "x", "[2, 4]", "[N, 3]"}));
  attn::Matrix<T> y(3, 2);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { fc.forward_into(attn::Matrix<T>(2, 3), y); }, {"y", "[3, 2]", "[2, 2]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { fc.set_weight(attn::Matrix<T>(3, 2)); }, {"weight", "[3, 2]", "[2, 3]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { fc.set_bias(attn::Vector<T>(3)); }, {"bias", "[3]", "[2]"}));
  attn::Linear<T> nobias(3, 2, false);
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { nobias.set_bias(attn::Vector<T>(2)); }, {"bias = false"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::Linear<T>(0, 2); }, {"in_features = 0"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::Linear<T>(3, -1); }, {"out_features = -1"}));
}

// Many tiles of the projection kernel (detail/gemm.hpp) and enough work for 3 threads:
// [700, 128] -> [384] is 2 row chunks x 3 column chunks; [700, 300] -> [100] 2 row chunks at a
// depth where Eigen's blocking changes with the row count (so tiles that followed the thread
// count would change the bits). One, two and three threads give the same bits, and every element
// is x W^T + b as a plain loop sums it in double, to the scalar's tolerance.
TYPED_TEST(LinearTest, ManyTilesAnyThreadCount) {
  using T = TypeParam;
  for (const auto& [N, in, out] : {std::tuple<attn::Index, attn::Index, attn::Index>{700, 128, 384}, {700, 300, 100}}) {
    SCOPED_TRACE(::testing::Message() << "[" << N << ", " << in << "] -> [" << out << "]");
    attn::Generator gen(11);
    const attn::Linear<T> fc(in, out, /*bias=*/true, gen);
    attn::Matrix<T> x(N, in);
    attn::init::uniform(x, -1.0, 1.0, gen);
    std::vector<attn::Matrix<T>> y;
    for (int threads : {1, 2, 3}) {
      attn::set_num_threads(threads);
      y.push_back(fc.forward(x));
    }
    attn::set_num_threads(0);
    EXPECT_TRUE(y[0] == y[1]) << "2 threads";
    EXPECT_TRUE(y[0] == y[2]) << "3 threads";

    attn::Matrix<double> want(N, out);
    const attn::Matrix<T> w = fc.weight();  // a copy of the stored values: taken once
    for (attn::Index r = 0; r < N; ++r) {
      for (attn::Index c = 0; c < out; ++c) {
        double sum = double(fc.bias()(c));
        for (attn::Index k = 0; k < in; ++k) sum += double(x(r, k)) * double(w(c, k));
        want(r, c) = sum;
      }
    }
    EXPECT_TRUE(matrices_near(y[0], want, attn_test::tolerance<T>()));
  }
}

}  // namespace
