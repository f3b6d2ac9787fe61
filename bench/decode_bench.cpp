// bench/decode_bench.cpp - the decoding step against a KV cache in every storage type, as a
// fraction of this machine's best plain read rate, beside the decode kernel before the
// grouped-query / KV-storage rewrite; and a prefill against a compressed cache. One run measures
// everything it compares.
//
// A decode step is one query per head against S cached keys and values: 4*H*S*D FLOPs for
// B*S*bytes_per_token() bytes of K and V, so it is bound by how fast memory streams, not by FMAs.
//
// Rows, in the order they run:
//   read/<pages>/<pattern>  one pass over a 512 MiB buffer (16x the 32 MiB L3) of floats on attn's
//                           thread pool and thread count, best of 5 passes (the patterns take turns):
//                           the read rate each way of reading memory reaches (GB/s), measured once,
//                           when the first row runs, before any cache is built. pages: huge = a
//                           detail::PageBuffer (2 MiB aligned, madvise(MADV_HUGEPAGE): the KV cache's
//                           memory), 4k = a std::vector (no madvise: 4 KiB pages unless the system's
//                           transparent_hugepage, in the context, is "always"), for contiguous and
//                           both interleaved patterns; thp_MiB is how much of the buffer's mapping
//                           the kernel backed with huge pages (AnonHugePages in /proc/self/smaps;
//                           -1: unreadable). Patterns:
//     contiguous                 eight packet accumulators, thread t of T sums the t-th contiguous
//                                part of the buffer
//     contiguous/prefetch:N      the same with __builtin_prefetch N bytes ahead, once per 64-byte line
//     interleaved:512KiB         thread t sums chunks t, t+T, t+2T, ... (parallel_tasks' schedule)
//     two_streams                contiguous parts of both halves of the buffer in one loop (4 + 4
//                                accumulators): two streams at once per thread, as K and V
//     interleaved_kv:256KiB      chunk c = 256 KiB of the first half, then the same 256 KiB of the
//                                second, chunks interleaved: the decode kernel's tasks (512 keys of
//                                K, then of V, at D = 128 in fp32)
//     nt_load                    contiguous, with non-temporal loads (_mm512_stream_load_si512; AVX2:
//                                _mm256_stream_load_si256; not registered without either). On
//                                ordinary write-back memory the hint does nothing on most CPUs: an
//                                ordinary load, reported anyway
//   read/best               the largest of them (label: which): best_read, the denominator below
//   decode/f32/before/...   the decode kernel before the rewrite (decode_before.hpp: attn at commit
//                           93eddd6), on the fp32 cache of the shape; under GQA it reads each kv head
//                           once per query head
//   decode/<s>/attn/...     detail::attention, s = f32 (KVStorage::Native), bf16, fp16, int8: a
//                           KVCache<float>(s, B, Hkv, D, S) holding S random positions per sequence,
//                           bound by cache.bind(p, 0); B sequences of one query each (q [B, H*D]),
//                           causal bottom-right, scale 1/sqrt(D)
//   decode/f32/torch_matmul (decode_torch_bench only) libtorch on the same fp32 cache, viewed in place
//   decode/f32/torch_sdpa   as [B, Hkv, S, D]: the G = H/Hkv query heads of a group are G query rows
//                           of their kv head (no copy of K or V, no mask: the one query per sequence
//                           sees the whole cache); matmul(q * scale, K^T), softmax, matmul(., V); and
//                           at::_scaled_dot_product_attention (is_causal false)
//   serving/decode_ragged/<s>/per_sequence, .../one_call
//                           a decoding step of 32 sequences whose cache lengths spread over
//                           100..4000 (H = 32, Hkv = 8, D = 128, s = f32 or bf16, one KVCache):
//                           one GroupedQueryAttention::forward_into call per sequence (b = 0..31),
//                           against one ragged call for all of them (b = -1); GB/s and
//                           of_best_read on the bytes the 32 sequences hold, speedup_vs_per_sequence
//   serving/prefill/padded, .../packed
//                           a BERT-base-like batch: 32 sequences of 20..512 tokens (seeded), H = 12,
//                           D = 64, bidirectional: the padded [32 * 512] batch with a key padding
//                           mask, against forward_varlen on the packed sequences; padding_fraction
//                           f, speedup_vs_padded, and goal_speedup = 1 / (1 - f) (the packed call
//                           faster than the padded one by at least the padding fraction)
//   serving/paged/<decode|prefill>/<s>/contiguous, .../paged
//                           8 sequences of 4096 positions (H = 32, Hkv = 8, D = 128, s = f32 or
//                           bf16) in a KVCache and in a PagedKVCache of 256-position pages: a
//                           decoding step (one query each) and a prefill of 2048 queries of one
//                           sequence, the same ragged GroupedQueryAttention call on either cache
//                           (the paged output is checked bitwise against the contiguous one);
//                           time_vs_contiguous on the paged rows
//   prefill/<s>/attn/...    L = 2048 queries (the flash kernel) against a cache of S = 2048 in
//                           storage s = f32, bf16, int8, causal bottom-right, H = 32, Hkv = 8, D = 128
// Decode shapes: H = 32 query heads of D = 128, Hkv = 32 (MHA) and 8 (GQA), S = 2048 to 16384,
// B = 1 and 8; the fp32 rows of B = 8, S = 16384, MHA are left out (a 4 GiB cache; the machine
// shares 24 GiB), and so the bf16/fp16/int8 rows of that shape have no speedup counters.
//
// Counters. Time: a step's wall-clock time (manual time, the mean over the iterations).
//   GB/s               cache.bytes_per_token() * S * B (K, V and int8's scales, as stored) per second
//   of_best_read       GB/s over read/best's
//   speedup_vs_before  decode/f32/before's time of the same shape over this row's
//   speedup_vs_f32     decode/f32/attn's time of the same shape over this row's
//   attn_speedup       (torch rows) this row's time over decode/f32/attn's
//   cache_MiB          the bytes above. Where it is at most about 32 (the L3), much of the cache
//                      stays in L3 from one step to the next, and the row is not a cold-cache
//                      figure (its of_best_read can pass 1): GQA at B = 1 up to S = 4096 in fp32,
//                      8192 in bf16/fp16 and 16384 in int8; MHA at B = 1, S = 2048 in bf16/fp16 and
//                      up to 4096 in int8; GQA at B = 8, S = 2048 in int8 (32 to 33 MiB: partly).
//                      These rows are warm as they stand, not flushed between steps; a decoder that
//                      runs other layers between its steps would find those caches cold.
//   GFLOP/s, vs_f32    (prefill rows) the causal FLOPs per second; time over prefill/f32's time
// The speedup counters come from rows that ran earlier in the same run (registration order):
// filtering out the f32 rows, or --benchmark_enable_random_interleaving, leaves them out.
//
// Before each shape and storage type is timed, its output is held to detail::attention_reference
// on the same stored cache (require_agreement): decode rows for the first and last sequence,
// prefill rows for 16 query rows at the start, middle and end.
//
// ATTN_BENCH_THREADS=n sets attn's threads (bench_common.hpp) and libtorch's. Each row runs for
// --benchmark_min_time seconds, 0.2 unless given. The whole run takes a few minutes on 2 cores, most
// of it untimed: filling each cache (one at a time, at most 2 GiB) and the reference checks.
//   ATTN_BENCH_THREADS=2 ./build-bench/bench/decode_bench
//   ATTN_BENCH_THREADS=2 ./build-bench/bench/decode_bench --benchmark_filter='read/|S:4096'
// decode_torch_bench is this program with the libtorch rows, built with -DATTN_BENCH_TORCH=ON where
// libtorch is found; like torch_bench it re-executes itself with OMP_WAIT_POLICY=PASSIVE unless the
// variable is set (spinning OpenMP threads would steal the second core from the next row).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <attn/detail/attention.hpp>
#include <attn/detail/page_buffer.hpp>
#include <attn/detail/parallel.hpp>
#include <attn/grouped_query_attention.hpp>
#include <attn/kv_cache.hpp>
#include <attn/paged_kv_cache.hpp>
#include <attn/kv_storage.hpp>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bench_common.hpp"
#include "decode_before.hpp"

