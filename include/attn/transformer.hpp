// attn/transformer.hpp - torch.nn.TransformerEncoderLayer, TransformerDecoderLayer and
// TransformerEncoder (eval mode: dropout is the identity), with PyTorch's submodule names, so a
// state_dict's "layers.0.self_attn.in_proj_weight" is layer(0).self_attn().set_in_proj_weight(...).
//
//   attn::TransformerOptions opt;  opt.dim_feedforward = 2048;  opt.batch_first = true;
//   attn::TransformerEncoderLayer<float> layer(/*d_model=*/512, /*nhead=*/8, opt);
//   attn::EncoderArgs<float> args;  args.batch = B;           // src: [B*L, 512] rows (b, l)
//   attn::Matrix<float> y = layer.forward(src, args);          //  -> [B*L, 512]
//
// The computation, with sa = self-attention, ca = cross-attention (query x, key = value = memory),
// ff = linear2(activation(linear1(.))):
//   encoder, norm_first = false:  x = norm1(x + sa(x));        x = norm2(x + ff(x))
//   encoder, norm_first = true:   x = x + sa(norm1(x));        x = x + ff(norm2(x))
//   decoder, norm_first = false:  x = norm1(x + sa(x));  x = norm2(x + ca(x, mem));  x = norm3(x + ff(x))
//   decoder, norm_first = true:   x = x + sa(norm1(x));  x = x + ca(norm2(x), mem);  x = x + ff(norm3(x))
//
// Layouts are MultiHeadAttention's: B sequences are one matrix, rows (l, b) (PyTorch's default
// [L, B, E]) or (b, l) with batch_first ([B, L, E]); B = 1 is PyTorch's unbatched [L, E].
//
// Masks: PyTorch's forward arguments map onto attn::Masks (attn/mask.hpp), whose types state a
// bool mask's polarity - a PyTorch bool mask is true = masked out, so it is an IgnoreMask:
//   src_mask / tgt_mask / memory_mask   bool -> attn_mask = IgnoreMask(m), float -> attn_bias = AdditiveMask(m),
//                                       [L, S] or PyTorch's [B*H, L, S] as [B*H*L, S]
//   *_key_padding_mask                  key_padding_mask = IgnoreMask(m), [B, S]
//   is_causal / tgt_is_causal           causal = Causal::TopLeft (L == S: both alignments agree); no
//                                       mask is needed (PyTorch's flag is only a hint about the mask)
//   memory_is_causal                    memory_masks.causal, alignment explicit: L != S in general
// A query whose keys are all masked attends nothing (zeros, not PyTorch 1.13's NaN); see the README.
#pragma once

#include <cmath>
#include <cstddef>
#include <optional>
#include <utility>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/feed_forward.hpp"
#include "attn/init.hpp"
#include "attn/kv_cache.hpp"
#include "attn/kv_storage.hpp"
#include "attn/layer_norm.hpp"
#include "attn/mask.hpp"
#include "attn/multi_head_attention.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

// Constructor options of TransformerEncoderLayer and TransformerDecoderLayer, named and defaulted
// as PyTorch's keyword arguments (d_model and nhead are the constructors' own arguments; there is
// no dropout: eval mode).
struct TransformerOptions {
  Index dim_feedforward = 2048;
  Activation activation = Activation::ReLU;  // "relu" or "gelu"
  double layer_norm_eps = 1e-5;
  bool batch_first = false;  // rows (b, l) instead of (l, b)
  bool norm_first = false;   // pre-norm instead of post-norm
  bool bias = true;          // every Linear and LayerNorm bias, and the attention biases (PyTorch >= 2.1)
};

// Per-call arguments of TransformerEncoderLayer and TransformerEncoder: src_mask,
// src_key_padding_mask and is_causal as the Masks fields (see the table above), and B.
template <class T>
struct EncoderArgs : Masks<T> {
  Index batch = 0;  // B, the number of sequences in src: required (1: unbatched)
};

// Per-call arguments of TransformerDecoderLayer: the masks of the self-attention over tgt (L
// queries, L keys) and of the cross-attention over memory (L queries, S keys), and B.
template <class T>
struct DecoderArgs {
  Index batch = 0;        // B, the number of sequences in tgt and in memory: required (1: unbatched)
  Masks<T> tgt_masks;     // tgt_mask, tgt_key_padding_mask [B, L], tgt_is_causal
  Masks<T> memory_masks;  // memory_mask [L, S], memory_key_padding_mask [B, S], memory_is_causal
};

template <class T>
class TransformerEncoder;
template <class T>
class TransformerDecoder;

