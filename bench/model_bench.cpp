// bench/model_bench.cpp - a stack of Llama-style decoder layers at TinyLlama-1.1B's shapes, built
// from attn's public classes with random weights, timed in fp32, bf16 and int8: a prompt, a
// decoding step, and the peak memory of a process that does both.
//
// The model. Per layer, exactly as examples/tiny_gpt.hpp (on rows x, one per token):
//   h = x + self_attn(input_layernorm(x))        RMSNorm, DecoderAttention against a KVCache<float>
//   x = h + mlp(post_attention_layernorm(h))     RMSNorm, SwiGLU
// then a final RMSNorm. E = 2048, 32 query heads and 4 kv heads of 64, SwiGLU hidden 5632, RMSNorm
// eps 1e-5, RoPE NeoX base 10000 over 2048 positions; 22 layers (ATTN_MODEL_LAYERS=n for fewer or
// more). No embedding and no LM head: the layers are what is measured (TinyLlama's 32000-row
// embedding is a table lookup, and its LM head one more [2048 -> 32000] projection per token).
// Weights: nn.Linear's initialisation, U(-1/sqrt(in), 1/sqrt(in)), from one attn::Generator of a
// fixed seed, so every format starts from the same fp32 values; RMSNorm weights are 1.
//
// Formats (the row's second part): f32 = fp32 weights and fp32 KV cache; bf16 = weights kept in
// bf16 (set_weight_storage(attn::Storage::BFloat16) on DecoderAttention and SwiGLU) and a bf16
// cache (the KVCache constructor's storage argument); int8 = the same with Storage::Int8. A model
// is built layer by layer: each layer is constructed in fp32 and converted before the next is
// constructed, so at most one fp32 layer (176 MB, plus set_weight_storage's transient copy of one
// module's weights) exists beside the converted ones.
//
// Rows, per format, in the order they run (attn on 2 threads: attn::set_num_threads(2), unless
// ATTN_BENCH_THREADS=n says otherwise):
//   model/<fmt>/prefill/layers:N/L:512   one forward of a 512-token prompt (rows [512, 2048],
//                                        uniform in [-1, 1)) through every layer into empty caches
//                                        (cleared before each iteration, outside the timing; their
//                                        memory is allocated once)
//   model/<fmt>/decode/layers:N/S:1024   one token [1, 2048] through every layer against caches
//                                        that hold 1024 positions. KVCache has no truncation (only
//                                        clear()), so the caches are filled once and, after each
//                                        timed step, copied back from a snapshot taken after the
//                                        fill (untimed): every step sees exactly 1024 cached
//                                        positions. The fill appends random rows (uniform in
//                                        [-1, 1)) to each layer's cache instead of running a
//                                        1024-token prefill: a step's work does not depend on the
//                                        values, and the fill costs a second rather than seconds.
// Each row's first run begins with one untimed call (first touch, the thread pool's start). Time:
// the wall-clock time of one call (manual time, steady_clock), the mean over the iterations; each
// row runs for --benchmark_min_time seconds, 2 unless given (a full-size prefill takes seconds, so
// it runs once).
//
// Counters:
//   tokens/s        prompt tokens (512) or generated tokens (1) per second
//   GFLOP/s         (prefill) 2 * L * (weights per layer) + the causal attention's 4 * H * D * L(L+1)/2,
//                   per layer, per second
//   GB/s            (decode) the bytes a step must read - every stored weight (int8's row scales
//                   included) and every cached key and value - per second: a step is bound by it
//   speedup_vs_f32  the f32 row's time over this row's (bf16 and int8 rows, when f32 ran earlier in
//                   the same run)
//   weights_MiB     the stored weights (Weight::memory_bytes, plus the RMSNorm vectors)
//   cache_MiB       the KV caches the row uses (KVCache::memory_bytes)
//   peak_rss_MiB    the peak resident memory of a process that builds this format's model and runs
//                   the prefill and a decoding step (below); peak_rss_vs_f32 is its ratio to f32's
//   fork_base_MiB   this process's resident memory when it forked that child (counted in the peak)
//
// Peak RSS. At a format's first row, before this process builds that format's model (the previous
// format's is freed first, and malloc_trim hands its memory back to the kernel), the process
// fork()s. The child builds the model as above, runs the prefill of 512 tokens into fresh caches,
// fills the decode caches to 1024 positions and runs one step - what the rows do, without the
// snapshot - and exits; the parent reads the child's ru_maxrss from wait4(). The child starts with
// the parent's resident pages (copy-on-write, fork_base_MiB: the program and small buffers), which
// its peak includes. peak_rss_MiB - weights_MiB is the working memory on top of the weights - the
// build's transients (the Linear constructor's fp32 matrix, one fp32 layer, set_weight_storage's
// copy of one module's weights), the activations of the prefill, the caches - and grows little with
// the layer count (only the caches do): at ATTN_MODEL_LAYERS=2 it is most of the peak. Only one
// model exists at a time in this process: a format's model is built at its first row and freed
// when a row of another format starts, or when the run ends.
//
// Memory and time, full size: the f32 layers hold 0.97 G weights, 3.6 GiB (bf16 1.8, int8 0.9), in
// the child and then in this process. Building a model draws 0.97 G random numbers (several seconds); a full
// prefill takes seconds. The whole run takes a few minutes on 2 cores.
//
//   cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_TESTS=OFF -DATTN_BUILD_EXAMPLES=OFF
//   cmake --build build-bench --target model_bench -j2
//   ./build-bench/bench/model_bench --benchmark_out=model.json --benchmark_out_format=json
//   ATTN_MODEL_LAYERS=2 ./build-bench/bench/model_bench --benchmark_min_time=0.1    # a quick smoke run
#include <benchmark/benchmark.h>

