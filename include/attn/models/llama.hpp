// attn/models/llama.hpp - the Llama family from a Hugging Face checkpoint: Llama 2 and 3, Mistral,
// Qwen 2 (model_type "llama", "mistral", "qwen2"), as an attn::CausalLM.
//
//   auto ckpt = attn::io::Checkpoint::open("TinyLlama-1.1B-Chat-v1.0");
//   attn::CausalLM<float> lm = attn::models::load_llama<float>(ckpt);   // bf16 weights stay bf16
//   std::vector<int> out = attn::generate(lm, prompt_ids, opt);
//
// Mirrors transformers' models/llama/modeling_llama.py (LlamaForCausalLM), mistral/ and qwen2/:
//   x = embed_tokens(ids)
//   per layer:  h = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
//               x = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
//   logits = lm_head(norm(x))            lm_head is embed_tokens when tie_word_embeddings
// config.json fields read: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
// num_attention_heads, num_key_value_heads (default: num_attention_heads), head_dim (default:
// hidden_size / num_attention_heads), rms_norm_eps, rope_theta (10000), rope_scaling (none,
// "linear", "llama3"; "default" is none), max_position_embeddings, tie_word_embeddings (false),
// hidden_act ("silu"), attention_bias and mlp_bias (Llama, false), sliding_window (Mistral; null:
// none), use_sliding_window (Qwen 2: must be false). Qwen 2 always has q/k/v biases.
// Tensor names: "model.embed_tokens.weight", "model.layers.{i}.self_attn.{q,k,v,o}_proj.weight",
// "model.layers.{i}.{input,post_attention}_layernorm.weight", "model.layers.{i}.mlp.{gate,up,down}
// _proj.weight", "model.norm.weight", "lm_head.weight" (absent when tied); the prefix "model." may
// be absent (a LlamaModel saved alone still needs a head, so it must be tied).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "attn/causal_lm.hpp"
#include "attn/decoder_attention.hpp"
#include "attn/decoder_layer.hpp"
#include "attn/detail/hf_config.hpp"
#include "attn/embedding.hpp"
#include "attn/io/checkpoint.hpp"
#include "attn/linear.hpp"
#include "attn/models/load_options.hpp"
#include "attn/rms_norm.hpp"
#include "attn/rope.hpp"
#include "attn/swiglu.hpp"

namespace attn::models {

// A Llama-family config.json, read and checked.
struct LlamaConfig {
  std::string model_type;  // "llama", "mistral", "qwen2"
  Index vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  Index num_heads = 0, num_kv_heads = 0, head_dim = 0, max_positions = 0;
  double rms_norm_eps = 1e-6;
  Rope rope;
  bool tie_word_embeddings = false, qkv_bias = false, o_bias = false, mlp_bias = false;
  Index sliding_window = 0;  // 0: none

  static LlamaConfig from(const io::Checkpoint& ckpt) {
    const attn::detail::HfConfig j(ckpt.config(), "checkpoint " + ckpt.path() + ": config.json");
    LlamaConfig c;
    c.model_type = j.text("model_type", "llama");
    if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2")
      j.fail("model_type \"" + c.model_type + "\" is not of the Llama family (llama, mistral, qwen2)");
    c.vocab_size = j.count("vocab_size");
    c.hidden_size = j.count("hidden_size");
    c.intermediate_size = j.count("intermediate_size");
    c.num_layers = j.layers("num_hidden_layers", ckpt.names().size());
    c.num_heads = j.count("num_attention_heads");
    c.num_kv_heads = j.count("num_key_value_heads", c.num_heads);
    if (c.num_heads % c.num_kv_heads != 0)
      j.fail("num_key_value_heads = " + std::to_string(c.num_kv_heads) +
             " does not divide num_attention_heads = " + std::to_string(c.num_heads));
    if (!j.has("head_dim") && c.hidden_size % c.num_heads != 0)
      j.fail("hidden_size is not divisible by num_attention_heads and there is no head_dim");
    c.head_dim = j.count("head_dim", c.hidden_size / c.num_heads);
    c.max_positions = j.count("max_position_embeddings", 2048);
    c.rms_norm_eps = j.real("rms_norm_eps", 1e-6);
    c.tie_word_embeddings = j.flag("tie_word_embeddings", false);
    const std::string act = j.text("hidden_act", "silu");
    if (act != "silu") j.fail("hidden_act \"" + act + "\" is not supported (the Llama family's MLP is silu)");
    if (c.model_type == "qwen2") {
      c.qkv_bias = true;
      if (j.flag("use_sliding_window", false))
        j.fail("use_sliding_window = true (a window on some layers only) is not supported");
    } else {
      c.qkv_bias = c.o_bias = j.flag("attention_bias", false);
      c.mlp_bias = j.flag("mlp_bias", false);
    }
    if (c.model_type == "mistral") c.sliding_window = j.has("sliding_window") ? j.count("sliding_window") : 0;
    c.rope.base = j.real("rope_theta", 10000.0);
    c.rope.style = RopeStyle::NeoX;  // rotate_half
    if (j.has("rope_scaling")) {
      const attn::detail::HfConfig s = j.object("rope_scaling");
      const std::string type = s.text("rope_type", s.text("type", "default"));
      if (type == "linear") {
        c.rope.scaling.type = RopeScalingType::Linear;
        c.rope.scaling.factor = s.real("factor");
      } else if (type == "llama3") {
        c.rope.scaling.type = RopeScalingType::Llama3;
        c.rope.scaling.factor = s.real("factor");
        c.rope.scaling.low_freq_factor = s.real("low_freq_factor");
        c.rope.scaling.high_freq_factor = s.real("high_freq_factor");
        c.rope.scaling.original_max_positions = static_cast<double>(s.count("original_max_position_embeddings"));
      } else if (type != "default") {
        s.fail("rope type \"" + type + "\" is not supported (linear, llama3)");
      }
    }
    return c;
  }
};

namespace detail {

inline std::string llama_prefix(const io::Checkpoint& ckpt) {
  return !ckpt.contains("model.embed_tokens.weight") && ckpt.contains("embed_tokens.weight") ? "" : "model.";
}

// Every tensor the model reads, in the state dict's order.
inline std::vector<io::ExpectedTensor> llama_tensors(const LlamaConfig& c, const std::string& p) {
  const Index E = c.hidden_size, F = c.intermediate_size, QD = c.num_heads * c.head_dim,
              KD = c.num_kv_heads * c.head_dim;
  std::vector<io::ExpectedTensor> t;
  const auto linear = [&](const std::string& name, Index out, Index in, bool bias) {
    t.push_back({name + ".weight", {out, in}});
    if (bias) t.push_back({name + ".bias", {out}});
  };
  t.push_back({p + "embed_tokens.weight", {c.vocab_size, E}});
  for (Index i = 0; i < c.num_layers; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    linear(l + "self_attn.q_proj", QD, E, c.qkv_bias);
    linear(l + "self_attn.k_proj", KD, E, c.qkv_bias);
    linear(l + "self_attn.v_proj", KD, E, c.qkv_bias);
    linear(l + "self_attn.o_proj", E, QD, c.o_bias);
    linear(l + "mlp.gate_proj", F, E, c.mlp_bias);
    linear(l + "mlp.up_proj", F, E, c.mlp_bias);
    linear(l + "mlp.down_proj", E, F, c.mlp_bias);
    t.push_back({l + "input_layernorm.weight", {E}});
    t.push_back({l + "post_attention_layernorm.weight", {E}});
  }
  t.push_back({p + "norm.weight", {E}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, E}});
  return t;
}

}  // namespace detail

