// attn/multi_head_attention.hpp - torch.nn.MultiheadAttention (eval mode), with its parameter
// names and layout, so a trained state_dict loads without reshuffling.
//
//   attn::MultiHeadAttention<float> mha(/*embed_dim=*/512, /*num_heads=*/8);
//   mha.set_in_proj_weight(w);                   // [3E, E], rows q, k, v - PyTorch's in_proj_weight
//   attn::MhaArgs<float> args;  args.batch = 1;  // one sequence; required, never guessed
//   auto [out, weights] = mha.forward(x, x, x, args);  // x: [L, E] -> out: [L, E]
//
// Batches: B sequences are one matrix of B*L rows. With batch_first the rows run (b, l) - a
// contiguous PyTorch [B, L, E] tensor - otherwise (l, b), PyTorch's default [L, B, E]. Set
// MhaArgs::batch = B, always (it defaults to 0, "not set", an error: three sequences read as one
// long one would mix them); B = 1 is PyTorch's unbatched [L, E].
//
// Projections: self-attention (query, key and value the same matrix) with the packed
// in_proj_weight is one GEMM x [B*L, E] x in_proj_weight^T -> [B*L, 3E]; cross-attention with key
// and value the same matrix projects them with one GEMM against rows [E, 3E). The heads are read
// in place from those buffers through strides. The intermediates live in a per-thread reused
// buffer (detail/scratch.hpp).
#pragma once

#include <cmath>
#include <utility>

#include "attn/detail/attention.hpp"
#include "attn/detail/check.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/detail/scratch.hpp"
#include "attn/grouped_query_attention.hpp"
#include "attn/init.hpp"
#include "attn/kv_cache.hpp"
#include "attn/kv_storage.hpp"
#include "attn/linear.hpp"
#include "attn/mask.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"
#include "attn/weight.hpp"

namespace attn {

// Constructor options, named and defaulted as nn.MultiheadAttention's.
struct MhaOptions {
  Index kdim = 0;              // key features; 0 = embed_dim
  Index vdim = 0;              // value features; 0 = embed_dim
  bool bias = true;            // in_proj_bias and out_proj.bias
  bool add_bias_kv = false;    // learned bias_k, bias_v appended as one more key/value position
  bool add_zero_attn = false;  // an all-zero key/value position appended after the head split
  bool batch_first = false;    // rows (b, l) instead of (l, b)
};

// Per-call arguments: masks (see attn/mask.hpp; shapes with B sequences and H heads) and outputs.
template <class T>
struct MhaArgs : Masks<T> {
  Index batch = 0;                   // B, the number of sequences in the inputs: required (1: unbatched)
  bool need_weights = false;         // PyTorch defaults to true; here the [L, S] probabilities are opt-in
  bool average_attn_weights = true;  // weights [B*L, S'] averaged over heads, else [B*H*L, S'] per head
};

template <class T>
class MultiHeadAttention {
  ATTN_CHECK_SCALAR(T);

 public:
  // PyTorch's initialisation: xavier_uniform in_proj_weight (or q/k/v_proj_weight), zero biases,
  // out_proj.weight as nn.Linear's, xavier_normal bias_k and bias_v.
  MultiHeadAttention(Index embed_dim, Index num_heads, const MhaOptions& options, Generator& gen)
      : E_(embed_dim),
        H_(num_heads),
        kdim_(options.kdim ? options.kdim : embed_dim),
        vdim_(options.vdim ? options.vdim : embed_dim),
        opt_(options),
        out_proj_(checked_dim(embed_dim, num_heads, options), embed_dim, options.bias, gen) {
    const auto xavier = [&gen](Index rows, Index cols) {
      Matrix<T> w(rows, cols);
      init::xavier_uniform(w, gen);
      return Weight<T>(w);
    };
    if (packed()) {
      in_proj_weight_ = xavier(3 * E_, E_);
    } else {
      q_proj_weight_ = xavier(E_, E_);
      k_proj_weight_ = xavier(E_, kdim_);
      v_proj_weight_ = xavier(E_, vdim_);
    }
    if (opt_.bias) {
      in_proj_bias_ = Vector<T>::Zero(3 * E_);
      out_proj_.set_bias(Vector<T>::Zero(E_));
    }
    if (opt_.add_bias_kv) {
      bias_k_.resize(E_);
      bias_v_.resize(E_);
      init::xavier_normal(bias_k_, E_, E_, gen);
      init::xavier_normal(bias_v_, E_, E_, gen);
    }
  }
  MultiHeadAttention(Index embed_dim, Index num_heads, const MhaOptions& options = {})
      : MultiHeadAttention(embed_dim, num_heads, options, default_gen()) {}

