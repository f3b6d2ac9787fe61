// attn/detail/gemm.hpp - y = x W^T + b on attn's threads: the one projection kernel behind
// Linear and MultiHeadAttention's in and out projections, for a weight W in any storage type
// (attn/storage.hpp: T itself, bf16, fp16, or int8 with a scale per row of W).
//
// linear_into cuts the work into tasks and runs them with parallel_tasks; every task is computed by
// one of three kernels, chosen by linear_into alone (kRowsMax, use_packed_gemm):
//
//   linear_rows     x of at most kRowsMax (4) rows - decoding - against W read in place, each row
//                   of W once, front to back, converted in registers (mk::dot_rows, the decode
//                   step's score kernel): bound by streaming W, so its bytes set the speed.
//   linear_packed   attn's register-blocked micro-kernel on Eigen's packets (mk::gemm_tile): W
//                   packed (and converted to T) once per tile and K block, x read in place. On
//                   Zen 4 (AVX-512), float, one thread, 83-107 GFLOP/s at transformer shapes where
//                   Eigen's GEMM runs 60-76 (bench/linear_bench).
//   linear_eigen    one Eigen GEMM per tile plus the bias, for a weight in T: the reference the
//                   tests hold the fast paths to, and the path of builds without SIMD.
//
// Eigen's GEMM is single-threaded here (it threads only under OpenMP, which attn does not
// enable), hence the tiles.
#pragma once

#include "attn/detail/eigen.hpp"
#include <algorithm>
#include <type_traits>

#include "attn/detail/check.hpp"
#include "attn/detail/dot_rows.hpp"
#include "attn/detail/microkernel.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/detail/scratch.hpp"
#include "attn/detail/storage.hpp"
#include "attn/precision.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn::detail {

// A weight W [rows, cols], row-major (row stride `stride` elements), in storage type `storage`; with
// Int8, W's row r is scales[r] times its stored integers. What the kernels read; owned elsewhere
// (attn::Weight, or a caller's matrix).
template <class T>
struct WeightView {
  Storage storage = Storage::Native;
  const void* data = nullptr;
  Index rows = 0, cols = 0, stride = 0;
  const T* scales = nullptr;  // Int8: [rows]

  // Row r as stored (S must be the storage's element type).
  template <class S>
  const S* row(Index r) const {
    return static_cast<const S*>(data) + r * stride;
  }
  // Rows [r0, r0 + n).
  WeightView middle_rows(Index r0, Index n) const {
    WeightView v = *this;
    v.data = static_cast<const unsigned char*>(data) + r0 * stride * storage_bytes<T>(storage);
    v.rows = n;
    if (scales) v.scales = scales + r0;
    return v;
  }
};

// A matrix in T, as a view (its rows must be contiguous: row-major, inner stride 1).
template <class T>
WeightView<T> weight_view(const ConstMatrixRef<T>& w) {
  WeightView<T> v;
  v.data = w.data();
  v.rows = w.rows(), v.cols = w.cols(), v.stride = w.outerStride();
  return v;
}

// How linear_into cuts y [n, out] into tiles of `rows` x `cols` (the last row and column tiles
// may be smaller). A function of (n, in, out) only, never of the thread count: Eigen's blocking,
// and so its summation order, depends on the GEMM's sizes, and fixed tiles give every element
// the same GEMM call - and the same bits - on any number of threads. (linear_packed's summation
// order depends on the K blocks alone, a function of `in`.)
//
// Tiles are up to 512 rows by about 256 columns, and at least 8 when there is the work: then two
// to eight threads have work even at n = 128 (BERT at L = 128 is mostly projections). A tile
// count is kept even where that is free, so two threads split it evenly. Tiles stay >= 128
// columns and >= 8 MFLOP (a thread's worth, see threads_for). Eigen runs tiles of this shape as
// fast as one whole GEMM or faster; on the benchmark machine (AVX-512, 1 MiB L2), float on one
// thread, x [4096, 1024] W [3072, 1024]: 76 GFLOP/s untiled, 81 in 512 x 256 tiles, 70 in
// full-width 256-row tiles; x [1024, 768] W [2304, 768]: 78 untiled, 81-83 in 512 x 256.
struct GemmTiles {
  Index rows = 0, cols = 0;            // tile size
  Index row_tiles = 0, col_tiles = 0;  // tiles down and across
  Index count() const { return row_tiles * col_tiles; }
};

