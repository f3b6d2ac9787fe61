// A user's program on an installed attn: one multi-head attention forward over a batch.
#include <attn/attn.hpp>

#include <cstring>
#include <iostream>

int main() {
  const attn::Index E = 8, H = 2, B = 3, L = 5;
  attn::Generator gen(7);
  attn::MultiHeadAttention<float> mha(E, H, attn::MhaOptions{}, gen);
  attn::Matrix<float> x(B * L, E);
  attn::init::uniform(x, -1.0, 1.0, gen);

  attn::MhaArgs<float> args;
  args.batch = B;
  args.causal = attn::Causal::TopLeft;
  const attn::Matrix<float> out = mha.forward(x, x, x, args).output;  // [B*L, E]

  std::cout << "attn " << ATTN_VERSION_STRING << ": output [" << out.rows() << ", " << out.cols() << "]\n";
  if (std::strcmp(ATTN_VERSION_STRING, EXPECTED_ATTN_VERSION) != 0) {
    std::cerr << "headers say " << ATTN_VERSION_STRING << ", package says " << EXPECTED_ATTN_VERSION << "\n";
    return 1;
  }
  if (out.rows() != B * L || out.cols() != E || !out.allFinite()) {
    std::cerr << "expected a finite [" << B * L << ", " << E << "] output\n";
    return 1;
  }
  return 0;
}
