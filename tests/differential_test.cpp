// tests/differential_test.cpp - seeded randomized differential tests of the public attention API.
//
// One case = one seed. From the seed come, in this order, the API, the scalar type, the thread
// count, the shapes, the masks and score options, RoPE and the data, so a seed replays its case
// exactly. The cases go through the public classes - and so through every kernel the dispatch
// point (detail/attention.hpp) picks: flash, decode (at most 4 queries per head, some against more
// than one 512-key chunk), and blocked (whenever weights are asked for):
//
//   seed % 5 == 0   ScaledDotProductAttention: forward, forward_into (strided output),
//                   forward_with_weights; L, S 1..~320 (and 1..4 queries against 513..1200 keys)
//   seed % 5 == 1   GroupedQueryAttention: B 1..3, H_kv dividing H (multi-query included), forward
//                   and forward_into
//   seed % 5 == 2   MultiHeadAttention: kdim/vdim, bias, add_bias_kv, add_zero_attn, both row
//                   orders, fused self-attention, fused key/value, need_weights averaged or per head
//   seed % 5 == 3   GroupedQueryAttention over a KVCache (full or sliding-window ring): a prefill of
//                   P rows, then the rest in chunks (decoding steps among them), per sequence or the
//                   whole batch at once, held to the full causal forward
//   seed % 5 == 4   Serving (GroupedQueryAttention over ragged batches; see run_serving): B 1..6
//                   sequences of their own lengths (keys 1..~320, some decoding against 513..900;
//                   some without queries), packed (forward_varlen, _with_lse, _into with or without
//                   lse; causal per sequence), in a KVCache of different lengths (forward_varlen, or
//                   forward when every sequence has the same queries), or in a PagedKVCache (page
//                   size 1..64, forks sharing prefix pages and copying on write, a freed sequence,
//                   Native / bf16 / fp16 / int8 storage); with attention sinks (Masks::sinks) and
//                   sink tokens beside the options below (no bool masks, bias or padding: a ragged
//                   batch refuses them, which a few cases check). Besides the oracle (output and
//                   each row's log-sum-exp): every sequence equals a call with it alone bitwise,
//                   bf16 / fp16 storage of representable K and V equals Native storage bitwise,
//                   and merge_attention_states of one sequence's keys split in 2 or 3 ranges equals
//                   the unsplit call (1e-6 float, 1e-12 double, relative)
//
// with every mask kind and combination (bool attn_mask of either polarity, [L, S] or per head
// [B*H*L, S], owned, viewed or over a raw buffer; additive attn_bias with -inf entries; key padding,
// trailing or scattered, sometimes every key; causal TopLeft / BottomRight; a sliding window, up to
// Index's max; softcap; ALiBi, standard or random slopes), a fixed scale (0 included) or the
// default, RoPE (NeoX or GPT-J, partial rotary dims, start offsets or per-row positions) applied to
// q and k before attention, strided inputs, 1 or 2 threads (attn::set_num_threads), float or double.
//
// The oracle is written here, independently of the library: a naive loop in double over the same
// inputs (the float inputs widened exactly), following the semantics attn/mask.hpp documents
// (soft-cap, then the masks, then ALiBi and the bias; a fully masked row is zeros), with RoPE, the
// MHA projections and the KV-cache sequence recomputed in double too; with gpt-oss's sinks (a
// logit per head in every row's denominator, no value) and StreamingLLM's sink tokens for the
// serving cases, and each row's log-sum-exp (-inf for a row that attends nothing, the sink's logit
// with a sink). For the attention-core cases it is itself cross-checked against
// detail::attention_reference in double (1e-12).
// Tolerance: |actual - expected| <= floor * max(1, max|expected|) + K * eps(T) * cond * max(1, max|v|),
// floor 1e-5 (float) or 1e-12 (double), K = 4, cond = 1 + the largest |logit| the inputs can give
// (scale * max|q_i| * max|k_j| + |ALiBi| + |bias|) - the scale of the logits' rounding errors (MHA
// adds its projections' and out_proj's). The worst case seen is about 0.55 of K = 1's bound.
// A quarter of the cases run the core under Precision::BFloat16 (per call: Masks::precision); their
// tolerance adds attn/precision.hpp's stated bound, bf16_attention_error_bound (times out_proj's
// row L1 norm for MHA), with delta from the same norms as cond. An int8 paged cache adds
// attn/kv_storage.hpp's kv_storage_error_bound (the oracle has the unrounded K and V). The lse is
// held to floor * max(1, max|lse|) + K * eps(T) * (cond + log(S + 1)), plus the largest change of
// a logit under bf16 products or int8 keys (their bounds' delta).
// Beyond closeness: a fully masked row is exactly 0, a masked key weighs exactly 0, and for a
// quarter of the cases the other thread count gives the same bits.
//
// Counts: 5000 cases (1000 per API) in optimized builds: 32 s on this repository's 2-core machine
// (AMD Zen 3, quiet; Serving's 1000: 4.5 s); 300 (60 per API) in unoptimized or sanitizer builds,
// which are there for memory errors and undefined behaviour on every path, not numerics (the
// optimized build's 5000 are): ASAN_MINUTES in the Debug ASan+UBSan build.
// ATTN_DIFF_CASES=<n> sets the count; ATTN_DIFF_VERBOSE=1 prints every configuration.
//
// Replay one case (its seed is printed with the configuration on failure):
//   ATTN_DIFF_SEED=<seed> build/tests/differential_test
// Explore other cases: ATTN_DIFF_BASE_SEED=<n> (default 20261125; CI always runs the same cases).
// The cases are reproducible on one standard library (std::mt19937_64 and the distributions of
// libstdc++); another may draw other cases from the same seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "attn/attn.hpp"
#include "attn/detail/attention_reference.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Causal;
using attn::Index;
using attn::RopeStyle;
template <class T>
using Mat = attn::Matrix<T>;

// --- seeds and counts ------------------------------------------------------------------------------

constexpr bool kSanitized = attn_test::kSanitized;
#if defined(__OPTIMIZE__) && defined(NDEBUG)
constexpr bool kOptimized = true;
#else
constexpr bool kOptimized = false;
#endif
constexpr int kDefaultCases = kOptimized && !kSanitized ? 5000 : 300;
constexpr std::uint64_t kDefaultBaseSeed = 20261125;

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}
std::uint64_t base_seed() {
  const char* v = env("ATTN_DIFF_BASE_SEED");
  return v ? std::strtoull(v, nullptr, 10) : kDefaultBaseSeed;
}
int case_count() {
  const char* v = env("ATTN_DIFF_CASES");
  return v ? std::atoi(v) : kDefaultCases;
}
bool verbose() { return env("ATTN_DIFF_VERBOSE") != nullptr; }

enum class Api { Sdpa = 0, Gqa = 1, Mha = 2, Cache = 3, Serving = 4 };
constexpr std::uint64_t kApis = 5;
const char* api_name(Api a) {
  switch (a) {
    case Api::Sdpa:
      return "ScaledDotProductAttention";
    case Api::Gqa:
      return "GroupedQueryAttention";
    case Api::Mha:
      return "MultiHeadAttention";
    case Api::Cache:
      return "GroupedQueryAttention+KVCache";
    case Api::Serving:
      return "Serving";
  }
  return "?";
}
Api api_of(std::uint64_t seed) { return static_cast<Api>(seed % kApis); }

// --- random choices --------------------------------------------------------------------------------

using attn_test::Rng;

// Sequence lengths: mostly small, decode-sized (1..4) often, primes, and up to ~320 (past the flash
// kernel's 192-row query blocks and 256-key blocks).
Index seq_len(Rng& r) {
  static const Index primes[] = {2, 3, 5, 7, 11, 13, 17, 31, 37, 61, 67, 97, 127, 131, 193, 197, 251, 257};
  const double u = r.uniform(0, 1);
  if (u < 0.15) return r.pick(1, 4);
  if (u < 0.45) return r.pick(5, 24);
  if (u < 0.62) return r.one_of(primes);
  if (u < 0.87) return r.pick(25, 100);
  return r.pick(101, 320);
}
// Head dimensions: small ones, primes, the micro-kernels' tile edges, model sizes.
Index head_dim(Rng& r) {
  static const Index odd[] = {1, 2, 3, 5, 7, 13, 17, 31, 33, 47, 63, 65, 97};
  static const Index model[] = {16, 32, 64, 80, 96, 128};
  const double u = r.uniform(0, 1);
  if (u < 0.45) return r.pick(1, 16);
  if (u < 0.65) return r.one_of(odd);
  if (u < 0.85) return r.one_of(model);
  return r.pick(17, 160);
}

// --- the configuration -----------------------------------------------------------------------------

struct Config {
  std::uint64_t seed = 0;
  Api api = Api::Sdpa;
  bool dbl = false;  // double, else float
  int threads = 1;
  int call = 0;  // Sdpa: 0 forward, 1 forward_into, 2 forward_with_weights; Gqa: 0 forward, 1 forward_into;
                 // Serving: 0..3, the entry point of run_serving's mode
  Index B = 1, H = 1, Hkv = 1, L = 1, S = 1, d = 1, dv = 1;
  int scale_kind = 0;  // 0: default 1/sqrt(d), 1: fixed, 2: fixed 0
  double scale = 0;
  double q_amp = 1, k_amp = 1;  // input magnitudes (peaky softmax when large)
  // masks
  int mask_kind = 0;  // 0 none, 1 [L, S], 2 [B*H*L, S]
  bool mask_attend = true;
  int mask_store = 0;  // 0 copy of a matrix, 1 attn::view of it, 2 attn::view of its raw buffer
  double mask_density = 0.8;
  int bias_kind = 0;  // 0 none, 1 [L, S], 2 [B*H*L, S]
  double bias_amp = 1;
  int padding = 0;  // 0 none, 1 trailing, 2 scattered
  bool padding_attend = false;
  Causal causal = Causal::None;
  Index window = 0;
  double softcap = 0;
  int alibi = 0;  // 0 none, 1 standard, 2 random
  // RoPE (attention core and cache cases)
  bool rope = false;
  RopeStyle rope_style = RopeStyle::NeoX;
  Index rotary_dim = 0;
  double rope_base = 10000;
  bool rope_positions = false;  // per-row positions vector, else start offsets
  Index q_start = 0, k_start = 0;
  bool strided = false;  // inputs passed as blocks of wider matrices
  // MHA
  Index E = 0, kdim = 0, vdim = 0;
  bool bias = true, add_bias_kv = false, add_zero_attn = false, batch_first = false;
  int mha_inputs = 2;  // 0 self (one matrix), 1 key = value (one matrix), 2 separate
  bool need_weights = false, average = true;
  // KV cache
  Index positions = 0;  // N: positions per sequence
  Index prefill = 0, chunk_max = 1, capacity = 0, cache_window = 0, args_window = 0;
  bool whole_batch = false;
  // Serving: packed sequences (forward_varlen), a KVCache of sequences of different lengths, or a
  // PagedKVCache; per sequence its queries lq and keys lk (its cache positions).
  int serve = 0;  // 0 packed, 1 KVCache, 2 PagedKVCache
  std::vector<Index> lq, lk;
  bool sinks = false;
  double sink_amp = 1;
  Index sink_tokens = 0;
  attn::KVStorage storage = attn::KVStorage::Native;  // the paged cache's
  Index page_size = 0, chunk = 1;                     // paged and KVCache appends: chunks of 1..chunk rows
  bool refuse = false;  // also check that a per-key mask is refused
  bool merge = false;   // also check merge_attention_states over a split of one sequence's keys
  bool recheck_threads = false;
  bool bf16 = false;  // Precision::BFloat16 for the attention core (per call)

