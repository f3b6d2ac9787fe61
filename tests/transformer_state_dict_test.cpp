// tests/transformer_state_dict_test.cpp - attn/io/state_dict.hpp for the transformer modules
// (LayerNorm, FeedForward, TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder):
// PyTorch's keys in PyTorch's order (the order is PyTorch's own, stored in the fixtures' metadata by
// tools/gen_state_dict_fixtures.py), state_dicts PyTorch wrote loaded by name and reproducing
// PyTorch's outputs (1e-10 in double, where the float32 weights convert exactly; 1e-5 in float),
// prefixes, strict and non-strict loading, the strong guarantee over a whole composite, and bit-exact
// round trips through files.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "attn/attn.hpp"
#include "attn/io/safetensors.hpp"
#include "attn/io/state_dict.hpp"
#include "support/fixture.hpp"
#include "support/temp_files.hpp"
#include "support/state_dict_compare.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::io::SafeTensors;
using attn::io::StateDict;
using attn::io::Tensor;
using attn::io::TensorShape;
using attn_test::Fixture;
using attn_test::matrices_near;
using attn_test::throws_with;
using attn_test::tolerance;
using Keys = std::vector<std::string>;

using attn_test::identical;

template <class A, class B>
::testing::AssertionResult same_bytes(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return ::testing::AssertionFailure() << "different shapes";
  if (std::memcmp(a.data(), b.data(), sizeof(*a.data()) * static_cast<std::size_t>(a.size())) != 0)
    return ::testing::AssertionFailure() << "different bytes";
  return ::testing::AssertionSuccess();
}

// "a,b,c" -> {"a", "b", "c"}; "" -> {}.
Keys split(const std::string& s) {
  Keys keys;
  std::size_t begin = 0;
  while (begin < s.size()) {
    const std::size_t end = std::min(s.find(',', begin), s.size());
    keys.push_back(s.substr(begin, end - begin));
    begin = end + 1;
  }
  return keys;
}

Keys prefixed(const std::string& prefix, const Keys& keys) {
  Keys out;
  for (const std::string& k : keys) out.push_back(prefix + k);
  return out;
}

// Every parameter redrawn from U(-1, 1) (PyTorch's init leaves biases at zero and norms at 1/0,
// where a wrong copy would not show), through the library's own state_dict and load.
template <class T, template <class> class Module>
void randomize(Module<T>& m, std::uint64_t seed) {
  attn::Generator gen(seed);
  StateDict<T> sd;
  for (const auto& [key, t] : attn::io::state_dict(m)) {
    attn::Matrix<T> v(t.matrix().rows(), t.matrix().cols());
    attn::init::uniform(v, -1, 1, gen);
    sd.set(key, Tensor<T>(t.shape(), v));
  }
  attn::io::load_state_dict(m, sd);
}

template <class T>
attn::Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  attn::Generator gen(seed);
  attn::Matrix<T> m(rows, cols);
  attn::init::normal(m, 1.0, gen);
  return m;
}

attn::TransformerOptions small_options(bool norm_first = false, bool bias = true) {
  attn::TransformerOptions o;
  o.dim_feedforward = 24;
  o.activation = attn::Activation::GELU;
  o.norm_first = norm_first;
  o.bias = bias;
  return o;
}

template <class T>
attn::TransformerEncoder<T> make_encoder(std::uint64_t seed, bool final_norm = true, bool bias = true) {
  std::optional<attn::LayerNorm<T>> norm;
  if (final_norm) norm.emplace(16, 1e-5, true, bias);
  attn::TransformerEncoder<T> enc(attn::TransformerEncoderLayer<T>(16, 4, small_options(true, bias)), 2, norm);
  randomize(enc, seed);
  return enc;
}

template <class T>
attn::TransformerDecoderLayer<T> make_decoder_layer(std::uint64_t seed) {
  attn::TransformerDecoderLayer<T> dec(16, 2, small_options());
  randomize(dec, seed);
  return dec;
}

// PyTorch's hyperparameters, as the fixtures' metadata names them.
attn::TransformerOptions options_of(const Fixture& f) {
  attn::TransformerOptions o;
  o.dim_feedforward = f.meta_int("dim_feedforward");
  const std::string act = f.meta("activation");
  EXPECT_TRUE(act == "relu" || act == "gelu") << act;
  o.activation = act == "gelu" ? attn::Activation::GELU : attn::Activation::ReLU;
  o.layer_norm_eps = f.meta_double("layer_norm_eps");
  o.batch_first = f.meta_bool("batch_first");
  o.norm_first = f.meta_bool("norm_first");
  return o;
}

