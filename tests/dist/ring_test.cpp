// tests/dist/ring_test.cpp - ring (context-parallel) attention, attn/dist/detail/ring.hpp, with the
// P ranks simulated in one process: no MPI. Each rank packs its keys and values (its rows of the
// sequence, attn::dist::Sharding) into the block that would travel, and attends every rank's block
// in the order the ring delivers them (rank r at step s: the block of rank (r - s) mod P), as
// attn/dist/context_parallel.hpp's run() drives it; the ranks' outputs and log-sum-exps, unsharded,
// must equal one GroupedQueryAttention over the whole sequence.
//
//   by hand         a two-position sequence over two ranks, both layouts, with causal masking and a
//                   sink, and the bytes of a block (block_layout, pack_block)
//   randomized      P in 1..5, Contiguous and ZigZag, L in 1..40 (L < 2P too: empty segments and
//                   ranks that hold no rows), every mask and score option, against GQA at 1e-5
//                   (float; 1e-12 double) on outputs and lse; fully masked rows are zeros and -inf
//   storage         K and V travelling in bf16, fp16 and int8 against GQA over K and V rounded
//                   the same way; values bf16 and fp16 hold exactly give the Native ring's bits
//   precision       Precision::BFloat16 against GQA of the same precision, within twice the
//                   documented bound (attn/precision.hpp: both sides are within it of the exact)
//   determinism     the same simulation twice gives the same bits
#include <gtest/gtest.h>

#include <attn/detail/storage.hpp>
#include <attn/dist/detail/ring.hpp>
#include <attn/dist/sharding.hpp>
#include <attn/grouped_query_attention.hpp>
#include <attn/mask.hpp>
#include <attn/precision.hpp>
#include <attn/storage.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "support/stored_kv.hpp"
#include "support/test_util.hpp"

namespace {

using attn::BoolMatrix;
using attn::Causal;
using attn::Index;
using attn::Matrix;
using attn::Precision;
using attn::Storage;
using attn::Vector;
using attn::dist::Layout;
using attn::dist::Sharding;
using attn::dist::detail::block_layout;
using attn::dist::detail::BlockLayout;
using attn::dist::detail::pack_block;
using attn::dist::detail::RingAccumulator;
using attn::dist::detail::RingMasks;
using attn::dist::detail::RingShape;

template <class T>
class RingTest : public ::testing::Test {};
TYPED_TEST_SUITE(RingTest, attn_test::Scalars, attn_test::ScalarName);

template <class T>
constexpr double kTol = std::is_same_v<T, float> ? 1e-5 : 1e-12;

// One problem: B sequences of L positions, H query heads over Hkv kv heads, split over P ranks.
template <class T>
struct Case {
  int P = 1;
  Layout layout = Layout::Contiguous;
  Index B = 1, H = 1, Hkv = 1, L = 1, d = 1, dv = 1;
  Storage storage = Storage::Native;
  // The masks over the whole sequence, as GroupedQueryAttention takes them: attn_mask and attn_bias
  // [L, L] or [B*H*L, L], key_padding_mask [B, L]; batch = B.
  attn::GqaArgs<T> args;
  Matrix<T> q, k, v;  // [B*L, H*d], [B*L, Hkv*d], [B*L, Hkv*dv]

