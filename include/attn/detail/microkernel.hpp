// attn/detail/microkernel.hpp - the register-blocked inner loops of the flash kernel, written on
// Eigen's packet primitives so that one source serves SSE, AVX2, AVX-512 and NEON. Compiled with
// EIGEN_DONT_VECTORIZE the packet is the scalar itself and the same loops are the portable
// fallback (tests/attention_portable_test.cpp runs them that way).
//
// Eigen's own GEMM re-packs both operands of every product it is given; on blocks of a few
// hundred rows that costs a quarter of the time. Here the key block is packed once and reused by
// every query row of the task, queries are broadcast straight from their rows, values are read in
// place, and the softmax's exponentials and row sum are one pass over the scores.
//
//   pack_panels<NP>  rows [c, d] -> panels of NP packets of rows, each stored d-major (also the
//                    W^T panels of the GEMM micro-kernel, detail/gemm.hpp, from any storage type)
//   pack_keys        K [c, d] -> panels of kPanel keys, each stored k-major ([d][kPanel])
//   score_rows<MR>   s[MR, cpad] = scale * Q[MR, d] K^T, and each row's max
//   exp_sum_row      s = exp(s - m) (masked keys exactly 0), returns the row's sum
//   pv_rows<MR>      O[MR, dv] = alpha * O + P[MR, c] V[c, dv]
//   score_tile, pv_row_tiles   the same two for a row count known at run time (out of line)
//   FmaDot, Bf16Dot  the multiply-add of score_rows, pv_tile and gemm_tile (detail/gemm.hpp): on
//                    values of T, or on pairs of bf16 (Precision::BFloat16, detail/bf16.hpp)
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "attn/detail/bf16.hpp"
#include "attn/detail/check.hpp"
#include "attn/detail/packet.hpp"
#include "attn/types.hpp"

