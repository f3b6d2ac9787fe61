// bench/linear_bench.cpp - attn::Linear against the obvious Eigen code, at transformer shapes.
//
// attn runs Linear::forward_into (y sized once by the caller; detail::linear_into cuts it into
// fixed tiles run on attn's threads, each computed by attn's packed micro-kernel with the bias
// fused, or for one row by Eigen's GEMV plus the bias). The baseline is what one writes without attn:
// y = x * W.transpose(); y.rowwise() += b^T - one Eigen GEMM on one thread (Eigen threads only
// under OpenMP) which, without noalias(), evaluates the product into a temporary and copies it.
// On one thread (ATTN_BENCH_THREADS=1) the ratio shows what the kernel and the tiling save; on
// more it shows the threading too. Each shape runs attn then baseline, back to back; their ratio
// is the figure to trust.
//
// FLOPs: 2 * N * in * out (the bias is not counted).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <attn/linear.hpp>
#include <attn/version.hpp>
#include <cstdio>
#include <cstdlib>
#include <string>

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
}

}  // namespace

int main(int argc, char** argv) { return attn_bench::run(argc, argv, register_all); }