  std::string describe() const {
    std::ostringstream s;
    s << "P " << P << " " << attn::dist::layout_name(layout) << " B " << B << " H " << H << " Hkv " << Hkv << " L "
      << L << " d " << d << " dv " << dv << " storage " << attn::storage_name(storage);
    if (args.causal != Causal::None) s << (args.causal == Causal::TopLeft ? " causal TopLeft" : " causal BottomRight");
    if (args.window > 0) s << " window " << args.window;
    if (args.sink_tokens > 0) s << " sink_tokens " << args.sink_tokens;
    if (args.softcap > T(0)) s << " softcap " << args.softcap;
    if (args.alibi_slopes.size() > 0) s << " alibi";
    if (args.sinks.size() > 0) s << " sinks";
    if (!args.key_padding_mask.empty())
      s << " key_padding (" << (args.key_padding_mask.attend_value() ? "AttendMask" : "IgnoreMask") << ")";
    if (!args.attn_mask.empty())
      s << " attn_mask [" << args.attn_mask.rows() << ", " << args.attn_mask.cols() << "] ("
        << (args.attn_mask.attend_value() ? "AttendMask" : "IgnoreMask") << ")";
    if (!args.attn_bias.empty()) s << " attn_bias [" << args.attn_bias.rows() << ", " << args.attn_bias.cols() << "]";
    if (args.precision && *args.precision == Precision::BFloat16) s << " precision bf16";
    return s.str();
  }
};

// Bytes after each block that pack_block must leave alone.
constexpr std::size_t kGuard = 64;
constexpr unsigned char kGuardByte = 0xA5;

// A bool mask with the polarity of `like`.
attn::BoolMask with_polarity(const attn::BoolMask& like, BoolMatrix m) {
  if (like.attend_value()) return attn::AttendMask(std::move(m));
  return attn::IgnoreMask(std::move(m));
}

// The P ranks of a ring in one process: every rank packs its block from its shard of K and V (and
// of the key padding's columns), then attends the blocks in the ring's order and finishes; the
// ranks' out [B*n, H*dv] and lse [H, B*n] unsharded into [B*L, H*dv] and [H, B*L]. The options as
// context_parallel.hpp's run() fills RingMasks from ContextArgs.
template <class T>
attn::AttentionLse<T> ring(const Case<T>& c) {
  const Sharding sh(c.L, c.P, c.layout);
  const attn::GqaArgs<T>& a = c.args;
  const RingShape s{c.B, c.H, c.Hkv, c.d, c.dv, c.storage, !a.key_padding_mask.empty()};
  const std::size_t P = std::size_t(c.P);

  // 1. Each rank's block: what it sends first, packed before a guard that must stay untouched.
  std::vector<std::vector<unsigned char>> blocks(P);
  for (int r = 0; r < c.P; ++r) {
    const Matrix<T> k_r = sh.shard<T>(c.k, c.B, r), v_r = sh.shard<T>(c.v, c.B, r);
    BoolMatrix kp_r;
    if (s.key_padding)
      kp_r = sh.shard_columns<bool>(Eigen::Map<const BoolMatrix>(a.key_padding_mask.data(), c.B, c.L), r);
    // (A rank without rows passes kp_r.data(), null for a [B, 0] matrix, as run() passes its
    // caller's [B, 0] key_padding_mask.)
    const std::size_t bytes = block_layout<T>(s, sh.local_len(r)).bytes;
    std::vector<unsigned char> guarded(bytes + kGuard, kGuardByte);
    pack_block<T>(s, k_r, v_r, s.key_padding ? kp_r.data() : nullptr, guarded.data());
    EXPECT_TRUE(std::all_of(guarded.begin() + std::ptrdiff_t(bytes), guarded.end(),
                            [](unsigned char x) { return x == kGuardByte; }))
        << "pack_block wrote past block_layout's " << bytes << " bytes for rank " << r;
    // What travels: exactly the block's bytes (an allocation of that size, so AddressSanitizer
    // sees a read past them).
    blocks[std::size_t(r)].assign(guarded.begin(), guarded.begin() + std::ptrdiff_t(bytes));
  }

  // 2. The shared options, as run() sets them.
  RingMasks<T> m;
  m.causal = a.causal != Causal::None;
  m.window = std::min(a.window, 2 * c.L);
  m.sink_tokens = std::min(a.sink_tokens, c.L);
  m.softcap = a.softcap;
  m.alibi_slopes = a.alibi_slopes.size() ? a.alibi_slopes.data() : nullptr;
  m.sinks = a.sinks.size() ? a.sinks.data() : nullptr;
  m.key_padding_attends = s.key_padding && a.key_padding_mask.attend_value();
  m.precision = a.precision ? *a.precision : Precision::Native;
  m.scale = T(1) / std::sqrt(static_cast<T>(c.d));

  // 3. Each rank: its queries and its rows of attn_mask / attn_bias ([n, L] shared, or rows
  // (b, h, local row) of a [B*H*n, L] one: Sharding::shard with batch B*H), then the ring.
  std::vector<Matrix<T>> outs(P), lses(P);
  for (int r = 0; r < c.P; ++r) {
    const Index n = sh.local_len(r);
    const Matrix<T> q_r = sh.shard<T>(c.q, c.B, r);
    attn::Masks<T> local;
    if (!a.attn_mask.empty()) {
      const Index rows = a.attn_mask.rows();
      local.attn_mask = with_polarity(
          a.attn_mask, sh.shard<bool>(Eigen::Map<const BoolMatrix>(a.attn_mask.data(), rows, c.L), rows / c.L, r));
    }
    if (!a.attn_bias.empty()) {
      const Index rows = a.attn_bias.rows();
      local.attn_bias = attn::AdditiveMask<T>(
          sh.shard<T>(Eigen::Map<const Matrix<T>>(a.attn_bias.data(), rows, c.L), rows / c.L, r));
    }
    m.masks = &local;
    Matrix<T>& out = outs[std::size_t(r)];
    Matrix<T>& lse = lses[std::size_t(r)];
    out.resize(c.B * n, c.H * c.dv);
    lse.resize(c.H, c.B * n);
    RingAccumulator<T> acc(sh, r, s, m, q_r, out, lse);
    for (int step = 0; step < c.P; ++step) {
      const int src = (r - step + c.P) % c.P;
      acc.attend(blocks[std::size_t(src)].data(), src);
    }
    acc.finish();
  }

  // 4. Back to the whole sequence. lse [H, B*n] is per row (b, local row) in its columns: unshard
  // its transpose.
  attn::AttentionLse<T> result;
  result.output = sh.unshard<T>(outs, c.B);
  std::vector<Matrix<T>> lse_rows(P);
  for (std::size_t r = 0; r < P; ++r) lse_rows[r] = lses[r].transpose();
  result.lse = sh.unshard<T>(lse_rows, c.B).transpose();
  return result;
}

// GroupedQueryAttention over the whole sequence, K and V as the ring's storage keeps them.
template <class T>
attn::AttentionLse<T> whole(const Case<T>& c) {
  const attn::GroupedQueryAttention<T> gqa(c.H, c.Hkv);
  return gqa.forward_with_lse(c.q, attn_test::stored_as(c.k, c.Hkv, c.storage), attn_test::stored_as(c.v, c.Hkv, c.storage), c.args);
}

// max |a - e|, non-finite entries matched exactly (-inf and -inf agree; anything else: inf).
template <class T>
double max_diff(const Matrix<T>& actual, const Matrix<T>& expected) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (Index i = 0; i < expected.size(); ++i) {
    const double x = double(actual.data()[i]), y = double(expected.data()[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) {
      if (!(x == y)) return std::numeric_limits<double>::infinity();
      continue;
    }
    worst = std::max(worst, std::abs(x - y));
  }
  return worst;
}

template <class T>
double max_abs_finite(const Matrix<T>& x) {
  double m = 0;
  for (Index i = 0; i < x.size(); ++i)
    if (std::isfinite(double(x.data()[i]))) m = std::max(m, std::abs(double(x.data()[i])));
  return m;
}

template <class T>
Matrix<T> normal(Index rows, Index cols, attn_test::Rng& rng, double sigma = 1.0) {
  Matrix<T> x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(sigma * rng.normal());
  return x;
}

// A random case of P ranks, the layout and L given, every other choice drawn: heads, dims (dv != d
// at times), causal of either alignment, a window (with sink tokens at times), softcap, ALiBi,
// sinks, key padding, attn_mask and attn_bias of either shape and either polarity, with rows and
// whole sequences masked out at times.
template <class T>
Case<T> random_case(attn_test::Rng& rng, int P, Layout layout, Index L) {
  Case<T> c;
  c.P = P;
  c.layout = layout;
  c.L = L;
  c.B = rng.pick(1, 2);
  c.H = rng.one_of({1, 2, 4});
  do c.Hkv = rng.one_of({1, 2, 4});
  while (c.H % c.Hkv != 0);
  c.d = rng.one_of({1, 3, 8, 13, 16});
  c.dv = rng.coin(0.6) ? c.d : rng.one_of({3, 8, 13});
  const double spread = rng.coin(0.2) ? 3.0 : 1.0;  // larger logits at times
  c.q = normal<T>(c.B * L, c.H * c.d, rng, spread);
  c.k = normal<T>(c.B * L, c.Hkv * c.d, rng);
  c.v = normal<T>(c.B * L, c.Hkv * c.dv, rng);

  attn::GqaArgs<T>& a = c.args;
  a.batch = c.B;
  if (rng.coin(0.5)) a.causal = rng.coin(0.5) ? Causal::TopLeft : Causal::BottomRight;
  if (rng.coin(0.35)) {
    a.window = rng.pick(1, L + 2);
    if (rng.coin(0.5)) a.sink_tokens = rng.pick(1, 4);
  }
  if (rng.coin(0.2)) a.softcap = T(rng.uniform(2.0, 10.0));
  if (rng.coin(0.25)) a.alibi_slopes = attn::alibi_slopes<T>(c.H);
  if (rng.coin(0.25)) {
    a.sinks.resize(c.H);
    for (Index h = 0; h < c.H; ++h) a.sinks[h] = T(rng.uniform(-1.0, 2.0));
  }
  if (rng.coin(0.35)) {  // true = attend (AttendMask) or true = ignore (IgnoreMask)
    const bool attend = rng.coin(0.5);
    BoolMatrix kp(c.B, L);
    for (Index i = 0; i < kp.size(); ++i) kp.data()[i] = rng.coin(0.3) ? !attend : attend;
    if (rng.coin(0.3)) kp.row(rng.pick(0, c.B - 1)).setConstant(!attend);  // a sequence of padding only
    if (attend)
      a.key_padding_mask = attn::AttendMask(std::move(kp));
    else
      a.key_padding_mask = attn::IgnoreMask(std::move(kp));
  }
  if (rng.coin(0.3)) {
    const bool attend = rng.coin(0.5);
    const Index rows = rng.coin(0.5) ? L : c.B * c.H * L;
    BoolMatrix mk(rows, L);
    for (Index i = 0; i < mk.size(); ++i) mk.data()[i] = rng.coin(0.3) ? !attend : attend;
    for (Index r = 0; r < rows; ++r)
      if (rng.coin(0.1)) mk.row(r).setConstant(!attend);  // a query that may attend nothing
    if (attend)
      a.attn_mask = attn::AttendMask(std::move(mk));
    else
      a.attn_mask = attn::IgnoreMask(std::move(mk));
  }
  if (rng.coin(0.3)) {
    const Index rows = rng.coin(0.5) ? L : c.B * c.H * L;
    Matrix<T> bias = normal<T>(rows, L, rng);
    for (Index i = 0; i < bias.size(); ++i)
      if (rng.coin(0.05)) bias.data()[i] = -std::numeric_limits<T>::infinity();  // -inf masks, as PyTorch's
    a.attn_bias = attn::AdditiveMask<T>(std::move(bias));
  }
  return c;
}

// Rows (and heads) whose every key is masked: lse -inf in the reference.
template <class T>
Index masked_rows(const Matrix<T>& lse) {
  return Index((lse.array() == -std::numeric_limits<T>::infinity()).count());
}

// Worst errors seen, printed at the end of a test.
// (ratio: the error over max(1, the largest expected magnitude), what the tolerance bounds.)
struct Worst {
  double out = 0, lse = 0, ratio = 0;
  Index cases = 0, masked = 0;
  void print(const char* what, const char* type) const {
    std::printf("%s (%s): %lld cases, max |out - gqa| %.3g, max |lse - gqa| %.3g (%.3g relative), %lld (row, head)s"
                " fully masked\n",
                what, type, static_cast<long long>(cases), out, lse, ratio, static_cast<long long>(masked));
  }
};

template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "float" : "double";
}