  // query: [B*L, E]  key: [B*S, kdim]  value: [B*S, vdim]
  //   -> output [B*L, E], rows in the query's order;
  //      pass the same matrix (same memory) as query, key and value for self-attention's fused
  //      projection, or as key and value for cross-attention's;
  //      weights (need_weights) [B*L, S'] averaged over heads, or [B*H*L, S'] per head, rows
  //      (b, l) and (b, h, l) whatever the layout, S' = S + add_bias_kv + add_zero_attn.
  AttentionResult<T> forward(const ConstMatrixRef<T>& query, const ConstMatrixRef<T>& key,
                             const ConstMatrixRef<T>& value, const MhaArgs<T>& args) const {
    AttentionResult<T> r;
    r.output.resize(query.rows(), E_);
    run(query, key, value, args, r.output, &r.weights, "attn::MultiHeadAttention::forward");
    return r;
  }

  // The same, writing the output into out [B*L, E], sized by the caller; no weights.
  void forward_into(const ConstMatrixRef<T>& query, const ConstMatrixRef<T>& key, const ConstMatrixRef<T>& value,
                    const MhaArgs<T>& args, MatrixRef<T> out) const {
    detail::require_arg(!args.need_weights, "attn::MultiHeadAttention::forward_into",
                        "need_weights is not available here; call forward()");
    run(query, key, value, args, out, nullptr, "attn::MultiHeadAttention::forward_into");
  }

  // The same and each head's log-sum-exp of every query row's scaled logits (over every key,
  // add_bias_kv's and add_zero_attn's included) into lse [H, B*L], column n for query row n in the
  // query's order. Before out_proj mixes the heads: the attention's own statistic (its entropy, a
  // temperature), not a merge input - attn::merge_attention_states combines the cores' outputs.
  void forward_into(const ConstMatrixRef<T>& query, const ConstMatrixRef<T>& key, const ConstMatrixRef<T>& value,
                    const MhaArgs<T>& args, MatrixRef<T> out, MatrixRef<T> lse) const {
    const char* where = "attn::MultiHeadAttention::forward_into";
    detail::require_arg(!args.need_weights, where, "need_weights is not available here; call forward()");
    detail::require_dims(where, "lse", lse.rows(), lse.cols(), H_, query.rows(), "[H, B*L] = ",
                         detail::shape(H_, query.rows()));
    run(query, key, value, args, out, nullptr, where, &lse);
  }
  AttentionLse<T> forward_with_lse(const ConstMatrixRef<T>& query, const ConstMatrixRef<T>& key,
                                   const ConstMatrixRef<T>& value, const MhaArgs<T>& args) const {
    const char* where = "attn::MultiHeadAttention::forward_with_lse";
    detail::require_arg(!args.need_weights, where, "need_weights is not available here; call forward()");
    AttentionLse<T> r;
    r.output.resize(query.rows(), E_);
    r.lse.resize(H_, query.rows());
    MatrixRef<T> lse(r.lse);
    run(query, key, value, args, r.output, nullptr, where, &lse);
    return r;
  }

  Index embed_dim() const { return E_; }
  Index num_heads() const { return H_; }
  Index head_dim() const { return E_ / H_; }
  Index kdim() const { return kdim_; }
  Index vdim() const { return vdim_; }
  const MhaOptions& options() const { return opt_; }
  // Whether the projections are one packed in_proj_weight (kdim == vdim == embed_dim) or
  // q_proj_weight, k_proj_weight and v_proj_weight - PyTorch's rule.
  bool packed() const { return kdim_ == E_ && vdim_ == E_; }

