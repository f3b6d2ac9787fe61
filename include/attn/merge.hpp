// attn/merge.hpp - attention over disjoint key sets, combined exactly by the log-sum-exp.
//
// Attention over keys A and over keys B, each with its rows' log-sum-exp (the natural log of the
// softmax denominator, after scale and masks: lse = m + log(sum_j exp(s_j - m))), is attention
// over A and B together:
//
//   lse = logaddexp(lse_a, lse_b)
//   out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)
//
// FlashAttention's and vLLM's merge, used by split-KV decoding, chunked prefill and ring
// (context-parallel) attention. Layouts: out [N, H*dv], row n the query token, head h in columns
// [h*dv, (h+1)*dv) as every attn output; lse [H, N], FlashAttention's varlen layout.
//
//   attn::merge_attention_states<float>(out_a, lse_a, out_b, lse_b, out, lse);
//
// The arithmetic is a fixed sequence of operations per element, so merging the same parts in the
// same order gives the same bits on any machine that compiles it alike. A part with lse = -inf
// (its keys all masked; its out is ignored) contributes nothing; both -inf give lse = -inf and an
// output of zeros, as attention whose every key is masked. A NaN lse gives NaN in that row and
// head; an lse of +inf (no finite softmax produces one) is rejected.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attn/detail/check.hpp"
#include "attn/types.hpp"

namespace attn {

namespace detail {

// One row and head of the merge: parts (la, a[0, dv)) and (lb, b[0, dv)) into o[0, dv) (which
// may be a or b); returns the merged lse. merge_attention_states and context-parallel attention
// (attn/dist) both merge through it, so they round alike.
template <class T>
T merge_state(T la, const T* a, T lb, const T* b, Index dv, T* o) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  if (std::isnan(la) || std::isnan(lb)) {
    std::fill(o, o + dv, std::numeric_limits<T>::quiet_NaN());
    return std::numeric_limits<T>::quiet_NaN();
  }
  const T m = std::max(la, lb);
  if (m == -kInf) {  // neither part attended a key
    std::fill(o, o + dv, T(0));
    return -kInf;
  }
  // exp(-inf - m) = 0: a masked part drops out; its out, zeros or anything, is not read.
  const T wa = std::exp(la - m), wb = std::exp(lb - m);
  const T sum = wa + wb;
  const T ca = wa / sum, cb = wb / sum;
  if (cb == T(0)) {
    if (o != a) std::copy(a, a + dv, o);
  } else if (ca == T(0)) {
    if (o != b) std::copy(b, b + dv, o);
  } else {
    for (Index j = 0; j < dv; ++j) o[j] = ca * a[j] + cb * b[j];
  }
  return m + std::log(sum);
}

}  // namespace detail

// out_a, out_b: [N, H*dv]; lse_a, lse_b: [H, N]  ->  out [N, H*dv], lse [H, N], sized by the
// caller. out and lse may be out_a and lse_a (or out_b and lse_b): each element is read before
// it is written. Throws, changing nothing, on a shape mismatch or an lse of +inf.
template <class T>
void merge_attention_states(const ConstMatrixRef<T>& out_a, const ConstMatrixRef<T>& lse_a,
                            const ConstMatrixRef<T>& out_b, const ConstMatrixRef<T>& lse_b, MatrixRef<T> out,
                            MatrixRef<T> lse) {
  ATTN_CHECK_SCALAR(T);
  const char* where = "attn::merge_attention_states";
  const Index H = lse_a.rows(), N = lse_a.cols();
  detail::require_shape(H > 0, where, "lse_a has shape ", detail::shape(H, N), ", expected [H, N] with H > 0");
  const Index E = out_a.cols();
  detail::require_dims(where, "out_a", out_a.rows(), E, N, E, "[N, H*dv] = [", N, ", H*dv] (N from lse_a)");
  detail::require_shape(E % H == 0, where, "out_a has ", E, " columns, not a multiple of H = ", H,
                        " (from lse_a [H, N] = ", detail::shape(H, N), ")");
  detail::require_dims(where, "out_b", out_b.rows(), out_b.cols(), N, E, "out_a's shape ", detail::shape(N, E));
  detail::require_dims(where, "lse_b", lse_b.rows(), lse_b.cols(), H, N, "lse_a's shape ", detail::shape(H, N));
  detail::require_dims(where, "out", out.rows(), out.cols(), N, E, "out_a's shape ", detail::shape(N, E));
  detail::require_dims(where, "lse", lse.rows(), lse.cols(), H, N, "lse_a's shape ", detail::shape(H, N));
  constexpr T kInf = std::numeric_limits<T>::infinity();
  detail::require_arg(!(lse_a.array() == kInf).any() && !(lse_b.array() == kInf).any(), where,
                      "an lse of +inf (lse_a or lse_b): no softmax denominator is infinite");

  const Index dv = E / H;
  for (Index h = 0; h < H; ++h)
    for (Index n = 0; n < N; ++n)
      lse(h, n) = detail::merge_state(lse_a(h, n), out_a.data() + n * out_a.outerStride() + h * dv, lse_b(h, n),
                                      out_b.data() + n * out_b.outerStride() + h * dv, dv,
                                      out.data() + n * out.outerStride() + h * dv);
}

}  // namespace attn
