// fuzz/checkpoint_fuzz.cpp - libFuzzer target: the bytes are a Hugging Face checkpoint directory.
//
// attn/io/checkpoint.hpp promises that Checkpoint::open on any directory either returns a set of
// named tensors consistent with its shards or throws attn::format_error; attn/models/ (load.hpp,
// llama.hpp, gpt2.hpp, bert.hpp, through attn/detail/hf_config.hpp) that a load either returns a
// model matching config.json or throws format_error (a missing or ill-typed field, a missing or
// unexpected tensor), shape_error (a tensor whose shape is not the config's) or argument_error (a
// value a module refuses, such as a RoPE base of 0). So each input is written out as a directory
// and opened, read and loaded every way there is; anything else - a crash, another exception, a
// sanitizer report, a leak, a result that disagrees - aborts.
//
// The input: byte 0 the options (bit 0: T = double, else float; bit 1: LoadOptions::strict =
// false, with a report; bit 2: map_weights = false; bits 3-5 % 5: storage nullopt, Native,
// BFloat16, Float16, Int8; bit 6: max_positions = 3), byte 1 the file that Checkpoint::open also
// reads alone (a name of kNames), then up to kMaxRecords records of files:
//   name  1 byte   kNames[b % 16]: config.json, the index, model.safetensors, three shard names and
//                  odd ones (a trailing space, a backslash, "...", UTF-8, ...); never a '/' or "..",
//                  so nothing is written outside the temporary directory
//   kind  1 byte   b % 6: 0 raw (the payload is the file), 1 config, 2 index, 3 shard (the payload
//                  describes the file; below), 4 a directory, 5 a symbolic link to kNames[payload[0]]
//   size  2 bytes  little-endian, then that many payload bytes (fewer at the end of the input)
// A later record of the same name replaces the file. The described files are built around a plan:
// a small model of one family that the first config record's first 9 payload bytes choose (family,
// vocab 1..8, heads 1..3 and kv heads 1 or all, head_dim 2, 4, 1 or 6, intermediate 1..8, layers
// 1..2, positions 1..12, tie / bias / bare names without "model." / pooler / explicit head_dim /
// n_inner null, RoPE scaling and Mistral's window), or a default Llama without one. Then:
//   config  the plan's config.json, then triples (field, value, arg) overriding fields of every
//           family (and rope_scaling's) with 0, -1, INT_MIN, INT_MAX, 2^31, 2^63-1, 2^64-1, 2.5,
//           1e308, -0.0, "4", true, null, [], {}, 4.0, 1..16, a string of kStrings, or removing it
//   index   parts 1..3 and a kNames entry for each, flags (not an object, no or an array weight_map,
//           metadata, no entries), then triples (op, tensor, arg): leave a tensor out, put it in
//           another part or under any kNames entry, map it to a number or to a name that leaves the
//           directory ("../x", "a/b", "", ".", "..", "/tmp/x"), list a tensor no shard holds
//   shard   part k of n (the plan's tensors i with i % n == k), the dtype (F32, BF16, F16, F64,
//           F8_E4M3, F8_E5M2), the values (a pattern of k/8, NaN and infinities, zeros, 1e30),
//           flags (data not 8-byte aligned, __metadata__, a bad __metadata__, one byte short), then
//           pairs (op, tensor) over the plan's tensors and extras (buffers the loaders ignore, a
//           tied lm_head, a classifier head): drop, add (from another part: a tensor in two shards),
//           a dimension +1 or -1, [r, c] -> [r, c, 1], transposed, a scalar, an empty tensor, an
//           integer or BOOL or other float dtype, renamed without its first "component."
// fuzz/corpus/checkpoint_fuzz/ has a seed of each family, sharded and not.
//
// Each input is written into one temporary directory (mkdtemp under the system's temp directory,
// emptied before each input and removed at exit), then:
//   - Checkpoint::open on it, and on the file byte 1 names, returns or throws format_error; when it
//     returns, names() holds each tensor once, each contains() and lives in the shard shard()
//     names with the same info(), the shards hold no others, data_bytes() is their sum, a tensor
//     that is not there is not contains() and info() refuses it; every float tensor reads as
//     matrix<float> and matrix<double> (the same values), tensor<float>, vector<float> (or
//     format_error), and a 2-D one as weight<T> (with no storage: exactly matrix<T>), any other
//     as weight() only with format_error; a non-float one refuses matrix() and weight();
//   - load_causal_lm, load_encoder, load_llama, load_gpt2, load_bert on it return or throw
//     format_error, shape_error or argument_error; a model that loads has config.json's vocab,
//     hidden size and layers (a report, with strict = false, lists no missing tensor and only
//     tensors that are there), and once the checkpoint is closed (the weights may be views of its
//     mapping) a decoder runs token 0 to logits [1, vocab] and an encoder runs it or refuses it
//     with argument_error or shape_error (RoBERTa's position of a token can be past a small table).
// To keep a load cheap, the fuzzer refuses to load models bigger than a few MB, by the tensors,
// before calling a loader: a checkpoint of more than 2^19 elements; a RoPE table of
// max_position_embeddings x head_dim above 2^16 (the one allocation no tensor backs) loads with
// LoadOptions::max_positions = 4 instead.
// It found five library bugs, fixed in 4c16293 (regressions in models_test's
// Checkpoints.HostileConfigsAndNamesAreFormatErrors): a config's layer count of 2^31 - 1 allocated
// gigabytes; std::filesystem::filesystem_error escaped Checkpoint::open (a loop of links, a shard
// name past NAME_MAX); config.json or an index nested 10^4 deep overflowed the stack; an empty
// config.json was undefined behaviour (memchr on a null pointer).
//
// Built by tools/fuzz.sh with libFuzzer (clang, fuzz/CMakeLists.txt), and by the normal test
// suite as checkpoint_fuzz_replay, which runs the seeds in fuzz/corpus/checkpoint_fuzz/.
#include <stdlib.h>  // mkdtemp
#include <sys/stat.h>

