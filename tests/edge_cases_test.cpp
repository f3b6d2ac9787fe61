// tests/edge_cases_test.cpp - numerical edge cases, each with its documented result, on every
// attention path: the reference loop, the blocked kernel (weights), the flash kernel and the decode
// kernel (at most 4 queries), run here on one problem through detail::AttentionProblem, and the
// public classes where they add something (SDPA's dispatch, MHA's out_proj, GQA's heads).
//
// The rules these tests hold (attention_reference.hpp states them beside the reference):
//   * A NaN logit - a NaN in q_i, or in a key k_j that q_i attends - makes row i NaN (output and
//     weights), and only row i: the other rows keep their bits. A +inf logit too (exp(inf - inf)),
//     as in PyTorch; soft-capping maps it to the cap first. A -inf logit weighs 0, like a mask.
//   * A masked key's k_j never reaches a logit: NaN or inf there changes nothing.
//   * A NaN or inf in v_j reaches every row that attends key j. In a key masked by a bool mask it
//     gives NaN too (weight 0 times NaN, as PyTorch); the fast kernels never read the key blocks that
//     causal masking, the window or trailing padding remove, so for non-finite values of masked keys
//     the result depends on the path: keep them finite.
//   * Finite logits of any size are safe: the row max is subtracted before exp.
//   * A row whose keys are all masked is exactly 0 (output and weights), on every path, by every
//     mask that can do it; MultiHeadAttention's output row is then out_proj.bias.
//   * Attention needs at least one query and one key per sequence: an empty sequence (L = 0, S = 0,
//     B = 0, d = 0) is an attn::shape_error, never an empty result (zero keys have no softmax, and
//     B*L = 0 rows cannot tell B from L). The row-wise layers (Linear, LayerNorm, RMSNorm, SwiGLU,
//     FeedForward) and RopeCache::apply map N = 0 rows to 0 rows.
//   * A size computed from a caller's dimensions that overflows Eigen::Index is an attn::shape_error
//     naming the product; no check wraps around, and nothing is allocated first.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attn/attn.hpp"
#include "attn/detail/attention_reference.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Causal;
using attn::Index;
using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;
template <class T>
using Mat = attn::Matrix<T>;

enum class Path { Reference, Blocked, Flash, Decode };
const char* name(Path p) {
  switch (p) {
    case Path::Reference:
      return "reference";
    case Path::Blocked:
      return "blocked";
    case Path::Flash:
      return "flash";
    case Path::Decode:
      return "decode";
  }
  return "?";
}
constexpr Path kAllPaths[] = {Path::Reference, Path::Blocked, Path::Flash, Path::Decode};

// One head on one kernel: q [L, d], k [S, d], v [S, dv] -> output [L, dv], and weights [L, S] on
// the paths that write them (reference, blocked). Decode takes at most 4 queries.
template <class T>
attn::AttentionResult<T> run(Path path, const Mat<T>& q, const Mat<T>& k, const Mat<T>& v,
                             const attn::Masks<T>& masks = {}, std::optional<double> scale = std::nullopt) {
  attn::detail::AttentionProblem<T> p;
  p.L = q.rows(), p.S = p.mask_keys = k.rows(), p.d = q.cols(), p.dv = v.cols();
  p.q = {q.data(), 0, 0, q.cols()};
  p.k = {k.data(), 0, 0, k.cols()};
  p.v = {v.data(), 0, 0, v.cols()};
  attn::AttentionResult<T> r{Mat<T>::Constant(p.L, p.dv, T(12345)), Mat<T>()};
  p.out = {r.output.data(), 0, 0, p.dv};
  p.scale = scale ? T(*scale) : T(1) / std::sqrt(T(p.d));
  attn::detail::bind_masks(p, masks, "edge_cases_test");
  if (path == Path::Reference || path == Path::Blocked) {
    r.weights = Mat<T>::Constant(p.L, p.S, T(12345));
    p.weights = {r.weights.data(), 0, 0, p.S};
  }
  switch (path) {
    case Path::Reference:
      attn::detail::attention_reference(p);
      break;
    case Path::Blocked:
      attn::detail::attention_blocked(p);
      break;
    case Path::Flash:
      attn::detail::attention_flash(p);
      break;
    case Path::Decode:
      EXPECT_LE(p.L, attn::detail::kDecodeRows);
      attn::detail::attention_decode(p);
      break;
  }
  return r;
}

