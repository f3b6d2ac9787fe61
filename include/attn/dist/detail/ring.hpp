// attn/dist/detail/ring.hpp - one rank's side of ring attention, without MPI: packing the rank's
// keys and values into the block that travels, and attending one arriving block and merging it
// into the rank's running result. attn/dist/context_parallel.hpp moves the blocks over MPI; a
// test can move them in one process.
//
// A block holds one rank's n rows per sequence of every sequence, in the storage type they travel
// in, laid out as a KVCache's ([B, H_kv, n, d]: each head's rows contiguous), 64-byte aligned parts:
//   K [B, H_kv, n, d]  V [B, H_kv, n, dv]  (elements of the storage type)
//   int8 only: K scales [B, H_kv, n], V scales [B, H_kv, n] (T)
//   with key padding: [B, n] bools (the rank's keys' entries: they travel with the keys)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attn/detail/attention.hpp"
#include "attn/detail/storage.hpp"
#include "attn/dist/sharding.hpp"
#include "attn/mask.hpp"
#include "attn/merge.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn::dist::detail {

// What every rank's call shares.
struct RingShape {
  Index batch = 0, heads = 0, kv_heads = 0, d = 0, dv = 0;
  Storage storage = Storage::Native;
  bool key_padding = false;
};

// A block is stored as cache lines, so that its parts (at multiples of 64 bytes) are aligned.
using CacheLine = std::aligned_storage_t<64, 64>;

// Byte offsets of a block's parts for a rank with n rows per sequence.
struct BlockLayout {
  std::size_t k = 0, v = 0, k_scale = 0, v_scale = 0, key_padding = 0, bytes = 0;
};

template <class T>
BlockLayout block_layout(const RingShape& s, Index n) {
  const auto align = [](std::size_t x) { return (x + 63) / 64 * 64; };
  const std::size_t elem = std::size_t(storage_bytes<T>(s.storage));
  const std::size_t rows = std::size_t(s.batch * s.kv_heads * n);
  BlockLayout b;
  b.k = 0;
  b.v = align(b.k + rows * std::size_t(s.d) * elem);
  b.k_scale = align(b.v + rows * std::size_t(s.dv) * elem);
  const std::size_t scales = s.storage == Storage::Int8 ? rows * sizeof(T) : 0;
  b.v_scale = align(b.k_scale + scales);
  b.key_padding = align(b.v_scale + scales);
  b.bytes = align(b.key_padding + (s.key_padding ? std::size_t(s.batch * n) : 0));
  return b;
}

// Packs k [B*n, H_kv*d], v [B*n, H_kv*dv] (rows (b, local row)) and the keys' padding entries
// (kp: [B, n] row-major, or null) into buf, which holds block_layout(s, n).bytes.
template <class T>
void pack_block(const RingShape& s, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, const bool* kp,
                unsigned char* buf) {
  const Index n = k.rows() / s.batch;
  const BlockLayout lay = block_layout<T>(s, n);
  attn::detail::with_storage<T>(s.storage, [&](auto tag) {
    using S = typename decltype(tag)::type;
    S* kd = reinterpret_cast<S*>(buf + lay.k);
    S* vd = reinterpret_cast<S*>(buf + lay.v);
    T* ks = reinterpret_cast<T*>(buf + lay.k_scale);
    T* vs = reinterpret_cast<T*>(buf + lay.v_scale);
    for (Index b = 0; b < s.batch; ++b)
      for (Index h = 0; h < s.kv_heads; ++h)
        for (Index j = 0; j < n; ++j) {
          const Index at = (b * s.kv_heads + h) * n + j;
          const T sk = attn::detail::store_row<S>(k.data() + (b * n + j) * k.outerStride() + h * s.d, s.d, kd + at * s.d);
          const T sv = attn::detail::store_row<S>(v.data() + (b * n + j) * v.outerStride() + h * s.dv, s.dv, vd + at * s.dv);
          if (s.storage == Storage::Int8) ks[at] = sk, vs[at] = sv;
        }
  });
  if (s.key_padding && s.batch * n > 0) std::memcpy(buf + lay.key_padding, kp, std::size_t(s.batch * n));
}