  std::string describe() const {
    std::ostringstream s;
    const char* causal_names[] = {"None", "TopLeft", "BottomRight"};
    s << "seed=" << seed << " api=" << api_name(api) << " T=" << (dbl ? "double" : "float") << " threads=" << threads
      << " call=" << call << " B=" << B << " H=" << H << " H_kv=" << Hkv << " L=" << L << " S=" << S << " d=" << d
      << " dv=" << dv << " scale=" << (scale_kind == 0 ? std::string("default") : std::to_string(scale))
      << " q_amp=" << q_amp << " k_amp=" << k_amp << " mask=" << mask_kind << (mask_attend ? "/attend" : "/ignore")
      << "/store" << mask_store << "/density" << mask_density << " bias=" << bias_kind << "/amp" << bias_amp
      << " padding=" << padding << (padding_attend ? "/attend" : "/ignore") << " causal=" << causal_names[int(causal)]
      << " window=" << window << " softcap=" << softcap << " alibi=" << alibi << " strided=" << strided;
    if (rope)
      s << " rope=" << (rope_style == RopeStyle::NeoX ? "NeoX" : "GPTJ") << "/R" << rotary_dim << "/base" << rope_base
        << (rope_positions ? "/positions" : "/start") << "/q" << q_start << "/k" << k_start;
    if (api == Api::Mha)
      s << " E=" << E << " kdim=" << kdim << " vdim=" << vdim << " bias=" << bias << " add_bias_kv=" << add_bias_kv
        << " add_zero_attn=" << add_zero_attn << " batch_first=" << batch_first << " inputs="
        << (mha_inputs == 0 ? "self" : mha_inputs == 1 ? "kv-shared" : "separate") << " need_weights=" << need_weights
        << " average=" << average;
    if (api == Api::Serving) {
      const char* serve_names[] = {"packed", "KVCache", "PagedKVCache"};
      s << " serve=" << serve_names[serve] << " storage=" << attn::storage_name(storage) << " page_size=" << page_size
        << " chunk=" << chunk << " sinks=" << sinks << "/amp" << sink_amp << " sink_tokens=" << sink_tokens
        << " refuse=" << refuse << " merge=" << merge << " lq/lk=";
      for (std::size_t b = 0; b < lq.size(); ++b) s << (b ? "," : "") << lq[b] << "/" << lk[b];
    }
    if (api == Api::Cache)
      s << " N=" << positions << " prefill=" << prefill << " chunk_max=" << chunk_max << " capacity=" << capacity
        << " cache_window=" << cache_window << " args_window=" << args_window << " whole_batch=" << whole_batch;
    s << " recheck_threads=" << recheck_threads << " precision=" << (bf16 ? "bf16" : "native");
    return s.str();
  }
};

// The masks and score options, shared by the attention-core and MHA cases (S: the masked keys).
void draw_masks(Rng& r, Config& c, bool per_head_ok) {
  c.mask_kind = r.coin(0.6) ? 0 : per_head_ok && r.coin(0.4) ? 2 : 1;
  c.mask_attend = r.coin(0.5);
  c.mask_store = int(r.pick(0, 2));
  c.mask_density = r.coin(0.7) ? 0.85 : r.coin(0.5) ? 0.5 : 0.1;
  c.bias_kind = r.coin(0.65) ? 0 : per_head_ok && r.coin(0.4) ? 2 : 1;
  c.bias_amp = r.coin(0.8) ? 1 : 20;
  c.padding = r.coin(0.65) ? 0 : r.coin(0.6) ? 1 : 2;
  c.padding_attend = r.coin(0.3);
  const int causal = int(r.pick(0, 2));
  c.causal = causal == 0 ? Causal::None : causal == 1 ? Causal::TopLeft : Causal::BottomRight;
  if (r.coin(0.25)) c.window = r.coin(0.1) ? std::numeric_limits<Index>::max() : r.pick(1, c.S + c.L + 2);
  if (r.coin(0.2)) c.softcap = r.uniform(0.5, 30);
  if (r.coin(0.2)) c.alibi = r.coin(0.5) ? 1 : 2;
}

void draw_rope(Rng& r, Config& c) {
  c.rope = c.d >= 2 && r.coin(0.3);
  if (!c.rope) return;
  c.rope_style = r.coin(0.5) ? RopeStyle::NeoX : RopeStyle::GPTJ;
  const Index even = c.d / 2 * 2;
  c.rotary_dim = r.coin(0.6) ? (c.d % 2 == 0 ? 0 : even) : 2 * r.pick(1, c.d / 2);
  c.rope_base = r.coin(0.7) ? 10000.0 : r.coin(0.5) ? 500000.0 : 100.0;
  c.rope_positions = r.coin(0.4);
  c.k_start = r.coin(0.5) ? 0 : r.pick(0, 2000);
  c.q_start = r.coin(0.6) ? c.k_start + c.S - c.L : r.pick(0, 2000);  // bottom-right alignment, or any
  if (c.q_start < 0) c.q_start = 0;
}

// Keeps the naive double reference affordable: B*H*L*S*(d+dv) at most ~2e7 multiply-adds.
void cap_work(Config& c, double cap) {
  const auto work = [&] { return double(c.B * c.H) * double(c.L) * double(c.S) * double(c.d + c.dv); };
  while (work() > cap) {
    const Index group = c.H / c.Hkv;
    if (c.B > 1) {
      c.B = (c.B + 1) / 2;
    } else if (c.Hkv > 1) {
      c.Hkv = (c.Hkv + 1) / 2;
      c.H = c.Hkv * group;
    } else if (group > 1) {
      c.H = (group + 1) / 2;
    } else if (c.d + c.dv > 48) {
      c.d = (c.d + 1) / 2;
      c.dv = (c.dv + 1) / 2;
    } else if (c.L >= c.S) {
      c.L = (c.L + 1) / 2;
    } else {
      c.S = (c.S + 1) / 2;
    }
  }
}

// Grouped-query heads (multi-query included) and head dims, for the cache and serving cases.
void draw_heads(Rng& r, Config& c) {
  const Index group = r.coin(0.4) ? 1 : r.pick(2, 4);
  c.Hkv = r.coin(0.3) ? 1 : r.pick(2, 3);
  c.H = c.Hkv * group;
  c.d = head_dim(r);
  c.dv = r.coin(0.6) ? c.d : head_dim(r);
}

Config draw_config(std::uint64_t seed) {
  Rng r(seed);
  Config c;
  c.seed = seed;
  c.api = api_of(seed);
  c.dbl = r.coin(0.4);
  c.threads = r.coin(0.5) ? 1 : 2;
  c.recheck_threads = r.coin(0.25);
  c.q_amp = r.coin(0.8) ? 1 : 3;
  c.k_amp = r.coin(0.8) ? 1 : 3;
  if (c.api == Api::Sdpa || c.api == Api::Gqa) {
    if (c.api == Api::Gqa) {
      c.B = r.coin(0.5) ? 1 : r.pick(2, 3);
      const Index group = r.coin(0.35) ? 1 : r.coin(0.5) ? r.pick(2, 4) : r.pick(5, 8);  // group H / H_kv
      c.Hkv = r.coin(0.3) ? 1 : r.pick(2, 4);                                            // 1: multi-query
      c.H = c.Hkv * group;
    }
    if (r.coin(0.08)) {  // decoding steps against more than one of the decode kernel's 512-key chunks
      c.L = r.pick(1, 4);
      c.S = r.pick(513, 1200);
    } else {
      c.L = seq_len(r);
      c.S = r.coin(0.3) ? c.L : seq_len(r);
    }
    c.d = head_dim(r);
    c.dv = r.coin(0.5) ? c.d : head_dim(r);
    cap_work(c, 2e7);
    c.call = int(r.pick(0, c.api == Api::Sdpa ? 2 : 1));
    c.scale_kind = r.coin(0.6) ? 0 : r.coin(0.85) ? 1 : 2;
    c.scale = c.scale_kind == 1 ? r.uniform(0.05, 2.0) : 0.0;
    draw_masks(r, c, c.api == Api::Gqa);
    draw_rope(r, c);
    c.strided = r.coin(0.3);
  } else if (c.api == Api::Mha) {
    c.B = r.coin(0.5) ? 1 : r.pick(2, 3);
    c.H = c.Hkv = r.coin(0.3) ? 1 : r.pick(2, 6);
    c.d = c.dv = r.coin(0.7) ? r.pick(1, 16) : r.pick(17, 40);
    c.mha_inputs = int(r.pick(0, 2));
    c.L = r.coin(0.2) ? r.pick(1, 4) : seq_len(r);
    c.S = c.mha_inputs == 0 ? c.L : r.coin(0.3) ? c.L : seq_len(r);
    cap_work(c, 1e7);  // H_kv = H: B, H, L and S may shrink, then E = H * D
    if (c.mha_inputs == 0) c.S = c.L = std::min(c.L, c.S);
    c.E = c.H * c.d;
    if (c.mha_inputs == 2 && r.coin(0.5)) {  // separate q/k/v_proj_weight
      c.kdim = r.coin(0.3) ? c.E : r.pick(1, 48);
      c.vdim = r.coin(0.3) ? c.E : r.pick(1, 48);
    } else {
      c.kdim = c.vdim = c.E;
    }
    c.bias = r.coin(0.8);
    c.add_bias_kv = r.coin(0.25);
    c.add_zero_attn = r.coin(0.25);
    c.batch_first = r.coin(0.5);
    c.need_weights = r.coin(0.4);
    c.average = r.coin(0.5);
    draw_masks(r, c, true);
    c.strided = r.coin(0.3);
  } else if (c.api == Api::Serving) {
    // A serving step: up to 6 sequences of their own lengths (up to ~320 keys, a few decoding
    // against 513..900, past the decode kernel's 512-key chunk), many of them decoding (1..4
    // queries), some without queries (left out of the step).
    c.serve = int(r.pick(0, 2));
    c.call = int(r.pick(0, 3));
    c.B = r.coin(0.2) ? 1 : r.pick(2, 6);
    draw_heads(r, c);
    for (Index b = 0; b < c.B; ++b) {
      const Index S = r.coin(0.05) ? r.pick(513, 900) : r.coin(0.4) ? r.pick(1, 40) : seq_len(r);
      Index L = 0;
      if (S > 320)
        L = r.pick(1, 4);
      else if (c.serve == 0)  // packed: any L, more queries than keys included
        L = r.coin(0.15) ? 0 : r.coin(0.5) ? r.pick(1, 4) : seq_len(r);
      else  // a cache: the newest L of its S positions
        L = r.coin(0.15) ? 0 : r.coin(0.5) ? std::min(S, r.pick(1, 4)) : r.pick(1, S);
      c.lk.push_back(S);
      c.lq.push_back(L);
    }
    const bool equal = c.serve == 1 && c.call >= 2;  // forward(q, cache): every sequence L queries
    if (equal) {
      const Index shortest = *std::min_element(c.lk.begin(), c.lk.end());
      const Index L = r.coin(0.6) ? std::min(shortest, r.pick(1, 4)) : r.pick(1, shortest);
      std::fill(c.lq.begin(), c.lq.end(), L);
    }
    // Keeps the oracle affordable (and the 1000 cases within seconds): sum_b H * L_b * S_b * (d + dv)
    // at most 3e6 multiply-adds, shrinking the head dims, then the heads, then the longest sequence.
    const auto work = [&] {
      double w = 0;
      for (Index b = 0; b < c.B; ++b) w += double(c.lq[std::size_t(b)]) * double(c.lk[std::size_t(b)]);
      return w * double(c.H) * double(c.d + c.dv);
    };
    while (work() > 3e6) {
      if (c.d + c.dv > 64) {
        c.d = (c.d + 1) / 2, c.dv = (c.dv + 1) / 2;
      } else if (c.H > c.Hkv) {
        c.H = c.Hkv * ((c.H / c.Hkv + 1) / 2);
      } else if (c.Hkv > 1) {
        c.H = c.Hkv = (c.Hkv + 1) / 2;
      } else {
        std::size_t big = 0;
        for (std::size_t b = 1; b < c.lq.size(); ++b)
          if (c.lq[b] * c.lk[b] > c.lq[big] * c.lk[big]) big = b;
        Index& L = c.lq[big];
        Index& S = c.lk[big];
        if (S > 4 && (c.serve == 0 || S > L)) {
          S = std::max((S + 1) / 2, c.serve == 0 ? Index(1) : L);
        } else if (equal) {
          for (Index& l : c.lq) l = (l + 1) / 2;
        } else {
          L = (L + 1) / 2;
        }
      }
    }
    c.L = *std::max_element(c.lq.begin(), c.lq.end());
    c.S = *std::max_element(c.lk.begin(), c.lk.end());
    c.scale_kind = r.coin(0.7) ? 0 : 1;
    c.scale = c.scale_kind == 1 ? r.uniform(0.05, 2.0) : 0.0;
    // The merge check splits one sequence's keys: positions would move, so no causal, window or ALiBi.
    c.merge = r.coin(0.2);
    if (!c.merge) {
      const int causal = int(r.pick(0, 3));  // caches: BottomRight or None; packed: TopLeft as well
      c.causal = causal == 0 ? Causal::None : causal == 1 && c.serve == 0 ? Causal::TopLeft : Causal::BottomRight;
      if (r.coin(0.3)) c.window = r.coin(0.1) ? std::numeric_limits<Index>::max() : r.pick(1, c.S + 2);
      if (r.coin(0.2)) c.alibi = r.coin(0.5) ? 1 : 2;
      if ((c.window > 0 && r.coin(0.5)) || r.coin(0.05)) c.sink_tokens = r.pick(1, 6);
    }
    c.sinks = r.coin(0.35);
    c.sink_amp = r.coin(0.7) ? 1 : 4;
    if (r.coin(0.2)) c.softcap = r.uniform(0.5, 30);
    if (c.serve == 2) {
      const double u = r.uniform(0, 1);
      c.storage = u < 0.6    ? attn::KVStorage::Native
                  : u < 0.75 ? attn::KVStorage::BFloat16
                  : u < 0.9  ? attn::KVStorage::Float16
                             : attn::KVStorage::Int8;
      static const Index pages[] = {1, 2, 3, 5, 7, 16, 32, 64};
      c.page_size = r.coin(0.4) ? r.one_of(pages) : r.pick(1, 64);
    }
    c.chunk = r.coin(0.5) ? r.pick(1, 4) : r.pick(5, 64);
    c.refuse = r.coin(0.05);
    c.strided = c.serve == 0 && r.coin(0.3);
  } else {  // KV cache
    c.B = r.coin(0.6) ? 1 : r.pick(2, 3);
    draw_heads(r, c);
    c.positions = r.coin(0.7) ? r.pick(1, 80) : r.pick(81, 300);
    c.L = c.S = c.positions;
    cap_work(c, 2e7);
    c.positions = c.L = c.S = std::min(c.L, c.S);
    const Index N = c.positions;
    c.cache_window = r.coin(0.35) ? r.pick(1, N + 2) : 0;
    if (c.cache_window > 0) {
      c.capacity = c.cache_window + (r.coin(0.5) ? 0 : r.pick(1, 40));
    } else {
      c.capacity = N + r.pick(0, 10);
    }
    const Index max_append = c.cache_window > 0 ? c.capacity - c.cache_window + 1 : c.capacity;
    c.prefill = std::min(max_append, r.coin(0.2) ? Index(0) : r.pick(1, N));
    c.chunk_max = std::min(max_append, r.coin(0.6) ? Index(1) : r.pick(1, 8));
    c.args_window = r.coin(0.2) ? r.pick(1, c.cache_window > 0 ? c.cache_window : N + 1) : 0;
    c.whole_batch = c.B > 1 && r.coin(0.5);
    c.scale_kind = r.coin(0.7) ? 0 : 1;
    c.scale = c.scale_kind == 1 ? r.uniform(0.05, 2.0) : 0.0;
    c.causal = Causal::BottomRight;
    if (r.coin(0.2)) c.softcap = r.uniform(0.5, 30);
    if (r.coin(0.2)) c.alibi = r.coin(0.5) ? 1 : 2;
    c.L = c.S = N;
    draw_rope(r, c);
    c.q_start = c.k_start = 0;  // the cache's positions: 0 .. N-1
    c.rope_positions = false;
  }
  // A quarter of each API's cases run the attention core in bf16 (per call); decided without a draw,
  // so that a case draws the same inputs under either precision.
  c.bf16 = (seed / kApis) % 4 == 1;
  return c;
}

