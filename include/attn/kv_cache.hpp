// attn/kv_cache.hpp - the keys and values of the tokens a decoder has already seen.
//
// Autoregressive decoding computes each token's keys and values once and keeps them: a step
// appends one row per sequence and attends the new query against everything kept. KVCache holds
// one layer's K and V for a batch of sequences, with all memory allocated up front (appending never
// allocates), in one of two modes:
//
//   attn::KVCache<float> cache(/*batch=*/1, /*kv_heads=*/8, /*head_dim=*/128, /*capacity=*/4096);
//   cache.append(0, k, v);          // sequence 0: k, v [L, kv_heads*head_dim], the next L positions
//   // ... attention against it: GroupedQueryAttention::forward(q, cache, b), or DecoderAttention
//
//   attn::KVCache<float> ring(1, 8, 128, /*capacity=*/4096 + 511, /*window=*/4096);  // Mistral
//
//   attn::KVCache<float> small(attn::KVStorage::BFloat16, 1, 8, 128, 4096);  // half the bytes
//
// Storage (attn/kv_storage.hpp): keys and values are kept in T (Native, the default), or rounded
// on append to bf16 or fp16, or quantized to int8 with one scale per row (position and kv head).
// A decoding step streams the whole cache, so its time follows bytes_per_token(); attention still
// computes in T (the error bound per type is in kv_storage.hpp).
//
// * Full (window = 0): sequence b holds positions [0, size(b)), at most `capacity` of them;
//   appending past the capacity throws, and the cache is left as it was.
// * Sliding window (window = W > 0): a ring that keeps the last `capacity` positions of an endless
//   sequence, and attention against it sees, for a query at position a, the keys at positions
//   (a - W, a]. An append of n rows needs the W - 1 positions before the first of them, so n can be
//   at most capacity - W + 1 (max_append()); split a long prompt into chunks of that size.
//
// Layout: [batch, kv_heads, rows, head_dim] for K (value_dim for V), each head's positions
// consecutive: a decoding step streams each head's keys from contiguous memory (what the decode
// kernel is bound by), and K/V heads are shared by query-head groups in place (GQA), never copied.
//
// The ring is written twice: position t goes to rows t % C and t % C + C of a 2C-row buffer, so the
// last C positions are always the contiguous rows [s, s + C) with s = (size - C) % C, in position
// order. Attention then reads them as an ordinary key range - no wrap-around in any kernel - for
// the price of a second copy of each appended row and twice the memory of the window.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attn/detail/attention_problem.hpp"
#include "attn/detail/check.hpp"
#include "attn/detail/page_buffer.hpp"
#include "attn/detail/storage.hpp"
#include "attn/kv_storage.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class KVCache {
  ATTN_CHECK_SCALAR(T);

 public:
  // batch sequences of kv_heads heads; keys of head_dim features, values of value_dim (0: head_dim).
  // window = 0: every position is kept, at most capacity per sequence. window > 0: the last
  // capacity positions are kept (capacity >= window) and attention sees the last `window`.
  KVCache(Index batch, Index kv_heads, Index head_dim, Index capacity, Index window = 0, Index value_dim = 0)
      : KVCache(KVStorage::Native, batch, kv_heads, head_dim, capacity, window, value_dim) {}

  // The same, keys and values stored as `storage` (Native: T).
  KVCache(KVStorage storage, Index batch, Index kv_heads, Index head_dim, Index capacity, Index window = 0,
          Index value_dim = 0)
      : storage_(storage),
        B_(batch),
        Hkv_(kv_heads),
        D_(head_dim),
        Dv_(value_dim > 0 ? value_dim : head_dim),
        C_(capacity),
        W_(window) {
    const char* where = "attn::KVCache";
    detail::require_arg(storage == KVStorage::Native || storage == KVStorage::BFloat16 ||
                            storage == KVStorage::Float16 || storage == KVStorage::Int8,
                        where, "storage ", int(storage), " is not a KVStorage");
    detail::require_shape(batch > 0 && kv_heads > 0 && head_dim > 0 && value_dim >= 0, where, "batch = ", batch,
                          ", kv_heads = ", kv_heads, ", head_dim = ", head_dim, " must be positive and value_dim = ",
                          value_dim, " >= 0");
    detail::require_arg(capacity > 0, where, "capacity must be positive, got ", capacity);
    detail::require_arg(window >= 0 && window <= capacity, where, "window = ", window,
                        " must be >= 0 (0: keep every position) and at most capacity = ", capacity);
    // [B, Hkv, rows, max(D, Dv)] elements, each product checked: never a wrapped-around size.
    rows_ = detail::checked_mul(where, "rows per head (2 * capacity for a ring)", W_ > 0 ? 2 : 1, C_);
    const Index heads_rows =
        detail::checked_mul(where, "batch * kv_heads * rows", detail::checked_mul(where, "batch * kv_heads", B_, Hkv_), rows_);
    detail::checked_mul(where, "batch * kv_heads * rows * dim * bytes",
                        detail::checked_mul(where, "batch * kv_heads * rows * dim", heads_rows, std::max(D_, Dv_)),
                        storage_bytes<T>(storage_));
    const auto bytes = [&](Index dim) { return static_cast<std::size_t>(heads_rows * dim * storage_bytes<T>(storage_)); };
    k_ = detail::PageBuffer(bytes(D_));
    v_ = detail::PageBuffer(bytes(Dv_));
    if (storage_ == KVStorage::Int8) {
      k_scale_.assign(static_cast<std::size_t>(heads_rows), T(0));
      v_scale_.assign(static_cast<std::size_t>(heads_rows), T(0));
    }
    size_.assign(static_cast<std::size_t>(B_), 0);
  }

  // Appends the keys and values of sequence b's next L positions: k [L, kv_heads*head_dim],
  // v [L, kv_heads*value_dim] (head h in columns [h*head_dim, (h+1)*head_dim), as k_proj writes
  // them). Throws, leaving the cache unchanged, if L exceeds max_append(b).
  void append(Index b, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v) {
    const char* where = "attn::KVCache::append";
    detail::require_arg(b >= 0 && b < B_, where, "sequence ", b, " is outside the batch [0, ", B_, ")");
    check_rows(where, k, v, k.rows());
    check_room(where, b, k.rows());
    check_values(where, k, v);
    write(b, k, v, 0, k.rows());
  }

  // Appends L positions to every sequence at once: k [B*L, kv_heads*head_dim], rows of sequence b
  // in [b*L, (b+1)*L) (a contiguous [B, L, ...] tensor), v likewise.
  void append(const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v) {
    const char* where = "attn::KVCache::append";
    detail::require_shape(k.rows() % B_ == 0, where, "key has ", k.rows(), " rows, expected [B*L, ...] with B = ", B_);
    const Index L = k.rows() / B_;
    check_rows(where, k, v, k.rows());
    for (Index b = 0; b < B_; ++b) check_room(where, b, L);  // all checks before any write
    check_values(where, k, v);
    for (Index b = 0; b < B_; ++b) write(b, k, v, b * L, L);
  }

  // The most rows sequence b can take in one append: capacity - size in a full cache, and
  // capacity - window + 1 in a ring (the first new query must still see its window - 1 predecessors).
  Index max_append(Index b) const {
    check_b("attn::KVCache::max_append", b);
    return W_ > 0 ? C_ - W_ + 1 : C_ - size_[std::size_t(b)];
  }

  // Positions appended to sequence b so far (its length: the position of its next token).
  Index size(Index b) const {
    check_b("attn::KVCache::size", b);
    return size_[std::size_t(b)];
  }
  // Positions sequence b keeps: size(b) in a full cache; the last min(size(b), capacity) in a ring.
  Index kept(Index b) const { return std::min(size(b), C_); }
  // The position of the first kept row of sequence b.
  Index first_kept(Index b) const { return size(b) - kept(b); }

  // Keys or values of kv head h of sequence b as T: [kept(b), head_dim] (value_dim), rows in
  // position order starting at first_kept(b); what attention reads (a copy: the stored values,
  // converted back from a compressed storage type).
  Matrix<T> keys(Index b, Index h) const { return head_matrix(false, b, h, "attn::KVCache::keys"); }
  Matrix<T> values(Index b, Index h) const { return head_matrix(true, b, h, "attn::KVCache::values"); }

  // Forgets every sequence (or only sequence b): its size goes back to 0. No memory is released.
  void clear() { std::fill(size_.begin(), size_.end(), Index(0)); }
  void clear(Index b) {
    check_b("attn::KVCache::clear", b);
    size_[std::size_t(b)] = 0;
  }

  Index batch() const { return B_; }
  Index kv_heads() const { return Hkv_; }
  Index head_dim() const { return D_; }
  Index value_dim() const { return Dv_; }
  Index capacity() const { return C_; }
  Index window() const { return W_; }  // 0: a full cache

  // How keys and values are stored, and the bytes one position of one sequence takes: K and V of
  // every kv head, plus int8's two scales per head (a ring stores each position twice).
  KVStorage storage() const { return storage_; }
  Index bytes_per_token() const {
    return Hkv_ * (D_ + Dv_) * storage_bytes<T>(storage_) +
           (storage_ == KVStorage::Int8 ? 2 * Hkv_ * Index(sizeof(T)) : 0);
  }
  // Bytes held for keys, values and scales: batch * rows * bytes_per_token().
  Index memory_bytes() const {
    return Index(k_.size() + v_.size() + (k_scale_.size() + v_scale_.size()) * sizeof(T));
  }

  // For the attention kernels: points p's K and V at sequences [b0, ..) of this cache, from their
  // first kept row, with the strides of the [batch, kv_heads, rows, dim] layout. Sequences of
  // equal size start at the same row, so one batch stride covers them all.
  void bind(detail::AttentionProblem<T>& p, Index b0) const {
    check_b("attn::KVCache::bind", b0);
    const Index first = W_ > 0 ? first_kept(b0) % C_ : 0;
    p.k = {nullptr, Hkv_ * rows_ * D_, rows_ * D_, D_};
    p.v = {nullptr, Hkv_ * rows_ * Dv_, rows_ * Dv_, Dv_};
    p.kv_storage = storage_;
    const Index at = b0 * Hkv_ * rows_ + first, bytes = storage_bytes<T>(storage_);
    const void* k = k_.data() + at * D_ * bytes;
    const void* v = v_.data() + at * Dv_ * bytes;
    if (storage_ == KVStorage::Native) {
      p.k.data = static_cast<const T*>(k), p.v.data = static_cast<const T*>(v);
    } else {
      p.k_stored = k, p.v_stored = v;
    }
    if (storage_ == KVStorage::Int8) {
      p.k_scale = {k_scale_.data() + at, Hkv_ * rows_, rows_, 1};
      p.v_scale = {v_scale_.data() + at, Hkv_ * rows_, rows_, 1};
    }
  }
  Index rows_per_head() const { return rows_; }

 private:
  void check_b(const char* where, Index b) const {
    detail::require_arg(b >= 0 && b < B_, where, "sequence ", b, " is outside the batch [0, ", B_, ")");
  }
  void check_rows(const char* where, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, Index rows) const {
    detail::require_dims(where, "key", k.rows(), k.cols(), -1, Hkv_ * D_, "[L, kv_heads*head_dim] = [L, ", Hkv_, "*",
                         D_, "]");
    detail::require_dims(where, "value", v.rows(), v.cols(), rows, Hkv_ * Dv_, "[L, kv_heads*value_dim] = ",
                         detail::shape(rows, Hkv_ * Dv_), " (L = ", rows, " from key)");
  }
  void check_room(const char* where, Index b, Index L) const {
    const Index n = size_[std::size_t(b)];
    if (W_ > 0)
      detail::require_arg(L <= C_ - W_ + 1, where, "appending ", L, " rows to sequence ", b,
                          " of a sliding-window cache (capacity ", C_, ", window ", W_, "): at most capacity - window",
                          " + 1 = ", C_ - W_ + 1, " rows per append; split the prompt or raise the capacity");
    else
      detail::require_arg(L <= C_ - n, where, "sequence ", b, " holds ", n, " of ", C_, " positions; appending ", L,
                          " more would exceed the capacity");
  }

  void check_values(const char* where, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v) const {
    detail::check_storable(storage_, k, where, "key", "cache");
    detail::check_storable(storage_, v, where, "value", "cache");
  }

  // Row of position t in a head's buffer (the first copy in a ring).
  Index slot(Index t) const { return W_ > 0 ? t % C_ : t; }

  void write(Index b, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, Index row0, Index L) {
    Index& n = size_[std::size_t(b)];
    for (Index r = 0; r < L; ++r, ++n) {
      const Index s = slot(n);
      for (Index h = 0; h < Hkv_; ++h) {
        copy_row(false, b, h, s, k.row(row0 + r).data() + h * D_);
        copy_row(true, b, h, s, v.row(row0 + r).data() + h * Dv_);
      }
    }
  }
  // Stores row src[0, dim) of kv head h of sequence b at slot s (and s + C, the ring's second copy).
  void copy_row(bool value, Index b, Index h, Index s, const T* src) {
    const Index dim = value ? Dv_ : D_;
    detail::PageBuffer& buf = value ? v_ : k_;
    const Index row = (b * Hkv_ + h) * rows_ + s;
    detail::with_storage<T>(storage_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      S* const dst = reinterpret_cast<S*>(buf.data()) + row * dim;
      const T scale = detail::store_row(src, dim, dst);
      std::vector<T>& scales = value ? v_scale_ : k_scale_;
      if constexpr (std::is_same_v<S, std::int8_t>) scales[std::size_t(row)] = scale;
      if (W_ > 0) {  // the ring's second copy, C rows on
        std::copy(dst, dst + dim, dst + C_ * dim);
        if constexpr (std::is_same_v<S, std::int8_t>) scales[std::size_t(row + C_)] = scale;
      }
    });
  }

  Matrix<T> head_matrix(bool value, Index b, Index h, const char* where) const {
    check_b(where, b);
    detail::require_arg(h >= 0 && h < Hkv_, where, "kv head ", h, " is outside [0, ", Hkv_, ")");
    detail::AttentionProblem<T> p;
    bind(p, b);
    p.d = D_, p.dv = Dv_;
    Matrix<T> out(kept(b), value ? Dv_ : D_);
    detail::convert_rows(p, value, 0, h, 0, out.rows(), out.data(), out.cols());  // Native: a copy
    return out;
  }

  KVStorage storage_ = KVStorage::Native;
  Index B_ = 0, Hkv_ = 0, D_ = 0, Dv_ = 0, C_ = 0, W_ = 0;
  Index rows_ = 0;            // rows per head: C, or 2C for the ring
  detail::PageBuffer k_, v_;  // [B, Hkv, rows, D] and [B, Hkv, rows, Dv], in the storage type
  std::vector<T> k_scale_, v_scale_;  // int8: [B, Hkv, rows], each row's scale
  std::vector<Index> size_;   // positions appended per sequence
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(KVCache);