template <class A, class B>
::testing::AssertionResult same_bits(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return ::testing::AssertionFailure() << "different shapes";
  for (Index r = 0; r < a.rows(); ++r)
    for (Index c = 0; c < a.cols(); ++c)
      if (const auto x = a(r, c), y = b(r, c); std::memcmp(&x, &y, sizeof(x)) != 0)
        return ::testing::AssertionFailure() << "(" << r << ", " << c << "): " << a(r, c) << " vs " << b(r, c);
  return ::testing::AssertionSuccess();
}
template <class A>
bool all_nan(const A& a) {
  return a.array().isNaN().all();
}
template <class A>
bool all_finite(const A& a) {
  return a.array().isFinite().all();
}

template <class T>
Mat<T> random(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Mat<T>::Random(rows, cols);
}

template <class T>
class EdgeCases : public ::testing::Test {
 protected:
  static constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  static constexpr T inf = std::numeric_limits<T>::infinity();
  const double tol = attn_test::tolerance<T>();
};
TYPED_TEST_SUITE(EdgeCases, attn_test::Scalars, attn_test::ScalarName);

// --- non-finite inputs -----------------------------------------------------------------------------

// A NaN anywhere in query row 2 makes its logits NaN: output row 2 (and weights row 2) is NaN, every
// other row keeps the bits it has without the NaN. (Every kernel's row max skips NaN, so a row of
// only NaN logits looks fully masked to it; each checks for NaN before writing zeros. The flash,
// reference and decode kernels once returned zeros here, the blocked kernel NaN.)
TYPED_TEST(EdgeCases, NaNInOneQueryRowPoisonsOnlyThatRow) {
  using T = TypeParam;
  const Mat<T> q = random<T>(4, 3, 1), k = random<T>(6, 3, 2), v = random<T>(6, 5, 3);
  for (const bool whole_row : {true, false}) {
    Mat<T> bad = q;
    if (whole_row)
      bad.row(2).setConstant(this->nan);
    else
      bad(2, 1) = this->nan;
    for (Path path : kAllPaths) {
      SCOPED_TRACE(std::string(name(path)) + (whole_row ? ", whole row" : ", one element"));
      const auto clean = run(path, q, k, v), got = run(path, bad, k, v);
      EXPECT_TRUE(all_nan(got.output.row(2)));
      for (Index i : {0, 1, 3}) EXPECT_TRUE(same_bits(got.output.row(i), clean.output.row(i))) << "row " << i;
      if (got.weights.size()) {
        EXPECT_TRUE(all_nan(got.weights.row(2)));
        EXPECT_TRUE(same_bits(got.weights.row(0), clean.weights.row(0)));
      }
    }
  }
  // Through the public class, 37 queries on the flash kernel (three row tiles): row 20 only.
  const Mat<T> q37 = random<T>(37, 8, 4), k37 = random<T>(29, 8, 5), v37 = random<T>(29, 3, 6);
  Mat<T> bad37 = q37;
  bad37(20, 7) = this->nan;
  const attn::ScaledDotProductAttention<T> sdpa;
  const Mat<T> clean = sdpa.forward(q37, k37, v37), got = sdpa.forward(bad37, k37, v37);
  for (Index i = 0; i < 37; ++i) {
    if (i == 20)
      EXPECT_TRUE(all_nan(got.row(i)));
    else
      EXPECT_TRUE(same_bits(got.row(i), clean.row(i))) << "row " << i;
  }
  // And a decoding step through it (at most 4 queries: the decode kernel), against 600 keys.
  Mat<T> q2 = random<T>(2, 8, 7);
  q2(1, 0) = this->nan;
  const Mat<T> k600 = random<T>(600, 8, 8), v600 = random<T>(600, 3, 9);
  const Mat<T> step = sdpa.forward(q2, k600, v600);
  EXPECT_TRUE(all_finite(step.row(0)));
  EXPECT_TRUE(all_nan(step.row(1)));
}


