// examples/toy_translation.hpp - a PyTorch nn.Transformer encoder-decoder trained on a toy
// translation (reversing a string: "hello" -> "olleh"), run with attn's Transformer and decoded
// greedily, with the decoder's KV caches or, as PyTorch must, by re-running the decoder over the
// whole target at every token. tools/train_toy_translation.py trained it and wrote
// examples/data/toy_translation.safetensors.
//
//   const auto file = attn::io::SafeTensors::open("examples/data/toy_translation.safetensors");
//   toy_translation::Model model(file);
//   model.decode(model.translate(model.encode("hello"), 20));   // "olleh"
//
// The model (the file's keys):
//   x_src = src_embed(src) * sqrt(d) + pos_embed(0 .. S-1)
//   x_tgt = tgt_embed(tgt) * sqrt(d) + pos_embed(0 .. T-1)
//   logits = generator(transformer(x_src, x_tgt))       nn.Transformer, batch_first, causal tgt_mask
#pragma once

#include <attn/attn.hpp>
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace toy_translation {

using attn::Index;
using Matrix = attn::Matrix<float>;

class Model {
 public:
  explicit Model(const attn::io::SafeTensors& file)
      : meta_(file.metadata()),
        transformer_(integer("transformer.d_model"), integer("transformer.nhead"),
                     integer("transformer.num_encoder_layers"), integer("transformer.num_decoder_layers"), options()),
        src_embed_(attn::Weight<float>(file.matrix<float>("src_embed.weight"))),
        tgt_embed_(attn::Weight<float>(file.matrix<float>("tgt_embed.weight"))),
        pos_embed_(attn::Weight<float>(file.matrix<float>("pos_embed.weight"))),
        generator_(attn::Weight<float>(file.matrix<float>("generator.weight")), file.vector<float>("generator.bias")),
        vocab_(meta("vocab")),
        scale_(std::stof(meta("embed_scale"))),
        bos_(static_cast<int>(integer("bos_id"))),
        eos_(static_cast<int>(integer("eos_id"))) {
    // Every transformer.* key, checked against the metadata's hyperparameters.
    attn::io::load_state_dict(transformer_, file, "transformer");
  }

  // Greedy decoding with the decoder's caches: the source encoded once, each layer's
  // cross-attention keys and values of it computed once (start), then one target position per
  // step (decode). Stops after eos (included) when stop_at_eos, else after max_new tokens.
  std::vector<int> translate(const std::vector<int>& src, Index max_new, bool stop_at_eos = true) const {
    const Matrix memory = transformer_.encode(embed(src_embed_, src, 0), 1);
    auto cache = transformer_.decoder().start(memory, /*batch=*/1, /*capacity=*/max_new);
    std::vector<int> out;
    int token = bos_;
    for (Index t = 0; t < max_new; ++t) {
      const Matrix h = transformer_.decoder().decode(embed(tgt_embed_, {token}, t), cache);
      token = argmax(generator_.forward(h), 0);
      out.push_back(token);
      if (stop_at_eos && token == eos_) break;
    }
    return out;
  }

  // The same decoding as PyTorch does it, without a cache: the decoder over the whole target so
  // far (causal) at every step.
  std::vector<int> translate_recompute(const std::vector<int>& src, Index max_new, bool stop_at_eos = true) const {
    const Matrix memory = transformer_.encode(embed(src_embed_, src, 0), 1);
    std::vector<int> tgt = {bos_};
    attn::DecoderArgs<float> args;
    args.batch = 1;
    args.tgt_masks.causal = attn::Causal::TopLeft;
    for (Index t = 0; t < max_new; ++t) {
      const Matrix h = transformer_.decoder().forward(embed(tgt_embed_, tgt, 0), memory, args);
      tgt.push_back(argmax(generator_.forward(h.bottomRows(1)), 0));
      if (stop_at_eos && tgt.back() == eos_) break;
    }
    return std::vector<int>(tgt.begin() + 1, tgt.end());
  }

  // The logits [T, V] of a teacher-forced target tgt (its first token bos): row t predicts token t+1.
  Matrix logits(const std::vector<int>& src, const std::vector<int>& tgt) const {
    attn::TransformerArgs<float> args;
    args.batch = 1;
    args.tgt_masks.causal = attn::Causal::TopLeft;
    return generator_.forward(transformer_.forward(embed(src_embed_, src, 0), embed(tgt_embed_, tgt, 0), args));
  }

  std::vector<int> encode(const std::string& text) const {
    std::vector<int> ids;
    for (char ch : text) {
      const auto pos = vocab_.find(ch);
      if (pos == std::string::npos) throw std::invalid_argument(std::string("no token for '") + ch + "'");
      ids.push_back(static_cast<int>(pos) + 3);  // after pad, bos, eos
    }
    return ids;
  }
  std::string decode(const std::vector<int>& ids) const {
    std::string s;
    for (int id : ids)
      if (id >= 3) s += vocab_.at(std::size_t(id - 3));
    return s;
  }
  int bos() const { return bos_; }
  int eos() const { return eos_; }
  Index max_positions() const { return pos_embed_.num_embeddings(); }
  const attn::Transformer<float>& transformer() const { return transformer_; }

 private:
  const std::string& meta(const char* key) const {
    const auto it = meta_.find(key);
    if (it == meta_.end())
      throw attn::format_error(std::string("toy translation weights: no metadata \"") + key + "\"");
    return it->second;
  }
  Index integer(const char* key) const { return static_cast<Index>(std::stoll(meta(key))); }
  attn::TransformerOptions options() const {
    attn::TransformerOptions o;
    o.dim_feedforward = integer("transformer.dim_feedforward");
    o.batch_first = meta("transformer.batch_first") == "true";
    o.layer_norm_eps = std::stod(meta("transformer.layer_norm_eps"));
    return o;  // relu, post-norm: checked against the metadata when the weights load
  }

  // Token rows scaled by sqrt(d), plus the learned positions first, first + 1, ...
  Matrix embed(const attn::Embedding<float>& table, const std::vector<int>& ids, Index first) const {
    std::vector<int> positions(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) positions[i] = static_cast<int>(first + Index(i));
    return table.forward(ids) * scale_ + pos_embed_.forward(positions);
  }
  static int argmax(const Matrix& logits, Index row) {
    Index best;
    logits.row(row).maxCoeff(&best);
    return static_cast<int>(best);
  }

  attn::io::Metadata meta_;
  attn::Transformer<float> transformer_;
  attn::Embedding<float> src_embed_, tgt_embed_, pos_embed_;
  attn::Linear<float> generator_;
  std::string vocab_;
  float scale_;
  int bos_, eos_;
};

}  // namespace toy_translation
