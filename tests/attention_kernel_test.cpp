// Randomized differential tests: every attention path is held to detail::attention_reference
// (plain loops, evaluated in double on the same inputs) across random shapes, layouts and masks.
// A failure prints the seed and configuration; ATTN_TEST_SEED=<seed> replays one case.
#include <attn/detail/attention.hpp>
#include <attn/precision.hpp>

#include <cstdio>

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
    attn::Matrix<double> ref_out, ref_w, ref_lse;
    attach_outputs(ref.p, ref_out, &ref_w, &ref_lse);
    attn::detail::attention_reference(ref.p);

    for (Index block : {Index(1), Index(7), Index(64)}) {
      attn::Matrix<T> out, w, lse;
      attach_outputs(r.p, out, &w, &lse);
      attn::detail::attention_blocked(r.p, block);
      ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()))
          << "output, block " << block;
      ASSERT_TRUE(attn_test::matrices_near(w, ref_w, attn_test::tolerance<T>()))
          << "weights, block " << block;
      ASSERT_TRUE(attn_test::matrices_near(lse, ref_lse, attn_test::tolerance<T>())) << "lse, block " << block;
      // A masked key weighs exactly 0, as std::exp(-inf) gives the reference.
      for (Index i = 0; i < w.size(); ++i)
        if (ref_w.data()[i] == 0) {
          ASSERT_EQ(w.data()[i], T(0)) << "masked weight " << i << ", block " << block;
        }
    }
    attn::Matrix<T> out, lse;  // and the dispatch point the public classes call (no weights: flash or decode)
    attach_outputs(r.p, out, nullptr, &lse);
    attn::detail::attention(r.p);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()));
    ASSERT_TRUE(attn_test::matrices_near(lse, ref_lse, attn_test::tolerance<T>())) << "lse";
  }
}

// Precision::BFloat16 (attn/precision.hpp): the flash kernel with Q, K, P and V rounded to bf16 -
// on the bf16 micro-kernels where the build targets AVX512_BF16 (float), else on T's kernels over
// rounded operands (this file's scalar and AVX2 builds, and double) - stays within the stated
// bound, bf16_attention_error_bound, of the exact result on the unrounded inputs, row by row, and
// gives the same bits on another thread count. Returns the worst error over the bound.
template <class T>
double expect_flash_bf16_within_bound(RandomProblem<T>& r, const attn::Matrix<double>& ref_out,
                                      attn::detail::FlashBlocks blocks, int threads) {
  r.p.precision = attn::Precision::BFloat16;
  attn::Matrix<T> out, again;
  attach_outputs(r.p, out);
  attn::detail::attention_flash(r.p, blocks, threads);
  attach_outputs(r.p, again);
  attn::detail::attention_flash(r.p, blocks, 4 - threads);
  r.p.precision = attn::Precision::Native;
  EXPECT_TRUE(out == again) << "bf16: thread counts " << threads << " and " << 4 - threads;
  double worst = 0;
  const auto& p = r.p;
  for (Index b = 0; b < p.batch; ++b)
    for (Index h = 0; h < p.heads; ++h) {
      const Index hk = attn::detail::kv_head(p, h);
      double max_k = 0, max_v = 0;
      for (Index j = 0; j < p.S; ++j) {
        for (Index t = 0; t < p.d; ++t) max_k = std::max(max_k, std::abs(double(p.k.row(b, hk, j)[t])));
        for (Index t = 0; t < p.dv; ++t) max_v = std::max(max_v, std::abs(double(p.v.row(b, hk, j)[t])));
      }
      for (Index i = 0; i < p.L; ++i) {
        double l1 = 0;
        for (Index t = 0; t < p.d; ++t) l1 += std::abs(double(p.q.row(b, h, i)[t]));
        const double bound = double(attn::bf16_attention_error_bound<T>(T(std::abs(double(p.scale)) * l1), T(max_k),
                                                                        T(max_v), p.S, p.d)) +
                             (std::is_same_v<T, float> ? 1e-6 : 1e-13);
        const Index row = (b * p.heads + h) * p.L + i;
        for (Index e = 0; e < p.dv; ++e) {
          const double err = std::abs(double(out(row, e)) - ref_out(row, e));
          worst = std::max(worst, err / bound);
          if (err > bound) {
            ADD_FAILURE() << "bf16 row " << row << ", column " << e << ": " << double(out(row, e)) << " vs "
                          << ref_out(row, e) << ", error " << err << " over the bound " << bound;
            return worst;
          }
        }
      }
    }
  return worst;
}

// The flash kernel (online softmax, block skipping, threads) against the reference, with block
// shapes that hit single rows, partial blocks, blocks wider than the problem and the default
// blocks, on 1-3 threads; and the same problem in bf16 compute, within the stated bound.
TYPED_TEST(KernelTest, FlashMatchesReference) {
  using T = TypeParam;
  double worst_bf16 = 0;
  const attn::detail::FlashBlocks shapes[] = {{1, 1}, {7, 5}, {64, 64}, {16, 128}, {}};  // [5]: flash_blocks
  for (int c = 0; c < cases(); ++c) {
    const std::uint64_t seed = base_seed() + 200000 + std::uint64_t(c);
    RandomProblem<T> r(seed);
    SCOPED_TRACE(r.description + "  (replay: ATTN_TEST_SEED=" + std::to_string(seed - 200000) + ")");
    AsDouble<T> ref(r);
    attn::Matrix<double> ref_out, ref_w, ref_lse;
    attach_outputs(ref.p, ref_out, &ref_w, &ref_lse);
    attn::detail::attention_reference(ref.p);

    // Blocks and threads follow from the seed, so that a replay runs the failing configuration;
    // one in six takes the dispatch point's choice (flash_blocks).
    const auto blocks = seed % 6 == 5 ? attn::detail::flash_blocks(r.p) : shapes[seed % 6];
    const int threads = 1 + int(seed % 3);
    attn::Matrix<T> out, lse;
    attach_outputs(r.p, out, nullptr, &lse);
    attn::detail::attention_flash(r.p, blocks, threads);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()))
        << "blocks " << blocks.rows << "x" << blocks.cols << ", threads " << threads;
    ASSERT_TRUE(attn_test::matrices_near(lse, ref_lse, attn_test::tolerance<T>())) << "lse";
    r.p.lse = {};
    worst_bf16 = std::max(worst_bf16, expect_flash_bf16_within_bound(r, ref_out, blocks, threads));
    if (::testing::Test::HasFailure()) return;
  }
  std::printf("bf16 flash: worst error %.3g of the stated bound\n", worst_bf16);
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
