// fuzz/dist_fuzz.cpp - libFuzzer target: the MPI-free parts of attn/dist, attn/dist/sharding.hpp
// (attn::dist::Sharding) and attn/dist/detail/ring.hpp (block_layout, pack_block, RingMasks,
// RingAccumulator), with the P ranks of a context-parallel ring simulated in one process as
// tests/dist/ring_test.cpp does. Nothing here needs MPI (attn/dist/context_parallel.hpp is not
// included).
//
// The first byte: bit 0 double (else float), bits 1-2 the storage K and V travel in (Native, bf16,
// fp16, int8), bit 3 the layout (ZigZag, else Contiguous), bits 4-5 the mode: 3 the sharding
// arithmetic alone, anything else the ring.
//
// The ring: the next bytes choose, a byte each, P (1..6), L (0..40: L = 0 must be refused with
// attn::shape_error; L < P and L < 2P leave ranks and segments without rows), B (1..3), H (1..6)
// with H_kv (a divisor of H), d (1..8), dv (d, or 1..8), two option bytes, the window (0..L+3, or
// 2L, 2L+1, 2^40, Index's max and near it) and the sink tokens (0..5, or L, L+1, 2^40, Index's
// max). The option bytes: causal (either alignment: they agree for L queries over L keys), window,
// sink tokens, softcap, ALiBi (the standard slopes or slopes from the input), sinks, key padding
// [B, L] (either polarity), attn_mask [L, L] or [B*H*L, L] (either polarity), attn_bias [L, L] or
// [B*H*L, L], a fixed scale. The remaining bytes are the values of q, k, v, softcap (its
// magnitude), scale, slopes, sinks and bias, a byte each, as attention_fuzz's: (b - 116) / 16 for
// b < 232, else one of 24 special values (NaN, +-inf, +-max, subnormals, 1e30, ...); then the
// masks' bits (attn_mask, then key padding), a byte per 8. Past the end of the input every choice
// reads 0 and every value comes from a fixed pseudo-random stream (the plain range only).
// What context_parallel.hpp's run() refuses before any key travels (non-finite softcap, ALiBi
// slopes or sinks; K or V that the storage cannot hold: attn::detail::check_storable) ends the
// input, and so does the single-process reference refusing it (attn::shape_error or
// attn::argument_error: e.g. a non-finite scale).
//
// Each ring input is checked:
//   - Sharding: each rank's segments are the documented chunks (chunk c of n covers
//     [c*L/n, (c+1)*L/n); Contiguous: chunk r of P; ZigZag: chunks r and 2P-1-r of 2P, at local
//     rows 0 and the first's length); over all ranks they cover [0, L) exactly once, each rank's
//     in position order; local_len is each rank's sum and they sum to L; a rank outside [0, P) is
//     an attn::argument_error; shard puts row (b, s.start + i) at (b, s.local + i); unshard of every
//     rank's shard is the input, bitwise (q, v, key_padding_mask^T, attn_mask), and shard of the
//     unsharded lse rows gives each rank's back; shard_columns(x, r) is shard(x^T, 1, r)^T,
//     bitwise (for x with at least one row: see check_shard_roundtrip).
//   - pack_block: block_layout's parts start at multiples of 64 bytes in order K, V, K scales,
//     V scales, key padding, and hold exactly what they need (a rank without rows: 0 bytes);
//     pack_block writes nothing past them (a guard of 64 bytes), and the block read back (each
//     element times its row's int8 scale, as attn::detail::dequantize) is the rank's shard of K and
//     V as the storage rounds them, bitwise, and its key padding bytes are shard_columns'.
//   - Every rank attends every block in the ring's order (rank r at step s: the block of rank
//     (r - s) mod P) and finishes; the ranks' out [B*n, H*dv] and lse [H, B*n], unsharded, are
//     compared with GroupedQueryAttention::forward_with_lse over the whole problem, K and V rounded
//     to the storage type (the reference of tests/support/stored_kv.hpp):
//       * when q, K and V (rounded), the slopes, sinks and the bias (-inf allowed: masked) are
//         finite, every (row, head) whose reference lse is -inf (every key masked) has lse -inf and
//         an output of zeros in the ring too (and in the reference);
//       * when, in addition, no intermediate can overflow (d max|q| max|k| max(1, |scale|), the
//         logits' bound and L max|v| stay below a sixteenth of T's max), every output and lse is
//         within tol * max(1, max|v|) and tol * max(1, |reference lse|) of the reference,
//         non-finite entries equal exactly, with tol = max(1e-5 (float) / 1e-12 (double),
//         8 eps (1 + d A + C)): A = |scale| d max|q| max|k| bounds |scale q . k|, and d eps A the
//         rounding of the dot product that the ring's block kernels may sum in another order
//         than the one call; C = max|slope| L + max|bias| + max|sinks| bounds the logits' other
//         terms. Moderate values give the first term, 1e-5 or 1e-12 relative; the check is
//         skipped when tol reaches 0.01.
//   - One rank (chosen by the input) runs a second time, from a fresh accumulator over the same
//     blocks, and gives the same bits (out and lse).
//
// The sharding mode: the next bytes choose P (-1..5, INT_MIN, INT_MAX, INT_MAX / 2, 2^20, 1..256
// or any int), L (0, negative, 0..40, powers of two, near Index's max, at the edge of L * 2P
// overflowing, or any 64-bit value) and the layout (or an invalid one). The constructor either
// throws what the header documents, checked in this order - attn::shape_error for seq_len < 1 or
// ranks < 1, attn::argument_error for an unknown layout, attn::shape_error for seq_len * 2 * ranks
// overflowing - or keeps the arguments; then the segments are the documented chunks (every rank
// when P <= 4096, else a few), cover [0, L) exactly once when every rank is checked, and a rank
// outside [0, P) is an argument_error. With L and P at most 64: the shard / unshard /
// shard_columns round trips on a [batch*L, C] float matrix (C = 0 too), and each bad argument
// (rank, batch 0 or negative, rows, parts' count or shape, columns) throws the documented error.
//
// Anything else aborts: a crash, another exception, a sanitizer report, a leak, a broken promise.
//
// Built by tools/fuzz.sh with libFuzzer (clang, fuzz/CMakeLists.txt), and by the normal test
// suite as dist_fuzz_replay, which runs the seeds in fuzz/corpus/dist_fuzz/.
#include <algorithm>
#include <attn/detail/storage.hpp>
#include <attn/dist/detail/ring.hpp>
#include <attn/dist/sharding.hpp>
#include <attn/error.hpp>
#include <attn/grouped_query_attention.hpp>
#include <attn/mask.hpp>
#include <attn/storage.hpp>
#include <attn/types.hpp>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fuzz_input.hpp"

