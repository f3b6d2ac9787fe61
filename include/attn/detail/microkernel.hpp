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
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

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

// Keys [0, c) of a block, rows of `k` (row stride ks), packed for score_rows: panels of kPanel
// keys, each stored k-major ([d][kPanel]).
template <class T>
void pack_keys(const T* k, Index ks, Index c, Index d, T* packed) {
  pack_panels<kPanelPackets>(k, ks, c, d, packed);
}

// Scores of MR query rows (q, row stride qs) against the first `panels` packed panels, scaled, into
// s (row stride ss, a multiple of kPanel). Each row's max over keys [0, c) goes to row_max; keys
// in [c, panels * kPanel) are padding and are left out of it.
template <int MR, class T>
EIGEN_STRONG_INLINE void score_rows(const T* q, Index qs, const T* packed, Index panels, Index c, Index d, T scale,
                                    T* s, Index ss, T* row_max) {
  using P = Packet<T>;
  constexpr int L = kLanes<T>, NP = kPanelPackets;
  constexpr Index NR = kPanel<T>;
  const P vscale = ei::pset1<P>(scale);
  P vmax[MR];
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r) vmax[r] = ei::pset1<P>(-std::numeric_limits<T>::infinity());
  const Index full = c / NR;  // panels with no padding
  for (Index pnl = 0; pnl < panels; ++pnl) {
    const T* b = packed + pnl * NR * d;
    P acc[MR][NP];
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r)
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) acc[r][j] = ei::pzero(P{});
    for (Index t = 0; t < d; ++t) {
      P bt[NP];
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) bt[j] = ei::pload<P>(b + t * NR + j * L);
      ATTN_UNROLL
      for (int r = 0; r < MR; ++r) {
        const P a = ei::pset1<P>(q[r * qs + t]);
        ATTN_UNROLL
        for (int j = 0; j < NP; ++j) acc[r][j] = ei::pmadd(a, bt[j], acc[r][j]);
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
// values v read in place (row stride vs), output o (row stride os).
template <int MR, int NP, class T>
EIGEN_STRONG_INLINE void pv_tile(const T* p, Index ps, const T* v, Index vs, Index c, const T* alpha, T* o,
                                 Index os) {
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
    for (int j = 0; j < NP; ++j) vt[j] = ei::ploadu<P>(v + t * vs + j * L);
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r) {
      const P a = ei::pset1<P>(p[r * ps + t]);
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) acc[r][j] = ei::pmadd(a, vt[j], acc[r][j]);
    }
  }
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTN_UNROLL
    for (int j = 0; j < NP; ++j) ei::pstoreu(o + r * os + j * L, acc[r][j]);
}

// pv_tile over all dv columns of MR rows: chunks of kPvPackets packets, then the leftover
// packets, then the columns that fill no packet, one at a time.
template <int MR, class T>
EIGEN_STRONG_INLINE void pv_rows(const T* p, Index ps, const T* v, Index vs, Index c, Index dv, const T* alpha, T* o,
                                 Index os) {
  constexpr Index L = kLanes<T>, W = kPvPackets * L;
  Index j = 0;
  for (; j + W <= dv; j += W) pv_tile<MR, kPvPackets>(p, ps, v + j, vs, c, alpha, o + j, os);
  switch ((dv - j) / L) {
    case 3:
      pv_tile<MR, 3>(p, ps, v + j, vs, c, alpha, o + j, os), j += 3 * L;
      break;
    case 2:
      pv_tile<MR, 2>(p, ps, v + j, vs, c, alpha, o + j, os), j += 2 * L;
      break;
    case 1:
      pv_tile<MR, 1>(p, ps, v + j, vs, c, alpha, o + j, os), j += L;
      break;
    default:
      break;
  }
  for (; j < dv; ++j)
    for (int r = 0; r < MR; ++r) {
      T acc = alpha[r] * o[r * os + j];
      for (Index t = 0; t < c; ++t) acc += p[r * ps + t] * v[t * vs + j];
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
