// attn/detail/bf16.hpp - the operands of Precision::BFloat16 (attn/precision.hpp).
//
// VDPBF16PS (AVX512_BF16) multiplies 32-bit lanes that each hold a pair of bf16 values, adding both
// products to an fp32 accumulator: acc[i] += a[2i+1] b[2i+1] + a[2i] b[2i]. So its operands are
// pairs along the summed index - two consecutive d of a query or key, two consecutive keys of a
// probability row or of V - and the bf16 micro-kernels (mk::Bf16Dot) read panels of pairs laid out
// as the fp32 kernels' panels of values, with half the rows.
//
//   ATTN_BF16_DOT         whether the compiler targets VDPBF16PS (and AVX-512): the dispatch
//   bf16_bits(x)          x rounded to bf16 as VCVTNE2PS2BF16 does it
//   round_bf16(x, n)      x[0, n) rounded to bf16 in place, in T: what stands in for the instruction
//                         where there is none (and for double)
//   to_bf16_pairs         a row as pairs, the odd tail padded with 0: queries, probabilities, x rows
//   pack_pair_panels<NP>  rows [c, d] as panels of NP packets of rows, each [ceil(d/2)][NP * 16]
//                         pairs: keys, and W's rows for the GEMM (pack_panels, in pairs)
//   pack_pair_rows        V [c, dv] as [ceil(c/2)][dv] pairs of consecutive rows
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attn/detail/packet.hpp"
#include "attn/detail/storage.hpp"
#include "attn/types.hpp"

namespace attn::detail {

// Two bf16 values in one 32-bit word, the lower-indexed one in the low half.
using Bf16Pair = std::uint32_t;

// ATTN_BF16_DOT: 1 when the compiler targets VDPBF16PS with AVX-512 packets, the one condition
// every bf16 micro-kernel and pair conversion is compiled under (#if ATTN_BF16_DOT).
#if defined(__AVX512BF16__) && defined(EIGEN_VECTORIZE_AVX512)
#define ATTN_BF16_DOT 1
#else
#define ATTN_BF16_DOT 0
#endif

// x's bf16 bits, rounded to nearest even as VCVTNE2PS2BF16 rounds: zero and subnormal inputs give
// zero of their sign (the instruction treats them as zero), a NaN stays a (quiet) NaN, and values
// past the largest bf16 go to infinity.
inline std::uint16_t bf16_bits(float x) {
  std::uint32_t u = 0;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7F800000u) == 0) return static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

inline float bf16_to_float(std::uint16_t bits) {
  const std::uint32_t u = std::uint32_t(bits) << 16;
  float x = 0;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// x rounded to bf16 and back: float as the instruction rounds (bf16_bits), double correctly.
template <class T>
T bf16_round(T x) {
  if constexpr (std::is_same_v<T, float>)
    return bf16_to_float(bf16_bits(x));
  else
    return static_cast<T>(static_cast<float>(round_to<Eigen::bfloat16>(x)));
}

template <class T>
void round_bf16(T* x, Index n) {
  for (Index i = 0; i < n; ++i) x[i] = bf16_round(x[i]);
}

inline Bf16Pair bf16_pair(float lo, float hi) { return Bf16Pair(bf16_bits(lo)) | Bf16Pair(bf16_bits(hi)) << 16; }

#if ATTN_BF16_DOT
// 32 floats (lo: the first 16) as 16 pairs, in a float register (the micro-kernels' packet).
EIGEN_STRONG_INLINE __m512 bf16_pairs_of(__m512 lo, __m512 hi) {
  return reinterpret_cast<__m512>(_mm512_cvtne2ps_pbh(hi, lo));  // elements 0-15 from lo, 16-31 from hi
}
#endif

// x[0, n) as ceil(n / 2) pairs at out, the last one's high half 0 when n is odd.
inline void to_bf16_pairs(const float* x, Index n, Bf16Pair* out) {
  Index i = 0;
#if ATTN_BF16_DOT
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(out + i / 2,
                        _mm512_castps_si512(bf16_pairs_of(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16))));
#endif
  for (; i + 1 < n; i += 2) out[i / 2] = bf16_pair(x[i], x[i + 1]);
  if (i < n) out[i / 2] = bf16_pair(x[i], 0.0f);
}

