// attn/causal_lm.hpp - a decoder-only language model: token embedding (plus learned positions for
// GPT-2), a stack of DecoderLayers, a final norm and the LM head, with one KV cache per layer.
// attn/models/ builds one from a Hugging Face checkpoint (Llama, Mistral, Qwen 2, GPT-2), and
// attn/generate.hpp generates text from it.
//
//   attn::CausalLM<float> lm = attn::models::load_causal_lm<float>(attn::io::Checkpoint::open(dir));
//   auto cache = lm.make_cache(/*batch=*/1, /*capacity=*/2048);
//   attn::Matrix<float> logits = lm.forward(prompt_ids, cache, 0, attn::LogitRows::Last);  // [1, vocab]
//   logits = lm.forward({next_id}, cache, 0);                                              // a step
//
// On the token ids of one sequence at positions n, n+1, ... (n = the tokens its cache holds):
//   x = embed_tokens(ids) (+ embed_positions(n, n+1, ...))
//   x = layer_i(x) for each layer, against its cache
//   logits = lm_head(norm(x))       lm_head [vocab, E], or embed_tokens' table when tied
#pragma once

#include <algorithm>
#include <optional>
#include <utility>
#include <variant>
#include <vector>

#include "attn/decoder_layer.hpp"
#include "attn/detail/check.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/embedding.hpp"
#include "attn/kv_cache.hpp"
#include "attn/kv_storage.hpp"
#include "attn/linear.hpp"
#include "attn/precision.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

// Which rows of logits a forward returns: one per token, or each sequence's last (what
// generation needs: the head is a [vocab, E] product per row, as much as a layer for a long prompt).
enum class LogitRows { All, Last };

template <class T>
class CausalLM {
  ATTN_CHECK_SCALAR(T);

 public:
  using Norm = typename DecoderLayer<T>::Norm;
  using Cache = std::vector<KVCache<T>>;  // one per layer

  // From its parts: lm_head nullopt ties the head to embed_tokens (tie_word_embeddings);
  // embed_positions, GPT-2's learned positions (wpe), else nullopt (RoPE in the layers).
  CausalLM(Embedding<T> embed_tokens, std::vector<DecoderLayer<T>> layers, Norm norm, std::optional<Linear<T>> lm_head,
           std::optional<Embedding<T>> embed_positions = std::nullopt)
      : embed_tokens_(std::move(embed_tokens)),
        embed_positions_(std::move(embed_positions)),
        layers_(std::move(layers)),
        norm_(std::move(norm)),
        lm_head_(std::move(lm_head)) {
    const char* where = "attn::CausalLM";
    const Index E = embed_tokens_.embedding_dim();
    detail::require_arg(!layers_.empty(), where, "a model needs at least one layer");
    for (std::size_t i = 0; i < layers_.size(); ++i)
      detail::require_shape(layers_[i].embed_dim() == E, where, "layer ", i, " has embed_dim ", layers_[i].embed_dim(),
                            ", embed_tokens ", E);
    detail::require_shape(!embed_positions_ || embed_positions_->embedding_dim() == E, where,
                          "embed_positions has embedding_dim ",
                          embed_positions_ ? embed_positions_->embedding_dim() : 0, ", embed_tokens ", E);
    const Index norm_dim = std::holds_alternative<RMSNorm<T>>(norm_) ? std::get<RMSNorm<T>>(norm_).dim()
                                                                     : std::get<LayerNorm<T>>(norm_).normalized_shape();
    detail::require_shape(norm_dim == E, where, "norm has ", norm_dim, " features, embed_tokens ", E);
    detail::require_shape(!lm_head_ || lm_head_->in_features() == E, where, "lm_head takes ",
                          lm_head_ ? lm_head_->in_features() : 0, " features, the model has ", E);
  }

  // One sequence without a cache: ids [L]  ->  logits [L, vocab] (or [1, vocab] for Last).
  Matrix<T> forward(const std::vector<int>& ids, LogitRows rows = LogitRows::All) const {
    const char* where = "attn::CausalLM::forward";
    detail::require_arg(!ids.empty(), where, "ids is empty");
    check_positions(0, static_cast<Index>(ids.size()), where);
    Matrix<T> x = embed(ids, 0);
    for (const DecoderLayer<T>& l : layers_) x = l.forward(x, 1);
    return head(x, 1, rows);
  }

