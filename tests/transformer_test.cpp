// tests/transformer_test.cpp - attn::TransformerEncoderLayer, TransformerDecoderLayer,
// TransformerEncoder, TransformerDecoder and Transformer against PyTorch 1.13
// (tests/data/layers/encoder_* and decoder_*, written by tools/gen_fixtures.py, and transformer_*,
// by tools/gen_transformer_fixtures.py, in float64), incremental decoding against the caches
// held to the same whole-target outputs, identities that need no fixture, and errors.
//
// Each fixture is a typed test, float and double: TransformerPyTorch/double.encoder_layer_causal.
// Parameters are loaded by their state_dict names (attn::io::load_state_dict); the 6-layer
// d_model-256 stack (encoder_6_layers_e256) stores them as float16, exact in float and double, so
// it is held to the same tolerances as the rest: max |actual - expected| <= tol * max(1, max
// |expected|), tol = 1e-5 in float, 1e-10 in double.
#include <attn/transformer.hpp>

#include <attn/io/state_dict.hpp>  // loads the fixtures' parameters by name

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "support/fixture.hpp"
#include "support/fixture_cases.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn_test::Fixture;
using attn_test::matrices_near;
using attn_test::throws_with;
using attn_test::tolerance;

// --- loading a state_dict by name -----------------------------------------------------------------

// Every parameter of the module from the fixture, by its state_dict name, through
// the library's loader: not strict, since the fixture holds the inputs, masks and outputs beside
// the parameters, but none of the module's may be missing. What it loads counts as read for
// Fixture::unused(), so a parameter the module lacks (a bias with bias = false) is still caught.
template <class Module>
void load_params(Module& m, const Fixture& f) {
  const attn::io::LoadResult r = attn::io::load_state_dict(m, f.file(), "", /*strict=*/false);
  EXPECT_EQ(r.missing_keys, std::vector<std::string>{});
  for (const auto& entry : attn::io::state_dict(m)) f.mark_used(entry.first);
}

attn::TransformerOptions options_of(const Fixture& f) {
  attn::TransformerOptions o;
  o.dim_feedforward = f.meta_int("dim_feedforward");
  const std::string act = f.meta("activation");
  EXPECT_TRUE(act == "relu" || act == "gelu") << act;
  o.activation = act == "gelu" ? attn::Activation::GELU : attn::Activation::ReLU;
  o.layer_norm_eps = f.meta_double("layer_norm_eps");
  o.batch_first = f.meta_bool("batch_first");
  o.norm_first = f.meta_bool("norm_first");
  o.bias = f.meta_bool("bias");
  if (f.meta_bool("unbatched")) {
    EXPECT_EQ(f.meta_int("batch"), 1);
  }
  return o;
}

// A PyTorch mask stored under its argument name: BOOL is true = masked out (an IgnoreMask), F64 is
// added to the logits (an AdditiveMask).
template <class T>
void load_mask(attn::Masks<T>& m, const Fixture& f, const std::string& name) {
  if (!f.has(name)) return;
  if (f.file().info(name).dtype == attn::io::DType::BOOL)
    m.attn_mask = attn::IgnoreMask(f.mask(name));
  else
    m.attn_bias = attn::AdditiveMask<T>(f.tensor<T>(name));
}

template <class T>
void load_padding(attn::Masks<T>& m, const Fixture& f, const std::string& name) {
  if (f.has(name)) m.key_padding_mask = attn::IgnoreMask(f.mask(name));
}

// Whether the stored mask is exactly the causal one (0 where j <= i + S - L for bottom_right,
// j <= i for top_left, -inf elsewhere), so that attn::Causal may replace it.
::testing::AssertionResult is_causal_mask(const attn::Matrix<double>& m, attn::Causal c) {
  const Index L = m.rows(), S = m.cols();
  for (Index i = 0; i < L; ++i)
    for (Index j = 0; j < S; ++j) {
      const bool sees = c == attn::Causal::TopLeft ? j <= i : j <= i + S - L;
      if (m(i, j) != (sees ? 0.0 : -std::numeric_limits<double>::infinity()))
        return ::testing::AssertionFailure() << "element (" << i << ", " << j << ") = " << m(i, j);
    }
  return ::testing::AssertionSuccess();
}

