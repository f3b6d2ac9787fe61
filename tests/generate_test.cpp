// tests/generate_test.cpp - the pieces of a decoder-only language model and its generation loop:
// attn::Embedding, rope_frequencies and RopeScaling, Activation::GELUTanh, attn::DecoderLayer,
// attn::CausalLM, attn/generate.hpp (sampling_distribution, next_token, generate), and
// MultiHeadAttention's KV-cache calls (make_cache, append_kv, attend_into).
// Small cases by hand (the arithmetic in a comment); the rest as equalities between two routes to
// the same numbers: a layer against its parts composed by hand, a forward through the caches
// (prefill, steps, a batch) against the forward over the whole sequence, generate() against a
// hand-written loop over forward(). Errors are checked for the names in their messages, and for
// leaving the caches as they were.
#include <algorithm>
#include <attn/causal_lm.hpp>
#include <attn/decoder_layer.hpp>
#include <attn/embedding.hpp>
#include <attn/feed_forward.hpp>
#include <attn/generate.hpp>
#include <attn/multi_head_attention.hpp>
#include <attn/rope.hpp>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::Matrix;
using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;
using attn_test::tolerance;
using attn_test::vec;
using Prompts = std::vector<std::vector<int>>;  // token ids of several sequences

// throws_with for the two error types.
template <class F>
::testing::AssertionResult throws_arg(F f, std::initializer_list<const char*> fragments) {
  return throws_with<attn::argument_error>(f, fragments);
}
template <class F>
::testing::AssertionResult throws_shape(F f, std::initializer_list<const char*> fragments) {
  return throws_with<attn::shape_error>(f, fragments);
}

template <class T>
Matrix<T> random(Index rows, Index cols, std::uint64_t seed) {
  attn::Generator g(seed);
  Matrix<T> m(rows, cols);
  attn::init::normal(m, 1.0, g);
  return m;
}

// Norm weights 1 + N(0, 0.1^2) (LayerNorm's bias N(0, 0.1^2)), so that a norm in the wrong place shows.
template <class Norm>
Norm norm_of(Index dim, attn::Generator& gen) {
  Norm n(dim);
  attn::Vector<double> w(dim), b(dim);
  attn::init::normal(w, 0.1, gen);
  attn::init::normal(b, 0.1, gen);
  using T = typename std::decay_t<decltype(n.weight())>::Scalar;
  n.set_weight((w.array() + 1).cast<T>().matrix());
  if constexpr (std::is_same_v<Norm, attn::LayerNorm<T>>) n.set_bias(b.cast<T>());
  return n;
}

// --- Embedding -----------------------------------------------------------------------------------

template <class T>
class EmbeddingTest : public ::testing::Test {};
TYPED_TEST_SUITE(EmbeddingTest, attn_test::Scalars, attn_test::ScalarName);

// table [3, 2] = [[1, 2], [3, 4], [5, 6]], ids {2, 0, 2} -> rows 2, 0, 2 = [[5, 6], [1, 2], [5, 6]].
TYPED_TEST(EmbeddingTest, LooksUpRowsByHand) {
  using T = TypeParam;
  attn::Embedding<T> e(3, 2);
  e.set_weight(mat<T>({{1, 2}, {3, 4}, {5, 6}}));
  EXPECT_EQ(e.num_embeddings(), 3);
  EXPECT_EQ(e.embedding_dim(), 2);
  EXPECT_TRUE(matrices_near(e.forward({2, 0, 2}), mat<T>({{5, 6}, {1, 2}, {5, 6}}), 0));
  // From its parts: Embedding(Weight) looks up the same rows.
  const attn::Embedding<T> parts(attn::Weight<T>(mat<T>({{1, 2}, {3, 4}, {5, 6}})));
  EXPECT_TRUE(matrices_near(parts.forward({1}), mat<T>({{3, 4}}), 0));
  EXPECT_TRUE(
      throws_shape([] { attn::Embedding<T>{attn::Weight<T>()}; }, {"attn::Embedding", "weight has shape [0, 0]"}));
}

// A bf16 table keeps 8 significant bits, rounded to nearest even:
//   1.1     = 1.0001100|11..b  -> 1.0001101b         = 1 + 13/128     = 1.1015625
//   3.14159 = 1.1001001|00..b * 2 -> 1.1001001b * 2  = 2 * (1 + 73/128) = 3.140625
//   -1.7    = -1.1011001|10..b -> -1.1011010b       = -(1 + 90/128)  = -1.703125
//   2 and -0.5 are bf16 values, kept exactly.
TYPED_TEST(EmbeddingTest, Bf16TableReturnsTheRoundedRows) {
  using T = TypeParam;
  const attn::Embedding<T> e(attn::Weight<T>(mat<T>({{1.1, 3.14159}, {2, -0.5}, {2, -1.7}}), attn::Storage::BFloat16));
  EXPECT_EQ(e.storage(), attn::Storage::BFloat16);
  EXPECT_TRUE(matrices_near(e.forward({0, 2, 1}), mat<T>({{1.1015625, 3.140625}, {2, -1.703125}, {2, -0.5}}), 0));
  EXPECT_TRUE(matrices_near(e.weight().row(0), mat<T>({{1.1015625, 3.140625}}), 0));
}

TYPED_TEST(EmbeddingTest, BadIdsAndShapesThrowAndWriteNothing) {
  using T = TypeParam;
  const attn::Embedding<T> e(attn::Weight<T>(mat<T>({{1, 2}, {3, 4}, {5, 6}})));
  Matrix<T> out = Matrix<T>::Constant(3, 2, T(-9));
  const auto bad = [&] { e.forward_into({0, 7, 1}, out); };
  EXPECT_TRUE(throws_arg(bad, {"attn::Embedding::forward", "ids[1] = 7", "[0, 3)"}));
  EXPECT_TRUE(matrices_near(out, Matrix<T>::Constant(3, 2, T(-9)), 0));  // not even row 0
  EXPECT_TRUE(throws_arg([&] { (void)e.forward({-1}); }, {"ids[0] = -1", "[0, 3)"}));
  Matrix<T> wrong(2, 3);
  const auto bad_shape = [&] { e.forward_into({0, 1}, wrong); };
  EXPECT_TRUE(throws_shape(bad_shape, {"attn::Embedding::forward", "out has shape [2, 3]", "[2, 2]"}));
}

