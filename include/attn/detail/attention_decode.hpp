// attn/detail/attention_decode.hpp - a few queries against many keys: the decoding step.
//
// One new token attends to the whole KV cache. Its work is 4*S*d FLOPs per head for 2*S*d
// scalars of K and V read once: memory-bound, with nothing to reuse, so the flash kernel's
// packing of each key block (paid back over 192 query rows) only costs here. This kernel reads
// K and V in place, each exactly once, and splits the keys - not just the heads - over the
// threads:
//
//   task (b, kv head g, chunk c) over keys [c*C, (c+1)*C), all R = G*L rows of the group together
//   (the G query heads that share kv head g, each with its L <= 4 query rows):
//     s = q K_c^T * scale, masked                      mk::dot_rows: each key row read once
//     m_c = max s,  l_c = sum exp(s - m_c),  o_c = exp(s - m_c) V_c     pv_keys: each value row once
//   merge, chunks in order:   m = max m_c,  out = sum o_c e^(m_c - m) / sum l_c e^(m_c - m)
//
// The merge is the online softmax's rescaling, applied once per chunk instead of once per key
// block, so a task needs no rescaling of its own: its scores ([R, C]) stay in cache between the
// pass over K and the pass over V. All R rows share the two passes, so K and V are read once per
// chunk whatever L and the group size are: grouped-query and multi-query attention read their
// (smaller) cache once, not once per query head. Within a chunk the scores go kDecodeKeyBlock keys
// at a time through every row tile, so the key rows the first tile brought from memory are in L1
// for the others; the P.V pass does the same with the value rows. (Each row's keys outside its own
// causal or window range get weight 0.)
//
// K and V in a compressed storage type (bf16, fp16, int8: attn/kv_storage.hpp) are converted in
// registers as they are loaded (load_as), never through a converted copy: the step reads the
// stored bytes, half or a quarter of float's. Int8 rows carry a scale: the key's multiplies its
// score (scale * s_j * q.k_j), the value's its probability (p_j * s_j) before P.V, one multiply
// per key each. The kernel is compiled once per storage element type from this one source.
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
#include <vector>

#include "attn/detail/attention_flash.hpp"  // unpadded_end
#include "attn/detail/attention_problem.hpp"
#include "attn/detail/dot_rows.hpp"
#include "attn/detail/microkernel.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/scratch.hpp"
#include "attn/detail/storage.hpp"

namespace attn::detail {

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


// O[MR, W packets] += P[MR, n] V[n, W packets]: probabilities p (row stride ps), values v in
// storage type S read in place (row stride vs) and converted in registers, the output o (row
// stride os) held in registers over the n keys.
template <int MR, int W, class T, class S>
EIGEN_STRONG_INLINE void pv_tile(const T* p, Index ps, const S* v, Index vs, Index n, T* o, Index os) {
  using P = mk::Packet<T>;
  constexpr Index L = mk::kLanes<T>;
  P acc[MR][W];
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTN_UNROLL
    for (int w = 0; w < W; ++w) acc[r][w] = ei::ploadu<P>(o + r * os + w * L);
  for (Index j = 0; j < n; ++j) {
    P a[MR];
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r) a[r] = ei::pset1<P>(p[r * ps + j]);
    ATTN_UNROLL
    for (int w = 0; w < W; ++w) {
      const P x = load_as<T>(v + j * vs + w * L);
      ATTN_UNROLL
      for (int r = 0; r < MR; ++r) acc[r][w] = ei::pmadd(a[r], x, acc[r][w]);
    }
  }
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTN_UNROLL
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
template <class T, class S>
EIGEN_STRONG_INLINE void pv_keys(Index rows, const T* p, Index ps, const S* v, Index vs, Index n, Index dv, T* o,
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
        // mk::fmadd, not `acc += p * v`: g++ fused that or not by how many keys a call took, so a
        // paged cache (runs cut at page ends) and bf16 storage of the same values gave other bits.
        for (Index j = 0; j < n; ++j) acc = mk::fmadd(pr[r * ps + j], to_compute<T>(v[j * vs + c]), acc);
        orow[r * os + c] = acc;
      }
  };
  if constexpr (kPvRows == 1) {  // (for_row_tiles<1> has no remainder tiles, and g++ warns of that)
    for (Index r0 = 0; r0 < rows; ++r0) row_tile(r0, std::integral_constant<int, 1>{});
  } else {
    mk::for_row_tiles<kPvRows>(rows, row_tile);
  }
}

// One problem's share of a decoding step: its tasks (b, kv head g, chunk c), which are the step's
// tasks [first_task, first_task + tasks), and its partials, at `partials` in the step's arena.
struct Plan {
  Index G = 1, Hk = 0, R = 0, chunks = 0, tasks = 0;
  Index first_task = 0, partials = 0;
};

template <class T>
Plan plan(const AttentionProblem<T>& p, Index chunk) {
  Plan s;
  s.G = p.kv_heads > 0 ? p.heads / p.kv_heads : 1;  // query heads per kv head
  s.Hk = p.heads / s.G;
  s.R = s.G * p.L;  // the rows of a task: the group's heads' queries, row r = (head g*G + r / L, query r % L)
  s.chunks = std::max<Index>(1, (p.S + chunk - 1) / chunk);
  s.tasks = p.batch * p.heads * p.L == 0 ? 0 : p.batch * s.Hk * s.chunks;
  return s;
}

