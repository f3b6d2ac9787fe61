// ContextParallelEncoder under mpirun: each rank runs a two-layer encoder on its rows and holds
// them to the single-process TransformerEncoder over the whole sequence, which each rank
// computes itself from the same weights and input.
#include <mpi.h>

#include <gtest/gtest.h>

#include "attn/dist/encoder.hpp"
#include "attn/init.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::Matrix;

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed, double sd = 1.0) {
  attn::Generator gen(seed);
  Matrix<T> m(rows, cols);
  attn::init::normal(m, sd, gen);
  return m;
}

template <class T>
class ContextParallelEncoderTest : public ::testing::Test {};
TYPED_TEST_SUITE(ContextParallelEncoderTest, attn_test::Scalars, attn_test::ScalarName);

// Post-norm and pre-norm (BERT's and GPT's orders), batch_first or not, with a final norm, key
// padding and causal masking: every rank's rows equal the single-process encoder's.
TYPED_TEST(ContextParallelEncoderTest, EqualsTheSingleProcessEncoder) {
  using T = TypeParam;
  const Index E = 16, H = 4, B = 2, L = 27;
  for (const bool norm_first : {false, true})
    for (const bool batch_first : {false, true})
      for (const bool causal : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "norm_first " << norm_first << " batch_first " << batch_first
                                          << " causal " << causal);
        attn::TransformerOptions o;
        o.dim_feedforward = 24;
        o.norm_first = norm_first;
        o.batch_first = batch_first;
        o.activation = attn::Activation::GELU;
        attn::Generator gen(5);
        attn::TransformerEncoder<T> enc(attn::TransformerEncoderLayer<T>(E, H, o, gen), 2, attn::LayerNorm<T>(E));
        // Layers that differ (the constructor copies one), and biases that are not zero.
        enc.layer(1).self_attn().set_in_proj_weight(random_matrix<T>(3 * E, E, 8, 0.3));
        enc.layer(0).self_attn().set_in_proj_bias(random_matrix<T>(3 * E, 1, 9, 0.1).col(0));

        // src (b, l) rows; the single-process call takes them in the module's order.
        const Matrix<T> src = random_matrix<T>(B * L, E, 10);
        attn::BoolMatrix pad = attn::BoolMatrix::Zero(B, L);
        pad(1, L - 1) = pad(1, 3) = pad(0, 0) = true;
        attn::EncoderArgs<T> args;
        args.batch = B;
        args.key_padding_mask = attn::IgnoreMask(pad);
        if (causal) args.causal = attn::Causal::TopLeft;
        Matrix<T> in(B * L, E);
        for (Index b = 0; b < B; ++b)
          for (Index l = 0; l < L; ++l) in.row(batch_first ? b * L + l : l * B + b) = src.row(b * L + l);
        const Matrix<T> y = enc.forward(in, args);
        Matrix<T> want(B * L, E);
        for (Index b = 0; b < B; ++b)
          for (Index l = 0; l < L; ++l) want.row(b * L + l) = y.row(batch_first ? b * L + l : l * B + b);

        attn::dist::ContextParallelEncoder<T> cp(MPI_COMM_WORLD, enc);
        const attn::dist::Sharding sh = cp.sharding(L);
        const int r = cp.rank();
        attn::dist::ContextArgs<T> a;
        a.batch = B;
        const attn::BoolMatrix pad_local = sh.shard_columns<bool>(pad, r);
        a.key_padding_mask = attn::IgnoreMask(pad_local);
        if (causal) a.causal = attn::Causal::BottomRight;
        const Matrix<T> got = cp.forward(sh.shard<T>(src, B, r), a);
        EXPECT_TRUE(attn_test::matrices_near(got, sh.shard<T>(want, B, r), attn_test::tolerance<T>() / 10));
      }
}

// A bad input on one rank is every rank's error.
TEST(ContextParallelEncoderErrors, OneRanksBadInputMakesEveryRankThrow) {
  attn::TransformerOptions o;
  o.dim_feedforward = 8;
  attn::dist::ContextParallelEncoder<float> cp(
      MPI_COMM_WORLD, attn::TransformerEncoder<float>(attn::TransformerEncoderLayer<float>(8, 2, o), 1));
  const Index n = cp.sharding(10).local_len(cp.rank());
  const Matrix<float> src = Matrix<float>::Ones(n, cp.rank() == 0 ? 7 : 8);
  attn::dist::ContextArgs<float> a;
  a.batch = 1;
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>([&] { cp.forward(src, a); },
                                                        {"ContextParallelEncoder::forward", "src has shape [", "on rank 0"}));
}

}  // namespace
