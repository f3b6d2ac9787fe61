// The decode kernel (a few queries against many keys, the keys split into chunks across threads)
// against the reference, by hand, and for its thread-count invariance.
#include <attn/detail/attention.hpp>
#include <attn/detail/attention_decode.hpp>
#include <attn/init.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "support/random_problem.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn_test::AsDouble;
using attn_test::attach_outputs;
using attn_test::base_seed;
using attn_test::RandomProblem;

template <class T>
class DecodeTest : public ::testing::Test {};
TYPED_TEST_SUITE(DecodeTest, attn_test::Scalars, attn_test::ScalarName);

// Random problems with at most kDecodeRows queries (every mask kind, both alignments, GQA, the
// score options, MHA's extra keys), chunks of 1, 7, 64 or 512 keys, 1-3 threads.
TYPED_TEST(DecodeTest, MatchesReference) {
  using T = TypeParam;
  const Index chunks[] = {1, 7, 64, attn::detail::kDecodeChunk};
  int tested = 0;
  for (int c = 0; c < (std::getenv("ATTN_TEST_SEED") ? 1 : 1200); ++c) {
    const std::uint64_t seed = base_seed() + 400000 + std::uint64_t(c);
    RandomProblem<T> r(seed);
    if (r.p.L > attn::detail::kDecodeRows) continue;
    ++tested;
    SCOPED_TRACE(r.description + "  (replay: ATTN_TEST_SEED=" + std::to_string(seed - 400000) + ")");
    AsDouble<T> ref(r);
    attn::Matrix<double> ref_out, ref_lse;
    attach_outputs(ref.p, ref_out, nullptr, &ref_lse);
    attn::detail::attention_reference(ref.p);

    const Index chunk = chunks[seed % 4];
    const int threads = 1 + int(seed % 3);
    attn::Matrix<T> out, lse;
    attach_outputs(r.p, out, nullptr, &lse);
    attn::detail::attention_decode(r.p, chunk, threads);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()))
        << "chunk " << chunk << ", threads " << threads;
    ASSERT_TRUE(attn_test::matrices_near(lse, ref_lse, attn_test::tolerance<T>())) << "lse";
  }
  EXPECT_GT(tested, 300);  // about 35 % of the random problems have L <= 4
}