namespace {

using attn::BoolMatrix;
using attn::Index;
using attn::Storage;
using attn::dist::Layout;
using attn::dist::Segment;
using attn::dist::Sharding;
using attn_fuzz::Extent;
using attn_fuzz::Input;
using attn_fuzz::kLimit;
template <class T>
using Matrix = attn::Matrix<T>;
namespace ring = attn::dist::detail;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "dist_fuzz: %s\n", what.c_str());
  std::abort();
}

// ATTN_FUZZ_VERBOSE set in the environment: say what became of each input.
bool verbose() {
  static const bool v = std::getenv("ATTN_FUZZ_VERBOSE") != nullptr;
  return v;
}

std::string str(Index x) { return std::to_string(static_cast<long long>(x)); }

// The bits of two matrices agree.
template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0);
}

// f() throws E (attn::shape_error or attn::argument_error), as documented for a bad argument.
template <class E, class F>
void expect_error(F&& f, const std::string& what) {
  try {
    f();
  } catch (const E&) {
    return;
  } catch (const std::exception& e) {
    fail(what + ": threw the wrong error: " + e.what());
  }
  fail(what + ": did not throw");
}

// --- Sharding -----------------------------------------------------------------------------------

// Chunk c of n: positions [c*L/n, (c+1)*L/n) (the constructor keeps L * 2P from overflowing).
Segment chunk(Index L, Index c, Index n, Index local) {
  const Index a = c * L / n, b = (c + 1) * L / n;
  return {a, b - a, local};
}

// Rank r's segments are the documented chunks, in local row order, and local_len their sum.
void check_rank_segments(const Sharding& sh, int r) {
  const Index L = sh.seq_len(), P = sh.ranks();
  const std::vector<Segment> got = sh.segments(r);
  std::vector<Segment> want;
  if (sh.layout() == Layout::Contiguous) {
    want.push_back(chunk(L, r, P, 0));
  } else {
    want.push_back(chunk(L, r, 2 * P, 0));
    want.push_back(chunk(L, 2 * P - 1 - r, 2 * P, want[0].length));
  }
  if (got.size() != want.size()) fail("rank " + str(r) + " has " + str(Index(got.size())) + " segments");
  Index n = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (got[i].start != want[i].start || got[i].length != want[i].length || got[i].local != want[i].local)
      fail("rank " + str(r) + " segment " + str(Index(i)) + " is {" + str(got[i].start) + ", " + str(got[i].length) +
           ", " + str(got[i].local) + "}, expected {" + str(want[i].start) + ", " + str(want[i].length) + ", " +
           str(want[i].local) + "} (L " + str(L) + ", P " + str(P) + ", " + attn::dist::layout_name(sh.layout()) + ")");
    if (got[i].length < 0) fail("a negative segment length");
    if (i > 0 && got[i].length > 0 && got[i - 1].length > 0 && got[i].start < got[i - 1].start + got[i - 1].length)
      fail("rank " + str(r) + "'s segments are not in position order");
    n += got[i].length;
  }
  if (sh.local_len(r) != n)
    fail("local_len(" + str(r) + ") = " + str(sh.local_len(r)) + ", its segments hold " + str(n));
}

// Every rank's segments, and over all ranks they cover [0, L) exactly once.
void check_sharding(const Sharding& sh) {
  std::vector<Segment> all;
  Index total = 0;
  for (int r = 0; r < sh.ranks(); ++r) {
    check_rank_segments(sh, r);
    total += sh.local_len(r);
    for (const Segment& s : sh.segments(r))
      if (s.length > 0) all.push_back(s);
  }
  if (total != sh.seq_len()) fail("local_len sums to " + str(total) + ", not L = " + str(sh.seq_len()));
  std::sort(all.begin(), all.end(), [](const Segment& a, const Segment& b) { return a.start < b.start; });
  Index at = 0;
  for (const Segment& s : all) {
    if (s.start != at) fail("the segments leave a gap or overlap at position " + str(at));
    at += s.length;
  }
  if (at != sh.seq_len()) fail("the segments end at " + str(at) + ", not L = " + str(sh.seq_len()));
  expect_error<attn::argument_error>([&] { (void)sh.segments(-1); }, "segments(-1)");
  expect_error<attn::argument_error>([&] { (void)sh.local_len(sh.ranks()); }, "local_len(ranks)");
}

