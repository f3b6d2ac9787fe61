// tests/serving_test.cpp - serving many sequences at once (issue 16): ragged batches in one call
// (packed sequences, and a decoding step over sequences of different lengths in a KV cache),
// attention sinks (a logit per head, and sink tokens kept through the window), and the
// log-sum-exp outputs that attn::merge_attention_states combines.
//
// A ragged batch must equal the calls made one sequence at a time, to the bit: each sequence runs
// the same kernel on the same blocks, only the threads share all sequences' tasks.
#include <gtest/gtest.h>

#include <attn/detail/attention.hpp>
#include <attn/grouped_query_attention.hpp>
#include <attn/kv_cache.hpp>
#include <attn/merge.hpp>
#include <attn/scaled_dot_product_attention.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "support/random_problem.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::IndexVector;
using attn::Matrix;
using attn_test::attach_outputs;
using attn_test::matrices_near;
using attn_test::RandomProblem;

template <class T>
class ServingTest : public ::testing::Test {};
TYPED_TEST_SUITE(ServingTest, attn_test::Scalars, attn_test::ScalarName);

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(normal(rng));
  return m;
}

IndexVector offsets(const std::vector<Index>& lengths) {
  IndexVector cu(Index(lengths.size()) + 1);
  cu[0] = 0;
  for (std::size_t b = 0; b < lengths.size(); ++b) cu[Index(b) + 1] = cu[Index(b)] + lengths[b];
  return cu;
}

// ---- The kernels: a list of problems is the problems one at a time ------------------------------

// Lists of 2-6 random problems (every mask and option of the differential tests, sinks included;
// decoding-sized and flash-sized mixed) through the dispatch point at once, against each alone.
TYPED_TEST(ServingTest, ProblemListEqualsEachProblemAloneBitwise) {
  using T = TypeParam;
  for (int c = 0; c < 60; ++c) {
    const std::uint64_t seed = attn_test::base_seed() + 900000 + std::uint64_t(c) * 8;
    const Index n = 2 + Index(seed % 5);
    std::vector<RandomProblem<T>> rs;
    for (Index i = 0; i < n; ++i) rs.emplace_back(seed + std::uint64_t(i));
    const std::size_t count = static_cast<std::size_t>(n);
    std::vector<Matrix<T>> alone(count), alone_lse(count), together(count), together_lse(count);
    std::vector<attn::detail::AttentionProblem<T>> ps;
    for (Index i = 0; i < n; ++i) {
      auto& p = rs[std::size_t(i)].p;
      attach_outputs(p, alone[std::size_t(i)], nullptr, &alone_lse[std::size_t(i)]);
      attn::detail::attention(p);
      attach_outputs(p, together[std::size_t(i)], nullptr, &together_lse[std::size_t(i)]);
      ps.push_back(p);
    }
    attn::detail::attention(ps.data(), n);
    for (Index i = 0; i < n; ++i) {
      SCOPED_TRACE(rs[std::size_t(i)].description);
      ASSERT_TRUE(alone[std::size_t(i)] == together[std::size_t(i)]) << "problem " << i << " of " << n;
      ASSERT_TRUE(alone_lse[std::size_t(i)] == together_lse[std::size_t(i)]) << "lse of problem " << i;
    }
  }
}

// ---- Packed sequences: GroupedQueryAttention::forward_varlen ---------------------------------