// The score options every block pair shares, with the masks over the rank's own query rows.
template <class T>
struct RingMasks {
  bool causal = false;
  Index window = 0, sink_tokens = 0;
  T softcap = T(0);
  const T* alibi_slopes = nullptr;
  const T* sinks = nullptr;
  const Masks<T>* masks = nullptr;  // attn_mask / attn_bias: [n, L] or [B*H*n, L], columns the global keys
  bool key_padding_attends = false;
  Precision precision = Precision::Native;
  T scale = T(1);
};

// One rank's running result: attends arriving blocks and merges them into out [B*n, H*dv] and
// lse [H, B*n] (n the rank's rows per sequence), in the order they arrive - which the ring fixes,
// so the result does not depend on message timing.
template <class T>
class RingAccumulator {
 public:
  RingAccumulator(const Sharding& sh, int rank, const RingShape& s, const RingMasks<T>& m, const ConstMatrixRef<T>& q,
                  MatrixRef<T> out, MatrixRef<T> lse)
      : sh_(sh), s_(s), m_(m), q_(q), out_(out), lse_(lse), mine_(sh.segments(rank)), n_(sh.local_len(rank)) {
    // One block pair's result at a time: [B*m, H*dv] and [H, B*m], m the longest segment any rank
    // holds (half the rank's rows under ZigZag).
    for (int r = 0; r < sh.ranks(); ++r)
      for (const Segment& g : sh.segments(r)) m_rows_ = std::max(m_rows_, g.length);
    part_out_.resize(s.batch * m_rows_, s.heads * s.dv);
    part_lse_.resize(s.heads, s.batch * m_rows_);
    out_.setZero();
    lse_.setConstant(-std::numeric_limits<T>::infinity());
  }

  // Attends the block of rank src (block_layout(s, local_len(src)) bytes at block) and merges it,
  // calling between() after each block pair (the MPI driver lets its messages progress there).
  template <class Between>
  void attend(const unsigned char* block, int src, Between&& between) {
    const std::vector<Segment> theirs = sh_.segments(src);
    const Index ns = sh_.local_len(src);
    const BlockLayout lay = block_layout<T>(s_, ns);
    // Block pairs one at a time, each merged before the next: the order (their segments, then
    // mine) is fixed, and one pair's scratch serves them all.
    for (const Segment& ks : theirs)
      for (const Segment& qs : mine_) {
        if (qs.length == 0 || ks.length == 0 || skipped(qs, ks)) continue;
        attn::detail::attention(problem(qs, ks, ns, lay, block));
        between();
        merge(qs);
      }
  }
  void attend(const unsigned char* block, int src) {
    attend(block, src, [] {});
  }

  // After the last block: the sinks join every row's denominator once (a part of lse sinks[h]
  // whose output is zeros).
  void finish() {
    if (!m_.sinks) return;
    const Vector<T> zeros = Vector<T>::Zero(s_.dv);
    for (Index h = 0; h < s_.heads; ++h)
      for (Index r = 0; r < s_.batch * n_; ++r)
        lse_(h, r) = attn::detail::merge_state(lse_(h, r), &out_(r, h * s_.dv), m_.sinks[h], zeros.data(), s_.dv,
                                           &out_(r, h * s_.dv));
  }

 private:
  // Whether causal masking or the window removes every key of ks from every query of qs (the
  // kernels would mask them all; skipping saves the call). Sink tokens in ks keep it.
  bool skipped(const Segment& qs, const Segment& ks) const {
    const Index q_last = qs.start + qs.length - 1, k_last = ks.start + ks.length - 1;
    if (m_.causal && ks.start > q_last) return true;
    if (m_.window > 0 && ks.start >= m_.sink_tokens) {
      const Index gap = ks.start > q_last ? ks.start - q_last : qs.start > k_last ? qs.start - k_last : 0;
      if (gap >= m_.window) return true;
    }
    return false;
  }