// The ring of c against GroupedQueryAttention over the whole sequence: |out - gqa| and
// |lse - gqa| at most tol times max(1, the largest expected magnitude), -inf where GQA has -inf.
template <class T>
void expect_ring_equals_gqa(const Case<T>& c, double tol, Worst& worst) {
  SCOPED_TRACE(c.describe());
  const attn::AttentionLse<T> got = ring(c), want = whole(c);
  const double e_out = max_diff(got.output, want.output), e_lse = max_diff(got.lse, want.lse);
  const double s_out = std::max(1.0, max_abs_finite(want.output)), s_lse = std::max(1.0, max_abs_finite(want.lse));
  EXPECT_LE(e_out, tol * s_out);
  EXPECT_LE(e_lse, tol * s_lse);
  worst.out = std::max(worst.out, e_out);
  worst.lse = std::max(worst.lse, e_lse);
  worst.ratio = std::max({worst.ratio, e_out / s_out, e_lse / s_lse});
  worst.masked += masked_rows(want.lse);
  ++worst.cases;
}

// ---- By hand -------------------------------------------------------------------------------------

// L = 2 positions over P = 2 ranks, one head, d = 1 (scale 1/sqrt(1) = 1), dv = 2:
//   q = [1], [0]    k = [0], [ln 3]    v = [1, 2], [5, 6]
// Position 0's query scores the keys 1*0 = 0 and 1*ln 3: weights 1 / (1 + 3) = 1/4 and 3/4, so
//   out = 1/4 [1, 2] + 3/4 [5, 6] = [1/4 + 15/4, 2/4 + 18/4] = [4, 5],  lse = ln(e^0 + e^ln 3) = ln 4.
// Position 1's query (0) scores both 0: weights 1/2, 1/2, out = [3, 4], lse = ln 2.
// Causal: position 0 sees key 0 only: out = [1, 2], lse = ln 1 = 0; position 1 as before.
// A sink of logit 0 (e^0 = 1 in every denominator, no value): position 0 has 1 + 3 + 1 = 5,
//   out = (1 [1, 2] + 3 [5, 6]) / 5 = [16/5, 20/5] = [3.2, 4], lse = ln 5; position 1 has 1 + 1 + 1 = 3,
//   out = ([1, 2] + [5, 6]) / 3 = [2, 8/3], lse = ln 3.
// Contiguous: rank 0 holds position 0, rank 1 position 1. ZigZag: 4 chunks [c*2/4, (c+1)*2/4) =
// [0,0) [0,1) [1,1) [1,2); rank 0 holds chunks 0 and 3 (position 1), rank 1 chunks 1 and 2
// (position 0).
TYPED_TEST(RingTest, TwoPositionsTwoRanksByHand) {
  using T = TypeParam;
  const T ln3 = std::log(T(3));
  for (const Layout layout : {Layout::Contiguous, Layout::ZigZag}) {
    for (int variant = 0; variant < 3; ++variant) {  // plain, causal, sink
      SCOPED_TRACE(std::string(attn::dist::layout_name(layout)) + (variant == 1 ? " causal" : variant == 2 ? " sink" : ""));
      const Sharding sh(2, 2, layout);
      const int holds_position_0 = layout == Layout::Contiguous ? 0 : 1;
      ASSERT_EQ(sh.local_len(0), 1);
      ASSERT_EQ(sh.local_len(1), 1);
      const Matrix<T> q = attn_test::mat<T>({{1}, {0}}), v = attn_test::mat<T>({{1, 2}, {5, 6}});
      Matrix<T> k(2, 1);
      k << T(0), ln3;
      const RingShape s{1, 1, 1, 1, 2, Storage::Native, false};
      std::vector<unsigned char> blocks[2];
      for (int r = 0; r < 2; ++r) {
        blocks[r].resize(block_layout<T>(s, 1).bytes);
        pack_block<T>(s, sh.shard<T>(k, 1, r), sh.shard<T>(v, 1, r), nullptr, blocks[r].data());
      }
      const attn::Masks<T> none;
      const Vector<T> sinks = Vector<T>::Zero(1);
      RingMasks<T> m;
      m.causal = variant == 1;
      m.sinks = variant == 2 ? sinks.data() : nullptr;
      m.masks = &none;
      m.scale = T(1);
      Matrix<T> outs[2], lses[2];
      for (int r = 0; r < 2; ++r) {
        const Matrix<T> q_r = sh.shard<T>(q, 1, r);
        outs[r].resize(1, 2);
        lses[r].resize(1, 1);
        RingAccumulator<T> acc(sh, r, s, m, q_r, outs[r], lses[r]);
        acc.attend(blocks[r].data(), r);              // step 0: its own block
        acc.attend(blocks[1 - r].data(), 1 - r);      // step 1: rank (r - 1) mod 2's
        acc.finish();
      }
      const Matrix<T>& out0 = outs[holds_position_0];
      const Matrix<T>& out1 = outs[1 - holds_position_0];
      const T lse0 = lses[holds_position_0](0, 0), lse1 = lses[1 - holds_position_0](0, 0);
      const T tol = std::is_same_v<T, float> ? T(2e-6) : T(1e-14);
      const T want0[3][2] = {{4, 5}, {1, 2}, {T(3.2), 4}};
      const T want1[3][2] = {{3, 4}, {3, 4}, {2, T(8) / T(3)}};
      const T want_lse0[3] = {std::log(T(4)), 0, std::log(T(5))};
      const T want_lse1[3] = {std::log(T(2)), std::log(T(2)), std::log(T(3))};
      EXPECT_NEAR(out0(0, 0), want0[variant][0], tol);
      EXPECT_NEAR(out0(0, 1), want0[variant][1], tol);
      EXPECT_NEAR(lse0, want_lse0[variant], tol);
      EXPECT_NEAR(out1(0, 0), want1[variant][0], tol);
      EXPECT_NEAR(out1(0, 1), want1[variant][1], tol);
      EXPECT_NEAR(lse1, want_lse1[variant], tol);
    }
  }
}