#include <algorithm>
#include <attn/attn.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "peak_rss.hpp"

namespace {

using namespace attn_bench;
using Clock = std::chrono::steady_clock;
using Matrix = attn::Matrix<float>;
using Cache = std::vector<attn::KVCache<float>>;  // one per layer

// TinyLlama-1.1B (its config.json).
constexpr Index kEmbed = 2048, kHeads = 32, kKvHeads = 4, kHeadDim = 64, kFfn = 5632, kMaxPositions = 2048;
constexpr Index kDefaultLayers = 22;
constexpr double kRmsEps = 1e-5, kRopeBase = 10000.0;
constexpr Index kPrompt = 512;    // prefill: tokens in one call
constexpr Index kContext = 1024;  // decode: positions cached before the step
constexpr std::uint64_t kSeed = 2024;

// ATTN_MODEL_LAYERS, or 22; exits on a value that is not a positive integer.
Index model_layers() {
  static const Index layers = [] {
    const char* s = std::getenv("ATTN_MODEL_LAYERS");
    if (!s || !*s) return kDefaultLayers;
    char* end = nullptr;
    const long n = std::strtol(s, &end, 10);
    if (*end != '\0' || n <= 0 || n > 1000) {
      std::fprintf(stderr, "model_bench: ATTN_MODEL_LAYERS=%s is not a layer count in [1, 1000]\n", s);
      std::exit(2);
    }
    return Index(n);
  }();
  return layers;
}

struct Format {
  const char* name;       // the row's name
  attn::Storage weights;  // Linear weights, via set_weight_storage
  attn::KVStorage cache;  // keys and values
};
const Format kFormats[] = {{"f32", attn::Storage::Native, attn::KVStorage::Native},
                           {"bf16", attn::Storage::BFloat16, attn::KVStorage::BFloat16},
                           {"int8", attn::Storage::Int8, attn::KVStorage::Int8}};


// ---------------------------------------------------------------------------------------------
// The model: tiny_gpt's layers, without embedding and LM head.

class Model {
 public:
  // Layer by layer: each is built in fp32 from `gen` and converted to f.weights before the next.
  Model(Index n_layers, const Format& f) : norm_(kEmbed, kRmsEps) {
    attn::Generator gen(kSeed);
    attn::DecoderAttentionOptions attention;
    attention.num_kv_heads = kKvHeads;
    attention.head_dim = kHeadDim;
    attention.rope = attn::Rope{0, kRopeBase, attn::RopeStyle::NeoX};
    attention.max_positions = kMaxPositions;
    layers_.reserve(static_cast<std::size_t>(n_layers));
    for (Index i = 0; i < n_layers; ++i) {
      Layer l{attn::RMSNorm<float>(kEmbed, kRmsEps), attn::DecoderAttention<float>(kEmbed, kHeads, attention, gen),
              attn::RMSNorm<float>(kEmbed, kRmsEps), attn::SwiGLU<float>(kEmbed, kFfn, /*bias=*/false, gen)};
      l.self_attn.set_weight_storage(f.weights);
      l.mlp.set_weight_storage(f.weights);
      layers_.push_back(std::move(l));
    }
  }

