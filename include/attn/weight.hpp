// attn/weight.hpp - a projection's weight matrix [out, in], kept in a storage type: T itself, or
// bf16, fp16 or int8 (one scale per row) at a half or a quarter of float's bytes.
//
//   attn::Weight<float> w(m, attn::Storage::BFloat16);  // m: [out, in], rounded to bf16 once
//   w.matrix();                                          // the stored values, as float
//   w.memory_bytes();                                    // out * in * 2
//
// Every projection (Linear, and the modules built on it) holds one. Activations and arithmetic stay
// in T: the kernels convert stored elements to T as they read them, and the result equals T
// arithmetic on matrix() (the stored values, dequantized): to the last bit on the GEMM path, within
// T's rounding of one product per output on the few-rows path, which multiplies int8's row scale
// into the dot product rather than into each weight. What storing loses is attn/storage.hpp's
// table: nothing for values the type represents (a bf16 checkpoint in BFloat16), at most 2^-8,
// 2^-11 or max|row| / 254 per element otherwise.
//
// Decoding reads every weight once per token, so it runs at the speed the weight's bytes stream:
// bench/linear_bench measures each type.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "attn/detail/check.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/detail/page_buffer.hpp"
#include "attn/detail/storage.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class Weight {
  ATTN_CHECK_SCALAR(T);

 public:
  // [0, 0], Native.
  Weight() = default;
  // m in storage s. Int8 needs finite values, Float16 |x| < 65520 (argument_error otherwise).
  explicit Weight(const ConstMatrixRef<T>& m, Storage s = Storage::Native) { assign(m, s, "attn::Weight"); }

  // rows * cols elements of storage s (BFloat16, Float16 or Native: not Int8, which has scales),
  // row-major at `data`, used in place: no copy. `owner` keeps them alive (a SafeTensors file's
  // mapping: attn/io/state_dict.hpp loads a BF16 or F16 tensor into a Linear kept in that type
  // this way); the caller guarantees alignment for the element type and that the bytes do not
  // change while any copy of this Weight lives.
  static Weight view(Storage s, Index n_rows, Index n_cols, const void* data,
                     const std::shared_ptr<const void>& owner) {
    detail::require_arg(s != Storage::Int8, "attn::Weight::view", "an int8 weight needs its row scales: construct it");
    detail::require_arg(n_rows >= 0 && n_cols >= 0 && (data != nullptr || n_rows * n_cols == 0), "attn::Weight::view",
                        "null data for ", detail::shape(n_rows, n_cols));
    Weight w;
    w.storage_ = s, w.rows_ = n_rows, w.cols_ = n_cols;
    w.external_ = data;
    w.owner_ = owner;
    return w;
  }
  // Whether the elements are someone else's (view()) rather than this Weight's own.
  bool is_view() const { return external_ != nullptr; }
  // The same weight owning a copy of its elements (in a buffer of its own: from 2 MiB up on
  // transparent huge pages, which a decoding step streams faster than a file's 4 KiB mapped pages).
  Weight owned_copy() const {
    Weight w = *this;
    if (!external_) return w;
    w.bytes_ = detail::PageBuffer(std::size_t(rows_ * cols_ * storage_bytes<T>(storage_)));
    if (w.bytes_.size()) std::memcpy(w.bytes_.data(), external_, w.bytes_.size());
    w.external_ = nullptr;
    w.owner_.reset();
    return w;
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  Storage storage() const { return storage_; }
  // Bytes of the elements and int8's row scales (a view's elements included, though not its own).
  std::size_t memory_bytes() const {
    return std::size_t(rows_ * cols_ * storage_bytes<T>(storage_)) + std::size_t(scales_.size()) * sizeof(T);
  }

  // The stored values as T: [rows, cols], int8 rows times their scales.
  Matrix<T> matrix() const {
    Matrix<T> m(rows_, cols_);
    detail::with_storage<T>(storage_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      for (Index r = 0; r < rows_; ++r)
        detail::dequantize(view().template row<S>(r), cols_, scales_.size() ? scales_[r] : T(1), m.row(r).data());
    });
    return m;
  }

  // Row r (0 <= r < rows(), unchecked) as T into out[0, cols): an embedding lookup.
  void row_into(Index r, T* out) const {
    detail::with_storage<T>(storage_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      detail::dequantize(view().template row<S>(r), cols_, scales_.size() ? scales_[r] : T(1), out);
    });
  }

  // New values, same shape and storage; a rejected call changes nothing.
  void set(const ConstMatrixRef<T>& m) {
    detail::require_dims("attn::Weight::set", "weight", m.rows(), m.cols(), rows_, cols_, detail::shape(rows_, cols_));
    assign(m, storage_, "attn::Weight::set");
  }
  // The same values in storage s: rounded or quantized from matrix() (from one compressed type to
  // another, the rounding is of the stored values, not of values that are gone).
  void set_storage(Storage s) {
    if (s != storage_) assign(matrix(), s, "attn::Weight::set_storage");
  }

  // What the kernels read.
  detail::WeightView<T> view() const {
    detail::WeightView<T> v;
    v.storage = storage_;
    v.data = external_ ? external_ : bytes_.data();
    v.rows = rows_, v.cols = cols_, v.stride = cols_;
    v.scales = scales_.size() ? scales_.data() : nullptr;
    return v;
  }

 private:
  void assign(const ConstMatrixRef<T>& m, Storage s, const char* where) {
    detail::check_storable(s, m, where, "weight", "weight");
    const Index n_rows = m.rows(), n_cols = m.cols();
    detail::PageBuffer bytes(std::size_t(detail::checked_mul(where, "rows * cols", n_rows, n_cols)) *
                             std::size_t(storage_bytes<T>(s)));
    Vector<T> scales(s == Storage::Int8 ? n_rows : 0);
    detail::with_storage<T>(s, [&](auto tag) {
      using S = typename decltype(tag)::type;
      S* const dst = reinterpret_cast<S*>(bytes.data());
      for (Index r = 0; r < n_rows; ++r) {
        const T scale = detail::store_row(m.row(r).data(), n_cols, dst + r * n_cols);
        if (s == Storage::Int8) scales[r] = scale;
      }
    });
    bytes_ = std::move(bytes);
    scales_ = std::move(scales);
    external_ = nullptr;
    owner_.reset();
    storage_ = s, rows_ = n_rows, cols_ = n_cols;
  }

  Storage storage_ = Storage::Native;
  Index rows_ = 0, cols_ = 0;
  detail::PageBuffer bytes_;           // [rows, cols] in the storage type, row-major
  Vector<T> scales_;                   // Int8: [rows]
  const void* external_ = nullptr;     // a view's elements, instead of bytes_
  std::shared_ptr<const void> owner_;  // what keeps them alive
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(Weight);