// block_layout's offsets by hand, and what pack_block puts there. B = 2, H_kv = 2, n = 3: 12 rows
// (b, kv head, row) of d = 3 keys and dv = 5 values.
//   int8 with key padding: K 12*3 = 36 bytes at 0; V at 64 (36 rounded up to 64 bytes), 60 bytes to
//   124; K scales at 128, 12 floats = 48 bytes to 176; V scales at 192, to 240; key padding at 256,
//   B*n = 6 bytes to 262; 320 in all.
//   double, native, no padding: K 12*3*8 = 288 at 0; V at 320, 480 bytes to 800; scales and padding
//   empty at 832; 832 in all.
TYPED_TEST(RingTest, BlockLayoutAndPackingByHand) {
  using T = TypeParam;
  const RingShape int8_kp{2, 4, 2, 3, 5, Storage::Int8, true};
  const BlockLayout a = block_layout<float>(int8_kp, 3);
  EXPECT_EQ(a.k, 0u);
  EXPECT_EQ(a.v, 64u);
  EXPECT_EQ(a.k_scale, 128u);
  EXPECT_EQ(a.v_scale, 192u);
  EXPECT_EQ(a.key_padding, 256u);
  EXPECT_EQ(a.bytes, 320u);
  const BlockLayout b = block_layout<double>(RingShape{2, 4, 2, 3, 5, Storage::Native, false}, 3);
  EXPECT_EQ(b.k, 0u);
  EXPECT_EQ(b.v, 320u);
  EXPECT_EQ(b.k_scale, 832u);
  EXPECT_EQ(b.v_scale, 832u);
  EXPECT_EQ(b.key_padding, 832u);
  EXPECT_EQ(b.bytes, 832u);
  EXPECT_EQ(block_layout<float>(int8_kp, 0).bytes, 0u);  // a rank without rows sends nothing

  // Native: element (b, h, j, c) of the block is k(b*n + j, h*d + c); the padding entries follow.
  attn_test::Rng rng(7);
  const Index B = 2, Hkv = 2, n = 3, d = 3, dv = 5;
  const Matrix<T> k = normal<T>(B * n, Hkv * d, rng), v = normal<T>(B * n, Hkv * dv, rng);
  const BoolMatrix kp = attn_test::bmat({{1, 0, 0}, {0, 1, 1}});
  const RingShape s{B, 4, Hkv, d, dv, Storage::Native, true};
  const BlockLayout lay = block_layout<T>(s, n);
  std::vector<unsigned char> block(lay.bytes);
  pack_block<T>(s, k, v, kp.data(), block.data());
  const T* kb = reinterpret_cast<const T*>(block.data() + lay.k);
  const T* vb = reinterpret_cast<const T*>(block.data() + lay.v);
  const bool* pb = reinterpret_cast<const bool*>(block.data() + lay.key_padding);
  for (Index bi = 0; bi < B; ++bi)
    for (Index h = 0; h < Hkv; ++h)
      for (Index j = 0; j < n; ++j) {
        for (Index c = 0; c < d; ++c) EXPECT_EQ(kb[((bi * Hkv + h) * n + j) * d + c], k(bi * n + j, h * d + c));
        for (Index c = 0; c < dv; ++c) EXPECT_EQ(vb[((bi * Hkv + h) * n + j) * dv + c], v(bi * n + j, h * dv + c));
      }
  for (Index i = 0; i < B * n; ++i) EXPECT_EQ(pb[i], kp.data()[i]);
}

