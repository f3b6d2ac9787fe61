// tests/decoder_attention_test.cpp - attn::DecoderAttention: the Llama-style block equals its parts
// composed by hand, and decoding through a KV cache (prefill, then steps) equals the forward over
// the whole sequence, row by row, for every option. (tests/gpt_test.cpp holds the whole tiny GPT to
// PyTorch's generations.)
#include <gtest/gtest.h>

#include <attn/decoder_attention.hpp>
#include <attn/kv_storage.hpp>
#include <attn/threads.hpp>
#include <limits>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn::DecoderAttention;
using attn::DecoderAttentionOptions;
using attn::Index;
using attn::Matrix;
using attn_test::matrices_near;

Matrix<float> random(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Matrix<float>::Random(rows, cols);
}

TEST(DecoderAttention, EqualsItsPartsComposed) {
  // E = 24, H = 6, Hkv = 2, D = 4, RoPE NeoX, with q/k/v biases: q_proj, k_proj, v_proj, RoPE at
  // positions 0..L-1, causal grouped-query attention, o_proj.
  DecoderAttentionOptions o;
  o.num_kv_heads = 2;
  o.qkv_bias = true;
  attn::Generator gen(3);
  DecoderAttention<float> block(24, 6, o, gen);
  const Index L = 9;
  const Matrix<float> x = random(L, 24, 1);
  Matrix<float> q = block.q_proj().forward(x), k = block.k_proj().forward(x), v = block.v_proj().forward(x);
  attn::RopeCache<float> rope(4, 16);
  rope.apply(q, 6, 1, 0);
  rope.apply(k, 2, 1, 0);
  attn::GqaArgs<float> args;
  args.batch = 1;
  args.causal = attn::Causal::TopLeft;
  const Matrix<float> want = block.o_proj().forward(attn::GroupedQueryAttention<float>(6, 2).forward(q, k, v, args));
  EXPECT_TRUE(matrices_near(block.forward(x, 1), want, 1e-6));
  EXPECT_EQ(block.q_proj().weight().rows(), 24);  // [H*D, E]
  EXPECT_EQ(block.k_proj().weight().rows(), 8);   // [Hkv*D, E]
  EXPECT_EQ(block.o_proj().weight().cols(), 24);  // [E, H*D]

  // Every head's probabilities are those of the core on the same rotated q and k: [H*L, L], rows
  // (h, l), causal (row l is zero past column l), each row summing to 1.
  const attn::AttentionResult<float> core =
      attn::GroupedQueryAttention<float>(6, 2).forward_with_weights(q, k, v, args);
  const attn::AttentionResult<float> r = block.forward_with_weights(x, 1);
  EXPECT_TRUE(matrices_near(r.output, want, 1e-6));
  ASSERT_EQ(r.weights.rows(), 6 * L);
  ASSERT_EQ(r.weights.cols(), L);
  EXPECT_TRUE(matrices_near(r.weights, core.weights, 1e-6));
  for (Index row = 0; row < 6 * L; ++row) {
    EXPECT_NEAR(r.weights.row(row).sum(), 1.0f, 1e-5f);
    EXPECT_EQ(r.weights.row(row).tail(L - 1 - row % L).cwiseAbs().sum(), 0.0f) << "row " << row;
  }
}

// Through a cache, the weights of a step cover the cached keys: the last query's row of each head
// equals that row of the forward over the whole sequence (the same keys, the same positions).
TEST(DecoderAttention, WeightsThroughTheCacheEqualTheWholeForward) {
  DecoderAttentionOptions o;
  o.num_kv_heads = 2;
  attn::Generator gen(4);
  DecoderAttention<float> block(24, 6, o, gen);
  const Index L = 7, H = 6;
  const Matrix<float> x = random(L, 24, 2);
  const attn::AttentionResult<float> whole = block.forward_with_weights(x, 1);
  attn::KVCache<float> cache = block.make_cache(1, 16);
  (void)block.forward(x.topRows(L - 1), cache, 0);
  const attn::AttentionResult<float> step = block.forward_with_weights(x.bottomRows(1), cache, 0);
  ASSERT_EQ(step.weights.rows(), H);
  ASSERT_EQ(step.weights.cols(), L);
  for (Index h = 0; h < H; ++h)
    EXPECT_TRUE(matrices_near(step.weights.row(h), whole.weights.row(h * L + L - 1), 1e-5)) << "head " << h;
  EXPECT_TRUE(matrices_near(step.output, whole.output.bottomRows(1), 1e-5));
  EXPECT_EQ(cache.size(0), L);
}