template <class T>
attn::TransformerEncoder<T> encoder_of(const Fixture& f) {
  const Index E = f.meta_int("d_model");
  std::optional<attn::LayerNorm<T>> norm;
  if (f.meta_bool("final_norm")) norm.emplace(E, f.meta_double("final_norm_eps"));
  return attn::TransformerEncoder<T>(attn::TransformerEncoderLayer<T>(E, f.meta_int("nhead"), options_of(f)),
                                     f.meta_int("num_layers"), norm);
}

Fixture encoder_fixture() { return Fixture::load("state_dict/transformer_encoder.safetensors"); }
Fixture decoder_fixture() { return Fixture::load("state_dict/transformer_decoder_layer.safetensors"); }

template <class T>
class TransformerStateDictTest : public attn_test::TempDirTest {};
TYPED_TEST_SUITE(TransformerStateDictTest, attn_test::Scalars, attn_test::ScalarName);

// --- keys: PyTorch's, in PyTorch's order -----------------------------------------------------------

TYPED_TEST(TransformerStateDictTest, LayerNormHasPyTorchsKeys) {
  using T = TypeParam;
  const auto sd = attn::io::state_dict(attn::LayerNorm<T>(5));
  EXPECT_EQ(sd.names(), split(encoder_fixture().meta("layer_norm_keys")));  // {"weight", "bias"}
  EXPECT_EQ(sd.at("weight").shape(), (TensorShape{5}));
  EXPECT_EQ(sd.at("bias").shape(), (TensorShape{5}));
  EXPECT_EQ(attn::io::state_dict(attn::LayerNorm<T>(5, 1e-5, true, false), "ln").names(), Keys{"ln.weight"});
  EXPECT_TRUE(attn::io::state_dict(attn::LayerNorm<T>(5, 1e-5, false)).empty());  // elementwise_affine = false
}

