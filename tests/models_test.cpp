// tests/models_test.cpp - attn/models/ (load_llama, load_gpt2, load_bert, load_causal_lm,
// load_encoder) against Hugging Face checkpoints of every family with their expected outputs.
//
// tools/gen_hf_fixtures.py writes tests/data/hf/<case>/ (config.json and the weights in HF's own
// layout and names: one file or two shards with an index, F32 or BF16) and
// tests/data/hf/<case>_expected.safetensors: logits and greedy continuations of three prompts for
// the decoders, last_hidden_state, pooler_output and sentence embeddings of a padded batch for the
// encoders, all computed in float64 by forwards written from transformers' modeling files (the
// script names them), never by attn. Tolerance: attn_test::tolerance<T>() (1e-5 float, 1e-10
// double) relative to the expected tensor's scale; greedy continuations token for token.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "attn/attn.hpp"
#include "attn/generate.hpp"
#include "attn/io/checkpoint.hpp"
#include "attn/io/safetensors.hpp"
#include "attn/models/load.hpp"
#include "support/temp_files.hpp"
#include "support/test_util.hpp"

namespace {

namespace fs = std::filesystem;
using attn::Index;
using attn_test::matrices_near;
using attn_test::tolerance;

fs::path hf(const std::string& name) { return fs::path(ATTN_TEST_DATA_DIR) / "hf" / name; }

attn::io::SafeTensors expected(const std::string& name) {
  return attn::io::SafeTensors::open(hf(name + "_expected.safetensors"));
}

std::vector<int> ids(const attn::io::SafeTensors& e, const std::string& name) {
  const attn::Matrix<double> m = e.matrix<double>(name);
  std::vector<int> v;
  for (Index i = 0; i < m.size(); ++i) v.push_back(static_cast<int>(m.data()[i]));
  return v;
}

template <class T>
class Decoders : public ::testing::Test {};
TYPED_TEST_SUITE(Decoders, attn_test::Scalars, attn_test::ScalarName);

const char* const kDecoders[] = {"gpt2", "llama3", "llama_linear", "mistral", "qwen2"};

// The logits of each prompt, without a cache and through one (prefill then a token at a time).
TYPED_TEST(Decoders, LogitsMatchTheFixture) {
  using T = TypeParam;
  for (const char* name : kDecoders) {
    SCOPED_TRACE(name);
    const attn::CausalLM<T> lm = attn::models::load_causal_lm<T>(hf(name));
    const auto e = expected(name);
    for (int i = 0; i < 3; ++i) {
      const std::vector<int> prompt = ids(e, "input_ids." + std::to_string(i));
      const attn::Matrix<double> want = e.matrix<double>("logits." + std::to_string(i));
      EXPECT_TRUE(matrices_near(lm.forward(prompt), want, tolerance<T>()));
      // Prefill half, then the rest one token at a time: the same rows.
      auto cache = lm.make_cache(1);
      const Index half = static_cast<Index>(prompt.size()) / 2 + 1;
      attn::Matrix<T> got(want.rows(), want.cols());
      got.topRows(half) = lm.forward(std::vector<int>(prompt.begin(), prompt.begin() + half), cache, 0);
      for (Index r = half; r < Index(prompt.size()); ++r) got.row(r) = lm.forward({prompt[std::size_t(r)]}, cache, 0);
      EXPECT_TRUE(matrices_near(got, want, tolerance<T>()));
      const attn::Matrix<T> last = lm.forward(prompt, attn::LogitRows::Last);
      EXPECT_TRUE(matrices_near(last, want.bottomRows(1), tolerance<T>()));
    }
  }
}

// Greedy generation over the caches, each prompt alone and the three as one batch of different
// lengths: the fixture's continuations token for token.
TYPED_TEST(Decoders, GreedyContinuationsMatchTheFixture) {
  using T = TypeParam;
  for (const char* name : kDecoders) {
    SCOPED_TRACE(name);
    const attn::CausalLM<T> lm = attn::models::load_causal_lm<T>(hf(name));
    const auto e = expected(name);
    attn::GenerationOptions opt;
    opt.max_new_tokens = 8;
    std::vector<std::vector<int>> prompts, want;
    for (int i = 0; i < 3; ++i) {
      prompts.push_back(ids(e, "input_ids." + std::to_string(i)));
      want.push_back(ids(e, "greedy." + std::to_string(i)));
      EXPECT_EQ(attn::generate(lm, prompts.back(), opt), want.back()) << "prompt " << i;
    }
    EXPECT_EQ(attn::generate(lm, prompts, opt), want);
  }
}

// The weights stay in the type the file stores them unless asked: BF16 as bf16, F32 in float; views
// of the mapping, or the model's own copies without map_weights; LoadOptions::storage converts.
TEST(Models, WeightsStayAsStored) {
  const attn::CausalLM<float> bf16 = attn::models::load_causal_lm<float>(hf("llama3"));
  const attn::Linear<float>& q = bf16.layer(0).self_attn().q_proj();
  EXPECT_EQ(q.storage(), attn::Storage::BFloat16);
  EXPECT_TRUE(q.stored_weight().is_view());
  EXPECT_EQ(bf16.embed_tokens().storage(), attn::Storage::BFloat16);
  EXPECT_TRUE(bf16.embed_tokens().stored_weight().is_view());
  ASSERT_NE(bf16.lm_head(), nullptr);
  EXPECT_EQ(bf16.lm_head()->storage(), attn::Storage::BFloat16);

  attn::models::LoadOptions copied;
  copied.map_weights = false;
  const attn::CausalLM<float> owned = attn::models::load_causal_lm<float>(hf("llama3"), copied);
  EXPECT_EQ(owned.layer(0).self_attn().q_proj().storage(), attn::Storage::BFloat16);
  EXPECT_FALSE(owned.layer(0).self_attn().q_proj().stored_weight().is_view());
  EXPECT_FALSE(owned.embed_tokens().stored_weight().is_view());
  EXPECT_EQ(owned.forward({3, 1, 4}), bf16.forward({3, 1, 4}));  // the same bits either way

  const attn::CausalLM<float> f32 = attn::models::load_causal_lm<float>(hf("qwen2"));
  EXPECT_EQ(f32.layer(1).self_attn().k_proj().storage(), attn::Storage::Native);
  EXPECT_TRUE(f32.layer(1).self_attn().k_proj().stored_weight().is_view());
  EXPECT_TRUE(f32.tied());

  attn::models::LoadOptions opt;
  opt.storage = attn::Storage::Native;
  const attn::CausalLM<float> native = attn::models::load_causal_lm<float>(hf("llama3"), opt);
  EXPECT_EQ(native.layer(0).self_attn().q_proj().storage(), attn::Storage::Native);
  EXPECT_FALSE(native.layer(0).self_attn().q_proj().stored_weight().is_view());
}

TEST(Models, ConfigIsRead) {
  const attn::CausalLM<float> mistral = attn::models::load_causal_lm<float>(hf("mistral"));
  EXPECT_EQ(mistral.layer(0).self_attn().options().window, 5);
  const attn::CausalLM<float> llama = attn::models::load_causal_lm<float>(hf("llama3"));
  EXPECT_EQ(llama.layer(0).self_attn().num_kv_heads(), 2);
  EXPECT_EQ(llama.layer(0).self_attn().options().rope->scaling.type, attn::RopeScalingType::Llama3);
  EXPECT_FALSE(llama.tied());
  const attn::CausalLM<float> gpt2 = attn::models::load_causal_lm<float>(hf("gpt2"));
  EXPECT_TRUE(gpt2.tied());  // GPT-2's config omits tie_word_embeddings: true by default
  EXPECT_NE(gpt2.embed_positions(), nullptr);
  EXPECT_EQ(gpt2.max_positions(), 64);
}

template <class T>
class Encoders : public ::testing::Test {};
TYPED_TEST_SUITE(Encoders, attn_test::Scalars, attn_test::ScalarName);

TYPED_TEST(Encoders, OutputsMatchTheFixture) {
  using T = TypeParam;
  for (const char* name : {"bert", "roberta"}) {
    SCOPED_TRACE(name);
    const attn::models::BertModel<T> model = attn::models::load_encoder<T>(hf(name));
    const auto e = expected(name);
    const Index B = e.info("input_ids").shape[0];
    const std::vector<int> input = ids(e, "input_ids"), mask = ids(e, "attention_mask"),
                           types = ids(e, "token_type_ids");
    const auto out = model.forward(input, B, mask, types);
    EXPECT_TRUE(matrices_near(out.last_hidden_state, e.matrix<double>("last_hidden_state"), tolerance<T>()));
    EXPECT_TRUE(matrices_near(out.pooler_output, e.matrix<double>("pooler_output"), tolerance<T>()));
    EXPECT_TRUE(matrices_near(attn::models::mean_pooling<T>(out.last_hidden_state, mask, B),
                              e.matrix<double>("sentence_embedding"), tolerance<T>()));
  }
}

// --- strictness, prefixes, and what a bad directory says -------------------------------------------

class Checkpoints : public attn_test::TempDirTest {
 protected:
  // A copy of fixture directory `name` in the temp dir.
  fs::path copy(const std::string& name) {
    const fs::path to = dir_ / name;
    fs::copy(hf(name), to, fs::copy_options::recursive);
    return to;
  }
};

TEST_F(Checkpoints, ShardsAndIndexAreOneSetOfTensors) {
  const auto ckpt = attn::io::Checkpoint::open(hf("llama3"));
  EXPECT_EQ(ckpt.shards().size(), 2u);
  EXPECT_TRUE(ckpt.contains("lm_head.weight"));
  EXPECT_TRUE(ckpt.contains("model.embed_tokens.weight"));
  EXPECT_EQ(ckpt.info("model.norm.weight").shape, attn::io::TensorShape{64});
  EXPECT_EQ(ckpt.config()["model_type"], "llama");
  std::uint64_t bytes = 0;
  for (const auto& name : ckpt.names()) bytes += ckpt.info(name).end - ckpt.info(name).begin;
  EXPECT_EQ(bytes, ckpt.data_bytes());
}

TEST_F(Checkpoints, MissingShardIsNamed) {
  const fs::path d = copy("roberta");
  fs::remove(d / "model-00002-of-00002.safetensors");
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::io::Checkpoint::open(d); },
                                                         {"model-00002-of-00002.safetensors", "missing"}));
}

