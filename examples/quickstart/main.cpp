// Self-attention over a batch of two sequences with torch.nn.MultiheadAttention's layer.
#include <attn/attn.hpp>

#include <cmath>
#include <iostream>

int main() {
  const attn::Index B = 2, L = 5, E = 16, H = 4;  // 2 sequences of 5 tokens, 16 features, 4 heads

  // nn.MultiheadAttention(16, 4, batch_first=True), initialised as PyTorch does (seed 0). For a
  // trained model, set its weights: mha.set_in_proj_weight(w) with w [3E, E], and so on.
  attn::MhaOptions options;
  options.batch_first = true;
  attn::Generator gen(0);
  attn::MultiHeadAttention<float> mha(E, H, options, gen);

  // The batch as one matrix, one token per row: a contiguous [B, L, E] tensor is [B*L, E].
  attn::Matrix<float> x(B * L, E);
  for (attn::Index r = 0; r < x.rows(); ++r)
    for (attn::Index c = 0; c < E; ++c) x(r, c) = std::sin(0.3f * float(r) + 0.7f * float(c));

  attn::MhaArgs<float> args;
  args.batch = B;            // required: how many sequences the rows hold
  args.need_weights = true;  // also return the attention probabilities, averaged over heads
  auto [out, weights] = mha.forward(x, x, x, args);  // out [B*L, E], weights [B*L, L]

  std::cout << "output [" << out.rows() << ", " << out.cols() << "], first token: "
            << out.row(0).head(4) << " ...\n"
            << "token 0 attends to its sequence's 5 tokens with " << weights.row(0) << "\n";
}