TYPED_TEST(TransformerStateDictTest, FeedForwardHasTheLayersLinearKeys) {
  using T = TypeParam;
  // PyTorch's layers hold linear1 and linear2 themselves; FeedForward alone keeps those names.
  Keys torch_linear;
  for (const std::string& k : split(encoder_fixture().meta("encoder_layer_keys")))
    if (k.rfind("linear", 0) == 0) torch_linear.push_back(k);
  const auto sd = attn::io::state_dict(attn::FeedForward<T>(16, 24));
  EXPECT_EQ(sd.names(), torch_linear);
  EXPECT_EQ(sd.names(), (Keys{"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}));
  EXPECT_EQ(sd.at("linear1.weight").shape(), (TensorShape{24, 16}));
  EXPECT_EQ(sd.at("linear2.weight").shape(), (TensorShape{16, 24}));
  EXPECT_EQ(attn::io::state_dict(attn::FeedForward<T>(16, 24, attn::Activation::ReLU, false)).names(),
            (Keys{"linear1.weight", "linear2.weight"}));
}

TYPED_TEST(TransformerStateDictTest, EncoderLayerHasPyTorchsKeysInItsOrder) {
  using T = TypeParam;
  const Fixture f = encoder_fixture();
  const attn::TransformerEncoderLayer<T> layer(16, 4, small_options());
  const auto sd = attn::io::state_dict(layer, "blk");
  EXPECT_EQ(sd.names(), prefixed("blk.", split(f.meta("encoder_layer_keys"))));
  EXPECT_EQ(sd.at("blk.self_attn.in_proj_weight").shape(), (TensorShape{48, 16}));
  EXPECT_EQ(sd.at("blk.norm2.bias").shape(), (TensorShape{16}));
  // Every key of PyTorch's layer has a tensor of the same shape in PyTorch's file.
  for (const auto& [key, t] : attn::io::state_dict(layer, "encoder.layers.0"))
    EXPECT_EQ(f.file().info(key).shape, t.shape()) << key;

  // bias = false (PyTorch >= 2.1): every bias gone, the LayerNorms' too.
  const auto no_bias = attn::io::state_dict(attn::TransformerEncoderLayer<T>(16, 4, small_options(false, false)));
  EXPECT_EQ(no_bias.names(), (Keys{"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                                   "linear2.weight", "norm1.weight", "norm2.weight"}));
}

TYPED_TEST(TransformerStateDictTest, DecoderLayerHasPyTorchsKeysInItsOrder) {
  using T = TypeParam;
  const Fixture f = decoder_fixture();
  const attn::TransformerDecoderLayer<T> layer(16, 2, small_options());
  const auto sd = attn::io::state_dict(layer);
  EXPECT_EQ(sd.names(), split(f.meta("layer_keys")));
  for (const auto& [key, t] : attn::io::state_dict(layer, "layer"))
    EXPECT_EQ(f.file().info(key).shape, t.shape()) << key;
}

TYPED_TEST(TransformerStateDictTest, EncoderHasPyTorchsKeysInItsOrder) {
  using T = TypeParam;
  const Fixture f = encoder_fixture();
  const auto enc = make_encoder<T>(1);
  EXPECT_EQ(attn::io::state_dict(enc).names(), split(f.meta("encoder_keys")));
  EXPECT_EQ(attn::io::state_dict(enc, "encoder").names(), prefixed("encoder.", split(f.meta("encoder_keys"))));
  for (const auto& [key, t] : attn::io::state_dict(enc, "encoder"))
    EXPECT_EQ(f.file().info(key).shape, t.shape()) << key;

  // Without a final norm: the layers' keys only; no layers, no norm: nothing.
  Keys layers_only;
  for (const std::string& k : split(f.meta("encoder_keys")))
    if (k.rfind("norm.", 0) != 0) layers_only.push_back(k);
  EXPECT_EQ(attn::io::state_dict(make_encoder<T>(2, false)).names(), layers_only);
  const attn::TransformerEncoder<T> empty(attn::TransformerEncoderLayer<T>(16, 4, small_options()), 0);
  EXPECT_TRUE(attn::io::state_dict(empty).empty());
}

// --- PyTorch's own state_dicts, loaded by name ---------------------------------------------------

TYPED_TEST(TransformerStateDictTest, PyTorchEncoderLoadsByNameAndMatches) {
  using T = TypeParam;
  const Fixture f = encoder_fixture();
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  const SafeTensors& st = f.file();
  attn::TransformerEncoder<T> enc = encoder_of<T>(f);
  // The encoder is part of a bigger module (keys encoder.*, head.*): the prefix picks it out, and
  // strict loading checks every key under it (the head and the inputs lie outside).
  const attn::io::LoadResult r = attn::io::load_state_dict(enc, st, "encoder");
  EXPECT_TRUE(r.missing_keys.empty());
  EXPECT_TRUE(r.unexpected_keys.empty());
  attn::Linear<T> head(f.meta_int("d_model"), 3);
  attn::io::load_state_dict(head, st, "head.");

  const attn::Matrix<T> src = f.tensor<T>("src");
  attn::EncoderArgs<T> args;
  args.batch = f.meta_int("batch");
  const attn::Matrix<T> out = enc.forward(src, args);
  EXPECT_TRUE(matrices_near(out, f.tensor<double>("encoder_output"), tolerance<T>()));
  EXPECT_TRUE(matrices_near(head.forward(out), f.tensor<double>("head_output"), tolerance<T>()));

  // One layer, or the final norm, by its own prefix: the same tensors.
  attn::TransformerEncoderLayer<T> layer1(f.meta_int("d_model"), f.meta_int("nhead"), options_of(f));
  attn::io::load_state_dict(layer1, st, "encoder.layers.1");
  EXPECT_TRUE(identical(attn::io::state_dict(layer1), attn::io::state_dict(enc.layer(1))));
  attn::LayerNorm<T> norm(f.meta_int("d_model"));
  attn::io::load_state_dict(norm, st, "encoder.norm");
  ASSERT_NE(enc.norm(), nullptr);
  EXPECT_TRUE(identical(attn::io::state_dict(norm), attn::io::state_dict(*enc.norm())));
  attn::FeedForward<T> ff(f.meta_int("d_model"), f.meta_int("dim_feedforward"), attn::Activation::GELU);
  // FeedForward's keys are the layer's linear1.* and linear2.*: non-strict, the layer's others are left.
  const attn::io::LoadResult rf = attn::io::load_state_dict(ff, st, "encoder.layers.0", false);
  EXPECT_TRUE(rf.missing_keys.empty());
  EXPECT_EQ(rf.unexpected_keys.size(), 8u);  // self_attn's 4, norm1's and norm2's 2 each
  EXPECT_TRUE(identical(attn::io::state_dict(ff), attn::io::state_dict(enc.layer(0).feed_forward())));

  // The whole file without the prefix is refused, naming what is missing and what is left over.
  attn::TransformerEncoder<T> other = encoder_of<T>(f);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(other, st); },
      {"attn::io::load_state_dict(TransformerEncoder)", "missing keys [\"layers.0.self_attn.in_proj_weight\"",
       "unexpected keys [", "\"encoder.layers.0.self_attn.in_proj_weight\"", "\"head.weight\""}));
}

TYPED_TEST(TransformerStateDictTest, PyTorchDecoderLayerLoadsByNameAndMatches) {
  using T = TypeParam;
  const Fixture f = decoder_fixture();
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  attn::TransformerDecoderLayer<T> layer(f.meta_int("d_model"), f.meta_int("nhead"), options_of(f));
  attn::io::load_state_dict(layer, f.file(), "layer");

  attn::DecoderArgs<T> args;
  args.batch = f.meta_int("batch");
  ASSERT_TRUE(f.meta_bool("tgt_is_causal"));  // PyTorch's tgt_mask: 0 on and below the diagonal, -inf above
  args.tgt_masks.causal = attn::Causal::TopLeft;
  const attn::Matrix<T> out = layer.forward(f.tensor<T>("tgt"), f.tensor<T>("memory"), args);
  EXPECT_TRUE(matrices_near(out, f.tensor<double>("output"), tolerance<T>()));
}

// --- strictness and the strong guarantee over a composite ------------------------------------------

TYPED_TEST(TransformerStateDictTest, StrictListsMissingAndUnexpectedKeysAndChangesNothing) {
  using T = TypeParam;
  auto enc = make_encoder<T>(11);
  const StateDict<T> before = attn::io::state_dict(enc);
  StateDict<T> sd;
  for (const auto& [key, t] : attn::io::state_dict(make_encoder<T>(12), "encoder"))
    if (key != "encoder.layers.1.norm2.bias" && key != "encoder.norm.weight") sd.set(key, t);
  sd.set("encoder.layers.2.linear1.weight", Tensor<T>::from_matrix(attn::Matrix<T>::Ones(24, 16)));
  sd.set("decoder.norm.weight", Tensor<T>::from_vector(attn::Vector<T>::Ones(16)));  // outside the prefix
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(enc, sd, "encoder"); },
      {"attn::io::load_state_dict(TransformerEncoder): state dict, prefix \"encoder.\":",
       "missing keys [\"encoder.layers.1.norm2.bias\", \"encoder.norm.weight\"]",
       "unexpected keys [\"encoder.layers.2.linear1.weight\"]"}));
  EXPECT_TRUE(identical(attn::io::state_dict(enc), before));

  // Not strict: what matches is loaded, the rest reported.
  const attn::io::LoadResult r = attn::io::load_state_dict(enc, sd, "encoder", /*strict=*/false);
  EXPECT_EQ(r.missing_keys, (Keys{"encoder.layers.1.norm2.bias", "encoder.norm.weight"}));
  EXPECT_EQ(r.unexpected_keys, Keys{"encoder.layers.2.linear1.weight"});
  EXPECT_EQ(enc.layer(1).linear2().weight(), sd.at("encoder.layers.1.linear2.weight").matrix());  // loaded
  EXPECT_EQ(enc.layer(1).norm2().bias(), before.at("layers.1.norm2.bias").vector());              // as it was
  EXPECT_EQ(enc.norm()->weight(), before.at("norm.weight").vector());                             // as it was
  EXPECT_EQ(enc.norm()->bias(), sd.at("encoder.norm.bias").vector());                             // loaded
}