#ifdef ATTN_DECODE_BENCH_TORCH
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/version.h>
#include <unistd.h>

#include <cstdlib>
#endif

namespace {

using namespace attn_bench;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---------------------------------------------------------------------------------------------
// The best plain read rate.

namespace ei = Eigen::internal;
using Packet = attn::detail::mk::Packet<float>;
constexpr Index kLanes = attn::detail::mk::kLanes<float>;
constexpr Index kLine = 64 / Index(sizeof(float));  // floats per cache line

// x[0, n) and y[0, n) summed in one loop, four accumulators each: two streams at once.
__attribute__((noipa)) float sum_two(const float* x, const float* y, Index n) {
  constexpr Index U = 4, kStep = U * kLanes;
  Packet ax[U], ay[U];
  for (Index u = 0; u < U; ++u) ax[u] = ay[u] = ei::pset1<Packet>(0.0f);
  Index i = 0;
  for (; i + kStep <= n; i += kStep)
    for (Index u = 0; u < U; ++u) {
      ax[u] = ei::padd(ax[u], ei::ploadu<Packet>(x + i + u * kLanes));
      ay[u] = ei::padd(ay[u], ei::ploadu<Packet>(y + i + u * kLanes));
    }
  for (Index u = 1; u < U; ++u) ax[0] = ei::padd(ax[0], ax[u]), ay[0] = ei::padd(ay[0], ay[u]);
  float total = ei::predux(ei::padd(ax[0], ay[0]));
  for (; i < n; ++i) total += x[i] + y[i];
  return total;
}

// sum8 with non-temporal loads; x must be 64-byte aligned. The loaded bits are added as floats (the
// buffer holds floats).
#if defined(__AVX512F__)
constexpr bool kHaveNtLoad = true;
constexpr const char* kNtLoadName = "_mm512_stream_load_si512";
float sum_nt(const float* x, Index n) {
  __m512 acc[8];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  Index i = 0;
  for (; i + 8 * 16 <= n; i += 8 * 16)
    for (int u = 0; u < 8; ++u)
      acc[u] = _mm512_add_ps(acc[u], _mm512_castsi512_ps(_mm512_stream_load_si512(const_cast<float*>(x + i + 16 * u))));
  for (int u = 1; u < 8; ++u) acc[0] = _mm512_add_ps(acc[0], acc[u]);
  float total = _mm512_reduce_add_ps(acc[0]);
  for (; i < n; ++i) total += x[i];
  return total;
}
#elif defined(__AVX2__)
constexpr bool kHaveNtLoad = true;
constexpr const char* kNtLoadName = "_mm256_stream_load_si256";
float sum_nt(const float* x, Index n) {
  __m256 acc[8];
  for (__m256& a : acc) a = _mm256_setzero_ps();
  Index i = 0;
  for (; i + 8 * 8 <= n; i += 8 * 8)
    for (int u = 0; u < 8; ++u)
      acc[u] = _mm256_add_ps(
          acc[u], _mm256_castsi256_ps(_mm256_stream_load_si256(reinterpret_cast<const __m256i*>(x + i + 8 * u))));
  for (int u = 1; u < 8; ++u) acc[0] = _mm256_add_ps(acc[0], acc[u]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc[0]);
  float total = 0;
  for (float l : lanes) total += l;
  for (; i < n; ++i) total += x[i];
  return total;
}
#else
constexpr bool kHaveNtLoad = false;
constexpr const char* kNtLoadName = "";
float sum_nt(const float* x, Index n) { return sum8<0>(x, n); }
#endif

// Seconds for attn's pool to run read(t) for every task t of [0, tasks), on `threads` threads, worker
// w taking tasks w, w + T, w + 2T, ... (parallel_tasks). The sums go into *sink so the reads cannot
// be optimised away.
template <class Read>
double timed_pass(Index tasks, int threads, const Read& read, double* sink) {
  std::vector<double> partial(static_cast<std::size_t>(threads), 0.0);
  const auto t0 = Clock::now();
  attn::detail::parallel_tasks(tasks, threads, [&](Index first, Index step) {
    double s = 0;
    for (Index t = first; t < tasks; t += step) s += static_cast<double>(read(t));
    partial[static_cast<std::size_t>(first)] += s;
  });
  const double seconds = seconds_since(t0);
  for (double p : partial) *sink += p;
  return seconds;
}


template <Index kAhead>
double contiguous_pass(const float* x, Index n, int threads, double* sink) {
  return timed_pass(
      threads, threads,
      [&](Index t) {
        const Index b = part_begin(n, t, threads), e = part_begin(n, t + 1, threads);
        return sum8<kAhead>(x + b, e - b);
      },
      sink);
}

double interleaved_pass(const float* x, Index n, int threads, double* sink) {
  constexpr Index chunk = (Index(512) << 10) / Index(sizeof(float));
  return timed_pass(
      n / chunk, threads, [&](Index t) { return sum8<0>(x + t * chunk, chunk); }, sink);
}

double two_streams_pass(const float* x, Index n, int threads, double* sink) {
  const Index half = n / 2;
  return timed_pass(
      threads, threads,
      [&](Index t) {
        const Index b = part_begin(half, t, threads), e = part_begin(half, t + 1, threads);
        return sum_two(x + b, x + half + b, e - b);
      },
      sink);
}

double interleaved_kv_pass(const float* x, Index n, int threads, double* sink) {
  constexpr Index chunk = (Index(256) << 10) / Index(sizeof(float));
  const Index half = n / 2;
  return timed_pass(
      half / chunk, threads,
      [&](Index t) { return sum8<0>(x + t * chunk, chunk) + sum8<0>(x + half + t * chunk, chunk); }, sink);
}

double nt_load_pass(const float* x, Index n, int threads, double* sink) {
  return timed_pass(
      threads, threads,
      [&](Index t) {
        const Index b = part_begin(n, t, threads), e = part_begin(n, t + 1, threads);
        return sum_nt(x + b, e - b);
      },
      sink);
}

struct ReadPattern {
  std::string name;  // the row: read/<name>
  bool huge;         // on the PageBuffer; else on the 4 KiB-page buffer
  double (*pass)(const float* x, Index n, int threads, double* sink);  // seconds of one pass
};

const std::vector<ReadPattern>& read_patterns() {
  static const std::vector<ReadPattern> patterns = [] {
    std::vector<ReadPattern> p = {
        {"huge/contiguous", true, contiguous_pass<0>},
        {"huge/contiguous/prefetch:256B", true, contiguous_pass<256>},
        {"huge/contiguous/prefetch:1KiB", true, contiguous_pass<1024>},
        {"huge/contiguous/prefetch:4KiB", true, contiguous_pass<4096>},
        {"huge/interleaved:512KiB", true, interleaved_pass},
        {"huge/two_streams", true, two_streams_pass},
        {"huge/interleaved_kv:256KiB", true, interleaved_kv_pass},
        {"4k/contiguous", false, contiguous_pass<0>},
        {"4k/interleaved:512KiB", false, interleaved_pass},
        {"4k/interleaved_kv:256KiB", false, interleaved_kv_pass},
    };
    if (kHaveNtLoad) p.push_back({"huge/nt_load", true, nt_load_pass});
    return p;
  }();
  return patterns;
}

// Bytes of the mapping holding address a that the kernel backs with transparent huge pages
// (AnonHugePages in /proc/self/smaps); -1 where that cannot be read.
double huge_page_bytes(const void* a) {
  std::ifstream smaps("/proc/self/smaps");
  const auto addr = reinterpret_cast<std::uintptr_t>(a);
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    unsigned long long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%llx-%llx", &lo, &hi) == 2) {  // a mapping's first line
      inside = addr >= lo && addr < hi;
    } else if (inside && line.rfind("AnonHugePages:", 0) == 0) {
      return 1024.0 * std::atof(line.c_str() + std::strlen("AnonHugePages:"));  // "  n kB"
    }
  }
  return -1;
}

