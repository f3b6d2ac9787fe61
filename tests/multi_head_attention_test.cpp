#include <attn/multi_head_attention.hpp>
#include <attn/threads.hpp>

#include <cmath>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn_test::bmat;
using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;
using attn_test::vec;

// The arguments of a call on one sequence (B = 1, no masks).
template <class T>
attn::MhaArgs<T> one() {
  return attn_test::batch_of<attn::MhaArgs<T>>(1);
}

const double ln2 = std::log(2.0), ln3 = std::log(3.0), sqrt2 = std::sqrt(2.0);

// E = 4, H = 2, head_dim D = 2, scale 1/sqrt(2). Projections chosen so the arithmetic is short:
//   W_q = sqrt(2) I (cancels the scale), W_k = W_v = I, in_proj_bias = 0, out_proj = I, b_o = [1, 0, 0, -1].
// Head 0 reads columns 0-1, head 1 columns 2-3. With
//   query = [ln2, 0, 0, ln3], keys k0 = [1, 0, 1, 0], k1 = [0, 1, 0, 1],
//   values v0 = [3, 6, 4, 8], v1 = [9, 0, 0, 4]:
//   head 0: logits [ln2, 0] -> p = [2/3, 1/3] -> 2/3 [3, 6] + 1/3 [9, 0] = [5, 4]
//   head 1: logits [0, ln3] -> p = [1/4, 3/4] -> 1/4 [4, 8] + 3/4 [0, 4] = [1, 5]
//   concat [5, 4, 1, 5] + b_o = [6, 4, 1, 4]
template <class T>
class MhaTest : public ::testing::Test {
 protected:
  attn::MultiHeadAttention<T> make(const attn::MhaOptions& o = {}) const {
    attn::MultiHeadAttention<T> m(4, 2, o);
    const attn::Matrix<T> I = attn::Matrix<T>::Identity(4, 4);
    if (m.packed()) {
      attn::Matrix<T> w(12, 4);
      w << T(sqrt2) * I, I, I;
      m.set_in_proj_weight(w);
    } else {
      m.set_q_proj_weight(T(sqrt2) * I);
    }
    if (o.bias) {
      m.set_in_proj_bias(attn::Vector<T>::Zero(12));
      m.out_proj().set_bias(vec<T>({1, 0, 0, -1}));
    }
    m.out_proj().set_weight(I);
    return m;
  }
  const attn::Matrix<T> query = mat<T>({{ln2, 0, 0, ln3}});
  const attn::Matrix<T> key = mat<T>({{1, 0, 1, 0}, {0, 1, 0, 1}});
  const attn::Matrix<T> value = mat<T>({{3, 6, 4, 8}, {9, 0, 0, 4}});
  const double tol = attn_test::tolerance<T>();
};
TYPED_TEST_SUITE(MhaTest, attn_test::Scalars, attn_test::ScalarName);

TYPED_TEST(MhaTest, CrossAttentionByHand) {
  using T = TypeParam;
  const auto m = this->make();
  attn::MhaArgs<T> args;
  args.batch = 1;
  args.need_weights = true;
  const auto [out, w] = m.forward(this->query, this->key, this->value, args);
  EXPECT_TRUE(matrices_near(out, mat<T>({{6, 4, 1, 4}}), this->tol));
  // averaged over heads: [(2/3 + 1/4) / 2, (1/3 + 3/4) / 2] = [11/24, 13/24]
  EXPECT_TRUE(matrices_near(w, mat<T>({{11.0 / 24, 13.0 / 24}}), this->tol));
  args.average_attn_weights = false;
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, args).weights,
                            mat<T>({{2.0 / 3, 1.0 / 3}, {0.25, 0.75}}), this->tol));
  args.need_weights = false;
  EXPECT_EQ(m.forward(this->query, this->key, this->value, args).weights.size(), 0);
  attn::Matrix<T> into(1, 4);
  m.forward_into(this->query, this->key, this->value, one<T>(), into);
  EXPECT_TRUE(matrices_near(into, mat<T>({{6, 4, 1, 4}}), this->tol));  // the flash kernel, as forward() without weights
}