inline GemmTiles gemm_tiles(Index n, Index in, Index out) {
  constexpr Index kMaxRows = 512, kColsTarget = 256, kMinCols = 128, kWantTiles = 8;
  constexpr double kMinTileFlops = 8e6;
  GemmTiles t;
  if (n <= 0 || out <= 0) return t;
  t.row_tiles = (n + kMaxRows - 1) / kMaxRows;
  t.rows = (n + t.row_tiles - 1) / t.row_tiles;  // balanced: 600 rows are 2 x 300, not 512 + 88
  Index col_tiles = std::max((out + kColsTarget - 1) / kColsTarget, (kWantTiles + t.row_tiles - 1) / t.row_tiles);
  if (col_tiles > 1 && t.row_tiles * col_tiles % 2 == 1) --col_tiles;
  const double full_width_flops = 2.0 * double(t.rows) * double(in) * double(out);
  col_tiles = std::min({col_tiles, std::max<Index>(1, out / kMinCols),
                        std::max<Index>(1, static_cast<Index>(full_width_flops / kMinTileFlops))});
  t.cols = (out + col_tiles - 1) / col_tiles;
  t.cols = std::min(out, (t.cols + 15) / 16 * 16);  // whole SIMD packets per tile
  t.col_tiles = (out + t.cols - 1) / t.cols;
  return t;
}

// The K blocks of linear_packed: `in` cut into `count` blocks of `size` (the last may be
// smaller), each <= max_size (kGemmMaxKc) so that a tile's packed W block [~256 cols, size]
// stays in L2 (256 KiB of floats) and a row tile of x [6, size] in L1. Balanced, so in = 1000 is
// 4 x 250, not 3 x 256 + 232. 256, 384 and 512 measured the same within 3%.
struct GemmKBlocks {
  Index size = 0, count = 0;
};
inline constexpr Index kGemmMaxKc = 256;
inline GemmKBlocks gemm_k_blocks(Index in, Index max_size) {
  GemmKBlocks k;
  k.count = std::max<Index>(1, (in + max_size - 1) / max_size);
  k.size = (in + k.count - 1) / k.count;
  return k;
}

