// tests/kv_storage_test.cpp - attn/kv_storage.hpp: the KV cache's storage types (bf16, fp16, int8).
//
// 1. The conversions of attn/detail/storage.hpp: round_to by hand (ties to even, the ends of the
//    range, subnormals, the double just past a tie that rounding to float first would lose), then
//    against an independent oracle - the sorted list of all 65536 bit patterns - at every
//    representable value, every midpoint and both neighbours of every midpoint, from float and
//    from double, and at random inputs; quantize_row by hand.
// 2. KVCache with each storage: its bytes, the values keys() and values() give back (exactly the
//    rounded or quantized ones), rings, and the appends it refuses (changing nothing).
// 3. The accuracy contract, on every kernel path (decode: at most 4 queries per head, GQA groups
//    1/2/4/8 and MQA, B = 1 and 3, past one 512-key chunk; flash: prefill and chunked prefill;
//    blocked: forward_with_weights), every storage, float and double, with every mask option:
//    (a) K and V exactly representable in the storage give the Native cache's output (1e-6 float,
//        1e-12 double, relative);
//    (b) random K and V: |out - exact| <= kv_storage_error_bound(...) + T's tolerance per row, where
//        exact is attention_reference in double on the UNROUNDED K and V;
//    (c) 1 and 2 threads give the same bits;
//    (d) decoding token by token equals the prefill of the same compressed cache;
//    (e) the output equals detail::attention_reference on the same bound problem (the stored values).
//
// The attention cases are seeded (kBaseSeed): a failure prints its configuration and seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <attn/detail/attention_reference.hpp>
#include <attn/detail/storage.hpp>
#include <attn/grouped_query_attention.hpp>
#include <attn/kv_cache.hpp>
#include <attn/kv_storage.hpp>
#include <attn/threads.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn::Causal;
using attn::Index;
using attn::KVCache;
using attn::KVStorage;
using attn::detail::quantize_row;
using attn::detail::round_to;
using attn_test::matrices_near;
using bf16 = Eigen::bfloat16;
using fp16 = Eigen::half;
template <class T>
using Mat = attn::Matrix<T>;

[[maybe_unused]] constexpr bool kSanitized = attn_test::kSanitized;
#if defined(__OPTIMIZE__) && defined(NDEBUG)
constexpr bool kOptimized = !kSanitized;  // the attention cases: 30 per (storage, path, T), else 6
#else
constexpr bool kOptimized = false;
#endif

constexpr KVStorage kAllStorages[] = {KVStorage::Native, KVStorage::BFloat16, KVStorage::Float16, KVStorage::Int8};

double p2(int e) { return std::ldexp(1.0, e); }

template <class S>
std::uint16_t bits(S x) {
  return Eigen::numext::bit_cast<std::uint16_t>(x);
}
template <class S>
double value(S x) {
  return double(static_cast<float>(x));
}
template <class S>
const char* format_name() {
  return std::is_same_v<S, bf16> ? "bf16" : "fp16";
}

