// attn/detail/storage.hpp - converting to and from a KV cache's storage types (attn/kv_storage.hpp).
//
//   Stored<T, s>          the element type of storage s: T, Eigen::bfloat16, Eigen::half, std::int8_t
//   with_storage(s, f)    f(tag) with tag::type the element type: the one switch from the run-time
//                         KVStorage to the compile-time type the decode kernel is instantiated on
//   round_to<S>(x)        x rounded to nearest even in S (bf16, fp16), for append
//   quantize_row          a row to int8 with its scale max|x| / 127, for append
//   to_compute<T>(x)      one stored element as T (without int8's scale)
//   load_as<T>(x)         a packet of stored elements as a Packet<T>, converted in registers (AVX-512
//                         and AVX2 instructions where the storage has them, one lane at a time otherwise)
//   dequantize(x, n, s, y)  y[0, n) = s * x[0, n) as T
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attn/detail/microkernel.hpp"
#include "attn/kv_storage.hpp"

namespace attn::detail {

template <class T, KVStorage s>
using Stored = std::conditional_t<
    s == KVStorage::Native, T,
    std::conditional_t<s == KVStorage::BFloat16, Eigen::bfloat16,
                       std::conditional_t<s == KVStorage::Float16, Eigen::half, std::int8_t>>>;

template <class S>
struct StorageTag {
  using type = S;
};

// f(StorageTag<S>{}) for the element type S of storage s.
template <class T, class F>
decltype(auto) with_storage(KVStorage s, F&& f) {
  switch (s) {
    case KVStorage::BFloat16:
      return f(StorageTag<Eigen::bfloat16>{});
    case KVStorage::Float16:
      return f(StorageTag<Eigen::half>{});
    case KVStorage::Int8:
      return f(StorageTag<std::int8_t>{});
    case KVStorage::Native:
      break;
  }
  return f(StorageTag<T>{});
}

template <class S>
inline constexpr bool is_16bit_float = std::is_same_v<S, Eigen::bfloat16> || std::is_same_v<S, Eigen::half>;

// One stored element as T (int8: the integer, before its row's scale).
template <class T, class S>
EIGEN_STRONG_INLINE T to_compute(S x) {
  if constexpr (is_16bit_float<S>)
    return static_cast<T>(static_cast<float>(x));
  else
    return static_cast<T>(x);
}

// x rounded to the nearest S (bf16 or fp16), ties to even. From float, Eigen's conversion is that
// rounding; from double, rounding to float first could round twice (a double just past a tie would
// land on the tie and then go to even), so the neighbours of that first guess are compared in double.
template <class S, class T>
S round_to(T x) {
  static_assert(is_16bit_float<S>);
  const S guess(static_cast<float>(x));
  if constexpr (std::is_same_v<T, float>) {
    return guess;
  } else {
    if (!std::isfinite(x)) return guess;
    const auto bits = [](S v) { return Eigen::numext::bit_cast<std::uint16_t>(v); };
    const auto from_bits = [](std::uint16_t u) { return Eigen::numext::bit_cast<S>(u); };
    if (!std::isfinite(static_cast<float>(guess))) {
      // x went to float's rounding of the overflow threshold (or past it): overflow is decided in
      // double. The largest finite S has an odd significand, so the tie goes to inf.
      const S top = Eigen::NumTraits<S>::highest();
      const double hi = double(static_cast<float>(top)),
                   below = double(static_cast<float>(from_bits(std::uint16_t(bits(top) - 1))));
      if (std::abs(x) < hi + (hi - below) / 2) return x < 0 ? S(-static_cast<float>(top)) : top;
      return guess;
    }
    S best = guess;
    double err = std::abs(double(static_cast<float>(guess)) - x);
    const std::uint16_t g = bits(guess);
    for (const std::uint16_t n : {std::uint16_t(g + 1), std::uint16_t(g - 1)}) {
      const S c = from_bits(n);
      const float cf = static_cast<float>(c);
      if (!std::isfinite(cf) || std::signbit(cf) != std::signbit(x)) continue;  // stay on x's side of zero
      const double e = std::abs(double(cf) - x);
      if (e < err || (e == err && (n & 1) == 0)) best = c, err = e;
    }
    return best;
  }
}

// Row x[0, n) as int8: q = round(x / s) (to nearest even), s = max|x| / 127, so max|x| is +-127
// and every |q| <= 127. Returns s (0 for a row of zeros, whose q are 0). x must be finite.
template <class T>
T quantize_row(const T* x, Index n, std::int8_t* q) {
  T max_abs = 0;
  for (Index c = 0; c < n; ++c) max_abs = std::max(max_abs, std::abs(x[c]));
  const T s = max_abs / T(127);
  if (s == T(0)) {
    std::fill(q, q + n, std::int8_t(0));
    return T(0);
  }
  for (Index c = 0; c < n; ++c)
    q[c] = static_cast<std::int8_t>(std::clamp<T>(std::nearbyint(x[c] / s), T(-127), T(127)));
  return s;
}

// A packet of kLanes<T> stored elements from x (unaligned) as a Packet<T>. The storage types
// convert in registers: bf16 by a shift into the high half of a float, fp16 by VCVTPH2PS (F16C,
// part of AVX-512F), int8 by sign extension and VCVTDQ2PS (the caller applies int8's scale to the
// result, or folds it). Written with the intrinsics: Eigen 3.4's half2float goes one lane at a time
// unless EIGEN_HAS_FP16_C, which it leaves unset under g++ (an fp16 step ran 15x slower).
template <class T, class S>
EIGEN_STRONG_INLINE mk::Packet<T> load_as(const S* x) {
  using P = mk::Packet<T>;
  namespace ei = Eigen::internal;
  if constexpr (std::is_same_v<S, T>) {
    return ei::ploadu<P>(x);
  } else {
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (std::is_same_v<T, float> && mk::kLanes<float> == 16) {
      const auto* at = reinterpret_cast<const __m128i*>(x);
      if constexpr (std::is_same_v<S, std::int8_t>)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(at)));
      else if constexpr (std::is_same_v<S, Eigen::bfloat16>)  // bf16 is the high half of a float
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                         reinterpret_cast<const __m256i*>(x))), 16));
      else
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    }
#elif defined(EIGEN_VECTORIZE_AVX2)
    if constexpr (std::is_same_v<T, float> && mk::kLanes<float> == 8) {
      const auto* at = reinterpret_cast<const __m128i*>(x);
      if constexpr (std::is_same_v<S, std::int8_t>)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(at)));
      else if constexpr (std::is_same_v<S, Eigen::bfloat16>)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(at)), 16));
#if defined(__F16C__)
      else
        return _mm256_cvtph_ps(_mm_loadu_si128(at));
#endif
    }
#endif
    // Anywhere else (double, SSE, NEON, EIGEN_DONT_VECTORIZE): one lane at a time.
    EIGEN_ALIGN_MAX T lanes[mk::kLanes<T>];
    for (int l = 0; l < mk::kLanes<T>; ++l) lanes[l] = to_compute<T>(x[l]);
    return ei::pload<P>(lanes);
  }
}

// y[0, n) = s * x[0, n) in T (s = 1 for the 16-bit types and Native).
template <class T, class S>
void dequantize(const S* x, Index n, T s, T* y) {
  namespace ei = Eigen::internal;
  using P = mk::Packet<T>;
  constexpr Index L = mk::kLanes<T>;
  const P vs = ei::pset1<P>(s);
  Index c = 0;
  for (; c + L <= n; c += L) ei::pstoreu(y + c, ei::pmul(vs, load_as<T>(x + c)));
  for (; c < n; ++c) y[c] = s * to_compute<T>(x[c]);
}

}  // namespace attn::detail
