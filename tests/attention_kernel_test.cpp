// Randomized differential tests: every attention path is held to detail::attention_reference
// (plain loops, evaluated in double on the same inputs) across random shapes, layouts and masks.
// A failure prints the seed and configuration; ATTN_TEST_SEED=<seed> replays one case.
#include <attn/detail/attention.hpp>

#include "support/random_problem.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn_test::AsDouble;
using attn_test::attach_outputs;
using attn_test::base_seed;
using attn_test::cases;
using attn_test::RandomProblem;

template <class T>
class KernelTest : public ::testing::Test {};
TYPED_TEST_SUITE(KernelTest, attn_test::Scalars, attn_test::ScalarName);

// Each fast path (block sizes chosen to hit partial and single-row blocks) against the reference.
TYPED_TEST(KernelTest, BlockedMatchesReference) {
  using T = TypeParam;
  for (int c = 0; c < cases(); ++c) {
    const std::uint64_t seed = base_seed() + std::uint64_t(c);
    RandomProblem<T> r(seed);
    SCOPED_TRACE(r.description + "  (replay: ATTN_TEST_SEED=" + std::to_string(seed) + ")");
    AsDouble<T> ref(r);
    attn::Matrix<double> ref_out, ref_w;
    attach_outputs(ref.p, ref_out, &ref_w);
    attn::detail::attention_reference(ref.p);

    for (Index block : {Index(1), Index(7), Index(64)}) {
      attn::Matrix<T> out, w;
      attach_outputs(r.p, out, &w);
      attn::detail::attention_blocked(r.p, block);
      ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()))
          << "output, block " << block;
      ASSERT_TRUE(attn_test::matrices_near(w, ref_w, attn_test::tolerance<T>()))
          << "weights, block " << block;
      // A masked key weighs exactly 0, as std::exp(-inf) gives the reference.
      for (Index i = 0; i < w.size(); ++i)
        if (ref_w.data()[i] == 0) {
          ASSERT_EQ(w.data()[i], T(0)) << "masked weight " << i << ", block " << block;
        }
    }
    attn::Matrix<T> out;  // and the dispatch point the public classes call (no weights: the flash kernel)
    attach_outputs(r.p, out);
    attn::detail::attention(r.p);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()));
  }
}

// The flash kernel (online softmax, block skipping, threads) against the reference, with block
// shapes that hit single rows, partial blocks, blocks wider than the problem and the default
// blocks, on 1-3 threads.
TYPED_TEST(KernelTest, FlashMatchesReference) {
  using T = TypeParam;
  const attn::detail::FlashBlocks shapes[] = {{1, 1}, {7, 5}, {64, 64}, {16, 128}, {}};  // [5]: flash_blocks
  for (int c = 0; c < cases(); ++c) {
    const std::uint64_t seed = base_seed() + 200000 + std::uint64_t(c);
    RandomProblem<T> r(seed);
    SCOPED_TRACE(r.description + "  (replay: ATTN_TEST_SEED=" + std::to_string(seed - 200000) + ")");
    AsDouble<T> ref(r);
    attn::Matrix<double> ref_out, ref_w;
    attach_outputs(ref.p, ref_out, &ref_w);
    attn::detail::attention_reference(ref.p);

    // Blocks and threads follow from the seed, so that a replay runs the failing configuration;
    // one in six takes the dispatch point's choice (flash_blocks).
    const auto blocks = seed % 6 == 5 ? attn::detail::flash_blocks(r.p) : shapes[seed % 6];
    const int threads = 1 + int(seed % 3);
    attn::Matrix<T> out;
    attach_outputs(r.p, out);
    attn::detail::attention_flash(r.p, blocks, threads);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()))
        << "blocks " << blocks.rows << "x" << blocks.cols << ", threads " << threads;
  }
}

// Each task owns its output rows and reduces them in a fixed order: the thread count changes
// nothing, to the bit.
TYPED_TEST(KernelTest, FlashIsBitwiseIdenticalForAnyThreadCount) {
  using T = TypeParam;
  for (int c = 0; c < 40; ++c) {
    RandomProblem<T> r(base_seed() + 300000 + std::uint64_t(c));
    SCOPED_TRACE(r.description);
    attn::Matrix<T> one;
    attach_outputs(r.p, one);
    attn::detail::attention_flash(r.p, {8, 16}, 1);
    for (int threads : {2, 3, 5}) {
      attn::Matrix<T> many;
      attach_outputs(r.p, many);
      attn::detail::attention_flash(r.p, {8, 16}, threads);
      ASSERT_TRUE(one == many) << threads << " threads";
    }
  }
}

// Few (batch, head) pairs get smaller query blocks, so that two threads have several tasks each:
// one head of 512 queries is 3 tasks of 192 rows, 6 of 96, 11 of 48 -> 48 (at least 8 tasks).
TEST(FlashBlocks, SmallProblemsGetSmallerQueryBlocksSoThreadsShareThem) {
  attn::detail::AttentionProblem<float> p;
  p.batch = 1, p.heads = 1, p.L = 512, p.S = 512;
  EXPECT_EQ(attn::detail::flash_blocks(p).rows, 48);
  p.heads = 2;  // 2 x 3 = 6 tasks of 192; 2 x 6 = 12 of 96
  EXPECT_EQ(attn::detail::flash_blocks(p).rows, 96);
  p.heads = 12;  // 12 x 3 = 36 tasks of 192
  EXPECT_EQ(attn::detail::flash_blocks(p).rows, 192);
  p.heads = 1, p.L = 20;  // one task whatever the block: never below 48
  EXPECT_EQ(attn::detail::flash_blocks(p).rows, 48);
  EXPECT_EQ(attn::detail::flash_blocks(p).cols, 256);
}

// The reference in float against itself in double: a sanity bound on the oracle's own rounding.
TYPED_TEST(KernelTest, ReferenceFloatTracksDouble) {
  using T = TypeParam;
  for (int c = 0; c < 50; ++c) {
    RandomProblem<T> r(base_seed() + 100000 + std::uint64_t(c));
    SCOPED_TRACE(r.description);
    AsDouble<T> ref(r);
    attn::Matrix<double> ref_out, ref_w;
    attach_outputs(ref.p, ref_out, &ref_w);
    attn::detail::attention_reference(ref.p);
    attn::Matrix<T> out, w;
    attach_outputs(r.p, out, &w);
    attn::detail::attention_reference(r.p);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()));
  }
}

}  // namespace