// Restores the default thread count when it goes out of scope.
struct ThreadCount {
  explicit ThreadCount(int n) { attn::set_num_threads(n); }
  ~ThreadCount() { attn::set_num_threads(0); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;
};

// ------------------------------------------------------------------------------------------------
// 1. storage_name, storage_bytes, storage_unit_roundoff, kv_storage_error_bound

TEST(KVStorage, NamesBytesAndUnitRoundoffs) {
  EXPECT_STREQ(attn::storage_name(KVStorage::Native), "native");
  EXPECT_STREQ(attn::storage_name(KVStorage::BFloat16), "bf16");
  EXPECT_STREQ(attn::storage_name(KVStorage::Float16), "fp16");
  EXPECT_STREQ(attn::storage_name(KVStorage::Int8), "int8");

  static_assert(attn::storage_bytes<float>(KVStorage::Native) == 4);
  static_assert(attn::storage_bytes<double>(KVStorage::Native) == 8);
  static_assert(attn::storage_bytes<float>(KVStorage::BFloat16) == 2);
  static_assert(attn::storage_bytes<double>(KVStorage::Float16) == 2);
  static_assert(attn::storage_bytes<double>(KVStorage::Int8) == 1);

  // Half an ulp of the significand: bf16 keeps 8 significant bits (2^-7 apart at 1, half: 2^-8),
  // fp16 11 (2^-10 apart, half: 2^-11); int8 steps are max|row| / 127 apart, half: max / 254.
  EXPECT_EQ(attn::storage_unit_roundoff<double>(KVStorage::Native), 0.0);
  EXPECT_EQ(attn::storage_unit_roundoff<double>(KVStorage::BFloat16), 0.00390625);
  EXPECT_EQ(attn::storage_unit_roundoff<double>(KVStorage::Float16), 0.00048828125);
  EXPECT_EQ(attn::storage_unit_roundoff<double>(KVStorage::Int8), 1.0 / 254.0);
  EXPECT_EQ(attn::storage_unit_roundoff<float>(KVStorage::BFloat16), 0.00390625f);
  EXPECT_EQ(attn::storage_unit_roundoff<float>(KVStorage::Int8), 1.0f / 254.0f);
}

TEST(KVStorage, ErrorBoundByHand) {
  using attn::kv_storage_error_bound;
  // bound = u max|v| + expm1(2 delta) max|v|,  delta = logit_scale_l1 * u * max|k|.
  // Native: u = 0, so 0 whatever the inputs.
  EXPECT_EQ(kv_storage_error_bound<double>(KVStorage::Native, 100.0, 100.0, 100.0), 0.0);
  // bf16, scale*||q||_1 = 2, max|k| = 4, max|v| = 3: delta = 2 * 2^-8 * 4 = 2^-5,
  // bound = 3 * 2^-8 + 3 * expm1(2^-4) = 0.01171875 + 3 * 0.06449445891785943 = 0.2052021267535783.
  EXPECT_NEAR(kv_storage_error_bound<double>(KVStorage::BFloat16, 2.0, 4.0, 3.0), 0.2052021267535783, 1e-15);
  // fp16, (1, 1, 1): delta = 2^-11, bound = 2^-11 + expm1(2^-10) = 0.00048828125 + 0.0009770508...
  // = 0.0014653207424165351.
  EXPECT_NEAR(kv_storage_error_bound<double>(KVStorage::Float16, 1.0, 1.0, 1.0), 0.0014653207424165351, 1e-17);
  // int8, (1, 127, 254): delta = 1 * (1/254) * 127 = 0.5, so expm1(2 delta) = e - 1 = 1.718281828459045:
  // bound = 254/254 + 254 * 1.718281828459045 = 1 + 436.44358442859743 = 437.44358442859743.
  EXPECT_NEAR(kv_storage_error_bound<double>(KVStorage::Int8, 1.0, 127.0, 254.0), 437.44358442859743, 1e-12);
  // int8, (0.5, 127, 254): delta = 0.25, bound = 1 + 254 * expm1(0.5) = 1 + 254 * 0.6487212707001282
  // = 165.77520275783257.
  EXPECT_NEAR(kv_storage_error_bound<double>(KVStorage::Int8, 0.5, 127.0, 254.0), 165.77520275783257, 1e-12);
  // A zero query leaves the logits alone: only the values' own rounding, u max|v| = 8 * 2^-8 = 2^-5.
  EXPECT_EQ(kv_storage_error_bound<double>(KVStorage::BFloat16, 0.0, 5.0, 8.0), 0.03125);
  EXPECT_NEAR(kv_storage_error_bound<float>(KVStorage::BFloat16, 2.0f, 4.0f, 3.0f), 0.2052021267535783f, 1e-7f);
}

// ------------------------------------------------------------------------------------------------
// round_to by hand

// round_to<S>(x) from float and from double, as a double.
template <class S>
double from_float(double x) {
  return value(round_to<S>(static_cast<float>(x)));
}
template <class S>
double from_double(double x) {
  return value(round_to<S>(x));
}
// x as float is x (the hand cases below are all float values): both paths must agree.
template <class S>
void expect_rounds(double x, double want) {
  ASSERT_EQ(double(static_cast<float>(x)), x) << "not a float: " << x;
  EXPECT_EQ(from_float<S>(x), want) << format_name<S>() << " from float " << x;
  EXPECT_EQ(from_double<S>(x), want) << format_name<S>() << " from double " << x;
  EXPECT_EQ(from_float<S>(-x), -want) << format_name<S>() << " from float " << -x;
  EXPECT_EQ(from_double<S>(-x), -want) << format_name<S>() << " from double " << -x;
}

TEST(RoundTo, BFloat16ByHand) {
  const double inf = std::numeric_limits<double>::infinity();
  // bf16: 8 significant bits, so 2^-7 apart in [1, 2) and 2 apart in [256, 512).
  expect_rounds<bf16>(1.0, 1.0);
  expect_rounds<bf16>(1 + p2(-7), 1 + p2(-7));
  // 1 + 2^-8 is halfway between 1 (significand ...0, even) and 1 + 2^-7 (...1, odd): 1.
  expect_rounds<bf16>(1 + p2(-8), 1.0);
  // 1 + 3*2^-8 is halfway between 1 + 2^-7 (...01, odd) and 1 + 2^-6 (...10, even): 1 + 2^-6.
  expect_rounds<bf16>(1 + 3 * p2(-8), 1 + p2(-6));
  // Past the tie by one float ulp (2^-23): up.
  expect_rounds<bf16>(1 + p2(-8) + p2(-23), 1 + p2(-7));
  // 0.1 = 1.6 * 2^-4, 2^-11 apart there: 0.1 * 2^11 = 204.8 -> 205 * 2^-11 = 0.10009765625.
  expect_rounds<bf16>(double(0.1f), 0.10009765625);
  // 300.5 in [256, 512), 2 apart: 300.5 / 2 = 150.25 -> 150 * 2 = 300.
  expect_rounds<bf16>(300.5, 300.0);
  // The largest bf16 (0x7F7F) = (2 - 2^-7) 2^127 = 3.3895313892515355e38 stays; float's largest,
  // (2 - 2^-23) 2^127, is past the midpoint (2 - 2^-8) 2^127 to 2^128: inf.
  expect_rounds<bf16>((2 - p2(-7)) * p2(127), 3.3895313892515355e38);
  expect_rounds<bf16>(double(std::numeric_limits<float>::max()), inf);
  // The midpoint itself: a tie between 0x7F7F (odd) and the next, 2^128 (even): inf.
  expect_rounds<bf16>((2 - p2(-8)) * p2(127), inf);
  // Subnormals: the smallest is 2^-133 (float's 2^-126 normal minimum, 7 bits below). 2^-134 is
  // halfway between 0 (even) and 2^-133 (odd): 0; 3 * 2^-134 halfway between 2^-133 (odd) and
  // 2 * 2^-133 (even): 2^-132.
  expect_rounds<bf16>(p2(-133), p2(-133));
  expect_rounds<bf16>(p2(-134), 0.0);
  expect_rounds<bf16>(3 * p2(-134), p2(-132));
  expect_rounds<bf16>(p2(-134) + p2(-149), p2(-133));  // past the tie by float's smallest step
  // The sign of zero is kept.
  EXPECT_TRUE(std::signbit(from_float<bf16>(-p2(-140))));
  EXPECT_TRUE(std::signbit(from_double<bf16>(-p2(-140))));
  EXPECT_TRUE(std::isnan(from_double<bf16>(std::nan(""))));
  EXPECT_EQ(from_double<bf16>(-inf), -inf);
}

TEST(RoundTo, Float16ByHand) {
  const double inf = std::numeric_limits<double>::infinity();
  // fp16: 11 significant bits, 2^-10 apart in [1, 2), 32 apart in [32768, 65536).
  expect_rounds<fp16>(1 + p2(-11), 1.0);             // halfway, to the even 1
  expect_rounds<fp16>(1 + 3 * p2(-11), 1 + p2(-9));  // halfway between 1 + 2^-10 (odd) and 1 + 2^-9
  expect_rounds<fp16>(1 + p2(-11) + p2(-23), 1 + p2(-10));
  // 0.1 = 1.6 * 2^-4, 2^-14 apart: 0.1 * 2^14 = 1638.4 -> 1638 * 2^-14 = 0.0999755859375.
  expect_rounds<fp16>(double(0.1f), 0.0999755859375);
  // The largest fp16 (2 - 2^-10) 2^15 = 65504 stays; 65519 < 65520 (halfway to 65536): 65504;
  // 65520 is the tie between 65504 (odd) and 65536 (even, past the range): inf.
  expect_rounds<fp16>(65504.0, 65504.0);
  expect_rounds<fp16>(65519.0, 65504.0);
  expect_rounds<fp16>(65520.0, inf);
  expect_rounds<fp16>(1e6, inf);
  // Subnormals below 2^-14, 2^-24 apart: 2^-24 stays, 2^-25 (tie with 0) -> 0, 3 * 2^-25 (tie
  // between 2^-24, odd, and 2^-23, even) -> 2^-23, and 5 * 2^-26 = 1.25 * 2^-24 -> 2^-24.
  expect_rounds<fp16>(p2(-14), p2(-14));
  expect_rounds<fp16>(p2(-24), p2(-24));
  expect_rounds<fp16>(p2(-25), 0.0);
  expect_rounds<fp16>(3 * p2(-25), p2(-23));
  expect_rounds<fp16>(5 * p2(-26), p2(-24));
  EXPECT_TRUE(std::signbit(from_double<fp16>(-p2(-30))));
  EXPECT_TRUE(std::isnan(from_double<fp16>(std::nan(""))));
  EXPECT_EQ(from_float<fp16>(inf), inf);
}

// A double just past a tie that rounds to the tie as a float: rounding to float first and then to
// S would round twice and go to even; round_to must see that x is past the tie.
TEST(RoundTo, DoubleJustPastATieRoundsOnce) {
  // 1 + 2^-8 + 2^-40: as a float (2^-23 apart) it is 1 + 2^-8, the bf16 tie whose even side is 1;
  // x itself is above the tie: 1 + 2^-7.
  EXPECT_EQ(value(round_to<bf16>(static_cast<float>(1 + p2(-8) + p2(-40)))), 1.0);  // what float sees
  EXPECT_EQ(from_double<bf16>(1 + p2(-8) + p2(-40)), 1 + p2(-7));
  EXPECT_EQ(from_double<bf16>(-(1 + p2(-8) + p2(-40))), -(1 + p2(-7)));
  // Just below a tie whose even side is above: 1 + 3*2^-8 - 2^-40 -> 1 + 2^-7 (float: 1 + 2^-6).
  EXPECT_EQ(from_double<bf16>(1 + 3 * p2(-8) - p2(-40)), 1 + p2(-7));
  EXPECT_EQ(from_double<fp16>(1 + p2(-11) + p2(-40)), 1 + p2(-10));
  EXPECT_EQ(from_double<fp16>(1 + 3 * p2(-11) - p2(-40)), 1 + p2(-10));
  // Across a power of two: 2 - 2^-8 is the bf16 tie between 2 - 2^-7 (odd) and 2 (even); 2^-40
  // below it (a float: the tie itself, which would go to 2): 2 - 2^-7.
  EXPECT_EQ(from_double<bf16>(2 - p2(-8) - p2(-40)), 2 - p2(-7));
  // Subnormal ties: 2^-25 + 2^-60 (float: 2^-25, fp16's tie with 0) -> 2^-24.
  EXPECT_EQ(from_double<fp16>(p2(-25) + p2(-60)), p2(-24));
  EXPECT_EQ(from_double<bf16>(p2(-134) + p2(-160)), p2(-133));
}

// The same beside zero on the negative side: the float guess is -0, whose neighbour -2^-24 has to
// be compared too.
TEST(RoundTo, DoubleJustPastATieBesideZeroRoundsAwayFromZeroOnBothSides) {
  // -(2^-25 + 2^-60): as a float -2^-25, fp16's tie between -0 and -2^-24; x is past it: -2^-24.
  EXPECT_EQ(from_double<fp16>(-(p2(-25) + p2(-60))), -p2(-24));
  // bf16: -(2^-134 + 2^-160) -> -2^-133.
  EXPECT_EQ(from_double<bf16>(-(p2(-134) + p2(-160))), -p2(-133));
}

// Below the overflow threshold a double must not round to inf: 65520 - 2^-20 is nearer 65504 than
// the tie 65520 (which, as a float, it becomes).
TEST(RoundTo, DoubleJustBelowTheOverflowThresholdStaysFinite) {
  EXPECT_EQ(from_double<fp16>(65520 - p2(-20)), 65504.0);
  EXPECT_EQ(from_double<fp16>(-(65520 - p2(-20))), -65504.0);
  // bf16: (2 - 2^-8) 2^127 is the threshold; 2^80 below it (doubles there are 2^75 apart, floats
  // 2^104: as a float, x is the threshold).
  EXPECT_EQ(from_double<bf16>((2 - p2(-8)) * p2(127) - p2(80)), (2 - p2(-7)) * p2(127));
}

// ------------------------------------------------------------------------------------------------
// round_to against an independent oracle: the grid of every representable value.

template <class S>
struct Grid {
  std::vector<double> pos;              // the finite values >= 0 in ascending order, +0 first
  std::vector<std::uint16_t> pos_bits;  // their bit patterns
  double max = 0;                       // the largest finite value
  double beyond = 0;                    // the next grid point past it, 2^(emax + 1)
};

template <class S>
const Grid<S>& grid() {
  static const Grid<S> g = [] {
    Grid<S> r;
    // Patterns with the sign bit clear ascend in value: +0, subnormals, normals, inf, NaN.
    for (unsigned u = 0; u < 0x8000u; ++u) {
      const double x = value(Eigen::numext::bit_cast<S>(static_cast<std::uint16_t>(u)));
      if (!std::isfinite(x)) continue;
      EXPECT_TRUE(r.pos.empty() || x > r.pos.back()) << "pattern " << u;
      r.pos.push_back(x);
      r.pos_bits.push_back(static_cast<std::uint16_t>(u));
    }
    r.max = r.pos.back();
    r.beyond = 2 * r.max - r.pos[r.pos.size() - 2];
    return r;
  }();
  return g;
}

// x rounded to nearest in S, ties to the even pattern, overflowing to inf from the midpoint between
// the largest value and 2^(emax+1) on; zero keeps x's sign.
template <class S>
double nearest_even(double x) {
  const Grid<S>& g = grid<S>();
  const double a = std::abs(x);
  double r;
  if (std::isnan(x)) return x;
  if (a >= (g.max + g.beyond) / 2) {
    r = std::numeric_limits<double>::infinity();
  } else if (a >= g.max) {
    r = g.max;
  } else {
    const std::size_t hi = std::size_t(std::upper_bound(g.pos.begin(), g.pos.end(), a) - g.pos.begin());
    const std::size_t lo = hi - 1;
    const double mid = (g.pos[lo] + g.pos[hi]) / 2;  // exact: one bit more than S has
    if (a == g.pos[lo])
      r = a;
    else if (a < mid)
      r = g.pos[lo];
    else if (a > mid)
      r = g.pos[hi];
    else
      r = g.pos_bits[lo] % 2 == 0 ? g.pos[lo] : g.pos[hi];
  }
  return std::signbit(x) ? -r : r;
}

// Counts round_to's departures from the oracle, printing the first few.
struct Mismatches {
  int count = 0;
  std::ostringstream first;
  template <class S, class In>
  void check(In x) {
    const double want = nearest_even<S>(double(x));
    const double got = value(round_to<S>(x));
    const bool ok = got == want && (want != 0 || std::signbit(got) == std::signbit(want));
    if (ok) return;
    if (++count <= 8) {
      first.precision(17);
      first << "\n  " << format_name<S>() << " from " << (std::is_same_v<In, float> ? "float " : "double ") << double(x)
            << ": got " << got << ", want " << want;
    }
  }
};

// At every representable value, every midpoint between neighbours (and between the largest value
// and 2^(emax+1)), and the In values next to each midpoint on both sides, of both signs. From
// double, the neighbours of a midpoint are the doubles that round to the midpoint as floats: the
// double-rounding case, at every tie.
template <class S, class In>
void check_every_pattern() {
  const Grid<S>& g = grid<S>();
  Mismatches m;
  const In inf = std::numeric_limits<In>::infinity();
  for (std::size_t i = 0; i < g.pos.size(); ++i) {
    const double lo = g.pos[i], hi = i + 1 < g.pos.size() ? g.pos[i + 1] : g.beyond;
    const In mid = static_cast<In>((lo + hi) / 2);
    ASSERT_EQ(double(mid), (lo + hi) / 2);  // the midpoints are float values
    for (const In x : {static_cast<In>(lo), mid, std::nextafter(mid, inf), std::nextafter(mid, -inf)}) {
      m.check<S>(x);
      m.check<S>(static_cast<In>(-x));
    }
  }
  EXPECT_EQ(m.count, 0) << m.first.str();
}

TEST(RoundTo, EveryPatternMidpointAndNeighbourFromFloat) {
  check_every_pattern<bf16, float>();
  check_every_pattern<fp16, float>();
}

TEST(RoundTo, EveryPatternMidpointAndNeighbourFromDouble) {
  check_every_pattern<bf16, double>();
  check_every_pattern<fp16, double>();
}

// Random doubles (all 53 bits) and floats over S's whole range, subnormals and overflow included.
template <class S>
void check_random(std::uint64_t seed, int n) {
  const Grid<S>& g = grid<S>();
  std::mt19937_64 rng(seed);
  const int e_lo = std::ilogb(g.pos[1]) - 2, e_hi = std::ilogb(g.max) + 1;
  std::uniform_int_distribution<int> exponent(e_lo, e_hi);
  std::uniform_real_distribution<double> significand(1.0, 2.0);
  Mismatches m;
  for (int i = 0; i < n; ++i) {
    const double x = std::ldexp(significand(rng), exponent(rng)) * (rng() % 2 ? -1.0 : 1.0);
    m.check<S>(x);
    m.check<S>(static_cast<float>(x));
  }
  EXPECT_EQ(m.count, 0) << m.first.str();
}

TEST(RoundTo, RandomDoublesAndFloatsMatchTheNearestRepresentable) {
  check_random<bf16>(11, 200000);
  check_random<fp16>(12, 200000);
}

// ------------------------------------------------------------------------------------------------
// quantize_row by hand

template <class T>
class QuantizeRow : public ::testing::Test {};
TYPED_TEST_SUITE(QuantizeRow, attn_test::Scalars, attn_test::ScalarName);

TYPED_TEST(QuantizeRow, ByHand) {
  using T = TypeParam;
  std::int8_t q[5];
  // max|x| = 3.96875 = 127/32, so s = 1/32 exactly and x / s = (127, -32, 1.5, -0.5, 2.5): to
  // nearest even (127, -32, 2, -0 -> 0, 2).
  const T x[5] = {T(3.96875), T(-1), T(0.046875), T(-0.015625), T(0.078125)};
  EXPECT_EQ(quantize_row(x, 5, q), T(1) / T(32));
  EXPECT_EQ(std::vector<int>(q, q + 5), (std::vector<int>{127, -32, 2, 0, 2}));
  // The largest magnitude negative: x = (-4, 1, 0, 3), s = 4/127, x / s = (-127, 31.75, 0, 95.25):
  // (-127, 32, 0, 95).
  const T y[4] = {T(-4), T(1), T(0), T(3)};
  EXPECT_EQ(quantize_row(y, 4, q), T(4) / T(127));
  EXPECT_EQ(std::vector<int>(q, q + 4), (std::vector<int>{-127, 32, 0, 95}));
  // A row of zeros: scale 0, every q 0 (whatever was there).
  const T zeros[3] = {T(0), T(-0.0), T(0)};
  std::fill(q, q + 5, std::int8_t(55));
  EXPECT_EQ(quantize_row(zeros, 3, q), T(0));
  EXPECT_EQ(std::vector<int>(q, q + 3), (std::vector<int>{0, 0, 0}));
  // One element: always +-127.
  const T one = T(-0.3);
  EXPECT_EQ(quantize_row(&one, 1, q), T(0.3) / T(127));
  EXPECT_EQ(q[0], -127);
}

// Found by serving_fuzz: at the top of T's range, s = max / 127 rounded up, and 127 * s rounded
// past the largest finite T, so the row's largest value read back as inf. s now steps down once:
// every q * s is finite and within half a step (s / 2) of x.
TYPED_TEST(QuantizeRow, TheLargestFiniteValueStaysFinite) {
  using T = TypeParam;
  const T big = std::numeric_limits<T>::max();
  const T x[3] = {big, -big, big / T(3)};
  std::int8_t q[3];
  const T s = quantize_row(x, 3, q);
  EXPECT_EQ(std::vector<int>(q, q + 3), (std::vector<int>{127, -127, 42}));
  for (int c = 0; c < 3; ++c) {
    const T back = T(q[c]) * s;
    EXPECT_TRUE(std::isfinite(back)) << c;
    EXPECT_LE(std::abs(double(back) - double(x[c])), double(s) / 2 + double(big) * 1e-15) << c;
  }
  // Through a cache: what attention reads back is finite.
  attn::KVCache<T> cache(attn::KVStorage::Int8, 1, 1, 3, 2);
  attn::Matrix<T> row(1, 3);
  row << big, -big, T(1);
  cache.append(0, row, row);
  const attn::Matrix<T> keys = cache.keys(0, 0);
  EXPECT_TRUE(keys.allFinite());
  EXPECT_EQ(keys(0, 0), T(127) * s);
}

// Rows of subnormals: s = max/127 is rounded to the subnormal grid (steps of t = denorm_min), and
// x / s can pass 127.5, so q is clamped to [-127, 127].
TYPED_TEST(QuantizeRow, SubnormalRowsAreClampedToPlusMinus127) {
  using T = TypeParam;
  const T t = std::numeric_limits<T>::denorm_min();
  std::int8_t q[3];
  // max = 190 t: s = 190/127 t = 1.496 t -> t; x / s = (190, -190, 95): clamped to (127, -127, 95).
  const T x[3] = {190 * t, -190 * t, 95 * t};
  EXPECT_EQ(quantize_row(x, 3, q), t);
  EXPECT_EQ(std::vector<int>(q, q + 3), (std::vector<int>{127, -127, 95}));
  // max = 63 t: s = 63/127 t = 0.496 t -> 0: the row is stored as zeros.
  const T y[2] = {63 * t, -10 * t};
  EXPECT_EQ(quantize_row(y, 2, q), T(0));
  EXPECT_EQ(std::vector<int>(q, q + 2), (std::vector<int>{0, 0}));
  // Every max from t to 300 t: |q| <= 127, and the largest element maps to +-127 whenever x / s
  // passes 126.5 (at 126.5 exactly, max = 253 t and s = 2 t, it goes to the even 126).
  for (int m = 1; m <= 300; ++m) {
    SCOPED_TRACE(m);
    const T z[3] = {T(m) * t, -T(m) * t, T(m / 2) * t};
    const T s = quantize_row(z, 3, q);
    for (const std::int8_t v : q) EXPECT_LE(std::abs(int(v)), 127);
    if (s > T(0) && z[0] / s > T(126.5)) {
      EXPECT_EQ(q[0], 127);
      EXPECT_EQ(q[1], -127);
    }
  }
}

// Random rows of every magnitude: |q| <= 127, max |q| = 127, and |s q - x| <= s / 2 (+ T's
// rounding of the division), so within u max|x|, u = 1/254.
TYPED_TEST(QuantizeRow, RandomRowsStayWithinHalfAStep) {
  using T = TypeParam;
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> exponent(-20, 20), length(1, 70);
  std::vector<T> x;
  std::vector<std::int8_t> q;
  for (int t = 0; t < 2000; ++t) {
    const Index n = length(rng);
    const double amp = std::ldexp(1.0, exponent(rng));
    x.resize(std::size_t(n));
    q.resize(std::size_t(n));
    T max_abs = 0;
    for (T& v : x) max_abs = std::max(max_abs, std::abs(v = T(normal(rng) * amp)));
    const T s = quantize_row(x.data(), n, q.data());
    int max_q = 0;
    for (Index c = 0; c < n; ++c) {
      const std::size_t i = std::size_t(c);
      max_q = std::max(max_q, std::abs(int(q[i])));
      ASSERT_LE(std::abs(double(s) * q[i] - double(x[i])), double(max_abs) / 254 * (1 + 1e-5)) << t << ", " << c;
    }
    ASSERT_EQ(max_q, 127) << t;
  }
}

// ------------------------------------------------------------------------------------------------
// 2. KVCache with each storage

// What a cache of `storage` stores for the row x[0, n), as T.
template <class T>
std::vector<T> stored(KVStorage storage, const T* x, Index n) {
  std::vector<T> y(x, x + n);
  if (storage == KVStorage::BFloat16)
    for (T& v : y) v = static_cast<T>(static_cast<float>(round_to<bf16>(v)));
  if (storage == KVStorage::Float16)
    for (T& v : y) v = static_cast<T>(static_cast<float>(round_to<fp16>(v)));
  if (storage == KVStorage::Int8) {
    std::vector<std::int8_t> q(static_cast<std::size_t>(n));
    const T s = quantize_row(x, n, q.data());
    for (Index c = 0; c < n; ++c) y[std::size_t(c)] = s * static_cast<T>(q[std::size_t(c)]);
  }
  return y;
}

// The rows [first, first + n) of head h's columns [h*dim, (h+1)*dim) of m, each as `storage` stores it.
template <class T>
Mat<T> stored_head(KVStorage storage, const Mat<T>& m, Index first, Index n, Index h, Index dim) {
  Mat<T> out(n, dim);
  for (Index r = 0; r < n; ++r) {
    const Mat<T> row = m.block(first + r, h * dim, 1, dim);
    const std::vector<T> y = stored(storage, row.data(), dim);
    for (Index c = 0; c < dim; ++c) out(r, c) = y[std::size_t(c)];
  }
  return out;
}

template <class T>
bool same_bits(const Mat<T>& a, const Mat<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0);
}

