// tests/gemm_test.cpp - detail/gemm.hpp: the tiling rule, and linear_into and its kernels (the
// few-rows kernel, the packed micro-kernel and Eigen's GEMM) against a plain loop in double, for a
// weight in T and in every storage type (attn::Weight).
//
// Also built as gemm_scalar_test (EIGEN_DONT_VECTORIZE: packets of one scalar, the portable
// micro-kernel) and, on x86, gemm_avx2_test (16-register AVX2 tiles); see tests/CMakeLists.txt.
#include <attn/detail/gemm.hpp>
#include <attn/init.hpp>
#include <attn/weight.hpp>

#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

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

// y = x w^T + b in double, from the inputs as stored.
template <class T>
attn::Matrix<double> reference(const attn::Matrix<T>& x, const attn::Matrix<T>& w, const T* bias) {
  attn::Matrix<double> y = x.template cast<double>() * w.template cast<double>().transpose();
  if (bias)
    for (Index c = 0; c < w.rows(); ++c) y.col(c).array() += double(bias[c]);
  return y;
}

template <class T>
constexpr double random_tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

// The kernels linear_into chooses between, and linear_into itself.
enum class Kernel { Into, Rows, Packed, Eigen };
const char* name(Kernel k) {
  return k == Kernel::Into ? "linear_into" : k == Kernel::Rows ? "rows" : k == Kernel::Packed ? "packed" : "eigen";
}
// The kernels that can take x of n rows (the few-rows kernel takes at most kRowsMax).
std::vector<Kernel> kernels_for(Index n) {
  if (n >= 1 && n <= attn::detail::kRowsMax) return {Kernel::Into, Kernel::Rows, Kernel::Packed, Kernel::Eigen};
  return {Kernel::Into, Kernel::Packed, Kernel::Eigen};
}

template <class T>
void run(Kernel k, const attn::Matrix<T>& x, const attn::Matrix<T>& w, const T* bias, attn::MatrixRef<T> y, int threads,
         Index max_kc = 256) {
  switch (k) {
    case Kernel::Into:
      attn::detail::linear_into<T>(x, w, bias, y, threads);
      break;
    case Kernel::Rows:
      attn::detail::linear_rows<T>(x, attn::detail::weight_view<T>(w), bias, y, threads);
      break;
    case Kernel::Packed:
      attn::detail::linear_packed<T>(x, attn::detail::weight_view<T>(w), bias, y, threads, max_kc);
      break;
    case Kernel::Eigen:
      attn::detail::linear_eigen<T>(x, w, bias, y, threads);
      break;
  }
}

// Random shapes - 1, primes, odd sizes around the micro-kernel's tiles and K blocks, and
// transformer widths - with and without bias, every kernel, against the double loop: float to
// 1e-5 and double to 1e-12 of the output's scale. Output columns past a whole panel, row counts
// that leave every remainder tile, and `in` past one K block are all drawn. Each case also runs
// the packed kernel with tiny K blocks (max_kc 7), so many blocks accumulate into y.
TYPED_TEST(GemmTest, RandomShapesMatchReference) {
  using T = TypeParam;
  std::mt19937_64 rng(20240611);
  const Index sizes[] = {1, 2, 3, 5, 7, 11, 13, 16, 17, 31, 33, 47, 64, 97, 131, 257, 300, 521};
  const auto pick = [&] { return sizes[rng() % std::size(sizes)]; };
  attn::Generator gen(11);
  for (int c = 0; c < 60; ++c) {
    const Index n = pick(), in = pick(), out = pick();
    const bool bias = c % 2 == 1;
    attn::Matrix<T> x(n, in), w(out, in);
    attn::Vector<T> b(out);
    attn::init::uniform(x, -1.0, 1.0, gen);
    attn::init::uniform(w, -1.0, 1.0, gen);
    attn::init::uniform(b, -1.0, 1.0, gen);
    const T* bp = bias ? b.data() : nullptr;
    const attn::Matrix<double> want = reference(x, w, bp);
    for (Kernel k : kernels_for(n)) {
      attn::Matrix<T> y = attn::Matrix<T>::Constant(n, out, T(-99));
      run<T>(k, x, w, bp, y, 1 + c % 3);
      EXPECT_TRUE(matrices_near(y, want, random_tolerance<T>()))
          << name(k) << ": " << n << " x " << in << " -> " << out << (bias ? " with" : " without") << " bias";
    }
    attn::Matrix<T> y = attn::Matrix<T>::Constant(n, out, T(-99));
    run<T>(Kernel::Packed, x, w, bp, y, 2, 7);
    EXPECT_TRUE(matrices_near(y, want, random_tolerance<T>()))
        << "packed, K blocks of <= 7: " << n << " x " << in << " -> " << out << (bias ? " with" : " without")
        << " bias";
  }
}

