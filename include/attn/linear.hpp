// attn/linear.hpp - y = x W^T + b, as torch.nn.Linear.
//
//   attn::Linear<float> fc(/*in=*/4, /*out=*/3);
//   fc.set_weight(w);                       // w: [3, 4], PyTorch's fc.weight
//   attn::Matrix<float> y = fc.forward(x);  // x: [N, 4] -> y: [N, 3]
//   fc.set_storage(attn::Storage::BFloat16);  // the weight kept in bf16 (attn/weight.hpp)
//
// The weight can be kept in bf16, fp16 or int8 (attn/storage.hpp) at a half or a quarter of the
// memory, and of the bytes a decoding step reads; x, y, the bias and the arithmetic stay in T.
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <utility>

#include "attn/detail/check.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/init.hpp"
#include "attn/precision.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"
#include "attn/weight.hpp"

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
    Matrix<T> w(out_, in_);
    init::linear_weight(w, gen);
    weight_ = Weight<T>(w);
    if (bias) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
      bias_.resize(out_);
      init::uniform(bias_, -bound, bound, gen);
    }
  }
  Linear(Index in_features, Index out_features, bool bias = true)
      : Linear(in_features, out_features, bias, default_gen()) {}

  // From its parameters, no initialisation: weight [out, in] in any storage (a Weight::view of a
  // memory-mapped checkpoint included, used in place), bias [out] or empty for none. What a model
  // built from a checkpoint uses (attn/models/): drawing random weights first would cost the time
  // and the memory of the whole model once more.
  Linear(Weight<T> weight, Vector<T> bias) : in_(weight.cols()), out_(weight.rows()) {
    detail::require_shape(in_ > 0 && out_ > 0, "attn::Linear", "weight has shape ", detail::shape(out_, in_),
                          ", expected [out_features, in_features] with both positive");
    detail::require_arg(bias.size() == 0 || bias.size() == out_, "attn::Linear", "bias has ", bias.size(),
                        " elements, expected [out_features] = [", out_, "] or none");
    weight_ = std::move(weight);
    bias_ = std::move(bias);
  }

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
    detail::linear_into<T>(x, weight_.view(), has_bias() ? bias_.data() : nullptr, y, 0, precision_);
  }

  // The arithmetic of forward's product (attn/precision.hpp): Native (in T), or BFloat16 (x and W
  // rounded to bf16, summed in T; more than 4 rows of x only, fewer stay in T).
  void set_precision(Precision p) { precision_ = p; }
  Precision precision() const { return precision_; }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  bool has_bias() const { return bias_.size() > 0; }

  // [out, in]: the stored values as T (a copy; int8 rows times their scales).
  Matrix<T> weight() const { return weight_.matrix(); }
  const Vector<T>& bias() const { return bias_; }  // [out]; empty without bias
  // The weight as stored, what forward reads.
  const Weight<T>& stored_weight() const { return weight_; }
  Storage storage() const { return weight_.storage(); }

  // w: [out, in], kept in the current storage type (rounded or quantized: attn/storage.hpp).
  void set_weight(const ConstMatrixRef<T>& w) {
    detail::require_dims("attn::Linear::set_weight", "weight", w.rows(), w.cols(), out_, in_,
                         "[out_features, in_features] = ", detail::shape(out_, in_));
    weight_.set(w);
  }
  // A weight already in its storage type (its shape must be [out, in]): kept as it is, a view
  // included (Weight::view).
  void set_stored_weight(Weight<T> w) {
    detail::require_dims("attn::Linear::set_stored_weight", "weight", w.rows(), w.cols(), out_, in_,
                         "[out_features, in_features] = ", detail::shape(out_, in_));
    weight_ = std::move(w);
  }
  // Keeps the weight in storage s from now on (converted from its current values; Int8 needs
  // finite weights, Float16 |w| < 65520). The bias stays in T.
  void set_storage(Storage s) { weight_.set_storage(s); }
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
  Weight<T> weight_;  // [out, in]
  Vector<T> bias_;
  Precision precision_ = Precision::Native;
};

namespace detail {

// linears[i]->set_storage(s) for all of them, or for none: a module's set_weight_storage, which
// must change nothing when one weight cannot be stored. Each weight is converted into a new
// Weight first (from one T copy of that weight at a time), and they are swapped in only when all
// are: converting copies of the Linears instead held a T copy of every weight at once (132 MiB
// more peak memory for one TinyLlama-sized SwiGLU, bench/model_bench).
template <class T, std::size_t N>
void set_storage_of_all(Storage s, const std::array<Linear<T>*, N>& linears) {
  std::array<std::optional<Weight<T>>, N> converted;
  for (std::size_t i = 0; i < N; ++i)
    if (linears[i]->storage() != s) converted[i].emplace(linears[i]->stored_weight().matrix(), s);
  for (std::size_t i = 0; i < N; ++i)
    if (converted[i]) linears[i]->set_stored_weight(std::move(*converted[i]));
}

}  // namespace detail

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(Linear);
