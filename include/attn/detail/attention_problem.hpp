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
#include "attn/detail/storage.hpp"
#include "attn/kv_storage.hpp"
#include "attn/mask.hpp"
#include "attn/precision.hpp"
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

  // Grouped-query attention: K and V have kv_heads heads (0 means heads: plain multi-head), which
  // must divide heads; query head h reads kv head h / (heads / kv_heads) (kv_head()). kv_heads = 1
  // is multi-query attention. K and V are read in place, never repeated.
  Index kv_heads = 0;

  Strided<const T> q;  // [B, H, L, d]
  Strided<const T> k;  // [B, H_kv, S, d]
  Strided<const T> v;  // [B, H_kv, S, dv]
  Strided<T> out;      // [B, H, L, dv]
  T scale = T(1);

  // Score options (masked_logit gives the exact order). Positions: query i sits at absolute
  // position i + query_offset() (bottom-right, the KV-cache convention, unless causal is TopLeft),
  // key j at position j.
  T softcap = T(0);                 // > 0: logit = softcap * tanh(logit / softcap) (Gemma 2)
  const T* alibi_slopes = nullptr;  // [H]: logit += slope_h * (j - i_abs), i.e. -slope * distance
  Index window = 0;                 // > 0: key j visible only if |i_abs - j| < window
  Index sink_tokens = 0;            // keys [0, sink_tokens) are exempt from the window (StreamingLLM)
  const T* sinks = nullptr;         // [H]: a logit per head in every row's softmax denominator (gpt-oss)

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
  Strided<T> lse;      // [B, H, L] each row's log-sum-exp (row_end), written only when data is set

  // K and V as a KVCache stores them. Native: k and v above. Any other storage type: the elements
  // are at k_stored / v_stored (the element type of kv_storage), with k's and v's strides (k.data and
  // v.data unused), and an int8 row stands for its scale times its integers (k_scale, v_scale:
  // [B, H_kv, rows] with row stride 1).
  KVStorage kv_storage = KVStorage::Native;
  const void* k_stored = nullptr;
  const void* v_stored = nullptr;
  Strided<const T> k_scale, v_scale;

  // Paged K and V (attn::PagedKVCache): key j is row j % page_size of page page_table[j /
  // page_size]; a page holds every kv head's page_size rows, head h's from h * head_stride. Page
  // g's rows start page_stride elements after page g - 1's (k_page_stride for K, v_page_stride for
  // V, scale_page_stride for int8's scales); batch strides are unused (one sequence a problem).
  const Index* page_table = nullptr;
  Index page_size = 0;
  Index k_page_stride = 0, v_page_stride = 0, scale_page_stride = 0;

  // BFloat16: the flash kernel's two products on bf16 operands (attn/precision.hpp); the decode
  // and blocked kernels compute in T either way.
  Precision precision = Precision::Native;

  // A block of a longer sequence (context parallelism, attn/dist): when set, query i sits at
  // position i + fixed_query_offset and key j at j whatever the causal alignment, so causal
  // masking keeps keys j <= i + fixed_query_offset, and the window and ALiBi measure that distance.
  bool has_fixed_offset = false;
  Index fixed_query_offset = 0;
};

// Row j of kv head h of K (value = false) or V (true) in storage type S (the element type of
// p.kv_storage): through the batch stride, or the page table when paged.
template <class S, class T>
const S* stored_row(const AttentionProblem<T>& p, bool value, Index b, Index h, Index j) {
  const Strided<const T>& kv = value ? p.v : p.k;
  const S* base = nullptr;
  if constexpr (std::is_same_v<S, T>) {
    ATTN_ASSERT(p.kv_storage == KVStorage::Native);
    base = kv.data;
  } else {
    base = static_cast<const S*>(value ? p.v_stored : p.k_stored);
  }
  if (p.page_table)
    return base + p.page_table[j / p.page_size] * (value ? p.v_page_stride : p.k_page_stride) + h * kv.head_stride +
           (j % p.page_size) * kv.row_stride;
  return base + b * kv.batch_stride + h * kv.head_stride + j * kv.row_stride;
}