// --- RoPE frequencies and scaling ------------------------------------------------------------------

void expect_relative(const std::vector<double>& got, const std::vector<double>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t k = 0; k < want.size(); ++k) EXPECT_NEAR(got[k], want[k], 1e-12 * want[k]) << what << ", k = " << k;
}

// R = 6, base 10000: theta_k = 10000^(-2k/6) = {1, 10000^(-1/3), 10000^(-2/3)}
//   = {1, 0.046415888336127795, 0.0021544346900318843}.
// Linear, factor 2: each halved = {0.5, 0.023207944168063897, 0.0010772173450159421}.
// Llama3, factor 8, low_freq_factor 1, high_freq_factor 4, L0 = original_max_positions = 200:
//   wavelengths 2 pi / theta = {6.283185307179586, 135.36712389686338, 2916.3962761324638};
//   thresholds L0 / high = 50 and L0 / low = 200:
//   theta0: 6.28 < 50, kept = 1;  theta2: 2916 > 200, divided by 8 = 0.00026930433625398553;
//   theta1: smoothed, s = (200 / 135.36712389686338 - 1) / (4 - 1) = 0.15915453777974578,
//           (1 - s) theta1 / 8 + s theta1 = 0.012265872889067098.
attn::Rope llama3_rope() {
  attn::Rope r;
  r.scaling = {attn::RopeScalingType::Llama3, 8.0, 1.0, 4.0, 200.0};
  return r;
}

TEST(RopeFrequencies, ByHand) {
  attn::Rope rope;
  expect_relative(attn::rope_frequencies(rope, 6), {1.0, 0.046415888336127795, 0.0021544346900318843}, "none");
  rope.scaling.type = attn::RopeScalingType::Linear;
  rope.scaling.factor = 2;
  expect_relative(attn::rope_frequencies(rope, 6), {0.5, 0.023207944168063897, 0.0010772173450159421}, "linear");
  expect_relative(attn::rope_frequencies(llama3_rope(), 6), {1.0, 0.012265872889067098, 0.00026930433625398553},
                  "llama3");
}

TEST(RopeFrequencies, InvalidScalingIsAnArgumentError) {
  attn::Rope rope;
  rope.scaling.type = attn::RopeScalingType::Linear;
  rope.scaling.factor = 0;
  EXPECT_TRUE(throws_arg([&] { (void)attn::rope_frequencies(rope, 6); },
                         {"attn::rope_frequencies", "scaling.factor", "got 0"}));
  rope = llama3_rope();
  rope.scaling.low_freq_factor = 4;  // == high_freq_factor
  EXPECT_TRUE(throws_arg([&] { (void)attn::rope_frequencies(rope, 6); },
                         {"low_freq_factor < high_freq_factor", "got 4, 4, 200"}));
  rope.scaling.low_freq_factor = 5;                                         // > high_freq_factor
  EXPECT_THROW(attn::RopeCache<double>(6, 8, rope), attn::argument_error);  // the cache checks it too
}

template <class T>
class RopeScalingTest : public ::testing::Test {};
TYPED_TEST_SUITE(RopeScalingTest, attn_test::Scalars, attn_test::ScalarName);

// A RopeCache built with the Llama3 scaling above turns pair k (NeoX: features k and k + 3) by
// m theta'_k. x = [1, 1, 1, 0, 0, 0] at m = 37 -> [cos(37 theta'), sin(37 theta')], angles
// 37 theta' = {37, 0.45383729689548263, 0.009964260441397465}:
//   cos = {0.7654140519453434, 0.8987713850901932, 0.9999503571676686}
//   sin = {-0.6435381333569995, 0.4384176061052471, 0.009964095556148302}
TYPED_TEST(RopeScalingTest, ACacheRotatesByTheScaledFrequencies) {
  using T = TypeParam;
  const attn::RopeCache<T> rope(6, 40, llama3_rope());
  Matrix<T> x = mat<T>({{1, 1, 1, 0, 0, 0}});
  rope.apply(x, 1, 1, 37);
  EXPECT_TRUE(matrices_near(x,
                            mat<T>({{0.7654140519453434, 0.8987713850901932, 0.9999503571676686, -0.6435381333569995,
                                     0.4384176061052471, 0.009964095556148302}}),
                            tolerance<T>()));
}

// --- GELUTanh --------------------------------------------------------------------------------------

template <class T>
class GeluTanhTest : public ::testing::Test {};
TYPED_TEST_SUITE(GeluTanhTest, attn_test::Scalars, attn_test::ScalarName);

// gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), sqrt(2/pi) = 0.7978845608028654:
//   x = 1:  tanh(0.7978845608 * 1.044715) = tanh(0.8335619689391656) = 0.6823839812165535
//           -> 0.5 * 1.6823839812165535 = 0.8411919906082768 (0.841191990608276705 in 30 digits)
//   x = -2: tanh(0.7978845608 * (-2 - 0.35772)) = tanh(-1.8811883866961319) = -0.9545976940877751
//           -> -1 * (1 - 0.9545976940877751) = -0.04540230591222494
//   x = 0:  0
// With linear1 = linear2 = I (no biases), the block is the activation itself.
TYPED_TEST(GeluTanhTest, ByHand) {
  using T = TypeParam;
  attn::FeedForward<T> ff(3, 3, attn::Activation::GELUTanh, /*bias=*/false);
  ff.linear1().set_weight(Matrix<T>::Identity(3, 3));
  ff.linear2().set_weight(Matrix<T>::Identity(3, 3));
  EXPECT_EQ(ff.activation(), attn::Activation::GELUTanh);
  EXPECT_TRUE(matrices_near(ff.forward(mat<T>({{1, -2, 0}})), mat<T>({{0.8411919906082768, -0.04540230591222494, 0}}),
                            tolerance<T>()));
}

