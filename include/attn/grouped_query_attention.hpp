// attn/grouped_query_attention.hpp - the attention core over all heads of a batch at once, with
// each K/V head shared by a group of query heads: grouped-query attention (Llama 2 70B, Mistral),
// multi-query attention (num_kv_heads = 1), or plain multi-head (num_kv_heads = num_heads). Query
// head h reads K/V head h / (num_heads / num_kv_heads); K and V are read in place, never repeated.
//
//   attn::GroupedQueryAttention<float> gqa(/*num_heads=*/32, /*num_kv_heads=*/8);  // scale 1/sqrt(d)
//   attn::GqaArgs<float> args;  args.batch = B;  args.causal = attn::Causal::BottomRight;  args.window = 4096;
//   attn::Matrix<float> out = gqa.forward(q, k, v, args);  // q [B*L, H*d], k/v [B*S, H_kv*d] -> [B*L, H*d]
//
// Against a KV cache (attn/kv_cache.hpp): the queries are the newest positions of each sequence,
// whose keys and values were appended first; causal masking is bottom-right.
//   cache.append(b, k_new, v_new);                       // [L, H_kv*d]
//   attn::Matrix<float> out = gqa.forward(q_new, cache, b);  // q_new [L, H*d] -> [L, H*d]
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "attn/detail/attention.hpp"
#include "attn/detail/check.hpp"
#include "attn/kv_cache.hpp"
#include "attn/paged_kv_cache.hpp"
#include "attn/mask.hpp"
#include "attn/types.hpp"

namespace attn {

// The masks and score options (Masks: attn_mask / attn_bias [L, S] or [B*H*L, S], key padding
// [B, S], causal, window, softcap, alibi_slopes [H]) and the batch size.
template <class T>
struct GqaArgs : Masks<T> {
  Index batch = 0;  // B: rows are (b, l), a contiguous [B, L, H*d] tensor (batch first); required
};

// The masks and score options for attention against a KVCache: the same as GqaArgs's, with causal
// masking bottom-right by default (the queries are the newest positions: the last one sees every
// kept key). Causal::None attends every kept key (a cross-attention cache); TopLeft is refused.
// attn_mask, attn_bias and key_padding_mask cover the kept keys, S = cache.kept(b), in position
// order. A sliding-window cache applies its window; `window` may narrow it, not widen it.
template <class T>
struct CacheArgs : Masks<T> {
  CacheArgs() { this->causal = Causal::BottomRight; }
};

template <class T>
class GroupedQueryAttention {
  ATTN_CHECK_SCALAR(T);

 public:
  // num_kv_heads must divide num_heads; scale 1 / sqrt(d), d taken from the query at each call.
  GroupedQueryAttention(Index num_heads, Index num_kv_heads) : H_(num_heads), Hkv_(num_kv_heads) {
    detail::require_shape(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                          "attn::GroupedQueryAttention", "num_kv_heads = ", num_kv_heads,
                          " must be positive and divide num_heads = ", num_heads);
  }
  // A fixed scale (any finite value).
  GroupedQueryAttention(Index num_heads, Index num_kv_heads, T scale) : GroupedQueryAttention(num_heads, num_kv_heads) {
    detail::require_arg(std::isfinite(scale), "attn::GroupedQueryAttention", "scale must be finite, got ", scale);
    scale_ = scale;
    has_scale_ = true;
  }

  // q: [B*L, H*d]  k: [B*S, H_kv*d]  v: [B*S, H_kv*dv]  ->  [B*L, H*dv]; head h in columns [h*d, (h+1)*d)
  Matrix<T> forward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const GqaArgs<T>& args) const {
    // Sized before run() checks the shapes: num_heads * dv must not wrap around.
    Matrix<T> out(q.rows(), detail::checked_mul("attn::GroupedQueryAttention::forward", "num_heads * dv", H_,
                                                v.cols() / Hkv_));
    run(q, k, v, args, out, nullptr, "attn::GroupedQueryAttention::forward");
    return out;
  }

