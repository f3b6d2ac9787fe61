// The score options of attn::Masks (sliding window, logit soft-capping, ALiBi) and grouped-query
// attention (attn::GroupedQueryAttention), on cases small enough to compute by hand; the
// randomized differential tests (attention_kernel_test) hold every kernel to the reference on
// random combinations of them, and pytorch_fixture_test to PyTorch.
#include <gtest/gtest.h>

#include <attn/grouped_query_attention.hpp>
#include <attn/init.hpp>
#include <attn/multi_head_attention.hpp>
#include <attn/scaled_dot_product_attention.hpp>
#include <cmath>
#include <limits>
#include <string>

#include "support/test_util.hpp"

namespace {

using attn::Index;

template <class T>
class ScoreOptions : public ::testing::Test {};
TYPED_TEST_SUITE(ScoreOptions, attn_test::Scalars, attn_test::ScalarName);

template <class T>
attn::Matrix<T> mat(Index rows, Index cols, std::initializer_list<double> xs) {
  attn::Matrix<T> m(rows, cols);
  Index i = 0;
  for (double x : xs) m.data()[i++] = static_cast<T>(x);
  return m;
}

// All logits 0 (q = 0), so each query averages the values of the keys it may see.
// v = [1, 2, 4], L = S = 3, window 2:
//   with causal:    query 0 sees {0}        -> 1
//                   query 1 sees {0, 1}     -> (1 + 2) / 2 = 1.5
//                   query 2 sees {1, 2}     -> (2 + 4) / 2 = 3      (key 0 is 2 positions back)
//   without causal: |i - j| < 2: {0, 1} -> 1.5, {0, 1, 2} -> 7/3, {1, 2} -> 3
TYPED_TEST(ScoreOptions, SlidingWindowByHand) {
  using T = TypeParam;
  const attn::Matrix<T> q = attn::Matrix<T>::Zero(3, 1), k = attn::Matrix<T>::Zero(3, 1);
  const attn::Matrix<T> v = mat<T>(3, 1, {1, 2, 4});
  attn::Masks<T> m;
  m.window = 2;
  m.causal = attn::Causal::BottomRight;
  const attn::ScaledDotProductAttention<T> sdpa;
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward(q, k, v, m), mat<double>(3, 1, {1, 1.5, 3}), 1e-6));
  m.causal = attn::Causal::None;
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward(q, k, v, m), mat<double>(3, 1, {1.5, 7.0 / 3, 3}), 1e-6));
  // The window counts positions bottom-right (a = i + S - L): one query against 3 keys sits at
  // position 2 and sees keys {1, 2} -> 3; under Causal::TopLeft it sits at 0 and sees {0} -> 1.
  m.causal = attn::Causal::BottomRight;
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward(q.topRows(1), k, v, m), mat<double>(1, 1, {3}), 1e-6));
  m.causal = attn::Causal::TopLeft;
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward(q.topRows(1), k, v, m), mat<double>(1, 1, {1}), 1e-6));
}

// ALiBi with slope ln 2, logits 0, causal, v = [0, 3]:
//   query 0 sees key 0 only                                  -> 0
//   query 1: bias -ln2 * 1 on key 0, 0 on key 1: weights 1/2 : 1 = 1/3, 2/3  -> 2/3 * 3 = 2
TYPED_TEST(ScoreOptions, AlibiByHand) {
  using T = TypeParam;
  const attn::Matrix<T> q = attn::Matrix<T>::Zero(2, 1), k = attn::Matrix<T>::Zero(2, 1);
  const attn::Matrix<T> v = mat<T>(2, 1, {0, 3});
  attn::Masks<T> m;
  m.alibi_slopes = attn::Vector<T>::Constant(1, static_cast<T>(std::log(2.0)));
  m.causal = attn::Causal::BottomRight;
  const attn::ScaledDotProductAttention<T> sdpa;
  const auto r = sdpa.forward_with_weights(q, k, v, m);
  EXPECT_TRUE(attn_test::matrices_near(r.output, mat<double>(2, 1, {0, 2}), 1e-6));
  EXPECT_TRUE(attn_test::matrices_near(r.weights, mat<double>(2, 2, {1, 0, 1.0 / 3, 2.0 / 3}), 1e-6));
}

