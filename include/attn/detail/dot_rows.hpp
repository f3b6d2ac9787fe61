// attn/detail/dot_rows.hpp - a few dense rows against many stored rows, each stored row read once,
// front to back: the matrix-vector products that stream their operand from memory. Two users, one
// kernel: the decoding step's scores (a few query rows against the keys of a KV cache,
// attention_decode.hpp) and a projection of a few rows (linear_rows in gemm.hpp: the weight's rows,
// in any storage type, are the stored rows).
#pragma once

#include <cmath>
#include <type_traits>

#include "attn/detail/eigen.hpp"
#include "attn/detail/packet.hpp"
#include "attn/types.hpp"

namespace attn::detail::mk {

// The sums of four packets: out[i] = sum of the lanes of x[i]. On AVX-512 one transposing
// reduction (13 instructions for the four) instead of four horizontal sums (about 8 each): the
// horizontal sums were a third of the decode step's score instructions.
template <class T>
EIGEN_STRONG_INLINE void reduce4(const mk::Packet<T>* x, T* out) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<T, float> && mk::kLanes<float> == 16) {
    // 128-bit blocks: ab = [a0+a2, a1+a3, b0+b2, b1+b3], cd likewise; v = [a, b, c, d] partials of 4
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x44), _mm512_shuffle_f32x4(x[0], x[1], 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x44), _mm512_shuffle_f32x4(x[2], x[3], 0xEE));
    __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));  // pairs within each block
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));  // halves: every lane of block i holds sum x[i]
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, v)));
    return;
  }
#endif
  for (int i = 0; i < 4; ++i) out[i] = ei::predux(x[i]);
}

// a * b + c, fused where the target has FMA. Written out: left to the compiler (-ffp-contract), one
// instantiation of a loop may fuse it and another not, and a weight in fp16 then gave other bits
// than the same values in float.
template <class T>
EIGEN_STRONG_INLINE T fmadd(T a, T b, T c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// s[r * ss + j] = scale * ks_j * (q_r . k_j) for MR query rows (q[r]) and keys j in [0, n) (rows of
// k in storage type S, row stride ks; ks_j the int8 row scale, 1 without k_scale). Each key row is
// loaded once, front to back, converted in registers, and feeds all MR query rows. Several
// accumulators per query row (4 for one or two rows, 2 for more) keep FMAs in flight: a one-row
// product of an int8 or bf16 weight would otherwise wait on one chain. The MR sums of a key end in one
// four-way reduction (reduce4) when MR >= 3, in horizontal sums otherwise. (Taking 4 / MR keys per
// step to fill the reduction measured 8-15 % slower for one query row from memory, and two weight
// rows per step of a one-row projection 25-45 % slower for bf16, fp16 and int8 weights on Zen 5:
// one key per step.)
template <int MR, class T, class S>
EIGEN_STRONG_INLINE void dot_rows(const T* const* q, const S* k, Index ks, const T* k_scale, Index n, Index d, T scale,
                                  T* s, Index ss) {
  using P = mk::Packet<T>;
  constexpr Index L = mk::kLanes<T>;
  static_assert(MR <= 4, "one reduce4 per key");
  constexpr int U = MR <= 2 ? 4 : 2;  // independent accumulators per query row: U FMA chains in flight
  for (Index j = 0; j < n; ++j) {
    const S* const kj = k + j * ks;
    P acc[U][MR];
    ATTN_UNROLL
    for (int u = 0; u < U; ++u) ATTN_UNROLL
    for (int r = 0; r < MR; ++r) acc[u][r] = ei::pzero(P{});
    Index t = 0;
    for (; t + U * L <= d; t += U * L) {
      ATTN_UNROLL
      for (int u = 0; u < U; ++u) {
        const P x = load_as<T>(kj + t + u * L);
        ATTN_UNROLL
        for (int r = 0; r < MR; ++r) acc[u][r] = ei::pmadd(ei::ploadu<P>(q[r] + t + u * L), x, acc[u][r]);
      }
    }
    for (; t + L <= d; t += L) {
      const P x = load_as<T>(kj + t);
      ATTN_UNROLL
      for (int r = 0; r < MR; ++r) acc[0][r] = ei::pmadd(ei::ploadu<P>(q[r] + t), x, acc[0][r]);
    }
    P sums[4];
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r) {
      sums[r] = acc[0][r];
      ATTN_UNROLL
      for (int u = 1; u < U; ++u) sums[r] = ei::padd(sums[r], acc[u][r]);
    }
    T dot[4];
    if constexpr (MR >= 3) {
      if constexpr (MR == 3) sums[3] = ei::pzero(P{});
      reduce4<T>(sums, dot);
    } else {
      ATTN_UNROLL
      for (int r = 0; r < MR; ++r) dot[r] = ei::predux(sums[r]);
    }
    const T sj = k_scale ? scale * k_scale[j] : scale;
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r) {
      for (Index u = t; u < d; ++u)  // the columns that fill no packet
        dot[r] = fmadd(q[r][u], to_compute<T>(kj[u]), dot[r]);
      s[r * ss + j] = sj * dot[r];
    }
  }
}

}  // namespace attn::detail::mk