namespace mk {

// The GEMM micro-kernel's register tile: kGemmRows rows of x by kGemmPackets packets of output
// columns, kGemmRows * kGemmPackets accumulators. With 32 registers (AVX-512, NEON) 6 x 4 packets
// (24 accumulators, 4 of W, 1 broadcast; BLIS's Zen 4 tile); with 16 (SSE, AVX2) 6 x 2.
// Measured on Zen 4, float, one thread, against Eigen's GEMM: 6 x 4 1.22-2.0x, 12 x 2 1.2-1.6x,
// 8 x 3 1.1-1.8x. x rows are broadcast straight from x: packing them ([kc][MR]) measured 5-15%
// slower, as its cost is repaid only over the few panels of one tile, and 6 rows of any stride
// share an 8-way L1 set without conflict (12 rows 4 KiB apart would not).
inline constexpr int kGemmRows = 6;
inline constexpr int kGemmPackets = kWideRegisters ? 4 : 2;

// y[MR, cols] = (accumulate ? y : bias) + A[MR, kc] B[kc, cols], cols <= NP packets: A rows of x
// (row stride as), B one panel of pack_panels<NP> ([kc][NP packets]), y row stride ys, bias [cols]
// or nullptr (zero). The k-sum runs in registers in order t = 0, 1, ..., kc - 1 and is added to y
// once, so every element's summation order is fixed by the K blocks alone. a and b are Dot's
// operands (mk::FmaDot, mk::Bf16Dot), kc of them per row: with Bf16Dot, pairs (pack_pair_panels).
template <int MR, int NP, class T, class Dot = FmaDot<T>>
EIGEN_STRONG_INLINE void gemm_tile(const typename Dot::Operand* a, Index as, const typename Dot::Operand* b, Index kc,
                                   T* y, Index ys, Index cols, const T* bias, bool accumulate) {
  using P = Packet<T>;
  constexpr int L = kLanes<T>;
  constexpr Index NR = Index(NP) * L;
  P acc[MR][NP];
  ATTN_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTN_UNROLL
    for (int j = 0; j < NP; ++j) acc[r][j] = ei::pzero(P{});
  for (Index t = 0; t < kc; ++t) {
    P bt[NP];
    ATTN_UNROLL
    for (int j = 0; j < NP; ++j) bt[j] = Dot::load(b + t * NR + j * L);
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r) {
      const P at = Dot::broadcast(a + r * as + t);
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) acc[r][j] = Dot::madd(at, bt[j], acc[r][j]);
    }
  }
  if (cols == NR) {
    ATTN_UNROLL
    for (int r = 0; r < MR; ++r)
      ATTN_UNROLL
      for (int j = 0; j < NP; ++j) {
        T* out = y + r * ys + j * L;
        P v = acc[r][j];
        if (accumulate)
          v = ei::padd(ei::ploadu<P>(out), v);
        else if (bias)
          v = ei::padd(ei::ploadu<P>(bias + j * L), v);
        ei::pstoreu(out, v);
      }
    return;
  }
  // A partial panel: the same sums, stored one column at a time.
  EIGEN_ALIGN_MAX T part[MR * NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NP; ++j) ei::pstore(part + r * NR + j * L, acc[r][j]);
  for (int r = 0; r < MR; ++r)
    for (Index c = 0; c < cols; ++c) {
      T& out = y[r * ys + c];
      const T v = part[r * NR + c];
      out = accumulate ? out + v : bias ? bias[c] + v : v;
    }
}

// Calls f(std::integral_constant<int, q>) for q = packets, one of I + 1: the width of the panel
// that ends a tile whose columns are not whole panels.
template <class F, int... I>
EIGEN_STRONG_INLINE void with_packets(Index packets, F&& f, std::integer_sequence<int, I...>) {
  ((packets == I + 1 ? (f(std::integral_constant<int, I + 1>{}), 0) : 0), ...);
}

}  // namespace mk

