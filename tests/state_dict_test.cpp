// tests/state_dict_test.cpp - attn/io/state_dict.hpp: PyTorch's keys and shapes, strict and
// non-strict loading, the strong guarantee, bit-exact round trips through files, and modules
// loaded from state_dicts PyTorch wrote (tests/data/state_dict/, tools/gen_state_dict_fixtures.py)
// reproducing PyTorch's outputs: 1e-10 in double, 1e-5 in float.
#include "attn/io/state_dict.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "attn/attn.hpp"
#include "attn/io/safetensors.hpp"
#include "support/fixture.hpp"
#include "support/temp_files.hpp"
#include "support/test_util.hpp"

namespace {

namespace fs = std::filesystem;
using attn::Index;
using attn_test::throws_with;
using attn::io::SafeTensors;
using attn::io::StateDict;
using attn::io::Tensor;
using attn::io::TensorShape;

::testing::AssertionResult mentions(const std::string& msg, const std::string& needle) {
  if (msg.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << msg << "\" does not mention \"" << needle << "\"";
}

// Same names in the same order, same shapes, same bytes.
template <class T>
::testing::AssertionResult identical(const StateDict<T>& a, const StateDict<T>& b) {
  if (a.names() != b.names()) return ::testing::AssertionFailure() << "different keys";
  for (const auto& [name, t] : a) {
    const Tensor<T>& u = b.at(name);
    if (t.shape() != u.shape())
      return ::testing::AssertionFailure()
             << name << ": shape " << attn::io::to_string(t.shape()) << " vs " << attn::io::to_string(u.shape());
    if (t.numel() && std::memcmp(t.data(), u.data(), sizeof(T) * static_cast<std::size_t>(t.numel())) != 0)
      return ::testing::AssertionFailure() << name << ": different bytes";
  }
  return ::testing::AssertionSuccess();
}

template <class T>
std::vector<TensorShape> shapes(const StateDict<T>& sd) {
  std::vector<TensorShape> s;
  for (const auto& e : sd) s.push_back(e.second.shape());
  return s;
}

template <class T>
attn::MultiHeadAttention<T> make_mha(std::uint64_t seed, attn::MhaOptions o = {}, Index E = 8, Index H = 2) {
  attn::Generator gen(seed);
  attn::MultiHeadAttention<T> m(E, H, o, gen);
  // PyTorch's init leaves the biases at zero; draw them so that a wrong copy shows.
  if (o.bias) {
    attn::Vector<T> b(3 * E), ob(E);
    attn::init::uniform(b, -1, 1, gen);
    attn::init::uniform(ob, -1, 1, gen);
    m.set_in_proj_bias(b);
    m.out_proj().set_bias(ob);
  }
  return m;
}

attn::MhaOptions bias_kv() {
  attn::MhaOptions o;
  o.add_bias_kv = true;
  return o;
}

template <class T>
class StateDictTest : public attn_test::TempDirTest {};
TYPED_TEST_SUITE(StateDictTest, attn_test::Scalars, attn_test::ScalarName);

// --- keys and shapes ---------------------------------------------------------------------------

TYPED_TEST(StateDictTest, LinearHasPyTorchsKeys) {
  using T = TypeParam;
  attn::Generator gen(1);
  const attn::Linear<T> fc(5, 3, true, gen), no_bias(5, 3, false, gen);
  const StateDict<T> sd = attn::io::state_dict(fc);
  EXPECT_EQ(sd.names(), (std::vector<std::string>{"weight", "bias"}));
  EXPECT_EQ(shapes(sd), (std::vector<TensorShape>{{3, 5}, {3}}));
  EXPECT_EQ(sd.at("weight").matrix(), fc.weight());
  EXPECT_EQ(sd.at("bias").vector(), fc.bias());
  EXPECT_EQ(attn::io::state_dict(no_bias, "head").names(), std::vector<std::string>{"head.weight"});
}

TYPED_TEST(StateDictTest, MultiHeadAttentionHasPyTorchsKeysInItsOrder) {
  using T = TypeParam;
  // nn.MultiheadAttention(8, 2, add_bias_kv=True).state_dict(): own parameters, then out_proj's.
  const auto packed = make_mha<T>(1, bias_kv());
  const StateDict<T> sd = attn::io::state_dict(packed, "attn.");
  EXPECT_EQ(sd.names(), (std::vector<std::string>{"attn.in_proj_weight", "attn.in_proj_bias", "attn.bias_k",
                                                  "attn.bias_v", "attn.out_proj.weight", "attn.out_proj.bias"}));
  EXPECT_EQ(shapes(sd), (std::vector<TensorShape>{{24, 8}, {24}, {1, 1, 8}, {1, 1, 8}, {8, 8}, {8}}));
  EXPECT_EQ(sd.at("attn.bias_v").vector(), packed.bias_v());

  attn::MhaOptions o;
  o.kdim = 5;
  o.vdim = 3;
  const StateDict<T> kv = attn::io::state_dict(make_mha<T>(2, o));
  EXPECT_EQ(kv.names(), (std::vector<std::string>{"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                                  "out_proj.weight", "out_proj.bias"}));
  EXPECT_EQ(shapes(kv), (std::vector<TensorShape>{{8, 8}, {8, 5}, {8, 3}, {24}, {8, 8}, {8}}));

  o = {};
  o.bias = false;
  EXPECT_EQ(attn::io::state_dict(make_mha<T>(3, o)).names(),
            (std::vector<std::string>{"in_proj_weight", "out_proj.weight"}));
}

// --- round trips ------------------------------------------------------------------------------------

TYPED_TEST(StateDictTest, RoundTripThroughAFileIsBitExact) {
  using T = TypeParam;
  attn::MhaOptions o = bias_kv();
  o.batch_first = true;
  const auto src = make_mha<T>(11, o);
  auto dst = make_mha<T>(12, o);  // other values everywhere
  attn::io::save_safetensors(this->path("mha.safetensors"), attn::io::state_dict(src), {{"format", "pt"}});
  const SafeTensors st = SafeTensors::open(this->path("mha.safetensors"));
  const attn::io::LoadResult r = attn::io::load_state_dict(dst, st);
  EXPECT_TRUE(r.missing_keys.empty());
  EXPECT_TRUE(r.unexpected_keys.empty());
  EXPECT_TRUE(identical(attn::io::state_dict(dst), attn::io::state_dict(src)));

  attn::Generator gen(3);
  attn::Matrix<T> x(6, 8);
  attn::init::uniform(x, -1, 1, gen);
  attn::MhaArgs<T> args;
  args.batch = 2;
  const attn::Matrix<T> a = src.forward(x, x, x, args).output, b = dst.forward(x, x, x, args).output;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())), 0);

  // The same from a StateDict, and from the file's own (mapped) StateDict.
  auto dst2 = make_mha<T>(13, o);
  attn::io::load_state_dict(dst2, attn::io::state_dict(src));
  EXPECT_TRUE(identical(attn::io::state_dict(dst2), attn::io::state_dict(src)));
  const StateDict<T> mapped = st.state_dict<T>();
  EXPECT_TRUE(mapped.at("in_proj_weight").is_view());
  auto dst3 = make_mha<T>(14, o);
  attn::io::load_state_dict(dst3, mapped);
  EXPECT_TRUE(identical(attn::io::state_dict(dst3), attn::io::state_dict(src)));

  attn::Generator g(4);
  const attn::Linear<T> fc(4, 6, true, g);
  attn::Linear<T> fc2(4, 6, true, g);
  attn::io::save_safetensors(this->path("fc.safetensors"), attn::io::state_dict(fc, "fc"));
  attn::io::load_state_dict(fc2, SafeTensors::open(this->path("fc.safetensors")), "fc");
  EXPECT_TRUE(identical(attn::io::state_dict(fc2), attn::io::state_dict(fc)));
}

TYPED_TEST(StateDictTest, LoadsAnyFloatDtypeConverted) {
  using T = TypeParam;
  // A double module saved, loaded into T (and a float one into T): converted as a static_cast.
  attn::Generator gen(5);
  const attn::Linear<double> d(3, 2, true, gen);
  const attn::Linear<float> f(3, 2, true, gen);
  attn::io::save_safetensors(this->path("d.safetensors"), attn::io::state_dict(d));
  attn::io::save_safetensors(this->path("f.safetensors"), attn::io::state_dict(f));
  attn::Linear<T> m(3, 2);
  attn::io::load_state_dict(m, SafeTensors::open(this->path("d.safetensors")));
  EXPECT_EQ(m.weight(), d.weight().template cast<T>());
  attn::io::load_state_dict(m, SafeTensors::open(this->path("f.safetensors")));
  EXPECT_EQ(m.bias(), f.bias().template cast<T>());
}

// --- prefixes and strictness -------------------------------------------------------------------------

TYPED_TEST(StateDictTest, PrefixSelectsTheModulesKeys) {
  using T = TypeParam;
  const auto src = make_mha<T>(21);
  StateDict<T> sd = attn::io::state_dict(src, "encoder.attn.");
  sd.set("encoder.norm.weight", Tensor<T>::from_vector(attn::Vector<T>::Ones(8)));   // outside the prefix
  sd.set("encoder.attnx.weight", Tensor<T>::from_vector(attn::Vector<T>::Ones(8)));  // a different module
  for (const char* prefix : {"encoder.attn", "encoder.attn."}) {
    SCOPED_TRACE(prefix);
    auto dst = make_mha<T>(22);
    attn::io::load_state_dict(dst, sd, prefix);  // strict: the other keys are not under the prefix
    EXPECT_TRUE(identical(attn::io::state_dict(dst), attn::io::state_dict(src)));
  }
}

TYPED_TEST(StateDictTest, StrictListsMissingKeysAndChangesNothing) {
  using T = TypeParam;
  auto m = make_mha<T>(31, bias_kv());
  const StateDict<T> before = attn::io::state_dict(m);
  StateDict<T> sd;
  for (const auto& [name, t] : attn::io::state_dict(make_mha<T>(32, bias_kv()), "blk"))
    if (name != "blk.bias_k" && name != "blk.out_proj.bias") sd.set(name, t);
  try {
    attn::io::load_state_dict(m, sd, "blk");
    ADD_FAILURE() << "no error";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "attn::io::load_state_dict(MultiHeadAttention): state dict, prefix \"blk.\""));
    EXPECT_TRUE(mentions(e.what(), "missing keys [\"blk.bias_k\", \"blk.out_proj.bias\"]"));
    EXPECT_FALSE(mentions(e.what(), "unexpected"));
  }
  EXPECT_TRUE(identical(attn::io::state_dict(m), before));
}