// The int8 scale of row j of kv head h of K or V (1 without scales).
template <class T>
T row_scale(const AttentionProblem<T>& p, bool value, Index b, Index h, Index j) {
  const Strided<const T>& scales = value ? p.v_scale : p.k_scale;
  if (!scales) return T(1);
  if (p.page_table)
    return scales.data[p.page_table[j / p.page_size] * p.scale_page_stride + h * scales.head_stride +
                       (j % p.page_size) * scales.row_stride];
  return *scales.row(b, h, j);
}

// How many of keys [j, j + n) follow key j in memory: all of them unless paged, else those on
// key j's page.
template <class T>
Index contiguous_keys(const AttentionProblem<T>& p, Index j, Index n) {
  return p.page_table ? std::min(n, p.page_size - j % p.page_size) : n;
}

// Whether the kernels read K and V through a converted copy of each block rather than in place:
// compressed storage, or pages (a block of keys spans pages).
template <class T>
bool kv_converted(const AttentionProblem<T>& p) {
  return p.kv_storage != KVStorage::Native || p.page_table != nullptr;
}

// Rows [j0, j0 + n) of kv head h of K (value = false) or V (true) as T, into dst (row stride ds):
// the flash and blocked kernels' one conversion of a compressed or paged block, where it is
// reused by many query rows.
template <class T>
void convert_rows(const AttentionProblem<T>& p, bool value, Index b, Index h, Index j0, Index n, T* dst, Index ds) {
  const Index cols = value ? p.dv : p.d;
  with_storage<T>(p.kv_storage, [&](auto tag) {
    using S = typename decltype(tag)::type;
    for (Index j = 0; j < n; ++j)
      dequantize(stored_row<S>(p, value, b, h, j0 + j), cols, row_scale(p, value, b, h, j0 + j), dst + j * ds);
  });
}

// Query head h reads K and V head kv_head(p, h): heads / kv_heads consecutive query heads share one.
template <class T>
Index kv_head(const AttentionProblem<T>& p, Index h) {
  return p.kv_heads > 0 ? h / (p.heads / p.kv_heads) : h;
}

// Query i's absolute position is i + query_offset(p): the positions of ALiBi and the window align
// with causal masking - top-left (offset 0) under Causal::TopLeft, otherwise bottom-right (offset
// mask_keys - L: the last query sits at the last key, as when decoding from a KV cache) - unless
// the problem is a block of a longer sequence with its own offset (has_fixed_offset).
template <class T>
Index query_offset(const AttentionProblem<T>& p) {
  if (p.has_fixed_offset) return p.fixed_query_offset;
  return p.causal == Causal::TopLeft ? 0 : p.mask_keys - p.L;
}

// The keys [begin, end) of [0, mask_keys) that causal masking and the window leave to query i
// (begin == end when none). Both rules are intervals, and both bounds grow with i. With sink
// tokens the window's keys and the sinks are two intervals: begin stays 0, and the kernels mask
// the keys between them one by one (sinks_split()).
struct KeyRange {
  Index begin, end;
};
template <class T>
KeyRange positional_keys(const AttentionProblem<T>& p, Index i) {
  const Index a = i + query_offset(p);
  Index begin = 0, end = p.mask_keys;
  if (p.causal != Causal::None) end = std::min(end, a + 1);
  if (p.window > 0) {
    const Index window_end = std::min(end, a + p.window);
    if (p.sink_tokens == 0)
      begin = std::max(begin, a - p.window + 1), end = window_end;
    else  // the sinks [0, min(end, sink_tokens)) and the window: one interval from 0 over both
      end = std::max(window_end, std::min(end, p.sink_tokens));
  }
  begin = std::min(begin, p.mask_keys);
  return {begin, std::max(begin, end)};
}

// logit soft-capping: cap * tanh(x / cap), which bounds the logit to (-cap, cap) (Gemma 2).
template <class T>
T softcapped(T cap, T x) {
  return cap * std::tanh(x / cap);
}

