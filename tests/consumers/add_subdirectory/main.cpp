// A user's program on attn built in-tree: multi-head attention in double, cross-attention from
// L queries to S keys with a key padding mask.
#include <attn/attn.hpp>

#include <iostream>

int main() {
  const attn::Index E = 6, H = 3, L = 4, S = 7;
  attn::MultiHeadAttention<double> mha(E, H);
  const attn::Matrix<double> query = attn::Matrix<double>::Constant(L, E, 0.25);
  const attn::Matrix<double> memory = attn::Matrix<double>::Ones(S, E);

  attn::BoolMatrix padding = attn::BoolMatrix::Zero(1, S);  // one sequence; its last two keys are padding
  padding(0, S - 1) = padding(0, S - 2) = true;
  attn::MhaArgs<double> args;
  args.batch = 1;
  args.key_padding_mask = attn::IgnoreMask(padding);
  args.need_weights = true;
  const auto [out, weights] = mha.forward(query, memory, memory, args);  // [L, E], [L, S]

  std::cout << "attn " << ATTN_VERSION_STRING << ": output [" << out.rows() << ", " << out.cols() << "], weights ["
            << weights.rows() << ", " << weights.cols() << "]\n";
  if (out.rows() != L || out.cols() != E || weights.rows() != L || weights.cols() != S || !out.allFinite()) {
    std::cerr << "expected output [" << L << ", " << E << "] and weights [" << L << ", " << S << "]\n";
    return 1;
  }
  return 0;
}