// A NaN in key 2 (causal, top-left): queries 2 and 3 attend key 2 and are NaN; queries 0 and 1 do
// not (causal) and keep their bits - a masked key's k_j never reaches a logit. A bool mask that
// hides key 2 from query 3 keeps it finite the same way.
TYPED_TEST(EdgeCases, NaNInOneKeyPoisonsExactlyTheRowsThatAttendIt) {
  using T = TypeParam;
  const Mat<T> q = random<T>(4, 3, 7), k = random<T>(6, 3, 8), v = random<T>(6, 2, 9);
  Mat<T> bad = k;
  bad.row(2).setConstant(this->nan);
  attn::Masks<T> causal;
  causal.causal = Causal::TopLeft;
  attn::Masks<T> hide = causal;
  attn::BoolMatrix ignore = attn::BoolMatrix::Zero(4, 6);
  ignore(3, 2) = true;
  hide.attn_mask = attn::IgnoreMask(ignore);
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    const auto clean = run(path, q, k, v, causal), got = run(path, q, bad, v, causal);
    EXPECT_TRUE(same_bits(got.output.topRows(2), clean.output.topRows(2)));
    EXPECT_TRUE(all_nan(got.output.bottomRows(2)));
    const auto hidden = run(path, q, bad, v, hide), hidden_clean = run(path, q, k, v, hide);
    EXPECT_TRUE(same_bits(hidden.output.row(3), hidden_clean.output.row(3)));
    EXPECT_TRUE(all_nan(hidden.output.row(2)));
  }
  // The decode kernel over two 512-key chunks: a NaN key in the second poisons the merged row.
  const Mat<T> q2 = random<T>(2, 4, 10), v2 = random<T>(600, 3, 11);
  Mat<T> k2 = random<T>(600, 4, 12);
  k2(550, 1) = this->nan;
  EXPECT_TRUE(all_nan(run(Path::Decode, q2, k2, v2).output));
  attn::Masks<T> padded;  // ... unless padding hides it
  attn::BoolMatrix pad = attn::BoolMatrix::Zero(1, 600);
  pad(0, 550) = true;
  padded.key_padding_mask = attn::IgnoreMask(pad);
  EXPECT_TRUE(all_finite(run(Path::Decode, q2, k2, v2, padded).output));
}

// An inf in key 1 with q . k_1 = +inf (every q_i > 0): the logit is +inf, exp(inf - inf) is NaN,
// and every row is NaN, as in PyTorch. With q . k_1 = -inf (every q_i < 0) key 1 weighs 0: the rows
// equal those with key 1 masked out.
TYPED_TEST(EdgeCases, InfInOneKeyGivesNaNForAPlusInfLogitAndWeightZeroForMinusInf) {
  using T = TypeParam;
  const Mat<T> pos = (random<T>(3, 4, 13).cwiseAbs().array() + T(0.1)).matrix();
  const Mat<T> k = random<T>(5, 4, 14), v = random<T>(5, 2, 15);
  Mat<T> bad = k;
  bad.row(1).setConstant(this->inf);
  attn::Masks<T> without_key1;
  attn::BoolMatrix ignore = attn::BoolMatrix::Zero(3, 5);
  ignore.col(1).setConstant(true);
  without_key1.attn_mask = attn::IgnoreMask(ignore);
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    EXPECT_TRUE(all_nan(run(path, pos, bad, v).output));
    const Mat<T> neg = -pos;
    EXPECT_TRUE(matrices_near(run(path, neg, bad, v).output, run(path, neg, k, v, without_key1).output, this->tol));
  }
}

// A NaN in value row 4: every query that attends key 4 gets NaN in the output (here v_4 is NaN in
// column 0 only, so only column 0 is NaN). Query rows that do not attend key 4 are not specified
// (see MaskedKeysNeedFiniteValues).
TYPED_TEST(EdgeCases, NaNInOneValuePoisonsTheRowsThatAttendIt) {
  using T = TypeParam;
  const Mat<T> q = random<T>(4, 3, 16), k = random<T>(5, 3, 17);
  Mat<T> v = random<T>(5, 2, 18);
  v(4, 0) = this->nan;
  attn::Masks<T> m;
  m.causal = Causal::BottomRight;  // query i sees keys j <= i + 1: only query 3 sees key 4
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    const auto all = run(path, q, k, v).output;
    EXPECT_TRUE(all_nan(all.col(0)));
    EXPECT_TRUE(all_finite(all.col(1)));
    const auto causal = run(path, q, k, v, m).output;
    EXPECT_TRUE(std::isnan(causal(3, 0)));
    EXPECT_TRUE(std::isfinite(causal(3, 1)));
  }
}