// The logit of query i against key j in head (b, h) after every mask, from `capped`, the scaled
// dot product already soft-capped (softcapped(); unchanged without softcap). The result is -inf
// where any mask removes the key. With a = i + query_offset(p), in this order:
//   -inf unless causal allows j (j <= a), |a - j| < window, the bool mask and key padding allow j
//   + alibi_slope[h] * (j - a)      (<= 0 under causal: -slope * distance, as in BLOOM and MPT)
//   + attn_bias[i, j]
// Keys at or past mask_keys (MHA's extra keys) get none of this (softcap still applies to them).
template <class T>
T masked_capped_logit(const AttentionProblem<T>& p, Index b, Index h, Index i, Index j, T capped) {
  if (j >= p.mask_keys) return capped;
  constexpr T kMasked = -std::numeric_limits<T>::infinity();
  const Index a = i + query_offset(p);
  if (p.causal != Causal::None && j > a) return kMasked;
  if (p.window > 0 && j >= p.sink_tokens && (a - j >= p.window || j - a >= p.window)) return kMasked;
  if (p.mask && p.mask.row(b, h, i)[j] != p.mask_attends) return kMasked;
  if (p.key_padding && p.key_padding.row(b, h, i)[j] != p.key_padding_attends) return kMasked;
  if (p.alibi_slopes) capped += p.alibi_slopes[h] * static_cast<T>(j - a);
  if (p.bias) capped += p.bias.row(b, h, i)[j];
  return capped;
}

// The logit of query i against key j: `raw` is the scaled dot product. Soft-capping comes first,
// then the masks and biases (Gemma 2 caps scale * q.k and then adds its causal mask; flash-attn
// caps before ALiBi). This one function defines the semantics for every path.
template <class T>
T masked_logit(const AttentionProblem<T>& p, Index b, Index h, Index i, Index j, T raw) {
  return masked_capped_logit(p, b, h, i, j, p.softcap > T(0) ? softcapped(p.softcap, raw) : raw);
}

// Whether sink tokens split a row's keys into two intervals (the sinks, then the window), which
// the kernels' interval arithmetic does not cover: masked_logit then masks each key.
template <class T>
bool sinks_split(const AttentionProblem<T>& p) {
  return p.window > 0 && p.sink_tokens > 0;
}

// The end of a row: the factor that turns its unnormalised output sum_j exp(s_j - m) v_j into
// the attention output, as num / den (out = o * num / den), and its log-sum-exp, from the row max
// m and l = sum_j exp(s_j - m):
//   no sink:         out = o / l,                              lse = m + log l
//   sink logit s_h:  m' = max(m, s_h), den = l e^(m - m') + e^(s_h - m'),
//                    out = o e^(m - m') / den,                 lse = m' + log den
// (the sink joins the denominator and has no value: gpt-oss's sinks, softmax over [s, s_h] with
// the last column dropped). A row with no attended key (m = -inf) is zeros, its lse -inf, or s_h
// with a sink; a NaN l (a NaN logit) makes num, den and lse NaN.
template <class T>
struct RowEnd {
  T num, den, lse;
};
template <class T>
RowEnd<T> row_end(const AttentionProblem<T>& p, Index h, T m, T l) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (std::isnan(l)) return {l, l, l};
  if (!p.sinks) {
    if (m == kNegInf) return {T(0), T(1), kNegInf};
    return {T(1), l, m + std::log(l)};
  }
  const T sink = p.sinks[h];
  if (m == kNegInf) return {T(0), T(1), sink};
  const T top = std::max(m, sink);
  const T num = std::exp(m - top);
  const T den = l * num + std::exp(sink - top);
  return {num, den, top + std::log(den)};
}

// Whether any score needs masked_logit's per-score work (the kernels skip it otherwise).
template <class T>
bool has_masks(const AttentionProblem<T>& p) {
  return p.causal != Causal::None || p.mask || p.bias || p.key_padding || p.alibi_slopes || p.window > 0 ||
         p.softcap > T(0);
}

// softcapped() over s[0, c), vectorized through Eigen's tanh (a few ulp from std::tanh in float).
template <class T>
EIGEN_STRONG_INLINE void softcap_row(T* s, Index c, T cap) {
  Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> a(s, c);
  a = (a / cap).tanh() * cap;
}