TEST_F(Checkpoints, NoConfigNoWeights) {
  fs::create_directories(dir_ / "empty");
  EXPECT_TRUE(
      attn_test::throws_with<attn::format_error>([&] { attn::io::Checkpoint::open(dir_ / "empty"); }, {"config.json"}));
  std::ofstream(dir_ / "empty" / "config.json") << R"({"model_type": "llama"})";
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::io::Checkpoint::open(dir_ / "empty"); },
                                                         {"model.safetensors"}));
  std::ofstream(dir_ / "empty" / "config.json") << "{not json";
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::io::Checkpoint::open(dir_ / "empty"); },
                                                         {"config.json", "not valid JSON"}));
}

// A FIFO where config.json or a shard should be is refused before anything reads it (it would
// block forever waiting for a writer); a NUL in config.json is invalid JSON. FileAccess::Read holds
// every shard in memory, and the model loads from it the same.
TEST_F(Checkpoints, FifosAreRefusedAndShardsCanBeRead) {
  const fs::path d = copy("llama3");
  const auto read = attn::io::Checkpoint::open(d, attn::io::FileAccess::Read);
  for (const auto& shard : read.shards()) EXPECT_FALSE(shard.mapped());
  EXPECT_EQ(read.matrix<float>("model.norm.weight"), attn::io::Checkpoint::open(d).matrix<float>("model.norm.weight"));
  const auto lm = attn::models::load_causal_lm<float>(read);
  EXPECT_EQ(lm.forward({1, 2, 3}),
            attn::models::load_causal_lm<float>(attn::io::Checkpoint::open(d)).forward({1, 2, 3}));

  const fs::path shard = d / "model-00002-of-00002.safetensors";
  fs::remove(shard);
  ASSERT_EQ(::mkfifo(shard.c_str(), 0600), 0);
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::io::Checkpoint::open(d); },
                                                         {"model-00002-of-00002.safetensors", "FIFO"}));
  fs::remove(d / "config.json");
  ASSERT_EQ(::mkfifo((d / "config.json").c_str(), 0600), 0);
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>(
      [&] { attn::io::Checkpoint::open(d); }, {"config.json", "is a FIFO (named pipe), not a regular file"}));
  fs::remove(d / "config.json");
  std::ofstream(d / "config.json", std::ios::binary) << std::string("{\"model_type\": \"llama\"}\0x", 25);
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>(
      [&] { attn::io::Checkpoint::open(d); }, {"config.json is not valid JSON: it holds a NUL byte at offset 23"}));
}

