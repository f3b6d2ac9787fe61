// ContextParallelAttention under mpirun (tests/dist/CMakeLists.txt runs it on 2, 3 and 4 ranks):
// every rank builds the same global Q, K, V and masks from one seed, attends its own rows over
// MPI, and holds its rows of the result to a single-process GroupedQueryAttention over the whole
// sequence, which each rank computes itself (1e-6 float, 1e-12 double).
#include <mpi.h>

#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "attn/dist/context_parallel.hpp"
#include "attn/grouped_query_attention.hpp"
#include "support/stored_kv.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Causal;
using attn::Index;
using attn::Matrix;
using attn::Storage;
using attn::Vector;
using attn::dist::Layout;
using attn_test::matrices_near;

template <class T>
constexpr double cp_tolerance() {
  return std::is_same_v<T, float> ? 1e-6 : 1e-12;
}

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

template <class T>
Matrix<T> randn(std::mt19937& g, Index rows, Index cols, double sd = 1.0) {
  std::normal_distribution<double> nd(0.0, sd);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(nd(g));
  return m;
}

// One problem, the same on every rank: global tensors and the options of both calls.
template <class T>
struct Problem {
  Index B = 1, L = 1, H = 1, Hkv = 1, d = 1, dv = 1;
  Matrix<T> q, k, v;
  attn::GqaArgs<T> args;  // the single-process call's
  attn::BoolMatrix key_padding;  // [B, L] when used (IgnoreMask)
  attn::BoolMatrix mask;         // [L, L] when used (AttendMask)
  Matrix<T> bias;                // [B*H*L, L] when used
};

// Every rank: its rows of the context-parallel result and of the reference.
template <class T>
void expect_equal_to_single_process(const Problem<T>& pb, Layout layout, Storage storage = Storage::Native,
                                    const char* what = "") {
  SCOPED_TRACE(std::string(what) + " layout " + attn::dist::layout_name(layout) + " storage " +
               attn::storage_name(storage));
  attn::dist::ContextParallelAttention<T> cp(MPI_COMM_WORLD, pb.H, pb.Hkv, storage);
  const attn::dist::Sharding sh = cp.sharding(pb.L, layout);
  const int r = cp.rank();
  attn::dist::ContextArgs<T> a;
  static_cast<attn::Masks<T>&>(a) = pb.args;
  a.batch = pb.B;
  a.layout = layout;
  a.attn_mask = {};
  a.attn_bias = {};
  a.key_padding_mask = {};
  const Matrix<bool> kp_local = pb.key_padding.size() ? sh.shard_columns<bool>(pb.key_padding, r) : Matrix<bool>();
  if (pb.key_padding.size()) a.key_padding_mask = attn::IgnoreMask(kp_local);
  if (pb.mask.size()) a.attn_mask = attn::AttendMask(sh.shard<bool>(pb.mask, 1, r));
  if (pb.bias.size()) a.attn_bias = attn::AdditiveMask<T>(sh.shard<T>(pb.bias, pb.B * pb.H, r));

  // The reference reads K and V as they travel: rounded to the storage type.
  const Matrix<T> k = attn_test::stored_as(pb.k, pb.Hkv, storage), v = attn_test::stored_as(pb.v, pb.Hkv, storage);
  const attn::AttentionLse<T> want = attn::GroupedQueryAttention<T>(pb.H, pb.Hkv).forward_with_lse(pb.q, k, v, pb.args);
  const attn::AttentionLse<T> got =
      cp.forward_with_lse(sh.shard<T>(pb.q, pb.B, r), sh.shard<T>(pb.k, pb.B, r), sh.shard<T>(pb.v, pb.B, r), a);
  EXPECT_TRUE(matrices_near(got.output, sh.shard<T>(want.output, pb.B, r), cp_tolerance<T>()));
  const Matrix<T> want_lse = sh.shard<T>(want.lse.transpose(), pb.B, r).transpose();
  EXPECT_TRUE(matrices_near(got.lse, want_lse, cp_tolerance<T>()));
}

