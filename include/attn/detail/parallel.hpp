// attn/detail/parallel.hpp - run independent tasks on several threads, on a persistent pool.
//
//   detail::parallel_tasks(tasks, threads, [&](Index first, Index step) {
//     for (Index t = first; t < tasks; t += step) run_task(t);
//   });
//
// The pool: one per process (a function-local static, so one across translation units), made on
// first use. Its workers are std::threads started lazily, as many as the largest thread count
// asked for so far minus one (the caller is worker 0), and they sleep on a condition variable
// between calls: handing a call to a sleeping worker costs a futex wake-up (a few microseconds)
// where starting a thread cost tens. A worker still asleep when the caller has finished its own
// share loses its share to the caller, so a call never waits for a worker that has not started
// (cores busy elsewhere). There is no spinning: on a machine whose cores are all busy a spinning
// worker steals the time of the thread it waits for.
//
// One call at a time: the pool holds one job. A call made while another thread's job holds it
// starts threads of its own for the call, as every call did before there was a pool (so a
// concurrent caller is never slower than that); a call made from inside a task (nested) runs on
// the calling thread alone, since the pool's threads are already busy with the outer call.
//
// Exceptions: the first exception a worker throws is rethrown on the calling thread once every
// worker of the call has finished (the workers' arguments live on the caller's stack).
//
// Process exit: a static object's destructor stops and joins the workers. fork(): the child
// inherits the pool's memory but none of its threads; a pthread_atfork handler marks the pool
// unusable in the child, whose calls then start threads of their own, and whose exit leaves the
// pool (and its possibly-locked mutex) alone. Windows: do not use attn from a DLL's static
// destructors (joining threads under the loader lock deadlocks).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "attn/threads.hpp"
#include "attn/types.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define ATTN_DETAIL_HAS_FORK 1
#endif

namespace attn::detail {

// The threads worth using for `flops` of work: each must get at least ~8 MFLOP (0.1 ms at this
// library's rates), against a few microseconds to wake a pool worker and the imbalance of
// splitting a small problem. `requested` 0 means attn::num_threads().
inline int threads_for(double flops, int requested) {
  const int wanted = requested > 0 ? requested : num_threads();
  const double worth = flops / 8e6;
  return worth < 2 ? 1 : static_cast<int>(std::min<double>(wanted, worth));
}

// True while this thread runs a parallel_tasks worker (a pool worker, always): a parallel_tasks
// called there runs serially.
inline bool& inside_parallel_tasks() {
  thread_local bool inside = false;
  return inside;
}

// Sets inside_parallel_tasks() for a scope, and restores it after.
class InsideParallelTasks {
 public:
  InsideParallelTasks() : was_(std::exchange(inside_parallel_tasks(), true)) {}
  ~InsideParallelTasks() { inside_parallel_tasks() = was_; }
  InsideParallelTasks(const InsideParallelTasks&) = delete;
  InsideParallelTasks& operator=(const InsideParallelTasks&) = delete;

 private:
  bool was_;
};

// One call of parallel_tasks, type-erased: run(worker, first, step) calls the caller's worker.
struct ParallelJob {
  void (*run)(const void* worker, Index first, Index step);
  const void* worker;
  Index step;  // the call's thread count: slots first = 0 .. step-1, each run exactly once
};

// Set in a fork()ed child: the pool's threads exist only in the parent.
inline std::atomic<bool>& forked_child() {
  static std::atomic<bool> forked{false};
  return forked;
}

// The pool. Every field below is guarded by `mutex`. A job is `slots` slots; slot 0 belongs to the
// caller, the rest go to whichever thread claims them first (`next`): a pool worker, or the caller
// once its own slot is done, so that a worker that is slow to wake (cores busy elsewhere) costs
// at most the time the caller would have needed anyway. `unfinished` counts slots not yet done;
// the caller returns when it reaches 0, and no thread touches the job after its own decrement.
class ThreadPool {
 public:
  // The process's pool. It is never deleted: a forked child must not destroy the parent's
  // mutex and condition variables (glibc's pthread_cond_destroy waits for the parent's sleeping
  // workers, forever). A separate static stops and joins the workers at exit.
  static ThreadPool& instance() {
    static ThreadPool* const pool = [] {
#ifdef ATTN_DETAIL_HAS_FORK
      pthread_atfork(nullptr, nullptr, [] { forked_child().store(true, std::memory_order_relaxed); });
#endif
      return new ThreadPool;
    }();
    static const Reaper reaper{pool};
    return *pool;
  }

  // Runs job's slots on the calling thread (slot 0) and on pool workers, and returns true once
  // all are done (rethrowing the first exception one threw); or returns false at once, having run
  // nothing, when the pool holds another caller's job or cannot be used (forked child, exit).
  bool try_run(const ParallelJob& job) {
    if (forked_child().load(std::memory_order_relaxed)) return false;
    std::unique_lock<std::mutex> lock(mutex_);
    if (busy_ || stop_) return false;
    busy_ = true;
    grow(job.step - 1);
    job_ = job;
    slots_ = job.step;
    next_ = 1;
    unfinished_ = job.step;
    error_ = nullptr;
    const std::size_t wake = std::min<std::size_t>(static_cast<std::size_t>(job.step - 1), workers_.size());
    const bool all = wake == workers_.size();
    lock.unlock();
    if (all) {
      wake_.notify_all();
    } else {
      for (std::size_t i = 0; i < wake; ++i) wake_.notify_one();
    }

    finish(execute(job, 0), lock);
    while (next_ < slots_) claim_and_run(lock);  // slots no worker has claimed yet
    done_.wait(lock, [this] { return unfinished_ == 0; });
    busy_ = false;
    const std::exception_ptr error = std::exchange(error_, nullptr);
    lock.unlock();
    if (error) std::rethrow_exception(error);
    return true;
  }