// Task `task` of problem p (see the top of the file): its rows' partials (m, l, o) at
// partials + task * R * (2 + dv), its scores in s ([R, chunk], row stride chunk).
template <class S, class T>
void task(const AttentionProblem<T>& p, const Plan& plan, Index chunk, Index task, T* partials, T* s) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Index G = plan.G, Hk = plan.Hk, R = plan.R, chunks = plan.chunks;
  const bool elementwise = p.mask || p.bias || p.key_padding || p.alibi_slopes || p.softcap > T(0) || sinks_split(p);
  const Index part = 2 + p.dv;  // m, l, o
  const Index b = task / (Hk * chunks), g = (task / chunks) % Hk, c = task % chunks;
  const Index padded_end = unpadded_end(p, b);
  T* const out = partials + task * R * part;  // row r's m, l, o at out + r * part
  std::fill(out, out + R * part, T(0));
  // The keys [lo_i, hi_i) of this chunk that causal masking, the window and padding leave to
  // query i (the same for every head: keys past mask_keys are always attended), and their
  // union [first_key, end_key): the one range of K and V the task reads for all its rows.
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
    for (Index r = 0; r < R; ++r) out[r * part] = kNegInf;
    return;
  }
  const Index n = end_key - first_key;
  // Keys [first_key + j, ..): K, V and int8 scales are read in place, a run of keys that follow
  // each other in memory at a time (the whole range, or a page's part of it when paged).
  const auto k_at = [&](Index j) { return stored_row<S>(p, false, b, g, first_key + j); };
  const auto v_at = [&](Index j) { return stored_row<S>(p, true, b, g, first_key + j); };
  const auto scales_at = [&](const Strided<const T>& scales, Index j) -> const T* {
    if (!scales) return nullptr;
    if (!p.page_table) return scales.row(b, g, first_key + j);
    const Index key = first_key + j;
    return scales.data + p.page_table[key / p.page_size] * p.scale_page_stride + g * scales.head_stride +
           (key % p.page_size) * scales.row_stride;
  };
  // Scores of all R rows, kDecodeKeyBlock keys at a time so that a block of K read from memory
  // by the first row tile is in L1 for the others: the group reads K once. Only dot_rows
  // takes the tile's row count at compile time (its registers); nothing after does.
  // (With one row tile, R <= kDecodeRows, the blocks are not needed: the whole range at once.)
  const Index score_block = R <= kDecodeRows ? n : kDecodeKeyBlock;
  for (Index j = 0, nj = 0; j < n; j += nj) {
    nj = contiguous_keys(p, first_key + j, std::min(score_block, n - j));
    const S* const k = k_at(j);
    const T* const k_scale = scales_at(p.k_scale, j);
    mk::for_row_tiles<kDecodeRows>(R, [&](Index r0, auto rows) {
      constexpr int MR = decltype(rows)::value;
      const T* q[MR];
      for (int r = 0; r < MR; ++r) q[r] = p.q.row(b, g * G + (r0 + r) / p.L, (r0 + r) % p.L);
      mk::dot_rows<MR>(q, k, p.k.row_stride, k_scale, nj, p.d, p.scale, s + r0 * chunk + j, chunk);
    });
  }
  // Row r's probabilities over the union: exp(s - m_r) on its own keys, 0 on the others
  // (masked keys come out exactly 0 from exp_sum_row); with int8 values, times each key's
  // value scale (p_j * s_j weighs the integers of v_j), after the sum l.
  for (Index r = 0; r < R; ++r) {
    const Index h = g * G + r / p.L, i = r % p.L;
    T* const si = s + r * chunk;
    T* const o = out + r * part;
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
    if (p.v_scale)
      for (Index j = 0, nj = 0; j < ni; j += nj) {
        nj = contiguous_keys(p, lo[i] + j, ni - j);
        const T* const vs = scales_at(p.v_scale, lo[i] - first_key + j);
        for (Index t = 0; t < nj; ++t) row[j + t] *= vs[t];
      }
  }
  for (Index j = 0, nj = 0; j < n; j += nj) {
    nj = contiguous_keys(p, first_key + j, std::min(kDecodeKeyBlock, n - j));
    decode::pv_keys(R, s + j, chunk, v_at(j), p.v.row_stride, nj, p.dv, out + 2, part);
  }
}