template <class T>
Problem<T> make_problem(std::uint32_t seed, Index B, Index L, Index H, Index Hkv, Index d, Index dv) {
  std::mt19937 g(seed);
  Problem<T> pb;
  pb.B = B, pb.L = L, pb.H = H, pb.Hkv = Hkv, pb.d = d, pb.dv = dv;
  pb.q = randn<T>(g, B * L, H * d);
  pb.k = randn<T>(g, B * L, Hkv * d);
  pb.v = randn<T>(g, B * L, Hkv * dv);
  pb.args.batch = B;
  return pb;
}

template <class T>
class ContextParallel : public ::testing::Test {};
TYPED_TEST_SUITE(ContextParallel, attn_test::Scalars, attn_test::ScalarName);

// Every option alone and together, both layouts, with GQA (4 query heads on 2 kv heads), value
// dims unlike the key dims, and a length that the ranks do not divide.
TYPED_TEST(ContextParallel, EqualsTheSingleProcessCallForEveryMaskAndOption) {
  using T = TypeParam;
  std::mt19937 g(7);
  std::bernoulli_distribution coin(0.2);
  const std::vector<std::pair<const char*, std::function<void(Problem<T>&)>>> options = {
      {"none", [](Problem<T>&) {}},
      {"causal", [](Problem<T>& p) { p.args.causal = Causal::BottomRight; }},
      {"causal top-left", [](Problem<T>& p) { p.args.causal = Causal::TopLeft; }},
      {"window", [](Problem<T>& p) { p.args.window = 7; }},
      {"causal window", [](Problem<T>& p) { p.args.causal = Causal::BottomRight, p.args.window = 5; }},
      {"window sink tokens",
       [](Problem<T>& p) { p.args.causal = Causal::BottomRight, p.args.window = 4, p.args.sink_tokens = 3; }},
      {"alibi", [](Problem<T>& p) { p.args.alibi_slopes = attn::alibi_slopes<T>(p.H); }},
      {"causal alibi",
       [](Problem<T>& p) { p.args.causal = Causal::BottomRight, p.args.alibi_slopes = attn::alibi_slopes<T>(p.H); }},
      {"softcap", [](Problem<T>& p) { p.args.softcap = T(2); }},
      {"sinks", [](Problem<T>& p) { p.args.sinks = Vector<T>::LinSpaced(p.H, T(-1), T(2)); }},
      {"key padding",
       [&](Problem<T>& p) {
         p.key_padding = attn::BoolMatrix(p.B, p.L);
         for (Index i = 0; i < p.key_padding.size(); ++i) p.key_padding.data()[i] = coin(g);
         p.key_padding.row(0).head(p.L / 2).setConstant(true);  // early queries of causal rows: no key
         p.args.key_padding_mask = attn::IgnoreMask(p.key_padding);
       }},
      {"attn_mask",
       [&](Problem<T>& p) {
         p.mask = attn::BoolMatrix(p.L, p.L);
         for (Index i = 0; i < p.mask.size(); ++i) p.mask.data()[i] = !coin(g);
         p.args.attn_mask = attn::AttendMask(p.mask);
       }},
      {"attn_bias per head",
       [&](Problem<T>& p) {
         p.bias = randn<T>(g, p.B * p.H * p.L, p.L);
         p.args.attn_bias = attn::AdditiveMask<T>(p.bias);
       }},
      {"everything",
       [&](Problem<T>& p) {
         p.args.causal = Causal::BottomRight, p.args.window = 9, p.args.sink_tokens = 2, p.args.softcap = T(3);
         p.args.alibi_slopes = attn::alibi_slopes<T>(p.H);
         p.args.sinks = Vector<T>::Constant(p.H, T(0.5));
         p.key_padding = attn::BoolMatrix::Zero(p.B, p.L);
         p.key_padding(p.B - 1, p.L - 1) = true;
         p.args.key_padding_mask = attn::IgnoreMask(p.key_padding);
       }},
  };
  for (const Index L : {Index(1), Index(5), Index(37)})
    for (const auto& [name, set] : options) {
      Problem<T> pb = make_problem<T>(11, /*B=*/2, L, /*H=*/4, /*Hkv=*/2, /*d=*/8, /*dv=*/5);
      set(pb);
      for (const Layout layout : {Layout::Contiguous, Layout::ZigZag})
        expect_equal_to_single_process(pb, layout, Storage::Native, name);
    }
}