#include <algorithm>
#include <attn/causal_lm.hpp>
#include <attn/error.hpp>
#include <attn/io/checkpoint.hpp>
#include <attn/io/safetensors.hpp>
#include <attn/models/load.hpp>
#include <attn/storage.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
using attn::Index;
using attn::io::Checkpoint;
using attn::io::DType;
using nlohmann::json;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "checkpoint_fuzz: %s\n", what.c_str());
  std::abort();
}

// Runs f, which must return or throw one of the documented errors (format_error, and with
// `shapes` shape_error and argument_error too); returns whether it returned.
template <class F>
bool documented(const char* what, bool shapes, F&& f) {
  try {
    f();
    return true;
  } catch (const attn::format_error&) {
    return false;
  } catch (const attn::shape_error& e) {
    if (!shapes) fail(std::string(what) + " threw shape_error: " + e.what());
    return false;
  } catch (const attn::argument_error& e) {
    if (!shapes) fail(std::string(what) + " threw argument_error: " + e.what());
    return false;
  } catch (const std::exception& e) {
    fail(std::string(what) + " threw an undocumented exception: " + e.what());
  }
}

// The input, front to back; past its end every byte reads 0.
class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size) : p_(data), n_(size) {}
  explicit Reader(const std::string& s) : Reader(reinterpret_cast<const std::uint8_t*>(s.data()), s.size()) {}
  bool done() const { return i_ >= n_; }
  unsigned byte() { return i_ < n_ ? p_[i_++] : 0u; }
  std::size_t u16() {
    const std::size_t lo = byte();
    return lo | (std::size_t(byte()) << 8);
  }
  std::string take(std::size_t n) {
    n = std::min(n, n_ - std::min(i_, n_));
    std::string s(reinterpret_cast<const char*>(p_ + i_), n);
    i_ += n;
    return s;
  }

 private:
  const std::uint8_t* p_;
  std::size_t n_, i_ = 0;
};

// The names a record may write. None holds a '/' or is "." or "..": every file stays in the
// temporary directory (write_files checks it again).
const char* const kNames[] = {"config.json",
                              "model.safetensors.index.json",
                              "model.safetensors",
                              "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors",
                              "model-00001-of-00003.safetensors",
                              "a",
                              "model.safetensors ",
                              ".safetensors",
                              "...",
                              "a\\b.safetensors",
                              "\xc3\xa9.safetensors",
                              "CONFIG.JSON",
                              "model.safetensors.index.json~",
                              "-",
                              "x y.safetensors"};
constexpr std::size_t kNumNames = sizeof(kNames) / sizeof(kNames[0]);
const char* name_of(unsigned b) { return kNames[b % kNumNames]; }

// Shard names an index may hold that are not files of the directory.
const char* const kBadShards[] = {
    "../model.safetensors",   "sub/model.safetensors",           "", ".", "..", "a\\b.safetensors",
    "/tmp/model.safetensors", "model-00009-of-00009.safetensors"};

const char* const kStrings[] = {"silu",   "gelu", "gelu_new", "gelu_pytorch_tanh", "relu",         "tanh",  "linear",
                                "llama3", "yarn", "default",  "absolute",          "relative_key", "llama", "mistral",
                                "qwen2",  "gpt2", "bert",     "roberta",           "xlm-roberta",  ""};

const char* const kFields[] = {"model_type",
                               "vocab_size",
                               "hidden_size",
                               "intermediate_size",
                               "num_hidden_layers",
                               "num_attention_heads",
                               "num_key_value_heads",
                               "head_dim",
                               "max_position_embeddings",
                               "rms_norm_eps",
                               "rope_theta",
                               "tie_word_embeddings",
                               "hidden_act",
                               "attention_bias",
                               "mlp_bias",
                               "use_sliding_window",
                               "sliding_window",
                               "n_embd",
                               "n_layer",
                               "n_head",
                               "n_positions",
                               "n_inner",
                               "layer_norm_epsilon",
                               "activation_function",
                               "scale_attn_weights",
                               "scale_attn_by_inverse_layer_idx",
                               "type_vocab_size",
                               "pad_token_id",
                               "layer_norm_eps",
                               "position_embedding_type",
                               "rope_scaling",
                               "rope_scaling.rope_type",
                               "rope_scaling.type",
                               "rope_scaling.factor",
                               "rope_scaling.low_freq_factor",
                               "rope_scaling.high_freq_factor",
                               "rope_scaling.original_max_position_embeddings"};

