// attn/models/bert.hpp - BERT-family encoders from a Hugging Face checkpoint: BERT and RoBERTa
// (model_type "bert", "roberta", "xlm-roberta"), with the pooler and sentence embeddings
// (sentence-transformers' mean pooling).
//
//   auto bert = attn::models::load_bert<float>(attn::io::Checkpoint::open("all-MiniLM-L6-v2"));
//   auto out = bert.forward(ids, /*batch=*/2, mask);                 // ids, mask: [2*L], rows (b, l)
//   attn::Matrix<float> e = attn::models::mean_pooling<float>(out.last_hidden_state, mask, 2);  // [2, H]
//
// Mirrors transformers' models/bert/modeling_bert.py (BertModel) and roberta/modeling_roberta.py:
//   x = LayerNorm(word_embeddings(ids) + position_embeddings(pos) + token_type_embeddings(types))
//   per layer (post-norm, GELU):  x = LayerNorm(x + attention(x));  x = LayerNorm(x + ffn(x))
//   pooler_output = tanh(pooler.dense(x[first token of each sequence]))
// BERT's positions are 0 .. L-1; RoBERTa's start after its padding token, counting only non-padding
// tokens (create_position_ids_from_input_ids: padding_idx + cumsum(ids != pad) at non-padding
// tokens, padding_idx at padding). A layer is attn::TransformerEncoderLayer (batch_first, post-norm,
// GELU, eps layer_norm_eps): query/key/value become its in_proj_weight, attention.output.dense its
// out_proj, intermediate.dense and output.dense its linear1 and linear2, the two LayerNorms norm1
// and norm2. attention_mask 0 marks padding: it masks those keys (the key padding mask); padded
// rows are still computed, as Hugging Face does.
// config.json fields read: vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
// intermediate_size, max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act ("gelu",
// "relu"), pad_token_id (RoBERTa), position_embedding_type ("absolute").
// Tensor names under "bert.", "roberta." or none: "embeddings.{word,position,token_type}_embeddings
// .weight", "embeddings.LayerNorm.*", "encoder.layer.{i}.attention.self.{query,key,value}.*",
// "encoder.layer.{i}.attention.output.{dense,LayerNorm}.*", "encoder.layer.{i}.intermediate.dense.*",
// "encoder.layer.{i}.output.{dense,LayerNorm}.*", "pooler.dense.*" (optional: no pooler without it).
// The buffer embeddings.position_ids some files hold is ignored; a task head (cls.*, classifier.*)
// is unexpected: strict = false loads the encoder without it.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attn/detail/hf_config.hpp"
#include "attn/embedding.hpp"
#include "attn/io/checkpoint.hpp"
#include "attn/layer_norm.hpp"
#include "attn/linear.hpp"
#include "attn/mask.hpp"
#include "attn/models/load_options.hpp"
#include "attn/transformer.hpp"

namespace attn::models {

// Sentence-transformers' mean pooling: the mean of each sequence's rows of last_hidden_state
// [B*L, H] where attention_mask [B*L] is 1 (empty: every row)  ->  [B, H]. A sequence with no
// token gets zeros.
template <class T>
Matrix<T> mean_pooling(const ConstMatrixRef<T>& last_hidden_state, const std::vector<int>& attention_mask,
                       Index batch) {
  const char* where = "attn::models::mean_pooling";
  attn::detail::require_shape(batch > 0 && last_hidden_state.rows() % batch == 0, where, "last_hidden_state has ",
                              last_hidden_state.rows(), " rows, expected B*L with B = batch = ", batch);
  attn::detail::require_len(where, "attention_mask", static_cast<Index>(attention_mask.size()),
                            attention_mask.empty() ? 0 : last_hidden_state.rows(), "[B*L] = [",
                            last_hidden_state.rows(), "] or empty");
  const Index L = last_hidden_state.rows() / batch;
  Matrix<T> out = Matrix<T>::Zero(batch, last_hidden_state.cols());
  for (Index b = 0; b < batch; ++b) {
    Index n = 0;
    for (Index l = 0; l < L; ++l) {
      if (!attention_mask.empty() && attention_mask[std::size_t(b * L + l)] == 0) continue;
      out.row(b) += last_hidden_state.row(b * L + l);
      ++n;
    }
    if (n > 0) out.row(b) /= static_cast<T>(n);
  }
  return out;
}

template <class T>
class BertModel {
  ATTN_CHECK_SCALAR(T);