// Random ragged batches - sequences of 0..70 queries and 1..300 keys, GQA groups, every option
// that applies per sequence - against forward_with_lse on each sequence alone: the same bits.
TYPED_TEST(ServingTest, PackedSequencesEqualEachSequenceAloneBitwise) {
  using T = TypeParam;
  for (int c = 0; c < 40; ++c) {
    const std::uint64_t seed = attn_test::base_seed() + 910000 + std::uint64_t(c);
    std::mt19937_64 rng(seed);
    const auto pick = [&](Index lo, Index hi) { return std::uniform_int_distribution<Index>(lo, hi)(rng); };
    const auto coin = [&](double p) { return std::bernoulli_distribution(p)(rng); };
    const Index group = coin(0.5) ? 1 : 4, Hkv = pick(1, 2), H = group * Hkv, d = coin(0.5) ? 16 : pick(3, 40);
    const Index dv = coin(0.7) ? d : pick(3, 40), B = pick(1, 5);
    std::vector<Index> Lq, Sk;
    for (Index b = 0; b < B; ++b) {
      Lq.push_back(coin(0.2) ? 0 : coin(0.4) ? pick(1, 4) : pick(5, 70));
      Sk.push_back(pick(1, 300));
    }
    attn::Masks<T> m;
    const int causal = int(pick(0, 2));
    m.causal = causal == 0 ? attn::Causal::None : causal == 1 ? attn::Causal::TopLeft : attn::Causal::BottomRight;
    if (coin(0.3)) m.window = pick(1, 80);
    if (coin(0.3)) m.softcap = T(3);
    if (coin(0.3)) m.alibi_slopes = attn::alibi_slopes<T>(H);
    if (coin(0.4)) m.sinks = random_matrix<T>(H, 1, rng);
    if (m.window > 0 && coin(0.5)) m.sink_tokens = pick(1, 5);
    const IndexVector cu_q = offsets(Lq), cu_k = offsets(Sk);
    const Matrix<T> q = random_matrix<T>(cu_q[B], H * d, rng), k = random_matrix<T>(cu_k[B], Hkv * d, rng),
                    v = random_matrix<T>(cu_k[B], Hkv * dv, rng);
    const attn::GroupedQueryAttention<T> gqa(H, Hkv);
    const attn::AttentionLse<T> packed = gqa.forward_varlen_with_lse(q, k, v, cu_q, cu_k, m);
    ASSERT_EQ(packed.output.rows(), cu_q[B]);
    ASSERT_EQ(packed.lse.rows(), H);
    EXPECT_TRUE(packed.output == gqa.forward_varlen(q, k, v, cu_q, cu_k, m));
    for (Index b = 0; b < B; ++b) {
      if (Lq[std::size_t(b)] == 0) continue;
      SCOPED_TRACE("seed " + std::to_string(seed) + ", sequence " + std::to_string(b));
      attn::GqaArgs<T> args;
      static_cast<attn::Masks<T>&>(args) = m;
      args.batch = 1;
      const attn::AttentionLse<T> alone =
          gqa.forward_with_lse(q.middleRows(cu_q[b], Lq[std::size_t(b)]), k.middleRows(cu_k[b], Sk[std::size_t(b)]),
                               v.middleRows(cu_k[b], Sk[std::size_t(b)]), args);
      ASSERT_TRUE(alone.output == packed.output.middleRows(cu_q[b], Lq[std::size_t(b)]));
      ASSERT_TRUE(alone.lse == packed.lse.middleCols(cu_q[b], Lq[std::size_t(b)]));
    }
  }
}

// Causal masking is per sequence, bottom-right in each (FlashAttention's varlen convention):
// sequence 1 has 1 query and 3 keys, so its query sees all 3, though it is the 3rd packed query.
// With q = 0 every logit is 0: the output is the mean of the values the query sees.
TEST(GqaVarlen, CausalMaskingIsBottomRightPerSequenceByHand) {
  const attn::GroupedQueryAttention<double> gqa(1, 1);
  const Matrix<double> q = Matrix<double>::Zero(3, 1);
  const Matrix<double> k = Matrix<double>::Zero(5, 1);
  const Matrix<double> v = attn_test::mat<double>({{1}, {2}, {10}, {20}, {30}});
  attn::Masks<double> m;
  m.causal = attn::Causal::BottomRight;
  // sequence 0: queries 0, 1 over keys (1, 2): query 0 sees key 0 (1), query 1 both (1.5);
  // sequence 1: query 2 over keys (10, 20, 30): all three, (10 + 20 + 30) / 3 = 20.
  const Matrix<double> out = gqa.forward_varlen(q, k, v, offsets({2, 1}), offsets({2, 3}), m);
  EXPECT_TRUE(matrices_near(out, attn_test::mat<double>({{1}, {1.5}, {20}}), 1e-15));
}