// The value a config override writes; nullopt removes the field.
std::optional<json> override_value(unsigned kind, unsigned arg) {
  switch (kind % 20) {
    case 0:
      return json(0);
    case 1:
      return json(-1);
    case 2:
      return json(std::numeric_limits<std::int32_t>::min());
    case 3:
      return json(std::numeric_limits<std::int32_t>::max());
    case 4:
      return json(std::int64_t(1) << 31);
    case 5:
      return json(std::numeric_limits<std::int64_t>::max());
    case 6:
      return json(std::numeric_limits<std::uint64_t>::max());
    case 7:
      return json(2.5);
    case 8:
      return json(1e308);
    case 9:
      return json(-0.0);
    case 10:
      return json("4");
    case 11:
      return json(arg % 2 == 0);
    case 12:
      return json(nullptr);
    case 13:
      return json::array({arg});
    case 14:
      return json::object();
    case 15:
      return json(4.0);
    case 16:
    case 17:
      return json(1 + int(arg % 16));
    case 18:
      return json(kStrings[arg % (sizeof(kStrings) / sizeof(kStrings[0]))]);
    default:
      return std::nullopt;
  }
}

enum Family { Llama, Mistral, Qwen2, Gpt2, Bert, Roberta, XlmRoberta, kFamilies };
const char* const kFamilyNames[] = {"llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "xlm-roberta"};

struct Planned {
  std::string name;
  std::vector<std::int64_t> shape;
};

// A small model of one family: its config.json and the tensors its loader expects, under the
// names attn/models/ documents.
struct Plan {
  int family = Llama;
  Index V = 5, H = 2, KV = 1, D = 2, F = 6, layers = 1, P = 8, E = 4, types = 2;
  bool tie = false, bias = false, mlp_bias = false, bare = false, pooler = false, explicit_head_dim = false;
  bool n_inner_null = false;
  unsigned rope = 0, window = 0;

  bool llama() const { return family == Llama || family == Mistral || family == Qwen2; }
  bool bert() const { return family == Bert || family == Roberta || family == XlmRoberta; }

  static Plan from(Reader& r) {
    Plan p;
    p.family = int(r.byte() % kFamilies);
    p.V = 1 + r.byte() % 8;
    const unsigned h = r.byte();
    p.H = 1 + h % 3;
    p.KV = (h / 3) % 2 ? 1 : p.H;
    const Index dims[] = {2, 4, 1, 6};  // 1: an odd head_dim, which RoPE refuses
    p.D = dims[r.byte() % 4];
    p.F = 1 + r.byte() % 8;
    p.layers = 1 + r.byte() % 2;
    p.P = 1 + r.byte() % 12;
    const unsigned f = r.byte();
    p.tie = f & 1;
    p.bias = f & 2;
    p.mlp_bias = f & 4;
    p.bare = f & 8;
    p.pooler = f & 16;
    p.explicit_head_dim = f & 32;
    p.n_inner_null = f & 64;
    const unsigned g = r.byte();
    p.rope = g % 4;
    p.window = (g / 4) % 4;
    p.types = 1 + (g / 16) % 2;
    p.E = p.H * p.D + (p.llama() && p.explicit_head_dim ? 2 : 0);
    if (p.family == Gpt2 && p.n_inner_null) p.F = 4 * p.E;
    return p;
  }

  json config() const {
    json c = json::object();
    c["model_type"] = kFamilyNames[family];
    c["vocab_size"] = V;
    if (llama()) {
      c["hidden_size"] = E;
      c["intermediate_size"] = F;
      c["num_hidden_layers"] = layers;
      c["num_attention_heads"] = H;
      c["num_key_value_heads"] = KV;
      if (explicit_head_dim) c["head_dim"] = D;
      c["max_position_embeddings"] = P;
      c["rms_norm_eps"] = 1e-6;
      c["rope_theta"] = 10000.0;
      c["tie_word_embeddings"] = tie;
      c["hidden_act"] = "silu";
      if (family == Qwen2) {
        c["use_sliding_window"] = false;
      } else {
        c["attention_bias"] = bias;
        c["mlp_bias"] = mlp_bias;
      }
      if (family == Mistral) c["sliding_window"] = window ? json(window) : json(nullptr);
      if (rope == 1) c["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
      if (rope == 2)
        c["rope_scaling"] = {{"rope_type", "llama3"},
                             {"factor", 8.0},
                             {"low_freq_factor", 1.0},
                             {"high_freq_factor", 4.0},
                             {"original_max_position_embeddings", 4}};
      if (rope == 3) c["rope_scaling"] = {{"rope_type", "default"}};
    } else if (family == Gpt2) {
      c["n_embd"] = E;
      c["n_layer"] = layers;
      c["n_head"] = H;
      c["n_positions"] = P;
      c["n_inner"] = n_inner_null ? json(nullptr) : json(F);
      c["activation_function"] = "gelu_new";
      c["layer_norm_epsilon"] = 1e-5;
      c["tie_word_embeddings"] = tie;
      c["scale_attn_weights"] = !bias;
      c["scale_attn_by_inverse_layer_idx"] = false;
    } else {
      c["hidden_size"] = E;
      c["num_hidden_layers"] = layers;
      c["num_attention_heads"] = H;
      c["intermediate_size"] = F;
      c["max_position_embeddings"] = P;
      c["type_vocab_size"] = types;
      c["pad_token_id"] = family == Bert ? 0 : 1;
      c["layer_norm_eps"] = 1e-12;
      c["hidden_act"] = bias ? "relu" : "gelu";
      c["position_embedding_type"] = "absolute";
    }
    return c;
  }

  std::string prefix() const {
    if (bare) return "";
    return llama() ? "model." : family == Gpt2 ? "transformer." : family == Bert ? "bert." : "roberta.";
  }

  // Every tensor the loader expects, in its order (attn/models/*.hpp).
  std::vector<Planned> tensors() const {
    const std::string p = prefix();
    std::vector<Planned> t;
    const auto add = [&](const std::string& name, std::vector<std::int64_t> shape) {
      t.push_back({name, std::move(shape)});
    };
    if (llama()) {
      const bool qwen = family == Qwen2, qkv_bias = qwen || bias, o_bias = !qwen && bias, mb = !qwen && mlp_bias;
      const auto linear = [&](const std::string& name, Index out, Index in, bool b) {
        add(name + ".weight", {out, in});
        if (b) add(name + ".bias", {out});
      };
      add(p + "embed_tokens.weight", {V, E});
      for (Index i = 0; i < layers; ++i) {
        const std::string l = p + "layers." + std::to_string(i) + ".";
        linear(l + "self_attn.q_proj", H * D, E, qkv_bias);
        linear(l + "self_attn.k_proj", KV * D, E, qkv_bias);
        linear(l + "self_attn.v_proj", KV * D, E, qkv_bias);
        linear(l + "self_attn.o_proj", E, H * D, o_bias);
        linear(l + "mlp.gate_proj", F, E, mb);
        linear(l + "mlp.up_proj", F, E, mb);
        linear(l + "mlp.down_proj", E, F, mb);
        add(l + "input_layernorm.weight", {E});
        add(l + "post_attention_layernorm.weight", {E});
      }
      add(p + "norm.weight", {E});
    } else if (family == Gpt2) {
      const auto conv = [&](const std::string& name, Index in, Index out) {
        add(name + ".weight", {in, out});
        add(name + ".bias", {out});
      };
      const auto norm = [&](const std::string& name) {
        add(name + ".weight", {E});
        add(name + ".bias", {E});
      };
      add(p + "wte.weight", {V, E});
      add(p + "wpe.weight", {P, E});
      for (Index i = 0; i < layers; ++i) {
        const std::string h = p + "h." + std::to_string(i) + ".";
        norm(h + "ln_1");
        conv(h + "attn.c_attn", E, 3 * E);
        conv(h + "attn.c_proj", E, E);
        norm(h + "ln_2");
        conv(h + "mlp.c_fc", E, F);
        conv(h + "mlp.c_proj", F, E);
      }
      norm(p + "ln_f");
    } else {
      const auto linear = [&](const std::string& name, Index out, Index in) {
        add(name + ".weight", {out, in});
        add(name + ".bias", {out});
      };
      const auto norm = [&](const std::string& name) {
        add(name + ".weight", {E});
        add(name + ".bias", {E});
      };
      add(p + "embeddings.word_embeddings.weight", {V, E});
      add(p + "embeddings.position_embeddings.weight", {P, E});
      add(p + "embeddings.token_type_embeddings.weight", {types, E});
      norm(p + "embeddings.LayerNorm");
      for (Index i = 0; i < layers; ++i) {
        const std::string l = p + "encoder.layer." + std::to_string(i) + ".";
        linear(l + "attention.self.query", E, E);
        linear(l + "attention.self.key", E, E);
        linear(l + "attention.self.value", E, E);
        linear(l + "attention.output.dense", E, E);
        norm(l + "attention.output.LayerNorm");
        linear(l + "intermediate.dense", F, E);
        linear(l + "output.dense", E, F);
        norm(l + "output.LayerNorm");
      }
      if (pooler) linear(p + "pooler.dense", E, E);
    }
    if (!bert() && !tie) add("lm_head.weight", {V, E});
    return t;
  }

  // Tensors a checkpoint may hold besides: a buffer the loader ignores, a tied head's copy, a
  // task head (unexpected: strict refuses it).
  std::vector<Planned> extras() const {
    const std::string p = prefix();
    std::vector<Planned> t;
    if (llama()) t.push_back({p + "layers.0.self_attn.rotary_emb.inv_freq", {std::max<Index>(1, D / 2)}});
    if (family == Gpt2) t.push_back({p + "h.0.attn.bias", {1, 1, P, P}});
    if (bert()) t.push_back({p + "embeddings.position_ids", {1, P}});
    t.push_back({"lm_head.weight", {V, E}});
    t.push_back({"classifier.weight", {2, E}});
    return t;
  }
};

// --- the files ------------------------------------------------------------------------------

std::string config_file(const Plan& plan, Reader& r) {
  json c = plan.config();
  while (!r.done()) {
    const std::string field = kFields[r.byte() % (sizeof(kFields) / sizeof(kFields[0]))];
    const unsigned kind = r.byte(), arg = r.byte();
    const std::optional<json> v = override_value(kind, arg);
    json* obj = &c;
    std::string key = field;
    if (field.rfind("rope_scaling.", 0) == 0) {
      if (!c.contains("rope_scaling") || !c["rope_scaling"].is_object()) c["rope_scaling"] = json::object();
      obj = &c["rope_scaling"];
      key = field.substr(std::strlen("rope_scaling."));
    }
    if (v)
      (*obj)[key] = *v;
    else
      obj->erase(key);
  }
  return c.dump(1);
}

std::string index_file(const std::vector<Planned>& all, std::size_t planned, Reader& r) {
  const unsigned parts = 1 + r.byte() % 3;
  std::string part_names[3];
  for (std::string& n : part_names) n = name_of(r.byte());
  const unsigned flags = r.byte();
  json map = json::object();
  if (!(flags & 16))
    for (std::size_t i = 0; i < planned; ++i) map[all[i].name] = part_names[i % parts];
  while (!r.done()) {
    const unsigned op = r.byte() % 6;
    const std::string& name = all[r.byte() % all.size()].name;
    const unsigned arg = r.byte();
    switch (op) {
      case 0:
        map.erase(name);
        break;
      case 1:
        map[name] = part_names[arg % 3];
        break;
      case 2:
        map[name] = arg;
        break;
      case 3:
        map[name] = kBadShards[arg % (sizeof(kBadShards) / sizeof(kBadShards[0]))];
        break;
      case 4:
        map["ghost." + std::to_string(arg % 4) + ".weight"] = part_names[arg % 3];
        break;
      default:
        map[name] = name_of(arg);
        break;
    }
  }
  json index = json::object();
  if (flags & 8) index["metadata"] = {{"total_size", 1234}};
  if (!(flags & 2)) index["weight_map"] = flags & 4 ? json::array({map}) : map;
  if (flags & 1) index = json::array({index});
  return index.dump(1);
}

// An IEEE half's bits for f (exact for the k/8 values written here; infinity beyond 65504).
std::uint16_t half_bits(float f) {
  std::uint32_t x = 0;
  std::memcpy(&x, &f, sizeof x);
  const unsigned sign = (x >> 16) & 0x8000u;
  if (std::isnan(f)) return static_cast<std::uint16_t>(sign | 0x7e00u);
  const float a = std::fabs(f);
  if (a >= 65520.0f) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (a < 6.103515625e-05f) return static_cast<std::uint16_t>(sign);
  int e = 0;
  const float m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1): half exponent e + 14
  const auto frac = static_cast<unsigned>(std::lround((2.0f * m - 1.0f) * 1024.0f));
  return static_cast<std::uint16_t>(sign | ((static_cast<unsigned>(e + 14) << 10) + frac));
}

struct Entry {
  std::size_t id;  // in plan.tensors() ++ plan.extras()
  std::string name;
  std::vector<std::int64_t> shape;
  DType dtype;
};

std::string shard_file(const std::vector<Planned>& all, std::size_t planned, Reader& r) {
  const unsigned b0 = r.byte(), parts = 1 + b0 % 3, part = (b0 / 3) % parts;
  const DType floats[] = {DType::F32, DType::BF16, DType::F16, DType::F64, DType::F8_E4M3, DType::F8_E5M2};
  const DType dtype = floats[r.byte() % 6];
  const unsigned values = r.byte() % 4, flags = r.byte();
  std::vector<Entry> entries;
  for (std::size_t i = part; i < planned; i += parts) entries.push_back({i, all[i].name, all[i].shape, dtype});
  while (!r.done()) {
    const unsigned op = r.byte() % 12;
    const std::size_t id = r.byte() % all.size();
    const auto it = std::find_if(entries.begin(), entries.end(), [&](const Entry& e) { return e.id == id; });
    if (op == 1) {
      if (it == entries.end()) entries.push_back({id, all[id].name, all[id].shape, dtype});
      continue;
    }
    if (it == entries.end()) continue;
    std::vector<std::int64_t>& s = it->shape;
    switch (op) {
      case 0:
        entries.erase(it);
        break;
      case 2:
        if (!s.empty()) s.front() += 1;
        break;
      case 3:
        if (!s.empty()) s.back() -= 1;
        break;
      case 4:
        s.push_back(1);
        break;
      case 5:
        std::reverse(s.begin(), s.end());
        break;
      case 6:
        s.clear();
        break;
      case 7:
        if (!s.empty()) s.front() = 0;
        break;
      case 8:
        it->dtype = DType::I32;
        break;
      case 9:
        it->dtype = DType::BOOL;
        break;
      case 10:
        it->dtype = dtype == DType::F32 ? DType::BF16 : DType::F32;
        break;
      default: {
        const std::size_t dot = it->name.find('.');
        if (dot != std::string::npos) it->name.erase(0, dot + 1);
        break;
      }
    }
  }

  json header = json::object();
  std::string data;
  for (const Entry& e : entries) {
    std::int64_t n = 1;
    for (const std::int64_t d : e.shape) n *= std::max<std::int64_t>(d, 0);
    const std::size_t size = attn::io::dtype_size(e.dtype);
    const std::size_t begin = data.size();
    for (std::int64_t i = 0; i < n; ++i) {
      float v = static_cast<float>(static_cast<int>((i * 7 + std::int64_t(e.id)) % 17) - 8) / 8.0f;
      if (values == 1 && i == 0) v = e.id % 2 ? std::numeric_limits<float>::quiet_NaN() : -INFINITY;
      if (values == 2) v = 0.0f;
      if (values == 3) v *= 1e30f;
      unsigned char b[8] = {};
      switch (e.dtype) {
        case DType::F32:
          std::memcpy(b, &v, 4);
          break;
        case DType::F64: {
          const double d = v;
          std::memcpy(b, &d, 8);
          break;
        }
        case DType::BF16: {
          std::uint32_t x = 0;
          std::memcpy(&x, &v, 4);
          const auto hi = static_cast<std::uint16_t>(x >> 16);
          std::memcpy(b, &hi, 2);
          break;
        }
        case DType::F16: {
          const std::uint16_t h = half_bits(v);
          std::memcpy(b, &h, 2);
          break;
        }
        case DType::BOOL:
          b[0] = static_cast<unsigned char>(i % 2);
          break;
        default:  // I32, F8: any bits
          b[0] = static_cast<unsigned char>(i * 37 + std::int64_t(e.id));
          break;
      }
      data.append(reinterpret_cast<const char*>(b), size);
    }
    header[e.name] = {{"dtype", attn::io::dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {std::uint64_t(begin), std::uint64_t(data.size())}}};
  }
  if (flags & 2) header["__metadata__"] = {{"format", "pt"}};
  if (flags & 4) header["__metadata__"] = {{"format", 1}};
  std::string text = header.dump();
  // Spaces to an 8-byte aligned data section, as writers do; or 2 bytes off it.
  while (text.size() % 8 != (flags & 1 ? 2u : 0u)) text += ' ';
  std::string file(8, '\0');
  for (int k = 0; k < 8; ++k) file[std::size_t(k)] = static_cast<char>((std::uint64_t(text.size()) >> (8 * k)) & 0xff);
  file += text;
  file += data;
  if ((flags & 8) && !file.empty()) file.pop_back();
  return file;
}

// --- the directory --------------------------------------------------------------------------

const fs::path& temp_dir() {
  static const fs::path dir = [] {
    std::string pattern = (fs::temp_directory_path() / "attn_checkpoint_fuzz_XXXXXX").string();
    if (!::mkdtemp(pattern.data())) fail("mkdtemp failed");
    return fs::path(pattern);
  }();
  static const bool registered = [] {
    std::atexit([] {
      std::error_code ignored;
      fs::remove_all(temp_dir(), ignored);
    });
    return true;
  }();
  (void)registered;
  return dir;
}

void clear(const fs::path& dir) {
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(dir)) entries.push_back(e.path());
  for (const fs::path& p : entries) fs::remove_all(p);
}

