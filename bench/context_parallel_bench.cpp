// bench/context_parallel_bench.cpp - context-parallel attention (attn/dist) under mpirun: time,
// per-rank peak memory and bytes sent, for one causal sequence of L = 16k..128k tokens split over
// the ranks in the zig-zag layout, one attn thread per rank. Run it at each rank count; the
// single-process GroupedQueryAttention runs in the 1-rank run as the baseline:
//
//   for p in 1 2 4; do mpirun --oversubscribe -np $p build/bench/context_parallel_bench; done
//
// (as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
//
// Counters (rank 0 prints; times are the slowest rank's, between barriers):
//   tokens/s      L / time
//   peak_MiB      the largest rank's peak resident memory during the run, above what it held before
//                 (VmHWM after resetting it through /proc/self/clear_refs; its inputs included)
//   model_MiB     "1/P of the single process plus two K/V slices" and the merge's scratch: the
//                 rank's q, k, v and out (n rows each), two travelling K/V blocks (2n rows each) and
//                 one block pair's output (the longest segment's rows)
//   sent_MiB      the bytes each rank sends (the blocks of P - 1 ranks; the largest rank's)
//   step_ms       time / P: one ring step, the time a block's transfer has to hide behind
// Shapes: one head of d = 64, fp32, causal (the 128k run is ~1 min on one core of a Zen 3).
#include <mpi.h>
#include <benchmark/benchmark.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "attn/dist/context_parallel.hpp"
#include "attn/grouped_query_attention.hpp"
#include "attn/threads.hpp"
#include "bench_common.hpp"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace {

using attn::Index;
using attn::Matrix;

constexpr Index kHeads = 1, kDim = 64;

// This process's VmHWM or VmRSS from /proc/self/status, in MiB (-1 where unreadable).
double status_mib(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;
  return -1;
}
// Starts a new peak: VmHWM back to the current RSS (Linux's clear_refs 5); returns that RSS.
double reset_peak() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
  std::ofstream("/proc/self/clear_refs") << "5";
  return status_mib("VmRSS");
}

// Inputs in [-1, 1], as every attn benchmark's (bench_common.hpp), one seed per rank and tensor.
Matrix<float> random_rows(Index rows, Index cols, unsigned seed) {
  attn::Generator gen(seed);
  return attn_bench::random_matrix<float>(rows, cols, gen);
}

double max_over_ranks(double x) {
  MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return x;
}

void BM_ContextParallel(benchmark::State& state) {
  const Index L = state.range(0);
  attn::dist::ContextParallelAttention<float> cp(MPI_COMM_WORLD, kHeads, kHeads);
  const attn::dist::Sharding sh = cp.sharding(L, attn::dist::Layout::ZigZag);
  const Index n = sh.local_len(cp.rank());
  attn::dist::ContextArgs<float> args;
  args.batch = 1;
  args.causal = attn::Causal::BottomRight;
  double peak = 0, seconds = 0;
  for (auto _ : state) {
    const double base = reset_peak();
    {
      const Matrix<float> q = random_rows(n, kHeads * kDim, 1 + unsigned(cp.rank())),
                          k = random_rows(n, kHeads * kDim, 101 + unsigned(cp.rank())),
                          v = random_rows(n, kHeads * kDim, 201 + unsigned(cp.rank()));
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = MPI_Wtime();
      Matrix<float> out = cp.forward(q, k, v, args);
      benchmark::DoNotOptimize(out.data());
      MPI_Barrier(MPI_COMM_WORLD);
      seconds = max_over_ranks(MPI_Wtime() - t0);
    }
    peak = max_over_ranks(status_mib("VmHWM") - base);
    state.SetIterationTime(seconds);
  }
  const int P = cp.ranks();
  Index n_max = 0, seg_max = 0;
  for (int r = 0; r < P; ++r) {
    n_max = std::max(n_max, sh.local_len(r));
    for (const attn::dist::Segment& g : sh.segments(r)) seg_max = std::max(seg_max, g.length);
  }
  const double row = double(kHeads * kDim * sizeof(float)) / double(1 << 20);
  state.counters["model_MiB"] = (double(n_max) * (4 + 2 * 2) + double(seg_max)) * row;
  state.counters["peak_MiB"] = peak;
  state.counters["sent_MiB"] = max_over_ranks(double(cp.bytes_sent(sh, 1, kDim, kDim)) / double(1 << 20));
  state.counters["tokens/s"] = double(L) / seconds;
  state.counters["step_ms"] = seconds / P * 1e3;
  state.counters["ranks"] = P;
}

// The single-process call, in a 1-rank run: the baseline of every ratio.
void BM_SingleProcess(benchmark::State& state) {
  const Index L = state.range(0);
  const attn::GroupedQueryAttention<float> gqa(kHeads, kHeads);
  attn::GqaArgs<float> args;
  args.batch = 1;
  args.causal = attn::Causal::BottomRight;
  double peak = 0, seconds = 0;
  for (auto _ : state) {
    const double base = reset_peak();
    {
      const Matrix<float> q = random_rows(L, kHeads * kDim, 1), k = random_rows(L, kHeads * kDim, 101),
                          v = random_rows(L, kHeads * kDim, 201);
      const double t0 = MPI_Wtime();
      Matrix<float> out = gqa.forward(q, k, v, args);
      benchmark::DoNotOptimize(out.data());
      seconds = MPI_Wtime() - t0;
    }
    peak = status_mib("VmHWM") - base;
    state.SetIterationTime(seconds);
  }
  state.counters["model_MiB"] = double(L) * double(kHeads * kDim * sizeof(float)) / double(1 << 20) * 4;
  state.counters["peak_MiB"] = peak;
  state.counters["tokens/s"] = double(L) / seconds;
}

// Every rank runs the same benchmarks the same number of times (a fixed iteration count: a count
// chosen by each rank's own timer could differ, and the collectives would wait forever).
void lengths(benchmark::internal::Benchmark* b) {
  for (const Index L : {16384, 32768, 65536, 131072}) b->Arg(L);
  b->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK(BM_ContextParallel)->Apply(lengths)->Name("cp/zigzag_causal");

class QuietReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  attn::set_num_threads(1);  // P ranks on P cores
  if (size == 1) benchmark::RegisterBenchmark("single/gqa_causal", BM_SingleProcess)->Apply(lengths);
  benchmark::Initialize(&argc, argv);
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    QuietReporter quiet;
    benchmark::RunSpecifiedBenchmarks(&quiet);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