// Each head's log-sum-exp of its row's logits, in the example above: head 0's logits [ln2, 0]
// give log(2 + 1) = ln3, head 1's [0, ln3] give log(1 + 3) = ln4.
TYPED_TEST(MhaTest, LogSumExpByHand) {
  using T = TypeParam;
  const auto m = this->make();
  const attn::AttentionLse<T> r = m.forward_with_lse(this->query, this->key, this->value, one<T>());
  EXPECT_TRUE(matrices_near(r.output, mat<T>({{6, 4, 1, 4}}), this->tol));
  EXPECT_TRUE(matrices_near(r.lse, mat<T>({{ln3}, {std::log(4.0)}}), this->tol));
  attn::Matrix<T> out(1, 4), lse(2, 1);
  m.forward_into(this->query, this->key, this->value, one<T>(), out, lse);
  EXPECT_TRUE(out == r.output && lse == r.lse);
  // Zero projections make every logit 0, add_bias_kv's and add_zero_attn's keys too: with 3 keys
  // and those 2, lse = log 5 in every row of both sequences and both heads.
  attn::MhaOptions o;
  o.add_bias_kv = o.add_zero_attn = true;
  attn::MultiHeadAttention<T> zero(4, 2, o);
  zero.set_in_proj_weight(attn::Matrix<T>::Zero(12, 4));
  const attn::Matrix<T> x = attn::Matrix<T>::Random(4, 4), kv = attn::Matrix<T>::Random(6, 4);
  const attn::AttentionLse<T> z = zero.forward_with_lse(x, kv, kv, attn_test::batch_of<attn::MhaArgs<T>>(2));
  EXPECT_TRUE(matrices_near(z.lse, attn::Matrix<T>::Constant(2, 4, T(std::log(5.0))), this->tol));
  // Shapes and need_weights are checked, naming lse.
  attn::Matrix<T> wrong(1, 1);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { m.forward_into(this->query, this->key, this->value, one<T>(), out, wrong); },
                                       {"lse", "[1, 1]", "[2, 1]"}));
  attn::MhaArgs<T> weights = one<T>();
  weights.need_weights = true;
  EXPECT_THROW(m.forward_with_lse(this->query, this->key, this->value, weights), attn::argument_error);
}

// in_proj_bias adds 1 to every value feature; the weights sum to 1, so every head output grows
// by 1: concat [6, 5, 2, 6] + b_o = [7, 5, 2, 5].
TYPED_TEST(MhaTest, InProjBiasByHand) {
  using T = TypeParam;
  auto m = this->make();
  m.set_in_proj_bias(vec<T>({0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, one<T>()).output, mat<T>({{7, 5, 2, 5}}), this->tol));
}

// Self-attention on x = [[ln2, 0, 0, ln3]] alone: one key, p = 1, head outputs = x
// -> out = x + b_o = [ln2 + 1, 0, 0, ln3 - 1].
TYPED_TEST(MhaTest, SelfAttentionSingleToken) {
  using T = TypeParam;
  const auto m = this->make();
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->query, this->query, one<T>()).output, mat<T>({{ln2 + 1, 0, 0, ln3 - 1}}), this->tol));
}