// Masked keys: NaN in a masked key's k_j changes nothing (bitwise), on every path. NaN in a masked
// key's v_j: a key that a bool mask removes still has its v_j multiplied by weight 0 on every path,
// and 0 * NaN = NaN - PyTorch gives NaN the same way. (Keys that causal masking, the window or
// trailing padding remove are skipped whole by the flash and decode kernels, which then stay finite
// while the reference and the blocked kernel give NaN: the values of masked keys must be finite.)
TYPED_TEST(EdgeCases, MaskedKeysNeedFiniteValuesButNotFiniteKeys) {
  using T = TypeParam;
  const Mat<T> q = random<T>(3, 4, 19), k = random<T>(6, 4, 20), v = random<T>(6, 3, 21);
  attn::BoolMatrix ignore = attn::BoolMatrix::Zero(3, 6);
  ignore.col(4).setConstant(true);
  attn::Masks<T> m;
  m.attn_mask = attn::IgnoreMask(ignore);
  Mat<T> bad_k = k, bad_v = v;
  bad_k.row(4).setConstant(this->nan);
  bad_v.row(4).setConstant(this->nan);
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    const auto clean = run(path, q, k, v, m);
    EXPECT_TRUE(same_bits(run(path, q, bad_k, v, m).output, clean.output));
    EXPECT_TRUE(all_nan(run(path, q, k, bad_v, m).output));
  }
}

// --- large logits ----------------------------------------------------------------------------------

// Logits near the type's limit stay finite, because the row max is subtracted before exp: with
// d = 1, scale 1, q = [1e19, -1e19] and k = [1e18, 2e18, -1e18, 2e18] (float; 1e150 and 1e149 in
// double) the logits are +-[1e37, 2e37, -1e37, 2e37]: row 0 splits its weight between the tied
// keys 1 and 3 (exp(0) each; exp(-1e37) = 0 for the others), row 1 puts all of it on key 2.
//   out0 = (v1 + v3) / 2 = (2 + 4) / 2 = 3,   out1 = v2 = 3 ... with v = [1, 2, 3, 4]: out = [3, 3].
TYPED_TEST(EdgeCases, HugeFiniteLogitsDoNotOverflow) {
  using T = TypeParam;
  const double big = std::is_same_v<T, float> ? 1e19 : 1e150;
  const Mat<T> q = mat<T>({{big}, {-big}});
  const Mat<T> k = mat<T>({{big / 10}, {big / 5}, {-big / 10}, {big / 5}});
  const Mat<T> v = mat<T>({{1}, {2}, {3}, {4}});
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    const auto r = run(path, q, k, v, {}, T(1));
    EXPECT_TRUE(matrices_near(r.output, mat<T>({{3}, {3}}), this->tol));
    if (r.weights.size()) {
      EXPECT_TRUE(matrices_near(r.weights, mat<T>({{0, 0.5, 0, 0.5}, {0, 0, 1, 0}}), this->tol));
    }
  }
}

// A logit that overflows to +inf (q . k = 1e20 * 1e20 in float, 1e200 * 1e200 in double) makes its
// row NaN on every path (inf - inf), as PyTorch. Soft-capping maps it to the cap first:
// softcap 5 gives logits [5 tanh(inf) = 5, 5 tanh(-1e20 / 5) = -5] -> weights [1, e^-10] / (1 + e^-10).
// A +inf additive bias is the same +inf logit: NaN.
TYPED_TEST(EdgeCases, OverflowingLogitIsNaNUnlessSoftCapped) {
  using T = TypeParam;
  const double big = std::is_same_v<T, float> ? 1e20 : 1e200;
  const Mat<T> q = mat<T>({{big}}), k = mat<T>({{big}, {-1}}), v = mat<T>({{2}, {-4}});
  attn::Masks<T> capped;
  capped.softcap = T(5);
  const double w1 = std::exp(-10.0) / (1 + std::exp(-10.0));
  attn::Masks<T> plus_inf_bias;
  plus_inf_bias.attn_bias = attn::AdditiveMask<T>(mat<T>({{0, std::numeric_limits<double>::infinity()}}));
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    EXPECT_TRUE(all_nan(run(path, q, k, v, {}, T(1)).output));
    EXPECT_TRUE(matrices_near(run(path, q, k, v, capped, T(1)).output, mat<T>({{2 * (1 - w1) - 4 * w1}}), this->tol));
    EXPECT_TRUE(all_nan(run(path, mat<T>({{1}}), k, v, plus_inf_bias, T(1)).output));
  }
}

// --- degenerate scales and lengths -----------------------------------------------------------------

