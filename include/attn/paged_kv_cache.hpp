// attn/paged_kv_cache.hpp - keys and values of many sequences in fixed-size pages from one pool.
//
// A server's sequences come and go, each of its own length. KVCache gives every sequence a fixed
// capacity up front; PagedKVCache gives it pages of `page_size` positions from one pool, taken as
// it grows and returned when it ends, so memory follows the tokens actually held (vLLM's paged
// attention). Sequences can share a prefix - a system prompt - by sharing its pages: fork() makes
// a sequence that holds the same pages, counted by reference, and the page a sequence would write
// into while another still holds it is copied first (copy-on-write), so sharing never changes what
// a sequence attends.
//
//   attn::PagedKVCache<float> cache(attn::KVStorage::BFloat16, /*kv_heads=*/8, /*head_dim=*/128,
//                                   /*page_size=*/256, /*num_pages=*/1024);
//   attn::Index a = cache.add_sequence();
//   cache.append(a, k, v);                   // k, v [L, kv_heads*head_dim]: pages taken as needed
//   attn::Index b = cache.fork(a);           // shares a's pages
//   gqa.forward_varlen(q, cache, ids, cu);   // attention through the page tables
//   cache.free(a);                           // pages no other sequence holds go back to the pool
//
// Storage as KVCache's (attn/kv_storage.hpp): Native, bf16, fp16 or int8 with a scale per row.
// A page holds every kv head's page_size rows: [kv_heads, page_size, head_dim] for K (value_dim
// for V), so a decoding step streams a page's rows of one head contiguously, and the page is the
// kernels' unit of contiguous keys. An append that needs more pages than are free throws and
// changes nothing.
//
// A sliding window (set_window; Mistral's, and with sink tokens StreamingLLM's) bounds what a
// sequence holds: each append first returns the pages wholly behind what its queries can see,
// except those holding sink tokens, so an endless generation holds about window + sink_tokens +
// one append's positions. A released position's table entry names one shared page of zeros that
// is never written (num_pages(): the kernels may read it, and mask all of it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "attn/detail/attention_problem.hpp"
#include "attn/detail/check.hpp"
#include "attn/detail/page_buffer.hpp"
#include "attn/detail/storage.hpp"
#include "attn/kv_storage.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class PagedKVCache {
  ATTN_CHECK_SCALAR(T);

 public:
  // A pool of num_pages pages of page_size positions, each holding kv_heads heads of keys of
  // head_dim features and values of value_dim (0: head_dim), stored as `storage`.
  PagedKVCache(KVStorage storage, Index kv_heads, Index head_dim, Index page_size, Index num_pages,
               Index value_dim = 0)
      : storage_(storage),
        Hkv_(kv_heads),
        D_(head_dim),
        Dv_(value_dim > 0 ? value_dim : head_dim),
        P_(page_size),
        pages_(num_pages) {
    const char* where = "attn::PagedKVCache";
    detail::require_arg(storage == KVStorage::Native || storage == KVStorage::BFloat16 ||
                            storage == KVStorage::Float16 || storage == KVStorage::Int8,
                        where, "storage ", int(storage), " is not a KVStorage");
    detail::require_shape(kv_heads > 0 && head_dim > 0 && value_dim >= 0, where, "kv_heads = ", kv_heads,
                          ", head_dim = ", head_dim, " must be positive and value_dim = ", value_dim, " >= 0");
    detail::require_arg(page_size > 0 && num_pages > 0 && num_pages < std::numeric_limits<Index>::max(), where,
                        "page_size = ", page_size, " and num_pages = ", num_pages, " must be positive");
    // The pool, and after it the page of zeros that released positions read.
    const Index rows = detail::checked_mul(where, "(num_pages + 1) * kv_heads * page_size",
                                           detail::checked_mul(where, "(num_pages + 1) * kv_heads", pages_ + 1, Hkv_), P_);
    detail::checked_mul(where, "pool bytes", detail::checked_mul(where, "rows * dim", rows, std::max(D_, Dv_)),
                        storage_bytes<T>(storage_));
    k_ = detail::PageBuffer(static_cast<std::size_t>(rows * D_ * storage_bytes<T>(storage_)));
    v_ = detail::PageBuffer(static_cast<std::size_t>(rows * Dv_ * storage_bytes<T>(storage_)));
    if (storage_ == KVStorage::Int8) {
      k_scale_.assign(static_cast<std::size_t>(rows), T(0));
      v_scale_.assign(static_cast<std::size_t>(rows), T(0));
    }
    refs_.assign(static_cast<std::size_t>(pages_), 0);
    for (Index g = pages_ - 1; g >= 0; --g) free_.push_back(g);  // page 0 is taken first
  }

  // A sliding window over every sequence: attention through this cache sees at most the last
  // `window` positions of a sequence, and its first `sink_tokens` (CacheArgs may narrow both), and
  // an append first releases the pages behind what its own queries can see (positions before
  // size - window + 1) that hold no sink token. Set before any sequence exists. window 0 (the
  // default) keeps every position.
  void set_window(Index window, Index sink_tokens = 0) {
    const char* where = "attn::PagedKVCache::set_window";
    detail::require_arg(window >= 0 && sink_tokens >= 0 && (window > 0 || sink_tokens == 0), where, "window = ", window,
                        " and sink_tokens = ", sink_tokens, " must be >= 0, and sink tokens need a window");
    detail::require_arg(std::none_of(seqs_.begin(), seqs_.end(), [](const Sequence& q) { return q.live; }), where,
                        "the window is set before any sequence is added");
    W_ = window, sinks_ = sink_tokens;
  }
  Index window() const { return W_; }  // 0: every position is kept
  Index sink_tokens() const { return sinks_; }

  // A new empty sequence; its id (the id of an ended sequence is used again).
  Index add_sequence() {
    Sequence s;
    s.live = true;
    return place(std::move(s));
  }

  // A new sequence holding the same positions as sequence `seq`, sharing its pages (none is
  // copied until one of the two would write into a shared page).
  Index fork(Index seq) {
    const Sequence& from = live(seq, "attn::PagedKVCache::fork");
    Sequence s = from;  // (a copy before place(), which may move the sequences)
    for (const Index g : s.pages)
      if (g != zero_page()) ++refs_[std::size_t(g)];
    return place(std::move(s));
  }

  // Ends sequence `seq`: the pages no other sequence holds return to the pool.
  void free(Index seq) {
    Sequence& s = live(seq, "attn::PagedKVCache::free");
    for (const Index g : s.pages)
      if (g != zero_page()) release(g);
    s = Sequence{};
  }

  // Appends the keys and values of sequence seq's next L positions: k [L, kv_heads*head_dim],
  // v [L, kv_heads*value_dim]. Under a window, first releases the pages its queries cannot see;
  // then takes the pages they need (and a copy of a shared last page it writes into). When the
  // pool has too few free pages it throws and nothing changes.
  void append(Index seq, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v) {
    const char* where = "attn::PagedKVCache::append";
    Sequence& s = live(seq, where);
    const Index L = k.rows();
    detail::require_dims(where, "key", k.rows(), k.cols(), -1, Hkv_ * D_, "[L, kv_heads*head_dim] = [L, ", Hkv_, "*",
                         D_, "]");
    detail::require_dims(where, "value", v.rows(), v.cols(), L, Hkv_ * Dv_, "[L, kv_heads*value_dim] = ",
                         detail::shape(L, Hkv_ * Dv_), " (L = ", L, " from key)");
    detail::check_storable<T>(storage_, k, where, "key", "cache");
    detail::check_storable<T>(storage_, v, where, "value", "cache");
    const Index have = Index(s.pages.size()), need = (s.size + L + P_ - 1) / P_;
    const Index lo = std::max(s.released, (sinks_ + P_ - 1) / P_), hi = released_below(s.size);
    Index returning = 0;  // of the pages released now, those no other sequence holds
    for (Index x = lo; x < hi; ++x) returning += refs_[std::size_t(s.pages[std::size_t(x)])] == 1 ? 1 : 0;
    const bool copy = L > 0 && s.size % P_ != 0 && refs_[std::size_t(s.pages.back())] > 1;  // copy-on-write
    const Index take = need - have + (copy ? 1 : 0);
    detail::require_arg(take <= Index(free_.size()) + returning, where, "out of pages: sequence ", seq, " (", s.size,
                        " positions) needs ", take, " more pages of ", P_, " positions for ", L, " more, and ",
                        free_.size(), " of ", pages_, " are free", returning > 0 ? " (with those it releases)" : "");
    for (Index x = lo; x < hi; ++x) {
      release(s.pages[std::size_t(x)]);
      s.pages[std::size_t(x)] = zero_page();
    }
    if (hi > lo) s.released = hi;
    if (copy) {
      const Index g = take_page(), old = s.pages.back();
      copy_page(old, g);
      release(old);
      s.pages.back() = g;
    }
    while (Index(s.pages.size()) < need) s.pages.push_back(take_page());
    for (Index r = 0; r < L; ++r, ++s.size) {
      const Index g = s.pages[std::size_t(s.size / P_)], row = s.size % P_;
      for (Index h = 0; h < Hkv_; ++h) {
        store(false, g, h, row, k.row(r).data() + h * D_);
        store(true, g, h, row, v.row(r).data() + h * Dv_);
      }
    }
  }

  // Positions sequence seq has appended, and its page table (page ids, in position order;
  // num_pages() for the pages a window released).
  Index size(Index seq) const { return live(seq, "attn::PagedKVCache::size").size; }
  // The first position past the sink tokens' pages that the sequence still holds: positions from
  // here on are all held (0 until a window released a page).
  Index first_kept(Index seq) const {
    const Sequence& s = live(seq, "attn::PagedKVCache::first_kept");
    return s.released * P_;
  }
  const std::vector<Index>& pages(Index seq) const { return live(seq, "attn::PagedKVCache::pages").pages; }
  bool is_live(Index seq) const { return seq >= 0 && seq < Index(seqs_.size()) && seqs_[std::size_t(seq)].live; }
  // How many sequences hold page g (0: free).
  Index page_refs(Index g) const {
    detail::require_arg(g >= 0 && g < pages_, "attn::PagedKVCache::page_refs", "page ", g, " is outside [0, ",
                        pages_, ")");
    return refs_[std::size_t(g)];
  }
  Index free_pages() const { return Index(free_.size()); }
  Index num_pages() const { return pages_; }
  Index page_size() const { return P_; }
  Index kv_heads() const { return Hkv_; }
  Index head_dim() const { return D_; }
  Index value_dim() const { return Dv_; }
  KVStorage storage() const { return storage_; }
  // Bytes one page holds (K, V and int8's scales of every kv head), and the cache's: the pool
  // and the page of zeros.
  Index bytes_per_page() const {
    return P_ * Hkv_ * ((D_ + Dv_) * storage_bytes<T>(storage_) + (storage_ == KVStorage::Int8 ? 2 * Index(sizeof(T)) : 0));
  }
  Index memory_bytes() const { return (pages_ + 1) * bytes_per_page(); }

  // Keys or values of kv head h of sequence seq as T: [size(seq), head_dim] (value_dim), in
  // position order (a copy, converted back from a compressed storage type; zeros where a window
  // released the page).
  Matrix<T> keys(Index seq, Index h) const { return head_matrix(false, seq, h, "attn::PagedKVCache::keys"); }
  Matrix<T> values(Index seq, Index h) const { return head_matrix(true, seq, h, "attn::PagedKVCache::values"); }

  // For the attention kernels: points p's K and V at sequence seq's pages.
  void bind(detail::AttentionProblem<T>& p, Index seq) const {
    const Sequence& s = live(seq, "attn::PagedKVCache::bind");
    p.k = {nullptr, 0, P_ * D_, D_};
    p.v = {nullptr, 0, P_ * Dv_, Dv_};
    p.kv_storage = storage_;
    if (storage_ == KVStorage::Native) {
      p.k.data = reinterpret_cast<const T*>(k_.data()), p.v.data = reinterpret_cast<const T*>(v_.data());
    } else {
      p.k_stored = k_.data(), p.v_stored = v_.data();
    }
    if (storage_ == KVStorage::Int8) {
      p.k_scale = {k_scale_.data(), 0, P_, 1};
      p.v_scale = {v_scale_.data(), 0, P_, 1};
    }
    p.page_table = s.pages.data();
    p.page_size = P_;
    p.k_page_stride = Hkv_ * P_ * D_;
    p.v_page_stride = Hkv_ * P_ * Dv_;
    p.scale_page_stride = Hkv_ * P_;
  }

 private:
  struct Sequence {
    bool live = false;
    Index size = 0;
    std::vector<Index> pages;
    Index released = 0;  // pages [sink pages, released) of the table were released by the window
  };

  // The page id released positions read: the page of zeros after the pool.
  Index zero_page() const { return pages_; }
  // Under the window, the pages before this one (in table order) hold only positions that the
  // queries of an append at position t cannot see: they end at or before t - window + 1.
  Index released_below(Index t) const { return W_ > 0 ? std::max<Index>(0, t - W_ + 1) / P_ : 0; }

  const Sequence& live(Index seq, const char* where) const {
    detail::require_arg(is_live(seq), where, "sequence ", seq, " is not a live sequence of this cache");
    return seqs_[std::size_t(seq)];
  }
  Sequence& live(Index seq, const char* where) {
    detail::require_arg(is_live(seq), where, "sequence ", seq, " is not a live sequence of this cache");
    return seqs_[std::size_t(seq)];
  }
  Index place(Sequence s) {
    for (std::size_t i = 0; i < seqs_.size(); ++i)
      if (!seqs_[i].live) {
        seqs_[i] = std::move(s);
        return Index(i);
      }
    seqs_.push_back(std::move(s));
    return Index(seqs_.size()) - 1;
  }
  Index take_page() {
    const Index g = free_.back();
    free_.pop_back();
    refs_[std::size_t(g)] = 1;
    return g;
  }
  void release(Index g) {
    if (--refs_[std::size_t(g)] == 0) free_.push_back(g);
  }

  // Row `row` of kv head h of page g, K or V: its first element's index in the pool.
  Index element(bool value, Index g, Index h, Index row) const { return ((g * Hkv_ + h) * P_ + row) * (value ? Dv_ : D_); }

  void store(bool value, Index g, Index h, Index row, const T* src) {
    const Index dim = value ? Dv_ : D_;
    detail::PageBuffer& buf = value ? v_ : k_;
    detail::with_storage<T>(storage_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      const T scale = detail::store_row(src, dim, reinterpret_cast<S*>(buf.data()) + element(value, g, h, row));
      if constexpr (std::is_same_v<S, std::int8_t>) (value ? v_scale_ : k_scale_)[std::size_t((g * Hkv_ + h) * P_ + row)] = scale;
    });
  }

  // Page `to` becomes a copy of page `from` (keys, values, scales).
  void copy_page(Index from, Index to) {
    const Index bytes = storage_bytes<T>(storage_);
    for (const bool value : {false, true}) {
      detail::PageBuffer& buf = value ? v_ : k_;
      const Index n = Hkv_ * P_ * (value ? Dv_ : D_) * bytes;
      std::copy(buf.data() + from * n, buf.data() + (from + 1) * n, buf.data() + to * n);
      if (storage_ == KVStorage::Int8) {
        T* const sc = (value ? v_scale_ : k_scale_).data();
        std::copy(sc + from * Hkv_ * P_, sc + (from + 1) * Hkv_ * P_, sc + to * Hkv_ * P_);
      }
    }
  }

  Matrix<T> head_matrix(bool value, Index seq, Index h, const char* where) const {
    const Sequence& s = live(seq, where);
    detail::require_arg(h >= 0 && h < Hkv_, where, "kv head ", h, " is outside [0, ", Hkv_, ")");
    detail::AttentionProblem<T> p;
    bind(p, seq);
    p.d = D_, p.dv = Dv_;
    Matrix<T> out(s.size, value ? Dv_ : D_);
    detail::convert_rows(p, value, 0, h, 0, out.rows(), out.data(), out.cols());
    return out;
  }

  KVStorage storage_ = KVStorage::Native;
  Index Hkv_ = 0, D_ = 0, Dv_ = 0, P_ = 0, pages_ = 0;
  Index W_ = 0, sinks_ = 0;           // set_window
  detail::PageBuffer k_, v_;          // [num_pages + 1, kv_heads, page_size, dim] in the storage type
  std::vector<T> k_scale_, v_scale_;  // int8: [num_pages + 1, kv_heads, page_size]
  std::vector<Index> refs_;           // sequences holding each page
  std::vector<Index> free_;           // free pages, the next one taken at the back
  std::vector<Sequence> seqs_;
};

}  // namespace attn