// One decoding step against a long cache, drawn from a seed: L = 1..4 queries per head at the
// end of S keys (up to ~4 chunks of 512), K and V stacked [B, H_kv, S, d] with padded rows, GQA,
// head dims at the packet edges and past the P.V kernel's 8-packet tiles (up to 260), and a random
// mix of causal alignment, window, softcap, ALiBi, key padding, a bool mask and an additive bias.
// Built in a RandomProblem's buffers so that AsDouble makes the reference's copy.
template <class T>
RandomProblem<T> decoding_step(std::uint64_t seed) {
  RandomProblem<T> r(seed);  // only its buffers are kept: everything is redrawn below
  std::mt19937_64 rng(seed * 7919 + 17);
  const auto pick = [&](Index lo, Index hi) { return std::uniform_int_distribution<Index>(lo, hi)(rng); };
  const auto coin = [&](double prob) { return std::bernoulli_distribution(prob)(rng); };
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto dim = [&] {
    switch (pick(0, 3)) {
      case 0: return pick(1, 20);
      case 1: return pick(60, 70);
      case 2: return pick(120, 136);
      default: return pick(250, 260);
    }
  };
  auto& p = r.p;
  p = {};
  p.batch = pick(1, 2);
  const Index group = coin(0.5) ? 1 : coin(0.5) ? 2 : 4, kv_heads = pick(1, 2);
  p.heads = kv_heads * group;
  p.kv_heads = group == 1 && coin(0.5) ? 0 : kv_heads;
  p.L = pick(1, attn::detail::kDecodeRows);
  p.S = p.mask_keys = coin(0.3) ? pick(1, 40) : coin(0.7) ? pick(500, 1100) : pick(2000, 2100);
  p.d = dim();
  p.dv = coin(0.5) ? p.d : dim();
  p.scale = T(1) / std::sqrt(T(p.d));
  const auto fill = [&](std::vector<T>& buf, auto& view, Index heads, Index rows, Index cols) {
    view.row_stride = cols + pick(0, 3);
    view.head_stride = rows * view.row_stride;
    view.batch_stride = heads * view.head_stride;
    buf.resize(static_cast<std::size_t>(p.batch * view.batch_stride));
    for (auto& x : buf) x = T(normal(rng));
    view.data = buf.data();
  };
  fill(r.q, p.q, p.heads, p.L, p.d);
  fill(r.k, p.k, kv_heads, p.S, p.d);
  fill(r.v, p.v, kv_heads, p.S, p.dv);
  const int causal = coin(0.6) ? 2 : int(pick(0, 1));
  p.causal = causal == 0 ? attn::Causal::None : causal == 1 ? attn::Causal::TopLeft : attn::Causal::BottomRight;
  if (coin(0.3)) p.window = pick(1, p.S + 2);
  if (coin(0.25)) p.softcap = T(std::uniform_real_distribution<double>(0.5, 5.0)(rng));
  r.slopes.clear();
  if (coin(0.25)) {
    for (Index h = 0; h < p.heads; ++h) r.slopes.push_back(T(std::uniform_real_distribution<double>(0.0, 0.1)(rng)));
    p.alibi_slopes = r.slopes.data();
  }
  const Index S = p.S, rows = p.batch * p.heads * p.L;
  if (coin(0.3)) {  // padding at the end of each sequence, sometimes all of it
    r.pad_store.assign(static_cast<std::size_t>(p.batch * S), 0);
    for (Index b = 0; b < p.batch; ++b)
      for (Index j = pick(0, S); j < S; ++j) r.pad_store[std::size_t(b * S + j)] = 1;
    p.key_padding = {reinterpret_cast<const bool*>(r.pad_store.data()), S, 0, 0};
    p.key_padding_attends = false;
  }
  if (coin(0.2)) {  // per (batch, head, row), true = may attend
    r.mask_store.resize(static_cast<std::size_t>(rows * S));
    for (auto& x : r.mask_store) x = coin(0.9);
    p.mask = {reinterpret_cast<const bool*>(r.mask_store.data()), p.heads * p.L * S, p.L * S, S};
  }
  r.bias.clear();
  if (coin(0.2)) {
    r.bias.resize(static_cast<std::size_t>(rows * S));
    for (auto& x : r.bias) x = coin(0.05) ? -std::numeric_limits<T>::infinity() : T(normal(rng));
    p.bias = {r.bias.data(), p.heads * p.L * S, p.L * S, S};
  }
  r.sinks.clear();
  if (coin(0.2)) {  // attention sinks: a logit per head, and sink tokens kept through the window
    for (Index h = 0; h < p.heads; ++h) r.sinks.push_back(T(2.0 * normal(rng)));
    p.sinks = r.sinks.data();
  }
  if (p.window > 0 && coin(0.3)) p.sink_tokens = pick(1, 8);
  std::ostringstream s;
  s << "seed=" << seed << " B=" << p.batch << " H=" << p.heads << " H_kv=" << p.kv_heads << " L=" << p.L
    << " S=" << S << " d=" << p.d << " dv=" << p.dv << " causal=" << causal << " window=" << p.window
    << " sinks=" << bool(p.sinks) << " sink_tokens=" << p.sink_tokens
    << " softcap=" << p.softcap << " alibi=" << bool(p.alibi_slopes) << " padding=" << bool(p.key_padding)
    << " mask=" << bool(p.mask) << " bias=" << bool(p.bias);
  r.description = s.str();
  return r;
}

