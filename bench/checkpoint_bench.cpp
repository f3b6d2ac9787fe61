// bench/checkpoint_bench.cpp - a Hugging Face checkpoint directory into an attn::CausalLM
// (attn/models/load.hpp): how long the load takes, the peak resident memory of a process that
// loads it and generates, against the bytes the model holds, and a decoding step end to end
// (embedding, every layer, LM head).
//
// Input: a checkpoint directory, ATTN_CHECKPOINT (default /tmp/attn_tinyllama). Write one with
// TinyLlama-1.1B's shapes (random weights, bf16, two shards; 2.1 GB, about 10 s):
//   /usr/bin/python3 tools/write_llama_checkpoint.py /tmp/attn_tinyllama
//   ATTN_CHECKPOINT=/tmp/attn_tinyllama build/bench/checkpoint_bench
//
// Rows, each twice: as loaded by default (LoadOptions::map_weights, /mapped: the bf16 weights are
// views of the memory-mapped file) and with map_weights = false (/copied: every weight the model's
// own copy, on huge pages, the file's pages released as they are copied):
//   checkpoint/load        attn::models::load_causal_lm<float>(dir): config.json and every shard's
//                          header parsed, every tensor checked against the config, the model built
//   checkpoint/decode/S:n  one token through the whole model against caches holding n positions
//                          (filled by an untimed prompt of n random token ids before the first step;
//                          the cache is rolled back after each step, untimed)
// Counters:
//   held_MiB       the bytes of the checkpoint's tensors: what the model holds (one copy of them)
//   peak_rss_MiB   the peak resident memory of a child process that loads the model, runs a
//                  16-token prompt and 8 decoding steps (so every weight page is touched); measured
//                  once per mode, at its first row (bench/peak_rss.hpp)
//   peak_vs_held   peak_rss_MiB / held_MiB (issue 15's goal: <= 1.2)
//   tokens/s       (decode) 1 / the step's time
// The file's pages come from the page cache when it is warm (as right after writing it); a cold
// read costs the disk's time on first touch, during generation, not during load.
#include <benchmark/benchmark.h>

#include <attn/attn.hpp>
#include <attn/models/load.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "peak_rss.hpp"

namespace {

using namespace attn_bench;
using Clock = std::chrono::steady_clock;

std::string checkpoint_dir() {
  const char* env = std::getenv("ATTN_CHECKPOINT");
  return env && *env ? env : "/tmp/attn_tinyllama";
}

// n token ids in [0, vocab), from a fixed seed.
std::vector<int> random_ids(Index n, Index vocab) {
  attn::Generator gen(7);
  std::vector<int> ids;
  for (Index i = 0; i < n; ++i) ids.push_back(static_cast<int>(gen.uniform() * double(vocab)));
  return ids;
}

attn::models::LoadOptions options(bool map) {
  attn::models::LoadOptions o;
  o.map_weights = map;
  return o;
}

// The peak of a child that loads the model (copied, or mapped) and generates.
const Peak& peak(bool map) {
  static Peak peaks[2];
  static bool measured[2] = {false, false};
  if (!measured[map]) {
    measured[map] = true;
    peaks[map] = peak_rss(map ? "load mapped and generate" : "load and generate", [map] {
      const attn::CausalLM<float> lm = attn::models::load_causal_lm<float>(checkpoint_dir(), options(map));
      attn::GenerationOptions opt;
      opt.max_new_tokens = 8;
      const std::vector<int> out = attn::generate(lm, random_ids(16, lm.vocab_size()), opt);
      return out.size() == 8 ? 0 : 3;
    });
  }
  return peaks[map];
}

bool counters(benchmark::State& state, bool map) {
  const double held = mib(double(attn::io::Checkpoint::open(checkpoint_dir()).data_bytes()));
  state.counters["held_MiB"] = held;
  state.counters["threads"] = attn::num_threads();
  const Peak& p = peak(map);
  if (!p.error.empty()) {
    state.SkipWithError(("peak RSS: " + p.error).c_str());
    return false;
  }
  state.counters["peak_rss_MiB"] = p.peak_mib;
  state.counters["peak_vs_held"] = p.peak_mib / held;
  state.SetLabel(checkpoint_dir());
  return true;
}

bool have_checkpoint(benchmark::State& state) {
  if (std::filesystem::exists(checkpoint_dir())) return true;
  state.SkipWithError(("no checkpoint at " + checkpoint_dir() +
                       ": write one with tools/write_llama_checkpoint.py, or set ATTN_CHECKPOINT")
                          .c_str());
  return false;
}

void BM_load(benchmark::State& state, bool map) {
  if (!have_checkpoint(state)) return;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    const attn::CausalLM<float> lm = attn::models::load_causal_lm<float>(checkpoint_dir(), options(map));
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
    benchmark::DoNotOptimize(&lm);
  }
  counters(state, map);
}

void BM_decode(benchmark::State& state, bool map) {
  if (!have_checkpoint(state)) return;
  const Index n = state.range(0);
  const attn::CausalLM<float> lm = attn::models::load_causal_lm<float>(checkpoint_dir(), options(map));
  auto cache = lm.make_cache(1, n + 1);
  (void)lm.forward(random_ids(n, lm.vocab_size()), cache, 0, attn::LogitRows::Last);
  const auto filled = cache;
  const std::vector<int> token = {1};
  (void)lm.forward(token, cache, 0);  // first touch of every weight, untimed
  for (auto _ : state) {
    cache = filled;
    const auto t0 = Clock::now();
    const attn::Matrix<float> logits = lm.forward(token, cache, 0);
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(double(state.iterations()), benchmark::Counter::kIsRate);
  counters(state, map);
}

void register_all() {
  benchmark::AddCustomContext("checkpoint", checkpoint_dir());
  for (const bool map : {true, false}) {
    const std::string mode = map ? "/mapped" : "/copied";
    benchmark::RegisterBenchmark(("checkpoint/load" + mode).c_str(), BM_load, map)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("checkpoint/decode" + mode).c_str(), BM_decode, map)
        ->Arg(512)
        ->ArgNames({"S"})
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  attn::set_num_threads(2);  // ATTN_BENCH_THREADS=n, read in attn_bench::run, overrides it
  return run(argc, argv, register_all);
}
