// bench/torch_bench.cpp - attn against libtorch (CPU, fp32), shape by shape in one process, with
// wall-clock time, GFLOP/s and peak memory. Built only where CMake finds libtorch; run by
// tools/bench_torch.sh, which also draws the table in bench/RESULTS.md and bench/attention_gflops.png.
//
// Implementations (the IMPL part of each name, KERNEL/TYPE/IMPL/ARG:VALUE/...):
//   mha   attn              attn::MultiHeadAttention::forward_into, rows (l, b) as PyTorch's [L, B, E]
//         torch_mha         torch::nn::MultiheadAttention, eval(), need_weights = false, [L, B, E]
//         torch_native_mha  at::_native_multi_head_attention (the fused op nn.MultiheadAttention's
//                           fast path calls), need_weights = false, [B, L, E]
//   sdpa  attn              attn::ScaledDotProductAttention::forward_into, one call per (batch, head)
//         attn_batched      detail::attention on all B*H heads at once, as MultiHeadAttention runs it
//                           (the public core API takes one head per call)
//         reference         detail::attention_reference, attn's plain loops (L <= 1024 only: slow)
//         torch_matmul      matmul(q * scale, k^T) [+ causal -inf mask], softmax, matmul(., v)
//         torch_sdpa        at::_scaled_dot_product_attention (1.13's name for what 2.0 calls
//                           scaled_dot_product_attention; is_causal for causal shapes)
//   sgemm torch_mm / eigen  one [N, N] x [N, N] product, the GEMM rate each side builds on
// Core inputs are [B, H, L, D] contiguous for every implementation; all get identical values.
// libtorch runs under c10::InferenceMode (no autograd bookkeeping) at its own best: its OpenMP
// threads and OpenBLAS's both set to the thread count.
//
// Threads: ATTN_BENCH_THREADS=n (default: all cores) sets attn::set_num_threads(n),
// at::set_num_threads(n) and, when libtorch's BLAS is OpenBLAS, openblas_set_num_threads(n).
// tools/bench_torch.sh runs the program once with 1 and once with 2.
//
// OMP_WAIT_POLICY: libgomp (libtorch's OpenMP, and OpenBLAS's in Debian's openmp build) reads it
// once, in a constructor that runs when the library is loaded - before main(). Its default lets
// idle OpenMP threads spin, and on 2 cores a spinning libtorch thread steals the core attn's next
// benchmark (or libtorch's own next op) needs. So main() sets OMP_WAIT_POLICY=PASSIVE and
// re-executes the program unless the variable is already set (an explicit ACTIVE is respected).
//
// FLOPs (a multiply-add counts 2; softmax, biases and masks are not counted), as attention_bench:
//   sdpa 4*B*H*L*S*D;  mha 8*B*L*E^2 (four projections) + 4*B*L*L*E (the core);  sgemm 2*N^3.
// Causal shapes count the full L*S, so their GFLOP/s is an "effective" rate: an implementation
// that skips the masked half shows up to twice the rate of its non-causal row.
//
// Memory: before each benchmark the process's peak RSS is reset (malloc_trim, then "5" written
// to /proc/self/clear_refs, Linux >= 4.0); counters peak_MiB (VmHWM after the timed loop),
// base_MiB (VmRSS before this benchmark's inputs existed: the program, libtorch, thread stacks)
// and inputs_MiB (the tensors the call reads: activations, weights, a materialised mask). The
// program checks at start-up that the reset works and otherwise reports no memory counters.
//
// Before a shape is timed every implementation runs once on the same inputs: libtorch must agree
// with attn to 1e-3 of the output's magnitude, attn_batched and the reference to 1e-4 (for
// L > 1024 the reference computes only the first and last 32 query rows of each head), or the
// run aborts. libtorch materialises [B, H, L, S] scores (twice: softmax writes a copy); shapes
// that would need more than 8 GiB for them are skipped on the libtorch side unless
// ATTN_BENCH_TORCH_BIG=1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <benchmark/benchmark.h>
#include <dlfcn.h>
#include <malloc.h>
#include <torch/nn/modules/activation.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <attn/attn.hpp>
#include <attn/detail/attention.hpp>
#include <attn/detail/attention_reference.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "bench_common.hpp"