 public:
  struct Output {
    Matrix<T> last_hidden_state;  // [B*L, hidden]
    Matrix<T> pooler_output;      // [B, hidden]; empty without a pooler
  };

  // From its parts. padding_idx: RoBERTa's positions (above), or -1 for BERT's 0 .. L-1.
  BertModel(Embedding<T> word_embeddings, Embedding<T> position_embeddings, Embedding<T> token_type_embeddings,
            LayerNorm<T> embeddings_norm, TransformerEncoder<T> encoder, std::optional<Linear<T>> pooler,
            Index padding_idx = -1)
      : word_(std::move(word_embeddings)),
        position_(std::move(position_embeddings)),
        token_type_(std::move(token_type_embeddings)),
        norm_(std::move(embeddings_norm)),
        encoder_(std::move(encoder)),
        pooler_(std::move(pooler)),
        padding_idx_(padding_idx) {
    const Index H = word_.embedding_dim();
    attn::detail::require_shape(position_.embedding_dim() == H && token_type_.embedding_dim() == H &&
                                    norm_.normalized_shape() == H && encoder_.d_model() == H &&
                                    (!pooler_ || (pooler_->in_features() == H && pooler_->out_features() == H)),
                                "attn::models::BertModel", "the parts disagree on the hidden size ", H);
  }

  // input_ids [B*L]: B sequences of L tokens (padded on the right), rows (b, l); attention_mask
  // [B*L], 1 for a token and 0 for padding (empty: no padding); token_type_ids [B*L] (empty: 0).
  Output forward(const std::vector<int>& input_ids, Index batch, const std::vector<int>& attention_mask = {},
                 const std::vector<int>& token_type_ids = {}) const {
    const char* where = "attn::models::BertModel::forward";
    const Index N = static_cast<Index>(input_ids.size());
    attn::detail::require_shape(batch > 0 && N > 0 && N % batch == 0, where, "input_ids has ", N,
                                " tokens, expected B*L with B = batch = ", batch, " and L > 0");
    const Index L = N / batch;
    attn::detail::require_len(where, "attention_mask", static_cast<Index>(attention_mask.size()),
                              attention_mask.empty() ? 0 : N, "[B*L] = [", N, "] or empty");
    attn::detail::require_len(where, "token_type_ids", static_cast<Index>(token_type_ids.size()),
                              token_type_ids.empty() ? 0 : N, "[B*L] = [", N, "] or empty");
    std::vector<int> positions(input_ids.size());
    for (Index b = 0; b < batch; ++b) {
      Index seen = 0;
      for (Index l = 0; l < L; ++l) {
        const std::size_t r = std::size_t(b * L + l);
        if (padding_idx_ < 0) {
          positions[r] = static_cast<int>(l);
        } else {
          const bool pad = input_ids[r] == padding_idx_;
          seen += pad ? 0 : 1;
          positions[r] = static_cast<int>(pad ? padding_idx_ : padding_idx_ + seen);
        }
      }
    }
    Matrix<T> x = word_.forward(input_ids);
    x += position_.forward(positions);
    x += token_type_.forward(token_type_ids.empty() ? std::vector<int>(input_ids.size(), 0) : token_type_ids);
    norm_.forward_into(x, x);

    EncoderArgs<T> args;
    args.batch = batch;
    if (!attention_mask.empty()) {
      BoolMatrix padded(batch, L);
      for (Index i = 0; i < N; ++i) padded(i / L, i % L) = attention_mask[std::size_t(i)] == 0;
      args.key_padding_mask = IgnoreMask(std::move(padded));  // owned: padded dies with this scope
    }
    Output out;
    out.last_hidden_state = encoder_.forward(x, args);
    if (pooler_) {
      Matrix<T> first(batch, hidden_size());
      for (Index b = 0; b < batch; ++b) first.row(b) = out.last_hidden_state.row(b * L);
      out.pooler_output = pooler_->forward(first).array().tanh().matrix();
    }
    return out;
  }

  Index hidden_size() const { return word_.embedding_dim(); }
  Index padding_idx() const { return padding_idx_; }
  const Embedding<T>& word_embeddings() const { return word_; }
  const Embedding<T>& position_embeddings() const { return position_; }
  const Embedding<T>& token_type_embeddings() const { return token_type_; }
  const LayerNorm<T>& embeddings_norm() const { return norm_; }
  const TransformerEncoder<T>& encoder() const { return encoder_; }
  TransformerEncoder<T>& encoder() { return encoder_; }
  const Linear<T>* pooler() const { return pooler_ ? &*pooler_ : nullptr; }

