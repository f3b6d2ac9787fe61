// attn/mask.hpp - masks whose types say what they mean.
//
// PyTorch's nn.MultiheadAttention reads a boolean mask as "true = masked out", its
// scaled_dot_product_attention as "true = may attend". attn has no plain boolean mask: the type
// states the polarity, so a mask ported from either API keeps its meaning.
//
//   attn::BoolMatrix pad(B, S);                // true where the key is padding
//   attn::Masks<float> m;
//   m.key_padding_mask = attn::IgnoreMask(pad);  // true = ignore this key (nn.MultiheadAttention)
//   m.attn_mask = attn::AttendMask(allowed);     // true = may attend (F.scaled_dot_product_attention)
//   m.causal = attn::Causal::BottomRight;        // alignment is always spelled out
//
// A mask copies its elements (a temporary it takes over), so it stays valid whatever happens to
// the matrix it was built from; attn::view(m) makes one that reads m in place instead, for masks
// too large to copy per call, and m must then outlive it:
//   m.attn_mask = attn::AttendMask(attn::view(allowed));   // no copy: `allowed` must stay alive
#pragma once

#include <cmath>
#include <memory>
#include <optional>
#include <utility>

#include "attn/detail/check.hpp"
#include "attn/precision.hpp"
#include "attn/types.hpp"

namespace attn {

// Causal masking, with the alignment stated. With L queries and S keys:
//   TopLeft:     query i sees keys j <= i          (PyTorch SDPA is_causal, even when L != S)
//   BottomRight: query i sees keys j <= i + S - L  (the last query sees every key: KV caches,
//                                                   PyTorch 2.x causal_lower_right)
// The two agree when L == S.
enum class Causal { None, TopLeft, BottomRight };

// A view of mask elements that the caller keeps alive: attn::view(m) for a row-major matrix,
// attn::view(data, rows, cols) for a contiguous row-major buffer (a torch or numpy tensor). For a
// mask too large to copy on every call; the caller must keep the elements alive, unchanged, for
// as long as the mask is used. Every other way of building a mask copies the elements (or takes a
// temporary over), so no mask can outlive what it reads unless it was asked to view.
template <class Scalar>
class MaskView {
 public:
  MaskView(const Scalar* data, Index rows, Index cols) : data_(data), rows_(rows), cols_(cols) {}
  const Scalar* data() const { return data_; }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }

 private:
  const Scalar* data_;
  Index rows_, cols_;
};

template <class Scalar>
MaskView<Scalar> view(const Matrix<Scalar>& m) {
  return MaskView<Scalar>(m.data(), m.rows(), m.cols());
}
// A temporary is gone at the end of the statement: build the mask from it instead (the mask takes
// it over), e.g. attn::IgnoreMask(pad.array() == 0).
template <class Scalar>
MaskView<Scalar> view(const Matrix<Scalar>&& m) = delete;
template <class Scalar>
MaskView<Scalar> view(const Scalar* data, Index rows, Index cols) {
  return MaskView<Scalar>(data, rows, cols);
}

namespace detail {

// The elements of a mask: a copy this object keeps alive (shared between copies, so a mask may be
// copied freely), or, only when built from an attn::view, the caller's row-major buffer.
template <class Scalar>
class MaskData {
 public:
  MaskData() = default;
  // Copies m.
  explicit MaskData(const Matrix<Scalar>& m) : MaskData(Matrix<Scalar>(m)) {}
  // Takes m over.
  explicit MaskData(Matrix<Scalar>&& m)
      : owned_(std::make_shared<const Matrix<Scalar>>(std::move(m))),
        data_(owned_->data()),
        rows_(owned_->rows()),
        cols_(owned_->cols()),
        present_(true) {}
  // Evaluates any other Eigen expression into an owned copy (column-major matrices, comparisons).
  template <class Derived>
  explicit MaskData(const Eigen::DenseBase<Derived>& expr) : MaskData(Matrix<Scalar>(expr)) {}
  // Copies a contiguous row-major buffer of rows x cols elements.
  MaskData(const Scalar* data, Index rows, Index cols) : MaskData(attn::view(data, rows, cols)) {
    owned_ = std::make_shared<const Matrix<Scalar>>(Eigen::Map<const Matrix<Scalar>>(data_, rows_, cols_));
    data_ = owned_->data();
  }
  // Views the caller's elements (attn::view).
  explicit MaskData(const MaskView<Scalar>& v) : data_(v.data()), rows_(v.rows()), cols_(v.cols()), present_(true) {
    require_shape(rows_ >= 0 && cols_ >= 0, "attn mask", "negative shape ", shape(rows_, cols_));
    checked_mul("attn mask", "rows * cols", rows_, cols_);
    require_arg(data_ != nullptr || rows_ == 0 || cols_ == 0, "attn mask", "null data for shape ", shape(rows_, cols_));
  }

