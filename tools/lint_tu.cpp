// tools/lint_tu.cpp - the translation unit tools/lint.sh hands to clang-tidy: every attn header, and
// every public template instantiated for float and double. clang-tidy's semantic checks and the
// static analyzer look only at instantiated templates, so a template nobody instantiates here is
// a template nobody lints. tools/lint.sh fails when a header under include/attn/ is not reached
// from this file. Never built or run: it only has to compile.
#include <attn/attn.hpp>
#include <attn/detail/attention.hpp>
#include <attn/detail/attention_reference.hpp>
#include <attn/detail/gemm.hpp>
#include <attn/detail/parallel.hpp>
#include <attn/detail/scratch.hpp>
#include <attn/dist/context_parallel.hpp>
#include <attn/dist/encoder.hpp>
#include <attn/instantiate.hpp>
#include <attn/io/checkpoint.hpp>
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>
#include <attn/io/tensor.hpp>
#include <attn/models/load.hpp>

#include <string>
#include <vector>

// Every member of the public class templates (and the detail ones with members of their own):
// the modules through attn/instantiate.hpp (detail/module_instances.hpp lists them), the rest here.
#define ATTN_LINT_CLASSES(T)                \
  template class attn::AdditiveMask<T>;     \
  template class attn::detail::MaskData<T>; \
  template class attn::detail::Scratch<T>;  \
  template class attn::io::Tensor<T>;       \
  template class attn::io::StateDict<T>;    \
  template class attn::models::BertModel<T>;                   \
  template class attn::dist::ContextParallelAttention<T>;      \
  template class attn::dist::ContextParallelEncoder<T>;        \
  template class attn::dist::detail::RingAccumulator<T>;
ATTN_LINT_CLASSES(float)
ATTN_LINT_CLASSES(double)
#undef ATTN_LINT_CLASSES

namespace attn_lint {

// The function templates, called once each; instantiated below for float and double.
template <class T>
void functions(const attn::io::SafeTensors& st, attn::MatrixRef<T> x) {
  (void)attn::alibi_slopes<T>(4);
  attn::merge_attention_states<T>(x, x, x, x, x, x);
  attn::apply_rope<T>(x, 1, 1, 0, attn::RopeCache<T>(x.cols(), 8));

  attn::detail::AttentionProblem<T> p;
  attn::detail::attention(p);
  attn::detail::attention_reference(p);
  attn::detail::linear_into<T>(x, x, nullptr, x);
  attn::detail::linear_eigen<T>(x, x, nullptr, x, 1);  // the reference, past linear_into's `if constexpr`

  (void)st.matrix<T>("w");
  (void)st.vector<T>("w");
  (void)st.map<T>("w");
  (void)st.tensor<T>("w");
  (void)st.state_dict<T>();

  const auto round_trip = [&st](auto& module) {
    const attn::io::StateDict<T> sd = attn::io::state_dict(module);
    (void)attn::io::load_state_dict(module, sd);
    (void)attn::io::load_state_dict(module, st);
  };
  attn::Linear<T> linear(2, 2);
  round_trip(linear);
  attn::MultiHeadAttention<T> mha(2, 1);
  round_trip(mha);
  attn::LayerNorm<T> layer_norm(2);
  round_trip(layer_norm);
  attn::RMSNorm<T> rms_norm(2);
  round_trip(rms_norm);
  attn::FeedForward<T> feed_forward(2, 4);
  round_trip(feed_forward);
  attn::SwiGLU<T> swiglu(2, 4);
  round_trip(swiglu);
  attn::TransformerEncoderLayer<T> encoder_layer(2, 1);
  round_trip(encoder_layer);
  attn::TransformerDecoderLayer<T> decoder_layer(2, 1);
  round_trip(decoder_layer);
  attn::TransformerEncoder<T> encoder(encoder_layer, 2);
  round_trip(encoder);
  attn::DecoderAttention<T> decoder_attention(2, 1);
  round_trip(decoder_attention);
  attn::io::save_safetensors(std::string("lint.safetensors"), attn::io::state_dict(encoder));
  (void)attn::io::hyperparameter_metadata(mha);
  (void)attn::io::hyperparameter_metadata(encoder_layer, "layer");
  (void)attn::io::hyperparameter_metadata(decoder_layer);
  (void)attn::io::hyperparameter_metadata(encoder, "encoder");
  attn::TransformerDecoder<T> decoder(decoder_layer, 2);
  round_trip(decoder);
  attn::Transformer<T> transformer(2, 1, 1, 1);
  round_trip(transformer);

  // Incremental decoding, checkpoints and generation.
  auto cache = decoder.start(x, 1, 4);
  (void)decoder.decode(x, cache);
  const auto ckpt = attn::io::Checkpoint::open("model");
  (void)ckpt.weight<T>("w");
  const attn::CausalLM<T> lm = attn::models::load_causal_lm<T>(ckpt);
  (void)attn::generate<T>(lm, std::vector<int>{1, 2});
  (void)attn::models::load_encoder<T>(ckpt);
  (void)attn::models::mean_pooling<T>(x, {}, 1);
  attn::KVCache<T> kv = mha.make_cache(1, 4);
  mha.append_kv(x, x, kv);
  mha.attend_into(x, kv, attn::CacheArgs<T>(), x);
  // Serving: ragged calls, a paged cache, lse outputs.
  const attn::GroupedQueryAttention<T> gqa(2, 1);
  attn::IndexVector cu(2);
  cu << 0, 1;
  (void)gqa.forward_varlen(x, x, x, cu, cu);
  (void)gqa.forward_varlen(x, kv, cu);
  (void)gqa.forward_with_lse(x, x, x, attn::GqaArgs<T>());
  attn::PagedKVCache<T> paged(attn::KVStorage::Native, 1, 2, 16, 4);
  const attn::Index seq = paged.add_sequence();
  paged.append(seq, x, x);
  (void)paged.fork(seq);
  (void)gqa.forward_varlen(x, paged, cu.head(1), cu);
  paged.free(seq);
  // attn/dist's MPI-free parts (the classes above cover the rest).
  const attn::dist::Sharding sh(4, 2, attn::dist::Layout::ZigZag);
  (void)sh.unshard<T>({sh.shard<T>(x, 1, 0), sh.shard<T>(x, 1, 1)}, 1);
  (void)sh.shard_columns<T>(x, 0);
  const attn::dist::detail::RingShape rs{1, 1, 1, 1, 1, attn::Storage::Int8, false};
  std::vector<unsigned char> block(attn::dist::detail::block_layout<T>(rs, 2).bytes);
  attn::dist::detail::pack_block<T>(rs, x, x, nullptr, block.data());
}

template void functions<float>(const attn::io::SafeTensors&, attn::MatrixRef<float>);
template void functions<double>(const attn::io::SafeTensors&, attn::MatrixRef<double>);

}  // namespace attn_lint