struct ReadRates {
  std::vector<double> rate;  // bytes/s of each read_patterns() entry, best of its passes
  double huge_thp = -1, small_thp = -1;
  double best = 0;
  std::size_t best_at = 0;
};

constexpr Index kReadFloats = Index(128) << 20;  // 512 MiB: 16 times the 32 MiB L3
constexpr int kReadPasses = 5;

// Measured once, at the first row that needs it (the first row of the run), before any KV cache is
// built; the buffers are freed afterwards.
const ReadRates& read_rates() {
  static const ReadRates rates = [] {
    const Index n = kReadFloats;
    attn::detail::PageBuffer huge(static_cast<std::size_t>(n) * sizeof(float));
    float* const h = reinterpret_cast<float*>(huge.data());
    std::fill(h, h + n, 1.0f);
    const std::vector<float> small(static_cast<std::size_t>(n), 1.0f);
    const auto& patterns = read_patterns();
    ReadRates r;
    r.rate.assign(patterns.size(), 0.0);
    r.huge_thp = huge_page_bytes(h);
    r.small_thp = huge_page_bytes(small.data());
    double sink = 0;
    for (int pass = 0; pass < kReadPasses; ++pass)  // the patterns take turns: drift hits them alike
      for (std::size_t i = 0; i < patterns.size(); ++i) {
        const double seconds = patterns[i].pass(patterns[i].huge ? h : small.data(), n, attn::num_threads(), &sink);
        r.rate[i] = std::max(r.rate[i], double(n) * sizeof(float) / seconds);
      }
    benchmark::DoNotOptimize(sink);
    r.best_at = std::size_t(std::max_element(r.rate.begin(), r.rate.end()) - r.rate.begin());
    r.best = r.rate[r.best_at];
    return r;
  }();
  return rates;
}

