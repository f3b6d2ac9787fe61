// masks: a padded batch under causal masking, the everyday decoder setup.
//
// Two sequences of lengths 4 and 2, padded to L = 4. key_padding_mask says which keys are
// padding; causal masking stops each token from seeing later ones. The mask types name their
// polarity: IgnoreMask (true = masked out, nn.MultiheadAttention's convention) and AttendMask
// (true = may attend, F.scaled_dot_product_attention's).
#include <attn/attn.hpp>

#include <iostream>

int main() {
  const attn::Index B = 2, L = 4, E = 8, H = 2;
  attn::MhaOptions options;
  options.batch_first = true;
  attn::Generator gen(1);
  attn::MultiHeadAttention<double> mha(E, H, options, gen);

  attn::Matrix<double> x = attn::Matrix<double>::Zero(B * L, E);
  for (attn::Index r = 0; r < x.rows(); ++r)
    for (attn::Index c = 0; c < E; ++c) x(r, c) = std::cos(0.5 * double(r) - 0.2 * double(c));

  // [B, S]: true where the key is padding. Sequence 1 has 2 real tokens.
  attn::BoolMatrix padding(B, L);
  padding << false, false, false, false,
             false, false, true, true;

  attn::MhaArgs<double> args;
  args.batch = B;
  args.key_padding_mask = attn::IgnoreMask(padding);
  args.causal = attn::Causal::TopLeft;  // query i sees keys j <= i (L == S: both alignments agree)
  args.need_weights = true;
  args.average_attn_weights = true;
  const auto [out, weights] = mha.forward(x, x, x, args);

  const Eigen::IOFormat fmt(3, 0, "  ", "\n", "  [", "]");
  std::cout << "attention weights, sequence 0 (causal: lower triangle):\n"
            << weights.topRows(L).format(fmt) << "\n\n"
            << "attention weights, sequence 1 (causal, and keys 2-3 are padding):\n"
            << weights.bottomRows(L).format(fmt) << "\n\n";

  // The same restriction for one head through ScaledDotProductAttention, with an explicit
  // AttendMask: true = may attend. Lower-triangular = top-left causal.
  attn::BoolMatrix allowed = attn::BoolMatrix::Zero(L, L);
  for (attn::Index i = 0; i < L; ++i)
    for (attn::Index j = 0; j <= i; ++j) allowed(i, j) = true;
  attn::Masks<double> m;
  m.attn_mask = attn::AttendMask(allowed);
  attn::ScaledDotProductAttention<double> sdpa;
  const auto q = x.topRows(L);
  const auto [o1, w1] = sdpa.forward_with_weights(q, q, q, m);
  attn::Masks<double> c;
  c.causal = attn::Causal::TopLeft;
  const auto [o2, w2] = sdpa.forward_with_weights(q, q, q, c);
  std::cout << "SDPA: explicit AttendMask and Causal::TopLeft agree: max |difference| = "
            << (o1 - o2).cwiseAbs().maxCoeff() << "\n";

  // A row with every key masked gives zeros here (PyTorch's nn.MultiheadAttention gives NaN).
  attn::BoolMatrix none = attn::BoolMatrix::Ones(L, L);
  none.row(0).setZero();
  attn::Masks<double> z;
  z.attn_mask = attn::AttendMask(none);
  std::cout << "row 0 with every key masked -> output row 0: " << sdpa.forward(q, q, q, z).row(0).format(fmt) << "\n";
  return 0;
}