// --- the oracle: attention in double, from the documented semantics --------------------------------

// Attention of B sequences and H heads in double. q [B][H][L][d], k [B][Hkv][S][d], v [B][Hkv][S][dv],
// canonical and packed; keys [0, mask_keys) take the masks, keys past them (MHA's extra keys) none.
struct Naive {
  Index B = 1, H = 1, Hkv = 1, L = 0, S = 0, mask_keys = 0, d = 0, dv = 0;
  std::vector<double> q, k, v;
  double scale = 1, softcap = 0;
  Causal causal = Causal::None;
  Index window = 0;
  std::vector<double> slopes;  // [H] or empty
  std::vector<double> sinks;   // [H] or empty: a logit per head in every row's denominator, with no value
  Index sink_tokens = 0;       // keys [0, sink_tokens) are exempt from the window

  double& Q(Index b, Index h, Index i, Index c) { return q[std::size_t(((b * H + h) * L + i) * d + c)]; }
  double& K(Index b, Index h, Index j, Index c) { return k[std::size_t(((b * Hkv + h) * S + j) * d + c)]; }
  double& V(Index b, Index h, Index j, Index c) { return v[std::size_t(((b * Hkv + h) * S + j) * dv + c)]; }
  void size() {
    q.assign(std::size_t(B * H * L * d), 0.0);
    k.assign(std::size_t(B * Hkv * S * d), 0.0);
    v.assign(std::size_t(B * Hkv * S * dv), 0.0);
  }

  // out [B][H][L][dv]; weights [B][H][L][S]; masked [B][H][L][S] (the logit is -inf); empty
  // [B][H][L] (every key masked); lse [B][H][L], log(sum_j exp(s_j) + exp(sink)): -inf for an empty
  // row without a sink, the sink's logit with one. allowed(b, h, i, j): the bool mask and key
  // padding; bias(b, h, i, j).
  std::vector<double> out, weights, lse;
  std::vector<char> masked, empty;
  double cond = 1;   // 1 + the largest |logit| the inputs can give (and |sink|), for the tolerance
  double logit = 0;  // |scale| * max ||q_i|| * max ||k_j||: bounds scale * sum_t |q_t k_t| (bf16 cases)
  double q_l1 = 0, k_abs = 0;  // max ||q_i||_1 and max |k_jc| (the int8 storage bound)

  template <class Allowed, class Bias>
  void run(Allowed allowed, Bias bias) {
    out.assign(std::size_t(B * H * L * dv), 0.0);
    weights.assign(std::size_t(B * H * L * S), 0.0);
    masked.assign(std::size_t(B * H * L * S), 0);
    empty.assign(std::size_t(B * H * L), 0);
    lse.assign(std::size_t(B * H * L), -std::numeric_limits<double>::infinity());
    std::vector<double> s(static_cast<std::size_t>(S));
    double max_q = 0, max_k = 0, max_extra = 0, max_sink = 0;
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h) {
        const Index kh = h / (H / Hkv);
        for (Index i = 0; i < L; ++i) {
          double nq = 0, l1 = 0;
          for (Index c = 0; c < d; ++c) nq += Q(b, h, i, c) * Q(b, h, i, c), l1 += std::abs(Q(b, h, i, c));
          max_q = std::max(max_q, std::sqrt(nq));
          q_l1 = std::max(q_l1, l1);
          // Query i sits at a = i (TopLeft) or i + mask_keys - L (bottom-right, also without causal).
          const Index a = causal == Causal::TopLeft ? i : i + mask_keys - L;
          double m = -std::numeric_limits<double>::infinity();
          for (Index j = 0; j < S; ++j) {
            double dot = 0, nk = 0;
            for (Index c = 0; c < d; ++c) {
              dot += Q(b, h, i, c) * K(b, kh, j, c);
              nk += K(b, kh, j, c) * K(b, kh, j, c);
              k_abs = std::max(k_abs, std::abs(K(b, kh, j, c)));
            }
            max_k = std::max(max_k, std::sqrt(nk));
            double x = scale * dot;
            if (softcap > 0) x = softcap * std::tanh(x / softcap);
            if (j < mask_keys) {
              bool ok = allowed(b, h, i, j);
              if (causal != Causal::None && j > a) ok = false;
              if (window > 0 && j >= sink_tokens && (a - j >= window || j - a >= window)) ok = false;
              if (!ok) {
                x = -std::numeric_limits<double>::infinity();
              } else {
                double extra = 0;
                if (!slopes.empty()) extra += slopes[std::size_t(h)] * double(j - a);
                const double bj = bias(b, h, i, j);
                extra += bj;
                x += extra;
                if (std::isfinite(bj)) max_extra = std::max(max_extra, std::abs(extra));
              }
            }
            s[std::size_t(j)] = x;
            m = std::max(m, x);
          }
          const std::size_t row = std::size_t((b * H + h) * L + i);
          for (Index j = 0; j < S; ++j)
            masked[row * std::size_t(S) + std::size_t(j)] = s[std::size_t(j)] == -std::numeric_limits<double>::infinity();
          // A sink's logit joins the denominator: the max is taken over it too, and it has no value.
          const bool sink = !sinks.empty();
          const double sink_logit = sink ? sinks[std::size_t(h)] : 0.0;
          if (sink) max_sink = std::max(max_sink, std::abs(sink_logit));
          if (m == -std::numeric_limits<double>::infinity()) {
            empty[row] = 1;
            if (sink) lse[row] = sink_logit;
            continue;
          }
          if (sink) m = std::max(m, sink_logit);
          double sum = sink ? std::exp(sink_logit - m) : 0.0;
          for (Index j = 0; j < S; ++j) sum += (s[std::size_t(j)] = std::exp(s[std::size_t(j)] - m));
          lse[row] = m + std::log(sum);
          for (Index j = 0; j < S; ++j) {
            const double p = s[std::size_t(j)] / sum;
            weights[row * std::size_t(S) + std::size_t(j)] = p;
            for (Index c = 0; c < dv; ++c) out[row * std::size_t(dv) + std::size_t(c)] += p * V(b, kh, j, c);
          }
        }
      }
    logit = std::abs(scale) * max_q * max_k;
    cond = 1 + logit + max_extra + max_sink;
  }
};

// RoPE in double, from rope.hpp's formula: pair (x1, x2) of each head's first R features rotated by
// m * base^(-2k / R); NeoX pairs k with k + R/2, GPT-J 2k with 2k + 1.
void rope_double(std::vector<double>& row, Index heads, Index D, Index R, double base, RopeStyle style, Index m) {
  for (Index h = 0; h < heads; ++h)
    for (Index k = 0; k < R / 2; ++k) {
      const double theta = std::pow(base, -2.0 * double(k) / double(R));
      const double c = std::cos(double(m) * theta), s = std::sin(double(m) * theta);
      const Index i1 = style == RopeStyle::NeoX ? k : 2 * k, i2 = style == RopeStyle::NeoX ? k + R / 2 : 2 * k + 1;
      double& x1 = row[std::size_t(h * D + i1)];
      double& x2 = row[std::size_t(h * D + i2)];
      const double a = x1, b = x2;
      x1 = a * c - b * s;
      x2 = b * c + a * s;
    }
}

// --- comparison ------------------------------------------------------------------------------------

template <class T>
constexpr double eps() {
  return double(std::numeric_limits<T>::epsilon());
}
template <class T>
constexpr double floor_tol() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}
constexpr double kCondFactor = 4;  // K: the observed worst err / (eps * cond * max|v|) is ~0.55

struct Tolerance {
  double floor, slope;  // allowed = floor * max(1, max|expected|) + slope
};

// What Precision::BFloat16 adds to a case's allowed error: attn/precision.hpp's stated bound,
// bf16_attention_error_bound, with the L2 norms' product standing in for scale * ||q||_1 * max|k|
// (both bound scale * sum_t |q_t k_t|, which is what the bound's delta stands for). 0 for native cases.
template <class T>
double bf16_allowed(const Config& c, double logit, Index S, Index d, double vmax) {
  if (!c.bf16) return 0;
  return double(attn::bf16_attention_error_bound<T>(T(logit), T(1), T(vmax), S, d));
}
template <class T>
double bf16_allowed(const Config& c, const Naive& n, double vmax) {
  return bf16_allowed<T>(c, n.logit, n.S, n.d, vmax);
}

// Largest |a - e| against the allowed error; non-finite values must agree exactly.
template <class A, class E>
::testing::AssertionResult close(const A& actual, const E& expected, Tolerance tol, const char* what,
                                 double* worst_ratio = nullptr) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << what << ": shape [" << actual.rows() << ", " << actual.cols()
                                         << "], expected [" << expected.rows() << ", " << expected.cols() << "]";
  double scale = 1;
  for (Index r = 0; r < expected.rows(); ++r)
    for (Index c = 0; c < expected.cols(); ++c) scale = std::max(scale, std::abs(double(expected(r, c))));
  const double allowed = tol.floor * scale + tol.slope;
  double worst = 0;
  Index wr = 0, wc = 0;
  for (Index r = 0; r < expected.rows(); ++r)
    for (Index c = 0; c < expected.cols(); ++c) {
      const double a = double(actual(r, c)), e = double(expected(r, c));
      const double err = std::isfinite(a) ? std::abs(a - e) : std::numeric_limits<double>::infinity();
      if (err > worst || std::isnan(err)) worst = err, wr = r, wc = c;
    }
  if (worst_ratio) *worst_ratio = std::max(*worst_ratio, worst / allowed);
  if (worst <= allowed) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": worst error " << worst << " at (" << wr << ", " << wc
                                       << "): actual " << double(actual(wr, wc)) << ", expected "
                                       << double(expected(wr, wc)) << "; allowed " << allowed;
}

template <class T>
bool same_bits(const Mat<T>& a, const Mat<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0);
}

// One case's outcome: empty when it passed, else what went wrong.
struct Outcome {
  std::string error;
  double ratio = 0;  // worst error / allowed (calibration: ATTN_DIFF_VERBOSE)
  void fail(const std::string& e) {
    if (error.empty()) error = e;
  }
  void check(const ::testing::AssertionResult& r) {
    if (!r) fail(r.message());
  }
};

