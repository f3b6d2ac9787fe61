// bench/decode_bench.cpp - one decoding step against a long KV cache, as a fraction of the
// machine's streaming read bandwidth, measured by this program in the same run.
//
// A decode step is one query per head against S cached keys and values: 4*H*S*D FLOPs for
// 2*H*S*D*sizeof(T) bytes of K and V, so it is bound by how fast memory streams, not by FMAs.
// Rows:
//   stream/f32/threads:n        read a 512 MiB buffer once per iteration (a vectorized sum on
//                               attn's thread pool, n threads): the machine's streaming read rate
//   decode/f32/attn/...         detail::attention on B=1, L=1, the cache laid out [H, S, D] per
//                               K and V (each head's keys contiguous, as a KV cache stores them);
//                               bytes/s counts K and V once
// Cold cache: K and V together (128 MiB at S=4096, H=32, D=128) are four times this machine's
// 32 MiB L3, so every iteration streams them from memory. `of_stream` is the decode rate over the
// stream rate of the same thread count, measured first in the same process.
//
// ATTN_BENCH_THREADS=n sets attn's threads (bench_common.hpp); tools/run.sh-style usage:
//   ATTN_BENCH_THREADS=2 ./build-bench/bench/decode_bench
#include <benchmark/benchmark.h>

#include <atomic>
#include <attn/detail/attention.hpp>
#include <attn/detail/parallel.hpp>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

using namespace attn_bench;

// Sums `n` floats from `data` on `threads` threads (contiguous halves), `repeats` times; returns
// the best bytes per second. The sum is kept so the reads cannot be optimised away.
double stream_rate(const float* data, Index n, int threads, int repeats, double* sink) {
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    std::vector<double> partial(static_cast<std::size_t>(threads), 0.0);
    const auto t0 = std::chrono::steady_clock::now();
    attn::detail::parallel_tasks(threads, threads, [&](Index first, Index step) {
      for (Index t = first; t < threads; t += step) {
        const Index begin = n * t / threads, end = n * (t + 1) / threads;
        partial[static_cast<std::size_t>(t)] =
            static_cast<double>(Eigen::Map<const Vec<float>>(data + begin, end - begin).sum());
      }
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (double p : partial) *sink += p;
    best = std::max(best, double(n) * sizeof(float) / seconds);
  }
  return best;
}

// The streaming read rate on attn's current thread count, measured once per process.
double machine_stream_rate() {
  static const double rate = [] {
    const Index n = Index(128) << 20;  // 512 MiB of floats
    Vec<float> buffer = Vec<float>::Constant(n, 1.0f);
    double sink = 0;
    const double r = stream_rate(buffer.data(), n, attn::num_threads(), 5, &sink);
    benchmark::DoNotOptimize(sink);
    return r;
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
};

void BM_decode(benchmark::State& state, DecodeShape s) {
  attn::Generator gen(11);
  const Mat<float> q = random_matrix<float>(1, s.H * s.D, gen);
  const Mat<float> k = random_matrix<float>(s.H * s.S, s.D, gen), v = random_matrix<float>(s.H * s.S, s.D, gen);
  Mat<float> out(1, s.H * s.D);

  attn::detail::AttentionProblem<float> p;
  p.batch = 1, p.heads = s.H, p.L = 1, p.S = s.S, p.mask_keys = s.S, p.d = s.D, p.dv = s.D;
  p.q = {q.data(), 0, s.D, 0};
  p.k = {k.data(), 0, s.S * s.D, s.D};  // [H, S, D]: head h's keys contiguous
  p.v = {v.data(), 0, s.S * s.D, s.D};
  p.out = {out.data(), 0, s.D, 0};
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  p.causal = attn::Causal::BottomRight;  // the newest query sees the whole cache

  if (first_time("decode" + std::to_string(s.S))) {  // against the plain loops, once
    Mat<float> want(1, s.H * s.D);
    auto r = p;
    r.out = {want.data(), 0, s.D, 0};
    attn::detail::attention_reference(r);
    attn::detail::attention(p);
    require_agreement("decode S=" + std::to_string(s.S), out, want);
  }
  const double stream = machine_stream_rate();
  const auto t0 = std::chrono::steady_clock::now();
  time_it(state, [&] { attn::detail::attention(p); }, false);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double bytes = 2.0 * double(s.H * s.S * s.D) * sizeof(float);
  state.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] =
      benchmark::Counter(4.0 * double(s.H * s.S * s.D), benchmark::Counter::kIsIterationInvariantRate);
  // The decode step's bytes per second over the stream rate (the warm-up call inside the timed
  // span makes this a slight underestimate).
  state.counters["of_stream"] = bytes * double(state.iterations() + 1) / seconds / stream;
  state.counters["stream_GB/s"] = stream / 1e9;
}

void register_all() {
  benchmark::RegisterBenchmark("stream/f32", BM_stream)->Iterations(1)->UseRealTime();
  for (const DecodeShape s : {DecodeShape{32, 4096, 128}, DecodeShape{32, 1024, 128}, DecodeShape{12, 4096, 64}}) {
    auto* b = benchmark::RegisterBenchmark("decode/f32/attn", BM_decode, s);
    b->Args({1, s.H, 1, s.S, s.D})->ArgNames({"B", "H", "L", "S", "D"})->UseRealTime()->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) { return attn_bench::run(argc, argv, register_all); }
