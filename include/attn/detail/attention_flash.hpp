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
// query block, and past the last unpadded key of the sequence. Blocks wholly below the diagonal
// skip the per-score mask pass too, when causal is the only mask. Work is split over
// (batch, head, query block) tasks; each task owns its rows and reduces them in a fixed order,
// so results are bitwise identical whatever the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attn/detail/attention_problem.hpp"
#include "attn/detail/parallel.hpp"

namespace attn::detail {

// Block sizes: Eigen re-packs both operands of every product, so larger blocks amortise that
// better; 128 x 256 was the fastest of 64..256 x 64..512 from L = 1 to 2048 on one AVX-512 core
// (the [Br, Bc] float tile is 128 KiB, well inside L2).
struct FlashBlocks {
  Index rows = 128;  // Br: queries per task
  Index cols = 256;  // Bc: keys per step
};

// One past the last key that query rows [.., i1) may attend after causal masking and key
// padding; keys at or past mask_keys (MHA's extra keys) always count.
template <class T>
Index attended_key_end(const AttentionProblem<T>& p, Index i1, Index padded_end) {
  Index end = p.mask_keys;
  if (p.causal == Causal::TopLeft) end = std::min(end, i1);
  if (p.causal == Causal::BottomRight) end = std::min(end, std::max<Index>(0, i1 + p.mask_keys - p.L));
  return std::min(end, padded_end);
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

template <class T>
void attention_flash(const AttentionProblem<T>& p, FlashBlocks blocks = {}, int threads = 0) {
  ATTN_ASSERT(!p.weights);  // the probabilities need the whole row: detail::attention routes those calls
  using Tile = Matrix<T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const bool elementwise = p.mask || p.bias || p.key_padding;  // masks that need every score looked at
  const Index Br = std::min(blocks.rows, p.L), Bc = std::min(blocks.cols, p.S);
  const Index q_blocks = (p.L + Br - 1) / Br;
  const Index tasks = p.batch * p.heads * q_blocks;

  const double flops = 2.0 * double(p.batch * p.heads) * double(p.L) * double(p.S) * double(p.d + p.dv);
  parallel_tasks(tasks, threads_for(flops, threads), [&](Index first, Index step) {
    // Per-thread scratch, sized once for every task this thread runs.
    Tile s(Br, Bc), acc(Br, p.dv);
    Eigen::Array<T, Eigen::Dynamic, 1> m(Br), l(Br), alpha(Br);
    Eigen::Array<T, 1, Eigen::Dynamic> keep(Bc);
    for (Index task = first; task < tasks; task += step) {
      const Index b = task / (p.heads * q_blocks), h = (task / q_blocks) % p.heads, i0 = (task % q_blocks) * Br;
      const Index n = std::min(Br, p.L - i0);
      const StridedMap<T> Q(p.q.row(b, h, i0), n, p.d, Eigen::OuterStride<>(p.q.row_stride));
      auto O = acc.topRows(n);
      O.setZero();
      m.head(n).setConstant(kNegInf);
      l.head(n).setZero();

      // Keys [0, key_end) may be attended by some row of this block; keys past mask_keys always are.
      const Index key_end = attended_key_end(p, i0 + n, unpadded_end(p, b));
      // Whether some (row, key) of this block is causally hidden: true only near the diagonal.
      auto causal_cuts = [&](Index j0, Index c) {
        const Index last_key = j0 + c - 1;
        if (p.causal == Causal::TopLeft) return last_key > i0;
        if (p.causal == Causal::BottomRight) return last_key > i0 + p.mask_keys - p.L;
        return false;
      };
      auto visit = [&](Index j0, Index c, bool maskable) {
        const bool masked = maskable && (elementwise || causal_cuts(j0, c));
        const StridedMap<T> K(p.k.row(b, h, j0), c, p.d, Eigen::OuterStride<>(p.k.row_stride));
        const StridedMap<T> V(p.v.row(b, h, j0), c, p.dv, Eigen::OuterStride<>(p.v.row_stride));
        auto S = s.topLeftCorner(n, c);
        S.noalias() = Q * K.transpose();
        S *= p.scale;
        for (Index r = 0; r < n; ++r) {
          auto row = S.row(r).array();
          auto kp = keep.head(c);
          if (masked) mask_row(p, b, h, i0 + r, j0, row, kp);
          const T m_new = std::max(m(r), row.maxCoeff());
          if (m_new == kNegInf) {  // nothing attended yet in this row
            row.setZero();
            alpha(r) = T(1);
            continue;
          }
          exp_row(row, m_new, masked, kp);
          alpha(r) = m(r) == kNegInf ? T(0) : std::exp(m(r) - m_new);
          l(r) = l(r) * alpha(r) + row.sum();
          m(r) = m_new;
        }
        O.array().colwise() *= alpha.head(n);
        O.noalias() += S * V;
      };
      for (Index j0 = 0; j0 < key_end; j0 += Bc) visit(j0, std::min(Bc, key_end - j0), true);
      for (Index j0 = p.mask_keys; j0 < p.S; j0 += Bc) visit(j0, std::min(Bc, p.S - j0), false);

      MutableStridedMap<T> out(p.out.row(b, h, i0), n, p.dv, Eigen::OuterStride<>(p.out.row_stride));
      for (Index r = 0; r < n; ++r) {
        if (l(r) > T(0))
          out.row(r) = O.row(r) / l(r);
        else
          out.row(r).setZero();  // every key masked
      }
    }
  });
}

}  // namespace attn::detail