// Scale 0: every logit is 0, so each row is the plain mean of the values it may attend. With causal
// top-left, row i averages v_0 .. v_i: v = [2, 4, 9] -> [2, 3, 5].
TYPED_TEST(EdgeCases, ScaleZeroAveragesTheUnmaskedValues) {
  using T = TypeParam;
  const Mat<T> q = random<T>(3, 4, 22) * T(100), k = random<T>(3, 4, 23) * T(100), v = mat<T>({{2}, {4}, {9}});
  attn::Masks<T> m;
  m.causal = Causal::TopLeft;
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    EXPECT_TRUE(matrices_near(run(path, q, k, v, {}, T(0)).output, mat<T>({{5}, {5}, {5}}), this->tol));
    EXPECT_TRUE(matrices_near(run(path, q, k, v, m, T(0)).output, mat<T>({{2}, {3}, {5}}), this->tol));
  }
  const attn::ScaledDotProductAttention<T> zero(T(0));
  EXPECT_TRUE(matrices_near(zero.forward(q, k, v, m), mat<T>({{2}, {3}, {5}}), this->tol));
  const attn::GroupedQueryAttention<T> gqa(1, 1, T(0));
  EXPECT_TRUE(matrices_near(gqa.forward(q, k, v, attn_test::batch_of<attn::GqaArgs<T>>(1)), mat<T>({{5}, {5}, {5}}), this->tol));
}

// One key: its weight is 1 and every row that sees it is v_0, exactly; rows that do not see it are
// 0. L = 5, S = 1: top-left causal lets every row see key 0 (j <= i); bottom-right lets only the
// last (j <= i + S - L = i - 4). L = 1, S = 5: bottom-right sees every key, top-left only key 0.
TYPED_TEST(EdgeCases, SequencesOfLengthOne) {
  using T = TypeParam;
  const Mat<T> v0 = mat<T>({{1.5, -2}});
  attn::Masks<T> top_left, bottom_right;
  top_left.causal = Causal::TopLeft;
  bottom_right.causal = Causal::BottomRight;
  const Mat<T> q1 = random<T>(1, 3, 24), k1 = random<T>(1, 3, 25);
  const Mat<T> q4 = random<T>(4, 3, 26), q5 = random<T>(5, 3, 27), k5 = random<T>(5, 3, 28), v5 = random<T>(5, 2, 29);
  for (Path path : kAllPaths) {
    SCOPED_TRACE(name(path));
    const auto one = run(path, q1, k1, v0);
    EXPECT_EQ(one.output, v0);
    if (one.weights.size()) {
      EXPECT_EQ(one.weights, Mat<T>::Ones(1, 1));
    }
    const Mat<T> qs = path == Path::Decode ? q4 : q5;  // the decode kernel takes at most 4 rows
    const Index L = qs.rows();
    EXPECT_EQ(run(path, qs, k1, v0, top_left).output, v0.replicate(L, 1));
    Mat<T> last_only = Mat<T>::Zero(L, 2);
    last_only.row(L - 1) = v0;
    EXPECT_EQ(run(path, qs, k1, v0, bottom_right).output, last_only);
    EXPECT_EQ(run(path, q1, k5, v5, top_left).output, v5.topRows(1));
    EXPECT_TRUE(matrices_near(run(path, q1, k5, v5, bottom_right).output, run(path, q1, k5, v5).output, this->tol));
  }
}

