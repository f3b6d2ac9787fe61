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
// A row whose keys are all masked has m = -inf; it returns zeros (as PyTorch's SDPA and ONNX do),
// never the NaN that exp(-inf - -inf) would give.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attn/detail/attention_problem.hpp"

namespace attn::detail {

template <class T>
void attention_reference(const AttentionProblem<T>& p) {
  std::vector<T> s(static_cast<std::size_t>(p.S));
  for (Index b = 0; b < p.batch; ++b) {
    for (Index h = 0; h < p.heads; ++h) {
      for (Index i = 0; i < p.L; ++i) {
        const T* qi = p.q.row(b, h, i);
        T m = -std::numeric_limits<T>::infinity();
        for (Index j = 0; j < p.S; ++j) {
          const T* kj = p.k.row(b, kv_head(p, h), j);
          T dot = 0;
          for (Index c = 0; c < p.d; ++c) dot += qi[c] * kj[c];
          s[j] = masked_logit(p, b, h, i, j, p.scale * dot);
          m = std::max(m, s[j]);
        }
        T* oi = p.out.row(b, h, i);
        T* wi = p.weights ? p.weights.row(b, h, i) : nullptr;
        std::fill(oi, oi + p.dv, T(0));
        if (m == -std::numeric_limits<T>::infinity()) {  // every key masked
          if (wi) std::fill(wi, wi + p.S, T(0));
          continue;
        }
        T sum = 0;
        for (Index j = 0; j < p.S; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        for (Index j = 0; j < p.S; ++j) {
          const T* vj = p.v.row(b, kv_head(p, h), j);
          for (Index c = 0; c < p.dv; ++c) oi[c] += s[j] * vj[c];
        }
        for (Index c = 0; c < p.dv; ++c) oi[c] /= sum;
        if (wi)
          for (Index j = 0; j < p.S; ++j) wi[j] = s[j] / sum;
      }
    }
  }
}

}  // namespace attn::detail