// Strided operands, as MultiHeadAttention passes them: x a column block of a wider matrix, W a
// row block of a packed in_proj_weight, y a column block whose neighbours stay untouched.
TYPED_TEST(GemmTest, StridedOperands) {
  using T = TypeParam;
  attn::Generator gen(5);
  const Index n = 45, in = 300, out = 70;
  attn::Matrix<T> xs(n, in + 9), ws(3 * out, in);
  attn::Vector<T> b(out);
  attn::init::uniform(xs, -1.0, 1.0, gen);
  attn::init::uniform(ws, -1.0, 1.0, gen);
  attn::init::uniform(b, -1.0, 1.0, gen);
  const attn::Matrix<T> x = xs.middleCols(4, in), w = ws.middleRows(out, out);
  const attn::Matrix<double> want = reference(x, w, b.data());
  for (Kernel k : {Kernel::Into, Kernel::Packed, Kernel::Eigen}) {
    attn::Matrix<T> big = attn::Matrix<T>::Constant(n, out + 5, T(7));
    const attn::ConstMatrixRef<T> xr = xs.middleCols(4, in), wr = ws.middleRows(out, out);
    switch (k) {
      case Kernel::Into:
        attn::detail::linear_into<T>(xr, wr, b.data(), big.middleCols(2, out), 2);
        break;
      case Kernel::Rows:  // 45 rows: linear_rows takes at most kRowsMax
        continue;
      case Kernel::Packed:
        attn::detail::linear_packed<T>(xr, attn::detail::weight_view<T>(wr), b.data(), big.middleCols(2, out), 2);
        break;
      case Kernel::Eigen:
        attn::detail::linear_eigen<T>(xr, wr, b.data(), big.middleCols(2, out), 2);
        break;
    }
    EXPECT_TRUE(matrices_near(big.middleCols(2, out), want, random_tolerance<T>())) << name(k);
    EXPECT_TRUE((big.leftCols(2).array() == T(7)).all()) << name(k);
    EXPECT_TRUE((big.rightCols(3).array() == T(7)).all()) << name(k);
  }
}