TYPED_TEST(TransformerStateDictTest, AWrongShapeAnywhereChangesNothing) {
  using T = TypeParam;
  // The bad tensors come last in PyTorch's order: a loader that assigned as it went would have
  // changed every layer before finding them.
  auto enc = make_encoder<T>(21);
  const StateDict<T> before = attn::io::state_dict(enc);
  const attn::Matrix<T> x = random_matrix<T>(6, 16, 3);
  const attn::Matrix<T> y_before = enc.forward(x, attn_test::batch_of<attn::EncoderArgs<T>>(1));
  StateDict<T> sd = attn::io::state_dict(make_encoder<T>(22));
  sd.set("layers.1.linear1.weight", Tensor<T>::from_matrix(attn::Matrix<T>::Ones(16, 24)));  // transposed
  sd.set("norm.bias", Tensor<T>::from_vector(attn::Vector<T>::Ones(17)));
  for (const bool strict : {true, false}) {
    EXPECT_TRUE(throws_with<attn::shape_error>(
        [&] { attn::io::load_state_dict(enc, sd, "", strict); },
        {"attn::io::load_state_dict(TransformerEncoder)",
         "\"layers.1.linear1.weight\" has shape [16, 24], the module's is [24, 16]",
         "\"norm.bias\" has shape [17], the module's is [16]"}))
        << "strict = " << strict;
    EXPECT_TRUE(identical(attn::io::state_dict(enc), before));
    EXPECT_TRUE(same_bytes(enc.forward(x, attn_test::batch_of<attn::EncoderArgs<T>>(1)), y_before));
  }

  auto dec = make_decoder_layer<T>(23);
  const StateDict<T> dec_before = attn::io::state_dict(dec);
  StateDict<T> dsd = attn::io::state_dict(make_decoder_layer<T>(24), "dec");
  dsd.set("dec.norm3.weight", Tensor<T>({1, 16}, attn::Matrix<T>::Ones(1, 16)));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::io::load_state_dict(dec, dsd, "dec"); },
                                             {"attn::io::load_state_dict(TransformerDecoderLayer)",
                                              "\"dec.norm3.weight\" has shape [1, 16], the module's is [16]"}));
  EXPECT_TRUE(identical(attn::io::state_dict(dec), dec_before));
}

