#include <attn/scaled_dot_product_attention.hpp>

#include <cmath>
#include <limits>

#include "support/test_util.hpp"

namespace {

using attn_test::bmat;
using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;

const double ln2 = std::log(2.0), ln3 = std::log(3.0);
const double inf = std::numeric_limits<double>::infinity();

template <class T>
class SdpaTest : public ::testing::Test {
 protected:
  // The running example, with scale 1 so every logit is a dot product. L = 2, S = 3, d = 2, dv = 2.
  //   q0 . k = [ln2, 0, 0]  -> exp [2, 1, 1], sum 4 -> p0 = [1/2, 1/4, 1/4]
  //   q1 . k = [0, ln3, 0]  -> exp [1, 3, 1], sum 5 -> p1 = [1/5, 3/5, 1/5]
  //   o0 = 1/2 [4, 0] + 1/4 [8, 4] + 1/4 [0, 8] = [4, 3]
  //   o1 = 1/5 [4, 0] + 3/5 [8, 4] + 1/5 [0, 8] = [5.6, 4]
  const attn::Matrix<T> q = mat<T>({{ln2, 0}, {0, ln3}});
  const attn::Matrix<T> k = mat<T>({{1, 0}, {0, 1}, {0, 0}});
  const attn::Matrix<T> v = mat<T>({{4, 0}, {8, 4}, {0, 8}});
  const attn::ScaledDotProductAttention<T> sdpa{T(1)};
  const double tol = attn_test::tolerance<T>();
};
TYPED_TEST_SUITE(SdpaTest, attn_test::Scalars, attn_test::ScalarName);

TYPED_TEST(SdpaTest, PlainByHand) {
  using T = TypeParam;
  const auto [out, w] = this->sdpa.forward_with_weights(this->q, this->k, this->v);
  EXPECT_TRUE(matrices_near(out, mat<T>({{4, 3}, {5.6, 4}}), this->tol));
  EXPECT_TRUE(matrices_near(w, mat<T>({{0.5, 0.25, 0.25}, {0.2, 0.6, 0.2}}), this->tol));
  // forward() takes the flash kernel, forward_with_weights() the blocked one: both give the hand values.
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v), mat<T>({{4, 3}, {5.6, 4}}), this->tol));
}

// d = 4, so the default scale is 1/sqrt(4) = 1/2: logits [ln4 / 2, 0] = [ln2, 0] -> p = [2/3, 1/3],
// out = 2/3 * 3 + 1/3 * 6 = 4. L != S and d != dv (dv = 1).
TYPED_TEST(SdpaTest, DefaultScaleIsOneOverSqrtD) {
  using T = TypeParam;
  attn::ScaledDotProductAttention<T> default_scale;
  EXPECT_FALSE(default_scale.scale().has_value());
  const auto out = default_scale.forward(mat<T>({{std::log(4.0), 0, 0, 0}}), mat<T>({{1, 0, 0, 0}, {0, 0, 0, 0}}), mat<T>({{3}, {6}}));
  EXPECT_TRUE(matrices_near(out, mat<T>({{4}}), this->tol));
}

// Scale 0: every logit 0, uniform weights: out = mean of the values = [4, 4] for both rows.
TYPED_TEST(SdpaTest, ScaleZeroAveragesValues) {
  using T = TypeParam;
  attn::ScaledDotProductAttention<T> zero_scale{T(0)};
  EXPECT_TRUE(matrices_near(zero_scale.forward(this->q, this->k, this->v), mat<T>({{4, 4}, {4, 4}}), this->tol));
}

// AttendMask [[1, 0, 1], [1, 1, 1]]: row 0 keeps keys 0 and 2: exp [2, -, 1] -> [2/3, 0, 1/3],
// o0 = 2/3 [4, 0] + 1/3 [0, 8] = [8/3, 8/3]; row 1 as unmasked. IgnoreMask of the complement
// means the same.
TYPED_TEST(SdpaTest, BoolMaskEitherPolarity) {
  using T = TypeParam;
  const auto expected = mat<T>({{8.0 / 3, 8.0 / 3}, {5.6, 4}});
  attn::Masks<T> attend;
  attend.attn_mask = attn::AttendMask(bmat({{1, 0, 1}, {1, 1, 1}}));
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v, attend), expected, this->tol));
  attn::Masks<T> ignore;
  ignore.attn_mask = attn::IgnoreMask(bmat({{0, 1, 0}, {0, 0, 0}}));
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v, ignore), expected, this->tol));
}

