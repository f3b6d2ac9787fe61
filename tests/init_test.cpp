#include <attn/init.hpp>

#include <cmath>

#include "support/test_util.hpp"

namespace {

// Moments of n samples: the sample mean of U(0,1) has standard deviation sqrt(1/12)/sqrt(n);
// with n = 200000 that is 6.5e-4, so a 5e-3 bound is ~8 sigma: it fails only if the generator is wrong.
TEST(Generator, UniformMoments) {
  attn::Generator g(1);
  const int n = 200000;
  double sum = 0, sum2 = 0, lo = 1, hi = 0;
  for (int i = 0; i < n; ++i) {
    const double u = g.uniform();
    sum += u;
    sum2 += u * u;
    lo = std::min(lo, u);
    hi = std::max(hi, u);
  }
  EXPECT_GE(lo, 0.0);
  EXPECT_LT(hi, 1.0);
  EXPECT_NEAR(sum / n, 0.5, 5e-3);
  EXPECT_NEAR(sum2 / n - (sum / n) * (sum / n), 1.0 / 12, 5e-3);  // variance of U(0,1)
}

TEST(Generator, NormalMoments) {
  attn::Generator g(2);
  const int n = 200000;
  double sum = 0, sum2 = 0;
  for (int i = 0; i < n; ++i) {
    const double z = g.normal();
    ASSERT_TRUE(std::isfinite(z));
    sum += z;
    sum2 += z * z;
  }
  EXPECT_NEAR(sum / n, 0.0, 1e-2);  // sd of the mean: 1/sqrt(n) = 2.2e-3
  EXPECT_NEAR(sum2 / n, 1.0, 2e-2);
}

TEST(Generator, SameSeedSameStream) {
  attn::Generator a(123), b(123), c(124);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.uniform(), b.uniform());
  EXPECT_NE(a.uniform(), c.uniform());
}

// mt19937_64's 10000th output for the default seed 5489 is 9981545732273789042 (C++ standard,
// [rand.predef]); uniform() keeps its top 53 bits: (x >> 11) * 2^-53.
TEST(Generator, StreamIsTheStandardsMt19937_64) {
  attn::Generator g(5489);
  double u = 0;
  for (int i = 0; i < 10000; ++i) u = g.uniform();
  EXPECT_EQ(u, static_cast<double>(9981545732273789042ULL >> 11) * 0x1.0p-53);
}

// xavier_uniform on [3E, E] = [24, 8]: bound sqrt(6 / (24 + 8)) = sqrt(0.1875) = 0.4330.
TEST(Init, XavierUniformBound) {
  attn::Generator g(3);
  attn::Matrix<double> w(24, 8);
  attn::init::xavier_uniform(w, g);
  EXPECT_LE(w.cwiseAbs().maxCoeff(), std::sqrt(0.1875));
  EXPECT_GT(w.cwiseAbs().maxCoeff(), 0.9 * std::sqrt(0.1875));
}

// xavier_normal with fan_in = fan_out = 500: std sqrt(2 / 1000) = 0.0447; over 20000 draws
// the sample variance is within 3% of 0.002 (its relative sd is sqrt(2/20000) = 1%).
TEST(Init, XavierNormalStd) {
  attn::Generator g(4);
  attn::Matrix<double> w(100, 200);
  attn::init::xavier_normal(w, 500, 500, g);
  const double var = w.array().square().mean();
  EXPECT_NEAR(var, 0.002, 0.002 * 0.05);
}

}  // namespace