// Merges each row's chunks of problem p in chunk order: the same sums in the same order on any
// thread count.
template <class T>
void merge(const AttentionProblem<T>& p, const Plan& plan, const T* partials) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Index G = plan.G, Hk = plan.Hk, R = plan.R, chunks = plan.chunks, part = 2 + p.dv;
  for (Index bh = 0; bh < p.batch * p.heads; ++bh) {
    const Index b = bh / p.heads, h = bh % p.heads, g = h / G;
    for (Index i = 0; i < p.L; ++i) {
      const Index r = (h - g * G) * p.L + i;
      const auto part_of = [&](Index c) { return partials + (((b * Hk + g) * chunks + c) * R + r) * part; };
      T m = kNegInf;
      bool nan = false;  // a NaN logit in any chunk (l_c = NaN) makes the row NaN, as in the reference
      for (Index c = 0; c < chunks; ++c) m = std::max(m, part_of(c)[0]), nan = nan || std::isnan(part_of(c)[1]);
      Eigen::Map<Vector<T>> o(p.out.row(b, h, i), p.dv);
      T* const lse = p.lse ? p.lse.row(b, h, i) : nullptr;
      if (nan) {
        o.setConstant(std::numeric_limits<T>::quiet_NaN());
        if (lse) *lse = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      o.setZero();
      if (m == kNegInf) {  // every key masked: zeros, as the reference
        if (lse) *lse = row_end(p, h, m, T(0)).lse;
        continue;
      }
      T l = 0;
      for (Index c = 0; c < chunks; ++c) {
        const T* pc = part_of(c);
        if (pc[0] == kNegInf) continue;
        const T alpha = std::exp(pc[0] - m);
        l += alpha * pc[1];
        o += alpha * Eigen::Map<const Vector<T>>(pc + 2, p.dv);
      }
      const RowEnd<T> e = row_end(p, h, m, l);
      if (!p.sinks)
        o /= l;
      else
        o = o * e.num / e.den;
      if (lse) *lse = e.lse;
    }
  }
}

// The decoding step for K and V stored as S (the element type of every problem's kv_storage) over
// problems ps[0, n): a ragged batch, each problem one sequence of its own length, all their tasks
// split over the threads together; see the top of the file.
template <class S, class T>
void run(const AttentionProblem<T>* ps, Index n, Index chunk, int threads) {
  std::vector<Plan> plans(static_cast<std::size_t>(n));
  Index tasks = 0, parts = 0, rows = 0;
  double bytes = 0;
  for (Index i = 0; i < n; ++i) {
    const AttentionProblem<T>& p = ps[i];
    Plan& pl = plans[std::size_t(i)] = plan(p, chunk);
    pl.first_task = tasks, pl.partials = parts;
    tasks += pl.tasks;
    parts += pl.tasks * pl.R * (2 + p.dv);
    rows = std::max(rows, pl.R);
    // K and V once per kv head: the group's rows share the reads.
    if (pl.tasks > 0) bytes += double(p.batch * pl.Hk) * double(p.S) * double(p.d + p.dv) * double(sizeof(S));
  }
  if (tasks == 0) return;
  // Threads by bytes streamed: threads_for's 8 MFLOP a thread is ~80 us of FMAs, and a thread
  // streams about 1 MB in that time, so a byte counts as 8 FLOPs.
  const int n_threads = static_cast<int>(std::min<Index>(threads > 0 ? threads : threads_for(8.0 * bytes, 0), tasks));
  // Each task's partials (m, l, o[dv]) of its rows, written by the task and merged after all
  // tasks end; and each thread's [rows, chunk] scores. One allocation, before the threads start.
  Eigen::Matrix<T, Eigen::Dynamic, 1> arena(parts + Index(n_threads) * rows * chunk);
  T* const partials = arena.data();

  [[maybe_unused]] const NoEigenMalloc no_malloc;
  parallel_tasks(tasks, n_threads, [&](Index first, Index step) {
    T* const s = partials + parts + first * rows * chunk;  // row r at s + r * chunk
    std::size_t i = 0;  // the problem of `t`: tasks only grow
    for (Index t = first; t < tasks; t += step) {
      while (t >= plans[i].first_task + plans[i].tasks) ++i;
      const Plan& pl = plans[i];
      task<S>(ps[i], pl, chunk, t - pl.first_task, partials + pl.partials, s);
    }
  });
  for (Index i = 0; i < n; ++i) {
    const Plan& pl = plans[std::size_t(i)];
    if (pl.tasks > 0) merge(ps[i], pl, partials + pl.partials);
  }
}

}  // namespace decode

// The decoding step, for K and V in any storage type: the one switch from p.kv_storage to the
// element type the step is compiled for.
// The decoding step over problems ps[0, n) (a ragged batch: every problem at most kDecodeRows
// queries, K and V in one storage type), for K and V in any storage type: the one switch from
// kv_storage to the element type the step is compiled for.
template <class T>
void attention_decode(const AttentionProblem<T>* ps, Index n, Index chunk = kDecodeChunk, int threads = 0) {
  ATTN_ASSERT(n > 0 && chunk > 0);
  for (Index i = 0; i < n; ++i)
    ATTN_ASSERT(!ps[i].weights && ps[i].L <= kDecodeRows && ps[i].kv_storage == ps[0].kv_storage);
  with_storage<T>(ps[0].kv_storage, [&](auto tag) { decode::run<typename decltype(tag)::type>(ps, n, chunk, threads); });
}

template <class T>
void attention_decode(const AttentionProblem<T>& p, Index chunk = kDecodeChunk, int threads = 0) {
  attention_decode(&p, 1, chunk, threads);
}

}  // namespace attn::detail
