// attn/detail/attention_blocked.hpp - attention on Eigen GEMMs over query blocks.
//
// Queries are taken Br rows at a time: the [Br, S] score tile is one GEMM (Q_blk K^T), the masks
// and a stable row softmax are applied in place, and the output block is one more GEMM (P V).
// Scratch is one [Br, S] tile for the whole call, so memory is O(Br * S), never O(L * S), and the
// semantics are those of attention_reference (same masked_logit, same all-masked rule).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attn/detail/attention_problem.hpp"
#include "attn/detail/microkernel.hpp"

namespace attn::detail {

template <class T>
void attention_blocked(const AttentionProblem<T>& p, Index block_rows = 64) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const bool masked = has_masks(p);
  Matrix<T> tile(std::min(block_rows, p.L), p.S);
  for (Index b = 0; b < p.batch; ++b) {
    for (Index h = 0; h < p.heads; ++h) {
      const StridedMap<T> K(p.k.row(b, kv_head(p, h), 0), p.S, p.d, Eigen::OuterStride<>(p.k.row_stride));
      const StridedMap<T> V(p.v.row(b, kv_head(p, h), 0), p.S, p.dv, Eigen::OuterStride<>(p.v.row_stride));
      for (Index i0 = 0; i0 < p.L; i0 += block_rows) {
        const Index n = std::min(block_rows, p.L - i0);
        const StridedMap<T> Q(p.q.row(b, h, i0), n, p.d, Eigen::OuterStride<>(p.q.row_stride));
        auto P = tile.topRows(n);
        P.noalias() = Q * K.transpose();
        P *= p.scale;
        for (Index r = 0; r < n; ++r) {
          T* row = P.row(r).data();
          const T m = masked ? mask_row(p, b, h, i0 + r, 0, row, p.S) : P.row(r).maxCoeff();
          if (m == kNegInf) {  // every key masked: zeros, as in the reference; NaN if NaN logits were left
            if (any_nan(row, p.S))
              P.row(r).setConstant(std::numeric_limits<T>::quiet_NaN());
            else
              P.row(r).setZero();
            continue;
          }
          P.row(r) /= mk::exp_sum_row(row, p.S, m, masked);
        }
        MutableStridedMap<T> O(p.out.row(b, h, i0), n, p.dv, Eigen::OuterStride<>(p.out.row_stride));
        O.noalias() = P * V;
        if (p.weights) {
          MutableStridedMap<T> W(p.weights.row(b, h, i0), n, p.S, Eigen::OuterStride<>(p.weights.row_stride));
          W = P;
        }
      }
    }
  }
}

}  // namespace attn::detail
