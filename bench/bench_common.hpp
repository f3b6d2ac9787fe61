// bench/bench_common.hpp - what attn's benchmark programs share: scalar names, random inputs,
// the agreement check run before anything is timed, timing policy, and main().
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <attn/detail/packet.hpp>
#include <attn/init.hpp>
#include <attn/threads.hpp>
#include <attn/types.hpp>
#include <attn/version.hpp>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <set>
#include <string>

namespace attn_bench {

using attn::Index;
template <class T>
using Mat = attn::Matrix<T>;
template <class T>
using Vec = attn::Vector<T>;

template <class T>
const char* type_name();
template <>
inline const char* type_name<float>() {
  return "f32";
}
template <>
inline const char* type_name<double>() {
  return "f64";
}

template <class T>
Mat<T> random_matrix(Index rows, Index cols, attn::Generator& gen) {
  Mat<T> m(rows, cols);
  attn::init::uniform(m, -1.0, 1.0, gen);
  return m;
}

// Aborts unless `got` equals `want` to `tolerance` (1e-4 unless given) of want's largest
// magnitude (at least 1): a speed-up of a wrong answer means nothing.
template <class T>
void require_agreement(const std::string& what, const Mat<T>& got, const Mat<T>& want, double tolerance = 1e-4) {
  const double magnitude = std::max(1.0, static_cast<double>(want.cwiseAbs().maxCoeff()));
  const double err = got.rows() == want.rows() && got.cols() == want.cols()
                         ? static_cast<double>((got - want).cwiseAbs().maxCoeff())
                         : std::numeric_limits<double>::infinity();
  if (!(err <= tolerance * magnitude)) {  // written so that a NaN fails too
    std::fprintf(stderr, "%s: attn and the baseline disagree, max |diff| = %g (limit %g); aborting\n", what.c_str(),
                 err, tolerance * magnitude);
    std::abort();
  }
}

namespace read_detail {
namespace ei = Eigen::internal;
using Packet = attn::detail::mk::Packet<float>;
constexpr Index kLanes = attn::detail::mk::kLanes<float>;
constexpr Index kLine = 64 / Index(sizeof(float));  // floats per cache line
}  // namespace read_detail

// The sum of x[0, n) through eight packet accumulators: eight independent chains of loads in flight
// (Eigen's sum() keeps two, and read 3-15 % slower from memory). kAhead > 0: each 64-byte line is
// also prefetched kAhead bytes ahead of the loads. (noipa: one copy for every caller; g++ would
// otherwise specialise it on a caller's constant n, and warn about its tail loop.)
template <Index kAhead = 0>
__attribute__((noipa)) inline float sum8(const float* x, Index n) {
  using namespace read_detail;
  constexpr Index U = 8, kStep = U * kLanes;
  Packet acc[U];
  for (Packet& a : acc) a = ei::pset1<Packet>(0.0f);
  Index i = 0;
  for (; i + kStep <= n; i += kStep) {
    if constexpr (kAhead > 0)
      for (Index l = 0; l < kStep; l += kLine) __builtin_prefetch(x + i + l + kAhead / Index(sizeof(float)));
    for (Index u = 0; u < U; ++u) acc[u] = ei::padd(acc[u], ei::ploadu<Packet>(x + i + u * kLanes));
  }
  for (Index u = 1; u < U; ++u) acc[0] = ei::padd(acc[0], acc[u]);
  float total = ei::predux(acc[0]);
  for (; i < n; ++i) total += x[i];
  return total;
}

// Where part t of `parts` of x[0, n) begins: parts of whole cache lines (part_begin(n, parts,
// parts) leaves out the last n % 16 floats).
inline Index part_begin(Index n, Index t, Index parts) {
  return n / read_detail::kLine * t / parts * read_detail::kLine;
}

// True the first time `key` is seen: each shape is checked once per process, not once per
// benchmark invocation (Google Benchmark calls a function several times while it picks a count).
inline bool first_time(const std::string& key) {
  static std::set<std::string> seen;
  return seen.insert(key).second;
}

// Times body(); unless it has just run (the agreement check), one untimed call first keeps
// first-touch page faults and cold caches out of the timing.
template <class Body>
void time_it(benchmark::State& state, const Body& body, bool warm) {
  if (!warm) body();
  for (auto _ : state) {
    body();
    benchmark::ClobberMemory();
  }
}

// Small problems get a minimum time, large ones a fixed count (one iteration of the largest
// takes seconds); times print in the unit that suits the size.
inline void set_timing(benchmark::internal::Benchmark* b, double flops, int iterations) {
  b->Unit(flops < 1e8 ? benchmark::kMicrosecond : benchmark::kMillisecond);
  b->UseRealTime();  // attn runs threads: wall-clock time, not the calling thread's CPU time
  if (iterations > 0)
    b->Iterations(iterations);
  else
    b->MinTime(0.2);
}

#define ATTN_BENCH_STR2(x) #x
#define ATTN_BENCH_STR(x) ATTN_BENCH_STR2(x)

// What the JSON should say about this build, so a table can be traced to how it was made.
inline void add_context() {
  benchmark::AddCustomContext("attn_version", ATTN_VERSION_STRING);
  benchmark::AddCustomContext("eigen_version", ATTN_BENCH_STR(EIGEN_WORLD_VERSION) "." ATTN_BENCH_STR(
                                                   EIGEN_MAJOR_VERSION) "." ATTN_BENCH_STR(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("attn_threads", std::to_string(attn::num_threads()));
#if defined(__clang__)
  benchmark::AddCustomContext("compiler", "clang " __clang_version__);
#elif defined(__GNUC__)
  benchmark::AddCustomContext("compiler", "g++ " __VERSION__);
#endif
#if defined(__OPTIMIZE__) && defined(NDEBUG)
  benchmark::AddCustomContext("attn_build", "release");
#else
  benchmark::AddCustomContext("attn_build", "NOT release (no -O or no -DNDEBUG): timings are not meaningful");
  std::fprintf(stderr,
               "warning: built without optimisation or without -DNDEBUG; configure with -DCMAKE_BUILD_TYPE=Release\n");
#endif
}

// main() of every benchmark program: register, parse the flags, run.
// ATTN_BENCH_THREADS=n runs attn on n threads (default: all cores), to measure thread scaling.
inline int run(int argc, char** argv, void (*register_all)()) {
  if (const char* t = std::getenv("ATTN_BENCH_THREADS")) attn::set_num_threads(std::atoi(t));
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace attn_bench
