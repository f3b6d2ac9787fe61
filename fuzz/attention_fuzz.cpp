// fuzz/attention_fuzz.cpp - libFuzzer target: the bytes drive attn's public attention API.
//
// The first byte chooses the class (ScaledDotProductAttention, MultiHeadAttention,
// GroupedQueryAttention), the scalar type and the thread count; the next ones the options, the
// shapes (consistent with each other unless a bit says otherwise; the ranges below) and every mask
// and score option (bool attn_mask of either polarity, [L, S] or [B*H*L, S]; float attn_bias; key
// padding; causal either way; window; softcap; ALiBi). The remaining bytes are the values of the
// inputs, weights and biases, a byte each: (b - 116) / 16 for b < 232, else one of the 24 special
// values of special() (NaN, +-inf, +-max, subnormals, 1e30, exp's overflow points, ...).
// Past the end of the input every choice reads 0 and every value comes from a fixed pseudo-random
// stream (the plain range only), so that an input of a few bytes can still give large shapes
// their values.
//
// Two builds of this file read the same bytes (a shape byte is taken modulo one more than its
// range, so a seed whose shapes fit both ranges means the same in both); only the ranges differ:
//   - attention_fuzz (the default): small shapes, thousands of inputs a second. L and S 0..20;
//     d and dv (SDPA, GQA) 0..40; MHA's E, kdim and vdim 0..24; batch 0..3; heads 0..8 (MHA and
//     GQA). Still past every kernel's tile sizes (decode kernel L <= 4, flash kernel beyond;
//     16-key panels and decode key blocks; 6-row score tiles; 32-float dot and P.V steps), but
//     far below the ~16 MFLOP at which the kernels split work over threads: every call runs on one
//     thread, and the second call below checks that a repeated call (reusing the per-thread
//     scratch of the first) returns the same bits.
//   - attention_fuzz_large (ATTN_FUZZ_LARGE=1): L, S, d, dv, E, kdim and vdim 0..40; MHA batch
//     0..40 and heads 0..8; GQA batch 0..8 and heads 0..32 (GQA work capped at 1.6e7
//     multiply-adds); widths of their own 0..160. Shapes big enough that the flash, decode and GEMM
//     kernels split work over two threads, so the second call checks 1 against 2 threads; tens of
//     inputs a second (the offline campaign).
//
// Each call either throws attn::shape_error or attn::argument_error (attn/error.hpp: the answer to
// bad arguments) or returns, and then:
//   - the output has the documented shape;
//   - the same call on the other thread count (1 or 2) returns the same bits (attn/threads.hpp;
//     in the small build both calls run on one thread: see above);
//   - when every input, weight, scale, slope and bias is finite (an additive mask may hold -inf)
//     and no intermediate can overflow (the bounds in Bounds), every output is finite and every
//     attention weight is in [0, 1], each row summing to 1, or to 0 when all its keys are masked;
//   - when, in addition, every logit is at most 20 in magnitude, the kernels agree within a
//     tolerance: SDPA's forward (flash or decode kernel) with forward_with_weights (blocked), and
//     MHA's output with need_weights on and off.
// Anything else aborts: a crash, another exception, a sanitizer report, a leak, a broken promise.
//
// Built by tools/fuzz.sh with libFuzzer (clang, fuzz/CMakeLists.txt), and by the normal test
// suite as attention_fuzz_replay, which runs the seeds in fuzz/corpus/attention_fuzz/
// (tools/gen_fuzz_corpus.py writes them and documents the byte layout by example).
#include <algorithm>
#include <attn/error.hpp>
#include <attn/grouped_query_attention.hpp>
#include <attn/mask.hpp>
#include <attn/multi_head_attention.hpp>
#include <attn/scaled_dot_product_attention.hpp>
#include <attn/threads.hpp>
#include <attn/types.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fuzz_input.hpp"