  // Parameters by PyTorch's names. Setters check the shape and throw shape_error. The weights come
  // as T (copies of the stored values: set_weight_storage).
  Matrix<T> in_proj_weight() const { return need_packed(true, "in_proj_weight"), in_proj_weight_.matrix(); }  // [3E, E]
  Matrix<T> q_proj_weight() const { return need_packed(false, "q_proj_weight"), q_proj_weight_.matrix(); }    // [E, E]
  Matrix<T> k_proj_weight() const { return need_packed(false, "k_proj_weight"), k_proj_weight_.matrix(); }  // [E, kdim]
  Matrix<T> v_proj_weight() const { return need_packed(false, "v_proj_weight"), v_proj_weight_.matrix(); }  // [E, vdim]
  const Vector<T>& in_proj_bias() const { return in_proj_bias_; }  // [3E]; empty without bias
  const Vector<T>& bias_k() const { return bias_k_; }              // [E]; empty without add_bias_kv
  const Vector<T>& bias_v() const { return bias_v_; }              // [E]; empty without add_bias_kv
  const Linear<T>& out_proj() const { return out_proj_; }          // weight [E, E], bias [E]
  Linear<T>& out_proj() { return out_proj_; }
  // Keeps every projection weight (in_proj or q/k/v_proj, out_proj) in storage s from now on
  // (attn/storage.hpp); biases stay in T. Int8 needs finite weights, Float16 |w| < 65520; a
  // rejected call changes nothing.
  void set_weight_storage(Storage s) {
    Weight<T> in = in_proj_weight_, q = q_proj_weight_, k = k_proj_weight_, v = v_proj_weight_;
    Linear<T> out = out_proj_;
    for (Weight<T>* w : {&in, &q, &k, &v}) w->set_storage(s);
    out.set_storage(s);
    in_proj_weight_ = std::move(in), q_proj_weight_ = std::move(q), k_proj_weight_ = std::move(k);
    v_proj_weight_ = std::move(v), out_proj_ = std::move(out);
  }
  // The storage of the projection weights (out_proj's may differ if set on it alone).
  Storage weight_storage() const { return (packed() ? in_proj_weight_ : q_proj_weight_).storage(); }
  // The arithmetic of the projections and of Q K^T and P V (attn/precision.hpp): Native (in T) or
  // BFloat16. A call's MhaArgs::precision overrides it for the attention core.
  void set_precision(Precision p) { precision_ = p, out_proj_.set_precision(p); }
  Precision precision() const { return precision_; }

  // --- Incremental decoding against a KV cache (attn/kv_cache.hpp) --------------------------------
  // A decoder that generates token by token computes each position's key and value once: a
  // self-attention step appends the new rows' keys and values, then its queries attend everything
  // kept (causal, bottom-right: CacheArgs' default); a cross-attention appends its memory's once
  // and attends it at every step (args.causal = Causal::None, memory_key_padding_mask as
  // key_padding_mask [B, S]). The result equals forward() over the whole sequence, row for row.
  //   auto cache = mha.make_cache(/*batch=*/B, /*capacity=*/max_len);
  //   mha.append_kv(x, x, cache);                          // x [B*L, E]: the next L positions
  //   mha.attend_into(x, cache, attn::CacheArgs<float>(), y);
  // Not with add_bias_kv or add_zero_attn.