namespace {

using namespace attn_bench;
using attn::detail::AttentionProblem;

constexpr double kMiB = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------------------------
// Peak resident memory, from /proc/self/status.

// The value of `field` (VmRSS, VmHWM) in MiB; -1 if it cannot be read.
double status_mib(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(field) + ":";
  while (std::getline(status, line))
    if (line.compare(0, prefix.size(), prefix) == 0) return std::atof(line.c_str() + prefix.size()) / 1024.0;
  return -1;
}

// Returns freed heap memory to the kernel, then resets VmHWM to the current VmRSS. False if the
// kernel does not take the reset (clear_refs "5" needs Linux 4.0).
bool reset_peak() {
  malloc_trim(0);
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.close();
  return static_cast<bool>(clear);
}

// Whether reset_peak() really lowers VmHWM here: touch 256 MiB, free it, reset, look.
bool peak_reset_works() {
  {
    std::vector<char> block(256 << 20);
    for (std::size_t i = 0; i < block.size(); i += 4096) block[i] = 1;
    benchmark::DoNotOptimize(block.data());
  }
  return reset_peak() && status_mib("VmHWM") < status_mib("VmRSS") + 128;
}

bool& peak_resettable() {
  static bool works = false;
  return works;
}

// One benchmark's memory: construct before the inputs exist, start() once they do (and any
// copies made on the way are gone), report() after the timed loop.
class PeakMemory {
 public:
  PeakMemory() {
    malloc_trim(0);
    base_ = status_mib("VmRSS");
  }
  void start() const { reset_peak(); }
  void report(benchmark::State& state, double input_bytes) const {
    if (!peak_resettable()) return;
    state.counters["peak_MiB"] = status_mib("VmHWM");
    state.counters["base_MiB"] = base_;
    state.counters["inputs_MiB"] = input_bytes / kMiB;
  }