// Runs f with `threads` threads; with recheck, runs it again with the other count and requires the
// same bits (the library's promise: results do not depend on the thread count).
template <class F>
auto with_threads(const Config& c, Outcome& o, F f) {
  attn::set_num_threads(c.threads);
  auto result = f();
  if (c.recheck_threads) {
    attn::set_num_threads(c.threads == 1 ? 2 : 1);
    const auto again = f();
    if (!same_bits(result, again)) o.fail("the other thread count gave different bits");
  }
  attn::set_num_threads(0);
  return result;
}

// --- data ------------------------------------------------------------------------------------------

// A matrix of N(0, amp^2) values rounded to T.
template <class T>
Mat<T> random_matrix(Rng& r, Index rows, Index cols, double amp) {
  Mat<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(amp * r.normal());
  return m;
}

// An input passed as is, or as a block of a wider matrix (row stride > cols).
template <class T>
struct Input {
  Mat<T> storage;
  Index offset = 0, cols = 0;
  Input(const Mat<T>& m, bool strided, Rng& r) : cols(m.cols()) {
    if (!strided) {
      storage = m;
      return;
    }
    offset = r.pick(0, 3);
    storage = Mat<T>::Constant(m.rows(), m.cols() + offset + r.pick(1, 5), T(1e30));
    storage.middleCols(offset, cols) = m;
  }
  attn::ConstMatrixRef<T> ref() const { return storage.middleCols(offset, cols); }
};

// Masks for L queries and S keys over B sequences and H heads, kept alive for the call.
template <class T>
struct MaskSet {
  attn::BoolMatrix mask, padding;
  Mat<T> bias;
  attn::Vector<T> slopes;
  std::vector<double> slopes_d;
  Index L = 0, S = 0, H = 1;
  bool mask_attend = true, padding_attend = false;

  void draw(Rng& r, const Config& c, Index B, Index H_, Index L_, Index S_, attn::Masks<T>& m) {
    L = L_, S = S_, H = H_;
    mask_attend = c.mask_attend;
    padding_attend = c.padding_attend;
    if (c.mask_kind) {
      mask.resize(c.mask_kind == 1 ? L : B * H * L, S);
      for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = r.coin(c.mask_density) == mask_attend;
      if (mask.rows() > 0 && r.coin(0.3)) mask.row(r.pick(0, mask.rows() - 1)).setConstant(!mask_attend);
      if (mask_attend)
        m.attn_mask = make_mask<attn::AttendMask>(c.mask_store);
      else
        m.attn_mask = make_mask<attn::IgnoreMask>(c.mask_store);
    }
    if (c.bias_kind) {
      bias.resize(c.bias_kind == 1 ? L : B * H * L, S);
      for (Index i = 0; i < bias.size(); ++i)
        bias.data()[i] =
            r.coin(0.1) ? -std::numeric_limits<T>::infinity() : static_cast<T>(c.bias_amp * r.normal());
      m.attn_bias = c.mask_store == 2   ? attn::AdditiveMask<T>(attn::view(bias.data(), bias.rows(), bias.cols()))
                    : c.mask_store == 1 ? attn::AdditiveMask<T>(attn::view(bias))
                                        : attn::AdditiveMask<T>(bias);
    }
    if (c.padding) {
      padding.resize(B, S);
      for (Index b = 0; b < B; ++b) {
        const Index len = r.coin(0.15) ? 0 : r.pick(0, S);  // sometimes every key padded
        for (Index j = 0; j < S; ++j) {
          const bool pad = c.padding == 1 ? j >= len : r.coin(0.3);
          padding(b, j) = pad != padding_attend;  // stored value: true = ignore, or true = attend
        }
      }
      if (padding_attend)
        m.key_padding_mask = attn::AttendMask(padding);
      else
        m.key_padding_mask = attn::IgnoreMask(padding);
    }
    m.causal = c.causal;
    m.window = c.window;
    m.softcap = static_cast<T>(c.softcap);
    if (c.alibi) {
      slopes = c.alibi == 1 ? attn::alibi_slopes<T>(H) : attn::Vector<T>(H);
      if (c.alibi == 2)
        for (Index h = 0; h < H; ++h) slopes[h] = static_cast<T>(r.uniform(0, 1));
      m.alibi_slopes = slopes;
      slopes_d.assign(std::size_t(H), 0);
      for (Index h = 0; h < H; ++h) slopes_d[std::size_t(h)] = double(slopes[h]);
    }
  }
  bool allowed(Index b, Index h, Index i, Index j) const {  // the bool mask and key padding
    if (mask.size() && (mask(mask.rows() == L ? i : (b * H + h) * L + i, j) != mask_attend)) return false;
    if (padding.size() && padding(b, j) != padding_attend) return false;
    return true;
  }
  // A copy of `mask`, an attn::view of it, or an attn::view of its raw buffer.
  template <class M>
  M make_mask(int store) const {
    if (store == 0) return M(mask);
    if (store == 1) return M(attn::view(mask));
    return M(attn::view(mask.data(), mask.rows(), mask.cols()));
  }
  double bias_at(Index b, Index h, Index i, Index j) const {
    return bias.size() ? double(bias(bias.rows() == L ? i : (b * H + h) * L + i, j)) : 0.0;
  }
};

// RoPE positions of the rows of a [B*n, ...] input: start + l in every sequence, or per-sequence
// offsets + l.
std::vector<Index> rope_positions(Rng& r, const Config& c, Index B, Index n, Index start) {
  std::vector<Index> pos(std::size_t(B * n));
  if (!c.rope_positions) {
    for (Index i = 0; i < B * n; ++i) pos[std::size_t(i)] = start + i % n;
  } else {
    for (Index b = 0; b < B; ++b) {
      const Index off = r.coin(0.5) ? start : r.pick(0, 1500);
      for (Index l = 0; l < n; ++l) pos[std::size_t(b * n + l)] = off + l;
    }
  }
  return pos;
}

template <class T>
void rotate(const attn::RopeCache<T>& rope, Mat<T>& x, Index heads, Index B, const Config& c,
            const std::vector<Index>& pos) {
  if (!c.rope_positions) {
    rope.apply(x, heads, B, pos.empty() ? 0 : pos[0]);  // every sequence from the same start
  } else {
    Eigen::Matrix<Index, Eigen::Dynamic, 1> p(x.rows());
    for (Index i = 0; i < x.rows(); ++i) p[i] = pos[std::size_t(i)];
    rope.apply(x, heads, p);
  }
}

// The rows of x in double, rotated at pos when RoPE is on.
// Fills the oracle's Q, K and V from [B*L, H*d] queries, [B*S, Hkv*d] keys (both already rotated
// and in double: rows_double) and [B*S, Hkv*dv] values.
template <class V>
void fill_naive(Naive& n, const std::vector<std::vector<double>>& qd, const std::vector<std::vector<double>>& kd,
                const V& xv) {
  for (Index b = 0; b < n.B; ++b) {
    for (Index h = 0; h < n.H; ++h)
      for (Index i = 0; i < n.L; ++i)
        for (Index e = 0; e < n.d; ++e) n.Q(b, h, i, e) = qd[std::size_t(b * n.L + i)][std::size_t(h * n.d + e)];
    for (Index h = 0; h < n.Hkv; ++h)
      for (Index j = 0; j < n.S; ++j) {
        for (Index e = 0; e < n.d; ++e) n.K(b, h, j, e) = kd[std::size_t(b * n.S + j)][std::size_t(h * n.d + e)];
        for (Index e = 0; e < n.dv; ++e) n.V(b, h, j, e) = double(xv(b * n.S + j, h * n.dv + e));
      }
  }
}

template <class T>
std::vector<std::vector<double>> rows_double(const Mat<T>& x, const Config& c, Index heads, Index D,
                                             const std::vector<Index>* pos) {
  std::vector<std::vector<double>> rows(std::size_t(x.rows()), std::vector<double>(std::size_t(x.cols())));
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) rows[std::size_t(i)][std::size_t(j)] = double(x(i, j));
    if (pos)
      rope_double(rows[std::size_t(i)], heads, D, c.rotary_dim ? c.rotary_dim : D, c.rope_base, c.rope_style,
                  (*pos)[std::size_t(i)]);
  }
  return rows;
}

// --- attention core: ScaledDotProductAttention and GroupedQueryAttention ---------------------------

template <class T>
Outcome run_core(const Config& c) {
  Outcome o;
  Rng r(c.seed ^ 0x9e3779b97f4a7c15ull);
  const Index B = c.B, H = c.H, Hkv = c.Hkv, L = c.L, S = c.S, d = c.d, dv = c.dv;
  Mat<T> xq = random_matrix<T>(r, B * L, H * d, c.q_amp);
  Mat<T> xk = random_matrix<T>(r, B * S, Hkv * d, c.k_amp);
  const Mat<T> xv = random_matrix<T>(r, B * S, Hkv * dv, 1.0);
  const Mat<T> xq0 = xq, xk0 = xk;

  std::vector<Index> qpos, kpos;
  if (c.rope) {
    qpos = rope_positions(r, c, B, L, c.q_start);
    kpos = rope_positions(r, c, B, S, c.k_start);
    const Index max_pos = std::max(*std::max_element(qpos.begin(), qpos.end()),
                                   *std::max_element(kpos.begin(), kpos.end()));
    const attn::RopeCache<T> rope(d, max_pos + 1 + r.pick(0, 3), {c.rotary_dim, c.rope_base, c.rope_style});
    rotate(rope, xq, H, B, c, qpos);
    rotate(rope, xk, Hkv, B, c, kpos);
  }

  MaskSet<T> ms;
  attn::GqaArgs<T> args;
  ms.draw(r, c, B, H, L, S, args);
  args.batch = B;
  if (c.bf16) args.precision = attn::Precision::BFloat16;
  const Input<T> q(xq, c.strided, r), k(xk, c.strided, r), v(xv, c.strided, r);

  // The library.
  Mat<T> out, weights;
  if (c.api == Api::Sdpa) {
    const attn::ScaledDotProductAttention<T> sdpa =
        c.scale_kind == 0 ? attn::ScaledDotProductAttention<T>() : attn::ScaledDotProductAttention<T>(T(c.scale));
    const attn::Masks<T>& m = args;
    if (c.call == 0) {
      out = with_threads(c, o, [&] { return sdpa.forward(q.ref(), k.ref(), v.ref(), m); });
    } else if (c.call == 1) {
      out = with_threads(c, o, [&] {
        Mat<T> big = Mat<T>::Constant(L, dv + 3, T(7));
        sdpa.forward_into(q.ref(), k.ref(), v.ref(), m, big.middleCols(1, dv));
        if (big.col(0) != Mat<T>::Constant(L, 1, T(7)) || big.rightCols(2) != Mat<T>::Constant(L, 2, T(7)))
          o.fail("forward_into wrote outside its output block");
        return Mat<T>(big.middleCols(1, dv));
      });
    } else {
      auto both = with_threads(c, o, [&] {
        auto res = sdpa.forward_with_weights(q.ref(), k.ref(), v.ref(), m);
        Mat<T> joined(L, dv + S);
        joined << res.output, res.weights;
        return joined;
      });
      out = both.leftCols(dv);
      weights = both.rightCols(S);
    }
  } else {
    const attn::GroupedQueryAttention<T> gqa = c.scale_kind == 0 ? attn::GroupedQueryAttention<T>(H, Hkv)
                                                                  : attn::GroupedQueryAttention<T>(H, Hkv, T(c.scale));
    if (c.call == 0) {
      out = with_threads(c, o, [&] { return gqa.forward(q.ref(), k.ref(), v.ref(), args); });
    } else {
      out = with_threads(c, o, [&] {
        Mat<T> res = Mat<T>::Constant(B * L, H * dv, T(-7));
        gqa.forward_into(q.ref(), k.ref(), v.ref(), args, res);
        return res;
      });
    }
  }

  // The oracle, from the unrotated inputs.
  Naive n;
  n.B = B, n.H = H, n.Hkv = Hkv, n.L = L, n.S = n.mask_keys = S, n.d = d, n.dv = dv;
  n.size();
  fill_naive(n, rows_double(xq0, c, H, d, c.rope ? &qpos : nullptr), rows_double(xk0, c, Hkv, d, c.rope ? &kpos : nullptr),
             xv);
  n.scale = c.scale_kind == 0 ? double(T(1) / std::sqrt(T(d))) : double(T(c.scale));
  n.softcap = double(T(c.softcap));
  n.causal = c.causal;
  n.window = c.window;
  n.slopes = ms.slopes_d;
  n.run([&](Index b, Index h, Index i, Index j) { return ms.allowed(b, h, i, j); },
        [&](Index b, Index h, Index i, Index j) { return ms.bias_at(b, h, i, j); });

  // The oracle against detail::attention_reference on the same double inputs (rotated here in
  // double): the two readings of the semantics must agree.
  {
    attn::detail::AttentionProblem<double> p;
    p.batch = B, p.heads = H, p.kv_heads = Hkv, p.L = L, p.S = p.mask_keys = S, p.d = d, p.dv = dv;
    p.q = {n.q.data(), H * L * d, L * d, d};
    p.k = {n.k.data(), Hkv * S * d, S * d, d};
    p.v = {n.v.data(), Hkv * S * dv, S * dv, dv};
    std::vector<double> ref_out(std::size_t(B * H * L * dv));
    p.out = {ref_out.data(), H * L * dv, L * dv, dv};
    p.scale = n.scale;
    attn::Masks<double> md;
    attn::Matrix<double> bias_d = ms.bias.template cast<double>();
    if (c.mask_kind)
      md.attn_mask = args.attn_mask;
    if (c.bias_kind) md.attn_bias = attn::AdditiveMask<double>(bias_d);
    md.key_padding_mask = args.key_padding_mask;
    md.causal = c.causal;
    md.window = c.window;
    md.softcap = n.softcap;
    if (c.alibi) md.alibi_slopes = Eigen::Map<const attn::Vector<double>>(n.slopes.data(), H);
    attn::detail::bind_masks(p, md, "differential_test");
    attn::detail::attention_reference(p);
    const Eigen::Map<const Mat<double>> a(ref_out.data(), B * H * L, dv), e(n.out.data(), B * H * L, dv);
    o.check(close(a, e, {1e-12, 1e-13 * n.cond}, "detail::attention_reference vs the naive oracle"));
  }

  // Expected outputs in the library's layout: [B*L, H*dv], head h in columns [h*dv, (h+1)*dv).
  Mat<double> want(B * L, H * dv);
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < L; ++i)
        for (Index e = 0; e < dv; ++e)
          want(b * L + i, h * dv + e) = n.out[std::size_t(((b * H + h) * L + i) * dv + e)];
  const double vmax = std::max(1.0, xv.cwiseAbs().maxCoeff() * 1.0);
  const Tolerance tol{floor_tol<T>(), kCondFactor * eps<T>() * n.cond * vmax + bf16_allowed<T>(c, n, vmax)};
  o.check(close(out, want, tol, "output", &o.ratio));
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < L; ++i)
        if (n.empty[std::size_t((b * H + h) * L + i)] && !(out.row(b * L + i).segment(h * dv, dv).array() == T(0)).all())
          o.fail("row " + std::to_string(b * L + i) + " head " + std::to_string(h) +
                 " has every key masked but is not exactly 0");
  if (weights.size()) {
    const Eigen::Map<const Mat<double>> w(n.weights.data(), L, S);
    o.check(close(weights, w, tol, "weights", &o.ratio));
    for (Index i = 0; i < L; ++i)
      for (Index j = 0; j < S; ++j)
        if (n.masked[std::size_t(i * S + j)] && weights(i, j) != T(0))
          o.fail("masked weight (" + std::to_string(i) + ", " + std::to_string(j) + ") is not exactly 0");
  }
  return o;
}