TEST(GqaVarlen, RejectsBadOffsetsAndMasksWithoutWriting) {
  const attn::GroupedQueryAttention<float> gqa(2, 1);
  std::mt19937_64 rng(5);
  const Matrix<float> q = random_matrix<float>(6, 8, rng), k = random_matrix<float>(7, 4, rng),
                      v = random_matrix<float>(7, 4, rng);
  const IndexVector cu_q = offsets({2, 4}), cu_k = offsets({3, 4});
  Matrix<float> out = Matrix<float>::Constant(6, 8, 7.0f);
  const attn::Masks<float> none;
  const auto rejects = [&](const IndexVector& cq, const IndexVector& ck, const attn::Masks<float>& m, auto error) {
    EXPECT_THROW(gqa.forward_varlen_into(q, k, v, cq, ck, m, out), decltype(error));
    EXPECT_TRUE((out.array() == 7.0f).all()) << "a rejected call wrote its output";
  };
  IndexVector bad = cu_q;
  bad[1] = 7;  // decreases after 7
  rejects(bad, cu_k, none, attn::argument_error{""});
  bad = cu_q;
  bad[0] = 1;
  rejects(bad, cu_k, none, attn::argument_error{""});
  rejects(offsets({2, 3}), cu_k, none, attn::shape_error{""});    // ends at 5, q has 6 rows
  rejects(cu_q, offsets({7}), none, attn::shape_error{""});       // one sequence of keys, two of queries
  rejects(cu_q, offsets({0, 7}), none, attn::argument_error{""});  // sequence 0: 2 queries, no keys
  attn::Masks<float> padded;
  padded.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(1, 7));
  rejects(cu_q, cu_k, padded, attn::argument_error{""});
  attn::Masks<float> sinks;
  sinks.sinks = attn::Vector<float>::Zero(3);  // 2 heads
  rejects(cu_q, cu_k, sinks, attn::shape_error{""});
  sinks.sinks = attn::Vector<float>::Constant(2, std::numeric_limits<float>::infinity());
  rejects(cu_q, cu_k, sinks, attn::argument_error{""});
  attn::Masks<float> negative;
  negative.sink_tokens = -1;
  rejects(cu_q, cu_k, negative, attn::argument_error{""});
  Matrix<float> lse(2, 5);  // [H, total_q] = [2, 6]
  EXPECT_THROW(gqa.forward_varlen_into(q, k, v, cu_q, cu_k, none, out, lse), attn::shape_error);
  // Sequences without queries are left out; all of them: nothing to do.
  const Matrix<float> empty(0, 8);
  EXPECT_EQ(gqa.forward_varlen(empty, k, v, offsets({0, 0}), cu_k).rows(), 0);
}

// ---- A KV cache holding sequences of different lengths -----------------------------------------

// Fills sequence b of the cache with n positions, in appends the cache accepts.
template <class T>
void fill(attn::KVCache<T>& cache, Index b, Index n, std::mt19937_64& rng) {
  while (n > 0) {
    const Index rows = std::min(n, cache.max_append(b));
    cache.append(b, random_matrix<T>(rows, cache.kv_heads() * cache.head_dim(), rng),
                 random_matrix<T>(rows, cache.kv_heads() * cache.value_dim(), rng));
    n -= rows;
  }
}

