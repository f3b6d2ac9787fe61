// bench/decode_bench.cpp - one decoding step against a long KV cache, as a fraction of the
// machine's streaming read bandwidth, measured by this program in the same run.
//
// A decode step is one query per head against S cached keys and values: 4*H*S*D FLOPs for
// 2*H*S*D*sizeof(T) bytes of K and V, so it is bound by how fast memory streams, not by FMAs.
// Rows:
//   stream/f32/threads:n        read a 512 MiB buffer once (a vectorized sum, stream_sum, on attn's
//                               thread pool, n threads, contiguous parts), best of 5: the
//                               machine's streaming read rate, measured once at start-up
//   decode/f32/attn/...         detail::attention on B=1, L=1, the cache laid out [H, S, D] per
//                               K and V (each head's keys contiguous, as a KV cache stores them);
//                               bytes/s counts K and V once
//   decode/f32/torch_matmul     (decode_torch_bench only) libtorch on the same [1, H, S, D] cache:
//   decode/f32/torch_sdpa       matmul(q * scale, K^T), softmax, matmul(., V); and
//                               at::_scaled_dot_product_attention (is_causal false: the one query
//                               sits at the end of the cache and sees every key)
// Cold cache: K and V together (128 MiB at S=4096, H=32, D=128) are four times this machine's
// 32 MiB L3, so every iteration streams them from memory. (The two smaller shapes, 32 and 24 MiB,
// partly stay in L3: their of_stream can pass 1.)
//
// of_stream: the decode step's rate over the rate at which the same bytes stream, measured
// alongside. Each timed iteration is followed by a plain read (stream_sum on the same threads, not
// counted in the row's time) of the very K and V the step reads, and of_stream is the decode rate
// over that read's rate across the same iterations (stream_GB/s). Both are cold: each reads
// 128 MiB after the other has. Why the same bytes at the same moment: on this shared VM one loop
// streams different 128 MiB buffers of one process at 16 to 22 GB/s (wherever the host put their
// pages), and the bandwidth drifts by +-15 % within seconds; against a separate buffer measured
// at start-up (the stream row, kept for reference) of_stream moved by as much as the goal it
// checks.
//
// ATTN_BENCH_THREADS=n sets attn's threads (bench_common.hpp) and libtorch's:
//   ATTN_BENCH_THREADS=2 ./build-bench/bench/decode_bench
// decode_torch_bench is this program with the libtorch rows, built with -DATTN_BENCH_TORCH=ON where
// libtorch is found; like torch_bench it re-executes itself with OMP_WAIT_POLICY=PASSIVE unless the
// variable is set (spinning OpenMP threads would steal the second core from the next row).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <attn/detail/attention.hpp>
#include <attn/detail/parallel.hpp>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "bench_common.hpp"

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

// The sum of x[0, n) through eight packet accumulators: eight independent chains of loads in
// flight. The stream rate must be the fastest plain read, or of_stream flatters the kernel: Eigen's
// sum() keeps two accumulators, and read the same buffers 3-15 % slower than this from memory on
// this VM (from L2 both run at ~115 GB/s: the difference is in how many misses are in flight).
float stream_sum(const float* x, Index n) {
  namespace ei = Eigen::internal;
  using P = attn::detail::mk::Packet<float>;
  constexpr Index L = attn::detail::mk::kLanes<float>, U = 8;
  P acc[U];
  for (P& a : acc) a = ei::pset1<P>(0.0f);
  Index i = 0;
  for (; i + U * L <= n; i += U * L)
    for (Index u = 0; u < U; ++u) acc[u] = ei::padd(acc[u], ei::ploadu<P>(x + i + u * L));
  for (Index u = 1; u < U; ++u) acc[0] = ei::padd(acc[0], acc[u]);
  float total = ei::predux(acc[0]);
  for (; i < n; ++i) total += x[i];
  return total;
}