  attn::detail::AttentionProblem<T> problem(const Segment& qs, const Segment& ks, Index ns, const BlockLayout& lay,
                                            const unsigned char* block) {
    const Index B = s_.batch, H = s_.heads, Hkv = s_.kv_heads, d = s_.d, dv = s_.dv, L = sh_.seq_len();
    attn::detail::AttentionProblem<T> p;
    p.batch = B;
    p.heads = H;
    p.kv_heads = Hkv;
    p.L = qs.length;
    p.S = p.mask_keys = ks.length;
    p.d = d;
    p.dv = dv;
    p.scale = m_.scale;
    p.precision = m_.precision;
    const Index qst = q_.outerStride();
    p.q = {q_.data() + qs.local * qst, n_ * qst, d, qst};
    const Index E = H * dv;
    p.out = {part_out_.data(), m_rows_ * E, dv, E};
    p.lse = {part_lse_.data(), m_rows_, B * m_rows_, 1};

    // K and V: [B, H_kv, ns, d], from row ks.local of each head.
    p.k = {nullptr, Hkv * ns * d, ns * d, d};
    p.v = {nullptr, Hkv * ns * dv, ns * dv, dv};
    p.kv_storage = s_.storage;
    const std::size_t elem = std::size_t(storage_bytes<T>(s_.storage));
    const void* k = block + lay.k + std::size_t(ks.local * d) * elem;
    const void* v = block + lay.v + std::size_t(ks.local * dv) * elem;
    if (s_.storage == Storage::Native) {
      p.k.data = static_cast<const T*>(k), p.v.data = static_cast<const T*>(v);
    } else {
      p.k_stored = k, p.v_stored = v;
    }
    if (s_.storage == Storage::Int8) {
      p.k_scale = {reinterpret_cast<const T*>(block + lay.k_scale) + ks.local, Hkv * ns, ns, 1};
      p.v_scale = {reinterpret_cast<const T*>(block + lay.v_scale) + ks.local, Hkv * ns, ns, 1};
    }

    // Positions: query i of qs at qs.start + i, key j of ks at ks.start + j.
    p.has_fixed_offset = true;
    p.fixed_query_offset = qs.start - ks.start;
    p.causal = m_.causal ? Causal::TopLeft : Causal::None;
    p.window = m_.window;
    p.sink_tokens = std::clamp<Index>(m_.sink_tokens - ks.start, 0, ks.length);
    p.softcap = m_.softcap;
    p.alibi_slopes = m_.alibi_slopes;
    if (s_.key_padding) {
      p.key_padding = {reinterpret_cast<const bool*>(block + lay.key_padding) + ks.local, ns, 0, 0};
      p.key_padding_attends = m_.key_padding_attends;
    }
    const auto bind = [&](const auto* data, Index rows, auto& view) {
      // [n, L] shared by every sequence and head, or [B*H*n, L]: rows (b, h, local row).
      view.data = data + qs.local * L + ks.start;
      view.row_stride = L;
      view.head_stride = rows == n_ ? 0 : n_ * L;
      view.batch_stride = rows == n_ ? 0 : H * n_ * L;
    };
    if (m_.masks && !m_.masks->attn_mask.empty()) {
      bind(m_.masks->attn_mask.data(), m_.masks->attn_mask.rows(), p.mask);
      p.mask_attends = m_.masks->attn_mask.attend_value();
    }
    if (m_.masks && !m_.masks->attn_bias.empty()) bind(m_.masks->attn_bias.data(), m_.masks->attn_bias.rows(), p.bias);
    return p;
  }

  // Merges the block pair's result (qs's rows, in the scratch) into the running result.
  void merge(const Segment& qs) {
    const Index dv = s_.dv;
    for (Index h = 0; h < s_.heads; ++h)
      for (Index b = 0; b < s_.batch; ++b)
        for (Index i = 0; i < qs.length; ++i) {
          const Index r = b * n_ + qs.local + i, pr = b * m_rows_ + i;
          lse_(h, r) = attn::detail::merge_state(lse_(h, r), &out_(r, h * dv), part_lse_(h, pr), &part_out_(pr, h * dv),
                                                 dv, &out_(r, h * dv));
        }
  }

  const Sharding& sh_;
  RingShape s_;
  RingMasks<T> m_;
  ConstMatrixRef<T> q_;
  MatrixRef<T> out_, lse_;
  std::vector<Segment> mine_;
  Index n_ = 0;
  Index m_rows_ = 0;
  Matrix<T> part_out_, part_lse_;
};

}  // namespace attn::dist::detail