namespace {

using attn::Index;
using attn_fuzz::Extent;
using attn_fuzz::Input;
using attn_fuzz::kLimit;
template <class T>
using Matrix = attn::Matrix<T>;

// The largest value each kind of dimension takes: a shape byte is read modulo one more (Input::dim).
// ATTN_FUZZ_LARGE: big enough that the kernels split work over threads; else small enough for
// thousands of inputs a second, yet past every kernel's tile sizes (16 keys per panel and per
// decode key block, 6 query rows per score tile, 32-float P.V and dot-product steps, ...).
#if ATTN_FUZZ_LARGE
constexpr int kSeq = 40;    // L and S; an odd-shaped mask's sides, ALiBi's slope count
constexpr int kFeat = 40;   // SDPA's and GQA's d and dv (per head); SDPA's key width, out's width
constexpr int kEmbed = 40;  // MHA's E, kdim and vdim, a misfit parameter's sides, out's width
constexpr int kRows = 160;  // MHA's key rows and out's rows; GQA's key, value and out widths and out's rows
constexpr int kMhaBatch = 40, kGqaBatch = 8;
constexpr int kMhaHeads = 8, kGqaHeads = 32;
#else
constexpr int kSeq = 20;
constexpr int kFeat = 40;
constexpr int kEmbed = 24;
constexpr int kRows = 64;
constexpr int kMhaBatch = 3, kGqaBatch = 3;
constexpr int kMhaHeads = 8, kGqaHeads = 8;
#endif

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "attention_fuzz: %s\n", what.c_str());
  std::abort();
}

// The masks and score options, read from the input for B sequences, H heads, L queries, S keys.
template <class T>
struct MaskInput {
  attn::Masks<T> masks;
  Extent bias, slopes, softcap;
};

// A sliding window: 0..47, or (bytes 250..255) Index's extremes, other huge windows and -1.
inline Index window_of(std::uint8_t b) {
  constexpr Index big = std::numeric_limits<Index>::max();
  switch (b) {
    case 255:
      return big;
    case 254:
      return big - 1;
    case 253:
      return big / 2;
    case 252:
      return std::numeric_limits<Index>::min();
    case 251:
      return -1;
    case 250:
      return Index(1) << 40;
    default:
      return b % 48;
  }
}

template <class T>
MaskInput<T> read_masks(Input& in, Index B, Index H, Index L, Index S) {
  MaskInput<T> r;
  attn::Masks<T>& m = r.masks;
  const std::uint8_t which = in.byte();
  // [L, S] or [B*H*L, S], or (rarely) any shape; returns the polarity bit.
  const auto shape = [&](Index& rows, Index& cols) {
    const std::uint8_t s = in.byte();
    if (s % 8 < 4) {
      rows = L, cols = S;
    } else if (s % 8 < 7) {
      rows = B * H * L, cols = S;
    } else {
      rows = in.dim(kSeq), cols = in.dim(kSeq);
    }
    return (s & 8) != 0;
  };
  if (which & 1) {
    Index rows = 0, cols = 0;
    const bool attend = shape(rows, cols);
    attn::BoolMatrix bits = in.bools(rows, cols);
    if (attend)
      m.attn_mask = attn::AttendMask(std::move(bits));
    else
      m.attn_mask = attn::IgnoreMask(std::move(bits));
  }
  if (which & 2) {
    Index rows = 0, cols = 0;
    shape(rows, cols);
    Matrix<T> bias = in.matrix<T>(rows, cols);
    r.bias.add(bias, /*minus_inf_allowed=*/true);
    m.attn_bias = attn::AdditiveMask<T>(std::move(bias));
  }
  if (which & 4) {
    const std::uint8_t s = in.byte();
    const Index rows = s % 8 < 7 ? B : in.dim(kSeq), cols = s % 8 < 7 ? S : in.dim(kSeq);
    attn::BoolMatrix bits = in.bools(rows, cols);
    if (s & 8)
      m.key_padding_mask = attn::AttendMask(std::move(bits));
    else
      m.key_padding_mask = attn::IgnoreMask(std::move(bits));
  }
  m.causal = static_cast<attn::Causal>(((which >> 3) & 3) % 3);
  if (which & 32) m.window = window_of(in.byte());
  if (which & 64) m.softcap = in.value<T>();
  r.softcap.add(static_cast<double>(m.softcap));
  if (which & 128) {
    const std::uint8_t s = in.byte();
    m.alibi_slopes = in.vector<T>(s % 8 < 7 ? H : in.dim(kSeq));
    r.slopes.add(m.alibi_slopes);
  }
  return r;
}

