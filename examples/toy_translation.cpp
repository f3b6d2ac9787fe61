// examples/toy_translation.cpp - an encoder-decoder (PyTorch's nn.Transformer, trained by
// tools/train_toy_translation.py to reverse strings) translating with attn, and how much the
// decoder's KV caches save over re-running the decoder on the whole target at every token (what
// PyTorch's nn.Transformer must do).
//
//   build/examples/toy_translation examples/data/toy_translation.safetensors hello attention
//   build/examples/toy_translation examples/data/toy_translation.safetensors --check
//       tests/data/translation/toy_translation_greedy.safetensors   (holds it to PyTorch)
//
// It prints each translation, then the greedy decoding speed of 64 generated tokens (no stop at
// eos) both ways, in tokens/s and as a ratio. --check holds the greedy outputs to PyTorch's token
// for token and the logits to PyTorch's float64 ones (1e-5 relative to their scale), exit 1 if not.
#include "toy_translation.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Tokens per second of `decode` (64 tokens from one source), repeated for about a second.
template <class Decode>
double tokens_per_second(Decode decode) {
  long long tokens = 0;
  const auto t0 = Clock::now();
  do tokens += static_cast<long long>(decode().size());
  while (seconds_since(t0) < 1.0);
  return double(tokens) / seconds_since(t0);
}

std::vector<int> ids_of(const attn::io::SafeTensors& f, const std::string& name) {
  const attn::Matrix<double> m = f.matrix<double>(name);
  return std::vector<int>(m.data(), m.data() + m.size());
}

// The fixture's 8 cases: greedy outputs token for token, float64 logits within 1e-5 of their scale.
int check(const toy_translation::Model& model, const std::string& path) {
  const auto f = attn::io::SafeTensors::open(path);
  const int n = std::stoi(f.metadata().at("count"));
  int failures = 0;
  for (int i = 0; i < n; ++i) {
    const std::string k = std::to_string(i);
    const std::vector<int> src = ids_of(f, "src." + k), want = ids_of(f, "greedy." + k);
    const std::vector<int> cached = model.translate(src, static_cast<attn::Index>(want.size()) + 4);
    const std::vector<int> recomputed = model.translate_recompute(src, static_cast<attn::Index>(want.size()) + 4);
    std::vector<int> teacher = {model.bos()};
    teacher.insert(teacher.end(), want.begin(), want.end() - 1);
    const attn::Matrix<double> expected = f.matrix<double>("logits." + k);
    const attn::Matrix<double> got = model.logits(src, teacher).cast<double>();
    const double scale = std::max(1.0, expected.cwiseAbs().maxCoeff());
    const double err = (got - expected).cwiseAbs().maxCoeff();
    const bool ok = cached == want && recomputed == want && err <= 1e-5 * scale;
    failures += !ok;
    std::printf("%s %-18s -> %-18s logits error %.2e (scale %.1f)%s\n", ok ? "ok  " : "FAIL", model.decode(src).c_str(),
                model.decode(cached).c_str(), err, scale,
                cached == want       ? ""
                : recomputed == want ? " (cached output differs from PyTorch's)"
                                     : " (outputs differ from PyTorch's)");
  }
  std::printf("%d of %d cases match PyTorch\n", n - failures, n);
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::fprintf(stderr, "usage: %s WEIGHTS.safetensors [WORD...] | [--check FIXTURE.safetensors]\n", argv[0]);
    return 2;
  }
  try {
    const auto file = attn::io::SafeTensors::open(argv[1]);
    const toy_translation::Model model(file);
    if (argc == 4 && std::string(argv[2]) == "--check") return check(model, argv[3]);

    std::vector<std::string> words(argv + 2, argv + argc);
    if (words.empty()) words = {"hello", "attention", "transformer", "abcdefghijklmnop"};
    for (const std::string& w : words)
      std::printf("%-18s -> %s\n", w.c_str(), model.decode(model.translate(model.encode(w), 20)).c_str());

    // 64 generated tokens from the longest source, both ways.
    const std::vector<int> src = model.encode(words.back());
    const attn::Index n = 64;
    const double cached = tokens_per_second([&] { return model.translate(src, n, false); });
    const double recompute = tokens_per_second([&] { return model.translate_recompute(src, n, false); });
    std::printf(
        "greedy decoding of %lld tokens on %d threads: %.0f tokens/s with the KV caches, %.0f tokens/s "
        "re-running the decoder over the whole target (PyTorch's way): %.1fx\n",
        (long long)n, attn::num_threads(), cached, recompute, cached / recompute);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "toy_translation: %s\n", e.what());
    return 1;
  }
}
