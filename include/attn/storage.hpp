// attn/storage.hpp - the number types attn can keep large arrays in: a KV cache's keys and values
// (attn/kv_storage.hpp says what each costs there) and a projection's weights (attn/linear.hpp).
//
// Computation stays in the module's T (float or double): a stored element is converted back to T
// in registers as a kernel reads it, so the storage type changes the bytes a kernel streams, never
// the arithmetic it does with them. What storing a value x keeps:
//   Native    x, in T                                         (exact)
//   BFloat16  x rounded to nearest even, 8 significant bits    |err| <= 2^-8  |x|
//   Float16   x rounded to nearest even, 11 significant bits   |err| <= 2^-11 |x|  (|x| <= 65504;
//             subnormal below 2^-14: |err| <= 2^-25 absolute)
//   Int8      round(x / s) in [-127, 127] with s = max|row| / 127 (symmetric, one scale in T per
//             row)                                            |err| <= s / 2 = max|row| / 254
// Values exactly representable in the storage type (bf16 values in BFloat16, fp16 values in
// Float16, int8 rows that are integer multiples of a power-of-two scale with 127 steps at the row
// max) are stored exactly.
#pragma once

#include "attn/types.hpp"

namespace attn {

enum class Storage {
  Native,    // T itself (float or double): exact
  BFloat16,  // Eigen::bfloat16, 2 bytes: fp32's range, 8 significant bits
  Float16,   // Eigen::half, 2 bytes: 11 significant bits, |x| <= 65504
  Int8,      // std::int8_t, 1 byte, plus one T scale per row (a cache's position and kv head, a
             // weight's output feature)
};

inline const char* storage_name(Storage s) {
  switch (s) {
    case Storage::Native:
      return "native";
    case Storage::BFloat16:
      return "bf16";
    case Storage::Float16:
      return "fp16";
    case Storage::Int8:
      return "int8";
  }
  return "?";
}

// Bytes one stored element takes (int8's per-row scale not included).
template <class T>
constexpr Index storage_bytes(Storage s) {
  return s == Storage::Native ? Index(sizeof(T)) : s == Storage::Int8 ? 1 : 2;
}

// The largest |stored - x| of one stored value, as a fraction of max|x| (of the value itself for
// the 16-bit types, of its row for int8); 0 for Native.
template <class T>
constexpr T storage_unit_roundoff(Storage s) {
  switch (s) {
    case Storage::Native:
      return T(0);
    case Storage::BFloat16:
      return T(1) / T(256);  // 2^-8: half an ulp of an 8-bit significand
    case Storage::Float16:
      return T(1) / T(2048);  // 2^-11
    case Storage::Int8:
      return T(1) / T(254);  // half a step of max|row| / 127
  }
  return T(0);
}

}  // namespace attn
