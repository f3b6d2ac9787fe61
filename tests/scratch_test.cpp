// tests/scratch_test.cpp - detail/scratch.hpp: one grow-only buffer per thread, reused by later
// calls, never shared by two live Scratch objects.
#include <attn/detail/scratch.hpp>

#include <thread>

#include "support/test_util.hpp"

namespace {

using attn::detail::Scratch;

TEST(Scratch, ReusedGrowOnlyAndNeverShared) {
  const float* first;
  {
    Scratch<float> a(1000);
    first = a.data();
    EXPECT_GE(Scratch<float>::kept(), 1000);
    // Held: a second one on this thread (a nested call) gets memory of its own.
    Scratch<float> b(10);
    EXPECT_TRUE(b.data() + 10 <= a.data() || a.data() + 1000 <= b.data());
  }
  // Another thread has a buffer of its own, though this thread's is free (and still allocated).
  const float* other = nullptr;
  std::thread([&] {
    Scratch<float> c(1000);
    other = c.data();
  }).join();
  EXPECT_NE(other, first);
  {
    Scratch<float> again(500);  // released and big enough: the same memory, no allocation
    EXPECT_EQ(again.data(), first);
    EXPECT_GE(Scratch<float>::kept(), 1000);  // grow-only
  }
  { Scratch<float> bigger(5000); }
  EXPECT_GE(Scratch<float>::kept(), 5000);
  Scratch<float> f(10);
  Scratch<double> d(10);  // a buffer per scalar type: both are the thread's own, neither is busy
  EXPECT_NE(static_cast<const void*>(d.data()), static_cast<const void*>(f.data()));
}

}  // namespace