// --- MultiHeadAttention ----------------------------------------------------------------------------

template <class T>
Outcome run_mha(const Config& c) {
  Outcome o;
  Rng r(c.seed ^ 0x9e3779b97f4a7c15ull);
  const Index B = c.B, H = c.H, L = c.L, S = c.S, E = c.E, D = c.d;
  attn::MhaOptions opt;
  opt.kdim = c.kdim == E && r.coin(0.5) ? 0 : c.kdim;
  opt.vdim = c.vdim == E && r.coin(0.5) ? 0 : c.vdim;
  opt.bias = c.bias;
  opt.add_bias_kv = c.add_bias_kv;
  opt.add_zero_attn = c.add_zero_attn;
  opt.batch_first = c.batch_first;
  attn::Generator gen(c.seed);
  attn::MultiHeadAttention<T> mha(E, H, opt, gen);
  if (c.bias) {  // PyTorch's init leaves biases at zero: draw them so that they count
    mha.set_in_proj_bias(random_matrix<T>(r, 3 * E, 1, 0.5));
    mha.out_proj().set_bias(random_matrix<T>(r, E, 1, 0.5));
  }
  const Index kdim = mha.kdim(), vdim = mha.vdim();
  const Mat<T> x_q = random_matrix<T>(r, B * L, E, c.q_amp);
  const Mat<T> x_k = c.mha_inputs == 0 ? x_q : random_matrix<T>(r, B * S, kdim, c.k_amp);
  const Mat<T> x_v = c.mha_inputs <= 1 ? x_k : random_matrix<T>(r, B * S, vdim, 1.0);

  MaskSet<T> ms;
  attn::MhaArgs<T> args;
  ms.draw(r, c, B, H, L, S, args);
  args.batch = B;
  if (c.bf16) args.precision = attn::Precision::BFloat16;
  args.need_weights = c.need_weights;
  args.average_attn_weights = c.average;

  // Inputs: one matrix for self-attention (fused QKV projection), one for key and value (fused KV),
  // or three; strided or not.
  const Input<T> in_q(x_q, c.strided, r), in_k(x_k, c.strided, r), in_v(x_v, c.strided, r);
  const attn::ConstMatrixRef<T> rq = in_q.ref();
  const attn::ConstMatrixRef<T> rk = c.mha_inputs == 0 ? rq : in_k.ref();
  const attn::ConstMatrixRef<T> rv = c.mha_inputs == 0 ? rq : c.mha_inputs == 1 ? rk : in_v.ref();
  Mat<T> out, weights;
  const Index S2 = S + Index(c.add_bias_kv) + Index(c.add_zero_attn);
  if (c.need_weights || r.coin(0.5)) {
    auto both = with_threads(c, o, [&] {
      auto res = mha.forward(rq, rk, rv, args);
      Mat<T> joined(res.output.rows() + res.weights.rows(), std::max(res.output.cols(), res.weights.cols()));
      joined.setZero();
      joined.topLeftCorner(res.output.rows(), res.output.cols()) = res.output;
      joined.bottomLeftCorner(res.weights.rows(), res.weights.cols()) = res.weights;
      return joined;
    });
    out = both.topLeftCorner(B * L, E);
    if (c.need_weights) weights = both.bottomLeftCorner(both.rows() - B * L, S2);
  } else {
    out = with_threads(c, o, [&] {
      Mat<T> res(B * L, E);
      mha.forward_into(rq, rk, rv, args, res);
      return res;
    });
  }

  // The oracle: projections in double from the module's own parameters.
  const auto row_of = [&](Index b, Index l, Index n) { return c.batch_first ? b * n + l : l * B + b; };
  const Mat<double> Wq = (mha.packed() ? Mat<T>(mha.in_proj_weight().topRows(E)) : mha.q_proj_weight()).template cast<double>();
  const Mat<double> Wk = (mha.packed() ? Mat<T>(mha.in_proj_weight().middleRows(E, E)) : mha.k_proj_weight()).template cast<double>();
  const Mat<double> Wv = (mha.packed() ? Mat<T>(mha.in_proj_weight().bottomRows(E)) : mha.v_proj_weight()).template cast<double>();
  attn::Vector<double> bq = attn::Vector<double>::Zero(E), bk = bq, bv = bq;
  if (c.bias) {
    const attn::Vector<double> ib = mha.in_proj_bias().template cast<double>();
    bq = ib.segment(0, E), bk = ib.segment(E, E), bv = ib.segment(2 * E, E);
  }
  const Mat<double> pq = (x_q.template cast<double>() * Wq.transpose()).rowwise() + bq.transpose();
  const Mat<double> pk = (x_k.template cast<double>() * Wk.transpose()).rowwise() + bk.transpose();
  const Mat<double> pv = (x_v.template cast<double>() * Wv.transpose()).rowwise() + bv.transpose();
  Naive n;
  n.B = B, n.H = H, n.Hkv = H, n.L = L, n.S = S2, n.mask_keys = S, n.d = n.dv = D;
  n.size();
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < H; ++h) {
      for (Index i = 0; i < L; ++i)
        for (Index e = 0; e < D; ++e) n.Q(b, h, i, e) = pq(row_of(b, i, L), h * D + e);
      for (Index j = 0; j < S; ++j)
        for (Index e = 0; e < D; ++e) {
          n.K(b, h, j, e) = pk(row_of(b, j, S), h * D + e);
          n.V(b, h, j, e) = pv(row_of(b, j, S), h * D + e);
        }
      if (c.add_bias_kv)  // then the zero key of add_zero_attn, already 0
        for (Index e = 0; e < D; ++e) {
          n.K(b, h, S, e) = double(mha.bias_k()[h * D + e]);
          n.V(b, h, S, e) = double(mha.bias_v()[h * D + e]);
        }
    }
  n.scale = double(T(1) / std::sqrt(T(D)));
  n.softcap = double(T(c.softcap));
  n.causal = c.causal;
  n.window = c.window;
  n.slopes = ms.slopes_d;
  n.run([&](Index b, Index h, Index i, Index j) { return ms.allowed(b, h, i, j); },
        [&](Index b, Index h, Index i, Index j) { return ms.bias_at(b, h, i, j); });
  Mat<double> heads(B * L, E);
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < L; ++i)
        for (Index e = 0; e < D; ++e) heads(row_of(b, i, L), h * D + e) = n.out[std::size_t(((b * H + h) * L + i) * D + e)];
  const Mat<double> Wo = mha.out_proj().weight().template cast<double>();
  Mat<double> want = heads * Wo.transpose();
  if (c.bias) want.rowwise() += mha.out_proj().bias().template cast<double>().transpose();

  // Rounding: the projections' (eps * sum |x||W|) feed the logits; out_proj sums E terms.
  const double vmax = std::max(1.0, pv.cwiseAbs().maxCoeff());
  const double wo_l1 = std::max(1.0, Wo.cwiseAbs().rowwise().sum().maxCoeff());
  const double proj = std::max({1.0, x_q.cwiseAbs().maxCoeff() * 1.0, x_k.cwiseAbs().maxCoeff() * 1.0,
                                x_v.cwiseAbs().maxCoeff() * 1.0}) *
                      std::max({Wq.cwiseAbs().rowwise().sum().maxCoeff(), Wk.cwiseAbs().rowwise().sum().maxCoeff(),
                                Wv.cwiseAbs().rowwise().sum().maxCoeff(), 1.0});
  const Tolerance tol{floor_tol<T>(),
                      (kCondFactor * eps<T>() * (n.cond * vmax + proj) + bf16_allowed<T>(c, n, vmax)) * wo_l1};
  o.check(close(out, want, tol, "output", &o.ratio));
  if (c.need_weights) {
    Mat<double> w = Mat<double>::Zero(c.average ? B * L : B * H * L, S2);
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h)
        for (Index i = 0; i < L; ++i)
          for (Index j = 0; j < S2; ++j) {
            const double p = n.weights[std::size_t(((b * H + h) * L + i) * S2 + j)];
            if (c.average)
              w(b * L + i, j) += p / double(H);
            else
              w((b * H + h) * L + i, j) = p;
          }
    const Tolerance wtol{floor_tol<T>(), kCondFactor * eps<T>() * (n.cond + proj)};
    o.check(close(weights, w, wtol, "weights", &o.ratio));
    if (!c.average)
      for (Index row = 0; row < B * H * L; ++row)
        for (Index j = 0; j < S2; ++j)
          if (n.masked[std::size_t(row * S2 + j)] && weights(row, j) != T(0))
            o.fail("masked weight (" + std::to_string(row) + ", " + std::to_string(j) + ") is not exactly 0");
  }
  return o;
}

// --- GroupedQueryAttention over a KVCache ----------------------------------------------------------

