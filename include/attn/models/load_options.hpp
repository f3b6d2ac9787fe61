// attn/models/load_options.hpp - how a model is built from a Hugging Face checkpoint directory
// (attn/io/checkpoint.hpp), whatever its family, and the pieces every family's loader shares.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attn/io/checkpoint.hpp"
#include "attn/io/safetensors.hpp"
#include "attn/io/tensor.hpp"
#include "attn/layer_norm.hpp"
#include "attn/storage.hpp"

namespace attn::models {

struct LoadOptions {
  // Every tensor of the checkpoint must be one the model uses (known buffers aside: GPT-2's
  // attn.bias, Llama's rotary_emb.inv_freq, BERT's position_ids); false ignores the rest (a
  // task head such as BertForPreTraining's cls.*) and lists it in *report. A missing tensor is an
  // error either way.
  bool strict = true;
  // The projection weights' storage (attn/storage.hpp); nullopt keeps each as the file stores it:
  // BF16 as bf16, F16 as fp16, anything else as T.
  std::optional<Storage> storage;
  // true (llama.cpp's default too): a weight already in its storage type stays a view of the
  // memory-mapped file - the load takes milliseconds and memory is only what is touched, but a
  // decoding step streams the file's 4 KiB pages. false: every weight becomes the model's own copy,
  // on transparent huge pages (the file's pages released as they are copied, so the process holds
  // one copy): the load reads the whole file, a decoding step runs from huge pages. On this
  // repository's machine (a Zen 5 VM) the copy decodes 1.65x faster and loads in 6 s instead of
  // 5 ms (bench/checkpoint_bench, bench/RESULTS.md).
  bool map_weights = true;
  // > 0: the positions the RoPE tables cover, instead of config.json's max_position_embeddings
  // (each layer holds a table of max_positions * head_dim values).
  Index max_positions = 0;
  // When not null, receives the tensors the model did not use (strict = false).
  io::LoadResult* report = nullptr;
};

namespace detail {

// The storage a weight of this dtype keeps when LoadOptions::storage is nullopt.
inline Storage stored_as(io::DType d) {
  return d == io::DType::BF16 ? Storage::BFloat16 : d == io::DType::F16 ? Storage::Float16 : Storage::Native;
}

// io::check_tensors with the options' strictness, its result to opt.report.
inline void check_checkpoint(const io::Checkpoint& ckpt, const std::vector<io::ExpectedTensor>& tensors,
                             const std::string& prefix, const LoadOptions& opt, const std::vector<std::string>& ignored,
                             const char* where) {
  io::LoadResult r = io::check_tensors(ckpt, tensors, prefix, opt.strict, ignored, where);
  if (opt.report) *opt.report = std::move(r);
}

// The LayerNorm "<name>.weight", "<name>.bias" of a checkpoint.
template <class T>
LayerNorm<T> layer_norm(const io::Checkpoint& ckpt, const std::string& name, Index dim, double eps) {
  LayerNorm<T> n(dim, eps);
  n.set_weight(ckpt.vector<T>(name + ".weight"));
  n.set_bias(ckpt.vector<T>(name + ".bias"));
  return n;
}

}  // namespace detail

}  // namespace attn::models