// --- DecoderLayer ----------------------------------------------------------------------------------

template <class T>
class DecoderLayerTest : public ::testing::Test {};
TYPED_TEST_SUITE(DecoderLayerTest, attn_test::Scalars, attn_test::ScalarName);

// The layer equals h = x + self_attn(norm1(x)); y = h + mlp(norm2(h)) written with the parts'
// own forwards, and through a cache (prefill 3 rows, then one at a time) it equals those rows.
template <class T, class Norm, class Mlp>
void check_layer(const Norm& n1, const attn::DecoderAttention<T>& a, const Norm& n2, const Mlp& mlp) {
  const attn::DecoderLayer<T> layer(n1, a, n2, mlp);
  const Matrix<T> x = random<T>(5, 8, 3);
  const Matrix<T> h = x + a.forward(n1.forward(x), 1);
  const Matrix<T> want = h + mlp.forward(n2.forward(h));
  EXPECT_TRUE(matrices_near(layer.forward(x, 1), want, tolerance<T>()));

  attn::KVCache<T> cache = layer.self_attn().make_cache(1, 8);
  EXPECT_TRUE(matrices_near(layer.forward(x.topRows(3), cache, 0), want.topRows(3), tolerance<T>())) << "prefill";
  for (Index t = 3; t < 5; ++t)
    EXPECT_TRUE(matrices_near(layer.forward(x.row(t), cache, 0), want.row(t), tolerance<T>())) << "position " << t;
  EXPECT_EQ(cache.size(0), 5);
}

TYPED_TEST(DecoderLayerTest, LlamaLayerEqualsItsPartsComposed) {
  using T = TypeParam;
  attn::Generator gen(1);
  attn::DecoderAttentionOptions o;
  o.num_kv_heads = 2;
  const attn::RMSNorm<T> n1 = norm_of<attn::RMSNorm<T>>(8, gen), n2 = norm_of<attn::RMSNorm<T>>(8, gen);
  const attn::DecoderAttention<T> a(8, 4, o, gen);
  const attn::SwiGLU<T> mlp(8, 12, false, gen);
  check_layer<T>(n1, a, n2, mlp);
}

TYPED_TEST(DecoderLayerTest, Gpt2LayerEqualsItsPartsComposed) {
  using T = TypeParam;
  attn::Generator gen(2);
  attn::DecoderAttentionOptions o;
  o.rope = std::nullopt;
  o.qkv_bias = o.o_bias = true;
  const attn::LayerNorm<T> n1 = norm_of<attn::LayerNorm<T>>(8, gen), n2 = norm_of<attn::LayerNorm<T>>(8, gen);
  const attn::DecoderAttention<T> a(8, 2, o, gen);
  const attn::FeedForward<T> mlp(8, 16, attn::Activation::GELUTanh, true, gen);
  check_layer<T>(n1, a, n2, mlp);
}

TYPED_TEST(DecoderLayerTest, MismatchedPartsAreShapeErrors) {
  using T = TypeParam;
  const attn::DecoderAttention<T> a(8, 2);
  EXPECT_TRUE(
      throws_shape([&] { attn::DecoderLayer<T>(attn::RMSNorm<T>(6), a, attn::RMSNorm<T>(8), attn::SwiGLU<T>(8, 12)); },
                   {"attn::DecoderLayer", "the norms have 6 and 8 features", "embed_dim is 8"}));
  EXPECT_TRUE(throws_shape(
      [&] { attn::DecoderLayer<T>(attn::LayerNorm<T>(8), a, attn::LayerNorm<T>(8), attn::FeedForward<T>(6, 12)); },
      {"attn::DecoderLayer", "mlp has d_model = 6", "embed_dim is 8"}));
  const attn::DecoderLayer<T> layer(attn::RMSNorm<T>(8), a, attn::RMSNorm<T>(8), attn::SwiGLU<T>(8, 12));
  EXPECT_TRUE(throws_shape([&] { (void)layer.forward(Matrix<T>::Zero(2, 7), 1); },
                           {"attn::DecoderLayer::forward", "x has shape [2, 7]", "[rows, 8]"}));
}

// --- CausalLM --------------------------------------------------------------------------------------

// The tiny models of the CausalLM and generate tests: vocab 11, E 8, two layers.
//   Llama's shape: RMSNorm, grouped-query attention (4 heads of 2, 2 kv heads, RoPE over 16 positions),
//   SwiGLU (ffn 12); the head tied to the embedding, or its own Linear [11, 8].
//   GPT-2's (gpt2 = true): LayerNorm, 2 heads with biases and no RoPE, a GELUTanh feed-forward (ffn
//   16), learned positions wpe [6, 8], the head tied.
template <class T>
attn::CausalLM<T> tiny_lm(bool tied, std::uint64_t seed = 1, bool gpt2 = false) {
  attn::Generator gen(seed);
  attn::DecoderAttentionOptions o;
  o.num_kv_heads = gpt2 ? 0 : 2;
  o.max_positions = 16;
  if (gpt2) {
    o.rope = std::nullopt;
    o.qkv_bias = o.o_bias = true;
  }
  using Norm = typename attn::DecoderLayer<T>::Norm;
  const auto norm = [&]() -> Norm {
    if (gpt2) return norm_of<attn::LayerNorm<T>>(8, gen);
    return norm_of<attn::RMSNorm<T>>(8, gen);
  };
  std::vector<attn::DecoderLayer<T>> layers;
  for (int i = 0; i < 2; ++i) {
    Norm n1 = norm(), n2 = norm();
    attn::DecoderAttention<T> a(8, gpt2 ? 2 : 4, o, gen);
    using Mlp = typename attn::DecoderLayer<T>::Mlp;
    Mlp mlp = gpt2 ? Mlp(attn::FeedForward<T>(8, 16, attn::Activation::GELUTanh, true, gen))
                   : Mlp(attn::SwiGLU<T>(8, 12, false, gen));
    layers.emplace_back(std::move(n1), std::move(a), std::move(n2), std::move(mlp));
  }
  attn::Embedding<T> embed(11, 8, gen);
  std::optional<attn::Embedding<T>> wpe;
  if (gpt2) wpe.emplace(6, 8, gen);
  Norm n = norm();
  std::optional<attn::Linear<T>> head;
  if (!tied) head.emplace(8, 11, false, gen);
  return attn::CausalLM<T>(std::move(embed), std::move(layers), std::move(n), std::move(head), std::move(wpe));
}
template <class T>
attn::CausalLM<T> tiny_gpt2() {
  return tiny_lm<T>(true, 5, true);
}