  // The next tokens of sequence b of the caches (make_cache): appends them to every layer's cache
  // and returns their logits [L, vocab] (or [1, vocab] for Last). On an error nothing changes.
  Matrix<T> forward(const std::vector<int>& ids, Cache& cache, Index b, LogitRows rows = LogitRows::All) const {
    const char* where = "attn::CausalLM::forward";
    const Index L = static_cast<Index>(ids.size());
    check_cache(cache, where);
    detail::require_arg(b >= 0 && b < cache[0].batch(), where, "sequence ", b, " is outside the cache's batch [0, ",
                        cache[0].batch(), ")");
    detail::require_arg(L > 0, where, "ids is empty");
    check_room(cache, b, L, where);
    const Index n = cache[0].size(b);
    check_positions(n, L, where);
    Matrix<T> x = embed(ids, n);
    for (std::size_t i = 0; i < layers_.size(); ++i) x = layers_[i].forward(x, cache[i], b);
    return head(x, 1, rows);
  }

  // Every sequence of the caches at once, each holding the same number of tokens: ids [B*L], the
  // next L tokens of each sequence (sequence b's at [b*L, (b+1)*L))  ->  logits [B*L, vocab] (or
  // [B, vocab] for Last). On an error nothing changes.
  Matrix<T> forward_batch(const std::vector<int>& ids, Cache& cache, LogitRows rows = LogitRows::All) const {
    const char* where = "attn::CausalLM::forward_batch";
    check_cache(cache, where);
    const Index B = cache[0].batch(), N = static_cast<Index>(ids.size()), L = N / B;
    detail::require_arg(N > 0 && N % B == 0, where, "ids has ", N, " tokens, expected B*L = ", B, "*L with L > 0");
    const Index n = cache[0].size(0);
    for (Index b = 1; b < B; ++b)
      detail::require_arg(cache[0].size(b) == n, where, "sequences 0 and ", b, " hold ", n, " and ", cache[0].size(b),
                          " tokens; run sequences of different lengths one at a time (forward(ids, cache, b))");
    check_room(cache, 0, L, where);
    check_positions(n, L, where);
    Matrix<T> x = embed(ids, n, L);
    for (std::size_t i = 0; i < layers_.size(); ++i) x = layers_[i].forward(x, cache[i]);
    return head(x, B, rows);
  }

  // A ragged batch of the caches' sequences (continuous batching): ids [total], sequence b's next
  // L_b tokens at [cu_seqlens[b], cu_seqlens[b+1]) (cu_seqlens: [B+1] for the caches' B
  // sequences; L_b = 0 leaves sequence b out), each sequence at its own length, in one call per
  // layer  ->  logits [total, vocab], or with Last one row per sequence that has tokens (its last),
  // in sequence order. Each L_b at most max_append(b) of every layer's cache. On an error nothing
  // changes.
  Matrix<T> forward_varlen(const std::vector<int>& ids, const Eigen::Ref<const IndexVector>& cu_seqlens, Cache& cache,
                           LogitRows rows = LogitRows::All) const {
    const char* where = "attn::CausalLM::forward_varlen";
    check_cache(cache, where);
    const Index B = detail::ragged_batch(where, "cu_seqlens", cu_seqlens, static_cast<Index>(ids.size()));
    detail::require_shape(B == cache[0].batch(), where, "cu_seqlens has ", cu_seqlens.size(),
                          " entries, expected [B+1] = [", cache[0].batch() + 1, "] (B from the cache)");
    std::vector<int> positions(ids.size());
    Index with_tokens = 0;
    for (Index b = 0; b < B; ++b) {
      const Index L = cu_seqlens[b + 1] - cu_seqlens[b], n = cache[0].size(b);
      if (L == 0) continue;
      ++with_tokens;
      check_room(cache, b, L, where, false);
      check_positions(n, L, where);
      for (Index r = 0; r < L; ++r) positions[std::size_t(cu_seqlens[b] + r)] = static_cast<int>(n + r);
    }
    Matrix<T> x = embed_tokens_.forward(ids);
    if (embed_positions_) x += embed_positions_->forward(positions);
    for (std::size_t i = 0; i < layers_.size(); ++i) x = layers_[i].forward_varlen(x, cache[i], cu_seqlens);
    if (rows == LogitRows::All) return head(x, 1, LogitRows::All);
    Matrix<T> last(with_tokens, x.cols());
    for (Index b = 0, r = 0; b < B; ++b)
      if (cu_seqlens[b + 1] > cu_seqlens[b]) last.row(r++) = x.row(cu_seqlens[b + 1] - 1);
    return head(last, 1, LogitRows::All);
  }