// Found by checkpoint_fuzz: a config's layer count built a list of every layer's tensors before
// any was checked (2^31 - 1 layers: gigabytes, then std::bad_alloc); a loop of symbolic links
// or a shard name too long for the file system escaped as std::filesystem's exception; a config
// nested 30,000 levels deep overflowed the stack in nlohmann's recursive destructor and dump();
// an empty config.json passed a null pointer to memchr. Each is a format_error now.
TEST_F(Checkpoints, HostileConfigsAndNamesAreFormatErrors) {
  const fs::path d = copy("llama3");
  const auto load = [&] { (void)attn::models::load_causal_lm<float>(d); };
  const auto config_with = [&](const std::string& key, const std::string& value) {
    nlohmann::json config = attn::io::Checkpoint::open(hf("llama3")).config();
    config[key] = 0;  // a placeholder, replaced by `value` as text
    std::string text = config.dump();
    const std::string slot = "\"" + key + "\":0";
    text.replace(text.find(slot), slot.size(), "\"" + key + "\":" + value);
    std::ofstream(d / "config.json", std::ios::binary | std::ios::trunc) << text;
  };
  config_with("num_hidden_layers", "2147483647");
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>(
      load, {"\"num_hidden_layers\" is 2147483647, but the checkpoint holds only", "tensors"}));
  config_with("vocab_size", std::string(30000, '[') + std::string(30000, ']'));
  EXPECT_TRUE(
      attn_test::throws_with<attn::format_error>(load, {"config.json nests arrays and objects deeper than 64"}));
  std::ofstream(d / "config.json", std::ios::trunc).flush();
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>(load, {"config.json is not valid JSON"}));

  fs::remove(d / "config.json");
  fs::create_symlink("config.json", d / "config.json");  // a loop of one link
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>(load, {"config.json cannot be read"}));

  // Found by checkpoint_fuzz's campaign: a null model_type reached json::value() in load_bert,
  // whose type_error escaped. Null reads as absent ("bert"), as every other field.
  // The prefix comes from the config only when no embedding tensor names it: 64 other tensors.
  {
    const fs::path f = dir_ / "null_type";
    fs::create_directories(f);
    nlohmann::json config = attn::io::Checkpoint::open(hf("roberta")).config();
    config["model_type"] = nullptr;
    std::ofstream(f / "config.json") << config.dump();
    attn::io::StateDict<float> others;
    for (int i = 0; i < 64; ++i)
      others.set("x" + std::to_string(i), attn::io::Tensor<float>({1}, attn::Matrix<float>::Zero(1, 1)));
    attn::io::save_safetensors(f / "model.safetensors", others);
    EXPECT_TRUE(attn_test::throws_with<attn::format_error>(
        [&] { (void)attn::models::load_bert<float>(attn::io::Checkpoint::open(f)); }, {"bert.embeddings"}));
  }
  const fs::path e = copy("roberta");
  std::ifstream in(e / "model.safetensors.index.json");
  std::string index((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string shard = "model-00002-of-00002.safetensors";
  for (std::size_t at = index.find(shard); at != std::string::npos; at = index.find(shard))
    index.replace(at, shard.size(), std::string(300, 'x') + ".safetensors");
  std::ofstream(e / "model.safetensors.index.json", std::ios::trunc) << index;
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::io::Checkpoint::open(e); },
                                                         {"cannot be read", "File name too long"}));
}

