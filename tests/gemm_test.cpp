// tests/gemm_test.cpp - detail/gemm.hpp: the tiling rule and linear_into against a plain loop.
#include <attn/detail/gemm.hpp>
#include <attn/init.hpp>

#include <tuple>

#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::detail::gemm_tiles;
using attn_test::matrices_near;

// The rule at the shapes it was made for (see gemm.hpp):
//   BERT's fused q/k/v at L = 128: x [128, 768] W [2304, 768]: one row chunk; 2304 / 256 = 9
//     column tiles, odd, so 8 of 288.
//   Its out projection [128, 768] -> [768]: 8 tiles wanted, 768 / 128 = 6 at most -> 6 of 128.
//   [1024, 768] -> [2304]: 2 row chunks of 512 x 9 columns of 256 = 18 tiles.
//   [4096, 1024] -> [3072]: 8 row chunks of 512 x 12 of 256.
//   600 rows -> 2 balanced chunks of 300; [600, 768] -> [768]: 3 columns wanted for the target
//     width, 4 for the count -> 4 of 192.
//   One token ([1, 768] -> [2304], 3.5 MFLOP) and [111, 96] -> [288] (6 MFLOP) are below one
//     thread's worth (8 MFLOP): one tile.
TEST(GemmTiles, RuleByHand) {
  const auto expect = [](Index n, Index in, Index out, Index rows, Index row_tiles, Index cols, Index col_tiles) {
    const auto t = gemm_tiles(n, in, out);
    EXPECT_EQ(t.rows, rows) << n << " x " << in << " -> " << out;
    EXPECT_EQ(t.row_tiles, row_tiles) << n << " x " << in << " -> " << out;
    EXPECT_EQ(t.cols, cols) << n << " x " << in << " -> " << out;
    EXPECT_EQ(t.col_tiles, col_tiles) << n << " x " << in << " -> " << out;
  };
  expect(128, 768, 2304, 128, 1, 288, 8);
  expect(128, 768, 768, 128, 1, 128, 6);
  expect(1024, 768, 2304, 512, 2, 256, 9);
  expect(4096, 1024, 3072, 512, 8, 256, 12);
  expect(600, 768, 768, 300, 2, 192, 4);
  expect(1, 768, 2304, 1, 1, 2304, 1);
  expect(111, 96, 288, 111, 1, 288, 1);
}

// The tiles cover [n, out] exactly, for many shapes.
TEST(GemmTiles, CoverTheOutput) {
  for (Index n : {1, 2, 17, 255, 256, 257, 700, 5000})
    for (Index in : {1, 8, 768})
      for (Index out : {1, 15, 16, 130, 384, 2304}) {
        const auto t = gemm_tiles(n, in, out);
        EXPECT_TRUE(t.rows * (t.row_tiles - 1) < n && n <= t.rows * t.row_tiles) << n << " " << in << " " << out;
        EXPECT_TRUE(t.cols * (t.col_tiles - 1) < out && out <= t.cols * t.col_tiles) << n << " " << in << " " << out;
      }
}

template <class T>
class GemmTest : public ::testing::Test {};
TYPED_TEST_SUITE(GemmTest, attn_test::Scalars, attn_test::ScalarName);

// linear_into against the plain loop y = x W^T (+ b), on 1 and 3 threads, with and without
// bias, written into a block of a larger matrix (row stride wider than the output) whose other
// columns stay untouched. Shapes: one row, one tile, many tiles.
TYPED_TEST(GemmTest, MatchesPlainLoop) {
  using T = TypeParam;
  attn::Generator gen(3);
  for (const auto& [n, in, out] : {std::tuple<Index, Index, Index>{1, 5, 3}, {7, 8, 20}, {300, 128, 512}}) {
    attn::Matrix<T> x(n, in), w(out, in);
    attn::Vector<T> b(out);
    attn::init::uniform(x, -1.0, 1.0, gen);
    attn::init::uniform(w, -1.0, 1.0, gen);
    attn::init::uniform(b, -1.0, 1.0, gen);
    for (const bool bias : {false, true}) {
      for (int threads : {1, 3}) {
        attn::Matrix<T> big = attn::Matrix<T>::Constant(n, out + 3, T(7));
        attn::detail::linear_into<T>(x, w, bias ? b.data() : nullptr, big.middleCols(1, out), threads);
        attn::Matrix<double> want = attn::Matrix<double>::Constant(n, out + 3, 7.0);
        for (Index r = 0; r < n; ++r)
          for (Index c = 0; c < out; ++c) {
            double sum = bias ? double(b(c)) : 0.0;
            for (Index k = 0; k < in; ++k) sum += double(x(r, k)) * double(w(c, k));
            want(r, c + 1) = sum;
          }
        EXPECT_TRUE(matrices_near(big, want, 10 * attn_test::tolerance<T>()))
            << n << " x " << in << " -> " << out << (bias ? " with" : " without") << " bias, " << threads << " threads";
      }
    }
  }
}

}  // namespace