  // Pool threads now running (for tests).
  std::size_t workers() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return workers_.size();
  }

 private:
  ThreadPool() = default;

  // Stops and joins the workers at static destruction; in a forked child it leaves everything
  // alone (no threads to join, and the mutex may have been copied locked).
  struct Reaper {
    explicit Reaper(ThreadPool* p) : pool(p) {}
    Reaper(const Reaper&) = delete;  // one per process: a copy would stop and join the workers twice
    Reaper& operator=(const Reaper&) = delete;
    ThreadPool* pool;
    ~Reaper() {
      if (forked_child().load(std::memory_order_relaxed)) return;
      std::vector<std::thread> running;
      {
        const std::lock_guard<std::mutex> lock(pool->mutex_);
        pool->stop_ = true;  // later calls start threads of their own
        running.swap(pool->workers_);
      }
      pool->wake_.notify_all();
      for (std::thread& t : running) {
        if (t.get_id() == std::this_thread::get_id()) {
          t.detach();  // exit() called from a task: a thread cannot join itself
        } else {
          t.join();
        }
      }
    }
  };

  // Starts workers until there are `n` (mutex_ held). If the system refuses a thread, the pool
  // keeps the ones it has: unclaimed slots are run by the caller.
  void grow(Index n) {
    try {
      while (static_cast<Index>(workers_.size()) < n) workers_.emplace_back([this] { work(); });
    } catch (...) {  // std::system_error (no more threads) or std::bad_alloc
    }
  }

  // Runs slot `slot` of `job` (without the lock) and returns what it threw.
  static std::exception_ptr execute(const ParallelJob& job, Index slot) {
    const InsideParallelTasks inside;
    try {
      job.run(job.worker, slot, job.step);
    } catch (...) {
      return std::current_exception();
    }
    return nullptr;
  }

  // Claims the next slot of the current job (lock held), runs it unlocked, and counts it done.
  void claim_and_run(std::unique_lock<std::mutex>& lock) {
    const ParallelJob job = job_;
    const Index slot = next_++;
    lock.unlock();
    finish(execute(job, slot), lock);
  }

  // Counts a slot done (locking `lock` if needed; it is held on return) and keeps the first error.
  void finish(const std::exception_ptr& error, std::unique_lock<std::mutex>& lock) {
    if (!lock.owns_lock()) lock.lock();
    if (error && !error_) error_ = error;
    if (--unfinished_ == 0) done_.notify_one();
  }

  // A worker: sleeps until a job has an unclaimed slot, claims and runs it; exits on stop once
  // nothing is left to claim.
  void work() {
    inside_parallel_tasks() = true;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stop_ || next_ < slots_; });
      if (next_ >= slots_) return;
      claim_and_run(lock);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;  // workers wait here for a job
  std::condition_variable done_;  // the caller waits here for unfinished_ == 0
  std::vector<std::thread> workers_;
  ParallelJob job_{};
  Index slots_ = 0, next_ = 0, unfinished_ = 0;
  std::exception_ptr error_;
  bool busy_ = false, stop_ = false;
};

// Runs worker(t, n) for t in [0, n) on n - 1 fresh threads and the calling thread (slot 0), and
// rethrows the first exception one threw after joining them all: parallel_tasks' fallback when
// the pool is taken. Slots whose thread could not be started run on the calling thread.
template <class Worker>
void parallel_tasks_on_new_threads(Index n, Worker& worker) {
  std::mutex mutex;
  std::exception_ptr first_error;
  const auto run = [&](Index t) {
    const InsideParallelTasks inside;
    try {
      worker(t, n);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex);
      if (!first_error) first_error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  try {
    threads.reserve(static_cast<std::size_t>(n - 1));
    for (Index t = 1; t < n; ++t) threads.emplace_back(run, t);
  } catch (...) {  // no more threads: the calling thread runs the rest
  }
  run(0);
  for (Index t = 1 + static_cast<Index>(threads.size()); t < n; ++t) run(t);
  for (std::thread& th : threads) th.join();
  if (first_error) std::rethrow_exception(first_error);
}

// Runs worker(first, step) on `threads` threads (0: attn::num_threads()), worker t taking tasks
// t, t + step, t + 2*step, ... of [0, tasks). Round-robin rather than contiguous ranges, so tasks
// whose cost grows along the range (causal query blocks) spread evenly. Which thread runs a task
// never changes what the task computes. The calling thread is worker 0; each worker t in
// [0, step) is called exactly once, on some thread (two may share one). A call from inside a
// worker runs serially: worker(0, 1). Thread-safe; the first exception a worker throws is
// rethrown here after all workers have finished.
template <class Worker>
void parallel_tasks(Index tasks, int threads, Worker&& worker) {
  if (threads <= 0) threads = num_threads();
  const Index n = std::min<Index>(threads, tasks);
  if (n <= 1 || inside_parallel_tasks()) {
    if (tasks > 0) worker(Index(0), Index(1));
    return;
  }
  using W = std::remove_reference_t<Worker>;
  const ParallelJob job{
      [](const void* w, Index first, Index step) { (*static_cast<W*>(const_cast<void*>(w)))(first, step); },
      std::addressof(worker), n};
  if (!ThreadPool::instance().try_run(job)) parallel_tasks_on_new_threads(n, worker);
}

}  // namespace attn::detail