attn::Causal causal_of(const std::string& s) {
  if (s == "top_left") return attn::Causal::TopLeft;
  if (s == "bottom_right") return attn::Causal::BottomRight;
  EXPECT_EQ(s, "none");
  return attn::Causal::None;
}

// --- the cases --------------------------------------------------------------------------------------

template <class T>
void run_encoder_layer(const Fixture& f) {
  attn::TransformerEncoderLayer<T> layer(f.meta_int("d_model"), f.meta_int("nhead"), options_of(f));
  load_params(layer, f);  // self_attn.*, linear1.*, linear2.*, norm1.*, norm2.*
  const attn::Matrix<T> src = f.tensor<T>("src");
  const attn::Matrix<double> want = f.tensor<double>("output");
  attn::EncoderArgs<T> args;
  args.batch = f.meta_int("batch");
  load_mask(args, f, "src_mask");
  load_padding(args, f, "src_key_padding_mask");

  const auto check = [&](const attn::EncoderArgs<T>& a, const char* how) {
    SCOPED_TRACE(how);
    EXPECT_TRUE(matrices_near(layer.forward(src, a), want, tolerance<T>())) << "forward";
    attn::Matrix<T> x = src;
    layer.forward_into(x, a, x);
    EXPECT_TRUE(matrices_near(x, want, tolerance<T>())) << "forward_into in place";
  };
  check(args, "PyTorch's masks");
  if (f.meta_bool("is_causal")) {
    // is_causal: the stored src_mask is the causal mask; attn::Causal alone gives the same numbers.
    ASSERT_TRUE(is_causal_mask(f.tensor<double>("src_mask"), attn::Causal::TopLeft));
    attn::EncoderArgs<T> causal = args;
    causal.attn_bias = {};
    causal.causal = attn::Causal::TopLeft;
    check(causal, "attn::Causal::TopLeft instead of src_mask");
    causal.causal = attn::Causal::BottomRight;  // L == S: the same rule
    check(causal, "attn::Causal::BottomRight instead of src_mask");
  }
  (void)f.meta_bool("fast_path_checked");
}

template <class T>
void run_decoder_layer(const Fixture& f) {
  attn::TransformerDecoderLayer<T> layer(f.meta_int("d_model"), f.meta_int("nhead"), options_of(f));
  load_params(layer, f);  // the same and multihead_attn.*, norm3.*
  const attn::Matrix<T> tgt = f.tensor<T>("tgt"), memory = f.tensor<T>("memory");
  const attn::Matrix<double> want = f.tensor<double>("output");
  attn::DecoderArgs<T> args;
  args.batch = f.meta_int("batch");
  load_mask(args.tgt_masks, f, "tgt_mask");
  load_mask(args.memory_masks, f, "memory_mask");
  load_padding(args.tgt_masks, f, "tgt_key_padding_mask");
  load_padding(args.memory_masks, f, "memory_key_padding_mask");

  const auto check = [&](const attn::DecoderArgs<T>& a, const char* how) {
    SCOPED_TRACE(how);
    EXPECT_TRUE(matrices_near(layer.forward(tgt, memory, a), want, tolerance<T>())) << "forward";
    attn::Matrix<T> x = tgt;
    layer.forward_into(x, memory, a, x);
    EXPECT_TRUE(matrices_near(x, want, tolerance<T>())) << "forward_into in place";
  };
  check(args, "PyTorch's masks");
  attn::DecoderArgs<T> causal = args;
  bool any_causal = false;
  if (f.meta_bool("tgt_is_causal")) {
    ASSERT_TRUE(is_causal_mask(f.tensor<double>("tgt_mask"), attn::Causal::TopLeft));
    causal.tgt_masks.attn_bias = {};
    causal.tgt_masks.causal = attn::Causal::TopLeft;
    any_causal = true;
  }
  const attn::Causal memory_causal = causal_of(f.meta("memory_causal"));
  if (memory_causal != attn::Causal::None) {
    ASSERT_TRUE(is_causal_mask(f.tensor<double>("memory_mask"), memory_causal));
    causal.memory_masks.attn_bias = {};
    causal.memory_masks.causal = memory_causal;
    any_causal = true;
  }
  if (any_causal) check(causal, "attn::Causal instead of the causal masks");
}

