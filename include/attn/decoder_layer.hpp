// attn/decoder_layer.hpp - one layer of a decoder-only language model, pre-norm: Llama, Mistral,
// Qwen 2 (RMSNorm, grouped-query attention with RoPE, SwiGLU) and GPT-2 (LayerNorm, multi-head
// attention with biases, a GELU feed-forward) are this layer with different parts.
//
//   attn::DecoderLayer<float> layer(attn::RMSNorm<float>(2048, 1e-5), std::move(self_attn),
//                                   attn::RMSNorm<float>(2048, 1e-5), attn::SwiGLU<float>(2048, 5632));
//   attn::KVCache<float> cache = layer.self_attn().make_cache(/*batch=*/1, /*capacity=*/2048);
//   attn::Matrix<float> y = layer.forward(x, cache, 0);   // x [L, 2048]: the next L tokens of sequence 0
//
// On rows x, one per token (Hugging Face's LlamaDecoderLayer; GPT2Block with ln_1, attn, ln_2, mlp):
//   h = x + self_attn(input_layernorm(x))            causal, against the cache when there is one
//   y = h + mlp(post_attention_layernorm(h))
// The submodules keep Llama's names whatever the family (attn/models/ maps each checkpoint's).
#pragma once

#include <utility>
#include <variant>

#include "attn/decoder_attention.hpp"
#include "attn/detail/check.hpp"
#include "attn/feed_forward.hpp"
#include "attn/kv_cache.hpp"
#include "attn/layer_norm.hpp"
#include "attn/precision.hpp"
#include "attn/rms_norm.hpp"
#include "attn/storage.hpp"
#include "attn/swiglu.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class DecoderLayer {
  ATTN_CHECK_SCALAR(T);

 public:
  using Norm = std::variant<RMSNorm<T>, LayerNorm<T>>;  // Llama's, or GPT-2's
  using Mlp = std::variant<SwiGLU<T>, FeedForward<T>>;  // gated (Llama), or linear2(act(linear1)) (GPT-2)

  DecoderLayer(Norm input_layernorm, DecoderAttention<T> self_attn, Norm post_attention_layernorm, Mlp mlp)
      : input_layernorm_(std::move(input_layernorm)),
        self_attn_(std::move(self_attn)),
        post_attention_layernorm_(std::move(post_attention_layernorm)),
        mlp_(std::move(mlp)) {
    const Index E = self_attn_.embed_dim();
    const char* where = "attn::DecoderLayer";
    detail::require_shape(norm_dim(input_layernorm_) == E && norm_dim(post_attention_layernorm_) == E, where,
                          "the norms have ", norm_dim(input_layernorm_), " and ", norm_dim(post_attention_layernorm_),
                          " features, self_attn's embed_dim is ", E);
    const Index mlp_dim = std::visit([](const auto& m) { return m.d_model(); }, mlp_);
    detail::require_shape(mlp_dim == E, where, "mlp has d_model = ", mlp_dim, ", self_attn's embed_dim is ", E);
  }

  // Without a cache: x [B*L, E], B sequences of L tokens at positions 0 .. L-1  ->  [B*L, E].
  Matrix<T> forward(const ConstMatrixRef<T>& x, Index batch) const {
    return run(x, [&](const Matrix<T>& n) { return self_attn_.forward(n, batch); });
  }
  // Against a cache, every sequence (all holding the same number of positions): x [B*L, E].
  Matrix<T> forward(const ConstMatrixRef<T>& x, KVCache<T>& cache) const {
    return run(x, [&](const Matrix<T>& n) { return self_attn_.forward(n, cache); });
  }
  // Against sequence b of a cache: x [L, E], its next L tokens  ->  [L, E]. On an error the cache
  // is unchanged.
  Matrix<T> forward(const ConstMatrixRef<T>& x, KVCache<T>& cache, Index b) const {
    return run(x, [&](const Matrix<T>& n) { return self_attn_.forward(n, cache, b); });
  }

  // Against a cache, a ragged batch: x [total, E], sequence b's next L_b tokens at rows
  // [cu_seqlens[b], cu_seqlens[b+1]) (DecoderAttention::forward_varlen)  ->  [total, E].
  Matrix<T> forward_varlen(const ConstMatrixRef<T>& x, KVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& cu_seqlens) const {
    return run(x, [&](const Matrix<T>& n) { return self_attn_.forward_varlen(n, cache, cu_seqlens); });
  }

  Index embed_dim() const { return self_attn_.embed_dim(); }

  const Norm& input_layernorm() const { return input_layernorm_; }
  Norm& input_layernorm() { return input_layernorm_; }
  const DecoderAttention<T>& self_attn() const { return self_attn_; }
  DecoderAttention<T>& self_attn() { return self_attn_; }
  const Norm& post_attention_layernorm() const { return post_attention_layernorm_; }
  Norm& post_attention_layernorm() { return post_attention_layernorm_; }
  const Mlp& mlp() const { return mlp_; }
  Mlp& mlp() { return mlp_; }

  // Keeps every projection weight in storage s (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) {
    DecoderAttention<T> a = self_attn_;
    Mlp m = mlp_;
    a.set_weight_storage(s);
    std::visit([s](auto& f) { f.set_weight_storage(s); }, m);
    self_attn_ = std::move(a), mlp_ = std::move(m);
  }
  // The arithmetic of every product (attn/precision.hpp).
  void set_precision(Precision p) {
    self_attn_.set_precision(p);
    std::visit([p](auto& f) { f.set_precision(p); }, mlp_);
  }
  Precision precision() const { return self_attn_.precision(); }

 private:
  static Index norm_dim(const Norm& n) {
    if (const auto* r = std::get_if<RMSNorm<T>>(&n)) return r->dim();
    return std::get<LayerNorm<T>>(n).normalized_shape();
  }
  static void normalize(const Norm& n, const ConstMatrixRef<T>& x, MatrixRef<T> y) {
    std::visit([&](const auto& norm) { norm.forward_into(x, y); }, n);
  }

  template <class Attend>
  Matrix<T> run(const ConstMatrixRef<T>& x, Attend attend) const {
    detail::require_dims("attn::DecoderLayer::forward", "x", x.rows(), x.cols(), -1, embed_dim(),
                         "[rows, embed_dim] = [rows, ", embed_dim(), "]");
    Matrix<T> n(x.rows(), x.cols());
    normalize(input_layernorm_, x, n);
    Matrix<T> h = attend(n);  // the attention checks batch, cache and positions before touching the cache
    h += x;
    normalize(post_attention_layernorm_, h, n);
    std::visit([&](const auto& m) { m.forward_into(n, n); }, mlp_);
    h += n;
    return h;
  }

  Norm input_layernorm_;
  DecoderAttention<T> self_attn_;
  Norm post_attention_layernorm_;
  Mlp mlp_;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(DecoderLayer);
