// attn/io/tensor.hpp - named tensors of any shape: what a state dict and a safetensors file hold.
//
//   attn::io::StateDict<float> sd;
//   sd.set("weight", attn::io::Tensor<float>::from_matrix(w));  // shape [rows, cols], a copy
//   Eigen::Map<const attn::Matrix<float>> m = sd.at("weight").matrix();  // no copy
//
// A tensor of shape [d0, d1, ..., dn] is read by attn as the row-major matrix
//   [d0, d1 * ... * dn]   for n >= 1 (2-D as it is; [B, L, E] as [B, L*E]),
//   [1, d0]               for a 1-D tensor (numpy's atleast_2d: a bias [E] is one row),
//   [1, 1]                for a scalar (shape []),
// the same bytes in every case, so no view costs a copy.
//
// No dependency beyond Eigen (attn/io/safetensors.hpp, which reads and writes files, needs
// nlohmann_json).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/error.hpp"
#include "attn/types.hpp"

namespace attn::io {

// What a non-strict load skipped (load_state_dict, a model from a checkpoint), as PyTorch's
// load_state_dict returns it.
struct LoadResult {
  std::vector<std::string> missing_keys;     // the module's, absent from the source: left as they were
  std::vector<std::string> unexpected_keys;  // the source's, under the prefix, unknown to the module
};

// [d0, ..., dn], PyTorch's order; [] is a scalar.
using TensorShape = std::vector<std::int64_t>;

// "[1, 1, 16]"
inline std::string to_string(const TensorShape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The number of elements; -1 when a dimension is negative or the product does not fit an Index.
inline Index numel(const TensorShape& shape) {
  Index n = 1;
  bool zero = false;
  for (const std::int64_t d : shape) {
    if (d < 0) return -1;
    if (d == 0) {
      zero = true;
      continue;
    }
    if (n > std::numeric_limits<Index>::max() / d) return -1;  // checked on the nonzero dimensions, so
    n *= d;                                                    // that rows and cols below fit too
  }
  return zero ? 0 : n;
}

// The 2-D matrix attn reads a tensor as (see the top of this file): {rows, cols}. For a shape
// whose numel() is not -1.
inline std::pair<Index, Index> matrix_dims(const TensorShape& shape) {
  if (shape.empty()) return {1, 1};
  if (shape.size() == 1) return {1, shape[0]};
  Index cols = 1;
  for (std::size_t i = 1; i < shape.size(); ++i) cols *= shape[i];
  return {shape[0], cols};
}

// An immutable tensor: a shape and row-major elements that are either an owned copy or a view
// into memory someone else owns (a memory-mapped file), kept alive by this object. Copies share
// the elements.
//
//   auto t = attn::io::Tensor<float>::from_vector(b);  // shape [n]
//   t.vector();                                         // Map<const Vector<float>> of n elements
template <class T>
class Tensor {
 public:
  // A tensor of shape [0].
  Tensor() : shape_{0} {}

  // values: any matrix holding numel(shape) elements, read in row-major order.
  Tensor(TensorShape shape, const ConstMatrixRef<T>& values) : shape_(std::move(shape)) {
    const Index n = checked_numel(shape_);
    attn::detail::require_shape(values.size() == n, "attn::io::Tensor", "shape ", to_string(shape_), " holds ", n,
                                " elements, but the values have ", values.size(), " ([", values.rows(), ", ",
                                values.cols(), "])");
    auto owned = std::make_shared<Vector<T>>(n);
    Eigen::Map<Matrix<T>>(owned->data(), values.rows(), values.cols()) = values;
    data_ = owned->data();
    owner_ = std::move(owned);
  }

  // A copy of m, shape [rows, cols].
  static Tensor from_matrix(const ConstMatrixRef<T>& m) { return Tensor({m.rows(), m.cols()}, m); }
  // A copy of v, shape [n].
  static Tensor from_vector(const ConstVectorRef<T>& v) {
    return Tensor({v.size()}, Eigen::Map<const Matrix<T>>(v.data(), 1, v.size()));
  }
  // A view of numel(shape) elements at data, which `owner` keeps alive (may be null when the
  // caller guarantees the lifetime).
  static Tensor view(TensorShape shape, const T* data, std::shared_ptr<const void> owner) {
    return Tensor(std::move(shape), data, std::move(owner));
  }

  const TensorShape& shape() const { return shape_; }
  Index numel() const { return io::numel(shape_); }
  const T* data() const { return data_; }
  // Whether the elements are a view (of a mapped file) rather than this tensor's own copy.
  bool is_view() const { return mapped_; }

  // [d0, d1*...*dn] (a 1-D tensor [1, n], a scalar [1, 1]), zero-copy.
  Eigen::Map<const Matrix<T>> matrix() const {
    const auto [rows, cols] = matrix_dims(shape_);
    return Eigen::Map<const Matrix<T>>(data_, rows, cols);
  }
  // All numel() elements in row-major order, zero-copy.
  Eigen::Map<const Vector<T>> vector() const { return Eigen::Map<const Vector<T>>(data_, numel()); }

 private:
  // What view() makes: the caller's elements, kept alive by owner.
  Tensor(TensorShape shape, const T* data, std::shared_ptr<const void> owner)
      : shape_(std::move(shape)), data_(data), owner_(std::move(owner)), mapped_(true) {
    const Index n = checked_numel(shape_);
    attn::detail::require_arg(data != nullptr || n == 0, "attn::io::Tensor::view", "null data for shape ",
                              to_string(shape_));
  }

  static Index checked_numel(const TensorShape& shape) {
    const Index n = io::numel(shape);
    attn::detail::require_shape(n >= 0, "attn::io::Tensor", "shape ", to_string(shape),
                                " has a negative dimension or more elements than an Index holds");
    return n;
  }

  TensorShape shape_;
  const T* data_ = nullptr;
  std::shared_ptr<const void> owner_;
  bool mapped_ = false;
};

// Names -> tensors, in insertion order (PyTorch's state_dict is an OrderedDict).
//
//   attn::io::StateDict<float> sd = attn::io::state_dict(mha);  // attn/io/state_dict.hpp
//   for (const auto& [name, tensor] : sd) std::cout << name << attn::io::to_string(tensor.shape()) << "\n";
template <class T>
class StateDict {
 public:
  using value_type = std::pair<std::string, Tensor<T>>;
  using const_iterator = typename std::vector<value_type>::const_iterator;

  // Adds `name`, or replaces its tensor where it stands, as assigning to an OrderedDict does.
  void set(const std::string& name, Tensor<T> tensor) {
    const auto it = index_.find(name);
    if (it != index_.end()) {
      entries_[it->second].second = std::move(tensor);
      return;
    }
    index_.emplace(name, entries_.size());
    entries_.emplace_back(name, std::move(tensor));
  }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // format_error naming the key when it is absent.
  const Tensor<T>& at(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) throw format_error("attn::io::StateDict: no tensor \"" + name + "\"");
    return entries_[it->second].second;
  }
  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    n.reserve(entries_.size());
    for (const auto& e : entries_) n.push_back(e.first);
    return n;
  }
  const_iterator begin() const { return entries_.begin(); }
  const_iterator end() const { return entries_.end(); }

 private:
  std::vector<value_type> entries_;
  std::unordered_map<std::string, std::size_t> index_;
};

}  // namespace attn::io