void BM_read(benchmark::State& state, std::size_t i) {
  const ReadRates& r = read_rates();
  const double bytes = double(kReadFloats) * sizeof(float);
  for (auto _ : state) state.SetIterationTime(bytes / r.rate[i]);
  state.counters["GB/s"] = r.rate[i] / 1e9;
  state.counters["of_best_read"] = r.rate[i] / r.best;
  state.counters["thp_MiB"] = read_patterns()[i].huge ? r.huge_thp / double(1 << 20) : r.small_thp / double(1 << 20);
  state.counters["threads"] = attn::num_threads();
}

void BM_read_best(benchmark::State& state) {
  const ReadRates& r = read_rates();
  const double bytes = double(kReadFloats) * sizeof(float);
  for (auto _ : state) state.SetIterationTime(bytes / r.best);
  state.counters["GB/s"] = r.best / 1e9;
  state.counters["threads"] = attn::num_threads();
  state.SetLabel(read_patterns()[r.best_at].name);
}

// ---------------------------------------------------------------------------------------------
// Decode and prefill against a KVCache.

struct Shape {
  Index B, H, Hkv, L, S, D;
  std::string key() const {
    return "B=" + std::to_string(B) + " H=" + std::to_string(H) + " Hkv=" + std::to_string(Hkv) +
           " L=" + std::to_string(L) + " S=" + std::to_string(S) + " D=" + std::to_string(D);
  }
  double f32_cache_bytes() const { return double(B * Hkv * S * 2 * D) * sizeof(float); }
};

// The fp32 caches the run builds; past this (MHA at B = 8, S = 16384: 4 GiB) the fp32 rows of a
// shape are left out.
constexpr double kMaxF32CacheBytes = 3.0 * double(1 << 30);

// Uniform values in [-1, 1), fast: a 512 MiB cache fills in well under a second, where
// attn::init::uniform would take several. splitmix64, two 24-bit values per step.
class FastRandom {
 public:
  explicit FastRandom(std::uint64_t seed) : s_(seed) {}
  void fill(float* x, Index n) {
    constexpr float kUnit = 1.0f / float(1 << 23);
    Index i = 0;
    for (; i + 2 <= n; i += 2) {
      const std::uint64_t z = next();
      x[i] = static_cast<float>(z >> 40) * kUnit - 1.0f;
      x[i + 1] = static_cast<float>(z & 0xFFFFFF) * kUnit - 1.0f;
    }
    if (i < n) x[i] = static_cast<float>(next() >> 40) * kUnit - 1.0f;
  }

 private:
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  std::uint64_t s_;
};

// Query rows [row0, row0 + rows) of q [B*L, H*D] as attention_reference computes them.
struct Check {
  Index row0, rows;
  Mat<float> want;
};

// One shape's cache in one storage type, filled with S random positions per sequence (the same
// values in every storage type: the seed depends on the shape only), its queries q [B*L, H*D]
// (sequence b's rows at [b*L, (b+1)*L)), the output, the problem bound to both, and the reference's
// rows to check the output against.
struct CacheState {
  Shape s;
  attn::KVStorage storage;
  attn::KVCache<float> cache;
  Mat<float> q, out;
  attn::detail::AttentionProblem<float> p;
  std::vector<Check> checks;

  CacheState(const Shape& shape, attn::KVStorage st)
      : s(shape),
        storage(st),
        cache(st, shape.B, shape.Hkv, shape.D, shape.S),
        out(shape.B * shape.L, shape.H * shape.D) {
    FastRandom gen(std::hash<std::string>{}(s.key()));
    q.resize(s.B * s.L, s.H * s.D);
    gen.fill(q.data(), q.size());
    out.setZero();
    constexpr Index kBlock = 512;  // positions per append
    Mat<float> k(kBlock, s.Hkv * s.D), v(kBlock, s.Hkv * s.D);
    for (Index b = 0; b < s.B; ++b)
      for (Index r0 = 0; r0 < s.S; r0 += kBlock) {
        const Index rows = std::min(kBlock, s.S - r0);
        gen.fill(k.data(), rows * k.cols());
        gen.fill(v.data(), rows * v.cols());
        cache.append(b, k.topRows(rows), v.topRows(rows));
      }
    p.batch = s.B, p.heads = s.H, p.kv_heads = s.Hkv, p.L = s.L, p.S = s.S, p.mask_keys = s.S;
    p.d = p.dv = s.D;
    p.q = {q.data(), s.L * s.H * s.D, s.D, s.H * s.D};
    p.out = {out.data(), s.L * s.H * s.D, s.D, s.H * s.D};
    p.scale = 1.0f / std::sqrt(static_cast<float>(s.D));
    p.causal = attn::Causal::BottomRight;  // the newest query sits at the newest key
    cache.bind(p, 0);
    if (s.L == 1) {  // decode: the first and the last sequence
      checks.push_back(reference(0, 0, 1));
      if (s.B > 1) checks.push_back(reference(s.B - 1, 0, 1));
    } else {  // prefill: 16 query rows at the start, middle and end of sequence 0
      const Index n = std::min<Index>(16, s.L);
      for (const Index r0 : {Index(0), (s.L - n) / 2, s.L - n}) checks.push_back(reference(0, r0, n));
    }
  }
  CacheState(const CacheState&) = delete;  // p points into this object
  CacheState& operator=(const CacheState&) = delete;

  // attention_reference on query rows [r0, r0 + n) of sequence b: the problem of those n queries
  // alone, with the keys they can see (S - L + r0 + n under bottom-right causal masking).
  Check reference(Index b, Index r0, Index n) const {
    attn::detail::AttentionProblem<float> sub = p;
    sub.batch = 1;
    cache.bind(sub, b);
    sub.L = n;
    sub.S = sub.mask_keys = s.S - s.L + r0 + n;
    sub.q.data = q.data() + (b * s.L + r0) * s.H * s.D;
    Check c{b * s.L + r0, n, Mat<float>::Zero(n, s.H * s.D)};
    sub.out = {c.want.data(), 0, s.D, s.H * s.D};
    attn::detail::attention_reference(sub);
    return c;
  }