namespace detail {

// Validates a [B*n, d_model] input at a layer's boundary; returns n.
inline Index sequence_length(const char* where, const char* name, const char* n_name, Index rows, Index cols, Index B,
                             Index d_model) {
  require_batch(B, where);
  require_shape(cols == d_model && rows > 0 && rows % B == 0, where, name, " has shape ", shape(rows, cols),
                ", expected [B*", n_name, ", d_model] = [", B, "*", n_name, ", ", d_model, "] with ", n_name, " > 0");
  return rows / B;
}

// Checks the masks of one attention (L queries, S keys, B sequences, H heads) with the names the
// caller knows them by (`prefix` the Masks' own name, `torch_mask` / `torch_padding` PyTorch's),
// before MultiHeadAttention sees them and could name them only as its own arguments.
template <class T>
void check_layer_masks(const char* where, const char* prefix, const char* torch_mask, const char* torch_padding,
                       const Masks<T>& m, Index B, Index H, Index L, Index S) {
  const Index BHL = B * H * L;
  const auto check_2d = [&](const char* field, Index rows, Index cols) {
    require_shape(cols == S && (rows == L || rows == BHL), where, prefix, field, " (", torch_mask, ") has shape ",
                  shape(rows, cols), ", expected [L, S] = ", shape(L, S), " or [B*H*L, S] = ", shape(BHL, S));
  };
  if (!m.attn_mask.empty()) check_2d("attn_mask", m.attn_mask.rows(), m.attn_mask.cols());
  if (!m.attn_bias.empty()) check_2d("attn_bias", m.attn_bias.rows(), m.attn_bias.cols());
  if (!m.key_padding_mask.empty())
    require_shape(m.key_padding_mask.rows() == B && m.key_padding_mask.cols() == S, where, prefix, "key_padding_mask (",
                  torch_padding, ") has shape ", shape(m.key_padding_mask.rows(), m.key_padding_mask.cols()),
                  ", expected [B, S] = ", shape(B, S));
}

template <class T>
MhaArgs<T> mha_args(const Masks<T>& m, Index B) {
  MhaArgs<T> a;
  static_cast<Masks<T>&>(a) = m;
  a.batch = B;
  return a;
}

inline MhaOptions transformer_mha_options(const TransformerOptions& o) {
  MhaOptions m;
  m.bias = o.bias;
  m.batch_first = o.batch_first;
  return m;
}

inline Index checked_d_model(const char* where, Index d_model, Index nhead, const TransformerOptions& o) {
  require_shape(d_model > 0 && nhead > 0, where, "d_model and nhead must be positive, got d_model = ", d_model,
                ", nhead = ", nhead);
  require_shape(d_model % nhead == 0, where, "d_model = ", d_model, " is not divisible by nhead = ", nhead);
  require_shape(o.dim_feedforward > 0, where, "dim_feedforward must be positive, got ", o.dim_feedforward);
  require_arg(o.activation == Activation::ReLU || o.activation == Activation::GELU, where,
              "activation must be Activation::ReLU or Activation::GELU");
  require_arg(o.layer_norm_eps >= 0 && std::isfinite(o.layer_norm_eps), where,
              "layer_norm_eps must be finite and >= 0, got ", o.layer_norm_eps);
  return d_model;
}

inline Generator& transformer_default_gen() {
  thread_local Generator gen;
  return gen;
}

}  // namespace detail

// torch.nn.TransformerEncoderLayer: self-attention and feed-forward, each with a residual and a
// LayerNorm.
//
//   attn::TransformerEncoderLayer<double> layer(16, 4);       // d_model 16, 4 heads, PyTorch's defaults
//   layer.self_attn().set_in_proj_weight(w);                  // PyTorch's self_attn.in_proj_weight [48, 16]
//   attn::Matrix<double> y = layer.forward(src);              // src: [L, 16] -> [L, 16]
template <class T>
class TransformerEncoderLayer {
  ATTN_CHECK_SCALAR(T);

 public:
  // PyTorch's initialisation of every submodule (MultiheadAttention's, nn.Linear's, LayerNorm's).
  TransformerEncoderLayer(Index d_model, Index nhead, const TransformerOptions& options, Generator& gen)
      : opt_(options),
        self_attn_(detail::checked_d_model("attn::TransformerEncoderLayer", d_model, nhead, options), nhead,
                   detail::transformer_mha_options(options), gen),
        ff_(d_model, options.dim_feedforward, options.activation, options.bias, gen),
        norm1_(d_model, options.layer_norm_eps, true, options.bias),
        norm2_(d_model, options.layer_norm_eps, true, options.bias) {}
  TransformerEncoderLayer(Index d_model, Index nhead, const TransformerOptions& options = {})
      : TransformerEncoderLayer(d_model, nhead, options, detail::transformer_default_gen()) {}

  // src: [B*L, d_model]  ->  [B*L, d_model], rows in src's order
  Matrix<T> forward(const ConstMatrixRef<T>& src, const EncoderArgs<T>& args) const {
    Matrix<T> out(src.rows(), d_model());
    run(src, args, out, "attn::TransformerEncoderLayer::forward");
    return out;
  }

  // src: [B*L, d_model]  ->  out [B*L, d_model], sized by the caller; out may be src itself.
  void forward_into(const ConstMatrixRef<T>& src, const EncoderArgs<T>& args, MatrixRef<T> out) const {
    run(src, args, out, "attn::TransformerEncoderLayer::forward_into");
  }

  Index d_model() const { return self_attn_.embed_dim(); }
  Index nhead() const { return self_attn_.num_heads(); }
  const TransformerOptions& options() const { return opt_; }

