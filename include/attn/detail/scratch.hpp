// attn/detail/scratch.hpp - per-call scratch memory that is allocated once per thread and reused.
//
//   detail::Scratch<float> s(n);   // s.data(): n floats, valid until s goes out of scope
//
// MultiHeadAttention's intermediates (the q/k/v projections, the heads' outputs) are megabytes at
// real shapes. Allocated fresh on every call they come from mmap above glibc's 32 MiB threshold
// and are page-faulted in again each time; here they are a grow-only buffer that is reused.
//
// Thread-safety: the buffer is thread_local, not a member of the module. forward() is const and
// may run on one module from several threads at once; each calling thread gets its own buffer, so
// there is nothing to lock and nothing to race on. (The worker threads of parallel_tasks write
// into their caller's buffer, which outlives them.)
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

}  // namespace attn::detail
