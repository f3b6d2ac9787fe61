#include <attn/mask.hpp>

#include <type_traits>

#include "support/test_util.hpp"

namespace {

using attn_test::bmat;

// The polarity is in the type: a plain bool matrix is not a mask until it is named.
static_assert(!std::is_constructible_v<attn::BoolMask, attn::BoolMatrix>);
static_assert(!std::is_convertible_v<attn::BoolMatrix, attn::AttendMask>);
static_assert(!std::is_convertible_v<attn::BoolMatrix, attn::IgnoreMask>);
static_assert(std::is_convertible_v<attn::AttendMask, attn::BoolMask>);
static_assert(std::is_convertible_v<attn::IgnoreMask, attn::BoolMask>);

TEST(Mask, PolarityIsInTheType) {
  const auto m = bmat({{1, 0}});
  const attn::BoolMask attend = attn::AttendMask(m), ignore = attn::IgnoreMask(m);
  EXPECT_TRUE(attend.attends(0, 0));
  EXPECT_FALSE(attend.attends(0, 1));
  EXPECT_FALSE(ignore.attends(0, 0));
  EXPECT_TRUE(ignore.attends(0, 1));
}

TEST(Mask, DefaultIsNoMask) {
  EXPECT_TRUE(attn::BoolMask().empty());
  EXPECT_TRUE(attn::AdditiveMask<float>().empty());
  EXPECT_FALSE(attn::AttendMask(bmat({{1}})).empty());
}

// A mask built from a temporary owns a copy, and copies of it stay valid after the original goes.
TEST(Mask, OwnsTemporariesAndCopiesSafely) {
  attn::BoolMask copy;
  {
    attn::IgnoreMask m(bmat({{0, 1, 0}}));
    copy = m;
  }
  ASSERT_EQ(copy.cols(), 3);
  EXPECT_TRUE(copy.attends(0, 0));
  EXPECT_FALSE(copy.attends(0, 1));
}

// A named matrix is viewed, not copied: later changes to it are seen.
TEST(Mask, ViewsNamedMatrices) {
  attn::BoolMatrix m = bmat({{1, 1}});
  attn::AttendMask mask(m);
  EXPECT_EQ(mask.data(), m.data());
  m(0, 1) = false;
  EXPECT_FALSE(mask.attends(0, 1));
}

// Any Eigen expression works: a comparison, a column-major matrix (evaluated row-major).
TEST(Mask, FromExpressions) {
  attn::Matrix<float> scores(2, 2);
  scores << 1, -1, -2, 3;
  attn::AttendMask positive(scores.array() > 0.f);
  EXPECT_TRUE(positive.attends(0, 0));
  EXPECT_FALSE(positive.attends(0, 1));
  EXPECT_FALSE(positive.attends(1, 0));
  EXPECT_TRUE(positive.attends(1, 1));

  Eigen::Matrix<bool, 2, 3> colmajor;
  colmajor << 1, 0, 0, 0, 0, 1;
  attn::AttendMask cm(colmajor);
  EXPECT_TRUE(cm.attends(0, 0));
  EXPECT_FALSE(cm.attends(0, 1));
  EXPECT_TRUE(cm.attends(1, 2));
}

TEST(Mask, FromRawBuffers) {
  const bool buf[] = {true, false, false, true};
  attn::IgnoreMask m(buf, 2, 2);
  EXPECT_FALSE(m.attends(0, 0));
  EXPECT_TRUE(m.attends(0, 1));
  const float bias[] = {0.f, -1.f};
  attn::AdditiveMask<float> b(bias, 1, 2);
  EXPECT_EQ(b(0, 1), -1.f);
  EXPECT_TRUE(attn_test::throws_with<attn::argument_error>([] { attn::AttendMask(nullptr, 2, 2); }, {"null data", "[2, 2]"}));
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>([&] { attn::AttendMask(buf, -1, 2); }, {"negative shape", "[-1, 2]"}));
}

}  // namespace