// shard places each segment's rows, unshard inverts it (bitwise), and shard_columns is shard of the
// transpose. x: [batch*L, C].
template <class T>
void check_shard_roundtrip(const Sharding& sh, const Matrix<T>& x, Index batch, const char* what) {
  const Index L = sh.seq_len();
  const std::size_t P = std::size_t(sh.ranks());
  std::vector<Matrix<T>> parts(P);
  for (int r = 0; r < sh.ranks(); ++r) {
    Matrix<T>& y = parts[std::size_t(r)];
    y = sh.shard<T>(x, batch, r);
    const Index n = sh.local_len(r);
    if (y.rows() != batch * n || y.cols() != x.cols()) fail(std::string(what) + ": shard has the wrong shape");
    const Index C = x.cols();
    for (Index b = 0; b < batch; ++b)
      for (const Segment& s : sh.segments(r))  // rows [start, start + length) of sequence b, contiguous
        if (s.length * C > 0 && std::memcmp(y.data() + (b * n + s.local) * C, x.data() + (b * L + s.start) * C,
                                            sizeof(T) * std::size_t(s.length * C)) != 0)
          fail(std::string(what) + ": shard's rows (" + str(b) + ", " + str(s.local) + "...) are not rows (" + str(b) +
               ", " + str(s.start) + "...)");
  }
  if (!same_bits(sh.unshard<T>(parts, batch), x)) fail(std::string(what) + ": unshard(shard(x)) is not x");
  // shard_columns: the first and the last sequence's [L, C] block of x, transposed to [C, L], C = 0
  // too (a [0, L] matrix: shard_columns offset its null data, undefined behaviour, until issue 18).
  for (Index b = 0; b < batch; b += std::max<Index>(1, batch - 1)) {
    const Matrix<T> xt = x.middleRows(b * L, L).transpose();  // [C, L]
    for (int r = 0; r < sh.ranks(); ++r) {
      const Matrix<T> cols = sh.shard_columns<T>(xt, r);
      const Matrix<T> want = sh.shard<T>(x.middleRows(b * L, L), 1, r).transpose();
      if (!same_bits(cols, want)) fail(std::string(what) + ": shard_columns is not shard of the transpose");
    }
  }
}

// The bad arguments of shard, unshard and shard_columns, each throwing the documented error.
void check_shard_errors(const Sharding& sh, Input& in) {
  const Index L = sh.seq_len();
  const int P = sh.ranks();
  const Index batch = 1 + in.dim(2), C = in.dim(3);
  const Matrix<float> x = Matrix<float>::Zero(batch * L, C);
  const int r = int(in.byte() % P);
  expect_error<attn::argument_error>([&] { (void)sh.shard<float>(x, batch, P); }, "shard(rank = ranks)");
  expect_error<attn::argument_error>([&] { (void)sh.shard<float>(x, batch, -1); }, "shard(rank = -1)");
  expect_error<attn::argument_error>([&] { (void)sh.shard<float>(x, 0, r); }, "shard(batch = 0)");
  expect_error<attn::shape_error>([&] { (void)sh.shard<float>(x, -batch, r); }, "shard(batch < 0)");
  expect_error<attn::shape_error>([&] { (void)sh.shard<float>(Matrix<float>::Zero(batch * L + 1, C), batch, r); },
                                  "shard(rows = batch*L + 1)");
  std::vector<Matrix<float>> parts;
  for (int q = 0; q < P; ++q) parts.push_back(Matrix<float>::Zero(batch * sh.local_len(q), C));
  (void)sh.unshard<float>(parts, batch);  // the right shapes: no error
  expect_error<attn::argument_error>([&] { (void)sh.unshard<float>(parts, 0); }, "unshard(batch = 0)");
  std::vector<Matrix<float>> fewer(parts.begin(), parts.end() - 1);
  expect_error<attn::shape_error>([&] { (void)sh.unshard<float>(fewer, batch); }, "unshard(P - 1 parts)");
  std::vector<Matrix<float>> more = parts;
  more.push_back(parts[0]);
  expect_error<attn::shape_error>([&] { (void)sh.unshard<float>(more, batch); }, "unshard(P + 1 parts)");
  std::vector<Matrix<float>> bad = parts;
  bad[std::size_t(r)] = Matrix<float>::Zero(batch * sh.local_len(r) + 1, C);
  expect_error<attn::shape_error>([&] { (void)sh.unshard<float>(bad, batch); }, "unshard(a part with a row too many)");
  if (P > 1) {
    bad = parts;
    bad[std::size_t(r)] = Matrix<float>::Zero(batch * sh.local_len(r), C + 1);
    expect_error<attn::shape_error>([&] { (void)sh.unshard<float>(bad, batch); },
                                    "unshard(a part with a column too many)");
  }
  expect_error<attn::shape_error>([&] { (void)sh.shard_columns<float>(Matrix<float>::Zero(C, L + 1), r); },
                                  "shard_columns(L + 1 columns)");
  expect_error<attn::argument_error>([&] { (void)sh.shard_columns<float>(Matrix<float>::Zero(C, L), P); },
                                     "shard_columns(rank = ranks)");
}