TEST(KVStorageCache, BytesPerTokenAndMemory) {
  // 8 kv heads of 128 key and 128 value features: 8 * 256 = 2048 elements per position.
  //   native float: 2048 * 4 = 8192;  double: 2048 * 8 = 16384
  //   bf16, fp16:   2048 * 2 = 4096
  //   int8:         2048 * 1 + 2 scales * 8 heads * sizeof(T) = 2048 + 64 (float) or 2048 + 128 (double)
  const Index want_float[] = {8192, 4096, 4096, 2112};
  const Index want_double[] = {16384, 4096, 4096, 2176};
  for (int i = 0; i < 4; ++i) {
    const KVStorage s = kAllStorages[i];
    SCOPED_TRACE(attn::storage_name(s));
    const KVCache<float> f(s, 1, 8, 128, 16);
    EXPECT_EQ(f.storage(), s);
    EXPECT_EQ(f.bytes_per_token(), want_float[i]);
    EXPECT_EQ(f.memory_bytes(), 16 * want_float[i]);  // 1 sequence of 16 positions
    const KVCache<double> d(s, 2, 8, 128, 16);
    EXPECT_EQ(d.bytes_per_token(), want_double[i]);
    EXPECT_EQ(d.memory_bytes(), 2 * 16 * want_double[i]);
  }
  // The default constructor stores T.
  EXPECT_EQ(KVCache<float>(1, 2, 4, 8).storage(), KVStorage::Native);
  // value_dim != head_dim, int8: 2 heads * (4 + 6) * 1 + 2 * 2 * 4 = 20 + 16 = 36 bytes a position;
  // 3 sequences of capacity 8: 3 * 8 * 36 = 864.
  const KVCache<float> kv(KVStorage::Int8, 3, 2, 4, 8, 0, 6);
  EXPECT_EQ(kv.bytes_per_token(), 36);
  EXPECT_EQ(kv.memory_bytes(), 864);
  // A ring stores every position twice: capacity 8 (window 5) holds 16 rows: 16 * (2*(4+4)*2) = 512.
  const KVCache<float> ring(KVStorage::BFloat16, 1, 2, 4, 8, 5);
  EXPECT_EQ(ring.bytes_per_token(), 32);
  EXPECT_EQ(ring.memory_bytes(), 16 * 32);
}

