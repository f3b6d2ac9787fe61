// attn/detail/attention_reference.hpp - attention as plain loops: the oracle every fast path is
// tested against, and the code to read to learn what attention computes.
//
// For each query row q_i (one batch entry, one head):
//   s_j = masked_logit(scale * q_i . k_j)          (soft-capped, ALiBi and biases added; -inf where
//                                                  masked; k, v: the kv head of h, kv_head())
//   m   = max_j s_j
//   p_j = exp(s_j - m) / sum_j' exp(s_j' - m)      (subtracting m keeps exp <= 1: no overflow,
//                                                  and logits around 1e4 stay exact)
//   o_i = sum_j p_j v_j
//   lse_i = m + log(sum_j' exp(s_j' - m))        (when asked for: p.lse)
// With sink logits (p.sinks, gpt-oss) the denominator gains exp(sink_h), which has no value:
// row_end() (attention_problem.hpp) gives the factor and the lse for every kernel.
// A row whose keys are all masked has m = -inf; it returns zeros (as PyTorch's SDPA and ONNX do),
// never the NaN that exp(-inf - -inf) would give.
//
// Non-finite inputs, on every path (tests/edge_cases_test.cpp): a NaN logit - a NaN in q_i, or in a
// k_j that q_i attends - makes row i NaN (output and weights), as IEEE arithmetic and PyTorch do; a
// +inf logit too (exp(inf - inf)). A masked key's k_j never reaches a logit (the mask gives -inf
// whatever q_i . k_j is), so NaN or inf there changes nothing. A masked key's v_j is multiplied by
// its weight 0 here: NaN or inf there gives NaN (0 * NaN, as in PyTorch), while the fast kernels
// never read the key blocks that causal masking, the window or trailing padding remove - so the
// result for non-finite values in masked keys' v_j is unspecified: keep them finite.
//
// K and V stored compressed (a KVCache of bf16, fp16 or int8) are converted to T a row at a time
// (kv_row): the reference computes on the stored values, as every kernel does.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attn/detail/attention_problem.hpp"

namespace attn::detail {

// Row j of kv head h of K or V as T: in place when stored as T, else converted into buf.
template <class T>
const T* kv_row(const AttentionProblem<T>& p, bool value, Index b, Index h, Index j, T* buf) {
  if (!kv_converted(p)) return value ? p.v.row(b, h, j) : p.k.row(b, h, j);
  convert_rows(p, value, b, h, j, 1, buf, 0);
  return buf;
}

template <class T>
void attention_reference(const AttentionProblem<T>& p) {
  std::vector<T> scores(static_cast<std::size_t>(p.S));
  std::vector<T> row(static_cast<std::size_t>(std::max(p.d, p.dv)));  // a converted K or V row
  T* const s = scores.data();  // one query row's logits, then its exponentials
  for (Index b = 0; b < p.batch; ++b) {
    for (Index h = 0; h < p.heads; ++h) {
      for (Index i = 0; i < p.L; ++i) {
        const T* qi = p.q.row(b, h, i);
        T m = -std::numeric_limits<T>::infinity();
        bool nan = false;  // a NaN logit (NaN in q_i or in an attended k_j) makes the row NaN
        for (Index j = 0; j < p.S; ++j) {
          const T* kj = kv_row(p, false, b, kv_head(p, h), j, row.data());
          T dot = 0;
          for (Index c = 0; c < p.d; ++c) dot += qi[c] * kj[c];
          s[j] = masked_logit(p, b, h, i, j, p.scale * dot);
          m = std::max(m, s[j]);
          nan = nan || std::isnan(s[j]);
        }
        T* oi = p.out.row(b, h, i);
        T* wi = p.weights ? p.weights.row(b, h, i) : nullptr;
        std::fill(oi, oi + p.dv, T(0));
        if (m == -std::numeric_limits<T>::infinity() && !nan) {  // every key masked
          if (wi) std::fill(wi, wi + p.S, T(0));
          if (p.lse) *p.lse.row(b, h, i) = row_end(p, h, m, T(0)).lse;
          continue;
        }
        T sum = 0;
        for (Index j = 0; j < p.S; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        // out = sum_j s_j v_j * num / den: den = sum without sinks (attention_problem.hpp, row_end)
        const RowEnd<T> e = row_end(p, h, m, sum);
        for (Index j = 0; j < p.S; ++j) {
          const T* vj = kv_row(p, true, b, kv_head(p, h), j, row.data());
          for (Index c = 0; c < p.dv; ++c) oi[c] += s[j] * vj[c];
        }
        for (Index c = 0; c < p.dv; ++c) oi[c] = oi[c] * e.num / e.den;
        if (wi)
          for (Index j = 0; j < p.S; ++j) wi[j] = s[j] * e.num / e.den;
        if (p.lse) *p.lse.row(b, h, i) = e.lse;
      }
    }
  }
}

}  // namespace attn::detail