// Empty sequences are errors naming the argument in every attention API; the row-wise layers take
// N = 0 rows and return 0 rows.
TEST(EdgeCasesEmpty, AttentionRejectsEmptySequencesRowWiseLayersMapZeroRowsToZeroRows) {
  using T = float;
  using attn::shape_error;
  const attn::ScaledDotProductAttention<T> sdpa;
  const Mat<T> q = Mat<T>::Ones(2, 4), k = Mat<T>::Ones(3, 4), v = Mat<T>::Ones(3, 2);
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)sdpa.forward(Mat<T>(0, 4), k, v); }, {"query has shape [0, 4]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)sdpa.forward(q, Mat<T>(0, 4), Mat<T>(0, 2)); },
                                       {"key has shape [0, 4]", "at least one key"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)sdpa.forward(Mat<T>(2, 0), Mat<T>(3, 0), v); }, {"query"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)sdpa.forward_with_weights(q, k, Mat<T>(3, 0)); }, {"value"}));

  const attn::GroupedQueryAttention<T> gqa(2, 1);
  attn::GqaArgs<T> none;
  none.batch = 0;
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { (void)gqa.forward(Mat<T>::Ones(2, 8), k, v, none); },
                                               {"batch is not set"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)gqa.forward(Mat<T>(0, 8), k, v, attn_test::batch_of<attn::GqaArgs<T>>(1)); }, {"query has shape [0, 8]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)gqa.forward(Mat<T>::Ones(2, 8), Mat<T>(0, 4), Mat<T>(0, 2), attn_test::batch_of<attn::GqaArgs<T>>(1)); },
                                       {"key has shape [0, 4]"}));

  const attn::MultiHeadAttention<T> mha(4, 2);
  attn::MhaArgs<T> zero_batch;
  zero_batch.batch = 0;
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { (void)mha.forward(q, q, q, zero_batch); }, {"batch is not set"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)mha.forward(Mat<T>(0, 4), q, q, attn_test::batch_of<attn::MhaArgs<T>>(1)); }, {"query has shape [0, 4]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)mha.forward(q, Mat<T>(0, 4), Mat<T>(0, 4), attn_test::batch_of<attn::MhaArgs<T>>(1)); },
                                       {"key has shape [0, 4]"}));

  EXPECT_EQ(attn::Linear<T>(4, 3).forward(Mat<T>(0, 4)).rows(), 0);
  EXPECT_EQ(attn::Linear<T>(4, 3).forward(Mat<T>(0, 4)).cols(), 3);
  EXPECT_EQ(attn::LayerNorm<T>(4).forward(Mat<T>(0, 4)).rows(), 0);
  EXPECT_EQ(attn::RMSNorm<T>(4).forward(Mat<T>(0, 4)).rows(), 0);
  EXPECT_EQ(attn::SwiGLU<T>(4, 6).forward(Mat<T>(0, 4)).rows(), 0);
  EXPECT_EQ(attn::FeedForward<T>(4, 6).forward(Mat<T>(0, 4)).rows(), 0);
  Mat<T> none_rows(0, 8);
  attn::RopeCache<T>(4, 8).apply(none_rows, 2, 1, 8);  // no rows, even at the table's end
}

// --- fully masked rows -----------------------------------------------------------------------------