template <class T>
class KVStorageCacheTyped : public ::testing::Test {};
TYPED_TEST_SUITE(KVStorageCacheTyped, attn_test::Scalars, attn_test::ScalarName);

// keys() and values() give back the stored values exactly: round_to, or quantize_row's s * q.
TYPED_TEST(KVStorageCacheTyped, KeysAndValuesAreTheStoredValuesByHand) {
  using T = TypeParam;
  // One sequence, 2 kv heads of 4 features; one position.
  const Mat<T> k = attn_test::mat<T>({{1 + p2(-8), 1 + 3 * p2(-8), double(0.1f), -300.5,  //
                                       3.96875, -1, 0.046875, -0.015625}});
  const Mat<T> v = attn_test::mat<T>({{1 + p2(-11), 1 + 3 * p2(-11), double(0.1f), 65519,  //
                                       -4, 1, 0, 3}});
  {
    KVCache<T> c(KVStorage::BFloat16, 1, 2, 4, 4);
    c.append(0, k, v);
    // bf16 (above): 1 + 2^-8 -> 1, 1 + 3*2^-8 -> 1 + 2^-6, 0.1 -> 0.10009765625, -300.5 -> -300.
    EXPECT_EQ(Mat<T>(c.keys(0, 0)), attn_test::mat<T>({{1, 1 + p2(-6), 0.10009765625, -300}}));
    // 3.96875 = 127/32 and the others are bf16 values already.
    EXPECT_EQ(Mat<T>(c.keys(0, 1)), k.rightCols(4));
    // 65519: 8 significant bits are 256 apart in [32768, 65536): 65519 / 256 = 255.93 -> 65536.
    EXPECT_EQ(Mat<T>(c.values(0, 0)), attn_test::mat<T>({{1, 1, 0.10009765625, 65536}}));
  }
  {
    KVCache<T> c(KVStorage::Float16, 1, 2, 4, 4);
    c.append(0, k, v);
    // fp16: 1 + 2^-11 -> 1, 1 + 3*2^-11 -> 1 + 2^-9, 0.1 -> 0.0999755859375, 65519 -> 65504.
    EXPECT_EQ(Mat<T>(c.values(0, 0)), attn_test::mat<T>({{1, 1 + p2(-9), 0.0999755859375, 65504}}));
    // 1 + 2^-8 and 1 + 3*2^-8 are fp16 values; 0.1 as above; 300.5 is one too (fp16 values are
    // 2^8 / 2^10 = 0.25 apart in [256, 512)).
    EXPECT_EQ(Mat<T>(c.keys(0, 0)), attn_test::mat<T>({{1 + p2(-8), 1 + 3 * p2(-8), 0.0999755859375, -300.5}}));
    EXPECT_EQ(Mat<T>(c.values(0, 1)), v.rightCols(4));
  }
  {
    KVCache<T> c(KVStorage::Int8, 1, 2, 4, 4);
    c.append(0, k, v);
    // Head 1's keys (3.96875, -1, 0.046875, -0.015625): s = 1/32, q = (127, -32, 2 (1.5 to even),
    // 0 (-0.5 to even)): back (3.96875, -1, 0.0625, 0).
    EXPECT_EQ(Mat<T>(c.keys(0, 1)), attn_test::mat<T>({{3.96875, -1, 0.0625, 0}}));
    // Head 1's values (-4, 1, 0, 3): s = 4/127, q = (-127, 32, 0, 95): back s * q in T.
    const T s = T(4) / T(127);
    EXPECT_EQ(Mat<T>(c.values(0, 1)),
              (attn_test::mat<T>({{double(s * T(-127)), double(s * T(32)), 0, double(s * T(95))}})));
    // Head 0's keys: whatever quantize_row gives, times its scale.
    const std::vector<T> want = stored(KVStorage::Int8, k.data(), 4);
    EXPECT_EQ(Mat<T>(c.keys(0, 0)), (Eigen::Map<const Mat<T>>(want.data(), 1, 4)));
  }
  {
    KVCache<T> c(KVStorage::Native, 1, 2, 4, 4);
    c.append(0, k, v);
    EXPECT_TRUE(same_bits(Mat<T>(c.keys(0, 0)), Mat<T>(k.leftCols(4))));
    EXPECT_TRUE(same_bits(Mat<T>(c.values(0, 1)), Mat<T>(v.rightCols(4))));
  }
}