TYPED_TEST(StateDictTest, StrictListsUnexpectedKeysAndChangesNothing) {
  using T = TypeParam;
  attn::Generator gen(41);
  attn::Linear<T> fc(4, 2, true, gen);
  const StateDict<T> before = attn::io::state_dict(fc);
  StateDict<T> sd = attn::io::state_dict(attn::Linear<T>(4, 2, true, gen));
  sd.set("weight_scale", Tensor<T>::from_vector(attn::Vector<T>::Ones(1)));
  sd.set("extra.bias", Tensor<T>::from_vector(attn::Vector<T>::Ones(2)));
  try {
    attn::io::load_state_dict(fc, sd);
    ADD_FAILURE() << "no error";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "unexpected keys [\"weight_scale\", \"extra.bias\"]"));
    EXPECT_FALSE(mentions(e.what(), "missing"));
  }
  EXPECT_TRUE(identical(attn::io::state_dict(fc), before));
}

TYPED_TEST(StateDictTest, NonStrictLoadsWhatMatchesAndReportsTheRest) {
  using T = TypeParam;
  auto m = make_mha<T>(51);
  const StateDict<T> before = attn::io::state_dict(m);
  const auto src = make_mha<T>(52);
  StateDict<T> sd;
  sd.set("out_proj.weight", attn::io::state_dict(src).at("out_proj.weight"));
  sd.set("rotary.freq", Tensor<T>::from_vector(attn::Vector<T>::Ones(4)));
  const attn::io::LoadResult r = attn::io::load_state_dict(m, sd, "", /*strict=*/false);
  EXPECT_EQ(r.missing_keys, (std::vector<std::string>{"in_proj_weight", "in_proj_bias", "out_proj.bias"}));
  EXPECT_EQ(r.unexpected_keys, std::vector<std::string>{"rotary.freq"});
  EXPECT_EQ(m.out_proj().weight(), src.out_proj().weight());            // loaded
  EXPECT_EQ(m.in_proj_weight(), before.at("in_proj_weight").matrix());  // left as it was
}

