// attn/models/gpt2.hpp - GPT-2 from a Hugging Face checkpoint (model_type "gpt2"), as an
// attn::CausalLM.
//
//   attn::CausalLM<float> lm = attn::models::load_gpt2<float>(attn::io::Checkpoint::open("gpt2"));
//
// Mirrors transformers' models/gpt2/modeling_gpt2.py (GPT2LMHeadModel), pre-norm:
//   x = wte(ids) + wpe(positions)
//   per block:  x = x + c_proj(attention(split(c_attn(ln_1(x)))))        causal, biases
//               x = x + mlp.c_proj(gelu_new(mlp.c_fc(ln_2(x))))
//   logits = ln_f(x) wte^T                                              the head is tied to wte
// GPT-2's Conv1D stores its weight [in, out], transposed against nn.Linear, and c_attn fuses q, k, v
// along `out`: here each becomes a Linear [out, in] (q_proj = c_attn.weight[:, 0:E]^T, ...), so a
// GPT-2 block is attn::DecoderLayer with LayerNorms, DecoderAttention without RoPE and FeedForward.
// config.json fields read: vocab_size, n_embd, n_layer, n_head, n_positions, n_inner (null:
// 4 n_embd), layer_norm_epsilon, activation_function ("gelu_new", "gelu_pytorch_tanh", "gelu",
// "relu"), tie_word_embeddings (true), scale_attn_weights (true; false: scores unscaled),
// scale_attn_by_inverse_layer_idx (must be false).
// Tensor names: "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.{i}.ln_1.*",
// ".attn.c_attn.*", ".attn.c_proj.*", ".ln_2.*", ".mlp.c_fc.*", ".mlp.c_proj.*",
// "transformer.ln_f.*" (the prefix "transformer." may be absent, as in the original gpt2 files),
// "lm_head.weight" when not tied. The causal-mask buffers old files hold (attn.bias,
// attn.masked_bias) are ignored.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "attn/causal_lm.hpp"
#include "attn/decoder_attention.hpp"
#include "attn/decoder_layer.hpp"
#include "attn/detail/hf_config.hpp"
#include "attn/embedding.hpp"
#include "attn/feed_forward.hpp"
#include "attn/io/checkpoint.hpp"
#include "attn/layer_norm.hpp"
#include "attn/linear.hpp"
#include "attn/models/load_options.hpp"

namespace attn::models {

struct Gpt2Config {
  Index vocab_size = 0, n_embd = 0, n_layer = 0, n_head = 0, n_positions = 0, n_inner = 0;
  double layer_norm_epsilon = 1e-5;
  Activation activation = Activation::GELUTanh;
  bool tie_word_embeddings = true, scale_attn_weights = true;

  static Gpt2Config from(const io::Checkpoint& ckpt) {
    const attn::detail::HfConfig j(ckpt.config(), "checkpoint " + ckpt.path() + ": config.json");
    Gpt2Config c;
    const std::string type = j.text("model_type", "gpt2");
    if (type != "gpt2") j.fail("model_type \"" + type + "\" is not gpt2");
    c.vocab_size = j.count("vocab_size");
    c.n_embd = j.count("n_embd");
    c.n_layer = j.layers("n_layer", ckpt.names().size());
    c.n_head = j.count("n_head");
    if (c.n_embd % c.n_head != 0) j.fail("n_embd is not divisible by n_head");
    c.n_positions = j.count("n_positions");
    c.n_inner = j.count("n_inner", 4 * c.n_embd);
    c.layer_norm_epsilon = j.real("layer_norm_epsilon", 1e-5);
    const std::string act = j.text("activation_function", "gelu_new");
    if (act == "gelu_new" || act == "gelu_pytorch_tanh")
      c.activation = Activation::GELUTanh;
    else if (act == "gelu")
      c.activation = Activation::GELU;
    else if (act == "relu")
      c.activation = Activation::ReLU;
    else
      j.fail("activation_function \"" + act + "\" is not supported (gelu_new, gelu_pytorch_tanh, gelu, relu)");
    c.tie_word_embeddings = j.flag("tie_word_embeddings", true);
    c.scale_attn_weights = j.flag("scale_attn_weights", true);
    if (j.flag("scale_attn_by_inverse_layer_idx", false))
      j.fail("scale_attn_by_inverse_layer_idx = true is not supported");
    return c;
  }
};

namespace detail {

inline std::vector<io::ExpectedTensor> gpt2_tensors(const Gpt2Config& c, const std::string& p) {
  const Index E = c.n_embd, F = c.n_inner;
  std::vector<io::ExpectedTensor> t;
  const auto conv = [&](const std::string& name, Index in, Index out) {  // Conv1D: weight [in, out]
    t.push_back({name + ".weight", {in, out}});
    t.push_back({name + ".bias", {out}});
  };
  const auto norm = [&](const std::string& name) {
    t.push_back({name + ".weight", {E}});
    t.push_back({name + ".bias", {E}});
  };
  t.push_back({p + "wte.weight", {c.vocab_size, E}});
  t.push_back({p + "wpe.weight", {c.n_positions, E}});
  for (Index i = 0; i < c.n_layer; ++i) {
    const std::string h = p + "h." + std::to_string(i) + ".";
    norm(h + "ln_1");
    conv(h + "attn.c_attn", E, 3 * E);
    conv(h + "attn.c_proj", E, E);
    norm(h + "ln_2");
    conv(h + "mlp.c_fc", E, F);
    conv(h + "mlp.c_proj", F, E);
  }
  norm(p + "ln_f");
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, E}});
  return t;
}

}  // namespace detail

