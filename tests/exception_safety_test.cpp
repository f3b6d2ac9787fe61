// tests/exception_safety_test.cpp - the strong guarantee: a call that throws leaves the module (and
// the caller's output buffer) as it was, bit for bit. For every module with parameters, each setter
// given a wrong shape or a parameter the module does not have, and each load_state_dict given a
// wrong shape (the last parameter, so that a loader assigning as it went would already have changed
// the rest) or an unexpected key: every parameter (through io::state_dict) and a forward output are
// compared bitwise before and after.
//
// Already covered elsewhere, and not repeated here: failed load_state_dict of Linear and
// MultiHeadAttention (state_dict_test), of the transformer layers and the encoder
// (transformer_state_dict_test), RMSNorm's wrong weight length (rms_norm_test), SwiGLU's unexpected
// bias keys (swiglu_test), and the KV cache and DecoderAttention's cache calls (kv_cache_test,
// decoder_attention_test).
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "attn/attn.hpp"
#include "attn/io/state_dict.hpp"
#include "support/state_dict_compare.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::io::StateDict;
using attn::io::Tensor;
template <class T>
using Mat = attn::Matrix<T>;

template <class A, class B>
::testing::AssertionResult same_bits(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return ::testing::AssertionFailure() << "different shapes";
  if (a.size() && std::memcmp(a.data(), b.data(), sizeof(*a.data()) * static_cast<std::size_t>(a.size())) != 0)
    return ::testing::AssertionFailure() << "different bytes";
  return ::testing::AssertionSuccess();
}

using attn_test::identical;

template <class T>
Mat<T> random(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Mat<T>::Random(rows, cols);
}

// `bad` must throw Exception and leave `m` with the parameters and the forward output it had.
template <class Exception, class Module, class Forward, class Bad>
void expect_unchanged(Module& m, const Forward& forward, const Bad& bad, const std::string& what) {
  SCOPED_TRACE(what);
  const auto before = attn::io::state_dict(m);
  const auto y = forward(m);
  EXPECT_THROW(bad(m), Exception);
  EXPECT_TRUE(identical(attn::io::state_dict(m), before));
  EXPECT_TRUE(same_bits(forward(m), y));
}

// The module's own state dict with one tensor replaced: `key` gets a tensor of the wrong shape.
template <class T, class Module>
StateDict<T> with_wrong(const Module& src, const std::string& key, attn::io::TensorShape shape) {
  StateDict<T> sd = attn::io::state_dict(src);
  Index n = 1;
  for (const auto s : shape) n *= Index(s);
  sd.set(key, Tensor<T>(shape, Mat<T>::Constant(1, n, T(3))));
  return sd;
}

template <class T>
class StrongGuarantee : public ::testing::Test {};
TYPED_TEST_SUITE(StrongGuarantee, attn_test::Scalars, attn_test::ScalarName);

TYPED_TEST(StrongGuarantee, LinearSetters) {
  using T = TypeParam;
  attn::Generator gen(1);
  attn::Linear<T> fc(4, 3, true, gen);
  attn::Linear<T> no_bias(4, 3, false, gen);
  const Mat<T> x = random<T>(5, 4, 2);
  const auto fwd = [&](const attn::Linear<T>& m) { return m.forward(x); };
  using attn::argument_error;
  using attn::shape_error;
  expect_unchanged<shape_error>(fc, fwd, [](auto& m) { m.set_weight(Mat<T>::Ones(4, 3)); }, "weight transposed");
  expect_unchanged<shape_error>(fc, fwd, [](auto& m) { m.set_bias(attn::Vector<T>::Ones(4)); }, "bias [4]");
  expect_unchanged<argument_error>(no_bias, fwd, [](auto& m) { m.set_bias(attn::Vector<T>::Ones(3)); },
                                   "bias = false");
  // A strict load with every key right but the bias.
  expect_unchanged<shape_error>(
      fc, fwd, [&](auto& m) { attn::io::load_state_dict(m, with_wrong<T>(attn::Linear<T>(4, 3, true, gen), "bias", {1, 3})); },
      "load_state_dict, bias [1, 3]");
}

TYPED_TEST(StrongGuarantee, LayerNormSettersAndLoad) {
  using T = TypeParam;
  attn::LayerNorm<T> norm(4);
  norm.set_weight(attn_test::vec<T>({1, 2, 3, 4}));
  norm.set_bias(attn_test::vec<T>({0.5, -1, 0, 2}));
  attn::LayerNorm<T> no_bias(4, 1e-5, true, false), no_affine(4, 1e-5, false);
  const Mat<T> x = random<T>(3, 4, 3);
  const auto fwd = [&](const attn::LayerNorm<T>& m) { return m.forward(x); };
  using attn::argument_error;
  using attn::shape_error;
  expect_unchanged<shape_error>(norm, fwd, [](auto& m) { m.set_weight(attn::Vector<T>::Ones(5)); }, "weight [5]");
  expect_unchanged<shape_error>(norm, fwd, [](auto& m) { m.set_bias(attn::Vector<T>::Ones(3)); }, "bias [3]");
  expect_unchanged<argument_error>(no_bias, fwd, [](auto& m) { m.set_bias(attn::Vector<T>::Ones(4)); }, "bias = false");
  expect_unchanged<argument_error>(no_affine, fwd, [](auto& m) { m.set_weight(attn::Vector<T>::Ones(4)); },
                                   "elementwise_affine = false");
  for (const bool strict : {true, false})
    expect_unchanged<shape_error>(
        norm, fwd,
        [&](auto& m) { attn::io::load_state_dict(m, with_wrong<T>(attn::LayerNorm<T>(4), "bias", {4, 1}), "", strict); },
        "load_state_dict, bias [4, 1], strict = " + std::to_string(strict));
}

