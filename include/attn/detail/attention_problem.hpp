// attn/detail/attention_problem.hpp - one attention computation, described for the kernels.
//
// Every public attention call (ScaledDotProductAttention, MultiHeadAttention, and later the KV
// cache) reduces to this descriptor and hands it to detail::attention(). Tensors are strided
// views over buffers the caller owns, so heads are read in place - from a [B*L, E] projection in
// either row order, or from a cache - and never copied into per-head matrices.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attn/detail/check.hpp"
#include "attn/mask.hpp"
#include "attn/types.hpp"

namespace attn::detail {

// A [B, H, rows, cols] tensor through strides: element (b, h, r, c) is
//   data[b * batch_stride + h * head_stride + r * row_stride + c].
// A zero stride broadcasts (a [L, S] mask shared by every batch entry and head).
template <class Scalar>
struct Strided {
  Scalar* data = nullptr;
  Index batch_stride = 0, head_stride = 0, row_stride = 0;

  explicit operator bool() const { return data != nullptr; }
  Scalar* row(Index b, Index h, Index r) const { return data + b * batch_stride + h * head_stride + r * row_stride; }
};

// One head's rows of a strided view as an Eigen matrix, without a copy.
template <class T>
using StridedMap = Eigen::Map<const Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using MutableStridedMap = Eigen::Map<Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
struct AttentionProblem {
  Index batch = 1, heads = 1;
  Index L = 0;   // queries per sequence
  Index S = 0;   // keys per sequence
  Index d = 0;   // query/key head dimension
  Index dv = 0;  // value head dimension

  Strided<const T> q;  // [B, H, L, d]
  Strided<const T> k;  // [B, H, S, d]
  Strided<const T> v;  // [B, H, S, dv]
  Strided<T> out;      // [B, H, L, dv]
  T scale = T(1);

  // Masks cover keys [0, mask_keys); keys past them (MultiHeadAttention's add_bias_kv and
  // add_zero_attn columns) are never masked, as in PyTorch. Causal alignment counts mask_keys.
  Index mask_keys = 0;
  Causal causal = Causal::None;
  Strided<const bool> mask;         // [B, H, L, mask_keys]
  bool mask_attends = true;         // the stored value that means "may attend"
  Strided<const T> bias;            // [B, H, L, mask_keys], added to the scaled logits
  Strided<const bool> key_padding;  // [B, 1, 1, mask_keys] (zero head and row strides)
  bool key_padding_attends = false;

  Strided<T> weights;  // [B, H, L, S] probabilities, written only when data is set
};

// Whether query i may see key j under causal masking with L queries and S keys.
inline bool causal_allows(Causal c, Index i, Index j, Index L, Index S) {
  switch (c) {
    case Causal::None:
      return true;
    case Causal::TopLeft:
      return j <= i;
    case Causal::BottomRight:
      return j <= i + S - L;
  }
  return true;
}

// The logit of query i against key j in head (b, h) after every mask: `raw` is the scaled dot
// product; the result is -inf where any mask removes the key. This one function defines the
// mask semantics for every path.
template <class T>
T masked_logit(const AttentionProblem<T>& p, Index b, Index h, Index i, Index j, T raw) {
  if (j >= p.mask_keys) return raw;
  constexpr T kMasked = -std::numeric_limits<T>::infinity();
  if (!causal_allows(p.causal, i, j, p.L, p.mask_keys)) return kMasked;
  if (p.mask && p.mask.row(b, h, i)[j] != p.mask_attends) return kMasked;
  if (p.key_padding && p.key_padding.row(b, h, i)[j] != p.key_padding_attends) return kMasked;
  if (p.bias) raw += p.bias.row(b, h, i)[j];
  return raw;
}

template <class T>
bool has_masks(const AttentionProblem<T>& p) {
  return p.causal != Causal::None || p.mask || p.bias || p.key_padding;
}

// The kernels' mask step on one row of scaled scores, for query i against keys
// [j0, j0 + c): writes the masked logits in place and returns the row's max. (The exponentials
// follow in mk::exp_sum_row, which gives masked keys exactly the zero weight of the reference.)
// Forced inline: run per row inside the kernels' loops, a call cost a 3x3x37 SDPA 17 %.
template <class T>
EIGEN_STRONG_INLINE T mask_row(const AttentionProblem<T>& p, Index b, Index h, Index i, Index j0, T* row, Index c) {
  T m = -std::numeric_limits<T>::infinity();
  for (Index j = 0; j < c; ++j) {
    row[j] = masked_logit(p, b, h, i, j0 + j, row[j]);
    m = std::max(m, row[j]);
  }
  return m;
}

// Checks the masks against the problem's B, H, L and mask_keys and points the problem at them.
// attn_mask / attn_bias: [L, S] shared, or [B*H*L, S] per batch entry and head.
template <class T>
void bind_masks(AttentionProblem<T>& p, const Masks<T>& m, const char* where) {
  const Index L = p.L, S = p.mask_keys, BHL = p.batch * p.heads * p.L;
  const auto strides_of = [&](const char* name, Index rows, Index cols, auto& view) {
    require_shape(cols == S && (rows == L || rows == BHL), where, name, " has shape ", shape(rows, cols),
                  ", expected [L, S] = ", shape(L, S), " or [B*H*L, S] = ", shape(BHL, S));
    view.row_stride = cols;
    if (rows == L) {  // shared by every batch entry and head
      view.batch_stride = view.head_stride = 0;
    } else {  // PyTorch's [B*H, L, S]: slice b*H + h
      view.head_stride = L * cols;
      view.batch_stride = p.heads * L * cols;
    }
  };
  if (!m.attn_mask.empty()) {
    p.mask.data = m.attn_mask.data();
    p.mask_attends = m.attn_mask.attend_value();
    strides_of("attn_mask", m.attn_mask.rows(), m.attn_mask.cols(), p.mask);
  }
  if (!m.attn_bias.empty()) {
    p.bias.data = m.attn_bias.data();
    strides_of("attn_bias", m.attn_bias.rows(), m.attn_bias.cols(), p.bias);
  }
  if (!m.key_padding_mask.empty()) {
    const auto& kp = m.key_padding_mask;
    require_dims(where, "key_padding_mask", kp.rows(), kp.cols(), p.batch, S, "[B, S] = ", shape(p.batch, S));
    p.key_padding = {kp.data(), S, 0, 0};
    p.key_padding_attends = kp.attend_value();
  }
  p.causal = m.causal;
}

}  // namespace attn::detail
