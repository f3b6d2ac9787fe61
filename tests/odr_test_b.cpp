// tests/odr_test_b.cpp - the second translation unit of odr_test (the tests are in odr_test_a.cpp).
//
// Both files include every attn header, so every non-template function defined in a header is
// emitted in both objects; without `inline` the link fails with a duplicate symbol. This file also
// instantiates every public template in full (an explicit instantiation compiles every member, not
// only the ones some test calls) and computes the values odr_test_a.cpp checks, so code from both
// objects runs in one program.
#include <attn/attn.hpp>
#include <attn/io/checkpoint.hpp>  // attn/io/ and attn/models/ are not in attn.hpp: they need nlohmann_json
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>
#include <attn/models/load.hpp>

// Every public class template, for both scalar types.
template class attn::Linear<float>;
template class attn::Linear<double>;
template class attn::ScaledDotProductAttention<float>;
template class attn::ScaledDotProductAttention<double>;
template class attn::MultiHeadAttention<float>;
template class attn::MultiHeadAttention<double>;
template class attn::AdditiveMask<float>;
template class attn::AdditiveMask<double>;
template class attn::PolarMask<true>;
template class attn::PolarMask<false>;
template struct attn::Masks<float>;
template struct attn::Masks<double>;
template struct attn::MhaArgs<float>;
template struct attn::MhaArgs<double>;
template struct attn::AttentionResult<float>;
template struct attn::AttentionResult<double>;
template class attn::LayerNorm<float>;
template class attn::LayerNorm<double>;
template class attn::FeedForward<float>;
template class attn::FeedForward<double>;
template class attn::RMSNorm<float>;
template class attn::RMSNorm<double>;
template class attn::SwiGLU<float>;
template class attn::SwiGLU<double>;
template class attn::TransformerEncoderLayer<float>;
template class attn::TransformerEncoderLayer<double>;
template class attn::TransformerDecoderLayer<float>;
template class attn::TransformerDecoderLayer<double>;
template class attn::TransformerEncoder<float>;
template class attn::TransformerEncoder<double>;
template class attn::TransformerDecoder<float>;
template class attn::TransformerDecoder<double>;
template class attn::Transformer<float>;
template class attn::Transformer<double>;
template class attn::Embedding<float>;
template class attn::Embedding<double>;
template class attn::DecoderLayer<float>;
template class attn::DecoderLayer<double>;
template class attn::CausalLM<float>;
template class attn::CausalLM<double>;
template class attn::models::BertModel<float>;
template class attn::models::BertModel<double>;
template struct attn::EncoderArgs<float>;
template struct attn::EncoderArgs<double>;
template struct attn::DecoderArgs<float>;
template struct attn::DecoderArgs<double>;
// And the kernels behind them.
template class attn::detail::MaskData<bool>;
template class attn::detail::MaskData<float>;
template class attn::detail::MaskData<double>;
template void attn::detail::attention<float>(const attn::detail::AttentionProblem<float>*, attn::Index);
template void attn::detail::attention<double>(const attn::detail::AttentionProblem<double>*, attn::Index);
template void attn::detail::attention_reference<float>(const attn::detail::AttentionProblem<float>&);
template void attn::detail::attention_reference<double>(const attn::detail::AttentionProblem<double>&);

// attn/io (needs nlohmann_json): the file reader's and the state dict's templates.
template class attn::io::Tensor<float>;
template class attn::io::Tensor<double>;
template class attn::io::StateDict<float>;
template class attn::io::StateDict<double>;
template attn::io::LoadResult attn::io::load_state_dict<float>(attn::MultiHeadAttention<float>&,
                                                               const attn::io::SafeTensors&, const std::string&, bool);
template attn::io::StateDict<double> attn::io::state_dict<double>(const attn::MultiHeadAttention<double>&,
                                                                  const std::string&);
template attn::io::LoadResult attn::io::load_state_dict<double>(attn::RMSNorm<double>&, const attn::io::SafeTensors&,
                                                                const std::string&, bool);
template attn::io::StateDict<float> attn::io::state_dict<float>(const attn::SwiGLU<float>&, const std::string&);
template void attn::io::save_safetensors<float>(const std::filesystem::path&, const attn::io::StateDict<float>&,
                                                const attn::io::Metadata&);

namespace odr_test {

// Declared in odr_test_a.cpp; defined here and instantiated below for float and double.

// q [2, 2], k [3, 2] with three equal rows, v [3, 2]  ->  [2, 2]
template <class T>
attn::Matrix<T> sdpa_equal_keys() {
  attn::Matrix<T> q(2, 2), k(3, 2), v(3, 2);
  q << 1, 2, -3, 0.5;
  k << 0.5, -1, 0.5, -1, 0.5, -1;
  v << 1, 2, 3, 4, 5, 9;
  return attn::ScaledDotProductAttention<T>().forward(q, k, v);
}

// Self-attention over x [3, 4] with E = 4, H = 2, in_proj_weight = [I; 0; I] (the key projection
// is zero), zero biases and out_proj.weight = I  ->  output [3, 4], weights [3, 3]
template <class T>
attn::AttentionResult<T> mha_zero_key_projection() {
  const attn::Index E = 4;
  attn::Matrix<T> x(3, E);
  x << 1, 2, 3, 4,  //
      3, 0, -1, 2,  //
      5, 1, 1, 0;
  attn::Matrix<T> in_proj = attn::Matrix<T>::Zero(3 * E, E);
  in_proj.topRows(E).setIdentity();
  in_proj.bottomRows(E).setIdentity();
  attn::Generator gen(1);
  attn::MultiHeadAttention<T> mha(E, /*num_heads=*/2, attn::MhaOptions{}, gen);
  mha.set_in_proj_weight(in_proj);
  mha.out_proj().set_weight(attn::Matrix<T>::Identity(E, E));
  attn::MhaArgs<T> args;
  args.batch = 1;
  args.need_weights = true;
  return mha.forward(x, x, x, args);
}

template attn::Matrix<float> sdpa_equal_keys<float>();
template attn::Matrix<double> sdpa_equal_keys<double>();
template attn::AttentionResult<float> mha_zero_key_projection<float>();
template attn::AttentionResult<double> mha_zero_key_projection<double>();

}  // namespace odr_test