// logits [L, vocab] by hand: x = wte(ids) (+ wpe(0 .. L-1)), each layer's forward, the final norm,
// then lm_head, or x W^T with W the embedding table when tied.
template <class T>
Matrix<T> logits_by_hand(const attn::CausalLM<T>& lm, const std::vector<int>& ids) {
  Matrix<T> x = lm.embed_tokens().forward(ids);
  if (lm.embed_positions()) {
    std::vector<int> pos(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) pos[i] = int(i);
    x += lm.embed_positions()->forward(pos);
  }
  for (Index i = 0; i < lm.num_layers(); ++i) x = lm.layer(i).forward(x, 1);
  const Matrix<T> n = std::visit([&](const auto& norm) { return Matrix<T>(norm.forward(x)); }, lm.norm());
  if (lm.tied()) return n * lm.embed_tokens().weight().transpose();
  return lm.lm_head()->forward(n);
}

template <class T>
class CausalLMTest : public ::testing::Test {};
TYPED_TEST_SUITE(CausalLMTest, attn_test::Scalars, attn_test::ScalarName);

// For the Llama-shaped model with its head tied and untied, and the GPT-2-shaped one: forward(ids)
// equals the logits by hand, LogitRows::Last its last row, and a forward through the caches (one
// token at a time, or a prefill of 3 then steps) its rows.
TYPED_TEST(CausalLMTest, ForwardEqualsItsPartsAndTheForwardThroughTheCache) {
  using T = TypeParam;
  const std::vector<int> ids = {3, 1, 4, 1, 5, 9, 2};
  for (int model = 0; model < 3; ++model) {
    SCOPED_TRACE(model == 0 ? "tied" : model == 1 ? "untied" : "gpt2");
    const attn::CausalLM<T> lm = model == 2 ? tiny_gpt2<T>() : tiny_lm<T>(model == 0);
    EXPECT_EQ(lm.tied(), model != 1);
    EXPECT_EQ(lm.tied(), lm.lm_head() == nullptr);
    EXPECT_EQ((std::vector<Index>{lm.vocab_size(), lm.hidden_size(), lm.num_layers(), lm.max_positions()}),
              (std::vector<Index>{11, 8, 2, model == 2 ? 6 : 16}));
    const Index L = model == 2 ? 6 : 7;  // GPT-2's 6 learned positions
    const std::vector<int> seq(ids.begin(), ids.begin() + L);
    const Matrix<T> whole = lm.forward(seq);
    EXPECT_TRUE(matrices_near(whole, logits_by_hand(lm, seq), tolerance<T>()));
    EXPECT_TRUE(matrices_near(lm.forward(seq, attn::LogitRows::Last), whole.bottomRows(1), tolerance<T>()));
    auto steps = lm.make_cache(1);  // capacity max_positions()
    for (Index t = 0; t < L; ++t)
      ASSERT_TRUE(matrices_near(lm.forward({seq[std::size_t(t)]}, steps, 0), whole.row(t), tolerance<T>())) << t;
    auto chunks = lm.make_cache(1);
    const std::vector<int> prefill(seq.begin(), seq.begin() + 3);
    EXPECT_TRUE(matrices_near(lm.forward(prefill, chunks, 0), whole.topRows(3), tolerance<T>()));
    for (Index t = 3; t < L; ++t)
      EXPECT_TRUE(matrices_near(lm.forward({seq[std::size_t(t)]}, chunks, 0, attn::LogitRows::Last), whole.row(t),
                                tolerance<T>()));
    for (const auto& c : chunks) EXPECT_EQ(c.size(0), L);
  }
}

// forward_batch over 2 sequences of 3 tokens, then a step of one token each: every sequence's rows
// as when it runs alone (GPT-2: the positions restart at 0 in each sequence).
TYPED_TEST(CausalLMTest, ForwardBatchEqualsEachSequenceAlone) {
  using T = TypeParam;
  const Prompts seqs = {{3, 1, 4, 1}, {5, 9, 2, 6}};
  for (bool gpt2 : {false, true}) {
    SCOPED_TRACE(gpt2 ? "gpt2" : "llama");
    const attn::CausalLM<T> lm = gpt2 ? tiny_gpt2<T>() : tiny_lm<T>(true);
    auto cache = lm.make_cache(2, 6);
    const Matrix<T> prefill = lm.forward_batch({3, 1, 4, 5, 9, 2}, cache);
    const Matrix<T> step = lm.forward_batch({1, 6}, cache, attn::LogitRows::Last);
    ASSERT_EQ(prefill.rows(), 6);
    ASSERT_EQ(step.rows(), 2);
    for (Index b = 0; b < 2; ++b) {
      const Matrix<T> alone = lm.forward(seqs[std::size_t(b)]);
      EXPECT_TRUE(matrices_near(prefill.middleRows(3 * b, 3), alone.topRows(3), tolerance<T>())) << b;
      EXPECT_TRUE(matrices_near(step.row(b), alone.row(3), tolerance<T>())) << b;
    }
  }
}