  bool present() const { return present_; }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  // Row-major with rows packed: element (r, c) is data()[r * cols() + c].
  const Scalar* data() const { return data_; }
  Scalar operator()(Index r, Index c) const { return data_[r * cols_ + c]; }
  // Whether the elements are this mask's own (false: an attn::view of the caller's).
  bool owns_data() const { return owned_ != nullptr || !present_; }

 private:
  std::shared_ptr<const Matrix<Scalar>> owned_;
  const Scalar* data_ = nullptr;
  Index rows_ = 0, cols_ = 0;
  bool present_ = false;
};

}  // namespace detail

// A boolean mask of either polarity. Build one as AttendMask or IgnoreMask; a default-constructed
// BoolMask is "no mask".
class BoolMask {
 public:
  BoolMask() = default;
  bool empty() const { return !data_.present(); }
  Index rows() const { return data_.rows(); }
  Index cols() const { return data_.cols(); }
  // The stored value that means "may attend": true for AttendMask, false for IgnoreMask.
  bool attend_value() const { return attend_value_; }
  // Whether query row r may attend key column c.
  bool attends(Index r, Index c) const { return data_(r, c) == attend_value_; }
  const bool* data() const { return data_.data(); }
  // Whether the mask holds its own elements (false only when built from an attn::view).
  bool owns_data() const { return data_.owns_data(); }

 protected:
  BoolMask(detail::MaskData<bool> data, bool attend_value) : data_(std::move(data)), attend_value_(attend_value) {}

 private:
  detail::MaskData<bool> data_;
  bool attend_value_ = true;
};

// Built from a matrix, an Eigen expression or a buffer, a mask holds a copy of the elements (a
// temporary it takes over); from attn::view(...), it reads the caller's, which must outlive it.
template <bool TrueMeansAttend>
class PolarMask : public BoolMask {
 public:
  explicit PolarMask(const BoolMatrix& m) : BoolMask(detail::MaskData<bool>(m), TrueMeansAttend) {}
  explicit PolarMask(const MaskView<bool>& v) : BoolMask(detail::MaskData<bool>(v), TrueMeansAttend) {}
  explicit PolarMask(BoolMatrix&& m) : BoolMask(detail::MaskData<bool>(std::move(m)), TrueMeansAttend) {}
  template <class Derived>
  explicit PolarMask(const Eigen::DenseBase<Derived>& expr) : BoolMask(detail::MaskData<bool>(expr), TrueMeansAttend) {}
  PolarMask(const bool* data, Index rows, Index cols)
      : BoolMask(detail::MaskData<bool>(data, rows, cols), TrueMeansAttend) {}
};

// true = the query may attend this key (PyTorch F.scaled_dot_product_attention's bool attn_mask).
using AttendMask = PolarMask<true>;
// true = the key is masked out (PyTorch nn.MultiheadAttention's bool attn_mask and key_padding_mask).
using IgnoreMask = PolarMask<false>;

// Added to the scaled logits before the softmax; -inf masks a key out, finite values bias it.
// (PyTorch's float attn_mask.) Copies its elements, or views them when built from attn::view.
template <class T>
class AdditiveMask {
  ATTN_CHECK_SCALAR(T);

 public:
  AdditiveMask() = default;
  explicit AdditiveMask(const Matrix<T>& m) : data_(m) {}
  explicit AdditiveMask(Matrix<T>&& m) : data_(std::move(m)) {}
  template <class Derived>
  explicit AdditiveMask(const Eigen::DenseBase<Derived>& expr) : data_(expr) {}
  AdditiveMask(const T* data, Index rows, Index cols) : data_(data, rows, cols) {}
  explicit AdditiveMask(const MaskView<T>& v) : data_(v) {}  // reads the caller's elements