TYPED_TEST(StrongGuarantee, RMSNormSetterAndLoad) {
  using T = TypeParam;
  attn::RMSNorm<T> norm(4);
  norm.set_weight(attn_test::vec<T>({1, -2, 3, 0.5}));
  const Mat<T> x = random<T>(3, 4, 4);
  const auto fwd = [&](const attn::RMSNorm<T>& m) { return m.forward(x); };
  expect_unchanged<attn::shape_error>(norm, fwd, [](auto& m) { m.set_weight(attn::Vector<T>::Ones(3)); }, "weight [3]");
  expect_unchanged<attn::shape_error>(
      norm, fwd,
      [&](auto& m) { attn::io::load_state_dict(m, with_wrong<T>(attn::RMSNorm<T>(4), "weight", {1, 4}), "", false); },
      "non-strict load_state_dict, weight [1, 4]");
  StateDict<T> extra = attn::io::state_dict(attn::RMSNorm<T>(4));
  extra.set("bias", Tensor<T>::from_vector(attn::Vector<T>::Ones(4)));
  expect_unchanged<attn::format_error>(norm, fwd, [&](auto& m) { attn::io::load_state_dict(m, extra); },
                                       "strict load_state_dict, unexpected bias");
}

TYPED_TEST(StrongGuarantee, SwiGLUAndFeedForwardLoadsAndSetters) {
  using T = TypeParam;
  attn::Generator gen(5);
  attn::SwiGLU<T> mlp(4, 6, true, gen);
  const Mat<T> x = random<T>(3, 4, 6);
  const auto fwd = [&](const attn::SwiGLU<T>& m) { return m.forward(x); };
  const attn::SwiGLU<T> other(4, 6, true, gen);
  for (const bool strict : {true, false})
    expect_unchanged<attn::shape_error>(
        mlp, fwd,
        [&](auto& m) { attn::io::load_state_dict(m, with_wrong<T>(other, "down_proj.bias", {1, 4}), "", strict); },
        "SwiGLU load_state_dict, down_proj.bias [1, 4], strict = " + std::to_string(strict));
  expect_unchanged<attn::shape_error>(mlp, fwd, [](auto& m) { m.down_proj().set_weight(Mat<T>::Ones(6, 4)); },
                                      "SwiGLU down_proj.weight transposed");

  attn::FeedForward<T> ff(4, 6, attn::Activation::GELU, true, gen);
  const auto ff_fwd = [&](const attn::FeedForward<T>& m) { return m.forward(x); };
  const attn::FeedForward<T> ff_other(4, 6, attn::Activation::GELU, true, gen);
  expect_unchanged<attn::shape_error>(
      ff, ff_fwd, [&](auto& m) { attn::io::load_state_dict(m, with_wrong<T>(ff_other, "linear2.bias", {5})); },
      "FeedForward load_state_dict, linear2.bias [5]");
  expect_unchanged<attn::shape_error>(ff, ff_fwd, [](auto& m) { m.linear1().set_bias(attn::Vector<T>::Ones(4)); },
                                      "FeedForward linear1.bias [4]");
}