void write_bytes(const fs::path& file, const std::string& bytes) {
  std::FILE* f = std::fopen(file.c_str(), "wb");
  if (!f) fail("cannot write " + file.string());
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) fail("short write");
  std::fclose(f);
}

struct Record {
  std::string name;
  unsigned kind;
  std::string payload;
};

void write_files(const fs::path& dir, const std::vector<Record>& records) {
  // The plan: the first config record's, else a default Llama.
  Plan plan;
  for (const Record& r : records)
    if (r.kind == 1) {
      Reader p(r.payload);
      plan = Plan::from(p);
      break;
    }
  std::vector<Planned> all = plan.tensors();
  const std::size_t planned = all.size();
  for (Planned& e : plan.extras()) all.push_back(std::move(e));

  for (const Record& r : records) {
    if (r.name.empty() || r.name.find('/') != std::string::npos || r.name == "." || r.name == "..")
      fail("a record names a file outside the directory");
    const fs::path file = dir / r.name;
    std::error_code ignored;
    fs::remove_all(file, ignored);
    Reader p(r.payload);
    switch (r.kind) {
      case 0:
        write_bytes(file, r.payload);
        break;
      case 1: {
        Plan skip;  // the plan's bytes, read again to reach the overrides
        skip = Plan::from(p);
        (void)skip;
        write_bytes(file, config_file(plan, p));
        break;
      }
      case 2:
        write_bytes(file, index_file(all, planned, p));
        break;
      case 3:
        write_bytes(file, shard_file(all, planned, p));
        break;
      case 4:
        fs::create_directory(file);
        break;
      default:
        fs::create_symlink(name_of(p.byte()), file);
        break;
    }
  }
}

