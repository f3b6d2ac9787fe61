// attn/threads.hpp - how many threads attn's kernels use.
//
//   attn::set_num_threads(2);   // every later call uses 2 threads; 0 = one per hardware thread
//
// Results do not depend on the thread count: work is split into fixed tasks that each own their
// output rows, so 1 and N threads give bitwise identical numbers. set_num_threads may be called
// at any time, from any thread, also while other threads run attn's calls (the setting is a
// relaxed atomic): each parallel step uses the count in effect when it starts.
#pragma once

#include <algorithm>
#include <atomic>
#include <thread>

#include "attn/detail/check.hpp"

namespace attn {

namespace detail {
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> n{0};
  return n;
}
}  // namespace detail

// The number of threads later calls use; 0 (the default) means std::thread::hardware_concurrency().
inline void set_num_threads(int n) {
  detail::require_arg(n >= 0, "attn::set_num_threads", "the thread count must be >= 0 (0 = all cores), got ", n);
  detail::thread_setting().store(n, std::memory_order_relaxed);
}

// The thread count in effect: the setting, or the hardware's when the setting is 0.
inline int num_threads() {
  // hardware_concurrency() reads sysfs on glibc (microseconds): ask once per process.
  static const int hardware = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const int n = detail::thread_setting().load(std::memory_order_relaxed);
  return n > 0 ? n : hardware;
}

}  // namespace attn
