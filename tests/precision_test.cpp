// tests/precision_test.cpp - attn/precision.hpp: the stated bf16 bounds by hand, and set_precision
// and Masks::precision on every module.
//
// The kernels themselves are held to the bounds elsewhere: the projection GEMM in gemm_test
// (against the exact product of the rounded operands, and the stated bound), the flash kernel in
// attention_kernel_test (the stated bound, row by row), the public attention calls, with every
// mask and option, in differential_test. Here: that each module's option reaches each of its
// products (a module in bf16 computes something else than in T, within bf16's error of it), that a
// call's precision overrides the module's, and that what the contract leaves in T (few-row
// projections, decoding steps) gives the same bits as Native.
#include <attn/attn.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::Precision;

template <class T>
class PrecisionTest : public ::testing::Test {};
TYPED_TEST_SUITE(PrecisionTest, attn_test::Scalars, attn_test::ScalarName);

template <class T>
bool same_bits(const attn::Matrix<T>& a, const attn::Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0;
}

// The bounds by hand, float (eps = 2^-24) and u = 2^-8:
//   dot of n = 16 terms, sum |x||w| = 4:  (2 * 2^-8 + 2^-16 + 16 * 2^-24) * 4
//     = 2^-5 + 2^-14 + 2^-18
//   attention, scale * ||q||_1 = 2, max|k| = 0.5, max|v| = 3, S = 8 keys, d = 4:
//     delta = 2 * 0.5 * (2^-7 + 2^-16 + 4 * 2^-24) = 2^-7 + 2^-16 + 2^-22
//     bound = (2^-7 + 2^-16 + 2 * 8 * 2^-24 + expm1(2 * delta)) * 3
TEST(Bf16Bounds, ByHand) {
  EXPECT_FLOAT_EQ(attn::bf16_dot_error_bound<float>(4.0f, 16), std::ldexp(1.0f, -5) + std::ldexp(1.0f, -14) +
                                                                   std::ldexp(1.0f, -18));
  const double delta = std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + std::ldexp(1.0, -22);
  const double want = (std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + std::ldexp(1.0, -20) + std::expm1(2 * delta)) * 3;
  EXPECT_NEAR(attn::bf16_attention_error_bound<float>(2.0f, 0.5f, 3.0f, 8, 4), want, 1e-7 * want);
  EXPECT_STREQ(attn::precision_name(Precision::BFloat16), "bf16");
  EXPECT_STREQ(attn::precision_name(Precision::Native), "native");
}

// A module in bf16 against the same module in T: not the same bits (each product rounds its
// operands: a module whose option did not reach a product would still differ through the others,
// so the modules with one product kind are checked alone below), within `rel` of max|native|, and
// precision() reports the option.
template <class T, class Module, class Run>
void expect_bf16_module(Module m, Run run, double rel, const std::string& what) {
  const attn::Matrix<T> native = run(m);
  m.set_precision(Precision::BFloat16);
  EXPECT_EQ(m.precision(), Precision::BFloat16) << what;
  const attn::Matrix<T> bf16 = run(m);
  EXPECT_FALSE(same_bits(native, bf16)) << what << ": bf16 gave the same bits as native";
  const double scale = std::max(1.0, double(native.cwiseAbs().maxCoeff()));
  EXPECT_LE(double((bf16 - native).cwiseAbs().maxCoeff()), rel * scale) << what;
  m.set_precision(Precision::Native);
  EXPECT_TRUE(same_bits(native, run(m))) << what << ": back to native";
}

TYPED_TEST(PrecisionTest, EveryModuleRunsItsProductsInBf16) {
  using T = TypeParam;
  attn::Generator gen(21);
  const Index B = 2, L = 24, E = 64;
  attn::Matrix<T> x(B * L, E), mem(B * 16, E);
  attn::init::uniform(x, -1.0, 1.0, gen);
  attn::init::uniform(mem, -1.0, 1.0, gen);
  // bf16 moves each product by ~2^-8 relative; a few products in a row, a few times that.
  const double rel = 0.05;
  expect_bf16_module<T>(
      attn::Linear<T>(E, 48, true, gen), [&](const auto& m) { return m.forward(x); }, rel, "Linear");
  attn::MhaArgs<T> margs;
  margs.batch = B;
  expect_bf16_module<T>(
      attn::MultiHeadAttention<T>(E, 4, {}, gen), [&](const auto& m) { return m.forward(x, x, x, margs).output; }, rel,
      "MultiHeadAttention");
  attn::DecoderAttentionOptions dopt;
  dopt.num_kv_heads = 2;
  expect_bf16_module<T>(
      attn::DecoderAttention<T>(E, 4, dopt, gen), [&](const auto& m) { return m.forward(x, B); }, rel,
      "DecoderAttention");
  expect_bf16_module<T>(
      attn::FeedForward<T>(E, 96, attn::Activation::GELU, true, gen), [&](const auto& m) { return m.forward(x); }, rel,
      "FeedForward");
  expect_bf16_module<T>(
      attn::SwiGLU<T>(E, 96, false, gen), [&](const auto& m) { return m.forward(x); }, rel, "SwiGLU");
  attn::EncoderArgs<T> eargs;
  eargs.batch = B;
  expect_bf16_module<T>(
      attn::TransformerEncoderLayer<T>(E, 4, {}, gen), [&](const auto& m) { return m.forward(x, eargs); }, rel,
      "TransformerEncoderLayer");
  attn::DecoderArgs<T> dargs;
  dargs.batch = B;
  expect_bf16_module<T>(
      attn::TransformerDecoderLayer<T>(E, 4, {}, gen), [&](const auto& m) { return m.forward(x, mem, dargs); }, rel,
      "TransformerDecoderLayer");
  // The encoder stack reports no precision of its own: its layers do.
  attn::TransformerEncoder<T> enc(attn::TransformerEncoderLayer<T>(E, 4, {}, gen), 2);
  const attn::Matrix<T> native = enc.forward(x, eargs);
  enc.set_precision(Precision::BFloat16);
  EXPECT_EQ(enc.layer(0).precision(), Precision::BFloat16);
  EXPECT_EQ(enc.layer(1).precision(), Precision::BFloat16);
  EXPECT_FALSE(same_bits(native, enc.forward(x, eargs)));
}