  // Submodules by PyTorch's names (linear1 and linear2 are the feed-forward block's).
  const MultiHeadAttention<T>& self_attn() const { return self_attn_; }
  MultiHeadAttention<T>& self_attn() { return self_attn_; }
  const FeedForward<T>& feed_forward() const { return ff_; }
  FeedForward<T>& feed_forward() { return ff_; }
  // Keeps every projection weight (self_attn's, linear1's, linear2's) in storage s
  // (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) {
    MultiHeadAttention<T> attn = self_attn_;
    FeedForward<T> ff = ff_;
    attn.set_weight_storage(s);
    ff.set_weight_storage(s);
    self_attn_ = std::move(attn), ff_ = std::move(ff);
  }
  // The arithmetic of every product (attn/precision.hpp): the attention's and the feed-forward's.
  void set_precision(Precision p) { self_attn_.set_precision(p), ff_.set_precision(p); }
  Precision precision() const { return self_attn_.precision(); }
  const Linear<T>& linear1() const { return ff_.linear1(); }
  Linear<T>& linear1() { return ff_.linear1(); }
  const Linear<T>& linear2() const { return ff_.linear2(); }
  Linear<T>& linear2() { return ff_.linear2(); }
  const LayerNorm<T>& norm1() const { return norm1_; }
  LayerNorm<T>& norm1() { return norm1_; }
  const LayerNorm<T>& norm2() const { return norm2_; }
  LayerNorm<T>& norm2() { return norm2_; }

 private:
  template <class>
  friend class TransformerEncoder;

  // Checks what this layer is given, in the words of `where`.
  Index check(const ConstMatrixRef<T>& src, const EncoderArgs<T>& args, const char* where) const {
    const Index L = detail::sequence_length(where, "src", "L", src.rows(), src.cols(), args.batch, d_model());
    detail::check_layer_masks(where, "", "src_mask", "src_key_padding_mask", args, args.batch, nhead(), L, L);
    return L;
  }

  void run(const ConstMatrixRef<T>& src, const EncoderArgs<T>& args, MatrixRef<T> out, const char* where) const {
    check(src, args, where);
    detail::require_dims(where, "out", out.rows(), out.cols(), src.rows(), d_model(),
                         "[B*L, d_model] = ", detail::shape(src.rows(), d_model()));
    if (out.data() != src.data()) out = src;
    Matrix<T> t(src.rows(), d_model()), u(src.rows(), d_model());
    apply(detail::mha_args<T>(args, args.batch), out, t, u);
  }

  // x <- the layer applied to x, in place; t and u are [rows of x, d_model] scratch.
  void apply(const MhaArgs<T>& a, MatrixRef<T> x, Matrix<T>& t, Matrix<T>& u) const {
    if (opt_.norm_first) {
      norm1_.forward_into(x, t);
      self_attn_.forward_into(t, t, t, a, u);  // one matrix as query, key and value: fused projection
      x += u;
      norm2_.forward_into(x, t);
      ff_.forward_into(t, u);
      x += u;
    } else {
      self_attn_.forward_into(x, x, x, a, u);
      x += u;
      norm1_.forward_into(x, x);
      ff_.forward_into(x, u);
      x += u;
      norm2_.forward_into(x, x);
    }
  }

  TransformerOptions opt_;
  MultiHeadAttention<T> self_attn_;
  FeedForward<T> ff_;
  LayerNorm<T> norm1_, norm2_;
};

// torch.nn.TransformerDecoderLayer: self-attention over tgt, cross-attention from tgt to memory,
// feed-forward, each with a residual and a LayerNorm.
//
//   attn::TransformerDecoderLayer<float> layer(512, 8);
//   attn::DecoderArgs<float> args;  args.tgt_masks.causal = attn::Causal::TopLeft;
//   attn::Matrix<float> y = layer.forward(tgt, memory, args);   // tgt [L, 512], memory [S, 512] -> [L, 512]
template <class T>
class TransformerDecoderLayer {
  ATTN_CHECK_SCALAR(T);

 public:
  TransformerDecoderLayer(Index d_model, Index nhead, const TransformerOptions& options, Generator& gen)
      : opt_(options),
        self_attn_(detail::checked_d_model("attn::TransformerDecoderLayer", d_model, nhead, options), nhead,
                   detail::transformer_mha_options(options), gen),
        multihead_attn_(d_model, nhead, detail::transformer_mha_options(options), gen),
        ff_(d_model, options.dim_feedforward, options.activation, options.bias, gen),
        norm1_(d_model, options.layer_norm_eps, true, options.bias),
        norm2_(d_model, options.layer_norm_eps, true, options.bias),
        norm3_(d_model, options.layer_norm_eps, true, options.bias) {}
  TransformerDecoderLayer(Index d_model, Index nhead, const TransformerOptions& options = {})
      : TransformerDecoderLayer(d_model, nhead, options, detail::transformer_default_gen()) {}

  // tgt: [B*L, d_model]  memory: [B*S, d_model]  ->  [B*L, d_model], rows in tgt's order
  Matrix<T> forward(const ConstMatrixRef<T>& tgt, const ConstMatrixRef<T>& memory, const DecoderArgs<T>& args) const {
    Matrix<T> out(tgt.rows(), d_model());
    run(tgt, memory, args, out, "attn::TransformerDecoderLayer::forward");
    return out;
  }