// --- shapes, dtypes, and the strong guarantee --------------------------------------------------------

TYPED_TEST(StateDictTest, WrongShapesNameTheKeyAndBothShapesAndChangeNothing) {
  using T = TypeParam;
  auto m = make_mha<T>(61, bias_kv());
  const StateDict<T> before = attn::io::state_dict(m);
  // Everything right but the last two parameters: a loader that assigned as it went would have
  // changed the module before finding them.
  StateDict<T> sd = attn::io::state_dict(make_mha<T>(62, bias_kv()));
  sd.set("out_proj.weight", Tensor<T>::from_matrix(attn::Matrix<T>::Ones(8, 4)));
  sd.set("out_proj.bias", Tensor<T>({1, 8}, attn::Matrix<T>::Ones(1, 8)));
  try {
    attn::io::load_state_dict(m, sd);
    ADD_FAILURE() << "no error";
  } catch (const attn::shape_error& e) {
    EXPECT_TRUE(mentions(e.what(), "\"out_proj.weight\" has shape [8, 4], the module's is [8, 8]"));
    EXPECT_TRUE(mentions(e.what(), "\"out_proj.bias\" has shape [1, 8], the module's is [8]"));
  }
  EXPECT_TRUE(identical(attn::io::state_dict(m), before));

  // Not strict either: a wrong shape is never skipped.
  EXPECT_THROW(attn::io::load_state_dict(m, sd, "", false), attn::shape_error);
  EXPECT_TRUE(identical(attn::io::state_dict(m), before));
}