// The kernels' mask step on one row of scaled scores, for query i against keys
// [j0, j0 + c): writes the masked logits in place and returns the row's max. (The exponentials
// follow in mk::exp_sum_row, which gives masked keys exactly the zero weight of the reference.)
// masked_logit, with its soft-capping done a row at a time.
// Forced inline: run per row inside the kernels' loops, a call cost a 3x3x37 SDPA 17 %.
template <class T>
EIGEN_STRONG_INLINE T mask_row(const AttentionProblem<T>& p, Index b, Index h, Index i, Index j0, T* row, Index c) {
  if (p.softcap > T(0)) softcap_row(row, c, p.softcap);
  T m = -std::numeric_limits<T>::infinity();
  for (Index j = 0; j < c; ++j) {
    row[j] = masked_capped_logit(p, b, h, i, j0 + j, row[j]);
    m = std::max(m, row[j]);
  }
  return m;
}

// Whether s[0, c) holds a NaN. The kernels' row max skips NaN logits (std::max, Eigen's pmax), so a
// row whose every attended logit is NaN (a NaN query) has max -inf like a fully masked row; this
// tells the two apart, and such a row is NaN, not zeros.
template <class T>
bool any_nan(const T* s, Index c) {
  for (Index j = 0; j < c; ++j)
    if (std::isnan(s[j])) return true;
  return false;
}

// Checks the masks and score options against the problem's B, H, L and mask_keys and points the
// problem at them. attn_mask / attn_bias: [L, S] shared, or [B*H*L, S] per batch entry and head;
// alibi_slopes: [H].
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
  if (m.alibi_slopes.size() > 0) {
    require_len(where, "alibi_slopes", m.alibi_slopes.size(), p.heads, "[H] = [", p.heads, "]");
    require_arg(m.alibi_slopes.allFinite(), where, "alibi_slopes must be finite");
    p.alibi_slopes = m.alibi_slopes.data();
  }
  require_arg(m.window >= 0, where, "window must be >= 0 (0: no window), got ", m.window);
  // |a - j| < L + S for every query and key, so a wider window is no window; clamping it keeps
  // a + window (positional_keys) from overflowing for a window such as Index's max.
  p.window = std::min(m.window, L + S);
  require_arg(m.sink_tokens >= 0, where, "sink_tokens must be >= 0, got ", m.sink_tokens);
  p.sink_tokens = std::min(m.sink_tokens, S);
  if (m.sinks.size() > 0) {
    require_len(where, "sinks", m.sinks.size(), p.heads, "[H] = [", p.heads, "]");
    require_arg(m.sinks.allFinite(), where, "sinks must be finite");
    p.sinks = m.sinks.data();
  }
  require_arg(std::isfinite(m.softcap) && m.softcap >= T(0), where,
              "softcap must be finite and >= 0 (0: no soft-capping), got ", m.softcap);
  p.softcap = m.softcap;
  if (m.precision) p.precision = *m.precision;  // else the module's, set by the caller
}

// Checks FlashAttention's cu_seqlens for a ragged batch - [B+1] offsets from 0, non-decreasing,
// ending at `total` rows (a sequence may be empty) - and returns B.
inline Index ragged_batch(const char* where, const char* name, const Eigen::Ref<const IndexVector>& cu, Index total) {
  require_shape(cu.size() >= 2, where, name, " has ", cu.size(), " entries, expected [B+1] with B >= 1");
  require_arg(cu[0] == 0, where, name, "[0] = ", cu[0], ", expected 0");
  for (Index b = 0; b + 1 < cu.size(); ++b)
    require_arg(cu[b + 1] >= cu[b], where, name, " must not decrease: ", name, "[", b, "] = ", cu[b], " > ", name, "[",
                b + 1, "] = ", cu[b + 1]);
  require_shape(cu[cu.size() - 1] == total, where, name, " ends at ", cu[cu.size() - 1], ", expected ", total,
                " (the rows of the packed tensor)");
  return cu.size() - 1;
}

// The masks of a ragged batch: every score option (causal per sequence, window, ALiBi, softcap,
// sinks) applies to each sequence; the per-key masks, whose [L, S] shapes assume one length, are
// refused (a ragged batch needs no padding: each sequence's keys are exactly its own).
template <class T>
void require_ragged_masks(const Masks<T>& m, const char* where) {
  require_arg(m.attn_mask.empty() && m.attn_bias.empty() && m.key_padding_mask.empty(), where,
              "attn_mask, attn_bias and key_padding_mask are not supported for sequences of different lengths: each"
              " sequence attends exactly its own keys (use causal, window, alibi_slopes, softcap and sinks, or call"
              " per sequence)");
}

}  // namespace attn::detail