// An unexpected tensor fails a strict load, naming it; strict = false reports it.
TEST_F(Checkpoints, UnexpectedTensorsAreListed) {
  const fs::path d = copy("qwen2");
  auto sd = attn::io::SafeTensors::open(d / "model.safetensors").state_dict<float>();
  sd.set("classifier.weight", attn::io::Tensor<float>::from_matrix(attn::Matrix<float>::Ones(2, 32)));
  attn::io::save_safetensors(d / "model.safetensors", sd);
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::models::load_causal_lm<float>(d); },
                                                         {"unexpected", "classifier.weight", "strict = false"}));
  attn::io::LoadResult report;
  attn::models::LoadOptions opt;
  opt.strict = false;
  opt.report = &report;
  const attn::CausalLM<float> lm = attn::models::load_causal_lm<float>(d, opt);
  EXPECT_EQ(report.unexpected_keys, std::vector<std::string>{"classifier.weight"});
  EXPECT_TRUE(report.missing_keys.empty());
}

// Tensors under another prefix: every missing one is listed, and the prefix that explains them.
TEST_F(Checkpoints, MissingTensorsNameThePrefixThatExplainsThem) {
  const fs::path d = copy("qwen2");
  const auto st = attn::io::SafeTensors::open(d / "model.safetensors");
  attn::io::StateDict<float> renamed;
  for (const auto& name : st.names()) renamed.set("base." + name, st.tensor<float>(name));
  attn::io::save_safetensors(d / "model.safetensors", renamed);
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>(
      [&] { attn::models::load_causal_lm<float>(d); },
      {"missing tensors", "model.embed_tokens.weight", "under the prefix \"base.model.\""}));
}

