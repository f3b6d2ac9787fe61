// tests/kv_cache_test.cpp - attn::KVCache, and GroupedQueryAttention against it: decoding token by
// token (or in chunks, after a prefill) reproduces the full causal forward row by row.
#include <gtest/gtest.h>

#include <attn/grouped_query_attention.hpp>
#include <attn/kv_cache.hpp>
#include <attn/threads.hpp>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::KVCache;
using attn::Matrix;
using attn_test::matrices_near;

// Row r, column c of a [rows, cols] matrix holds 100 * r + c + offset: every element says where
// it came from.
Matrix<float> numbered(Index rows, Index cols, float offset) {
  Matrix<float> m(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) m(r, c) = 100.0f * float(r) + float(c) + offset;
  return m;
}

Matrix<float> random(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Matrix<float>::Random(rows, cols);
}

TEST(KVCache, AppendStoresEachHeadsRowsInPositionOrder) {
  // 2 sequences, 2 kv heads of 3 key features and 2 value features; capacity 5.
  KVCache<float> cache(2, 2, 3, 5, /*window=*/0, /*value_dim=*/2);
  EXPECT_EQ(cache.size(0), 0);
  const Matrix<float> k = numbered(3, 6, 0), v = numbered(3, 4, 0.5f);
  cache.append(1, k.topRows(2), v.topRows(2));  // prefill: positions 0, 1
  cache.append(1, k.bottomRows(1), v.bottomRows(1));  // a step: position 2
  EXPECT_EQ(cache.size(0), 0);
  EXPECT_EQ(cache.size(1), 3);
  EXPECT_EQ(cache.kept(1), 3);
  EXPECT_EQ(cache.max_append(1), 2);
  // Head 1's keys are columns [3, 6) of k: row r = (100 r + 3, 100 r + 4, 100 r + 5).
  EXPECT_EQ(Matrix<float>(cache.keys(1, 1)), k.rightCols(3));
  EXPECT_EQ(Matrix<float>(cache.keys(1, 0)), k.leftCols(3));
  // Head 0's values are columns [0, 2) of v.
  EXPECT_EQ(Matrix<float>(cache.values(1, 0)), v.leftCols(2));
  EXPECT_EQ(cache.keys(0, 0).rows(), 0);
}

TEST(KVCache, AppendsEverySequenceAtOnce) {
  KVCache<float> cache(2, 1, 2, 4);
  const Matrix<float> k = numbered(4, 2, 0), v = numbered(4, 2, 1000);  // rows 0-1: b = 0, rows 2-3: b = 1
  cache.append(k, v);
  EXPECT_EQ(cache.size(0), 2);
  EXPECT_EQ(cache.size(1), 2);
  EXPECT_EQ(Matrix<float>(cache.keys(0, 0)), k.topRows(2));
  EXPECT_EQ(Matrix<float>(cache.keys(1, 0)), k.bottomRows(2));
  EXPECT_EQ(Matrix<float>(cache.values(1, 0)), v.bottomRows(2));
}

TEST(KVCache, RingKeepsTheLastCapacityPositionsContiguousAndInOrder) {
  // capacity 4, window 3: max_append = 4 - 3 + 1 = 2.
  KVCache<float> ring(1, 1, 2, 4, /*window=*/3);
  EXPECT_EQ(ring.max_append(0), 2);
  const Matrix<float> k = numbered(10, 2, 0);  // position t: (100 t, 100 t + 1)
  for (Index t = 0; t < 10; t += 2) ring.append(0, k.middleRows(t, 2), k.middleRows(t, 2));
  EXPECT_EQ(ring.size(0), 10);
  EXPECT_EQ(ring.kept(0), 4);
  EXPECT_EQ(ring.first_kept(0), 6);
  // Positions 6..9, in order, although they sit at ring slots 2, 3, 0, 1.
  EXPECT_EQ(Matrix<float>(ring.keys(0, 0)), k.bottomRows(4));
  EXPECT_EQ(Matrix<float>(ring.values(0, 0)), k.bottomRows(4));
  ring.append(0, k.topRows(1), k.topRows(1));  // position 10 holds row 0's values: (0, 1)
  Matrix<float> want(4, 2);
  want << 700, 701, 800, 801, 900, 901, 0, 1;
  EXPECT_EQ(Matrix<float>(ring.keys(0, 0)), want);
}

TEST(KVCache, ClearForgetsPositions) {
  KVCache<float> cache(2, 1, 2, 3);
  cache.append(numbered(2, 2, 0), numbered(2, 2, 0));
  cache.clear(0);
  EXPECT_EQ(cache.size(0), 0);
  EXPECT_EQ(cache.size(1), 1);
  cache.clear();
  EXPECT_EQ(cache.size(1), 0);
  EXPECT_EQ(cache.max_append(1), 3);
}

