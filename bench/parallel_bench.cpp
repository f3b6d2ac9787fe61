// bench/parallel_bench.cpp - what detail::parallel_tasks costs itself: handing a call's tasks to
// the persistent pool's workers ("pool") against starting threads for the call ("new_threads",
// what every call did before the pool, and what a call still does when another thread's call
// holds the pool). Three loads, at 1 and 2 threads:
//   empty    tasks that do nothing: the caller may run them all before a worker wakes.
//   handoff  worker 0 waits until every other worker has started: a full wake-up of the others.
//   work     64 tasks of a few microseconds each: the thread count should divide the time.
#include <benchmark/benchmark.h>

#include <atomic>
#include <attn/detail/parallel.hpp>
#include <thread>

#include "bench_common.hpp"

namespace {

using attn::Index;

// parallel_tasks(tasks, threads, worker), on the pool or on fresh threads.
template <class Worker>
void run_tasks(bool pool, Index tasks, int threads, Worker&& worker) {
  if (pool) {
    attn::detail::parallel_tasks(tasks, threads, worker);
  } else {
    const Index n = std::min<Index>(threads, tasks);
    if (n > 1) {
      attn::detail::parallel_tasks_on_new_threads(n, worker);
    } else {
      worker(Index(0), Index(1));
    }
  }
}

void BM_empty(benchmark::State& state, bool pool) {
  const int threads = static_cast<int>(state.range(0));
  std::atomic<long> calls{0};
  for (auto _ : state)
    run_tasks(pool, threads, threads, [&](Index, Index) { calls.fetch_add(1, std::memory_order_relaxed); });
  benchmark::DoNotOptimize(calls.load());
}

void BM_handoff(benchmark::State& state, bool pool) {
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    std::atomic<Index> started{0};
    run_tasks(pool, threads, threads, [&](Index first, Index step) {
      started.fetch_add(1);
      if (first == 0)
        while (started.load() < step) std::this_thread::yield();
    });
  }
}

// A few microseconds of dependent floating-point work that the compiler cannot fold away.
double task_work(Index task) {
  double x = 1.0 + 1e-9 * double(task);
  for (int i = 0; i < 4000; ++i) x = x * 0.999999 + 1e-7;
  return x;
}

void BM_work(benchmark::State& state, bool pool) {
  const int threads = static_cast<int>(state.range(0));
  constexpr Index kTasks = 64;
  double out[kTasks];
  for (auto _ : state) {
    run_tasks(pool, kTasks, threads, [&](Index first, Index step) {
      for (Index t = first; t < kTasks; t += step) out[t] = task_work(t);
    });
    benchmark::DoNotOptimize(out);
  }
}

void register_all() {
  const struct {
    const char* name;
    void (*fn)(benchmark::State&, bool);
  } loads[] = {{"empty", BM_empty}, {"handoff", BM_handoff}, {"work", BM_work}};
  for (const auto& load : loads) {
    for (const bool pool : {true, false}) {
      const std::string name = std::string("parallel/") + load.name + (pool ? "/pool" : "/new_threads");
      benchmark::RegisterBenchmark(name.c_str(), load.fn, pool)
          ->ArgName("threads")
          ->Arg(1)
          ->Arg(2)
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime()  // wall-clock time: the other threads' time is the point
          ->MinTime(0.3);
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return attn_bench::run(argc, argv, register_all); }