 private:
  double base_;
};

void set_flops(benchmark::State& state, double flops) {
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------------------------------------
// Inputs: uniform(-1, 1) from attn's generator, written into attn matrices or libtorch tensors
// alike, so every implementation reads the same numbers.

void fill(float* data, Index rows, Index cols, std::uint64_t seed) {
  attn::Generator gen(seed);
  Eigen::Map<Mat<float>> m(data, rows, cols);
  attn::init::uniform(m, -1.0, 1.0, gen);
}

Mat<float> random_mat(Index rows, Index cols, std::uint64_t seed) {
  Mat<float> m(rows, cols);
  fill(m.data(), rows, cols, seed);
  return m;
}

at::Tensor random_tensor(at::IntArrayRef sizes, std::uint64_t seed) {
  at::Tensor t = at::empty(sizes, at::kFloat);
  fill(t.data_ptr<float>(), t.numel() / sizes.back(), sizes.back(), seed);
  return t;
}

// A libtorch view of an attn matrix, no copy.
at::Tensor view_of(const Mat<float>& m, at::IntArrayRef sizes) {
  return at::from_blob(const_cast<float*>(m.data()), sizes, at::kFloat);
}

Mat<float> to_mat(const at::Tensor& t, Index rows, Index cols) {
  const at::Tensor c = t.contiguous();
  return Eigen::Map<const Mat<float>>(c.data_ptr<float>(), rows, cols);
}

// Whether libtorch may run a problem whose [B, H, L, S] scores take `score_bytes` (it holds
// them twice); a skip message otherwise.
std::string torch_too_big(double score_bytes) {
  static const bool big = std::getenv("ATTN_BENCH_TORCH_BIG") && std::atoi(std::getenv("ATTN_BENCH_TORCH_BIG")) != 0;
  if (big || 2 * score_bytes <= 8.0 * 1024 * kMiB) return {};
  char buf[200];
  std::snprintf(buf, sizeof buf,
                "skipped: libtorch would hold %.1f GiB of [B, H, L, S] scores; ATTN_BENCH_TORCH_BIG=1 runs it",
                2 * score_bytes / (1024 * kMiB));
  return buf;
}

// ---------------------------------------------------------------------------------------------
// The attention core on [B, H, L, D] inputs.

enum class CoreImpl { attn, attn_batched, reference, torch_matmul, torch_sdpa };

const char* name_of(CoreImpl impl) {
  switch (impl) {
    case CoreImpl::attn:
      return "attn";
    case CoreImpl::attn_batched:
      return "attn_batched";
    case CoreImpl::reference:
      return "reference";
    case CoreImpl::torch_matmul:
      return "torch_matmul";
    case CoreImpl::torch_sdpa:
      return "torch_sdpa";
  }
  return "?";
}

bool is_torch(CoreImpl impl) { return impl == CoreImpl::torch_matmul || impl == CoreImpl::torch_sdpa; }

struct CoreShape {
  Index B, H, L, S, D;
  bool causal;
  int iterations;  // 0: run for a minimum time instead
  double flops() const { return 4.0 * B * H * L * S * D; }
  double input_bytes() const { return 4.0 * B * H * (L + 2 * S) * D; }
  double score_bytes() const { return 4.0 * B * H * L * S; }
  bool reference_fits() const { return L <= 1024 && S <= 1024; }
  std::string key() const {
    return "sdpa/f32 B=" + std::to_string(B) + " H=" + std::to_string(H) + " L=" + std::to_string(L) +
           " S=" + std::to_string(S) + " D=" + std::to_string(D) + (causal ? " causal" : "");
  }
};

// The problem over [B, H, rows, D] views: queries and outputs start `row0` rows into each head.
// Causal alignment: top-left from the first row; a block ending at the last query row with S = L
// is the same problem aligned bottom-right.
AttentionProblem<float> core_problem(const CoreShape& s, const float* q, const float* k, const float* v, float* out,
                                     Index row0, Index rows) {
  AttentionProblem<float> p;
  p.batch = s.B;
  p.heads = s.H;
  p.L = rows;
  p.S = p.mask_keys = s.S;
  p.d = p.dv = s.D;
  p.q = {q + row0 * s.D, s.H * s.L * s.D, s.L * s.D, s.D};
  p.k = {k, s.H * s.S * s.D, s.S * s.D, s.D};
  p.v = {v, s.H * s.S * s.D, s.S * s.D, s.D};
  p.out = {out, s.H * rows * s.D, rows * s.D, s.D};
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  if (s.causal) p.causal = row0 == 0 ? attn::Causal::TopLeft : attn::Causal::BottomRight;
  return p;
}

// q, k, v, out: [B*H*L, D] (one head after another).
void core_attn(const CoreShape& s, const Mat<float>& q, const Mat<float>& k, const Mat<float>& v, Mat<float>& out) {
  const attn::ScaledDotProductAttention<float> sdpa;
  attn::Masks<float> masks;
  masks.causal = s.causal ? attn::Causal::TopLeft : attn::Causal::None;
  for (Index bh = 0; bh < s.B * s.H; ++bh)
    sdpa.forward_into(q.middleRows(bh * s.L, s.L), k.middleRows(bh * s.S, s.S), v.middleRows(bh * s.S, s.S), masks,
                      out.middleRows(bh * s.L, s.L));
}

void core_attn_batched(const CoreShape& s, const Mat<float>& q, const Mat<float>& k, const Mat<float>& v,
                       Mat<float>& out) {
  attn::detail::attention(core_problem(s, q.data(), k.data(), v.data(), out.data(), 0, s.L));
}

void core_reference(const CoreShape& s, const Mat<float>& q, const Mat<float>& k, const Mat<float>& v,
                    Mat<float>& out) {
  attn::detail::attention_reference(core_problem(s, q.data(), k.data(), v.data(), out.data(), 0, s.L));
}

// q, k, v: [B, H, L|S, D]; causal_mask: [L, S] with -inf above the diagonal, or undefined.
at::Tensor core_torch(CoreImpl impl, const CoreShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& causal_mask) {
  if (impl == CoreImpl::torch_sdpa)
    return std::get<0>(at::_scaled_dot_product_attention(q, k, v, c10::nullopt, 0.0, false, s.causal));
  // Scaling q ([L, D]) instead of the scores ([L, S]) saves a pass over the larger tensor.
  at::Tensor scores = at::matmul(q * (1.0 / std::sqrt(static_cast<double>(s.D))), k.transpose(-2, -1));
  if (causal_mask.defined()) scores.add_(causal_mask);
  return at::matmul(at::softmax(scores, -1), v);
}

at::Tensor causal_mask_for(const CoreShape& s) {
  if (!s.causal) return {};
  return at::full({s.L, s.S}, -std::numeric_limits<float>::infinity(), at::kFloat).triu(1);
}

using CoreFn = void (*)(const CoreShape&, const Mat<float>&, const Mat<float>&, const Mat<float>&, Mat<float>&);
CoreFn attn_side(CoreImpl impl) {
  return impl == CoreImpl::attn ? core_attn : impl == CoreImpl::attn_batched ? core_attn_batched : core_reference;
}

// Every implementation once on the same inputs; aborts on disagreement.
void check_core(const CoreShape& s) {
  const Index rows = s.B * s.H * s.L, key_rows = s.B * s.H * s.S;
  const Mat<float> q = random_mat(rows, s.D, 1), k = random_mat(key_rows, s.D, 2), v = random_mat(key_rows, s.D, 3);
  Mat<float> want(rows, s.D), got(rows, s.D);
  core_attn(s, q, k, v, want);
  core_attn_batched(s, q, k, v, got);
  require_agreement(s.key() + " attn_batched", got, want);
  if (s.reference_fits()) {
    core_reference(s, q, k, v, got);
    require_agreement(s.key() + " reference", got, want);
  } else {  // the first and last 32 query rows of every head
    const Index n = std::min<Index>(32, s.L);
    for (const Index row0 : {Index(0), s.L - n}) {
      Mat<float> ref(s.B * s.H * n, s.D), part(s.B * s.H * n, s.D);
      attn::detail::attention_reference(core_problem(s, q.data(), k.data(), v.data(), ref.data(), row0, n));
      for (Index bh = 0; bh < s.B * s.H; ++bh) part.middleRows(bh * n, n) = want.middleRows(bh * s.L + row0, n);
      require_agreement(s.key() + " reference rows " + std::to_string(row0) + "+", part, ref);
    }
  }
  if (!torch_too_big(s.score_bytes()).empty()) return;
  c10::InferenceMode guard;
  const at::Tensor tq = view_of(q, {s.B, s.H, s.L, s.D}), tk = view_of(k, {s.B, s.H, s.S, s.D}),
                   tv = view_of(v, {s.B, s.H, s.S, s.D}), mask = causal_mask_for(s);
  for (const CoreImpl impl : {CoreImpl::torch_matmul, CoreImpl::torch_sdpa})
    require_agreement(s.key() + " " + name_of(impl), to_mat(core_torch(impl, s, tq, tk, tv, mask), rows, s.D), want,
                      1e-3);
}

void BM_core(benchmark::State& state, const CoreShape& s, CoreImpl impl) {
  if (first_time(s.key())) check_core(s);
  const bool huge = s.flops() > 1e11;  // seconds per call: no warm-up call
  if (is_torch(impl)) {
    const std::string skip = torch_too_big(s.score_bytes());
    if (!skip.empty()) {
      state.SkipWithError(skip.c_str());
      return;
    }
    c10::InferenceMode guard;
    const PeakMemory memory;
    const at::Tensor q = random_tensor({s.B, s.H, s.L, s.D}, 1), k = random_tensor({s.B, s.H, s.S, s.D}, 2),
                     v = random_tensor({s.B, s.H, s.S, s.D}, 3),
                     mask = impl == CoreImpl::torch_matmul ? causal_mask_for(s) : at::Tensor();
    memory.start();
    time_it(
        state,
        [&] {
          at::Tensor out = core_torch(impl, s, q, k, v, mask);
          benchmark::DoNotOptimize(out.data_ptr());
        },
        huge);
    memory.report(state, s.input_bytes() + (mask.defined() ? 4.0 * s.L * s.S : 0.0));
  } else {
    const PeakMemory memory;
    const Index rows = s.B * s.H * s.L, key_rows = s.B * s.H * s.S;
    const Mat<float> q = random_mat(rows, s.D, 1), k = random_mat(key_rows, s.D, 2), v = random_mat(key_rows, s.D, 3);
    Mat<float> out(rows, s.D);
    const CoreFn fn = attn_side(impl);
    memory.start();
    time_it(
        state,
        [&] {
          fn(s, q, k, v, out);
          benchmark::DoNotOptimize(out.data());
        },
        huge);
    memory.report(state, s.input_bytes());
  }
  set_flops(state, s.flops());
}

// `torch`: whether libtorch is registered for this shape (it is skipped with a message where it
// would need too much memory; false leaves it out altogether).
void register_core(const CoreShape& s, bool torch = true) {
  for (const CoreImpl impl :
       {CoreImpl::attn, CoreImpl::attn_batched, CoreImpl::torch_matmul, CoreImpl::torch_sdpa, CoreImpl::reference}) {
    if ((impl == CoreImpl::reference && !s.reference_fits()) || (is_torch(impl) && !torch)) continue;
    const std::string name = std::string("sdpa/f32/") + name_of(impl);
    auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_core, s, impl);
    b->Args({s.B, s.H, s.L, s.S, s.D, Index(s.causal)})->ArgNames({"B", "H", "L", "S", "D", "causal"});
    // The reference runs at a few GFLOP/s: one call is enough once it takes a quarter second.
    const int iterations = impl == CoreImpl::reference ? (s.flops() >= 5e8 ? 1 : 0) : s.iterations;
    set_timing(b, s.flops(), iterations);
  }
}

// ---------------------------------------------------------------------------------------------
// MultiHeadAttention, self-attention with non-zero biases; the same weights on both sides.

enum class MhaImpl { attn, torch_mha, torch_native_mha };

const char* name_of(MhaImpl impl) {
  switch (impl) {
    case MhaImpl::attn:
      return "attn";
    case MhaImpl::torch_mha:
      return "torch_mha";
    case MhaImpl::torch_native_mha:
      return "torch_native_mha";
  }
  return "?";
}

struct MhaShape {
  Index B, L, E, H;
  int iterations;  // 0: run for a minimum time instead
  double flops() const { return 8.0 * B * L * E * E + 4.0 * B * L * L * E; }
  double input_bytes() const { return 4.0 * (B * L * E + 4 * E * E + 4 * E); }  // x, weights, biases
  double score_bytes() const { return 4.0 * B * H * L * L; }
  std::string key() const {
    return "mha/f32 B=" + std::to_string(B) + " L=" + std::to_string(L) + " E=" + std::to_string(E) +
           " H=" + std::to_string(H);
  }
};

// PyTorch's parameters: in_proj_weight [3E, E] (xavier_uniform's bound), in_proj_bias [3E],
// out_proj.weight [E, E] (nn.Linear's bound), out_proj.bias [E]; biases uniform(-0.1, 0.1).
struct MhaWeights {
  Mat<float> in_w, out_w;
  Vec<float> in_b, out_b;
};

MhaWeights mha_weights(const MhaShape& s) {
  attn::Generator gen(7);
  MhaWeights w{Mat<float>(3 * s.E, s.E), Mat<float>(s.E, s.E), Vec<float>(3 * s.E), Vec<float>(s.E)};
  attn::init::uniform(w.in_w, -std::sqrt(6.0 / (4.0 * s.E)), std::sqrt(6.0 / (4.0 * s.E)), gen);
  attn::init::uniform(w.out_w, -1.0 / std::sqrt(double(s.E)), 1.0 / std::sqrt(double(s.E)), gen);
  attn::init::uniform(w.in_b, -0.1, 0.1, gen);
  attn::init::uniform(w.out_b, -0.1, 0.1, gen);
  return w;
}

attn::MultiHeadAttention<float> attn_mha(const MhaShape& s, const MhaWeights& w) {
  attn::MhaOptions options;
  options.batch_first = false;  // rows (l, b): PyTorch's default [L, B, E]
  attn::MultiHeadAttention<float> mha(s.E, s.H, options);
  mha.set_in_proj_weight(w.in_w);
  mha.set_in_proj_bias(w.in_b);
  mha.out_proj().set_weight(w.out_w);
  mha.out_proj().set_bias(w.out_b);
  return mha;
}

torch::nn::MultiheadAttention torch_mha(const MhaShape& s, const MhaWeights& w) {
  torch::nn::MultiheadAttention m(torch::nn::MultiheadAttentionOptions(s.E, s.H));
  m->eval();
  torch::NoGradGuard no_grad;
  m->in_proj_weight.copy_(view_of(w.in_w, {3 * s.E, s.E}));
  m->in_proj_bias.copy_(at::from_blob(const_cast<float*>(w.in_b.data()), {3 * s.E}, at::kFloat));
  m->out_proj->weight.copy_(view_of(w.out_w, {s.E, s.E}));
  m->out_proj->bias.copy_(at::from_blob(const_cast<float*>(w.out_b.data()), {s.E}, at::kFloat));
  return m;
}

// x: [L, B, E] for the module, [B, L, E] for the native op; the output in the same layout.
at::Tensor mha_torch(MhaImpl impl, const MhaShape& s, torch::nn::MultiheadAttention& m, const at::Tensor& x) {
  if (impl == MhaImpl::torch_mha) return std::get<0>(m->forward(x, x, x, {}, /*need_weights=*/false));
  return std::get<0>(at::_native_multi_head_attention(x, x, x, s.E, s.H, m->in_proj_weight, m->in_proj_bias,
                                                      m->out_proj->weight, m->out_proj->bias, c10::nullopt,
                                                      /*need_weights=*/false));
}

void mha_attn(const attn::MultiHeadAttention<float>& mha, const MhaShape& s, const Mat<float>& x, Mat<float>& out) {
  attn::MhaArgs<float> args;
  args.batch = s.B;
  mha.forward_into(x, x, x, args, out);
}

void check_mha(const MhaShape& s) {
  const MhaWeights w = mha_weights(s);
  const Mat<float> x = random_mat(s.L * s.B, s.E, 4);  // rows (l, b)
  Mat<float> want(s.L * s.B, s.E);
  mha_attn(attn_mha(s, w), s, x, want);
  if (!torch_too_big(s.score_bytes()).empty()) return;
  c10::InferenceMode guard;
  torch::nn::MultiheadAttention m = torch_mha(s, w);
  const at::Tensor lbe = view_of(x, {s.L, s.B, s.E});
  require_agreement(s.key() + " torch_mha", to_mat(mha_torch(MhaImpl::torch_mha, s, m, lbe), s.L * s.B, s.E), want,
                    1e-3);
  const at::Tensor native = mha_torch(MhaImpl::torch_native_mha, s, m, lbe.transpose(0, 1).contiguous());
  require_agreement(s.key() + " torch_native_mha", to_mat(native.transpose(0, 1), s.L * s.B, s.E), want, 1e-3);
}

void BM_mha(benchmark::State& state, const MhaShape& s, MhaImpl impl) {
  if (first_time(s.key())) check_mha(s);
  const bool huge = s.flops() > 1e11;
  if (impl == MhaImpl::attn) {
    const PeakMemory memory;
    const attn::MultiHeadAttention<float> mha = attn_mha(s, mha_weights(s));
    const Mat<float> x = random_mat(s.L * s.B, s.E, 4);
    Mat<float> out(s.L * s.B, s.E);
    memory.start();
    time_it(
        state,
        [&] {
          mha_attn(mha, s, x, out);
          benchmark::DoNotOptimize(out.data());
        },
        huge);
    memory.report(state, s.input_bytes());
  } else {
    const std::string skip = torch_too_big(s.score_bytes());
    if (!skip.empty()) {
      state.SkipWithError(skip.c_str());
      return;
    }
    c10::InferenceMode guard;
    const PeakMemory memory;
    torch::nn::MultiheadAttention m = torch_mha(s, mha_weights(s));
    at::Tensor x = random_tensor({s.L, s.B, s.E}, 4);
    if (impl == MhaImpl::torch_native_mha) x = x.transpose(0, 1).contiguous();  // [B, L, E]
    memory.start();
    time_it(
        state,
        [&] {
          at::Tensor out = mha_torch(impl, s, m, x);
          benchmark::DoNotOptimize(out.data_ptr());
        },
        huge);
    memory.report(state, s.input_bytes());
  }
  set_flops(state, s.flops());
}

void register_mha(const MhaShape& s) {
  for (const MhaImpl impl : {MhaImpl::attn, MhaImpl::torch_mha, MhaImpl::torch_native_mha}) {
    const std::string name = std::string("mha/f32/") + name_of(impl);
    auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_mha, s, impl);
    b->Args({s.B, s.L, s.E, s.H, 0})->ArgNames({"B", "L", "E", "H", "causal"});
    set_timing(b, s.flops(), s.iterations);
  }
}