TEST(KVCache, RejectsBadArgumentsAndStaysUnchanged) {
  EXPECT_THROW(KVCache<float>(0, 1, 2, 3), attn::shape_error);
  EXPECT_THROW(KVCache<float>(1, 1, 2, 0), attn::argument_error);
  EXPECT_THROW(KVCache<float>(1, 1, 2, 3, /*window=*/4), attn::argument_error);
  EXPECT_THROW(KVCache<float>(1, 1, 2, 3, /*window=*/-1), attn::argument_error);
  EXPECT_THROW(KVCache<float>(Index(1) << 40, 1 << 20, 1 << 20, 2), attn::shape_error);  // overflows Index

  KVCache<float> cache(2, 2, 3, 4);
  const Matrix<float> k = numbered(3, 6, 0);
  cache.append(0, k, k);
  try {
    cache.append(0, k.topRows(2), k.topRows(2));
    FAIL() << "no throw";
  } catch (const attn::argument_error& e) {
    EXPECT_STREQ(e.what(),
                 "attn::KVCache::append: sequence 0 holds 3 of 4 positions; appending 2 more would exceed the capacity");
  }
  EXPECT_THROW(cache.append(0, numbered(1, 5, 0), numbered(1, 6, 0)), attn::shape_error);
  EXPECT_THROW(cache.append(0, numbered(1, 6, 0), numbered(2, 6, 0)), attn::shape_error);
  EXPECT_THROW(cache.append(2, numbered(1, 6, 0), numbered(1, 6, 0)), attn::argument_error);
  EXPECT_THROW(cache.size(-1), attn::argument_error);
  EXPECT_THROW(cache.keys(0, 2), attn::argument_error);
  // All-at-once: sequence 0 has room for 1, sequence 1 for 4: two rows each fail, and neither
  // sequence is written.
  EXPECT_THROW(cache.append(numbered(4, 6, 0), numbered(4, 6, 0)), attn::argument_error);
  EXPECT_THROW(cache.append(numbered(3, 6, 0), numbered(3, 6, 0)), attn::shape_error);  // 3 rows, B = 2
  EXPECT_EQ(cache.size(0), 3);
  EXPECT_EQ(cache.size(1), 0);
  EXPECT_EQ(Matrix<float>(cache.keys(0, 1)), k.rightCols(3));

  KVCache<float> ring(1, 1, 2, 5, 3);
  try {
    ring.append(0, numbered(4, 2, 0), numbered(4, 2, 0));
    FAIL() << "no throw";
  } catch (const attn::argument_error& e) {
    EXPECT_STREQ(e.what(),
                 "attn::KVCache::append: appending 4 rows to sequence 0 of a sliding-window cache (capacity 5, "
                 "window 3): at most capacity - window + 1 = 3 rows per append; split the prompt or raise the "
                 "capacity");
  }
  EXPECT_EQ(ring.size(0), 0);
}

// One configuration of the incremental-decoding check.
struct DecodeCase {
  Index heads, kv_heads, d, dv, S;
  Index window;          // 0: none
  bool ring;             // a sliding-window cache (window > 0) instead of a full one
  float softcap;         // 0: none
  bool alibi;
  std::vector<Index> chunks;  // rows per append: prefill first, then the steps; repeated to S
  int threads;
};

std::string describe(const DecodeCase& c) {
  std::ostringstream s;
  s << "H=" << c.heads << " Hkv=" << c.kv_heads << " d=" << c.d << " dv=" << c.dv << " S=" << c.S
    << " window=" << c.window << (c.ring ? " ring" : " full") << " softcap=" << c.softcap << " alibi=" << c.alibi
    << " threads=" << c.threads << " chunks=";
  for (Index n : c.chunks) s << n << ',';
  return s.str();
}

