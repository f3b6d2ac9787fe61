// attn/linear.hpp - y = x W^T + b, as torch.nn.Linear.
//
//   attn::Linear<float> fc(/*in=*/4, /*out=*/3);
//   fc.set_weight(w);                       // w: [3, 4], PyTorch's fc.weight
//   attn::Matrix<float> y = fc.forward(x);  // x: [N, 4] -> y: [N, 3]
#pragma once

#include <utility>

#include "attn/detail/check.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/init.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class Linear {
  ATTN_CHECK_SCALAR(T);

 public:
  // PyTorch's initialisation: weight ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a = sqrt(5)),
  // bias ~ the same bound.
  Linear(Index in_features, Index out_features, bool bias, Generator& gen) : in_(in_features), out_(out_features) {
    detail::require_shape(in_features > 0 && out_features > 0, "attn::Linear",
                          "in_features and out_features must be positive, got ", "in_features = ", in_features,
                          ", out_features = ", out_features);
    detail::checked_mul("attn::Linear", "out_features * in_features", out_features, in_features);
    weight_.resize(out_, in_);
    init::linear_weight(weight_, gen);
    if (bias) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
      bias_.resize(out_);
      init::uniform(bias_, -bound, bound, gen);
    }
  }
  Linear(Index in_features, Index out_features, bool bias = true)
      : Linear(in_features, out_features, bias, default_gen()) {}

  // x: [N, in]  ->  [N, out]
  Matrix<T> forward(const ConstMatrixRef<T>& x) const {
    Matrix<T> y(x.rows(), out_);
    forward_into(x, y);
    return y;
  }

  // x: [N, in]  y: [N, out], sized by the caller (no allocation). Runs on attn::num_threads()
  // threads; the result does not depend on how many.
  void forward_into(const ConstMatrixRef<T>& x, MatrixRef<T> y) const {
    detail::require_dims("attn::Linear::forward", "x", x.rows(), x.cols(), -1, in_, "[N, in_features] = [N, ", in_,
                         "]");
    detail::require_dims("attn::Linear::forward", "y", y.rows(), y.cols(), x.rows(), out_,
                         "[N, out_features] = ", detail::shape(x.rows(), out_));
    detail::linear_into<T>(x, weight_, has_bias() ? bias_.data() : nullptr, y);
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  bool has_bias() const { return bias_.size() > 0; }

  const Matrix<T>& weight() const { return weight_; }  // [out, in]
  const Vector<T>& bias() const { return bias_; }      // [out]; empty without bias

  void set_weight(const ConstMatrixRef<T>& w) {
    detail::require_dims("attn::Linear::set_weight", "weight", w.rows(), w.cols(), out_, in_,
                         "[out_features, in_features] = ", detail::shape(out_, in_));
    weight_ = w;
  }
  void set_bias(const ConstVectorRef<T>& b) {
    detail::require_arg(has_bias(), "attn::Linear::set_bias", "this Linear was built with bias = false");
    detail::require_len("attn::Linear::set_bias", "bias", b.size(), out_, "[out_features] = [", out_, "]");
    bias_ = b;
  }

 private:
  static Generator& default_gen() {
    thread_local Generator gen;  // the default stream: reproducible per thread, no shared state
    return gen;
  }
  Index in_ = 0, out_ = 0;
  Matrix<T> weight_;
  Vector<T> bias_;
};

}  // namespace attn