struct Case {
  const char* name;
  Index E, H;
  DecoderAttentionOptions opt;
  Index capacity;               // of the cache: a ring when opt.window > 0 (unless full)
  bool full_cache_with_window;  // window over a full cache instead of a ring
  std::vector<Index> chunks;    // prefill, then steps (repeated)
  Index L;
};

DecoderAttentionOptions options(Index kv, Index head_dim = 0) {
  DecoderAttentionOptions o;
  o.num_kv_heads = kv;
  o.head_dim = head_dim;
  return o;
}

TEST(DecoderAttention, DecodingThroughTheCacheEqualsTheWholeForward) {
  std::vector<Case> cases;
  cases.push_back({"mha", 32, 4, options(0), 40, false, {1}, 40});
  cases.push_back({"gqa prefill then steps", 64, 8, options(2), 50, false, {17, 1}, 50});
  cases.push_back({"mqa, head_dim 12 != E/H", 32, 4, options(1, 12), 33, false, {6, 3, 1}, 33});
  {
    DecoderAttentionOptions o = options(2);
    o.rope = attn::Rope{0, 500.0, attn::RopeStyle::GPTJ};
    cases.push_back({"gptj rope, base 500", 32, 4, o, 30, false, {4, 1}, 30});
    o.rope = attn::Rope{4, 10000.0, attn::RopeStyle::NeoX};
    cases.push_back({"partial rotary", 32, 4, o, 30, false, {4, 1}, 30});
    o.rope.reset();
    cases.push_back({"no rope", 32, 4, o, 30, false, {4, 1}, 30});
  }
  {
    DecoderAttentionOptions o = options(2);
    o.window = 6;
    cases.push_back({"window, ring", 32, 4, o, 8, false, {3, 1, 2}, 45});
    // A prompt longer than the ring's max_append() (8 - 6 + 1 = 3) goes in chunks of 3.
    cases.push_back({"window, ring, chunked prefill", 32, 4, o, 8, false, {20, 1, 7}, 45});
    cases.push_back({"window, full cache", 32, 4, o, 45, true, {10, 1}, 45});
    o.softcap = 2.0;
    o.alibi = true;
    o.qkv_bias = o.o_bias = true;
    o.scale = 0.7;
    cases.push_back({"window, softcap, alibi, biases, scale", 32, 4, o, 6, false, {1}, 40});
  }
  unsigned seed = 10;
  for (const Case& c : cases) {
    for (int threads : {1, 2}) {
      SCOPED_TRACE(std::string(c.name) + ", threads " + std::to_string(threads));
      attn::set_num_threads(threads);
      attn::Generator gen(seed);
      DecoderAttention<float> block(c.E, c.H, c.opt, gen);
      const Matrix<float> x = random(c.L, c.E, ++seed);
      const Matrix<float> whole = block.forward(x, 1);
      attn::KVCache<float> cache = c.full_cache_with_window
                                       ? attn::KVCache<float>(1, block.num_kv_heads(), block.head_dim(), c.capacity)
                                       : block.make_cache(1, c.capacity);
      Index t = 0;
      for (std::size_t i = 0; t < c.L; i = (i + 1 < c.chunks.size() ? i + 1 : std::min<std::size_t>(1, i))) {
        const Index n = std::min(c.chunks[i], c.L - t);
        const Matrix<float> y = block.forward(x.middleRows(t, n), cache, 0);
        ASSERT_TRUE(matrices_near(y, whole.middleRows(t, n), 1e-5)) << "rows [" << t << ", " << t + n << ")";
        t += n;
      }
      EXPECT_EQ(cache.size(0), c.L);
    }
  }
  attn::set_num_threads(0);
}

TEST(DecoderAttention, ABatchThroughTheCacheEqualsEachSequence) {
  DecoderAttention<float> block(32, 4, options(2));
  const Index B = 3, P = 4;
  const Matrix<float> x = random(B * (P + 1), 32, 5);  // [B, P + 1, E]: sequence b in rows b*(P+1) ..
  Matrix<float> prefill(B * P, 32), step(B, 32);
  for (Index b = 0; b < B; ++b) {
    prefill.middleRows(b * P, P) = x.middleRows(b * (P + 1), P);
    step.row(b) = x.row(b * (P + 1) + P);
  }
  attn::KVCache<float> cache = block.make_cache(B, 8);
  const Matrix<float> y_prefill = block.forward(prefill, cache);
  const Matrix<float> y_step = block.forward(step, cache);
  const Matrix<float> y_all = block.forward(x, B);  // no cache: B sequences of P + 1
  for (Index b = 0; b < B; ++b) {
    EXPECT_TRUE(matrices_near(y_prefill.middleRows(b * P, P), y_all.middleRows(b * (P + 1), P), 1e-5));
    EXPECT_TRUE(matrices_near(y_step.row(b), y_all.row(b * (P + 1) + P), 1e-5));
  }
}