// The full causal forward over all S positions at once, against the same rows decoded chunk by
// chunk through a cache: row by row equal to 1e-5.
void check_incremental(const DecodeCase& c, unsigned seed) {
  SCOPED_TRACE(describe(c));
  attn::set_num_threads(c.threads);
  const Matrix<float> q = random(c.S, c.heads * c.d, seed), k = random(c.S, c.kv_heads * c.d, seed + 1),
                      v = random(c.S, c.kv_heads * c.dv, seed + 2);
  attn::GroupedQueryAttention<float> gqa(c.heads, c.kv_heads);
  attn::GqaArgs<float> full_args;
  full_args.batch = 1;
  full_args.causal = attn::Causal::BottomRight;
  full_args.window = c.window;
  full_args.softcap = c.softcap;
  if (c.alibi) full_args.alibi_slopes = attn::alibi_slopes<float>(c.heads);
  const Matrix<float> full = gqa.forward(q, k, v, full_args);

  Index max_chunk = 0;
  for (Index n : c.chunks) max_chunk = std::max(max_chunk, n);
  KVCache<float> cache(1, c.kv_heads, c.d, c.ring ? c.window + max_chunk - 1 : c.S, c.ring ? c.window : 0, c.dv);
  attn::CacheArgs<float> args;
  if (!c.ring) args.window = c.window;  // a ring applies its own
  args.softcap = c.softcap;
  args.alibi_slopes = full_args.alibi_slopes;
  Index t = 0;
  for (std::size_t i = 0; t < c.S; i = (i + 1 < c.chunks.size() ? i + 1 : std::min<std::size_t>(1, i))) {  // chunks[0] once
    const Index n = std::min(c.chunks[i], c.S - t);
    cache.append(0, k.middleRows(t, n), v.middleRows(t, n));
    const Matrix<float> out = gqa.forward(q.middleRows(t, n), cache, 0, args);
    ASSERT_TRUE(matrices_near(out, full.middleRows(t, n), 1e-5)) << "rows [" << t << ", " << t + n << ")";
    t += n;
  }
  attn::set_num_threads(0);
}

TEST(KVCacheAttention, DecodingTokenByTokenEqualsTheFullCausalForward) {
  // heads, kv_heads, d, dv, S, window, ring, softcap, alibi, chunks, threads
  const std::vector<DecodeCase> cases = {
      {4, 4, 16, 16, 40, 0, false, 0, false, {1}, 1},                 // MHA, one token at a time from the start
      {8, 2, 32, 32, 70, 0, false, 0, false, {23, 1}, 2},             // GQA 4:1, prefill 23 then steps
      {6, 1, 12, 20, 33, 0, false, 0, false, {5, 1, 3, 2}, 1},        // MQA, d != dv, mixed chunks
      {4, 2, 16, 16, 60, 7, false, 0, false, {9, 1}, 2},              // window over a full cache
      {4, 2, 16, 16, 61, 7, true, 0, false, {4, 1, 2}, 1},            // window over a ring
      {4, 2, 16, 16, 300, 16, true, 0, false, {1}, 2},                // ring wrapping many times, 1 row each
      {4, 4, 8, 8, 50, 0, false, 5.0f, true, {12, 1, 4}, 1},          // softcap + ALiBi
      {8, 4, 24, 16, 45, 6, true, 3.0f, true, {6, 2, 1}, 2},          // everything together
      {32, 8, 64, 64, 600, 0, false, 0, false, {513, 1, 4, 5}, 2},    // the decode kernel's many chunks
  };
  unsigned seed = 1;
  for (const DecodeCase& c : cases) check_incremental(c, seed += 3);
}

TEST(KVCacheAttention, EverySequenceAtOnceEqualsEachAlone) {
  // Two sequences decoded together - one [B*L] call per step: a prefill of 5, then one step - give
  // what each gives alone in a cache of its own.
  const Index B = 2, H = 4, Hkv = 2, d = 8, S = 6, P = 5;
  attn::GroupedQueryAttention<float> gqa(H, Hkv);
  // Row (b, t) of the [B, S, ...] tensors at b*S + t.
  const Matrix<float> q = random(B * S, H * d, 7), k = random(B * S, Hkv * d, 8), v = random(B * S, Hkv * d, 9);
  const auto rows = [&](const Matrix<float>& m, Index first, Index n) {  // rows [first, first + n) of each sequence
    Matrix<float> r(B * n, m.cols());
    for (Index b = 0; b < B; ++b) r.middleRows(b * n, n) = m.middleRows(b * S + first, n);
    return r;
  };
  KVCache<float> both(B, Hkv, d, S);
  both.append(rows(k, 0, P), rows(v, 0, P));
  const Matrix<float> prefill = gqa.forward(rows(q, 0, P), both);
  both.append(rows(k, P, 1), rows(v, P, 1));
  const Matrix<float> step = gqa.forward(rows(q, P, 1), both);
  for (Index b = 0; b < B; ++b) {
    KVCache<float> one(1, Hkv, d, S);
    one.append(0, k.middleRows(b * S, P), v.middleRows(b * S, P));
    EXPECT_TRUE(matrices_near(prefill.middleRows(b * P, P), gqa.forward(q.middleRows(b * S, P), one, 0), 1e-6));
    one.append(0, k.middleRows(b * S + P, 1), v.middleRows(b * S + P, 1));
    EXPECT_TRUE(matrices_near(step.row(b), gqa.forward(q.middleRows(b * S + P, 1), one, 0), 1e-6));
  }
  // The probabilities of every head, for every sequence at once (b < 0: rows (b, h, l)) and for
  // one sequence (rows (h, l)), over the S kept keys; the output as without them.
  const attn::AttentionResult<float> all = gqa.forward_with_weights(rows(q, P, 1), both, -1);
  ASSERT_EQ(all.weights.rows(), B * H);
  ASSERT_EQ(all.weights.cols(), S);
  EXPECT_TRUE(matrices_near(all.output, step, 1e-6));
  for (Index b = 0; b < B; ++b) {
    const attn::AttentionResult<float> one = gqa.forward_with_weights(q.middleRows(b * S + P, 1), both, b);
    EXPECT_TRUE(matrices_near(one.weights, all.weights.middleRows(b * H, H), 1e-6)) << "sequence " << b;
    for (Index h = 0; h < H; ++h) EXPECT_NEAR(one.weights.row(h).sum(), 1.0f, 1e-5f);
  }
}