  // The same into out [B*L, d_model], sized by the caller; out may be tgt itself (not memory).
  void forward_into(const ConstMatrixRef<T>& tgt, const ConstMatrixRef<T>& memory, const DecoderArgs<T>& args,
                    MatrixRef<T> out) const {
    run(tgt, memory, args, out, "attn::TransformerDecoderLayer::forward_into");
  }

  // Incremental decoding (TransformerDecoder::start and decode run it for a stack): tgt [B*L,
  // d_model], the next L target positions of each sequence (B = self_cache.batch()); their keys and
  // values are appended to self_cache (self_attn().make_cache()), and the cross-attention reads
  // memory's from cross_cache (multihead_attn().append_kv(memory, memory, cross_cache), once per
  // sequence). memory_masks: a memory_key_padding_mask [B, S] only. The same rows as forward() over
  // the whole target with a causal tgt_mask. out [B*L, d_model] may be tgt. On an error the caches
  // are unchanged.
  void step_into(const ConstMatrixRef<T>& tgt, KVCache<T>& self_cache, const KVCache<T>& cross_cache,
                 const Masks<T>& memory_masks, MatrixRef<T> out) const {
    const char* where = "attn::TransformerDecoderLayer::step_into";
    check_step(tgt, self_cache, cross_cache, memory_masks, where);
    detail::require_dims(where, "out", out.rows(), out.cols(), tgt.rows(), d_model(),
                         "[B*L, d_model] = ", detail::shape(tgt.rows(), d_model()));
    if (out.data() != tgt.data()) out = tgt;
    Matrix<T> t(tgt.rows(), d_model()), u(tgt.rows(), d_model());
    step(out, self_cache, cross_cache, memory_masks, t, u);
  }

  Index d_model() const { return self_attn_.embed_dim(); }
  Index nhead() const { return self_attn_.num_heads(); }
  const TransformerOptions& options() const { return opt_; }