TYPED_TEST(TransformerStateDictTest, NonStrictDecoderLayerLoadsOneSubmodule) {
  using T = TypeParam;
  auto dec = make_decoder_layer<T>(31);
  const StateDict<T> before = attn::io::state_dict(dec);
  const auto src = make_decoder_layer<T>(32);
  // Only the cross-attention, from a file of PyTorch's names, and a key this layer does not have.
  StateDict<T> sd = attn::io::state_dict(src.multihead_attn(), "multihead_attn");
  sd.set("rotary.freq", Tensor<T>::from_vector(attn::Vector<T>::Ones(4)));
  const attn::io::LoadResult r = attn::io::load_state_dict(dec, sd, "", /*strict=*/false);
  Keys missing;
  for (const std::string& k : before.names())
    if (k.rfind("multihead_attn.", 0) != 0) missing.push_back(k);
  EXPECT_EQ(r.missing_keys, missing);  // in PyTorch's order
  EXPECT_EQ(r.unexpected_keys, Keys{"rotary.freq"});
  EXPECT_TRUE(identical(attn::io::state_dict(dec.multihead_attn()), attn::io::state_dict(src.multihead_attn())));
  EXPECT_FALSE(identical(attn::io::state_dict(dec.self_attn()), attn::io::state_dict(src.self_attn())));
  EXPECT_EQ(dec.norm3().weight(), before.at("norm3.weight").vector());
}

// --- round trips --------------------------------------------------------------------------------------

TYPED_TEST(TransformerStateDictTest, EncoderRoundTripThroughAFileIsBitExact) {
  using T = TypeParam;
  const auto src = make_encoder<T>(41);
  attn::io::save_safetensors(this->path("enc.safetensors"), attn::io::state_dict(src, "encoder"));
  const SafeTensors st = SafeTensors::open(this->path("enc.safetensors"));
  auto dst = make_encoder<T>(42);  // other values everywhere
  attn::io::load_state_dict(dst, st, "encoder");
  EXPECT_TRUE(identical(attn::io::state_dict(dst), attn::io::state_dict(src)));
  const attn::Matrix<T> x = random_matrix<T>(10, 16, 4);
  attn::EncoderArgs<T> args;
  args.batch = 2;
  EXPECT_TRUE(same_bytes(dst.forward(x, args), src.forward(x, args)));

  // A freshly constructed module (PyTorch's init) takes the same state.
  attn::TransformerEncoder<T> fresh(attn::TransformerEncoderLayer<T>(16, 4, small_options(true)), 2,
                                    attn::LayerNorm<T>(16));
  attn::io::load_state_dict(fresh, st.state_dict<T>(), "encoder");  // from the file's (mapped) StateDict too
  EXPECT_TRUE(identical(attn::io::state_dict(fresh), attn::io::state_dict(src)));
  EXPECT_TRUE(same_bytes(fresh.forward(x, args), src.forward(x, args)));
}

// --- a whole model's export: hyperparameters under the encoder's path ----------------------------

