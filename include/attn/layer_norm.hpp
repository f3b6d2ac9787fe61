// attn/layer_norm.hpp - torch.nn.LayerNorm over the last dimension: one token per row.
//
//   attn::LayerNorm<float> norm(/*normalized_shape=*/512);  // weight = 1, bias = 0, as PyTorch
//   norm.set_weight(gamma);  norm.set_bias(beta);            // PyTorch's norm.weight, norm.bias: [512]
//   attn::Matrix<float> y = norm.forward(x);                 // x: [N, 512] -> y: [N, 512]
//
// Per row x of E features:  y = (x - mean) / sqrt(var + eps) * weight + bias,  with var the biased
// variance sum((x - mean)^2) / E, as PyTorch's. The mean and variance take two passes over the row
// (the mean, then the squared deviations from it): E[x^2] - E[x]^2 in one pass cancels away every
// digit of a row with a large common offset, such as 1e4 + small noise in float.
#pragma once

#include <cmath>

#include "attn/detail/check.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class LayerNorm {
  ATTN_CHECK_SCALAR(T);

 public:
  // PyTorch's options and initialisation: weight = 1 and bias = 0 when elementwise_affine; bias =
  // false keeps the weight only (PyTorch >= 2.1's LayerNorm(bias=False)).
  explicit LayerNorm(Index normalized_shape, double eps = 1e-5, bool elementwise_affine = true, bool bias = true)
      : E_(normalized_shape), eps_(eps) {
    detail::require_shape(normalized_shape > 0, "attn::LayerNorm", "normalized_shape must be positive, got ",
                          normalized_shape);
    detail::require_arg(eps >= 0 && std::isfinite(eps), "attn::LayerNorm", "eps must be finite and >= 0, got ", eps);
    if (elementwise_affine) {
      weight_ = Vector<T>::Ones(E_);
      if (bias) bias_ = Vector<T>::Zero(E_);
    }
  }

  // x: [N, E]  ->  [N, E]
  Matrix<T> forward(const ConstMatrixRef<T>& x) const {
    Matrix<T> y(x.rows(), E_);
    run(x, y, "attn::LayerNorm::forward");
    return y;
  }

  // x: [N, E]  ->  y [N, E], sized by the caller; y may be x itself (in place).
  void forward_into(const ConstMatrixRef<T>& x, MatrixRef<T> y) const { run(x, y, "attn::LayerNorm::forward_into"); }

  Index normalized_shape() const { return E_; }
  double eps() const { return eps_; }
  bool elementwise_affine() const { return weight_.size() > 0; }
  bool has_bias() const { return bias_.size() > 0; }

  // Parameters by PyTorch's names. Setters check the shape and throw shape_error, or
  // argument_error when the module was built without the parameter.
  const Vector<T>& weight() const { return weight_; }  // [E]; empty without elementwise_affine
  const Vector<T>& bias() const { return bias_; }      // [E]; empty without elementwise_affine or bias

  void set_weight(const ConstVectorRef<T>& w) {
    detail::require_arg(elementwise_affine(), "attn::LayerNorm::set_weight",
                        "weight does not exist: the module was built with elementwise_affine = false");
    detail::require_len("attn::LayerNorm::set_weight", "weight", w.size(), E_, "[normalized_shape] = [", E_, "]");
    weight_ = w;
  }
  void set_bias(const ConstVectorRef<T>& b) {
    detail::require_arg(has_bias(), "attn::LayerNorm::set_bias", "bias does not exist: the module was built with ",
                        elementwise_affine() ? "bias = false" : "elementwise_affine = false");
    detail::require_len("attn::LayerNorm::set_bias", "bias", b.size(), E_, "[normalized_shape] = [", E_, "]");
    bias_ = b;
  }

 private:
  void run(const ConstMatrixRef<T>& x, MatrixRef<T> y, const char* where) const {
    detail::require_dims(where, "x", x.rows(), x.cols(), -1, E_, "[N, normalized_shape] = [N, ", E_, "]");
    detail::require_dims(where, "y", y.rows(), y.cols(), x.rows(), E_,
                         "[N, normalized_shape] = ", detail::shape(x.rows(), E_));
    const T n = static_cast<T>(E_), epsilon = static_cast<T>(eps_);
    for (Index r = 0; r < x.rows(); ++r) {
      // Both statistics are read from x before y's row is written, so y may be x.
      const T mean = x.row(r).sum() / n;
      const T var = (x.row(r).array() - mean).square().sum() / n;
      const T rstd = T(1) / std::sqrt(var + epsilon);
      if (has_bias())
        y.row(r).array() = (x.row(r).array() - mean) * rstd * weight_.transpose().array() + bias_.transpose().array();
      else if (elementwise_affine())
        y.row(r).array() = (x.row(r).array() - mean) * rstd * weight_.transpose().array();
      else
        y.row(r).array() = (x.row(r).array() - mean) * rstd;
    }
  }

  Index E_;
  double eps_;
  Vector<T> weight_;  // [E]
  Vector<T> bias_;    // [E]
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(LayerNorm);
