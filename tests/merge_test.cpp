// attn::merge_attention_states: by hand, and attention over any split of the keys, merged, against
// attention over all of them (a softmax in double written here).
#include <attn/error.hpp>
#include <attn/merge.hpp>
#include <attn/types.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn::Index;

template <class T>
class MergeTest : public ::testing::Test {};
TYPED_TEST_SUITE(MergeTest, attn_test::Scalars, attn_test::ScalarName);

// One key per part. A: score 0, value [1, 2]; B: score log 3, value [5, 6]. Together the weights
// are 1/4 and 3/4: out = [1/4 + 15/4, 2/4 + 18/4] = [4, 5], lse = log(1 + 3) = log 4.
TYPED_TEST(MergeTest, TwoKeysByHand) {
  using T = TypeParam;
  attn::Matrix<T> out_a(1, 2), out_b(1, 2), lse_a(1, 1), lse_b(1, 1), out(1, 2), lse(1, 1);
  out_a << 1, 2;
  out_b << 5, 6;
  lse_a << 0;
  lse_b << std::log(T(3));
  attn::merge_attention_states<T>(out_a, lse_a, out_b, lse_b, out, lse);
  const T tol = std::is_same_v<T, float> ? T(1e-6) : T(1e-15);
  EXPECT_NEAR(out(0, 0), T(4), 4 * tol);
  EXPECT_NEAR(out(0, 1), T(5), 5 * tol);
  EXPECT_NEAR(lse(0, 0), std::log(T(4)), tol);
}

// Attention of N queries over keys [j0, j1) of S, H heads of dv values, in double: out [N, H*dv],
// lse [H, N]. Scores and values are given; an empty range has lse = -inf and out 0.
struct Reference {
  Index H, N, S, dv;
  std::vector<double> scores;  // [H, N, S]
  std::vector<double> values;  // [H, S, dv]
  void attend(Index j0, Index j1, attn::Matrix<double>& out, attn::Matrix<double>& lse) const {
    out.setZero(N, H * dv);
    lse.setConstant(H, N, -std::numeric_limits<double>::infinity());
    for (Index h = 0; h < H; ++h)
      for (Index n = 0; n < N; ++n) {
        if (j1 <= j0) continue;
        const double* s = &scores[std::size_t((h * N + n) * S)];
        double m = -std::numeric_limits<double>::infinity();
        for (Index j = j0; j < j1; ++j) m = std::max(m, s[j]);
        double l = 0;
        for (Index j = j0; j < j1; ++j) {
          const double p = std::exp(s[j] - m);
          l += p;
          for (Index c = 0; c < dv; ++c) out(n, h * dv + c) += p * values[std::size_t((h * S + j) * dv + c)];
        }
        for (Index c = 0; c < dv; ++c) out(n, h * dv + c) /= l;
        lse(h, n) = m + std::log(l);
      }
  }
};

// Any split of the keys into two or three parts, merged left to right, equals attention over all
// keys: 1e-12 in double, and float's rounding of the parts (1e-6 relative) in float.
TYPED_TEST(MergeTest, AnySplitEqualsTheWhole) {
  using T = TypeParam;
  std::mt19937_64 rng(20261203);
  std::uniform_real_distribution<double> u(-4.0, 4.0);
  for (int trial = 0; trial < 50; ++trial) {
    Reference r{1 + Index(rng() % 3), 1 + Index(rng() % 4), 2 + Index(rng() % 40), 1 + Index(rng() % 5), {}, {}};
    r.scores.resize(std::size_t(r.H * r.N * r.S));
    r.values.resize(std::size_t(r.H * r.S * r.dv));
    for (double& x : r.scores) x = u(rng) * (trial % 5 == 0 ? 20.0 : 1.0);  // some rows far apart
    for (double& x : r.values) x = u(rng);
    attn::Matrix<double> whole, whole_lse;
    r.attend(0, r.S, whole, whole_lse);

    const Index cut1 = Index(rng() % std::uint64_t(r.S + 1));
    const Index cut2 = cut1 + Index(rng() % std::uint64_t(r.S - cut1 + 1));
    attn::Matrix<double> parts[3], lses[3];
    r.attend(0, cut1, parts[0], lses[0]);
    r.attend(cut1, cut2, parts[1], lses[1]);
    r.attend(cut2, r.S, parts[2], lses[2]);
    attn::Matrix<T> out = parts[0].cast<T>(), lse = lses[0].cast<T>();
    for (int k = 1; k < 3; ++k) {
      const attn::Matrix<T> o = parts[k].cast<T>(), l = lses[k].cast<T>();
      attn::merge_attention_states<T>(out, lse, o, l, out, lse);  // in place: out aliases out_a
    }
    const double tol = std::is_same_v<T, float> ? 2e-6 : 1e-12;
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": H " << r.H << " N " << r.N << " S " << r.S << " cuts "
                                      << cut1 << ", " << cut2);
    EXPECT_LE((out.template cast<double>() - whole).cwiseAbs().maxCoeff(), tol * (1 + whole.cwiseAbs().maxCoeff()));
    EXPECT_LE((lse.template cast<double>() - whole_lse).cwiseAbs().maxCoeff(),
              tol * (1 + whole_lse.cwiseAbs().maxCoeff()));
  }
}

