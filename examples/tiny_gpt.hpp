// examples/tiny_gpt.hpp - a decoder-only transformer with Llama's structure, built from attn's
// layers and loaded from a safetensors file by Hugging Face's names: the model of the tiny_gpt
// example (examples/data/tiny_gpt.safetensors, trained by tools/train_tiny_gpt.py).
//
//   auto file = attn::io::SafeTensors::open("examples/data/tiny_gpt.safetensors");
//   tiny_gpt::Model model(file);
//   std::vector<int> answer = model.generate(model.encode("123+456="), 16);  // "579."
//
// Per layer, on rows x (one per token):
//   h = x + self_attn(input_layernorm(x))             RMSNorm, then DecoderAttention: GQA + RoPE
//   x = h + mlp(post_attention_layernorm(h))          RMSNorm, then SwiGLU
// and logits = lm_head(norm(x)). Generation is greedy and runs on a KV cache per layer: the
// prompt goes through in one call (prefill), then each new token alone (a decoding step).
#pragma once

#include <attn/attn.hpp>
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace tiny_gpt {

using attn::Index;
using Matrix = attn::Matrix<float>;
using Cache = std::vector<attn::KVCache<float>>;  // one per layer

// The hyperparameters, from the file's metadata (tools/train_tiny_gpt.py writes them).
struct Config {
  Index n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_dim, max_seq;
  double rope_base, rms_eps;
  std::string vocab;  // one character per token: token id = index in vocab
  char stop_token;

  static Config from(const attn::io::SafeTensors& file) {
    const attn::io::Metadata& m = file.metadata();
    const auto get = [&](const char* key) -> const std::string& {
      const auto it = m.find(key);
      if (it == m.end()) throw attn::format_error(file.path() + ": metadata has no \"" + key + "\"");
      return it->second;
    };
    const auto integer = [&](const char* key) { return static_cast<Index>(std::stoll(get(key))); };
    Config c{integer("n_layers"), integer("d_model"),   integer("n_heads"),       integer("n_kv_heads"),
             integer("head_dim"), integer("ffn_dim"),   integer("max_seq"),       std::stod(get("rope_base")),
             std::stod(get("rms_eps")), get("vocab"), get("stop_token").at(0)};
    return c;
  }
};

class Model {
 public:
  explicit Model(const attn::io::SafeTensors& file) : c_(Config::from(file)), norm_(c_.d_model, c_.rms_eps),
                                                      lm_head_(c_.d_model, vocab_size(), /*bias=*/false) {
    attn::DecoderAttentionOptions attention;
    attention.num_kv_heads = c_.n_kv_heads;
    attention.head_dim = c_.head_dim;
    attention.rope = attn::Rope{0, c_.rope_base, attn::RopeStyle::NeoX};
    attention.max_positions = c_.max_seq;
    for (Index i = 0; i < c_.n_layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      Layer l{attn::RMSNorm<float>(c_.d_model, c_.rms_eps), attn::DecoderAttention<float>(c_.d_model, c_.n_heads, attention),
              attn::RMSNorm<float>(c_.d_model, c_.rms_eps), attn::SwiGLU<float>(c_.d_model, c_.ffn_dim)};
      attn::io::load_state_dict(l.input_layernorm, file, p + "input_layernorm");
      attn::io::load_state_dict(l.self_attn, file, p + "self_attn");
      attn::io::load_state_dict(l.post_attention_layernorm, file, p + "post_attention_layernorm");
      attn::io::load_state_dict(l.mlp, file, p + "mlp");
      layers_.push_back(std::move(l));
    }
    embed_tokens_ = file.matrix<float>("embed_tokens.weight");
    if (embed_tokens_.rows() != vocab_size() || embed_tokens_.cols() != c_.d_model)
      throw attn::format_error(file.path() + ": embed_tokens.weight is not [vocab, d_model]");
    attn::io::load_state_dict(norm_, file, "norm");
    attn::io::load_state_dict(lm_head_, file, "lm_head");
  }

  // A KV cache for each layer, for `batch` sequences of up to max_seq tokens, keys and values
  // stored as `storage` (float, bf16, fp16 or int8: attn/kv_storage.hpp).
  Cache make_cache(Index batch = 1, attn::KVStorage storage = attn::KVStorage::Native) const {
    Cache cache;
    for (const Layer& l : layers_) cache.push_back(l.self_attn.make_cache(batch, c_.max_seq, storage));
    return cache;
  }

  // The next tokens of sequence b: appends them to the cache and returns their logits [n, vocab].
  Matrix forward(const std::vector<int>& tokens, Cache& cache, Index b = 0) const {
    Matrix x(static_cast<Index>(tokens.size()), c_.d_model);
    for (Index r = 0; r < x.rows(); ++r) x.row(r) = embed_tokens_.row(check_token(tokens[std::size_t(r)]));
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      x += l.self_attn.forward(l.input_layernorm.forward(x), cache[i], b);
      x += l.mlp.forward(l.post_attention_layernorm.forward(x));
    }
    return lm_head_.forward(norm_.forward(x));
  }

  // Greedy decoding: the prompt in one call, then one token per step until the stop token (which
  // is included) or max_new tokens.
  std::vector<int> generate(const std::vector<int>& prompt, Index max_new,
                            attn::KVStorage storage = attn::KVStorage::Native) const {
    Cache cache = make_cache(1, storage);
    std::vector<int> out;
    Matrix logits = forward(prompt, cache);
    for (Index step = 0; step < max_new; ++step) {
      Index next;
      logits.row(logits.rows() - 1).maxCoeff(&next);
      out.push_back(static_cast<int>(next));
      if (next == stop_id() || cache[0].size(0) == c_.max_seq) break;
      logits = forward({static_cast<int>(next)}, cache);
    }
    return out;
  }

  std::vector<int> encode(const std::string& text) const {
    std::vector<int> ids;
    for (char ch : text) {
      const auto pos = c_.vocab.find(ch);
      if (pos == std::string::npos) throw std::invalid_argument(std::string("no token for '") + ch + "'");
      ids.push_back(static_cast<int>(pos));
    }
    return ids;
  }
  std::string decode(const std::vector<int>& ids) const {
    std::string s;
    for (int id : ids) s += c_.vocab.at(std::size_t(check_token(id)));
    return s;
  }

  const Config& config() const { return c_; }
  Index vocab_size() const { return static_cast<Index>(c_.vocab.size()); }
  int stop_id() const { return encode(std::string(1, c_.stop_token)).at(0); }

 private:
  struct Layer {
    attn::RMSNorm<float> input_layernorm;
    attn::DecoderAttention<float> self_attn;
    attn::RMSNorm<float> post_attention_layernorm;
    attn::SwiGLU<float> mlp;
  };

  Index check_token(int id) const {
    if (id < 0 || id >= vocab_size())
      throw std::invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary");
    return id;
  }

  Config c_;
  std::vector<Layer> layers_;
  Matrix embed_tokens_;  // [vocab, d_model]
  attn::RMSNorm<float> norm_;
  attn::Linear<float> lm_head_;
};

}  // namespace tiny_gpt
