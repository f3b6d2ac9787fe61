// attn/decoder_attention.hpp - the self-attention block of a decoder-only model (Llama, Mistral,
// Qwen, Gemma): separate q/k/v/o projections in Hugging Face's LlamaAttention layout, grouped-query
// attention, rotary embeddings, and decoding from a KV cache.
//
//   attn::DecoderAttentionOptions o;  o.num_kv_heads = 8;  o.max_positions = 8192;   // Llama 3 8B
//   attn::DecoderAttention<float> attn_block(/*embed_dim=*/4096, /*num_heads=*/32, o);
//   attn::KVCache<float> cache = attn_block.make_cache(/*batch=*/1, /*capacity=*/8192);
//   attn::Matrix<float> y = attn_block.forward(prompt, cache, 0);  // prefill: prompt [L, 4096]
//   attn::Matrix<float> t = attn_block.forward(token, cache, 0);   // then one row per step
//
// Parameters (names as LlamaAttention's state dict; D = head_dim, H = num_heads, Hkv = num_kv_heads):
//   q_proj [H*D, E]   k_proj [Hkv*D, E]   v_proj [Hkv*D, E]   o_proj [E, H*D]   (biases optional)
// For rows x of one sequence at positions n, n+1, ... (n = 0 without a cache, the cache's size with one):
//   q = rope(x q_proj^T, n),  k = rope(x k_proj^T, n),  v = x v_proj^T
//   y = attention(q, k, v) o_proj^T,   causal, scale 1/sqrt(D), query head h reading kv head
//       h / (H / Hkv); plus the options' window, soft-capping and ALiBi
// RoPE rotates the keys before they are cached, so the cache holds rotated keys and a step only
// rotates its own rows (rope.hpp explains why).
#pragma once

#include <cmath>
#include <optional>
#include <utility>

#include "attn/detail/check.hpp"
#include "attn/grouped_query_attention.hpp"
#include "attn/init.hpp"
#include "attn/kv_cache.hpp"
#include "attn/linear.hpp"
#include "attn/mask.hpp"
#include "attn/rope.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

struct DecoderAttentionOptions {
  Index num_kv_heads = 0;             // 0: num_heads (multi-head); 1: multi-query; must divide num_heads
  Index head_dim = 0;                 // 0: embed_dim / num_heads
  bool qkv_bias = false;              // q/k/v_proj biases (Qwen 2: true; Llama, Mistral: false)
  bool o_bias = false;                // o_proj bias
  std::optional<Rope> rope = Rope{};  // rotary embeddings (NeoX style, base 10000); nullopt: none
  Index max_positions = 4096;         // positions the RoPE table covers
  Index window = 0;                   // > 0: sliding-window attention over the last `window` positions
  double softcap = 0;                 // > 0: logit soft-capping (Gemma 2: 50)
  bool alibi = false;                 // ALiBi with the standard slopes (attn::alibi_slopes)
  double scale = 0;                   // 0: 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar^-0.5)
};

template <class T>
class DecoderAttention {
  ATTN_CHECK_SCALAR(T);

 public:
  // The projections get nn.Linear's initialisation, drawn in the order q, k, v, o.
  DecoderAttention(Index embed_dim, Index num_heads, const DecoderAttentionOptions& opt, Generator& gen)
      : opt_(checked(embed_dim, num_heads, opt)),
        E_(embed_dim),
        H_(num_heads),
        Hkv_(opt_.num_kv_heads),
        D_(opt_.head_dim),
        q_proj_(E_, H_ * D_, opt_.qkv_bias, gen),
        k_proj_(E_, Hkv_ * D_, opt_.qkv_bias, gen),
        v_proj_(E_, Hkv_ * D_, opt_.qkv_bias, gen),
        o_proj_(H_ * D_, E_, opt_.o_bias, gen),
        core_(make_core(opt_, H_, Hkv_)) {
    if (opt_.rope) rope_.emplace(D_, opt_.max_positions, *opt_.rope);
    if (opt_.alibi) alibi_ = alibi_slopes<T>(H_);
  }
  DecoderAttention(Index embed_dim, Index num_heads, const DecoderAttentionOptions& opt = {})
      : DecoderAttention(embed_dim, num_heads, opt, default_gen()) {}

