// The flash kernel and the packed GEMM (detail::linear_packed) allocate their scratch once per
// call, before their threads start, and nothing while tasks run. Built with EIGEN_RUNTIME_NO_MALLOC, where Eigen checks every heap allocation
// of its own against is_malloc_allowed(); the kernel forbids them around its threaded section
// (detail::NoEigenMalloc). eigen_assert is redefined to count failed checks instead of aborting,
// so a forbidden allocation on any thread shows up as a count.
#include <atomic>
#include <tuple>

namespace {
std::atomic<int> eigen_assert_failures{0};
}  // namespace

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x)                               \
  do {                                                \
    if (!(x)) eigen_assert_failures.fetch_add(1);     \
  } while (false)

#include <attn/detail/attention.hpp>
#include <attn/detail/gemm.hpp>
#include <attn/init.hpp>

#include "support/random_problem.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;

template <class T>
class NoMallocTest : public ::testing::Test {
 protected:
  void SetUp() override { eigen_assert_failures = 0; }
};
TYPED_TEST_SUITE(NoMallocTest, attn_test::Scalars, attn_test::ScalarName);

// The control: inside the guard an Eigen allocation is caught, and outside it is not. Without
// this the test below could pass with the check compiled out.
TYPED_TEST(NoMallocTest, GuardCatchesAnEigenAllocation) {
  using T = TypeParam;
  {
    [[maybe_unused]] const attn::detail::NoEigenMalloc guard;
    attn::Matrix<T> m(7, 9);
    m.setZero();
  }
  EXPECT_EQ(eigen_assert_failures.load(), 1);
  attn::Matrix<T> after(7, 9);
  after.setZero();
  EXPECT_EQ(eigen_assert_failures.load(), 1);
}

// Random problems (every mask kind, both causal alignments, odd shapes), on 1 and 2 threads, with
// the default blocks and small ones: no Eigen allocation inside the kernel's hot section, and the
// results still match the reference.
TYPED_TEST(NoMallocTest, FlashKernelAllocatesNothingWhileItRuns) {
  using T = TypeParam;
  const attn::detail::FlashBlocks shapes[] = {{}, {16, 32}};
  for (int c = 0; c < 60; ++c) {
    const std::uint64_t seed = attn_test::base_seed() + 400000 + std::uint64_t(c);
    attn_test::RandomProblem<T> r(seed);
    SCOPED_TRACE(r.description);
    attn_test::AsDouble<T> ref(r);
    attn::Matrix<double> ref_out;
    attn_test::attach_outputs(ref.p, ref_out);
    attn::detail::attention_reference(ref.p);

    attn::Matrix<T> out;
    attn_test::attach_outputs(r.p, out);
    attn::detail::attention_flash(r.p, shapes[c % 2], 1 + c % 2);
    ASSERT_EQ(eigen_assert_failures.load(), 0);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()));
  }
}

// The decode kernel (K and V read in place, the scores in one allocation made before the threads
// start): random problems with at most kDecodeRows queries, chunks of 7 keys and the default, 1
// and 2 threads.
TYPED_TEST(NoMallocTest, DecodeKernelAllocatesNothingWhileItRuns) {
  using T = TypeParam;
  for (int c = 0, tested = 0; tested < 40; ++c) {
    attn_test::RandomProblem<T> r(attn_test::base_seed() + 450000 + std::uint64_t(c));
    if (r.p.L > attn::detail::kDecodeRows) continue;
    ++tested;
    SCOPED_TRACE(r.description);
    attn_test::AsDouble<T> ref(r);
    attn::Matrix<double> ref_out;
    attn_test::attach_outputs(ref.p, ref_out);
    attn::detail::attention_reference(ref.p);

    attn::Matrix<T> out;
    attn_test::attach_outputs(r.p, out);
    attn::detail::attention_decode(r.p, tested % 2 ? 7 : attn::detail::kDecodeChunk, 1 + tested % 2);
    ASSERT_EQ(eigen_assert_failures.load(), 0);
    ASSERT_TRUE(attn_test::matrices_near(out, ref_out, attn_test::tolerance<T>()));
  }
}

// The packed GEMM, on shapes with one tile and many, several K blocks, a narrower last panel and
// remainder row tiles, on 1 and 2 threads: no Eigen allocation while its tiles run (its scratch
// comes before), and the result is still right.
TYPED_TEST(NoMallocTest, PackedGemmAllocatesNothingWhileItRuns) {
  using T = TypeParam;
  attn::Generator gen(17);
  for (const auto& [n, in, out] : {std::tuple<Index, Index, Index>{7, 33, 21}, {130, 600, 777}, {1031, 97, 517}}) {
    attn::Matrix<T> x(n, in), w(out, in), y(n, out);
    attn::Vector<T> b(out);
    attn::init::uniform(x, -1.0, 1.0, gen);
    attn::init::uniform(w, -1.0, 1.0, gen);
    attn::init::uniform(b, -1.0, 1.0, gen);
    const attn::Matrix<double> want = (x.template cast<double>() * w.template cast<double>().transpose()).rowwise() +
                                      b.template cast<double>().transpose();
    for (int threads : {1, 2}) {
      attn::detail::linear_packed<T>(x, attn::detail::weight_view<T>(w), b.data(), y, threads);
      ASSERT_EQ(eigen_assert_failures.load(), 0) << n << " x " << in << " -> " << out << ", " << threads << " threads";
      ASSERT_TRUE(attn_test::matrices_near(y, want, 1e-5));
    }
  }
}

}  // namespace
