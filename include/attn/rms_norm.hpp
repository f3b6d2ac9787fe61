// attn/rms_norm.hpp - root-mean-square layer norm over the last dimension, as Llama's (Hugging
// Face's LlamaRMSNorm, PyTorch >= 2.4's nn.RMSNorm with a weight): one token per row.
//
//   attn::RMSNorm<float> norm(/*dim=*/512);        // weight = 1, eps = 1e-6, as LlamaRMSNorm
//   norm.set_weight(w);                            // the checkpoint's input_layernorm.weight: [512]
//   attn::Matrix<float> y = norm.forward(x);       // x: [N, 512] -> y: [N, 512]
//
// Per row x of E features:  y = x / sqrt(mean(x^2) + eps) * weight,  mean(x^2) = sum(x_i^2) / E.
// Unlike LayerNorm there is no centring and no bias: only the row's scale is normalised. Computed
// in T, the input's type (LlamaRMSNorm upcasts half types to float first; for float and double
// inputs it computes in their own type too). The sum of squares cannot cancel, so one pass is
// exact to rounding; a row of zeros gives zeros (0 / sqrt(eps)).
#pragma once

#include <cmath>

#include "attn/detail/check.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class RMSNorm {
  ATTN_CHECK_SCALAR(T);

 public:
  // weight = 1 (LlamaRMSNorm's initialisation); eps defaults to LlamaRMSNorm's 1e-6 (Llama 2 and 3
  // checkpoints set rms_norm_eps = 1e-5 in their config).
  explicit RMSNorm(Index dim, double eps = 1e-6) : weight_(Vector<T>::Ones(checked(dim, eps))), eps_(eps) {}

  // x: [N, E]  ->  [N, E]
  Matrix<T> forward(const ConstMatrixRef<T>& x) const {
    Matrix<T> y(x.rows(), dim());
    run(x, y, "attn::RMSNorm::forward");
    return y;
  }

  // x: [N, E]  ->  y [N, E], sized by the caller; y may be x itself (in place). Allocates nothing.
  void forward_into(const ConstMatrixRef<T>& x, MatrixRef<T> y) const { run(x, y, "attn::RMSNorm::forward_into"); }

  Index dim() const { return weight_.size(); }
  double eps() const { return eps_; }

  // The parameter by Hugging Face's name: weight [E].
  const Vector<T>& weight() const { return weight_; }
  void set_weight(const ConstVectorRef<T>& w) {
    detail::require_len("attn::RMSNorm::set_weight", "weight", w.size(), dim(), "[dim] = [", dim(), "]");
    weight_ = w;
  }

 private:
  static Index checked(Index dim, double eps) {
    detail::require_shape(dim > 0, "attn::RMSNorm", "dim must be positive, got ", dim);
    detail::require_arg(eps >= 0 && std::isfinite(eps), "attn::RMSNorm", "eps must be finite and >= 0, got ", eps);
    return dim;
  }

  void run(const ConstMatrixRef<T>& x, MatrixRef<T> y, const char* where) const {
    const Index E = dim();
    detail::require_dims(where, "x", x.rows(), x.cols(), -1, E, "[N, dim] = [N, ", E, "]");
    detail::require_dims(where, "y", y.rows(), y.cols(), x.rows(), E, "[N, dim] = ", detail::shape(x.rows(), E));
    const T n = static_cast<T>(E), epsilon = static_cast<T>(eps_);
    for (Index r = 0; r < x.rows(); ++r) {
      // The scale is read from x before y's row is written, so y may be x.
      const T rrms = T(1) / std::sqrt(x.row(r).squaredNorm() / n + epsilon);
      y.row(r).array() = x.row(r).array() * rrms * weight_.transpose().array();
    }
  }

  Vector<T> weight_;  // [E]
  double eps_;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(RMSNorm);