  // From its four projections, no initialisation (a model built from a checkpoint: attn/models/):
  // q_proj [E -> H*D], k_proj and v_proj [E -> Hkv*D], o_proj [H*D -> E], as the options' num_kv_heads
  // and head_dim say; their biases set qkv_bias (all three or none) and o_bias.
  DecoderAttention(Index embed_dim, Index num_heads, const DecoderAttentionOptions& opt, Linear<T> q_proj,
                   Linear<T> k_proj, Linear<T> v_proj, Linear<T> o_proj)
      : opt_(checked_parts(embed_dim, num_heads, opt, q_proj, k_proj, v_proj, o_proj)),
        E_(embed_dim),
        H_(num_heads),
        Hkv_(opt_.num_kv_heads),
        D_(opt_.head_dim),
        q_proj_(std::move(q_proj)),
        k_proj_(std::move(k_proj)),
        v_proj_(std::move(v_proj)),
        o_proj_(std::move(o_proj)),
        core_(make_core(opt_, H_, Hkv_)) {
    if (opt_.rope) rope_.emplace(D_, opt_.max_positions, *opt_.rope);
    if (opt_.alibi) alibi_ = alibi_slopes<T>(H_);
  }

  // Without a cache: x [B*L, E], B = batch sequences of L tokens at positions 0 .. L-1 (rows of
  // sequence b in [b*L, (b+1)*L))  ->  [B*L, E]. Causal. The batch is always given (1 for one
  // sequence): a batch read as one long sequence would attend across sequences.
  Matrix<T> forward(const ConstMatrixRef<T>& x, Index batch) const {
    return run(x, batch, nullptr, "attn::DecoderAttention::forward");
  }

  // Against a cache, every sequence at once: x [B*L, E], the next L tokens of each of the cache's
  // B sequences (which must all hold the same number of positions). Appends their keys and values
  // to the cache, then attends  ->  [B*L, E]. On an error the cache is unchanged.
  Matrix<T> forward(const ConstMatrixRef<T>& x, KVCache<T>& cache) const {
    return run_cached(x, cache, 0, cache.batch(), nullptr, "attn::DecoderAttention::forward");
  }
  // Against sequence b of a cache: x [L, E], its next L tokens  ->  [L, E].
  Matrix<T> forward(const ConstMatrixRef<T>& x, KVCache<T>& cache, Index b) const {
    return run_cached(x, cache, b, 1, nullptr, "attn::DecoderAttention::forward");
  }

  // Against a cache, a ragged batch (continuous batching): x [total, E] packed, sequence b's next
  // L_b tokens at rows [cu_seqlens[b], cu_seqlens[b+1]) (cu_seqlens: [B+1] for the cache's B
  // sequences; L_b = 0 leaves sequence b out), each sequence at its own position cache.size(b).
  // One projection for all rows, each sequence's keys and values appended, one ragged attention
  // call (GroupedQueryAttention::forward_varlen)  ->  [total, E]. Each L_b at most
  // cache.max_append(b). On an error the cache is unchanged.
  Matrix<T> forward_varlen(const ConstMatrixRef<T>& x, KVCache<T>& cache,
                           const Eigen::Ref<const IndexVector>& cu_seqlens) const {
    const char* where = "attn::DecoderAttention::forward_varlen";
    check_cache(cache, where);
    const Index B = detail::ragged_batch(where, "cu_seqlens", cu_seqlens, x.rows());
    detail::require_shape(B == cache.batch(), where, "cu_seqlens has ", cu_seqlens.size(),
                          " entries, expected [B+1] = [", cache.batch() + 1, "] (B from the cache)");
    detail::require_dims(where, "x", x.rows(), x.cols(), -1, E_, "[total, embed_dim] = [total, ", E_, "]");
    IndexVector positions(x.rows());
    for (Index b = 0; b < B; ++b) {
      const Index L = cu_seqlens[b + 1] - cu_seqlens[b], n = cache.size(b);
      detail::require_arg(L <= cache.max_append(b), where, "appending ", L, " positions to sequence ", b,
                          " of a cache that takes ", cache.max_append(b), " more");
      detail::require_arg(!rope_ || n + L <= rope_->max_positions(), where, "positions [", n, ", ", n + L,
                          ") of sequence ", b, " exceed max_positions = ", opt_.max_positions);
      for (Index r = 0; r < L; ++r) positions[cu_seqlens[b] + r] = n + r;
    }
    Matrix<T> q = q_proj_.forward(x), k = k_proj_.forward(x), v = v_proj_.forward(x);
    if (rope_) {
      rope_->apply(q, H_, positions);
      rope_->apply(k, Hkv_, positions);
    }
    // The storage type's checks for all rows before the first append: all or nothing is appended.
    detail::check_storable<T>(cache.storage(), k, where, "key", "cache");
    detail::check_storable<T>(cache.storage(), v, where, "value", "cache");
    for (Index b = 0; b < B; ++b)
      if (cu_seqlens[b + 1] > cu_seqlens[b]) {
        const Index L = cu_seqlens[b + 1] - cu_seqlens[b];
        cache.append(b, k.middleRows(cu_seqlens[b], L), v.middleRows(cu_seqlens[b], L));
      }
    CacheArgs<T> args;  // causal, bottom-right
    set_options(args);
    Matrix<T> out(x.rows(), H_ * D_);
    core_.forward_varlen_into(q, cache, cu_seqlens, args, out);
    return o_proj_.forward(out);
  }