// Rows [0, c) of a row-major matrix in storage S (row stride ks, d columns, each row times its
// row_scale when there is one) as pack_panels<NP> lays out values, in pairs: panel p holds rows
// [p*W, (p+1)*W) (W = NP * 16), as ceil(d/2) rows of W pairs (columns 2t and 2t+1 of each row);
// rows past c and an odd last column are zeros. Tiles of 16 rows x 32 columns are converted and
// transposed in registers, the edges one pair at a time. `packed` is aligned to 64 bytes.
// Built only where ATTN_BF16_DOT: only the bf16 micro-kernels read pairs.
#if ATTN_BF16_DOT
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // PacketBlock<__m512>: see mk::pack_panels
#endif
template <int NP, class S>
void pack_pair_panels(const S* k, Index ks, Index c, Index d, Bf16Pair* packed, const float* row_scale = nullptr) {
  constexpr Index L = 16, NR = Index(NP) * L;
  const Index d2 = (d + 1) / 2;
  const auto value = [&](Index row, Index t) {
    if (t >= d) return 0.0f;
    const float x = to_compute<float>(k[row * ks + t]);
    return row_scale ? row_scale[row] * x : x;
  };
  for (Index j0 = 0; j0 < c; j0 += NR) {
    Bf16Pair* panel = packed + j0 * d2;
    const Index w = std::min(NR, c - j0);
    Index jj = 0;
    for (; jj + L <= w; jj += L) {
      Index t = 0;
      for (; t + 2 * L <= d; t += 2 * L) {
        mk::ei::PacketBlock<__m512, 16> tile{};
        for (Index r = 0; r < L; ++r) {
          const S* row = k + (j0 + jj + r) * ks + t;
          __m512 lo = load_as<float>(row), hi = load_as<float>(row + L);
          if (row_scale) {
            const __m512 s = _mm512_set1_ps(row_scale[j0 + jj + r]);
            lo = _mm512_mul_ps(s, lo), hi = _mm512_mul_ps(s, hi);
          }
          tile.packet[r] = bf16_pairs_of(lo, hi);
        }
        mk::ei::ptranspose(tile);
        for (Index r = 0; r < L; ++r)
          _mm512_store_si512(panel + (t / 2 + r) * NR + jj, _mm512_castps_si512(tile.packet[r]));
      }
      for (; t < d; t += 2)
        for (Index r = 0; r < L; ++r)
          panel[t / 2 * NR + jj + r] = bf16_pair(value(j0 + jj + r, t), value(j0 + jj + r, t + 1));
    }
    for (; jj < w; ++jj)
      for (Index t = 0; t < d; t += 2) panel[t / 2 * NR + jj] = bf16_pair(value(j0 + jj, t), value(j0 + jj, t + 1));
    for (; jj < NR; ++jj)
      for (Index t = 0; t < d2; ++t) panel[t * NR + jj] = 0;
  }
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// V's rows [0, c) (row stride vs, dv columns) as pairs of consecutive rows: out[t][j] holds
// v[2t][j] and v[2t+1][j] (row stride dv), an odd last row paired with 0. Packets of 16 columns
// interleave two rows' conversions in registers; the columns past them go one at a time.
inline void pack_pair_rows(const float* v, Index vs, Index c, Index dv, Bf16Pair* out) {
  for (Index t = 0; t < c; t += 2) {
    const float* a = v + t * vs;
    const float* b = t + 1 < c ? a + vs : nullptr;
    Bf16Pair* o = out + (t / 2) * dv;
    Index j = 0;
    for (; j + 16 <= dv; j += 16) {
      const __m512 x = _mm512_loadu_ps(a + j), y = b ? _mm512_loadu_ps(b + j) : _mm512_setzero_ps();
      // Interleaved as (x0 y0 x1 y1 ... ): the pairs of columns j..j+15, in two halves.
      const __m512 lo =
          _mm512_permutex2var_ps(x, _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0), y);
      const __m512 hi =
          _mm512_permutex2var_ps(x, _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8), y);
      _mm512_storeu_si512(o + j, _mm512_castps_si512(bf16_pairs_of(lo, hi)));
    }
    for (; j < dv; ++j) o[j] = bf16_pair(a[j], b ? b[j] : 0.0f);
  }
}
#endif

}  // namespace attn::detail