// The sharding mode: any seq_len, ranks and layout.
void fuzz_sharding(Input& in) {
  constexpr Index big = std::numeric_limits<Index>::max();
  int P = 0;
  const std::uint8_t pb = in.byte();
  switch (pb % 4) {
    case 0:
      P = int(in.byte() % 7) - 1;  // -1 .. 5
      break;
    case 1: {
      const int edges[4] = {INT_MAX, INT_MIN, INT_MAX / 2, 1 << 20};
      P = edges[in.byte() % 4];
      break;
    }
    case 2:
      P = 1 + in.byte();
      break;
    default:
      P = int(std::uint32_t(in.u64()));
      break;
  }
  Index L = 0;
  const std::uint8_t lb = in.byte();
  switch (lb % 8) {
    case 0:
      L = -Index(in.byte());
      break;
    case 1:
      L = 0;
      break;
    case 2:
    case 3:
      L = in.dim(40);
      break;
    case 4:
      L = Index(1) << (in.byte() % 63);
      break;
    case 5:
      L = big - in.byte();
      break;
    case 6:  // at the edge of L * 2P overflowing
      L = P > 0 ? big / (Index(2) * P) + Index(in.byte() % 3) - 1 : Index(in.byte());
      break;
    default:
      L = Index(in.u64());
      break;
  }
  const std::uint8_t yb = in.byte();
  const Layout layout = yb % 8 < 6 ? Layout(yb & 1) : static_cast<Layout>(yb);

  const bool layout_ok = layout == Layout::Contiguous || layout == Layout::ZigZag;
  const bool overflow = L >= 1 && P >= 1 && L > big / (Index(2) * P);
  const auto make = [&] { return Sharding(L, P, layout); };
  if (L < 1 || P < 1 || overflow) {
    if (L < 1 || P < 1 || layout_ok)
      expect_error<attn::shape_error>(make, "Sharding(" + str(L) + ", " + std::to_string(P) + ")");
    else
      expect_error<attn::argument_error>(make, "Sharding with an unknown layout");  // (L, P checked first)
    return;
  }
  if (!layout_ok) {
    expect_error<attn::argument_error>(make, "Sharding with an unknown layout");
    return;
  }
  const Sharding sh = make();
  if (sh.seq_len() != L || sh.ranks() != P || sh.layout() != layout) fail("Sharding does not keep its arguments");
  if (P <= 4096) {
    check_sharding(sh);
  } else {
    for (const int r : {0, P - 1, P / 2, int(in.u64() % std::uint64_t(P))}) check_rank_segments(sh, r);
    expect_error<attn::argument_error>([&] { (void)sh.segments(P); }, "segments(ranks)");
  }
  if (L <= 64 && P <= 64) {
    const Index batch = 1 + in.dim(2), C = in.dim(3);
    check_shard_roundtrip<float>(sh, in.matrix<float>(batch * L, C), batch, "a float matrix");
    check_shard_errors(sh, in);
  }
}

// --- The ring -----------------------------------------------------------------------------------

// x [rows, heads*w] -> the same shape, each head's row of w elements as storage st holds it
// (tests/support/stored_kv.hpp's stored_as).
template <class T>
Matrix<T> stored_as(const Matrix<T>& x, Index heads, Storage st) {
  const Index w = x.cols() / heads;
  Matrix<T> y(x.rows(), x.cols());
  attn::detail::with_storage<T>(st, [&](auto tag) {
    using S = typename decltype(tag)::type;
    std::vector<S> buf(static_cast<std::size_t>(w));
    for (Index r = 0; r < x.rows(); ++r)
      for (Index h = 0; h < heads; ++h) {
        const T sc = attn::detail::store_row<S>(x.data() + r * x.cols() + h * w, w, buf.data());
        attn::detail::dequantize(buf.data(), w, sc, y.data() + r * y.cols() + h * w);
      }
  });
  return y;
}

// One problem: B sequences of L positions, H query heads over Hkv kv heads, split over P ranks.
template <class T>
struct Case {
  int P = 1;
  Layout layout = Layout::Contiguous;
  Index B = 1, H = 1, Hkv = 1, L = 1, d = 1, dv = 1;
  Storage storage = Storage::Native;
  bool fixed_scale = false;
  T scale = T(0);
  attn::GqaArgs<T> args;  // the masks over the whole sequence, as GroupedQueryAttention takes them
  Matrix<T> q, k, v;      // [B*L, H*d], [B*L, Hkv*d], [B*L, Hkv*dv]

  std::string describe() const {
    std::string s = "P " + std::to_string(P) + " " + attn::dist::layout_name(layout) + " B " + str(B) + " H " + str(H) +
                    " Hkv " + str(Hkv) + " L " + str(L) + " d " + str(d) + " dv " + str(dv) + " storage " +
                    attn::storage_name(storage) + " " + (std::is_same_v<T, float> ? "float" : "double");
    if (args.causal != attn::Causal::None) s += " causal";
    if (args.window > 0) s += " window " + str(args.window);
    if (args.sink_tokens > 0) s += " sink_tokens " + str(args.sink_tokens);
    if (args.softcap > T(0)) s += " softcap " + std::to_string(double(args.softcap));
    if (args.alibi_slopes.size() > 0) s += " alibi";
    if (args.sinks.size() > 0) s += " sinks";
    if (!args.key_padding_mask.empty()) s += " key_padding";
    if (!args.attn_mask.empty()) s += " attn_mask rows " + str(args.attn_mask.rows());
    if (!args.attn_bias.empty()) s += " attn_bias rows " + str(args.attn_bias.rows());
    if (fixed_scale) s += " scale " + std::to_string(double(scale));
    return s;
  }
};

