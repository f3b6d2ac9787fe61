// attn/io/state_dict.hpp - PyTorch's state_dict() and load_state_dict() for attn's modules, under
// PyTorch's names, so a trained model's tensors load without reshuffling and attn's save back.
//
//   auto st = attn::io::SafeTensors::open("model.safetensors");         // torch's state_dict
//   attn::io::load_state_dict(encoder, st, "encoder");                   // strict: every key, once
//   attn::io::save_safetensors("encoder.safetensors", attn::io::state_dict(encoder));
//
// The keys, as in PyTorch:
//   Linear:                   weight [out, in], bias [out] (when it has one)
//   MultiHeadAttention:       in_proj_weight [3E, E], or q_proj_weight [E, E], k_proj_weight [E, kdim],
//                             v_proj_weight [E, vdim] when kdim or vdim != E; in_proj_bias [3E],
//                             out_proj.weight [E, E], out_proj.bias [E] (with bias); bias_k, bias_v
//                             [1, 1, E] (with add_bias_kv; [E] is accepted on load too).
//   LayerNorm:                weight [E] (with elementwise_affine), bias [E] (and bias)
//   FeedForward:              linear1.*, linear2.* (Linear's keys), as on PyTorch's transformer layers,
//                             which have no feed-forward submodule of their own
//   TransformerEncoderLayer:  self_attn.*, linear1.*, linear2.*, norm1.*, norm2.*
//   TransformerDecoderLayer:  self_attn.*, multihead_attn.*, linear1.*, linear2.*, norm1.*, norm2.*, norm3.*
//   TransformerEncoder,       layers.0.* ... layers.{num_layers-1}.*, norm.* (with a final norm)
//   TransformerDecoder:
//   Transformer:              encoder.* (a TransformerEncoder), decoder.* (a TransformerDecoder)
//   RMSNorm:                  weight [E], as Hugging Face's LlamaRMSNorm (input_layernorm, norm)
//   SwiGLU:                   gate_proj.*, up_proj.*, down_proj.* (Linear's keys), as Hugging Face's
//                             LlamaMLP (a Llama layer's mlp.*)
//   DecoderAttention:         q_proj.*, k_proj.*, v_proj.*, o_proj.* (Linear's keys), as Hugging Face's
//                             LlamaAttention (a Llama layer's self_attn.*)
// In PyTorch's order: a module's own parameters, then its submodules' in the order PyTorch's
// constructor registers them (the order above).
//
// A prefix names the module inside a larger one: "encoder.attn" or "encoder.attn." (a '.' is
// added when missing). Keys outside the prefix are never looked at. When a strict load misses
// every key because they sit under another prefix (or under none), the error says which prefix to
// pass.
//
// Hyperparameters. The shapes cannot tell a 4-head attention from an 8-head one, so a file's
// metadata may say what the module was built with, under PyTorch's constructor argument names
// (tools/export_state_dict.py writes them for every nn.MultiheadAttention and nn.Transformer*
// module, and hyperparameter_metadata() below for attn's): "<prefix>.<name>", or "<name>" for an
// empty prefix, with the composites' children under their paths:
//   MultiHeadAttention:       embed_dim, num_heads, kdim, vdim, bias, add_bias_kv, add_zero_attn,
//                             batch_first
//   TransformerEncoderLayer,  d_model, nhead, dim_feedforward, activation ("relu", "gelu"),
//   TransformerDecoderLayer:  layer_norm_eps, batch_first, norm_first, bias; self_attn.*
//                             (and multihead_attn.*) as MultiHeadAttention
//   TransformerEncoder,       its layers' (as above, from layers.0), num_layers, final_norm,
//   TransformerDecoder:       final_norm_eps (with a final norm); layers.<i>.* as a layer
//   Transformer:              d_model, nhead, num_encoder_layers, num_decoder_layers and the layers'
//                             arguments; encoder.* and decoder.* as the stacks
// Loading from a file checks every one of these the metadata has, before anything changes, and
// throws a format_error naming the key and both values when one differs ("metadata says
// num_heads = 4, the module has 8: build it with 4 heads"). A key the metadata lacks is not
// checked (files from other writers, exports of plain state_dicts, which cannot know the head
// count); flags read as true/false (or True/False, 1/0), floats within a relative 1e-6.
//
// Needs nlohmann_json, as attn/io/safetensors.hpp does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <locale>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include "attn/decoder_attention.hpp"
#include "attn/error.hpp"
#include "attn/feed_forward.hpp"
#include "attn/io/safetensors.hpp"
#include "attn/io/tensor.hpp"
#include "attn/layer_norm.hpp"
#include "attn/linear.hpp"
#include "attn/multi_head_attention.hpp"
#include "attn/rms_norm.hpp"
#include "attn/swiglu.hpp"
#include "attn/transformer.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"
#include "attn/weight.hpp"