// A batch's prompts longer than a ring's max_append() (capacity 7, window 4: 4 rows at a time)
// go in chunks of 4, 4 and 2, each sequence's rows in place: the whole windowed forward, row for row.
TEST(DecoderAttention, ABatchPromptLongerThanTheRingTakesInChunks) {
  DecoderAttentionOptions o = options(2);
  o.window = 4;
  DecoderAttention<float> block(32, 4, o);
  const Index B = 2, P = 10;
  const Matrix<float> x = random(B * P, 32, 8);
  attn::KVCache<float> ring = block.make_cache(B, 7);
  ASSERT_EQ(ring.max_append(0), 4);
  const Matrix<float> y = block.forward(x, ring);
  EXPECT_TRUE(matrices_near(y, block.forward(x, B), 1e-5));
  EXPECT_EQ(ring.size(0), P);
  EXPECT_EQ(ring.size(1), P);
}

TEST(DecoderAttention, AFailedCallLeavesTheCacheAsItWas) {
  DecoderAttentionOptions o = options(2);
  o.max_positions = 6;
  DecoderAttention<float> block(16, 4, o);
  attn::KVCache<float> cache = block.make_cache(2, 5);
  block.forward(random(3, 16, 1), cache, 0);
  const Matrix<float> keys = cache.keys(0, 1);
  EXPECT_THROW(block.forward(random(3, 16, 2), cache, 0), attn::argument_error);  // 3 + 3 > capacity 5
  EXPECT_THROW(block.forward(random(2, 15, 2), cache, 0), attn::shape_error);     // E = 15
  EXPECT_THROW(block.forward(random(2, 16, 2), cache), attn::argument_error);     // sizes 3 and 0
  EXPECT_THROW(block.forward(random(1, 16, 2), cache, 2), attn::argument_error);  // no sequence 2
  attn::KVCache<float> wrong(1, 4, 4, 5);
  EXPECT_THROW(block.forward(random(1, 16, 2), wrong, 0), attn::shape_error);  // 4 kv heads
  attn::KVCache<float> long_cache(1, 2, 4, 10);
  block.forward(random(5, 16, 2), long_cache, 0);
  EXPECT_THROW(block.forward(random(2, 16, 2), long_cache, 0), attn::argument_error);  // positions 5, 6 >= 6
  EXPECT_EQ(long_cache.size(0), 5);
  EXPECT_EQ(cache.size(0), 3);
  EXPECT_EQ(cache.size(1), 0);
  EXPECT_EQ(Matrix<float>(cache.keys(0, 1)), keys);

  DecoderAttentionOptions w = options(2);
  w.window = 4;
  DecoderAttention<float> windowed(16, 4, w);
  attn::KVCache<float> ring = windowed.make_cache(1, 6);  // max_append 3
  EXPECT_EQ(ring.max_append(0), 3);
  // 4 rows go in chunks of 3 and 1, but their weights would be two matrices: refused.
  EXPECT_THROW(windowed.forward_with_weights(random(4, 16, 3), ring, 0), attn::argument_error);
  EXPECT_EQ(ring.size(0), 0);
  attn::KVCache<float> other_window(1, 2, 4, 6, 5);
  EXPECT_THROW(windowed.forward(random(1, 16, 3), other_window, 0), attn::argument_error);

  // Found by serving_fuzz: a prompt that goes in chunks, whose last row's key an int8 cache cannot
  // hold (inf), was refused only when that chunk was appended, after the first chunk went in.
  attn::KVCache<float> int8_ring = windowed.make_cache(1, 6, attn::KVStorage::Int8);  // chunks of 3
  Matrix<float> x = random(4, 16, 4);
  x.row(3).setConstant(std::numeric_limits<float>::infinity());
  EXPECT_THROW(windowed.forward(x, int8_ring, 0), attn::argument_error);
  EXPECT_EQ(int8_ring.size(0), 0);
}

