// attn/detail/scratch.hpp - per-call scratch memory that is allocated once per thread and reused.
//
//   detail::Scratch<float> s(n);   // s.data(): n floats, valid until s goes out of scope
//   detail::NoEigenMalloc guard;    // from here to the end of scope Eigen may not allocate
//                                   // (checked in builds with EIGEN_RUNTIME_NO_MALLOC)
//
// MultiHeadAttention's intermediates (the q/k/v projections, the heads' outputs) are megabytes at
// real shapes. Allocated fresh on every call they come from mmap above glibc's 32 MiB threshold
// and are page-faulted in again each time; here they are a grow-only buffer that is reused.
//
// Thread-safety: the buffer is thread_local, not a member of the module. forward() is const and
// may run on one module from several threads at once; each calling thread gets its own buffer, so
// there is nothing to lock and nothing to race on. (The pool's workers write into their caller's
// buffer only during the caller's parallel_tasks call, which returns before the buffer is freed.)
//
// Memory kept: per thread that has called, and per scalar type, the largest size it asked for,
// until the thread exits. MultiHeadAttention self-attention asks for 4 * B*L * E scalars (packed
// q, k, v and the heads' outputs): 64 MiB for B*L = 4096, E = 1024 in float.
//
// Re-entrant: a Scratch made while another on the same thread holds the buffer allocates its own
// memory instead of sharing it.
#pragma once

#include "attn/types.hpp"

namespace attn::detail {

template <class T>
class Scratch {
 public:
  explicit Scratch(Index n) {
    Slot& s = slot();
    if (s.busy) {
      own_.resize(n);
      data_ = own_.data();
      return;
    }
    if (s.buffer.size() < n) s.buffer.resize(n);  // grow-only; the old contents are not kept
    s.busy = true;
    shared_ = true;
    data_ = s.buffer.data();
  }
  ~Scratch() {
    if (shared_) slot().busy = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  T* data() const { return data_; }

  // The scalars this thread's buffer holds now (for tests).
  static Index kept() { return slot().buffer.size(); }

 private:
  struct Slot {
    Vector<T> buffer;
    bool busy = false;
  };
  static Slot& slot() {
    thread_local Slot s;
    return s;
  }

  T* data_ = nullptr;
  bool shared_ = false;
  Vector<T> own_;
};

// While alive, Eigen may not allocate (in builds that define EIGEN_RUNTIME_NO_MALLOC, where Eigen
// asserts on any heap allocation of its own; elsewhere this is nothing). The flag is Eigen's one
// process-wide switch, so it is set by the calling thread around the whole threaded section.
struct NoEigenMalloc {
#ifdef EIGEN_RUNTIME_NO_MALLOC
  bool was_allowed = Eigen::internal::is_malloc_allowed();
  NoEigenMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoEigenMalloc() { Eigen::internal::set_is_malloc_allowed(was_allowed); }
  NoEigenMalloc(const NoEigenMalloc&) = delete;
  NoEigenMalloc& operator=(const NoEigenMalloc&) = delete;
#endif
};

}  // namespace attn::detail
