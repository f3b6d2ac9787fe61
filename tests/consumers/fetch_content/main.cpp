// A user's program on a fetched attn: self-attention through MultiHeadAttention, then the same
// per-head core through ScaledDotProductAttention on a Map over a plain buffer.
#include <attn/attn.hpp>

#include <iostream>
#include <vector>

int main() {
  const attn::Index E = 4, H = 2, L = 3;
  attn::MultiHeadAttention<float> mha(E, H);
  const attn::Matrix<float> x = attn::Matrix<float>::Identity(L, E);
  attn::MhaArgs<float> args;
  args.batch = 1;  // one sequence
  const attn::Matrix<float> out = mha.forward(x, x, x, args).output;  // [L, E]

  std::vector<float> buffer(static_cast<std::size_t>(L * E), 0.5f);  // a [L, E] tensor owned elsewhere
  const Eigen::Map<const attn::Matrix<float>> q(buffer.data(), L, E);
  attn::Masks<float> masks;
  masks.causal = attn::Causal::BottomRight;
  const attn::Matrix<float> core = attn::ScaledDotProductAttention<float>().forward(q, x, x, masks);  // [L, E]

  std::cout << "attn " << ATTN_VERSION_STRING << ": output [" << out.rows() << ", " << out.cols() << "], core ["
            << core.rows() << ", " << core.cols() << "]\n";
  if (out.rows() != L || out.cols() != E || core.rows() != L || core.cols() != E || !out.allFinite() ||
      !core.allFinite()) {
    std::cerr << "expected [" << L << ", " << E << "] outputs\n";
    return 1;
  }
  return 0;
}