// The checkpoint's model, by its own tensor names (the table at the top of this file), checked
// against config.json before a byte of weights is read: a missing, unexpected (strict) or misshapen
// tensor is an error listing them all (attn::io::check_tensors).
template <class T>
CausalLM<T> load_llama(const io::Checkpoint& ckpt, const LoadOptions& opt = {}) {
  const LlamaConfig c = LlamaConfig::from(ckpt);
  const std::string p = detail::llama_prefix(ckpt);
  std::vector<std::string> ignored = {"rotary_emb.inv_freq"};
  if (c.tie_word_embeddings) ignored.emplace_back("lm_head.weight");  // some writers save the tied copy
  detail::check_checkpoint(ckpt, detail::llama_tensors(c, p), p, opt, ignored, "attn::models::load_llama");

  const auto linear = [&](const std::string& name, bool bias) {
    return Linear<T>(ckpt.weight<T>(name + ".weight", opt.storage, opt.map_weights),
                     bias ? ckpt.vector<T>(name + ".bias") : Vector<T>());
  };
  const auto rms = [&](const std::string& name) {
    RMSNorm<T> n(c.hidden_size, c.rms_norm_eps);
    n.set_weight(ckpt.vector<T>(name + ".weight"));
    return n;
  };
  DecoderAttentionOptions a;
  a.num_kv_heads = c.num_kv_heads;
  a.head_dim = c.head_dim;
  a.rope = c.rope;
  a.max_positions = opt.max_positions > 0 ? opt.max_positions : c.max_positions;
  a.window = c.sliding_window;
  std::vector<DecoderLayer<T>> layers;
  layers.reserve(std::size_t(c.num_layers));
  for (Index i = 0; i < c.num_layers; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    DecoderAttention<T> attention(c.hidden_size, c.num_heads, a, linear(l + "self_attn.q_proj", c.qkv_bias),
                                  linear(l + "self_attn.k_proj", c.qkv_bias),
                                  linear(l + "self_attn.v_proj", c.qkv_bias), linear(l + "self_attn.o_proj", c.o_bias));
    SwiGLU<T> mlp(linear(l + "mlp.gate_proj", c.mlp_bias), linear(l + "mlp.up_proj", c.mlp_bias),
                  linear(l + "mlp.down_proj", c.mlp_bias));
    layers.emplace_back(rms(l + "input_layernorm"), std::move(attention), rms(l + "post_attention_layernorm"),
                        std::move(mlp));
  }
  std::optional<Linear<T>> head;
  if (!c.tie_word_embeddings) head.emplace(linear("lm_head", false));
  // The embedding stays as stored (a bf16 table is looked up row by row), whatever opt.storage says.
  return CausalLM<T>(Embedding<T>(ckpt.weight<T>(p + "embed_tokens.weight", std::nullopt, opt.map_weights)), std::move(layers), rms(p + "norm"),
                     std::move(head));
}

}  // namespace attn::models
