// attn/kv_storage.hpp - the number types a KV cache can store its keys and values in, and what
// each one costs in accuracy.
//
// Decoding is bound by the bytes of K and V it streams, so the cache's storage type sets its speed:
// bf16 and fp16 halve the bytes of an fp32 cache, int8 quarters them. Computation stays in the
// module's T: queries are never rounded, scores, softmax and accumulation are in T, and a stored
// row is converted back to T in registers as the kernel reads it.
//
//   attn::KVCache<float> cache(attn::KVStorage::BFloat16, /*batch=*/1, /*kv_heads=*/8, /*head_dim=*/128, 4096);
//   cache.bytes_per_token();  // 8 heads * (128 + 128) * 2 bytes = 4096
//
// What append stores for a value x (one row = the head_dim keys, or value_dim values, of one
// position and kv head):
//   Native    x, in T                                         (exact)
//   BFloat16  x rounded to nearest even, 8 significant bits    |err| <= 2^-8  |x|
//   Float16   x rounded to nearest even, 11 significant bits   |err| <= 2^-11 |x|  (|x| <= 65504;
//             subnormal below 2^-14: |err| <= 2^-25 absolute)
//   Int8      round(x / s) in [-127, 127] with s = max|row| / 127 (symmetric, one scale in T per
//             row, for keys and values alike)                  |err| <= s / 2 = max|row| / 254
//             (for a normal s: a row whose max is below ~1.5e-36 in float has a subnormal scale,
//             and its largest values may be clamped by up to a few denorm_min)
// so each stored value is within u * max|x| of x, with the unit roundoff u of storage_unit_roundoff
// (max over the row for int8, over the value's own magnitude for the 16-bit types). Values that are
// exactly representable (bf16/fp16 values; int8 rows that are integer multiples of a scale whose
// row max is 127 steps, s a power of two) are stored exactly: compression loses nothing it does not
// have to.
//
// Int8 keys take one scale per (position, kv head), as values do, rather than one per channel
// (KIVI): a per-channel scale needs statistics over many positions, so the newest tokens would
// have to wait in full precision until their group fills; per position, append stays a pure
// function of the row, and the kernel folds the key scale into the score (scale * s_j * q.k_j)
// and the value scale into the probability (p_j * s_j), one multiply per key each. What it costs,
// measured (tools/int8_key_scales.cpp, one step over S = 2048 keys of 128, error / max|v|, median
// of 40): Gaussian keys 1.3e-4 per position, 1.6e-4 per channel; with 4 outlier channels (x10, as
// real keys have) 3.1e-3 per position, 8.8e-4 per channel. Per channel is the better scheme for
// outlier keys, at the price of grouping; the tiny GPT generates the same tokens with the
// per-position int8 cache as with float on all 72 test prompts.
//
// Error of one attention row against exact arithmetic on the unrounded K and V. With
// delta = scale * ||q||_1 * u * max|k| (the largest change of a logit by the rounding of K), every
// probability moves by at most a factor e^(+-2 delta), so
//   |out - exact| <= u * max|v| + (e^(2 delta) - 1) * max|v|                (kv_storage_error_bound)
// elementwise, plus T's own rounding. The randomized differential tests hold every kernel to it.
#pragma once

#include <cmath>

#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

// The cache's storage type is attn::Storage (attn/storage.hpp), under the name it had first.
using KVStorage = Storage;

// The bound above on |out - exact| for one query row, elementwise: logit_scale_l1 = scale *
// ||q||_1 (the query's L1 norm times the softmax scale), max_abs_k and max_abs_v over the keys and
// values the row attends. T's own rounding comes on top.
template <class T>
T kv_storage_error_bound(KVStorage s, T logit_scale_l1, T max_abs_k, T max_abs_v) {
  const T u = storage_unit_roundoff<T>(s);
  const T delta = logit_scale_l1 * u * max_abs_k;
  return u * max_abs_v + std::expm1(T(2) * delta) * max_abs_v;
}

}  // namespace attn