// Seconds to read the buffers `parts` once (stream_sum), each split into contiguous pieces over
// `threads` threads. The sums go into *sink so the reads cannot be optimised away.
struct Span {
  const float* data;
  Index n;
};
double stream_seconds(const std::vector<Span>& parts, int threads, double* sink) {
  std::vector<double> partial(static_cast<std::size_t>(threads), 0.0);
  const auto t0 = Clock::now();
  attn::detail::parallel_tasks(threads, threads, [&](Index first, Index step) {
    for (Index t = first; t < threads; t += step)
      for (const Span& part : parts) {
        const Index begin = part.n * t / threads, end = part.n * (t + 1) / threads;
        partial[static_cast<std::size_t>(t)] += static_cast<double>(stream_sum(part.data + begin, end - begin));
      }
  });
  const double seconds = seconds_since(t0);
  for (double p : partial) *sink += p;
  return seconds;
}

// The streaming read rate of a 512 MiB buffer (16 times the L3) on attn's current thread count,
// best of 5, measured once per process.
double machine_stream_rate() {
  static const double rate = [] {
    const Vec<float> buffer = Vec<float>::Constant(Index(128) << 20, 1.0f);
    double sink = 0, best = 0;
    for (int r = 0; r < 5; ++r)
      best = std::max(best, double(buffer.size()) * sizeof(float) /
                                stream_seconds({{buffer.data(), buffer.size()}}, attn::num_threads(), &sink));
    benchmark::DoNotOptimize(sink);
    return best;
  }();
  return rate;
}

void BM_stream(benchmark::State& state) {
  const double rate = machine_stream_rate();
  for (auto _ : state) {
    benchmark::DoNotOptimize(rate);
  }
  state.counters["GB/s"] = rate / 1e9;
  state.counters["threads"] = attn::num_threads();
}

struct DecodeShape {
  Index H, S, D;
  double bytes() const { return 2.0 * double(H * S * D) * sizeof(float); }  // K and V
  std::string key() const {
    return "H=" + std::to_string(H) + " S=" + std::to_string(S) + " D=" + std::to_string(D);
  }
};

// The cache and one query, the same values for every implementation.
struct DecodeInputs {
  Mat<float> q, k, v, out;
  explicit DecodeInputs(const DecodeShape& s) : out(1, s.H * s.D) {
    attn::Generator gen(11);
    q = random_matrix<float>(1, s.H * s.D, gen);
    k = random_matrix<float>(s.H * s.S, s.D, gen);
    v = random_matrix<float>(s.H * s.S, s.D, gen);
  }
};

// Times step() once per iteration (the row's manual time), each followed by a plain read of the
// cache's K and V, and sets the counters (see the top of this file).
template <class Step>
void time_against_stream(benchmark::State& state, const DecodeShape& s, const DecodeInputs& in, const Step& step) {
  const std::vector<Span> cache = {{in.k.data(), in.k.size()}, {in.v.data(), in.v.size()}};
  step();  // untimed: first-touch page faults and a first cold pass out of the timing
  double decode_time = 0, stream_time = 0, sink = 0;
  Index n = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    step();
    const double seconds = seconds_since(t0);
    state.SetIterationTime(seconds);
    decode_time += seconds;
    stream_time += stream_seconds(cache, attn::num_threads(), &sink);
    ++n;
  }
  benchmark::DoNotOptimize(sink);
  const double decode_rate = s.bytes() * double(n) / decode_time;
  const double stream_rate = s.bytes() * double(n) / stream_time;
  state.counters["bytes/s"] = benchmark::Counter(s.bytes(), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] =
      benchmark::Counter(4.0 * double(s.H * s.S * s.D), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["of_stream"] = decode_rate / stream_rate;
  state.counters["stream_GB/s"] = stream_rate / 1e9;
}