// Each product of a module on its own: the attention core alone (ScaledDotProductAttention,
// GroupedQueryAttention), and MultiHeadAttention's projections alone (its core forced back to T by
// the call) and its core alone (the call's bf16 on a module in T), each differs from T.
TYPED_TEST(PrecisionTest, EachProductAndTheCallsOverride) {
  using T = TypeParam;
  attn::Generator gen(22);
  const Index B = 2, L = 24, H = 4, d = 16;
  attn::Matrix<T> q(B * L, H * d), k(B * L, 2 * d), v(B * L, 2 * d);
  for (attn::Matrix<T>* m : {&q, &k, &v}) attn::init::uniform(*m, -1.0, 1.0, gen);

  attn::GroupedQueryAttention<T> gqa(H, 2);
  attn::GqaArgs<T> args;
  args.batch = B;
  args.causal = attn::Causal::TopLeft;
  const attn::Matrix<T> native = gqa.forward(q, k, v, args);
  gqa.set_precision(Precision::BFloat16);
  const attn::Matrix<T> bf16 = gqa.forward(q, k, v, args);
  EXPECT_FALSE(same_bits(native, bf16));
  EXPECT_LE(double((bf16 - native).cwiseAbs().maxCoeff()), 0.02);
  args.precision = Precision::Native;  // the call overrides the module, both ways
  EXPECT_TRUE(same_bits(native, gqa.forward(q, k, v, args)));
  gqa.set_precision(Precision::Native);
  args.precision = Precision::BFloat16;
  EXPECT_TRUE(same_bits(bf16, gqa.forward(q, k, v, args)));

  attn::ScaledDotProductAttention<T> sdpa;
  attn::Masks<T> m;
  const attn::Matrix<T> q0 = q.leftCols(d), k0 = k.leftCols(d), v0 = v.leftCols(d);
  const attn::Matrix<T> one = sdpa.forward(q0, k0, v0, m);
  sdpa.set_precision(Precision::BFloat16);
  EXPECT_EQ(sdpa.precision(), Precision::BFloat16);
  const attn::Matrix<T> one_bf16 = sdpa.forward(q0, k0, v0, m);
  EXPECT_FALSE(same_bits(one, one_bf16));
  m.precision = Precision::Native;
  EXPECT_TRUE(same_bits(one, sdpa.forward(q0, k0, v0, m)));

  attn::MultiHeadAttention<T> mha(H * d, H, {}, gen);
  attn::MhaArgs<T> margs;
  margs.batch = B;
  const attn::Matrix<T> mha_native = mha.forward(q, q, q, margs).output;
  margs.precision = Precision::BFloat16;  // the core alone
  const attn::Matrix<T> core_only = mha.forward(q, q, q, margs).output;
  mha.set_precision(Precision::BFloat16);
  margs.precision = Precision::Native;  // the projections alone
  const attn::Matrix<T> proj_only = mha.forward(q, q, q, margs).output;
  margs.precision.reset();  // both
  const attn::Matrix<T> both = mha.forward(q, q, q, margs).output;
  EXPECT_FALSE(same_bits(mha_native, core_only));
  EXPECT_FALSE(same_bits(mha_native, proj_only));
  EXPECT_FALSE(same_bits(core_only, both));
  EXPECT_FALSE(same_bits(proj_only, both));
}

// What the contract keeps in T: a projection of at most 4 rows and a decoding step (at most 4
// queries per head) read memory, not compute, and give the same bits in either precision; a
// prefill of more rows against the same cache does not.
TYPED_TEST(PrecisionTest, FewRowsAndDecodingStepsStayInT) {
  using T = TypeParam;
  attn::Generator gen(23);
  const Index E = 64;
  attn::Linear<T> lin(E, 40, true, gen);
  attn::Matrix<T> x(4, E), prompt(12, E);
  attn::init::uniform(x, -1.0, 1.0, gen);
  attn::init::uniform(prompt, -1.0, 1.0, gen);
  const attn::Matrix<T> y = lin.forward(x);
  lin.set_precision(Precision::BFloat16);
  EXPECT_TRUE(same_bits(y, lin.forward(x)));

  attn::DecoderAttentionOptions dopt;
  dopt.num_kv_heads = 2;
  attn::DecoderAttention<T> native(E, 4, dopt, gen);
  attn::DecoderAttention<T> bf16 = native;
  bf16.set_precision(Precision::BFloat16);
  attn::KVCache<T> c_native = native.make_cache(1, 32), c_bf16 = bf16.make_cache(1, 32);
  const attn::Matrix<T> p_native = native.forward(prompt, c_native), p_bf16 = bf16.forward(prompt, c_bf16);
  EXPECT_FALSE(same_bits(p_native, p_bf16));  // 12 rows: bf16 projections and flash kernel
  // The caches now differ (bf16 projections of the prompt); reload both with the native keys.
  c_bf16 = c_native;
  for (Index step = 0; step < 3; ++step) {
    const attn::Matrix<T> t = x.row(step);
    EXPECT_TRUE(same_bits(native.forward(t, c_native), bf16.forward(t, c_bf16))) << "step " << step;
  }
}

}  // namespace