TYPED_TEST(StateDictTest, BiasKvLoadsAsOneOneEOrE) {
  using T = TypeParam;
  auto m = make_mha<T>(71, bias_kv());
  StateDict<T> sd = attn::io::state_dict(make_mha<T>(72, bias_kv()));
  const attn::Vector<T> k = attn_test::vec<T>({1, 2, 3, 4, 5, 6, 7, 8});
  sd.set("bias_k", Tensor<T>::from_vector(k));  // [E], as attn's fixtures store it
  attn::io::load_state_dict(m, sd);
  EXPECT_EQ(m.bias_k(), k);
  EXPECT_EQ(attn::io::state_dict(m).at("bias_k").shape(), (TensorShape{1, 1, 8}));  // saved as PyTorch does

  sd.set("bias_k", Tensor<T>({1, 8}, k.transpose()));  // neither
  EXPECT_THROW(attn::io::load_state_dict(m, sd), attn::shape_error);
  EXPECT_EQ(m.bias_k(), k);
}

TYPED_TEST(StateDictTest, NonFloatTensorsAreAFormatErrorAndChangeNothing) {
  using T = TypeParam;
  attn::Generator gen(81);
  attn::Linear<T> fc(2, 1, true, gen);
  const StateDict<T> before = attn::io::state_dict(fc);
  const fs::path p = this->write(R"({"weight":{"dtype":"F64","shape":[1,2],"data_offsets":[0,16]},)"
                                 R"("bias":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}})",
                                 this->doubles({5, 6}) + this->le64(7));
  try {
    attn::io::load_state_dict(fc, SafeTensors::open(p));
    ADD_FAILURE() << "no error";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "tensor \"bias\" has dtype I64, not a floating-point type"));
    EXPECT_TRUE(mentions(e.what(), p.string()));
  }
  EXPECT_TRUE(identical(attn::io::state_dict(fc), before));
}

// --- prefix hints ----------------------------------------------------------------------------------

