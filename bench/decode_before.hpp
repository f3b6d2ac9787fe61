// bench/decode_before.hpp - the decode kernel as it was before the grouped-query and KV-storage
// rewrite, for decode_bench to time beside the current one in the same run (its decode/f32/before
// rows, and their speedup_vs_before counter).
//
// This is attn's own include/attn/detail/attention_decode.hpp at commit
// 93eddd646f01c04abe9a942f2ceb315e2499b753 (last changed in 6d58b43), copied unchanged except for
// its namespace (attn_bench::before instead of attn::detail, so both kernels link into one
// program) and this paragraph. It reads fp32 K and V in place only (no KVStorage), and under
// grouped-query attention it reads each kv head once per query head: a task is (b, h, chunk), not
// (b, kv head, chunk). Its original comment follows.
//
// (attn/detail/attention_decode.hpp) a few queries against many keys: the decoding step.
//
// One new token attends to the whole KV cache. Its work is 4*S*d FLOPs per head for 2*S*d
// scalars of K and V read once: memory-bound, with nothing to reuse, so the flash kernel's
// packing of each key block (paid back over 192 query rows) only costs here. This kernel reads
// K and V in place, each exactly once, and splits the keys - not just the heads - over the
// threads:
//
//   task (b, h, chunk c) over keys [c*C, (c+1)*C), all L <= 4 query rows of the head together:
//     s = q K_c^T * scale, masked                      score_keys: each key row read once
//     m_c = max s,  l_c = sum exp(s - m_c),  o_c = exp(s - m_c) V_c     pv_keys: each value row once
//   merge, chunks in order:   m = max m_c,  out = sum o_c e^(m_c - m) / sum l_c e^(m_c - m)
//
// The merge is the online softmax's rescaling, applied once per chunk instead of once per key
// block, so a task needs no rescaling of its own: its scores ([L, C], at most 8 KiB in float)
// stay in L1 between the pass over K and the pass over V. The L query rows of a head share the
// two passes (each row's keys outside its own causal or window range get weight 0), so K and V
// are read once per chunk whatever L is.
//
// Speed is how fast K and V stream from memory, and that depends on the order of the loads: both
// passes walk K and V strictly forward, each row front to back, the pattern hardware prefetchers
// follow at full rate. (Eigen's GEMV for K q, the kernel before this one, reads 4 rows side by
// side a packet at a time; on the Zen 4 bench machine that streamed K at half the rate of a plain
// sum, and the decode step at ~0.5 of the stream bandwidth. Software prefetching on top of the
// forward walk measured slower, so there is none.)
//
// The chunk size C is fixed and the merge runs in chunk order, so the result does not depend on
// the thread count. A chunk that masking leaves empty has m_c = -inf and takes no part; a row with
// every key masked is 0, as in the other kernels; a row with a NaN logit is NaN, as in the
// reference (a chunk whose every attended logit is NaN has m_c = -inf and l_c = NaN).
#pragma once

#include "attn/detail/eigen.hpp"
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attn/detail/attention_flash.hpp"  // unpadded_end
#include "attn/detail/attention_problem.hpp"
#include "attn/detail/microkernel.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/scratch.hpp"