// Random rows through every storage: keys() and values() are stored() of each head's row; values
// that the storage holds exactly (rounded already; integers times a power of two with a +-127 in
// each row) come back bit for bit.
TYPED_TEST(KVStorageCacheTyped, ValuesComeBackAsStoredAndRepresentableOnesBitExactly) {
  using T = TypeParam;
  const Index B = 2, Hkv = 3, d = 5, dv = 7, n = 9;
  std::mt19937_64 rng(17);
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> integer(-127, 127), column(0, 99);
  Mat<T> k(B * n, Hkv * d), v(B * n, Hkv * dv);
  for (KVStorage s : kAllStorages) {
    SCOPED_TRACE(attn::storage_name(s));
    // Random values: what the cache gives back is stored() of each head's row.
    for (Index i = 0; i < k.size(); ++i) k.data()[i] = T(normal(rng) * 3);
    for (Index i = 0; i < v.size(); ++i) v.data()[i] = T(normal(rng) / 5);
    KVCache<T> cache(s, B, Hkv, d, n, 0, dv);
    cache.append(k, v);  // rows [b*n, (b+1)*n) to sequence b
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < Hkv; ++h) {
        EXPECT_TRUE(same_bits(cache.keys(b, h), stored_head(s, k, b * n, n, h, d))) << b << ", " << h;
        EXPECT_TRUE(same_bits(cache.values(b, h), stored_head(s, v, b * n, n, h, dv))) << b << ", " << h;
      }
    // Representable values.
    const auto representable = [&](Mat<T>& m, Index dim) {
      for (Index r = 0; r < m.rows(); ++r)
        for (Index h = 0; h < m.cols() / dim; ++h) {
          const int e = -3 - column(rng) % 6;  // int8: a power-of-two step 2^-3 .. 2^-8
          const Index at = column(rng) % dim;  // int8: the element at +-127 steps
          for (Index c = 0; c < dim; ++c) {
            T& x = m(r, h * dim + c);
            if (s == KVStorage::Int8) {
              const int steps = c == at ? (integer(rng) < 0 ? -127 : 127) : integer(rng);
              x = T(std::ldexp(double(steps), e));
            } else {
              x = stored(s, &x, 1)[0];  // bf16 / fp16: round_to of itself
            }
          }
        }
    };
    representable(k, d);
    representable(v, dv);
    KVCache<T> exact(s, B, Hkv, d, n, 0, dv);
    exact.append(k, v);
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < Hkv; ++h) {
        EXPECT_TRUE(same_bits(exact.keys(b, h), Mat<T>(k.block(b * n, h * d, n, d)))) << b << ", " << h;
        EXPECT_TRUE(same_bits(exact.values(b, h), Mat<T>(v.block(b * n, h * dv, n, dv)))) << b << ", " << h;
      }
  }
}

// A ring keeps the last `capacity` positions in order, in the storage type (both copies of each
// row, and int8's scales with them).
TYPED_TEST(KVStorageCacheTyped, RingsKeepTheLastPositionsInTheStorageType) {
  using T = TypeParam;
  // capacity 5, window 3: max_append = 5 - 3 + 1 = 3.
  Mat<T> k(23, 2 * 3), v(23, 2 * 4);
  for (Index r = 0; r < k.rows(); ++r) {  // position t, head h, feature c: 100 t + 10 h + c + 0.3 (+ 0.7 for v)
    for (Index c = 0; c < 6; ++c) k(r, c) = T(100 * r + 10 * (c / 3) + c % 3) + T(0.3);
    for (Index c = 0; c < 8; ++c) v(r, c) = T(100 * r + 10 * (c / 4) + c % 4) + T(0.7);
  }
  for (KVStorage s : kAllStorages) {
    SCOPED_TRACE(attn::storage_name(s));
    KVCache<T> ring(s, 1, 2, 3, 5, /*window=*/3, /*value_dim=*/4);
    Index t = 0;
    for (const Index n : {3, 1, 2, 3, 3, 1, 3, 2, 3, 2}) {  // 23 positions
      ring.append(0, k.middleRows(t, n), v.middleRows(t, n));
      t += n;
      const Index kept = std::min<Index>(t, 5);
      ASSERT_EQ(ring.kept(0), kept);
      for (Index h = 0; h < 2; ++h) {
        EXPECT_TRUE(same_bits(ring.keys(0, h), stored_head(s, k, t - kept, kept, h, 3))) << t << ", head " << h;
        EXPECT_TRUE(same_bits(ring.values(0, h), stored_head(s, v, t - kept, kept, h, 4))) << t << ", head " << h;
      }
    }
  }
}

TEST(KVStorageCache, AppendRefusesWhatTheStorageCannotHoldAndChangesNothing) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const Mat<float> k0 = Mat<float>::Constant(2, 6, 0.5f), v0 = Mat<float>::Constant(2, 6, -0.25f);
  for (KVStorage s : {KVStorage::Int8, KVStorage::Float16}) {
    SCOPED_TRACE(attn::storage_name(s));
    KVCache<float> cache(s, 2, 2, 3, 8);
    cache.append(0, k0, v0);
    const Mat<float> keys = cache.keys(0, 1), values = cache.values(0, 0);
    const auto unchanged = [&] {
      EXPECT_EQ(cache.size(0), 2);
      EXPECT_EQ(cache.size(1), 0);
      EXPECT_TRUE(same_bits(cache.keys(0, 1), keys));
      EXPECT_TRUE(same_bits(cache.values(0, 0), values));
    };
    Mat<float> k = Mat<float>::Constant(3, 6, 1.0f), v = Mat<float>::Constant(3, 6, 2.0f);
    if (s == KVStorage::Int8) {
      k(1, 4) = nan;
      EXPECT_TRUE(attn_test::throws_with<attn::argument_error>([&] { cache.append(0, k, v); },
                                                               {"attn::KVCache::append: ", "key(1, 4) = nan", "int8"}));
      unchanged();
      k(1, 4) = 1;
      v(2, 0) = -inf;
      EXPECT_TRUE(
          attn_test::throws_with<attn::argument_error>([&] { cache.append(0, k, v); }, {"value(2, 0) = -inf", "int8"}));
      unchanged();
      v(2, 0) = inf;
      EXPECT_THROW(cache.append(1, k, v), attn::argument_error);
    } else {
      v(0, 1) = 70000;
      EXPECT_TRUE(attn_test::throws_with<attn::argument_error>(
          [&] { cache.append(0, k, v); }, {"attn::KVCache::append: ", "value(0, 1) = 70000", "fp16"}));
      unchanged();
      v(0, 1) = 2;
      k(2, 5) = -65520;  // the first value that rounds to -inf
      EXPECT_TRUE(attn_test::throws_with<attn::argument_error>([&] { cache.append(0, k, v); }, {"key(2, 5) = -65520"}));
      unchanged();
      EXPECT_THROW(cache.append(1, k, v), attn::argument_error);
    }
    unchanged();
    // A batched append whose bad row belongs to sequence 1 (rows 3..5 of [B*L] = [2*3]) writes
    // neither sequence.
    Mat<float> both = Mat<float>::Constant(6, 6, 1.0f);
    both(4, 2) = s == KVStorage::Int8 ? nan : 1e5f;
    EXPECT_THROW(cache.append(both, both), attn::argument_error);
    unchanged();
    // What the storage holds still goes in: 65519 -> 65504 in fp16.
    k(2, 5) = 65519;
    v.setConstant(3);
    cache.append(1, k, v);
    EXPECT_EQ(cache.size(1), 3);
    if (s == KVStorage::Float16)
      EXPECT_EQ(cache.keys(1, 1)(2, 2), 65504.0f);
    else  // int8: head 1's row (1, 1, 65519): s = 65519/127, q = (0, 0, 127)
      EXPECT_EQ(cache.keys(1, 1)(2, 2), (65519.0f / 127.0f) * 127.0f);
  }
  // bf16 has float's range: 70000 is stored (8 significant bits, 512 apart in [65536, 131072):
  // 70000 / 512 = 136.7 -> 137 * 512 = 70144), and NaN stays NaN.
  KVCache<float> wide(KVStorage::BFloat16, 1, 1, 2, 4);
  wide.append(0, attn_test::mat<float>({{70000, double(nan)}}), attn_test::mat<float>({{1, 2}}));
  EXPECT_EQ(wide.keys(0, 0)(0, 0), 70144.0f);
  EXPECT_TRUE(std::isnan(wide.keys(0, 0)(0, 1)));
}