// ---------------------------------------------------------------------------------------------
// sgemm: the rate each side's GEMM reaches on this machine, the ceiling for the rows above.

void BM_sgemm(benchmark::State& state, Index n, bool torch) {
  const PeakMemory memory;
  if (torch) {
    c10::InferenceMode guard;
    const at::Tensor a = random_tensor({n, n}, 5), b = random_tensor({n, n}, 6);
    at::Tensor c = at::empty({n, n}, at::kFloat);
    memory.start();
    time_it(
        state,
        [&] {
          at::mm_out(c, a, b);
          benchmark::DoNotOptimize(c.data_ptr());
        },
        false);
  } else {
    const Mat<float> a = random_mat(n, n, 5), b = random_mat(n, n, 6);
    Mat<float> c(n, n);
    memory.start();
    time_it(
        state,
        [&] {
          c.noalias() = a * b;
          benchmark::DoNotOptimize(c.data());
        },
        false);
  }
  memory.report(state, 8.0 * n * n);
  set_flops(state, 2.0 * n * n * n);
}

// ---------------------------------------------------------------------------------------------
// Threads, and what the JSON should say about libtorch.

std::string library_of(const char* symbol) {
  Dl_info info;
  void* address = dlsym(RTLD_DEFAULT, symbol);
  if (!address || !dladdr(address, &info) || !info.dli_fname) return "";
  char resolved[4096];
  return realpath(info.dli_fname, resolved) ? resolved : info.dli_fname;
}