// A strict load that finds none of its keys says where they are, when they are all somewhere.
TYPED_TEST(StateDictTest, StrictNamesThePrefixThatHoldsTheMissingKeys) {
  using T = TypeParam;
  auto m = make_mha<T>(91);
  const StateDict<T> before = attn::io::state_dict(m);
  // MultiHeadAttention(8, 2) has 4 keys: in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias.
  const StateDict<T> nested = attn::io::state_dict(make_mha<T>(92), "encoder.layers.0.self_attn");
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(m, nested, "encoder"); },
      {"prefix \"encoder.\": missing keys [\"encoder.in_proj_weight\"", "unexpected keys [",
       "; all 4 missing keys exist under prefix \"encoder.layers.0.self_attn.\": pass prefix "
       "\"encoder.layers.0.self_attn\"",
       "(strict = false loads the keys that match)"}));
  EXPECT_TRUE(throws_with<attn::format_error>([&] { attn::io::load_state_dict(m, nested); },
                                              {"all 4 missing keys exist under prefix \"encoder.layers.0.self_attn.\""}));
  // The reverse: keys saved without a prefix, looked for under one.
  const StateDict<T> bare = attn::io::state_dict(make_mha<T>(93));
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(m, bare, "attn"); },
      {"missing keys [\"attn.in_proj_weight\"", "all 4 missing keys exist without the prefix \"attn.\": pass prefix \"\""}));
  // Two modules that could be meant: both named.
  StateDict<T> two = attn::io::state_dict(make_mha<T>(94), "a");
  for (const auto& [k, t] : attn::io::state_dict(make_mha<T>(95), "b")) two.set(k, t);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(m, two); },
      {"all 4 missing keys exist under each of the prefixes \"a.\", \"b.\": pass the one you mean"}));
  EXPECT_TRUE(identical(attn::io::state_dict(m), before));

  // No hint when the keys are not all somewhere else: a module of another configuration.
  const StateDict<T> with_bias_kv = attn::io::state_dict(make_mha<T>(96, bias_kv()), "x");
  auto plain = make_mha<T>(97, bias_kv());
  try {
    attn::io::load_state_dict(plain, attn::io::state_dict(make_mha<T>(98), "x"), "x");
    ADD_FAILURE() << "no error";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "missing keys [\"x.bias_k\", \"x.bias_v\"]"));
    EXPECT_FALSE(mentions(e.what(), "exist"));
  }
  attn::io::load_state_dict(plain, with_bias_kv, "x");
}

// --- hyperparameters in the file's metadata --------------------------------------------------------

// tools/gen_state_dict_fixtures.py: nn.MultiheadAttention(16, 4) exported as a module of its own, so
// its hyperparameters are under the plain names (num_heads "4").
TYPED_TEST(StateDictTest, AFourHeadFileRefusesAnEightHeadModuleAndSaysWhy) {
  using T = TypeParam;
  const SafeTensors st = attn_test::Fixture::load("state_dict/heads4.safetensors").file();
  EXPECT_EQ(st.metadata().at("attn.export_version"), "1");
  EXPECT_EQ(st.metadata().at("num_heads"), "4");
  auto eight = make_mha<T>(101, {}, 16, 8);  // the same shapes: only the metadata tells them apart
  const StateDict<T> before = attn::io::state_dict(eight);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(eight, st); },
      {"attn::io::load_state_dict(MultiHeadAttention): safetensors file ", "heads4.safetensors, prefix \"\": ",
       "metadata says num_heads = 4, the module has 8: build it with 4 heads"}));
  try {
    attn::io::load_state_dict(eight, st);
  } catch (const attn::format_error& e) {
    EXPECT_FALSE(mentions(e.what(), "more")) << "only num_heads differs";
  }
  // Not strict either: a module of other hyperparameters is never half loaded.
  EXPECT_THROW(attn::io::load_state_dict(eight, st, "", /*strict=*/false), attn::format_error);
  EXPECT_TRUE(identical(attn::io::state_dict(eight), before));

  attn::MhaOptions o;
  o.batch_first = true;
  auto batch_first = make_mha<T>(102, o, 16, 4);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(batch_first, st); },
      {"metadata says batch_first = false, the module has true: build it with batch_first = false"}));

  auto four = make_mha<T>(103, {}, 16, 4);
  attn::io::load_state_dict(four, st);  // every hyperparameter agrees
  EXPECT_EQ(four.in_proj_weight(), st.matrix<T>("in_proj_weight"));
}

// The same tensors with no metadata (another writer's file): nothing to check, so both load.
TYPED_TEST(StateDictTest, AFileWithoutMetadataLoadsUnchecked) {
  using T = TypeParam;
  const SafeTensors st = attn_test::Fixture::load("state_dict/heads4_no_metadata.safetensors").file();
  EXPECT_TRUE(st.metadata().empty());
  const SafeTensors with = attn_test::Fixture::load("state_dict/heads4.safetensors").file();
  auto four = make_mha<T>(111, {}, 16, 4), eight = make_mha<T>(112, {}, 16, 8), want = make_mha<T>(113, {}, 16, 4);
  attn::io::load_state_dict(four, st);
  attn::io::load_state_dict(eight, st);  // wrong, and nothing in the file can say so
  attn::io::load_state_dict(want, with);
  EXPECT_TRUE(identical(attn::io::state_dict(four), attn::io::state_dict(want)));
  EXPECT_TRUE(identical(attn::io::state_dict(eight), attn::io::state_dict(want)));
}