// A double below 65520 passes the fp16 cache's check; it must be stored as 65504, not inf (see
// RoundTo.DoubleJustBelowTheOverflowThresholdStaysFinite).
TEST(KVStorageCache, Fp16CacheOfDoubleStoresAValueJustBelow65520Finite) {
  KVCache<double> cache(KVStorage::Float16, 1, 1, 2, 4);
  cache.append(0, attn_test::mat<double>({{65520 - p2(-20), 1}}), attn_test::mat<double>({{1, 2}}));
  EXPECT_EQ(cache.keys(0, 0)(0, 0), 65504.0);
}

// ------------------------------------------------------------------------------------------------
// 3. The accuracy contract on every kernel path

enum class Path { Decode, Flash, Blocked };
const char* path_name(Path p) { return p == Path::Decode ? "decode" : p == Path::Flash ? "flash" : "blocked"; }

using attn_test::Rng;

struct Config {
  std::uint64_t seed = 0;
  KVStorage storage = KVStorage::Native;
  Path path = Path::Decode;
  Index B = 1, H = 1, Hkv = 1, d = 1, dv = 1;
  Index N = 1;  // positions appended to each sequence; the L queries are the last L of them
  Index L = 1;
  Index cache_window = 0, capacity = 0;  // a ring when cache_window > 0
  Index window = 0;                      // CacheArgs::window (at most the ring's)
  bool causal = true;                    // BottomRight, else None
  double softcap = 0;
  int alibi = 0;  // 0 none, 1 the standard slopes, 2 random ones
  int mask = 0;   // attn_mask: 0 none, 1 [L, S], 2 [B*H*L, S]
  int bias = 0;   // attn_bias: the same
  bool padding = false;
  bool whole_batch = false;  // forward(q, cache) (every sequence at once), else forward(q, cache, b)
  int threads = 1;           // the first run's; the other count must give the same bits

  std::string describe() const {
    std::ostringstream s;
    s << storage_name(storage) << " " << path_name(path) << " seed=" << seed << " B=" << B << " H=" << H
      << " Hkv=" << Hkv << " d=" << d << " dv=" << dv << " N=" << N << " L=" << L;
    if (cache_window > 0) s << " ring(capacity=" << capacity << ", window=" << cache_window << ")";
    s << " window=" << window << " causal=" << (causal ? "BottomRight" : "None") << " softcap=" << softcap
      << " alibi=" << alibi << " mask=" << mask << " bias=" << bias << " padding=" << padding
      << (whole_batch ? " whole batch" : " per sequence") << " threads=" << threads;
    return s.str();
  }
};

// The configurations of one (storage, path, T): i cycles the GQA groups (H, Hkv) = (2, 2), (4, 2),
// (8, 2), (8, 1), (3, 1) - groups 1, 2, 4 and 8 (multi-query) and multi-query with 3 heads - and
// B = 1, 3; each score option is on in every third case and in a fifth of the others.
Config make_config(KVStorage storage, Path path, int i, bool dbl) {
  Config c;
  c.seed = 0x5eed0000u + std::uint64_t(i) * 97 + std::uint64_t(storage) * 13 + std::uint64_t(path) * 5 + (dbl ? 1 : 0);
  Rng r(c.seed);
  c.storage = storage;
  c.path = path;
  static const Index groups[][2] = {{2, 2}, {4, 2}, {8, 2}, {8, 1}, {3, 1}};
  c.H = groups[i % 5][0];
  c.Hkv = groups[i % 5][1];
  c.B = i % 2 == 0 ? 1 : 3;
  static const Index dims[] = {8, 13, 16, 32, 33, 48, 64};
  c.d = r.coin(0.5) ? r.pick(1, 64) : dims[r.pick(0, 6)];
  c.dv = r.coin(0.6) ? c.d : r.pick(1, 64);
  const auto on = [&](int f) { return (i + f) % 3 == 0 || r.coin(0.2); };
  switch (path) {
    case Path::Decode:
      c.L = r.pick(1, 4);
      c.N = i % 3 == 1 ? r.pick(513, 600) : r.pick(c.L, 200);  // past one 512-key chunk
      if (i == 1) c.d = c.dv = 128, c.N = 600, c.B = 1;        // the one d = 128 case
      break;
    case Path::Flash:
      c.L = r.pick(5, 48);
      c.N = r.coin(0.3) ? c.L : c.L + r.pick(1, 120);  // a prefill from empty, or a chunk after one
      break;
    case Path::Blocked:
      c.L = r.pick(1, 24);
      c.N = r.coin(0.3) ? c.L : c.L + r.pick(1, 100);
      break;
  }
  if (on(0)) {  // a ring: the L queries need the window - 1 positions before them
    c.cache_window = r.pick(1, c.N);
    c.capacity = c.cache_window + c.L - 1 + r.pick(0, 8);
    if (r.coin(0.5)) c.window = r.pick(1, c.cache_window);
  } else if (on(1)) {
    c.window = r.pick(1, c.N + 2);
  }
  c.causal = !on(2) || r.coin(0.5);
  if (on(1)) c.softcap = r.uniform(1, 5);
  if (on(2)) c.alibi = int(r.pick(1, 2));
  if (on(0)) c.mask = int(r.pick(1, 2));
  if (on(1)) c.bias = int(r.pick(1, 2));
  if (on(2)) c.padding = true;
  c.whole_batch = r.coin(0.5);
  c.threads = r.coin(0.5) ? 1 : 2;
  return c;
}

// The masks and score options of one call (B_call sequences, S kept keys), drawn in double and
// rounded to T, so the T run and the double oracle see the same numbers.
struct CallMasks {
  Causal causal = Causal::BottomRight;
  Index window = 0;
  double softcap = 0;
  attn::Vector<double> slopes;
  int mask_kind = 0;
  bool mask_attend = true;
  attn::BoolMatrix mask;
  int bias_kind = 0;
  Mat<double> bias;
  bool padding = false;
  attn::BoolMatrix pad;  // true = ignore

  template <class T>
  attn::CacheArgs<T> args() const {
    attn::CacheArgs<T> a;
    a.causal = causal;
    a.window = window;
    a.softcap = static_cast<T>(softcap);
    if (slopes.size() > 0) a.alibi_slopes = slopes.cast<T>();
    if (mask_kind > 0) {
      if (mask_attend)
        a.attn_mask = attn::AttendMask(attn::BoolMatrix(mask));
      else
        a.attn_mask = attn::IgnoreMask(attn::BoolMatrix(mask));
    }
    if (bias_kind > 0) a.attn_bias = attn::AdditiveMask<T>(Mat<T>(bias.cast<T>()));
    if (padding) a.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix(pad));
    return a;
  }
};