// The micro-kernel path of linear_into, on the same tiles. A tile's W rows [cols, in] are cut
// into K blocks (gemm_k_blocks); per block they are packed once into panels of kGemmPackets
// packets (the last panel narrower when the columns end early: no work on padding past a
// packet), converted from W's storage type S to T as they are packed, the panels stay in L2, and
// every kGemmRows-row tile of x runs the micro-kernel across them, its rows read in place from L1.
// The first K block writes y (with the bias), later ones add to it. Per-thread scratch (one packed
// W block) is taken before the threads start. The packed values are those of W dequantized, so
// the result is the same bits as this kernel on the dequantized matrix in T.
//
// Dot is the micro-kernel's multiply-add (mk::FmaDot, mk::Bf16Dot): with Bf16Dot, x's rows are
// first converted to bf16 pairs (once, by all threads), W is packed as pairs and the K blocks
// count pairs; `round` (FmaDot only) rounds x and W to bf16 and multiplies them in T, what
// Precision::BFloat16 does without the instruction.
template <class T, class S = T, class Dot = mk::FmaDot<T>, int MR = mk::kGemmRows, int NP = mk::kGemmPackets>
void linear_packed(const ConstMatrixRef<T>& x, const WeightView<T>& w, const T* bias, MatrixRef<T> y, int threads,
                   Index max_kc = kGemmMaxKc, bool round = false) {
  using O = typename Dot::Operand;
  constexpr Index L = mk::kLanes<T>, NR = Index(NP) * L, V = mk::kValuesPerOperand<Dot, T>;
  const Index n = x.rows(), in = x.cols(), out = w.rows;
  const GemmTiles tiles = gemm_tiles(n, in, out);
  if (tiles.count() == 0) return;
  if (in == 0) {  // an empty sum: y is the bias
    for (Index r = 0; r < n; ++r)
      for (Index c = 0; c < out; ++c) y(r, c) = bias ? bias[c] : T(0);
    return;
  }
  const Index in_ops = mk::steps<Dot, T>(in);  // x's and W's rows in operands
  const GemmKBlocks kb = gemm_k_blocks(in_ops, max_kc);
  const int t = static_cast<int>(std::min<Index>(threads > 0 ? threads : num_threads(), tiles.count()));
  const Index slice = (tiles.cols + NR - 1) / NR * NR * kb.size;  // whole panels: a multiple of a packet
  // x as operands, when they are not x itself: rounded, or pairs.
  const bool convert_x = round || V > 1;
  const Index x_part = convert_x ? (n * in_ops + 15) / 16 * 16 : 0;
  Scratch<O> scratch(x_part + slice * t);
  T* const y0 = y.data();
  const Index ys = y.outerStride(), ws = w.stride;
  const O* x0 = nullptr;
  Index xs = 0;
  if (convert_x) {
    O* const xo = scratch.data();
    parallel_tasks(n, t, [&](Index first, Index step) {
      for (Index r = first; r < n; r += step) mk::row_operands<Dot>(x.row(r).data(), in, xo + r * in_ops, round);
    });
    x0 = xo, xs = in_ops;
  } else {
    if constexpr (std::is_same_v<O, T>) x0 = x.data(), xs = x.outerStride();
  }
  [[maybe_unused]] const NoEigenMalloc no_malloc;  // checked in tests built with EIGEN_RUNTIME_NO_MALLOC
  parallel_tasks(tiles.count(), t, [&](Index first, Index step) {
    O* const packed = scratch.data() + x_part + first * slice;
    for (Index task = first; task < tiles.count(); task += step) {
      const Index r0 = (task / tiles.col_tiles) * tiles.rows, c0 = (task % tiles.col_tiles) * tiles.cols;
      const Index nr = std::min(tiles.rows, n - r0), nc = std::min(tiles.cols, out - c0);
      const Index full = nc / NR * NR;                     // columns in whole panels
      const Index tail_packets = (nc - full + L - 1) / L;  // the narrower last panel, 0 if none
      for (Index k0 = 0; k0 < in_ops; k0 += kb.size) {
        const Index kc = std::min(kb.size, in_ops - k0);        // operands
        const Index kv = std::min(kc * V, in - k0 * V);         // values
        const bool accumulate = k0 > 0;
        const S* wk = w.template row<S>(c0) + k0 * V;
        const T* scale = w.scales ? w.scales + c0 : nullptr;
        mk::pack_operands<NP, Dot>(wk, ws, full, kv, packed, scale, round);
        mk::with_packets(
            tail_packets,
            [&](auto q) {
              mk::pack_operands<decltype(q)::value, Dot>(wk + full * ws, ws, nc - full, kv, packed + full * kc,
                                                          scale ? scale + full : nullptr, round);
            },
            std::make_integer_sequence<int, NP>{});
        mk::for_row_tiles<MR>(nr, [&](Index i, auto tile_rows) {
          constexpr int R = decltype(tile_rows)::value;
          const O* xa = x0 + (r0 + i) * xs + k0;
          T* yrow = y0 + (r0 + i) * ys + c0;
          for (Index c = 0; c < full; c += NR)
            mk::gemm_tile<R, NP, T, Dot>(xa, xs, packed + c * kc, kc, yrow + c, ys, NR,
                                         bias ? bias + c0 + c : nullptr, accumulate);
          mk::with_packets(
              tail_packets,
              [&](auto q) {
                mk::gemm_tile<R, decltype(q)::value, T, Dot>(xa, xs, packed + full * kc, kc, yrow + full, ys,
                                                             nc - full, bias ? bias + c0 + full : nullptr,
                                                             accumulate);
              },
              std::make_integer_sequence<int, NP>{});
        });
      }
    }
  });
}