TEST(KVCacheAttention, OneQueryAgainstTwoKeysByHand) {
  // One head, d = 2, scale 1/sqrt(2). Keys k0 = (1, 0), k1 = (0, 1); values v0 = (1, 2), v1 = (3, 4);
  // query q = (sqrt(2) ln 3, 0) at position 1: logits (ln 3, 0), softmax (3/4, 1/4),
  // out = 3/4 (1, 2) + 1/4 (3, 4) = (1.5, 2.5).
  KVCache<double> cache(1, 1, 2, 8);
  cache.append(0, attn_test::mat<double>({{1, 0}, {0, 1}}), attn_test::mat<double>({{1, 2}, {3, 4}}));
  attn::GroupedQueryAttention<double> gqa(1, 1);
  const Matrix<double> out = gqa.forward(attn_test::mat<double>({{std::sqrt(2.0) * std::log(3.0), 0}}), cache, 0);
  EXPECT_TRUE(matrices_near(out, attn_test::mat<double>({{1.5, 2.5}}), 1e-12));
  // Causal bottom-right: the first of two queries (position 0) sees only k0: out = v0.
  const Matrix<double> two = gqa.forward(attn_test::mat<double>({{0, 5}, {0, 0}}), cache, 0);
  EXPECT_TRUE(matrices_near(two, attn_test::mat<double>({{1, 2}, {2, 3}}), 1e-12));
}

TEST(KVCacheAttention, RejectsCallsTheCacheCannotServe) {
  attn::GroupedQueryAttention<float> gqa(4, 2);
  KVCache<float> cache(2, 2, 8, 10);
  cache.append(0, random(3, 16, 1), random(3, 16, 2));
  const Matrix<float> q = random(2, 32, 3);
  EXPECT_THROW(gqa.forward(random(4, 32, 3), cache, 0), attn::argument_error);  // 4 queries, 3 cached
  EXPECT_THROW(gqa.forward(random(2, 24, 3), cache, 0), attn::shape_error);     // d = 6, cache's 8
  EXPECT_THROW(gqa.forward(q, cache), attn::argument_error);  // sequence 1 holds 0 positions, not its 1 query
  attn::CacheArgs<float> top_left;
  top_left.causal = attn::Causal::TopLeft;
  EXPECT_THROW(gqa.forward(q, cache, 0, top_left), attn::argument_error);
  attn::GroupedQueryAttention<float> other(4, 4);
  EXPECT_THROW(other.forward(q, cache, 0), attn::shape_error);  // 4 kv heads, cache's 2
  KVCache<float> ring(1, 2, 8, 6, 4);
  attn::CacheArgs<float> wide;
  wide.window = 5;
  ring.append(0, random(3, 16, 1), random(3, 16, 2));
  EXPECT_THROW(gqa.forward(random(3, 32, 3), ring, 0, wide), attn::argument_error);
  // Three appends of 3 without attending between them: the ring keeps positions 3..8, and the
  // first of the last 6 queries (position 3) would need positions 0..2.
  ring.append(0, random(3, 16, 4), random(3, 16, 5));
  EXPECT_NO_THROW(gqa.forward(random(6, 32, 3), ring, 0));
  ring.append(0, random(3, 16, 6), random(3, 16, 7));
  EXPECT_THROW(gqa.forward(random(6, 32, 3), ring, 0), attn::argument_error);
  EXPECT_NO_THROW(gqa.forward(random(3, 32, 3), ring, 0));
}

}  // namespace
