// attn/detail/storage.hpp - converting to and from the storage types of attn/storage.hpp (KV
// caches, weights). Loading stored elements into packets is attn/detail/packet.hpp's load_as.
//
//   with_storage(s, f)    f(tag) with tag::type the element type (T, Eigen::bfloat16, Eigen::half,
//                         std::int8_t): the one switch from the run-time Storage to the compile-time
//                         type a kernel is instantiated on
//   round_to<S>(x)        x rounded to nearest even in S (bf16, fp16)
//   quantize_row          a row to int8 with its scale max|x| / 127
//   store_row             a row of T in storage s (one of the two above, or a copy); returns the scale
//   dequantize(x, n, s, y)  y[0, n) = s * x[0, n) as T
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attn/detail/check.hpp"
#include "attn/detail/packet.hpp"
#include "attn/storage.hpp"

namespace attn::detail {

template <class S>
struct StorageTag {
  using type = S;
};

// f(StorageTag<S>{}) for the element type S of storage s.
template <class T, class F>
decltype(auto) with_storage(Storage s, F&& f) {
  switch (s) {
    case Storage::BFloat16:
      return f(StorageTag<Eigen::bfloat16>{});
    case Storage::Float16:
      return f(StorageTag<Eigen::half>{});
    case Storage::Int8:
      return f(StorageTag<std::int8_t>{});
    case Storage::Native:
      break;
  }
  return f(StorageTag<T>{});
}

// x rounded to the nearest S (bf16 or fp16), ties to even. From float, Eigen's conversion is that
// rounding; from double, rounding to float first could round twice (a double just past a tie would
// land on the tie and then go to even), so the neighbours of that first guess are compared in double.
template <class S, class T>
S round_to(T x) {
  static_assert(is_16bit_float<S>);
  const S guess(static_cast<float>(x));
  if constexpr (std::is_same_v<T, float>) {
    return guess;
  } else {
    if (!std::isfinite(x)) return guess;
    const auto bits = [](S v) { return Eigen::numext::bit_cast<std::uint16_t>(v); };
    const auto from_bits = [](std::uint16_t u) { return Eigen::numext::bit_cast<S>(u); };
    if (!std::isfinite(static_cast<float>(guess))) {
      // x went to float's rounding of the overflow threshold (or past it): overflow is decided in
      // double. The largest finite S has an odd significand, so the tie goes to inf.
      const S top = Eigen::NumTraits<S>::highest();
      const double hi = double(static_cast<float>(top)),
                   below = double(static_cast<float>(from_bits(std::uint16_t(bits(top) - 1))));
      if (std::abs(x) < hi + (hi - below) / 2) return x < 0 ? S(-static_cast<float>(top)) : top;
      return guess;
    }
    S best = guess;
    double err = std::abs(double(static_cast<float>(guess)) - x);
    const std::uint16_t g = bits(guess);
    for (const std::uint16_t n : {std::uint16_t(g + 1), std::uint16_t(g - 1)}) {
      const S c = from_bits(n);
      const float cf = static_cast<float>(c);
      if (!std::isfinite(cf) || std::signbit(cf) != std::signbit(x)) continue;  // stay on x's side of zero
      const double e = std::abs(double(cf) - x);
      if (e < err || (e == err && (n & 1) == 0)) best = c, err = e;
    }
    return best;
  }
}

// Row x[0, n) as int8: q = round(x / s) (to nearest even), s = max|x| / 127 (one step less where
// 127 * s would overflow), so max|x| is +-127 and every |q| <= 127. Returns s (0 for a row of zeros, whose q are 0). x must be finite.
template <class T>
T quantize_row(const T* x, Index n, std::int8_t* q) {
  T max_abs = 0;
  for (Index c = 0; c < n; ++c) max_abs = std::max(max_abs, std::abs(x[c]));
  T s = max_abs / T(127);
  // At the top of T's range 127 * s can round past the largest finite T, and the row's largest
  // value would read back as inf: step s down until it does not (once is enough).
  while (!std::isfinite(T(127) * s)) s = std::nextafter(s, T(0));
  if (s == T(0)) {
    std::fill(q, q + n, std::int8_t(0));
    return T(0);
  }
  for (Index c = 0; c < n; ++c)
    q[c] = static_cast<std::int8_t>(std::clamp<T>(std::nearbyint(x[c] / s), T(-127), T(127)));
  return s;
}

// What storage s cannot hold is an error, not a silent change: int8 needs finite values (a scale
// from max|x|), fp16 values below 65520 in magnitude (past that they round to inf). x is `name`,
// the values of `where`'s `holder` ("cache", "weight").
template <class T>
void check_storable(Storage s, const ConstMatrixRef<T>& x, const char* where, const char* name, const char* holder) {
  if (s != Storage::Int8 && s != Storage::Float16) return;
  const bool fine = s == Storage::Int8 ? x.allFinite() : !((x.array().abs() >= T(65520)) && x.array().isFinite()).any();
  if (fine) return;  // one vectorized pass; the loop below names the first bad element
  for (Index r = 0; r < x.rows(); ++r)
    for (Index c = 0; c < x.cols(); ++c) {
      const T a = x(r, c);
      if (s == Storage::Int8)
        require_arg(std::isfinite(a), where, name, "(", r, ", ", c, ") = ", a, " cannot be stored in an int8 ", holder,
                    " (its row's scale needs finite values)");
      else
        require_arg(!(std::abs(a) >= T(65520)) || !std::isfinite(a), where, name, "(", r, ", ", c, ") = ", a,
                    " is beyond fp16's range (|x| < 65520): use BFloat16 or Native storage for this ", holder);
    }
}

// Row src[0, n) in storage type S at dst: copied (S = T), rounded (bf16, fp16) or quantized (int8).
// Returns the row's scale: int8's, 1 for the others.
template <class S, class T>
T store_row(const T* src, Index n, S* dst) {
  if constexpr (std::is_same_v<S, T>) {
    std::copy(src, src + n, dst);
    return T(1);
  } else if constexpr (std::is_same_v<S, std::int8_t>) {
    return quantize_row(src, n, dst);
  } else {
    for (Index c = 0; c < n; ++c) dst[c] = round_to<S>(src[c]);
    return T(1);
  }
}

// y[0, n) = s * x[0, n) in T (s = 1 for the 16-bit types and Native).
template <class T, class S>
void dequantize(const S* x, Index n, T s, T* y) {
  namespace ei = Eigen::internal;
  using P = mk::Packet<T>;
  constexpr Index L = mk::kLanes<T>;
  const P vs = ei::pset1<P>(s);
  Index c = 0;
  for (; c + L <= n; c += L) ei::pstoreu(y + c, ei::pmul(vs, load_as<T>(x + c)));
  for (; c < n; ++c) y[c] = s * to_compute<T>(x[c]);
}

}  // namespace attn::detail
