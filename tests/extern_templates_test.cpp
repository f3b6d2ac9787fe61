// tests/extern_templates_test.cpp - the ATTN_EXTERN_TEMPLATES opt-in (attn/instantiate.hpp) gives
// the same program, bit for bit. tests/CMakeLists.txt builds this file twice:
//
//   extern_templates_test       with attn::extern_templates: this file compiled with
//                               ATTN_EXTERN_TEMPLATES (it only declares the kernels) and linked
//                               with cmake/attn_instantiate.cpp (which compiles them): two files
//   extern_templates_reference  this file alone, the kernels instantiated here, as by default
//
// Each prints every output it computes, every value as its exact hexadecimal float, and
// extern_templates.bitwise requires the two prints to be identical; extern_templates.declared_only
// requires this file's object in the first build to define none of the kernels (they come from
// the instantiation file only: the opt-in really removes them from users' files).
//
// The cases reach every kernel behind the two extern dispatch points, in float and double: the
// flash kernel (more queries than kDecodeRows, with each kind of mask), the decode kernel (a KV
// cache step), the blocked kernel (need_weights), the packed projection GEMM (2 rows and more,
// columns that end in a partial panel) and the one-row projection.
#include <attn/attn.hpp>
#include <cmath>
#include <cstdio>

namespace {

using attn::Index;

template <class T>
attn::Matrix<T> input(Index rows, Index cols, double phase) {
  attn::Matrix<T> x(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) x(r, c) = static_cast<T>(std::sin(phase + 0.37 * double(r) + 0.71 * double(c)));
  return x;
}

int outputs = 0;

// One output, its name and shape, then its values in %a (exact: no rounding in the print).
template <class Derived>
void print(const char* name, const Eigen::MatrixBase<Derived>& m) {
  std::printf("%s [%ld, %ld]\n", name, static_cast<long>(m.rows()), static_cast<long>(m.cols()));
  for (Index r = 0; r < m.rows(); ++r) {
    for (Index c = 0; c < m.cols(); ++c) std::printf(" %a", static_cast<double>(m(r, c)));
    std::printf("\n");
  }
  ++outputs;
}

template <class T>
void run(const char* type) {
  std::printf("== %s\n", type);
  attn::Generator gen(7);
  const Index B = 2, L = 19, S = 23, E = 48, H = 4;

  // Linear: the packed GEMM (37 rows: full and remainder row tiles; 75 columns: a partial
  // panel), and one row (the matrix-vector path).
  const attn::Linear<T> linear(E, 75, true, gen);
  const attn::Matrix<T> x = input<T>(37, E, 0.0);
  print("linear", linear.forward(x));
  print("linear one row", linear.forward(x.topRows(1)));

  // ScaledDotProductAttention: no mask; causal + window + softcap + ALiBi; a bool mask and a
  // bias (the per-score path); the weights (blocked kernel); 3 queries (decode kernel).
  const attn::ScaledDotProductAttention<T> sdpa;
  const attn::Matrix<T> q = input<T>(L, 16, 1.0), k = input<T>(S, 16, 2.0), v = input<T>(S, 12, 3.0);
  print("sdpa", sdpa.forward(q, k, v));
  attn::Masks<T> m;
  m.causal = attn::Causal::BottomRight;
  m.window = 9;
  m.softcap = T(3);
  m.alibi_slopes = attn::alibi_slopes<T>(1);
  print("sdpa causal window softcap alibi", sdpa.forward(q, k, v, m));
  attn::BoolMatrix bm(L, S);
  for (Index i = 0; i < L; ++i)
    for (Index j = 0; j < S; ++j) bm(i, j) = (i * 7 + j * 3) % 5 == 0;
  attn::Masks<T> mb;
  mb.attn_mask = attn::IgnoreMask(bm);
  mb.attn_bias = attn::AdditiveMask<T>(input<T>(L, S, 4.0));
  print("sdpa mask bias", sdpa.forward(q, k, v, mb));
  const attn::AttentionResult<T> w = sdpa.forward_with_weights(q, k, v, m);
  print("sdpa weights: output", w.output);
  print("sdpa weights: weights", w.weights);
  print("sdpa decode", sdpa.forward(q.topRows(3), k, v, m));

  // MultiHeadAttention: fused self-attention with key padding, head-averaged weights, and
  // cross-attention with bias_k/bias_v and a zero key.
  attn::MhaOptions mo;
  mo.batch_first = true;
  const attn::MultiHeadAttention<T> mha(E, H, mo, gen);
  const attn::Matrix<T> xs = input<T>(B * L, E, 5.0), mem = input<T>(B * S, E, 6.0);
  attn::MhaArgs<T> ma;
  ma.batch = B;
  attn::BoolMatrix pad = attn::BoolMatrix::Zero(B, L);
  pad(1, L - 1) = pad(1, L - 2) = true;
  ma.key_padding_mask = attn::IgnoreMask(pad);
  print("mha self", mha.forward(xs, xs, xs, ma).output);
  ma.need_weights = true;
  const attn::AttentionResult<T> mw = mha.forward(xs, xs, xs, ma);
  print("mha weights: output", mw.output);
  print("mha weights: weights", mw.weights);
  attn::MhaOptions mo2;
  mo2.add_bias_kv = mo2.add_zero_attn = true;
  const attn::MultiHeadAttention<T> cross(E, H, mo2, gen);
  attn::MhaArgs<T> ca;
  ca.batch = B;
  print("mha cross", cross.forward(input<T>(L * B, E, 7.0), mem, mem, ca).output);

  // GroupedQueryAttention: batched with a window, then one step against a KV cache.
  const Index d = 8, Hkv = 2;
  const attn::GroupedQueryAttention<T> gqa(H, Hkv);
  attn::GqaArgs<T> ga;
  ga.batch = B;
  ga.causal = attn::Causal::TopLeft;
  ga.window = 6;
  const attn::Matrix<T> gk = input<T>(B * S, Hkv * d, 8.0), gv = input<T>(B * S, Hkv * d, 9.0);
  print("gqa", gqa.forward(input<T>(B * L, H * d, 10.0), gk, gv, ga));
  attn::KVCache<T> cache(B, Hkv, d, S);
  cache.append(gk, gv);
  print("gqa cache step", gqa.forward(input<T>(B, H * d, 11.0), cache));

  // The encoder stack (pre-norm, GELU) and a decoder layer.
  attn::TransformerOptions to;
  to.dim_feedforward = 64;
  to.batch_first = true;
  to.norm_first = true;
  to.activation = attn::Activation::GELU;
  const attn::TransformerEncoder<T> encoder(attn::TransformerEncoderLayer<T>(E, H, to, gen), 2);
  attn::EncoderArgs<T> ea;
  ea.batch = B;
  ea.causal = attn::Causal::TopLeft;
  print("encoder", encoder.forward(xs, ea));
  const attn::TransformerDecoderLayer<T> decoder(E, H, to, gen);
  attn::DecoderArgs<T> da;
  da.batch = B;
  da.tgt_masks.causal = attn::Causal::TopLeft;
  print("decoder layer", decoder.forward(xs, mem, da));

  // A Llama MLP block: RMSNorm, then SwiGLU.
  const attn::RMSNorm<T> rms(E);
  const attn::SwiGLU<T> mlp(E, 64, false, gen);
  print("rmsnorm swiglu", mlp.forward(rms.forward(xs)));

  // DecoderAttention (RoPE, grouped-query): a prompt through a cache, then one token.
  attn::DecoderAttentionOptions dao;
  dao.num_kv_heads = Hkv;
  dao.max_positions = 64;
  const attn::DecoderAttention<T> block(E, H, dao, gen);
  attn::KVCache<T> block_cache = block.make_cache(1, 64);
  print("decoder attention prompt", block.forward(xs.topRows(L), block_cache, 0));
  print("decoder attention step", block.forward(xs.row(L), block_cache, 0));
}

}  // namespace

int main() {
  attn::set_num_threads(2);  // the same split in both builds (results do not depend on it anyway)
  run<float>("float");
  run<double>("double");
  std::printf("%d outputs\n", outputs);
  return 0;
}
