// tools/compile_time_all.cpp - the "everything" translation unit of tools/compile_time.sh: a
// program that includes all of attn (attn/io too) and uses each public module once, in float, as
// an application built on attn would. Its compile time is what such a program pays per
// translation unit; quickstart's is the floor (one MultiHeadAttention). With
// -DATTN_COMPILE_TIME_NO_IO it leaves attn/io (and nlohmann_json) out. It links and runs (it
// prints one checksum), but the script only compiles it.
#include <attn/attn.hpp>
#ifndef ATTN_COMPILE_TIME_NO_IO  // tools/compile_time.sh's "everything but attn/io"
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>
#endif
#include <cmath>
#include <cstdio>
#include <string>

namespace {

using attn::Index;
using Mat = attn::Matrix<float>;

Mat input(Index rows, Index cols, float phase) {
  Mat x(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) x(r, c) = std::sin(phase + 0.37f * float(r) + 0.11f * float(c));
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  const Index B = 2, L = 24, S = 40, E = 64, H = 4;
  attn::Generator gen(1);
  const Mat x = input(B * L, E, 0.f), memory = input(B * S, E, 1.f);
  double sum = 0;

  // MultiHeadAttention: self-attention (flash), with the probabilities (blocked), cross-attention.
  attn::MhaOptions mo;
  mo.batch_first = true;
  attn::MultiHeadAttention<float> mha(E, H, mo, gen);
  attn::MhaArgs<float> ma;
  ma.batch = B;
  ma.causal = attn::Causal::TopLeft;
  sum += mha.forward(x, x, x, ma).output.sum();
  ma.need_weights = true;
  sum += mha.forward(x, memory, memory, ma).weights.sum();

  // ScaledDotProductAttention and Linear on their own.
  const attn::Linear<float> proj(E, E, true, gen);
  const Mat q = proj.forward(x);
  sum += attn::ScaledDotProductAttention<float>().forward(q, q, q).sum();

  // GroupedQueryAttention: batched, and against a KV cache (the decode kernel).
  const attn::GroupedQueryAttention<float> gqa(H, 2);
  attn::GqaArgs<float> ga;
  ga.batch = B;
  ga.window = 8;
  const Mat kv = input(B * S, 2 * (E / H), 2.f);
  sum += gqa.forward(x, kv, kv, ga).sum();
  attn::KVCache<float> cache(B, 2, E / H, S);
  cache.append(kv, kv);
  sum += gqa.forward(x.topRows(B), cache).sum();

  // The encoder stack (LayerNorm, FeedForward) and a decoder layer.
  attn::TransformerOptions to;
  to.dim_feedforward = 2 * E;
  to.batch_first = true;
  attn::TransformerEncoder<float> encoder(attn::TransformerEncoderLayer<float>(E, H, to, gen), 2);
  attn::EncoderArgs<float> ea;
  ea.batch = B;
  sum += encoder.forward(x, ea).sum();
  const attn::TransformerDecoderLayer<float> decoder(E, H, to, gen);
  attn::DecoderArgs<float> da;
  da.batch = B;
  da.tgt_masks.causal = attn::Causal::TopLeft;
  sum += decoder.forward(x, memory, da).sum();

  // A Llama block: RMSNorm, DecoderAttention (RoPE, GQA, KV cache), SwiGLU.
  attn::DecoderAttentionOptions dao;
  dao.num_kv_heads = 2;
  dao.max_positions = 64;
  const attn::DecoderAttention<float> block(E, H, dao, gen);
  const attn::RMSNorm<float> norm(E);
  const attn::SwiGLU<float> mlp(E, 2 * E, false, gen);
  attn::KVCache<float> block_cache = block.make_cache(1, 64);
  sum += mlp.forward(norm.forward(block.forward(x.topRows(L), block_cache, 0))).sum();
  sum += block.forward(x.row(0), block_cache, 0).sum();

  // attn/io: a state dict through a safetensors file and back.
#ifndef ATTN_COMPILE_TIME_NO_IO
  if (argc > 1) {
    const std::string path = argv[1];
    attn::io::save_safetensors(path, attn::io::state_dict(encoder));
    attn::TransformerEncoder<float> loaded(attn::TransformerEncoderLayer<float>(E, H, to), 2);
    attn::io::load_state_dict(loaded, attn::io::SafeTensors::open(path));
    sum += loaded.forward(x, ea).sum();
  }
#else
  (void)argc, (void)argv;
#endif
  std::printf("%.6g\n", sum);
  return 0;
}