// attn's own writer: hyperparameter_metadata() beside state_dict(), under a prefix, checked on load.
TYPED_TEST(StateDictTest, HyperparameterMetadataRoundTripsAndIsChecked) {
  using T = TypeParam;
  attn::MhaOptions o = bias_kv();
  o.kdim = 5;
  const auto src = make_mha<T>(121, o);  // MultiheadAttention(8, 2, add_bias_kv=True, kdim=5)
  const attn::io::Metadata meta = attn::io::hyperparameter_metadata(src, "attn");
  EXPECT_EQ(meta, (attn::io::Metadata{{"attn.embed_dim", "8"},
                                      {"attn.num_heads", "2"},
                                      {"attn.kdim", "5"},
                                      {"attn.vdim", "8"},
                                      {"attn.bias", "true"},
                                      {"attn.add_bias_kv", "true"},
                                      {"attn.add_zero_attn", "false"},
                                      {"attn.batch_first", "false"}}));
  const fs::path p = this->path("mha.safetensors");
  attn::io::save_safetensors(p, attn::io::state_dict(src, "attn"), meta);
  const SafeTensors st = SafeTensors::open(p);
  auto same = make_mha<T>(122, o);
  attn::io::load_state_dict(same, st, "attn");
  EXPECT_TRUE(identical(attn::io::state_dict(same), attn::io::state_dict(src)));

  // Four heads and add_zero_attn: the first named, the others counted.
  o.add_zero_attn = true;
  auto other = make_mha<T>(123, o, 8, 4);
  const StateDict<T> before = attn::io::state_dict(other);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(other, st, "attn"); },
      {"prefix \"attn.\": metadata says attn.num_heads = 2, the module has 4: build it with 2 heads (and 1 more differs)"}));
  EXPECT_TRUE(identical(attn::io::state_dict(other), before));
  // Looked for under the prefix only: with none, the file's keys are not the module's.
  EXPECT_TRUE(throws_with<attn::format_error>([&] { attn::io::load_state_dict(other, st); },
                                              {"missing keys", "under prefix \"attn.\": pass prefix \"attn\""}));
}

// Metadata from other writers: flags as Python prints them, and values that are not what the name
// says are an error naming the key and the value.
TYPED_TEST(StateDictTest, MetadataValuesAreReadStrictly) {
  using T = TypeParam;
  const auto src = make_mha<T>(131);  // MultiheadAttention(8, 2)
  const auto load_with = [&](attn::io::Metadata meta) {
    const fs::path p = this->path("m.safetensors");
    attn::io::save_safetensors(p, attn::io::state_dict(src), meta);
    auto dst = make_mha<T>(132);
    attn::io::load_state_dict(dst, SafeTensors::open(p));
    return attn::io::state_dict(dst);
  };
  EXPECT_TRUE(identical(load_with({{"bias", "True"}, {"batch_first", "False"}, {"num_heads", "2"}, {"format", "pt"}}),
                        attn::io::state_dict(src)));
  EXPECT_TRUE(identical(load_with({{"bias", "1"}, {"add_bias_kv", "0"}}), attn::io::state_dict(src)));
  EXPECT_TRUE(throws_with<attn::format_error>([&] { load_with({{"num_heads", "two"}}); },
                                              {"metadata num_heads = \"two\" is not an integer"}));
  EXPECT_TRUE(throws_with<attn::format_error>([&] { load_with({{"num_heads", "2.0"}}); }, {"is not an integer"}));
  EXPECT_TRUE(throws_with<attn::format_error>([&] { load_with({{"num_heads", "99999999999999999999"}}); },
                                              {"is not an integer"}));
  EXPECT_TRUE(throws_with<attn::format_error>([&] { load_with({{"bias", "yes"}}); },
                                              {"metadata bias = \"yes\" is not a flag (true or false)"}));
  EXPECT_TRUE(throws_with<attn::format_error>([&] { load_with({{"embed_dim", "-8"}}); },
                                              {"metadata says embed_dim = -8, the module has 8"}));
}