void configure_torch(int threads) {
  at::set_num_threads(threads);
  // OpenBLAS keeps its own thread count (an OpenMP one in Debian's openmp build, a pthread pool
  // otherwise); other BLAS libraries are left as they are and reported.
  using SetThreads = void (*)(int);
  using GetThreads = int (*)();
  using GetConfig = char* (*)();
  std::string blas = library_of("sgemm_");
  if (auto set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
    set(threads);
    if (auto config = reinterpret_cast<GetConfig>(dlsym(RTLD_DEFAULT, "openblas_get_config")))
      blas += std::string(" (") + config() + ")";
    if (auto get = reinterpret_cast<GetThreads>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")))
      benchmark::AddCustomContext("torch_blas_threads", std::to_string(get()));
  } else {
    blas += " (not OpenBLAS: its thread count is not set)";
  }
  benchmark::AddCustomContext("torch_blas", blas.empty() ? "unknown (no sgemm_ symbol)" : blas);
  benchmark::AddCustomContext("torch_version", TORCH_VERSION);
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  const std::string config = at::show_config();
  const std::string tag = "CPU capability usage: ";
  const auto at_tag = config.find(tag);
  if (at_tag != std::string::npos)
    benchmark::AddCustomContext("torch_cpu_capability",
                                config.substr(at_tag + tag.size(), config.find('\n', at_tag) - at_tag - tag.size()));
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  benchmark::AddCustomContext("omp_wait_policy", policy ? policy : "unset");
  peak_resettable() = peak_reset_works();
  benchmark::AddCustomContext("peak_memory", peak_resettable()
                                                 ? "VmHWM, reset before each benchmark via /proc/self/clear_refs"
                                                 : "not measured: /proc/self/clear_refs does not reset VmHWM here");
  if (!peak_resettable()) std::fprintf(stderr, "torch_bench: cannot reset peak RSS; memory counters are left out\n");
}

// ---------------------------------------------------------------------------------------------
// The shapes. MHA: BERT-base (E = 768, H = 12) at L = 128, B = 1 and 8; long sequences at
// L = 2048 (E = 768) and 4096 (E = 1024, H = 16). Core: the sweep L = 128 .. 4096 with 12 heads of
// D = 64 (tools/bench_plot.py draws it), D = 128 (8 heads), causal L = 2048, and two that
// libtorch cannot hold in memory: 12 heads at L = 16384, one head at L = 65536.

void register_all() {
  configure_torch(attn::num_threads());

  //               B     L     E   H  iterations
  register_mha({1, 2048, 768, 12, 2});
  register_mha({1, 4096, 1024, 16, 1});
  register_mha({8, 128, 768, 12, 0});
  register_mha({1, 128, 768, 12, 0});

  //                B   H      L      S    D  causal iterations
  for (const Index L : {128, 256, 512, 1024, 2048, 4096})
    register_core({1, 12, L, L, 64, false, L >= 4096 ? 1 : L >= 2048 ? 2 : 0});
  register_core({1, 8, 2048, 2048, 128, false, 2});
  register_core({1, 12, 2048, 2048, 64, true, 2});
  register_core({1, 12, 16384, 16384, 64, false, 1});        // libtorch: 2 x 12 GiB of scores, skipped
  register_core({1, 1, 65536, 65536, 64, false, 1}, false);  // attn only

  for (const bool torch : {true, false}) {
    auto* b = benchmark::RegisterBenchmark(torch ? "sgemm/f32/torch_mm" : "sgemm/f32/eigen", BM_sgemm, 2048, torch);
    b->Args({2048})->ArgNames({"N"});
    set_timing(b, 2.0 * 2048 * 2048 * 2048, 0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!std::getenv("OMP_WAIT_POLICY")) {  // see the top of this file
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);
    std::perror("torch_bench: re-executing with OMP_WAIT_POLICY=PASSIVE failed; going on without it");
    unsetenv("OMP_WAIT_POLICY");  // so that the JSON says "unset", which is what libgomp runs with
  }
  return attn_bench::run(argc, argv, register_all);
}