  // Runs step() on an output of NaNs and holds the rows it wrote to the reference's.
  template <class Step>
  void require_agreement(const std::string& what, const Step& step, double tolerance = 1e-4) {
    out.setConstant(std::numeric_limits<float>::quiet_NaN());
    step();
    for (const Check& c : checks)
      attn_bench::require_agreement(what, Mat<float>(out.middleRows(c.row0, c.rows)), c.want, tolerance);
  }
};

// The cache of a shape and storage type: built on first use, and kept while the rows that follow
// use the same one (the before, attn and torch rows of an fp32 shape share one). The previous
// cache is freed before the next is built, so one lives at a time.
CacheState& cache_for(const Shape& s, attn::KVStorage storage) {
  static std::unique_ptr<CacheState> current;
  if (!current || current->s.key() != s.key() || current->storage != storage) {
    current.reset();
    current = std::make_unique<CacheState>(s, storage);
  }
  return *current;
}

// Each row's mean seconds per step, by what ran and the shape, for the rows after it.
std::map<std::string, double>& row_times() {
  static std::map<std::string, double> times;
  return times;
}
const double* recall(const std::string& key) {
  const auto it = row_times().find(key);
  return it == row_times().end() ? nullptr : &it->second;
}

std::string storage_row_name(attn::KVStorage s) { return s == attn::KVStorage::Native ? "f32" : attn::storage_name(s); }

// Times step() once per iteration (the row's manual time) after one untimed call (first-touch and
// the cache's first pass out of the timing); returns the mean seconds per step (0: no iterations).
template <class Step>
double time_steps(benchmark::State& state, const Step& step) {
  step();
  double total = 0;
  Index n = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    step();
    const double seconds = seconds_since(t0);
    state.SetIterationTime(seconds);
    total += seconds;
    ++n;
  }
  return n > 0 ? total / double(n) : 0.0;
}

// The counters every decode row has, for a step of `seconds` on cache c.
void decode_counters(benchmark::State& state, const CacheState& c, double seconds) {
  const double bytes = double(c.cache.bytes_per_token() * c.s.S * c.s.B);
  state.counters["GB/s"] = bytes / seconds / 1e9;
  state.counters["of_best_read"] = bytes / seconds / read_rates().best;
  state.counters["cache_MiB"] = bytes / double(1 << 20);
  state.counters["threads"] = attn::num_threads();
}

void BM_decode(benchmark::State& state, Shape s, attn::KVStorage storage, bool before) {
  read_rates();  // measured before the first cache is built
  CacheState& c = cache_for(s, storage);
  const auto step = [&] {
    if (before)
      attn_bench::before::attention_decode(c.p);
    else
      attn::detail::attention(c.p);
  };
  const std::string row = (before ? "before " : storage_row_name(storage) + " ") + s.key();
  if (first_time("decode " + row)) c.require_agreement("decode " + row, step);
  const double seconds = time_steps(state, step);
  if (seconds <= 0) return;
  decode_counters(state, c, seconds);
  row_times()[row] = seconds;
  if (before) return;
  if (const double* t = recall("before " + s.key())) state.counters["speedup_vs_before"] = *t / seconds;
  if (const double* t = recall("f32 " + s.key())) state.counters["speedup_vs_f32"] = *t / seconds;
}

void BM_prefill(benchmark::State& state, Shape s, attn::KVStorage storage) {
  CacheState& c = cache_for(s, storage);
  const auto step = [&] { attn::detail::attention(c.p); };
  const std::string row = "prefill " + storage_row_name(storage) + " " + s.key();
  if (first_time(row)) c.require_agreement(row, step);
  const double seconds = time_steps(state, step);
  if (seconds <= 0) return;
  // Query i sees keys [0, i + S - L]: 4*D FLOPs a key per head (q.k and p.v).
  double keys = 0;
  for (Index i = 0; i < s.L; ++i) keys += double(std::min(s.S, i + s.S - s.L + 1));
  state.counters["GFLOP/s"] = 4.0 * double(s.B * s.H * s.D) * keys / seconds / 1e9;
  state.counters["threads"] = attn::num_threads();
  row_times()[row] = seconds;
  if (const double* t = recall("prefill f32 " + s.key())) state.counters["vs_f32"] = seconds / *t;
}

// ---------------------------------------------------------------------------------------------
// Serving: sequences of different lengths in one call (issue 16).

// A decoding step of kServingSequences sequences whose cache lengths spread evenly over
// [100, 4000] (in a fixed shuffled order), H = 32, Hkv = 8, D = 128, one query each.
constexpr Index kServingSequences = 32;

struct RaggedState {
  attn::KVStorage storage;
  std::vector<Index> lengths;
  attn::KVCache<float> cache;
  attn::GroupedQueryAttention<float> gqa{32, 8};
  Mat<float> q, out, want;  // want: sequences 0 and 31 as attention_reference computes them
  explicit RaggedState(attn::KVStorage st) : storage(st), cache(st, kServingSequences, 8, 128, 4000) {
    for (Index b = 0; b < kServingSequences; ++b) lengths.push_back(100 + (3900 * b + 15) / (kServingSequences - 1));
    std::shuffle(lengths.begin(), lengths.end(), std::mt19937(7));
    FastRandom gen(2026);
    q.resize(kServingSequences, 32 * 128);
    gen.fill(q.data(), q.size());
    out.setZero(kServingSequences, 32 * 128);
    Mat<float> k(512, 8 * 128), v(512, 8 * 128);
    for (Index b = 0; b < kServingSequences; ++b)
      for (Index r0 = 0; r0 < lengths[std::size_t(b)]; r0 += 512) {
        const Index rows = std::min<Index>(512, lengths[std::size_t(b)] - r0);
        gen.fill(k.data(), rows * k.cols());
        gen.fill(v.data(), rows * v.cols());
        cache.append(b, k.topRows(rows), v.topRows(rows));
      }
    want.setZero(2, 32 * 128);
    for (const Index b : {Index(0), kServingSequences - 1}) {
      attn::detail::AttentionProblem<float> p;
      p.heads = 32, p.kv_heads = 8, p.L = 1, p.S = p.mask_keys = lengths[std::size_t(b)], p.d = p.dv = 128;
      p.q = {q.data() + b * q.cols(), 0, 128, q.cols()};
      p.out = {want.data() + (b == 0 ? 0 : want.cols()), 0, 128, want.cols()};
      p.scale = 1.0f / std::sqrt(128.0f);
      p.causal = attn::Causal::BottomRight;
      cache.bind(p, b);
      attn::detail::attention_reference(p);
    }
  }
  double bytes() const {
    Index tokens = 0;
    for (const Index n : lengths) tokens += n;
    return double(cache.bytes_per_token() * tokens);
  }
  template <class Step>
  void require_agreement(const std::string& what, const Step& step) {
    out.setConstant(std::numeric_limits<float>::quiet_NaN());
    step();
    Mat<float> got(2, out.cols());
    got.row(0) = out.row(0), got.row(1) = out.row(kServingSequences - 1);
    attn_bench::require_agreement(what, got, want, 1e-4);
  }
};