  // The arithmetic of every layer's products (attn/precision.hpp); a decoding step stays in fp32.
  void set_precision(attn::Precision p) {
    for (Layer& l : layers_) l.self_attn.set_precision(p), l.mlp.set_precision(p);
  }

  // A KV cache per layer for one sequence of up to `capacity` positions, stored as `storage`.
  Cache make_cache(Index capacity, attn::KVStorage storage) const {
    Cache cache;
    for (const Layer& l : layers_) cache.push_back(l.self_attn.make_cache(/*batch=*/1, capacity, storage));
    return cache;
  }

  // x: [L, E], the next L tokens of the cache's sequence  ->  [L, E], after the final norm.
  // Appends their keys and values to every layer's cache.
  Matrix forward(Matrix x, Cache& cache) const {
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      x += l.self_attn.forward(l.input_layernorm.forward(x), cache[i], 0);
      x += l.mlp.forward(l.post_attention_layernorm.forward(x));
    }
    return norm_.forward(x);
  }

  Index layers() const { return Index(layers_.size()); }

  // Bytes of every stored weight (int8's row scales included) and of the RMSNorm vectors.
  double weight_bytes() const {
    double bytes = double(norm_.dim()) * sizeof(float);
    for (const Layer& l : layers_) {
      for (const attn::Linear<float>* p :
           {&l.self_attn.q_proj(), &l.self_attn.k_proj(), &l.self_attn.v_proj(), &l.self_attn.o_proj(),
            &l.mlp.gate_proj(), &l.mlp.up_proj(), &l.mlp.down_proj()})
        bytes += double(p->stored_weight().memory_bytes());
      bytes += 2.0 * double(kEmbed) * sizeof(float);
    }
    return bytes;
  }

 private:
  struct Layer {
    attn::RMSNorm<float> input_layernorm;
    attn::DecoderAttention<float> self_attn;
    attn::RMSNorm<float> post_attention_layernorm;
    attn::SwiGLU<float> mlp;
  };
  std::vector<Layer> layers_;
  attn::RMSNorm<float> norm_;
};