 private:
  Embedding<T> word_, position_, token_type_;
  LayerNorm<T> norm_;
  TransformerEncoder<T> encoder_;
  std::optional<Linear<T>> pooler_;
  Index padding_idx_ = -1;
};

struct BertConfig {
  std::string model_type;  // "bert", "roberta", "xlm-roberta"
  Index vocab_size = 0, hidden_size = 0, num_layers = 0, num_heads = 0, intermediate_size = 0;
  Index max_positions = 0, type_vocab_size = 0, pad_token_id = 0;
  double layer_norm_eps = 1e-12;
  Activation activation = Activation::GELU;

  static BertConfig from(const io::Checkpoint& ckpt) {
    const attn::detail::HfConfig j(ckpt.config(), "checkpoint " + ckpt.path() + ": config.json");
    BertConfig c;
    c.model_type = j.text("model_type", "bert");
    if (c.model_type != "bert" && c.model_type != "roberta" && c.model_type != "xlm-roberta")
      j.fail("model_type \"" + c.model_type + "\" is not of the BERT family (bert, roberta, xlm-roberta)");
    c.vocab_size = j.count("vocab_size");
    c.hidden_size = j.count("hidden_size");
    c.num_layers = j.layers("num_hidden_layers", ckpt.names().size());
    c.num_heads = j.count("num_attention_heads");
    if (c.hidden_size % c.num_heads != 0) j.fail("hidden_size is not divisible by num_attention_heads");
    c.intermediate_size = j.count("intermediate_size");
    c.max_positions = j.count("max_position_embeddings");
    c.type_vocab_size = j.count("type_vocab_size", 2);
    c.pad_token_id = j.integer("pad_token_id", c.model_type == "bert" ? 0 : 1);
    c.layer_norm_eps = j.real("layer_norm_eps", 1e-12);
    const std::string act = j.text("hidden_act", "gelu");
    if (act == "gelu")
      c.activation = Activation::GELU;
    else if (act == "relu")
      c.activation = Activation::ReLU;
    else
      j.fail("hidden_act \"" + act + "\" is not supported (gelu, relu)");
    const std::string pos = j.text("position_embedding_type", "absolute");
    if (pos != "absolute") j.fail("position_embedding_type \"" + pos + "\" is not supported (absolute)");
    return c;
  }
  bool roberta() const { return model_type != "bert"; }
};

namespace detail {

inline std::string bert_prefix(const io::Checkpoint& ckpt) {
  for (const char* p : {"bert.", "roberta.", ""})
    if (ckpt.contains(std::string(p) + "embeddings.word_embeddings.weight")) return p;
  // As BertConfig reads it: absent or null is "bert", anything but a string a format_error (json's
  // value() threw its type_error on a null, found by checkpoint_fuzz).
  const attn::detail::HfConfig j(ckpt.config(), "checkpoint " + ckpt.path() + ": config.json");
  return j.text("model_type", "bert") == "bert" ? "bert." : "roberta.";
}

inline std::vector<io::ExpectedTensor> bert_tensors(const BertConfig& c, const std::string& p, bool pooler) {
  const Index H = c.hidden_size, F = c.intermediate_size;
  std::vector<io::ExpectedTensor> t;
  const auto linear = [&](const std::string& name, Index out, Index in) {
    t.push_back({name + ".weight", {out, in}});
    t.push_back({name + ".bias", {out}});
  };
  const auto norm = [&](const std::string& name) {
    t.push_back({name + ".weight", {H}});
    t.push_back({name + ".bias", {H}});
  };
  t.push_back({p + "embeddings.word_embeddings.weight", {c.vocab_size, H}});
  t.push_back({p + "embeddings.position_embeddings.weight", {c.max_positions, H}});
  t.push_back({p + "embeddings.token_type_embeddings.weight", {c.type_vocab_size, H}});
  norm(p + "embeddings.LayerNorm");
  for (Index i = 0; i < c.num_layers; ++i) {
    const std::string l = p + "encoder.layer." + std::to_string(i) + ".";
    linear(l + "attention.self.query", H, H);
    linear(l + "attention.self.key", H, H);
    linear(l + "attention.self.value", H, H);
    linear(l + "attention.output.dense", H, H);
    norm(l + "attention.output.LayerNorm");
    linear(l + "intermediate.dense", F, H);
    linear(l + "output.dense", H, F);
    norm(l + "output.LayerNorm");
  }
  if (pooler) linear(p + "pooler.dense", H, H);
  return t;
}

}  // namespace detail

// The checkpoint's encoder, by its own tensor names, checked against config.json first. The
// layers' projection weights are kept in LoadOptions::storage, or as the file stores them (a BF16
// file's in bf16); the query, key and value weights are packed into in_proj_weight, a copy.
template <class T>
BertModel<T> load_bert(const io::Checkpoint& ckpt, const LoadOptions& opt = {}) {
  const BertConfig c = BertConfig::from(ckpt);
  const std::string p = detail::bert_prefix(ckpt);
  const bool pooler = ckpt.contains(p + "pooler.dense.weight");
  detail::check_checkpoint(ckpt, detail::bert_tensors(c, p, pooler), p, opt, {"embeddings.position_ids"},
                           "attn::models::load_bert");

  const Index H = c.hidden_size;
  const auto norm = [&](const std::string& name) { return detail::layer_norm<T>(ckpt, name, H, c.layer_norm_eps); };
  TransformerOptions o;
  o.dim_feedforward = c.intermediate_size;
  o.activation = c.activation;
  o.layer_norm_eps = c.layer_norm_eps;
  o.batch_first = true;
  TransformerEncoder<T> encoder(TransformerEncoderLayer<T>(H, c.num_heads, o), c.num_layers);
  for (Index i = 0; i < c.num_layers; ++i) {
    const std::string l = p + "encoder.layer." + std::to_string(i) + ".";
    TransformerEncoderLayer<T>& layer = encoder.layer(i);
    Matrix<T> w(3 * H, H);
    Vector<T> b(3 * H);
    const char* parts[] = {"attention.self.query", "attention.self.key", "attention.self.value"};
    for (int k = 0; k < 3; ++k) {
      w.middleRows(k * H, H) = ckpt.matrix<T>(l + parts[k] + ".weight");
      b.segment(k * H, H) = ckpt.vector<T>(l + parts[k] + ".bias");
    }
    layer.self_attn().set_in_proj_weight(w);
    layer.self_attn().set_in_proj_bias(b);
    layer.self_attn().out_proj().set_weight(ckpt.matrix<T>(l + "attention.output.dense.weight"));
    layer.self_attn().out_proj().set_bias(ckpt.vector<T>(l + "attention.output.dense.bias"));
    layer.linear1().set_weight(ckpt.matrix<T>(l + "intermediate.dense.weight"));
    layer.linear1().set_bias(ckpt.vector<T>(l + "intermediate.dense.bias"));
    layer.linear2().set_weight(ckpt.matrix<T>(l + "output.dense.weight"));
    layer.linear2().set_bias(ckpt.vector<T>(l + "output.dense.bias"));
    for (const char* copied : {"attention.self.query", "attention.self.key", "attention.self.value",
                               "attention.output.dense", "intermediate.dense", "output.dense"})
      ckpt.release(l + copied + ".weight");  // the layer holds its own copy
    layer.norm1() = norm(l + "attention.output.LayerNorm");
    layer.norm2() = norm(l + "output.LayerNorm");
  }
  const Storage s =
      opt.storage.value_or(detail::stored_as(ckpt.info(p + "encoder.layer.0.attention.self.query.weight").dtype));
  if (s != Storage::Native) encoder.set_weight_storage(s);
  std::optional<Linear<T>> pool;
  if (pooler)
    pool.emplace(ckpt.weight<T>(p + "pooler.dense.weight", opt.storage, opt.map_weights),
                 ckpt.vector<T>(p + "pooler.dense.bias"));
  return BertModel<T>(
      Embedding<T>(ckpt.weight<T>(p + "embeddings.word_embeddings.weight", std::nullopt, opt.map_weights)),
      Embedding<T>(ckpt.weight<T>(p + "embeddings.position_embeddings.weight", std::nullopt, opt.map_weights)),
      Embedding<T>(ckpt.weight<T>(p + "embeddings.token_type_embeddings.weight", std::nullopt, opt.map_weights)),
      norm(p + "embeddings.LayerNorm"), std::move(encoder), std::move(pool), c.roberta() ? c.pad_token_id : -1);
}

}  // namespace attn::models