// Rounding slack in a row of probabilities (their sum, each one's distance from [0, 1]).
template <class T>
constexpr double kTolerance = std::is_same_v<T, float> ? 1e-3 : 1e-9;

// Bounds on the magnitudes inside one head's attention, from bounds on |q|, |k| and |v|: d
// query/key features, S keys (S2 with MHA's extra ones; ALiBi's distances stay below L + S2).
struct Bounds {
  double scaled = 0;  // |scale * q . k|, before soft-capping
  double logit = 0;   // |logit| after soft-capping, ALiBi and the additive mask
  double cond = 0;    // the scale of the logits' rounding errors: |scale * q . k| + |ALiBi| + |bias|
  double value = 0;   // max |v|, which bounds every output row (a convex combination of v's rows)
  bool safe = false;  // every input finite (-inf allowed in the additive mask), and no intermediate
                      // reaches kLimit: q . k before and after scaling, the logit, and the
                      // unnormalised sum_j p_j v_j (p_j <= 1)
};

template <class T>
Bounds attention_bounds(double q, double k, double v, Index d, Index L, Index S2, double scale, const MaskInput<T>& mi,
                        bool finite) {
  Bounds b;
  const double qk = double(d) * q * k, cap = static_cast<double>(mi.masks.softcap);
  b.scaled = qk * std::abs(scale);
  const double added = mi.slopes.max * double(L + S2) + mi.bias.max;
  b.logit = (cap > 0 ? std::min(b.scaled, cap) : b.scaled) + added;
  b.cond = b.scaled + added;
  b.value = v;
  b.safe = finite && mi.bias.finite && mi.slopes.finite && mi.softcap.finite &&
           qk * std::max(1.0, std::abs(scale)) < kLimit<T> && b.logit < kLimit<T> && double(S2) * v < kLimit<T>;
  return b;
}

// How far two kernels' outputs may differ, relative to max |v|. Their logits are sums of d
// products formed in other orders, so they differ by up to d * eps * (1 + cond), and each
// probability moves by about twice that; the floor covers the exponentials and the normalisation.
// (Soft-capping does not add: tanh's slope is at most 1.)
template <class T>
double kernel_tolerance(Index d, double cond) {
  constexpr double eps = std::numeric_limits<T>::epsilon(), floor = std::is_same_v<T, float> ? 1e-4 : 1e-11;
  return floor + 4.0 * double(d) * eps * (1 + cond);
}

// The smallest normal T: results below it differ by whole subnormal steps.
template <class T>
constexpr double min_normal = static_cast<double>(std::numeric_limits<T>::min());

// The bits of two results agree (a run on 1 thread against one on 2).
template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0);
}