// Every way of masking all of a row's keys gives a row of exact zeros, weights included, on every
// path: a bool mask row, key padding of every key, a row of -inf biases, causal + window + bool mask
// together, and bottom-right causal with L > S (queries 0 and 1 of 4 against 2 keys see j <= i - 2).
TYPED_TEST(EdgeCases, FullyMaskedRowsAreExactlyZeroOnEveryPath) {
  using T = TypeParam;
  const Mat<T> q = random<T>(4, 3, 30), k = random<T>(6, 3, 31), v = random<T>(6, 2, 32);
  std::vector<std::pair<std::string, attn::Masks<T>>> cases;
  {
    attn::Masks<T> m;
    attn::BoolMatrix allowed = attn::BoolMatrix::Ones(4, 6);
    allowed.row(1).setConstant(false);
    m.attn_mask = attn::AttendMask(std::move(allowed));  // owned: the mask outlives this block
    cases.emplace_back("bool mask row 1", m);
  }
  {
    attn::Masks<T> m;
    m.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Ones(1, 6));
    cases.emplace_back("every key padded", m);
  }
  {
    attn::Masks<T> m;
    Mat<T> bias = Mat<T>::Zero(4, 6);
    bias.row(2).setConstant(-std::numeric_limits<T>::infinity());
    m.attn_bias = attn::AdditiveMask<T>(std::move(bias));
    cases.emplace_back("-inf bias row 2", m);
  }
  {
    attn::Masks<T> m;  // bottom-right, L = 4, S = 6: query i at a = i + 2; with causal and window 1 it
    m.causal = Causal::BottomRight;  // sees key a only; an IgnoreMask on (i, i + 2) then empties row i
    m.window = 1;
    attn::BoolMatrix ignore = attn::BoolMatrix::Zero(4, 6);
    ignore(3, 5) = true;
    m.attn_mask = attn::IgnoreMask(std::move(ignore));
    cases.emplace_back("causal + window 1 + bool mask row 3", m);
  }
  const Index empty_row[] = {1, -1, 2, 3};  // the row each case empties (-1: every row)
  for (std::size_t c = 0; c < cases.size(); ++c) {
    const auto& [what, m] = cases[c];
    for (Path path : kAllPaths) {
      SCOPED_TRACE(what + ", " + name(path));
      const auto r = run(path, q, k, v, m);
      EXPECT_TRUE(all_finite(r.output));
      for (Index i = 0; i < 4; ++i) {
        if (empty_row[c] == i || empty_row[c] < 0) {
          EXPECT_TRUE((r.output.row(i).array() == T(0)).all()) << "row " << i;
          if (r.weights.size()) {
            EXPECT_TRUE((r.weights.row(i).array() == T(0)).all()) << "row " << i;
          }
        } else {
          EXPECT_TRUE((r.output.row(i).array() != T(0)).any()) << "row " << i;
        }
      }
    }
  }
  // Bottom-right causal with more queries than keys: the first L - S rows see nothing.
  attn::Masks<T> m;
  m.causal = Causal::BottomRight;
  const Mat<T> k2 = k.topRows(2), v2 = v.topRows(2);
  for (Path path : kAllPaths) {
    SCOPED_TRACE(std::string("bottom-right L > S, ") + name(path));
    const auto r = run(path, q, k2, v2, m);
    EXPECT_TRUE((r.output.topRows(2).array() == T(0)).all());
    EXPECT_TRUE(all_finite(r.output.bottomRows(2)) && (r.output.bottomRows(2).array() != T(0)).any());
  }
  // The public classes: SDPA's two kernels, and MHA, whose output row is then out_proj.bias; with
  // add_zero_attn the extra zero key stays attended (weight 1 on it), as in PyTorch.
  const attn::ScaledDotProductAttention<T> sdpa;
  attn::Masks<T> pad_all;
  pad_all.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Ones(1, 6));
  EXPECT_EQ(sdpa.forward(q, k, v, pad_all), Mat<T>::Zero(4, 2));
  const Mat<T> q7 = random<T>(7, 3, 33);
  EXPECT_EQ(sdpa.forward(q7, k, v, pad_all), Mat<T>::Zero(7, 2));
  const auto [o, w] = sdpa.forward_with_weights(q, k, v, pad_all);
  EXPECT_EQ(o, Mat<T>::Zero(4, 2));
  EXPECT_EQ(w, Mat<T>::Zero(4, 6));
  for (const bool zero_attn : {false, true}) {
    attn::MhaOptions opt;
    opt.add_zero_attn = zero_attn;
    opt.batch_first = true;  // rows (b, l): sequence 1 is rows 5..9
    attn::Generator gen(34);
    attn::MultiHeadAttention<T> mha(4, 2, opt, gen);
    mha.out_proj().set_bias(attn_test::vec<T>({1, -2, 3, 0.5}));
    attn::MhaArgs<T> args;
    args.batch = 2;
    attn::BoolMatrix pad = attn::BoolMatrix::Zero(2, 5);
    pad.row(1).setConstant(true);  // sequence 1: every key padded
    args.key_padding_mask = attn::IgnoreMask(pad);
    args.need_weights = true;
    const Mat<T> x = random<T>(2 * 5, 4, 35);
    const auto [out, weights] = mha.forward(x, x, x, args);
    for (Index l = 0; l < 5; ++l) {
      EXPECT_TRUE(matrices_near(out.row(5 + l), mha.out_proj().bias().transpose(), this->tol)) << "zero_attn " << zero_attn;
      Mat<T> want = Mat<T>::Zero(1, weights.cols());
      if (zero_attn) want(0, 5) = 1;
      EXPECT_EQ(weights.row(5 + l), want) << "zero_attn " << zero_attn;
    }
  }
}

// A window of Index's max (or any window >= L + S) is no window on every path: |a - j| < L + S for
// every query position a and key j. (It once overflowed a + window in the flash kernel's key ranges
// and came out as every row fully masked.)
TYPED_TEST(EdgeCases, WindowOfIndexMaxIsNoWindow) {
  using T = TypeParam;
  const Mat<T> q = random<T>(4, 3, 36), k = random<T>(7, 3, 37), v = random<T>(7, 2, 38);
  for (const Causal c : {Causal::None, Causal::TopLeft, Causal::BottomRight}) {
    attn::Masks<T> plain, huge;
    plain.causal = huge.causal = c;
    huge.window = std::numeric_limits<Index>::max();
    for (Path path : kAllPaths) {
      SCOPED_TRACE(name(path));
      EXPECT_TRUE(matrices_near(run(path, q, k, v, huge).output, run(path, q, k, v, plain).output, this->tol));
    }
    const Mat<T> q9 = random<T>(9, 3, 39);
    EXPECT_TRUE(matrices_near(attn::ScaledDotProductAttention<T>().forward(q9, k, v, huge),
                              attn::ScaledDotProductAttention<T>().forward(q9, k, v, plain), this->tol));
  }
}