// ---- Against GroupedQueryAttention over the whole sequence ---------------------------------------

// Every P in 1..5, both layouts and every L from 1 to 2P + 3: segments and whole ranks without rows
// (Contiguous: L < P; ZigZag: L < 2P), each with random options.
TYPED_TEST(RingTest, EverySmallLengthAndLayoutEqualsGqa) {
  using T = TypeParam;
  attn_test::Rng rng(20261205);
  Worst worst;
  Index empty_ranks = 0;
  for (int P = 1; P <= 5; ++P)
    for (const Layout layout : {Layout::Contiguous, Layout::ZigZag})
      for (Index L = 1; L <= 2 * P + 3; ++L) {
        const Sharding sh(L, P, layout);
        for (int r = 0; r < P; ++r) empty_ranks += sh.local_len(r) == 0;
        for (int rep = 0; rep < 2; ++rep) expect_ring_equals_gqa(random_case<T>(rng, P, layout, L), kTol<T>, worst);
      }
  EXPECT_GT(empty_ranks, 0);
  worst.print("every small length", type_name<T>());
}

// Random P, layout, L up to 40 and every option.
TYPED_TEST(RingTest, RandomOptionsEqualGqa) {
  using T = TypeParam;
  attn_test::Rng rng(20261206);
  Worst worst;
  for (int i = 0; i < 300; ++i) {
    const int P = int(rng.pick(1, 5));
    const Layout layout = rng.coin(0.5) ? Layout::ZigZag : Layout::Contiguous;
    const Index L = rng.coin(0.25) ? rng.pick(1, 2 * P) : rng.pick(1, 40);
    expect_ring_equals_gqa(random_case<T>(rng, P, layout, L), kTol<T>, worst);
  }
  EXPECT_GT(worst.masked, 0);  // the cases reached fully masked rows
  worst.print("random options", type_name<T>());
}

