// attn/detail/attention_blocked.hpp - attention with the probabilities: whole score rows.
//
// The kernel for calls that ask for the [L, S] probabilities (need_weights), which the flash
// kernel never forms. Per (batch, head), K is packed once (mk::pack_keys); queries then go
// kScoreRows rows at a time: their [R, S] scores are one pass of the flash kernel's micro-kernel
// over all of K (mk::score_tile), the masks and a stable row softmax are applied in place, the
// output rows are P V (mk::pv_row_tiles) and the probabilities are copied out. Scratch is the
// packed K and one [R, S] tile, O(S * d) memory, never O(L * S); the semantics are those of
// attention_reference (same masked_logit, same all-masked rule). Single-threaded. (It used to be
// two Eigen GEMMs per block: 1.5x slower, and a GEMM for every file that calls attention() to
// compile.)
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attn/detail/attention_problem.hpp"
#include "attn/detail/microkernel.hpp"

namespace attn::detail {

// block_rows: query rows per score tile, at most (and by default) mk::kScoreRows.
template <class T>
void attention_blocked(const AttentionProblem<T>& p, Index block_rows = mk::kScoreRows) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr Index NR = mk::kPanel<T>;
  const Index MR = std::clamp<Index>(block_rows, 1, mk::kScoreRows);
  const bool masked = has_masks(p);
  const Index s_pad = (p.S + NR - 1) / NR * NR, panels = s_pad / NR;
  // The packed K [s_pad, d], one tile's scores [MR, s_pad], and MR zeros (pv_row_tiles' alpha:
  // O = 0 * O + P V, on output rows zeroed first).
  // A compressed cache's K and V of one head are converted to T first ([S, d] and [S, dv]).
  const bool stored = kv_converted(p);  // compressed or paged: each block converted to T
  Eigen::Matrix<T, Eigen::Dynamic, 1> arena(s_pad * p.d + MR * s_pad + MR + (stored ? p.S * (p.d + p.dv) : 0));
  T* const packed = arena.data();
  T* const scores = packed + s_pad * p.d;
  T* const zeros = scores + MR * s_pad;
  T* const keys = zeros + MR;
  T* const values = keys + p.S * p.d;
  std::fill(zeros, zeros + MR, T(0));
  T row_max[mk::kScoreRows];
  for (Index b = 0; b < p.batch; ++b) {
    for (Index h = 0; h < p.heads; ++h) {
      const Index hk = kv_head(p, h);
      const T* v = nullptr;
      Index vs = 0;  // V's row stride
      if (stored) {
        convert_rows(p, false, b, hk, 0, p.S, keys, p.d);
        convert_rows(p, true, b, hk, 0, p.S, values, p.dv);
        mk::pack_keys(keys, p.d, p.S, p.d, packed);
        v = values, vs = p.dv;
      } else {
        mk::pack_keys(p.k.row(b, hk, 0), p.k.row_stride, p.S, p.d, packed);
        v = p.v.row(b, hk, 0), vs = p.v.row_stride;
      }
      for (Index i0 = 0; i0 < p.L; i0 += MR) {
        const Index n = std::min(MR, p.L - i0);
        mk::score_tile(n, p.q.row(b, h, i0), p.q.row_stride, packed, panels, p.S, p.d, p.scale, scores, s_pad, row_max);
        for (Index r = 0; r < n; ++r) {
          T* const row = scores + r * s_pad;
          const T m = masked ? mask_row(p, b, h, i0 + r, 0, row, p.S) : row_max[r];
          T* const lse = p.lse ? p.lse.row(b, h, i0 + r) : nullptr;
          if (m == kNegInf) {  // every key masked: zeros, as in the reference; NaN if NaN logits were left
            const bool nan = any_nan(row, p.S);
            std::fill(row, row + p.S, nan ? std::numeric_limits<T>::quiet_NaN() : T(0));
            if (lse) *lse = row_end(p, h, m, nan ? std::numeric_limits<T>::quiet_NaN() : T(0)).lse;
            continue;
          }
          const T sum = mk::exp_sum_row(row, p.S, m, masked);
          const RowEnd<T> e = row_end(p, h, m, sum);  // num = 1 and den = sum without sinks
          if (p.sinks)
            for (Index j = 0; j < p.S; ++j) row[j] = row[j] * e.num / e.den;
          else
            for (Index j = 0; j < p.S; ++j) row[j] /= sum;
          if (lse) *lse = e.lse;
        }
        for (Index r = 0; r < n; ++r) std::fill(p.out.row(b, h, i0 + r), p.out.row(b, h, i0 + r) + p.dv, T(0));
        mk::pv_row_tiles(n, scores, s_pad, v, vs, p.S, p.dv, zeros, p.out.row(b, h, i0),
                         p.out.row_stride);
        if (p.weights)
          for (Index r = 0; r < n; ++r)
            std::copy(scores + r * s_pad, scores + r * s_pad + p.S, p.weights.row(b, h, i0 + r));
      }
    }
  }
}

}  // namespace attn::detail
