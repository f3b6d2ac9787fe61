// attn/dist/context_parallel.hpp - attention over a sequence split across MPI ranks (context
// parallelism): ring attention, and its load-balanced causal (zig-zag) layout. Needs MPI; nothing
// else in attn includes it.
//
// Each rank holds its rows of Q, K and V (attn/dist/sharding.hpp says which). The keys and values
// travel around the ring - rank r sends its current block to r+1 and receives the next from r-1
// while it attends the current one - and each rank merges its partial results by their log-sum-exp
// (attn/merge.hpp), in the ring's fixed order: the result does not depend on message timing, and
// equals a single-process GroupedQueryAttention over the whole sequence up to rounding.
//
//   MPI_Init(&argc, &argv);
//   attn::dist::ContextParallelAttention<float> cp(MPI_COMM_WORLD, /*num_heads=*/12, /*num_kv_heads=*/4);
//   attn::dist::Sharding sh = cp.sharding(/*seq_len=*/65536, attn::dist::Layout::ZigZag);
//   attn::dist::ContextArgs<float> args;  args.batch = 1;  args.causal = attn::Causal::BottomRight;
//   attn::Matrix<float> out = cp.forward(q_local, k_local, v_local, args);  // this rank's rows
//
// Every call is collective over the communicator: every rank calls with its own rows and the same
// options. A rank's bad input makes every rank throw the same error (the failing rank named)
// before any key travels; ranks that disagree (shapes, options, local lengths that are not the
// layout's) throw on every rank too.
//
// Masks, for B sequences of L positions, H heads, the rank holding n rows per sequence:
//   causal (TopLeft and BottomRight agree: L queries, L keys), window, sink_tokens, softcap,
//   alibi_slopes [H], sinks [H], precision: the same on every rank, as in attn::Masks;
//   key_padding_mask [B, n]: the rank's own keys (they travel with them);
//   attn_mask / attn_bias [n, L] or [B*H*n, L]: the rank's query rows, every key in position order.
// Storage (attn/storage.hpp): K and V travel, and are read, in kv_storage - bf16 halves the bytes
// each rank sends, int8 quarters them (plus a scale per row and head), with the error of a KVCache
// of that storage (attn/kv_storage.hpp); keys and values exactly representable lose nothing.
#pragma once

#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/detail/storage.hpp"
#include "attn/dist/detail/mpi.hpp"
#include "attn/dist/detail/ring.hpp"
#include "attn/dist/sharding.hpp"
#include "attn/mask.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn::dist {

template <class T>
struct ContextArgs : Masks<T> {
  Index batch = 0;                 // B: rows are (b, local row), batch first; required
  Layout layout = Layout::ZigZag;  // how the sequence was split (the same on every rank)
};

template <class T>
class ContextParallelAttention {
  ATTN_CHECK_SCALAR(T);

 public:
  // Collective over comm (which it duplicates). num_kv_heads must divide num_heads; scale
  // 1 / sqrt(d), d taken from the query at each call; K and V travel in kv_storage.
  ContextParallelAttention(MPI_Comm comm, Index num_heads, Index num_kv_heads, Storage kv_storage = Storage::Native)
      : comm_(comm), H_(num_heads), Hkv_(num_kv_heads), storage_(kv_storage) {
    attn::detail::require_shape(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                                "attn::dist::ContextParallelAttention", "num_kv_heads = ", num_kv_heads,
                                " must be positive and divide num_heads = ", num_heads);
  }
  // A fixed scale (any finite value).
  ContextParallelAttention(MPI_Comm comm, Index num_heads, Index num_kv_heads, T scale,
                           Storage kv_storage = Storage::Native)
      : ContextParallelAttention(comm, num_heads, num_kv_heads, kv_storage) {
    attn::detail::require_arg(std::isfinite(scale), "attn::dist::ContextParallelAttention",
                              "scale must be finite, got ", scale);
    scale_ = scale;
    has_scale_ = true;
  }