// tools/gen_state_dict_fixtures.py's TinyModel: self.encoder = TransformerEncoder(
// TransformerEncoderLayer(8, 4, 12, gelu, batch_first, norm_first), 2 layers, final LayerNorm),
// self.head = Linear(8, 3); torch.save'd and exported by attn-export with no option.
template <class T>
attn::TransformerEncoder<T> tiny_model_encoder(Index nhead = 4, bool norm_first = true, bool final_norm = true) {
  attn::TransformerOptions o;
  o.dim_feedforward = 12;
  o.activation = attn::Activation::GELU;
  o.batch_first = true;
  o.norm_first = norm_first;
  std::optional<attn::LayerNorm<T>> norm;
  if (final_norm) norm.emplace(8);
  return attn::TransformerEncoder<T>(attn::TransformerEncoderLayer<T>(8, nhead, o), 2, norm);
}

TYPED_TEST(TransformerStateDictTest, AWholeModelsExportRecordsTheEncodersHyperparameters) {
  using T = TypeParam;
  const SafeTensors st = Fixture::load("state_dict/model_with_encoder.safetensors").file();
  const attn::io::Metadata& meta = st.metadata();
  // The constructor arguments above, under the encoder's path, its layers' and their attentions'.
  const attn::io::Metadata want = {
      {"encoder.d_model", "8"},        {"encoder.nhead", "4"},          {"encoder.num_layers", "2"},
      {"encoder.dim_feedforward", "12"}, {"encoder.activation", "gelu"}, {"encoder.batch_first", "true"},
      {"encoder.norm_first", "true"},  {"encoder.final_norm", "true"},  {"encoder.layers.1.nhead", "4"},
      {"encoder.layers.0.self_attn.num_heads", "4"}, {"encoder.layers.1.self_attn.batch_first", "true"},
      {"attn.export_version", "1"}};
  for (const auto& [key, value] : want) {
    ASSERT_TRUE(meta.count(key)) << key;
    EXPECT_EQ(meta.at(key), value) << key;
  }
  EXPECT_EQ(std::stod(meta.at("encoder.layer_norm_eps")), 1e-5);
  EXPECT_EQ(meta.count("nhead"), 0u);  // the root is TinyModel, which attn has no counterpart of
  EXPECT_EQ(meta.count("head.nhead"), 0u);

  // Loaded by its prefix, checked, and PyTorch's output reproduced (float32 weights and output).
  attn::TransformerEncoder<T> enc = tiny_model_encoder<T>();
  attn::io::load_state_dict(enc, st, "encoder");
  const SafeTensors io = Fixture::load("state_dict/model_with_encoder_io.safetensors").file();
  ASSERT_EQ(io.info("src").shape, (TensorShape{2, 5, 8}));  // [B, L, E]
  attn::EncoderArgs<T> args;
  args.batch = 2;
  // [B, L, E] as a matrix is [B, L*E], row-major: the same bytes as [B*L, E].
  const attn::Matrix<T> src = io.matrix<T>("src");
  const attn::Matrix<double> out = io.matrix<double>("output");
  EXPECT_TRUE(matrices_near(enc.forward(Eigen::Map<const attn::Matrix<T>>(src.data(), 10, 8), args),
                            Eigen::Map<const attn::Matrix<double>>(out.data(), 10, 8), 1e-5));

  // Without the prefix: every key is missing, and the error says where they are. 26 keys: per layer
  // self_attn 4 + linear1 2 + linear2 2 + norm1 2 + norm2 2 = 12, two layers, the final norm's 2.
  attn::TransformerEncoder<T> other = tiny_model_encoder<T>();
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(other, st); },
      {"attn::io::load_state_dict(TransformerEncoder)", "missing keys [\"layers.0.self_attn.in_proj_weight\"",
       "all 26 missing keys exist under prefix \"encoder.\": pass prefix \"encoder\""}));
}

