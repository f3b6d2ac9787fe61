// attn/io/state_dict.hpp - PyTorch's state_dict() and load_state_dict() for attn's modules, under
// PyTorch's names, so a trained model's tensors load without reshuffling and attn's save back.
//
//   auto st = attn::io::SafeTensors::open("encoder.safetensors");       // torch's state_dict
//   attn::io::load_state_dict(mha, st, "layers.0.self_attn");            // strict: every key, once
//   attn::io::save_safetensors("mha.safetensors", attn::io::state_dict(mha));
//
// The keys, as in PyTorch:
//   Linear:              weight [out, in], bias [out] (when it has one)
//   MultiHeadAttention:  in_proj_weight [3E, E], or q_proj_weight [E, E], k_proj_weight [E, kdim],
//                        v_proj_weight [E, vdim] when kdim or vdim != E; in_proj_bias [3E],
//                        out_proj.weight [E, E], out_proj.bias [E] (with bias); bias_k, bias_v
//                        [1, 1, E] (with add_bias_kv; [E] is accepted on load too).
// In PyTorch's order (a module's own parameters, then out_proj's).
//
// A prefix names the module inside a larger one: "encoder.attn" or "encoder.attn." (a '.' is
// added when missing). Keys outside the prefix are never looked at.
//
// Needs nlohmann_json, as attn/io/safetensors.hpp does.
#pragma once

#include <functional>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include "attn/error.hpp"
#include "attn/io/safetensors.hpp"
#include "attn/io/tensor.hpp"
#include "attn/linear.hpp"
#include "attn/multi_head_attention.hpp"
#include "attn/types.hpp"

namespace attn::io {

// What a non-strict load_state_dict skipped, as PyTorch's load_state_dict returns it.
struct LoadResult {
  std::vector<std::string> missing_keys;     // the module's, absent from the source: left as they were
  std::vector<std::string> unexpected_keys;  // the source's, under the prefix, unknown to the module
};

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
};

template <class T>
std::vector<Param<Linear<T>, T>> params(const Linear<T>& m) {
  std::vector<Param<Linear<T>, T>> ps;
  ps.push_back({"weight",
                {m.out_features(), m.in_features()},
                {},
                [](const Linear<T>& l) { return Tensor<T>::from_matrix(l.weight()); },
                [](Linear<T>& l, const Tensor<T>& t) { l.set_weight(t.matrix()); }});
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
  for (auto& p : params(m.out_proj())) {
    auto get = std::move(p.get);
    auto set = std::move(p.set);
    ps.push_back({"out_proj." + p.key, std::move(p.shape), std::move(p.also_accepted),
                  [get](const M& a) { return get(a.out_proj()); },
                  [set](M& a, const Tensor<T>& t) { set(a.out_proj(), t); }});
  }
  return ps;
}

inline std::string normalized_prefix(std::string prefix) {
  if (!prefix.empty() && prefix.back() != '.') prefix += '.';
  return prefix;
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
};

// Loads into temporaries, checks every key and shape, then assigns to a copy of the module and
// moves the copy in: whatever throws, `module` is as it was (the strong guarantee).
template <class Module, class T>
LoadResult load(Module& module, const Source<T>& src, const std::string& raw_prefix, bool strict, const char* where) {
  static_assert(std::is_nothrow_move_assignable_v<Module>,
                "load_state_dict's strong guarantee moves a loaded copy into the module");
  const std::string prefix = normalized_prefix(raw_prefix);
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
    throw format_error(msg + " (strict = false loads the keys that match)");
  }

  std::vector<std::pair<const Param<Module, T>*, Tensor<T>>> loaded;
  std::string mismatches;
  for (const auto& p : ps) {
    const std::string key = prefix + p.key;
    if (!have.count(key)) continue;
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
  module = std::move(next);
  return r;
}

template <class T>
Source<T> source(const SafeTensors& st) {
  return {"safetensors file " + st.path(), st.names(), [&st](const std::string& k) { return st.tensor<T>(k); }};
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
template <class T>
StateDict<T> state_dict(const Linear<T>& module, const std::string& prefix = "") {
  return detail::save<Linear<T>, T>(module, prefix);
}
template <class T>
StateDict<T> state_dict(const MultiHeadAttention<T>& module, const std::string& prefix = "") {
  return detail::save<MultiHeadAttention<T>, T>(module, prefix);
}

// Sets the module's parameters from the keys under `prefix`: from a file (any float dtype,
// converted to T) or a StateDict<T>.
//   strict (the default): every parameter must be there and nothing else under the prefix, or a
//     format_error lists the missing and the unexpected keys;
//   strict = false: what matches is loaded, the rest is returned in the LoadResult.
// A tensor whose shape is not the parameter's is a shape_error naming the key and both shapes;
// a tensor that is not a float, a format_error. On any error the module is left unchanged.
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

}  // namespace attn::io