namespace attn::io {

namespace detail {

// One parameter of a module: its key, its shape in PyTorch, another shape accepted on load, and
// how to read it from and write it into the module through its public getters and setters.
template <class Module, class T>
struct Param {
  std::string key;
  TensorShape shape;
  std::vector<TensorShape> also_accepted;
  std::function<Tensor<T>(const Module&)> get;
  std::function<void(Module&, const Tensor<T>&)> set;
  // A weight the module keeps in a storage type (a Linear's): its storage, and how to hand it a
  // Weight already in that type, so that a file tensor of that type is used as it is (no copy);
  // empty for every other parameter.
  std::function<Storage(const Module&)> storage = {};
  std::function<void(Module&, Weight<T>)> set_stored = {};
};

// Every module's parameter list, declared first so that a composite's list can take its children's.
template <class T>
std::vector<Param<Linear<T>, T>> params(const Linear<T>& m);
template <class T>
std::vector<Param<MultiHeadAttention<T>, T>> params(const MultiHeadAttention<T>& m);
template <class T>
std::vector<Param<LayerNorm<T>, T>> params(const LayerNorm<T>& m);
template <class T>
std::vector<Param<FeedForward<T>, T>> params(const FeedForward<T>& m);
template <class T>
std::vector<Param<TransformerEncoderLayer<T>, T>> params(const TransformerEncoderLayer<T>& m);
template <class T>
std::vector<Param<TransformerDecoderLayer<T>, T>> params(const TransformerDecoderLayer<T>& m);
template <class T>
std::vector<Param<TransformerEncoder<T>, T>> params(const TransformerEncoder<T>& m);
template <class T>
std::vector<Param<TransformerDecoder<T>, T>> params(const TransformerDecoder<T>& m);
template <class T>
std::vector<Param<Transformer<T>, T>> params(const Transformer<T>& m);
template <class T>
std::vector<Param<RMSNorm<T>, T>> params(const RMSNorm<T>& m);
template <class T>
std::vector<Param<SwiGLU<T>, T>> params(const SwiGLU<T>& m);
template <class T>
std::vector<Param<DecoderAttention<T>, T>> params(const DecoderAttention<T>& m);

// Appends a child module's parameters to its parent's: keys under `name` ("self_attn.", or "" for
// a child whose keys PyTorch puts on the parent itself), reached through `child`, which maps a
// const parent to a const child and a parent to a child (a generic lambda returning auto&).
template <class Parent, class T, class Child, class Access>
void append_child(std::vector<Param<Parent, T>>& ps, const std::string& name, const Child& c, Access child) {
  for (auto& p : params(c)) {
    ps.push_back({name + p.key, std::move(p.shape), std::move(p.also_accepted),
                  [get = std::move(p.get), child](const Parent& m) { return get(child(m)); },
                  [set = std::move(p.set), child](Parent& m, const Tensor<T>& t) { set(child(m), t); }});
    if (p.storage) {
      ps.back().storage = [storage = std::move(p.storage), child](const Parent& m) { return storage(child(m)); };
      ps.back().set_stored = [set = std::move(p.set_stored), child](Parent& m, Weight<T> w) {
        set(child(m), std::move(w));
      };
    }
  }
}

template <class T>
std::vector<Param<Linear<T>, T>> params(const Linear<T>& m) {
  std::vector<Param<Linear<T>, T>> ps;
  ps.push_back({"weight",
                {m.out_features(), m.in_features()},
                {},
                [](const Linear<T>& l) { return Tensor<T>::from_matrix(l.weight()); },
                [](Linear<T>& l, const Tensor<T>& t) { l.set_weight(t.matrix()); },
                [](const Linear<T>& l) { return l.storage(); },
                [](Linear<T>& l, Weight<T> w) { l.set_stored_weight(std::move(w)); }});
  if (m.has_bias())
    ps.push_back({"bias",
                  {m.out_features()},
                  {},
                  [](const Linear<T>& l) { return Tensor<T>::from_vector(l.bias()); },
                  [](Linear<T>& l, const Tensor<T>& t) { l.set_bias(t.vector()); }});
  return ps;
}

template <class T>
std::vector<Param<MultiHeadAttention<T>, T>> params(const MultiHeadAttention<T>& m) {
  using M = MultiHeadAttention<T>;
  const Index E = m.embed_dim();
  std::vector<Param<M, T>> ps;
  if (m.packed()) {
    ps.push_back({"in_proj_weight",
                  {3 * E, E},
                  {},
                  [](const M& a) { return Tensor<T>::from_matrix(a.in_proj_weight()); },
                  [](M& a, const Tensor<T>& t) { a.set_in_proj_weight(t.matrix()); }});
  } else {
    ps.push_back({"q_proj_weight",
                  {E, E},
                  {},
                  [](const M& a) { return Tensor<T>::from_matrix(a.q_proj_weight()); },
                  [](M& a, const Tensor<T>& t) { a.set_q_proj_weight(t.matrix()); }});
    ps.push_back({"k_proj_weight",
                  {E, m.kdim()},
                  {},
                  [](const M& a) { return Tensor<T>::from_matrix(a.k_proj_weight()); },
                  [](M& a, const Tensor<T>& t) { a.set_k_proj_weight(t.matrix()); }});
    ps.push_back({"v_proj_weight",
                  {E, m.vdim()},
                  {},
                  [](const M& a) { return Tensor<T>::from_matrix(a.v_proj_weight()); },
                  [](M& a, const Tensor<T>& t) { a.set_v_proj_weight(t.matrix()); }});
  }
  if (m.options().bias)
    ps.push_back({"in_proj_bias",
                  {3 * E},
                  {},
                  [](const M& a) { return Tensor<T>::from_vector(a.in_proj_bias()); },
                  [](M& a, const Tensor<T>& t) { a.set_in_proj_bias(t.vector()); }});
  if (m.options().add_bias_kv) {
    // PyTorch keeps them as [1, 1, E], ready to concatenate to a [S, B, E] key.
    ps.push_back({"bias_k",
                  {1, 1, E},
                  std::vector<TensorShape>{TensorShape{E}},
                  [E](const M& a) {
                    return Tensor<T>({1, 1, E}, Eigen::Map<const Matrix<T>>(a.bias_k().data(), 1, E));
                  },
                  [](M& a, const Tensor<T>& t) { a.set_bias_k(t.vector()); }});
    ps.push_back({"bias_v",
                  {1, 1, E},
                  std::vector<TensorShape>{TensorShape{E}},
                  [E](const M& a) {
                    return Tensor<T>({1, 1, E}, Eigen::Map<const Matrix<T>>(a.bias_v().data(), 1, E));
                  },
                  [](M& a, const Tensor<T>& t) { a.set_bias_v(t.vector()); }});
  }
  append_child(ps, "out_proj.", m.out_proj(), [](auto& a) -> auto& { return a.out_proj(); });
  return ps;
}

template <class T>
std::vector<Param<LayerNorm<T>, T>> params(const LayerNorm<T>& m) {
  using N = LayerNorm<T>;
  std::vector<Param<N, T>> ps;
  if (m.elementwise_affine())
    ps.push_back({"weight",
                  {m.normalized_shape()},
                  {},
                  [](const N& n) { return Tensor<T>::from_vector(n.weight()); },
                  [](N& n, const Tensor<T>& t) { n.set_weight(t.vector()); }});
  if (m.has_bias())
    ps.push_back({"bias",
                  {m.normalized_shape()},
                  {},
                  [](const N& n) { return Tensor<T>::from_vector(n.bias()); },
                  [](N& n, const Tensor<T>& t) { n.set_bias(t.vector()); }});
  return ps;
}

template <class T>
std::vector<Param<FeedForward<T>, T>> params(const FeedForward<T>& m) {
  std::vector<Param<FeedForward<T>, T>> ps;
  append_child(ps, "linear1.", m.linear1(), [](auto& f) -> auto& { return f.linear1(); });
  append_child(ps, "linear2.", m.linear2(), [](auto& f) -> auto& { return f.linear2(); });
  return ps;
}

template <class T>
std::vector<Param<RMSNorm<T>, T>> params(const RMSNorm<T>& m) {
  using N = RMSNorm<T>;
  std::vector<Param<N, T>> ps;
  ps.push_back({"weight",
                {m.dim()},
                {},
                [](const N& n) { return Tensor<T>::from_vector(n.weight()); },
                [](N& n, const Tensor<T>& t) { n.set_weight(t.vector()); }});
  return ps;
}

// LlamaMLP registers gate_proj, up_proj, down_proj, in that order.
template <class T>
std::vector<Param<SwiGLU<T>, T>> params(const SwiGLU<T>& m) {
  std::vector<Param<SwiGLU<T>, T>> ps;
  append_child(ps, "gate_proj.", m.gate_proj(), [](auto& f) -> auto& { return f.gate_proj(); });
  append_child(ps, "up_proj.", m.up_proj(), [](auto& f) -> auto& { return f.up_proj(); });
  append_child(ps, "down_proj.", m.down_proj(), [](auto& f) -> auto& { return f.down_proj(); });
  return ps;
}

// LlamaAttention registers q_proj, k_proj, v_proj, o_proj, in that order.
template <class T>
std::vector<Param<DecoderAttention<T>, T>> params(const DecoderAttention<T>& m) {
  std::vector<Param<DecoderAttention<T>, T>> ps;
  append_child(ps, "q_proj.", m.q_proj(), [](auto& a) -> auto& { return a.q_proj(); });
  append_child(ps, "k_proj.", m.k_proj(), [](auto& a) -> auto& { return a.k_proj(); });
  append_child(ps, "v_proj.", m.v_proj(), [](auto& a) -> auto& { return a.v_proj(); });
  append_child(ps, "o_proj.", m.o_proj(), [](auto& a) -> auto& { return a.o_proj(); });
  return ps;
}

// PyTorch's TransformerEncoderLayer registers self_attn, linear1, linear2, norm1, norm2 (and
// dropouts, which hold nothing); the feed-forward block's keys sit on the layer itself.
template <class T>
std::vector<Param<TransformerEncoderLayer<T>, T>> params(const TransformerEncoderLayer<T>& m) {
  std::vector<Param<TransformerEncoderLayer<T>, T>> ps;
  append_child(ps, "self_attn.", m.self_attn(), [](auto& l) -> auto& { return l.self_attn(); });
  append_child(ps, "", m.feed_forward(), [](auto& l) -> auto& { return l.feed_forward(); });
  append_child(ps, "norm1.", m.norm1(), [](auto& l) -> auto& { return l.norm1(); });
  append_child(ps, "norm2.", m.norm2(), [](auto& l) -> auto& { return l.norm2(); });
  return ps;
}

template <class T>
std::vector<Param<TransformerDecoderLayer<T>, T>> params(const TransformerDecoderLayer<T>& m) {
  std::vector<Param<TransformerDecoderLayer<T>, T>> ps;
  append_child(ps, "self_attn.", m.self_attn(), [](auto& l) -> auto& { return l.self_attn(); });
  append_child(ps, "multihead_attn.", m.multihead_attn(), [](auto& l) -> auto& { return l.multihead_attn(); });
  append_child(ps, "", m.feed_forward(), [](auto& l) -> auto& { return l.feed_forward(); });
  append_child(ps, "norm1.", m.norm1(), [](auto& l) -> auto& { return l.norm1(); });
  append_child(ps, "norm2.", m.norm2(), [](auto& l) -> auto& { return l.norm2(); });
  append_child(ps, "norm3.", m.norm3(), [](auto& l) -> auto& { return l.norm3(); });
  return ps;
}

template <class T>
std::vector<Param<TransformerEncoder<T>, T>> params(const TransformerEncoder<T>& m) {
  std::vector<Param<TransformerEncoder<T>, T>> ps;
  for (Index i = 0; i < m.num_layers(); ++i)
    append_child(ps, "layers." + std::to_string(i) + ".", m.layer(i), [i](auto& e) -> auto& { return e.layer(i); });
  if (m.norm()) append_child(ps, "norm.", *m.norm(), [](auto& e) -> auto& { return *e.norm(); });
  return ps;
}

template <class T>
std::vector<Param<TransformerDecoder<T>, T>> params(const TransformerDecoder<T>& m) {
  std::vector<Param<TransformerDecoder<T>, T>> ps;
  for (Index i = 0; i < m.num_layers(); ++i)
    append_child(
        ps, "layers." + std::to_string(i) + ".", m.layer(i), [i](auto& d) -> auto& { return d.layer(i); });
  if (m.norm())
    append_child(
        ps, "norm.", *m.norm(), [](auto& d) -> auto& { return *d.norm(); });
  return ps;
}

// nn.Transformer registers encoder, then decoder.
template <class T>
std::vector<Param<Transformer<T>, T>> params(const Transformer<T>& m) {
  std::vector<Param<Transformer<T>, T>> ps;
  append_child(
      ps, "encoder.", m.encoder(), [](auto& t) -> auto& { return t.encoder(); });
  append_child(
      ps, "decoder.", m.decoder(), [](auto& t) -> auto& { return t.decoder(); });
  return ps;
}

inline std::string normalized_prefix(std::string prefix) {
  if (!prefix.empty() && prefix.back() != '.') prefix += '.';
  return prefix;
}

// One constructor hyperparameter of a module, under PyTorch's argument name, with the module's value.
struct Hyperparameter {
  enum class Kind { integer, flag, real, name };
  std::string key;  // "num_heads", or "layers.0.self_attn.num_heads" in a composite
  Kind kind = Kind::integer;
  long long integer = 0;  // integer; flag: 0 or 1
  double real = 0;
  std::string name;
};

inline Hyperparameter hp_integer(std::string key, Index v) {
  return {std::move(key), Hyperparameter::Kind::integer, static_cast<long long>(v), 0.0, {}};
}
inline Hyperparameter hp_flag(std::string key, bool v) {
  return {std::move(key), Hyperparameter::Kind::flag, v ? 1 : 0, 0.0, {}};
}
inline Hyperparameter hp_real(std::string key, double v) {
  return {std::move(key), Hyperparameter::Kind::real, 0, v, {}};
}
inline Hyperparameter hp_name(std::string key, std::string v) {
  return {std::move(key), Hyperparameter::Kind::name, 0, 0.0, std::move(v)};
}

inline void append_hyperparameters(std::vector<Hyperparameter>& hs, const std::string& name,
                                   std::vector<Hyperparameter> child) {
  for (auto& h : child) {
    h.key = name + h.key;
    hs.push_back(std::move(h));
  }
}

inline const char* activation_name(Activation a) { return a == Activation::GELU ? "gelu" : "relu"; }

// The other modules (Linear, LayerNorm, RMSNorm, ...) have none that a file records: not checked.
template <class Module>
std::vector<Hyperparameter> hyperparameters(const Module& /*module*/) {
  return {};
}

template <class T>
std::vector<Hyperparameter> hyperparameters(const MultiHeadAttention<T>& m) {
  const MhaOptions& o = m.options();
  return {hp_integer("embed_dim", m.embed_dim()),
          hp_integer("num_heads", m.num_heads()),
          hp_integer("kdim", m.kdim()),
          hp_integer("vdim", m.vdim()),
          hp_flag("bias", o.bias),
          hp_flag("add_bias_kv", o.add_bias_kv),
          hp_flag("add_zero_attn", o.add_zero_attn),
          hp_flag("batch_first", o.batch_first)};
}

// A layer's own arguments (d_model and nhead are its self-attention's embed_dim and num_heads).
inline std::vector<Hyperparameter> layer_hyperparameters(Index d_model, Index nhead, const TransformerOptions& o) {
  return {hp_integer("d_model", d_model),
          hp_integer("nhead", nhead),
          hp_integer("dim_feedforward", o.dim_feedforward),
          hp_name("activation", activation_name(o.activation)),
          hp_real("layer_norm_eps", o.layer_norm_eps),
          hp_flag("batch_first", o.batch_first),
          hp_flag("norm_first", o.norm_first),
          hp_flag("bias", o.bias)};
}

template <class T>
std::vector<Hyperparameter> hyperparameters(const TransformerEncoderLayer<T>& m) {
  std::vector<Hyperparameter> hs = layer_hyperparameters(m.d_model(), m.nhead(), m.options());
  append_hyperparameters(hs, "self_attn.", hyperparameters(m.self_attn()));
  return hs;
}

template <class T>
std::vector<Hyperparameter> hyperparameters(const TransformerDecoderLayer<T>& m) {
  std::vector<Hyperparameter> hs = layer_hyperparameters(m.d_model(), m.nhead(), m.options());
  append_hyperparameters(hs, "self_attn.", hyperparameters(m.self_attn()));
  append_hyperparameters(hs, "multihead_attn.", hyperparameters(m.multihead_attn()));
  return hs;
}

// As tools/export_state_dict.py records an nn.TransformerEncoder: its first layer's arguments
// (PyTorch deep-copies one layer), num_layers and the final norm; then every layer's own.
template <class T>
std::vector<Hyperparameter> hyperparameters(const TransformerEncoder<T>& m) {
  std::vector<Hyperparameter> hs;
  if (m.num_layers() > 0)
    hs = layer_hyperparameters(m.layer(0).d_model(), m.layer(0).nhead(), m.layer(0).options());
  else
    hs.push_back(hp_integer("d_model", m.d_model()));
  hs.push_back(hp_integer("num_layers", m.num_layers()));
  hs.push_back(hp_flag("final_norm", m.norm() != nullptr));
  if (m.norm()) hs.push_back(hp_real("final_norm_eps", m.norm()->eps()));
  for (Index i = 0; i < m.num_layers(); ++i)
    append_hyperparameters(hs, "layers." + std::to_string(i) + ".", hyperparameters(m.layer(i)));
  return hs;
}

// As TransformerEncoder's: the first layer's arguments, num_layers and the final norm; then every layer's own.
template <class T>
std::vector<Hyperparameter> hyperparameters(const TransformerDecoder<T>& m) {
  std::vector<Hyperparameter> hs;
  if (m.num_layers() > 0)
    hs = layer_hyperparameters(m.layer(0).d_model(), m.layer(0).nhead(), m.layer(0).options());
  else
    hs.push_back(hp_integer("d_model", m.d_model()));
  hs.push_back(hp_integer("num_layers", m.num_layers()));
  hs.push_back(hp_flag("final_norm", m.norm() != nullptr));
  if (m.norm()) hs.push_back(hp_real("final_norm_eps", m.norm()->eps()));
  for (Index i = 0; i < m.num_layers(); ++i)
    append_hyperparameters(hs, "layers." + std::to_string(i) + ".", hyperparameters(m.layer(i)));
  return hs;
}

// As tools/export_state_dict.py records an nn.Transformer: its constructor's arguments (from the
// encoder's first layer, or the decoder's), then the two stacks under encoder. and decoder.
template <class T>
std::vector<Hyperparameter> hyperparameters(const Transformer<T>& m) {
  std::vector<Hyperparameter> hs;
  const TransformerOptions* o = m.encoder().num_layers() > 0   ? &m.encoder().layer(0).options()
                                : m.decoder().num_layers() > 0 ? &m.decoder().layer(0).options()
                                                               : nullptr;
  if (o) {
    hs = layer_hyperparameters(m.d_model(), m.nhead(), *o);
  } else {
    hs.push_back(hp_integer("d_model", m.d_model()));
    hs.push_back(hp_integer("nhead", m.nhead()));
  }
  hs.push_back(hp_integer("num_encoder_layers", m.encoder().num_layers()));
  hs.push_back(hp_integer("num_decoder_layers", m.decoder().num_layers()));
  append_hyperparameters(hs, "encoder.", hyperparameters(m.encoder()));
  append_hyperparameters(hs, "decoder.", hyperparameters(m.decoder()));
  return hs;
}

// The shortest decimal that reads back as v ("1e-05", not "1.0000000000000001e-05"), as Python's
// repr writes floats; in the classic locale, whatever the program's.
inline std::string real_to_string(double v) {
  std::string s;
  for (int digits = 1; digits <= 17; ++digits) {
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out.precision(digits);
    out << v;
    s = out.str();
    std::istringstream in(s);
    in.imbue(std::locale::classic());
    double back = 0;
    if (in >> back && back == v) break;
  }
  return s;
}

inline std::string value_string(const Hyperparameter& h) {
  switch (h.kind) {
    case Hyperparameter::Kind::integer:
      return std::to_string(h.integer);
    case Hyperparameter::Kind::flag:
      return h.integer ? "true" : "false";
    case Hyperparameter::Kind::real:
      return real_to_string(h.real);
    case Hyperparameter::Kind::name:
      break;
  }
  return h.name;
}

// Reads a metadata string as h's kind into `out` (integer, flag) or `real`; false when it is not one.
inline bool parse_hyperparameter(const Hyperparameter& h, const std::string& s, long long& out, double& real) {
  switch (h.kind) {
    case Hyperparameter::Kind::integer: {
      if (s.empty() || s.size() > 18) return false;  // 18 digits cannot overflow a long long
      std::size_t i = s[0] == '-' ? 1 : 0;
      if (i == s.size()) return false;
      long long v = 0;
      for (; i < s.size(); ++i) {
        if (s[i] < '0' || s[i] > '9') return false;
        v = v * 10 + (s[i] - '0');
      }
      out = s[0] == '-' ? -v : v;
      return true;
    }
    case Hyperparameter::Kind::flag:
      out = s == "true" || s == "True" || s == "1" ? 1 : 0;
      return out == 1 || s == "false" || s == "False" || s == "0";
    case Hyperparameter::Kind::real: {
      std::istringstream in(s);
      in.imbue(std::locale::classic());
      double v = 0;
      if (!(in >> v) || !in.eof() || !std::isfinite(v)) return false;
      real = v;
      return true;
    }
    case Hyperparameter::Kind::name:
      break;
  }
  return true;
}

// What to change: "build it with 4 heads", "build it with batch_first = true".
inline std::string hyperparameter_fix(const Hyperparameter& h, const std::string& file_value) {
  const std::string name = h.key.substr(h.key.rfind('.') == std::string::npos ? 0 : h.key.rfind('.') + 1);
  if (name == "num_heads" || name == "nhead") return "build it with " + file_value + " heads";
  if (name == "final_norm")
    return h.integer ? "build it without a final norm" : "build it with a final LayerNorm (the norm argument)";
  if (name == "activation" && file_value != "relu" && file_value != "gelu")
    return "attn's layers have activation relu and gelu only";
  return "build it with " + name + " = " + file_value;
}

// Compares every hyperparameter of `hs` that `meta` has under `prefix` with the module's; throws
// a format_error naming the first that differs (context: who loads what, for the message).
inline void check_hyperparameters(const std::vector<Hyperparameter>& hs, const Metadata& meta,
                                  const std::string& prefix, const std::string& context) {
  std::string first;
  std::size_t differ = 0;
  for (const Hyperparameter& h : hs) {
    const auto it = meta.find(prefix + h.key);
    if (it == meta.end()) continue;
    const std::string& s = it->second;
    long long v = 0;
    double real = 0;
    if (!parse_hyperparameter(h, s, v, real)) {
      static const char* const what[] = {"an integer", "a flag (true or false)", "a finite number", "a name"};
      throw format_error(attn::detail::concat(context, ": metadata ", it->first, " = \"", s, "\" is not ",
                                              what[static_cast<int>(h.kind)]));
    }
    bool same = true;
    switch (h.kind) {
      case Hyperparameter::Kind::integer:
      case Hyperparameter::Kind::flag:
        same = v == h.integer;
        break;
      case Hyperparameter::Kind::real:  // a writer may have printed a float: 1e-5f is 9.99999974738e-06
        same = std::abs(real - h.real) <= 1e-6 * std::max(std::abs(real), std::abs(h.real));
        break;
      case Hyperparameter::Kind::name:
        same = s == h.name;
        break;
    }
    if (same) continue;
    if (differ++ == 0)
      first = attn::detail::concat("metadata says ", it->first, " = ", s, ", the module has ", value_string(h), ": ",
                                   hyperparameter_fix(h, s));
  }
  if (differ == 0) return;
  throw format_error(attn::detail::concat(
      context, ": ", first,
      differ > 1 ? attn::detail::concat(" (and ", differ - 1, differ == 2 ? " more differs)" : " more differ)") : ""));
}

inline Metadata to_metadata(const std::vector<Hyperparameter>& hs, const std::string& raw_prefix) {
  const std::string prefix = normalized_prefix(raw_prefix);
  Metadata meta;
  for (const Hyperparameter& h : hs) meta[prefix + h.key] = value_string(h);
  return meta;
}

// Why a strict load found none of the module's keys where it looked: every prefix other than
// `prefix` under which the source holds all of them ("" included), for a hint in the error.
template <class Module, class T>
std::vector<std::string> prefixes_holding(const std::vector<Param<Module, T>>& ps, const std::vector<std::string>& keys,
                                          const std::unordered_set<std::string>& have, const std::string& prefix) {
  std::vector<std::string> found;
  if (ps.empty()) return found;
  // Every candidate ends where the first parameter's key begins, at a '.' or at the start.
  const std::string& first = ps.front().key;
  for (const std::string& k : keys) {
    if (k.size() < first.size() || k.compare(k.size() - first.size(), first.size(), first) != 0) continue;
    const std::string q = k.substr(0, k.size() - first.size());
    if (q == prefix || (!q.empty() && q.back() != '.')) continue;
    bool all = true;
    for (const auto& p : ps) all = all && have.count(q + p.key);
    if (all) found.push_back(q);
  }
  return found;
}

inline std::string prefix_hint(const std::vector<std::string>& found, std::size_t missing, const std::string& prefix) {
  if (found.empty()) return "";
  const std::string all =
      attn::detail::concat("; all ", missing, missing == 1 ? " missing key exists" : " missing keys exist");
  if (found.size() == 1) {
    if (found[0].empty()) return attn::detail::concat(all, " without the prefix \"", prefix, "\": pass prefix \"\"");
    return attn::detail::concat(all, " under prefix \"", found[0], "\": pass prefix \"",
                                found[0].substr(0, found[0].size() - 1), "\"");
  }
  std::string list;
  for (std::size_t i = 0; i < found.size() && i < 4; ++i)
    list += attn::detail::concat(i ? ", \"" : "\"", found[i], "\"");
  if (found.size() > 4) list += attn::detail::concat(" and ", found.size() - 4, " more");
  return attn::detail::concat(all, " under each of the prefixes ", list, ": pass the one you mean");
}

inline std::string key_list(const std::vector<std::string>& keys) {
  std::string s = "[";
  for (std::size_t i = 0; i < keys.size(); ++i) s += (i ? ", \"" : "\"") + keys[i] + "\"";
  return s + "]";
}

template <class T>
struct Source {
  std::string what;  // for messages: "safetensors file x", "state dict"
  std::vector<std::string> keys;
  std::function<Tensor<T>(const std::string&)> get;
  const Metadata* metadata = nullptr;  // a file's, whose hyperparameters are checked; a StateDict has none
  // A file's tensor as a Weight in storage s, used in place, when its dtype is s's (BF16 for
  // BFloat16, F16 for Float16) and its bytes allow it; nullopt otherwise. Empty for a StateDict.
  std::function<std::optional<Weight<T>>(const std::string&, Storage)> stored = {};
};

// Loads into temporaries, checks every key and shape, then assigns to a copy of the module and
// moves the copy in: whatever throws, `module` is as it was (the strong guarantee).
template <class Module, class T>
LoadResult load(Module& module, const Source<T>& src, const std::string& raw_prefix, bool strict, const char* where) {
  static_assert(std::is_nothrow_move_assignable_v<Module>,
                "load_state_dict's strong guarantee moves a loaded copy into the module");
  const std::string prefix = normalized_prefix(raw_prefix);
  // The hyperparameters first: a 4-head file has the shapes of an 8-head module, and a key-by-key
  // load would succeed and compute something else.
  if (src.metadata)
    check_hyperparameters(hyperparameters(module), *src.metadata, prefix,
                          attn::detail::concat(where, ": ", src.what, ", prefix \"", prefix, "\""));
  const std::vector<Param<Module, T>> ps = params(module);
  const std::unordered_set<std::string> have(src.keys.begin(), src.keys.end());
  std::unordered_set<std::string> expected;
  LoadResult r;
  for (const auto& p : ps) {
    expected.insert(prefix + p.key);
    if (!have.count(prefix + p.key)) r.missing_keys.push_back(prefix + p.key);
  }
  for (const std::string& k : src.keys)
    if (k.compare(0, prefix.size(), prefix) == 0 && !expected.count(k)) r.unexpected_keys.push_back(k);
  if (strict && (!r.missing_keys.empty() || !r.unexpected_keys.empty())) {
    std::string msg = attn::detail::concat(where, ": ", src.what, ", prefix \"", prefix, "\":");
    if (!r.missing_keys.empty()) msg += " missing keys " + key_list(r.missing_keys);
    if (!r.missing_keys.empty() && !r.unexpected_keys.empty()) msg += ";";
    if (!r.unexpected_keys.empty()) msg += " unexpected keys " + key_list(r.unexpected_keys);
    if (!r.missing_keys.empty())
      msg += prefix_hint(prefixes_holding(ps, src.keys, have, prefix), r.missing_keys.size(), prefix);
    throw format_error(msg + " (strict = false loads the keys that match)");
  }

  std::vector<std::pair<const Param<Module, T>*, Tensor<T>>> loaded;
  std::vector<std::pair<const Param<Module, T>*, Weight<T>>> kept;  // used as stored, not converted
  std::string mismatches;
  for (const auto& p : ps) {
    const std::string key = prefix + p.key;
    if (!have.count(key)) continue;
    if (p.storage && src.stored) {
      std::optional<Weight<T>> w = src.stored(key, p.storage(module));
      if (w && w->rows() == p.shape[0] && w->cols() == p.shape[1]) {
        kept.emplace_back(&p, std::move(*w));
        continue;
      }
    }
    Tensor<T> t = src.get(key);
    bool ok = t.shape() == p.shape;
    for (const auto& alt : p.also_accepted) ok = ok || t.shape() == alt;
    if (!ok)
      mismatches += attn::detail::concat(mismatches.empty() ? "" : "; ", "\"", key, "\" has shape ",
                                         to_string(t.shape()), ", the module's is ", to_string(p.shape));
    loaded.emplace_back(&p, std::move(t));
  }
  if (!mismatches.empty()) throw shape_error(attn::detail::concat(where, ": ", src.what, ": ", mismatches));

  Module next = module;
  for (const auto& [p, t] : loaded) p->set(next, t);
  for (auto& [p, w] : kept) p->set_stored(next, std::move(w));
  module = std::move(next);
  return r;
}

// Tensor `name` of st as a Weight in storage s, in place: when s is BFloat16 or Float16, the tensor
// is 2-D of that dtype (BF16, F16), the host little-endian and the data 2-byte aligned.
template <class T>
std::optional<Weight<T>> stored_view(const SafeTensors& st, const std::string& name, Storage s) {
  const TensorInfo& t = st.info(name);
  const bool match = (s == Storage::BFloat16 && t.dtype == DType::BF16) || (s == Storage::Float16 && t.dtype == DType::F16);
  if (!match || t.shape.size() != 2 || !detail::host_is_little_endian() ||
      reinterpret_cast<std::uintptr_t>(st.bytes(name)) % 2 != 0)
    return std::nullopt;
  return Weight<T>::view(s, t.shape[0], t.shape[1], st.bytes(name), st.keep_alive());
}

template <class T>
Source<T> source(const SafeTensors& st) {
  return {"safetensors file " + st.path(), st.names(), [&st](const std::string& k) { return st.tensor<T>(k); },
          &st.metadata(), [&st](const std::string& k, Storage s) { return stored_view<T>(st, k, s); }};
}

template <class T>
Source<T> source(const StateDict<T>& sd) {
  return {"state dict", sd.names(), [&sd](const std::string& k) { return sd.at(k); }};
}

template <class Module, class T>
StateDict<T> save(const Module& module, const std::string& raw_prefix) {
  const std::string prefix = normalized_prefix(raw_prefix);
  StateDict<T> sd;
  for (const auto& p : params(module)) sd.set(prefix + p.key, p.get(module));
  return sd;
}

}  // namespace detail

// The module's parameters under PyTorch's keys (each prefixed), in PyTorch's order; owned copies.
//   Linear, MultiHeadAttention, LayerNorm, FeedForward, TransformerEncoderLayer,
//   TransformerDecoderLayer, TransformerEncoder, RMSNorm, SwiGLU: the keys in the table at the top
//   of this file.
template <class T>
StateDict<T> state_dict(const Linear<T>& module, const std::string& prefix = "") {
  return detail::save<Linear<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const MultiHeadAttention<T>& module, const std::string& prefix = "") {
  return detail::save<MultiHeadAttention<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const LayerNorm<T>& module, const std::string& prefix = "") {
  return detail::save<LayerNorm<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const FeedForward<T>& module, const std::string& prefix = "") {
  return detail::save<FeedForward<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const TransformerEncoderLayer<T>& module, const std::string& prefix = "") {
  return detail::save<TransformerEncoderLayer<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const TransformerDecoderLayer<T>& module, const std::string& prefix = "") {
  return detail::save<TransformerDecoderLayer<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const TransformerEncoder<T>& module, const std::string& prefix = "") {
  return detail::save<TransformerEncoder<T>, T>(module, prefix);
}

// The module's hyperparameters (the names in the table at the top of this file) as a file's
// metadata, each key under `prefix`, written as tools/export_state_dict.py writes PyTorch's: saved
// beside the module's tensors, they let a later load_state_dict check the module it loads into.
//   attn::io::save_safetensors(path, attn::io::state_dict(mha, "attn"), attn::io::hyperparameter_metadata(mha, "attn"));
// For MultiHeadAttention, the transformer layers and TransformerEncoder: the modules that have
// hyperparameters to check (detail::hyperparameters); one template rather than an overload each.
template <class Module>
auto hyperparameter_metadata(const Module& module, const std::string& prefix = "")
    -> decltype(detail::to_metadata(detail::hyperparameters(module), prefix)) {
  return detail::to_metadata(detail::hyperparameters(module), prefix);
}

// Sets the module's parameters from the keys under `prefix`: from a file (any float dtype,
// converted to T) or a StateDict<T>. For every module state_dict() saves (a composite such as
// TransformerEncoder loads all of its layers' keys in one call).
//   strict (the default): every parameter must be there and nothing else under the prefix, or a
//     format_error lists the missing and the unexpected keys (and the prefix to pass, when the
//     missing ones are all under another);
//   strict = false: what matches is loaded, the rest is returned in the LoadResult.
// From a file, MultiHeadAttention, the transformer layers and TransformerEncoder first check the
// hyperparameters the file's metadata records under the prefix (see the top of this file): one
// that differs from the module's is a format_error naming the key and both values.
// A tensor whose shape is not the parameter's is a shape_error naming the key and both shapes;
// a tensor that is not a float, a format_error. On any error the module is left unchanged, a
// composite's every submodule included (the parameters are set on a copy that then replaces it,
// so a load briefly holds the module twice).
template <class T>
LoadResult load_state_dict(Linear<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(Linear)");
}
template <class T>
LoadResult load_state_dict(Linear<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(Linear)");
}
template <class T>
LoadResult load_state_dict(MultiHeadAttention<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(MultiHeadAttention)");
}
template <class T>
LoadResult load_state_dict(MultiHeadAttention<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(MultiHeadAttention)");
}
template <class T>
LoadResult load_state_dict(LayerNorm<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(LayerNorm)");
}
template <class T>
LoadResult load_state_dict(LayerNorm<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(LayerNorm)");
}
template <class T>
LoadResult load_state_dict(FeedForward<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(FeedForward)");
}
template <class T>
LoadResult load_state_dict(FeedForward<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(FeedForward)");
}
template <class T>
LoadResult load_state_dict(TransformerEncoderLayer<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict,
                      "attn::io::load_state_dict(TransformerEncoderLayer)");
}
template <class T>
LoadResult load_state_dict(TransformerEncoderLayer<T>& module, const StateDict<T>& src,
                           const std::string& prefix = "", bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict,
                      "attn::io::load_state_dict(TransformerEncoderLayer)");
}
template <class T>
LoadResult load_state_dict(TransformerDecoderLayer<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict,
                      "attn::io::load_state_dict(TransformerDecoderLayer)");
}
template <class T>
LoadResult load_state_dict(TransformerDecoderLayer<T>& module, const StateDict<T>& src,
                           const std::string& prefix = "", bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict,
                      "attn::io::load_state_dict(TransformerDecoderLayer)");
}
template <class T>
LoadResult load_state_dict(TransformerEncoder<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(TransformerEncoder)");
}
template <class T>
LoadResult load_state_dict(TransformerEncoder<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(TransformerEncoder)");
}