// --- the checks -----------------------------------------------------------------------------

template <class A, class B>
bool same_values(const A* a, const B* b, Index n) {
  for (Index i = 0; i < n; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!(x == y || (x != x && y != y))) return false;
  }
  return true;
}

void require(bool ok, const std::string& name, const char* what) {
  if (!ok) fail("tensor \"" + name + "\": " + what);
}

struct Options {
  bool dbl = false, strict = true, map = true;
  std::optional<attn::Storage> storage;
  Index max_positions = 0;
};

// Reads tensor `name` every way Checkpoint offers.
template <class T>
void touch(const Checkpoint& ck, const std::string& name, const Options& o) {
  const attn::io::TensorInfo& t = ck.info(name);
  const Index rows = t.rows(), cols = t.cols();
  if (!attn::io::is_floating(t.dtype)) {
    require(!documented("matrix", false, [&] { (void)ck.matrix<float>(name); }), name, "matrix() read a non-float");
    require(!documented("weight", false, [&] { (void)ck.weight<T>(name); }), name, "weight() read a non-float");
    return;
  }
  const attn::Matrix<float> f = ck.matrix<float>(name);
  const attn::Matrix<double> d = ck.matrix<double>(name);
  require(f.rows() == rows && f.cols() == cols && d.rows() == rows && d.cols() == cols, name,
          "matrix() has the wrong shape");
  const attn::Matrix<float> d_as_float = d.cast<float>();
  require(same_values(f.data(), d_as_float.data(), f.size()), name, "matrix<float> and matrix<double> differ");
  const attn::io::Tensor<float> tf = ck.tensor<float>(name);
  require(tf.shape() == t.shape && same_values(tf.data(), f.data(), f.size()), name, "tensor() differs from matrix()");
  attn::Vector<float> v;
  if (documented("vector", false, [&] { v = ck.vector<float>(name); }))
    require(v.size() == f.size() && same_values(v.data(), f.data(), f.size()), name, "vector() differs from matrix()");
  if (t.shape.size() != 2) {
    require(!documented("weight", false, [&] { (void)ck.weight<T>(name, o.storage, o.map); }), name,
            "weight() took a tensor that is not 2-D");
    return;
  }
  // With a storage, a value it cannot hold (int8 needs finite rows) is an argument_error.
  std::optional<attn::Weight<T>> stored;
  if (!documented("weight", o.storage.has_value(), [&] { stored.emplace(ck.weight<T>(name, o.storage, o.map)); }))
    require(o.storage.has_value(), name, "weight() refused a 2-D float tensor");
  if (!stored) return;
  const attn::Weight<T>& w = *stored;
  require(w.rows() == rows && w.cols() == cols, name, "weight() has the wrong shape");
  if (!o.storage) {
    const attn::Matrix<T> m = w.matrix(), want = ck.matrix<T>(name);
    require(same_values(m.data(), want.data(), m.size()), name, "weight() differs from matrix()");
  }
}