namespace attn::detail::mk {

// Register tiles, from the number of vector registers: the score tile holds MR x 2 packets of
// accumulators, the P.V tile MR x 4; with 32 registers (AVX-512, NEON) that is 24 of them plus
// the operands, with 16 (SSE, AVX2) 12.
inline constexpr int kScoreRows = kWideRegisters ? 12 : 6;
inline constexpr int kPanelPackets = 2;
inline constexpr int kPvRows = kWideRegisters ? 6 : 3;
inline constexpr int kPvPackets = 4;

template <class T>
inline constexpr Index kPanel = Index(kPanelPackets) * kLanes<T>;  // keys per packed panel

// The multiply-add of the micro-kernels, which are written once on it: acc += a * b, where a is one
// Operand broadcast to every lane and b a packet of Operands (load: aligned, loadu: not). FmaDot
// multiplies values of T; Bf16Dot, pairs of bf16 (VDPBF16PS), each lane adding the two products
// of its pair, so its kernels run over half as many steps of the summed index. scalar() is one
// lane of the same, for the columns that fill no packet.
template <class T>
struct FmaDot {
  using Operand = T;
  using P = Packet<T>;
  static EIGEN_STRONG_INLINE P broadcast(const T* a) { return ei::pset1<P>(*a); }
  static EIGEN_STRONG_INLINE P load(const T* b) { return ei::pload<P>(b); }
  static EIGEN_STRONG_INLINE P loadu(const T* b) { return ei::ploadu<P>(b); }
  static EIGEN_STRONG_INLINE P madd(const P& a, const P& b, const P& acc) { return ei::pmadd(a, b, acc); }
  static T scalar(T acc, T a, T b) { return acc + a * b; }
};

#if ATTN_BF16_DOT
struct Bf16Dot {
  using Operand = Bf16Pair;
  using P = Packet<float>;
  static EIGEN_STRONG_INLINE P broadcast(const Bf16Pair* a) { return _mm512_castsi512_ps(_mm512_set1_epi32(int(*a))); }
  static EIGEN_STRONG_INLINE P load(const Bf16Pair* b) { return _mm512_castsi512_ps(_mm512_load_si512(b)); }
  static EIGEN_STRONG_INLINE P loadu(const Bf16Pair* b) { return _mm512_castsi512_ps(_mm512_loadu_si512(b)); }
  static EIGEN_STRONG_INLINE P madd(const P& a, const P& b, const P& acc) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
  static float scalar(float acc, Bf16Pair a, Bf16Pair b) {  // the instruction's order: high pair first
    acc = std::fma(bf16_to_float(std::uint16_t(a >> 16)), bf16_to_float(std::uint16_t(b >> 16)), acc);
    return std::fma(bf16_to_float(std::uint16_t(a & 0xFFFFu)), bf16_to_float(std::uint16_t(b & 0xFFFFu)), acc);
  }
};
#endif

// Rows [0, c) of a row-major matrix (row stride ks, d columns) packed into panels of NP packets
// of rows, each panel stored column-major ([d][NP * kLanes]): panel p holds rows
// [p*W, (p+1)*W) as d rows of W values, rows past c are zero. This is the layout of B panels
// for a micro-kernel that broadcasts A: keys for score_rows, weight rows (columns of W^T) for the
// GEMM. The rows may be in a storage type S (attn/storage.hpp), converted to T as they are loaded
// (load_as), each times its row_scale when there is one (int8): the panel holds exactly the
// values dequantize would give. Square tiles of kLanes rows x kLanes columns are transposed in
// registers; the edges go one value at a time. `packed` is aligned to a packet.
// (PacketBlock<__m512, 16> makes GCC warn that the vector type's alignment attribute is dropped
// from the template argument; Eigen silences the same warning inside its own headers.)
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
template <int NP, class S, class T>
void pack_panels(const S* k, Index ks, Index c, Index d, T* packed, const T* row_scale = nullptr) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>, NR = Index(NP) * kLanes<T>;
  const auto value = [&](Index row, Index t) {
    const T x = to_compute<T>(k[row * ks + t]);
    return row_scale ? row_scale[row] * x : x;
  };
  for (Index j0 = 0; j0 < c; j0 += NR) {
    T* panel = packed + j0 * d;
    const Index w = std::min(NR, c - j0);
    Index jj = 0;
    for (; jj + L <= w; jj += L) {
      Index t = 0;
      for (; t + L <= d; t += L) {
        ei::PacketBlock<P, L> tile{};  // filled below: g++ 12 and clang 14 -O3 emit no zeroing
        for (Index r = 0; r < L; ++r) {
          tile.packet[r] = load_as<T>(k + (j0 + jj + r) * ks + t);
          if (row_scale) tile.packet[r] = ei::pmul(ei::pset1<P>(row_scale[j0 + jj + r]), tile.packet[r]);
        }
        ei::ptranspose(tile);
        for (Index r = 0; r < L; ++r) ei::pstore(panel + (t + r) * NR + jj, tile.packet[r]);
      }
      for (; t < d; ++t)
        for (Index r = 0; r < L; ++r) panel[t * NR + jj + r] = value(j0 + jj + r, t);
    }
    for (; jj < w; ++jj)
      for (Index t = 0; t < d; ++t) panel[t * NR + jj] = value(j0 + jj, t);
    for (; jj < NR; ++jj)
      for (Index t = 0; t < d; ++t) panel[t * NR + jj] = T(0);
  }
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// Rows [0, c) of k (storage S, row stride ks, d columns) as Dot's packed operands: pack_panels for
// FmaDot (rounded to bf16 in place when `round`: Precision::BFloat16 where there is no bf16
// instruction), pack_pair_panels for Bf16Dot (d/2 rows of pairs, rounded up). The one packing of
// keys and of the GEMM's W panels, whatever the precision.
template <int NP, class Dot, class S, class T>
void pack_operands(const S* k, Index ks, Index c, Index d, typename Dot::Operand* packed, const T* row_scale,
                   bool round) {
  if constexpr (std::is_same_v<typename Dot::Operand, T>) {
    pack_panels<NP>(k, ks, c, d, packed, row_scale);
    constexpr Index NR = Index(NP) * kLanes<T>;
    if (round) round_bf16(packed, (c + NR - 1) / NR * NR * d);
  } else {
#if ATTN_BF16_DOT
    static_assert(std::is_same_v<T, float>);
    pack_pair_panels<NP>(k, ks, c, d, packed, row_scale);
#endif
  }
}

// Operands per value of the summed index: 1 for FmaDot, 1/2 for Bf16Dot's pairs. steps<Dot>(n) is
// how many operands n values take.
template <class Dot, class T>
inline constexpr Index kValuesPerOperand = std::is_same_v<typename Dot::Operand, T> ? 1 : 2;
template <class Dot, class T>
constexpr Index steps(Index n) {
  return (n + kValuesPerOperand<Dot, T> - 1) / kValuesPerOperand<Dot, T>;
}

// Row x[0, n) (in T) as Dot's broadcast operands: copied (rounded to bf16 when `round`) or as pairs.
template <class Dot, class T>
void row_operands(const T* x, Index n, typename Dot::Operand* out, bool round) {
  if constexpr (std::is_same_v<typename Dot::Operand, T>) {
    for (Index i = 0; i < n; ++i) out[i] = round ? bf16_round(x[i]) : x[i];
  } else {
    to_bf16_pairs(x, n, out);
  }
}

// Keys [0, c) of a block, rows of `k` (row stride ks), packed for score_rows: panels of kPanel
// keys, each stored k-major ([d][kPanel]).
template <class T>
void pack_keys(const T* k, Index ks, Index c, Index d, T* packed) {
  pack_panels<kPanelPackets>(k, ks, c, d, packed);
}

// Scores of MR query rows (q, row stride qs) against the first `panels` packed panels, scaled, into
// s (row stride ss, a multiple of kPanel). Each row's max over keys [0, c) goes to row_max; keys
// in [c, panels * kPanel) are padding and are left out of it. q and the panels are Dot's operands,
// d of them per key (with Bf16Dot, pairs: half the head dimension, rounded up).
template <int MR, class T, class Dot = FmaDot<T>>
EIGEN_STRONG_INLINE void score_rows(const typename Dot::Operand* q, Index qs, const typename Dot::Operand* packed,
                                    Index panels, Index c, Index d, T scale, T* s, Index ss, T* row_max) {
  using P = Packet<T>;
  constexpr int L = kLanes<T>, NP = kPanelPackets;
  constexpr Index NR = kPanel<T>;
  const P vscale = ei::pset1<P>(scale);
  P vmax[MR];
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r) vmax[r] = ei::pset1<P>(-std::numeric_limits<T>::infinity());
  const Index full = c / NR;  // panels with no padding
  for (Index pnl = 0; pnl < panels; ++pnl) {
    const typename Dot::Operand* b = packed + pnl * NR * d;
    P acc[MR][NP];
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r)
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) acc[r][j] = ei::pzero(P{});
    for (Index t = 0; t < d; ++t) {
      P bt[NP];
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) bt[j] = Dot::load(b + t * NR + j * L);
      ATTN_UNROLL
      for (int r = 0; r < MR; ++r) {
        const P a = Dot::broadcast(q + r * qs + t);
        ATTN_UNROLL
        for (int j = 0; j < NP; ++j) acc[r][j] = Dot::madd(a, bt[j], acc[r][j]);
      }
    }
    T* out = s + pnl * NR;
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r)
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) {
        acc[r][j] = ei::pmul(acc[r][j], vscale);
        ei::pstore(out + r * ss + j * L, acc[r][j]);
      }
    if (pnl < full) {
      ATTN_UNROLL
      for (int r = 0; r < MR; ++r)
        ATTN_UNROLL
        for (int j = 0; j < NP; ++j) vmax[r] = ei::pmax(vmax[r], acc[r][j]);
    }
  }
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r) {
    T m = ei::predux_max(vmax[r]);
    for (Index j = full * NR; j < c; ++j) m = std::max(m, s[r * ss + j]);
    row_max[r] = m;
  }
}