double cache_bytes(const Cache& cache) {
  double bytes = 0;
  for (const attn::KVCache<float>& c : cache) bytes += double(c.memory_bytes());
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// What the rows run, and what the peak-RSS child runs: a model, its prefill caches, and decode
// caches filled to kContext positions.

class Session {
 public:
  Session(Index n_layers, const Format& f) : model_(n_layers, f) {
    attn::Generator gen(kSeed + 1);
    prompt_ = random_matrix<float>(kPrompt, kEmbed, gen);
    token_ = random_matrix<float>(1, kEmbed, gen);
    prefill_cache_ = model_.make_cache(kPrompt, f.cache);
    decode_cache_ = model_.make_cache(kContext + 1, f.cache);
    // Every layer's cache gets the same kContext random rows of keys and values: a step's work
    // depends on how many positions are cached, not on their values.
    const Matrix k = random_matrix<float>(kContext, kKvHeads * kHeadDim, gen);
    const Matrix v = random_matrix<float>(kContext, kKvHeads * kHeadDim, gen);
    for (attn::KVCache<float>& c : decode_cache_) c.append(0, k, v);
  }

  // The prompt through every layer into empty prefill caches  ->  [kPrompt, E].
  Matrix prefill() {
    for (attn::KVCache<float>& c : prefill_cache_) c.clear();
    return model_.forward(prompt_, prefill_cache_);
  }
  // One token against the decode caches  ->  [1, E]; leaves kContext + 1 positions cached.
  Matrix decode_step() { return model_.forward(token_, decode_cache_); }

  const Model& model() const { return model_; }
  Model& model() { return model_; }
  Cache& decode_cache() { return decode_cache_; }
  const Cache& prefill_cache() const { return prefill_cache_; }

 private:
  Model model_;
  Matrix prompt_, token_;
  Cache prefill_cache_, decode_cache_;
};

// ---------------------------------------------------------------------------------------------
// Peak RSS of a child process that runs one format.

Peak measure_peak(const Format& f) {
  return peak_rss(f.name, [&] {
    Session s(model_layers(), f);
    Matrix y = s.prefill();
    Matrix t = s.decode_step();
    return y.allFinite() && t.allFinite() ? 0 : 3;
  });
}

// ---------------------------------------------------------------------------------------------
// The format whose rows run now: its session, its decode snapshot, its peak. One at a time.

struct Loaded {
  std::string format;
  std::unique_ptr<Session> session;
  Cache decode_snapshot;  // the decode caches after the fill: copied back after each step
  bool prefill_warm = false, prefill_bf16_warm = false, decode_warm = false;
};

std::unique_ptr<Loaded>& current() {
  static std::unique_ptr<Loaded> loaded;
  return loaded;
}

std::map<std::string, Peak>& peaks() {
  static std::map<std::string, Peak> p;
  return p;
}

// Frees the loaded format, if any.
void unload() { current().reset(); }

// f's session, built at its first row (the previous format's freed first; f's peak measured before).
Loaded& load(const Format& f) {
  std::unique_ptr<Loaded>& loaded = current();
  if (loaded && loaded->format == f.name) return *loaded;
  unload();
  if (peaks().find(f.name) == peaks().end()) peaks()[f.name] = measure_peak(f);
  loaded = std::make_unique<Loaded>();
  loaded->format = f.name;
  loaded->session = std::make_unique<Session>(model_layers(), f);
  loaded->decode_snapshot = loaded->session->decode_cache();
  return *loaded;
}

std::map<std::string, double>& row_times() {
  static std::map<std::string, double> times;
  return times;
}
const double* recall(const std::map<std::string, double>& m, const std::string& key) {
  const auto it = m.find(key);
  return it == m.end() ? nullptr : &it->second;
}
std::map<std::string, double>& row_peaks() {
  static std::map<std::string, double> p;
  return p;
}

std::string layer_label(Index layers) {
  return "TinyLlama-1.1B shapes, " + std::to_string(layers) + " layer" + (layers == 1 ? "" : "s") +
         (layers == kDefaultLayers ? "" : " (ATTN_MODEL_LAYERS)");
}

// The counters both rows of a format carry; false (and the row skipped) if its peak failed.
// speedup_vs_f32 is over the f32 row of `baseline` (the same kind unless given).
bool common_counters(benchmark::State& state, const Format& f, const Loaded& l, double seconds, const char* kind,
                     const char* baseline = nullptr) {
  const Peak& p = peaks()[f.name];
  state.counters["weights_MiB"] = mib(l.session->model().weight_bytes());
  state.counters["threads"] = attn::num_threads();
  state.SetLabel(layer_label(model_layers()));
  const std::string row = std::string(kind) + " " + f.name;
  row_times()[row] = seconds;
  if (const double* t = recall(row_times(), std::string(baseline ? baseline : kind) + " f32");
      t && (baseline || std::strcmp(f.name, "f32") != 0))
    state.counters["speedup_vs_f32"] = *t / seconds;
  if (!p.error.empty()) {
    state.SkipWithError(("peak RSS: " + p.error).c_str());
    return false;
  }
  state.counters["peak_rss_MiB"] = p.peak_mib;
  state.counters["fork_base_MiB"] = p.fork_base_mib;
  row_peaks()[f.name] = p.peak_mib;
  if (const double* r = recall(row_peaks(), "f32"); r && std::strcmp(f.name, "f32") != 0)
    state.counters["peak_rss_vs_f32"] = p.peak_mib / *r;
  return true;
}

// Times call() once per iteration, as the row's manual time; after(), untimed, follows each call.
// Returns the mean seconds per call (0: no iterations).
template <class Call, class After>
double time_calls(benchmark::State& state, const Call& call, const After& after) {
  double total = 0;
  Index n = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    Matrix y = call();
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    benchmark::DoNotOptimize(y.data());
    state.SetIterationTime(seconds);
    after();
    total += seconds;
    ++n;
  }
  return n > 0 ? total / double(n) : 0.0;
}