  // A cache for batch sequences of up to capacity positions: num_heads heads of head_dim.
  KVCache<T> make_cache(Index batch, Index capacity, KVStorage storage = KVStorage::Native) const {
    return KVCache<T>(storage, batch, H_, head_dim(), capacity);
  }
  // key [B*S, kdim], value [B*S, vdim], B = cache.batch(), rows in this module's order: appends their
  // projections, S positions per sequence. On an error the cache is unchanged.
  void append_kv(const ConstMatrixRef<T>& key, const ConstMatrixRef<T>& value, KVCache<T>& cache) const {
    const char* where = "attn::MultiHeadAttention::append_kv";
    check_cache(cache, where);
    const Index B = cache.batch();
    detail::require_shape(key.cols() == kdim_ && key.rows() > 0 && key.rows() % B == 0, where, "key has shape ",
                          detail::shape(key.rows(), key.cols()), ", expected [B*S, kdim] = [", B, "*S, ", kdim_,
                          "] with S > 0 (B from the cache)");
    detail::require_dims(where, "value", value.rows(), value.cols(), key.rows(), vdim_,
                         "[B*S, vdim] = ", detail::shape(key.rows(), vdim_), " (B*S from key)");
    Matrix<T> k(key.rows(), E_), v(key.rows(), E_);
    project(key, 1, 1, k.data());
    project(value, 2, 1, v.data());
    cache.append(batch_major(k, B), batch_major(v, B));
  }
  // query [B*L, E], rows in this module's order  ->  out [B*L, E], sized by the caller: the queries'
  // attention against the cache's keys and values, through out_proj. Self-attention's queries are
  // the cache's newest L positions of each sequence (append_kv first).
  void attend_into(const ConstMatrixRef<T>& query, const KVCache<T>& cache, const CacheArgs<T>& args,
                   MatrixRef<T> out) const {
    const char* where = "attn::MultiHeadAttention::attend_into";
    check_cache(cache, where);
    const Index B = cache.batch();
    detail::require_shape(query.cols() == E_ && query.rows() > 0 && query.rows() % B == 0, where, "query has shape ",
                          detail::shape(query.rows(), query.cols()), ", expected [B*L, E] = [", B, "*L, ", E_,
                          "] with L > 0 (B from the cache)");
    detail::require_dims(where, "out", out.rows(), out.cols(), query.rows(), E_,
                         "[B*L, E] = ", detail::shape(query.rows(), E_));
    Matrix<T> q(query.rows(), E_), heads(query.rows(), E_);
    project(query, 0, 1, q.data());
    GroupedQueryAttention<T> core(H_, H_);  // scale 1 / sqrt(head_dim), as forward's
    core.set_precision(precision_);         // args.precision, when set, overrides it per call
    core.forward_into(batch_major(q, B), cache, -1, args, heads);
    out_proj_.forward_into(module_order(heads, B), out);
  }

  // Self-attention's three projections of x [N, E] at once, into qkv [N, 3E] = x in_proj_weight^T
  // + in_proj_bias (q, k and v side by side), sized by the caller: for code that runs its own
  // attention core between in_proj and out_proj (attn/dist's context-parallel encoder). Packed
  // modules only (kdim == vdim == embed_dim).
  void in_proj_into(const ConstMatrixRef<T>& x, MatrixRef<T> qkv) const {
    const char* where = "attn::MultiHeadAttention::in_proj_into";
    need_packed(true, "in_proj_into");
    detail::require_dims(where, "x", x.rows(), x.cols(), -1, E_, "[N, E] = [N, ", E_, "]");
    detail::require_dims(where, "qkv", qkv.rows(), qkv.cols(), x.rows(), 3 * E_, "[N, 3E] = ",
                         detail::shape(x.rows(), 3 * E_));
    detail::require_arg(qkv.outerStride() == 3 * E_, where, "qkv must be contiguous (row stride 3E = ", 3 * E_,
                        "), got row stride ", qkv.outerStride());
    project(x, 0, 3, qkv.data());
  }

  void set_in_proj_weight(const ConstMatrixRef<T>& w) { set(in_proj_weight_, w, true, "in_proj_weight", 3 * E_, E_); }
  void set_q_proj_weight(const ConstMatrixRef<T>& w) { set(q_proj_weight_, w, false, "q_proj_weight", E_, E_); }
  void set_k_proj_weight(const ConstMatrixRef<T>& w) { set(k_proj_weight_, w, false, "k_proj_weight", E_, kdim_); }
  void set_v_proj_weight(const ConstMatrixRef<T>& w) { set(v_proj_weight_, w, false, "v_proj_weight", E_, vdim_); }
  void set_in_proj_bias(const ConstVectorRef<T>& b) {
    set_vec(in_proj_bias_, b, opt_.bias, "in_proj_bias", "bias = false", 3 * E_);
  }
  void set_bias_k(const ConstVectorRef<T>& b) {
    set_vec(bias_k_, b, opt_.add_bias_kv, "bias_k", "add_bias_kv = false", E_);
  }
  void set_bias_v(const ConstVectorRef<T>& b) {
    set_vec(bias_v_, b, opt_.add_bias_kv, "bias_v", "add_bias_kv = false", E_);
  }