  // The same, and the attention probabilities of every head, as MultiHeadAttention's need_weights
  // with average_attn_weights = false:  ->  output [B*L, H*dv], weights [B*H*L, S] with rows
  // (b, h, l) (PyTorch's [B, H, L, S]); a row whose keys are all masked is zeros.
  AttentionResult<T> forward_with_weights(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                          const ConstMatrixRef<T>& v, const GqaArgs<T>& args) const {
    AttentionResult<T> r;
    r.output.resize(q.rows(), detail::checked_mul("attn::GroupedQueryAttention::forward_with_weights",
                                                  "num_heads * dv", H_, v.cols() / Hkv_));
    run(q, k, v, args, r.output, &r.weights, "attn::GroupedQueryAttention::forward_with_weights");
    return r;
  }

  // q: [B*L, H*d]  k: [B*S, H_kv*d]  v: [B*S, H_kv*dv]  ->  out [B*L, H*dv], sized by the caller
  void forward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const GqaArgs<T>& args, MatrixRef<T> out) const {
    run(q, k, v, args, out, nullptr, "attn::GroupedQueryAttention::forward_into");
  }

  // The same and each row's log-sum-exp: output [B*L, H*dv], lse [H, B*L] (FlashAttention's layout;
  // -inf for a row with every key masked): what attn::merge_attention_states takes to combine
  // attention over disjoint keys.
  AttentionLse<T> forward_with_lse(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                      const ConstMatrixRef<T>& v, const GqaArgs<T>& args) const {
    const char* where = "attn::GroupedQueryAttention::forward_with_lse";
    AttentionLse<T> r;
    r.output.resize(q.rows(), detail::checked_mul(where, "num_heads * dv", H_, v.cols() / Hkv_));
    r.lse.resize(H_, q.rows());
    MatrixRef<T> lse(r.lse);
    run(q, k, v, args, r.output, nullptr, where, &lse);
    return r;
  }
  // The same into out [B*L, H*dv] and lse [H, B*L], sized by the caller.
  void forward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const GqaArgs<T>& args, MatrixRef<T> out, MatrixRef<T> lse) const {
    run(q, k, v, args, out, nullptr, "attn::GroupedQueryAttention::forward_into", &lse);
  }

  // Ragged batches (FlashAttention's varlen convention): B sequences of their own lengths packed
  // without padding. q [total_q, H*d], k [total_k, H_kv*d], v [total_k, H_kv*dv]; sequence b's
  // queries are rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q and its keys rows
  // [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k and v (cu_seqlens: [B+1] offsets from 0,
  // non-decreasing, ending at the row count)  ->  [total_q, H*dv].
  //
  // Each sequence is attention on its own: causal masking is per sequence (BottomRight: its last
  // query at its last key, as FlashAttention; TopLeft: its first at its first), and the window,
  // ALiBi, softcap and sinks apply within it. Its rows equal a call with it alone, bitwise; the
  // threads share every sequence's work at once (tasks of (sequence, kv head, query block), or of
  // key chunks when decoding). A sequence without queries is skipped; one with queries needs keys.
  // attn_mask, attn_bias and key_padding_mask are refused: a packed sequence has no padding.
  //
  //   attn::IndexVector cu(3);  cu << 0, 5, 12;                    // two sequences: 5 and 7 tokens
  //   attn::Masks<float> m;  m.causal = attn::Causal::BottomRight;
  //   attn::Matrix<float> out = gqa.forward_varlen(q, k, v, cu, cu, m);  // q, k, v [12, ...]
  Matrix<T> forward_varlen(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_q,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_k, const Masks<T>& masks = {}) const {
    const char* where = "attn::GroupedQueryAttention::forward_varlen";
    Matrix<T> out(q.rows(), detail::checked_mul(where, "num_heads * dv", H_, v.cols() / Hkv_));
    run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, masks, out, nullptr, where);
    return out;
  }
  // The same and each row's log-sum-exp: output [total_q, H*dv], lse [H, total_q].
  AttentionLse<T> forward_varlen_with_lse(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                             const ConstMatrixRef<T>& v,
                                             const Eigen::Ref<const IndexVector>& cu_seqlens_q,
                                             const Eigen::Ref<const IndexVector>& cu_seqlens_k,
                                             const Masks<T>& masks = {}) const {
    const char* where = "attn::GroupedQueryAttention::forward_varlen_with_lse";
    AttentionLse<T> r;
    r.output.resize(q.rows(), detail::checked_mul(where, "num_heads * dv", H_, v.cols() / Hkv_));
    r.lse.resize(H_, q.rows());
    MatrixRef<T> lse(r.lse);
    run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, masks, r.output, &lse, where);
    return r;
  }
  // The same into out [total_q, H*dv] (and lse [H, total_q]), sized by the caller.
  void forward_varlen_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_q,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_k, const Masks<T>& masks,
                           MatrixRef<T> out) const {
    run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, masks, out, nullptr,
               "attn::GroupedQueryAttention::forward_varlen_into");
  }
  void forward_varlen_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_q,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_k, const Masks<T>& masks, MatrixRef<T> out,
                           MatrixRef<T> lse) const {
    run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, masks, out, &lse,
               "attn::GroupedQueryAttention::forward_varlen_into");
  }

  // Against a cache, every sequence at once: q [B*L, H*d], the queries of each sequence's newest L
  // positions (rows of sequence b in [b*L, (b+1)*L)), already appended to the cache, every
  // sequence of the same size  ->  [B*L, H*dv].
  Matrix<T> forward(const ConstMatrixRef<T>& q, const KVCache<T>& cache, const CacheArgs<T>& args = {}) const {
    Matrix<T> out(q.rows(), out_cols(cache));
    run_cached(q, cache, 0, cache.batch(), args, out, nullptr, "attn::GroupedQueryAttention::forward");
    return out;
  }
  // Against sequence b of a cache: q [L, H*d], its newest L positions  ->  [L, H*dv].
  Matrix<T> forward(const ConstMatrixRef<T>& q, const KVCache<T>& cache, Index b, const CacheArgs<T>& args = {}) const {
    Matrix<T> out(q.rows(), out_cols(cache));
    run_cached(q, cache, b, 1, args, out, nullptr, "attn::GroupedQueryAttention::forward");
    return out;
  }
  // The same with every head's probabilities over the kept keys: sequence b (b >= 0; weights
  // [H*L, S], S = cache.kept(b)) or every sequence (b < 0; weights [B*H*L, S]), rows (b, h, l).
  AttentionResult<T> forward_with_weights(const ConstMatrixRef<T>& q, const KVCache<T>& cache, Index b,
                                          const CacheArgs<T>& args = {}) const {
    AttentionResult<T> r;
    r.output.resize(q.rows(), out_cols(cache));
    run_cached(q, cache, b < 0 ? 0 : b, b < 0 ? cache.batch() : 1, args, r.output, &r.weights,
               "attn::GroupedQueryAttention::forward_with_weights");
    return r;
  }
  // The same into out [rows of q, H*dv], sized by the caller; b < 0: every sequence.
  void forward_into(const ConstMatrixRef<T>& q, const KVCache<T>& cache, Index b, const CacheArgs<T>& args,
                    MatrixRef<T> out) const {
    run_cached(q, cache, b < 0 ? 0 : b, b < 0 ? cache.batch() : 1, args, out, nullptr,
               "attn::GroupedQueryAttention::forward_into");
  }
  // The same and each row's log-sum-exp into lse [H, rows of q].
  void forward_into(const ConstMatrixRef<T>& q, const KVCache<T>& cache, Index b, const CacheArgs<T>& args,
                    MatrixRef<T> out, MatrixRef<T> lse) const {
    run_cached(q, cache, b < 0 ? 0 : b, b < 0 ? cache.batch() : 1, args, out, nullptr,
               "attn::GroupedQueryAttention::forward_into", &lse);
  }

  // Against a cache, a ragged batch: sequence b's newest L_b positions (already appended), its
  // queries rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q [total_q, H*d] (cu_seqlens_q: [B+1]
  // for the cache's B sequences)  ->  [total_q, H*dv]. Each sequence attends its own kept keys;
  // L_b = 0 leaves sequence b out. One call for a continuous-batching step: many sequences
  // decoding (L_b = 1) at different lengths, and prompts or prompt chunks beside them. Rows equal
  // forward(q_b, cache, b), bitwise. The options as in forward(q, cache, b); attn_mask, attn_bias
  // and key_padding_mask are refused (each sequence's keys are exactly its own).
  Matrix<T> forward_varlen(const ConstMatrixRef<T>& q, const KVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_q, const CacheArgs<T>& args = {}) const {
    Matrix<T> out(q.rows(), out_cols(cache));
    run_cached_varlen(q, cache, cu_seqlens_q, args, out, nullptr, "attn::GroupedQueryAttention::forward_varlen");
    return out;
  }
  void forward_varlen_into(const ConstMatrixRef<T>& q, const KVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_q, const CacheArgs<T>& args,
                           MatrixRef<T> out) const {
    run_cached_varlen(q, cache, cu_seqlens_q, args, out, nullptr, "attn::GroupedQueryAttention::forward_varlen_into");
  }
  // The same and each row's log-sum-exp into lse [H, total_q].
  void forward_varlen_into(const ConstMatrixRef<T>& q, const KVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& cu_seqlens_q, const CacheArgs<T>& args,
                           MatrixRef<T> out, MatrixRef<T> lse) const {
    run_cached_varlen(q, cache, cu_seqlens_q, args, out, &lse, "attn::GroupedQueryAttention::forward_varlen_into");
  }

  // Against a paged cache (attn/paged_kv_cache.hpp): sequences seqs[i] of the cache, the queries
  // of their newest L_i positions (already appended) at rows [cu_seqlens_q[i], cu_seqlens_q[i+1])
  // of q [total_q, H*d] (cu_seqlens_q: [n+1] for the n ids in seqs)  ->  [total_q, H*dv]. The
  // kernels read K and V through each sequence's page table; rows equal those of the same
  // positions in a KVCache of the same storage type, bitwise. Options as forward_varlen against a
  // KVCache. A cache with a window (PagedKVCache::set_window) applies its window and sink tokens;
  // args may narrow them, not widen them.
  Matrix<T> forward_varlen(const ConstMatrixRef<T>& q, const PagedKVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& seqs, const Eigen::Ref<const IndexVector>& cu_seqlens_q,
                           const CacheArgs<T>& args = {}) const {
    Matrix<T> out(q.rows(), detail::checked_mul("attn::GroupedQueryAttention::forward_varlen", "num_heads * value_dim",
                                                H_, cache.value_dim()));
    run_paged(q, cache, seqs, cu_seqlens_q, args, out, nullptr, "attn::GroupedQueryAttention::forward_varlen");
    return out;
  }
  void forward_varlen_into(const ConstMatrixRef<T>& q, const PagedKVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& seqs, const Eigen::Ref<const IndexVector>& cu_seqlens_q,
                           const CacheArgs<T>& args, MatrixRef<T> out) const {
    run_paged(q, cache, seqs, cu_seqlens_q, args, out, nullptr, "attn::GroupedQueryAttention::forward_varlen_into");
  }
  void forward_varlen_into(const ConstMatrixRef<T>& q, const PagedKVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& seqs, const Eigen::Ref<const IndexVector>& cu_seqlens_q,
                           const CacheArgs<T>& args, MatrixRef<T> out, MatrixRef<T> lse) const {
    run_paged(q, cache, seqs, cu_seqlens_q, args, out, &lse, "attn::GroupedQueryAttention::forward_varlen_into");
  }

  Index num_heads() const { return H_; }
  Index num_kv_heads() const { return Hkv_; }
  std::optional<T> scale() const { return has_scale_ ? std::optional<T>(scale_) : std::nullopt; }

  // The arithmetic of Q K^T and P V (attn/precision.hpp) for calls that do not set
  // Masks::precision: Native (in T) or BFloat16.
  void set_precision(Precision p) { precision_ = p; }
  Precision precision() const { return precision_; }

 private:
  // weights, when given, receives [B*H*L, S] probabilities (the blocked kernel writes them).
  void run(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, const GqaArgs<T>& args,
           MatrixRef<T> out, Matrix<T>* weights, const char* where, MatrixRef<T>* lse = nullptr) const {
    using detail::shape;
    const Index B = args.batch;
    detail::require_batch(B, where);
    const Index d = q.cols() / H_, L = q.rows() / B, S = k.rows() / B;
    detail::require_shape(q.rows() == B * L && L > 0 && q.cols() == H_ * d && d > 0, where, "query has shape ",
                          shape(q.rows(), q.cols()), ", expected [B*L, H*d] = [", B, "*L, ", H_, "*d] with L, d > 0");
    detail::require_shape(k.rows() == B * S && S > 0 && k.cols() == Hkv_ * d, where, "key has shape ",
                          shape(k.rows(), k.cols()), ", expected [B*S, H_kv*d] = [", B, "*S, ", Hkv_ * d,
                          "] with S > 0 (d = ", d, " from query)");
    const Index dv = v.cols() / Hkv_;
    detail::require_shape(v.rows() == B * S && v.cols() == Hkv_ * dv && dv > 0, where, "value has shape ",
                          shape(v.rows(), v.cols()), ", expected [B*S, H_kv*dv] = [", B * S, ", ", Hkv_, "*dv]");
    detail::require_dims(where, "out", out.rows(), out.cols(), B * L, H_ * dv, "[B*L, H*dv] = ", shape(B * L, H_ * dv));
    check_lse(lse, B * L, where);

    detail::AttentionProblem<T> p = problem(B, L, S, d, dv, q, out);
    p.k = {k.data(), S * k.outerStride(), d, k.outerStride()};
    p.v = {v.data(), S * v.outerStride(), dv, v.outerStride()};
    detail::bind_masks(p, args, where);
    bind_weights(p, weights, where);
    bind_lse(p, lse, 0);
    detail::attention(p);
  }

  // lse, when asked for: [H, N] for N query rows.
  void check_lse(const MatrixRef<T>* lse, Index N, const char* where) const {
    if (lse) detail::require_dims(where, "lse", lse->rows(), lse->cols(), H_, N, "[H, N] = ", detail::shape(H_, N));
  }
  // Points p's log-sum-exp at *lse [H, N] from column n0: row i of sequence b at column n0 + b*L + i.
  static void bind_lse(detail::AttentionProblem<T>& p, MatrixRef<T>* lse, Index n0) {
    if (lse) p.lse = {lse->data() + n0, p.L, lse->outerStride(), 1};
  }

  // Packed sequences: see forward_varlen.
  void run_varlen(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                  const Eigen::Ref<const IndexVector>& cu_q, const Eigen::Ref<const IndexVector>& cu_k,
                  const Masks<T>& masks, MatrixRef<T> out, MatrixRef<T>* lse, const char* where) const {
    using detail::shape;
    const Index B = detail::ragged_batch(where, "cu_seqlens_q", cu_q, q.rows());
    detail::require_shape(cu_k.size() == B + 1, where, "cu_seqlens_k has ", cu_k.size(), " entries, expected [B+1] = [",
                          B + 1, "] (B from cu_seqlens_q)");
    detail::ragged_batch(where, "cu_seqlens_k", cu_k, k.rows());
    const Index d = q.cols() / H_, dv = v.cols() / Hkv_;
    detail::require_shape(q.cols() == H_ * d && d > 0, where, "query has shape ", shape(q.rows(), q.cols()),
                          ", expected [total_q, H*d] = [", q.rows(), ", ", H_, "*d] with d > 0");
    detail::require_dims(where, "key", k.rows(), k.cols(), -1, Hkv_ * d, "[total_k, H_kv*d] = [total_k, ", Hkv_ * d,
                         "] (d = ", d, " from query)");
    detail::require_shape(v.rows() == k.rows() && v.cols() == Hkv_ * dv && dv > 0, where, "value has shape ",
                          shape(v.rows(), v.cols()), ", expected [total_k, H_kv*dv] = [", k.rows(), ", ", Hkv_, "*dv]");
    detail::require_dims(where, "out", out.rows(), out.cols(), q.rows(), H_ * dv, "[total_q, H*dv] = ",
                         shape(q.rows(), H_ * dv));
    check_lse(lse, q.rows(), where);
    detail::require_ragged_masks(masks, where);
    std::vector<detail::AttentionProblem<T>> ps;
    for (Index b = 0; b < B; ++b) {
      const Index L = cu_q[b + 1] - cu_q[b], S = cu_k[b + 1] - cu_k[b];
      if (L == 0) continue;
      detail::require_arg(S > 0, where, "sequence ", b, " has ", L, " queries and no keys (cu_seqlens_k[", b,
                          "] = cu_seqlens_k[", b + 1, "] = ", cu_k[b], ")");
      detail::AttentionProblem<T> p = problem(1, L, S, d, dv, q, out, cu_q[b]);
      p.k = {k.data() + cu_k[b] * k.outerStride(), 0, d, k.outerStride()};
      p.v = {v.data() + cu_k[b] * v.outerStride(), 0, dv, v.outerStride()};
      detail::bind_masks(p, masks, where);
      bind_lse(p, lse, cu_q[b]);
      ps.push_back(p);
    }
    if (!ps.empty()) detail::attention(ps.data(), Index(ps.size()));
  }

  // Sizes *weights [B*H*L, S] (when asked for) and points the problem at it: rows (b, h, l).
  void bind_weights(detail::AttentionProblem<T>& p, Matrix<T>* weights, const char* where) const {
    if (!weights) return;
    weights->resize(detail::checked_mul(where, "B * num_heads * L", detail::checked_mul(where, "B * num_heads", p.batch, H_), p.L),
                    p.S);
    p.weights = {weights->data(), H_ * p.L * p.S, p.L * p.S, p.S};
  }

  // The problem without K and V: q [B*L, H*d] and out [B*L, H*dv] from row `row0`, head h in
  // columns [h*d, (h+1)*d).
  detail::AttentionProblem<T> problem(Index B, Index L, Index S, Index d, Index dv, const ConstMatrixRef<T>& q,
                                      MatrixRef<T>& out, Index row0 = 0) const {
    detail::AttentionProblem<T> p;
    p.batch = B;
    p.heads = H_;
    p.kv_heads = Hkv_;
    p.L = L;
    p.S = p.mask_keys = S;
    p.d = d;
    p.dv = dv;
    p.q = {q.data() + row0 * q.outerStride(), L * q.outerStride(), d, q.outerStride()};
    p.out = {out.data() + row0 * out.outerStride(), L * out.outerStride(), dv, out.outerStride()};
    p.scale = has_scale_ ? scale_ : T(1) / std::sqrt(static_cast<T>(d));
    p.precision = precision_;
    return p;
  }

  Index out_cols(const KVCache<T>& cache) const {
    return detail::checked_mul("attn::GroupedQueryAttention::forward", "num_heads * value_dim", H_, cache.value_dim());
  }

  // Sequences [b0, b0 + B) of the cache, L queries each: one problem when their lengths are equal,
  // a ragged batch (one problem per sequence) when they differ.
  void run_cached(const ConstMatrixRef<T>& q, const KVCache<T>& cache, Index b0, Index B, const CacheArgs<T>& args,
                  MatrixRef<T> out, Matrix<T>* weights, const char* where, MatrixRef<T>* lse = nullptr) const {
    using detail::shape;
    detail::require_arg(b0 >= 0 && b0 + B <= cache.batch(), where, "sequence ", b0, " is outside the cache's batch [0, ",
                        cache.batch(), ")");
    check_cache(cache, where);
    const Index d = cache.head_dim(), dv = cache.value_dim(), L = q.rows() / B;
    detail::require_shape(q.rows() == B * L && L > 0 && q.cols() == H_ * d, where, "query has shape ",
                          shape(q.rows(), q.cols()), ", expected [B*L, H*d] = [", B, "*L, ", H_, "*", d,
                          "] with L > 0 (B and d from the cache)");
    detail::require_dims(where, "out", out.rows(), out.cols(), B * L, H_ * dv, "[B*L, H*dv] = ", shape(B * L, H_ * dv));
    check_lse(lse, B * L, where);
    bool equal = true;
    for (Index b = b0; b < b0 + B; ++b) {
      check_cached_sequence(cache, b, L, args, where);
      equal = equal && cache.size(b) == cache.size(b0);
    }
    const Masks<T> masks = cache_masks(cache, args);
    if (equal) {
      detail::AttentionProblem<T> p = problem(B, L, cache.kept(b0), d, dv, q, out);
      cache.bind(p, b0);  // K and V in place, in the cache's storage type
      detail::bind_masks(p, masks, where);
      bind_weights(p, weights, where);
      bind_lse(p, lse, 0);
      detail::attention(p);
      return;
    }
    detail::require_arg(!weights, where, "the weights of sequences of different lengths: ask per sequence");
    detail::require_ragged_masks(masks, where);
    std::vector<detail::AttentionProblem<T>> ps;
    for (Index b = b0; b < b0 + B; ++b) ps.push_back(cached_problem(q, cache, b, (b - b0) * L, L, masks, out, lse, where));
    detail::attention(ps.data(), Index(ps.size()));
  }

  // See forward_varlen against a cache.
  void run_cached_varlen(const ConstMatrixRef<T>& q, const KVCache<T>& cache, const Eigen::Ref<const IndexVector>& cu_q,
                         const CacheArgs<T>& args, MatrixRef<T> out, MatrixRef<T>* lse, const char* where) const {
    using detail::shape;
    check_cache(cache, where);
    const Index B = detail::ragged_batch(where, "cu_seqlens_q", cu_q, q.rows());
    detail::require_shape(B == cache.batch(), where, "cu_seqlens_q has ", cu_q.size(), " entries, expected [B+1] = [",
                          cache.batch() + 1, "] (B from the cache)");
    const Index d = cache.head_dim(), dv = cache.value_dim();
    detail::require_dims(where, "query", q.rows(), q.cols(), -1, H_ * d, "[total_q, H*d] = [total_q, ", H_, "*", d,
                         "] (d from the cache)");
    detail::require_dims(where, "out", out.rows(), out.cols(), q.rows(), H_ * dv, "[total_q, H*dv] = ",
                         shape(q.rows(), H_ * dv));
    check_lse(lse, q.rows(), where);
    const Masks<T> masks = cache_masks(cache, args);
    detail::require_ragged_masks(masks, where);
    for (Index b = 0; b < B; ++b)
      if (cu_q[b + 1] > cu_q[b]) check_cached_sequence(cache, b, cu_q[b + 1] - cu_q[b], args, where);
    std::vector<detail::AttentionProblem<T>> ps;
    for (Index b = 0; b < B; ++b)
      if (cu_q[b + 1] > cu_q[b])
        ps.push_back(cached_problem(q, cache, b, cu_q[b], cu_q[b + 1] - cu_q[b], masks, out, lse, where));
    if (!ps.empty()) detail::attention(ps.data(), Index(ps.size()));
  }

  // See forward_varlen against a paged cache.
  void run_paged(const ConstMatrixRef<T>& q, const PagedKVCache<T>& cache, const Eigen::Ref<const IndexVector>& seqs,
                 const Eigen::Ref<const IndexVector>& cu_q, const CacheArgs<T>& args, MatrixRef<T> out, MatrixRef<T>* lse,
                 const char* where) const {
    using detail::shape;
    detail::require_shape(cache.kv_heads() == Hkv_, where, "the cache has ", cache.kv_heads(),
                          " kv heads, this attention ", Hkv_);
    const Index n = detail::ragged_batch(where, "cu_seqlens_q", cu_q, q.rows());
    detail::require_shape(seqs.size() == n, where, "seqs has ", seqs.size(), " ids, cu_seqlens_q ", cu_q.size(),
                          " offsets: expected [n] and [n+1]");
    const Index d = cache.head_dim(), dv = cache.value_dim();
    detail::require_dims(where, "query", q.rows(), q.cols(), -1, H_ * d, "[total_q, H*d] = [total_q, ", H_, "*", d,
                         "] (d from the cache)");
    detail::require_dims(where, "out", out.rows(), out.cols(), q.rows(), H_ * dv, "[total_q, H*dv] = ",
                         shape(q.rows(), H_ * dv));
    check_lse(lse, q.rows(), where);
    detail::require_ragged_masks(args, where);
    detail::require_arg(args.causal != Causal::TopLeft, where,
                        "causal must be BottomRight or None against a cache (the queries are its newest positions)");
    const Index W = cache.window();
    Masks<T> masks = args;
    if (W > 0) {  // the cache's window and sink tokens, unless args narrow them
      detail::require_arg(args.window >= 0 && args.window <= W && args.sink_tokens <= cache.sink_tokens(), where,
                          "window = ", args.window, " and sink_tokens = ", args.sink_tokens,
                          " cannot exceed the cache's window ", W, " and sink tokens ", cache.sink_tokens());
      if (masks.window == 0) masks.window = W;
      if (masks.sink_tokens == 0) masks.sink_tokens = cache.sink_tokens();
    }
    for (Index i = 0; i < n; ++i) {
      detail::require_arg(cache.is_live(seqs[i]), where, "seqs[", i, "] = ", seqs[i],
                          " is not a live sequence of the cache");
      const Index L = cu_q[i + 1] - cu_q[i], size = cache.size(seqs[i]);
      detail::require_arg(L <= size, where, "the ", L, " queries of sequence ", seqs[i],
                          " must be its newest positions, but the cache holds ", size,
                          " for it: append their keys and values first");
      // The window released what the queries of the last append cannot see: attend after each.
      detail::require_arg(W == 0 || L == 0 || cache.first_kept(seqs[i]) <= std::max<Index>(0, size - L - masks.window + 1),
                          where, "the ", L, " queries of sequence ", seqs[i], " need the ", masks.window - 1,
                          " positions before them, but the cache released the pages before position ",
                          cache.first_kept(seqs[i]), " (attend after each append)");
    }
    std::vector<detail::AttentionProblem<T>> ps;
    for (Index i = 0; i < n; ++i) {
      const Index L = cu_q[i + 1] - cu_q[i];
      if (L == 0) continue;
      detail::AttentionProblem<T> p = problem(1, L, cache.size(seqs[i]), d, dv, q, out, cu_q[i]);
      cache.bind(p, seqs[i]);
      detail::bind_masks(p, masks, where);
      bind_lse(p, lse, cu_q[i]);
      ps.push_back(p);
    }
    if (!ps.empty()) detail::attention(ps.data(), Index(ps.size()));
  }

  void check_cache(const KVCache<T>& cache, const char* where) const {
    detail::require_shape(cache.kv_heads() == Hkv_, where, "the cache has ", cache.kv_heads(),
                          " kv heads, this attention ", Hkv_);
  }

  // Sequence b's L queries are its newest positions, and the cache keeps what they attend.
  void check_cached_sequence(const KVCache<T>& cache, Index b, Index L, const CacheArgs<T>& args,
                             const char* where) const {
    const Index n = cache.size(b), S = cache.kept(b);
    detail::require_arg(L <= n, where, "the ", L, " queries of sequence ", b,
                        " must be its newest positions, but the cache holds ", n,
                        " for it: append their keys and values first");
    detail::require_arg(args.causal != Causal::TopLeft, where,
                        "causal must be BottomRight or None against a cache (the queries are its newest positions)");
    const Index W = cache.window();
    detail::require_arg(W == 0 || (args.window >= 0 && args.window <= W), where, "window = ", args.window,
                        " cannot exceed the cache's window ", W);
    // A ring's keys start at its oldest kept position, not at position 0.
    detail::require_arg(W == 0 || args.sink_tokens == 0, where, "sink_tokens = ", args.sink_tokens,
                        ": a sliding-window KVCache does not keep sink tokens (PagedKVCache::set_window does)");
    // A ring keeps the last `capacity` positions: the first query needs the window - 1 before it.
    detail::require_arg(W == 0 || cache.first_kept(b) <= std::max<Index>(0, n - L - W + 1), where, "the ", L,
                        " queries of sequence ", b, " need the ", W - 1,
                        " positions before them, but the cache keeps only the last ", S,
                        " (attend after each append of at most max_append() rows)");
  }

  // The cache's window, unless args narrow it.
  static Masks<T> cache_masks(const KVCache<T>& cache, const CacheArgs<T>& args) {
    Masks<T> masks = args;
    if (cache.window() > 0 && masks.window == 0) masks.window = cache.window();
    return masks;
  }

  // Sequence b alone: its L queries at rows [row0, row0 + L) of q and out.
  detail::AttentionProblem<T> cached_problem(const ConstMatrixRef<T>& q, const KVCache<T>& cache, Index b, Index row0,
                                             Index L, const Masks<T>& masks, MatrixRef<T>& out, MatrixRef<T>* lse,
                                             const char* where) const {
    detail::AttentionProblem<T> p = problem(1, L, cache.kept(b), cache.head_dim(), cache.value_dim(), q, out, row0);
    cache.bind(p, b);
    detail::bind_masks(p, masks, where);
    bind_lse(p, lse, row0);
    return p;
  }

  Index H_ = 0, Hkv_ = 0;
  // The fixed scale, when has_scale_ (a plain T and a flag, not a std::optional member: g++ 12
  // warns, wrongly, that a copied optional's value may be uninitialized - its bug 80635 - and the
  // project builds with -Werror).
  T scale_ = T(0);
  bool has_scale_ = false;
  Precision precision_ = Precision::Native;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(GroupedQueryAttention);