// The standard slopes: 8 heads -> 2^-1 .. 2^-8; 6 heads -> those of 4 (2^-2, 2^-4, 2^-6, 2^-8),
// then every other one of 8 (2^-1, 2^-3).
TEST(AlibiSlopes, StandardFormula) {
  const attn::Vector<double> s8 = attn::alibi_slopes<double>(8), s6 = attn::alibi_slopes<double>(6);
  for (Index h = 0; h < 8; ++h) EXPECT_EQ(s8[h], std::pow(2.0, -double(h + 1)));
  const double want6[] = {0.25, 0.0625, 1.0 / 64, 1.0 / 256, 0.5, 0.125};
  for (Index h = 0; h < 6; ++h) EXPECT_EQ(s6[h], want6[h]);
  EXPECT_THROW(attn::alibi_slopes<double>(0), attn::argument_error);
}

// Soft-capping comes before the masks and biases (Gemma 2). q = 1, k = [10, 0], scale 1, cap 5:
//   logits 5 tanh(10 / 5) = 4.820137900379084 and 0; v = [1, 0] -> sigmoid(4.8201...) = 0.9919988597921752
//   with attn_bias [0, 3] added after the cap: sigmoid(4.8201... - 3) = 0.8605826731672824
//   (capping after the bias would give 5 tanh(2) vs 5 tanh(0.6): sigmoid(2.1356...) = 0.894)
TYPED_TEST(ScoreOptions, SoftcapByHand) {
  using T = TypeParam;
  const attn::Matrix<T> q = mat<T>(1, 1, {1}), k = mat<T>(2, 1, {10, 0}), v = mat<T>(2, 1, {1, 0});
  attn::Masks<T> m;
  m.softcap = 5;
  const attn::ScaledDotProductAttention<T> sdpa(1);
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward(q, k, v, m), mat<double>(1, 1, {0.9919988597921752}), 1e-6));
  m.attn_bias = attn::AdditiveMask<T>(mat<T>(1, 2, {0, 3}));
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward(q, k, v, m), mat<double>(1, 1, {0.8605826731672824}), 1e-6));
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward_with_weights(q, k, v, m).output,
                                       mat<double>(1, 1, {0.8605826731672824}), 1e-6));
}

// Query head h reads K/V head h / (H / H_kv): with H = 4, H_kv = 2 heads 0, 1 read kv head 0 and
// heads 2, 3 kv head 1. q = 0, so each head averages its kv head's values over S = 2 keys:
//   kv head 0: (1 + 3) / 2 = 2;  kv head 1: (10 + 30) / 2 = 20   ->  [2, 2, 20, 20]
// (h % H_kv, the other plausible mapping, would give [2, 20, 2, 20]).
TYPED_TEST(ScoreOptions, GroupedQueryHeadsShareKvHeadsInOrder) {
  using T = TypeParam;
  const attn::Matrix<T> q = attn::Matrix<T>::Zero(1, 4), k = attn::Matrix<T>::Zero(2, 2);
  const attn::Matrix<T> v = mat<T>(2, 2, {1, 10, 3, 30});
  const attn::GroupedQueryAttention<T> gqa(4, 2);
  EXPECT_TRUE(attn_test::matrices_near(gqa.forward(q, k, v, attn_test::batch_of<attn::GqaArgs<T>>(1)), mat<double>(1, 4, {2, 2, 20, 20}), 1e-6));
}