  const MultiHeadAttention<T>& self_attn() const { return self_attn_; }
  MultiHeadAttention<T>& self_attn() { return self_attn_; }
  const MultiHeadAttention<T>& multihead_attn() const { return multihead_attn_; }
  MultiHeadAttention<T>& multihead_attn() { return multihead_attn_; }
  const FeedForward<T>& feed_forward() const { return ff_; }
  FeedForward<T>& feed_forward() { return ff_; }
  // Keeps every projection weight (self_attn's, multihead_attn's, linear1's, linear2's) in storage
  // s (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) {
    MultiHeadAttention<T> self = self_attn_, cross = multihead_attn_;
    FeedForward<T> ff = ff_;
    self.set_weight_storage(s);
    cross.set_weight_storage(s);
    ff.set_weight_storage(s);
    self_attn_ = std::move(self), multihead_attn_ = std::move(cross), ff_ = std::move(ff);
  }
  // The arithmetic of every product (attn/precision.hpp): both attentions' and the feed-forward's.
  void set_precision(Precision p) {
    self_attn_.set_precision(p), multihead_attn_.set_precision(p), ff_.set_precision(p);
  }
  Precision precision() const { return self_attn_.precision(); }
  const Linear<T>& linear1() const { return ff_.linear1(); }
  Linear<T>& linear1() { return ff_.linear1(); }
  const Linear<T>& linear2() const { return ff_.linear2(); }
  Linear<T>& linear2() { return ff_.linear2(); }
  const LayerNorm<T>& norm1() const { return norm1_; }
  LayerNorm<T>& norm1() { return norm1_; }
  const LayerNorm<T>& norm2() const { return norm2_; }
  LayerNorm<T>& norm2() { return norm2_; }
  const LayerNorm<T>& norm3() const { return norm3_; }
  LayerNorm<T>& norm3() { return norm3_; }

 private:
  void run(const ConstMatrixRef<T>& tgt, const ConstMatrixRef<T>& memory, const DecoderArgs<T>& args, MatrixRef<T> out,
           const char* where) const {
    const Index B = args.batch, H = nhead();
    const Index L = detail::sequence_length(where, "tgt", "L", tgt.rows(), tgt.cols(), B, d_model());
    const Index S = detail::sequence_length(where, "memory", "S", memory.rows(), memory.cols(), B, d_model());
    detail::check_layer_masks(where, "tgt_masks.", "tgt_mask", "tgt_key_padding_mask", args.tgt_masks, B, H, L, L);
    detail::check_layer_masks(where, "memory_masks.", "memory_mask", "memory_key_padding_mask", args.memory_masks, B, H,
                              L, S);
    detail::require_dims(where, "out", out.rows(), out.cols(), tgt.rows(), d_model(),
                         "[B*L, d_model] = ", detail::shape(tgt.rows(), d_model()));
    detail::require_arg(out.data() != memory.data(), where, "out must not be memory");

    const MhaArgs<T> sa = detail::mha_args<T>(args.tgt_masks, B), ca = detail::mha_args<T>(args.memory_masks, B);
    if (out.data() != tgt.data()) out = tgt;
    Matrix<T> t(tgt.rows(), d_model()), u(tgt.rows(), d_model());
    apply(
        out, t, u, [&](const ConstMatrixRef<T>& in, MatrixRef<T> y) { self_attn_.forward_into(in, in, in, sa, y); },
        // key and value one matrix: fused projection
        [&](const ConstMatrixRef<T>& in, MatrixRef<T> y) { multihead_attn_.forward_into(in, memory, memory, ca, y); });
  }

  template <class>
  friend class TransformerDecoder;

  // One decoding step of x [B*L, d_model] in place (checked by check_step).
  void step(MatrixRef<T> x, KVCache<T>& self_cache, const KVCache<T>& cross_cache, const Masks<T>& memory_masks,
            Matrix<T>& t, Matrix<T>& u) const {
    CacheArgs<T> sa;  // causal, bottom-right: each new position sees the cache up to itself
    CacheArgs<T> ca;
    static_cast<Masks<T>&>(ca) = memory_masks;
    ca.causal = Causal::None;
    apply(
        x, t, u,
        [&](const ConstMatrixRef<T>& in, MatrixRef<T> y) {
          self_attn_.append_kv(in, in, self_cache);
          self_attn_.attend_into(in, self_cache, sa, y);
        },
        [&](const ConstMatrixRef<T>& in, MatrixRef<T> y) { multihead_attn_.attend_into(in, cross_cache, ca, y); });
  }

  // The checks of step_into (TransformerDecoder::decode makes them once for every layer).
  void check_step(const ConstMatrixRef<T>& tgt, const KVCache<T>& self_cache, const KVCache<T>& cross_cache,
                  const Masks<T>& memory_masks, const char* where) const {
    const Index B = self_cache.batch();
    const Index L = detail::sequence_length(where, "tgt", "L", tgt.rows(), tgt.cols(), B, d_model());
    detail::require_arg(cross_cache.batch() == B && cross_cache.size(0) > 0, where, "the cross-attention cache holds ",
                        cross_cache.batch(), " sequences (", cross_cache.size(0),
                        " memory positions), the self-attention cache ", B);
    detail::require_arg(
        memory_masks.attn_mask.empty() && memory_masks.attn_bias.empty() && memory_masks.causal == Causal::None, where,
        "incremental decoding takes a memory_key_padding_mask only (memory_mask and "
        "memory_is_causal are per target row: run forward() over the whole target)");
    detail::check_layer_masks(where, "memory_masks.", "memory_mask", "memory_key_padding_mask", memory_masks, B,
                              nhead(), L, cross_cache.size(0));
    for (Index b = 0; b < B; ++b)
      detail::require_arg(self_cache.size(b) == self_cache.size(0) && L <= self_cache.max_append(b), where, "sequence ",
                          b, " of the self-attention cache holds ", self_cache.size(b), " positions and takes ",
                          self_cache.max_append(b), " more; this step appends ", L, " to every sequence");
  }

  // x <- the layer applied to x in place; t and u are [rows of x, d_model] scratch. self_attend(in,
  // y) and cross_attend(in, y) write the two attentions of rows `in` into y.
  template <class SelfAttend, class CrossAttend>
  void apply(MatrixRef<T> x, Matrix<T>& t, Matrix<T>& u, SelfAttend self_attend, CrossAttend cross_attend) const {
    if (opt_.norm_first) {
      norm1_.forward_into(x, t);
      self_attend(t, u);
      x += u;
      norm2_.forward_into(x, t);
      cross_attend(t, u);
      x += u;
      norm3_.forward_into(x, t);
      ff_.forward_into(t, u);
      x += u;
    } else {
      self_attend(x, u);
      x += u;
      norm1_.forward_into(x, x);
      cross_attend(x, u);
      x += u;
      norm2_.forward_into(x, x);
      ff_.forward_into(x, u);
      x += u;
      norm3_.forward_into(x, x);
    }
  }

  TransformerOptions opt_;
  MultiHeadAttention<T> self_attn_, multihead_attn_;
  FeedForward<T> ff_;
  LayerNorm<T> norm1_, norm2_, norm3_;
};

// torch.nn.TransformerEncoder(encoder_layer, num_layers, norm) with enable_nested_tensor=False:
// num_layers copies of one layer (weights included, as PyTorch's deepcopy) applied in turn, all
// with the same masks, then the optional final norm. (PyTorch's default enable_nested_tensor=True
// takes a fast path in eval mode without grad - batch_first, post-norm, key padding - that returns
// zeros at the padded positions; attn computes those rows as the Python path does.)
//
//   attn::TransformerEncoder<float> enc(attn::TransformerEncoderLayer<float>(512, 8, opt), /*num_layers=*/6);
//   enc.layer(0).self_attn().set_in_proj_weight(w);   // state_dict "layers.0.self_attn.in_proj_weight"
//   attn::Matrix<float> y = enc.forward(src, args);   // src: [B*L, 512] -> [B*L, 512]
template <class T>
class TransformerEncoder {
  ATTN_CHECK_SCALAR(T);

 public:
  TransformerEncoder(const TransformerEncoderLayer<T>& encoder_layer, Index num_layers,
                     std::optional<LayerNorm<T>> norm = std::nullopt)
      : d_model_(encoder_layer.d_model()), norm_(std::move(norm)) {
    detail::require_shape(num_layers >= 0, "attn::TransformerEncoder", "num_layers must be >= 0, got ", num_layers);
    detail::require_shape(!norm_ || norm_->normalized_shape() == d_model_, "attn::TransformerEncoder",
                          "norm has normalized_shape = ", norm_ ? norm_->normalized_shape() : 0,
                          ", expected d_model = ", d_model_);
    layers_.assign(static_cast<std::size_t>(num_layers), encoder_layer);
  }

