// attn/detail/packet.hpp - SIMD packets (Eigen's, so one source serves SSE, AVX2, AVX-512, NEON
// and, with EIGEN_DONT_VECTORIZE, plain scalars), and stored elements (bf16, fp16, int8:
// attn/storage.hpp) loaded into them. What every kernel's inner loop is written on.
//
//   mk::Packet<T>, mk::kLanes<T>   the packet of T and its lane count
//   ATTN_UNROLL                    full unrolling of a loop over a register tile
//   to_compute<T>(x)               one stored element as T (without int8's scale)
//   load_as<T>(x)                  kLanes<T> stored elements as a Packet<T>, converted in registers
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn/detail/eigen.hpp"
#include "attn/types.hpp"

// The loops over a register tile's rows and packets must unroll completely, or the accumulators
// live on the stack: g++ -O2 (CMake's RelWithDebInfo) leaves them rolled, and the flash kernel ran
// 3x slower than at -O3 (350 vs 117 ms, prefill H = 32 L = S = 2048, 2 threads), the decode
// kernel's score_keys<4> 2x. So the unrolling is asked for, not left to the optimizer level.
#if defined(__clang__)
#define ATTN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ATTN_UNROLL _Pragma("GCC unroll 32")
#else
#define ATTN_UNROLL
#endif

namespace attn::detail {

namespace mk {

namespace ei = Eigen::internal;

template <class T>
using Packet = typename ei::packet_traits<T>::type;
template <class T>
inline constexpr int kLanes = ei::unpacket_traits<Packet<T>>::size;

// Register tiles are sized from the number of vector registers: 32 (AVX-512, NEON) or 16 (SSE, AVX2).
inline constexpr int kWideRegisters = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;

}  // namespace mk

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

// A packet of kLanes<T> stored elements from x (unaligned) as a Packet<T>. The storage types
// convert in registers: bf16 by a shift into the high half of a float, fp16 by VCVTPH2PS (F16C,
// part of AVX-512F), int8 by sign extension and VCVTDQ2PS (the caller applies int8's scale to the
// result, or folds it). Written with the intrinsics: Eigen 3.4's half2float goes one lane at a time
// unless EIGEN_HAS_FP16_C, which it leaves unset under g++ (an fp16 step ran 15x slower).
template <class T, class S>
EIGEN_STRONG_INLINE mk::Packet<T> load_as(const S* x) {
  using P = mk::Packet<T>;
  if constexpr (std::is_same_v<S, T>) {
    return mk::ei::ploadu<P>(x);
  } else {
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (std::is_same_v<T, float> && mk::kLanes<float> == 16) {
      const auto* at = reinterpret_cast<const __m128i*>(x);
      if constexpr (std::is_same_v<S, std::int8_t>)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(at)));
      else if constexpr (std::is_same_v<S, Eigen::bfloat16>)  // bf16 is the high half of a float
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
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
    return mk::ei::pload<P>(lanes);
  }
}

}  // namespace attn::detail