// GQA and MQA (outputs and per-head weights) equal per-head SDPA on the kv head each query head reads, for a batch of 2 with
// every option on (a window, softcap, ALiBi, causal, key padding).
TYPED_TEST(ScoreOptions, GroupedQueryMatchesPerHeadAttention) {
  using T = TypeParam;
  const Index B = 2, L = 5, S = 9, d = 8, dv = 4, H = 6;
  attn::Generator gen(5);
  for (const Index Hkv : {Index(1), Index(2), Index(3), Index(6)}) {
    SCOPED_TRACE("H_kv = " + std::to_string(Hkv));
    attn::Matrix<T> q(B * L, H * d), k(B * S, Hkv * d), v(B * S, Hkv * dv);
    attn::init::uniform(q, -2.0, 2.0, gen);
    attn::init::uniform(k, -2.0, 2.0, gen);
    attn::init::uniform(v, -1.0, 1.0, gen);
    attn::GqaArgs<T> args;
    args.batch = B;
    args.causal = attn::Causal::BottomRight;
    args.window = 3;
    args.softcap = T(1.5);
    args.alibi_slopes = attn::alibi_slopes<T>(H);
    attn::BoolMatrix pad = attn::BoolMatrix::Zero(B, S);
    pad(1, S - 1) = true;
    args.key_padding_mask = attn::IgnoreMask(pad);
    const attn::Matrix<T> out = attn::GroupedQueryAttention<T>(H, Hkv).forward(q, k, v, args);
    const attn::AttentionResult<T> r = attn::GroupedQueryAttention<T>(H, Hkv).forward_with_weights(q, k, v, args);
    ASSERT_EQ(out.rows(), B * L);
    ASSERT_EQ(out.cols(), H * dv);
    ASSERT_EQ(r.weights.rows(), B * H * L);  // every head's probabilities, rows (b, h, l)
    ASSERT_EQ(r.weights.cols(), S);
    EXPECT_TRUE(attn_test::matrices_near(r.output, out, attn_test::tolerance<T>()));
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h) {
        const Index g = h / (H / Hkv);
        attn::Masks<T> m;
        m.causal = args.causal;
        m.window = args.window;
        m.softcap = args.softcap;
        m.alibi_slopes = args.alibi_slopes.segment(h, 1);
        m.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix(pad.row(b)));
        const attn::AttentionResult<T> want = attn::ScaledDotProductAttention<T>().forward_with_weights(
            q.block(b * L, h * d, L, d), k.block(b * S, g * d, S, d), v.block(b * S, g * dv, S, dv), m);
        EXPECT_TRUE(attn_test::matrices_near(out.block(b * L, h * dv, L, dv), want.output, attn_test::tolerance<T>()))
            << "b " << b << " h " << h;
        EXPECT_TRUE(attn_test::matrices_near(r.weights.middleRows((b * H + h) * L, L), want.weights,
                                             attn_test::tolerance<T>()))
            << "weights of b " << b << " h " << h;
      }
  }
}


// Message of the exception f throws, which must be of type E.
template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception type: ") + e.what();
  }
  return "no exception";
}