RaggedState& ragged_for(attn::KVStorage storage) {
  static std::unique_ptr<RaggedState> current;
  if (!current || current->storage != storage) {
    current.reset();
    current = std::make_unique<RaggedState>(storage);
  }
  return *current;
}

// one_call: GroupedQueryAttention::forward_into(q, cache, -1, ...), all 32 sequences in one ragged
// call; per_sequence: forward_into(q.row(b), cache, b, ...) for b = 0..31, what attn offered before.
void BM_decode_ragged(benchmark::State& state, attn::KVStorage storage, bool one_call) {
  read_rates();
  RaggedState& r = ragged_for(storage);
  const attn::CacheArgs<float> args;
  const auto step = [&] {
    if (one_call) {
      r.gqa.forward_into(r.q, r.cache, -1, args, r.out);
    } else {
      for (Index b = 0; b < kServingSequences; ++b) r.gqa.forward_into(r.q.row(b), r.cache, b, args, r.out.row(b));
    }
  };
  const std::string row = std::string("ragged ") + (one_call ? "one_call " : "per_sequence ") + storage_row_name(storage);
  if (first_time(row)) r.require_agreement(row, step);
  const double seconds = time_steps(state, step);
  if (seconds <= 0) return;
  state.counters["GB/s"] = r.bytes() / seconds / 1e9;
  state.counters["of_best_read"] = r.bytes() / seconds / read_rates().best;
  state.counters["cache_MiB"] = r.bytes() / double(1 << 20);
  state.counters["threads"] = attn::num_threads();
  row_times()[row] = seconds;
  if (one_call)
    if (const double* t = recall("ragged per_sequence " + storage_row_name(storage)))
      state.counters["speedup_vs_per_sequence"] = *t / seconds;
}

// A BERT-base-like encoder batch: 32 sequences of 20..512 tokens (seeded), H = 12, D = 64,
// bidirectional. padded: the [32 * 512] batch with a key padding mask (every query row computed,
// padding keys skipped); packed: forward_varlen on the sequences alone.
struct PackedState {
  std::vector<Index> lengths;
  attn::IndexVector cu;
  Mat<float> q, k, v, qp, kp, vp, out, out_padded;  // packed [total, 768]; padded [32 * 512, 768]
  attn::GqaArgs<float> padded_args;
  attn::GroupedQueryAttention<float> gqa{12, 12};
  PackedState() {
    std::mt19937 rng(11);
    std::uniform_int_distribution<Index> len(20, 512);
    for (Index b = 0; b < 32; ++b) lengths.push_back(len(rng));
    cu.resize(33);
    cu[0] = 0;
    for (Index b = 0; b < 32; ++b) cu[b + 1] = cu[b] + lengths[std::size_t(b)];
    FastRandom gen(5);
    for (Mat<float>* m : {&q, &k, &v}) {
      m->resize(cu[32], 768);
      gen.fill(m->data(), m->size());
    }
    attn::BoolMatrix pad = attn::BoolMatrix::Zero(32, 512);
    for (Mat<float>* m : {&qp, &kp, &vp}) m->setZero(32 * 512, 768);
    for (Index b = 0; b < 32; ++b) {
      const Index n = lengths[std::size_t(b)];
      qp.middleRows(b * 512, n) = q.middleRows(cu[b], n);
      kp.middleRows(b * 512, n) = k.middleRows(cu[b], n);
      vp.middleRows(b * 512, n) = v.middleRows(cu[b], n);
      pad.row(b).tail(512 - n).setConstant(true);
    }
    padded_args.batch = 32;
    padded_args.key_padding_mask = attn::IgnoreMask(std::move(pad));
    out.setZero(cu[32], 768);
    out_padded.setZero(32 * 512, 768);
  }
  double padding_fraction() const { return 1.0 - double(cu[32]) / double(32 * 512); }
};

PackedState& packed_state() {
  static PackedState s;
  return s;
}

void BM_prefill_packed(benchmark::State& state, bool packed) {
  PackedState& s = packed_state();
  const attn::Masks<float> none;
  const auto step = [&] {
    if (packed)
      s.gqa.forward_varlen_into(s.q, s.k, s.v, s.cu, s.cu, none, s.out);
    else
      s.gqa.forward_into(s.qp, s.kp, s.vp, s.padded_args, s.out_padded);
  };
  const std::string row = packed ? "prefill packed" : "prefill padded";
  if (packed && first_time(row)) {  // the packed rows equal the padded batch's unpadded rows
    step();
    s.gqa.forward_into(s.qp, s.kp, s.vp, s.padded_args, s.out_padded);
    Mat<float> unpadded(s.cu[32], 768);
    for (Index b = 0; b < 32; ++b)
      unpadded.middleRows(s.cu[b], s.lengths[std::size_t(b)]) = s.out_padded.middleRows(b * 512, s.lengths[std::size_t(b)]);
    attn_bench::require_agreement(row, s.out, unpadded, 1e-5);
  }
  const double seconds = time_steps(state, step);
  if (seconds <= 0) return;
  state.counters["tokens"] = double(packed ? s.cu[32] : 32 * 512);
  state.counters["padding_fraction"] = s.padding_fraction();
  state.counters["threads"] = attn::num_threads();
  row_times()[row] = seconds;
  if (packed)
    if (const double* t = recall("prefill padded")) {
      state.counters["speedup_vs_padded"] = *t / seconds;
      state.counters["goal_speedup"] = 1.0 / (1.0 - s.padding_fraction());  // time at most (1 - f) of padded's
    }
}