// Two sequences. b0 is the example above -> [6, 4, 1, 4]. b1 has keys [k1, k0], values
// [v2, v0] with v2 = [1, 1, 1, 1], and its second key padded: it sees only v2 -> [1, 1, 1, 1] + b_o = [2, 1, 1, 0].
// batch_first rows run (b, s); the default layout's rows run (s, b).
TYPED_TEST(MhaTest, BatchInBothLayouts) {
  using T = TypeParam;
  const auto q0 = this->query.row(0), k0 = this->key.row(0), k1 = this->key.row(1);
  const auto v0 = this->value.row(0), v1 = this->value.row(1);
  const attn::Matrix<T> v2 = attn::Matrix<T>::Ones(1, 4), q1 = mat<T>({{0, ln2, ln3, 0}});
  const auto expected = mat<T>({{6, 4, 1, 4}, {2, 1, 1, 0}});
  attn::MhaArgs<T> args;
  args.batch = 2;
  args.key_padding_mask = attn::IgnoreMask(bmat({{0, 0}, {0, 1}}));
  args.need_weights = true;
  args.average_attn_weights = false;
  // per head, rows (b, h): b0 [[2/3, 1/3], [1/4, 3/4]], b1 [[1, 0], [1, 0]]
  const auto expected_w = mat<T>({{2.0 / 3, 1.0 / 3}, {0.25, 0.75}, {1, 0}, {1, 0}});

  attn::MhaOptions bf;
  bf.batch_first = true;
  attn::Matrix<T> q(2, 4), k(4, 4), v(4, 4);
  q << q0, q1;
  k << k0, k1, k1, k0;  // (b, s)
  v << v0, v1, v2, v0;
  const auto r1 = this->make(bf).forward(q, k, v, args);
  EXPECT_TRUE(matrices_near(r1.output, expected, this->tol));
  EXPECT_TRUE(matrices_near(r1.weights, expected_w, this->tol));

  k << k0, k1, k1, k0;  // (s, b): s0 = [k0 | k1], s1 = [k1 | k0]
  v << v0, v2, v1, v0;
  const auto r2 = this->make().forward(q, k, v, args);  // L = 1: query rows are the same in both orders
  EXPECT_TRUE(matrices_near(r2.output, expected, this->tol));
  EXPECT_TRUE(matrices_near(r2.weights, expected_w, this->tol));
}

// 2-D bool mask [L, S] = [[1, 0]] in IgnoreMask polarity: key 0 hidden from both heads
//   -> heads output v1 = [9, 0, 0, 4] -> out [10, 0, 0, 3].
// 3-D mask [B*H*L, S]: head 0 hides key 1, head 1 hides nothing
//   -> head 0 = v0[0:2] = [3, 6], head 1 = [1, 5] -> out [4, 6, 1, 4].
// Additive [[0, ln2]]: head 0 logits [ln2, ln2] -> [1/2, 1/2] -> [6, 3];
//   head 1 logits [0, ln6] -> [1/7, 6/7] -> 1/7 [4, 8] + 6/7 [0, 4] = [4/7, 32/7] -> out [7, 3, 4/7, 25/7].
TYPED_TEST(MhaTest, AttnMasksByHand) {
  using T = TypeParam;
  const auto m = this->make();
  attn::MhaArgs<T> a;
  a.batch = 1;
  a.attn_mask = attn::IgnoreMask(bmat({{1, 0}}));
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, a).output, mat<T>({{10, 0, 0, 3}}), this->tol));
  a.attn_mask = attn::IgnoreMask(bmat({{0, 1}, {0, 0}}));
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, a).output, mat<T>({{4, 6, 1, 4}}), this->tol));
  a.attn_mask = {};
  a.attn_bias = attn::AdditiveMask<T>(mat<T>({{0, ln2}}));
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, a).output, mat<T>({{7, 3, 4.0 / 7, 25.0 / 7}}), this->tol));
}

// L = 1, S = 2. TopLeft: the query sees key 0 only -> heads v0 = [3, 6, 4, 8] -> [4, 6, 4, 7].
// BottomRight: j <= 0 + S - L = 1 -> every key -> the unmasked [6, 4, 1, 4].
TYPED_TEST(MhaTest, CausalAlignments) {
  using T = TypeParam;
  const auto m = this->make();
  attn::MhaArgs<T> a;
  a.batch = 1;
  a.causal = attn::Causal::TopLeft;
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, a).output, mat<T>({{4, 6, 4, 7}}), this->tol));
  a.causal = attn::Causal::BottomRight;
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, a).output, mat<T>({{6, 4, 1, 4}}), this->tol));
}

