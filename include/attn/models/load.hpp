// attn/models/load.hpp - a Hugging Face checkpoint directory to a model in one call, by the
// model_type its config.json names.
//
//   attn::CausalLM<float> lm = attn::models::load_causal_lm<float>("Qwen2-0.5B");       // generate with it
//   attn::models::BertModel<float> enc = attn::models::load_encoder<float>("all-MiniLM-L6-v2");
//
// Decoders (attn::CausalLM): "llama", "mistral", "qwen2" (attn/models/llama.hpp), "gpt2"
// (attn/models/gpt2.hpp). Encoders (BertModel): "bert", "roberta", "xlm-roberta"
// (attn/models/bert.hpp). Everything else is a format_error naming the model_type.
//
// Needs nlohmann_json (attn/io/).
#pragma once

#include <filesystem>
#include <string>

#include "attn/causal_lm.hpp"
#include "attn/io/checkpoint.hpp"
#include "attn/models/bert.hpp"
#include "attn/models/gpt2.hpp"
#include "attn/models/llama.hpp"
#include "attn/models/load_options.hpp"

namespace attn::models {

namespace detail {

inline std::string model_type(const io::Checkpoint& ckpt) {
  const nlohmann::json& c = ckpt.config();
  if (!c.contains("model_type") || !c["model_type"].is_string())
    throw format_error("checkpoint " + ckpt.path() + ": config.json has no \"model_type\" string");
  return c["model_type"].get<std::string>();
}

}  // namespace detail

template <class T>
CausalLM<T> load_causal_lm(const io::Checkpoint& ckpt, const LoadOptions& opt = {}) {
  const std::string type = detail::model_type(ckpt);
  if (type == "llama" || type == "mistral" || type == "qwen2") return load_llama<T>(ckpt, opt);
  if (type == "gpt2") return load_gpt2<T>(ckpt, opt);
  throw format_error("checkpoint " + ckpt.path() + ": model_type \"" + type +
                     "\" is not a decoder attn builds (llama, mistral, qwen2, gpt2)");
}
template <class T>
CausalLM<T> load_causal_lm(const std::filesystem::path& dir, const LoadOptions& opt = {}) {
  return load_causal_lm<T>(io::Checkpoint::open(dir), opt);
}

template <class T>
BertModel<T> load_encoder(const io::Checkpoint& ckpt, const LoadOptions& opt = {}) {
  const std::string type = detail::model_type(ckpt);
  if (type == "bert" || type == "roberta" || type == "xlm-roberta") return load_bert<T>(ckpt, opt);
  throw format_error("checkpoint " + ckpt.path() + ": model_type \"" + type +
                     "\" is not an encoder attn builds (bert, roberta, xlm-roberta)");
}
template <class T>
BertModel<T> load_encoder(const std::filesystem::path& dir, const LoadOptions& opt = {}) {
  return load_encoder<T>(io::Checkpoint::open(dir), opt);
}

}  // namespace attn::models