TYPED_TEST(StrongGuarantee, MultiHeadAttentionSetters) {
  using T = TypeParam;
  using attn::argument_error;
  using attn::shape_error;
  attn::Generator gen(7);
  attn::MhaOptions kv;
  kv.add_bias_kv = true;
  attn::MultiHeadAttention<T> packed(8, 2, kv, gen);
  packed.set_in_proj_bias(random<T>(24, 1, 8));
  const Mat<T> x = random<T>(5, 8, 9);
  const auto fwd = [&](const attn::MultiHeadAttention<T>& m) { return m.forward(x, x, x, attn_test::batch_of<attn::MhaArgs<T>>(1)).output; };
  expect_unchanged<shape_error>(packed, fwd, [](auto& m) { m.set_in_proj_weight(Mat<T>::Ones(8, 24)); },
                                "in_proj_weight transposed");
  expect_unchanged<shape_error>(packed, fwd, [](auto& m) { m.set_in_proj_bias(attn::Vector<T>::Ones(16)); },
                                "in_proj_bias [16]");
  expect_unchanged<shape_error>(packed, fwd, [](auto& m) { m.set_bias_k(attn::Vector<T>::Ones(9)); }, "bias_k [9]");
  expect_unchanged<shape_error>(packed, fwd, [](auto& m) { m.set_bias_v(attn::Vector<T>::Ones(7)); }, "bias_v [7]");
  expect_unchanged<argument_error>(packed, fwd, [](auto& m) { m.set_q_proj_weight(Mat<T>::Ones(8, 8)); },
                                   "q_proj_weight of a packed module");
  expect_unchanged<shape_error>(packed, fwd, [](auto& m) { m.out_proj().set_weight(Mat<T>::Ones(8, 9)); },
                                "out_proj.weight [8, 9]");

  attn::MhaOptions sep;
  sep.kdim = 5;
  sep.vdim = 3;
  sep.bias = false;
  attn::MultiHeadAttention<T> split(8, 4, sep, gen);
  const Mat<T> kx = random<T>(6, 5, 10), vx = random<T>(6, 3, 11);
  const auto split_fwd = [&](const attn::MultiHeadAttention<T>& m) { return m.forward(x, kx, vx, attn_test::batch_of<attn::MhaArgs<T>>(1)).output; };
  expect_unchanged<shape_error>(split, split_fwd, [](auto& m) { m.set_k_proj_weight(Mat<T>::Ones(8, 3)); },
                                "k_proj_weight [8, 3]");
  expect_unchanged<shape_error>(split, split_fwd, [](auto& m) { m.set_v_proj_weight(Mat<T>::Ones(8, 5)); },
                                "v_proj_weight [8, 5]");
  expect_unchanged<argument_error>(split, split_fwd, [](auto& m) { m.set_in_proj_weight(Mat<T>::Ones(24, 8)); },
                                   "in_proj_weight of a kdim/vdim module");
  expect_unchanged<argument_error>(split, split_fwd, [](auto& m) { m.set_in_proj_bias(attn::Vector<T>::Ones(24)); },
                                   "in_proj_bias with bias = false");
  expect_unchanged<argument_error>(split, split_fwd, [](auto& m) { m.set_bias_k(attn::Vector<T>::Ones(8)); },
                                   "bias_k without add_bias_kv");
}

// DecoderAttention (GQA, RoPE, its four projections): a load whose last tensor is wrong, and a setter.
TYPED_TEST(StrongGuarantee, DecoderAttentionLoadAndSetter) {
  using T = TypeParam;
  attn::DecoderAttentionOptions o;
  o.num_kv_heads = 1;
  o.qkv_bias = true;
  o.max_positions = 16;
  attn::Generator gen(12);
  attn::DecoderAttention<T> block(8, 4, o, gen);
  const attn::DecoderAttention<T> other(8, 4, o, gen);
  const Mat<T> x = random<T>(6, 8, 13);
  const auto fwd = [&](const attn::DecoderAttention<T>& m) { return m.forward(x, 2); };
  for (const bool strict : {true, false})
    expect_unchanged<attn::shape_error>(
        block, fwd,
        [&](auto& m) { attn::io::load_state_dict(m, with_wrong<T>(other, "o_proj.weight", {8, 7}), "", strict); },
        "load_state_dict, o_proj.weight [8, 7], strict = " + std::to_string(strict));
  expect_unchanged<attn::shape_error>(block, fwd, [](auto& m) { m.k_proj().set_weight(Mat<T>::Ones(8, 8)); },
                                      "k_proj.weight [8, 8] (kv heads 1: [2, 8])");
}

// A rejected call writes nothing into the caller's output: forward_into checks every argument (the
// masks included) before it touches `out`.
TYPED_TEST(StrongGuarantee, RejectedForwardIntoLeavesTheOutputAlone) {
  using T = TypeParam;
  const Mat<T> q = random<T>(5, 4, 14), k = random<T>(6, 4, 15), v = random<T>(6, 2, 16);
  const Mat<T> sentinel = Mat<T>::Constant(5, 2, T(-7));
  attn::Masks<T> bad;
  bad.attn_mask = attn::AttendMask(attn::BoolMatrix::Ones(5, 7));  // S = 6
  Mat<T> out = sentinel;
  EXPECT_THROW(attn::ScaledDotProductAttention<T>().forward_into(q, k, v, bad, out), attn::shape_error);
  EXPECT_TRUE(same_bits(out, sentinel));

  attn::GqaArgs<T> gbad;
  gbad.batch = 1;
  gbad.window = -1;
  Mat<T> gout = Mat<T>::Constant(5, 4, T(-7));
  const Mat<T> gsentinel = gout;
  EXPECT_THROW(attn::GroupedQueryAttention<T>(2, 1).forward_into(random<T>(5, 8, 17), k, v, gbad, gout),
               attn::argument_error);
  EXPECT_TRUE(same_bits(gout, gsentinel));

  attn::MultiHeadAttention<T> mha(4, 2);
  attn::MhaArgs<T> mbad;
  mbad.batch = 1;
  mbad.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(2, 6));  // B = 1
  Mat<T> mout = Mat<T>::Constant(5, 4, T(-7));
  const Mat<T> msentinel = mout;
  EXPECT_THROW(mha.forward_into(q, k, k, mbad, mout), attn::shape_error);
  EXPECT_TRUE(same_bits(mout, msentinel));
}

}  // namespace