// add_bias_kv with bias_k = 0, bias_v = [12, 0, 0, 12]: a third key with logit 0.
//   head 0: logits [ln2, 0, 0] -> [1/2, 1/4, 1/4] -> 1/2 [3, 6] + 1/4 [9, 0] + 1/4 [12, 0] = [6.75, 3]
//   head 1: logits [0, ln3, 0] -> [1/5, 3/5, 1/5] -> 1/5 [4, 8] + 3/5 [0, 4] + 1/5 [0, 12] = [0.8, 6.4]
//   out = [6.75, 3, 0.8, 6.4] + b_o = [7.75, 3, 0.8, 5.4]; averaged weights [0.35, 0.425, 0.225].
// A mask covers the original S = 2 keys; the bias key is never masked (PyTorch pads masks with
// an unmasked column): masking key 0 leaves head 0 with [0, 1/2, 1/2].
TYPED_TEST(MhaTest, AddBiasKvByHand) {
  using T = TypeParam;
  attn::MhaOptions o;
  o.add_bias_kv = true;
  auto m = this->make(o);
  m.set_bias_k(vec<T>({0, 0, 0, 0}));
  m.set_bias_v(vec<T>({12, 0, 0, 12}));
  attn::MhaArgs<T> a;
  a.batch = 1;
  a.need_weights = true;
  const auto [out, w] = m.forward(this->query, this->key, this->value, a);
  EXPECT_TRUE(matrices_near(out, mat<T>({{7.75, 3, 0.8, 5.4}}), this->tol));
  EXPECT_TRUE(matrices_near(w, mat<T>({{0.35, 0.425, 0.225}}), this->tol));
  a.average_attn_weights = false;
  a.key_padding_mask = attn::IgnoreMask(bmat({{1, 0}}));
  // head 0: logits [-, 0, 0] -> [0, 1/2, 1/2]; head 1: [-, ln3, 0] -> [0, 3/4, 1/4]
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, a).weights,
                            mat<T>({{0, 0.5, 0.5}, {0, 0.75, 0.25}}), this->tol));
}

// Every key padded. Without add_zero_attn the row is fully masked: heads output zeros (PyTorch:
// NaN), out = out_proj(0) = b_o, weights zeros. With add_zero_attn the zero key takes weight 1 and
// its zero value gives the same out = b_o (PyTorch's documented consequence).
TYPED_TEST(MhaTest, AllKeysPaddedWithAndWithoutZeroAttn) {
  using T = TypeParam;
  attn::MhaArgs<T> a;
  a.batch = 1;
  a.key_padding_mask = attn::IgnoreMask(bmat({{1, 1}}));
  a.need_weights = true;
  const auto plain = this->make().forward(this->query, this->key, this->value, a);
  EXPECT_TRUE(matrices_near(plain.output, mat<T>({{1, 0, 0, -1}}), this->tol));
  EXPECT_TRUE(matrices_near(plain.weights, mat<T>({{0, 0}}), this->tol));
  attn::MhaOptions o;
  o.add_zero_attn = true;
  const auto zero = this->make(o).forward(this->query, this->key, this->value, a);
  EXPECT_TRUE(matrices_near(zero.output, mat<T>({{1, 0, 0, -1}}), this->tol));
  EXPECT_TRUE(matrices_near(zero.weights, mat<T>({{0, 0, 1}}), this->tol));
  // Unpadded, the zero key is one more logit 0 beside [ln2, 0] and [0, ln3]:
  //   head 0: exp [2, 1, 1] / 4 -> 1/2 [3, 6] + 1/4 [9, 0] = [3.75, 3]
  //   head 1: exp [1, 3, 1] / 5 -> 1/5 [4, 8] + 3/5 [0, 4] = [0.8, 4]
  //   out = [3.75, 3, 0.8, 4] + b_o = [4.75, 3, 0.8, 3]
  EXPECT_TRUE(matrices_near(this->make(o).forward(this->query, this->key, this->value, one<T>()).output, mat<T>({{4.75, 3, 0.8, 3}}), this->tol));
}

