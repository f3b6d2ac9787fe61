// attn/precision.hpp - the arithmetic of the big products: attention's Q K^T and P V, and the
// projections' GEMMs. Opt-in, per module (set_precision) and per attention call (Masks::precision).
//
//   attn::MultiHeadAttention<float> mha(1024, 16);
//   mha.set_precision(attn::Precision::BFloat16);  // its projections and its attention core
//
//   Native    products in T, as everywhere else (the default)
//   BFloat16  the operands of each product rounded to bf16 (8 significant bits), their products
//             summed in T: Q and K for the scores, the probabilities P and V for the output, x and
//             W for a projection - what PyTorch's CPU flash attention and FlashAttention do. On
//             CPUs with AVX512_BF16 (Zen 4 and later, Sapphire Rapids and later: VDPBF16PS, twice
//             the fp32 FMA rate) when the compiler targets them, float runs on bf16 dot-product
//             micro-kernels; elsewhere (and for double) the operands are rounded the same way and
//             multiplied in T, so results agree to T's rounding on every machine.
//
// Everything else stays in T: the softmax, its max and sum, masks, biases, scales, norms,
// activations and the accumulators. Kernels that are bound by reading memory gain nothing from
// bf16 and stay in T under either precision: projections of at most 4 rows and attention of at
// most 4 queries per head (decoding), and calls that return the probabilities.
//
// Error. Rounding both operands of a product moves it by at most (2u + u^2) |a||b| with u = 2^-8,
// bf16's unit roundoff (storage_unit_roundoff(Storage::BFloat16)); summing n of them in T adds at
// most n eps |a||b| (eps: T's unit roundoff, 2^-24 for float). So, elementwise:
//   projection  |y - exact| <= (2u + u^2 + n eps) sum_t |x_t| |w_t|          (bf16_dot_error_bound)
//   attention   |out - exact| <= (2u + u^2 + 2 S eps + e^(2 delta) - 1) max|v|
//               delta = scale ||q||_1 max|k| (2u + u^2 + d eps)      (bf16_attention_error_bound)
// for a query row over S keys of d, against exact arithmetic on the unrounded inputs: delta bounds
// the change of any logit (soft-capping is 1-Lipschitz, masks, biases and ALiBi are exact), which
// moves each probability by at most a factor e^(+-2 delta) (the softmax's sensitivity); rounding P
// and V then moves the output by (2u + u^2) of the probability-weighted |v|, and its sums in T by
// 2 S eps. The randomized differential tests hold every kernel, mask and option to these bounds.
#pragma once

#include <cmath>
#include <limits>

#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

enum class Precision { Native, BFloat16 };

inline const char* precision_name(Precision p) { return p == Precision::BFloat16 ? "bf16" : "native"; }

// The bound above for one element of a projection (or any dot product) of n terms: abs_dot = the
// sum of |x_t| |w_t|.
template <class T>
T bf16_dot_error_bound(T abs_dot, Index n) {
  const T u = storage_unit_roundoff<T>(Storage::BFloat16), eps = std::numeric_limits<T>::epsilon() / 2;
  return (T(2) * u + u * u + T(n) * eps) * abs_dot;
}

// The bound above for one attention output row, elementwise: logit_scale_l1 = scale * ||q||_1, and
// max_abs_k, max_abs_v over the S keys (of d features) and values the row attends.
template <class T>
T bf16_attention_error_bound(T logit_scale_l1, T max_abs_k, T max_abs_v, Index S, Index d) {
  const T u = storage_unit_roundoff<T>(Storage::BFloat16), eps = std::numeric_limits<T>::epsilon() / 2;
  const T delta = logit_scale_l1 * max_abs_k * (T(2) * u + u * u + T(d) * eps);
  return (T(2) * u + u * u + T(2) * T(S) * eps + std::expm1(T(2) * delta)) * max_abs_v;
}

}  // namespace attn