// Bias [[0, ln2, -inf], [0, 0, 0]]: row 0 logits [ln2, ln2, -inf] -> [1/2, 1/2, 0],
// o0 = 1/2 [4, 0] + 1/2 [8, 4] = [6, 2].
TYPED_TEST(SdpaTest, AdditiveBiasWithMinusInfinity) {
  using T = TypeParam;
  attn::Masks<T> m;
  m.attn_bias = attn::AdditiveMask<T>(mat<T>({{0, ln2, -inf}, {0, 0, 0}}));
  const auto [out, w] = this->sdpa.forward_with_weights(this->q, this->k, this->v, m);
  EXPECT_TRUE(matrices_near(out, mat<T>({{6, 2}, {5.6, 4}}), this->tol));
  EXPECT_TRUE(matrices_near(w.row(0), mat<T>({{0.5, 0.5, 0}}), this->tol));
}

// L = 2 < S = 3.
// TopLeft (j <= i):        row 0 sees key 0 -> [4, 0]; row 1 sees keys 0, 1: exp [1, 3] ->
//                          [1/4, 3/4] -> [1 + 6, 0 + 3] = [7, 3].
// BottomRight (j <= i + 1): row 0 sees keys 0, 1: exp [2, 1] -> [2/3, 1/3] -> [16/3, 4/3];
//                          row 1 sees every key -> [5.6, 4].
TYPED_TEST(SdpaTest, CausalBothAlignmentsFewerQueries) {
  using T = TypeParam;
  attn::Masks<T> m;
  m.causal = attn::Causal::TopLeft;
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v, m), mat<T>({{4, 0}, {7, 3}}), this->tol));
  m.causal = attn::Causal::BottomRight;
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v, m), mat<T>({{16.0 / 3, 4.0 / 3}, {5.6, 4}}), this->tol));
}

// L = 3 > S = 2: q = [[ln2, 0], [0, ln3], [0, 0]], k = I, v = [[4, 0], [8, 4]].
// TopLeft (j <= i):        row 0: key 0 -> [4, 0]; row 1: [0, ln3] -> [1/4, 3/4] -> [7, 3];
//                          row 2: [0, 0] -> [1/2, 1/2] -> [6, 2].
// BottomRight (j <= i - 1): row 0 sees no key -> zeros (weights zeros too); row 1: key 0 -> [4, 0];
//                          row 2: both -> [6, 2].
TYPED_TEST(SdpaTest, CausalBothAlignmentsMoreQueries) {
  using T = TypeParam;
  const auto query = mat<T>({{ln2, 0}, {0, ln3}, {0, 0}}), keys = mat<T>({{1, 0}, {0, 1}}), values = mat<T>({{4, 0}, {8, 4}});
  attn::Masks<T> m;
  m.causal = attn::Causal::TopLeft;
  EXPECT_TRUE(matrices_near(this->sdpa.forward(query, keys, values, m), mat<T>({{4, 0}, {7, 3}, {6, 2}}), this->tol));
  m.causal = attn::Causal::BottomRight;
  const auto [out, w] = this->sdpa.forward_with_weights(query, keys, values, m);
  EXPECT_TRUE(matrices_near(out, mat<T>({{0, 0}, {4, 0}, {6, 2}}), this->tol));
  EXPECT_TRUE(matrices_near(w, mat<T>({{0, 0}, {1, 0}, {0.5, 0.5}}), this->tol));
}

// Key padding [1, S], last key padded: row 0: exp [2, 1] -> [16/3, 4/3]; row 1: exp [1, 3] -> [7, 3].
TYPED_TEST(SdpaTest, KeyPadding) {
  using T = TypeParam;
  attn::Masks<T> m;
  m.key_padding_mask = attn::IgnoreMask(bmat({{0, 0, 1}}));
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v, m), mat<T>({{16.0 / 3, 4.0 / 3}, {7, 3}}), this->tol));
}