attn::BoolMask with_polarity(bool attend, BoolMatrix m) {
  if (attend) return attn::AttendMask(std::move(m));
  return attn::IgnoreMask(std::move(m));
}

constexpr std::size_t kGuard = 64;
constexpr unsigned char kGuardByte = 0xA5;

// Equal, or both NaN.
template <class T>
bool same_value(T a, T b) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  U ua = 0, ub = 0;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  return ua == ub || (std::isnan(a) && std::isnan(b));
}

// block_layout's parts for a rank with n rows: aligned, in order, each as large as it must be.
template <class T>
void check_block_layout(const ring::RingShape& s, Index n, const ring::BlockLayout& lay) {
  const auto align = [](std::size_t x) { return (x + 63) / 64 * 64; };
  const std::size_t elem = std::size_t(attn::storage_bytes<T>(s.storage)), rows = std::size_t(s.batch * s.kv_heads * n);
  const std::size_t scales = s.storage == Storage::Int8 ? rows * sizeof(T) : 0;
  const std::size_t kp = s.key_padding ? std::size_t(s.batch * n) : 0;
  if (lay.k != 0 || lay.v != align(rows * std::size_t(s.d) * elem) ||
      lay.k_scale != align(lay.v + rows * std::size_t(s.dv) * elem) || lay.v_scale != align(lay.k_scale + scales) ||
      lay.key_padding != align(lay.v_scale + scales) || lay.bytes != align(lay.key_padding + kp))
    fail("block_layout for n = " + str(n) + " is not the documented one");
  if (n == 0 && lay.bytes != 0) fail("a rank without rows has a block of " + std::to_string(lay.bytes) + " bytes");
}

// The block of a rank read back: K [B*n, Hkv*d], V [B*n, Hkv*dv] as stored (times int8's scale).
template <class T>
void check_block_contents(const ring::RingShape& s, Index n, const unsigned char* block, const Matrix<T>& k_stored,
                          const Matrix<T>& v_stored, const BoolMatrix& kp) {
  const ring::BlockLayout lay = ring::block_layout<T>(s, n);
  attn::detail::with_storage<T>(s.storage, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const auto read = [&](std::size_t offset, std::size_t scale_offset, Index w, const Matrix<T>& want,
                          const char* what) {
      std::vector<S> row(static_cast<std::size_t>(w));
      std::vector<T> got(static_cast<std::size_t>(w));
      for (Index b = 0; b < s.batch; ++b)
        for (Index h = 0; h < s.kv_heads; ++h)
          for (Index j = 0; j < n; ++j) {
            const Index at = (b * s.kv_heads + h) * n + j;
            if (w > 0)
              std::memcpy(row.data(), block + offset + std::size_t(at * w) * sizeof(S), std::size_t(w) * sizeof(S));
            T sc = T(1);
            if (s.storage == Storage::Int8)
              std::memcpy(&sc, block + scale_offset + std::size_t(at) * sizeof(T), sizeof(T));
            attn::detail::dequantize(row.data(), w, sc, got.data());
            for (Index c = 0; c < w; ++c)
              if (!same_value(got[std::size_t(c)], want(b * n + j, h * w + c)))
                fail(std::string("the block's ") + what + " element (" + str(b) + ", " + str(h) + ", " + str(j) + ", " +
                     str(c) + ") is " + std::to_string(double(got[std::size_t(c)])) + ", expected " +
                     std::to_string(double(want(b * n + j, h * w + c))));
          }
    };
    read(lay.k, lay.k_scale, s.d, k_stored, "K");
    read(lay.v, lay.v_scale, s.dv, v_stored, "V");
  });
  if (s.key_padding)
    for (Index i = 0; i < s.batch * n; ++i)
      if (static_cast<bool>(block[lay.key_padding + std::size_t(i)]) != kp.data()[i]) fail("the block's key padding");
}