// --- sizes that overflow Eigen::Index --------------------------------------------------------------

// Products of a caller's dimensions that do not fit Eigen::Index are shape_errors naming the
// product, raised before anything is allocated or indexed - never a wrapped-around size, a
// bad_alloc or an out-of-bounds access.
TEST(EdgeCasesOverflow, DimensionProductsThatOverflowAreNamedErrors) {
  using T = float;
  using attn::shape_error;
  const Index big = Index(1) << 62, max = std::numeric_limits<Index>::max();
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::Linear<T>(big, 4); },
                                       {"attn::Linear", "out_features * in_features = 4 * 4611686018427387904",
                                        "overflows"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::Linear<T>(1 << 20, Index(1) << 44); }, {"out_features * in_features"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::MultiHeadAttention<T>(Index(1) << 31, 1); },
                                       {"attn::MultiHeadAttention", "3 * embed_dim * embed_dim", "overflows"}));
  attn::MhaOptions wide;
  wide.kdim = big;
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::MultiHeadAttention<T>(8, 2, wide); },
                                       {"embed_dim * kdim = 8 * 4611686018427387904", "overflows"}));
  wide.kdim = 0, wide.vdim = big;
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::MultiHeadAttention<T>(8, 2, wide); }, {"embed_dim * vdim"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::SwiGLU<T>(big, 4); }, {"overflows"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::FeedForward<T>(4, big); }, {"overflows"}));
  attn::DecoderAttentionOptions wide_heads;
  wide_heads.head_dim = Index(1) << 40;
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::DecoderAttention<T>(8, Index(1) << 30, wide_heads); },
                                       {"attn::DecoderAttention", "num_heads * head_dim", "overflows"}));

  // GQA with 2^62 heads: num_heads * dv would wrap around before the query's shape is checked.
  const attn::GroupedQueryAttention<T> gqa(big, 1);
  EXPECT_TRUE(throws_with<shape_error>(
      [&] { (void)gqa.forward(Mat<T>::Ones(1, 4), Mat<T>::Ones(1, 4), Mat<T>::Ones(1, 4), attn_test::batch_of<attn::GqaArgs<T>>(1)); },
      {"attn::GroupedQueryAttention::forward", "num_heads * dv = 4611686018427387904 * 4", "overflows"}));
  Mat<T> out(1, 4);
  EXPECT_TRUE(throws_with<shape_error>(
      [&] { gqa.forward_into(Mat<T>::Ones(1, 4), Mat<T>::Ones(1, 4), Mat<T>::Ones(1, 4), attn_test::batch_of<attn::GqaArgs<T>>(1), out); }, {"query"}));

  // RoPE: a table of max_positions * rotary_dim / 2 entries; heads * head_dim columns (2^62 * 4
  // wraps to 0, which a 0-column x would have matched); start + rows (wraps negative).
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::RopeCache<T>(Index(1) << 40, Index(1) << 30); },
                                       {"attn::RopeCache", "max_positions * rotary_dim / 2", "overflows"}));
  const attn::RopeCache<T> rope(4, 16);
  Mat<T> no_cols(1, 0), x = Mat<T>::Ones(2, 4);
  EXPECT_TRUE(throws_with<shape_error>([&] { rope.apply(no_cols, big, 1, 0); }, {"x has shape [1, 0]"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { rope.apply(x, 1, 1, max); },
                                                {"start = 9223372036854775807 with 2 rows", "[0, 16)"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { rope.apply(x, 1, 1, 15); }, {"start = 15 with 2 rows"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { rope.apply(x, 1, max, 0); }, {"x has shape [2, 4]", "B = batch"}));
  EXPECT_EQ(x, Mat<T>::Ones(2, 4));

  // A mask over a raw buffer of rows * cols elements.
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::AttendMask(nullptr, Index(1) << 32, Index(1) << 32); },
                                       {"attn mask", "rows * cols = 4294967296 * 4294967296", "overflows"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { attn::AdditiveMask<T>(nullptr, max, 2); }, {"overflows"}));
}

}  // namespace