template <class T>
void check_shape(const Matrix<T>& m, Index rows, Index cols, const char* what) {
  if (m.rows() != rows || m.cols() != cols)
    fail(std::string(what) + " has shape [" + std::to_string(m.rows()) + ", " + std::to_string(m.cols()) +
         "], expected [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

template <class T>
void check_finite(const Matrix<T>& m, const char* what) {
  if (!m.allFinite()) fail(std::string(what) + " is not finite although every input is and nothing overflows");
}

// Attention probabilities: each in [0, 1]; each row sums to one of 0, 1/heads, ..., 1 (a row of
// weights averaged over `heads` heads, some of which may have every key masked).
template <class T>
void check_probabilities(const Matrix<T>& w, Index heads, const char* what) {
  check_finite(w, what);
  for (Index r = 0; r < w.rows(); ++r) {
    double sum = 0;
    for (Index c = 0; c < w.cols(); ++c) {
      const double p = static_cast<double>(w(r, c));
      if (!(p >= 0 && p <= 1 + kTolerance<T>)) fail(std::string(what) + " holds " + std::to_string(p));
      sum += p;
    }
    const double h = sum * double(heads);
    if (std::abs(h - std::round(h)) > kTolerance<T> * double(heads) || std::round(h) > double(heads))
      fail(std::string(what) + ": row " + std::to_string(r) + " sums to " + std::to_string(sum));
  }
}

// Two kernels' outputs agree within tol.
template <class T>
void check_close(const Matrix<T>& a, const Matrix<T>& b, double tol, const char* what) {
  check_shape(b, a.rows(), a.cols(), what);
  for (Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a.data()[i]), y = static_cast<double>(b.data()[i]);
    if (!(std::abs(x - y) <= tol))
      fail(std::string(what) + ": " + std::to_string(x) + " against " + std::to_string(y) + " at element " +
           std::to_string(i) + ", tolerance " + std::to_string(tol));
  }
}

// Runs f on `threads` threads, then on the other count (1 or 2). The first run may throw attn's
// errors (bad arguments end the input); once it has returned, the second must return the same bits.
template <class T, class F>
attn::AttentionResult<T> on_both_thread_counts(int threads, F&& f) {
  attn::set_num_threads(threads);
  attn::AttentionResult<T> a = f();
  attn::set_num_threads(3 - threads);
  attn::AttentionResult<T> b;
  try {
    b = f();
  } catch (const std::exception& e) {
    fail(std::string("a call that succeeded threw on the other thread count: ") + e.what());
  }
  if (!same_bits(a.output, b.output) || !same_bits(a.weights, b.weights)) fail("1 and 2 threads give different bits");
  return a;
}

// --- ScaledDotProductAttention ---------------------------------------------------------------------

// mode: bit 0 a fixed scale (read from the input), bits 1-2 the call (forward, forward_into,
// forward_with_weights), bit 3 key and bit 4 value with a size of their own, bit 5 forward_into's
// out with a size of its own.
template <class T>
void fuzz_sdpa(Input& in, int threads) {
  const std::uint8_t mode = in.byte();
  const Index L = in.dim(kSeq), S = in.dim(kSeq), d = in.dim(kFeat), dv = in.dim(kFeat);
  const Index k_cols = (mode & 8) ? in.dim(kFeat) : d, v_rows = (mode & 16) ? in.dim(kSeq) : S;
  const T scale = (mode & 1) ? in.value<T>() : T(0);
  const attn::ScaledDotProductAttention<T> sdpa =
      (mode & 1) ? attn::ScaledDotProductAttention<T>(scale) : attn::ScaledDotProductAttention<T>();
  const Matrix<T> q = in.matrix<T>(L, d), k = in.matrix<T>(S, k_cols), v = in.matrix<T>(v_rows, dv);
  const MaskInput<T> mi = read_masks<T>(in, 1, 1, L, S);
  const int call = (mode >> 1) & 3;
  const Index out_rows = (mode & 32) ? in.dim(kSeq) : L, out_cols = (mode & 32) ? in.dim(kFeat) : dv;

  const auto run = [&]() {
    attn::AttentionResult<T> r;
    if (call == 0) {
      r.output = sdpa.forward(q, k, v, mi.masks);
    } else if (call == 1) {
      r.output.setZero(out_rows, out_cols);
      sdpa.forward_into(q, k, v, mi.masks, r.output);
    } else {
      r = sdpa.forward_with_weights(q, k, v, mi.masks);
    }
    return r;
  };
  const attn::AttentionResult<T> r = on_both_thread_counts<T>(threads, run);
  check_shape(r.output, L, dv, "SDPA output");
  if (call >= 2) check_shape(r.weights, L, S, "SDPA weights");

  const double s = (mode & 1) ? static_cast<double>(scale) : 1.0 / std::sqrt(double(d));
  Extent qe, ke, ve;
  qe.add(q), ke.add(k), ve.add(v);
  const Bounds b = attention_bounds(qe.max, ke.max, ve.max, d, L, S, s, mi, qe.finite && ke.finite && ve.finite);
  if (!b.safe) return;
  check_finite(r.output, "SDPA output");
  if (call >= 2) check_probabilities(r.weights, 1, "SDPA weights");
  const double tol = kernel_tolerance<T>(d, b.cond);
  if (tol < 0.05) {
    // The flash or decode kernel (no weights) against the blocked one (weights).
    const Matrix<T> other =
        call >= 2 ? sdpa.forward(q, k, v, mi.masks) : sdpa.forward_with_weights(q, k, v, mi.masks).output;
    check_close(r.output, other, tol * b.value + min_normal<T>, "SDPA forward against forward_with_weights");
  }
}

// --- MultiHeadAttention ----------------------------------------------------------------------------

// opts: bit 0 bias, 1 add_bias_kv, 2 add_zero_attn, 3 batch_first, 4 kdim, 5 vdim (read from the
// input), bits 6-7 the inputs: 0 one matrix (self-attention), 1 key and value one matrix, 2-3 three.
// mode: bit 0 need_weights, 1 average_attn_weights, 2 forward_into, 3 out with a size of its own,
// 4 a parameter set with a shape of its own, 5 key and value with a row count of their own.
// Every shape comes before the first value, so that a short input may leave the values (and the
// masks) to the stream past its end.
template <class T>
void fuzz_mha(Input& in, int threads) {
  const std::uint8_t opts = in.byte(), mode = in.byte();
  attn::MhaOptions o;
  o.bias = opts & 1;
  o.add_bias_kv = opts & 2;
  o.add_zero_attn = opts & 4;
  o.batch_first = opts & 8;
  const Index E = in.dim(kEmbed), H = in.dim(kMhaHeads);
  if (opts & 16) o.kdim = in.dim(kEmbed);
  if (opts & 32) o.vdim = in.dim(kEmbed);
  const Index B = in.dim(kMhaBatch), L = in.dim(kSeq);
  const int inputs = opts >> 6;
  const Index S = inputs == 0 ? L : in.dim(kSeq);
  const Index kv_rows = (mode & 32) ? in.dim(kRows) : B * S;
  const Index bad_rows = (mode & 16) ? in.dim(kEmbed) : 0, bad_cols = (mode & 16) ? in.dim(kEmbed) : 0;
  const int bad_param = (mode & 16) ? in.byte() % 4 : -1;

  attn::MultiHeadAttention<T> mha(E, H, o);
  const Index kdim = mha.kdim(), vdim = mha.vdim();

  // The parameters, kept for the bounds below (zero biases where there are none).
  Matrix<T> wq, wk, wv, wo;
  attn::Vector<T> bq = attn::Vector<T>::Zero(E), bk = bq, bv = bq, bo = bq, bias_k = bq, bias_v = bq;
  if (mha.packed()) {
    const Matrix<T> w = in.matrix<T>(3 * E, E);
    wq = w.topRows(E), wk = w.middleRows(E, E), wv = w.bottomRows(E);
    mha.set_in_proj_weight(w);
  } else {
    wq = in.matrix<T>(E, E), wk = in.matrix<T>(E, kdim), wv = in.matrix<T>(E, vdim);
    mha.set_q_proj_weight(wq);
    mha.set_k_proj_weight(wk);
    mha.set_v_proj_weight(wv);
  }
  if (o.bias) {
    const attn::Vector<T> b = in.vector<T>(3 * E);
    bq = b.head(E), bk = b.segment(E, E), bv = b.tail(E);
    mha.set_in_proj_bias(b);
  }
  if (o.add_bias_kv) {
    bias_k = in.vector<T>(E), bias_v = in.vector<T>(E);
    mha.set_bias_k(bias_k);
    mha.set_bias_v(bias_v);
  }
  wo = in.matrix<T>(E, E);
  mha.out_proj().set_weight(wo);
  if (o.bias) {
    bo = in.vector<T>(E);
    mha.out_proj().set_bias(bo);
  }
  // A parameter of any shape: refused unless it fits.
  if (bad_param == 0) mha.set_in_proj_weight(Matrix<T>::Zero(bad_rows, bad_cols));
  if (bad_param == 1) mha.set_k_proj_weight(Matrix<T>::Zero(bad_rows, bad_cols));
  if (bad_param == 2) mha.set_bias_k(attn::Vector<T>::Zero(bad_rows));
  if (bad_param == 3) mha.out_proj().set_weight(Matrix<T>::Zero(bad_rows, bad_cols));

  const Matrix<T> x = in.matrix<T>(B * L, E);
  const Matrix<T> key = inputs == 0 ? Matrix<T>() : in.matrix<T>(kv_rows, kdim);
  const Matrix<T> value = inputs >= 2 ? in.matrix<T>(kv_rows, vdim) : Matrix<T>();
  const Matrix<T>& k = inputs == 0 ? x : key;
  const Matrix<T>& v = inputs == 0 ? x : inputs == 1 ? key : value;

  attn::MhaArgs<T> args;
  const MaskInput<T> mi = read_masks<T>(in, B, H, L, S);
  static_cast<attn::Masks<T>&>(args) = mi.masks;
  args.batch = B;
  args.need_weights = mode & 1;
  args.average_attn_weights = mode & 2;
  const bool into = mode & 4;
  const Index out_rows = (mode & 8) ? in.dim(kRows) : B * L, out_cols = (mode & 8) ? in.dim(kEmbed) : E;

  const auto run = [&](const attn::MhaArgs<T>& a) {
    attn::AttentionResult<T> r;
    if (into) {
      r.output.setZero(out_rows, out_cols);
      mha.forward_into(x, k, v, a, r.output);
    } else {
      r = mha.forward(x, k, v, a);
    }
    return r;
  };
  const attn::AttentionResult<T> r = on_both_thread_counts<T>(threads, [&] { return run(args); });
  // Keys per sequence as the call took them (key's rows may have a count of their own), and with
  // MHA's extra ones.
  const Index S2 = k.rows() / B + Index(o.add_bias_kv) + Index(o.add_zero_attn);
  const bool weights = args.need_weights && !into;
  check_shape(r.output, B * L, E, "MHA output");
  if (weights)
    check_shape(r.weights, args.average_attn_weights ? B * L : B * H * L, S2, "MHA weights");
  else
    check_shape(r.weights, 0, 0, "MHA weights (not asked for)");

  // Bounds through the projections: max |x| |W|^T + |b|, which bounds every partial sum of every
  // projected element, in any order of summation. The extra key and value (add_bias_kv) and the
  // heads' outputs (convex combinations of the values) stay within them.
  Extent inputs_and_parameters;
  for (const Matrix<T>* m : std::initializer_list<const Matrix<T>*>{&x, &k, &v, &wq, &wk, &wv, &wo})
    inputs_and_parameters.add(*m);
  for (const attn::Vector<T>* b : std::initializer_list<const attn::Vector<T>*>{&bq, &bk, &bv, &bo, &bias_k, &bias_v})
    inputs_and_parameters.add(*b);
  if (!inputs_and_parameters.finite) return;
  const auto bound = [](const Matrix<T>& a, const Matrix<T>& w, const attn::Vector<T>& b) {
    const Matrix<double> y =
        (a.template cast<double>().cwiseAbs() * w.template cast<double>().cwiseAbs().transpose()).rowwise() +
        b.template cast<double>().cwiseAbs().transpose();
    return y.size() > 0 ? y.maxCoeff() : 0.0;
  };
  const double pq = bound(x, wq, bq), pk = std::max(bound(k, wk, bk), Extent().add(bias_k).max),
               pv = std::max(bound(v, wv, bv), Extent().add(bias_v).max);
  const double wo_rows = wo.template cast<double>().cwiseAbs().rowwise().sum().maxCoeff();  // max_r sum_c |Wo_rc|
  const double out = pv * wo_rows + Extent().add(bo).max;
  const Index D = E / H;
  const Bounds b = attention_bounds(pq, pk, pv, D, L, S2, 1.0 / std::sqrt(double(D)), mi, true);
  if (!b.safe || !(std::max({pq, pk, pv, out}) < kLimit<T>)) return;
  check_finite(r.output, "MHA output");
  if (weights) check_probabilities(r.weights, args.average_attn_weights ? H : 1, "MHA weights");
  const double tol = kernel_tolerance<T>(D, b.cond);
  if (tol < 0.05) {
    // With need_weights the blocked kernel runs, without it the flash or decode kernel. Both read
    // the same projections (the same bits); the heads' outputs differ by tol * pv at most, and
    // out_proj sums them weighted by a row of Wo.
    attn::MhaArgs<T> other = args;
    other.need_weights = !weights;
    const attn::AttentionResult<T> r2 = mha.forward(x, k, v, other);
    check_close(r.output, r2.output, (tol * pv + min_normal<T>)*wo_rows + min_normal<T>,
                "MHA output with need_weights against without");
  }
}

// --- GroupedQueryAttention -------------------------------------------------------------------------

// mode: bit 0 a fixed scale, 1 forward_into, 2 out with a size of its own, 3 key and 4 value with
// a width of their own, 5 num_kv_heads any value (else a divisor of num_heads).
template <class T>
void fuzz_gqa(Input& in, int threads) {
  const std::uint8_t mode = in.byte();
  const Index H = in.dim(kGqaHeads);
  Index Hkv = in.byte();
  if ((mode & 32) || H == 0) {
    Hkv %= 9;
  } else {
    std::vector<Index> divisors;
    for (Index h = 1; h <= H; ++h)
      if (H % h == 0) divisors.push_back(h);
    Hkv = divisors[static_cast<std::size_t>(Hkv) % divisors.size()];
  }
  const T scale = (mode & 1) ? in.value<T>() : T(0);
  const attn::GroupedQueryAttention<T> gqa =
      (mode & 1) ? attn::GroupedQueryAttention<T>(H, Hkv, scale) : attn::GroupedQueryAttention<T>(H, Hkv);
  const Index B = in.dim(kGqaBatch), L = in.dim(kSeq), S = in.dim(kSeq), d = in.dim(kFeat), dv = in.dim(kFeat);
  // The work, B*H*L*S*(d + dv) multiply-adds, is capped so that an input runs in milliseconds.
  if (double(B) * double(H) * double(L) * double(S) * double(d + dv) > 1.6e7) return;
  const Index k_cols = (mode & 8) ? in.dim(kRows) : Hkv * d, v_cols = (mode & 16) ? in.dim(kRows) : Hkv * dv;
  const Matrix<T> q = in.matrix<T>(B * L, H * d), k = in.matrix<T>(B * S, k_cols), v = in.matrix<T>(B * S, v_cols);
  attn::GqaArgs<T> args;
  const MaskInput<T> mi = read_masks<T>(in, B, H, L, S);
  static_cast<attn::Masks<T>&>(args) = mi.masks;
  args.batch = B;
  const Index out_rows = (mode & 4) ? in.dim(kRows) : B * L, out_cols = (mode & 4) ? in.dim(kRows) : H * dv;

  const attn::AttentionResult<T> r = on_both_thread_counts<T>(threads, [&] {
    attn::AttentionResult<T> res;
    if (mode & 2) {
      res.output.setZero(out_rows, out_cols);
      gqa.forward_into(q, k, v, args, res.output);
    } else {
      res.output = gqa.forward(q, k, v, args);
    }
    return res;
  });
  check_shape(r.output, B * L, H * (v_cols / Hkv), "GQA output");  // dv = v.cols() / num_kv_heads

  const double s = (mode & 1) ? static_cast<double>(scale) : 1.0 / std::sqrt(double(d));
  Extent qe, ke, ve;
  qe.add(q), ke.add(k), ve.add(v);
  const Bounds b = attention_bounds(qe.max, ke.max, ve.max, d, L, S, s, mi, qe.finite && ke.finite && ve.finite);
  if (b.safe) check_finite(r.output, "GQA output");
}

}  // namespace