// The P ranks of a ring in one process, as ring_test.cpp's ring(): every rank packs its block
// from its shard of K and V (and of the key padding's columns), checked (layout, guard, contents),
// then attends the blocks in the ring's order and finishes; the ranks' out and lse unsharded into
// [B*L, H*dv] and [H, B*L]. Rank `again` runs a second time, from a fresh accumulator, and must
// give the same bits (each rank's result depends on nothing but the blocks, checked bitwise, and
// its own inputs: one rank's rerun stands for the whole ring's, at 1/P of the cost).
template <class T>
attn::AttentionLse<T> simulate(const Case<T>& c, const Sharding& sh, const Matrix<T>& k_stored,
                               const Matrix<T>& v_stored, int again) {
  const attn::GqaArgs<T>& a = c.args;
  const ring::RingShape s{c.B, c.H, c.Hkv, c.d, c.dv, c.storage, !a.key_padding_mask.empty()};
  const std::size_t P = std::size_t(c.P);

  std::vector<std::vector<unsigned char>> blocks(P);
  for (int r = 0; r < c.P; ++r) {
    const Matrix<T> k_r = sh.shard<T>(c.k, c.B, r), v_r = sh.shard<T>(c.v, c.B, r);
    BoolMatrix kp_r;
    if (s.key_padding)
      kp_r = sh.shard_columns<bool>(Eigen::Map<const BoolMatrix>(a.key_padding_mask.data(), c.B, c.L), r);
    const Index n = sh.local_len(r);
    const ring::BlockLayout lay = ring::block_layout<T>(s, n);
    std::vector<unsigned char> guarded(lay.bytes + kGuard, kGuardByte);
    ring::pack_block<T>(s, k_r, v_r, s.key_padding ? kp_r.data() : nullptr, guarded.data());
    check_block_layout<T>(s, n, lay);
    if (!std::all_of(guarded.begin() + std::ptrdiff_t(lay.bytes), guarded.end(),
                     [](unsigned char x) { return x == kGuardByte; }))
      fail("pack_block wrote past block_layout's " + std::to_string(lay.bytes) + " bytes for rank " +
           std::to_string(r));
    check_block_contents<T>(s, n, guarded.data(), sh.shard<T>(k_stored, c.B, r), sh.shard<T>(v_stored, c.B, r), kp_r);
    // What travels: exactly the block's bytes (an allocation of that size, so AddressSanitizer sees
    // a read past them).
    blocks[std::size_t(r)].assign(guarded.begin(), guarded.begin() + std::ptrdiff_t(lay.bytes));
  }

  // The shared options, as context_parallel.hpp's run() sets them.
  ring::RingMasks<T> m;
  m.causal = a.causal != attn::Causal::None;
  m.window = std::min(a.window, 2 * c.L);
  m.sink_tokens = std::min(a.sink_tokens, c.L);
  m.softcap = a.softcap;
  m.alibi_slopes = a.alibi_slopes.size() ? a.alibi_slopes.data() : nullptr;
  m.sinks = a.sinks.size() ? a.sinks.data() : nullptr;
  m.key_padding_attends = s.key_padding && a.key_padding_mask.attend_value();
  m.precision = attn::Precision::Native;
  m.scale = c.fixed_scale ? c.scale : T(1) / std::sqrt(static_cast<T>(c.d));

  // Rank r: its queries and its rows of attn_mask / attn_bias ([n, L] shared, or rows (b, h, local
  // row) of a [B*H*n, L] one: shard with batch B*H), then the ring.
  const auto run_rank = [&](int r, Matrix<T>& out, Matrix<T>& lse) {
    const Index n = sh.local_len(r);
    const Matrix<T> q_r = sh.shard<T>(c.q, c.B, r);
    attn::Masks<T> local;
    if (!a.attn_mask.empty()) {
      const Index rows = a.attn_mask.rows();
      local.attn_mask =
          with_polarity(a.attn_mask.attend_value(),
                        sh.shard<bool>(Eigen::Map<const BoolMatrix>(a.attn_mask.data(), rows, c.L), rows / c.L, r));
    }
    if (!a.attn_bias.empty()) {
      const Index rows = a.attn_bias.rows();
      local.attn_bias =
          attn::AdditiveMask<T>(sh.shard<T>(Eigen::Map<const Matrix<T>>(a.attn_bias.data(), rows, c.L), rows / c.L, r));
    }
    ring::RingMasks<T> mr = m;
    mr.masks = &local;
    out.resize(c.B * n, c.H * c.dv);
    lse.resize(c.H, c.B * n);
    ring::RingAccumulator<T> acc(sh, r, s, mr, q_r, out, lse);
    for (int step = 0; step < c.P; ++step) {
      const int src = (r - step + c.P) % c.P;
      acc.attend(blocks[std::size_t(src)].data(), src);
    }
    acc.finish();
  };
  std::vector<Matrix<T>> outs(P), lses(P);
  for (int r = 0; r < c.P; ++r) run_rank(r, outs[std::size_t(r)], lses[std::size_t(r)]);
  Matrix<T> out2, lse2;
  run_rank(again, out2, lse2);
  if (!same_bits(out2, outs[std::size_t(again)]) || !same_bits(lse2, lses[std::size_t(again)]))
    fail("rank " + std::to_string(again) + " run twice gives different bits: " + c.describe());

  attn::AttentionLse<T> result;
  result.output = sh.unshard<T>(outs, c.B);
  std::vector<Matrix<T>> lse_rows(P);
  for (std::size_t r = 0; r < P; ++r) lse_rows[r] = lses[r].transpose();
  result.lse = sh.unshard<T>(lse_rows, c.B).transpose();
  // lse's rows back through shard: the round trip on the ring's own results.
  const Matrix<T> lse_t = result.lse.transpose();
  for (int r = 0; r < c.P; ++r)
    if (!same_bits(sh.shard<T>(lse_t, c.B, r), lse_rows[std::size_t(r)])) fail("shard(unshard(lse rows)) differs");
  return result;
}

template <class T>
constexpr double kTol = std::is_same_v<T, float> ? 1e-5 : 1e-12;