// --- PyTorch's own state_dicts --------------------------------------------------------------------

attn::MhaOptions options_of(const attn_test::Fixture& f) {
  attn::MhaOptions o;
  o.kdim = f.meta_int("kdim");
  o.vdim = f.meta_int("vdim");
  o.bias = f.meta_bool("bias");
  o.add_bias_kv = f.meta_bool("add_bias_kv");
  o.add_zero_attn = f.meta_bool("add_zero_attn");
  o.batch_first = f.meta_bool("batch_first");
  return o;
}

TYPED_TEST(StateDictTest, PyTorchMhaWithBiasKvAndALinear) {
  using T = TypeParam;
  const auto f = attn_test::Fixture::load("state_dict/mha_bias_kv.safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  const SafeTensors& st = f.file();
  attn::MultiHeadAttention<T> mha(f.meta_int("embed_dim"), f.meta_int("num_heads"), options_of(f));
  attn::Linear<T> proj(f.meta_int("proj_in_features"), f.meta_int("proj_out_features"));
  attn::io::load_state_dict(mha, st, "attn");  // strict, by PyTorch's keys, bias_k as [1, 1, E]
  attn::io::load_state_dict(proj, st, "proj");
  EXPECT_EQ(st.info("attn.bias_k").shape, (TensorShape{1, 1, 16}));
  if (std::is_same_v<T, float>) {
    EXPECT_TRUE(st.tensor<T>("attn.in_proj_weight").is_view());  // F32: no copy
  }

  const attn::Matrix<T> query = st.matrix<T>("query");
  attn::MhaArgs<T> args;
  args.batch = f.meta_int("batch");
  const attn::Matrix<T> out = mha.forward(query, query, query, args).output;
  EXPECT_TRUE(attn_test::matrices_near(out, st.matrix<double>("attn_output"), attn_test::tolerance<T>()));
  EXPECT_TRUE(attn_test::matrices_near(proj.forward(out), st.matrix<double>("proj_output"), attn_test::tolerance<T>()));

  // Loading the whole file into the module is refused, and says why.
  attn::MultiHeadAttention<T> other(16, 4, options_of(f));
  try {
    attn::io::load_state_dict(other, st);
    ADD_FAILURE() << "no error";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "missing keys [\"in_proj_weight\""));
    EXPECT_TRUE(mentions(e.what(), "\"proj.weight\""));
  }
}

TYPED_TEST(StateDictTest, PyTorchMhaWithKdimVdim) {
  using T = TypeParam;
  const auto f = attn_test::Fixture::load("state_dict/mha_kdim_vdim.safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  const SafeTensors& st = f.file();
  attn::MultiHeadAttention<T> mha(f.meta_int("embed_dim"), f.meta_int("num_heads"), options_of(f));
  ASSERT_FALSE(mha.packed());
  attn::io::load_state_dict(mha, st, "attn");
  attn::MhaArgs<T> args;
  args.batch = f.meta_int("batch");
  const attn::Matrix<T> out =
      mha.forward(st.matrix<T>("query"), st.matrix<T>("key"), st.matrix<T>("value"), args).output;
  EXPECT_TRUE(attn_test::matrices_near(out, st.matrix<double>("attn_output"), attn_test::tolerance<T>()));
}

// PyTorch's F16, BF16 and F32 bytes against the float64 values PyTorch converted them to.
TYPED_TEST(StateDictTest, PyTorchDtypesConvertExactly) {
  using T = TypeParam;
  const SafeTensors st = attn_test::Fixture::load("state_dict/dtypes.safetensors").file();
  for (const std::string name : {"f16", "bf16", "f32"}) {
    SCOPED_TRACE(name);
    const attn::Matrix<T> got = st.matrix<T>(name);
    const attn::Matrix<T> want = st.matrix<double>(name + "_as_f64").template cast<T>();
    ASSERT_EQ(got.size(), 32);
    for (Index i = 0; i < got.size(); ++i) {
      const T g = got.data()[i], w = want.data()[i];
      if (std::isnan(w))
        EXPECT_TRUE(std::isnan(g)) << "element " << i;
      else
        EXPECT_TRUE(g == w && std::signbit(g) == std::signbit(w)) << "element " << i << ": " << g << " != " << w;
    }
  }
}

}  // namespace