// The Eigen path of linear_into: each tile one Eigen GEMM, then the bias.
template <class T>
void linear_eigen(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& w, const T* bias, MatrixRef<T> y, int threads) {
  const Index n = x.rows(), out = w.rows();
  const GemmTiles tiles = gemm_tiles(n, x.cols(), out);
  parallel_tasks(tiles.count(), threads, [&](Index first, Index step) {
    for (Index task = first; task < tiles.count(); task += step) {
      const Index r0 = (task / tiles.col_tiles) * tiles.rows, c0 = (task % tiles.col_tiles) * tiles.cols;
      const Index nr = std::min(tiles.rows, n - r0), nc = std::min(tiles.cols, out - c0);
      auto tile = y.block(r0, c0, nr, nc);
      tile.noalias() = x.middleRows(r0, nr) * w.middleRows(c0, nc).transpose();
      if (bias) tile.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias + c0, nc);
    }
  });
}

// x of at most this many rows goes to linear_rows: decoding, L <= 4 tokens per step.
inline constexpr Index kRowsMax = 4;

// The few-rows path of linear_into: y [n, out] = x [n, in] W^T + b for n <= kRowsMax, W (storage
// type S) read in place, each row once, by mk::dot_rows, which computes all n dots of a W row
// from one pass over it. Bound by streaming W (a GEMV does 2n FLOPs per element read), so packing
// W, as the GEMM does, would only add a pass; the threads split W's rows into contiguous ranges.
// Each y element is one dot_rows sum whatever the ranges, so the result does not depend on the
// thread count.
template <class T, class S = T>
void linear_rows(const ConstMatrixRef<T>& x, const WeightView<T>& w, const T* bias, MatrixRef<T> y, int threads) {
  const Index n = x.rows(), in = x.cols(), out = w.rows;
  ATTN_ASSERT(n >= 1 && n <= kRowsMax);
  // A few ranges per thread, each a multiple of 16 rows of W.
  const Index tasks = std::max<Index>(1, std::min<Index>((out + 15) / 16, Index(4) * threads));
  const Index cols = ((out + tasks - 1) / tasks + 15) / 16 * 16;
  const Index count = (out + cols - 1) / cols;
  const T* q[kRowsMax] = {};
  for (Index r = 0; r < n; ++r) q[r] = x.row(r).data();
  T* const y0 = y.data();
  const Index ys = y.outerStride();
  parallel_tasks(count, threads, [&](Index first, Index step) {
    for (Index task = first; task < count; task += step) {
      const Index c0 = task * cols, nc = std::min(cols, out - c0);
      mk::for_row_tiles<kRowsMax>(n, [&](Index, auto rows) {  // one call: n as a constant
        mk::dot_rows<decltype(rows)::value>(q, w.template row<S>(c0), w.stride, w.scales ? w.scales + c0 : nullptr,
                                            nc, in, T(1), y0 + c0, ys);
      });
      if (bias)
        for (Index r = 0; r < n; ++r)
          for (Index c = c0; c < c0 + nc; ++c) y0[r * ys + c] += bias[c];
    }
  });
}