TEST(ScoreOptionsErrors, BadOptionsAreNamedErrors) {
  using T = float;
  const attn::Matrix<T> q = attn::Matrix<T>::Zero(2, 4), k = attn::Matrix<T>::Zero(3, 4), v = k;
  const attn::ScaledDotProductAttention<T> sdpa;
  attn::Masks<T> m;
  m.window = -1;
  EXPECT_NE(error_of<attn::argument_error>([&] { sdpa.forward(q, k, v, m); }).find("window must be >= 0"),
            std::string::npos);
  m.window = 0;
  for (const T cap : {T(-1), std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
    m.softcap = cap;
    EXPECT_NE(error_of<attn::argument_error>([&] { sdpa.forward(q, k, v, m); }).find("softcap must be finite"),
              std::string::npos);
  }
  m.softcap = 0;
  m.alibi_slopes = attn::Vector<T>::Ones(2);  // one head: [1]
  EXPECT_EQ(error_of<attn::shape_error>([&] { sdpa.forward(q, k, v, m); }),
            "attn::ScaledDotProductAttention::forward: alibi_slopes has shape [2], expected [H] = [1]");
  m.alibi_slopes = attn::Vector<T>::Constant(1, std::numeric_limits<T>::infinity());
  EXPECT_NE(error_of<attn::argument_error>([&] { sdpa.forward(q, k, v, m); }).find("alibi_slopes must be finite"),
            std::string::npos);

  // MultiHeadAttention takes the options through MhaArgs (a Masks): slopes are [H].
  attn::MultiHeadAttention<T> mha(8, 2);
  attn::MhaArgs<T> args;
  args.batch = 1;
  args.alibi_slopes = attn::alibi_slopes<T>(4);
  const attn::Matrix<T> x = attn::Matrix<T>::Zero(3, 8);
  EXPECT_EQ(error_of<attn::shape_error>([&] { mha.forward(x, x, x, args); }),
            "attn::MultiHeadAttention::forward: alibi_slopes has shape [4], expected [H] = [2]");
  args.alibi_slopes = attn::alibi_slopes<T>(2);
  EXPECT_EQ(mha.forward(x, x, x, args).output.rows(), 3);
}

TEST(ScoreOptionsErrors, GroupedQueryShapes) {
  using T = float;
  EXPECT_EQ(error_of<attn::shape_error>([] { attn::GroupedQueryAttention<T>(4, 3); }),
            "attn::GroupedQueryAttention: num_kv_heads = 3 must be positive and divide num_heads = 4");
  EXPECT_NE(error_of<attn::shape_error>([] { attn::GroupedQueryAttention<T>(4, 0); }), "no exception");
  EXPECT_NE(error_of<attn::argument_error>([] { attn::GroupedQueryAttention<T>(4, 2, std::nanf("")); }),
            "no exception");
  const attn::GroupedQueryAttention<T> gqa(4, 2);
  const attn::Matrix<T> q = attn::Matrix<T>::Zero(3, 4 * 8), k = attn::Matrix<T>::Zero(5, 2 * 8);
  EXPECT_EQ(error_of<attn::shape_error>([&] { gqa.forward(q, attn::Matrix<T>::Zero(5, 4 * 8), k, attn_test::batch_of<attn::GqaArgs<T>>(1)); }),
            "attn::GroupedQueryAttention::forward: key has shape [5, 32], expected [B*S, H_kv*d] = [1*S, 16] with S > 0 "
            "(d = 8 from query)");
  EXPECT_EQ(error_of<attn::shape_error>([&] { gqa.forward(q, k, attn::Matrix<T>::Zero(4, 16), attn_test::batch_of<attn::GqaArgs<T>>(1)); }),
            "attn::GroupedQueryAttention::forward: value has shape [4, 16], expected [B*S, H_kv*dv] = [5, 2*dv]");
  attn::GqaArgs<T> args;
  args.batch = 2;  // 3 query rows are not 2 sequences
  EXPECT_NE(error_of<attn::shape_error>([&] { gqa.forward(q, k, k, args); }).find("query has shape [3, 32]"),
            std::string::npos);
  attn::Matrix<T> out(3, 4 * 8 + 1);
  args.batch = 1;
  EXPECT_NE(error_of<attn::shape_error>([&] { gqa.forward_into(q, k, k, args, out); }).find("out has shape [3, 33]"),
            std::string::npos);
  args.alibi_slopes = attn::alibi_slopes<T>(2);  // H = 4 query heads
  EXPECT_NE(error_of<attn::shape_error>([&] { gqa.forward(q, k, k, args); }).find("alibi_slopes has shape [2]"),
            std::string::npos);
}

// Two sequences of one token each, q = k = 0: every key scores the same, so a query averages the
// values it may see. Sequence 0's value is 1, sequence 1's is 3. Told B = 2, each token sees only
// its own sequence: [1, 3]. Read as one sequence of two tokens (the mistake a default batch of 1
// would hide), both would see both: [2, 2]. So the batch is required, and its absence is an error.
TEST(BatchIsNeverGuessed, GqaAndMha) {
  using T = double;
  const attn::Matrix<T> q = attn::Matrix<T>::Zero(2, 2), k = attn::Matrix<T>::Zero(2, 2);
  const attn::Matrix<T> v = mat<T>(2, 2, {1, 1, 3, 3});
  const attn::GroupedQueryAttention<T> gqa(1, 1);
  EXPECT_TRUE(attn_test::matrices_near(gqa.forward(q, k, v, attn_test::batch_of<attn::GqaArgs<T>>(2)),
                                       mat<T>(2, 2, {1, 1, 3, 3}), 1e-12));
  const std::string unset =
      "batch is not set: set args.batch = B, the number of sequences stacked in the rows of the [B*L, ...] input (1 "
      "for a single sequence)";
  EXPECT_EQ(error_of<attn::argument_error>([&] { gqa.forward(q, k, v, attn::GqaArgs<T>{}); }),
            "attn::GroupedQueryAttention::forward: " + unset);
  attn::MultiHeadAttention<T> mha(2, 1);
  EXPECT_EQ(error_of<attn::argument_error>([&] { mha.forward(q, q, q, attn::MhaArgs<T>{}); }),
            "attn::MultiHeadAttention::forward: " + unset);
  attn::Matrix<T> out(2, 2);
  EXPECT_EQ(error_of<attn::argument_error>([&] { mha.forward_into(q, q, q, attn::MhaArgs<T>{}, out); }),
            "attn::MultiHeadAttention::forward_into: " + unset);
  EXPECT_NE(error_of<attn::shape_error>([&] { gqa.forward(q, k, v, attn_test::batch_of<attn::GqaArgs<T>>(-1)); })
                .find("batch must be positive, got -1"),
            std::string::npos);
}

}  // namespace