namespace attn_bench::before {

// The old kernel's helpers (AttentionProblem, mk::, parallel_tasks, mask_row, ...) are attn's
// current ones: they did not change.
using namespace attn::detail;
using attn::Index;
using attn::Vector;

// Problems with at most this many queries per (batch, head) go to attention_decode.
inline constexpr Index kDecodeRows = 4;
// Keys per task: 512 keys x 128 dims of K and V are 512 KiB in float, a thread's worth of
// streaming (~20 us), and S = 4096 at 32 heads is 256 tasks. (Chunks of 256 to 2048 keys stream
// at the same rate.)
inline constexpr Index kDecodeChunk = 512;
// Keys per step of the P.V pass: the value rows one row tile has read (8 KiB at dv = 128) are
// still in L1 for the next row tile.
inline constexpr Index kDecodeKeyBlock = 16;

namespace decode {

namespace ei = Eigen::internal;

// s[r * ss + j] = scale * (q_r . k_j) for MR query rows (row stride qs) and keys j in [0, n)
// (rows of k, row stride ks). Each key row is loaded once, front to back, and feeds all MR query
// rows. Two accumulators per query row halve the FMA dependency chain; the horizontal sums cost
// a few instructions per key, less than the key's bytes take to arrive (and less, measured, than
// summing 16 keys' accumulators at once through a transpose).
template <int MR, class T>
EIGEN_STRONG_INLINE void score_keys(const T* q, Index qs, const T* k, Index ks, Index n, Index d, T scale, T* s,
                                    Index ss) {
  using P = mk::Packet<T>;
  constexpr Index L = mk::kLanes<T>;
  for (Index j = 0; j < n; ++j) {
    const T* const kj = k + j * ks;
    P acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = ei::pzero(P{});
    Index t = 0;
    for (; t + 2 * L <= d; t += 2 * L) {
      const P x0 = ei::ploadu<P>(kj + t), x1 = ei::ploadu<P>(kj + t + L);
      for (int r = 0; r < MR; ++r) {
        acc0[r] = ei::pmadd(ei::ploadu<P>(q + r * qs + t), x0, acc0[r]);
        acc1[r] = ei::pmadd(ei::ploadu<P>(q + r * qs + t + L), x1, acc1[r]);
      }
    }
    if (t + L <= d) {
      const P x0 = ei::ploadu<P>(kj + t);
      for (int r = 0; r < MR; ++r) acc0[r] = ei::pmadd(ei::ploadu<P>(q + r * qs + t), x0, acc0[r]);
      t += L;
    }
    for (int r = 0; r < MR; ++r) {
      T dot = ei::predux(ei::padd(acc0[r], acc1[r]));
      for (Index u = t; u < d; ++u) dot += q[r * qs + u] * kj[u];  // the columns that fill no packet
      s[r * ss + j] = scale * dot;
    }
  }
}

// O[MR, W packets] += P[MR, n] V[n, W packets]: probabilities p (row stride ps), values v read in
// place (row stride vs), the output o (row stride os) held in registers over the n keys.
template <int MR, int W, class T>
EIGEN_STRONG_INLINE void pv_tile(const T* p, Index ps, const T* v, Index vs, Index n, T* o, Index os) {
  using P = mk::Packet<T>;
  constexpr Index L = mk::kLanes<T>;
  P acc[MR][W];
  for (int r = 0; r < MR; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = ei::ploadu<P>(o + r * os + w * L);
  for (Index j = 0; j < n; ++j) {
    P a[MR];
    for (int r = 0; r < MR; ++r) a[r] = ei::pset1<P>(p[r * ps + j]);
    for (int w = 0; w < W; ++w) {
      const P x = ei::ploadu<P>(v + j * vs + w * L);
      for (int r = 0; r < MR; ++r) acc[r][w] = ei::pmadd(a[r], x, acc[r][w]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int w = 0; w < W; ++w) ei::pstoreu(o + r * os + w * L, acc[r][w]);
}

// P.V register tiles: kPvRows query rows x kPvPackets packets of accumulators, 24 of 32 vector
// registers (AVX-512, NEON) or 8 of 16 (SSE, AVX2). Wide rather than tall: a tile narrower than the
// value row reads each row in pieces, and the pieces of successive rows interleaved streamed V
// slower (at 4 rows x 2 packets, half the rate on AVX2); so several query rows take several tiles
// over the same keys, the later ones reading V from L1.
inline constexpr int kPvRows = mk::kWideRegisters ? 3 : 1;
inline constexpr int kPvPackets = 8;

// O[rows, dv] += P[rows, n] V[n, dv] for a few keys n (at most kDecodeKeyBlock): row tiles of
// kPvRows, each over tiles of kPvPackets packets of columns, then 4, 2 and 1 packets, then the
// columns that fill no packet. Row stride of o: os; of p: ps.
template <class T>
EIGEN_STRONG_INLINE void pv_keys(Index rows, const T* p, Index ps, const T* v, Index vs, Index n, Index dv, T* o,
                                 Index os) {
  constexpr Index L = mk::kLanes<T>;
  const auto row_tile = [&](Index r0, auto tile_rows) {
    constexpr int MR = decltype(tile_rows)::value;
    const T* const pr = p + r0 * ps;
    T* const orow = o + r0 * os;
    Index c = 0;
    for (; c + kPvPackets * L <= dv; c += kPvPackets * L) pv_tile<MR, kPvPackets>(pr, ps, v + c, vs, n, orow + c, os);
    if (c + 4 * L <= dv) pv_tile<MR, 4>(pr, ps, v + c, vs, n, orow + c, os), c += 4 * L;
    if (c + 2 * L <= dv) pv_tile<MR, 2>(pr, ps, v + c, vs, n, orow + c, os), c += 2 * L;
    if (c + L <= dv) pv_tile<MR, 1>(pr, ps, v + c, vs, n, orow + c, os), c += L;
    for (; c < dv; ++c)
      for (int r = 0; r < MR; ++r) {
        T acc = orow[r * os + c];
        for (Index j = 0; j < n; ++j) acc += pr[r * ps + j] * v[j * vs + c];
        orow[r * os + c] = acc;
      }
  };
  if constexpr (kPvRows == 1) {  // (for_row_tiles<1> has no remainder tiles, and g++ warns of that)
    for (Index r0 = 0; r0 < rows; ++r0) row_tile(r0, std::integral_constant<int, 1>{});
  } else {
    mk::for_row_tiles<kPvRows>(rows, row_tile);
  }
}

}  // namespace decode

template <class T>
void attention_decode(const AttentionProblem<T>& p, Index chunk = kDecodeChunk, int threads = 0) {
  ATTN_ASSERT(!p.weights && p.L <= kDecodeRows && chunk > 0);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Index chunks = std::max<Index>(1, (p.S + chunk - 1) / chunk);
  const Index tasks = p.batch * p.heads * chunks;
  if (p.batch * p.heads * p.L == 0) return;
  const bool elementwise = p.mask || p.bias || p.key_padding || p.alibi_slopes || p.softcap > T(0);

  // Each task's partials (m, l, o[dv]) of its L query rows, written by the task and merged after
  // all tasks end; and each thread's [L, chunk] scores. One allocation, before the threads start.
  const Index part = 2 + p.dv;  // m, l, o
  // Threads by bytes streamed (K and V once per head: the query rows share the reads):
  // threads_for's 8 MFLOP a thread is ~80 us of FMAs, and a thread streams about 1 MB in that
  // time, so a byte counts as 8 FLOPs.
  const double bytes = double(p.batch * p.heads) * double(p.S) * double(p.d + p.dv) * sizeof(T);
  const int n_threads = static_cast<int>(std::min<Index>(threads > 0 ? threads : threads_for(8.0 * bytes, 0), tasks));
  Eigen::Matrix<T, Eigen::Dynamic, 1> arena(tasks * p.L * part + Index(n_threads) * p.L * chunk);
  T* const partials = arena.data();

  [[maybe_unused]] const NoEigenMalloc no_malloc;
  parallel_tasks(tasks, n_threads, [&](Index first, Index step) {
    T* const s = partials + tasks * p.L * part + first * p.L * chunk;  // row i at s + i * chunk
    for (Index task = first; task < tasks; task += step) {
      const Index b = task / (p.heads * chunks), h = (task / chunks) % p.heads, c = task % chunks;
      const Index kh = kv_head(p, h), padded_end = unpadded_end(p, b);
      T* const out = partials + task * p.L * part;  // row i's m, l, o at out + i * part
      std::fill(out, out + p.L * part, T(0));
      // The keys [lo_i, hi_i) of this chunk that causal masking, the window and padding leave to
      // row i (keys past mask_keys are always attended), and their union [first_key, end_key):
      // the one range of K and V the task reads for all its rows.
      Index lo[kDecodeRows], hi[kDecodeRows];
      Index first_key = std::min(p.S, (c + 1) * chunk), end_key = c * chunk;
      for (Index i = 0; i < p.L; ++i) {
        const KeyRange r = positional_keys(p, i);
        lo[i] = c * chunk, hi[i] = std::min(p.S, lo[i] + chunk);
        if (hi[i] <= p.mask_keys) {
          lo[i] = std::max(lo[i], r.begin);
          hi[i] = std::min({hi[i], r.end, padded_end});
        } else if (lo[i] < p.mask_keys) {  // the chunk holds MHA's extra keys: mask_row decides
          lo[i] = std::max(lo[i], r.begin);
        }
        if (lo[i] < hi[i]) first_key = std::min(first_key, lo[i]), end_key = std::max(end_key, hi[i]);
      }
      if (end_key <= first_key) {  // nothing attended: every row's partial is empty
        for (Index i = 0; i < p.L; ++i) out[i * part] = kNegInf;
        continue;
      }
      const Index n = end_key - first_key;
      const T* const k = p.k.row(b, kh, first_key);
      const T* const v = p.v.row(b, kh, first_key);
      // The scores need L as a compile-time row count (score_keys' registers); nothing after does,
      // so only score_keys is instantiated once per L, not the whole step.
      mk::for_row_tiles<kDecodeRows>(p.L, [&](Index, auto rows) {
        decode::score_keys<decltype(rows)::value>(p.q.row(b, h, 0), p.q.row_stride, k, p.k.row_stride, n, p.d, p.scale,
                                                  s, chunk);
      });
      // Row i's probabilities over the union: exp(s - m_i) on its own keys, 0 on the others
      // (masked keys come out exactly 0 from exp_sum_row).
      for (Index i = 0; i < p.L; ++i) {
        T* const si = s + i * chunk;
        T* const o = out + i * part;
        const Index ni = std::max<Index>(0, hi[i] - lo[i]);
        T* const row = ni > 0 ? si + (lo[i] - first_key) : si;
        const bool masked = elementwise || hi[i] > p.mask_keys;
        const T m = ni == 0 ? kNegInf : masked ? mask_row(p, b, h, i, lo[i], row, ni) : mk::max_of(row, ni);
        if (m == kNegInf) {  // an empty partial: it takes no part in the merge
          o[0] = kNegInf;
          // The row max skips NaN logits: a row whose attended logits are all NaN lands here too,
          // and its l = NaN makes the merged row NaN.
          if (ni > 0 && Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(row, ni).isNaN().any())
            o[1] = std::numeric_limits<T>::quiet_NaN();
          std::fill(si, si + n, T(0));
          continue;
        }
        o[0] = m;
        o[1] = mk::exp_sum_row(row, ni, m, masked);
        std::fill(si, row, T(0));
        std::fill(row + ni, si + n, T(0));
      }
      for (Index j = 0; j < n; j += kDecodeKeyBlock)
        decode::pv_keys(p.L, s + j, chunk, v + j * p.v.row_stride, p.v.row_stride, std::min(kDecodeKeyBlock, n - j),
                        p.dv, out + 2, part);
    }
  });

  // Merge each row's chunks in chunk order: the same sums in the same order on any thread count.
  for (Index bh = 0; bh < p.batch * p.heads; ++bh) {
    const Index b = bh / p.heads, h = bh % p.heads;
    for (Index i = 0; i < p.L; ++i) {
      const auto part_of = [&](Index c) { return partials + ((bh * chunks + c) * p.L + i) * part; };
      T m = kNegInf;
      bool nan = false;  // a NaN logit in any chunk (l_c = NaN) makes the row NaN, as in the reference
      for (Index c = 0; c < chunks; ++c) m = std::max(m, part_of(c)[0]), nan = nan || std::isnan(part_of(c)[1]);
      Eigen::Map<Vector<T>> o(p.out.row(b, h, i), p.dv);
      if (nan) {
        o.setConstant(std::numeric_limits<T>::quiet_NaN());
        continue;
      }
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

}  // namespace attn_bench::before