// The dispatch rule: x of at most kRowsMax rows goes to linear_rows (bound by reading W: packing
// W first cost 3-4x there, and Eigen's GEMV, which reads four W rows side by side a packet at a
// time, streamed at half the rate); more rows to the micro-kernel when Eigen vectorizes (a packet
// holds more than one scalar): it measured 1.1-1.4x Eigen's GEMM. Without SIMD, a weight in T
// goes to Eigen's GEMM (the micro-kernel is still built and tested there, tests/gemm_scalar_test,
// but not tuned for scalars), a stored one to the micro-kernel, which converts it.
// (A compile-time choice for more than kRowsMax rows: where it is false, Eigen's GEMM is not
// compiled at all, most of what a projection costs to compile.)
template <class T, class S>
inline constexpr bool use_packed_gemm = mk::kLanes<T> > 1 || !std::is_same_v<S, T>;

// x: [n, in]  w: [out, in] in any storage  bias: [out] or nullptr  ->  y: [n, out] = x w^T + bias
// y is sized by the caller and must not overlap x or w. threads: 0 = attn::num_threads(); fewer
// run when the product is small (threads_for). The result is the same, bit for bit, on any
// number of threads: the tiles, the kernel and its K blocks are functions of the shape only.
// precision: BFloat16 runs the GEMM on x and W rounded to bf16 (attn/precision.hpp): on the bf16
// micro-kernel where the compiler targets VDPBF16PS (float), else rounded and multiplied in T.
// The few-rows path reads W once whatever the precision, and stays in T.
template <class T>
void linear_into(const ConstMatrixRef<T>& x, const WeightView<T>& w, const T* bias, MatrixRef<T> y, int threads = 0,
                 Precision precision = Precision::Native) {
  ATTN_ASSERT(x.cols() == w.cols && y.rows() == x.rows() && y.cols() == w.rows);
  const Index n = x.rows(), in = x.cols(), out = w.rows;
  if (n == 0 || out == 0) return;
  // Under OpenMP, Eigen threads each GEMM itself; attn's threads on top would oversubscribe.
  const bool eigen_threads = Eigen::nbThreads() > 1;
  with_storage<T>(w.storage, [&](auto tag) {
    using S = typename decltype(tag)::type;
    if (n <= kRowsMax) {
      // Work by the bytes of W: a thread's worth of streaming is about 1 MiB.
      const double bytes = double(in) * double(out) * double(sizeof(S));
      linear_rows<T, S>(x, w, bias, y, eigen_threads ? 1 : threads_for(8.0 * bytes, threads));
      return;
    }
    const int t = eigen_threads ? 1 : threads_for(2.0 * double(n) * double(in) * double(out), threads);
    const bool bf16 = precision == Precision::BFloat16;
#if ATTN_BF16_DOT
    if constexpr (std::is_same_v<T, float>)
      if (bf16) return linear_packed<T, S, mk::Bf16Dot>(x, w, bias, y, t);
#endif
    if constexpr (!use_packed_gemm<T, S>) {  // Eigen's GEMM, unless the operands must be rounded
      if (!bf16)
        return linear_eigen<T>(x,
                               Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>(static_cast<const T*>(w.data), out,
                                                                                    in, Eigen::OuterStride<>(w.stride)),
                               bias, y, t);
    }
    linear_packed<T, S>(x, w, bias, y, t, kGemmMaxKc, bf16);
  });
}

// The same for a weight matrix in T.
template <class T>
void linear_into(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& w, const T* bias, MatrixRef<T> y,
                 int threads = 0, Precision precision = Precision::Native) {
  linear_into<T>(x, weight_view<T>(w), bias, y, threads, precision);
}

// With ATTN_EXTERN_TEMPLATES, compiled once per program (attn/instantiate.hpp); see attention().
#ifdef ATTN_EXTERN_TEMPLATES
extern template void linear_into<float>(const ConstMatrixRef<float>&, const WeightView<float>&, const float*,
                                        MatrixRef<float>, int, Precision);
extern template void linear_into<double>(const ConstMatrixRef<double>&, const WeightView<double>&, const double*,
                                         MatrixRef<double>, int, Precision);
#endif

}  // namespace attn::detail
