// attn/detail/attention_flash.hpp - flash attention on the CPU: queries in blocks of Br rows,
// keys and values in blocks of Bc rows, an online softmax, and no [L, S] matrix anywhere.
//
// For one query block and key blocks 1..n, with running row max m, row sum l and output O:
//   s     = masked(scale * Q K_j^T)                 [Br, Bc]
//   m'    = max(m, rowmax(s))
//   p     = exp(s - m')                             (masked keys: exactly 0)
//   l     = l * exp(m - m') + rowsum(p)             (exp(m - m') rescales what was summed
//   O     = O * exp(m - m') + p V_j                  against the old max: the max only grows)
// and finally O / l. A row whose keys are all masked keeps m = -inf and l = 0 and returns zeros
// (exp(m - m') is never formed from -inf - -inf, so no NaN appears).
//
// Key blocks that the masks remove entirely are never computed: past the causal diagonal of the
// query block, left of its sliding window (so a window w costs O(L * w), not O(L * S)), and past
// the last unpadded key of the sequence. Causal masking and the window leave each row one interval
// of keys (positional_keys), so when they are the only masks a row needs no per-score pass: its
// interval is exponentiated and the rest zeroed, and blocks wholly inside every row's interval are
// not looked at twice. The per-score work (bool masks, biases, ALiBi) goes through mask_row;
// soft-capping is one vectorized pass over the tile's scores. Work is split over
// (batch, kv head, query block) tasks - with grouped-query attention a task holds the block's rows
// of every query head of the group, and packs each key block once for all of them; each task owns
// its rows and reduces them in a fixed order, so results are bitwise identical whatever the thread
// count.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "attn/detail/attention_problem.hpp"
#include "attn/detail/microkernel.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/scratch.hpp"

