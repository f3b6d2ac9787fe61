// bench/attention_bench.cpp - the attention core (ScaledDotProductAttention, head by head) and
// MultiHeadAttention, each against the obvious per-head Eigen code, at real model shapes.
//
// Every shape is registered twice, attn then baseline, back to back, so the pair runs under the
// same machine load and their ratio is the number to trust (absolute times drift on a shared
// machine). tools/bench_table.py turns --benchmark_out JSON into the table in bench/RESULTS.md.
//
// Before a shape is timed, attn and the baseline run once on the same inputs and must agree to
// 1e-4 of the output's magnitude; otherwise the run aborts, because a speed-up of a wrong answer
// means nothing.
//
// FLOPs (a multiply-add counts 2; softmax, biases and masks are not counted):
//   attention core  4*B*H*L*S*D  (Q K^T and P V: 2*L*S*D each, per head and batch entry)
//   MHA             8*B*L*E^2    (q, k, v and out projections, [B*L, E] x [E, E] each)
//                 + 4*B*L*S*E    (the core, with H*D = E; self-attention, so S = L)
// Causal and windowed shapes count the full L*S (the baseline computes it all; attn skips the
// key blocks that causal masking and the window remove).
//
// Threads: attn splits work over attn::num_threads() threads (all cores by default; set
// ATTN_BENCH_THREADS to choose); the baseline is single-threaded Eigen. Times are wall clock.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <attn/attn.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "bench_common.hpp"