  // src: [B*L, d_model]  ->  [B*L, d_model], rows in src's order
  Matrix<T> forward(const ConstMatrixRef<T>& src, const EncoderArgs<T>& args) const {
    Matrix<T> out(src.rows(), d_model_);
    run(src, args, out, "attn::TransformerEncoder::forward");
    return out;
  }

  // The same into out [B*L, d_model], sized by the caller; out may be src itself.
  void forward_into(const ConstMatrixRef<T>& src, const EncoderArgs<T>& args, MatrixRef<T> out) const {
    run(src, args, out, "attn::TransformerEncoder::forward_into");
  }

  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  Index d_model() const { return d_model_; }

  // PyTorch's layers[i]; throws argument_error outside [0, num_layers).
  const TransformerEncoderLayer<T>& layer(Index i) const { return layers_[checked_index(i)]; }
  TransformerEncoderLayer<T>& layer(Index i) { return layers_[checked_index(i)]; }
  // Keeps every layer's projection weights in storage s (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) {
    std::vector<TransformerEncoderLayer<T>> layers = layers_;
    for (auto& l : layers) l.set_weight_storage(s);
    layers_ = std::move(layers);
  }
  // The arithmetic of every layer's products (attn/precision.hpp).
  void set_precision(Precision p) {
    for (auto& l : layers_) l.set_precision(p);
  }
  // PyTorch's norm: the final LayerNorm, or nullptr when there is none.
  const LayerNorm<T>* norm() const { return norm_ ? &*norm_ : nullptr; }
  LayerNorm<T>* norm() { return norm_ ? &*norm_ : nullptr; }

 private:
  std::size_t checked_index(Index i) const {
    detail::require_arg(i >= 0 && i < num_layers(), "attn::TransformerEncoder::layer", "index ", i,
                        " is outside [0, num_layers) = [0, ", num_layers(), ")");
    return static_cast<std::size_t>(i);
  }

  void run(const ConstMatrixRef<T>& src, const EncoderArgs<T>& args, MatrixRef<T> out, const char* where) const {
    const Index L = detail::sequence_length(where, "src", "L", src.rows(), src.cols(), args.batch, d_model_);
    if (!layers_.empty())
      detail::check_layer_masks(where, "", "mask", "src_key_padding_mask", args, args.batch, layers_[0].nhead(), L, L);
    detail::require_dims(where, "out", out.rows(), out.cols(), src.rows(), d_model_,
                         "[B*L, d_model] = ", detail::shape(src.rows(), d_model_));
    if (out.data() != src.data()) out = src;
    const MhaArgs<T> a = detail::mha_args<T>(args, args.batch);
    Matrix<T> t(src.rows(), d_model_), u(src.rows(), d_model_);
    for (const auto& encoder_layer : layers_) encoder_layer.apply(a, out, t, u);
    if (norm_) norm_->forward_into(out, out);
  }

  Index d_model_;
  std::vector<TransformerEncoderLayer<T>> layers_;
  std::optional<LayerNorm<T>> norm_;
};

// The state of incremental decoding with a TransformerDecoder (start() makes it, decode() advances
// it): per layer, the keys and values of the target positions decoded so far and of the memory,
// computed once.
template <class T>
struct TransformerDecoderCache {
  std::vector<KVCache<T>> self_attn;   // per layer: [B sequences, up to capacity target positions]
  std::vector<KVCache<T>> cross_attn;  // per layer: memory's S positions of each sequence
  Masks<T> memory_masks;               // the cross-attention's: memory_key_padding_mask [B, S]
  Index batch() const { return self_attn.empty() ? 0 : self_attn[0].batch(); }
  Index size() const { return self_attn.empty() ? 0 : self_attn[0].size(0); }  // target positions decoded
};

// torch.nn.TransformerDecoder(decoder_layer, num_layers, norm): num_layers copies of one layer
// (weights included, as PyTorch's deepcopy) applied in turn, all with the same masks, then the
// optional final norm; and incremental decoding, which PyTorch does not have: start() computes
// each layer's cross-attention keys and values of the memory once, and each decode() call runs
// only the new target positions against the layers' self-attention caches. Row for row the same
// as forward() over the whole target with a causal tgt_mask (and no other target mask).
//
//   attn::TransformerDecoder<float> dec(attn::TransformerDecoderLayer<float>(512, 8, opt), 6, attn::LayerNorm<float>(512));
//   attn::Matrix<float> y = dec.forward(tgt, memory, args);           // training-style: the whole target
//   auto cache = dec.start(memory, /*batch=*/1, /*capacity=*/64);     // generation: memory [S, 512]
//   attn::Matrix<float> h = dec.decode(bos_row, cache);               // [1, 512], then one row per step
template <class T>
class TransformerDecoder {
  ATTN_CHECK_SCALAR(T);

