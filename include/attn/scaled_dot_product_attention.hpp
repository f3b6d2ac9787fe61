// attn/scaled_dot_product_attention.hpp - softmax(q k^T * scale + masks) v for one sequence.
//
//   attn::ScaledDotProductAttention<float> sdpa;         // scale = 1 / sqrt(d)
//   attn::Masks<float> m;  m.causal = attn::Causal::TopLeft;
//   attn::Matrix<float> out = sdpa.forward(q, k, v, m);  // q [L, d], k [S, d], v [S, dv] -> [L, dv]
#pragma once

#include <cmath>
#include <optional>

#include "attn/detail/attention.hpp"
#include "attn/detail/check.hpp"
#include "attn/mask.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class ScaledDotProductAttention {
  ATTN_CHECK_SCALAR(T);

 public:
  // scale = 1 / sqrt(d), d taken from the query at each call.
  ScaledDotProductAttention() = default;
  // A fixed scale (any finite value; 0 gives uniform attention over the unmasked keys).
  explicit ScaledDotProductAttention(T scale) : scale_(scale), has_scale_(true) {
    detail::require_arg(std::isfinite(scale), "attn::ScaledDotProductAttention", "scale must be finite, got ", scale);
  }

  // q: [L, d]  k: [S, d]  v: [S, dv]  ->  [L, dv]
  Matrix<T> forward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const Masks<T>& masks = {}) const {
    Matrix<T> out(q.rows(), v.cols());
    run(q, k, v, masks, out, nullptr, "attn::ScaledDotProductAttention::forward");
    return out;
  }

  // q: [L, d]  k: [S, d]  v: [S, dv]  ->  out [L, dv], sized by the caller
  void forward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const Masks<T>& masks, MatrixRef<T> out) const {
    run(q, k, v, masks, out, nullptr, "attn::ScaledDotProductAttention::forward_into");
  }

  // q: [L, d]  k: [S, d]  v: [S, dv]  ->  output [L, dv], weights [L, S] (the probabilities;
  // rows whose keys are all masked are zeros)
  AttentionResult<T> forward_with_weights(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                          const ConstMatrixRef<T>& v, const Masks<T>& masks = {}) const {
    AttentionResult<T> r{Matrix<T>(q.rows(), v.cols()), Matrix<T>(q.rows(), k.rows())};
    run(q, k, v, masks, r.output, &r.weights, "attn::ScaledDotProductAttention::forward_with_weights");
    return r;
  }

  // q: [L, d]  k: [S, d]  v: [S, dv]  ->  output [L, dv], lse [1, L]: each row's log-sum-exp,
  // log sum_j exp(s_j) over its scaled, masked logits (-inf for a row with every key masked), what
  // attn::merge_attention_states needs to combine attention over disjoint keys.
  AttentionLse<T> forward_with_lse(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                      const ConstMatrixRef<T>& v, const Masks<T>& masks = {}) const {
    AttentionLse<T> r{Matrix<T>(q.rows(), v.cols()), Matrix<T>(1, q.rows())};
    MatrixRef<T> lse(r.lse);
    run(q, k, v, masks, r.output, nullptr, "attn::ScaledDotProductAttention::forward_with_lse", &lse);
    return r;
  }

  // The same into out [L, dv] and lse [1, L], sized by the caller.
  void forward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const Masks<T>& masks, MatrixRef<T> out, MatrixRef<T> lse) const {
    run(q, k, v, masks, out, nullptr, "attn::ScaledDotProductAttention::forward_into", &lse);
  }

  // The fixed scale, or nullopt for 1 / sqrt(d).
  std::optional<T> scale() const { return has_scale_ ? std::optional<T>(scale_) : std::nullopt; }

  // The arithmetic of Q K^T and P V (attn/precision.hpp) for calls that do not set
  // Masks::precision: Native (in T) or BFloat16.
  void set_precision(Precision p) { precision_ = p; }
  Precision precision() const { return precision_; }

 private:
  void run(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, const Masks<T>& masks,
           MatrixRef<T> out, Matrix<T>* weights, const char* where, MatrixRef<T>* lse = nullptr) const {
    using detail::shape;
    const Index L = q.rows(), d = q.cols(), S = k.rows(), dv = v.cols();
    detail::require_shape(L > 0 && d > 0, where, "query has shape ", shape(L, d), ", expected [L, d] with L, d > 0");
    detail::require_dims(where, "key", k.rows(), k.cols(), -1, d, "[S, d] = [S, ", d, "] (d from query)");
    detail::require_shape(S > 0, where, "key has shape ", shape(S, d), ", expected at least one key");
    detail::require_dims(where, "value", v.rows(), v.cols(), S, -1, "[S, dv] = [", S, ", dv] (S from key)");
    detail::require_shape(dv > 0, where, "value has shape ", shape(S, dv), ", expected dv > 0");
    detail::require_dims(where, "out", out.rows(), out.cols(), L, dv, "[L, dv] = ", shape(L, dv));
    if (lse) detail::require_dims(where, "lse", lse->rows(), lse->cols(), 1, L, "[1, L] = ", shape(1, L));

    detail::AttentionProblem<T> p;
    p.L = L;
    p.S = p.mask_keys = S;
    p.d = d;
    p.dv = dv;
    p.q = {q.data(), 0, 0, q.outerStride()};
    p.k = {k.data(), 0, 0, k.outerStride()};
    p.v = {v.data(), 0, 0, v.outerStride()};
    p.out = {out.data(), 0, 0, out.outerStride()};
    p.scale = has_scale_ ? scale_ : T(1) / std::sqrt(static_cast<T>(d));
    p.precision = precision_;
    detail::bind_masks(p, masks, where);
    if (weights) p.weights = {weights->data(), 0, 0, S};
    if (lse) p.lse = {lse->data(), 0, 0, lse->innerStride()};
    detail::attention(p);
  }

  // The fixed scale, when has_scale_ (a plain T and a flag, not a std::optional member: g++ 12
  // warns, wrongly, that a copied optional's value may be uninitialized - its bug 80635 - and the
  // project builds with -Werror).
  T scale_ = T(0);
  bool has_scale_ = false;
  Precision precision_ = Precision::Native;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(ScaledDotProductAttention);