// A part whose keys were all masked (lse = -inf) is ignored, whatever its out holds; two such
// parts give zeros and -inf, as attention with every key masked. A NaN lse poisons its row and
// head only.
TYPED_TEST(MergeTest, MaskedAndNaNParts) {
  using T = TypeParam;
  constexpr T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  // H = 2 heads of dv = 1, N = 3 queries.
  attn::Matrix<T> out_a(3, 2), out_b(3, 2), lse_a(2, 3), lse_b(2, 3), out(3, 2), lse(2, 3);
  out_a << 1, 2,  //
      3, 4,       //
      5, 6;
  out_b << nan, inf,  //
      nan, 7,         //
      8, 9;
  lse_a << 0.5, -inf, 1,  //
      0.25, -inf, nan;
  lse_b << -inf, -inf, 1,  //
      -inf, 2, 0;
  attn::merge_attention_states<T>(out_a, lse_a, out_b, lse_b, out, lse);
  // Query 0: b masked in both heads -> a's values and lse.
  EXPECT_EQ(out(0, 0), T(1));
  EXPECT_EQ(out(0, 1), T(2));
  EXPECT_EQ(lse(0, 0), T(0.5));
  EXPECT_EQ(lse(1, 0), T(0.25));
  // Query 1: head 0 masked in both -> 0 and -inf; head 1 only b -> b's.
  EXPECT_EQ(out(1, 0), T(0));
  EXPECT_EQ(lse(0, 1), -inf);
  EXPECT_EQ(out(1, 1), T(7));
  EXPECT_EQ(lse(1, 1), T(2));
  // Query 2: head 0 equal lse -> the mean (5 + 8) / 2, lse 1 + log 2; head 1 NaN.
  EXPECT_NEAR(out(2, 0), T(6.5), T(1e-6));
  EXPECT_NEAR(lse(0, 2), T(1) + std::log(T(2)), T(1e-6));
  EXPECT_TRUE(std::isnan(out(2, 1)));
  EXPECT_TRUE(std::isnan(lse(1, 2)));
}

// Shape mismatches and an lse of +inf are errors naming the argument, and change nothing.
TYPED_TEST(MergeTest, BadArgumentsChangeNothing) {
  using T = TypeParam;
  const attn::Matrix<T> o = attn::Matrix<T>::Ones(3, 4), l = attn::Matrix<T>::Zero(2, 3);
  attn::Matrix<T> out = attn::Matrix<T>::Constant(3, 4, T(7)), lse = attn::Matrix<T>::Constant(2, 3, T(7));
  const auto unchanged = [&] {
    EXPECT_TRUE((out.array() == T(7)).all());
    EXPECT_TRUE((lse.array() == T(7)).all());
  };
  const attn::Matrix<T> o_short = attn::Matrix<T>::Ones(2, 4), l_wide = attn::Matrix<T>::Zero(2, 4);
  const attn::Matrix<T> o_odd = attn::Matrix<T>::Ones(3, 5);
  attn::Matrix<T> l_inf = l;
  l_inf(1, 2) = std::numeric_limits<T>::infinity();
  EXPECT_TRUE(
      attn_test::throws_with<attn::shape_error>([&] { attn::merge_attention_states<T>(o_short, l, o, l, out, lse); },
                                                {"out_a has shape [2, 4]", "[N, H*dv] = [3, H*dv]"}));
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>(
      [&] { attn::merge_attention_states<T>(o_odd, l, o, l, out, lse); }, {"5 columns", "multiple of H = 2"}));
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>(
      [&] { attn::merge_attention_states<T>(o, l, o_short, l, out, lse); }, {"out_b has shape [2, 4]", "[3, 4]"}));
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>(
      [&] { attn::merge_attention_states<T>(o, l, o, l_wide, out, lse); }, {"lse_b has shape [2, 4]", "[2, 3]"}));
  attn::Matrix<T> out_small(3, 2), lse_small(1, 3);
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>(
      [&] { attn::merge_attention_states<T>(o, l, o, l, out_small, lse); }, {"out has shape [3, 2]"}));
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>(
      [&] { attn::merge_attention_states<T>(o, l, o, l, out, lse_small); }, {"lse has shape [1, 3]"}));
  EXPECT_TRUE(attn_test::throws_with<attn::argument_error>(
      [&] { attn::merge_attention_states<T>(o, l, o, l_inf, out, lse); }, {"+inf"}));
  unchanged();
}

}  // namespace