namespace attn::detail {

// Block sizes. A task is Br query rows of one (batch, head); keys come Bc at a time, packed once
// per block and reused by all Br rows, so Br amortises the packing and Bc bounds the scratch
// (the packed [Bc, d] block and V's [Bc, dv] rows stay in L2). Within a block the rows go
// mk::kScoreRows at a time through scores, softmax and P.V, so their scores never leave L1.
struct FlashBlocks {
  Index rows = 192;  // Br: queries per task
  Index cols = 256;  // Bc: keys per step
};

// The blocks for problem p: Br = 192 unless that leaves fewer than 8 tasks, as one head of 512
// queries would (3 tasks: two threads finish 2 and 1, and one idles a third of the time); then
// 96 or 48, which are whole row tiles of every micro-kernel width. A function of the shape only,
// never of the thread count, so results stay the same bits on any number of threads.
template <class T>
FlashBlocks flash_blocks(const AttentionProblem<T>& p) {
  constexpr Index kMinTasks = 8, kMinRows = 48;
  FlashBlocks blocks;
  while (blocks.rows > kMinRows && p.batch * p.heads * ((p.L + blocks.rows - 1) / blocks.rows) < kMinTasks)
    blocks.rows /= 2;
  return blocks;
}

// One past the last key that query rows [.., i1) may attend after causal masking, the window and
// key padding; keys at or past mask_keys (MHA's extra keys) always count. (The intervals of
// positional_keys grow with the row: the last row's end is the rows' end.)
template <class T>
Index attended_key_end(const AttentionProblem<T>& p, Index i1, Index padded_end) {
  return std::min(positional_keys(p, i1 - 1).end, padded_end);
}

// The first key that query rows [i0, ..) may attend after causal masking and the window: the
// first row's, whose window starts leftmost.
template <class T>
Index attended_key_begin(const AttentionProblem<T>& p, Index i0) {
  return positional_keys(p, i0).begin;
}

// One past the last key of sequence b that the key padding mask lets through.
template <class T>
Index unpadded_end(const AttentionProblem<T>& p, Index b) {
  if (!p.key_padding) return p.mask_keys;
  const bool* row = p.key_padding.row(b, 0, 0);
  Index end = p.mask_keys;
  while (end > 0 && row[end - 1] != p.key_padding_attends) --end;
  return end;
}

// Per-thread scratch of the flash kernel, carved from two allocations made before the threads
// start: nothing is allocated while tasks run. O is the micro-kernels' operand (Dot::Operand: T,
// or bf16 pairs); the operand buffers hold Q, P and V only when they are converted (rounded to
// bf16, or paired), the micro-kernels otherwise read them in place.
template <class T, class O>
struct FlashScratch {
  O* packed;   // [Bc padded to panels, d ops]  the key block, mk::pack_operands' layout
  O* queries;  // [G * Br, d ops]               the task's query rows, converted
  O* probs;    // [kScoreRows, Bc padded ops]   one row tile's probabilities, converted
  O* vals;     // [Bc ops, dv]                  the value block, converted (pairs: of rows)
  T* scores;   // [kScoreRows, Bc padded]   scores, then probabilities, of one row tile
  T* out;      // [Br, dv]                  the unnormalised output O
  T* m;        // [Br]                      running row max
  T* l;        // [Br]                      running row sum
  T* alpha;    // [kScoreRows]              exp(m_old - m_new) of the row tile
  T* keys;     // [Bc, d]   K and V blocks converted to T, when the cache stores them compressed
  T* values;   // [Bc, dv]  (bf16, fp16, int8): once per block, reused by all Br rows
};

// One problem's share of a flash call: its blocks, and its tasks (b, kv head g, query block), the
// call's tasks [first_task, first_task + tasks); and a thread's scratch for it, in elements of T
// (slice) and of the operand type (op_slice), each buffer a whole number of cache lines.
//
// Grouped-query attention: a task takes the same query block of all G heads that share a kv head,
// so each key block is packed (and, from a compressed cache, converted) once for the group, not
// once per head; Br / G rows per head (at least a score tile) keep the task's rows, and its
// scratch, at Br.
struct FlashPlan {
  Index G = 1, Hk = 0, Br = 0, Bc = 0, q_blocks = 0, tasks = 0, bc_pad = 0, d_ops = 0;
  Index first_task = 0, slice = 0, op_slice = 0;
};

inline Index cache_lines(Index n) { return (n + 15) / 16 * 16; }

template <class T, class Dot>
FlashPlan flash_plan(const AttentionProblem<T>& p, FlashBlocks blocks, bool convert) {
  constexpr int MR = mk::kScoreRows;
  constexpr Index NR = mk::kPanel<T>, V = mk::kValuesPerOperand<Dot, T>;
  const auto lines = cache_lines;
  FlashPlan f;
  f.G = p.kv_heads > 0 ? p.heads / p.kv_heads : 1, f.Hk = p.heads / f.G;
  f.Br = std::min(std::max(std::min<Index>(MR, blocks.rows), blocks.rows / f.G), p.L);
  f.Bc = std::min(blocks.cols, p.S);
  f.q_blocks = f.Br > 0 ? (p.L + f.Br - 1) / f.Br : 0;
  f.tasks = p.batch * f.Hk * f.q_blocks;
  f.bc_pad = (f.Bc + NR - 1) / NR * NR;
  f.d_ops = mk::steps<Dot, T>(p.d);
  const Index G = f.G, Br = f.Br, Bc = f.Bc, bc_pad = f.bc_pad, d_ops = f.d_ops;
  const bool stored = kv_converted(p);  // compressed or paged: each block converted to T
  f.slice = lines(MR * bc_pad) + lines(G * Br * p.dv) + 2 * lines(G * Br) + lines(MR) +
            (stored ? lines(Bc * p.d) + lines(Bc * p.dv) : 0);
  f.op_slice = lines(bc_pad * d_ops) +
               (convert ? lines(G * Br * d_ops) + lines(MR * bc_pad / V) + lines(mk::steps<Dot, T>(Bc) * p.dv) : 0);
  return f;
}

// A thread's scratch for problem p, carved from `at` (f.slice elements) and `op_at` (f.op_slice).
template <class T, class Dot>
FlashScratch<T, typename Dot::Operand> flash_scratch(const AttentionProblem<T>& p, const FlashPlan& f, bool convert,
                                                     T* at, typename Dot::Operand* op_at) {
  constexpr int MR = mk::kScoreRows;
  constexpr Index V = mk::kValuesPerOperand<Dot, T>;
  const bool stored = kv_converted(p);  // compressed or paged: each block converted to T
  const auto take = [&at](Index n) { return std::exchange(at, at + cache_lines(n)); };
  const auto take_ops = [&op_at](Index n) { return std::exchange(op_at, op_at + cache_lines(n)); };
  FlashScratch<T, typename Dot::Operand> w{};
  w.packed = take_ops(f.bc_pad * f.d_ops);
  w.queries = convert ? take_ops(f.G * f.Br * f.d_ops) : nullptr;
  w.probs = convert ? take_ops(MR * f.bc_pad / V) : nullptr;
  w.vals = convert ? take_ops(mk::steps<Dot, T>(f.Bc) * p.dv) : nullptr;
  w.scores = take(MR * f.bc_pad);
  w.out = take(f.G * f.Br * p.dv);
  w.m = take(f.G * f.Br);
  w.l = take(f.G * f.Br);
  w.alpha = take(MR);
  w.keys = stored ? take(f.Bc * p.d) : nullptr;
  w.values = stored ? take(f.Bc * p.dv) : nullptr;
  return w;
}

// Task `task` of problem p: query rows [i0, i0 + Br) of every head of kv head g's group, in
// sequence b, over every key block they attend; `group` is the thread's scratch for p. With
// Bf16Dot Q, K, P and V are converted to bf16 pairs along the summed index (d for the scores, keys
// for P V); `round` (FmaDot only) rounds them to bf16 and multiplies in T, what
// Precision::BFloat16 does without the instruction.
template <class T, class Dot>
void flash_task(const AttentionProblem<T>& p, const FlashPlan& f, const FlashScratch<T, typename Dot::Operand>& group,
                Index task, bool round) {
  using O = typename Dot::Operand;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int MR = mk::kScoreRows;
  constexpr Index NR = mk::kPanel<T>, V = mk::kValuesPerOperand<Dot, T>;
  const bool convert = round || V > 1;  // Q, P and V go through the operand buffers
  const bool elementwise = p.mask || p.bias || p.key_padding || p.alibi_slopes || sinks_split(p);  // every score looked at
  const bool softcap = p.softcap > T(0);
  const bool stored = kv_converted(p);  // compressed or paged: each block converted to T
  const Index G = f.G, Hk = f.Hk, Br = f.Br, Bc = f.Bc, q_blocks = f.q_blocks, bc_pad = f.bc_pad, d_ops = f.d_ops;
  FlashScratch<T, O> w = group;  // out, m and l of the group's current head: head g*G + hh at hh * Br rows
  const Index b = task / (Hk * q_blocks), g = (task / q_blocks) % Hk, i0 = (task % q_blocks) * Br;
  const Index n = std::min(Br, p.L - i0);
  std::fill(group.out, group.out + G * Br * p.dv, T(0));
  std::fill(group.m, group.m + G * Br, kNegInf);
  std::fill(group.l, group.l + G * Br, T(0));
  Index h = g * G;  // the current head, and its queries (as operands: qs apart)
  const O* q = nullptr;
  Index qs = 0;
  if (convert)  // the block's queries of every head of the group, converted once
    for (Index hh = 0; hh < G; ++hh)
      for (Index r = 0; r < n; ++r)
        mk::row_operands<Dot>(p.q.row(b, g * G + hh, i0 + r), p.d, group.queries + (hh * Br + r) * d_ops, round);
  const auto select_head = [&](Index hh) {
    h = g * G + hh;
    if (convert) {
      q = group.queries + hh * Br * d_ops, qs = d_ops;
    } else {
      if constexpr (std::is_same_v<O, T>) q = p.q.row(b, h, i0), qs = p.q.row_stride;
    }
    w.out = group.out + hh * Br * p.dv;
    w.m = group.m + hh * Br;
    w.l = group.l + hh * Br;
  };

  // Keys [key_begin, key_end) may be attended by some row of this block; keys past mask_keys
  // always are. K and V are those of kv head g, which all the group's heads read.
  const Index padded_end = unpadded_end(p, b);
  const Index key_begin = attended_key_begin(p, i0), key_end = attended_key_end(p, i0 + n, padded_end);
  const Index hk = g;

  // One key block [j0, j0 + c): masks apply to it when `maskable` (keys below mask_keys).
  auto visit = [&](Index j0, Index c, bool maskable) {
    const T* kt = w.keys;  // K and V's block in T, and their row strides
    const T* vt = w.values;
    Index ks = p.d, vts = p.dv;
    if (stored) {  // a compressed cache: the block converted once, for all G * Br rows
      convert_rows(p, false, b, hk, j0, c, w.keys, p.d);
      convert_rows(p, true, b, hk, j0, c, w.values, p.dv);
    } else {
      kt = p.k.row(b, hk, j0), vt = p.v.row(b, hk, j0), ks = p.k.row_stride, vts = p.v.row_stride;
    }
    mk::pack_operands<mk::kPanelPackets, Dot>(kt, ks, c, p.d, w.packed, static_cast<const T*>(nullptr), round);
    const O* v = nullptr;  // V as P V's operands, and their row stride
    Index vs = 0;
    if constexpr (V > 1) {
#if ATTN_BF16_DOT
      pack_pair_rows(vt, vts, c, p.dv, w.vals);
#endif
      v = w.vals, vs = p.dv;
    } else if (convert) {
      for (Index j = 0; j < c; ++j) mk::row_operands<Dot>(vt + j * vts, p.dv, w.vals + j * p.dv, round);
      v = w.vals, vs = p.dv;
    } else {
      v = vt, vs = vts;
    }
    // One row tile: R rows from r0, `rows` either MR as a compile-time constant (every tile but
    // the last) or the last tile's row count, at run time. Only the micro-kernels take R at
    // compile time (their registers), so the tile is compiled twice, not once per row count.
    // (With a run-time R for the full tiles too, once, the kernel measured 1-3% slower.)
    const auto tile = [&](Index r0, auto rows) {
      constexpr bool full = !std::is_integral_v<decltype(rows)>;
      const Index R = rows;
      const Index i = i0 + r0;  // first query row of the tile
      // The keys of this block that some row of the tile may attend: causal masking, the
      // window and key padding end the tile's work early, a panel of keys at a time, and a
      // block left of every row's window is skipped.
      const Index cr = maskable ? std::min(c, attended_key_end(p, i + R, padded_end) - j0) : c;
      if (cr <= 0) return;
      const KeyRange top = maskable ? positional_keys(p, i) : KeyRange{0, p.S};  // the tile's first row's
      if (top.begin >= j0 + cr) return;
      const bool cuts = maskable && (top.end < j0 + cr || positional_keys(p, i + R - 1).begin > j0);
      const bool masked = maskable && (elementwise || cuts);

      T row_max[MR];
      const O* const qt = q + r0 * qs;
      const Index panels = (cr + NR - 1) / NR;
      if constexpr (full) {
        mk::score_rows<MR, T, Dot>(qt, qs, w.packed, panels, cr, d_ops, p.scale, w.scores, bc_pad, row_max);
      } else {
        mk::for_row_tiles<MR>(R, [&](Index, auto tile_rows) {  // one call, R as a constant
          mk::score_rows<decltype(tile_rows)::value, T, Dot>(qt, qs, w.packed, panels, cr, d_ops, p.scale,
                                                             w.scores, bc_pad, row_max);
        });
      }
      for (Index r = 0; r < R; ++r) {
        T* s = w.scores + r * bc_pad;
        Index lo = 0, hi = cr;  // keys outside [lo, hi) are hidden from this row by causal or window
        if (masked && elementwise) {
          row_max[r] = mask_row(p, b, h, i + r, j0, s, cr);
        } else {
          if (softcap) softcap_row(s, cr, p.softcap);
          if (masked) {  // causal and the window alone: the row's keys are one interval
            const KeyRange keys = positional_keys(p, i + r);
            lo = std::clamp<Index>(keys.begin - j0, 0, cr);
            hi = std::clamp<Index>(keys.end - j0, lo, cr);
            row_max[r] = mk::max_of(s + lo, hi - lo);
          } else if (softcap) {
            row_max[r] = mk::max_of(s, cr);
          }
        }
        T& m = w.m[r0 + r];
        const T m_new = std::max(m, row_max[r]);
        if (m_new == kNegInf) {  // nothing attended yet in this row, or only NaN logits: those
          if (any_nan(s + lo, hi - lo)) w.l[r0 + r] = std::numeric_limits<T>::quiet_NaN();  // poison it
          std::fill(s, s + cr, T(0));
          w.alpha[r] = T(1);
          continue;
        }
        // exp(m - m_new) rescales what was summed against the old max; never -inf - -inf.
        w.alpha[r] = m == kNegInf ? T(0) : std::exp(m - m_new);
        w.l[r0 + r] = w.l[r0 + r] * w.alpha[r] + mk::exp_sum_row(s + lo, hi - lo, m_new, masked && elementwise);
        std::fill(s, s + lo, T(0));
        std::fill(s + hi, s + cr, T(0));
        m = m_new;
      }
      // The probabilities as P V's operands (ps apart), and the keys as steps of its sum.
      const O* probs = nullptr;
      Index ps = 0;
      if (convert) {
        ps = bc_pad / V;
        for (Index r = 0; r < R; ++r) mk::row_operands<Dot>(w.scores + r * bc_pad, cr, w.probs + r * ps, round);
        probs = w.probs;
      } else {
        if constexpr (std::is_same_v<O, T>) probs = w.scores, ps = bc_pad;
      }
      const Index c_ops = mk::steps<Dot, T>(cr);
      const auto pv = [&](Index r1, auto pv_rows) {
        mk::pv_rows<decltype(pv_rows)::value, T, Dot>(probs + r1 * ps, ps, v, vs, c_ops, p.dv, w.alpha + r1,
                                                      w.out + (r0 + r1) * p.dv, p.dv);
      };
      if constexpr (full) {
        static_assert(MR % mk::kPvRows == 0, "a full score tile is whole P.V tiles");
        for (Index r1 = 0; r1 < MR; r1 += mk::kPvRows) pv(r1, std::integral_constant<int, mk::kPvRows>{});
      } else {
        mk::for_row_tiles<mk::kPvRows>(R, pv);
      }
    };
    for (Index hh = 0; hh < G; ++hh) {
      select_head(hh);
      Index r0 = 0;
      for (; r0 + MR <= n; r0 += MR) tile(r0, std::integral_constant<int, MR>{});
      if (r0 < n) tile(r0, n - r0);
    }
  };
  for (Index j0 = key_begin; j0 < key_end; j0 += Bc) visit(j0, std::min(Bc, key_end - j0), true);
  for (Index j0 = p.mask_keys; j0 < p.S; j0 += Bc) visit(j0, std::min(Bc, p.S - j0), false);

  for (Index hh = 0; hh < G; ++hh) {
    select_head(hh);
    for (Index r = 0; r < n; ++r) {
      T* out = p.out.row(b, h, i0 + r);
      const T* o = w.out + r * p.dv;
      const T l = w.l[r];
      // l >= 1 once a key is attended (its exp(s - m) is 1 at the max), NaN after a NaN logit.
      const RowEnd<T> e = row_end(p, h, w.m[r], l);
      if (e.num == T(0))
        std::fill(out, out + p.dv, T(0));  // every key masked (or outweighed by the sink)
      else if (!p.sinks)
        for (Index j = 0; j < p.dv; ++j) out[j] = o[j] / l;
      else
        for (Index j = 0; j < p.dv; ++j) out[j] = o[j] * e.num / e.den;
      if (p.lse) *p.lse.row(b, h, i0 + r) = e.lse;
    }
  }
}

// The flash kernel over problems ps[0, n) with blocks[0, n) (a ragged batch: each problem one
// sequence of its own length, all their tasks split over the threads together), on micro-kernels
// with multiply-add Dot (mk::FmaDot, mk::Bf16Dot); attention_flash chooses.
template <class T, class Dot>
void attention_flash_on(const AttentionProblem<T>* ps, const FlashBlocks* blocks, Index np, int threads, bool round) {
  using O = typename Dot::Operand;
  constexpr Index V = mk::kValuesPerOperand<Dot, T>;
  const bool convert = round || V > 1;
  std::vector<FlashPlan> plans(static_cast<std::size_t>(np));
  Index tasks = 0, slice = 0, op_slice = 0;
  double flops = 0;
  for (Index i = 0; i < np; ++i) {
    const AttentionProblem<T>& p = ps[i];
    ATTN_ASSERT(!p.weights);  // the probabilities need the whole row: detail::attention routes those calls
    FlashPlan& f = plans[std::size_t(i)] = flash_plan<T, Dot>(p, blocks[i], convert);
    f.first_task = tasks;
    tasks += f.tasks;
    slice = std::max(slice, f.slice), op_slice = std::max(op_slice, f.op_slice);
    flops += 2.0 * double(p.batch * p.heads) * double(p.L) * double(p.S) * double(p.d + p.dv);
  }
  if (tasks == 0) return;

  // threads 0: as many as the work is worth (threads_for); > 0: exactly that many (tests).
  const int n_threads = static_cast<int>(std::min<Index>(threads > 0 ? threads : threads_for(flops, 0), tasks));
  // Scratch for every thread, sized for the largest problem, made before the threads start.
  Eigen::Matrix<T, Eigen::Dynamic, 1> arena(slice * n_threads);
  Eigen::Matrix<O, Eigen::Dynamic, 1> op_arena(op_slice * n_threads);

  [[maybe_unused]] const NoEigenMalloc no_malloc;  // checked in tests built with EIGEN_RUNTIME_NO_MALLOC
  parallel_tasks(tasks, n_threads, [&](Index first, Index step) {
    std::size_t i = 0;  // the problem of task t (tasks only grow), and the one the scratch is carved for
    std::size_t carved = plans.size();
    FlashScratch<T, O> group{};
    for (Index t = first; t < tasks; t += step) {
      while (t >= plans[i].first_task + plans[i].tasks) ++i;
      if (carved != i)
        group = flash_scratch<T, Dot>(ps[i], plans[i], convert, arena.data() + first * slice,
                                      op_arena.data() + first * op_slice),
        carved = i;
      flash_task<T, Dot>(ps[i], plans[i], group, t - plans[i].first_task, round);
    }
  });
}

// The flash kernel over problems ps[0, n) with blocks[0, n), all of one precision: in T or, under
// Precision::BFloat16, on bf16 operands: the bf16 micro-kernels where the compiler targets
// VDPBF16PS (float), else the T kernels on operands rounded to bf16.
template <class T>
void attention_flash(const AttentionProblem<T>* ps, const FlashBlocks* blocks, Index n, int threads = 0) {
  ATTN_ASSERT(n > 0);
  for (Index i = 0; i < n; ++i) ATTN_ASSERT(ps[i].precision == ps[0].precision);
  const bool bf16 = ps[0].precision == Precision::BFloat16;
#if ATTN_BF16_DOT
  if constexpr (std::is_same_v<T, float>)
    if (bf16) return attention_flash_on<T, mk::Bf16Dot>(ps, blocks, n, threads, false);
#endif
  attention_flash_on<T, mk::FmaDot<T>>(ps, blocks, n, threads, bf16);
}

template <class T>
void attention_flash(const AttentionProblem<T>& p, FlashBlocks blocks = {}, int threads = 0) {
  attention_flash(&p, &blocks, 1, threads);
}

}  // namespace attn::detail