  // The same three calls with every head's attention probabilities (GroupedQueryAttention's
  // forward_with_weights):  ->  output [B*L, E], weights [B*H*L, S] with rows (b, h, l), over the
  // S = L keys of the sequence, or over the S = cache.kept(b) kept keys of a cache.
  AttentionResult<T> forward_with_weights(const ConstMatrixRef<T>& x, Index batch) const {
    AttentionResult<T> r;
    r.output = run(x, batch, &r.weights, "attn::DecoderAttention::forward_with_weights");
    return r;
  }
  AttentionResult<T> forward_with_weights(const ConstMatrixRef<T>& x, KVCache<T>& cache) const {
    AttentionResult<T> r;
    r.output = run_cached(x, cache, 0, cache.batch(), &r.weights, "attn::DecoderAttention::forward_with_weights");
    return r;
  }
  AttentionResult<T> forward_with_weights(const ConstMatrixRef<T>& x, KVCache<T>& cache, Index b) const {
    AttentionResult<T> r;
    r.output = run_cached(x, cache, b, 1, &r.weights, "attn::DecoderAttention::forward_with_weights");
    return r;
  }

  // A cache that fits this block: batch sequences of `capacity` positions each; a sliding-window
  // ring when the options set a window (capacity >= window; max_append() = capacity - window + 1).
  // Keys and values stored as `storage` (attn/kv_storage.hpp: bf16 and fp16 halve the bytes a
  // decoding step reads, int8 quarters them).
  KVCache<T> make_cache(Index batch, Index capacity, KVStorage storage = KVStorage::Native) const {
    return KVCache<T>(storage, batch, Hkv_, D_, capacity, opt_.window);
  }

  Index embed_dim() const { return E_; }
  Index num_heads() const { return H_; }
  Index num_kv_heads() const { return Hkv_; }
  Index head_dim() const { return D_; }
  const DecoderAttentionOptions& options() const { return opt_; }

  // The parameters, by LlamaAttention's names.
  const Linear<T>& q_proj() const { return q_proj_; }
  const Linear<T>& k_proj() const { return k_proj_; }
  const Linear<T>& v_proj() const { return v_proj_; }
  const Linear<T>& o_proj() const { return o_proj_; }
  Linear<T>& q_proj() { return q_proj_; }
  Linear<T>& k_proj() { return k_proj_; }
  Linear<T>& v_proj() { return v_proj_; }
  Linear<T>& o_proj() { return o_proj_; }
  // Keeps the four projection weights in storage s (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) { detail::set_storage_of_all<T, 4>(s, {&q_proj_, &k_proj_, &v_proj_, &o_proj_}); }
  // The arithmetic of the four projections and of Q K^T and P V (attn/precision.hpp): Native (in
  // T) or BFloat16. A call's args.precision overrides it for the attention core.
  void set_precision(Precision p) {
    for (Linear<T>* l : {&q_proj_, &k_proj_, &v_proj_, &o_proj_}) l->set_precision(p);
    core_.set_precision(p);
  }
  Precision precision() const { return core_.precision(); }

 private:
  static DecoderAttentionOptions checked(Index E, Index H, DecoderAttentionOptions opt) {
    const char* where = "attn::DecoderAttention";
    detail::require_shape(E > 0 && H > 0, where, "embed_dim = ", E, " and num_heads = ", H, " must be positive");
    if (opt.num_kv_heads == 0) opt.num_kv_heads = H;
    detail::require_shape(opt.num_kv_heads > 0 && H % opt.num_kv_heads == 0, where, "num_kv_heads = ", opt.num_kv_heads,
                          " must be positive and divide num_heads = ", H);
    if (opt.head_dim == 0) {
      detail::require_shape(E % H == 0, where, "embed_dim = ", E, " is not divisible by num_heads = ", H,
                            "; set head_dim");
      opt.head_dim = E / H;
    }
    detail::require_shape(opt.head_dim > 0, where, "head_dim must be positive, got ", opt.head_dim);
    detail::checked_mul(where, "num_heads * head_dim", H, opt.head_dim);  // q_proj's out_features
    detail::require_arg(opt.window >= 0, where, "window must be >= 0 (0: none), got ", opt.window);
    detail::require_arg(std::isfinite(opt.softcap) && opt.softcap >= 0, where,
                        "softcap must be finite and >= 0 (0: none), got ", opt.softcap);
    detail::require_arg(std::isfinite(opt.scale) && opt.scale >= 0, where,
                        "scale must be finite and >= 0 (0: 1/sqrt(head_dim)), got ", opt.scale);
    return opt;
  }