// The same 8 sequences of 4096 positions (H = 32, Hkv = 8, D = 128) in a KVCache and in a
// PagedKVCache of 256-position pages, appended alike; decode: one query per sequence, prefill:
// 2048 queries of sequence 0 against its 4096 keys; both through GroupedQueryAttention's ragged
// calls, so that only where K and V live differs.
struct PagedState {
  attn::KVStorage storage;
  attn::KVCache<float> flat;
  attn::PagedKVCache<float> paged;
  attn::GroupedQueryAttention<float> gqa{32, 8};
  attn::IndexVector ids, cu_decode, cu_prefill;
  Mat<float> q_decode, q_prefill, out_decode, out_prefill;
  explicit PagedState(attn::KVStorage st)
      : storage(st), flat(st, 8, 8, 128, 4096), paged(st, 8, 128, 256, 8 * 4096 / 256) {
    FastRandom gen(4096);
    Mat<float> k(512, 8 * 128), v(512, 8 * 128);
    ids.resize(8);
    for (Index b = 0; b < 8; ++b) {
      ids[b] = paged.add_sequence();
      for (Index r0 = 0; r0 < 4096; r0 += 512) {
        gen.fill(k.data(), k.size());
        gen.fill(v.data(), v.size());
        flat.append(b, k, v);
        paged.append(ids[b], k, v);
      }
    }
    cu_decode.resize(9), cu_prefill.resize(9);
    for (Index b = 0; b <= 8; ++b) cu_decode[b] = b, cu_prefill[b] = b == 0 ? 0 : 2048;
    q_decode.resize(8, 32 * 128), q_prefill.resize(2048, 32 * 128);
    gen.fill(q_decode.data(), q_decode.size());
    gen.fill(q_prefill.data(), q_prefill.size());
    out_decode.setZero(8, 32 * 128), out_prefill.setZero(2048, 32 * 128);
  }
};

PagedState& paged_for(attn::KVStorage storage) {
  static std::unique_ptr<PagedState> current;
  if (!current || current->storage != storage) {
    current.reset();
    current = std::make_unique<PagedState>(storage);
  }
  return *current;
}

void BM_paged(benchmark::State& state, attn::KVStorage storage, bool prefill, bool paged) {
  read_rates();
  PagedState& s = paged_for(storage);
  const attn::CacheArgs<float> args;
  const Mat<float>& q = prefill ? s.q_prefill : s.q_decode;
  Mat<float>& out = prefill ? s.out_prefill : s.out_decode;
  const attn::IndexVector& cu = prefill ? s.cu_prefill : s.cu_decode;
  const auto step = [&] {
    if (paged)
      s.gqa.forward_varlen_into(q, s.paged, s.ids, cu, args, out);
    else
      s.gqa.forward_varlen_into(q, s.flat, cu, args, out);
  };
  const std::string row = std::string("paged ") + (prefill ? "prefill " : "decode ") + storage_row_name(storage);
  if (paged && first_time(row)) {  // the same bits as the contiguous cache's
    Mat<float> want(out.rows(), out.cols());
    s.gqa.forward_varlen_into(q, s.flat, cu, args, want);
    step();
    if (!(out == want)) {
      std::fprintf(stderr, "%s: the paged cache's output differs from the contiguous cache's\n", row.c_str());
      std::abort();
    }
  }
  const double seconds = time_steps(state, step);
  if (seconds <= 0) return;
  if (!prefill) {
    const double bytes = double(s.flat.bytes_per_token() * 4096 * 8);
    state.counters["GB/s"] = bytes / seconds / 1e9;
    state.counters["of_best_read"] = bytes / seconds / read_rates().best;
  }
  state.counters["threads"] = attn::num_threads();
  const std::string key = row + (paged ? " paged" : " contiguous");
  row_times()[key] = seconds;
  if (paged)
    if (const double* t = recall(row + " contiguous")) state.counters["time_vs_contiguous"] = seconds / *t;
}