  // A KV cache per layer for `batch` sequences of up to `capacity` tokens each (0: max_positions()),
  // stored as `storage` (attn/kv_storage.hpp). A sliding-window model (Mistral) attends through its
  // window over a full cache; for endless generation in bounded memory, build ring caches of
  // capacity >= window with layer(i).self_attn().make_cache() instead (a longer prompt then goes
  // through each ring in chunks of max_append(), by the layers).
  Cache make_cache(Index batch, Index capacity = 0, KVStorage storage = KVStorage::Native) const {
    const Index c = capacity > 0 ? capacity : max_positions();
    Cache cache;
    cache.reserve(layers_.size());
    for (const DecoderLayer<T>& l : layers_) {
      const DecoderAttention<T>& a = l.self_attn();
      cache.emplace_back(storage, batch, a.num_kv_heads(), a.head_dim(), c);
    }
    return cache;
  }

  Index vocab_size() const { return lm_head_ ? lm_head_->out_features() : embed_tokens_.num_embeddings(); }
  Index hidden_size() const { return embed_tokens_.embedding_dim(); }
  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  // The positions the model covers: its RoPE table's, or its learned positions'.
  Index max_positions() const {
    Index m = embed_positions_ ? embed_positions_->num_embeddings() : 0;
    const DecoderAttentionOptions& o = layers_[0].self_attn().options();
    if (o.rope) m = m ? std::min(m, o.max_positions) : o.max_positions;
    return m ? m : o.max_positions;
  }

  const Embedding<T>& embed_tokens() const { return embed_tokens_; }
  const Embedding<T>* embed_positions() const { return embed_positions_ ? &*embed_positions_ : nullptr; }
  const DecoderLayer<T>& layer(Index i) const { return layers_[checked_index(i)]; }
  DecoderLayer<T>& layer(Index i) { return layers_[checked_index(i)]; }
  const Norm& norm() const { return norm_; }
  // The head, or nullptr when it is tied to embed_tokens.
  const Linear<T>* lm_head() const { return lm_head_ ? &*lm_head_ : nullptr; }
  bool tied() const { return !lm_head_; }

  // Keeps every layer's projection weights (and the head's own, when untied) in storage s; the
  // embeddings stay as they are. All or none changes.
  void set_weight_storage(Storage s) {
    std::vector<DecoderLayer<T>> layers = layers_;
    std::optional<Linear<T>> own_head = lm_head_;
    for (auto& l : layers) l.set_weight_storage(s);
    if (own_head) own_head->set_storage(s);
    layers_ = std::move(layers), lm_head_ = std::move(own_head);
  }
  // The arithmetic of every product (attn/precision.hpp), the head's included.
  void set_precision(Precision p) {
    for (auto& l : layers_) l.set_precision(p);
    if (lm_head_) lm_head_->set_precision(p);
    precision_ = p;
  }
  Precision precision() const { return precision_; }

 private:
  std::size_t checked_index(Index i) const {
    detail::require_arg(i >= 0 && i < num_layers(), "attn::CausalLM::layer", "index ", i,
                        " is outside [0, num_layers) = [0, ", num_layers(), ")");
    return static_cast<std::size_t>(i);
  }