 private:
  // Validates the constructor's dimensions; returns embed_dim (out_proj's in_features).
  static Index checked_dim(Index E, Index H, const MhaOptions& o) {
    const char* where = "attn::MultiHeadAttention";
    detail::require_shape(E > 0 && H > 0, where, "embed_dim and num_heads must be positive, got embed_dim = ", E,
                          ", num_heads = ", H);
    detail::require_shape(E % H == 0, where, "embed_dim = ", E, " is not divisible by num_heads = ", H);
    detail::require_shape(o.kdim >= 0 && o.vdim >= 0, where,
                          "kdim and vdim must be positive (or 0 for embed_dim), got kdim = ", o.kdim,
                          ", vdim = ", o.vdim);
    // The projection weights' sizes: in_proj_weight [3E, E], or k_proj_weight [E, kdim] and
    // v_proj_weight [E, vdim].
    detail::checked_mul(where, "3 * embed_dim * embed_dim", detail::checked_mul(where, "3 * embed_dim", 3, E), E);
    detail::checked_mul(where, "embed_dim * kdim", E, o.kdim);
    detail::checked_mul(where, "embed_dim * vdim", E, o.vdim);
    return E;
  }

  void need_packed(bool want, const char* name) const {
    detail::require_arg(
        packed() == want, "attn::MultiHeadAttention", name,
        want ? " exists only when kdim == vdim == embed_dim (PyTorch's rule); use q/k/v_proj_weight"
             : " exists only when kdim or vdim differs from embed_dim (PyTorch's rule); use in_proj_weight",
        " (embed_dim = ", E_, ", kdim = ", kdim_, ", vdim = ", vdim_, ")");
  }

  void set(Weight<T>& dst, const ConstMatrixRef<T>& w, bool packed_param, const char* name, Index rows, Index cols) {
    need_packed(packed_param, name);
    detail::require_dims("attn::MultiHeadAttention", name, w.rows(), w.cols(), rows, cols, detail::shape(rows, cols));
    dst.set(w);
  }

  static void set_vec(Vector<T>& dst, const ConstVectorRef<T>& b, bool exists, const char* name, const char* why_not,
                      Index n) {
    detail::require_arg(exists, "attn::MultiHeadAttention", name, " does not exist: the module was built with ",
                        why_not);
    detail::require_len("attn::MultiHeadAttention", name, b.size(), n, "[", n, "]");
    dst = b;
  }

  static Generator& default_gen() {
    thread_local Generator gen;
    return gen;
  }

  // The projection weight of `parts` consecutive parts from `first`: 0 (q), 1 (k), 2 (v). More
  // than one part exists only as rows of the packed in_proj_weight.
  detail::WeightView<T> proj_weight(int first, int parts = 1) const {
    ATTN_ASSERT(parts == 1 || packed());
    if (packed()) return in_proj_weight_.view().middle_rows(first * E_, parts * E_);
    return (first == 0 ? q_proj_weight_ : first == 1 ? k_proj_weight_ : v_proj_weight_).view();
  }
  // Their bias, the same parts of in_proj_bias; nullptr without bias.
  const T* proj_bias(int first) const { return opt_.bias ? in_proj_bias_.data() + first * E_ : nullptr; }

  // x [N, in] -> y [N, parts*E] = x W^T + b, written at y (row stride parts*E).
  void project(const ConstMatrixRef<T>& x, int first, int parts, T* y) const {
    detail::linear_into<T>(x, proj_weight(first, parts), proj_bias(first),
                           Eigen::Map<Matrix<T>>(y, x.rows(), parts * E_), 0, precision_);
  }