template <class T>
CallMasks make_masks(Rng& r, const Config& c, Index B_call, Index S) {
  const auto in_T = [](double x) { return double(static_cast<T>(x)); };
  CallMasks m;
  m.causal = c.causal ? Causal::BottomRight : Causal::None;
  m.window = c.window;
  m.softcap = in_T(c.softcap);
  if (c.alibi == 1) m.slopes = attn::alibi_slopes<double>(c.H).unaryExpr(in_T);
  if (c.alibi == 2) {
    m.slopes.resize(c.H);
    for (Index h = 0; h < c.H; ++h) m.slopes[h] = in_T(r.uniform(0, 0.5));
  }
  const Index rows_of[] = {0, c.L, B_call * c.H * c.L};
  m.mask_kind = c.mask;
  if (c.mask > 0) {
    m.mask_attend = r.coin(0.5);
    m.mask.resize(rows_of[c.mask], S);
    for (Index i = 0; i < m.mask.size(); ++i) m.mask.data()[i] = r.coin(0.85) == m.mask_attend;
  }
  m.bias_kind = c.bias;
  if (c.bias > 0) {
    m.bias.resize(rows_of[c.bias], S);
    for (Index i = 0; i < m.bias.size(); ++i)
      m.bias.data()[i] = r.coin(0.1) ? -std::numeric_limits<double>::infinity() : in_T(r.normal());
  }
  m.padding = c.padding;
  if (c.padding) {
    m.pad.resize(B_call, S);
    for (Index b = 0; b < B_call; ++b) {
      const bool trailing = r.coin(0.5);
      const Index len = r.pick(0, S);
      for (Index j = 0; j < S; ++j) m.pad(b, j) = trailing ? j >= len : r.coin(0.2);
    }
  }
  return m;
}

// Rows [t, t + n) of every sequence of a [B*N, cols] tensor (sequence b in rows [b*N, (b+1)*N)):
// [B*n, cols], sequence b in rows [b*n, (b+1)*n).
template <class T>
Mat<T> rows_of_each(const Mat<T>& m, Index B, Index N, Index t, Index n) {
  Mat<T> out(B * n, m.cols());
  for (Index b = 0; b < B; ++b) out.middleRows(b * n, n) = m.middleRows(b * N + t, n);
  return out;
}

// Appends the N positions of K and V: the first N - L in appends as large as the cache takes, then
// the last L (the queries' own), for every sequence at once or one sequence at a time.
template <class T>
KVCache<T> filled_cache(const Config& c, KVStorage storage, const Mat<T>& K, const Mat<T>& V) {
  KVCache<T> cache(storage, c.B, c.Hkv, c.d, c.cache_window > 0 ? c.capacity : c.N, c.cache_window,
                   c.dv == c.d ? 0 : c.dv);
  std::vector<Index> chunks;
  const Index step = cache.max_append(0);
  for (Index t = 0; t < c.N - c.L; t += step) chunks.push_back(std::min(step, c.N - c.L - t));
  chunks.push_back(c.L);
  Index t = 0;
  for (const Index n : chunks) {
    if (c.whole_batch) {
      cache.append(rows_of_each(K, c.B, c.N, t, n), rows_of_each(V, c.B, c.N, t, n));
    } else {
      for (Index b = 0; b < c.B; ++b) cache.append(b, K.middleRows(b * c.N + t, n), V.middleRows(b * c.N + t, n));
    }
    t += n;
  }
  return cache;
}

// detail::attention_reference on the problem GroupedQueryAttention builds against the cache: q
// [B_call*L, H*d] for sequences [b0, b0 + B_call), scale 1/sqrt(d) in T.
template <class T>
void reference_on_cache(const Mat<T>& q, const KVCache<T>& cache, Index b0, Index B_call, Index H,
                        const attn::CacheArgs<T>& args, Mat<T>& out, Mat<T>* weights) {
  attn::detail::AttentionProblem<T> p;
  const Index L = q.rows() / B_call, d = cache.head_dim(), dv = cache.value_dim(), S = cache.kept(b0);
  p.batch = B_call;
  p.heads = H;
  p.kv_heads = cache.kv_heads();
  p.L = L;
  p.S = p.mask_keys = S;
  p.d = d;
  p.dv = dv;
  p.q = {q.data(), L * q.cols(), d, q.cols()};
  out.resize(q.rows(), H * dv);
  p.out = {out.data(), L * out.cols(), dv, out.cols()};
  p.scale = T(1) / std::sqrt(static_cast<T>(d));
  cache.bind(p, b0);
  attn::Masks<T> masks = args;
  if (cache.window() > 0 && masks.window == 0) masks.window = cache.window();
  attn::detail::bind_masks(p, masks, "reference_on_cache");
  if (weights) {
    weights->resize(B_call * H * L, S);
    p.weights = {weights->data(), H * L * S, L * S, S};
  }
  attn::detail::attention_reference(p);
}

// The worst |out - exact| / allowed of (b) over all cases, per storage (printed with
// ATTN_KV_STORAGE_VERBOSE=1).
double worst_ratio[4] = {0, 0, 0, 0};

template <class T>
void run_case(const Config& c, bool representable) {
  SCOPED_TRACE(c.describe() + (representable ? " representable K, V" : " random K, V") +
               (std::is_same_v<T, float> ? " float" : " double"));
  constexpr double tol = attn_test::tolerance<T>();  // float 1e-5, double 1e-10
  const double same_tol = std::is_same_v<T, float> ? 1e-6 : 1e-12;
  Rng r(c.seed * 2 + (representable ? 1 : 0));

  // K [B*N, Hkv*d], V [B*N, Hkv*dv]: per (position, head) a magnitude 2^[-2, 2] (int8's scales
  // differ row to row). Representable: bf16/fp16 values already rounded; int8: integers in
  // [-127, 127] times 2^-e with one element at +-127.
  const auto make_kv = [&](Index dim) {
    Mat<T> m(c.B * c.N, c.Hkv * dim);
    for (Index row = 0; row < m.rows(); ++row)
      for (Index h = 0; h < c.Hkv; ++h) {
        const double amp = std::ldexp(1.0, int(r.pick(-2, 2)));
        const Index at = r.pick(0, dim - 1);
        for (Index col = 0; col < dim; ++col) {
          T& x = m(row, h * dim + col);
          if (representable && c.storage == KVStorage::Int8) {
            const Index steps = col == at ? (r.coin(0.5) ? 127 : -127) : r.pick(-127, 127);
            x = T(std::ldexp(double(steps), -7) * amp);
          } else {
            x = T(r.normal() * amp);
            if (representable) x = stored(c.storage, &x, 1)[0];
          }
        }
      }
    return m;
  };
  const Mat<T> K = make_kv(c.d), V = make_kv(c.dv);
  Mat<T> q(c.B * c.L, c.H * c.d);
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = T(r.normal());

  const KVCache<T> cache = filled_cache(c, c.storage, K, V);
  const Index S = cache.kept(0), first = cache.first_kept(0);
  ASSERT_EQ(cache.size(0), c.N);
  // The calls: one for the whole batch, or one per sequence, each with masks of its own.
  const Index calls = c.whole_batch ? 1 : c.B, B_call = c.whole_batch ? c.B : 1;
  std::vector<CallMasks> masks;
  for (Index i = 0; i < calls; ++i) masks.push_back(make_masks<T>(r, c, B_call, S));

  const attn::GroupedQueryAttention<T> gqa(c.H, c.Hkv);
  const Index rows = B_call * c.L;
  // out [B*L, H*dv]; weights [B*H*L, S] (Blocked).
  const auto run = [&](const KVCache<T>& kv, Mat<T>& out, Mat<T>& weights) {
    out.resize(c.B * c.L, c.H * c.dv);
    weights.resize(c.path == Path::Blocked ? c.B * c.H * c.L : 0, S);
    for (Index i = 0; i < calls; ++i) {
      const attn::CacheArgs<T> args = masks[std::size_t(i)].args<T>();
      const Mat<T> qi = q.middleRows(i * rows, rows);
      const Index b = c.whole_batch ? -1 : i;
      if (c.path == Path::Blocked) {
        const attn::AttentionResult<T> res = gqa.forward_with_weights(qi, kv, b, args);
        out.middleRows(i * rows, rows) = res.output;
        weights.middleRows(i * c.H * rows, c.H * rows) = res.weights;
      } else {
        out.middleRows(i * rows, rows) = c.whole_batch ? gqa.forward(qi, kv, args) : gqa.forward(qi, kv, i, args);
      }
    }
  };
  const auto reference = [&](const auto& qq, const auto& kv, auto& out, auto& weights) {
    using U = typename std::decay_t<decltype(qq)>::Scalar;
    out.resize(c.B * c.L, c.H * c.dv);
    weights.resize(c.path == Path::Blocked ? c.B * c.H * c.L : 0, S);
    for (Index i = 0; i < calls; ++i) {
      Mat<U> o, w;
      reference_on_cache<U>(qq.middleRows(i * rows, rows), kv, c.whole_batch ? 0 : i, B_call, c.H,
                            masks[std::size_t(i)].args<U>(), o, c.path == Path::Blocked ? &w : nullptr);
      out.middleRows(i * rows, rows) = o;
      if (c.path == Path::Blocked) weights.middleRows(i * c.H * rows, c.H * rows) = w;
    }
  };

  Mat<T> out, weights;
  {
    ThreadCount threads(c.threads);
    run(cache, out, weights);
  }
  // (c) the other thread count: the same bits.
  {
    ThreadCount threads(3 - c.threads);
    Mat<T> out2, weights2;
    run(cache, out2, weights2);
    EXPECT_TRUE(same_bits(out, out2)) << "(c) output differs between 1 and 2 threads";
    EXPECT_TRUE(same_bits(weights, weights2)) << "(c) weights differ between 1 and 2 threads";
  }
  // (e) the reference on the same bound problem: the stored values, converted as the kernels read them.
  {
    Mat<T> ref, ref_weights;
    reference(q, cache, ref, ref_weights);
    EXPECT_TRUE(matrices_near(out, ref, tol)) << "(e) output against attention_reference on the same cache";
    EXPECT_TRUE(matrices_near(weights, ref_weights, tol)) << "(e) weights against attention_reference";
  }
  if (representable) {
    // (a) the Native cache holds the same values: the same output.
    const KVCache<T> native = filled_cache(c, KVStorage::Native, K, V);
    Mat<T> want, want_weights;
    ThreadCount threads(c.threads);
    run(native, want, want_weights);
    EXPECT_TRUE(matrices_near(out, want, same_tol)) << "(a) output against the Native cache";
    EXPECT_TRUE(matrices_near(weights, want_weights, same_tol)) << "(a) weights against the Native cache";
    return;
  }
  // (b) against exact attention in double on the unrounded K and V.
  const KVCache<double> exact_cache = filled_cache(c, KVStorage::Native, Mat<double>(K.template cast<double>()),
                                                   Mat<double>(V.template cast<double>()));
  Mat<double> exact, exact_weights;
  reference(Mat<double>(q.template cast<double>()), exact_cache, exact, exact_weights);
  const double scale = double(T(1) / std::sqrt(static_cast<T>(c.d)));
  const Index group = c.H / c.Hkv;
  for (Index b = 0; b < c.B; ++b)
    for (Index h = 0; h < c.H; ++h) {
      const Index g = h / group;
      const double max_k = K.block(b * c.N + first, g * c.d, S, c.d).template cast<double>().cwiseAbs().maxCoeff();
      const double max_v = V.block(b * c.N + first, g * c.dv, S, c.dv).template cast<double>().cwiseAbs().maxCoeff();
      for (Index l = 0; l < c.L; ++l) {
        const Index row = b * c.L + l;
        const double q_l1 = q.block(row, h * c.d, 1, c.d).template cast<double>().cwiseAbs().sum();
        const double allowed =
            attn::kv_storage_error_bound<double>(c.storage, scale * q_l1, max_k, max_v) + tol * std::max(1.0, max_v);
        const double err =
            (out.block(row, h * c.dv, 1, c.dv).template cast<double>() - exact.block(row, h * c.dv, 1, c.dv))
                .cwiseAbs()
                .maxCoeff();
        double& worst = worst_ratio[int(c.storage)];
        worst = std::max(worst, err / allowed);
        ASSERT_LE(err, allowed) << "(b) sequence " << b << ", head " << h << ", query " << l
                                << ": |out - exact| over the bound";
      }
    }
}

