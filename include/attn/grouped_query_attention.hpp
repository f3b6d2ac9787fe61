// attn/grouped_query_attention.hpp - the attention core over all heads of a batch at once, with
// each K/V head shared by a group of query heads: grouped-query attention (Llama 2 70B, Mistral),
// multi-query attention (num_kv_heads = 1), or plain multi-head (num_kv_heads = num_heads). Query
// head h reads K/V head h / (num_heads / num_kv_heads); K and V are read in place, never repeated.
//
//   attn::GroupedQueryAttention<float> gqa(/*num_heads=*/32, /*num_kv_heads=*/8);  // scale 1/sqrt(d)
//   attn::GqaArgs<float> args;  args.causal = attn::Causal::BottomRight;  args.window = 4096;
//   attn::Matrix<float> out = gqa.forward(q, k, v, args);  // q [B*L, H*d], k/v [B*S, H_kv*d] -> [B*L, H*d]
#pragma once

#include <cmath>
#include <optional>

#include "attn/detail/attention.hpp"
#include "attn/detail/check.hpp"
#include "attn/mask.hpp"
#include "attn/types.hpp"

namespace attn {

// The masks and score options (Masks: attn_mask / attn_bias [L, S] or [B*H*L, S], key padding
// [B, S], causal, window, softcap, alibi_slopes [H]) and the batch size.
template <class T>
struct GqaArgs : Masks<T> {
  Index batch = 1;  // B: rows are (b, l), a contiguous [B, L, H*d] tensor (batch first)
};

template <class T>
class GroupedQueryAttention {
 public:
  // num_kv_heads must divide num_heads; scale 1 / sqrt(d), d taken from the query at each call.
  GroupedQueryAttention(Index num_heads, Index num_kv_heads) : H_(num_heads), Hkv_(num_kv_heads) {
    detail::require_shape(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                          "attn::GroupedQueryAttention", "num_kv_heads = ", num_kv_heads,
                          " must be positive and divide num_heads = ", num_heads);
  }
  // A fixed scale (any finite value).
  GroupedQueryAttention(Index num_heads, Index num_kv_heads, T scale) : GroupedQueryAttention(num_heads, num_kv_heads) {
    detail::require_arg(std::isfinite(scale), "attn::GroupedQueryAttention", "scale must be finite, got ", scale);
    scale_ = scale;
  }

  // q: [B*L, H*d]  k: [B*S, H_kv*d]  v: [B*S, H_kv*dv]  ->  [B*L, H*dv]; head h in columns [h*d, (h+1)*d)
  Matrix<T> forward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const GqaArgs<T>& args = {}) const {
    Matrix<T> out(q.rows(), H_ * (Hkv_ > 0 ? v.cols() / Hkv_ : 0));
    run(q, k, v, args, out, "attn::GroupedQueryAttention::forward");
    return out;
  }

  // q: [B*L, H*d]  k: [B*S, H_kv*d]  v: [B*S, H_kv*dv]  ->  out [B*L, H*dv], sized by the caller
  void forward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const GqaArgs<T>& args, MatrixRef<T> out) const {
    run(q, k, v, args, out, "attn::GroupedQueryAttention::forward_into");
  }

  Index num_heads() const { return H_; }
  Index num_kv_heads() const { return Hkv_; }
  std::optional<T> scale() const { return scale_; }

 private:
  void run(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, const GqaArgs<T>& args,
           MatrixRef<T> out, const char* where) const {
    using detail::shape;
    const Index B = args.batch;
    detail::require_arg(B > 0, where, "batch must be positive, got ", B);
    const Index d = q.cols() / H_, L = q.rows() / B, S = k.rows() / B;
    detail::require_shape(q.rows() == B * L && L > 0 && q.cols() == H_ * d && d > 0, where, "query has shape ",
                          shape(q.rows(), q.cols()), ", expected [B*L, H*d] = [", B, "*L, ", H_, "*d] with L, d > 0");
    detail::require_shape(k.rows() == B * S && S > 0 && k.cols() == Hkv_ * d, where, "key has shape ",
                          shape(k.rows(), k.cols()), ", expected [B*S, H_kv*d] = [", B, "*S, ", Hkv_ * d,
                          "] with S > 0 (d = ", d, " from query)");
    const Index dv = v.cols() / Hkv_;
    detail::require_shape(v.rows() == B * S && v.cols() == Hkv_ * dv && dv > 0, where, "value has shape ",
                          shape(v.rows(), v.cols()), ", expected [B*S, H_kv*dv] = [", B * S, ", ", Hkv_, "*dv]");
    detail::require_dims(where, "out", out.rows(), out.cols(), B * L, H_ * dv, "[B*L, H*dv] = ", shape(B * L, H_ * dv));

    detail::AttentionProblem<T> p;
    p.batch = B;
    p.heads = H_;
    p.kv_heads = Hkv_;
    p.L = L;
    p.S = p.mask_keys = S;
    p.d = d;
    p.dv = dv;
    p.q = {q.data(), L * q.outerStride(), d, q.outerStride()};
    p.k = {k.data(), S * k.outerStride(), d, k.outerStride()};
    p.v = {v.data(), S * v.outerStride(), dv, v.outerStride()};
    p.out = {out.data(), L * out.outerStride(), dv, out.outerStride()};
    p.scale = scale_ ? *scale_ : T(1) / std::sqrt(static_cast<T>(d));
    detail::bind_masks(p, args, where);
    detail::attention(p);
  }

  Index H_, Hkv_;
  std::optional<T> scale_;
};

}  // namespace attn