// The max of s[0, c); -inf when c is 0.
template <class T>
EIGEN_STRONG_INLINE T max_of(const T* s, Index c) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  P vmax = ei::pset1<P>(-std::numeric_limits<T>::infinity());
  Index j = 0;
  for (; j + L <= c; j += L) vmax = ei::pmax(vmax, ei::ploadu<P>(s + j));
  T m = ei::predux_max(vmax);
  for (; j < c; ++j) m = std::max(m, s[j]);
  return m;
}

// s[0, c) = exp(s - m), with keys whose logit is -inf exactly 0 when `masked` (Eigen's pexp clamps
// its argument, so exp(-inf) would come out ~1e-38 instead of the reference's 0). Returns the sum.
// A NaN logit stays NaN (and so does the sum), as in the reference: only -inf means masked.
template <class T>
EIGEN_STRONG_INLINE T exp_sum_row(T* s, Index c, T m, bool masked) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  const P vm = ei::pset1<P>(m);
  const P neg_inf = ei::pset1<P>(-std::numeric_limits<T>::infinity());
  P sum = ei::pzero(P{});
  Index j = 0;
  for (; j + L <= c; j += L) {
    const P x = ei::ploadu<P>(s + j);
    P e = ei::pexp(ei::psub(x, vm));
    if (masked) e = ei::pandnot(e, ei::pcmp_eq(x, neg_inf));
    ei::pstoreu(s + j, e);
    sum = ei::padd(sum, e);
  }
  T total = ei::predux(sum);
  for (; j < c; ++j) {
    s[j] = std::exp(s[j] - m);  // exp(-inf) is 0 here
    total += s[j];
  }
  return total;
}

