// attn/init.hpp - PyTorch's default initialisations, from a seedable generator.
//
// The distributions are PyTorch's (nn.Linear: kaiming_uniform(a=sqrt(5)) weight, uniform bias;
// nn.MultiheadAttention: xavier_uniform projections, xavier_normal bias_k/bias_v). The streams are
// attn's own: the same seed gives the same weights on every platform and compiler, but not the
// numbers torch.manual_seed gives. To reproduce a PyTorch model, load its weights instead.
//
//   attn::Generator gen(42);
//   attn::Linear<float> fc(768, 3072, /*bias=*/true, gen);
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

#include "attn/types.hpp"

namespace attn {

class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0) : engine_(seed) {}

  // Uniform on [0, 1) with 53 random bits. (std::uniform_real_distribution is not specified
  // bit for bit, so it would make seeds mean different things on different standard libraries.)
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Standard normal by Box-Muller; 1 - uniform() is in (0, 1], so the log is finite.
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * 3.14159265358979323846 * u2);
  }

 private:
  std::mt19937_64 engine_;  // fully specified by the standard: same sequence everywhere
};

namespace init {

template <class Derived>
void uniform(Eigen::DenseBase<Derived>& x, double lo, double hi, Generator& gen) {
  for (Index r = 0; r < x.rows(); ++r)
    for (Index c = 0; c < x.cols(); ++c) x(r, c) = static_cast<typename Derived::Scalar>(gen.uniform(lo, hi));
}

template <class Derived>
void normal(Eigen::DenseBase<Derived>& x, double stddev, Generator& gen) {
  for (Index r = 0; r < x.rows(); ++r)
    for (Index c = 0; c < x.cols(); ++c) x(r, c) = static_cast<typename Derived::Scalar>(stddev * gen.normal());
}

// kaiming_uniform_(w, a=sqrt(5)) on a [out, in] weight: gain = sqrt(2 / (1 + a^2)) = sqrt(1/3),
// bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
template <class Derived>
void linear_weight(Eigen::DenseBase<Derived>& w, Generator& gen) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(w.cols()));
  uniform(w, -bound, bound, gen);
}

// xavier_uniform_: bound = sqrt(6 / (fan_in + fan_out)), fan_in = cols, fan_out = rows.
template <class Derived>
void xavier_uniform(Eigen::DenseBase<Derived>& w, Generator& gen) {
  const double bound = std::sqrt(6.0 / static_cast<double>(w.rows() + w.cols()));
  uniform(w, -bound, bound, gen);
}

// xavier_normal_ with explicit fans (PyTorch's bias_k is [1, 1, E]: fan_in = fan_out = E).
template <class Derived>
void xavier_normal(Eigen::DenseBase<Derived>& w, Index fan_in, Index fan_out, Generator& gen) {
  normal(w, std::sqrt(2.0 / static_cast<double>(fan_in + fan_out)), gen);
}

}  // namespace init
}  // namespace attn
