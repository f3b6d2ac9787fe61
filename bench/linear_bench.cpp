// bench/linear_bench.cpp - attn::Linear against the obvious Eigen code, at transformer shapes.
//
// attn runs Linear::forward_into (y sized once by the caller; detail::linear_into cuts it into
// fixed tiles run on attn's threads, each computed by attn's packed micro-kernel with the bias
// fused, or for up to 4 rows by the few-rows kernel, which streams W once). The baseline is what one writes without attn:
// y = x * W.transpose(); y.rowwise() += b^T - one Eigen GEMM on one thread (Eigen threads only
// under OpenMP) which, without noalias(), evaluates the product into a temporary and copies it.
// On one thread (ATTN_BENCH_THREADS=1) the ratio shows what the kernel and the tiling save; on
// more it shows the threading too. Each shape runs attn then baseline, back to back; their ratio
// is the figure to trust.
//
// FLOPs: 2 * N * in * out (the bias is not counted).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <attn/detail/parallel.hpp>
#include <attn/linear.hpp>
#include <attn/version.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

using namespace attn_bench;

struct LinearShape {
  Index N, in, out;  // x [N, in] -> y [N, out]
  int iterations;    // 0: run for a minimum time instead
  double flops() const { return 2.0 * double(N) * double(in) * double(out); }
};

template <class T>
void linear_baseline(const Mat<T>& w, const attn::Vector<T>& b, const Mat<T>& x, Mat<T>& y) {
  y = x * w.transpose();
  y.rowwise() += b.transpose();
}