attn::detail::AttentionProblem<float> decode_problem(const DecodeShape& s, const DecodeInputs& in, float* out) {
  attn::detail::AttentionProblem<float> p;
  p.batch = 1, p.heads = s.H, p.L = 1, p.S = s.S, p.mask_keys = s.S, p.d = s.D, p.dv = s.D;
  p.q = {in.q.data(), 0, s.D, 0};
  p.k = {in.k.data(), 0, s.S * s.D, s.D};  // [H, S, D]: head h's keys contiguous
  p.v = {in.v.data(), 0, s.S * s.D, s.D};
  p.out = {out, 0, s.D, 0};
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  p.causal = attn::Causal::BottomRight;  // the newest query sees the whole cache
  return p;
}

void BM_decode(benchmark::State& state, DecodeShape s) {
  DecodeInputs in(s);
  const auto p = decode_problem(s, in, in.out.data());
  if (first_time("decode " + s.key())) {  // against the plain loops, once per shape
    Mat<float> want(1, s.H * s.D);
    attn::detail::attention_reference(decode_problem(s, in, want.data()));
    attn::detail::attention(p);
    require_agreement("decode " + s.key(), in.out, want);
  }
  time_against_stream(state, s, in, [&] { attn::detail::attention(p); });
}

#ifdef ATTN_DECODE_BENCH_TORCH
// libtorch on the same cache, as [1, H, 1|S, D] views of the same buffers (no copy).
void BM_decode_torch(benchmark::State& state, DecodeShape s, bool sdpa) {
  c10::InferenceMode guard;
  DecodeInputs in(s);
  const auto view = [](const Mat<float>& m, at::IntArrayRef sizes) {
    return at::from_blob(const_cast<float*>(m.data()), sizes, at::kFloat);
  };
  const at::Tensor q = view(in.q, {1, s.H, 1, s.D}), k = view(in.k, {1, s.H, s.S, s.D}),
                   v = view(in.v, {1, s.H, s.S, s.D});
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  const auto step = [&] {
    at::Tensor out = sdpa ? std::get<0>(at::_scaled_dot_product_attention(q, k, v, c10::nullopt, 0.0, false))
                          : at::matmul(at::softmax(at::matmul(q * scale, k.transpose(-2, -1)), -1), v);
    benchmark::DoNotOptimize(out.data_ptr());
    return out;
  };
  const std::string what = std::string("decode ") + (sdpa ? "torch_sdpa " : "torch_matmul ") + s.key();
  if (first_time(what)) {  // against attn, once per shape
    attn::detail::attention(decode_problem(s, in, in.out.data()));
    const at::Tensor got = step().contiguous();
    require_agreement(what,
                      Mat<float>(Eigen::Map<const Mat<float>>(got.data_ptr<float>(), 1, s.H * s.D)), in.out, 1e-3);
  }
  time_against_stream(state, s, in, step);
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
  benchmark::RegisterBenchmark("stream/f32", BM_stream)->Iterations(1)->UseRealTime();
#ifdef ATTN_DECODE_BENCH_TORCH
  configure_torch(attn::num_threads());
#endif
  for (const DecodeShape s : {DecodeShape{32, 4096, 128}, DecodeShape{32, 1024, 128}, DecodeShape{12, 4096, 64}}) {
    const auto args = [&](benchmark::internal::Benchmark* b) {
      b->Args({1, s.H, 1, s.S, s.D})->ArgNames({"B", "H", "L", "S", "D"})->UseManualTime()->Unit(benchmark::kMicrosecond);
    };
    args(benchmark::RegisterBenchmark("decode/f32/attn", BM_decode, s));
#ifdef ATTN_DECODE_BENCH_TORCH
    args(benchmark::RegisterBenchmark("decode/f32/torch_matmul", BM_decode_torch, s, false));
    args(benchmark::RegisterBenchmark("decode/f32/torch_sdpa", BM_decode_torch, s, true));
#endif
  }
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
  return attn_bench::run(argc, argv, register_all);
}