// Decoding steps against long caches, in the default chunks and in small odd ones, on 1 and 2
// threads: the reference's result, and the same bits on both thread counts.
TYPED_TEST(DecodeTest, LongCachesMatchReferenceOnAnyThreadCount) {
  using T = TypeParam;
  const Index chunks[] = {attn::detail::kDecodeChunk, 100, 16};
  for (int c = 0; c < (std::getenv("ATTN_TEST_SEED") ? 1 : 60); ++c) {
    const std::uint64_t seed = base_seed() + 600000 + std::uint64_t(c);
    RandomProblem<T> r = decoding_step<T>(seed);
    SCOPED_TRACE(r.description + "  (replay: ATTN_TEST_SEED=" + std::to_string(seed - 600000) + ")");
    AsDouble<T> ref(r);
    attn::Matrix<double> ref_out;
    attach_outputs(ref.p, ref_out);
    attn::detail::attention_reference(ref.p);

    const Index chunk = chunks[seed % 3];
    attn::Matrix<T> one, two;
    attach_outputs(r.p, one);
    attn::detail::attention_decode(r.p, chunk, 1);
    ASSERT_TRUE(attn_test::matrices_near(one, ref_out, attn_test::tolerance<T>())) << "chunk " << chunk;
    attach_outputs(r.p, two);
    attn::detail::attention_decode(r.p, chunk, 2);
    ASSERT_TRUE(one == two) << "chunk " << chunk << ": 2 threads differ from 1";
  }
}

// Non-finite logits follow the reference (attention_reference.hpp): a NaN query, or a NaN in the K
// of a key the row attends, makes that row NaN, in whichever chunk the key lies and on any thread
// count; a NaN in the K of a key causal masking removes from the row changes nothing. Two rows,
// bottom-right causal over 40 keys in chunks of 16: row 0 sees keys 0..38, row 1 keys 0..39.
TYPED_TEST(DecodeTest, NaNLogitsMakeTheirRowNaN) {
  using T = TypeParam;
  const Index S = 40, d = 3;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  attn::Generator gen(3);
  attn::Matrix<T> q(2, d), k(S, d), v(S, d);
  attn::init::uniform(q, -1.0, 1.0, gen);
  attn::init::uniform(k, -1.0, 1.0, gen);
  attn::init::uniform(v, -1.0, 1.0, gen);
  attn::detail::AttentionProblem<T> p;
  p.L = 2, p.S = p.mask_keys = S, p.d = p.dv = d, p.scale = T(0.5), p.causal = attn::Causal::BottomRight;
  const auto run = [&](const attn::Matrix<T>& qq, const attn::Matrix<T>& kk, int threads) {
    attn::Matrix<T> out(2, d);
    p.q = {qq.data(), 0, 0, d};
    p.k = {kk.data(), 0, 0, d};
    p.v = {v.data(), 0, 0, d};
    p.out = {out.data(), 0, 0, d};
    attn::detail::attention_decode(p, 16, threads);
    return out;
  };
  const attn::Matrix<T> clean = run(q, k, 1);
  ASSERT_TRUE(clean.allFinite());
  for (int threads : {1, 2}) {
    attn::Matrix<T> q_nan = q;
    q_nan(0, 1) = nan;
    const attn::Matrix<T> a = run(q_nan, k, threads);
    EXPECT_TRUE(a.row(0).array().isNaN().all());
    EXPECT_TRUE(a.row(1) == clean.row(1));

    attn::Matrix<T> k_nan = k;
    k_nan(20, 2) = nan;  // key 20, in the middle chunk: both rows attend it
    EXPECT_TRUE(run(q, k_nan, threads).array().isNaN().all());

    k_nan = k;
    k_nan(39, 0) = nan;  // key 39: row 1 attends it, row 0 may not
    const attn::Matrix<T> c = run(q, k_nan, threads);
    EXPECT_TRUE(c.row(0) == clean.row(0));
    EXPECT_TRUE(c.row(1).array().isNaN().all());
  }
}