// One decoding step of 6 sequences at lengths 1..900 (past the decode kernel's 512-key chunks),
// in every storage type, full and sliding-window caches, with GQA and the score options: one call
// for all (forward(q, cache)) and a ragged call mixing prefill chunks with decoding
// (forward_varlen) equal the calls made sequence by sequence, bitwise, lse included.
TYPED_TEST(ServingTest, CacheOfDifferentLengthsEqualsEachSequenceAloneBitwise) {
  using T = TypeParam;
  const attn::KVStorage storages[] = {attn::KVStorage::Native, attn::KVStorage::BFloat16, attn::KVStorage::Float16,
                                      attn::KVStorage::Int8};
  int c = 0;
  for (const attn::KVStorage storage : storages) {
    for (const Index window : {Index(0), Index(100)}) {
      std::mt19937_64 rng(attn_test::base_seed() + 920000 + std::uint64_t(c++));
      const Index B = 6, H = 4, Hkv = 2, d = 24;
      attn::KVCache<T> cache(storage, B, Hkv, d, window > 0 ? 160 : 1000, window);
      const std::vector<Index> lengths = {1, 37, 512, 513, 900, 260};
      for (Index b = 0; b < B; ++b) fill(cache, b, lengths[std::size_t(b)], rng);
      const attn::GroupedQueryAttention<T> gqa(H, Hkv);
      attn::CacheArgs<T> args;
      if (c % 2 == 0) args.softcap = T(4);
      if (c % 3 == 0) args.sinks = random_matrix<T>(H, 1, rng);
      if (c % 4 == 1) args.alibi_slopes = attn::alibi_slopes<T>(H);
      SCOPED_TRACE("storage " + std::to_string(int(storage)) + ", window " + std::to_string(window));

      // Every sequence's newest position at once.
      const Matrix<T> q = random_matrix<T>(B, H * d, rng);
      Matrix<T> out(B, H * d), lse(H, B);
      gqa.forward_into(q, cache, -1, args, out, lse);
      for (Index b = 0; b < B; ++b) {
        Matrix<T> one(1, H * d), one_lse(H, 1);
        gqa.forward_into(q.row(b), cache, b, args, one, one_lse);
        ASSERT_TRUE(one == out.row(b)) << "sequence " << b;
        ASSERT_TRUE(one_lse == lse.col(b)) << "lse of sequence " << b;
      }
      EXPECT_TRUE(out == gqa.forward(q, cache, args));

      // A continuous-batching step: sequences 0 and 3 left out, 1 and 4 decoding, 2 and 5 taking
      // the last 3 and 7 of their positions as a prompt chunk.
      const std::vector<Index> Lq = {0, 1, 3, 0, 1, 7};
      const IndexVector cu = offsets(Lq);
      const Matrix<T> qr = random_matrix<T>(cu[B], H * d, rng);
      Matrix<T> ragged(cu[B], H * d), ragged_lse(H, cu[B]);
      gqa.forward_varlen_into(qr, cache, cu, args, ragged, ragged_lse);
      for (Index b = 0; b < B; ++b) {
        const Index L = Lq[std::size_t(b)];
        if (L == 0) continue;
        Matrix<T> one(L, H * d), one_lse(H, L);
        gqa.forward_into(qr.middleRows(cu[b], L), cache, b, args, one, one_lse);
        ASSERT_TRUE(one == ragged.middleRows(cu[b], L)) << "sequence " << b;
        ASSERT_TRUE(one_lse == ragged_lse.middleCols(cu[b], L)) << "lse of sequence " << b;
      }
    }
  }
}

TEST(CacheVarlen, RejectsWhatTheCacheCannotServe) {
  const attn::GroupedQueryAttention<float> gqa(2, 1);
  attn::KVCache<float> cache(3, 1, 4, 16);
  std::mt19937_64 rng(9);
  fill(cache, 0, 5, rng);
  fill(cache, 1, 2, rng);
  const Matrix<float> q = random_matrix<float>(4, 8, rng);
  EXPECT_THROW(gqa.forward_varlen(q, cache, offsets({1, 3})), attn::shape_error);        // B = 2, cache's 3
  EXPECT_THROW(gqa.forward_varlen(q, cache, offsets({1, 3, 0})), attn::argument_error);  // 3 queries, 2 cached
  EXPECT_THROW(gqa.forward_varlen(q, cache, offsets({1, 1, 2})), attn::argument_error);  // sequence 2 is empty
  attn::CacheArgs<float> masked;
  masked.attn_mask = attn::AttendMask(attn::BoolMatrix::Constant(1, 5, true));
  EXPECT_THROW(gqa.forward_varlen(q, cache, offsets({2, 2, 0}), masked), attn::argument_error);
  // Sequences of different lengths in forward(q, cache): weights only one length at a time.
  const Matrix<float> q3 = random_matrix<float>(3, 8, rng);
  fill(cache, 2, 1, rng);
  EXPECT_THROW(gqa.forward_with_weights(q3, cache, -1), attn::argument_error);
  EXPECT_EQ(gqa.forward(q3, cache).rows(), 3);
}

// ---- Attention sinks ----------------------------------------------------------------------

