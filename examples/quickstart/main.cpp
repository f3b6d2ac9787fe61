// quickstart: build a MultiHeadAttention, run self-attention on a small batch, print what came out.
//
//   cmake -S . -B build && cmake --build build --target quickstart && ./build/examples/quickstart
#include <attn/attn.hpp>

#include <iostream>

int main() {
  const attn::Index B = 2, L = 5, E = 16, H = 4;

  // nn.MultiheadAttention(16, 4, batch_first=True), with PyTorch's initialisation from seed 0.
  // To run a trained model, set its weights instead: mha.set_in_proj_weight(w) with w [3E, E] etc.
  attn::MhaOptions options;
  options.batch_first = true;
  attn::Generator gen(0);
  attn::MultiHeadAttention<float> mha(E, H, options, gen);

  // A batch of B sequences of L tokens: a contiguous [B, L, E] buffer is a [B*L, E] matrix.
  attn::Matrix<float> x(B * L, E);
  for (attn::Index r = 0; r < x.rows(); ++r)
    for (attn::Index c = 0; c < E; ++c) x(r, c) = static_cast<float>(std::sin(0.3 * double(r) + 0.7 * double(c)));

  attn::MhaArgs<float> args;
  args.batch = B;
  args.need_weights = true;  // head-averaged attention probabilities, [B*L, S]
  auto [out, weights] = mha.forward(x, x, x, args);

  std::cout << "attn " << ATTN_VERSION_STRING << " quickstart\n"
            << "input   [B*L, E] = [" << x.rows() << ", " << x.cols() << "]\n"
            << "output  [B*L, E] = [" << out.rows() << ", " << out.cols() << "]\n"
            << "weights [B*L, S] = [" << weights.rows() << ", " << weights.cols() << "]\n\n";
  const Eigen::IOFormat fmt(4, 0, ", ", "\n", "  [", "]");
  std::cout << "output, sequence 0, first 2 tokens, first 6 features:\n"
            << out.topLeftCorner(2, 6).format(fmt) << "\n\n"
            << "attention of sequence 0, token 0 over its 5 keys (sums to 1):\n"
            << weights.topRows(1).format(fmt) << "  sum = " << weights.row(0).sum() << "\n";
  return 0;
}
