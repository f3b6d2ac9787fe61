// attn/feed_forward.hpp - the transformer's position-wise feed-forward block, eval mode:
// linear2(activation(linear1(x))), as in torch.nn.TransformerEncoderLayer (whose dropouts are the
// identity in eval mode).
//
//   attn::FeedForward<float> ff(/*d_model=*/512, /*dim_feedforward=*/2048, attn::Activation::GELU);
//   ff.linear1().set_weight(w1);              // [2048, 512], PyTorch's linear1.weight; linear2: [512, 2048]
//   attn::Matrix<float> y = ff.forward(x);    // x: [N, 512] -> y: [N, 512]
#pragma once

#include <cmath>
#include <utility>

#include "attn/detail/check.hpp"
#include "attn/detail/scratch.hpp"
#include "attn/init.hpp"
#include "attn/linear.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

// The activations PyTorch's transformer layers accept by name.
enum class Activation {
  ReLU,  // max(x, 0)                                   activation="relu" (F.relu)
  GELU,  // x * Phi(x) = x/2 * (1 + erf(x / sqrt(2)))   activation="gelu" (F.gelu, approximate="none")
  // x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))  F.gelu(approximate="tanh"), GPT-2's gelu_new;
  // FeedForward only (nn.Transformer*Layer accepts relu and gelu)
  GELUTanh,
};

namespace detail {

// Applies a in place to every element of h.
template <class T>
void activate(Activation a, Eigen::Map<Matrix<T>> h) {
  T* p = h.data();
  const Index n = h.size();
  if (a == Activation::ReLU) {
    for (Index i = 0; i < n; ++i) p[i] = p[i] < T(0) ? T(0) : p[i];  // NaN stays NaN, as torch.relu
  } else if (a == Activation::GELUTanh) {
    const T c = T(0.79788456080286535588), k = T(0.044715);  // sqrt(2/pi)
    for (Index i = 0; i < n; ++i) p[i] = T(0.5) * p[i] * (T(1) + std::tanh(c * (p[i] + k * p[i] * p[i] * p[i])));
  } else {
    const T inv_sqrt2 = T(0.70710678118654752440);
    for (Index i = 0; i < n; ++i) p[i] = T(0.5) * p[i] * (T(1) + std::erf(p[i] * inv_sqrt2));
  }
}

}  // namespace detail

template <class T>
class FeedForward {
  ATTN_CHECK_SCALAR(T);

 public:
  // linear1: [d_model -> dim_feedforward], linear2: [dim_feedforward -> d_model], both with
  // nn.Linear's initialisation; bias = false drops both biases.
  FeedForward(Index d_model, Index dim_feedforward, Activation activation, bool bias, Generator& gen)
      : linear1_(checked(d_model, dim_feedforward), dim_feedforward, bias, gen),
        linear2_(dim_feedforward, d_model, bias, gen),
        activation_(activation) {}
  FeedForward(Index d_model, Index dim_feedforward, Activation activation = Activation::ReLU, bool bias = true)
      : FeedForward(d_model, dim_feedforward, activation, bias, default_gen()) {}
  // From its two projections (no initialisation): linear1 [d_model -> ff], linear2 [ff -> d_model].
  FeedForward(Linear<T> linear1, Linear<T> linear2, Activation activation)
      : linear1_(std::move(linear1)), linear2_(std::move(linear2)), activation_(activation) {
    detail::require_shape(linear2_.in_features() == linear1_.out_features() &&
                              linear2_.out_features() == linear1_.in_features(),
                          "attn::FeedForward", "linear1 maps ", linear1_.in_features(), " -> ",
                          linear1_.out_features(), " features and linear2 ", linear2_.in_features(), " -> ",
                          linear2_.out_features(), ", expected d_model -> ff and ff -> d_model");
  }

  // x: [N, d_model]  ->  [N, d_model]
  Matrix<T> forward(const ConstMatrixRef<T>& x) const {
    Matrix<T> y(x.rows(), d_model());
    run(x, y, "attn::FeedForward::forward");
    return y;
  }

  // x: [N, d_model]  ->  y [N, d_model], sized by the caller; y may be x itself (x is read in full
  // before y is written). The hidden [N, dim_feedforward] activations live in the per-thread
  // scratch buffer (detail/scratch.hpp), so a repeated call of one shape allocates nothing.
  void forward_into(const ConstMatrixRef<T>& x, MatrixRef<T> y) const { run(x, y, "attn::FeedForward::forward_into"); }

  Index d_model() const { return linear1_.in_features(); }
  Index dim_feedforward() const { return linear1_.out_features(); }
  Activation activation() const { return activation_; }

  // The two projections, by PyTorch's names (linear1.weight [ff, d_model], linear1.bias [ff],
  // linear2.weight [d_model, ff], linear2.bias [d_model]).
  const Linear<T>& linear1() const { return linear1_; }
  Linear<T>& linear1() { return linear1_; }
  const Linear<T>& linear2() const { return linear2_; }
  Linear<T>& linear2() { return linear2_; }
  // Keeps both weights in storage s (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) { detail::set_storage_of_all<T, 2>(s, {&linear1_, &linear2_}); }
  // The arithmetic of both products (attn/precision.hpp): Native (in T) or BFloat16.
  void set_precision(Precision p) { linear1_.set_precision(p), linear2_.set_precision(p); }
  Precision precision() const { return linear1_.precision(); }

 private:
  static Index checked(Index d_model, Index dim_feedforward) {
    detail::require_shape(d_model > 0 && dim_feedforward > 0, "attn::FeedForward",
                          "d_model and dim_feedforward must be positive, got d_model = ", d_model,
                          ", dim_feedforward = ", dim_feedforward);
    return d_model;
  }

  void run(const ConstMatrixRef<T>& x, MatrixRef<T> y, const char* where) const {
    const Index D = d_model();
    detail::require_dims(where, "x", x.rows(), x.cols(), -1, D, "[N, d_model] = [N, ", D, "]");
    detail::require_dims(where, "y", y.rows(), y.cols(), x.rows(), D, "[N, d_model] = ", detail::shape(x.rows(), D));
    detail::Scratch<T> scratch(x.rows() * dim_feedforward());
    Eigen::Map<Matrix<T>> h(scratch.data(), x.rows(), dim_feedforward());
    linear1_.forward_into(x, h);
    detail::activate(activation_, h);
    linear2_.forward_into(h, y);
  }

  static Generator& default_gen() {
    thread_local Generator gen;
    return gen;
  }

  Linear<T> linear1_, linear2_;
  Activation activation_ = Activation::ReLU;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(FeedForward);