  static DecoderAttentionOptions checked_parts(Index E, Index H, DecoderAttentionOptions opt, const Linear<T>& q,
                                               const Linear<T>& k, const Linear<T>& v, const Linear<T>& o) {
    opt = checked(E, H, opt);
    const Index QD = H * opt.head_dim, KD = opt.num_kv_heads * opt.head_dim;
    const auto require = [&](const Linear<T>& l, const char* name, Index in, Index out) {
      detail::require_shape(l.in_features() == in && l.out_features() == out, "attn::DecoderAttention", name,
                            ".weight has shape ", detail::shape(l.out_features(), l.in_features()), ", expected ",
                            detail::shape(out, in), " (embed_dim = ", E, ", num_heads = ", H,
                            ", num_kv_heads = ", opt.num_kv_heads, ", head_dim = ", opt.head_dim, ")");
    };
    require(q, "q_proj", E, QD);
    require(k, "k_proj", E, KD);
    require(v, "v_proj", E, KD);
    require(o, "o_proj", QD, E);
    detail::require_arg(q.has_bias() == k.has_bias() && q.has_bias() == v.has_bias(), "attn::DecoderAttention",
                        "q_proj, k_proj and v_proj must all have a bias or none (qkv_bias)");
    opt.qkv_bias = q.has_bias();
    opt.o_bias = o.has_bias();
    return opt;
  }

  static GroupedQueryAttention<T> make_core(const DecoderAttentionOptions& o, Index H, Index Hkv) {
    return o.scale > 0 ? GroupedQueryAttention<T>(H, Hkv, static_cast<T>(o.scale)) : GroupedQueryAttention<T>(H, Hkv);
  }

  static Generator& default_gen() {
    thread_local Generator gen;
    return gen;
  }

  // L, the rows per sequence of x [B*L, E].
  Index check_x(const ConstMatrixRef<T>& x, Index B, const char* where) const {
    const Index L = x.rows() / B;
    detail::require_shape(x.rows() == B * L && L > 0 && x.cols() == E_, where, "x has shape ",
                          detail::shape(x.rows(), x.cols()), ", expected [B*L, embed_dim] = [", B, "*L, ", E_,
                          "] with L > 0");
    return L;
  }

  // Rotates q and k in place: rows of sequence b at positions start, start + 1, ...
  void rotate(Matrix<T>& q, Matrix<T>& k, Index B, Index start) const {
    if (!rope_) return;
    rope_->apply(q, H_, B, start);
    rope_->apply(k, Hkv_, B, start);
  }

  void set_options(Masks<T>& m) const {
    m.window = opt_.window;
    m.softcap = static_cast<T>(opt_.softcap);
    m.alibi_slopes = alibi_;
  }

  Matrix<T> run(const ConstMatrixRef<T>& x, Index batch, Matrix<T>* weights, const char* where) const {
    detail::require_shape(batch > 0, where, "batch must be positive, got ", batch);
    const Index L = check_x(x, batch, where);
    detail::require_arg(!rope_ || L <= rope_->max_positions(), where, "positions [0, ", L,
                        ") exceed max_positions = ", opt_.max_positions);
    Matrix<T> q = q_proj_.forward(x), k = k_proj_.forward(x), v = v_proj_.forward(x);
    rotate(q, k, batch, 0);
    GqaArgs<T> args;
    args.batch = batch;
    args.causal = Causal::BottomRight;  // L == S: the same as TopLeft
    set_options(args);
    if (!weights) return o_proj_.forward(core_.forward(q, k, v, args));
    AttentionResult<T> r = core_.forward_with_weights(q, k, v, args);
    *weights = std::move(r.weights);
    return o_proj_.forward(r.output);
  }

