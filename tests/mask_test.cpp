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

// A matrix named through attn::view is viewed, not copied: later changes to it are seen.
TEST(Mask, ViewsNamedMatricesThroughAttnView) {
  attn::BoolMatrix m = bmat({{1, 1}});
  attn::AttendMask mask(attn::view(m));
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

// The finding: a mask built from an lvalue was a view, so one that outlived its matrix (or
// saw it change) gave silently wrong results. Now every mask copies, unless built from attn::view.
TEST(Mask, CopiesItsMatrixUnlessAskedToView) {
  attn::BoolMask padding;
  attn::AdditiveMask<float> bias;
  {
    attn::BoolMatrix pad = bmat({{0, 1}});
    attn::Matrix<float> b(1, 2);
    b << 0.5f, -1.f;
    padding = attn::IgnoreMask(pad);
    bias = attn::AdditiveMask<float>(b);
    pad.setConstant(true);  // changed, then destroyed
    b.setZero();
  }
  EXPECT_TRUE(padding.owns_data());
  EXPECT_TRUE(padding.attends(0, 0));
  EXPECT_FALSE(padding.attends(0, 1));
  EXPECT_TRUE(bias.owns_data());
  EXPECT_EQ(bias(0, 0), 0.5f);
  EXPECT_EQ(bias(0, 1), -1.f);

  // A view reads the matrix in place: it sees changes, and the matrix must outlive it.
  attn::BoolMatrix pad = bmat({{0, 1}});
  const attn::IgnoreMask viewed(attn::view(pad));
  EXPECT_FALSE(viewed.owns_data());
  EXPECT_EQ(viewed.data(), pad.data());
  EXPECT_FALSE(viewed.attends(0, 1));
  pad(0, 1) = false;
  EXPECT_TRUE(viewed.attends(0, 1));
  attn::Matrix<double> b = attn::Matrix<double>::Zero(2, 3);
  const attn::AdditiveMask<double> bias_view(attn::view(b));
  b(1, 2) = 7;
  EXPECT_EQ(bias_view(1, 2), 7.0);
  EXPECT_EQ(bias_view.rows(), 2);
  // attn::view of a temporary does not compile (tests/compile_fail/view_of_temporary.cpp).
}

// A buffer is copied too (row-major, rows x cols), or viewed through attn::view(data, rows, cols).
TEST(Mask, FromRawBuffers) {
  bool buf[] = {true, false, false, true};
  attn::IgnoreMask m(buf, 2, 2);
  const attn::IgnoreMask v(attn::view(buf, 2, 2));
  buf[0] = false;
  EXPECT_FALSE(m.attends(0, 0));  // the copy
  EXPECT_TRUE(m.attends(0, 1));
  EXPECT_TRUE(m.attends(1, 0));
  EXPECT_FALSE(m.attends(1, 1));
  EXPECT_TRUE(v.attends(0, 0));  // the view sees the change
  EXPECT_NE(m.data(), buf);
  EXPECT_EQ(v.data(), buf);
  float bias[] = {0.f, -1.f};
  attn::AdditiveMask<float> b(bias, 1, 2);
  bias[1] = 3.f;
  EXPECT_EQ(b(0, 1), -1.f);
  EXPECT_EQ(attn::AdditiveMask<float>(attn::view(bias, 1, 2))(0, 1), 3.f);
  EXPECT_TRUE(attn_test::throws_with<attn::argument_error>([] { attn::AttendMask(attn::view<bool>(nullptr, 3, 2)); },
                                                           {"null data", "[3, 2]"}));
  EXPECT_TRUE(attn_test::throws_with<attn::shape_error>([&] { attn::AttendMask(attn::view(buf, 2, -4)); },
                                                        {"negative shape", "[2, -4]"}));
  EXPECT_TRUE(
      attn_test::throws_with<attn::argument_error>([] { attn::AttendMask(nullptr, 2, 2); }, {"null data", "[2, 2]"}));
  EXPECT_TRUE(
      attn_test::throws_with<attn::shape_error>([&] { attn::AttendMask(buf, -1, 2); }, {"negative shape", "[-1, 2]"}));
}

}  // namespace