// K and V travel in bf16, fp16 or int8: the result is the single-process call's over K and V
// rounded the same way.
TYPED_TEST(ContextParallel, EveryStorageTypeEqualsTheCallOverRoundedKeysAndValues) {
  using T = TypeParam;
  for (const Storage s : {Storage::BFloat16, Storage::Float16, Storage::Int8}) {
    Problem<T> pb = make_problem<T>(3, 1, 29, 2, 1, 16, 16);
    pb.args.causal = Causal::BottomRight;
    expect_equal_to_single_process(pb, Layout::ZigZag, s, "causal");
  }
}

// Keys and values exactly representable in bf16 (multiples of 1/8 below 16) lose nothing: the
// bf16 ring's result is the Native ring's, bitwise.
TYPED_TEST(ContextParallel, RepresentableKeysAndValuesInBf16AreBitwiseTheNativeResult) {
  using T = TypeParam;
  Problem<T> pb = make_problem<T>(5, 2, 23, 2, 2, 8, 8);
  pb.k = (pb.k * T(8)).array().round() / T(8);
  pb.v = (pb.v * T(8)).array().round() / T(8);
  attn::dist::ContextParallelAttention<T> native(MPI_COMM_WORLD, 2, 2), bf16(MPI_COMM_WORLD, 2, 2, Storage::BFloat16);
  const attn::dist::Sharding sh = native.sharding(pb.L);
  attn::dist::ContextArgs<T> a;
  a.batch = 2;
  a.causal = Causal::BottomRight;
  const int r = native.rank();
  const Matrix<T> q = sh.shard<T>(pb.q, 2, r), k = sh.shard<T>(pb.k, 2, r), v = sh.shard<T>(pb.v, 2, r);
  const Matrix<T> x = native.forward(q, k, v, a), y = bf16.forward(q, k, v, a);
  EXPECT_TRUE((x.array() == y.array()).all());
}

// The same call three times gives the same bits: the merge order is the ring's, not the order
// messages happen to arrive in.
TYPED_TEST(ContextParallel, RepeatedCallsAreBitwiseEqual) {
  using T = TypeParam;
  Problem<T> pb = make_problem<T>(9, 1, 64, 4, 1, 16, 16);
  attn::dist::ContextParallelAttention<T> cp(MPI_COMM_WORLD, 4, 1);
  const attn::dist::Sharding sh = cp.sharding(pb.L);
  attn::dist::ContextArgs<T> a;
  a.batch = 1;
  a.causal = Causal::BottomRight;
  a.alibi_slopes = attn::alibi_slopes<T>(4);
  const int r = cp.rank();
  const Matrix<T> q = sh.shard<T>(pb.q, 1, r), k = sh.shard<T>(pb.k, 1, r), v = sh.shard<T>(pb.v, 1, r);
  const Matrix<T> first = cp.forward(q, k, v, a);
  for (int i = 0; i < 2; ++i) EXPECT_TRUE((cp.forward(q, k, v, a).array() == first.array()).all());
}