// The checkpoint's model, by its own tensor names, checked against config.json first (as
// load_llama). Conv1D weights are transposed into Linears, so they are converted (to T, or into
// LoadOptions::storage; a BF16 file's into bf16, losslessly), never viewed.
template <class T>
CausalLM<T> load_gpt2(const io::Checkpoint& ckpt, const LoadOptions& opt = {}) {
  const Gpt2Config c = Gpt2Config::from(ckpt);
  const std::string p = !ckpt.contains("transformer.wte.weight") && ckpt.contains("wte.weight") ? "" : "transformer.";
  std::vector<std::string> ignored = {"attn.bias", "attn.masked_bias"};
  if (c.tie_word_embeddings) ignored.emplace_back("lm_head.weight");
  detail::check_checkpoint(ckpt, detail::gpt2_tensors(c, p), p, opt, ignored, "attn::models::load_gpt2");

  const Index E = c.n_embd;
  // A Conv1D's weight [in, out] as Linears: columns [first, first + out) of it, transposed.
  const auto conv = [&](const std::string& name, Index first, Index out) {
    const Matrix<T> w = ckpt.matrix<T>(name + ".weight");
    const Vector<T> b = ckpt.vector<T>(name + ".bias");
    ckpt.release(name + ".weight");
    const Storage s = opt.storage.value_or(detail::stored_as(ckpt.info(name + ".weight").dtype));
    return Linear<T>(Weight<T>(w.middleCols(first, out).transpose(), s), b.segment(first, out));
  };
  const auto norm = [&](const std::string& name) { return detail::layer_norm<T>(ckpt, name, E, c.layer_norm_epsilon); };
  DecoderAttentionOptions a;
  a.rope = std::nullopt;  // learned positions, added to the embeddings
  a.max_positions = c.n_positions;
  if (!c.scale_attn_weights) a.scale = 1.0;
  std::vector<DecoderLayer<T>> layers;
  layers.reserve(std::size_t(c.n_layer));
  for (Index i = 0; i < c.n_layer; ++i) {
    const std::string h = p + "h." + std::to_string(i) + ".";
    DecoderAttention<T> attention(E, c.n_head, a, conv(h + "attn.c_attn", 0, E), conv(h + "attn.c_attn", E, E),
                                  conv(h + "attn.c_attn", 2 * E, E), conv(h + "attn.c_proj", 0, E));
    FeedForward<T> mlp(conv(h + "mlp.c_fc", 0, c.n_inner), conv(h + "mlp.c_proj", 0, E), c.activation);
    layers.emplace_back(norm(h + "ln_1"), std::move(attention), norm(h + "ln_2"), std::move(mlp));
  }
  std::optional<Linear<T>> head;
  if (!c.tie_word_embeddings) head.emplace(ckpt.weight<T>("lm_head.weight", opt.storage, opt.map_weights), Vector<T>());
  return CausalLM<T>(Embedding<T>(ckpt.weight<T>(p + "wte.weight", std::nullopt, opt.map_weights)), std::move(layers), norm(p + "ln_f"),
                     std::move(head), Embedding<T>(ckpt.weight<T>(p + "wpe.weight", std::nullopt, opt.map_weights)));
}

}  // namespace attn::models