// Chunks are fixed and merged in order: the thread count changes nothing, to the bit.
TYPED_TEST(DecodeTest, BitwiseIdenticalForAnyThreadCount) {
  using T = TypeParam;
  for (int c = 0, tested = 0; tested < 40; ++c) {
    RandomProblem<T> r(base_seed() + 500000 + std::uint64_t(c));
    if (r.p.L > attn::detail::kDecodeRows) continue;
    ++tested;
    SCOPED_TRACE(r.description);
    attn::Matrix<T> one;
    attach_outputs(r.p, one);
    attn::detail::attention_decode(r.p, 5, 1);
    for (int threads : {2, 3, 5}) {
      attn::Matrix<T> many;
      attach_outputs(r.p, many);
      attn::detail::attention_decode(r.p, 5, threads);
      ASSERT_TRUE(one == many) << threads << " threads";
    }
  }
}

// One query, two keys in two chunks of one key each, so the merge does the softmax:
//   q = [1], k = [0], [ln 3], scale 1  ->  logits 0 and ln 3, weights 1/4 and 3/4 (1 : 3)
//   v = [4], [8]                       ->  out = 4/4 + 8 * 3/4 = 1 + 6 = 7
// and with key 1 padded out, out = v_0 = 4; with both padded, 0.
TYPED_TEST(DecodeTest, TwoChunksMergeToTheSoftmaxByHand) {
  using T = TypeParam;
  const T q[] = {1}, k[] = {0, std::log(T(3))}, v[] = {4, 8};
  T out[1] = {-1};
  attn::detail::AttentionProblem<T> p;
  p.L = 1, p.S = 2, p.mask_keys = 2, p.d = 1, p.dv = 1, p.scale = 1;
  p.q = {q, 0, 0, 1};
  p.k = {k, 0, 0, 1};
  p.v = {v, 0, 0, 1};
  p.out = {out, 0, 0, 1};
  attn::detail::attention_decode(p, 1, 2);
  EXPECT_NEAR(out[0], T(7), 1e-5);

  const bool padding[] = {false, true};  // true = padded out (key_padding_attends = false)
  p.key_padding = {padding, 0, 0, 0};
  attn::detail::attention_decode(p, 1, 2);
  EXPECT_EQ(out[0], T(4));
  const bool all_padded[] = {true, true};
  p.key_padding = {all_padded, 0, 0, 0};
  attn::detail::attention_decode(p, 1, 2);
  EXPECT_EQ(out[0], T(0));  // a fully masked row is zeros, not NaN
}

// The dispatch point sends decode-shaped problems here: one query against 3000 keys in 512-key
// chunks through detail::attention equals the reference.
TYPED_TEST(DecodeTest, DispatchPointRoutesOneQueryHere) {
  using T = TypeParam;
  const Index S = 3000, d = 40;
  attn::Generator gen(5);
  attn::Matrix<T> q(1, d), k(S, d), v(S, d), out(1, d), want(1, d);
  attn::init::uniform(q, -1.0, 1.0, gen);
  attn::init::uniform(k, -1.0, 1.0, gen);
  attn::init::uniform(v, -1.0, 1.0, gen);
  attn::detail::AttentionProblem<T> p;
  p.L = 1, p.S = S, p.mask_keys = S, p.d = p.dv = d, p.scale = T(0.3), p.causal = attn::Causal::BottomRight;
  p.q = {q.data(), 0, 0, d};
  p.k = {k.data(), 0, 0, d};
  p.v = {v.data(), 0, 0, d};
  p.out = {out.data(), 0, 0, d};
  attn::detail::attention(p);
  auto r = p;
  r.out = {want.data(), 0, 0, d};
  attn::detail::attention_reference(r);
  EXPECT_TRUE(attn_test::matrices_near(out, want, attn_test::tolerance<T>()));
}

}  // namespace
