// fuzz/fuzz_input.hpp - the byte stream attention_fuzz and dist_fuzz read their choices and values
// from, one layout for both (tools/gen_fuzz_corpus.py writes attention_fuzz's seeds in it):
//   a choice (a shape, a flag):  one byte; past the end of the input, 0
//   a value:                     one byte b: (b - 116) / 16 for b < 232 (-7.25 .. 7.19 in steps of
//                                1/16), else special(b - 232), one of 24 edges of floating point;
//                                past the end, a plain value from a fixed pseudo-random stream
//   a mask:                      a byte per 8 bits; past the end, the stream's bits
// so that an input of a few bytes can still give large shapes their values.
#pragma once

#include <algorithm>
#include <attn/types.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace attn_fuzz {

using attn::Index;
template <class T>
using Matrix = attn::Matrix<T>;
using attn::BoolMatrix;

// The values a byte of 232 or more stands for: the edges of floating point.
template <class T>
T special(int i) {
  using Lim = std::numeric_limits<T>;
  switch (i) {
    case 0:
      return T(0);
    case 1:
      return -T(0);
    case 2:
      return Lim::quiet_NaN();
    case 3:
      return Lim::infinity();
    case 4:
      return -Lim::infinity();
    case 5:
      return Lim::max();
    case 6:
      return Lim::lowest();
    case 7:
      return Lim::denorm_min();
    case 8:
      return -Lim::denorm_min();
    case 9:
      return Lim::min() / 2;  // subnormal
    case 10:
      return Lim::min();
    case 11:
      return Lim::epsilon();
    case 12:
      return T(1e30);
    case 13:
      return T(-1e30);
    case 14:
      return T(1e15);
    case 15:
      return T(-1e15);
    case 16:
      return T(88.5);  // exp overflows in float just above 88.72
    case 17:
      return T(-104);  // exp underflows to 0 in float
    case 18:
      return T(710);  // exp overflows in double
    case 19:
      return T(1e-20);
    case 20:
      return T(1e6);
    case 21:
      return T(-1e6);
    case 22:
      return std::sqrt(Lim::max());  // a product of two overflows
    default:
      return -std::sqrt(Lim::max());
  }
}

// The input as a stream of bytes. Past its end, a choice (a shape, a flag) reads 0, and a value
// or a mask bit comes from a fixed pseudo-random stream (values in the plain range only).
class Input {
 public:
  Input(const std::uint8_t* data, std::size_t size) : data_(data), size_(size), state_(0x9e3779b97f4a7c15ull ^ size) {}

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  Index dim(int max) { return byte() % (max + 1); }
  std::uint64_t u64() {
    std::uint64_t x = 0;
    for (int i = 0; i < 8; ++i) x = (x << 8) | byte();
    return x;
  }

  template <class T>
  T value() {
    if (pos_ >= size_) return static_cast<T>(static_cast<int>(stream() % 232) - 116) / T(16);
    const int b = data_[pos_++];
    if (b >= 232) return special<T>(b - 232);
    return static_cast<T>(b - 116) / T(16);
  }
  template <class T>
  Matrix<T> matrix(Index rows, Index cols) {
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = value<T>();
    return m;
  }
  template <class T>
  attn::Vector<T> vector(Index n) {
    attn::Vector<T> v(n);
    for (Index i = 0; i < n; ++i) v[i] = value<T>();
    return v;
  }
  BoolMatrix bools(Index rows, Index cols) {
    BoolMatrix m(rows, cols);
    std::uint8_t bits = 0;
    for (Index i = 0; i < m.size(); ++i) {
      if (i % 8 == 0) bits = pos_ < size_ ? data_[pos_++] : stream();
      m.data()[i] = ((bits >> (i % 8)) & 1) != 0;
    }
    return m;
  }

 private:
  std::uint8_t stream() {
    state_ ^= state_ << 13;  // xorshift64
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return static_cast<std::uint8_t>(state_ >> 56);
  }

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::uint64_t state_;
};

// The largest magnitude among some values, and whether all are finite (an additive mask's -inf,
// "masked out", counts as finite where allowed).
struct Extent {
  double max = 0;
  bool finite = true;

  Extent& add(double x, bool minus_inf_allowed = false) {
    if (std::isfinite(x))
      max = std::max(max, std::abs(x));
    else if (!(minus_inf_allowed && x < 0 && std::isinf(x)))
      finite = false;
    return *this;
  }
  template <class Derived>
  Extent& add(const Eigen::DenseBase<Derived>& m, bool minus_inf_allowed = false) {
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j) add(static_cast<double>(m(i, j)), minus_inf_allowed);
    return *this;
  }
};

// What no intermediate may reach for the finiteness and comparison checks: a sixteenth of the
// largest finite T (a sum of terms each below it, in any order, stays finite).
template <class T>
constexpr double kLimit = static_cast<double>(std::numeric_limits<T>::max()) / 16;

}  // namespace attn_fuzz
