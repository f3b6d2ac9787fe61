// The decode kernel (a few queries against many keys, the keys split into chunks across threads)
// against the reference, by hand, and for its thread-count invariance.
#include <attn/detail/attention.hpp>
#include <attn/detail/attention_decode.hpp>
#include <attn/init.hpp>

#include <cmath>

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
    attn::Matrix<double> ref_out;
    attach_outputs(ref.p, ref_out);
    attn::detail::attention_reference(ref.p);

    const Index chunk = chunks[seed % 4];
    const int threads = 1 + int(seed % 3);
    attn::Matrix<T> out;
    attach_outputs(r.p, out);
    attn::detail::attention_decode(r.p, chunk, threads);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()))
        << "chunk " << chunk << ", threads " << threads;
  }
  EXPECT_GT(tested, 300);  // about 35 % of the random problems have L <= 4
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