// The first byte: bits 0-1 the class (0 SDPA, 1 MHA, 2-3 GQA), bit 2 double (else float), bit 3
// two threads first (else one). With ATTN_FUZZ_VERBOSE set in the environment, says what became
// of each input (returned, or refused and why), to check that a seed does what it is meant to.
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const bool verbose = std::getenv("ATTN_FUZZ_VERBOSE") != nullptr;
  Input in(data, size);
  const std::uint8_t head = in.byte();
  const bool dbl = head & 4;
  const int threads = (head & 8) ? 2 : 1;
  try {
    switch (head & 3) {
      case 0:
        dbl ? fuzz_sdpa<double>(in, threads) : fuzz_sdpa<float>(in, threads);
        break;
      case 1:
        dbl ? fuzz_mha<double>(in, threads) : fuzz_mha<float>(in, threads);
        break;
      default:
        dbl ? fuzz_gqa<double>(in, threads) : fuzz_gqa<float>(in, threads);
        break;
    }
    if (verbose) std::fprintf(stderr, "attention_fuzz: returned\n");
  } catch (const std::invalid_argument& e) {
    // attn::shape_error and attn::argument_error, the documented answers to bad arguments (and
    // nothing else of this kind: both derive from std::invalid_argument, and so do only they).
    if (!dynamic_cast<const attn::shape_error*>(&e) && !dynamic_cast<const attn::argument_error*>(&e))
      fail(std::string("std::invalid_argument that is not attn's: ") + e.what());
    if (verbose) std::fprintf(stderr, "attention_fuzz: refused: %s\n", e.what());
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  return 0;
}