// Every rejected call names its problem and leaves every layer's cache as it was.
TYPED_TEST(CausalLMTest, ErrorsLeaveTheCachesUnchanged) {
  using T = TypeParam;
  const attn::CausalLM<T> lm = tiny_lm<T>(false);
  auto cache = lm.make_cache(2, 5);
  (void)lm.forward({1, 2, 3}, cache, 0);
  const auto sizes = [&] {
    std::vector<Index> s;
    for (const auto& c : cache) s.insert(s.end(), {c.size(0), c.size(1)});
    return s;
  };
  const std::vector<Index> before = sizes();
  ASSERT_EQ(before, (std::vector<Index>{3, 0, 3, 0}));
  const Matrix<T> keys = cache[1].keys(0, 1);
  const char* fwd = "attn::CausalLM::forward";
  auto one_layer = typename attn::CausalLM<T>::Cache(cache.begin(), cache.begin() + 1);
  EXPECT_TRUE(throws_arg([&] { lm.forward({1}, one_layer, 0); }, {fwd, "the cache has 1 layers, the model 2"}));
  EXPECT_TRUE(throws_arg([&] { lm.forward({4, 5, 6}, cache, 0); }, {fwd, "appending 3 tokens", "takes 2 more"}));
  EXPECT_TRUE(throws_arg([&] { lm.forward({4, 11}, cache, 0); }, {"ids[1] = 11", "[0, 11)"}));
  EXPECT_TRUE(throws_arg([&] { lm.forward({4}, cache, 2); }, {fwd, "sequence 2", "batch [0, 2)"}));
  EXPECT_TRUE(throws_arg([&] { lm.forward({}, cache, 0); }, {fwd, "ids is empty"}));
  EXPECT_TRUE(throws_arg([&] { lm.forward_batch({4, 5}, cache); }, {"forward_batch", "0 and 1 hold 3 and 0"}));
  EXPECT_TRUE(throws_arg([&] { lm.forward_batch({4, 5, 6}, one_layer); }, {"the cache has 1 layers"}));
  // A later layer's cache that does not fit (head count; room) fails before the first layer appends.
  auto mixed = cache;
  mixed[1] = attn::KVCache<T>(2, 4, 1, 5);
  EXPECT_TRUE(throws_shape([&] { lm.forward({4}, mixed, 0); }, {fwd, "the cache of layer 1 holds 4 kv heads"}));
  mixed[1] = attn::KVCache<T>(2, 2, 2, 4);
  mixed[1].append(0, Matrix<T>::Zero(3, 4), Matrix<T>::Zero(3, 4));  // 3 of 4 positions, as layer 0
  EXPECT_TRUE(throws_arg([&] { lm.forward({4, 5}, mixed, 0); }, {fwd, "takes 1 more (layer 1)"}));
  EXPECT_EQ(mixed[0].size(0), 3);
  EXPECT_EQ(sizes(), before);
  EXPECT_EQ(Matrix<T>(cache[1].keys(0, 1)), keys);

  // GPT-2: positions past the 6 learned ones, with no cache or through one of capacity 10.
  const attn::CausalLM<T> gpt2 = tiny_gpt2<T>();
  const auto too_long = [&] { (void)gpt2.forward({1, 2, 3, 4, 5, 6, 7}); };
  EXPECT_TRUE(throws_arg(too_long, {fwd, "positions [0, 7) exceed the model's learned positions [0, 6)"}));
  auto long_cache = gpt2.make_cache(1, 10);
  (void)gpt2.forward({1, 2, 3, 4}, long_cache, 0);
  EXPECT_TRUE(throws_arg([&] { gpt2.forward({5, 6, 7}, long_cache, 0); }, {"positions [4, 7) exceed"}));
  for (const auto& c : long_cache) EXPECT_EQ(c.size(0), 4);
}

// --- sampling_distribution, next_token -------------------------------------------------------------

template <class T>
class SamplingTest : public ::testing::Test {};
TYPED_TEST_SUITE(SamplingTest, attn_test::Scalars, attn_test::ScalarName);

template <class T>
void expect_distribution(const attn::Vector<T>& logits, const attn::GenerationOptions& o,
                         const std::vector<double>& want, const char* what) {
  const std::vector<double> p = attn::sampling_distribution<T>(logits, o);
  ASSERT_EQ(p.size(), want.size()) << what;
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(p[i], want[i], tolerance<T>()) << what << ", token " << i;
}

// logits {0, ln 2, ln 4}: softmax = {1, 2, 4} / 7.
//   top_k = 2: tokens 2, 1 kept -> {0, 2, 4} / 6 = {0, 1/3, 2/3}.
//   top_p = 0.5: by probability 4/7, 2/7, 1/7; the mass before token 2 is 0 < 0.5 (kept), before
//     token 1 it is 4/7 >= 0.5 (dropped) -> {0, 0, 1}.
//   top_p = 0.6: before token 1 4/7 = 0.571 < 0.6 (kept), before token 0 6/7 (dropped) -> {0, 1/3, 2/3}.
//   temperature 2: exp(logits / 2) = {1, sqrt 2, 2} -> / (3 + sqrt 2) = {0.22654091966098644,
//     0.3203772410170408, 0.4530818393219729}.
// Ties at the k-th: logits {1, 3, 2, 3, 2}; top_k = 1 keeps both 3s -> {0, 1/2, 0, 1/2, 0};
//   top_k = 3 keeps both 3s and both 2s: e^3 : e^2 = e : 1 -> the 3s e / (2e + 2) = 0.36552928931500245,
//   the 2s 1 / (2e + 2) = 0.13447071068499755.
TYPED_TEST(SamplingTest, DistributionByHand) {
  using T = TypeParam;
  const attn::Vector<T> logits = vec<T>({0, std::log(2.0), std::log(4.0)});
  attn::GenerationOptions o;
  expect_distribution<T>(logits, o, {1.0 / 7, 2.0 / 7, 4.0 / 7}, "softmax");
  o.top_k = 2;
  expect_distribution<T>(logits, o, {0, 1.0 / 3, 2.0 / 3}, "top_k 2");
  o.top_k = 0, o.top_p = 0.5;
  expect_distribution<T>(logits, o, {0, 0, 1}, "top_p 0.5");
  o.top_p = 0.6;
  expect_distribution<T>(logits, o, {0, 1.0 / 3, 2.0 / 3}, "top_p 0.6");
  o.top_p = 1, o.temperature = 2;
  expect_distribution<T>(logits, o, {0.22654091966098644, 0.3203772410170408, 0.4530818393219729}, "temperature 2");

  const attn::Vector<T> ties = vec<T>({1, 3, 2, 3, 2});
  attn::GenerationOptions t;
  t.top_k = 1;
  expect_distribution<T>(ties, t, {0, 0.5, 0, 0.5, 0}, "top_k 1, tied");
  t.top_k = 3;
  const double hi = 0.36552928931500245, lo = 0.13447071068499755;
  expect_distribution<T>(ties, t, {0, hi, lo, hi, lo}, "top_k 3, tied");
}