// Rows with every key masked - a sequence of padding only (either polarity), a query whose
// attn_mask row is empty, a causal first query whose one key is padding - are zeros with lse -inf,
// exactly; with sinks they stay zeros and their lse is the sink's logit (the sink alone in the
// denominator).
TYPED_TEST(RingTest, FullyMaskedRowsAreZerosWithLseMinusInf) {
  using T = TypeParam;
  constexpr T inf = std::numeric_limits<T>::infinity();
  attn_test::Rng rng(11);
  for (const bool attend : {true, false})
    for (const bool with_sinks : {false, true})
      for (const Layout layout : {Layout::Contiguous, Layout::ZigZag}) {
        Case<T> c;
        c.P = 3;
        c.layout = layout;
        c.B = 2;
        c.H = 2;
        c.Hkv = 1;
        c.L = 7;
        c.d = 3;
        c.dv = 4;
        c.q = normal<T>(c.B * c.L, c.H * c.d, rng);
        c.k = normal<T>(c.B * c.L, c.Hkv * c.d, rng);
        c.v = normal<T>(c.B * c.L, c.Hkv * c.dv, rng);
        c.args.batch = c.B;
        c.args.causal = Causal::BottomRight;
        // Sequence 0: key 0 is padding (query 0 sees nothing); sequence 1: every key is padding.
        BoolMatrix kp = BoolMatrix::Constant(c.B, c.L, attend);
        kp(0, 0) = !attend;
        kp.row(1).setConstant(!attend);
        c.args.key_padding_mask = attend ? attn::BoolMask(attn::AttendMask(kp)) : attn::BoolMask(attn::IgnoreMask(kp));
        // Query 5 of sequence 0 may attend nothing in head 1: a [B*H*L, L] mask, row (0, 1, 5).
        BoolMatrix mk = BoolMatrix::Constant(c.B * c.H * c.L, c.L, true);
        mk.row((0 * c.H + 1) * c.L + 5).setConstant(false);
        c.args.attn_mask = attn::AttendMask(mk);
        if (with_sinks) c.args.sinks = attn_test::vec<T>({0.5, -1.25});
        SCOPED_TRACE(c.describe());

        const attn::AttentionLse<T> got = ring(c), want = whole(c);
        // (head, row): the fully masked rows; everything else is attended.
        std::vector<std::pair<Index, Index>> masked = {{0, 0}, {1, 0}, {1, 5}};
        for (Index h = 0; h < c.H; ++h)
          for (Index l = 0; l < c.L; ++l) masked.push_back({h, c.L + l});
        for (const auto& [h, row] : masked) {
          const T want_lse = with_sinks ? c.args.sinks[h] : -inf;
          EXPECT_EQ(got.lse(h, row), want_lse) << "head " << h << " row " << row;
          EXPECT_EQ(want.lse(h, row), want_lse) << "head " << h << " row " << row;
          for (Index j = 0; j < c.dv; ++j) EXPECT_EQ(got.output(row, h * c.dv + j), T(0));
        }
        EXPECT_EQ(masked_rows(got.lse), with_sinks ? 0 : Index(masked.size()));
        EXPECT_LE(max_diff(got.output, want.output), kTol<T> * std::max(1.0, max_abs_finite(want.output)));
        EXPECT_LE(max_diff(got.lse, want.lse), kTol<T> * std::max(1.0, max_abs_finite(want.lse)));
      }
}

