// attn::RopeCache / apply_rope: rotations computed by hand, the relative-position property, both
// pairings, partial rotary, and the argument checks. (PyTorch's HF and GPT-J formulas:
// pytorch_fixture_test's rope_* and gqa_rope_* cases.)
#include <gtest/gtest.h>

#include <attn/init.hpp>
#include <attn/rope.hpp>
#include <cmath>
#include <string>

#include "support/test_util.hpp"

namespace {

using attn::Index;

template <class T>
class RopeTest : public ::testing::Test {};
TYPED_TEST_SUITE(RopeTest, attn_test::Scalars, attn_test::ScalarName);

// head_dim 4, base 10000: theta_0 = 1, theta_1 = 10000^(-2/4) = 0.01. x = [1, 0, 0, 0] at position 2
// turns its first pair by 2 radians (cos 2 = -0.4161468365471424, sin 2 = 0.9092974268256817):
//   NeoX pairs (0, 2), (1, 3):  [cos 2, 0, sin 2, 0]
//   GPTJ pairs (0, 1), (2, 3):  [cos 2, sin 2, 0, 0]
// and x = [0, 1, 0, 0] (NeoX: the pair (1, 3), angle 2 * 0.01): [0, cos 0.02, 0, sin 0.02].
TYPED_TEST(RopeTest, RotationsByHand) {
  using T = TypeParam;
  const double c = -0.4161468365471424, s = 0.9092974268256817;
  attn::Matrix<T> x = attn::Matrix<T>::Zero(1, 4);
  x(0, 0) = 1;
  attn::RopeCache<T>(4, 8, {0, 10000.0, attn::RopeStyle::NeoX}).apply(x, 1, 1, 2);
  EXPECT_TRUE(attn_test::matrices_near(x, attn::Matrix<double>{{c, 0, s, 0}}, 1e-6));
  x.setZero();
  x(0, 0) = 1;
  attn::RopeCache<T>(4, 8, {0, 10000.0, attn::RopeStyle::GPTJ}).apply(x, 1, 1, 2);
  EXPECT_TRUE(attn_test::matrices_near(x, attn::Matrix<double>{{c, s, 0, 0}}, 1e-6));
  x.setZero();
  x(0, 1) = 1;
  attn::RopeCache<T>(4, 8).apply(x, 1, 1, 2);
  EXPECT_TRUE(attn_test::matrices_near(x, attn::Matrix<double>{{0, std::cos(0.02), 0, std::sin(0.02)}}, 1e-6));
  // Position 0 is the identity; each head of a row turns alike.
  attn::Matrix<T> y(1, 8);
  y << 1, 2, 3, 4, 1, 2, 3, 4;
  const attn::Matrix<T> y0 = y;
  const attn::RopeCache<T> rope(4, 8);
  rope.apply(y, 2, 1, 0);
  EXPECT_TRUE(y == y0);
  rope.apply(y, 2, 1, 5);
  EXPECT_TRUE(y.leftCols(4) == y.rightCols(4));
}

// Partial rotary (rotary_dim 2 of head_dim 4): features 2 and 3 of each head pass unchanged.
TYPED_TEST(RopeTest, PartialRotaryLeavesTheRestAlone) {
  using T = TypeParam;
  for (const auto style : {attn::RopeStyle::NeoX, attn::RopeStyle::GPTJ}) {
    attn::Matrix<T> x(3, 8);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(i + 1);
    const attn::Matrix<T> x0 = x;
    attn::RopeCache<T>(4, 16, {2, 10000.0, style}).apply(x, 2, 1, 7);
    for (Index h = 0; h < 2; ++h) EXPECT_TRUE(x.middleCols(4 * h + 2, 2) == x0.middleCols(4 * h + 2, 2));
    // The rotated pair keeps its length.
    for (Index r = 0; r < 3; ++r)
      EXPECT_NEAR(double(x.row(r).segment(0, 2).norm()), double(x0.row(r).segment(0, 2).norm()), 1e-5);
  }
}

// A batch: row l of every sequence sits at start + l (or starts[b] + l), exactly as when each
// sequence is rotated alone; the batch is never one long sequence (sequence 1 at L + l).
TYPED_TEST(RopeTest, BatchesRotatePerSequence) {
  using T = TypeParam;
  const Index B = 3, L = 4, H = 2, D = 6;
  attn::Generator gen(11);
  attn::Matrix<T> x(B * L, H * D);
  attn::init::uniform(x, -1.0, 1.0, gen);
  const attn::RopeCache<T> rope(D, 32);
  attn::Matrix<T> batched = x, ragged = x;
  rope.apply(batched, H, B, 5);
  attn::IndexVector starts(B);
  starts << 0, 9, 20;
  rope.apply(ragged, H, B, starts);
  for (Index b = 0; b < B; ++b) {
    attn::Matrix<T> alone = x.middleRows(b * L, L), alone_at = alone;
    rope.apply(alone, H, 1, 5);
    rope.apply(alone_at, H, 1, starts[b]);
    EXPECT_TRUE(batched.middleRows(b * L, L) == alone) << "sequence " << b;
    EXPECT_TRUE(ragged.middleRows(b * L, L) == alone_at) << "sequence " << b;
  }
  // Per-row positions give the same rows.
  attn::IndexVector pos(B * L);
  for (Index r = 0; r < B * L; ++r) pos[r] = starts[r / L] + r % L;
  attn::Matrix<T> by_row = x;
  rope.apply(by_row, H, pos);
  EXPECT_TRUE(by_row == ragged);
}

// What RoPE is for: q at position m and k at n score q . k as a function of m - n alone.
TYPED_TEST(RopeTest, ScoresDependOnRelativePositionOnly) {
  using T = TypeParam;
  attn::Generator gen(3);
  for (const auto style : {attn::RopeStyle::NeoX, attn::RopeStyle::GPTJ}) {
    const attn::RopeCache<T> rope(16, 64, {12, 500.0, style});
    attn::Matrix<T> q(1, 16), k(1, 16);
    attn::init::uniform(q, -1.0, 1.0, gen);
    attn::init::uniform(k, -1.0, 1.0, gen);
    const auto score = [&](Index m, Index n) {
      attn::Matrix<T> qm = q, kn = k;
      rope.apply(qm, 1, 1, m);
      attn::apply_rope<T>(kn, 1, 1, n, rope);
      return double(qm.row(0).dot(kn.row(0)));
    };
    EXPECT_NEAR(score(7, 3), score(40, 36), 1e-5);
    EXPECT_NEAR(score(3, 7), score(20, 24), 1e-5);
  }
}

template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception type: ") + e.what();
  }
  return "no exception";
}