TYPED_TEST(SamplingTest, BadLogitsAndOptionsAreArgumentErrors) {
  using T = TypeParam;
  attn::GenerationOptions o;
  const auto fails = [&](const attn::Vector<T>& logits, const char* what) {
    return throws_arg([&] { (void)attn::sampling_distribution<T>(logits, o); }, {"attn::sampling_distribution", what});
  };
  const attn::Vector<T> logits = vec<T>({0, 1, 2});
  EXPECT_TRUE(fails(vec<T>({0, std::nan(""), 2}), "logits[1] is nan: logits must be finite or -inf"));
  const T inf = std::numeric_limits<T>::infinity();
  EXPECT_TRUE(fails(vec<T>({0, 1, inf}), "logits[2] is inf: logits must be finite or -inf"));
  EXPECT_TRUE(fails(vec<T>({-inf, -inf}), "every logit is -inf"));
  // -inf is a token never drawn: {-inf, 0, ln 3} -> {0, 1/4, 3/4}.
  const std::vector<double> p = attn::sampling_distribution<T>(vec<T>({-1.0 / 0.0, 0, std::log(3.0)}), o);
  EXPECT_EQ(p[0], 0.0);
  EXPECT_NEAR(p[1], 0.25, 1e-6);
  EXPECT_NEAR(p[2], 0.75, 1e-6);
  attn::Generator gen(0);
  EXPECT_TRUE(throws_arg([&] { (void)attn::next_token<T>(vec<T>({0, std::nan(""), 2}), {}, gen); },
                         {"attn::next_token", "logits[1] is NaN"}));  // greedy too
  for (double temperature : {0.0, -1.0, std::nan("")}) {
    o.temperature = temperature;
    EXPECT_TRUE(fails(logits, "temperature must be finite and > 0"));
  }
  o.temperature = 1;
  for (double top_p : {0.0, 1.5, -0.5}) {
    o.top_p = top_p;
    EXPECT_TRUE(fails(logits, "top_p must be in (0, 1]"));
  }
}

TYPED_TEST(SamplingTest, NextTokenGreedyAndSampled) {
  using T = TypeParam;
  attn::Generator unused(0);
  EXPECT_EQ(attn::next_token<T>(vec<T>({1, 5, 2, 5}), {}, unused), 1);  // the lowest id among the maxima
  EXPECT_EQ(attn::next_token<T>(vec<T>({0, 0, 0}), {}, unused), 0);

  const attn::Vector<T> logits = vec<T>({0, std::log(2.0), std::log(4.0)});
  attn::GenerationOptions o;
  o.do_sample = true;
  attn::Generator g1(7), g2(7);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(attn::next_token<T>(logits, o, g1), attn::next_token<T>(logits, o, g2));
  // 20000 draws: each frequency within 0.015 of {1, 2, 4} / 7 (sd sqrt(p(1-p)/n) <= 0.0036); with
  // top_k = 2 of {0, 1/3, 2/3}, token 0 never.
  for (Index top_k : {0, 2}) {
    o.top_k = top_k;
    const std::vector<double> want =
        top_k ? std::vector<double>{0, 1.0 / 3, 2.0 / 3} : std::vector<double>{1.0 / 7, 2.0 / 7, 4.0 / 7};
    std::vector<int> count(3, 0);
    attn::Generator g(42);
    for (int i = 0; i < 20000; ++i) ++count[std::size_t(attn::next_token<T>(logits, o, g))];
    for (std::size_t k = 0; k < 3; ++k) EXPECT_NEAR(count[k] / 20000.0, want[k], 0.015) << "top_k " << top_k;
    if (top_k) {
      EXPECT_EQ(count[0], 0);
    }
  }
}

// --- generate --------------------------------------------------------------------------------------

template <class T>
class GenerateTest : public ::testing::Test {};
TYPED_TEST_SUITE(GenerateTest, attn_test::Scalars, attn_test::ScalarName);

// Greedy by hand: the argmax (lowest id among equals) of the last row of forward(ids), appended.
template <class T>
std::vector<int> greedy_by_hand(const attn::CausalLM<T>& lm, std::vector<int> ids, int n) {
  std::vector<int> out;
  for (int i = 0; i < n; ++i) {
    const Matrix<T> logits = lm.forward(ids);
    int best = 0;
    for (int v = 1; v < logits.cols(); ++v)
      if (logits(logits.rows() - 1, v) > logits(logits.rows() - 1, best)) best = v;
    out.push_back(best);
    ids.push_back(best);
  }
  return out;
}