// ---- Storage: K and V travel in bf16, fp16 or int8 -----------------------------------------------

// Each storage type against GQA over K and V rounded as the block stores them (store_row per row
// and kv head, read back): the same numbers, so float's and double's tolerance.
TYPED_TEST(RingTest, StorageEqualsGqaOverRoundedKv) {
  using T = TypeParam;
  attn_test::Rng rng(20261207);
  Worst worst[3];
  const Storage storages[3] = {Storage::BFloat16, Storage::Float16, Storage::Int8};
  for (int i = 0; i < 150; ++i) {
    const int P = int(rng.pick(1, 5));
    const Layout layout = rng.coin(0.5) ? Layout::ZigZag : Layout::Contiguous;
    Case<T> c = random_case<T>(rng, P, layout, rng.pick(1, 40));
    const int si = i % 3;
    c.storage = storages[si];
    expect_ring_equals_gqa(c, kTol<T>, worst[si]);
  }
  for (int si = 0; si < 3; ++si)
    worst[si].print((std::string("storage ") + attn::storage_name(storages[si])).c_str(), type_name<T>());
}

// K and V of small multiples of 1/8 (|x| <= 4: 6 significant bits) are bf16 and fp16 values, stored
// exactly: the ring that sends them in bf16 or fp16 gives the Native ring's bits.
TYPED_TEST(RingTest, ExactlyRepresentableKvGiveNativeBits) {
  using T = TypeParam;
  attn_test::Rng rng(20261208);
  for (int i = 0; i < 80; ++i) {
    const int P = int(rng.pick(1, 5));
    const Layout layout = rng.coin(0.5) ? Layout::ZigZag : Layout::Contiguous;
    Case<T> c = random_case<T>(rng, P, layout, rng.pick(1, 40));
    for (Matrix<T>* x : {&c.k, &c.v})
      for (Index j = 0; j < x->size(); ++j) x->data()[j] = T(rng.pick(-32, 32)) / T(8);
    const attn::AttentionLse<T> native = ring(c);
    for (const Storage st : {Storage::BFloat16, Storage::Float16}) {
      c.storage = st;
      SCOPED_TRACE(c.describe());
      const attn::AttentionLse<T> got = ring(c);
      EXPECT_TRUE(got.output == native.output) << "max diff " << max_diff(got.output, native.output);
      EXPECT_TRUE(got.lse == native.lse) << "max diff " << max_diff(got.lse, native.lse);
    }
  }
}

// ---- Precision::BFloat16 -------------------------------------------------------------------------