  void check_cache(const KVCache<T>& cache, const char* where) const {
    detail::require_shape(cache.kv_heads() == Hkv_ && cache.head_dim() == D_ && cache.value_dim() == D_, where,
                          "the cache holds ", cache.kv_heads(), " kv heads of ", cache.head_dim(), " (keys) and ",
                          cache.value_dim(), " (values), this block ", Hkv_, " of ", D_, " (make_cache() fits)");
    detail::require_arg(cache.window() == 0 || cache.window() == opt_.window, where, "the cache's window ",
                        cache.window(), " differs from this block's ", opt_.window);
  }

  Matrix<T> run_cached(const ConstMatrixRef<T>& x, KVCache<T>& cache, Index b0, Index B, Matrix<T>* weights,
                       const char* where) const {
    // Every check that could fail comes before the cache is touched.
    detail::require_arg(b0 >= 0 && b0 + B <= cache.batch(), where, "sequence ", b0,
                        " is outside the cache's batch [0, ", cache.batch(), ")");
    check_cache(cache, where);
    const Index L = check_x(x, B, where), n = cache.size(b0);
    for (Index b = b0 + 1; b < b0 + B; ++b)
      detail::require_arg(cache.size(b) == n, where, "sequences ", b0, " and ", b, " hold ", n, " and ", cache.size(b),
                          " positions; run sequences of different lengths one at a time (forward(x, cache, b))");
    // A sliding-window ring takes at most max_append() rows at a time (their queries need the
    // window before them): a longer prompt goes in chunks of that size, each appended and then
    // attended - each chunk's rows see exactly their window, as in one call over a full cache.
    const Index chunk = cache.max_append(b0);
    const bool chunked = cache.window() > 0 && L > chunk;
    detail::require_arg(L <= chunk || cache.window() > 0, where, "appending ", L, " positions to a cache that takes ",
                        chunk, " more");
    detail::require_arg(!chunked || !weights, where, "the weights of ", L,
                        " positions, which a sliding-window cache takes in chunks of at most ", chunk,
                        " (max_append()): ask for weights with at most that many");
    detail::require_arg(!rope_ || n + L <= rope_->max_positions(), where, "positions [", n, ", ", n + L,
                        ") exceed max_positions = ", opt_.max_positions);

    Matrix<T> q = q_proj_.forward(x), k = k_proj_.forward(x), v = v_proj_.forward(x);
    rotate(q, k, B, n);
    // The storage's check of every row before the first chunk goes in (each append checks only its
    // own chunk, and a refused later chunk would leave the earlier ones in the cache).
    detail::check_storable<T>(cache.storage(), k, where, "key", "cache");
    detail::check_storable<T>(cache.storage(), v, where, "value", "cache");
    CacheArgs<T> args;  // causal, bottom-right
    set_options(args);
    if (chunked) {
      Matrix<T> out(x.rows(), H_ * D_);
      for (Index r0 = 0; r0 < L; r0 += chunk) {
        const Index c = std::min(chunk, L - r0);
        // Rows [r0, r0 + c) of every sequence (sequence b's rows start at b * L).
        const auto rows = [&](const Matrix<T>& m) {
          Matrix<T> part(B * c, m.cols());
          for (Index b = 0; b < B; ++b) part.middleRows(b * c, c) = m.middleRows(b * L + r0, c);
          return part;
        };
        Matrix<T> part_out(B * c, H_ * D_);
        if (B == 1)
          cache.append(b0, rows(k), rows(v));
        else
          cache.append(rows(k), rows(v));
        core_.forward_into(rows(q), cache, B == 1 ? b0 : -1, args, part_out);
        for (Index b = 0; b < B; ++b) out.middleRows(b * L + r0, c) = part_out.middleRows(b * c, c);
      }
      return o_proj_.forward(out);
    }
    if (B == 1)
      cache.append(b0, k, v);
    else
      cache.append(k, v);
    if (weights) {
      AttentionResult<T> r = core_.forward_with_weights(q, cache, B == 1 ? b0 : -1, args);
      *weights = std::move(r.weights);
      return o_proj_.forward(r.output);
    }
    Matrix<T> out(x.rows(), H_ * D_);
    core_.forward_into(q, cache, B == 1 ? b0 : -1, args, out);
    return o_proj_.forward(out);
  }

  DecoderAttentionOptions opt_;
  Index E_ = 0, H_ = 0, Hkv_ = 0, D_ = 0;
  Linear<T> q_proj_, k_proj_, v_proj_, o_proj_;
  GroupedQueryAttention<T> core_;
  std::optional<RopeCache<T>> rope_;
  Vector<T> alibi_;  // [H], empty without ALiBi
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(DecoderAttention);
