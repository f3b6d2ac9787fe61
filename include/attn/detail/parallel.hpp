// attn/detail/parallel.hpp - run independent tasks on several threads.
#pragma once

#include <algorithm>
#include <thread>
#include <vector>

#include "attn/threads.hpp"
#include "attn/types.hpp"

namespace attn::detail {

// The threads worth starting for `flops` of work: starting a thread costs tens of microseconds,
// so each must get at least ~8 MFLOP (0.1 ms at this library's rates). `requested` 0 means
// attn::num_threads().
inline int threads_for(double flops, int requested) {
  const int wanted = requested > 0 ? requested : num_threads();
  const double worth = flops / 8e6;
  return worth < 2 ? 1 : static_cast<int>(std::min<double>(wanted, worth));
}

// Runs worker(first, step) on `threads` threads (0: attn::num_threads()), worker t taking tasks
// t, t + step, t + 2*step, ... of [0, tasks). Round-robin rather than contiguous ranges, so tasks
// whose cost grows along the range (causal query blocks) spread evenly. Which thread runs a task
// never changes what the task computes. The calling thread is worker 0.
template <class Worker>
void parallel_tasks(Index tasks, int threads, Worker&& worker) {
  if (threads <= 0) threads = num_threads();
  const Index n = std::min<Index>(threads, tasks);
  if (n <= 1) {
    if (tasks > 0) worker(Index(0), Index(1));
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(n - 1));
  for (Index t = 1; t < n; ++t) pool.emplace_back([&worker, t, n] { worker(t, n); });
  worker(Index(0), n);
  for (auto& th : pool) th.join();
}

}  // namespace attn::detail
