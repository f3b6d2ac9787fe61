// tests/odr_test_a.cpp - odr_test: two translation units, this one and odr_test_b.cpp, that both
// include every attn header. A function defined in a header without `inline` is then defined in
// both objects and the link fails. The tests check values computed by code in the other object,
// and use every public template here too, so both objects' instantiations end up in one program.
#include <attn/attn.hpp>
#include <attn/io/checkpoint.hpp>  // attn/io/ and attn/models/ are not in attn.hpp: they need nlohmann_json
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>
#include <attn/models/load.hpp>

#include <cmath>

#include "support/test_util.hpp"

namespace odr_test {
// Defined in odr_test_b.cpp, for float and double.
template <class T>
attn::Matrix<T> sdpa_equal_keys();
template <class T>
attn::AttentionResult<T> mha_zero_key_projection();
}  // namespace odr_test

namespace {

using attn_test::mat;
using attn_test::matrices_near;
using attn_test::tolerance;

template <class T>
class OdrTest : public ::testing::Test {};
TYPED_TEST_SUITE(OdrTest, attn_test::Scalars, attn_test::ScalarName);

// odr_test_b.cpp's problem: q = [[1, 2], [-3, 0.5]], every key [0.5, -1], v = [[1, 2], [3, 4], [5, 9]].
// All logits in a query's row are equal, so the softmax is uniform, p = [1/3, 1/3, 1/3], and each
// output row is the mean of the values, whatever the query and the scale:
//   [(1 + 3 + 5) / 3, (2 + 4 + 9) / 3] = [3, 5]
TYPED_TEST(OdrTest, EqualKeysAverageTheValues) {
  using T = TypeParam;
  const attn::Matrix<T> expected = mat<T>({{3, 5}, {3, 5}});
  EXPECT_TRUE(matrices_near(odr_test::sdpa_equal_keys<T>(), expected, tolerance<T>()));

  // The same problem through this object's copy of the reference kernel.
  const attn::Matrix<T> q = mat<T>({{1, 2}, {-3, 0.5}});
  const attn::Matrix<T> k = mat<T>({{0.5, -1}, {0.5, -1}, {0.5, -1}});
  const attn::Matrix<T> v = mat<T>({{1, 2}, {3, 4}, {5, 9}});
  attn::Matrix<T> out(2, 2);
  attn::detail::AttentionProblem<T> p;
  p.L = 2;
  p.S = p.mask_keys = 3;
  p.d = p.dv = 2;
  p.q = {q.data(), 0, 0, 2};
  p.k = {k.data(), 0, 0, 2};
  p.v = {v.data(), 0, 0, 2};
  p.out = {out.data(), 0, 0, 2};
  p.scale = T(0.5);
  attn::detail::attention_reference(p);
  EXPECT_TRUE(matrices_near(out, expected, tolerance<T>()));
}

// odr_test_b.cpp's module: x = [[1, 2, 3, 4], [3, 0, -1, 2], [5, 1, 1, 0]], E = 4, H = 2, the key
// projection zero, q and v projections and out_proj the identity, biases zero. Every logit is 0,
// so both heads attend uniformly (every weight 1/3) and output the mean of their value rows; v = x
// and out_proj = I, so every output row is the column mean of x:
//   [(1 + 3 + 5) / 3, (2 + 0 + 1) / 3, (3 - 1 + 1) / 3, (4 + 2 + 0) / 3] = [3, 1, 1, 2]
TYPED_TEST(OdrTest, ZeroKeyProjectionAveragesTheTokens) {
  using T = TypeParam;
  const attn::AttentionResult<T> r = odr_test::mha_zero_key_projection<T>();
  EXPECT_TRUE(matrices_near(r.output, mat<T>({{3, 1, 1, 2}, {3, 1, 1, 2}, {3, 1, 1, 2}}), tolerance<T>()));
  EXPECT_TRUE(matrices_near(r.weights, attn::Matrix<T>::Constant(3, 3, T(1) / T(3)), tolerance<T>()));
}

// Every public template instantiated in this object too: a causal, masked, biased attention through
// the public SDPA (the dispatch point) agrees with the reference kernel, and Linear and
// MultiHeadAttention run on the same data.
TYPED_TEST(OdrTest, EveryTemplateRunsHereToo) {
  using T = TypeParam;
  const attn::Index L = 3, S = 4, E = 4;
  attn::Generator gen(5);
  attn::Matrix<T> x(S, E);
  attn::init::uniform(x, -1.0, 1.0, gen);
  const attn::Linear<T> proj(E, E, /*bias=*/true, gen);
  const attn::Matrix<T> q = proj.forward(x.topRows(L)), k = proj.forward(x);

  attn::BoolMatrix allowed = attn::BoolMatrix::Constant(L, S, true);
  allowed(0, 1) = false;
  attn::Masks<T> m;
  m.attn_mask = attn::AttendMask(allowed);
  m.attn_bias = attn::AdditiveMask<T>(attn::Matrix<T>::Constant(L, S, T(0.25)));
  m.key_padding_mask = attn::IgnoreMask(attn::BoolMatrix::Zero(1, S));
  m.causal = attn::Causal::BottomRight;
  const attn::AttentionResult<T> fast = attn::ScaledDotProductAttention<T>().forward_with_weights(q, k, x, m);

  attn::Matrix<T> out(L, E), weights(L, S);
  attn::detail::AttentionProblem<T> p;
  p.L = L;
  p.S = p.mask_keys = S;
  p.d = p.dv = E;
  p.q = {q.data(), 0, 0, E};
  p.k = {k.data(), 0, 0, E};
  p.v = {x.data(), 0, 0, E};
  p.out = {out.data(), 0, 0, E};
  p.weights = {weights.data(), 0, 0, S};
  p.scale = T(1) / std::sqrt(T(E));
  attn::detail::bind_masks(p, m, "odr_test");
  attn::detail::attention_reference(p);
  EXPECT_TRUE(matrices_near(fast.output, out, 10 * tolerance<T>()));
  EXPECT_TRUE(matrices_near(fast.weights, weights, 10 * tolerance<T>()));

  attn::MultiHeadAttention<T> mha(E, /*num_heads=*/2, attn::MhaOptions{}, gen);
  attn::MhaArgs<T> args;
  args.batch = 1;
  args.causal = attn::Causal::TopLeft;
  const attn::Matrix<T> y = mha.forward(x, x, x, args).output;
  EXPECT_EQ(y.rows(), S);
  EXPECT_EQ(y.cols(), E);
  EXPECT_TRUE(y.allFinite());
}

}  // namespace