template <class T>
void check_checkpoint(const Checkpoint& ck, const Options& o) {
  std::size_t held = 0;
  for (const attn::io::SafeTensors& st : ck.shards()) held += st.names().size();
  if (held != ck.names().size()) fail("names() has not the shards' tensors");
  std::set<std::string> seen;
  std::uint64_t bytes = 0;
  for (const std::string& name : ck.names()) {
    if (!seen.insert(name).second) fail("names() lists \"" + name + "\" twice");
    if (!ck.contains(name)) fail("names() lists \"" + name + "\", which contains() denies");
    const attn::io::SafeTensors& st = ck.shard(name);
    require(st.contains(name), name, "is not in the shard shard() names");
    const attn::io::TensorInfo &a = ck.info(name), &b = st.info(name);
    require(a.dtype == b.dtype && a.shape == b.shape && a.begin == b.begin && a.end == b.end, name,
            "info() differs from its shard's");
    bytes += a.end - a.begin;
    touch<T>(ck, name, o);
  }
  if (bytes != ck.data_bytes()) fail("data_bytes() is not the sum of the tensors' bytes");
  const std::string absent = "\x01 no such tensor";
  if (ck.contains(absent)) fail("contains() found a tensor that is not there");
  if (documented("info", false, [&] { (void)ck.info(absent); })) fail("info() found a tensor that is not there");
}

