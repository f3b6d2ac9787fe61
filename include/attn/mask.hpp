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
#pragma once

#include <memory>
#include <utility>

#include "attn/detail/check.hpp"
#include "attn/types.hpp"

namespace attn {

// Causal masking, with the alignment stated. With L queries and S keys:
//   TopLeft:     query i sees keys j <= i          (PyTorch SDPA is_causal, even when L != S)
//   BottomRight: query i sees keys j <= i + S - L  (the last query sees every key: KV caches,
//                                                   PyTorch 2.x causal_lower_right)
// The two agree when L == S.
enum class Causal { None, TopLeft, BottomRight };

namespace detail {

// The elements of a mask: a view over the caller's row-major buffer, or a copy this object keeps
// alive (shared between copies, so a mask may be copied freely).
template <class Scalar>
class MaskData {
 public:
  MaskData() = default;
  // Views m: m must outlive every call that uses the mask.
  explicit MaskData(const Matrix<Scalar>& m) : data_(m.data()), rows_(m.rows()), cols_(m.cols()), present_(true) {}
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
  // Views a contiguous row-major buffer of rows x cols elements (a torch or numpy tensor).
  MaskData(const Scalar* data, Index rows, Index cols) : data_(data), rows_(rows), cols_(cols), present_(true) {
    require_shape(rows >= 0 && cols >= 0, "attn mask", "negative shape ", shape(rows, cols));
    require_arg(data != nullptr || rows * cols == 0, "attn mask", "null data for shape ", shape(rows, cols));
  }

  bool present() const { return present_; }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  // Row-major with rows packed: element (r, c) is data()[r * cols() + c].
  const Scalar* data() const { return data_; }
  Scalar operator()(Index r, Index c) const { return data_[r * cols_ + c]; }

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

 protected:
  BoolMask(detail::MaskData<bool> data, bool attend_value) : data_(std::move(data)), attend_value_(attend_value) {}

 private:
  detail::MaskData<bool> data_;
  bool attend_value_ = true;
};

template <bool TrueMeansAttend>
class PolarMask : public BoolMask {
 public:
  explicit PolarMask(const BoolMatrix& m) : BoolMask(detail::MaskData<bool>(m), TrueMeansAttend) {}
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
// (PyTorch's float attn_mask.)
template <class T>
class AdditiveMask {
 public:
  AdditiveMask() = default;
  explicit AdditiveMask(const Matrix<T>& m) : data_(m) {}
  explicit AdditiveMask(Matrix<T>&& m) : data_(std::move(m)) {}
  template <class Derived>
  explicit AdditiveMask(const Eigen::DenseBase<Derived>& expr) : data_(expr) {}
  AdditiveMask(const T* data, Index rows, Index cols) : data_(data, rows, cols) {}

  bool empty() const { return !data_.present(); }
  Index rows() const { return data_.rows(); }
  Index cols() const { return data_.cols(); }
  T operator()(Index r, Index c) const { return data_(r, c); }
  const T* data() const { return data_.data(); }

 private:
  detail::MaskData<T> data_;
};

// Every way to restrict or bias what a query attends; all of them combine (a key is attended only
// if every mask allows it, and the bias is added on top). Shapes for one sequence of L queries and
// S keys (ScaledDotProductAttention); MultiHeadAttention's B sequences and H heads in brackets.
template <class T>
struct Masks {
  BoolMask attn_mask;         // [L, S]  (or [B*H*L, S]: PyTorch's [B*H, L, S], index b*H + h)
  AdditiveMask<T> attn_bias;  // [L, S]  (or [B*H*L, S])
  Causal causal = Causal::None;
  BoolMask key_padding_mask;  // [1, S]  ([B, S]): per sequence, broadcast over queries and heads
};

}  // namespace attn