template <class T>
void run_path(Path path) {
  // Each (storage, path, T): every GQA group with B = 1 and 3, each score option in a third or more.
  const int per = kOptimized ? 30 : 6;
  for (const KVStorage s : kAllStorages)
    for (int i = 0; i < per; ++i) {
      const Config c = make_config(s, path, i, std::is_same_v<T, double>);
      if (std::getenv("ATTN_KV_STORAGE_VERBOSE")) std::printf("%s\n", c.describe().c_str());
      for (const bool representable : {true, false}) {
        run_case<T>(c, representable);
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
}

void print_worst() {
  if (!std::getenv("ATTN_KV_STORAGE_VERBOSE")) return;
  for (int s = 0; s < 4; ++s)
    std::printf("worst |out - exact| / allowed, %s: %.3g\n", attn::storage_name(kAllStorages[s]), worst_ratio[s]);
}

TEST(KVStorageAttention, DecodeFloat) { run_path<float>(Path::Decode); }
TEST(KVStorageAttention, DecodeDouble) { run_path<double>(Path::Decode); }
TEST(KVStorageAttention, FlashFloat) { run_path<float>(Path::Flash); }
TEST(KVStorageAttention, FlashDouble) { run_path<double>(Path::Flash); }
TEST(KVStorageAttention, BlockedFloat) { run_path<float>(Path::Blocked); }
TEST(KVStorageAttention, BlockedDouble) {
  run_path<double>(Path::Blocked);
  print_worst();
}

// (d) Decoding token by token (append one position, attend its one query: the decode kernel)
// equals the prefill of the same positions (append them all, attend all L queries, causal
// bottom-right: the flash kernel) on a compressed cache: the stored values are the same, and so is
// the attention over them.
template <class T>
void check_token_by_token(KVStorage s) {
  constexpr double tol = attn_test::tolerance<T>();
  struct Options {
    const char* name;
    Index H, Hkv, d, dv, P, L;  // P positions before the L compared
    Index ring_window;          // > 0: a ring of capacity ring_window + L - 1
    Index window;
    double softcap;
    bool alibi;
    int threads;
  };
  const Options cases[] = {
      {"gqa 2:1", 4, 2, 24, 16, 0, 40, 0, 0, 0, false, 1},
      {"mqa, after a prefix", 6, 1, 16, 16, 30, 25, 0, 0, 0, false, 2},
      {"window over a full cache", 4, 2, 16, 8, 10, 30, 0, 7, 0, false, 1},
      {"ring", 4, 2, 16, 16, 37, 20, 9, 0, 0, false, 2},
      {"softcap, alibi, ring, narrower window", 8, 4, 32, 32, 50, 12, 11, 6, 3.0, true, 1},
  };
  std::uint64_t seed = 900 + std::uint64_t(s);
  for (const Options& o : cases) {
    SCOPED_TRACE(std::string(attn::storage_name(s)) + ", " + o.name);
    ThreadCount threads(o.threads);
    Rng r(++seed);
    const Index N = o.P + o.L;
    const auto random = [&](Index rows, Index cols) {
      Mat<T> m(rows, cols);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(r.normal());
      return m;
    };
    const Mat<T> q = random(o.L, o.H * o.d), K = random(N, o.Hkv * o.d), V = random(N, o.Hkv * o.dv);
    const Index capacity = o.ring_window > 0 ? o.ring_window + o.L - 1 : N;
    KVCache<T> prefill(s, 1, o.Hkv, o.d, capacity, o.ring_window, o.dv), steps = prefill;
    const Index max_append = prefill.max_append(0);
    for (Index t = 0; t < o.P; t += max_append) {  // the same prefix in both
      const Index n = std::min(max_append, o.P - t);
      prefill.append(0, K.middleRows(t, n), V.middleRows(t, n));
      steps.append(0, K.middleRows(t, n), V.middleRows(t, n));
    }
    attn::CacheArgs<T> args;
    args.window = o.window;
    args.softcap = T(o.softcap);
    if (o.alibi) args.alibi_slopes = attn::alibi_slopes<T>(o.H);
    const attn::GroupedQueryAttention<T> gqa(o.H, o.Hkv);
    prefill.append(0, K.bottomRows(o.L), V.bottomRows(o.L));
    const Mat<T> all = gqa.forward(q, prefill, 0, args);
    for (Index t = 0; t < o.L; ++t) {
      steps.append(0, K.middleRows(o.P + t, 1), V.middleRows(o.P + t, 1));
      const Mat<T> one = gqa.forward(q.middleRows(t, 1), steps, 0, args);
      ASSERT_TRUE(matrices_near(one, all.middleRows(t, 1), tol)) << "query " << t;
    }
    for (Index h = 0; h < o.Hkv; ++h) EXPECT_TRUE(same_bits(steps.keys(0, h), prefill.keys(0, h)));
  }
}

TEST(KVStorageAttention, DecodingTokenByTokenEqualsThePrefill) {
  for (const KVStorage s : kAllStorages) {
    check_token_by_token<float>(s);
    check_token_by_token<double>(s);
  }
}

}  // namespace
