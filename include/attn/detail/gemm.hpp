// attn/detail/gemm.hpp - y = x W^T + b on attn's threads: the one projection kernel behind
// Linear and MultiHeadAttention's in and out projections.
//
// Eigen's GEMM is single-threaded here (it threads only under OpenMP, which attn does not
// enable), so linear_into cuts y into tiles and runs them with parallel_tasks. Each tile is one
// Eigen GEMM of its rows of x against its rows of W.
#pragma once

#include <Eigen/Core>
#include <algorithm>

#include "attn/detail/check.hpp"
#include "attn/detail/parallel.hpp"
#include "attn/types.hpp"

namespace attn::detail {

// How linear_into cuts y [n, out] into tiles of `rows` x `cols` (the last row and column tiles
// may be smaller). A function of (n, in, out) only, never of the thread count: Eigen's blocking,
// and so its summation order, depends on the GEMM's sizes, and fixed tiles give every element
// the same GEMM call - and the same bits - on any number of threads.
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

// x: [n, in]  w: [out, in]  bias: [out] or nullptr  ->  y: [n, out] = x w^T + bias
// y is sized by the caller and must not overlap x or w. threads: 0 = attn::num_threads(); fewer
// run when the product is small (threads_for).
template <class T>
void linear_into(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& w, const T* bias, MatrixRef<T> y,
                 int threads = 0) {
  ATTN_ASSERT(x.cols() == w.cols() && y.rows() == x.rows() && y.cols() == w.rows());
  const Index n = x.rows(), in = x.cols(), out = w.rows();
  const GemmTiles tiles = gemm_tiles(n, in, out);
  // Under OpenMP, Eigen threads each GEMM itself; attn's threads on top would oversubscribe.
  const int t = Eigen::nbThreads() > 1 ? 1 : threads_for(2.0 * double(n) * double(in) * double(out), threads);
  parallel_tasks(tiles.count(), t, [&](Index first, Index step) {
    for (Index task = first; task < tiles.count(); task += step) {
      const Index r0 = (task / tiles.col_tiles) * tiles.rows, c0 = (task % tiles.col_tiles) * tiles.cols;
      const Index nr = std::min(tiles.rows, n - r0), nc = std::min(tiles.cols, out - c0);
      auto tile = y.block(r0, c0, nr, nc);
      tile.noalias() = x.middleRows(r0, nr) * w.middleRows(c0, nc).transpose();
      if (bias) tile.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias + c0, nc);
    }
  });
}

}  // namespace attn::detail