 public:
  TransformerDecoder(const TransformerDecoderLayer<T>& decoder_layer, Index num_layers,
                     std::optional<LayerNorm<T>> norm = std::nullopt)
      : d_model_(decoder_layer.d_model()), norm_(std::move(norm)) {
    detail::require_shape(num_layers >= 0, "attn::TransformerDecoder", "num_layers must be >= 0, got ", num_layers);
    detail::require_shape(!norm_ || norm_->normalized_shape() == d_model_, "attn::TransformerDecoder",
                          "norm has normalized_shape = ", norm_ ? norm_->normalized_shape() : 0,
                          ", expected d_model = ", d_model_);
    layers_.assign(static_cast<std::size_t>(num_layers), decoder_layer);
  }

  // tgt: [B*L, d_model]  memory: [B*S, d_model]  ->  [B*L, d_model], rows in tgt's order
  Matrix<T> forward(const ConstMatrixRef<T>& tgt, const ConstMatrixRef<T>& memory, const DecoderArgs<T>& args) const {
    Matrix<T> out(tgt.rows(), d_model_);
    run(tgt, memory, args, out, "attn::TransformerDecoder::forward");
    return out;
  }
  // The same into out [B*L, d_model], sized by the caller; out may be tgt (not memory).
  void forward_into(const ConstMatrixRef<T>& tgt, const ConstMatrixRef<T>& memory, const DecoderArgs<T>& args,
                    MatrixRef<T> out) const {
    run(tgt, memory, args, out, "attn::TransformerDecoder::forward_into");
  }

  // Starts incremental decoding of `batch` sequences against memory [B*S, d_model] (rows in the
  // layers' order), for up to `capacity` target positions each: every layer's cross-attention keys
  // and values of the memory, computed here once. memory_masks: a memory_key_padding_mask [B, S]
  // only. Target keys and values are stored as `storage` (attn/kv_storage.hpp).
  TransformerDecoderCache<T> start(const ConstMatrixRef<T>& memory, Index batch, Index capacity,
                                   const Masks<T>& memory_masks = {}, KVStorage storage = KVStorage::Native) const {
    const char* where = "attn::TransformerDecoder::start";
    const Index S = detail::sequence_length(where, "memory", "S", memory.rows(), memory.cols(), batch, d_model_);
    detail::require_arg(capacity > 0, where, "capacity must be positive, got ", capacity);
    TransformerDecoderCache<T> c;
    c.memory_masks = memory_masks;
    for (const auto& l : layers_) {
      c.self_attn.push_back(l.self_attn().make_cache(batch, capacity, storage));
      c.cross_attn.push_back(l.multihead_attn().make_cache(batch, S));
      l.multihead_attn().append_kv(memory, memory, c.cross_attn.back());
    }
    return c;
  }

  // The next L target positions of each sequence, tgt [B*L, d_model] (rows in the layers' order):
  // appends them to the cache and returns the decoder's output for them  ->  [B*L, d_model], after
  // the final norm. On an error the cache is unchanged.
  Matrix<T> decode(const ConstMatrixRef<T>& tgt, TransformerDecoderCache<T>& cache) const {
    const char* where = "attn::TransformerDecoder::decode";
    detail::require_arg(cache.self_attn.size() == layers_.size() && cache.cross_attn.size() == layers_.size(), where,
                        "the cache has ", cache.self_attn.size(), " layers, the decoder ", layers_.size(),
                        " (start() makes one)");
    Matrix<T> x = tgt;
    if (!layers_.empty()) {
      // The layers' caches advance together, so the first layer's checks hold for every layer.
      layers_[0].check_step(tgt, cache.self_attn[0], cache.cross_attn[0], cache.memory_masks, where);
      Matrix<T> t(tgt.rows(), d_model_), u(tgt.rows(), d_model_);
      for (std::size_t i = 0; i < layers_.size(); ++i)
        layers_[i].step(x, cache.self_attn[i], cache.cross_attn[i], cache.memory_masks, t, u);
    }
    if (norm_) norm_->forward_into(x, x);
    return x;
  }

  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  Index d_model() const { return d_model_; }
  const TransformerDecoderLayer<T>& layer(Index i) const { return layers_[checked_index(i)]; }
  TransformerDecoderLayer<T>& layer(Index i) { return layers_[checked_index(i)]; }
  // Keeps every layer's projection weights in storage s (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) {
    std::vector<TransformerDecoderLayer<T>> layers = layers_;
    for (auto& l : layers) l.set_weight_storage(s);
    layers_ = std::move(layers);
  }
  void set_precision(Precision p) {
    for (auto& l : layers_) l.set_precision(p);
  }
  const LayerNorm<T>* norm() const { return norm_ ? &*norm_ : nullptr; }
  LayerNorm<T>* norm() { return norm_ ? &*norm_ : nullptr; }

 private:
  std::size_t checked_index(Index i) const {
    detail::require_arg(i >= 0 && i < num_layers(), "attn::TransformerDecoder::layer", "index ", i,
                        " is outside [0, num_layers) = [0, ", num_layers(), ")");
    return static_cast<std::size_t>(i);
  }

  void run(const ConstMatrixRef<T>& tgt, const ConstMatrixRef<T>& memory, const DecoderArgs<T>& args, MatrixRef<T> out,
           const char* where) const {
    detail::sequence_length(where, "tgt", "L", tgt.rows(), tgt.cols(), args.batch, d_model_);
    detail::require_dims(where, "out", out.rows(), out.cols(), tgt.rows(), d_model_,
                         "[B*L, d_model] = ", detail::shape(tgt.rows(), d_model_));
    if (out.data() != tgt.data()) out = tgt;
    // Each layer checks its arguments before it writes; the first checks what every one would.
    for (const auto& decoder_layer : layers_) decoder_layer.forward_into(out, memory, args, out);
    if (norm_) norm_->forward_into(out, out);
  }

  Index d_model_;
  std::vector<TransformerDecoderLayer<T>> layers_;
  std::optional<LayerNorm<T>> norm_;
};

