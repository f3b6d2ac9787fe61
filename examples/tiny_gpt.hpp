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
// and logits = lm_head(norm(x)): an attn::CausalLM. Generation is greedy (attn::generate) and runs
// on a KV cache per layer: the prompt goes through in one call (prefill), then each new token alone
// (a decoding step).
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

// The model is an attn::CausalLM built from the file's tensors (attn/causal_lm.hpp): embedding,
// the layers, final norm, LM head, one KV cache per layer.
class Model {
 public:
  explicit Model(const attn::io::SafeTensors& file) : c_(Config::from(file)), lm_(build(file, c_)) {}

  // A KV cache for each layer, for `batch` sequences of up to max_seq tokens, keys and values
  // stored as `storage` (float, bf16, fp16 or int8: attn/kv_storage.hpp).
  Cache make_cache(Index batch = 1, attn::KVStorage storage = attn::KVStorage::Native) const {
    return lm_.make_cache(batch, c_.max_seq, storage);
  }

  // The next tokens of sequence b: appends them to the cache and returns their logits [n, vocab].
  Matrix forward(const std::vector<int>& tokens, Cache& cache, Index b = 0) const { return lm_.forward(tokens, cache, b); }

  // Greedy decoding (attn::generate): the prompt in one call, then one token per step until the
  // stop token (which is included) or max_new tokens.
  std::vector<int> generate(const std::vector<int>& prompt, Index max_new,
                            attn::KVStorage storage = attn::KVStorage::Native) const {
    attn::GenerationOptions o;
    o.max_new_tokens = max_new;
    o.stop_tokens = {stop_id()};
    o.cache_storage = storage;
    return attn::generate(lm_, prompt, o);
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
    for (int id : ids) {
      if (id < 0 || id >= vocab_size())
        throw std::invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary");
      s += c_.vocab[std::size_t(id)];
    }
    return s;
  }

  const Config& config() const { return c_; }
  const attn::CausalLM<float>& lm() const { return lm_; }
  Index vocab_size() const { return static_cast<Index>(c_.vocab.size()); }
  int stop_id() const { return encode(std::string(1, c_.stop_token)).at(0); }

 private:
  // Per layer: RMSNorm, DecoderAttention (GQA + RoPE), RMSNorm, SwiGLU, each loaded by its Hugging
  // Face names; then the embedding, the final norm and the head.
  static attn::CausalLM<float> build(const attn::io::SafeTensors& file, const Config& c) {
    attn::DecoderAttentionOptions attention;
    attention.num_kv_heads = c.n_kv_heads;
    attention.head_dim = c.head_dim;
    attention.rope = attn::Rope{0, c.rope_base, attn::RopeStyle::NeoX};
    attention.max_positions = c.max_seq;
    const auto rms = [&](const std::string& name) {
      attn::RMSNorm<float> n(c.d_model, c.rms_eps);
      attn::io::load_state_dict(n, file, name);
      return n;
    };
    std::vector<attn::DecoderLayer<float>> layers;
    for (Index i = 0; i < c.n_layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      attn::DecoderAttention<float> self_attn(c.d_model, c.n_heads, attention);
      attn::io::load_state_dict(self_attn, file, p + "self_attn");
      attn::SwiGLU<float> mlp(c.d_model, c.ffn_dim);
      attn::io::load_state_dict(mlp, file, p + "mlp");
      layers.emplace_back(rms(p + "input_layernorm"), std::move(self_attn), rms(p + "post_attention_layernorm"),
                          std::move(mlp));
    }
    const Index vocab = static_cast<Index>(c.vocab.size());
    const Matrix embed = file.matrix<float>("embed_tokens.weight");
    if (embed.rows() != vocab || embed.cols() != c.d_model)
      throw attn::format_error(file.path() + ": embed_tokens.weight is not [vocab, d_model]");
    attn::Linear<float> lm_head(c.d_model, vocab, /*bias=*/false);
    attn::io::load_state_dict(lm_head, file, "lm_head");
    return attn::CausalLM<float>(attn::Embedding<float>(attn::Weight<float>(embed)), std::move(layers), rms("norm"),
                                 std::move(lm_head));
  }

  Config c_;
  attn::CausalLM<float> lm_;
};

}  // namespace tiny_gpt