namespace {

using namespace attn_bench;

// ---------------------------------------------------------------------------------------------
// The attention core. Inputs are the projections of a batch_first MHA: q [B*L, H*D] and
// k, v [B*S, H*D], rows (b, l), head h in columns [h*D, (h+1)*D). attn reads each head in place
// through ScaledDotProductAttention::forward_into; the baseline copies it out first.

struct CoreShape {
  Index B, H, L, S, D;
  bool causal;
  int iterations;      // 0: run for a minimum time instead
  Index window = 0;    // > 0: sliding window (Mistral's, with causal): key j visible if i - j < window
  attn::Precision precision = attn::Precision::Native;
  double flops() const { return 4.0 * double(B) * double(H) * double(L) * double(S) * double(D); }
  std::string key(const char* type) const {
    return std::string("sdpa/") + type + " B=" + std::to_string(B) + " H=" + std::to_string(H) +
           " L=" + std::to_string(L) + " S=" + std::to_string(S) + " D=" + std::to_string(D) +
           (causal ? " causal" : "") + (window ? " window=" + std::to_string(window) : "") +
           (precision == attn::Precision::BFloat16 ? " bf16" : "");
  }
};

template <class T>
void core_attn(const CoreShape& s, const Mat<T>& q, const Mat<T>& k, const Mat<T>& v, Mat<T>& out) {
  const attn::ScaledDotProductAttention<T> sdpa;
  attn::Masks<T> masks;
  masks.causal = s.causal ? attn::Causal::TopLeft : attn::Causal::None;
  masks.window = s.window;
  masks.precision = s.precision;
  for (Index b = 0; b < s.B; ++b)
    for (Index h = 0; h < s.H; ++h)
      sdpa.forward_into(q.block(b * s.L, h * s.D, s.L, s.D), k.block(b * s.S, h * s.D, s.S, s.D),
                        v.block(b * s.S, h * s.D, s.S, s.D), masks, out.block(b * s.L, h * s.D, s.L, s.D));
}

// softmax over each row of x; with `causal`, key j > query i is masked out first (top-left), and
// with a window, key j <= i - window too.
template <class T>
void softmax_rows(Mat<T>& x, bool causal, Index window = 0) {
  if (causal)
    for (Index i = 0; i + 1 < x.cols() && i < x.rows(); ++i)
      x.row(i).tail(x.cols() - i - 1).setConstant(-std::numeric_limits<T>::infinity());
  if (window > 0)
    for (Index i = window; i < x.rows(); ++i)
      x.row(i).head(std::min(i - window + 1, x.cols())).setConstant(-std::numeric_limits<T>::infinity());
  for (Index i = 0; i < x.rows(); ++i) {
    auto row = x.row(i).array();
    row = (row - row.maxCoeff()).exp();  // minus the max: exp <= 1, no overflow
    row /= row.sum();
  }
}

// The obvious code: for each sequence and head, copy Q, K, V out, scores = Q K^T * scale,
// softmax the rows, O = P V, and write O into the head's columns.
template <class T>
void core_baseline(const CoreShape& s, const Mat<T>& q, const Mat<T>& k, const Mat<T>& v, Mat<T>& out) {
  const T scale = T(1) / std::sqrt(static_cast<T>(s.D));
  for (Index b = 0; b < s.B; ++b) {
    for (Index h = 0; h < s.H; ++h) {
      const Mat<T> qh = q.block(b * s.L, h * s.D, s.L, s.D);
      const Mat<T> kh = k.block(b * s.S, h * s.D, s.S, s.D);
      const Mat<T> vh = v.block(b * s.S, h * s.D, s.S, s.D);
      Mat<T> scores = qh * kh.transpose() * scale;
      softmax_rows(scores, s.causal, s.window);
      out.block(b * s.L, h * s.D, s.L, s.D) = scores * vh;
    }
  }
}

template <class T>
void BM_core(benchmark::State& state, const CoreShape& s, bool use_attn) {
  attn::Generator gen(42);
  const Mat<T> q = random_matrix<T>(s.B * s.L, s.H * s.D, gen);
  const Mat<T> k = random_matrix<T>(s.B * s.S, s.H * s.D, gen);
  const Mat<T> v = random_matrix<T>(s.B * s.S, s.H * s.D, gen);
  Mat<T> out(s.B * s.L, s.H * s.D);
  const bool check = first_time(s.key(type_name<T>()));
  if (check) {
    Mat<T> want(out.rows(), out.cols());
    core_attn(s, q, k, v, out);
    core_baseline(s, q, k, v, want);
    // bf16 compute: to bf16's error (attn/precision.hpp), ~2^-7 of the values' scale here.
    require_agreement(s.key(type_name<T>()), out, want, s.precision == attn::Precision::BFloat16 ? 2e-2 : 1e-4);
  }
  const auto body = [&] {
    if (use_attn)
      core_attn(s, q, k, v, out);
    else
      core_baseline(s, q, k, v, out);
    benchmark::DoNotOptimize(out.data());
  };
  time_it(state, body, /*warm=*/check);
  state.counters["flops"] = benchmark::Counter(s.flops(), benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void register_core(const CoreShape& s) {
  for (const bool use_attn : {true, false}) {
    const std::string name = std::string("sdpa/") + type_name<T>() + (use_attn ? "/attn" : "/baseline");
    auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_core<T>, s, use_attn);
    if (s.window > 0)
      b->Args({s.B, s.H, s.L, s.S, s.D, Index(s.causal), s.window})
          ->ArgNames({"B", "H", "L", "S", "D", "causal", "window"});
    else
      b->Args({s.B, s.H, s.L, s.S, s.D, Index(s.causal)})->ArgNames({"B", "H", "L", "S", "D", "causal"});
    set_timing(b, s.flops(), s.iterations);
  }
}

// ---------------------------------------------------------------------------------------------
// MultiHeadAttention, self-attention on x [B*L, E] (batch_first), with non-zero biases. The
// baseline uses the module's own parameters: projections as x W^T + b, the per-head core above,
// then the out projection.

struct MhaShape {
  Index B, L, E, H;
  bool causal;
  int iterations;  // 0: run for a minimum time instead
  double flops() const {
    return 8.0 * double(B) * double(L) * double(E) * double(E) + 4.0 * double(B) * double(L) * double(L) * double(E);
  }
  std::string key(const char* type) const {
    return std::string("mha/") + type + " B=" + std::to_string(B) + " L=" + std::to_string(L) +
           " E=" + std::to_string(E) + " H=" + std::to_string(H) + (causal ? " causal" : "");
  }
};

template <class T>
attn::MultiHeadAttention<T> make_mha(const MhaShape& s, attn::Generator& gen) {
  attn::MhaOptions options;
  options.batch_first = true;
  attn::MultiHeadAttention<T> mha(s.E, s.H, options, gen);
  Vec<T> in_bias(3 * s.E), out_bias(s.E);
  attn::init::uniform(in_bias, -0.1, 0.1, gen);
  attn::init::uniform(out_bias, -0.1, 0.1, gen);
  mha.set_in_proj_bias(in_bias);
  mha.out_proj().set_bias(out_bias);
  return mha;
}

template <class T>
void mha_attn(const attn::MultiHeadAttention<T>& mha, const MhaShape& s, const Mat<T>& x, Mat<T>& out) {
  attn::MhaArgs<T> args;
  args.batch = s.B;
  args.causal = s.causal ? attn::Causal::TopLeft : attn::Causal::None;
  mha.forward_into(x, x, x, args, out);
}

template <class T>
void mha_baseline(const attn::MultiHeadAttention<T>& mha, const MhaShape& s, const Mat<T>& x, Mat<T>& out) {
  const Index E = s.E;
  const Mat<T>& w = mha.in_proj_weight();  // rows: W_q, W_k, W_v
  const Vec<T>& b = mha.in_proj_bias();
  Mat<T> q = x * w.middleRows(0, E).transpose();
  q.rowwise() += b.segment(0, E).transpose();
  Mat<T> k = x * w.middleRows(E, E).transpose();
  k.rowwise() += b.segment(E, E).transpose();
  Mat<T> v = x * w.middleRows(2 * E, E).transpose();
  v.rowwise() += b.segment(2 * E, E).transpose();
  Mat<T> heads(x.rows(), E);
  core_baseline(CoreShape{s.B, s.H, s.L, s.L, E / s.H, s.causal, 0}, q, k, v, heads);
  out = heads * mha.out_proj().weight().transpose();
  out.rowwise() += mha.out_proj().bias().transpose();
}

template <class T>
void BM_mha(benchmark::State& state, const MhaShape& s, bool use_attn) {
  attn::Generator gen(42);
  const attn::MultiHeadAttention<T> mha = make_mha<T>(s, gen);
  const Mat<T> x = random_matrix<T>(s.B * s.L, s.E, gen);
  Mat<T> out(s.B * s.L, s.E);
  const bool check = first_time(s.key(type_name<T>()));
  if (check) {
    Mat<T> want(out.rows(), out.cols());
    mha_attn(mha, s, x, out);
    mha_baseline(mha, s, x, want);
    require_agreement(s.key(type_name<T>()), out, want);
  }
  const auto body = [&] {
    if (use_attn)
      mha_attn(mha, s, x, out);
    else
      mha_baseline(mha, s, x, out);
    benchmark::DoNotOptimize(out.data());
  };
  time_it(state, body, /*warm=*/check);
  state.counters["flops"] = benchmark::Counter(s.flops(), benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void register_mha(const MhaShape& s) {
  for (const bool use_attn : {true, false}) {
    const std::string name = std::string("mha/") + type_name<T>() + (use_attn ? "/attn" : "/baseline");
    auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_mha<T>, s, use_attn);
    b->Args({s.B, s.L, s.E, s.H, Index(s.causal)})->ArgNames({"B", "L", "E", "H", "causal"});
    set_timing(b, s.flops(), s.iterations);
  }
}

// The core in T and with bf16 compute (Precision::BFloat16: the bf16 micro-kernels on CPUs with
// AVX512_BF16), back to back: attn against attn, the ratio of the two rows is the bf16 speed-up.
void register_precision(CoreShape s) {
  for (const attn::Precision p : {attn::Precision::Native, attn::Precision::BFloat16}) {
    s.precision = p;
    const std::string name = std::string("sdpa_precision/f32/") + attn::precision_name(p);
    auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_core<float>, s, true);
    b->Args({s.B, s.H, s.L, s.S, s.D, Index(s.causal)})->ArgNames({"B", "H", "L", "S", "D", "causal"});
    set_timing(b, s.flops(), s.iterations);
  }
}

// ---------------------------------------------------------------------------------------------
// The shapes. BERT-base: E = 768, H = 12 (D = 64), L = 128..512. GPT-2 small: the same widths at
// L = 1024, plain and causal. Long: L = 2048 (E = 768) and 4096 (E = 1024, H = 16, GPT-2 medium's
// width). Llama-7B's core: 32 heads of D = 128. Odd: E = 96 with 3 heads of 32 at L = 37; one
// query (L = 1), and for the core one query against 1024 keys (a decoding step).

void register_all() {
  //                B   H     L     S   D  causal iterations
  register_core<float>({1, 12, 128, 128, 64, false, 0});
  register_core<float>({8, 12, 128, 128, 64, false, 0});
  register_core<float>({1, 12, 512, 512, 64, false, 0});
  register_core<float>({8, 12, 512, 512, 64, false, 5});
  register_core<float>({1, 12, 1024, 1024, 64, false, 0});
  register_core<float>({1, 12, 1024, 1024, 64, true, 0});
  register_core<float>({1, 12, 2048, 2048, 64, false, 2});
  register_core<float>({1, 16, 4096, 4096, 64, false, 1});
  register_core<float>({1, 32, 1024, 1024, 128, false, 2});
  // Mistral's sliding window: the same long shape causal, then with a window of 512 keys, whose
  // key blocks left of the window are skipped (about S / window less work).
  register_core<float>({1, 16, 4096, 4096, 64, true, 1});
  register_core<float>({1, 16, 4096, 4096, 64, true, 1, 512});
  register_core<float>({1, 12, 1, 1024, 64, false, 0});
  register_core<float>({3, 3, 37, 37, 32, false, 0});
  register_core<double>({1, 12, 512, 512, 64, false, 0});
  // bf16 compute against fp32 (issue 14's shapes: H = 12, L = 2048, D = 64 and 128; and causal).
  register_precision({1, 12, 2048, 2048, 64, false, 2});
  register_precision({1, 12, 2048, 2048, 128, false, 2});
  register_precision({1, 12, 2048, 2048, 64, true, 2});
  register_precision({1, 12, 2048, 2048, 128, true, 2});

  //               B     L     E   H  causal iterations
  register_mha<float>({1, 128, 768, 12, false, 0});
  register_mha<float>({8, 128, 768, 12, false, 0});
  register_mha<float>({1, 256, 768, 12, false, 0});
  register_mha<float>({8, 256, 768, 12, false, 5});
  register_mha<float>({1, 512, 768, 12, false, 0});
  register_mha<float>({8, 512, 768, 12, false, 3});
  register_mha<float>({1, 1024, 768, 12, false, 0});
  register_mha<float>({1, 1024, 768, 12, true, 0});
  register_mha<float>({1, 2048, 768, 12, false, 2});
  register_mha<float>({1, 4096, 1024, 16, false, 1});
  register_mha<float>({1, 1, 768, 12, false, 0});
  register_mha<float>({3, 37, 96, 3, false, 0});
  register_mha<double>({1, 128, 768, 12, false, 0});
}

}  // namespace

int main(int argc, char** argv) { return attn_bench::run(argc, argv, register_all); }
