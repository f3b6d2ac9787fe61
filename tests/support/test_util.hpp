// tests/support/test_util.hpp - comparisons and tolerances shared by attn's tests.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>

#include <attn/types.hpp>

namespace attn_test {

// Which sanitizers this build runs under. g++ names ASan and TSan with __SANITIZE_*__ macros (and
// UBSan not at all); clang 14 defines none of those and answers only __has_feature.
#if defined(__has_feature)
#define ATTN_TEST_HAS_FEATURE(x) __has_feature(x)
#else
#define ATTN_TEST_HAS_FEATURE(x) 0
#endif
#if defined(__SANITIZE_ADDRESS__) || ATTN_TEST_HAS_FEATURE(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif
#if defined(__SANITIZE_THREAD__) || ATTN_TEST_HAS_FEATURE(thread_sanitizer)
inline constexpr bool kThreadSanitizer = true;
#else
inline constexpr bool kThreadSanitizer = false;
#endif
#if ATTN_TEST_HAS_FEATURE(undefined_behavior_sanitizer)
inline constexpr bool kUndefinedSanitizer = true;
#else
inline constexpr bool kUndefinedSanitizer = false;
#endif
// Any of them: the randomized tests run fewer cases there, for time.
inline constexpr bool kSanitized = kAddressSanitizer || kThreadSanitizer || kUndefinedSanitizer;

using Scalars = ::testing::Types<float, double>;

// Typed tests are named by their scalar: Suite/float.Test, Suite/double.Test. Use as
//   TYPED_TEST_SUITE(Suite, attn_test::Scalars, attn_test::ScalarName);
struct ScalarName {
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};

// Tolerance for values computed by hand or by PyTorch in float64: float carries ~7 digits,
// double ~16; these leave room for different summation orders.
template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-10;
}

// max |a - e| <= tol * max(1, max |e|): relative to the expected tensor's scale, so values near
// zero beside large ones are not held to an impossible per-element relative bound. Reports the
// worst element on failure. Non-finite expected values must be matched exactly.
template <class A, class E>
::testing::AssertionResult matrices_near(const A& actual, const E& expected, double tol) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << "shape [" << actual.rows() << ", " << actual.cols() << "] != expected ["
                                         << expected.rows() << ", " << expected.cols() << "]";
  double scale = 1.0;
  for (attn::Index r = 0; r < expected.rows(); ++r)
    for (attn::Index c = 0; c < expected.cols(); ++c)
      if (std::isfinite(double(expected(r, c)))) scale = std::max(scale, std::abs(double(expected(r, c))));
  double worst = 0;
  attn::Index wr = 0, wc = 0;
  for (attn::Index r = 0; r < expected.rows(); ++r) {
    for (attn::Index c = 0; c < expected.cols(); ++c) {
      const double a = double(actual(r, c)), e = double(expected(r, c));
      double err;
      if (!std::isfinite(e) || !std::isfinite(a))
        err = (a == e) ? 0.0 : std::numeric_limits<double>::infinity();
      else
        err = std::abs(a - e);
      if (err > worst || std::isnan(err)) worst = err, wr = r, wc = c;
    }
  }
  if (worst <= tol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "worst error " << worst << " at (" << wr << ", " << wc << "): actual "
                                       << actual(wr, wc) << ", expected " << expected(wr, wc) << "; allowed " << tol
                                       << " * " << scale;
}

// Builds a row-major matrix from a brace list: mat<T>({{1, 2}, {3, 4}}).
template <class T>
attn::Matrix<T> mat(std::initializer_list<std::initializer_list<double>> rows) {
  attn::Matrix<T> m(static_cast<attn::Index>(rows.size()), static_cast<attn::Index>(rows.begin()->size()));
  attn::Index r = 0;
  for (const auto& row : rows) {
    attn::Index c = 0;
    for (double x : row) m(r, c++) = static_cast<T>(x);
    ++r;
  }
  return m;
}

template <class T>
attn::Vector<T> vec(std::initializer_list<double> xs) {
  attn::Vector<T> v(static_cast<attn::Index>(xs.size()));
  attn::Index i = 0;
  for (double x : xs) v(i++) = static_cast<T>(x);
  return v;
}

inline attn::BoolMatrix bmat(std::initializer_list<std::initializer_list<int>> rows) {
  attn::BoolMatrix m(static_cast<attn::Index>(rows.size()), static_cast<attn::Index>(rows.begin()->size()));
  attn::Index r = 0;
  for (const auto& row : rows) {
    attn::Index c = 0;
    for (int x : row) m(r, c++) = x != 0;
    ++r;
  }
  return m;
}

// Runs f, expects it to throw Exception, and checks that the message contains every fragment
// (the argument's name and the shapes).
template <class Exception, class F>
::testing::AssertionResult throws_with(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
  } catch (const Exception& e) {
    const std::string what = e.what();
    for (const char* frag : fragments)
      if (what.find(frag) == std::string::npos)
        return ::testing::AssertionFailure() << "message \"" << what << "\" lacks \"" << frag << "\"";
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw the wrong type: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// Per-call arguments (MhaArgs, GqaArgs, EncoderArgs, DecoderArgs) for B sequences: the batched
// APIs are always told B, never left to a default.
template <class Args>
Args batch_of(attn::Index B) {
  Args a;
  a.batch = B;
  return a;
}

// Seeded random choices for the randomized tests (differential_test, kv_storage_test).
struct Rng {
  std::mt19937_64 g;
  explicit Rng(std::uint64_t seed) : g(seed) {}
  attn::Index pick(attn::Index lo, attn::Index hi) { return std::uniform_int_distribution<attn::Index>(lo, hi)(g); }
  bool coin(double p) { return std::bernoulli_distribution(p)(g); }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g); }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
  template <std::size_t N>
  attn::Index one_of(const attn::Index (&xs)[N]) {
    return xs[static_cast<std::size_t>(pick(0, attn::Index(N) - 1))];
  }
};

}  // namespace attn_test