  bool empty() const { return !data_.present(); }
  Index rows() const { return data_.rows(); }
  Index cols() const { return data_.cols(); }
  T operator()(Index r, Index c) const { return data_(r, c); }
  const T* data() const { return data_.data(); }
  // Whether the mask holds its own elements (false only when built from an attn::view).
  bool owns_data() const { return data_.owns_data(); }

 private:
  detail::MaskData<T> data_;
};

// Every way to restrict or bias what a query attends; all of them combine (a key is attended only
// if every mask allows it, and the biases are added on top). Shapes for one sequence of L queries
// and S keys (ScaledDotProductAttention); MultiHeadAttention's B sequences and H heads in brackets.
//
// Positions, for ALiBi and the window: key j is at j, query i at a = i + S - L (bottom-right, the
// last query at the last key, as when decoding from a KV cache), or a = i under Causal::TopLeft.
// The logit of query i and key j, in this order (Gemma 2 and flash-attn's order):
//   s = scale * q_i . k_j
//   s = softcap * tanh(s / softcap)                                   if softcap > 0
//   s = -inf  unless causal, the window (|a - j| < window, or j < sink_tokens), attn_mask and
//             key_padding_mask allow j
//   s += alibi_slopes[h] * (j - a)                                     (-slope * distance when causal)
//   s += attn_bias[i, j]
// then p_j = exp(s_j) / (sum_j' exp(s_j') + exp(sinks[h])) (without sinks: the softmax).
//
//   attn::Masks<float> m;                       // Mistral: causal + window 4096; Gemma 2: + softcap 50
//   m.causal = attn::Causal::BottomRight;  m.window = 4096;  m.softcap = 50;
//   m.alibi_slopes = attn::alibi_slopes<float>(1);            // BLOOM / MPT: [H], one slope per head
template <class T>
struct Masks {
  ATTN_CHECK_SCALAR(T);

  BoolMask attn_mask;         // [L, S]  (or [B*H*L, S]: PyTorch's [B*H, L, S], index b*H + h)
  AdditiveMask<T> attn_bias;  // [L, S]  (or [B*H*L, S])
  Causal causal = Causal::None;
  BoolMask key_padding_mask;  // [1, S]  ([B, S]): per sequence, broadcast over queries and heads
  Index window = 0;           // > 0: sliding window, key j visible only if |a - j| < window
                              // (with causal: the last `window` keys up to the query, Mistral's)
  T softcap = T(0);           // > 0: logit soft-capping, softcap * tanh(s / softcap)
  Vector<T> alibi_slopes;     // [1] ([H]): ALiBi, one slope per head; empty = none
  // Attention sinks. sinks [1] ([H]): a logit per head that joins every row's softmax denominator
  // with no value (gpt-oss): the row's weights sum to less than 1, and a row with no attended key
  // is zeros. sink_tokens: the first keys [0, sink_tokens) stay visible through the window
  // (StreamingLLM's attention sinks); causal masking and the masks still apply to them.
  Vector<T> sinks;
  Index sink_tokens = 0;
  // The arithmetic of this call's Q K^T and P V (attn/precision.hpp); unset: the module's
  // (set_precision), Native unless set.
  std::optional<Precision> precision;
};

// The standard ALiBi slopes for n heads (Press et al.; BLOOM's and MPT's build_alibi_tensor):
// for n a power of two, 2^(-8 (h + 1) / n); otherwise those of the largest power of two below n,
// followed by every other slope of twice that many.
template <class T>
Vector<T> alibi_slopes(Index n) {
  const auto pow2_slopes = [](Index m) {
    Vector<double> s(m);
    for (Index h = 0; h < m; ++h) s[h] = std::pow(2.0, -8.0 * double(h + 1) / double(m));
    return s;
  };
  detail::require_arg(n > 0, "attn::alibi_slopes", "the number of heads must be positive, got ", n);
  Index closest = 1;
  while (closest * 2 <= n) closest *= 2;
  Vector<double> s(n);
  s.head(closest) = pow2_slopes(closest);
  if (closest < n) {
    const Vector<double> extra = pow2_slopes(2 * closest);
    for (Index h = 0; h < n - closest; ++h) s[closest + h] = extra[2 * h];
  }
  return s.template cast<T>();
}

}  // namespace attn