// Every key of row 1 masked: zeros in output and weights (PyTorch's MHA would give NaN).
TYPED_TEST(SdpaTest, FullyMaskedRowIsZeros) {
  using T = TypeParam;
  attn::Masks<T> m;
  m.attn_mask = attn::AttendMask(bmat({{1, 1, 1}, {0, 0, 0}}));
  const auto [out, w] = this->sdpa.forward_with_weights(this->q, this->k, this->v, m);
  EXPECT_TRUE(matrices_near(out, mat<T>({{4, 3}, {0, 0}}), this->tol));
  EXPECT_TRUE(matrices_near(w, mat<T>({{0.5, 0.25, 0.25}, {0, 0, 0}}), this->tol));
  attn::Masks<T> by_bias;  // the same through -inf biases
  by_bias.attn_bias = attn::AdditiveMask<T>(mat<T>({{0, 0, 0}, {-inf, -inf, -inf}}));
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v, by_bias), mat<T>({{4, 3}, {0, 0}}), this->tol));
}

// A masked key contributes exactly nothing: its weight is exactly 0 (not a tiny exp(-inf)
// approximation from a vectorized exp), so even a huge value behind it leaves the output as
// computed by hand. Keys 0 and 1 as in the running example, then 16 masked keys (enough for the
// vectorized path) whose values are huge:
//   row 0: keys 0, 1 -> exp [2, 1] -> [2/3, 1/3] -> 2/3 [4, 0] + 1/3 [8, 4] = [16/3, 4/3]
//   row 1: exp [1, 3] -> [1/4, 3/4] -> [7, 3]
TYPED_TEST(SdpaTest, MaskedKeysWeighExactlyZero) {
  using T = TypeParam;
  const attn::Index S = 18;
  const T huge = T(std::is_same_v<T, float> ? 1e30 : 1e300);
  attn::Matrix<T> keys = attn::Matrix<T>::Zero(S, 2), values = attn::Matrix<T>::Constant(S, 2, huge);
  keys.topRows(2) = this->k.topRows(2);
  values.topRows(2) = this->v.topRows(2);
  attn::BoolMatrix ignore = attn::BoolMatrix::Ones(2, S);
  ignore.leftCols(2).setZero();
  attn::Masks<T> m;
  m.attn_mask = attn::IgnoreMask(ignore);
  const auto [out, w] = this->sdpa.forward_with_weights(this->q, keys, values, m);
  EXPECT_EQ(w.rightCols(S - 2).cwiseAbs().maxCoeff(), T(0));
  EXPECT_TRUE(matrices_near(out, mat<T>({{16.0 / 3, 4.0 / 3}, {7, 3}}), this->tol));
}

// Everything at once. BottomRight: row 0 sees keys 0, 1; mask drops (1, 0); no padding;
// bias [[ln3, 0, 0], [0, 0, ln3]].
//   row 0: keys 0, 1: logits [ln2 + ln3, 0] = [ln6, 0] -> [6/7, 1/7] -> 6/7 [4, 0] + 1/7 [8, 4] = [32/7, 4/7]
//   row 1: keys 1, 2: logits [ln3 + 0, 0 + ln3]  -> [1/2, 1/2] -> 1/2 [8, 4] + 1/2 [0, 8] = [4, 6]
TYPED_TEST(SdpaTest, MasksCombine) {
  using T = TypeParam;
  attn::Masks<T> m;
  m.causal = attn::Causal::BottomRight;
  m.attn_mask = attn::AttendMask(bmat({{1, 1, 1}, {0, 1, 1}}));
  m.attn_bias = attn::AdditiveMask<T>(mat<T>({{ln3, 0, 0}, {0, 0, ln3}}));
  m.key_padding_mask = attn::IgnoreMask(bmat({{0, 0, 0}}));
  EXPECT_TRUE(matrices_near(this->sdpa.forward(this->q, this->k, this->v, m), mat<T>({{32.0 / 7, 4.0 / 7}, {4, 6}}), this->tol));
}