#ifdef ATTN_DECODE_BENCH_TORCH
// libtorch on the fp32 cache, viewed in place as [B, Hkv, S, D] (the cache's strides), and the
// queries q [B, H*D] as [B, Hkv, G, D]: the G query heads of kv head g are G query rows against it.
// The result [B, Hkv, G, D] is laid out as attn's [B, H*D].
void BM_decode_torch(benchmark::State& state, Shape s, bool sdpa) {
  c10::InferenceMode guard;
  CacheState& c = cache_for(s, attn::KVStorage::Native);
  const Index G = s.H / s.Hkv;
  const at::Tensor q = at::from_blob(c.q.data(), {s.B, s.Hkv, G, s.D}, {s.H * s.D, G * s.D, s.D, 1}, at::kFloat);
  const auto view = [&](const attn::detail::Strided<const float>& x) {
    return at::from_blob(const_cast<float*>(x.data), {s.B, s.Hkv, s.S, s.D},
                         {x.batch_stride, x.head_stride, x.row_stride, 1}, at::kFloat);
  };
  const at::Tensor k = view(c.p.k), v = view(c.p.v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  const auto step = [&] {
    at::Tensor out = sdpa ? std::get<0>(at::_scaled_dot_product_attention(q, k, v, c10::nullopt, 0.0, false))
                          : at::matmul(at::softmax(at::matmul(q * scale, k.transpose(-2, -1)), -1), v);
    benchmark::DoNotOptimize(out.data_ptr());
    return out;
  };
  const std::string row = std::string(sdpa ? "torch_sdpa " : "torch_matmul ") + s.key();
  if (first_time("decode " + row)) {  // against attn, once per shape
    c.require_agreement("decode attn (before " + row + ")", [&] { attn::detail::attention(c.p); });
    const at::Tensor got = step().contiguous();
    require_agreement("decode " + row, Mat<float>(Eigen::Map<const Mat<float>>(got.data_ptr<float>(), s.B, s.H * s.D)),
                      c.out, 1e-3);
  }
  const double seconds = time_steps(state, step);
  if (seconds <= 0) return;
  decode_counters(state, c, seconds);
  if (const double* t = recall("f32 " + s.key())) state.counters["attn_speedup"] = seconds / *t;
}

// libtorch's threads, and its BLAS's when that is OpenBLAS, to attn's thread count.
void configure_torch(int threads) {
  at::set_num_threads(threads);
  using SetThreads = void (*)(int);
  if (auto set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set(threads);
  benchmark::AddCustomContext("torch_version", TORCH_VERSION);
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  benchmark::AddCustomContext("omp_wait_policy", policy ? policy : "unset");
}
#endif

void register_all() {
  {
    std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string mode;
    std::getline(thp, mode);
    benchmark::AddCustomContext("transparent_hugepage", mode.empty() ? "unknown" : mode);
    if (kHaveNtLoad) benchmark::AddCustomContext("nt_load", kNtLoadName);
  }
  for (std::size_t i = 0; i < read_patterns().size(); ++i)
    benchmark::RegisterBenchmark(("read/" + read_patterns()[i].name).c_str(), BM_read, i)
        ->Iterations(1)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("read/best", BM_read_best)
      ->Iterations(1)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
#ifdef ATTN_DECODE_BENCH_TORCH
  configure_torch(attn::num_threads());
#endif

  using attn::KVStorage;
  const auto args = [](benchmark::internal::Benchmark* b, const Shape& s, benchmark::TimeUnit unit) {
    b->Args({s.B, s.H, s.Hkv, s.L, s.S, s.D})->ArgNames({"B", "H", "Hkv", "L", "S", "D"})->UseManualTime()->Unit(unit);
  };
  for (const Index Hkv : {32, 8})
    for (const Index B : {1, 8})
      for (const Index S : {2048, 4096, 8192, 16384}) {
        const Shape s{B, 32, Hkv, 1, S, 128};
        const bool f32 = s.f32_cache_bytes() <= kMaxF32CacheBytes;
        if (f32)
          args(benchmark::RegisterBenchmark("decode/f32/before", BM_decode, s, KVStorage::Native, true), s,
               benchmark::kMicrosecond);
        for (const KVStorage storage : {KVStorage::Native, KVStorage::BFloat16, KVStorage::Float16, KVStorage::Int8}) {
          if (storage == KVStorage::Native && !f32) continue;
          args(benchmark::RegisterBenchmark(("decode/" + storage_row_name(storage) + "/attn").c_str(), BM_decode, s,
                                            storage, false),
               s, benchmark::kMicrosecond);
#ifdef ATTN_DECODE_BENCH_TORCH
          if (storage == KVStorage::Native) {
            args(benchmark::RegisterBenchmark("decode/f32/torch_matmul", BM_decode_torch, s, false), s,
                 benchmark::kMicrosecond);
            args(benchmark::RegisterBenchmark("decode/f32/torch_sdpa", BM_decode_torch, s, true), s,
                 benchmark::kMicrosecond);
          }
#endif
        }
      }
  for (const KVStorage storage : {KVStorage::Native, KVStorage::BFloat16}) {
    benchmark::RegisterBenchmark(("serving/decode_ragged/" + storage_row_name(storage) + "/per_sequence").c_str(),
                                 BM_decode_ragged, storage, false)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("serving/decode_ragged/" + storage_row_name(storage) + "/one_call").c_str(),
                                 BM_decode_ragged, storage, true)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (const KVStorage storage : {KVStorage::Native, KVStorage::BFloat16})
    for (const bool prefill : {false, true})
      for (const bool paged : {false, true})
        benchmark::RegisterBenchmark(("serving/paged/" + std::string(prefill ? "prefill/" : "decode/") +
                                      storage_row_name(storage) + (paged ? "/paged" : "/contiguous"))
                                         .c_str(),
                                     BM_paged, storage, prefill, paged)
            ->UseManualTime()
            ->Unit(prefill ? benchmark::kMillisecond : benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("serving/prefill/padded", BM_prefill_packed, false)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("serving/prefill/packed", BM_prefill_packed, true)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  const Shape prefill{1, 32, 8, 2048, 2048, 128};
  for (const KVStorage storage : {KVStorage::Native, KVStorage::BFloat16, KVStorage::Int8})
    args(benchmark::RegisterBenchmark(("prefill/" + storage_row_name(storage) + "/attn").c_str(), BM_prefill, prefill,
                                      storage),
         prefill, benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
#ifdef ATTN_DECODE_BENCH_TORCH
  if (!std::getenv("OMP_WAIT_POLICY")) {  // see the top of this file (and of torch_bench.cpp)
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);
    std::perror("decode_torch_bench: re-executing with OMP_WAIT_POLICY=PASSIVE failed; going on without it");
    unsetenv("OMP_WAIT_POLICY");
  }
#endif
  // 0.2 s a row unless --benchmark_min_time is given (Google Benchmark's default, 0.5 s, would
  // more than double the run).
  std::vector<char*> args(argv, argv + argc);
  static char default_min_time[] = "--benchmark_min_time=0.2";
  if (std::none_of(args.begin(), args.end(),
                   [](const char* a) { return std::strncmp(a, "--benchmark_min_time", 20) == 0; }))
    args.push_back(default_min_time);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  return attn_bench::run(n, args.data(), register_all);
}