// One head, d = 2, scale 1/sqrt(2): keys k0 = (1, 0), k1 = (0, 1), values v0 = (1, 2), v1 = (3, 4);
// q = (sqrt(2) ln 3, 0) gives logits (ln 3, 0). With a sink logit ln 2 the denominator is
// 3 + 1 + 2 = 6: weights (1/2, 1/6), out = (1, 2)/2 + (3, 4)/6 = (1, 5/3), lse = ln 6.
// Without it: weights (3/4, 1/4), out (1.5, 2.5), lse = ln 4.
TEST(Sinks, SinkLogitJoinsTheDenominatorByHand) {
  const attn::ScaledDotProductAttention<double> sdpa;
  const Matrix<double> q = attn_test::mat<double>({{std::sqrt(2.0) * std::log(3.0), 0}});
  const Matrix<double> k = attn_test::mat<double>({{1, 0}, {0, 1}}), v = attn_test::mat<double>({{1, 2}, {3, 4}});
  attn::Masks<double> m;
  const attn::AttentionLse<double> plain = sdpa.forward_with_lse(q, k, v, m);
  EXPECT_TRUE(matrices_near(plain.output, attn_test::mat<double>({{1.5, 2.5}}), 1e-15));
  EXPECT_NEAR(plain.lse(0, 0), std::log(4.0), 1e-15);
  m.sinks = attn_test::vec<double>({std::log(2.0)});
  const attn::AttentionLse<double> sunk = sdpa.forward_with_lse(q, k, v, m);
  EXPECT_TRUE(matrices_near(sunk.output, attn_test::mat<double>({{1, 5.0 / 3}}), 1e-15));
  EXPECT_NEAR(sunk.lse(0, 0), std::log(6.0), 1e-15);
  const attn::AttentionResult<double> w = sdpa.forward_with_weights(q, k, v, m);  // the blocked kernel
  EXPECT_TRUE(matrices_near(w.weights, attn_test::mat<double>({{0.5, 1.0 / 6}}), 1e-15));
  EXPECT_TRUE(matrices_near(w.output, sunk.output, 1e-15));
  // Every key masked: zeros, and the lse is the sink's logit alone (-inf without a sink).
  m.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Constant(1, 2, true));
  const attn::AttentionLse<double> masked = sdpa.forward_with_lse(q, k, v, m);
  EXPECT_TRUE((masked.output.array() == 0).all());
  EXPECT_NEAR(masked.lse(0, 0), std::log(2.0), 1e-15);
  m.sinks.resize(0);
  EXPECT_EQ(sdpa.forward_with_lse(q, k, v, m).lse(0, 0), -std::numeric_limits<double>::infinity());
}

// StreamingLLM: 5 keys, one query at position 4 (bottom-right), window 2: it sees keys 3 and 4;
// with sink_tokens = 1 key 0 too. q = 0 makes every logit 0, so the output is the mean of the
// values seen: (v3 + v4) / 2 = 35, then (v0 + v3 + v4) / 3 = (1 + 30 + 40) / 3. Causal masking
// still applies to sink tokens: with 3 queries, the one at position 2 sees keys 0 (sink), 1, 2.
TEST(Sinks, SinkTokensStayVisibleThroughTheWindowByHand) {
  const attn::ScaledDotProductAttention<double> sdpa;
  const Matrix<double> k = Matrix<double>::Zero(5, 1), v = attn_test::mat<double>({{1}, {10}, {20}, {30}, {40}});
  attn::Masks<double> m;
  m.causal = attn::Causal::BottomRight;
  m.window = 2;
  EXPECT_NEAR(sdpa.forward(Matrix<double>::Zero(1, 1), k, v, m)(0, 0), 35.0, 1e-14);
  m.sink_tokens = 1;
  EXPECT_NEAR(sdpa.forward(Matrix<double>::Zero(1, 1), k, v, m)(0, 0), 71.0 / 3, 1e-14);
  // Rows at positions 2, 3, 4: keys {0, 1, 2}, {0, 2, 3}, {0, 3, 4}.
  const Matrix<double> rows = sdpa.forward(Matrix<double>::Zero(3, 1), k, v, m);
  EXPECT_TRUE(matrices_near(rows, attn_test::mat<double>({{31.0 / 3}, {51.0 / 3}, {71.0 / 3}}), 1e-14));
  m.window = 0;  // no window: sink tokens change nothing
  EXPECT_NEAR(sdpa.forward(Matrix<double>::Zero(1, 1), k, v, m)(0, 0), 101.0 / 5, 1e-14);
}

