// examples/generate.cpp - text generation from a Hugging Face decoder checkpoint directory (Llama 2
// and 3, Mistral, Qwen 2, GPT-2), from token ids: the ids of each new token are printed as they
// come, then the speed. Tokenization stays outside attn: pair it with the model's own tokenizer
// (the README shows this with Hugging Face's `tokenizers`).
//
//   build/examples/generate TinyLlama-1.1B-Chat-v1.0 --ids "1 15043 29892 590" --max-new 32
//   build/examples/generate DIR --ids "..." --sample --temperature 0.7 --top-p 0.9 --seed 7
//   build/examples/generate DIR --ids "..." --stop 2 --kv int8 --bf16-compute
//
// Weights stay as the checkpoint stores them (bf16 memory-mapped: no copy); --storage int8 (or
// bf16, fp16, float) converts the projection weights at load. Options: --max-new N (32),
// --stop ID (repeatable; default: config.json's eos_token_id), --sample, --temperature T, --top-k K,
// --top-p P, --seed S, --kv float|bf16|fp16|int8 (the KV cache's storage), --bf16-compute.
#include <attn/attn.hpp>
#include <attn/models/load.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int> parse_ids(const std::string& s) {
  std::vector<int> ids;
  std::istringstream in(s);
  for (long long id; in >> id;) ids.push_back(static_cast<int>(id));
  if (!in.eof()) throw std::invalid_argument("--ids takes token ids separated by spaces, got \"" + s + "\"");
  return ids;
}

attn::Storage storage_named(const std::string& s) {
  for (const attn::Storage t :
       {attn::Storage::Native, attn::Storage::BFloat16, attn::Storage::Float16, attn::Storage::Int8})
    if (s == (t == attn::Storage::Native ? "float" : attn::storage_name(t))) return t;
  throw std::invalid_argument("unknown storage \"" + s + "\" (float, bf16, fp16, int8)");
}

// config.json's eos_token_id: an id, a list of ids, or absent.
std::vector<int> eos_ids(const nlohmann::json& config) {
  std::vector<int> ids;
  if (!config.contains("eos_token_id")) return ids;
  const auto& e = config["eos_token_id"];
  if (e.is_number_integer()) ids.push_back(e.get<int>());
  if (e.is_array())
    for (const auto& x : e)
      if (x.is_number_integer()) ids.push_back(x.get<int>());
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::fprintf(stderr,
                 "usage: %s CHECKPOINT_DIR --ids \"ID ID ...\" [--max-new N] [--stop ID]... [--sample] "
                 "[--temperature T] [--top-k K] [--top-p P] [--seed S] [--storage float|bf16|fp16|int8] "
                 "[--kv float|bf16|fp16|int8] [--bf16-compute]\n",
                 argv[0]);
    return 2;
  }
  try {
    std::vector<int> prompt;
    attn::GenerationOptions opt;
    attn::models::LoadOptions load;
    bool stops_given = false, bf16_compute = false;
    for (int i = 2; i < argc; ++i) {
      const std::string a = argv[i];
      const auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
        return argv[++i];
      };
      if (a == "--ids")
        prompt = parse_ids(value());
      else if (a == "--max-new")
        opt.max_new_tokens = std::stoll(value());
      else if (a == "--stop")
        opt.stop_tokens.push_back(std::stoi(value())), stops_given = true;
      else if (a == "--sample")
        opt.do_sample = true;
      else if (a == "--temperature")
        opt.temperature = std::stod(value());
      else if (a == "--top-k")
        opt.top_k = std::stoll(value());
      else if (a == "--top-p")
        opt.top_p = std::stod(value());
      else if (a == "--seed")
        opt.seed = std::stoull(value());
      else if (a == "--storage")
        load.storage = storage_named(value());
      else if (a == "--kv")
        opt.cache_storage = storage_named(value());
      else if (a == "--bf16-compute")
        bf16_compute = true;
      else
        throw std::invalid_argument("unknown option " + a);
    }
    if (prompt.empty()) throw std::invalid_argument("give the prompt's token ids with --ids");

    const auto t0 = Clock::now();
    const auto ckpt = attn::io::Checkpoint::open(argv[1]);
    attn::CausalLM<float> lm = attn::models::load_causal_lm<float>(ckpt, load);
    const double load_s = seconds_since(t0);
    if (bf16_compute) lm.set_precision(attn::Precision::BFloat16);
    if (!stops_given) opt.stop_tokens = eos_ids(ckpt.config());
    std::printf("%s: %s, %lld layers, hidden %lld, vocab %lld, loaded in %.2f s\n", argv[1],
                ckpt.config().value("model_type", std::string("?")).c_str(), (long long)lm.num_layers(),
                (long long)lm.hidden_size(), (long long)lm.vocab_size(), load_s);

    // The first token comes after the prompt's prefill; the rest are decoding steps.
    Clock::time_point first;
    long long n = 0;
    const auto t1 = Clock::now();
    const std::vector<int> out = attn::generate(lm, prompt, opt, [&](attn::Index, int id) {
      if (n++ == 0) first = Clock::now();
      std::printf("%d ", id);
      std::fflush(stdout);
      return true;
    });
    const double total = seconds_since(t1);
    std::printf(
        "\n%zu prompt tokens, %zu new tokens; prefill and first token %.3f s, then %.1f tokens/s on %d threads\n",
        prompt.size(), out.size(), std::chrono::duration<double>(first - t1).count(),
        out.size() > 1 ? double(out.size() - 1) / std::chrono::duration<double>(Clock::now() - first).count() : 0.0,
        attn::num_threads());
    (void)total;
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "generate: %s\n", e.what());
    return 1;
  }
}