template <class T>
void run_encoder(const Fixture& f) {
  const Index layers = f.meta_int("num_layers"), E = f.meta_int("d_model");
  std::optional<attn::LayerNorm<T>> final_norm;
  if (f.meta_bool("final_norm")) final_norm.emplace(E);
  attn::TransformerEncoder<T> enc(attn::TransformerEncoderLayer<T>(E, f.meta_int("nhead"), options_of(f)), layers,
                                  final_norm);
  ASSERT_EQ(enc.num_layers(), layers);
  ASSERT_EQ(enc.norm() != nullptr, f.has("norm.weight"));
  load_params(enc, f);  // layers.{i}.*, norm.*

  const attn::Matrix<T> src = f.tensor<T>("src");
  attn::EncoderArgs<T> args;
  args.batch = f.meta_int("batch");
  load_mask(args, f, "mask");
  load_padding(args, f, "src_key_padding_mask");
  ASSERT_FALSE(f.meta_bool("is_causal"));
  const attn::Matrix<double> want = f.tensor<double>("output");
  EXPECT_TRUE(matrices_near(enc.forward(src, args), want, tolerance<T>())) << "forward";
  attn::Matrix<T> x = src;
  enc.forward_into(x, args, x);
  EXPECT_TRUE(matrices_near(x, want, tolerance<T>())) << "forward_into in place";
}

// The decoder's output for tgt, step by step against a TransformerDecoderCache: one target
// position of every sequence per decode() call, in the layout of tgt (rows (l, b), or (b, l) with
// batch_first), so each row must equal the whole-target forward's with a causal tgt_mask.
template <class T>
attn::Matrix<T> decode_incrementally(const attn::TransformerDecoder<T>& dec, const attn::Matrix<T>& tgt,
                                     const attn::Matrix<T>& memory, const attn::Masks<T>& memory_masks, Index B,
                                     bool batch_first) {
  const Index L = tgt.rows() / B;
  auto cache = dec.start(memory, B, L, memory_masks);
  attn::Matrix<T> out(tgt.rows(), tgt.cols()), step(B, tgt.cols());
  const auto row = [&](Index l, Index b) { return batch_first ? b * L + l : l * B + b; };
  for (Index l = 0; l < L; ++l) {
    for (Index b = 0; b < B; ++b) step.row(b) = tgt.row(row(l, b));
    const attn::Matrix<T> y = dec.decode(step, cache);
    for (Index b = 0; b < B; ++b) out.row(row(l, b)) = y.row(b);
  }
  EXPECT_EQ(cache.size(), L);
  return out;
}

template <class T>
void run_decoder(const Fixture& f) {
  const Index layers = f.meta_int("num_layers"), E = f.meta_int("d_model"), B = f.meta_int("batch");
  std::optional<attn::LayerNorm<T>> final_norm;
  if (f.meta_bool("final_norm")) final_norm.emplace(E);
  const attn::TransformerOptions o = options_of(f);
  attn::TransformerDecoder<T> dec(attn::TransformerDecoderLayer<T>(E, f.meta_int("nhead"), o), layers, final_norm);
  ASSERT_EQ(dec.norm() != nullptr, f.has("norm.weight"));
  load_params(dec, f);  // layers.{i}.*, norm.*

  const attn::Matrix<T> tgt = f.tensor<T>("tgt"), memory = f.tensor<T>("memory");
  attn::DecoderArgs<T> args;
  args.batch = B;
  load_mask(args.tgt_masks, f, "tgt_mask");
  load_padding(args.memory_masks, f, "memory_key_padding_mask");
  ASSERT_TRUE(f.meta_bool("tgt_is_causal"));
  ASSERT_TRUE(is_causal_mask(f.tensor<double>("tgt_mask"), attn::Causal::TopLeft));
  const attn::Matrix<double> want = f.tensor<double>("output");
  EXPECT_TRUE(matrices_near(dec.forward(tgt, memory, args), want, tolerance<T>())) << "forward";
  attn::Matrix<T> x = tgt;
  dec.forward_into(x, memory, args, x);
  EXPECT_TRUE(matrices_near(x, want, tolerance<T>())) << "forward_into in place";
  EXPECT_TRUE(
      matrices_near(decode_incrementally(dec, tgt, memory, args.memory_masks, B, o.batch_first), want, tolerance<T>()))
      << "decode, one position at a time against the caches";
}