  // Everything a layer would check of its cache, for every layer, before the first appends: an
  // error must leave all of them as they were.
  void check_cache(const Cache& cache, const char* where) const {
    detail::require_arg(static_cast<Index>(cache.size()) == num_layers(), where, "the cache has ", cache.size(),
                        " layers, the model ", num_layers(), " (make_cache() fits)");
    for (std::size_t i = 0; i < cache.size(); ++i) {
      const DecoderAttention<T>& a = layers_[i].self_attn();
      detail::require_shape(cache[i].kv_heads() == a.num_kv_heads() && cache[i].head_dim() == a.head_dim() &&
                                cache[i].value_dim() == a.head_dim(),
                            where, "the cache of layer ", i, " holds ", cache[i].kv_heads(), " kv heads of ",
                            cache[i].head_dim(), " (keys) and ", cache[i].value_dim(), " (values), the layer ",
                            a.num_kv_heads(), " of ", a.head_dim(), " (make_cache() fits)");
      detail::require_arg(cache[i].window() == 0 || cache[i].window() == a.options().window, where,
                          "the cache of layer ", i, " has window ", cache[i].window(), ", the layer ",
                          a.options().window);
    }
    for (std::size_t i = 1; i < cache.size(); ++i) {
      detail::require_arg(cache[i].batch() == cache[0].batch(), where, "the caches of layers 0 and ", i,
                          " hold different batches");
      for (Index b = 0; b < cache[0].batch(); ++b)
        detail::require_arg(cache[i].size(b) == cache[0].size(b), where, "the caches of layers 0 and ", i,
                            " hold different numbers of tokens for sequence ", b);
    }
  }

  // Room for L more tokens of sequence b (of every sequence from b on, for forward_batch) in every
  // layer's cache; a sliding-window ring takes any number in chunks (DecoderAttention) unless
  // `chunks` is false.
  void check_room(const Cache& cache, Index b, Index L, const char* where, bool chunks = true) const {
    for (std::size_t i = 0; i < cache.size(); ++i)
      detail::require_arg(L <= cache[i].max_append(b) || (chunks && cache[i].window() > 0), where, "appending ", L,
                          " tokens to a cache that takes ", cache[i].max_append(b), " more (layer ", i, ")");
  }

  void check_positions(Index n, Index L, const char* where) const {
    detail::require_arg(
        !embed_positions_ || (n <= embed_positions_->num_embeddings() && L <= embed_positions_->num_embeddings() - n),
        where, "positions [", n, ", ", n + L, ") exceed the model's learned positions [0, ",
        embed_positions_ ? embed_positions_->num_embeddings() : 0, ")");
  }

  // The rows of ids, sequences of L tokens each (L = all of them: one sequence), the first at position n.
  Matrix<T> embed(const std::vector<int>& ids, Index n, Index L = 0) const {
    Matrix<T> x = embed_tokens_.forward(ids);
    if (embed_positions_) {
      if (L == 0) L = x.rows();
      std::vector<int> positions(ids.size());
      for (std::size_t r = 0; r < ids.size(); ++r) positions[r] = static_cast<int>(n + Index(r) % L);
      x += embed_positions_->forward(positions);
    }
    return x;
  }

  // Final norm and head over x [B*L, E] -> [B*L, vocab], or each sequence's last row -> [B, vocab].
  Matrix<T> head(Matrix<T>& x, Index B, LogitRows rows) const {
    Matrix<T> h;
    if (rows == LogitRows::Last) {
      const Index L = x.rows() / B;
      h.resize(B, x.cols());
      for (Index b = 0; b < B; ++b) h.row(b) = x.row(b * L + L - 1);
    } else {
      h = std::move(x);
    }
    std::visit([&](const auto& n) { n.forward_into(h, h); }, norm_);
    if (lm_head_) return lm_head_->forward(h);
    Matrix<T> logits(h.rows(), vocab_size());
    detail::linear_into<T>(h, embed_tokens_.stored_weight().view(), nullptr, logits, 0, precision_);
    return logits;
  }

  Embedding<T> embed_tokens_;
  std::optional<Embedding<T>> embed_positions_;
  std::vector<DecoderLayer<T>> layers_;
  Norm norm_;
  std::optional<Linear<T>> lm_head_;
  Precision precision_ = Precision::Native;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(CausalLM);