TEST_F(Checkpoints, MisshapenTensorIsAShapeError) {
  const fs::path d = copy("gpt2");
  std::string config;
  {
    std::ifstream in(d / "config.json");
    config.assign(std::istreambuf_iterator<char>(in), {});
  }
  config.replace(config.find("\"n_positions\": 64"), 17, "\"n_positions\": 65");
  std::ofstream(d / "config.json") << config;
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>([&] { attn::models::load_causal_lm<float>(d); },
                                                        {"transformer.wpe.weight", "[64, 32]", "[65, 32]"}));
}

TEST_F(Checkpoints, UnknownModelTypeOrRopeIsRefused) {
  const fs::path d = copy("llama_linear");
  std::ofstream(d / "config.json") << R"({"model_type": "falcon"})";
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::models::load_causal_lm<float>(d); },
                                                         {"falcon", "llama, mistral, qwen2, gpt2"}));
  std::ofstream(d / "config.json") << R"({"model_type": "llama", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})";
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::models::load_causal_lm<float>(d); },
                                                         {"yarn", "not supported"}));
  std::ofstream(d / "config.json") << R"({"model_type": "llama", "vocab_size": -3})";
  EXPECT_TRUE(attn_test::throws_with<attn::format_error>([&] { attn::models::load_causal_lm<float>(d); },
                                                         {"vocab_size", "positive integer"}));
}

}  // namespace