// kdim = 2, vdim = 3: k_proj_weight [4, 2] = [I; I] maps key [1, 0] to [1, 0, 1, 0] as before;
// v_proj_weight [4, 3] copies feature 2 into features 2 and 3, so v0 = [3, 6, 4, 4], v1 = [9, 0, 0, 0].
//   head 0 as before [5, 4]; head 1: 1/4 [4, 4] + 3/4 [0, 0] = [1, 1] -> out [6, 4, 1, 0].
TYPED_TEST(MhaTest, SeparateKdimVdimByHand) {
  using T = TypeParam;
  attn::MhaOptions o;
  o.kdim = 2;
  o.vdim = 3;
  auto m = this->make(o);
  EXPECT_FALSE(m.packed());
  m.set_k_proj_weight(mat<T>({{1, 0}, {0, 1}, {1, 0}, {0, 1}}));
  m.set_v_proj_weight(mat<T>({{1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {0, 0, 1}}));
  const auto out = m.forward(this->query, mat<T>({{1, 0}, {0, 1}}), mat<T>({{3, 6, 4}, {9, 0, 0}}), one<T>()).output;
  EXPECT_TRUE(matrices_near(out, mat<T>({{6, 4, 1, 0}}), this->tol));
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { (void)m.in_proj_weight(); }, {"in_proj_weight", "kdim = 2"}));
}

// bias = false: no in_proj_bias, no out_proj.bias: out = concat [5, 4, 1, 5].
TYPED_TEST(MhaTest, WithoutBias) {
  using T = TypeParam;
  attn::MhaOptions o;
  o.bias = false;
  auto m = this->make(o);
  EXPECT_EQ(m.in_proj_bias().size(), 0);
  EXPECT_FALSE(m.out_proj().has_bias());
  EXPECT_TRUE(matrices_near(m.forward(this->query, this->key, this->value, one<T>()).output, mat<T>({{5, 4, 1, 5}}), this->tol));
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { m.set_in_proj_bias(attn::Vector<T>::Zero(12)); }, {"in_proj_bias", "bias = false"}));
}

// PyTorch's initialisation: in_proj_weight ~ xavier_uniform, bound sqrt(6 / (3E + E)) = sqrt(6/64);
// biases zero; out_proj.weight within 1/sqrt(E); bias_k, bias_v drawn (non-zero).
TYPED_TEST(MhaTest, DefaultInitialisation) {
  using T = TypeParam;
  attn::MhaOptions o;
  o.add_bias_kv = true;
  attn::Generator gen(5);
  attn::MultiHeadAttention<T> m(16, 4, o, gen);
  EXPECT_LE(m.in_proj_weight().cwiseAbs().maxCoeff(), T(std::sqrt(6.0 / 64)));
  EXPECT_EQ(m.in_proj_bias(), attn::Vector<T>::Zero(48));
  EXPECT_EQ(m.out_proj().bias(), attn::Vector<T>::Zero(16));
  EXPECT_LE(m.out_proj().weight().cwiseAbs().maxCoeff(), T(0.25));
  EXPECT_GT(m.bias_k().cwiseAbs().maxCoeff(), T(0));
  attn::Generator again(5);
  EXPECT_EQ(attn::MultiHeadAttention<T>(16, 4, o, again).in_proj_weight(), m.in_proj_weight());
}