TYPED_TEST(GenerateTest, GreedyEqualsALoopOverForwardAndStopsAtStopTokens) {
  using T = TypeParam;
  const attn::CausalLM<T> lm = tiny_lm<T>(false);
  attn::GenerationOptions o;
  o.max_new_tokens = 8;
  const std::vector<int> want = greedy_by_hand(lm, {1, 2, 3}, 8);
  EXPECT_EQ(attn::generate(lm, std::vector<int>{1, 2, 3}, o), want);
  // A stop token ends the sequence after its first occurrence, which is kept.
  o.stop_tokens = {want[4], 10};
  const auto first = std::find(want.begin(), want.end(), want[4]);
  EXPECT_EQ(attn::generate(lm, std::vector<int>{1, 2, 3}, o), std::vector<int>(want.begin(), first + 1));
  o.max_new_tokens = 0;
  EXPECT_EQ(attn::generate(lm, Prompts{{1}, {2, 3}}, o), (Prompts{{}, {}}));
}

// Prompts of different lengths (each sequence steps alone) and of one length (forward_batch), greedy
// and sampled: each sequence's tokens as when its prompt runs alone, sequence b sampled with seed + b.
TYPED_TEST(GenerateTest, ABatchEqualsEachPromptAlone) {
  using T = TypeParam;
  const attn::CausalLM<T> lm = tiny_lm<T>(false, 2);
  for (bool sample : {false, true}) {
    attn::GenerationOptions o;
    o.max_new_tokens = 6;
    o.do_sample = sample;
    o.temperature = 0.9, o.top_k = 6, o.top_p = 0.95, o.seed = 11;
    for (const Prompts& prompts : {Prompts{{1, 2, 3}, {4, 5}, {6, 7, 8, 9}}, Prompts{{1, 2}, {3, 4}}}) {
      const auto batched = attn::generate(lm, prompts, o);
      ASSERT_EQ(batched.size(), prompts.size());
      for (std::size_t b = 0; b < prompts.size(); ++b) {
        attn::GenerationOptions alone = o;
        alone.seed = o.seed + b;
        EXPECT_EQ(batched[b], attn::generate(lm, prompts[b], alone)) << "sample " << sample << ", sequence " << b;
        EXPECT_EQ(batched[b].size(), 6u);
      }
    }
  }
}

// The callback sees every token in order, step by step, sequence 0 before 1; returning false on
// sequence 0's second token ends it there, and sequence 1 runs on.
TYPED_TEST(GenerateTest, TheCallbackSeesEveryTokenAndCanStopASequence) {
  using T = TypeParam;
  const attn::CausalLM<T> lm = tiny_lm<T>(false);
  attn::GenerationOptions o;
  o.max_new_tokens = 5;
  std::vector<std::pair<Index, int>> seen;
  const auto out = attn::generate(lm, Prompts{{1, 2, 3}, {6, 7, 8, 9}}, o, [&](Index b, int t) {
    seen.emplace_back(b, t);
    return !(b == 0 && std::count_if(seen.begin(), seen.end(), [](const auto& s) { return s.first == 0; }) == 2);
  });
  ASSERT_EQ(out.size(), 2u);
  const std::vector<int> full0 = attn::generate(lm, std::vector<int>{1, 2, 3}, o);
  EXPECT_EQ(out[0], std::vector<int>(full0.begin(), full0.begin() + 2));
  EXPECT_EQ(out[1], attn::generate(lm, std::vector<int>{6, 7, 8, 9}, o));
  std::vector<std::pair<Index, int>> want;
  for (std::size_t step = 0; step < 5; ++step)
    for (Index b = 0; b < 2; ++b)
      if (step < out[std::size_t(b)].size()) want.emplace_back(b, out[std::size_t(b)][step]);
  EXPECT_EQ(seen, want);
}

TYPED_TEST(GenerateTest, BadPromptsAndLengthsAreArgumentErrors) {
  using T = TypeParam;
  const attn::CausalLM<T> lm = tiny_lm<T>(false);  // max_positions 16
  attn::GenerationOptions o;
  const auto gen = [&](Prompts p) { return [&lm, &o, p] { (void)attn::generate(lm, p, o); }; };
  const std::vector<int> ten = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  // The last new token is never fed back: 10 prompt tokens and 7 new ones need 10 + 6 = 16 positions.
  o.max_new_tokens = 7;
  EXPECT_EQ(attn::generate(lm, ten, o).size(), 7u);
  o.max_new_tokens = 8;  // 10 + 7 = 17 > 16
  EXPECT_TRUE(throws_arg(gen({{1}, ten}), {"attn::generate", "the longest prompt (10 tokens) and 8 new tokens need 17",
                                           "max_positions = 16"}));
  o.max_new_tokens = 0;  // nothing to generate, whatever the length
  EXPECT_EQ(attn::generate(lm, std::vector<int>(16, 1), o), std::vector<int>{});
  o.max_new_tokens = 4;
  EXPECT_TRUE(throws_arg(gen({{1}, {}}), {"attn::generate", "prompts[1] is empty"}));
  EXPECT_TRUE(throws_arg(gen({{1, 2, 11}}), {"prompts[0][2] = 11", "vocabulary [0, 11)"}));
  EXPECT_TRUE(throws_arg(gen({{-1}}), {"prompts[0][0] = -1"}));
  o.do_sample = true, o.temperature = 0;
  EXPECT_TRUE(throws_arg(gen({{1}}), {"attn::generate", "temperature"}));
}

// --- MultiHeadAttention against a KV cache ---------------------------------------------------------

template <class T>
class MhaCacheTest : public ::testing::Test {};
TYPED_TEST_SUITE(MhaCacheTest, attn_test::Scalars, attn_test::ScalarName);

// The row of sequence b, position l of a [B*n, E] matrix in the module's order: (b, l) with
// batch_first, else (l, b).
Index row_of(bool batch_first, Index B, Index n, Index b, Index l) { return batch_first ? b * n + l : l * B + b; }