TEST(RopeErrors, BadArgumentsAreNamedErrors) {
  using T = float;
  EXPECT_EQ(error_of<attn::argument_error>([] { attn::RopeCache<T>(8, 16, {3}); }),
            "attn::RopeCache: rotary_dim = 3 must be even, positive and at most head_dim = 8 (0: all of it)");
  EXPECT_NE(error_of<attn::argument_error>([] { attn::RopeCache<T>(8, 16, {10}); }), "no exception");
  EXPECT_NE(error_of<attn::argument_error>([] { attn::RopeCache<T>(8, 16, {0, -1.0}); }), "no exception");
  EXPECT_NE(error_of<attn::shape_error>([] { attn::RopeCache<T>(0, 16); }), "no exception");
  const attn::RopeCache<T> rope(8, 16);
  attn::Matrix<T> x = attn::Matrix<T>::Zero(4, 16);
  EXPECT_EQ(error_of<attn::shape_error>([&] { rope.apply(x, 3, 1, 0); }),
            "attn::RopeCache::apply: x has shape [4, 16], expected [rows, heads*head_dim] = [rows, 3*8]");
  EXPECT_EQ(error_of<attn::argument_error>([&] { rope.apply(x, 2, 1, 13); }),
            "attn::RopeCache::apply: start = 13 with 4 rows per sequence reaches outside the table's positions "
            "[0, 16) (max_positions)");
  EXPECT_EQ(error_of<attn::shape_error>([&] { rope.apply(x, 2, 3, 0); }),
            "attn::RopeCache::apply: x has shape [4, 16], expected [B*L, heads*head_dim] with B = batch = 3");
  attn::IndexVector starts(2);
  starts << 0, 15;  // sequence 1's two rows would sit at 15 and 16
  EXPECT_EQ(error_of<attn::argument_error>([&] { rope.apply(x, 2, 2, starts); }),
            "attn::RopeCache::apply: starts[1] = 15 with 2 rows per sequence reaches outside the table's positions "
            "[0, 16) (max_positions)");
  EXPECT_NE(error_of<attn::shape_error>([&] { rope.apply(x, 2, 2, starts.head(1)); }).find("starts has shape [1]"),
            std::string::npos);
  // An odd head_dim names head_dim, which the caller set, not the rotary_dim it defaults to.
  EXPECT_EQ(error_of<attn::argument_error>([] { attn::RopeCache<T>(7, 16); }),
            "attn::RopeCache: head_dim = 7 is odd: RoPE rotates pairs of features (set Rope::rotary_dim to an "
            "even width < head_dim to rotate only part of each head)");
  EXPECT_EQ(error_of<attn::argument_error>([] { attn::RopeCache<T>(7, 16, {6}); }), "no exception");  // rotates 6 of 7
  Eigen::Matrix<Index, Eigen::Dynamic, 1> pos(4);
  pos << 0, 1, 16, 2;
  EXPECT_EQ(error_of<attn::argument_error>([&] { rope.apply(x, 2, pos); }),
            "attn::RopeCache::apply: positions[2] = 16 is outside the table's [0, 16)");
  EXPECT_NE(error_of<attn::shape_error>([&] { rope.apply(x, 2, pos.head(3)); }).find("positions has shape [3]"),
            std::string::npos);
}

}  // namespace