template <class T>
void BM_linear(benchmark::State& state, const LinearShape& s, bool use_attn) {
  attn::Generator gen(42);
  const attn::Linear<T> fc(s.in, s.out, /*bias=*/true, gen);
  Mat<T> x(s.N, s.in);
  attn::init::uniform(x, -1.0, 1.0, gen);
  Mat<T> y(s.N, s.out), want(s.N, s.out);

  // attn and the baseline must agree before either is timed.
  fc.forward_into(x, y);
  linear_baseline(fc.weight(), fc.bias(), x, want);
  require_agreement<T>(
      "linear_bench: " + std::to_string(s.N) + "x" + std::to_string(s.in) + "->" + std::to_string(s.out), y, want);

  for (auto _ : state) {
    if (use_attn)
      fc.forward_into(x, y);
    else
      linear_baseline(fc.weight(), fc.bias(), x, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["flops"] = benchmark::Counter(s.flops(), benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void register_linear(const LinearShape& s) {
  for (const bool use_attn : {true, false}) {
    const std::string name = std::string("linear/") + type_name<T>() + (use_attn ? "/attn" : "/baseline");
    auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_linear<T>, s, use_attn);
    b->Args({s.N, s.in, s.out})->ArgNames({"N", "in", "out"});
    set_timing(b, s.flops(), s.iterations);
  }
}

// ---------------------------------------------------------------------------------------------
// Weights kept in bf16, fp16 and int8 (Linear::set_storage), at TinyLlama-1.1B's projection shapes
// (E = 2048, SwiGLU 5632): one token (N = 1, decoding: a matrix-vector product that streams the
// weight) and a 512-token prompt (N = 512, the packed GEMM, which converts W as it packs it).
//
// A decoding step reads every layer's weights once, from memory: 22 layers of TinyLlama are ~4 GB
// in float. So the N = 1 rows cycle through copies of the Linear, together >= 256 MiB (8 times the
// 32 MiB L3 of the Zen 4/5 bench machines), one per iteration, and each row first measures a plain
// read of the same bytes (the same copies, buffers and threads: sum8 on attn's pool, best of 5
// passes) as its denominator: `of_stream` is the GEMV's weight bytes per second over that read's,
// and `GB/s` the weight bytes per second.

constexpr double kRingBytes = 256.0 * (1 << 20);

// Seconds of one plain read of every copy's weight bytes: each copy's bytes split into contiguous
// parts, one per thread, summed as floats (the bits do not matter, only the loads).
template <class T>
double read_pass(const std::vector<attn::Linear<T>>& ring, int threads, double* sink) {
  std::vector<double> partial(static_cast<std::size_t>(threads), 0.0);
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& fc : ring) {
    const auto v = fc.stored_weight().view();
    const float* x = static_cast<const float*>(v.data);
    // The elements' bytes (not memory_bytes(), which counts int8's scales, held elsewhere).
    const Index n = v.rows * v.cols * attn::storage_bytes<T>(v.storage) / Index(sizeof(float));
    attn::detail::parallel_tasks(threads, threads, [&](Index first, Index) {
      const Index b = part_begin(n, first, threads), e = part_begin(n, first + 1, threads);
      partial[std::size_t(first)] += double(sum8(x + b, e - b));
    });
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (double p : partial) *sink += p;
  return seconds;
}

template <class T>
void BM_linear_weights(benchmark::State& state, const LinearShape& s, attn::Storage storage,
                       attn::Precision precision) {
  attn::Generator gen(42);
  attn::Linear<T> fc(s.in, s.out, /*bias=*/false, gen);
  fc.set_storage(storage);
  fc.set_precision(precision);
  Mat<T> x(s.N, s.in);
  attn::init::uniform(x, -1.0, 1.0, gen);
  Mat<T> y(s.N, s.out);
  const std::string what = std::string("linear_bench, ") + attn::storage_name(storage) + ": " + std::to_string(s.N) +
                           "x" + std::to_string(s.in) + "->" + std::to_string(s.out);
  // Checked against Eigen on the stored values, in T (bf16 compute: to bf16's error, attn/precision.hpp;
  // with x and W in [-1, 1] and ~1/sqrt(in), about 2^-7 * sqrt(in) / sqrt(in) of |y|'s scale).
  fc.forward_into(x, y);
  require_agreement<T>(what, y, Mat<T>(x * fc.weight().transpose()),
                       precision == attn::Precision::BFloat16 ? 2e-2 : 1e-4);

  const double weight_bytes = double(fc.stored_weight().memory_bytes());
  std::vector<attn::Linear<T>> ring;
  if (s.N == 1) {
    const auto copies = std::size_t(std::max(1.0, std::ceil(kRingBytes / weight_bytes)));
    ring.assign(copies, fc);
  } else {
    ring.push_back(fc);
  }
  double sink = 0, read = 0;
  if (s.N == 1)
    for (int pass = 0; pass < 5; ++pass)
      read = std::max(read, double(ring.size()) * weight_bytes / read_pass(ring, attn::num_threads(), &sink));
  benchmark::DoNotOptimize(sink);

  std::size_t next = 0;
  for (auto _ : state) {
    ring[next].forward_into(x, y);
    next = next + 1 == ring.size() ? 0 : next + 1;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["flops"] = benchmark::Counter(s.flops(), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_MiB"] = weight_bytes / double(1 << 20);
  if (s.N == 1) {
    state.counters["GB/s"] = benchmark::Counter(weight_bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["read_GB/s"] = read / 1e9;
    // GB/s over read_GB/s: the weight bytes per iteration over the read's rate, per second of iteration.
    state.counters["of_stream"] =
        benchmark::Counter(weight_bytes / read, benchmark::Counter::kIsIterationInvariantRate);
  }
}

void register_weights() {
  using attn::Storage;
  for (const LinearShape& s :
       {LinearShape{1, 2048, 2048, 0}, LinearShape{1, 2048, 5632, 0}, LinearShape{1, 5632, 2048, 0},
        LinearShape{512, 2048, 2048, 0}, LinearShape{512, 2048, 5632, 0}, LinearShape{512, 5632, 2048, 0}})
    for (const Storage st : {Storage::Native, Storage::BFloat16, Storage::Float16, Storage::Int8})
      // The prompt also with bf16 compute (Precision::BFloat16: the bf16 micro-kernel on CPUs with
      // AVX512_BF16); one token stays in T either way.
      for (const attn::Precision pr : {attn::Precision::Native, attn::Precision::BFloat16}) {
        if (s.N == 1 && pr != attn::Precision::Native) continue;
        const std::string name = std::string("linear_weights/f32/") + attn::storage_name(st) +
                                 (pr == attn::Precision::BFloat16 ? "/bf16_compute" : "");
        auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_linear_weights<float>, s, st, pr);
        b->Args({s.N, s.in, s.out})->ArgNames({"N", "in", "out"});
        set_timing(b, s.flops(), s.iterations);
      }
}

// N = B*L tokens. BERT-base: E = 768, FFN 3072, B*L = 128 (1 x 128) and 4096 (8 x 512).
// GPT-2 small: the packed q/k/v projection 768 -> 2304 over 1024 tokens. One token (N = 1, a
// matrix-vector product), and odd sizes (E = 96, N = 37).
void register_all() {
  //                      N    in   out  iterations
  register_linear<float>({128, 768, 768, 0});
  register_linear<float>({128, 768, 3072, 0});
  register_linear<float>({128, 3072, 768, 0});
  register_linear<float>({4096, 768, 768, 0});
  register_linear<float>({4096, 768, 3072, 5});
  register_linear<float>({1024, 768, 2304, 0});
  register_linear<float>({1, 768, 768, 0});
  register_linear<float>({1, 768, 3072, 0});
  register_linear<float>({37, 96, 96, 0});
  register_linear<double>({128, 768, 768, 0});
  register_weights();
}

}  // namespace

int main(int argc, char** argv) { return attn_bench::run(argc, argv, register_all); }