// Positions [l0, l0 + n) of every sequence of x [B*L, E], in the module's order.
template <class T>
Matrix<T> positions(const Matrix<T>& x, bool batch_first, Index B, Index L, Index l0, Index n) {
  Matrix<T> y(B * n, x.cols());
  for (Index b = 0; b < B; ++b)
    for (Index l = 0; l < n; ++l) y.row(row_of(batch_first, B, n, b, l)) = x.row(row_of(batch_first, B, L, b, l0 + l));
  return y;
}

template <class T>
attn::MultiHeadAttention<T> mha(bool batch_first) {
  attn::Generator gen(9);
  attn::MhaOptions o;
  o.batch_first = batch_first;
  attn::MultiHeadAttention<T> m(8, 2, o, gen);
  attn::Vector<T> bias(24);
  attn::init::normal(bias, 0.5, gen);
  m.set_in_proj_bias(bias);
  return m;
}

// Self-attention, B = 2, L = 5: appending each chunk's keys and values and attending its queries
// equals forward() over the whole sequences with causal TopLeft, row for row; chunks of one
// position, and a prefill of 3 (rows in the module's order) then steps.
TYPED_TEST(MhaCacheTest, SelfAttentionStepsEqualTheCausalForward) {
  using T = TypeParam;
  const Index B = 2, L = 5;
  for (bool bf : {true, false}) {
    const attn::MultiHeadAttention<T> m = mha<T>(bf);
    const Matrix<T> x = random<T>(B * L, 8, 6);
    attn::MhaArgs<T> args = attn_test::batch_of<attn::MhaArgs<T>>(B);
    args.causal = attn::Causal::TopLeft;
    const Matrix<T> whole = m.forward(x, x, x, args).output;
    for (const std::vector<Index>& chunks : {std::vector<Index>{1, 1, 1, 1, 1}, std::vector<Index>{3, 1, 1}}) {
      attn::KVCache<T> cache = m.make_cache(B, L);
      Index l0 = 0;
      for (Index n : chunks) {
        const Matrix<T> step = positions(x, bf, B, L, l0, n);
        m.append_kv(step, step, cache);
        Matrix<T> y(B * n, 8);
        m.attend_into(step, cache, attn::CacheArgs<T>(), y);
        EXPECT_TRUE(matrices_near(y, positions(whole, bf, B, L, l0, n), tolerance<T>()))
            << "batch_first " << bf << ", positions [" << l0 << ", " << l0 + n << ") of chunks " << chunks.size();
        l0 += n;
      }
      EXPECT_EQ(cache.size(0), L);
      EXPECT_EQ(cache.size(1), L);
    }
  }
}

// Cross-attention, B = 2: the memory's keys and values appended once; queries attend them with no
// causal mask and a key_padding_mask [B, S] (sequence 1 ignores its last two keys), as forward() does.
TYPED_TEST(MhaCacheTest, CrossAttentionEqualsTheForward) {
  using T = TypeParam;
  const Index B = 2, S = 4, L = 3;
  for (bool bf : {true, false}) {
    const attn::MultiHeadAttention<T> m = mha<T>(bf);
    const Matrix<T> memory = random<T>(B * S, 8, 7), q = random<T>(B * L, 8, 8);
    const attn::IgnoreMask padding(attn_test::bmat({{0, 0, 0, 0}, {0, 0, 1, 1}}));
    attn::MhaArgs<T> args = attn_test::batch_of<attn::MhaArgs<T>>(B);
    args.key_padding_mask = padding;
    const Matrix<T> want = m.forward(q, memory, memory, args).output;
    attn::KVCache<T> cache = m.make_cache(B, S);
    m.append_kv(memory, memory, cache);
    attn::CacheArgs<T> c;
    c.causal = attn::Causal::None;
    c.key_padding_mask = padding;
    Matrix<T> y(B * L, 8);
    m.attend_into(q, cache, c, y);
    EXPECT_TRUE(matrices_near(y, want, tolerance<T>())) << "batch_first " << bf;
    Matrix<T> one(B, 8);  // a decoding step's queries against the same cache
    m.attend_into(positions(q, bf, B, L, 2, 1), cache, c, one);
    EXPECT_TRUE(matrices_near(one, positions(want, bf, B, L, 2, 1), tolerance<T>())) << "batch_first " << bf;
  }
}

TYPED_TEST(MhaCacheTest, RefusesBiasKvAndAMismatchedCache) {
  using T = TypeParam;
  attn::MhaOptions o;
  o.add_bias_kv = true;
  const attn::MultiHeadAttention<T> biased(8, 2, o);
  attn::KVCache<T> cache = biased.make_cache(1, 4);
  const Matrix<T> x = random<T>(2, 8, 1);
  Matrix<T> y(2, 8);
  EXPECT_TRUE(
      throws_arg([&] { biased.append_kv(x, x, cache); }, {"attn::MultiHeadAttention::append_kv", "add_bias_kv"}));
  EXPECT_TRUE(throws_arg([&] { biased.attend_into(x, cache, attn::CacheArgs<T>(), y); },
                         {"attn::MultiHeadAttention::attend_into", "add_bias_kv"}));
  const attn::MultiHeadAttention<T> m(8, 2);  // 2 heads of 4
  attn::KVCache<T> wrong(1, 4, 2, 4);         // 4 heads of 2
  EXPECT_TRUE(
      throws_shape([&] { m.append_kv(x, x, wrong); },
                   {"attn::MultiHeadAttention::append_kv", "the cache holds 4 heads of 2", "this attention 2 of 4"}));
  EXPECT_TRUE(
      throws_shape([&] { m.attend_into(x, wrong, attn::CacheArgs<T>(), y); }, {"the cache holds 4 heads of 2"}));
  EXPECT_EQ(cache.size(0), 0);
  EXPECT_EQ(wrong.size(0), 0);
}

}  // namespace