  void check_cache(const KVCache<T>& cache, const char* where) const {
    detail::require_arg(!opt_.add_bias_kv && !opt_.add_zero_attn, where,
                        "add_bias_kv and add_zero_attn are not supported against a cache");
    detail::require_shape(cache.kv_heads() == H_ && cache.head_dim() == head_dim() && cache.value_dim() == head_dim(),
                          where, "the cache holds ", cache.kv_heads(), " heads of ", cache.head_dim(), " (keys) and ",
                          cache.value_dim(), " (values), this attention ", H_, " of ", head_dim(),
                          " (make_cache() fits)");
  }
  // Rows (l, b) -> (b, l), as a cache takes them: without batch_first, B > 1 and more than one row
  // per sequence; otherwise x itself.
  Matrix<T> batch_major(Matrix<T>& x, Index B) const {
    const Index n = x.rows() / B;
    if (opt_.batch_first || B == 1 || n == 1) return std::move(x);
    Matrix<T> y(x.rows(), x.cols());
    for (Index b = 0; b < B; ++b)
      for (Index l = 0; l < n; ++l) y.row(b * n + l) = x.row(l * B + b);
    return y;
  }
  // The reverse: rows (b, l) -> this module's order.
  Matrix<T> module_order(Matrix<T>& x, Index B) const {
    const Index n = x.rows() / B;
    if (opt_.batch_first || B == 1 || n == 1) return std::move(x);
    Matrix<T> y(x.rows(), x.cols());
    for (Index b = 0; b < B; ++b)
      for (Index l = 0; l < n; ++l) y.row(l * B + b) = x.row(b * n + l);
    return y;
  }

  // Whether a and b are one matrix: the same memory, shape and strides.
  static bool same(const ConstMatrixRef<T>& a, const ConstMatrixRef<T>& b) {
    return a.data() == b.data() && a.rows() == b.rows() && a.cols() == b.cols() && a.outerStride() == b.outerStride();
  }

  // Strides of sequence b inside a [B*n, width] matrix in this module's row order.
  struct RowOrder {
    Index batch_stride, row_stride;
  };
  RowOrder row_order(Index B, Index n, Index width) const {
    return opt_.batch_first ? RowOrder{n * width, width} : RowOrder{width, B * width};
  }

  // K or V [B*S, E] at x (row stride `width`, the module's row order) -> out [B*S', E]
  // batch-major with the extra positions appended to every sequence: bias (add_bias_kv), then
  // zeros (add_zero_attn).
  void append_extra(const T* x, Index width, Index B, Index S, Index S2, const Vector<T>& extra_bias, T* out) const {
    Eigen::Map<Matrix<T>> y(out, B * S2, E_);
    const RowOrder o = row_order(B, S, width);
    for (Index b = 0; b < B; ++b) {
      y.middleRows(b * S2, S) =
          detail::StridedMap<T>(x + b * o.batch_stride, S, E_, Eigen::OuterStride<>(o.row_stride));
      Index r = b * S2 + S;
      if (opt_.add_bias_kv) y.row(r++) = extra_bias.transpose();
      if (opt_.add_zero_attn) y.row(r++).setZero();
    }
  }