TYPED_TEST(TransformerStateDictTest, AWholeModelsExportRefusesAnEncoderBuiltOtherwise) {
  using T = TypeParam;
  const SafeTensors st = Fixture::load("state_dict/model_with_encoder.safetensors").file();
  // Two heads where the model has four: the same shapes. The encoder's own key is named first; the
  // layers' nhead and their attentions' num_heads (2 + 2) differ too.
  attn::TransformerEncoder<T> two_heads = tiny_model_encoder<T>(2);
  const StateDict<T> before = attn::io::state_dict(two_heads);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(two_heads, st, "encoder"); },
      {"attn::io::load_state_dict(TransformerEncoder): safetensors file ", "prefix \"encoder.\": ",
       "metadata says encoder.nhead = 4, the module has 2: build it with 4 heads (and 4 more differ)"}));
  EXPECT_TRUE(identical(attn::io::state_dict(two_heads), before));
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(two_heads, st, "encoder", /*strict=*/false); }, {"encoder.nhead = 4"}));
  EXPECT_TRUE(identical(attn::io::state_dict(two_heads), before));

  attn::TransformerEncoder<T> post_norm = tiny_model_encoder<T>(4, false);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(post_norm, st, "encoder"); },
      {"metadata says encoder.norm_first = true, the module has false: build it with norm_first = true"}));
  attn::TransformerEncoder<T> no_norm = tiny_model_encoder<T>(4, true, false);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(no_norm, st, "encoder"); },
      {"metadata says encoder.final_norm = true, the module has false: build it with a final LayerNorm"}));

  // One layer by its own prefix: its keys, encoder.layers.1.*.
  attn::TransformerOptions o;
  o.dim_feedforward = 12;
  o.activation = attn::Activation::GELU;
  o.batch_first = true;
  o.norm_first = true;
  attn::TransformerEncoderLayer<T> layer(8, 4, o);
  attn::io::load_state_dict(layer, st, "encoder.layers.1");
  o.activation = attn::Activation::ReLU;
  attn::TransformerEncoderLayer<T> relu(8, 4, o);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(relu, st, "encoder.layers.1"); },
      {"attn::io::load_state_dict(TransformerEncoderLayer)",
       "metadata says encoder.layers.1.activation = gelu, the module has relu: build it with activation = gelu"}));
  o.activation = attn::Activation::GELU;
  o.layer_norm_eps = 1e-6;
  attn::TransformerEncoderLayer<T> eps(8, 4, o);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(eps, st, "encoder.layers.1"); },
      {"metadata says encoder.layers.1.layer_norm_eps = 1e-05, the module has 1e-06"}));
  // Its attention alone: encoder.layers.0.self_attn.*.
  attn::MhaOptions mo;
  mo.batch_first = true;
  attn::MultiHeadAttention<T> mha(8, 4, mo);
  attn::io::load_state_dict(mha, st, "encoder.layers.0.self_attn");
  attn::MultiHeadAttention<T> mha8(8, 8, mo);
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(mha8, st, "encoder.layers.0.self_attn"); },
      {"metadata says encoder.layers.0.self_attn.num_heads = 4, the module has 8: build it with 4 heads"}));
}

// A plain state_dict's export records what its shapes prove, and nothing else: no head count.
TYPED_TEST(TransformerStateDictTest, APlainStateDictsExportRecordsOnlyWhatShapesProve) {
  using T = TypeParam;
  const SafeTensors st = Fixture::load("state_dict/model_state_dict.safetensors").file();
  const attn::io::Metadata& meta = st.metadata();
  const attn::io::Metadata want = {{"encoder.num_layers", "2"},
                                   {"encoder.d_model", "8"},
                                   {"encoder.dim_feedforward", "12"},
                                   {"encoder.bias", "true"},
                                   {"encoder.final_norm", "true"},
                                   {"encoder.layers.1.self_attn.embed_dim", "8"},
                                   {"encoder.layers.1.self_attn.kdim", "8"},
                                   {"encoder.layers.1.self_attn.add_bias_kv", "false"}};
  for (const auto& [key, value] : want) {
    ASSERT_TRUE(meta.count(key)) << key;
    EXPECT_EQ(meta.at(key), value) << key;
  }
  for (const char* unknowable : {"encoder.nhead", "encoder.layers.0.self_attn.num_heads", "encoder.batch_first",
                                 "encoder.norm_first", "encoder.activation", "encoder.layers.0.layer_norm_eps"})
    EXPECT_EQ(meta.count(unknowable), 0u) << unknowable;
  attn::TransformerEncoder<T> enc = tiny_model_encoder<T>();
  attn::io::load_state_dict(enc, st, "encoder");
  attn::TransformerEncoder<T> wider(attn::TransformerEncoderLayer<T>(8, 4, small_options()), 2, attn::LayerNorm<T>(8));
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(wider, st, "encoder"); },
      {"metadata says encoder.dim_feedforward = 12, the module has 24: build it with dim_feedforward = 12"}));
}