template <class T>
StateDict<T> state_dict(const TransformerDecoder<T>& module, const std::string& prefix = "") {
  return detail::save<TransformerDecoder<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const Transformer<T>& module, const std::string& prefix = "") {
  return detail::save<Transformer<T>, T>(module, prefix);
}
template <class T>
LoadResult load_state_dict(TransformerDecoder<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(TransformerDecoder)");
}
template <class T>
LoadResult load_state_dict(TransformerDecoder<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(TransformerDecoder)");
}
template <class T>
LoadResult load_state_dict(Transformer<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(Transformer)");
}
template <class T>
LoadResult load_state_dict(Transformer<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(Transformer)");
}

template <class T>
StateDict<T> state_dict(const RMSNorm<T>& module, const std::string& prefix = "") {
  return detail::save<RMSNorm<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const SwiGLU<T>& module, const std::string& prefix = "") {
  return detail::save<SwiGLU<T>, T>(module, prefix);
}
template <class T>
LoadResult load_state_dict(RMSNorm<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(RMSNorm)");
}
template <class T>
LoadResult load_state_dict(RMSNorm<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(RMSNorm)");
}
template <class T>
LoadResult load_state_dict(SwiGLU<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(SwiGLU)");
}
template <class T>
LoadResult load_state_dict(SwiGLU<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(SwiGLU)");
}

template <class T>
StateDict<T> state_dict(const DecoderAttention<T>& module, const std::string& prefix = "") {
  return detail::save<DecoderAttention<T>, T>(module, prefix);
}
template <class T>
LoadResult load_state_dict(DecoderAttention<T>& module, const SafeTensors& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(DecoderAttention)");
}
template <class T>
LoadResult load_state_dict(DecoderAttention<T>& module, const StateDict<T>& src, const std::string& prefix = "",
                           bool strict = true) {
  return detail::load(module, detail::source<T>(src), prefix, strict, "attn::io::load_state_dict(DecoderAttention)");
}

}  // namespace attn::io