// Per-call arguments of Transformer: the encoder's masks over src, the decoder's over tgt and over
// memory (PyTorch's src_mask / src_key_padding_mask, tgt_*, memory_*), and B.
template <class T>
struct TransformerArgs {
  Index batch = 0;        // B, the number of sequences in src and tgt: required (1: unbatched)
  Masks<T> src_masks;     // src_mask [S, S], src_key_padding_mask [B, S], src_is_causal
  Masks<T> tgt_masks;     // tgt_mask [L, L], tgt_key_padding_mask [B, L], tgt_is_causal
  Masks<T> memory_masks;  // memory_mask [L, S], memory_key_padding_mask [B, S], memory_is_causal
};

// torch.nn.Transformer (eval mode): a TransformerEncoder and a TransformerDecoder, each with its
// final LayerNorm, under PyTorch's names (encoder.layers.0..., encoder.norm, decoder.layers.0...,
// decoder.norm):  out = decoder(tgt, encoder(src)).
//
//   attn::Transformer<float> model(/*d_model=*/512, /*nhead=*/8, /*enc=*/6, /*dec=*/6, opt);
//   attn::Matrix<float> y = model.forward(src, tgt, args);           // [B*L, 512]
//   attn::Matrix<float> memory = model.encode(src, enc_args);        // or, generating:
//   auto cache = model.decoder().start(memory, B, max_len, enc_args);
//   attn::Matrix<float> h = model.decoder().decode(next_rows, cache);
// The layers of each stack start as copies of one (PyTorch re-draws each with xavier_uniform);
// load trained weights with attn/io/state_dict.hpp.
template <class T>
class Transformer {
  ATTN_CHECK_SCALAR(T);

 public:
  Transformer(Index d_model, Index nhead, Index num_encoder_layers, Index num_decoder_layers,
              const TransformerOptions& options, Generator& gen)
      : encoder_(TransformerEncoderLayer<T>(d_model, nhead, options, gen), num_encoder_layers,
                 LayerNorm<T>(d_model, options.layer_norm_eps, true, options.bias)),
        decoder_(TransformerDecoderLayer<T>(d_model, nhead, options, gen), num_decoder_layers,
                 LayerNorm<T>(d_model, options.layer_norm_eps, true, options.bias)),
        nhead_(nhead) {}
  // PyTorch's defaults: d_model 512, nhead 8, 6 and 6 layers.
  explicit Transformer(Index d_model = 512, Index nhead = 8, Index num_encoder_layers = 6,
                       Index num_decoder_layers = 6, const TransformerOptions& options = {})
      : Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, options,
                    detail::transformer_default_gen()) {}

  // src: [B*S, d_model]  tgt: [B*L, d_model]  ->  [B*L, d_model]
  Matrix<T> forward(const ConstMatrixRef<T>& src, const ConstMatrixRef<T>& tgt, const TransformerArgs<T>& args) const {
    const Matrix<T> memory = encode(src, args.batch, args.src_masks);
    DecoderArgs<T> d;
    d.batch = args.batch;
    d.tgt_masks = args.tgt_masks;
    d.memory_masks = args.memory_masks;
    return decoder_.forward(tgt, memory, d);
  }

  // The encoder alone: src [B*S, d_model] -> memory [B*S, d_model].
  Matrix<T> encode(const ConstMatrixRef<T>& src, Index batch, const Masks<T>& src_masks = {}) const {
    EncoderArgs<T> e;
    static_cast<Masks<T>&>(e) = src_masks;
    e.batch = batch;
    return encoder_.forward(src, e);
  }

  Index d_model() const { return encoder_.d_model(); }
  Index nhead() const { return nhead_; }
  const TransformerEncoder<T>& encoder() const { return encoder_; }
  TransformerEncoder<T>& encoder() { return encoder_; }
  const TransformerDecoder<T>& decoder() const { return decoder_; }
  TransformerDecoder<T>& decoder() { return decoder_; }
  void set_weight_storage(Storage s) {
    TransformerEncoder<T> e = encoder_;
    TransformerDecoder<T> d = decoder_;
    e.set_weight_storage(s);
    d.set_weight_storage(s);
    encoder_ = std::move(e), decoder_ = std::move(d);
  }
  void set_precision(Precision p) { encoder_.set_precision(p), decoder_.set_precision(p); }

 private:
  TransformerEncoder<T> encoder_;
  TransformerDecoder<T> decoder_;
  Index nhead_ = 0;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(TransformerEncoderLayer);
ATTN_DETAIL_EXTERN_MODULE(TransformerDecoderLayer);
ATTN_DETAIL_EXTERN_MODULE(TransformerEncoder);
ATTN_DETAIL_EXTERN_MODULE(TransformerDecoder);
ATTN_DETAIL_EXTERN_MODULE(Transformer);