// attn's own writer for the layers: hyperparameter_metadata() beside state_dict().
TYPED_TEST(TransformerStateDictTest, DecoderLayerHyperparametersRoundTripAndAreChecked) {
  using T = TypeParam;
  const auto src = make_decoder_layer<T>(61);  // TransformerDecoderLayer(16, 2, 24, gelu)
  const attn::io::Metadata meta = attn::io::hyperparameter_metadata(src, "dec");
  EXPECT_EQ(meta.at("dec.nhead"), "2");
  EXPECT_EQ(meta.at("dec.activation"), "gelu");
  EXPECT_EQ(meta.at("dec.layer_norm_eps"), "1e-05");
  EXPECT_EQ(meta.at("dec.multihead_attn.num_heads"), "2");
  EXPECT_EQ(meta.size(), 8u + 8u + 8u);  // the layer's 8, and 8 for each attention
  attn::io::save_safetensors(this->path("dec.safetensors"), attn::io::state_dict(src, "dec"), meta);
  const SafeTensors st = SafeTensors::open(this->path("dec.safetensors"));
  attn::TransformerDecoderLayer<T> same(16, 2, small_options());
  attn::io::load_state_dict(same, st, "dec");
  EXPECT_TRUE(identical(attn::io::state_dict(same), attn::io::state_dict(src)));
  // Four heads: nhead, self_attn.num_heads and multihead_attn.num_heads differ.
  attn::TransformerDecoderLayer<T> four(16, 4, small_options());
  EXPECT_TRUE(throws_with<attn::format_error>(
      [&] { attn::io::load_state_dict(four, st, "dec"); },
      {"attn::io::load_state_dict(TransformerDecoderLayer)",
       "metadata says dec.nhead = 2, the module has 4: build it with 2 heads (and 2 more differ)"}));
}

TYPED_TEST(TransformerStateDictTest, LayersRoundTripThroughAFileAreBitExact) {
  using T = TypeParam;
  const attn::Matrix<T> x = random_matrix<T>(8, 16, 5), mem = random_matrix<T>(6, 16, 6);
  {
    const auto src = make_decoder_layer<T>(51);
    attn::io::save_safetensors(this->path("dec.safetensors"), attn::io::state_dict(src));
    attn::TransformerDecoderLayer<T> dst(16, 2, small_options());
    attn::io::load_state_dict(dst, SafeTensors::open(this->path("dec.safetensors")));
    EXPECT_TRUE(identical(attn::io::state_dict(dst), attn::io::state_dict(src)));
    attn::DecoderArgs<T> args;
    args.batch = 2;
    EXPECT_TRUE(same_bytes(dst.forward(x, mem, args), src.forward(x, mem, args)));
  }
  {
    attn::TransformerEncoderLayer<T> src(16, 4, small_options(false, false));  // no bias anywhere
    randomize(src, 52);
    attn::io::save_safetensors(this->path("enc_layer.safetensors"), attn::io::state_dict(src));
    attn::TransformerEncoderLayer<T> dst(16, 4, small_options(false, false));
    attn::io::load_state_dict(dst, SafeTensors::open(this->path("enc_layer.safetensors")));
    EXPECT_TRUE(identical(attn::io::state_dict(dst), attn::io::state_dict(src)));
    EXPECT_TRUE(same_bytes(dst.forward(x, attn_test::batch_of<attn::EncoderArgs<T>>(1)), src.forward(x, attn_test::batch_of<attn::EncoderArgs<T>>(1))));
  }
  {
    attn::FeedForward<T> src(16, 24, attn::Activation::GELU);
    randomize(src, 53);
    attn::io::save_safetensors(this->path("ff.safetensors"), attn::io::state_dict(src, "ff"));
    attn::FeedForward<T> dst(16, 24, attn::Activation::GELU);
    attn::io::load_state_dict(dst, SafeTensors::open(this->path("ff.safetensors")), "ff");
    EXPECT_TRUE(identical(attn::io::state_dict(dst), attn::io::state_dict(src)));
    EXPECT_TRUE(same_bytes(dst.forward(x), src.forward(x)));
  }
  {
    attn::LayerNorm<T> src(16, 1e-5, true, false);  // weight only
    randomize(src, 54);
    attn::io::save_safetensors(this->path("ln.safetensors"), attn::io::state_dict(src));
    attn::LayerNorm<T> dst(16, 1e-5, true, false);
    attn::io::load_state_dict(dst, SafeTensors::open(this->path("ln.safetensors")));
    EXPECT_TRUE(identical(attn::io::state_dict(dst), attn::io::state_dict(src)));
    EXPECT_TRUE(same_bytes(dst.forward(x), src.forward(x)));
  }
}

}  // namespace