// HOOK (KV cache): prefill/decode splits. N positions per sequence are appended to a KVCache - a
// prefill of P rows, then chunks of 1..chunk_max rows (decoding steps when 1) - and after each
// append the chunk's queries attend the cache (forward(q, cache, b) per sequence, or forward(q,
// cache) for the whole batch). Every chunk's output must equal the corresponding rows of one full
// causal forward over all N positions (window: the cache's and the args' narrower one), computed by
// the oracle. RoPE rotates each chunk at its absolute positions, as DecoderAttention does.
template <class T>
Outcome run_cache(const Config& c) {
  Outcome o;
  Rng r(c.seed ^ 0x9e3779b97f4a7c15ull);
  const Index B = c.B, H = c.H, Hkv = c.Hkv, N = c.positions, d = c.d, dv = c.dv;
  Mat<T> xq = random_matrix<T>(r, B * N, H * d, c.q_amp);  // rows (b, t), position t
  Mat<T> xk = random_matrix<T>(r, B * N, Hkv * d, c.k_amp);
  const Mat<T> xv = random_matrix<T>(r, B * N, Hkv * dv, 1.0);
  const Mat<T> xq0 = xq, xk0 = xk;
  std::vector<Index> pos(std::size_t(B * N));
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < N; ++t) pos[std::size_t(b * N + t)] = t;
  std::optional<attn::RopeCache<T>> rope;
  if (c.rope) rope.emplace(d, N + r.pick(0, 3), attn::Rope{c.rotary_dim, c.rope_base, c.rope_style});

  const attn::GroupedQueryAttention<T> gqa = c.scale_kind == 0 ? attn::GroupedQueryAttention<T>(H, Hkv)
                                                                : attn::GroupedQueryAttention<T>(H, Hkv, T(c.scale));
  attn::CacheArgs<T> args;
  args.window = c.args_window;
  if (c.bf16) args.precision = attn::Precision::BFloat16;
  args.softcap = static_cast<T>(c.softcap);
  attn::Vector<T> slopes;
  std::vector<double> slopes_d;
  if (c.alibi) {
    slopes = c.alibi == 1 ? attn::alibi_slopes<T>(H) : attn::Vector<T>(H);
    if (c.alibi == 2)
      for (Index h = 0; h < H; ++h) slopes[h] = static_cast<T>(r.uniform(0, 1));
    args.alibi_slopes = slopes;
    for (Index h = 0; h < H; ++h) slopes_d.push_back(double(slopes[h]));
  }

  // Chunk sizes: the prefill, then random chunks; per sequence when attending one at a time. Drawn
  // here, so that a second run (with the other thread count) takes the same steps.
  const auto chunks_of = [&] {
    std::vector<Index> sizes;
    Index t = 0;
    if (c.prefill > 0) sizes.push_back(t = std::min(c.prefill, N));
    while (t < N) {
      const Index n = std::min(N - t, r.pick(1, c.chunk_max));
      sizes.push_back(n);
      t += n;
    }
    return sizes;
  };
  std::vector<std::vector<Index>> chunks;
  for (Index b = 0; b < (c.whole_batch ? 1 : B); ++b) chunks.push_back(chunks_of());
  const Index value_dim = dv == d && r.coin(0.5) ? 0 : dv;  // 0: the cache's default, head_dim
  const auto rows_of = [&](const Mat<T>& x, Index b, Index t, Index n) { return Mat<T>(x.middleRows(b * N + t, n)); };

  Mat<T> out = Mat<T>::Constant(B * N, H * dv, T(12345));
  const auto run_all = [&] {
    attn::KVCache<T> cache(B, Hkv, d, c.capacity, c.cache_window, value_dim);
    Mat<T> res = Mat<T>::Constant(B * N, H * dv, T(12345));
    const auto rotated = [&](const Mat<T>& x, Index heads, Index t, Index n, Index b) {
      Mat<T> y = rows_of(x, b, t, n);
      if (rope) rope->apply(y, heads, 1, t);
      return y;
    };
    if (c.whole_batch) {
      Index t = 0;
      for (const Index n : chunks[0]) {
        Mat<T> q(B * n, H * d), k(B * n, Hkv * d), v(B * n, Hkv * dv);
        for (Index b = 0; b < B; ++b) {
          q.middleRows(b * n, n) = rotated(xq, H, t, n, b);
          k.middleRows(b * n, n) = rotated(xk, Hkv, t, n, b);
          v.middleRows(b * n, n) = rows_of(xv, b, t, n);
        }
        cache.append(k, v);
        const Mat<T> y = gqa.forward(q, cache, args);
        for (Index b = 0; b < B; ++b) res.middleRows(b * N + t, n) = y.middleRows(b * n, n);
        t += n;
      }
    } else {
      for (Index b = 0; b < B; ++b) {
        Index t = 0;
        for (const Index n : chunks[std::size_t(b)]) {
          cache.append(b, rotated(xk, Hkv, t, n, b), rows_of(xv, b, t, n));
          res.middleRows(b * N + t, n) = gqa.forward(rotated(xq, H, t, n, b), cache, b, args);
          t += n;
        }
      }
    }
    return res;
  };
  try {
    out = with_threads(c, o, run_all);
  } catch (const std::exception& e) {
    o.fail(std::string("threw: ") + e.what());
    return o;
  }

  Naive n;
  n.B = B, n.H = H, n.Hkv = Hkv, n.L = n.S = n.mask_keys = N, n.d = d, n.dv = dv;
  n.size();
  fill_naive(n, rows_double(xq0, c, H, d, c.rope ? &pos : nullptr), rows_double(xk0, c, Hkv, d, c.rope ? &pos : nullptr),
             xv);
  n.scale = c.scale_kind == 0 ? double(T(1) / std::sqrt(T(d))) : double(T(c.scale));
  n.softcap = double(T(c.softcap));
  n.causal = Causal::BottomRight;
  const Index W = c.cache_window;
  n.window = W > 0 && c.args_window > 0 ? std::min(W, c.args_window) : std::max(W, c.args_window);
  n.slopes = slopes_d;
  n.run([](Index, Index, Index, Index) { return true; }, [](Index, Index, Index, Index) { return 0.0; });
  Mat<double> want(B * N, H * dv);
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < N; ++i)
        for (Index e = 0; e < dv; ++e) want(b * N + i, h * dv + e) = n.out[std::size_t(((b * H + h) * N + i) * dv + e)];
  const double vmax = std::max(1.0, xv.cwiseAbs().maxCoeff() * 1.0);
  o.check(close(out, want, {floor_tol<T>(), kCondFactor * eps<T>() * n.cond * vmax + bf16_allowed<T>(c, n, vmax)},
                "output", &o.ratio));
  return o;
}

// --- serving: ragged batches, a KVCache of different lengths, a PagedKVCache ----------------------

// HOOK (serving): B sequences of their own lengths, sequence b with lq[b] queries (its newest
// positions in a cache) and lk[b] keys, in one call:
//   packed   forward_varlen (q, k, v packed by cu_seqlens; causal TopLeft, BottomRight or None per
//            sequence), _with_lse, forward_varlen_into (with or without lse); inputs maybe strided
//   KVCache  sequences appended in chunks interleaved at random; forward_varlen(q, cache, cu) (some
//            sequences without queries) or, every sequence with the same L, forward(q, cache)
//   paged    PagedKVCache of a random page size (1..64), its pool sum ceil(length / page_size)
//            pages (or 2 more): sequences made new or forked from another once it holds some
//            positions, grown in chunks interleaved at random (so a shared last page is copied on
//            write), one sometimes freed once complete; forward_varlen(q, cache, seqs, cu) over the
//            others in a random order. Native storage, or bf16 / fp16 with K and V rounded to it
//            first (the output must then equal the Native cache's bitwise), or int8 (held to
//            kv_storage_error_bound)
// with sinks, sink tokens, window, ALiBi, softcap, scale and precision as drawn. Checks: (a) output
// and lse against the oracle, each sequence alone; (b) each sequence's rows equal a call with it
// alone bitwise (packed: forward_with_lse on its q, k, v; KVCache: forward_into(q_b, cache, b);
// paged: a one-sequence KVCache of the same storage holding its rows, as forward_varlen over a
// paged cache promises); (c) when drawn, merge_attention_states of one sequence's keys split in 2
// or 3 ranges (and the sinks as a part with lse = sink and no value) equals the unsplit call;
// (d) when drawn, a per-key mask is refused with argument_error, nothing written.

// The oracle of a ragged batch, each sequence alone: out [total_q, H*dv] and lse [H, total_q] in
// the library's layouts; empty [H][total_q]: the row attends no key; the tolerance's inputs, the
// largest over the sequences.
struct RaggedWant {
  Mat<double> out, lse;
  std::vector<char> empty;
  double cond = 1, logit = 0, q_l1 = 0, k_abs = 0;
  Index S = 1;
};

template <class T>
RaggedWant ragged_oracle(const Config& c, const std::vector<Mat<T>>& qs, const std::vector<Mat<T>>& ks,
                         const std::vector<Mat<T>>& vs, double scale, const std::vector<double>& slopes,
                         const std::vector<double>& sinks) {
  const Index H = c.H, Hkv = c.Hkv, d = c.d, dv = c.dv;
  Index total = 0;
  for (const Mat<T>& q : qs) total += q.rows();
  RaggedWant w;
  w.out.setZero(total, H * dv);
  w.lse.setZero(H, total);
  w.empty.assign(std::size_t(H * total), 0);
  for (std::size_t b = 0, row0 = 0; b < qs.size(); row0 += std::size_t(qs[b].rows()), ++b) {
    const Index L = qs[b].rows(), S = ks[b].rows();
    if (L == 0) continue;
    Naive n;
    n.B = 1, n.H = H, n.Hkv = Hkv, n.L = L, n.S = n.mask_keys = S, n.d = d, n.dv = dv;
    n.size();
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < L; ++i)
        for (Index e = 0; e < d; ++e) n.Q(0, h, i, e) = double(qs[b](i, h * d + e));
    for (Index h = 0; h < Hkv; ++h)
      for (Index j = 0; j < S; ++j) {
        for (Index e = 0; e < d; ++e) n.K(0, h, j, e) = double(ks[b](j, h * d + e));
        for (Index e = 0; e < dv; ++e) n.V(0, h, j, e) = double(vs[b](j, h * dv + e));
      }
    n.scale = scale;
    n.softcap = double(T(c.softcap));
    n.causal = c.causal;
    n.window = c.window;
    n.slopes = slopes;
    n.sinks = sinks;
    n.sink_tokens = c.sink_tokens;
    n.run([](Index, Index, Index, Index) { return true; }, [](Index, Index, Index, Index) { return 0.0; });
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < L; ++i) {
        const std::size_t at = std::size_t(h * L + i), row = row0 + std::size_t(i);
        for (Index e = 0; e < dv; ++e) w.out(Index(row), h * dv + e) = n.out[at * std::size_t(dv) + std::size_t(e)];
        w.lse(h, Index(row)) = n.lse[at];
        w.empty[std::size_t(h) * std::size_t(total) + row] = n.empty[at];
      }
    w.cond = std::max(w.cond, n.cond), w.logit = std::max(w.logit, n.logit);
    w.q_l1 = std::max(w.q_l1, n.q_l1), w.k_abs = std::max(w.k_abs, n.k_abs), w.S = std::max(w.S, S);
  }
  return w;
}

// (a): the output within the file's tolerance (plus, for an int8 cache, kv_storage_error_bound), a
// row that attends no key exactly 0, and the lse within floor + K eps (cond + log S) of the oracle's
// (the logits' rounding, and the sum's) plus what bf16 products or int8 keys may move a logit: -inf
// exactly where the oracle's is.
template <class T>
void check_ragged(const Config& c, Outcome& o, const Mat<T>& out, const Mat<T>& lse, const RaggedWant& w, double vmax,
                  double scale) {
  const bool int8 = c.serve == 2 && c.storage == attn::KVStorage::Int8;
  const double int8_out =
      int8 ? attn::kv_storage_error_bound<double>(attn::KVStorage::Int8, std::abs(scale) * w.q_l1, w.k_abs, vmax) : 0;
  o.check(close(out, w.out,
                {floor_tol<T>(), kCondFactor * eps<T>() * w.cond * vmax + bf16_allowed<T>(c, w.logit, w.S, c.d, vmax) +
                                     int8_out},
                "output", &o.ratio));
  const Index total = out.rows();
  for (Index h = 0; h < c.H; ++h)
    for (Index row = 0; row < total; ++row)
      if (w.empty[std::size_t(h * total + row)] && !(out.row(row).segment(h * c.dv, c.dv).array() == T(0)).all())
        o.fail("row " + std::to_string(row) + " head " + std::to_string(h) + " attends no key but is not exactly 0");
  const double u = double(attn::storage_unit_roundoff<double>(attn::KVStorage::BFloat16));
  double lse_scale = 1;
  for (Index i = 0; i < w.lse.size(); ++i)
    if (std::isfinite(w.lse.data()[i])) lse_scale = std::max(lse_scale, std::abs(w.lse.data()[i]));
  const double allowed = floor_tol<T>() * lse_scale + kCondFactor * eps<T>() * (w.cond + std::log(double(w.S) + 1)) +
                         (c.bf16 ? w.logit * (2 * u + u * u + double(c.d) * eps<T>()) : 0) +
                         (int8 ? std::abs(scale) * w.q_l1 * w.k_abs / 254.0 : 0);
  for (Index h = 0; h < c.H; ++h)
    for (Index row = 0; row < total; ++row) {
      const double a = double(lse(h, row)), e = w.lse(h, row);
      const double err = e == -std::numeric_limits<double>::infinity() ? (a == e ? 0.0 : HUGE_VAL)
                         : std::isfinite(a)                           ? std::abs(a - e)
                                                                      : HUGE_VAL;
      o.ratio = std::max(o.ratio, err / allowed);
      if (err > allowed) {
        o.fail("lse (" + std::to_string(h) + ", " + std::to_string(row) + "): " + std::to_string(a) + ", expected " +
               std::to_string(e) + "; allowed error " + std::to_string(allowed));
        return;
      }
    }
}