// Logits around 1e4: [1e4, 1e4, 1e4 - c] with c = 1e4 * 2^-13 = 1.220703125 (every number here is
// exact in float) -> weights proportional to [1, 1, x], x = e^-c; a naive exp overflows.
// out = (2 + 4 + 100 x) / (2 + x). Negated keys and query give the same logits.
TYPED_TEST(SdpaTest, StableAtLargeLogits) {
  using T = TypeParam;
  const double x = std::exp(-1.220703125);
  const auto expected = mat<T>({{(6 + 100 * x) / (2 + x)}});
  const double k3 = 1 - std::ldexp(1.0, -13);
  const auto values = mat<T>({{2}, {4}, {100}});
  EXPECT_TRUE(matrices_near(this->sdpa.forward(mat<T>({{1e4}}), mat<T>({{1}, {1}, {k3}}), values), expected, this->tol));
  EXPECT_TRUE(matrices_near(this->sdpa.forward(mat<T>({{-1e4}}), mat<T>({{-1}, {-1}, {-k3}}), values), expected, this->tol));
}

// Inputs as Maps over caller buffers and a strided output block: no copies, same numbers.
TYPED_TEST(SdpaTest, MapsAndStridedOutput) {
  using T = TypeParam;
  const attn::Matrix<T> qkv_rows = [&] {  // [L or S, q | k | v] side by side, as a packed projection
    attn::Matrix<T> m = attn::Matrix<T>::Zero(3, 6);
    m.block(0, 0, 2, 2) = this->q;
    m.block(0, 2, 3, 2) = this->k;
    m.block(0, 4, 3, 2) = this->v;
    return m;
  }();
  attn::Matrix<T> out = attn::Matrix<T>::Constant(2, 4, T(-1));
  this->sdpa.forward_into(qkv_rows.block(0, 0, 2, 2), qkv_rows.block(0, 2, 3, 2), qkv_rows.block(0, 4, 3, 2), {},
                          out.middleCols(1, 2));
  EXPECT_TRUE(matrices_near(out, mat<T>({{-1, 4, 3, -1}, {-1, 5.6, 4, -1}}), this->tol));
}

TYPED_TEST(SdpaTest, RejectsBadArguments) {
  using T = TypeParam;
  const auto& s = this->sdpa;
  const attn::Matrix<T> query(2, 2), keys(3, 2), values(3, 2);
  using attn::shape_error;
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(query, attn::Matrix<T>(3, 5), values); }, {"key", "[3, 5]", "[S, 2]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(query, keys, attn::Matrix<T>(4, 2)); }, {"value", "[4, 2]", "[3, dv]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(attn::Matrix<T>(0, 2), keys, values); }, {"query", "[0, 2]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(query, attn::Matrix<T>(0, 2), attn::Matrix<T>(0, 2)); }, {"key", "[0, 2]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(query, keys, attn::Matrix<T>(3, 0)); }, {"value", "[3, 0]"}));
  attn::Matrix<T> out(2, 3);
  EXPECT_TRUE(throws_with<shape_error>([&] { s.forward_into(query, keys, values, {}, out); }, {"out", "[2, 3]", "[2, 2]"}));
  attn::Masks<T> m;
  m.attn_mask = attn::AttendMask(attn::BoolMatrix::Ones(2, 4));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(query, keys, values, m); }, {"attn_mask", "[2, 4]", "[L, S] = [2, 3]"}));
  m = {};
  m.attn_bias = attn::AdditiveMask<T>(attn::Matrix<T>::Zero(3, 3));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(query, keys, values, m); }, {"attn_bias", "[3, 3]", "[2, 3]"}));
  m = {};
  m.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(2, 3));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)s.forward(query, keys, values, m); }, {"key_padding_mask", "[2, 3]", "[B, S] = [1, 3]"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([] { attn::ScaledDotProductAttention<T>{std::numeric_limits<T>::quiet_NaN()}; },
                                                {"scale must be finite"}));
}

}  // namespace