// O[MR, NP packets] = alpha .* O + P[MR, c] V[c, NP packets]: probabilities p (row stride ps),
// values v read in place (row stride vs), output o (row stride os). p and v are Dot's operands:
// with Bf16Dot, c pairs of keys (pack_pair_rows' V).
template <int MR, int NP, class T, class Dot = FmaDot<T>>
EIGEN_STRONG_INLINE void pv_tile(const typename Dot::Operand* p, Index ps, const typename Dot::Operand* v, Index vs,
                                 Index c, const T* alpha, T* o, Index os) {
  using P = Packet<T>;
  constexpr int L = kLanes<T>;
  P acc[MR][NP];
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r) {
    const P a = ei::pset1<P>(alpha[r]);
    ATTN_UNROLL
    for (int j = 0; j < NP; ++j) acc[r][j] = ei::pmul(a, ei::ploadu<P>(o + r * os + j * L));
  }
  for (Index t = 0; t < c; ++t) {
    P vt[NP];
    ATTN_UNROLL
    for (int j = 0; j < NP; ++j) vt[j] = Dot::loadu(v + t * vs + j * L);
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r) {
      const P a = Dot::broadcast(p + r * ps + t);
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) acc[r][j] = Dot::madd(a, vt[j], acc[r][j]);
    }
  }
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTN_UNROLL
    for (int j = 0; j < NP; ++j) ei::pstoreu(o + r * os + j * L, acc[r][j]);
}

// pv_tile over all dv columns of MR rows: chunks of kPvPackets packets, then the leftover
// packets, then the columns that fill no packet, one at a time.
template <int MR, class T, class Dot = FmaDot<T>>
EIGEN_STRONG_INLINE void pv_rows(const typename Dot::Operand* p, Index ps, const typename Dot::Operand* v, Index vs,
                                 Index c, Index dv, const T* alpha, T* o, Index os) {
  constexpr Index L = kLanes<T>, W = kPvPackets * L;
  Index j = 0;
  for (; j + W <= dv; j += W) pv_tile<MR, kPvPackets, T, Dot>(p, ps, v + j, vs, c, alpha, o + j, os);
  switch ((dv - j) / L) {
    case 3:
      pv_tile<MR, 3, T, Dot>(p, ps, v + j, vs, c, alpha, o + j, os), j += 3 * L;
      break;
    case 2:
      pv_tile<MR, 2, T, Dot>(p, ps, v + j, vs, c, alpha, o + j, os), j += 2 * L;
      break;
    case 1:
      pv_tile<MR, 1, T, Dot>(p, ps, v + j, vs, c, alpha, o + j, os), j += L;
      break;
    default:
      break;
  }
  for (; j < dv; ++j)
    for (int r = 0; r < MR; ++r) {
      T acc = alpha[r] * o[r * os + j];
      for (Index t = 0; t < c; ++t) acc = Dot::scalar(acc, p[r * ps + t], v[t * vs + j]);
      o[r * os + j] = acc;
    }
}

// Runtime row counts onto the compile-time tiles: f(r0, std::integral_constant<int, MR>) for each
// tile of `rows`, Max rows at a time, then one tile of the exact remainder.
template <class F, int... I>
EIGEN_STRONG_INLINE void remainder_tile(Index rest, Index r0, F& f, std::integer_sequence<int, I...>) {
  ((rest == I + 1 ? (f(r0, std::integral_constant<int, I + 1>{}), 0) : 0), ...);
}

template <int Max, class F>
EIGEN_STRONG_INLINE void for_row_tiles(Index rows, F&& f) {
  Index r0 = 0;
  for (; r0 + Max <= rows; r0 += Max) f(r0, std::integral_constant<int, Max>{});
  remainder_tile(rows - r0, r0, f, std::make_integer_sequence<int, Max - 1>{});
}

// score_rows for a row tile of `rows` <= kScoreRows rows, the count at run time, out of line: for
// the blocked kernel, which then compiles its register tiles in one function, not in its loops.
template <class T>
void score_tile(Index rows, const T* q, Index qs, const T* packed, Index panels, Index c, Index d, T scale, T* s,
                Index ss, T* row_max) {
  ATTN_ASSERT(rows >= 1 && rows <= kScoreRows);
  for_row_tiles<kScoreRows>(rows, [&](Index, auto tile_rows) {  // one call, `rows` as a constant
    score_rows<decltype(tile_rows)::value>(q, qs, packed, panels, c, d, scale, s, ss, row_max);
  });
}

// pv_rows over `rows` rows (any count), in register tiles of kPvRows rows; out of line, as score_tile.
template <class T>
void pv_row_tiles(Index rows, const T* p, Index ps, const T* v, Index vs, Index c, Index dv, const T* alpha, T* o,
                  Index os) {
  for_row_tiles<kPvRows>(rows, [&](Index r0, auto tile_rows) {
    pv_rows<decltype(tile_rows)::value>(p + r0 * ps, ps, v, vs, c, dv, alpha + r0, o + r0 * os, os);
  });
}

}  // namespace attn::detail::mk