template <class T>
void run_transformer(const Fixture& f) {
  const Index E = f.meta_int("d_model"), B = f.meta_int("batch");
  const attn::TransformerOptions o = options_of(f);
  attn::Transformer<T> model(E, f.meta_int("nhead"), f.meta_int("num_encoder_layers"), f.meta_int("num_decoder_layers"),
                             o);
  load_params(model, f);  // encoder.layers.{i}.*, encoder.norm.*, decoder.layers.{i}.*, decoder.norm.*

  const attn::Matrix<T> src = f.tensor<T>("src"), tgt = f.tensor<T>("tgt");
  attn::TransformerArgs<T> args;
  args.batch = B;
  load_padding(args.src_masks, f, "src_key_padding_mask");
  load_mask(args.tgt_masks, f, "tgt_mask");
  load_padding(args.memory_masks, f, "memory_key_padding_mask");
  ASSERT_TRUE(is_causal_mask(f.tensor<double>("tgt_mask"), attn::Causal::TopLeft));
  const attn::Matrix<double> want = f.tensor<double>("output");
  EXPECT_TRUE(matrices_near(model.forward(src, tgt, args), want, tolerance<T>())) << "forward";
  const attn::Matrix<T> memory = model.encode(src, B, args.src_masks);
  EXPECT_TRUE(matrices_near(memory, f.tensor<double>("memory"), tolerance<T>())) << "encode";
  EXPECT_TRUE(matrices_near(decode_incrementally(model.decoder(), tgt, memory, args.memory_masks, B, o.batch_first),
                            want, tolerance<T>()))
      << "decode, one position at a time against the caches";
  (void)f.meta_bool("fast_path_checked");
}