// The same bits on 1, 2 and 3 threads, for shapes cut into many tiles (and several K blocks),
// from every kernel: the tiles and the summation order depend on the shape alone.
TYPED_TEST(GemmTest, BitwiseIdenticalOnAnyThreadCount) {
  using T = TypeParam;
  attn::Generator gen(9);
  for (const auto& [n, in, out] : {std::tuple<Index, Index, Index>{64, 520, 1100},
                                   {200, 300, 520},
                                   {1031, 97, 517},
                                   {37, 521, 131},
                                   {3, 521, 1100}}) {
    attn::Matrix<T> x(n, in), w(out, in);
    attn::Vector<T> b(out);
    attn::init::uniform(x, -1.0, 1.0, gen);
    attn::init::uniform(w, -1.0, 1.0, gen);
    attn::init::uniform(b, -1.0, 1.0, gen);
#ifdef EIGEN_DONT_VECTORIZE
    // The scalar build is here for the packed kernel's portable path; Eigen's tiles (Into
    // dispatches to them without vectorization) are covered by the vectorized builds, and would
    // take minutes unoptimised under the sanitizers.
    for (Kernel k : {Kernel::Packed}) {
#else
    for (Kernel k : kernels_for(n)) {
#endif
      attn::Matrix<T> one(n, out);
      run<T>(k, x, w, b.data(), one, 1);
      for (int threads : {2, 3}) {
        attn::Matrix<T> many(n, out);
        run<T>(k, x, w, b.data(), many, threads);
        EXPECT_EQ(std::memcmp(one.data(), many.data(), sizeof(T) * std::size_t(n * out)), 0)
            << name(k) << ": " << n << " x " << in << " -> " << out << ", " << threads << " threads";
      }
    }
  }
}

// An empty sum (in = 0) is the bias, or zero.
TYPED_TEST(GemmTest, EmptyInnerDimension) {
  using T = TypeParam;
  attn::Matrix<T> x(20, 0), w(40, 0);
  attn::Vector<T> b = attn::Vector<T>::LinSpaced(40, 1, 40);
  for (Kernel k : {Kernel::Into, Kernel::Packed, Kernel::Eigen}) {
    attn::Matrix<T> y = attn::Matrix<T>::Constant(20, 40, T(5));
    run<T>(k, x, w, b.data(), y, 2);
    EXPECT_TRUE((y.array() == b.transpose().replicate(20, 1).array()).all()) << name(k);
    run<T>(k, x, w, nullptr, y, 2);
    EXPECT_TRUE((y.array() == T(0)).all()) << name(k);
  }
}

// Whether Eigen's pmadd is one fused instruction. Without SIMD (EIGEN_DONT_VECTORIZE) it is the
// expression a * b + c, which the compiler may fuse in one instantiation and not in another, so
// there "the same bits" below is "within T's rounding".
#ifdef EIGEN_DONT_VECTORIZE
constexpr bool kFusedMultiplyAdd = false;
#else
constexpr bool kFusedMultiplyAdd = true;
#endif

// x [n, in] in [-1, 1], W [out, in] in [-2, 2] kept in storage s, and a bias in [-1, 1]: one
// case of the stored-weight tests below.
template <class T>
struct StoredCase {
  attn::Matrix<T> x, w;
  attn::Vector<T> b;
  attn::Weight<T> stored;
  attn::Matrix<T> wd;  // W as stored, dequantized
  std::string what;
  StoredCase(Index n, Index in, Index out, attn::Storage s, attn::Generator& gen) : x(n, in), w(out, in), b(out) {
    attn::init::uniform(x, -1.0, 1.0, gen);
    attn::init::uniform(w, -2.0, 2.0, gen);
    attn::init::uniform(b, -1.0, 1.0, gen);
    stored = attn::Weight<T>(w, s);
    wd = stored.matrix();
    what = std::string(attn::storage_name(s)) + ": " + std::to_string(n) + " x " + std::to_string(in) + " -> " +
           std::to_string(out);
  }
};

// A weight in bf16, fp16 or int8 (attn::Weight) through every kernel that reads one: the result is
// T arithmetic on the dequantized matrix (Weight::matrix()). The packed GEMM converts W as it packs
// it, so it is the same bits as the GEMM on the dequantized matrix; the few-rows kernel converts in
// registers, so bf16 and fp16 give the same bits too, and int8, whose row scale multiplies the dot
// product instead of each weight, is within T's rounding of it (1e-6 relative for float). Shapes
// with 1 to 5 rows (both sides of kRowsMax), odd widths, and more than one K block; 1 to 3 threads.
TYPED_TEST(GemmTest, StoredWeightsComputeWithTheDequantizedMatrix) {
  using T = TypeParam;
  using attn::Storage;
  std::mt19937_64 rng(7);
  const Index sizes[] = {1, 2, 3, 4, 5, 7, 17, 33, 64, 131, 300, 521};
  const auto pick = [&] { return sizes[rng() % std::size(sizes)]; };
  attn::Generator gen(12);
  for (int c = 0; c < 48; ++c) {
    const Index n = c % 6 == 5 ? pick() : 1 + c % 6, in = pick(), out = pick();
    const Storage s = std::array{Storage::BFloat16, Storage::Float16, Storage::Int8}[std::size_t(c % 3)];
    const StoredCase<T> sc(n, in, out, s, gen);
    // (Not a structured binding: clang 14, which builds the sanitizer tests, cannot capture one in a lambda.)
    const attn::Matrix<T>& x = sc.x;
    const attn::Vector<T>& b = sc.b;
    const attn::Weight<T>& stored = sc.stored;
    const attn::Matrix<T>& wd = sc.wd;
    const std::string& what = sc.what;
    const T* bp = c % 2 ? b.data() : nullptr;
    attn::Matrix<T> y(n, out), want(n, out);
    const int threads = 1 + c % 3;
    attn::detail::linear_into<T>(x, stored.view(), bp, y, threads);
    attn::detail::linear_into<T>(x, wd, bp, want, threads);
    if ((s == Storage::Int8 && n <= attn::detail::kRowsMax) || !kFusedMultiplyAdd) {
      EXPECT_TRUE(matrices_near(y, want.template cast<double>(), std::is_same_v<T, float> ? 1e-6 : 1e-14)) << what;
    } else {
      EXPECT_EQ(std::memcmp(y.data(), want.data(), sizeof(T) * std::size_t(n * out)), 0) << what;
    }
    EXPECT_TRUE(matrices_near(y, reference(x, wd, bp), random_tolerance<T>())) << what;
    // The packed kernel directly, also for the few rows linear_into sends elsewhere, in K blocks of 7.
    attn::detail::with_storage<T>(s, [&](auto tag) {
      using S = typename decltype(tag)::type;
      attn::Matrix<T> packed(n, out), packed_want(n, out);
      attn::detail::linear_packed<T, S>(x, stored.view(), bp, packed, 2, 7);
      attn::detail::linear_packed<T>(x, attn::detail::weight_view<T>(wd), bp, packed_want, 2, 7);
      if (kFusedMultiplyAdd) {
        EXPECT_EQ(std::memcmp(packed.data(), packed_want.data(), sizeof(T) * std::size_t(n * out)), 0)
            << what << ", packed";
      } else {
        EXPECT_TRUE(matrices_near(packed, packed_want.template cast<double>(), std::is_same_v<T, float> ? 1e-6 : 1e-14))
            << what << ", packed";
      }
    });
  }
}

// Precision::BFloat16 (attn/precision.hpp): more than kRowsMax rows of x run on x and W rounded to
// bf16 (W as stored, then dequantized and rounded), products summed in T. So the result is within
// T's summation error, (in + 2) eps sum |x~||w~|, of the exact product of the rounded operands,
// and within the stated bound, bf16_dot_error_bound, of the exact product of the unrounded ones (a
// kernel that skipped a rounding, or paired the wrong columns, misses the first by ~2^-8 / eps).
// Every weight storage, odd widths, K blocks of 7 operands (pairs straddling blocks), 1-3 threads:
// the same bits on any count. Few rows stay in T, the same bits as Native. Run here by whichever
// kernel the build has (the bf16 micro-kernel with AVX512_BF16, else the rounding path), and the
// rounding path (and, where built, the bf16 micro-kernel) directly.
TYPED_TEST(GemmTest, Bf16PrecisionMultipliesTheRoundedOperands) {
  using T = TypeParam;
  using attn::Precision;
  using attn::Storage;
  using attn::detail::bf16_round;
  std::mt19937_64 rng(11);
  const Index sizes[] = {1, 2, 3, 5, 7, 16, 17, 33, 64, 131, 300, 521};
  const auto pick = [&] { return sizes[rng() % std::size(sizes)]; };
  attn::Generator gen(13);
  const double eps = std::numeric_limits<T>::epsilon() / 2;
  for (int c = 0; c < 40; ++c) {
    const Index n = c % 5 == 4 ? 1 + c % 4 : pick() + 4, in = pick(), out = pick();
    const Storage s = std::array{Storage::Native, Storage::BFloat16, Storage::Float16, Storage::Int8}[std::size_t(c % 4)];
    const StoredCase<T> sc(n, in, out, s, gen);
    // (Not a structured binding: clang 14, which builds the sanitizer tests, cannot capture one in a lambda.)
    const attn::Matrix<T>& x = sc.x;
    const attn::Vector<T>& b = sc.b;
    const attn::Weight<T>& stored = sc.stored;
    const attn::Matrix<T>& wd = sc.wd;
    const std::string& what = sc.what;
    const T* bp = c % 2 ? b.data() : nullptr;
    // The bound on the rounded operands (tight) and on the unrounded ones (the stated one).
    const attn::Matrix<double> xr = x.unaryExpr([](T v) { return bf16_round(v); }).template cast<double>();
    const attn::Matrix<double> wr = wd.unaryExpr([](T v) { return bf16_round(v); }).template cast<double>();
    const attn::Matrix<double> xe = x.template cast<double>(), we = wd.template cast<double>();
    const auto check = [&](const attn::Matrix<T>& y, const std::string& kernel) {
      double worst_rounded = 0, worst_stated = 0;
      for (Index r = 0; r < n; ++r)
        for (Index o = 0; o < out; ++o) {
          const double bias = bp ? double(bp[o]) : 0.0;
          const double rounded = bias + xr.row(r).dot(wr.row(o)), exact = bias + xe.row(r).dot(we.row(o));
          const double abs_rounded = std::abs(bias) + xr.row(r).cwiseAbs().dot(wr.row(o).cwiseAbs());
          const double abs_exact = xe.row(r).cwiseAbs().dot(we.row(o).cwiseAbs());
          const double y_ro = double(y(r, o));
          worst_rounded = std::max(worst_rounded, std::abs(y_ro - rounded) / (double(in + 2) * eps * abs_rounded + 1e-300));
          const double stated = double(attn::bf16_dot_error_bound<T>(T(abs_exact), in)) + eps * std::abs(rounded);
          worst_stated = std::max(worst_stated, std::abs(y_ro - exact) / (stated + 1e-300));
        }
      EXPECT_LE(worst_rounded, 1.0) << what << ", " << kernel << ": error against the rounded operands' product";
      EXPECT_LE(worst_stated, 1.0) << what << ", " << kernel << ": error against bf16_dot_error_bound";
    };
    attn::Matrix<T> y(n, out), again(n, out);
    attn::detail::linear_into<T>(x, stored.view(), bp, y, 1 + c % 3, Precision::BFloat16);
    attn::detail::linear_into<T>(x, stored.view(), bp, again, 3 - c % 3, Precision::BFloat16);
    EXPECT_EQ(std::memcmp(y.data(), again.data(), sizeof(T) * std::size_t(n * out)), 0) << what << ": thread counts";
    if (n <= attn::detail::kRowsMax) {
      attn::detail::linear_into<T>(x, stored.view(), bp, again, 2);
      EXPECT_EQ(std::memcmp(y.data(), again.data(), sizeof(T) * std::size_t(n * out)), 0) << what << ": few rows";
      continue;
    }
    check(y, "linear_into");
    attn::detail::with_storage<T>(s, [&](auto tag) {
      using S = typename decltype(tag)::type;
      attn::Matrix<T> k(n, out);
      attn::detail::linear_packed<T, S>(x, stored.view(), bp, k, 2, 7, /*round=*/true);
      check(k, "rounding path, K blocks of 7");
#if ATTN_BF16_DOT
      if constexpr (std::is_same_v<T, float>) {
        attn::detail::linear_packed<T, S, attn::detail::mk::Bf16Dot>(x, stored.view(), bp, k, 2, 7);
        check(k, "bf16 micro-kernel, K blocks of 7 pairs");
      }
#endif
    });
  }
}

}  // namespace