void BM_prefill(benchmark::State& state, Format f, attn::Precision precision) {
  Loaded& l = load(f);
  Session& s = *l.session;
  s.model().set_precision(precision);
  struct Restore {  // the decode rows and the next prefill row find the model in fp32
    Session& s;
    ~Restore() { s.model().set_precision(attn::Precision::Native); }
  } restore{s};
  const bool bf16 = precision == attn::Precision::BFloat16;
  bool& warm = bf16 ? l.prefill_bf16_warm : l.prefill_warm;
  if (!warm) {  // untimed, once per precision: first touch, and a check that the numbers are finite
    warm = true;
    if (!s.prefill().allFinite()) {
      state.SkipWithError("the prefill's output is not finite");
      return;
    }
  }
  const double seconds = time_calls(
      state, [&] { return s.prefill(); }, [] {});
  if (seconds <= 0) return;
  // Per layer: 2 FLOPs per weight per token, and the causal attention's q.k and p.v over the
  // L(L+1)/2 query-key pairs of each head.
  const double L = double(kPrompt);
  const double weights_per_layer =
      double(kEmbed) * double(2 * kHeads * kHeadDim + 2 * kKvHeads * kHeadDim) + 3.0 * double(kEmbed * kFfn);
  const double flops =
      double(model_layers()) * (2.0 * L * weights_per_layer + 4.0 * double(kHeads * kHeadDim) * L * (L + 1) / 2);
  state.counters["tokens/s"] = L / seconds;
  state.counters["GFLOP/s"] = flops / seconds / 1e9;
  state.counters["cache_MiB"] = mib(cache_bytes(s.prefill_cache()));
  common_counters(state, f, l, seconds, bf16 ? "prefill_bf16" : "prefill", bf16 ? "prefill" : nullptr);
}

void BM_decode(benchmark::State& state, Format f) {
  Loaded& l = load(f);
  Session& s = *l.session;
  // The step leaves kContext + 1 positions: put the snapshot back (KVCache has no truncation).
  const auto roll_back = [&] {
    Cache& c = s.decode_cache();
    for (std::size_t i = 0; i < c.size(); ++i) c[i] = l.decode_snapshot[i];
  };
  if (!l.decode_warm) {
    l.decode_warm = true;
    const bool finite = s.decode_step().allFinite();
    roll_back();
    if (!finite) {
      state.SkipWithError("the decoding step's output is not finite");
      return;
    }
  }
  const double seconds = time_calls(
      state, [&] { return s.decode_step(); }, roll_back);
  if (seconds <= 0) return;
  const attn::KVCache<float>& c0 = s.decode_cache().front();
  const double cache_read = double(model_layers()) * double(c0.bytes_per_token()) * double(kContext + 1);
  state.counters["tokens/s"] = 1.0 / seconds;
  state.counters["GB/s"] = (s.model().weight_bytes() + cache_read) / seconds / 1e9;
  state.counters["cache_MiB"] = mib(cache_bytes(s.decode_cache()));
  common_counters(state, f, l, seconds, "decode");
}

void register_all() {
  const Index layers = model_layers();
  benchmark::AddCustomContext("model", "TinyLlama-1.1B shapes: E=2048 H=32 Hkv=4 D=64 ffn=5632, no embedding/LM head");
  benchmark::AddCustomContext("model_layers", std::to_string(layers));
  for (const Format& f : kFormats) {
    // The prompt with the products in fp32, then in bf16 (Precision::BFloat16; speedup_vs_f32 is
    // over the f32 format's fp32 prompt).
    for (const attn::Precision p : {attn::Precision::Native, attn::Precision::BFloat16})
      benchmark::RegisterBenchmark((std::string("model/") + f.name +
                                    (p == attn::Precision::BFloat16 ? "/prefill_bf16_compute" : "/prefill"))
                                       .c_str(),
                                   BM_prefill, f, p)
          ->Args({layers, kPrompt})
          ->ArgNames({"layers", "L"})
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((std::string("model/") + f.name + "/decode").c_str(), BM_decode, f)
        ->Args({layers, kContext})
        ->ArgNames({"layers", "S"})
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  attn::set_num_threads(2);  // ATTN_BENCH_THREADS=n, read in attn_bench::run, overrides it
  // 2 s a row unless --benchmark_min_time is given: a decoding step takes a tenth of a second or
  // more, and Google Benchmark's default (0.5 s) would average a handful.
  std::vector<char*> args(argv, argv + argc);
  static char default_min_time[] = "--benchmark_min_time=2";
  if (std::none_of(args.begin(), args.end(),
                   [](const char* a) { return std::strncmp(a, "--benchmark_min_time", 20) == 0; }))
    args.push_back(default_min_time);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  const int rc = attn_bench::run(n, args.data(), register_all);
  unload();  // the last format's model
  return rc;
}