  // The communicator the calls use: attn's duplicate of the one given.
  MPI_Comm comm() const { return comm_.get(); }
  int rank() const { return comm_.rank(); }
  int ranks() const { return comm_.size(); }
  // The split of a sequence of seq_len positions over this communicator's ranks.
  Sharding sharding(Index seq_len, Layout layout = Layout::ZigZag) const { return {seq_len, ranks(), layout}; }

  // q [B*n, H*d], k [B*n, H_kv*d], v [B*n, H_kv*dv]: this rank's n rows of each sequence  ->
  // [B*n, H*dv], the attention of these queries over every rank's keys.
  Matrix<T> forward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const ContextArgs<T>& args) const {
    const char* where = "attn::dist::ContextParallelAttention::forward";
    Matrix<T> out, lse;
    run(q, k, v, args, &out, nullptr, &lse, where);
    return out;
  }
  // The same and each row's log-sum-exp: output [B*n, H*dv], lse [H, B*n] (-inf for a row whose
  // every key is masked), as GroupedQueryAttention::forward_with_lse over the whole sequence.
  AttentionLse<T> forward_with_lse(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                   const ContextArgs<T>& args) const {
    AttentionLse<T> r;
    run(q, k, v, args, &r.output, nullptr, &r.lse, "attn::dist::ContextParallelAttention::forward_with_lse");
    return r;
  }
  // Into out [B*n, H*dv] (and lse [H, B*n]), sized by the caller.
  void forward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const ContextArgs<T>& args, MatrixRef<T> out) const {
    Matrix<T> lse;
    run(q, k, v, args, nullptr, &out, &lse, "attn::dist::ContextParallelAttention::forward_into");
  }
  void forward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const ContextArgs<T>& args, MatrixRef<T> out, MatrixRef<T> lse) const {
    run(q, k, v, args, nullptr, &out, nullptr, "attn::dist::ContextParallelAttention::forward_into", &lse);
  }

  // The bytes this rank sends in one call with these shapes: the blocks of P - 1 ranks (its own
  // first, then each it received but the last), each n rows per sequence of K and V in kv_storage,
  // int8's scales, and the key padding entries when there are any.
  std::size_t bytes_sent(const Sharding& sh, Index batch, Index d, Index dv, bool key_padding = false) const {
    const detail::RingShape s{batch, H_, Hkv_, d, dv, storage_, key_padding};
    std::size_t total = 0;
    for (int step = 0; step + 1 < sh.ranks(); ++step)
      total += detail::block_layout<T>(s, sh.local_len((rank() - step + sh.ranks()) % sh.ranks())).bytes;
    return total;
  }

  Index num_heads() const { return H_; }
  Index num_kv_heads() const { return Hkv_; }
  Storage kv_storage() const { return storage_; }
  std::optional<T> scale() const { return has_scale_ ? std::optional<T>(scale_) : std::nullopt; }
  // The arithmetic of Q K^T and P V (attn/precision.hpp) for calls that do not set Masks::precision.
  void set_precision(Precision p) { precision_ = p; }
  Precision precision() const { return precision_; }

 private:
  // What every rank must agree on, and its local row count, as integers (floats by their bits).
  enum Field : int {
    kScalar, kHeads, kKvHeads, kHeadDim, kValueDim, kBatch, kRows, kCausal, kWindow, kSinkTokens, kSoftcap,
    kAlibi, kSinks, kLayout, kStorage, kPrecision, kScale, kMaskCols, kMaskPolarity, kBiasCols, kKeyPadding,
    kKeyPaddingPolarity, kFields
  };
  static const char* field_name(int f) {
    static const char* const names[kFields] = {
        "the scalar type", "num_heads", "num_kv_heads", "the head dimension d", "the value head dimension dv",
        "batch", "local rows", "causal", "window", "sink_tokens", "softcap", "alibi_slopes", "sinks", "layout",
        "kv_storage", "precision", "scale", "attn_mask's columns", "attn_mask's polarity", "attn_bias's columns",
        "key_padding_mask (present or not)", "key_padding_mask's polarity"};
    return names[f];
  }
  template <class V>
  static std::int64_t bits_hash(const V& x) {  // FNV-1a of the bytes: equal vectors, equal hashes
    std::uint64_t h = 1469598103934665603ull;
    const auto* p = reinterpret_cast<const unsigned char*>(x.data());
    for (std::size_t i = 0; i < std::size_t(x.size()) * sizeof(T); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return std::int64_t(h ^ std::uint64_t(x.size()));
  }
  static std::int64_t bits_of(T x) {
    double y = double(x);
    std::int64_t b = 0;
    std::memcpy(&b, &y, sizeof b);
    return b;
  }

  void run(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
           const ContextArgs<T>& args, Matrix<T>* out_owned, MatrixRef<T>* out_ref, Matrix<T>* lse_owned,
           const char* where, MatrixRef<T>* lse_ref = nullptr) const {
    using attn::detail::shape;
    const int P = ranks(), me = rank();
    const Index B = args.batch;
    Index n = 0, d = 0, dv = 0;
    std::vector<std::int64_t> sig(kFields, 0);

    // 1. This rank's own checks, agreed by every rank.
    detail::agree(comm_.get(), [&] {
      attn::detail::require_batch(B, where);
      attn::detail::require_shape(q.rows() % B == 0 && q.cols() > 0 && q.cols() % H_ == 0, where, "q has shape ",
                                  shape(q.rows(), q.cols()), ", expected [B*n, H*d] = [", B, "*n, ", H_, "*d]");
      n = q.rows() / B;
      d = q.cols() / H_;
      attn::detail::require_dims(where, "k", k.rows(), k.cols(), q.rows(), Hkv_ * d, "[B*n, H_kv*d] = ",
                                 shape(q.rows(), Hkv_ * d), " (B*n and d from q)");
      attn::detail::require_shape(v.rows() == q.rows() && v.cols() > 0 && v.cols() % Hkv_ == 0, where,
                                  "v has shape ", shape(v.rows(), v.cols()), ", expected [B*n, H_kv*dv] = [",
                                  q.rows(), ", ", Hkv_, "*dv] (B*n from q)");
      dv = v.cols() / Hkv_;
      const Index E = attn::detail::checked_mul(where, "num_heads * dv", H_, dv);
      if (out_ref) attn::detail::require_dims(where, "out", out_ref->rows(), out_ref->cols(), q.rows(), E,
                                              "[B*n, H*dv] = ", shape(q.rows(), E));
      if (lse_ref) attn::detail::require_dims(where, "lse", lse_ref->rows(), lse_ref->cols(), H_, q.rows(),
                                              "[H, B*n] = ", shape(H_, q.rows()));
      const auto rows_ok = [&](const char* name, Index rows) {
        attn::detail::require_shape(rows == n || rows == B * H_ * n, where, name, " has ", rows,
                                    " rows, expected n = ", n, " (shared) or B*H*n = ", B * H_ * n,
                                    " (this rank's query rows; columns: every key, L)");
      };
      if (!args.attn_mask.empty()) rows_ok("attn_mask", args.attn_mask.rows());
      if (!args.attn_bias.empty()) rows_ok("attn_bias", args.attn_bias.rows());
      if (!args.key_padding_mask.empty())
        attn::detail::require_dims(where, "key_padding_mask", args.key_padding_mask.rows(),
                                   args.key_padding_mask.cols(), B, n, "[B, n] = ", shape(B, n),
                                   " (this rank's keys)");
      if (args.alibi_slopes.size() > 0) {
        attn::detail::require_len(where, "alibi_slopes", args.alibi_slopes.size(), H_, "[H] = [", H_, "]");
        attn::detail::require_arg(args.alibi_slopes.allFinite(), where, "alibi_slopes must be finite");
      }
      if (args.sinks.size() > 0) {
        attn::detail::require_len(where, "sinks", args.sinks.size(), H_, "[H] = [", H_, "]");
        attn::detail::require_arg(args.sinks.allFinite(), where, "sinks must be finite");
      }
      attn::detail::require_arg(args.window >= 0, where, "window must be >= 0 (0: no window), got ", args.window);
      attn::detail::require_arg(args.sink_tokens >= 0, where, "sink_tokens must be >= 0, got ", args.sink_tokens);
      attn::detail::require_arg(std::isfinite(args.softcap) && args.softcap >= T(0), where,
                                "softcap must be finite and >= 0 (0: no soft-capping), got ", args.softcap);
      attn::detail::check_storable(storage_, k, where, "k", "context-parallel call's keys");
      attn::detail::check_storable(storage_, v, where, "v", "context-parallel call's values");

      sig = {Index(sizeof(T)), H_, Hkv_, d, dv, B, n, args.causal != Causal::None, args.window, args.sink_tokens,
             bits_of(args.softcap), args.alibi_slopes.size() ? bits_hash(args.alibi_slopes) : 0,
             args.sinks.size() ? bits_hash(args.sinks) : 0, Index(args.layout), Index(storage_),
             Index(args.precision ? *args.precision : precision_), has_scale_ ? bits_of(scale_) : 0,
             args.attn_mask.empty() ? -1 : args.attn_mask.cols(),
             args.attn_mask.empty() ? -1 : Index(args.attn_mask.attend_value()),
             args.attn_bias.empty() ? -1 : args.attn_bias.cols(), Index(!args.key_padding_mask.empty()),
             args.key_padding_mask.empty() ? -1 : Index(args.key_padding_mask.attend_value())};
    });

    // 2. Every rank the same options and shapes, and local lengths that are the layout's.
    std::vector<std::int64_t> all(std::size_t(P) * kFields);
    MPI_Allgather(sig.data(), kFields, MPI_INT64_T, all.data(), kFields, MPI_INT64_T, comm_.get());
    const auto field = [&](int r, int f) { return all[std::size_t(r) * kFields + std::size_t(f)]; };
    Index L = 0;
    for (int r = 0; r < P; ++r) L += field(r, kRows);
    for (int r = 1; r < P; ++r)
      for (int f = 0; f < kFields; ++f)
        if (f != kRows && field(r, f) != field(0, f))
          detail::throw_error(1 + (f > kRows), std::string(where) + ": ranks disagree on " + field_name(f) +
                                                   ": rank 0 has " + std::to_string(field(0, f)) + ", rank " +
                                                   std::to_string(r) + " has " + std::to_string(field(r, f)) +
                                                   " (every rank must call with the same shapes and options)");
    if (L == 0) detail::throw_error(1, std::string(where) + ": every rank holds 0 rows: no sequence");
    const Sharding sh(L, P, args.layout);
    for (int r = 0; r < P; ++r)
      if (field(r, kRows) != sh.local_len(r))
        detail::throw_error(1, std::string(where) + ": rank " + std::to_string(r) + " holds " +
                                   std::to_string(field(r, kRows)) + " rows per sequence, but the " +
                                   layout_name(args.layout) + " layout of L = " + std::to_string(L) + " over " +
                                   std::to_string(P) + " ranks gives it " + std::to_string(sh.local_len(r)) +
                                   " (attn::dist::Sharding::shard splits a sequence this way)");
    for (const int f : {kMaskCols, kBiasCols})
      if (field(0, f) >= 0 && field(0, f) != L)
        detail::throw_error(1, std::string(where) + ": " + (f == kMaskCols ? "attn_mask" : "attn_bias") + " has " +
                                   std::to_string(field(0, f)) + " columns, expected L = " + std::to_string(L) +
                                   " (every key of the sequence, in position order)");

    // 3. The ring.
    detail::RingShape s{B, H_, Hkv_, d, dv, storage_, !args.key_padding_mask.empty()};
    std::size_t block_bytes = 0;
    for (int r = 0; r < P; ++r) block_bytes = std::max(block_bytes, detail::block_layout<T>(s, sh.local_len(r)).bytes);
    // Cache-line aligned: K and V rows at malloc's 16-byte offset straddled cache lines, and the
    // kernels ran 15-30 % slower on them (one causal 32k-token head on a Zen 3: 2.3 s aligned, 2.7-3.4 s not).
    std::vector<detail::CacheLine> blocks[2];
    detail::agree(comm_.get(), [&] {
      blocks[0].resize(block_bytes / sizeof(detail::CacheLine));
      if (P > 1) blocks[1].resize(block_bytes / sizeof(detail::CacheLine));
      if (out_owned) out_owned->resize(B * n, H_ * dv);
      if (lse_owned) lse_owned->resize(H_, B * n);
    });
    unsigned char* const bufs[2] = {reinterpret_cast<unsigned char*>(blocks[0].data()),
                                    reinterpret_cast<unsigned char*>(blocks[1].data())};
    MatrixRef<T> out = out_owned ? MatrixRef<T>(*out_owned) : *out_ref;
    MatrixRef<T> lse = lse_owned ? MatrixRef<T>(*lse_owned) : *lse_ref;

    detail::RingMasks<T> m;
    m.causal = args.causal != Causal::None;
    m.window = std::min(args.window, 2 * L);  // |a - j| < L: a wider window is no window
    m.sink_tokens = std::min(args.sink_tokens, L);
    m.softcap = args.softcap;
    m.alibi_slopes = args.alibi_slopes.size() ? args.alibi_slopes.data() : nullptr;
    m.sinks = args.sinks.size() ? args.sinks.data() : nullptr;
    m.masks = &args;
    m.key_padding_attends = args.key_padding_mask.empty() ? false : args.key_padding_mask.attend_value();
    m.precision = args.precision ? *args.precision : precision_;
    m.scale = has_scale_ ? scale_ : T(1) / std::sqrt(static_cast<T>(d));

    detail::pack_block<T>(s, k, v, args.key_padding_mask.empty() ? nullptr : args.key_padding_mask.data(),
                          bufs[0]);
    std::optional<detail::RingAccumulator<T>> acc;
    detail::agree(comm_.get(), [&] { acc.emplace(sh, me, s, m, q, out, lse); });  // its scratch may not fit
    std::vector<MPI_Request> reqs;
    int cur = 0;
    for (int step = 0; step < P; ++step) {
      const int src = (me - step + P) % P;
      reqs.clear();
      if (step + 1 < P) {
        const int next_src = (src - 1 + P) % P;
        detail::post_recv(comm_, bufs[1 - cur], detail::block_layout<T>(s, sh.local_len(next_src)).bytes,
                          (me - 1 + P) % P, reqs);
        detail::post_send(comm_, bufs[cur], detail::block_layout<T>(s, sh.local_len(src)).bytes,
                          (me + 1) % P, reqs);
      }
      // MPI moves a large message only while a rank is inside an MPI call (on most transports):
      // testing between block pairs lets the next block travel during this one's compute.
      acc->attend(bufs[cur], src, [&] {
        int done = 0;
        if (!reqs.empty()) MPI_Testall(int(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE);
      });
      if (!reqs.empty()) MPI_Waitall(int(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE);
      cur = 1 - cur;
    }
    acc->finish();
  }

  detail::Comm comm_;
  Index H_ = 0, Hkv_ = 0;
  Storage storage_ = Storage::Native;
  T scale_ = T(0);  // when has_scale_ (a plain T and a flag: see ScaledDotProductAttention)
  bool has_scale_ = false;
  Precision precision_ = Precision::Native;
};

}  // namespace attn::dist