// Rows of xs stacked, and their cu_seqlens.
template <class T>
Mat<T> stacked(const std::vector<Mat<T>>& xs, Index cols, attn::IndexVector* cu = nullptr) {
  Index rows = 0;
  for (const Mat<T>& x : xs) rows += x.rows();
  Mat<T> s(rows, cols);
  if (cu) cu->resize(Index(xs.size()) + 1), (*cu)[0] = 0;
  for (std::size_t b = 0, r0 = 0; b < xs.size(); r0 += std::size_t(xs[b].rows()), ++b) {
    s.middleRows(Index(r0), xs[b].rows()) = xs[b];
    if (cu) (*cu)[Index(b) + 1] = Index(r0) + xs[b].rows();
  }
  return s;
}

// A paged cache's history, replayed alike on caches of different storage: sequences made new or
// forked from an earlier one (`from`) once it holds `at` positions, grown in chunks interleaved at
// random, and one (victim >= 0) freed once it is complete and its forks are made.
struct PagedPlan {
  struct Step {
    int op;  // 0 add_sequence, 1 fork(from), 2 append rows [row0, row0 + n), 3 free
    Index seq, from, row0, n;
  };
  std::vector<Step> steps;
  std::vector<Index> length, parent, at;  // per sequence (the victim's included)
  Index victim = -1, pages = 0;
};

PagedPlan plan_paged(Rng& r, const Config& c) {
  PagedPlan p;
  p.length = c.lk;
  if (r.coin(0.3)) {  // a sequence made, grown and freed among the others: its pages are reused
    p.victim = r.pick(0, c.B);
    p.length.insert(p.length.begin() + p.victim, r.pick(1, 100));
  }
  const Index n = Index(p.length.size());
  std::vector<Index> start(std::size_t(n), 0);
  p.parent.assign(std::size_t(n), -1);
  p.at.assign(std::size_t(n), 0);
  for (Index b = 1; b < n; ++b) {
    const Index j = r.pick(0, b - 1), most = std::min(p.length[std::size_t(j)], p.length[std::size_t(b)]);
    if (r.coin(0.4) && start[std::size_t(j)] <= most) {
      p.parent[std::size_t(b)] = j;
      // The whole parent (or its page boundary) sometimes, else any point.
      p.at[std::size_t(b)] = start[std::size_t(b)] = r.coin(0.2) ? most : r.pick(start[std::size_t(j)], most);
    }
  }
  std::vector<Index> cur(std::size_t(n), 0);
  std::vector<char> made(std::size_t(n), 0);
  bool freed = false;
  const auto fork_ready = [&](auto&& self, Index j) -> void {  // the forks of j at its current size
    for (Index b = j + 1; b < n; ++b)
      if (!made[std::size_t(b)] && p.parent[std::size_t(b)] == j && p.at[std::size_t(b)] == cur[std::size_t(j)]) {
        p.steps.push_back({1, b, j, 0, 0});
        made[std::size_t(b)] = 1, cur[std::size_t(b)] = p.at[std::size_t(b)];
        self(self, b);
      }
  };
  for (;;) {
    std::vector<Index> ready;
    for (Index b = 0; b < n; ++b)
      if (made[std::size_t(b)] ? cur[std::size_t(b)] < p.length[std::size_t(b)] : p.parent[std::size_t(b)] < 0)
        ready.push_back(b);
    if (ready.empty()) break;
    const Index b = ready[std::size_t(r.pick(0, Index(ready.size()) - 1))];
    if (!made[std::size_t(b)]) {
      p.steps.push_back({0, b, -1, 0, 0});
      made[std::size_t(b)] = 1;
    } else {
      Index rows = std::min(p.length[std::size_t(b)] - cur[std::size_t(b)], r.pick(1, c.chunk));
      for (Index f = b + 1; f < n; ++f)  // stop at the next fork point
        if (!made[std::size_t(f)] && p.parent[std::size_t(f)] == b && p.at[std::size_t(f)] > cur[std::size_t(b)])
          rows = std::min(rows, p.at[std::size_t(f)] - cur[std::size_t(b)]);
      p.steps.push_back({2, b, -1, cur[std::size_t(b)], rows});
      cur[std::size_t(b)] += rows;
    }
    fork_ready(fork_ready, b);
    if (p.victim >= 0 && !freed && made[std::size_t(p.victim)] &&
        cur[std::size_t(p.victim)] == p.length[std::size_t(p.victim)]) {
      bool forks_made = true;
      for (Index f = 0; f < n; ++f)
        forks_made = forks_made && (made[std::size_t(f)] || p.parent[std::size_t(f)] != p.victim);
      if (forks_made) p.steps.push_back({3, p.victim, -1, 0, 0}), freed = true;
    }
  }
  // Every sequence holds ceil(size / page_size) pages at any time, shared or not: their sum at the
  // end bounds the pages in use (a copy on write takes a page only for a sequence that then holds it).
  for (const Index len : p.length) p.pages += (len + c.page_size - 1) / c.page_size;
  p.pages += r.pick(0, 2);
  return p;
}

// Replays the plan on `cache`; returns each sequence's id (the victim's is dead).
template <class T>
std::vector<Index> build_paged(attn::PagedKVCache<T>& cache, const PagedPlan& p, const std::vector<Mat<T>>& ks,
                               const std::vector<Mat<T>>& vs) {
  std::vector<Index> id(p.length.size(), -1);
  for (const PagedPlan::Step& s : p.steps) {
    const std::size_t b = std::size_t(s.seq);
    if (s.op == 0) id[b] = cache.add_sequence();
    if (s.op == 1) id[b] = cache.fork(id[std::size_t(s.from)]);
    if (s.op == 2) cache.append(id[b], ks[b].middleRows(s.row0, s.n), vs[b].middleRows(s.row0, s.n));
    if (s.op == 3) cache.free(id[b]);
  }
  return id;
}

// x rounded to storage type s (bf16 or fp16), so that storing it loses nothing.
template <class T>
void round_to_storage(Mat<T>& x, attn::KVStorage s) {
  for (Index i = 0; i < x.size(); ++i)
    x.data()[i] = s == attn::KVStorage::BFloat16 ? T(float(Eigen::bfloat16(float(x.data()[i]))))
                                                 : T(float(Eigen::half(float(x.data()[i]))));
}

// [out | lse^T]: one matrix, so that with_threads compares both.
template <class T>
Mat<T> joined(const Mat<T>& out, const Mat<T>& lse) {
  Mat<T> j(out.rows(), out.cols() + lse.rows());
  // Block by block, not `j << out, lse.transpose()`: the comma initializer offsets the data
  // pointer of an empty block (no query rows), which UBSan reports as arithmetic on null.
  if (j.size() == 0) return j;
  j.leftCols(out.cols()) = out;
  j.rightCols(lse.rows()) = lse.transpose();
  return j;
}

