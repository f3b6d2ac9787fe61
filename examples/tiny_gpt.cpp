// examples/tiny_gpt.cpp - greedy generation with a tiny GPT (Llama's structure: RMSNorm, grouped-
// query attention with RoPE, SwiGLU) on a KV cache, from weights PyTorch trained.
//
//   build/examples/tiny_gpt examples/data/tiny_gpt.safetensors "S31415=" "123+456="
//
// The model sorts digits ("S31415=" -> "11345.") and adds numbers ("123+456=" -> "579."); see
// tools/train_tiny_gpt.py. Without prompts it runs a built-in set. It prints each answer and then,
// for each storage type of the KV cache (float, bf16, fp16, int8), how many answers change and the
// throughput: the prompts generated again for about a second, prefill and decoding steps timed
// apart (one decoding step = one token through every layer, attending its cache).
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "tiny_gpt.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::fprintf(stderr, "usage: %s WEIGHTS.safetensors [PROMPT...]\n", argv[0]);
    return 2;
  }
  try {
    const auto file = attn::io::SafeTensors::open(argv[1]);
    const tiny_gpt::Model model(file);
    const tiny_gpt::Config& c = model.config();
    std::vector<std::string> prompts(argv + 2, argv + argc);
    if (prompts.empty()) prompts = {"S31415=", "S90817263=", "S5=", "123+456=", "999+1=", "58+67="};
    std::printf("tiny GPT: %lld layers, d_model %lld, %lld heads (%lld kv heads) of %lld, SwiGLU %lld, vocab \"%s\"\n",
                (long long)c.n_layers, (long long)c.d_model, (long long)c.n_heads, (long long)c.n_kv_heads,
                (long long)c.head_dim, (long long)c.ffn_dim, c.vocab.c_str());

    std::vector<std::vector<int>> ids, answers;  // answers: with the float cache
    for (const std::string& p : prompts) {
      ids.push_back(model.encode(p));
      if (static_cast<attn::Index>(ids.back().size()) >= c.max_seq) throw std::invalid_argument("prompt too long: " + p);
      answers.push_back(model.generate(ids.back(), c.max_seq - static_cast<attn::Index>(ids.back().size())));
      std::printf("  %-12s -> %s\n", p.c_str(), model.decode(answers.back()).c_str());
    }

    // Per storage type of the KV cache: whether the generations change, and the throughput (the
    // same generations again for about a second, prefill and steps timed apart).
    for (const attn::KVStorage storage :
         {attn::KVStorage::Native, attn::KVStorage::BFloat16, attn::KVStorage::Float16, attn::KVStorage::Int8}) {
      int changed = 0;
      for (std::size_t i = 0; i < ids.size(); ++i)
        changed += model.generate(ids[i], c.max_seq - static_cast<attn::Index>(ids[i].size()), storage) != answers[i];
      double prefill_s = 0, decode_s = 0;
      long long prefill_tokens = 0, decode_tokens = 0;
      const auto t_all = Clock::now();
      while (seconds_since(t_all) < 1.0) {
        for (const std::vector<int>& prompt : ids) {
          tiny_gpt::Cache cache = model.make_cache(1, storage);
          auto t0 = Clock::now();
          tiny_gpt::Matrix logits = model.forward(prompt, cache);
          prefill_s += seconds_since(t0);
          prefill_tokens += static_cast<long long>(prompt.size());
          t0 = Clock::now();
          for (attn::Index next = 0; cache[0].size(0) < c.max_seq; ++decode_tokens) {
            logits.row(logits.rows() - 1).maxCoeff(&next);
            if (next == model.stop_id()) break;
            logits = model.forward({static_cast<int>(next)}, cache);
          }
          decode_s += seconds_since(t0);
        }
      }
      std::printf("%-6s cache (%lld bytes/token/layer): %d of %zu generations differ from the float cache's; "
                  "prefill %.0f tokens/s, decode %.0f tokens/s (%.1f us per token, on %d threads)\n",
                  storage == attn::KVStorage::Native ? "float" : attn::storage_name(storage), (long long)model.make_cache(1, storage)[0].bytes_per_token(), changed,
                  ids.size(), double(prefill_tokens) / prefill_s, double(decode_tokens) / decode_s,
                  decode_s / double(decode_tokens) * 1e6, attn::num_threads());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tiny_gpt: %s\n", e.what());
    return 1;
  }
}