// A sliding window: 0..L+3, or (bytes 250..255) 2L, 2L+1 and huge ones (run() clamps to 2L).
Index window_of(std::uint8_t b, Index L) {
  constexpr Index big = std::numeric_limits<Index>::max();
  switch (b) {
    case 255:
      return big;
    case 254:
      return big - 1;
    case 253:
      return Index(1) << 40;
    case 252:
      return 2 * L;
    case 251:
      return 2 * L + 1;
    case 250:
      return big / 2;
    default:
      return b % (L + 4);
  }
}

Index sink_tokens_of(std::uint8_t b, Index L) {
  switch (b) {
    case 255:
      return std::numeric_limits<Index>::max();
    case 254:
      return Index(1) << 40;
    case 253:
      return L;
    case 252:
      return L + 1;
    default:
      return b % 6;
  }
}

template <class T>
void fuzz_ring(Input& in, Storage storage, Layout layout) {
  Case<T> c;
  c.storage = storage;
  c.layout = layout;
  c.P = 1 + int(in.byte() % 6);
  c.L = in.dim(40);
  c.B = 1 + in.dim(2);
  const std::uint8_t hb = in.byte();
  c.H = 1 + hb % 6;
  std::vector<Index> divisors;
  for (Index h = 1; h <= c.H; ++h)
    if (c.H % h == 0) divisors.push_back(h);
  c.Hkv = divisors[std::size_t(hb / 6) % divisors.size()];
  c.d = 1 + in.dim(7);
  const std::uint8_t vb = in.byte();
  c.dv = vb < 128 ? c.d : 1 + vb % 8;
  const std::uint8_t o1 = in.byte(), o2 = in.byte();
  const std::uint8_t wb = in.byte(), sb = in.byte();

  if (c.L == 0) {
    expect_error<attn::shape_error>([&] { (void)Sharding(0, c.P, layout); }, "Sharding(0, P)");
    return;
  }
  const Sharding sh(c.L, c.P, layout);
  check_sharding(sh);
  const int again = (wb + sb) % c.P;  // the rank that runs twice

  const Index B = c.B, H = c.H, L = c.L;
  c.q = in.matrix<T>(B * L, H * c.d);
  c.k = in.matrix<T>(B * L, c.Hkv * c.d);
  c.v = in.matrix<T>(B * L, c.Hkv * c.dv);
  attn::GqaArgs<T>& a = c.args;
  a.batch = B;
  if (o1 & 1) a.causal = (o1 & 2) ? attn::Causal::TopLeft : attn::Causal::BottomRight;
  if (o1 & 4) a.window = window_of(wb, L);
  if (o1 & 8) a.sink_tokens = sink_tokens_of(sb, L);
  if (o1 & 16) a.softcap = std::abs(in.value<T>());
  if (o2 & 64) c.fixed_scale = true, c.scale = in.value<T>();
  if (o1 & 32) a.alibi_slopes = (o2 & 128) ? in.vector<T>(H) : attn::alibi_slopes<T>(H);
  if (o1 & 64) a.sinks = in.vector<T>(H);
  if (o2 & 8) a.attn_bias = attn::AdditiveMask<T>(in.matrix<T>((o2 & 16) ? B * H * L : L, L));
  if (o2 & 1) a.attn_mask = with_polarity((o2 & 2) != 0, in.bools((o2 & 4) ? B * H * L : L, L));
  if (o1 & 128) a.key_padding_mask = with_polarity((o2 & 32) != 0, in.bools(B, L));

  // What run() refuses before any key travels.
  if (!std::isfinite(a.softcap) || !a.alibi_slopes.allFinite() || !a.sinks.allFinite()) return;
  attn::detail::check_storable<T>(storage, c.k, "dist_fuzz", "k", "context-parallel call's keys");
  attn::detail::check_storable<T>(storage, c.v, "dist_fuzz", "v", "context-parallel call's values");

  const Matrix<T> k_stored = storage == Storage::Native ? c.k : stored_as(c.k, c.Hkv, storage);
  const Matrix<T> v_stored = storage == Storage::Native ? c.v : stored_as(c.v, c.Hkv, storage);
  const attn::GroupedQueryAttention<T> gqa =
      c.fixed_scale ? attn::GroupedQueryAttention<T>(H, c.Hkv, c.scale) : attn::GroupedQueryAttention<T>(H, c.Hkv);
  const attn::AttentionLse<T> want = gqa.forward_with_lse(c.q, k_stored, v_stored, a);

  // The round trips of the shards (the ring uses them too).
  check_shard_roundtrip<T>(sh, c.q, B, "q");
  check_shard_roundtrip<T>(sh, c.v, B, "v");
  if (!a.key_padding_mask.empty())
    check_shard_roundtrip<bool>(sh, Eigen::Map<const BoolMatrix>(a.key_padding_mask.data(), B, L).transpose(), 1,
                                "key_padding_mask^T");
  if (!a.attn_mask.empty())
    check_shard_roundtrip<bool>(sh, Eigen::Map<const BoolMatrix>(a.attn_mask.data(), a.attn_mask.rows(), L),
                                a.attn_mask.rows() / L, "attn_mask");

  const attn::AttentionLse<T> got = simulate(c, sh, k_stored, v_stored, again);
  if (got.output.rows() != B * L || got.output.cols() != H * c.dv || got.lse.rows() != H || got.lse.cols() != B * L)
    fail("the ring's results have the wrong shape");

  // Bounds: A on |scale q . k|, C on the logits' other terms.
  Extent qe, ke, ve, slopes, sinks, bias;
  qe.add(c.q), ke.add(k_stored), ve.add(v_stored), slopes.add(a.alibi_slopes), sinks.add(a.sinks);
  if (!a.attn_bias.empty())
    bias.add(Eigen::Map<const Matrix<T>>(a.attn_bias.data(), a.attn_bias.rows(), a.attn_bias.cols()), true);
  if (!(qe.finite && ke.finite && ve.finite && slopes.finite && sinks.finite && bias.finite)) return;

  const double scale = c.fixed_scale ? double(c.scale) : 1.0 / std::sqrt(double(c.d));
  const double qk = double(c.d) * qe.max * ke.max, A = qk * std::abs(scale);
  const double C = slopes.max * double(L) + bias.max + sinks.max;
  const double cap = double(a.softcap);
  const double logit = (cap > 0 ? std::min(A, cap) : A) + C;
  if (!(qk * std::max(1.0, std::abs(scale)) < kLimit<T> && A < kLimit<T> && logit < kLimit<T> &&
        double(L) * ve.max < kLimit<T>))
    return;

  // Rows with every key masked: as the reference, lse -inf and zeros - when no logit can overflow.
  // (Before that, the reference's lse -inf does not mean every key is masked: with q at DBL_MAX and
  // k_0 = (0.125, -3.375, 4.3125, -6, 4), regress_masked_row_overflowing_q, the single call's flash
  // kernel sums q.k_0 by fused multiply-adds, reaches -inf and stays there - the exact logit,
  // -2.2 DBL_MAX, rounds to -inf too - while the ring's 4-row block pairs run the decode kernel,
  // whose AVX2 lanes hold +inf and -inf products and sum to NaN. An overflowing dot product has no
  // one answer; README's Semantics table says so.)
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (Index h = 0; h < H; ++h)
    for (Index r = 0; r < B * L; ++r)
      if (want.lse(h, r) == -inf) {
        if (got.lse(h, r) != -inf)
          fail("(row " + str(r) + ", head " + str(h) + ") has every key masked, but the ring's lse is " +
               std::to_string(double(got.lse(h, r))) + ": " + c.describe());
        for (Index j = 0; j < c.dv; ++j)
          if (got.output(r, h * c.dv + j) != T(0) || want.output(r, h * c.dv + j) != T(0))
            fail("(row " + str(r) + ", head " + str(h) +
                 ") has every key masked, but its output is not zeros: " + c.describe());
      }

  constexpr double eps = std::numeric_limits<T>::epsilon();
  const double tol = std::max(kTol<T>, 8 * eps * (1 + double(c.d) * A + C));
  if (tol >= 0.01) return;
  const double out_tol = tol * std::max(1.0, ve.max);
  double worst_out = 0, worst_lse = 0;  // the largest error over its tolerance
  for (Index i = 0; i < want.output.size(); ++i) {
    const double x = double(got.output.data()[i]), y = double(want.output.data()[i]);
    if (!(std::isfinite(x) && std::isfinite(y) ? std::abs(x - y) <= out_tol : x == y))
      fail("output element " + str(i) + ": ring " + std::to_string(x) + ", GQA " + std::to_string(y) + ", tolerance " +
           std::to_string(out_tol) + ": " + c.describe());
    if (std::isfinite(x)) worst_out = std::max(worst_out, std::abs(x - y) / out_tol);
  }
  for (Index i = 0; i < want.lse.size(); ++i) {
    const double x = double(got.lse.data()[i]), y = double(want.lse.data()[i]), t = tol * std::max(1.0, std::abs(y));
    if (!(std::isfinite(x) && std::isfinite(y) ? std::abs(x - y) <= t : x == y))
      fail("lse element " + str(i) + ": ring " + std::to_string(x) + ", GQA " + std::to_string(y) + ", tolerance " +
           std::to_string(t) + ": " + c.describe());
    if (std::isfinite(x)) worst_lse = std::max(worst_lse, std::abs(x - y) / t);
  }
  if (verbose())
    std::fprintf(stderr, "dist_fuzz: compared (%s), tol %.3g, worst error %.3g (out) %.3g (lse) of it\n",
                 c.describe().c_str(), tol, worst_out, worst_lse);
}

}  // namespace

// With ATTN_FUZZ_VERBOSE set in the environment, says what became of each input (compared with the
// reference and how closely, returned, or refused and why), to check that a seed does what it is
// meant to.
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Input in(data, size);
  const std::uint8_t head = in.byte();
  const Storage storage = static_cast<Storage>((head >> 1) & 3);
  const Layout layout = (head & 8) ? Layout::ZigZag : Layout::Contiguous;
  try {
    if (((head >> 4) & 3) == 3)
      fuzz_sharding(in);
    else if (head & 1)
      fuzz_ring<double>(in, storage, layout);
    else
      fuzz_ring<float>(in, storage, layout);
    if (verbose()) std::fprintf(stderr, "dist_fuzz: returned\n");
  } catch (const std::invalid_argument& e) {
    // attn::shape_error and attn::argument_error, the documented answers to bad arguments.
    if (!dynamic_cast<const attn::shape_error*>(&e) && !dynamic_cast<const attn::argument_error*>(&e))
      fail(std::string("std::invalid_argument that is not attn's: ") + e.what());
    if (verbose()) std::fprintf(stderr, "dist_fuzz: refused: %s\n", e.what());
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  return 0;
}