template <class T>
Outcome run_serving(const Config& c) {
  Outcome o;
  Rng r(c.seed ^ 0x9e3779b97f4a7c15ull);
  const Index B = c.B, H = c.H, Hkv = c.Hkv, d = c.d, dv = c.dv;
  const bool paged = c.serve == 2;
  const PagedPlan plan = paged ? plan_paged(r, c) : PagedPlan{};
  // Per sequence (the paged cache's victim included): queries, keys and values; a fork's first
  // `at` rows are its parent's.
  std::vector<Index> lq = c.lq, lk = c.lk;
  if (plan.victim >= 0) lq.insert(lq.begin() + plan.victim, 0), lk = plan.length;
  const std::size_t n = lq.size();
  std::vector<Mat<T>> qs(n), ks(n), vs(n);
  for (std::size_t b = 0; b < n; ++b) {
    qs[b] = random_matrix<T>(r, lq[b], H * d, c.q_amp);
    ks[b] = random_matrix<T>(r, lk[b], Hkv * d, c.k_amp);
    vs[b] = random_matrix<T>(r, lk[b], Hkv * dv, 1.0);
    if (paged && c.storage != attn::KVStorage::Native && c.storage != attn::KVStorage::Int8)
      round_to_storage(ks[b], c.storage), round_to_storage(vs[b], c.storage);
    if (paged && plan.parent[b] >= 0) {
      const std::size_t from = std::size_t(plan.parent[b]);
      ks[b].topRows(plan.at[b]) = ks[from].topRows(plan.at[b]);
      vs[b].topRows(plan.at[b]) = vs[from].topRows(plan.at[b]);
    }
  }
  // The sequences of the call, in its order: all of them (packed, KVCache), or the live ones in a
  // random order (paged).
  std::vector<std::size_t> order;
  for (std::size_t b = 0; b < n; ++b)
    if (Index(b) != plan.victim) order.push_back(b);
  if (paged) std::shuffle(order.begin(), order.end(), r.g);
  std::vector<Mat<T>> q_call, k_call, v_call;
  for (const std::size_t b : order) q_call.push_back(qs[b]), k_call.push_back(ks[b]), v_call.push_back(vs[b]);
  attn::IndexVector cu_q, cu_k;
  const Mat<T> q = stacked(q_call, H * d, &cu_q);
  const Index total = q.rows();

  const attn::GroupedQueryAttention<T> gqa = c.scale_kind == 0 ? attn::GroupedQueryAttention<T>(H, Hkv)
                                                                : attn::GroupedQueryAttention<T>(H, Hkv, T(c.scale));
  attn::Masks<T> m;
  m.causal = c.causal;
  m.window = c.window;
  m.softcap = static_cast<T>(c.softcap);
  m.sink_tokens = c.sink_tokens;
  std::vector<double> slopes_d, sinks_d;
  if (c.alibi) {
    m.alibi_slopes = c.alibi == 1 ? attn::alibi_slopes<T>(H) : attn::Vector<T>(H);
    if (c.alibi == 2)
      for (Index h = 0; h < H; ++h) m.alibi_slopes[h] = static_cast<T>(r.uniform(0, 1));
    for (Index h = 0; h < H; ++h) slopes_d.push_back(double(m.alibi_slopes[h]));
  }
  if (c.sinks) {
    m.sinks.resize(H);
    for (Index h = 0; h < H; ++h) sinks_d.push_back(double(m.sinks[h] = static_cast<T>(c.sink_amp * r.normal())));
  }
  if (c.bf16) m.precision = attn::Precision::BFloat16;
  attn::CacheArgs<T> cargs;
  static_cast<attn::Masks<T>&>(cargs) = m;
  attn::GqaArgs<T> one_args;  // a sequence alone
  static_cast<attn::Masks<T>&>(one_args) = m;
  one_args.batch = 1;

  // The library: the ragged call, and each sequence alone (same thread count) for (b).
  Mat<T> out, lse;
  bool has_lse = true;
  std::vector<Mat<T>> alone_out, alone_lse;
  std::optional<attn::KVCache<T>> cache;
  std::optional<attn::PagedKVCache<T>> pool, native_pool;
  attn::IndexVector seqs(Index(order.size()));
  const auto take = [&](const Mat<T>& both) {
    out.resize(both.rows(), H * dv), lse.resize(H, both.rows());
    if (both.rows() == 0) return;  // (a block of an empty matrix offsets its null data: see joined)
    out = both.leftCols(H * dv);
    lse = both.rightCols(H).transpose();
  };
  if (c.serve == 0) {
    const Mat<T> k = stacked(k_call, Hkv * d, &cu_k), v = stacked(v_call, Hkv * dv);
    const Input<T> qi(q, c.strided, r), ki(k, c.strided, r), vi(v, c.strided, r);
    has_lse = c.call % 2 == 1;
    take(with_threads(c, o, [&] {
      Mat<T> res = Mat<T>::Constant(total, H * dv, T(-7)), res_lse = Mat<T>::Zero(H, total);
      if (c.call == 0) res = gqa.forward_varlen(qi.ref(), ki.ref(), vi.ref(), cu_q, cu_k, m);
      if (c.call == 1) {
        attn::AttentionLse<T> both = gqa.forward_varlen_with_lse(qi.ref(), ki.ref(), vi.ref(), cu_q, cu_k, m);
        res = both.output, res_lse = both.lse;
      }
      if (c.call == 2) gqa.forward_varlen_into(qi.ref(), ki.ref(), vi.ref(), cu_q, cu_k, m, res);
      if (c.call == 3) gqa.forward_varlen_into(qi.ref(), ki.ref(), vi.ref(), cu_q, cu_k, m, res, res_lse);
      return joined(res, res_lse);
    }));
    attn::set_num_threads(c.threads);
    for (std::size_t i = 0; i < order.size(); ++i) {
      if (q_call[i].rows() == 0) {
        alone_out.emplace_back(), alone_lse.emplace_back();
        continue;
      }
      attn::AttentionLse<T> one = gqa.forward_with_lse(q_call[i], k_call[i], v_call[i], one_args);
      alone_out.push_back(one.output), alone_lse.push_back(one.lse);
    }
  } else if (c.serve == 1) {
    // Every sequence appended in chunks, the sequences in a random interleaving.
    cache.emplace(B, Hkv, d, c.S + r.pick(0, 5), 0, dv == d && r.coin(0.5) ? 0 : dv);
    std::vector<Index> cur(n, 0);
    for (;;) {
      std::vector<std::size_t> growing;
      for (std::size_t b = 0; b < n; ++b)
        if (cur[b] < lk[b]) growing.push_back(b);
      if (growing.empty()) break;
      const std::size_t b = growing[std::size_t(r.pick(0, Index(growing.size()) - 1))];
      const Index rows = std::min(lk[b] - cur[b], r.pick(1, c.chunk));
      cache->append(Index(b), ks[b].middleRows(cur[b], rows), vs[b].middleRows(cur[b], rows));
      cur[b] += rows;
    }
    has_lse = c.call % 2 == 1;
    take(with_threads(c, o, [&] {
      Mat<T> res = Mat<T>::Constant(total, H * dv, T(-7)), res_lse = Mat<T>::Zero(H, total);
      if (c.call == 0) res = gqa.forward_varlen(q, *cache, cu_q, cargs);
      if (c.call == 1) gqa.forward_varlen_into(q, *cache, cu_q, cargs, res, res_lse);
      if (c.call == 2) res = gqa.forward(q, *cache, cargs);
      if (c.call == 3) gqa.forward_into(q, *cache, -1, cargs, res, res_lse);
      return joined(res, res_lse);
    }));
    attn::set_num_threads(c.threads);
    for (std::size_t b = 0; b < n; ++b) {
      Mat<T> one(lq[b], H * dv), one_lse(H, lq[b]);
      if (lq[b] > 0) gqa.forward_into(qs[b], *cache, Index(b), cargs, one, one_lse);
      alone_out.push_back(one), alone_lse.push_back(one_lse);
    }
  } else {
    pool.emplace(c.storage, Hkv, d, c.page_size, plan.pages, dv == d && r.coin(0.5) ? 0 : dv);
    const std::vector<Index> id = build_paged(*pool, plan, ks, vs);
    for (std::size_t i = 0; i < order.size(); ++i) seqs[Index(i)] = id[order[i]];
    has_lse = c.call >= 2;
    const auto call = [&](const attn::PagedKVCache<T>& cache_) {
      Mat<T> res = Mat<T>::Constant(total, H * dv, T(-7)), res_lse = Mat<T>::Zero(H, total);
      if (c.call == 0) res = gqa.forward_varlen(q, cache_, seqs, cu_q, cargs);
      if (c.call == 1) gqa.forward_varlen_into(q, cache_, seqs, cu_q, cargs, res);
      if (c.call >= 2) gqa.forward_varlen_into(q, cache_, seqs, cu_q, cargs, res, res_lse);
      return joined(res, res_lse);
    };
    const Mat<T> both = with_threads(c, o, [&] { return call(*pool); });
    take(both);
    if (c.storage == attn::KVStorage::BFloat16 || c.storage == attn::KVStorage::Float16) {
      // K and V are bf16 (fp16) values: the same cache in Native storage gives the same bits.
      native_pool.emplace(attn::KVStorage::Native, Hkv, d, c.page_size, plan.pages, dv);
      const std::vector<Index> native_id = build_paged(*native_pool, plan, ks, vs);
      if (native_id != id) o.fail("the Native twin of the paged cache gave other sequence ids");
      attn::set_num_threads(c.threads);
      if (!same_bits(both, call(*native_pool)))
        o.fail(std::string(attn::storage_name(c.storage)) + " storage of representable K and V differs from Native");
    }
    attn::set_num_threads(c.threads);
    for (std::size_t i = 0; i < order.size(); ++i) {
      const std::size_t b = order[i];
      Mat<T> one(lq[b], H * dv), one_lse(H, lq[b]);
      if (lq[b] > 0) {
        attn::KVCache<T> flat(c.storage, 1, Hkv, d, lk[b], 0, dv);
        flat.append(0, ks[b], vs[b]);
        gqa.forward_into(qs[b], flat, 0, cargs, one, one_lse);
      }
      alone_out.push_back(one), alone_lse.push_back(one_lse);
    }
  }
  attn::set_num_threads(0);

  // (b) Each sequence alone gives its rows of the ragged call, bitwise (and its lse, which the
  // oracle checks when the ragged call gave none).
  Mat<T> lse_alone(H, total);
  for (std::size_t i = 0; i < order.size(); ++i) {
    const Index L = q_call[i].rows(), row0 = cu_q[Index(i)];
    if (L == 0) continue;
    lse_alone.middleCols(row0, L) = alone_lse[i];
    if (!same_bits(Mat<T>(out.middleRows(row0, L)), alone_out[i]))
      o.fail("sequence " + std::to_string(i) + " of the call: its rows differ from a call with it alone");
    if (has_lse && !same_bits(Mat<T>(lse.middleCols(row0, L)), alone_lse[i]))
      o.fail("sequence " + std::to_string(i) + " of the call: its lse differs from a call with it alone");
  }

  // (a) The oracle, each sequence alone, from the unrounded K and V (int8) or the stored ones (exact).
  const double scale = c.scale_kind == 0 ? double(T(1) / std::sqrt(T(d))) : double(T(c.scale));
  const RaggedWant want = ragged_oracle(c, q_call, k_call, v_call, scale, slopes_d, sinks_d);
  double vmax = 1;
  for (const Mat<T>& v : v_call)
    if (v.size()) vmax = std::max(vmax, double(v.cwiseAbs().maxCoeff()));
  check_ragged(c, o, out, has_lse ? lse : lse_alone, want, vmax, scale);

  // (c) The keys of one sequence split in 2 or 3 ranges, each part attended alone (without the
  // sinks), merged, and the sinks merged last as a part with lse = sink and no value: the unsplit
  // call to 1e-6 (float) or 1e-12 (double), relative. Not under bf16 products (each part rounds its
  // own probabilities).
  if (c.merge && !c.bf16) {
    std::vector<std::size_t> fit;
    for (std::size_t b = 0; b < n; ++b)
      if (lq[b] > 0 && lk[b] >= 2 && Index(b) != plan.victim) fit.push_back(b);
    if (!fit.empty()) {
      const std::size_t b = fit[std::size_t(r.pick(0, Index(fit.size()) - 1))];
      const Index S = lk[b], L = lq[b];
      std::vector<Index> cuts = {0, r.pick(1, S - 1), S};
      if (S >= 3 && r.coin(0.5)) {
        Index j = r.pick(1, S - 1);
        while (j == cuts[1]) j = r.pick(1, S - 1);
        cuts.insert(cuts.begin() + (j < cuts[1] ? 1 : 2), j);
      }
      attn::GqaArgs<T> part_args = one_args;
      part_args.sinks = attn::Vector<T>();
      const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-12;
      attn::set_num_threads(c.threads);
      const attn::AttentionLse<T> whole = gqa.forward_with_lse(qs[b], ks[b], vs[b], one_args);
      attn::AttentionLse<T> acc;
      for (std::size_t p = 0; p + 1 < cuts.size(); ++p) {
        const Index j0 = cuts[p], len = cuts[p + 1] - cuts[p];
        const attn::AttentionLse<T> part =
            gqa.forward_with_lse(qs[b], ks[b].middleRows(j0, len), vs[b].middleRows(j0, len), part_args);
        if (p == 0) {
          acc = part;
        } else {
          attn::merge_attention_states<T>(acc.output, acc.lse, part.output, part.lse, acc.output, acc.lse);
        }
      }
      if (c.sinks) {
        const Mat<T> none = Mat<T>::Zero(L, H * dv), sink_lse = m.sinks.replicate(1, L);
        attn::merge_attention_states<T>(acc.output, acc.lse, none, sink_lse, acc.output, acc.lse);
      }
      attn::set_num_threads(0);
      std::ostringstream what;
      what << "merge of keys split at";
      for (const Index j : cuts) what << " " << j;
      o.check(close(acc.output, whole.output, {tol, 0}, (what.str() + ": output").c_str()));
      o.check(close(acc.lse, whole.lse, {tol, 0}, (what.str() + ": lse").c_str()));
    }
  }

  // (d) A per-key mask is refused for a ragged batch, before anything is written.
  if (c.refuse) {
    attn::Masks<T> bad = m;
    const int kind = int(r.pick(0, 2));
    if (kind == 0) bad.attn_mask = attn::AttendMask(attn::BoolMatrix::Constant(1, 1, true));
    if (kind == 1) bad.attn_bias = attn::AdditiveMask<T>(Mat<T>::Zero(1, 1));
    if (kind == 2) bad.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Constant(1, 1, false));
    attn::CacheArgs<T> bad_cache;
    static_cast<attn::Masks<T>&>(bad_cache) = bad;
    Mat<T> sentinel = Mat<T>::Constant(total, H * dv, T(7));
    try {
      if (c.serve == 0) {
        const Mat<T> k = stacked(k_call, Hkv * d), v = stacked(v_call, Hkv * dv);
        gqa.forward_varlen_into(q, k, v, cu_q, cu_k, bad, sentinel);
      } else if (c.serve == 1) {
        gqa.forward_varlen_into(q, *cache, cu_q, bad_cache, sentinel);
      } else {
        gqa.forward_varlen_into(q, *pool, seqs, cu_q, bad_cache, sentinel);
      }
      o.fail("a per-key mask (kind " + std::to_string(kind) + ") was accepted for a ragged batch");
    } catch (const attn::argument_error&) {
    } catch (const std::exception& e) {
      o.fail(std::string("a per-key mask was refused with other than argument_error: ") + e.what());
    }
    if (!(sentinel.array() == T(7)).all()) o.fail("a refused call wrote its output");
  }
  return o;
}

// --- the tests -------------------------------------------------------------------------------------

Outcome run_case(const Config& c) {
  switch (c.api) {
    case Api::Sdpa:
    case Api::Gqa:
      return c.dbl ? run_core<double>(c) : run_core<float>(c);
    case Api::Mha:
      return c.dbl ? run_mha<double>(c) : run_mha<float>(c);
    case Api::Cache:
      return c.dbl ? run_cache<double>(c) : run_cache<float>(c);
    case Api::Serving:
      return c.dbl ? run_serving<double>(c) : run_serving<float>(c);
  }
  return {};
}

// Runs this API's share of the cases (seeds base .. base + count - 1 with seed % 5 == api), or the
// one case ATTN_DIFF_SEED names. Reports up to 10 failures, each with its replay command.
void run_api(Api api) {
  std::vector<std::uint64_t> seeds;
  if (const char* one = env("ATTN_DIFF_SEED")) {
    const std::uint64_t seed = std::strtoull(one, nullptr, 10);
    if (api_of(seed) != api) GTEST_SKIP() << "ATTN_DIFF_SEED=" << seed << " is a " << api_name(api_of(seed)) << " case";
    seeds.push_back(seed);
  } else {
    const std::uint64_t base = base_seed();
    for (int i = 0; i < case_count(); ++i)
      if (api_of(base + std::uint64_t(i)) == api) seeds.push_back(base + std::uint64_t(i));
  }
  int failures = 0;
  double worst = 0;
  std::uint64_t worst_seed = 0;
  for (const std::uint64_t seed : seeds) {
    const Config c = draw_config(seed);
    Outcome o;
    try {
      o = run_case(c);
    } catch (const std::exception& e) {
      o.fail(std::string("threw: ") + e.what());
    }
    if (o.ratio > worst) worst = o.ratio, worst_seed = seed;
    if (verbose()) std::printf("%s  ratio %.3g\n", c.describe().c_str(), o.ratio);
    if (!o.error.empty()) {
      ADD_FAILURE() << o.error << "\n  configuration: " << c.describe()
                    << "\n  replay: ATTN_DIFF_SEED=" << seed << " " << ::testing::internal::GetArgvs()[0];
      if (++failures == 10) {
        ADD_FAILURE() << "stopping after 10 failures";
        break;
      }
    }
  }
  std::printf("%s: %zu cases, worst error %.3g of the allowed (seed %llu)\n", api_name(api), seeds.size(), worst,
              static_cast<unsigned long long>(worst_seed));
}

TEST(Differential, ScaledDotProductAttention) { run_api(Api::Sdpa); }
TEST(Differential, GroupedQueryAttention) { run_api(Api::Gqa); }
TEST(Differential, MultiHeadAttention) { run_api(Api::Mha); }
TEST(Differential, GroupedQueryAttentionOverKVCache) { run_api(Api::Cache); }
TEST(Differential, Serving) { run_api(Api::Serving); }

}  // namespace