TYPED_TEST(MhaTest, RejectsBadArguments) {
  using T = TypeParam;
  using attn::shape_error;
  EXPECT_TRUE(throws_with<shape_error>([] { attn::MultiHeadAttention<T>(6, 4); }, {"embed_dim = 6", "num_heads = 4"}));
  EXPECT_TRUE(throws_with<shape_error>([] { attn::MultiHeadAttention<T>(0, 1); }, {"embed_dim = 0"}));
  EXPECT_TRUE(throws_with<shape_error>([] { attn::MultiHeadAttention<T>(4, 0); }, {"num_heads = 0"}));
  auto m = this->make();
  const auto& q = this->query;
  const auto& k = this->key;
  const auto& v = this->value;
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(attn::Matrix<T>(1, 5), k, v, one<T>()); }, {"query", "[1, 5]", "[1*L, 4]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, attn::Matrix<T>(2, 3), v, one<T>()); }, {"key", "[2, 3]", "kdim", "[1*S, 4]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, k, attn::Matrix<T>(3, 4), one<T>()); }, {"value", "[3, 4]", "[2, 4]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, attn::Matrix<T>(0, 4), attn::Matrix<T>(0, 4), one<T>()); }, {"key", "[0, 4]"}));
  attn::MhaArgs<T> a;
  a.batch = 2;  // 1 query row cannot hold 2 sequences
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, k, v, a); }, {"query", "[1, 4]", "[2*L, 4]"}));
  a.batch = 0;  // the default: not set
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { (void)m.forward(q, k, v, a); }, {"batch is not set"}));
  a.batch = -3;
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, k, v, a); }, {"batch must be positive", "-3"}));
  a = one<T>();
  a.attn_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(3, 2));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, k, v, a); }, {"attn_mask", "[3, 2]", "[L, S] = [1, 2]", "[B*H*L, S] = [2, 2]"}));
  a = one<T>();
  a.attn_bias = attn::AdditiveMask<T>(attn::Matrix<T>::Zero(1, 3));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, k, v, a); }, {"attn_bias", "[1, 3]"}));
  a = one<T>();
  a.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(1, 3));
  EXPECT_TRUE(throws_with<shape_error>([&] { (void)m.forward(q, k, v, a); }, {"key_padding_mask", "[1, 3]", "[B, S] = [1, 2]"}));
  a = one<T>();
  a.need_weights = true;
  attn::Matrix<T> out(1, 4);
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { m.forward_into(q, k, v, a, out); }, {"need_weights"}));
  attn::Matrix<T> bad_out(2, 4);
  EXPECT_TRUE(throws_with<shape_error>([&] { m.forward_into(q, k, v, one<T>(), bad_out); }, {"out", "[2, 4]", "[1, 4]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { m.set_in_proj_weight(attn::Matrix<T>(4, 4)); }, {"in_proj_weight", "[4, 4]", "[12, 4]"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { m.set_in_proj_bias(attn::Vector<T>(4)); }, {"in_proj_bias", "[4]", "[12]"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { m.set_q_proj_weight(attn::Matrix<T>(4, 4)); }, {"q_proj_weight", "in_proj_weight"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { m.set_bias_k(attn::Vector<T>(4)); }, {"bias_k", "add_bias_kv = false"}));
  EXPECT_TRUE(throws_with<shape_error>([&] { m.out_proj().set_weight(attn::Matrix<T>(4, 3)); }, {"weight", "[4, 3]", "[4, 4]"}));
}

// ---------------------------------------------------------------------------------------------
// Fused projections and threads. Self-attention (query, key and value one matrix) projects with
// one GEMM into [N, 3E] and reads the heads from it with row stride 3E; key and value one matrix
// fuse the k and v projections ([M, 2E], row stride 2E). A copy of the input has other memory, so
// it takes the three-GEMM path: the differential tests below hold the fused paths to it.

// A module with every parameter random (non-zero biases, bias_k and bias_v).
template <class T>
attn::MultiHeadAttention<T> random_mha(attn::Index E, attn::Index H, const attn::MhaOptions& o, std::uint64_t seed) {
  attn::Generator gen(seed);
  attn::MultiHeadAttention<T> m(E, H, o, gen);
  attn::Vector<T> in_bias(3 * E), out_bias(E);
  attn::init::uniform(in_bias, -0.5, 0.5, gen);
  attn::init::uniform(out_bias, -0.5, 0.5, gen);
  m.set_in_proj_bias(in_bias);
  m.out_proj().set_bias(out_bias);
  return m;
}

template <class T>
attn::Matrix<T> random_input(attn::Index rows, attn::Index cols, std::uint64_t seed) {
  attn::Generator gen(seed);
  attn::Matrix<T> x(rows, cols);
  attn::init::uniform(x, -1.0, 1.0, gen);
  return x;
}

// Masks for B = 2 sequences of L queries and S keys, H = 2 heads: a [B*H*L, S] bool mask and key
// padding, each hiding a few keys but never a whole row.
template <class T>
attn::MhaArgs<T> some_masks(attn::Index L, attn::Index S) {
  const attn::Index B = 2, H = 2;
  attn::MhaArgs<T> a;
  a.batch = B;
  attn::BoolMatrix hidden = attn::BoolMatrix::Zero(B * H * L, S);
  for (attn::Index r = 0; r < B * H * L; ++r) hidden(r, (r * 7) % S) = r % 3 != 0;
  a.attn_mask = attn::IgnoreMask(std::move(hidden));  // moved in: owned, outlives this function
  attn::BoolMatrix padded = attn::BoolMatrix::Zero(B, S);
  padded(1, S - 1) = true;
  a.key_padding_mask = attn::IgnoreMask(std::move(padded));
  a.need_weights = true;
  a.average_attn_weights = false;
  return a;
}

// Self-attention, fused (x, x, x) against unfused (x and two copies), in both layouts, with
// masks, add_bias_kv and add_zero_attn; outputs and per-head weights.
TYPED_TEST(MhaTest, FusedSelfAttentionMatchesUnfused) {
  using T = TypeParam;
  const attn::Index B = 2, L = 5, E = 8, H = 2;
  for (unsigned c = 0; c < 8; ++c) {
    attn::MhaOptions o;
    o.batch_first = c & 1;
    o.add_bias_kv = c & 2;
    o.add_zero_attn = c & 4;
    SCOPED_TRACE(::testing::Message() << "batch_first " << o.batch_first << ", add_bias_kv " << o.add_bias_kv
                                      << ", add_zero_attn " << o.add_zero_attn);
    const auto m = random_mha<T>(E, H, o, 10 + c);
    const attn::Matrix<T> x = random_input<T>(B * L, E, 20 + c), k = x, v = x;
    for (const bool masked : {false, true}) {
      attn::MhaArgs<T> a = masked ? some_masks<T>(L, L) : one<T>();
      a.batch = B;
      a.need_weights = true;
      const auto fused = m.forward(x, x, x, a), unfused = m.forward(x, k, v, a);
      EXPECT_TRUE(matrices_near(fused.output, unfused.output, this->tol));
      EXPECT_TRUE(matrices_near(fused.weights, unfused.weights, this->tol));
      attn::Matrix<T> into(B * L, E);
      a.need_weights = false;
      m.forward_into(x, x, x, a, into);  // the path without weights
      EXPECT_TRUE(matrices_near(into, unfused.output, this->tol));
    }
  }
}

// Cross-attention with key and value one matrix (L = 3 queries, S = 6 keys), fused k and v
// against unfused.
// lse column n is query row n in either row order: each sequence's columns equal a call on that
// sequence alone (random module with add_bias_kv, B = 3, L = 4, S = 5).
TYPED_TEST(MhaTest, LogSumExpFollowsTheQueryRowOrder) {
  using T = TypeParam;
  const attn::Index E = 8, H = 2, B = 3, L = 4, S = 5;
  for (const bool batch_first : {false, true}) {
    attn::MhaOptions o;
    o.batch_first = batch_first;
    o.add_bias_kv = true;
    const attn::MultiHeadAttention<T> m = random_mha<T>(E, H, o, 41);
    const attn::Matrix<T> q = random_input<T>(B * L, E, 1), kv = random_input<T>(B * S, E, 2);
    const attn::Matrix<T> lse = m.forward_with_lse(q, kv, kv, attn_test::batch_of<attn::MhaArgs<T>>(B)).lse;
    const auto row = [&](attn::Index b, attn::Index i, attn::Index n) { return batch_first ? b * n + i : i * B + b; };
    for (attn::Index b = 0; b < B; ++b) {
      attn::Matrix<T> qb(L, E), kvb(S, E), want(H, B * L);
      for (attn::Index i = 0; i < L; ++i) qb.row(i) = q.row(row(b, i, L));
      for (attn::Index j = 0; j < S; ++j) kvb.row(j) = kv.row(row(b, j, S));
      const attn::Matrix<T> alone = m.forward_with_lse(qb, kvb, kvb, one<T>()).lse;
      for (attn::Index i = 0; i < L; ++i)
        EXPECT_TRUE(matrices_near(attn::Matrix<T>(lse.col(row(b, i, L))), attn::Matrix<T>(alone.col(i)), this->tol))
            << "batch_first " << batch_first << ", sequence " << b << ", row " << i;
    }
  }
}

TYPED_TEST(MhaTest, FusedKeyValueMatchesUnfused) {
  using T = TypeParam;
  const attn::Index B = 2, L = 3, S = 6, E = 8, H = 2;
  for (unsigned c = 0; c < 8; ++c) {
    attn::MhaOptions o;
    o.batch_first = c & 1;
    o.add_bias_kv = c & 2;
    o.add_zero_attn = c & 4;
    SCOPED_TRACE(::testing::Message() << "batch_first " << o.batch_first << ", add_bias_kv " << o.add_bias_kv
                                      << ", add_zero_attn " << o.add_zero_attn);
    const auto m = random_mha<T>(E, H, o, 30 + c);
    const attn::Matrix<T> q = random_input<T>(B * L, E, 40 + c), kv = random_input<T>(B * S, E, 50 + c), v = kv;
    attn::MhaArgs<T> a = some_masks<T>(L, S);
    const auto fused = m.forward(q, kv, kv, a), unfused = m.forward(q, kv, v, a);
    EXPECT_TRUE(matrices_near(fused.output, unfused.output, this->tol));
    EXPECT_TRUE(matrices_near(fused.weights, unfused.weights, this->tol));
  }
}

// Restores the default thread setting when a test ends, also when it fails.
struct ThreadSetting {
  ~ThreadSetting() { attn::set_num_threads(0); }
};

// B*L = 700 rows (2 row chunks of the projections, 3 column chunks of the fused [700, 384] one)
// at E = 128, enough work that threads_for really starts 3 threads: one, two and three threads
// give the same bits, in self- and cross-attention, with and without weights.
TYPED_TEST(MhaTest, BitwiseIdenticalForAnyThreadCount) {
  using T = TypeParam;
  const ThreadSetting restore;
  const attn::Index B = 7, L = 100, E = 128, H = 4;
  attn::MhaOptions o;
  o.batch_first = true;
  const auto m = random_mha<T>(E, H, o, 60);
  const attn::Matrix<T> x = random_input<T>(B * L, E, 61), mem = random_input<T>(B * 40, E, 62);
  attn::MhaArgs<T> causal;
  causal.batch = B;
  causal.causal = attn::Causal::TopLeft;
  attn::MhaArgs<T> plain, with_weights;
  plain.batch = with_weights.batch = B;
  with_weights.need_weights = true;
  std::vector<attn::Matrix<T>> got[4];
  for (int threads : {1, 2, 3}) {
    attn::set_num_threads(threads);
    got[0].push_back(m.forward(x, x, x, causal).output);
    const auto r = m.forward(x, x, x, with_weights);
    got[1].push_back(r.output);
    got[2].push_back(r.weights);
    got[3].push_back(m.forward(x, mem, mem, plain).output);
  }
  const char* what[] = {"causal self-attention", "self-attention with weights", "weights", "cross-attention"};
  for (std::size_t w = 0; w < 4; ++w)
    for (std::size_t i = 1; i < got[w].size(); ++i)
      EXPECT_TRUE(got[w][0] == got[w][i]) << what[w] << ", " << i + 1 << " threads";
}

// Two threads calling forward() on one const module at once (each with its own scratch buffer)
// get what each gets alone.
TYPED_TEST(MhaTest, ConcurrentCallsOnOneModule) {
  using T = TypeParam;
  const ThreadSetting restore;
  attn::set_num_threads(1);
  const attn::Index L = 64, E = 32, H = 4;
  const auto m = random_mha<T>(E, H, {}, 70);
  const attn::Matrix<T> x0 = random_input<T>(L, E, 71), x1 = random_input<T>(2 * L, E, 72);
  const attn::Matrix<T> want0 = m.forward(x0, x0, x0, one<T>()).output, want1 = m.forward(x1, x1, x1, one<T>()).output;
  bool ok0 = true, ok1 = true;
  std::thread other([&] {
    for (int i = 0; i < 50; ++i) ok1 = ok1 && m.forward(x1, x1, x1, one<T>()).output == want1;
  });
  for (int i = 0; i < 50; ++i) ok0 = ok0 && m.forward(x0, x0, x0, one<T>()).output == want0;
  other.join();
  EXPECT_TRUE(ok0);
  EXPECT_TRUE(ok1);
}

}  // namespace