// ---- Log-sum-exp and the merge ------------------------------------------------------------

// Attention over keys [0, j) and over [j, S), merged by their log-sum-exp, is attention over all
// S keys, for any split j; GQA, softcap and key padding apply to each part as to the whole.
TYPED_TEST(ServingTest, MergeOfAnySplitEqualsTheUnsplitCall) {
  using T = TypeParam;
  for (int c = 0; c < 30; ++c) {
    std::mt19937_64 rng(attn_test::base_seed() + 930000 + std::uint64_t(c));
    const auto pick = [&](Index lo, Index hi) { return std::uniform_int_distribution<Index>(lo, hi)(rng); };
    const Index H = 4, Hkv = c % 2 ? 2 : 4, d = 16, B = pick(1, 2), L = pick(1, 40), S = pick(2, 700);
    const Index j = pick(1, S - 1);
    const Matrix<T> q = random_matrix<T>(B * L, H * d, rng), k = random_matrix<T>(B * S, Hkv * d, rng),
                    v = random_matrix<T>(B * S, Hkv * d, rng);
    attn::GqaArgs<T> args;
    args.batch = B;
    if (c % 3 == 0) args.softcap = T(2);
    const attn::GroupedQueryAttention<T> gqa(H, Hkv);
    const attn::AttentionLse<T> whole = gqa.forward_with_lse(q, k, v, args);
    // The parts: rows [b*S, b*S + j) and [b*S + j, (b+1)*S) of each sequence.
    Matrix<T> ka(B * j, Hkv * d), va(B * j, Hkv * d), kb(B * (S - j), Hkv * d), vb(B * (S - j), Hkv * d);
    for (Index b = 0; b < B; ++b) {
      ka.middleRows(b * j, j) = k.middleRows(b * S, j), va.middleRows(b * j, j) = v.middleRows(b * S, j);
      kb.middleRows(b * (S - j), S - j) = k.middleRows(b * S + j, S - j);
      vb.middleRows(b * (S - j), S - j) = v.middleRows(b * S + j, S - j);
    }
    const attn::AttentionLse<T> a = gqa.forward_with_lse(q, ka, va, args), b = gqa.forward_with_lse(q, kb, vb, args);
    Matrix<T> out(B * L, H * d), lse(H, B * L);
    attn::merge_attention_states<T>(a.output, a.lse, b.output, b.lse, out, lse);
    const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-13;
    ASSERT_TRUE(matrices_near(out, whole.output, tol)) << "S = " << S << ", split at " << j;
    ASSERT_TRUE(matrices_near(lse, whole.lse, tol)) << "S = " << S << ", split at " << j;
  }
}

// GroupedQueryAttention's lse of a [B, L] batch is laid out [H, B*L], each entry log sum_j exp(s_j)
// of the row's scaled, masked logits, by hand. (Every kernel's lse against the reference: the
// randomized tests of attention_kernel_test.cpp and attention_decode_test.cpp.)
TEST(Lse, GqaLayoutIsHeadsByRowsByHand) {
  // 2 heads, 1 kv head (d = 1), B = 2, L = 1, S = 2, scale 1: head h's query is h + 1 in
  // sequence 0 and 0 in sequence 1; keys (0, ln 3)... logits q * k: sequence 0 head 0: (0, ln 3)
  // -> lse ln 4; head 1: (0, 2 ln 3) -> ln 10; sequence 1: keys (0, 0) -> ln 2 for both heads.
  const attn::GroupedQueryAttention<double> gqa(2, 1, 1.0);
  const Matrix<double> q = attn_test::mat<double>({{1, 2}, {0, 0}});
  const Matrix<double> k = attn_test::mat<double>({{0}, {std::log(3.0)}, {0}, {0}});
  const Matrix<double> v = attn_test::mat<double>({{1}, {2}, {3}, {4}});
  attn::GqaArgs<double> args;
  args.batch = 2;
  const attn::AttentionLse<double> r = gqa.forward_with_lse(q, k, v, args);
  EXPECT_TRUE(matrices_near(r.lse, attn_test::mat<double>({{std::log(4.0), std::log(2.0)}, {std::log(10.0), std::log(2.0)}}),
                            1e-15));
}

}  // namespace