// The products on bf16 operands: the ring's blocks (most of them at most 4 queries a head, which the
// decode kernel computes in T) and GQA's one call round differently, but both are within
// bf16_attention_error_bound of exact arithmetic (attn/precision.hpp), so within twice that of each
// other - taken here over the whole case (the largest scale * ||q_h||_1, |k|, |v|; S = L). The lse
// moves with the logits: by at most delta = scale ||q||_1 max|k| (2u + u^2 + d eps) each.
TYPED_TEST(RingTest, Bf16PrecisionWithinTheBoundOfGqa) {
  using T = TypeParam;
  attn_test::Rng rng(20261209);
  double worst_out = 0, worst_lse = 0, worst_ratio = 0;
  for (int i = 0; i < 120; ++i) {
    const int P = int(rng.pick(1, 5));
    const Layout layout = rng.coin(0.5) ? Layout::ZigZag : Layout::Contiguous;
    Case<T> c = random_case<T>(rng, P, layout, rng.pick(1, 40));
    c.args.precision = Precision::BFloat16;
    if (rng.coin(0.3)) c.storage = Storage::BFloat16;
    SCOPED_TRACE(c.describe());
    const attn::AttentionLse<T> got = ring(c), want = whole(c);
    T l1 = 0;
    for (Index r = 0; r < c.q.rows(); ++r)
      for (Index h = 0; h < c.H; ++h) l1 = std::max(l1, c.q.row(r).segment(h * c.d, c.d).cwiseAbs().sum());
    const T scale_l1 = l1 / std::sqrt(static_cast<T>(c.d));
    const Matrix<T> ks = attn_test::stored_as(c.k, c.Hkv, c.storage), vs = attn_test::stored_as(c.v, c.Hkv, c.storage);
    const T max_k = ks.cwiseAbs().maxCoeff(), max_v = vs.cwiseAbs().maxCoeff();
    const double bound = 2.0 * double(attn::bf16_attention_error_bound<T>(scale_l1, max_k, max_v, c.L, c.d));
    const T u = attn::storage_unit_roundoff<T>(Storage::BFloat16), eps = std::numeric_limits<T>::epsilon() / 2;
    const double delta = double(scale_l1 * max_k * (T(2) * u + u * u + T(c.d) * eps));
    const double e_out = max_diff(got.output, want.output), e_lse = max_diff(got.lse, want.lse);
    EXPECT_LE(e_out, bound + kTol<T>);
    EXPECT_LE(e_lse, 2 * delta + kTol<T> * std::max(1.0, max_abs_finite(want.lse)));
    worst_out = std::max(worst_out, e_out);
    worst_lse = std::max(worst_lse, e_lse);
    worst_ratio = std::max(worst_ratio, e_out / bound);
  }
  std::printf("bf16 precision (%s): max |out - gqa| %.3g (%.3g of the bound), max |lse - gqa| %.3g\n",
              type_name<T>(), worst_out, worst_ratio, worst_lse);
}

// ---- Determinism ---------------------------------------------------------------------------------

// The ring fixes the order of the merges, so the same inputs give the same bits: random cases, and
// one long enough (L = 301 over 3 ranks) that its blocks go to the flash kernel on several threads.
TYPED_TEST(RingTest, SameInputsSameBits) {
  using T = TypeParam;
  attn_test::Rng rng(20261210);
  std::vector<Case<T>> cases;
  for (int i = 0; i < 30; ++i) {
    const int P = int(rng.pick(1, 5));
    cases.push_back(random_case<T>(rng, P, rng.coin(0.5) ? Layout::ZigZag : Layout::Contiguous, rng.pick(1, 40)));
  }
  Case<T> big = random_case<T>(rng, 3, Layout::ZigZag, 301);
  cases.push_back(big);
  big.args.precision = Precision::BFloat16;
  cases.push_back(big);
  for (const Case<T>& c : cases) {
    SCOPED_TRACE(c.describe());
    const attn::AttentionLse<T> first = ring(c), second = ring(c);
    EXPECT_TRUE(first.output == second.output);
    EXPECT_TRUE(first.lse == second.lse);
  }
  // The long case against GQA too (native precision).
  Worst worst;
  expect_ring_equals_gqa(cases[cases.size() - 2], kTol<T>, worst);
}

}  // namespace

namespace {

// Found by dist_fuzz: shard_columns of a [0, L] matrix offset its null data pointer (UBSan:
// "applying non-zero offset to null pointer"). Each rank gets a [0, local_len] matrix.
TEST(ShardingTest, ShardColumnsOfNoRows) {
  // Four chunks [0, 1) [1, 2) [2, 3) [3, 5): rank 0 holds chunks 0 and 3 (3 keys), rank 1 1 and 2.
  const Sharding sh(5, 2, attn::dist::Layout::ZigZag);
  EXPECT_EQ(sh.local_len(0), 3);
  EXPECT_EQ(sh.local_len(1), 2);
  const attn::BoolMatrix none(0, 5);
  for (int r = 0; r < 2; ++r) {
    const attn::BoolMatrix part = sh.shard_columns<bool>(none, r);
    EXPECT_EQ(part.rows(), 0);
    EXPECT_EQ(part.cols(), sh.local_len(r));
  }
}

}  // namespace