// make_cache(batch, capacity, storage): a block decoding against a bf16, fp16 or int8 cache does
// exactly what its parts do by hand on a cache of the same storage - q/k/v projections, RoPE at
// the cache's next position, append, GroupedQueryAttention against the cache, o_proj - so the
// storage changes only what the cache holds (the accuracy of that: tests/kv_storage_test.cpp).
TEST(DecoderAttention, AStepAgainstACompressedCacheEqualsTheCoreOnTheSameCache) {
  struct StorageCase {
    const char* name;
    DecoderAttentionOptions opt;
    Index capacity, prefill, steps;
  };
  std::vector<StorageCase> cases;
  cases.push_back({"gqa 2:1", options(2), 24, 9, 6});
  {
    DecoderAttentionOptions o = options(1);  // multi-query, ring, every score option
    o.window = 5;
    o.softcap = 2.0;
    o.alibi = true;
    o.qkv_bias = o.o_bias = true;
    o.scale = 0.6;
    cases.push_back({"mqa, window (ring), softcap, alibi, biases, scale", o, 8, 4, 9});
  }
  unsigned seed = 40;
  for (const attn::KVStorage storage : {attn::KVStorage::BFloat16, attn::KVStorage::Int8, attn::KVStorage::Float16}) {
    for (const StorageCase& c : cases) {
      SCOPED_TRACE(std::string(attn::storage_name(storage)) + ", " + c.name);
      const Index E = 32, H = 4;
      attn::Generator gen(++seed);
      DecoderAttention<float> block(E, H, c.opt, gen);
      const Index Hkv = block.num_kv_heads(), D = block.head_dim();
      attn::KVCache<float> cache = block.make_cache(1, c.capacity, storage);
      EXPECT_EQ(cache.storage(), storage);
      EXPECT_EQ(cache.window(), c.opt.window);
      attn::KVCache<float> by_hand(storage, 1, Hkv, D, c.capacity, c.opt.window);

      const attn::RopeCache<float> rope(D, c.opt.max_positions, *c.opt.rope);
      const attn::GroupedQueryAttention<float> core =
          c.opt.scale > 0 ? attn::GroupedQueryAttention<float>(H, Hkv, float(c.opt.scale))
                          : attn::GroupedQueryAttention<float>(H, Hkv);
      attn::CacheArgs<float> args;  // causal bottom-right
      args.window = c.opt.window;
      args.softcap = float(c.opt.softcap);
      if (c.opt.alibi) args.alibi_slopes = attn::alibi_slopes<float>(H);
      // Rows x of the next positions [n, n + L): what forward(x, cache, 0) computes.
      const auto step_by_hand = [&](const Matrix<float>& x) {
        const Index n = by_hand.size(0);
        Matrix<float> q = block.q_proj().forward(x), k = block.k_proj().forward(x), v = block.v_proj().forward(x);
        rope.apply(q, H, 1, n);
        rope.apply(k, Hkv, 1, n);
        by_hand.append(0, k, v);
        return Matrix<float>(block.o_proj().forward(core.forward(q, by_hand, 0, args)));
      };

      const Matrix<float> x = random(c.prefill + c.steps, E, ++seed);
      const Matrix<float> prefill = x.topRows(c.prefill);
      EXPECT_TRUE(matrices_near(block.forward(prefill, cache, 0), step_by_hand(prefill), 1e-6)) << "prefill";
      for (Index t = c.prefill; t < c.prefill + c.steps; ++t) {
        const Matrix<float> row = x.row(t);
        ASSERT_TRUE(matrices_near(block.forward(row, cache, 0), step_by_hand(row), 1e-6)) << "position " << t;
        for (Index h = 0; h < Hkv; ++h) {
          EXPECT_EQ(cache.keys(0, h), by_hand.keys(0, h)) << "position " << t << ", kv head " << h;
          EXPECT_EQ(cache.values(0, h), by_hand.values(0, h)) << "position " << t << ", kv head " << h;
        }
      }
      EXPECT_EQ(cache.size(0), c.prefill + c.steps);
    }
  }
}

TEST(DecoderAttention, RejectsBadOptions) {
  EXPECT_THROW(DecoderAttention<float>(16, 4, options(3)), attn::shape_error);  // 3 does not divide 4
  EXPECT_THROW(DecoderAttention<float>(18, 4), attn::shape_error);              // 18 / 4, no head_dim
  EXPECT_NO_THROW(DecoderAttention<float>(18, 4, options(0, 6)));
  DecoderAttentionOptions o;
  o.window = -1;
  EXPECT_THROW(DecoderAttention<float>(16, 4, o), attn::argument_error);
  o = {};
  o.softcap = std::nan("");
  EXPECT_THROW(DecoderAttention<float>(16, 4, o), attn::argument_error);
  o = {};
  o.rope = attn::Rope{3};  // odd rotary_dim
  EXPECT_THROW(DecoderAttention<float>(16, 4, o), attn::argument_error);
}

}  // namespace