// Runs f on every rank, expects every rank to throw E, and the messages to be equal on all ranks
// and to contain each fragment.
template <class E>
void expect_every_rank_throws(const std::function<void()>& f, std::initializer_list<const char*> fragments) {
  std::string what;
  try {
    f();
    ADD_FAILURE() << "rank " << world_rank() << " did not throw";
  } catch (const E& e) {
    what = e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "rank " << world_rank() << " threw the wrong type: " << e.what();
  }
  for (const char* frag : fragments) EXPECT_NE(what.find(frag), std::string::npos) << what << " lacks " << frag;
  // Every rank's message is rank 0's.
  int len = int(what.size());
  MPI_Bcast(&len, 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::string first(std::size_t(len), ' ');
  if (world_rank() == 0) first = what;
  MPI_Bcast(first.data(), len, MPI_CHAR, 0, MPI_COMM_WORLD);
  EXPECT_EQ(what, first);
}

// A bad input on one rank - the last - makes every rank throw that rank's error, naming it,
// instead of the others waiting forever for its keys.
TEST(ContextParallelErrors, OneRanksBadInputMakesEveryRankThrowTheSameError) {
  int P = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  attn::dist::ContextParallelAttention<float> cp(MPI_COMM_WORLD, 2, 1);
  const attn::dist::Sharding sh = cp.sharding(20);
  const Index n = sh.local_len(cp.rank());
  const bool bad = cp.rank() == P - 1;
  const Matrix<float> q = Matrix<float>::Ones(n, 2 * 4), k = Matrix<float>::Ones(n, bad ? 3 : 4),
                      v = Matrix<float>::Ones(n, 4);
  attn::dist::ContextArgs<float> a;
  a.batch = 1;
  const std::string on_rank = "on rank " + std::to_string(P - 1) + " of " + std::to_string(P);
  expect_every_rank_throws<attn::shape_error>([&] { cp.forward(q, k, v, a); },
                                              {"ContextParallelAttention::forward", "k has shape [", on_rank.c_str()});

  // A NaN key in int8 storage (no scale holds it), on rank 0 only.
  attn::dist::ContextParallelAttention<float> int8(MPI_COMM_WORLD, 2, 1, Storage::Int8);
  Matrix<float> k2 = Matrix<float>::Ones(n, 4);
  if (cp.rank() == 0) k2(0, 0) = std::numeric_limits<float>::quiet_NaN();
  expect_every_rank_throws<attn::argument_error>([&] { int8.forward(q, k2, v, a); }, {"int8", "on rank 0"});
}

// Ranks that disagree - on an option, or on who holds which rows - throw on every rank, with
// the same message.
TEST(ContextParallelErrors, RanksThatDisagreeThrowOnEveryRank) {
  int P = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  attn::dist::ContextParallelAttention<float> cp(MPI_COMM_WORLD, 1, 1);
  const attn::dist::Sharding sh = cp.sharding(20, Layout::Contiguous);
  const Index n = sh.local_len(cp.rank());
  const Matrix<float> q = Matrix<float>::Ones(n, 4);
  attn::dist::ContextArgs<float> a;
  a.batch = 1;
  a.layout = Layout::Contiguous;
  a.window = cp.rank() == P - 1 ? 3 : 4;
  expect_every_rank_throws<attn::argument_error>([&] { cp.forward(q, q, q, a); }, {"ranks disagree on window"});

  // Rows split 20 = ZigZag's, called as Contiguous's: the lengths are not that layout's when P > 1
  // (ZigZag with P = 2 gives 10 and 10, as Contiguous does, so use a length that differs: 21).
  const attn::dist::Sharding zz = cp.sharding(21, Layout::ZigZag), ct = cp.sharding(21, Layout::Contiguous);
  bool differ = false;
  for (int r = 0; r < P; ++r) differ = differ || zz.local_len(r) != ct.local_len(r);
  a.window = 0;
  if (differ) {
    const Matrix<float> q2 = Matrix<float>::Ones(zz.local_len(cp.rank()), 4);
    expect_every_rank_throws<attn::shape_error>([&] { cp.forward(q2, q2, q2, a); },
                                                {"rows per sequence, but the Contiguous layout of L = 21"});
  }
}

// A rank's rows of attn_mask must cover every key: [n, L].
TEST(ContextParallelErrors, AMaskWithoutEveryKeyIsRefusedOnEveryRank) {
  attn::dist::ContextParallelAttention<float> cp(MPI_COMM_WORLD, 1, 1);
  const attn::dist::Sharding sh = cp.sharding(12);
  const Index n = sh.local_len(cp.rank());
  const Matrix<float> q = Matrix<float>::Ones(n, 4);
  attn::dist::ContextArgs<float> a;
  a.batch = 1;
  a.attn_mask = attn::AttendMask(attn::BoolMatrix::Ones(n, n));  // the local keys only
  if (cp.ranks() > 1)
    expect_every_rank_throws<attn::shape_error>([&] { cp.forward(q, q, q, a); },
                                                {"attn_mask has", "columns, expected L = 12"});
}

}  // namespace
