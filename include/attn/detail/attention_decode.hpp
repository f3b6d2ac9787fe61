// attn/detail/attention_decode.hpp - a few queries against many keys: the decoding step.
//
// One new token attends to the whole KV cache. Its work is 4*S*d FLOPs per head for 2*S*d
// scalars of K and V read once: memory-bound, with nothing to reuse, so the flash kernel's
// packing of each key block (paid back over 192 query rows) only costs here. This kernel reads
// K and V in place, row by row, and splits the keys - not just the heads - over the threads:
//
//   task (b, h, chunk c) over keys [c*C, (c+1)*C):   s = q K_c^T * scale, masked
//                                                    m_c = max s,  l_c = sum exp(s - m_c),
//                                                    o_c = exp(s - m_c) V_c
//   merge, chunks in order:   m = max m_c,  out = sum o_c e^(m_c - m) / sum l_c e^(m_c - m)
//
// The chunk size C is fixed and the merge runs in chunk order, so the result does not depend on
// the thread count. A chunk that masking leaves empty has m_c = -inf and takes no part; a row with
// every key masked is 0, as in the other kernels.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "attn/detail/attention_problem.hpp"
#include "attn/detail/microkernel.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/scratch.hpp"

namespace attn::detail {

// Problems with at most this many queries per (batch, head) go to attention_decode.
inline constexpr Index kDecodeRows = 4;
// Keys per task: 512 keys x 128 dims of K and V are 512 KiB in float, a thread's worth of
// streaming (~20 us), and S = 4096 at 32 heads is 256 tasks.
inline constexpr Index kDecodeChunk = 512;

template <class T>
void attention_decode(const AttentionProblem<T>& p, Index chunk = kDecodeChunk, int threads = 0) {
  ATTN_ASSERT(!p.weights && p.L <= kDecodeRows && chunk > 0);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Index chunks = std::max<Index>(1, (p.S + chunk - 1) / chunk);
  const Index tasks = p.batch * p.heads * chunks;
  if (p.batch * p.heads * p.L == 0) return;
  const bool elementwise = p.mask || p.bias || p.key_padding || p.alibi_slopes || p.softcap > T(0);

  // Each task's partial (m, l, o[dv]) per query row, written by its task and merged after all
  // tasks end; and each thread's score row. One allocation, before the threads start.
  const Index part = 2 + p.dv;  // m, l, o
  // Threads by bytes streamed: threads_for's 8 MFLOP a thread is ~80 us of FMAs, and a thread
  // streams about 1 MB in that time, so a byte counts as 8 FLOPs.
  const double bytes = double(p.batch * p.heads) * double(p.L) * double(p.S) * double(p.d + p.dv) * sizeof(T);
  const int n_threads = static_cast<int>(std::min<Index>(threads > 0 ? threads : threads_for(8.0 * bytes, 0), tasks));
  Eigen::Matrix<T, Eigen::Dynamic, 1> arena(tasks * p.L * part + Index(n_threads) * chunk);
  T* const partials = arena.data();

  [[maybe_unused]] const NoEigenMalloc no_malloc;
  parallel_tasks(tasks, n_threads, [&](Index first, Index step) {
    T* const s = partials + tasks * p.L * part + first * chunk;
    for (Index task = first; task < tasks; task += step) {
      const Index b = task / (p.heads * chunks), h = (task / chunks) % p.heads, c = task % chunks;
      const Index kh = kv_head(p, h), padded_end = unpadded_end(p, b);
      for (Index i = 0; i < p.L; ++i) {
        T* const out = partials + (task * p.L + i) * part;  // m, l, o
        // The keys of this chunk that causal masking, the window and padding leave to row i
        // (keys past mask_keys are always attended).
        const KeyRange r = positional_keys(p, i);
        Index lo = c * chunk, hi = std::min(p.S, lo + chunk);
        if (hi <= p.mask_keys) {
          lo = std::max(lo, r.begin);
          hi = std::min({hi, r.end, padded_end});
        } else if (lo < p.mask_keys) {  // the chunk holds MHA's extra keys: mask_row decides
          lo = std::max(lo, r.begin);
        }
        const auto no_keys = [&] {  // an empty partial: it takes no part in the merge
          out[0] = kNegInf, out[1] = T(0);
          std::fill(out + 2, out + part, T(0));
        };
        if (hi <= lo) {
          no_keys();
          continue;
        }
        const Index n = hi - lo;
        const StridedMap<T> K(p.k.row(b, kh, lo), n, p.d, Eigen::OuterStride<>(p.k.row_stride));
        const StridedMap<T> V(p.v.row(b, kh, lo), n, p.dv, Eigen::OuterStride<>(p.v.row_stride));
        const Eigen::Map<const Vector<T>> q(p.q.row(b, h, i), p.d);
        Eigen::Map<Vector<T>> scores(s, n);
        scores.noalias() = K * q;
        scores *= p.scale;
        const bool masked = elementwise || hi > p.mask_keys;
        const T m = masked ? mask_row(p, b, h, i, lo, s, n) : mk::max_of(s, n);
        if (m == kNegInf) {
          no_keys();
          continue;
        }
        out[0] = m;
        out[1] = mk::exp_sum_row(s, n, m, masked);
        Eigen::Map<Vector<T>>(out + 2, p.dv).noalias() = V.transpose() * scores;
      }
    }
  });

  // Merge each row's chunks in chunk order: the same sums in the same order on any thread count.
  for (Index bh = 0; bh < p.batch * p.heads; ++bh) {
    const Index b = bh / p.heads, h = bh % p.heads;
    for (Index i = 0; i < p.L; ++i) {
      const auto part_of = [&](Index c) { return partials + ((bh * chunks + c) * p.L + i) * part; };
      T m = kNegInf;
      for (Index c = 0; c < chunks; ++c) m = std::max(m, part_of(c)[0]);
      Eigen::Map<Vector<T>> o(p.out.row(b, h, i), p.dv);
      o.setZero();
      if (m == kNegInf) continue;  // every key masked: zeros, as the reference
      T l = 0;
      for (Index c = 0; c < chunks; ++c) {
        const T* pc = part_of(c);
        if (pc[0] == kNegInf) continue;
        const T alpha = std::exp(pc[0] - m);
        l += alpha * pc[1];
        o += alpha * Eigen::Map<const Vector<T>>(pc + 2, p.dv);
      }
      o /= l;
    }
  }
}

}  // namespace attn::detail