// An integer field of config.json, if it is one.
std::optional<std::int64_t> integer(const json& c, const char* key) {
  if (!c.is_object() || !c.contains(key)) return std::nullopt;
  const json& v = c[key];
  if (v.is_number_unsigned()) return std::int64_t(std::min<std::uint64_t>(v.get<std::uint64_t>(), INT64_MAX));
  if (v.is_number_integer()) return v.get<std::int64_t>();
  return std::nullopt;
}

// Whether the loaders may run on this checkpoint, and the max_positions to give them (the
// header comment: at most a few MB of model).
bool cheap_enough(const Checkpoint& ck, Index& max_positions) {
  const json& c = ck.config();
  std::int64_t elements = 0;
  for (const std::string& name : ck.names()) elements += ck.info(name).numel();
  if (elements > (1 << 19)) return false;
  // The RoPE table: max_positions x head_dim, whatever the tensors hold.
  const auto P = integer(c, "max_position_embeddings"), D = integer(c, "head_dim"), E = integer(c, "hidden_size"),
             H = integer(c, "num_attention_heads");
  const std::int64_t positions = max_positions > 0 ? max_positions : P ? *P : 2048;
  std::int64_t dim = 1;
  if (D)
    dim = *D;
  else if (E && H && *H > 0)
    dim = *E / *H;
  if (positions > 0 && dim > 0 && (positions > (1 << 16) || dim > (1 << 16) || positions * dim > (1 << 16)))
    max_positions = 4;
  return true;
}

int config_int(const json& c, const char* key) {
  const auto v = integer(c, key);
  return v ? static_cast<int>(*v) : -1;
}