  void run(const ConstMatrixRef<T>& query, const ConstMatrixRef<T>& key, const ConstMatrixRef<T>& value,
           const MhaArgs<T>& args, MatrixRef<T> out, Matrix<T>* weights, const char* where,
           MatrixRef<T>* lse = nullptr) const {
    using detail::shape;
    const Index B = args.batch;
    detail::require_batch(B, where);
    detail::require_shape(query.cols() == E_ && query.rows() > 0 && query.rows() % B == 0, where, "query has shape ",
                          shape(query.rows(), query.cols()), ", expected [B*L, E] = [", B, "*L, ", E_, "] with L > 0");
    detail::require_shape(key.cols() == kdim_ && key.rows() > 0 && key.rows() % B == 0, where, "key has shape ",
                          shape(key.rows(), key.cols()), ", expected [B*S, kdim] = [", B, "*S, ", kdim_,
                          "] with S > 0");
    detail::require_dims(where, "value", value.rows(), value.cols(), key.rows(), vdim_,
                         "[B*S, vdim] = ", shape(key.rows(), vdim_), " (B*S from key)");
    detail::require_dims(where, "out", out.rows(), out.cols(), query.rows(), E_,
                         "[B*L, E] = ", shape(query.rows(), E_));
    const Index L = query.rows() / B, S = key.rows() / B, D = head_dim();
    const Index S2 = S + Index(opt_.add_bias_kv) + Index(opt_.add_zero_attn);

    // One scratch buffer (detail/scratch.hpp) holds the heads' outputs [N, E] and the
    // projections: q [N, E], k and v [M, E] from three GEMMs; or qkv [N, 3E] from one
    // (self-attention); or q and kv [M, 2E] (key and value one matrix). A head is a block of D
    // columns, read in place with its buffer's row stride `width`.
    const Index N = query.rows(), M = key.rows();
    const bool fuse_qkv = packed() && same(query, key) && same(key, value);
    const bool fuse_kv = !fuse_qkv && packed() && same(key, value);
    const Index extra = S2 != S ? 2 * B * S2 * E_ : 0;  // k and v with the extra positions appended
    detail::Scratch<T> scratch(fuse_qkv ? 4 * N * E_ + extra : 2 * N * E_ + 2 * M * E_ + extra);
    T* const heads_out = scratch.data();  // every head's output side by side, as PyTorch concatenates
    T* const proj = heads_out + N * E_;
    const T *q = proj, *k = nullptr, *v = nullptr;
    Index q_width = E_, kv_width = E_;
    if (fuse_qkv) {
      project(query, 0, 3, proj);
      k = proj + E_, v = proj + 2 * E_;
      q_width = kv_width = 3 * E_;
    } else {
      project(query, 0, 1, proj);
      T* const kv = proj + N * E_;
      if (fuse_kv) {
        project(key, 1, 2, kv);
        k = kv, v = kv + E_;
        kv_width = 2 * E_;
      } else {
        project(key, 1, 1, kv);
        project(value, 2, 1, kv + M * E_);
        k = kv, v = kv + M * E_;
      }
    }
    RowOrder kv_order = row_order(B, S, kv_width);
    if (S2 != S) {
      T* const k2 = heads_out + (fuse_qkv ? 4 * N * E_ : 2 * N * E_ + 2 * M * E_);
      T* const v2 = k2 + B * S2 * E_;
      append_extra(k, kv_width, B, S, S2, bias_k_, k2);
      append_extra(v, kv_width, B, S, S2, bias_v_, v2);
      k = k2, v = v2;
      kv_order = {S2 * E_, E_};
    }

    const RowOrder q_order = row_order(B, L, q_width), out_order = row_order(B, L, E_);
    detail::AttentionProblem<T> p;
    p.batch = B;
    p.heads = H_;
    p.L = L;
    p.S = S2;
    p.mask_keys = S;
    p.d = p.dv = D;
    p.q = {q, q_order.batch_stride, D, q_order.row_stride};
    p.k = {k, kv_order.batch_stride, D, kv_order.row_stride};
    p.v = {v, kv_order.batch_stride, D, kv_order.row_stride};
    p.out = {heads_out, out_order.batch_stride, D, out_order.row_stride};
    p.scale = T(1) / std::sqrt(static_cast<T>(D));
    p.precision = precision_;
    detail::bind_masks(p, args, where);

    Matrix<T> per_head;
    if (weights && args.need_weights) {
      per_head.resize(B * H_ * L, S2);
      p.weights = {per_head.data(), H_ * L * S2, L * S2, S2};
    }
    if (lse)  // column n = the query row n: (b, l) at b*L + l batch first, l*B + b otherwise
      p.lse = {lse->data(), opt_.batch_first ? L : 1, lse->outerStride(), opt_.batch_first ? 1 : B};
    detail::attention(p);
    out_proj_.forward_into(Eigen::Map<const Matrix<T>>(heads_out, N, E_), out);

    if (p.weights) {
      if (!args.average_attn_weights) {
        *weights = std::move(per_head);
        return;
      }
      weights->setZero(B * L, S2);
      for (Index b = 0; b < B; ++b)
        for (Index h = 0; h < H_; ++h) weights->middleRows(b * L, L) += per_head.middleRows((b * H_ + h) * L, L);
      *weights /= static_cast<T>(H_);
    }
  }

  Index E_ = 0, H_ = 0, kdim_ = 0, vdim_ = 0;
  MhaOptions opt_;
  Precision precision_ = Precision::Native;
  Weight<T> in_proj_weight_;                                 // [3E, E] when packed()
  Weight<T> q_proj_weight_, k_proj_weight_, v_proj_weight_;  // otherwise
  Vector<T> in_proj_bias_;                                   // [3E]
  Vector<T> bias_k_, bias_v_;                                // [E]
  Linear<T> out_proj_;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(MultiHeadAttention);
