// tests/gpt_test.cpp - the tiny GPT of examples/ (examples/tiny_gpt.hpp) against PyTorch: greedy
// generation with the KV cache equals PyTorch's token for token on every fixed prompt, and the
// prompt's logits equal PyTorch's float64 logits. tools/train_tiny_gpt.py wrote both files:
// examples/data/tiny_gpt.safetensors (the weights) and tests/data/gpt/tiny_gpt_generations.safetensors
// (PyTorch's generations, computed without a cache: the full forward again at every step).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../examples/tiny_gpt.hpp"
#include "support/test_util.hpp"

#ifndef ATTN_EXAMPLES_DATA_DIR
#error "ATTN_EXAMPLES_DATA_DIR must name examples/data (tests/CMakeLists.txt sets it)"
#endif

namespace {

using attn::Index;

attn::io::SafeTensors weights() { return attn::io::SafeTensors::open(ATTN_EXAMPLES_DATA_DIR "/tiny_gpt.safetensors"); }
attn::io::SafeTensors generations() {
  return attn::io::SafeTensors::open(ATTN_TEST_DATA_DIR "/gpt/tiny_gpt_generations.safetensors");
}

// An I32 vector tensor of the fixture.
std::vector<int> ints(const attn::io::SafeTensors& f, const std::string& name) {
  const auto& info = f.info(name);
  EXPECT_EQ(info.dtype, attn::io::DType::I32) << name;
  std::vector<int> v(static_cast<std::size_t>(info.numel()));
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::int32_t x;
    std::memcpy(&x, f.bytes(name) + 4 * i, 4);  // little-endian, as the format is
    v[i] = x;
  }
  return v;
}

TEST(TinyGpt, GreedyGenerationEqualsPyTorchTokenForToken) {
  const tiny_gpt::Model model(weights());
  const auto fixture = generations();
  const int prompts = std::stoi(fixture.metadata().at("prompts"));
  ASSERT_EQ(prompts, 8);
  for (int threads : {1, 2}) {
    attn::set_num_threads(threads);
    for (int i = 0; i < prompts; ++i) {
      const std::string n = std::to_string(i);
      const std::vector<int> prompt = ints(fixture, "prompt_ids." + n), want = ints(fixture, "generated_ids." + n);
      const std::vector<int> got = model.generate(prompt, model.config().max_seq - Index(prompt.size()));
      EXPECT_EQ(got, want) << model.decode(prompt) << " -> " << model.decode(got) << ", PyTorch "
                           << model.decode(want) << " (threads " << threads << ")";
      EXPECT_EQ(model.decode(got), fixture.metadata().at("generated." + n));
    }
  }
  attn::set_num_threads(0);
}

// The KV cache's storage type (attn/kv_storage.hpp) against the float cache, on the fixture's 8
// prompts and 64 more of the model's two tasks (sorting digits, adding numbers): bf16 and fp16
// caches generate the same tokens on every prompt; int8's count of changed generations is reported
// (rounding a key by up to max|row| / 254 can flip a close argmax), and bounded loosely.
TEST(TinyGpt, CompressedCachesGenerateTheSameTokens) {
  const tiny_gpt::Model model(weights());
  const auto fixture = generations();
  std::vector<std::string> prompts;
  for (int i = 0; i < 8; ++i) prompts.push_back(model.decode(ints(fixture, "prompt_ids." + std::to_string(i))));
  std::mt19937 rng(13);
  const auto digits = [&](int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += char('0' + rng() % 10);
    return s;
  };
  for (int i = 0; i < 32; ++i) prompts.push_back("S" + digits(1 + int(rng() % 9)) + "=");
  for (int i = 0; i < 32; ++i) prompts.push_back(digits(1 + int(rng() % 3)) + "+" + digits(1 + int(rng() % 3)) + "=");
  std::map<attn::KVStorage, int> changed;
  for (const std::string& text : prompts) {
    const std::vector<int> prompt = model.encode(text);
    const Index max_new = model.config().max_seq - Index(prompt.size());
    const std::vector<int> want = model.generate(prompt, max_new);
    for (const attn::KVStorage s : {attn::KVStorage::BFloat16, attn::KVStorage::Float16, attn::KVStorage::Int8}) {
      const std::vector<int> got = model.generate(prompt, max_new, s);
      changed[s] += got != want;
      if (s != attn::KVStorage::Int8) {
        EXPECT_EQ(got, want) << attn::storage_name(s) << ": " << text << " -> " << model.decode(got)
                             << ", float cache " << model.decode(want);
      }
    }
  }
  std::printf("int8 cache: %d of %zu generations differ from the float cache's\n", changed[attn::KVStorage::Int8],
              prompts.size());
  RecordProperty("int8_changed", changed[attn::KVStorage::Int8]);
  EXPECT_LE(changed[attn::KVStorage::Int8], int(prompts.size()) / 4);
}

TEST(TinyGpt, PromptLogitsEqualPyTorch) {
  // The prefill's logits of prompt 0 against PyTorch's float64 forward on the same (float32) weights.
  const tiny_gpt::Model model(weights());
  const auto fixture = generations();
  tiny_gpt::Cache cache = model.make_cache();
  const tiny_gpt::Matrix logits = model.forward(ints(fixture, "prompt_ids.0"), cache);
  const attn::Matrix<double> want = fixture.matrix<double>("logits.0");
  EXPECT_TRUE(attn_test::matrices_near(logits.cast<double>(), want, 1e-5));
}

TEST(TinyGpt, StepByStepEqualsOneCallOverTheWholeSequence) {
  // The generated sequence fed back at once (prefill only) gives the logits the steps gave.
  const tiny_gpt::Model model(weights());
  const std::vector<int> prompt = model.encode("S90817263=");
  std::vector<int> seq = prompt;
  tiny_gpt::Cache steps = model.make_cache();
  tiny_gpt::Matrix logits = model.forward(prompt, steps);
  std::vector<tiny_gpt::Matrix> rows{logits};
  for (int k = 0; k < 6; ++k) {
    Index next;
    logits.row(logits.rows() - 1).maxCoeff(&next);
    seq.push_back(int(next));
    logits = model.forward({int(next)}, steps);
    rows.push_back(logits);
  }
  tiny_gpt::Cache once = model.make_cache();
  const tiny_gpt::Matrix all = model.forward(seq, once);
  Index r = 0;
  for (const tiny_gpt::Matrix& m : rows) {
    EXPECT_TRUE(attn_test::matrices_near(m, all.middleRows(r, m.rows()), 1e-5)) << "rows from " << r;
    r += m.rows();
  }
}

TEST(TinyGpt, RejectsTokensOutsideTheVocabulary) {
  const tiny_gpt::Model model(weights());
  tiny_gpt::Cache cache = model.make_cache();
  EXPECT_THROW(model.forward({3, 99}, cache), std::invalid_argument);
  EXPECT_THROW(model.encode("abc"), std::invalid_argument);
  EXPECT_EQ(cache[0].size(0), 0);
}

}  // namespace