// gpt2: the model is GPT-2's, whose config names its sizes n_embd and n_layer.
template <class T>
void check_lm(const attn::CausalLM<T>& lm, const json& c, bool gpt2, const char* what) {
  if (lm.vocab_size() != config_int(c, "vocab_size") ||
      lm.hidden_size() != config_int(c, gpt2 ? "n_embd" : "hidden_size") ||
      lm.num_layers() != config_int(c, gpt2 ? "n_layer" : "num_hidden_layers"))
    fail(std::string(what) + " built a model that is not config.json's");
}

void check_report(const attn::io::LoadResult& report, const Checkpoint& ck, const char* what) {
  if (!report.missing_keys.empty()) fail(std::string(what) + " returned with missing tensors");
  for (const std::string& name : report.unexpected_keys)
    if (!ck.contains(name)) fail(std::string(what) + " reports an unexpected tensor that is not there: " + name);
}

template <class F>
bool open_documented(F&& f) {
  return documented("Checkpoint::open", false, f);
}

template <class T>
void run(const fs::path& dir, const fs::path& single, const Options& o) {
  std::vector<attn::CausalLM<T>> decoders;
  std::vector<attn::models::BertModel<T>> encoders;
  {
    std::optional<Checkpoint> alone;
    if (open_documented([&] { alone.emplace(Checkpoint::open(single)); })) check_checkpoint<T>(*alone, o);

    std::optional<Checkpoint> ck;
    if (!open_documented([&] { ck.emplace(Checkpoint::open(dir)); })) return;
    check_checkpoint<T>(*ck, o);
    attn::models::LoadOptions opt;
    opt.strict = o.strict;
    opt.storage = o.storage;
    opt.map_weights = o.map;
    opt.max_positions = o.max_positions;
    if (!cheap_enough(*ck, opt.max_positions)) return;
    attn::io::LoadResult report;
    if (!o.strict) opt.report = &report;
    const json& c = ck->config();

    const bool gpt2_type = c.contains("model_type") && c["model_type"] == "gpt2";
    const auto decoder = [&](const char* what, bool gpt2, auto load) {
      report = {};
      if (!documented(what, true, [&] { decoders.push_back(load()); })) return;
      check_lm(decoders.back(), c, gpt2, what);
      check_report(report, *ck, what);
    };
    decoder("load_causal_lm", gpt2_type, [&] { return attn::models::load_causal_lm<T>(*ck, opt); });
    decoder("load_llama", false, [&] { return attn::models::load_llama<T>(*ck, opt); });
    decoder("load_gpt2", true, [&] { return attn::models::load_gpt2<T>(*ck, opt); });
    const auto encoder = [&](const char* what, auto load) {
      report = {};
      if (!documented(what, true, [&] { encoders.push_back(load()); })) return;
      if (encoders.back().hidden_size() != config_int(c, "hidden_size") ||
          encoders.back().encoder().num_layers() != config_int(c, "num_hidden_layers"))
        fail(std::string(what) + " built a model that is not config.json's");
      check_report(report, *ck, what);
    };
    encoder("load_encoder", [&] { return attn::models::load_encoder<T>(*ck, opt); });
    encoder("load_bert", [&] { return attn::models::load_bert<T>(*ck, opt); });
  }
  // The checkpoint is closed: a weight viewing its mapping must keep it alive.
  for (const attn::CausalLM<T>& lm : decoders) {
    attn::Matrix<T> logits;
    try {
      logits = lm.forward({0}, attn::LogitRows::Last);
    } catch (const std::exception& e) {
      fail(std::string("a loaded decoder cannot run token 0: ") + e.what());
    }
    if (logits.rows() != 1 || logits.cols() != lm.vocab_size()) fail("a decoder's logits have the wrong shape");
  }
  for (const attn::models::BertModel<T>& m : encoders) {
    typename attn::models::BertModel<T>::Output out;
    if (!documented("BertModel::forward", true, [&] { out = m.forward({0}, 1); })) continue;
    if (out.last_hidden_state.rows() != 1 || out.last_hidden_state.cols() != m.hidden_size() ||
        (m.pooler() ? out.pooler_output.rows() != 1 : out.pooler_output.size() != 0))
      fail("an encoder's output has the wrong shape");
  }
}

constexpr std::size_t kMaxRecords = 8;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader r(data, size);
  const unsigned options = r.byte();
  Options o;
  o.dbl = options & 1;
  o.strict = !(options & 2);
  o.map = !(options & 4);
  const unsigned s = (options >> 3) % 5;
  if (s > 0) o.storage = static_cast<attn::Storage>(s - 1);
  o.max_positions = options & 64 ? 3 : 0;
  const char* single = name_of(r.byte());
  std::vector<Record> records;
  while (!r.done() && records.size() < kMaxRecords) {
    Record rec;
    rec.name = name_of(r.byte());
    rec.kind = r.byte() % 6;
    rec.payload = r.take(r.u16());
    records.push_back(std::move(rec));
  }

  const fs::path& dir = temp_dir();
  try {
    clear(dir);
    write_files(dir, records);
  } catch (const std::exception& e) {
    fail(std::string("cannot write the directory: ") + e.what());
  }
  if (o.dbl)
    run<double>(dir, dir / single, o);
  else
    run<float>(dir, dir / single, o);
  return 0;
}