template <class T>
void run_case(const std::string& name) {
  const Fixture f = Fixture::load("layers/" + name + ".safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  ASSERT_EQ(f.meta("case"), name);
  const std::string& kind = f.meta("kind");
  if (kind == "encoder_layer") {
    run_encoder_layer<T>(f);
  } else if (kind == "decoder_layer") {
    run_decoder_layer<T>(f);
  } else if (kind == "encoder") {
    run_encoder<T>(f);
  } else if (kind == "decoder") {
    run_decoder<T>(f);
  } else if (kind == "transformer") {
    run_transformer<T>(f);
  } else {
    FAIL() << "unknown kind \"" << kind << "\"";
  }
  EXPECT_EQ(f.unused(), std::vector<std::string>{}) << "tensors of the fixture that the test never read";
}

template <class T>
class TransformerPyTorch : public ::testing::Test {};
TYPED_TEST_SUITE(TransformerPyTorch, attn_test::Scalars, attn_test::ScalarName);

#define ATTN_TRANSFORMER_CASE(case_name)                                            \
  [[maybe_unused]] const bool attn_case_##case_name = attn_test::cover(#case_name); \
  TYPED_TEST(TransformerPyTorch, case_name) { run_case<TypeParam>(#case_name); }

ATTN_TRANSFORMER_CASE(encoder_layer_relu)
ATTN_TRANSFORMER_CASE(encoder_layer_gelu_batch_first_padding)
ATTN_TRANSFORMER_CASE(encoder_layer_norm_first_float_mask)
ATTN_TRANSFORMER_CASE(encoder_layer_norm_first_bool_mask_padding)
ATTN_TRANSFORMER_CASE(encoder_layer_bool_mask_3d)
ATTN_TRANSFORMER_CASE(encoder_layer_float_mask_3d_padding)
ATTN_TRANSFORMER_CASE(encoder_layer_causal)
ATTN_TRANSFORMER_CASE(encoder_layer_no_bias)
ATTN_TRANSFORMER_CASE(encoder_layer_unbatched)

ATTN_TRANSFORMER_CASE(decoder_layer_relu)
ATTN_TRANSFORMER_CASE(decoder_layer_gelu_batch_first_masks)
ATTN_TRANSFORMER_CASE(decoder_layer_norm_first)
ATTN_TRANSFORMER_CASE(decoder_layer_causal)
ATTN_TRANSFORMER_CASE(decoder_layer_no_bias)

ATTN_TRANSFORMER_CASE(encoder_3_layers_final_norm)
ATTN_TRANSFORMER_CASE(encoder_6_layers_e256)

ATTN_TRANSFORMER_CASE(transformer_decoder_stack)
ATTN_TRANSFORMER_CASE(transformer_decoder_norm_first)
ATTN_TRANSFORMER_CASE(transformer_full)

TEST(TransformerPyTorchFiles, EveryFileHasATest) {
  EXPECT_EQ(attn_test::fixture_files("layers", {"encoder", "decoder", "transformer"}), attn_test::covered_cases());
}

// --- identities and structure, no fixture ----------------------------------------------------------

template <class T>
class TransformerTest : public ::testing::Test {};
TYPED_TEST_SUITE(TransformerTest, attn_test::Scalars, attn_test::ScalarName);

template <class T>
attn::Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  attn::Generator gen(seed);
  attn::Matrix<T> m(rows, cols);
  attn::init::normal(m, 1.0, gen);
  return m;
}

// With out_proj and linear2 all zero, both residual branches add 0:
//   post-norm: x -> norm1(x + 0) -> norm2(norm1(x) + 0);   pre-norm: x -> x + 0 + 0 = x.
TYPED_TEST(TransformerTest, ZeroBranchesLeaveTheResidualPath) {
  using T = TypeParam;
  for (const bool norm_first : {false, true}) {
    attn::TransformerOptions o;
    o.dim_feedforward = 12;
    o.norm_first = norm_first;
    attn::TransformerEncoderLayer<T> layer(8, 2, o);
    layer.self_attn().out_proj().set_weight(attn::Matrix<T>::Zero(8, 8));
    layer.self_attn().out_proj().set_bias(attn::Vector<T>::Zero(8));
    layer.linear2().set_weight(attn::Matrix<T>::Zero(8, 12));
    layer.linear2().set_bias(attn::Vector<T>::Zero(8));
    layer.norm1().set_weight(attn::Vector<T>::LinSpaced(8, 0.5, 2));
    layer.norm2().set_bias(attn::Vector<T>::LinSpaced(8, -1, 1));
    const attn::Matrix<T> x = random_matrix<T>(6, 8, 7);
    attn::EncoderArgs<T> args;
    args.batch = 2;
    const attn::Matrix<T> want = norm_first ? x : layer.norm2().forward(layer.norm1().forward(x));
    EXPECT_TRUE(matrices_near(layer.forward(x, args), want, tolerance<T>())) << "norm_first = " << norm_first;
  }
}

// Rows of B sequences in (l, b) order hold the same numbers as each sequence alone.
TYPED_TEST(TransformerTest, BatchIsSequencesSideBySide) {
  using T = TypeParam;
  attn::TransformerOptions o;
  o.dim_feedforward = 16;
  attn::Generator gen(3);
  const attn::TransformerDecoderLayer<T> layer(8, 4, o, gen);
  const Index B = 2, L = 3, S = 5;
  const attn::Matrix<T> tgt = random_matrix<T>(L * B, 8, 1), memory = random_matrix<T>(S * B, 8, 2);
  attn::DecoderArgs<T> args;
  args.batch = B;
  args.tgt_masks.causal = attn::Causal::TopLeft;
  const attn::Matrix<T> both = layer.forward(tgt, memory, args);
  for (Index b = 0; b < B; ++b) {
    attn::Matrix<T> t1(L, 8), m1(S, 8);
    for (Index l = 0; l < L; ++l) t1.row(l) = tgt.row(l * B + b);
    for (Index s = 0; s < S; ++s) m1.row(s) = memory.row(s * B + b);
    attn::DecoderArgs<T> one;
    one.batch = 1;
    one.tgt_masks.causal = attn::Causal::TopLeft;
    const attn::Matrix<T> alone = layer.forward(t1, m1, one);
    for (Index l = 0; l < L; ++l)
      EXPECT_TRUE(matrices_near(both.row(l * B + b), alone.row(l), tolerance<T>())) << "b " << b << " l " << l;
  }
}

TYPED_TEST(TransformerTest, ParametersHavePyTorchShapes) {
  using T = TypeParam;
  attn::TransformerOptions o;
  o.dim_feedforward = 24;
  const attn::TransformerDecoderLayer<T> dec(16, 4, o);
  EXPECT_EQ(dec.d_model(), 16);
  EXPECT_EQ(dec.nhead(), 4);
  EXPECT_EQ(dec.self_attn().in_proj_weight().rows(), 48);
  EXPECT_EQ(dec.multihead_attn().in_proj_weight().rows(), 48);
  EXPECT_EQ(dec.linear1().weight().rows(), 24);
  EXPECT_EQ(dec.linear2().weight().cols(), 24);
  EXPECT_EQ(dec.norm3().weight().size(), 16);
  EXPECT_TRUE(matrices_near(dec.norm1().weight(), attn::Vector<T>::Ones(16), 0));            // LayerNorm's init
  EXPECT_TRUE(matrices_near(dec.self_attn().in_proj_bias(), attn::Vector<T>::Zero(48), 0));  // MHA's init

  o.bias = false;  // PyTorch >= 2.1: no bias anywhere, LayerNorms included
  const attn::TransformerEncoderLayer<T> enc(16, 4, o);
  EXPECT_EQ(enc.self_attn().in_proj_bias().size(), 0);
  EXPECT_FALSE(enc.self_attn().out_proj().has_bias());
  EXPECT_FALSE(enc.linear1().has_bias() || enc.linear2().has_bias());
  EXPECT_FALSE(enc.norm1().has_bias() || enc.norm2().has_bias());
  EXPECT_TRUE(enc.norm1().elementwise_affine());
}

// Like PyTorch's deepcopy: the stack's layers start as copies and then are independent.
TYPED_TEST(TransformerTest, EncoderLayersAreIndependentCopies) {
  using T = TypeParam;
  attn::TransformerOptions o;
  o.dim_feedforward = 8;
  attn::TransformerEncoder<T> enc(attn::TransformerEncoderLayer<T>(4, 2, o), 3);
  EXPECT_EQ(enc.num_layers(), 3);
  EXPECT_EQ(enc.norm(), nullptr);
  EXPECT_TRUE(matrices_near(enc.layer(0).linear1().weight(), enc.layer(2).linear1().weight(), 0));
  enc.layer(1).linear1().set_weight(attn::Matrix<T>::Zero(8, 4));
  EXPECT_FALSE(enc.layer(0).linear1().weight().isZero(0));
  EXPECT_TRUE(enc.layer(1).linear1().weight().isZero(0));

  // Zero layers and a final norm: the output is norm(src).
  const attn::TransformerEncoder<T> just_norm(attn::TransformerEncoderLayer<T>(4, 2, o), 0, attn::LayerNorm<T>(4));
  const attn::Matrix<T> x = random_matrix<T>(3, 4, 5);
  EXPECT_TRUE(matrices_near(just_norm.forward(x, attn_test::batch_of<attn::EncoderArgs<T>>(1)),
                            attn::LayerNorm<T>(4).forward(x), 0));
}

TYPED_TEST(TransformerTest, BadArgumentsThrow) {
  using T = TypeParam;
  attn::TransformerOptions o;
  o.dim_feedforward = 8;
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::TransformerEncoderLayer<T>(10, 4, o); },
                                             {"attn::TransformerEncoderLayer", "d_model = 10", "nhead = 4"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::TransformerDecoderLayer<T>(0, 1, o); },
                                             {"attn::TransformerDecoderLayer", "d_model = 0"}));
  attn::TransformerOptions bad = o;
  bad.dim_feedforward = 0;
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::TransformerEncoderLayer<T>(8, 2, bad); },
                                             {"dim_feedforward must be positive, got 0"}));
  bad = o;
  bad.layer_norm_eps = -1;
  EXPECT_TRUE(
      throws_with<attn::argument_error>([&] { attn::TransformerDecoderLayer<T>(8, 2, bad); }, {"layer_norm_eps"}));

  const attn::TransformerEncoderLayer<T> enc(8, 2, o);
  // The batch is never guessed: unset, it is an error naming args.batch.
  EXPECT_TRUE(throws_with<attn::argument_error>(
      [&] { (void)enc.forward(attn::Matrix<T>::Zero(6, 8), attn::EncoderArgs<T>{}); },
      {"attn::TransformerEncoderLayer::forward", "batch is not set: set args.batch = B"}));
  EXPECT_TRUE(throws_with<attn::argument_error>(
      [&] {
        (void)attn::TransformerDecoderLayer<T>(8, 2, o).forward(attn::Matrix<T>::Zero(6, 8),
                                                                attn::Matrix<T>::Zero(6, 8), attn::DecoderArgs<T>{});
      },
      {"batch is not set"}));
  attn::EncoderArgs<T> args;
  args.batch = 2;
  EXPECT_TRUE(throws_with<attn::shape_error>(
      [&] { (void)enc.forward(attn::Matrix<T>::Zero(6, 7), args); },
      {"attn::TransformerEncoderLayer::forward", "src has shape [6, 7]", "[B*L, d_model] = [2*L, 8]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)enc.forward(attn::Matrix<T>::Zero(5, 8), args); },
                                             {"src has shape [5, 8]", "[2*L, 8]"}));
  args.attn_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(3, 4));
  EXPECT_TRUE(throws_with<attn::shape_error>(
      [&] { (void)enc.forward(attn::Matrix<T>::Zero(6, 8), args); },
      {"attn_mask (src_mask) has shape [3, 4]", "[L, S] = [3, 3]", "[B*H*L, S] = [12, 3]"}));
  args.attn_mask = {};
  args.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(3, 3));
  EXPECT_TRUE(
      throws_with<attn::shape_error>([&] { (void)enc.forward(attn::Matrix<T>::Zero(6, 8), args); },
                                     {"key_padding_mask (src_key_padding_mask) has shape [3, 3]", "[B, S] = [2, 3]"}));
  args.key_padding_mask = {};
  args.batch = -1;
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)enc.forward(attn::Matrix<T>::Zero(6, 8), args); },
                                             {"batch must be positive, got -1"}));
  args.batch = 2;
  attn::Matrix<T> out(4, 8);
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { enc.forward_into(attn::Matrix<T>::Zero(6, 8), args, out); },
                                             {"out has shape [4, 8]", "[6, 8]"}));

  const attn::TransformerDecoderLayer<T> dec(8, 2, o);
  attn::DecoderArgs<T> d;
  d.batch = 2;
  const attn::Matrix<T> tgt = attn::Matrix<T>::Zero(6, 8), memory = attn::Matrix<T>::Zero(10, 8);
  EXPECT_TRUE(throws_with<attn::shape_error>(
      [&] { (void)dec.forward(tgt, attn::Matrix<T>::Zero(9, 8), d); },
      {"attn::TransformerDecoderLayer::forward", "memory has shape [9, 8]", "[B*S, d_model] = [2*S, 8]"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)dec.forward(tgt, attn::Matrix<T>::Zero(10, 4), d); },
                                             {"memory has shape [10, 4]"}));
  d.memory_masks.attn_bias = attn::AdditiveMask<T>(attn::Matrix<T>::Zero(3, 3));
  EXPECT_TRUE(throws_with<attn::shape_error>(
      [&] { (void)dec.forward(tgt, memory, d); },
      {"memory_masks.attn_bias (memory_mask) has shape [3, 3]", "[L, S] = [3, 5]", "[B*H*L, S] = [12, 5]"}));
  d.memory_masks.attn_bias = {};
  d.tgt_masks.attn_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(3, 5));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { (void)dec.forward(tgt, memory, d); },
                                             {"tgt_masks.attn_mask (tgt_mask) has shape [3, 5]", "[L, S] = [3, 3]"}));
  d.tgt_masks.attn_mask = {};
  d.memory_masks.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(2, 3));
  EXPECT_TRUE(throws_with<attn::shape_error>(
      [&] { (void)dec.forward(tgt, memory, d); },
      {"memory_masks.key_padding_mask (memory_key_padding_mask) has shape [2, 3]", "[B, S] = [2, 5]"}));
  d.memory_masks.key_padding_mask = {};
  attn::Matrix<T> mem_copy = memory.topRows(6);
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { dec.forward_into(tgt, mem_copy, d, mem_copy); },
                                                {"out must not be memory"}));

  attn::TransformerEncoder<T> stack(enc, 2);
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { (void)stack.layer(2); },
                                                {"attn::TransformerEncoder::layer", "index 2", "[0, 2)"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::TransformerEncoder<T>(enc, -1); }, {"num_layers"}));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { attn::TransformerEncoder<T>(enc, 2, attn::LayerNorm<T>(4)); },
                                             {"norm has normalized_shape = 4", "d_model = 8"}));
  attn::EncoderArgs<T> sa;
  sa.batch = 2;
  sa.attn_bias = attn::AdditiveMask<T>(attn::Matrix<T>::Zero(2, 2));
  EXPECT_TRUE(
      throws_with<attn::shape_error>([&] { (void)stack.forward(attn::Matrix<T>::Zero(6, 8), sa); },
                                     {"attn::TransformerEncoder::forward", "attn_bias (mask) has shape [2, 2]"}));
}

}  // namespace
