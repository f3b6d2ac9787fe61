// fuzz/serving_fuzz.cpp - libFuzzer target: the bytes drive attn's serving API - compressed KV
// caches, paged caches, ragged (packed) batches and DecoderAttention decoding from a cache.
//
// The first byte chooses the surface (bits 0-1: KVCache, PagedKVCache, packed forward_varlen,
// DecoderAttention) and the scalar type (bit 2: double, else float). The next ones the problem:
// kv heads (1-2), query heads per kv head (1-3), head dims d and dv (1-8), the storage type
// (Native, bf16, fp16, int8) and a fixed scale or the default; then per surface:
//   KVCache    batch 1-4, capacity 1-16, a sliding window (a ring) or none, value_dim given or 0,
//              and up to 15 operations: append to one sequence (0-6 rows, sometimes a sequence
//              outside the batch or a key of the wrong width) or to all at once, clear one or all,
//              attention of 1-4 newest queries of one sequence (forward, forward_into with and
//              without lse, forward_with_weights), of every sequence at once, or a ragged step
//              (forward_varlen, _into, with lse; 0-3 queries per sequence)
//   paged      page size 1-8, 1-24 pages, a window with 0-3 sink tokens or none, and up to 15
//              operations: add_sequence, fork, free, append (0-8 rows; running out of pages),
//              set_window, and a ragged step over 1-4 sequence ids (any id, live or not)
//   packed     1-4 sequences of 0-12 queries and 0-12 keys, forward_varlen (_with_lse, _into with
//              and without lse), sometimes with offsets or a per-key mask it must refuse
//   decoder    DecoderAttention: embed_dim 1-8, head_dim 1-4 (2-8 even with RoPE), window,
//              softcap, ALiBi, scale, biases and all four weights from the bytes, a cache from
//              make_cache (a ring under a window) or a full one, and up to 7 steps: forward(x,
//              cache, b), forward(x, cache) for every sequence, forward_varlen, with weights or not
// Each attention call reads its options from the bytes: causal (BottomRight, None, TopLeft - which
// a cache refuses), window (any 0-13: a cache's may only be narrowed), softcap, ALiBi (standard or
// from the bytes), sinks (a logit per head), sink tokens, and sometimes a bad one (a slope vector
// of the wrong length, a negative window, a per-key mask) that must be refused - by any call that
// has work (a call where no sequence has queries may return without looking at its options).
// Values are a byte each: (b - 124) / 16 for b < 248, else the special value (NaN, +-inf, +-max,
// subnormals, 1e30, ...) the next byte picks. Past the end of the input every choice reads 0 and
// every value comes from a fixed pseudo-random stream (the plain range only).
//
// Every call either throws attn::shape_error or attn::argument_error (attn/error.hpp; running out
// of pages is an argument_error) or returns. A refused call changes nothing: the cache's sizes,
// page tables, reference counts, free pages and stored keys and values are the same bits as
// before, and an _into call's output is unwritten. An append within the capacity (KVCache) or the
// free pages (PagedKVCache without a window) of storable values is never refused. After every
// operation, against a plain model of the cache kept here:
//   - sizes, kept positions, page tables (one page per page_size positions, released entries
//     num_pages()), reference counts (the number of live tables holding each page) and free pages;
//   - every stored key and value within attn/storage.hpp's bound of the appended one (Native: the
//     same bits; bf16 2^-8 |x|, fp16 2^-11 |x| or 2^-25, int8 max|row| / 254; a subnormal's
//     absolute slack), and a position a window released reads exactly 0.
// After every attention call:
//   - when every query, stored key and value, slope and sink is finite and at most 1024, the output
//     (and lse, and weights) equal a plain softmax attention in double over exactly the keys each
//     query may see (its causal, window and sink-token rules, soft-capping, ALiBi, the sink logit
//     in the denominator; a row that sees no key is exactly 0), computed here from the stored K and
//     V, within (1e-5 + 8 eps cond) * max(1, max|v|) for float (1e-12 for double), cond = 1 + the
//     largest |logit|;
//   - every sequence of a ragged call equals, bitwise (output and lse), the same call with it alone:
//     forward_with_lse on its q, k, v (packed); forward_into(q_b, cache, b) (KVCache); and for a
//     paged cache a one-sequence KVCache of the same storage holding the same rows, with the paged
//     cache's window and sink tokens as the call's options (grouped_query_attention.hpp's promise);
//   - DecoderAttention's output equals, within a bound from the weights (kv_storage_error_bound
//     included), a reference in double: projections, RoPE, attention over the sequence's whole
//     history and o_proj, from every row given to the sequence so far.
// It found two library bugs, fixed in 3b3324f (regressions in kv_storage_test and
// decoder_attention_test): int8 rows at the top of T's range read back inf, and DecoderAttention's
// chunked appends to a ring that an int8 or fp16 cache refused part-way left the earlier chunks.
// Anything else aborts: a crash, another exception, a sanitizer report, a leak, a broken promise.
//
// Built by tools/fuzz.sh with libFuzzer (clang, fuzz/CMakeLists.txt), and by the normal test
// suite as serving_fuzz_replay, which runs the seeds in fuzz/corpus/serving_fuzz/.
#include <algorithm>
#include <attn/decoder_attention.hpp>
#include <attn/error.hpp>
#include <attn/grouped_query_attention.hpp>
#include <attn/kv_cache.hpp>
#include <attn/kv_storage.hpp>
#include <attn/mask.hpp>
#include <attn/paged_kv_cache.hpp>
#include <attn/types.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using attn::Index;
using attn::IndexVector;
using attn::KVStorage;
template <class T>
using Matrix = attn::Matrix<T>;
using MatD = attn::Matrix<double>;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "serving_fuzz: %s\n", what.c_str());
  std::abort();
}

bool verbose() {
  static const bool v = std::getenv("ATTN_FUZZ_VERBOSE") != nullptr;
  return v;
}

// The values a byte of 248 or more announces (the next byte picks one): the edges of floating point.
template <class T>
T special(int i) {
  using Lim = std::numeric_limits<T>;
  switch (i) {
    case 0:
      return T(0);
    case 1:
      return -T(0);
    case 2:
      return Lim::quiet_NaN();
    case 3:
      return Lim::infinity();
    case 4:
      return -Lim::infinity();
    case 5:
      return Lim::max();
    case 6:
      return Lim::lowest();
    case 7:
      return Lim::denorm_min();
    case 8:
      return -Lim::denorm_min();
    case 9:
      return Lim::min() / 2;  // subnormal
    case 10:
      return Lim::min();
    case 11:
      return Lim::epsilon();
    case 12:
      return T(1e30);
    case 13:
      return T(-1e30);
    case 14:
      return T(65504);  // fp16's largest
    case 15:
      return T(65520);  // past fp16's range: refused by an fp16 cache
    case 16:
      return T(88.5);
    case 17:
      return T(-104);
    case 18:
      return T(3.4e38);  // near bf16's (float's) largest
    case 19:
      return T(1e-20);
    case 20:
      return T(1e6);
    case 21:
      return T(-1e6);
    case 22:
      return T(1000);
    default:
      return T(-300);
  }
}

// The input as a stream of bytes. Past its end, a choice reads 0 and a value comes from a fixed
// pseudo-random stream (values in the plain range only).
class Input {
 public:
  Input(const std::uint8_t* data, std::size_t size) : data_(data), size_(size), state_(0x9e3779b97f4a7c15ull ^ size) {}

  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  Index dim(int max) { return Index(byte() % (max + 1)); }
  bool past_end() const { return pos_ >= size_; }

  template <class T>
  T value() {
    if (pos_ >= size_) return static_cast<T>(static_cast<int>(stream() % 248) - 124) / T(16);
    const int b = data_[pos_++];
    if (b >= 248) return special<T>(byte() % 24);
    return static_cast<T>(b - 124) / T(16);
  }
  template <class T>
  Matrix<T> matrix(Index rows, Index cols) {
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = value<T>();
    return m;
  }
  template <class T>
  attn::Vector<T> vector(Index n) {
    attn::Vector<T> v(n);
    for (Index i = 0; i < n; ++i) v[i] = value<T>();
    return v;
  }

 private:
  std::uint8_t stream() {
    state_ ^= state_ << 13;  // xorshift64
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return static_cast<std::uint8_t>(state_ >> 56);
  }

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::uint64_t state_;
};

template <class T>
constexpr double kEps = static_cast<double>(std::numeric_limits<T>::epsilon());
template <class T>
constexpr double kFloor = std::is_same_v<T, float> ? 1e-5 : 1e-12;
constexpr double kTame = 1024;  // the numerical checks run when every input is finite and at most this

// A pointer parameter that does not take part in deducing T (nullptr passes).
template <class T>
struct NoDeduce {
  using type = T;
};
template <class T>
using Opt = const typename NoDeduce<Matrix<T>>::type*;

template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0);
}

template <class M>
bool tame(const M& m) {
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) {
      const double x = static_cast<double>(m(i, j));
      if (!(std::abs(x) <= kTame)) return false;
    }
  return true;
}

template <class M>
double max_abs(const M& m) {
  double r = 0;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) r = std::max(r, std::abs(static_cast<double>(m(i, j))));
  return r;
}

// Runs f, which may throw attn's errors: true when it returned, false when it refused (after
// checking that the exception is attn::shape_error or attn::argument_error).
template <class F>
bool attempt(const char* what, F&& f) {
  try {
    f();
    return true;
  } catch (const std::invalid_argument& e) {
    if (!dynamic_cast<const attn::shape_error*>(&e) && !dynamic_cast<const attn::argument_error*>(&e))
      fail(std::string(what) + ": std::invalid_argument that is not attn's: " + e.what());
    if (verbose()) std::fprintf(stderr, "serving_fuzz: %s refused: %s\n", what, e.what());
    return false;
  } catch (const std::exception& e) {
    fail(std::string(what) + ": unexpected exception: " + e.what());
  }
}

// --- The reference: softmax attention in double over exactly the keys each query may see --------

struct RefOptions {
  double scale = 1;
  attn::Causal causal = attn::Causal::None;
  Index window = 0, sink_tokens = 0;
  double softcap = 0;
  std::vector<double> slopes, sinks;  // [H] or empty
};

struct Reference {
  MatD out;                // [L, H*dv]
  MatD lse;                // [H, L]
  MatD p;                  // [H*L, S], rows (h, i)
  std::vector<char> none;  // [H*L]: the row sees no key
  double cond = 1;         // 1 + the largest |logit| before masking (and |sink|)
};

// q [L, H*d], k [S, Hkv*d], v [S, Hkv*dv]: one sequence, key j at position j, query i at
// a = i + S - L (bottom-right), or a = i under Causal::TopLeft. attn/mask.hpp's order: the scaled
// product, soft-capped; -inf unless causal (j <= a) and the window (|a - j| < window, or j a sink
// token) allow j; + slope_h (j - a); softmax with the sink logit in the denominator.
Reference reference(const MatD& q, const MatD& k, const MatD& v, Index H, Index Hkv, Index d, Index dv,
                    const RefOptions& o) {
  const Index L = q.rows(), S = k.rows();
  Reference r;
  r.out = MatD::Zero(L, H * dv);
  r.lse = MatD::Zero(H, L);
  r.p = MatD::Zero(H * L, S);
  r.none.assign(std::size_t(H * L), 0);
  std::vector<double> s(static_cast<std::size_t>(S));
  std::vector<char> seen(static_cast<std::size_t>(S));
  for (Index h = 0; h < H; ++h) {
    const Index g = h / (H / Hkv);
    const double sink = o.sinks.empty() ? 0 : o.sinks[std::size_t(h)];
    if (!o.sinks.empty()) r.cond = std::max(r.cond, 1 + std::abs(sink));
    for (Index i = 0; i < L; ++i) {
      const Index a = i + (o.causal == attn::Causal::TopLeft ? 0 : S - L);
      double m = -HUGE_VAL;
      bool any = false;
      for (Index j = 0; j < S; ++j) {
        double x = 0;
        for (Index e = 0; e < d; ++e) x += q(i, h * d + e) * k(j, g * d + e);
        x *= o.scale;
        double size = std::abs(x);
        if (o.softcap > 0) x = o.softcap * std::tanh(x / o.softcap);
        bool vis = true;
        if (o.causal != attn::Causal::None && j > a) vis = false;
        if (o.window > 0 && j >= o.sink_tokens && std::abs(a - j) >= o.window) vis = false;
        if (!o.slopes.empty()) {
          const double bias = o.slopes[std::size_t(h)] * double(j - a);
          x += bias;
          size += std::abs(bias);
        }
        seen[std::size_t(j)] = vis;
        s[std::size_t(j)] = x;
        if (vis) {
          any = true;
          m = std::max(m, x);
          r.cond = std::max(r.cond, 1 + size);
        }
      }
      if (!any) {
        r.none[std::size_t(h * L + i)] = 1;
        r.lse(h, i) = o.sinks.empty() ? -HUGE_VAL : sink;
        continue;
      }
      if (!o.sinks.empty()) m = std::max(m, sink);
      double den = o.sinks.empty() ? 0 : std::exp(sink - m);
      for (Index j = 0; j < S; ++j)
        if (seen[std::size_t(j)]) den += std::exp(s[std::size_t(j)] - m);
      for (Index j = 0; j < S; ++j) {
        if (!seen[std::size_t(j)]) continue;
        const double p = std::exp(s[std::size_t(j)] - m) / den;
        r.p(h * L + i, j) = p;
        for (Index e = 0; e < dv; ++e) r.out(i, h * dv + e) += p * v(j, g * dv + e);
      }
      r.lse(h, i) = m + std::log(den);
    }
  }
  return r;
}

// The output (and lse [H, L], and weights [H*L, S]) of one sequence against the reference.
template <class T>
void check_reference(const Reference& r, const Matrix<T>& out, Opt<T> lse, Opt<T> weights, double vmax, Index H,
                     Index S, const std::string& what) {
  if (out.rows() != r.out.rows() || out.cols() != r.out.cols()) fail(what + ": output of the wrong shape");
  for (Index h = 0; h < H; ++h)
    for (Index i = 0; i < out.rows(); ++i)
      if (r.none[std::size_t(h * out.rows() + i)]) {
        const Index dv = out.cols() / H;
        for (Index e = 0; e < dv; ++e)
          if (out(i, h * dv + e) != T(0)) fail(what + ": a row that sees no key is not exactly 0");
      }
  if (8 * kEps<T> * r.cond > 0.05) return;  // the logits' rounding says too little
  const double tol = (kFloor<T> + 8 * kEps<T> * r.cond) * std::max(1.0, vmax);
  for (Index i = 0; i < out.rows(); ++i)
    for (Index c = 0; c < out.cols(); ++c) {
      const double a = static_cast<double>(out(i, c)), e = r.out(i, c);
      if (!(std::abs(a - e) <= tol)) {
        char buf[200];
        std::snprintf(buf, sizeof buf, ": output (%ld, %ld) = %.9g, the reference %.9g (tolerance %.3g)", long(i),
                      long(c), a, e, tol);
        fail(what + buf);
      }
    }
  if (lse) {
    if (lse->rows() != H || lse->cols() != out.rows()) fail(what + ": lse of the wrong shape");
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < out.rows(); ++i) {
        const double a = static_cast<double>((*lse)(h, i)), e = r.lse(h, i);
        const double t = kFloor<T> * std::max(1.0, std::abs(e)) + 8 * kEps<T> * (r.cond + std::log(double(S) + 1));
        const bool ok = std::isinf(e) ? a == e : std::abs(a - e) <= t;
        if (!ok) {
          char buf[200];
          std::snprintf(buf, sizeof buf, ": lse (%ld, %ld) = %.9g, the reference %.9g", long(h), long(i), a, e);
          fail(what + buf);
        }
      }
  }
  if (weights) {
    if (weights->rows() != r.p.rows() || weights->cols() != r.p.cols()) fail(what + ": weights of the wrong shape");
    const double t = kFloor<T> + 8 * kEps<T> * r.cond;
    for (Index i = 0; i < r.p.rows(); ++i)
      for (Index j = 0; j < r.p.cols(); ++j)
        if (!(std::abs(static_cast<double>((*weights)(i, j)) - r.p(i, j)) <= t))
          fail(what + ": a weight differs from the reference's probability");
  }
}

// --- Options --------------------------------------------------------------------------------------

// The options of one attention call, as given and as the reference reads them.
template <class T>
struct CallOptions {
  attn::Masks<T> masks;
  bool bad = false;  // an option that must be refused (the call may still be refused otherwise)
  bool tame = true;  // slopes, sinks and softcap finite and at most kTame
};

// opt: bits 0-1 causal (0, 3 BottomRight; 1 None; 2 TopLeft), 2 window (0-13), 3 softcap, 4 ALiBi
// (standard slopes, or from the bytes), 5 sinks, 6 sink tokens (0-4), 7 a bad option (the next
// byte: slopes of the wrong length, a negative window, a negative softcap, a per-key mask).
template <class T>
CallOptions<T> read_options(Input& in, Index H) {
  CallOptions<T> c;
  attn::Masks<T>& m = c.masks;
  const std::uint8_t opt = in.byte();
  const int causal = opt & 3;
  m.causal = causal == 1 ? attn::Causal::None : causal == 2 ? attn::Causal::TopLeft : attn::Causal::BottomRight;
  if (opt & 4) m.window = in.dim(13);
  if (opt & 8) {
    const std::uint8_t b = in.byte();
    m.softcap = b < 240 ? T(b % 64 + 1) / T(8) : in.value<T>();
  }
  if (opt & 16) {
    const std::uint8_t b = in.byte();
    m.alibi_slopes = b < 128 ? attn::alibi_slopes<T>(H) : in.vector<T>(H);
  }
  if (opt & 32) m.sinks = in.vector<T>(H);
  if (opt & 64) m.sink_tokens = in.dim(4);
  if (opt & 128) {
    c.bad = true;
    switch (in.byte() % 5) {
      case 0:
        m.alibi_slopes = attn::Vector<T>::Zero(H + 1);
        break;
      case 1:
        m.window = -1;
        break;
      case 2:
        m.softcap = T(-1);
        break;
      case 3:
        m.attn_mask = attn::AttendMask(attn::BoolMatrix(0, 0));  // [L, S] with S >= 1 whenever there is work
        break;
      default:
        m.sinks = attn::Vector<T>::Zero(H + 1);
        break;
    }
  }
  c.tame = std::isfinite(static_cast<double>(m.softcap)) && tame(m.alibi_slopes) && tame(m.sinks);
  return c;
}

// The reference's options for masks m (the cache's window and sink tokens already folded in).
template <class T>
RefOptions ref_options(const attn::Masks<T>& m, double scale) {
  RefOptions o;
  o.scale = scale;
  o.causal = m.causal;
  o.window = m.window;
  o.sink_tokens = m.sink_tokens;
  o.softcap = static_cast<double>(m.softcap);
  for (Index h = 0; h < m.alibi_slopes.size(); ++h) o.slopes.push_back(static_cast<double>(m.alibi_slopes[h]));
  for (Index h = 0; h < m.sinks.size(); ++h) o.sinks.push_back(static_cast<double>(m.sinks[h]));
  return o;
}

// --- The problem every surface shares --------------------------------------------------------------

struct Problem {
  Index Hkv = 1, H = 1, d = 1, dv = 1;
  KVStorage storage = KVStorage::Native;
  bool fixed_scale = false;
};

template <class T>
struct Core {
  Problem pr;
  std::optional<attn::GroupedQueryAttention<T>> gqa;
  double scale = 1;  // as the library computes it, in T
};

// shape: bit 0 a second kv head, bits 1-2 query heads per kv head - 1 (0-2), bit 3 a fixed scale,
// bits 4-5 the storage type; then d, dv (dv = d below 128).
template <class T>
Core<T> read_core(Input& in) {
  Core<T> c;
  const std::uint8_t shape = in.byte();
  c.pr.Hkv = 1 + (shape & 1);
  c.pr.H = c.pr.Hkv * (1 + ((shape >> 1) & 3) % 3);
  c.pr.storage = static_cast<KVStorage>((shape >> 4) & 3);
  c.pr.d = 1 + in.dim(7);
  const std::uint8_t dvb = in.byte();
  c.pr.dv = dvb < 128 ? c.pr.d : 1 + dvb % 8;
  c.pr.fixed_scale = shape & 8;
  if (c.pr.fixed_scale) {
    const T s = in.value<T>();
    if (!attempt("GroupedQueryAttention(H, Hkv, scale)", [&] { c.gqa.emplace(c.pr.H, c.pr.Hkv, s); })) return c;
    c.scale = static_cast<double>(s);
  } else {
    c.gqa.emplace(c.pr.H, c.pr.Hkv);
    c.scale = static_cast<double>(T(1) / std::sqrt(T(c.pr.d)));
  }
  return c;
}

// How far a stored value may be from the appended one x (attn/storage.hpp), row_max = max|row|
// (int8); with an absolute slack for what underflows (bf16 below 2^-133, int8's subnormal scales).
template <class T>
bool stored_within(KVStorage s, double x, double y, double row_max) {
  if (s == KVStorage::Native) return std::memcmp(&x, &y, sizeof x) == 0 || (x == y);
  if (std::isnan(x)) return std::isnan(y);
  if (std::isinf(x)) return y == x;
  const double denorm = static_cast<double>(std::numeric_limits<T>::denorm_min());
  switch (s) {
    case KVStorage::BFloat16:
      if (std::abs(x) > 3.38e38) return std::abs(y) >= 3.38e38;  // rounds to bf16's largest or inf
      return std::abs(y - x) <= std::ldexp(std::abs(x), -8) + std::ldexp(1.0, -134);
    case KVStorage::Float16:
      return std::abs(y - x) <= std::max(std::ldexp(std::abs(x), -11), std::ldexp(1.0, -25));
    default:
      return std::abs(y - x) <= row_max / 254 * (1 + 4 * kEps<T>)+4 * kEps<T> * std::abs(x) + 128 * denorm;
  }
}

// Stored rows (keys(b, h) or values(b, h): [n, w]) against the rows appended, all [n, heads*w]
// columns [h*w, (h+1)*w); rows in `released` must be exactly 0.
template <class T>
void check_stored(KVStorage s, const Matrix<T>& stored, const Matrix<T>& appended, Index h, Index w,
                  const std::vector<char>* released, const char* what) {
  if (stored.rows() != appended.rows() || stored.cols() != w)
    fail(std::string(what) + ": stored rows of the wrong shape");
  for (Index r = 0; r < stored.rows(); ++r) {
    if (released && (*released)[std::size_t(r)]) {
      for (Index e = 0; e < w; ++e)
        if (stored(r, e) != T(0)) fail(std::string(what) + ": a released position does not read 0");
      continue;
    }
    const double row_max = max_abs(appended.row(r).segment(h * w, w));
    for (Index e = 0; e < w; ++e)
      if (!stored_within<T>(s, static_cast<double>(appended(r, h * w + e)), static_cast<double>(stored(r, e)),
                            row_max)) {
        char buf[160];
        std::snprintf(buf, sizeof buf, ": position %ld, head %ld, element %ld stored as %.9g, appended %.9g", long(r),
                      long(h), long(e), static_cast<double>(stored(r, e)), static_cast<double>(appended(r, h * w + e)));
        fail(std::string(what) + buf);
      }
  }
}

// Whether storage s takes the values x (attn/detail/storage.hpp's check_storable, as documented).
template <class T>
bool storable(KVStorage s, const Matrix<T>& x) {
  for (Index i = 0; i < x.size(); ++i) {
    const T a = x.data()[i];
    if (s == KVStorage::Int8 && !std::isfinite(a)) return false;
    if (s == KVStorage::Float16 && std::isfinite(a) && std::abs(a) >= T(65520)) return false;
  }
  return true;
}

template <class T>
void append_rows(Matrix<T>& all, const Matrix<T>& x) {
  if (x.rows() == 0) return;
  const Index n = all.rows();
  all.conservativeResize(n + x.rows(), x.cols());
  all.bottomRows(x.rows()) = x;
}

// One head's rows [n, w] as the columns of a [n, heads*w] matrix.
template <class T>
void put_head(MatD& all, const Matrix<T>& head, Index h) {
  all.middleCols(h * head.cols(), head.cols()) = head.template cast<double>();
}

// --- KVCache ----------------------------------------------------------------------------------------

template <class T>
struct KVModel {
  std::vector<Matrix<T>> k, v;  // every row appended to sequence b, in order
};

template <class T>
struct KVSnapshot {
  std::vector<Index> sizes;
  std::vector<Matrix<T>> rows;
  bool operator==(const KVSnapshot& o) const {
    if (sizes != o.sizes || rows.size() != o.rows.size()) return false;
    for (std::size_t i = 0; i < rows.size(); ++i)
      if (!same_bits(rows[i], o.rows[i])) return false;
    return true;
  }
};

template <class T>
KVSnapshot<T> snapshot(const attn::KVCache<T>& cache) {
  KVSnapshot<T> s;
  for (Index b = 0; b < cache.batch(); ++b) {
    s.sizes.push_back(cache.size(b));
    for (Index h = 0; h < cache.kv_heads(); ++h)
      s.rows.push_back(cache.keys(b, h)), s.rows.push_back(cache.values(b, h));
  }
  return s;
}

// The cache against the model: sizes, kept positions, and the stored keys and values.
template <class T>
void check_kv_cache(const attn::KVCache<T>& cache, const KVSnapshot<T>& now, const KVModel<T>& m) {
  const Index C = cache.capacity(), W = cache.window();
  for (Index b = 0; b < cache.batch(); ++b) {
    const Index n = m.k[std::size_t(b)].rows();
    if (cache.size(b) != n) fail("KVCache: size(b) is not the positions appended");
    const Index kept = W > 0 ? std::min(n, C) : n;
    if (cache.kept(b) != kept || cache.first_kept(b) != n - kept) fail("KVCache: kept(b) or first_kept(b) is wrong");
    if (cache.max_append(b) != (W > 0 ? C - W + 1 : C - n)) fail("KVCache: max_append(b) is wrong");
    for (Index h = 0; h < cache.kv_heads(); ++h) {
      const Matrix<T> k = m.k[std::size_t(b)].bottomRows(kept), v = m.v[std::size_t(b)].bottomRows(kept);
      check_stored(cache.storage(), now.rows[std::size_t((b * cache.kv_heads() + h) * 2)], k, h, cache.head_dim(),
                   nullptr, "KVCache keys");
      check_stored(cache.storage(), now.rows[std::size_t((b * cache.kv_heads() + h) * 2 + 1)], v, h, cache.value_dim(),
                   nullptr, "KVCache values");
    }
  }
}

// Sequence b's kept keys and values as stored, [kept, Hkv*d] and [kept, Hkv*dv], in double.
template <class T>
std::pair<MatD, MatD> stored_kv(const attn::KVCache<T>& cache, Index b) {
  const Index n = cache.kept(b), Hkv = cache.kv_heads();
  MatD k(n, Hkv * cache.head_dim()), v(n, Hkv * cache.value_dim());
  for (Index h = 0; h < Hkv; ++h) put_head(k, cache.keys(b, h), h), put_head(v, cache.values(b, h), h);
  return {k, v};
}

// The masks a call against a KVCache applies: the ring's window unless args narrow it.
template <class T>
attn::Masks<T> kv_effective(const attn::KVCache<T>& cache, const attn::Masks<T>& m) {
  attn::Masks<T> e = m;
  if (cache.window() > 0 && e.window == 0) e.window = cache.window();
  return e;
}

// Rows q [L, H*d] of sequence b's newest queries, against the reference over its kept keys.
template <class T>
void check_kv_rows(const Core<T>& c, const attn::KVCache<T>& cache, Index b, const CallOptions<T>& o,
                   const Matrix<T>& q, const Matrix<T>& out, Opt<T> lse, Opt<T> weights, const char* what) {
  const std::pair<MatD, MatD> kv = stored_kv(cache, b);
  if (!o.tame || !tame(q) || !tame(kv.first) || !tame(kv.second)) return;
  const Reference r = reference(q.template cast<double>(), kv.first, kv.second, c.pr.H, c.pr.Hkv, cache.head_dim(),
                                cache.value_dim(), ref_options(kv_effective(cache, o.masks), c.scale));
  check_reference(r, out, lse, weights, max_abs(kv.second), c.pr.H, kv.first.rows(),
                  std::string(what) + ", sequence " + std::to_string(b));
}

template <class T>
attn::CacheArgs<T> cache_args(const attn::Masks<T>& m) {
  attn::CacheArgs<T> a;
  static_cast<attn::Masks<T>&>(a) = m;
  return a;
}

IndexVector offsets(const std::vector<Index>& lengths) {
  IndexVector cu(Index(lengths.size()) + 1);
  cu[0] = 0;
  for (std::size_t b = 0; b < lengths.size(); ++b) cu[Index(b) + 1] = cu[Index(b)] + lengths[b];
  return cu;
}

// head: bits 0-1 batch - 1, bit 2 a window, bit 3 value_dim given; then the capacity (1-16), the
// window (1..capacity) and the operation count (0-15). Each operation's first byte: bits 0-2 the
// kind (0, 1, 7 append to one; 2 append to all; 3 attend one; 4 ragged step; 5 every sequence at
// once; 6 clear), the rest its variants.
template <class T>
void fuzz_kv_cache(Input& in) {
  Core<T> c = read_core<T>(in);
  if (!c.gqa) return;
  const Problem& pr = c.pr;
  const std::uint8_t head = in.byte();
  const Index B = 1 + (head & 3), C = 1 + in.dim(15);
  const Index W = (head & 4) ? 1 + in.byte() % C : 0;
  const Index value_dim = (head & 8) || pr.dv != pr.d ? pr.dv : 0;
  std::optional<attn::KVCache<T>> made;
  if (!attempt("KVCache", [&] { made.emplace(pr.storage, B, pr.Hkv, pr.d, C, W, value_dim); })) return;
  attn::KVCache<T>& cache = *made;
  const attn::GroupedQueryAttention<T>& gqa = *c.gqa;
  const Index H = pr.H, d = pr.d, dv = pr.dv, Hkv = pr.Hkv;
  KVModel<T> model;
  model.k.assign(std::size_t(B), Matrix<T>(0, Hkv * d));
  model.v.assign(std::size_t(B), Matrix<T>(0, Hkv * dv));
  const Index ops = in.dim(15);
  KVSnapshot<T> before = snapshot(cache);
  for (Index op = 0; op < ops; ++op) {
    const std::uint8_t ob = in.byte();
    const int kind = ob & 7;
    bool changed = false;
    if (kind == 0 || kind == 1 || kind == 7 || kind == 2) {
      const bool all = kind == 2;
      const Index b = all ? 0 : in.dim(int(B)), L = all ? in.dim(3) : in.dim(6);
      const Index rows = all ? B * L : L;
      const bool wrong = (ob & 0x80) != 0;  // a key one column too wide
      const Matrix<T> k = in.matrix<T>(rows, Hkv * d + (wrong ? 1 : 0)), v = in.matrix<T>(rows, Hkv * dv);
      bool fits = !wrong && storable(pr.storage, k) && storable(pr.storage, v) && b < B;
      for (Index s = 0; s < B && fits; ++s)
        if ((all || s == b) && L > (W > 0 ? C - W + 1 : C - model.k[std::size_t(s)].rows())) fits = false;
      const bool ok = attempt("KVCache::append", [&] {
        if (all)
          cache.append(k, v);
        else
          cache.append(b, k, v);
      });
      if (fits && !ok) fail("KVCache::append refused rows that fit and can be stored");
      if (ok) {
        for (Index s = 0; s < B; ++s)
          if (all || s == b) {
            append_rows(model.k[std::size_t(s)], Matrix<T>(k.middleRows(all ? s * L : 0, L)));
            append_rows(model.v[std::size_t(s)], Matrix<T>(v.middleRows(all ? s * L : 0, L)));
          }
        changed = true;
      }
    } else if (kind == 3) {
      const Index b = in.dim(int(B)), L = 1 + in.dim(3);
      const int call = (ob >> 3) & 3;
      const CallOptions<T> o = read_options<T>(in, H);
      const attn::CacheArgs<T> args = cache_args(o.masks);
      const Matrix<T> q = in.matrix<T>(L, H * d);
      Matrix<T> out = Matrix<T>::Constant(L, H * dv, T(7)), lse = Matrix<T>::Constant(H, L, T(7)), weights;
      const bool ok = attempt("GroupedQueryAttention::forward(q, cache, b)", [&] {
        if (call == 0) out = gqa.forward(q, cache, b, args);
        if (call == 1) gqa.forward_into(q, cache, b, args, out);
        if (call == 2) gqa.forward_into(q, cache, b, args, out, lse);
        if (call == 3) {
          attn::AttentionResult<T> r = gqa.forward_with_weights(q, cache, b, args);
          out = std::move(r.output), weights = std::move(r.weights);
        }
      });
      if (!ok && !((out.array() == T(7)).all() && (lse.array() == T(7)).all()))
        fail("a refused forward(q, cache, b) wrote its output");
      if (ok && o.bad) fail("forward(q, cache, b) took an option it must refuse");
      if (ok)
        check_kv_rows(c, cache, b, o, q, out, call == 2 ? &lse : nullptr, call == 3 ? &weights : nullptr,
                      "forward(q, cache, b)");
    } else if (kind == 4) {
      std::vector<Index> Lq;
      for (Index b = 0; b < B; ++b) Lq.push_back(in.dim(3));
      const int call = (ob >> 3) & 3;
      IndexVector cu = offsets(Lq);
      if (ob & 0x80) cu[B] += 1;  // offsets that end past the rows: refused
      const CallOptions<T> o = read_options<T>(in, H);
      const attn::CacheArgs<T> args = cache_args(o.masks);
      const Index total = offsets(Lq)[B];
      const Matrix<T> q = in.matrix<T>(total, H * d);
      Matrix<T> out = Matrix<T>::Constant(total, H * dv, T(7)), lse = Matrix<T>::Constant(H, total, T(7));
      const bool ok = attempt("GroupedQueryAttention::forward_varlen(q, cache, cu)", [&] {
        if (call == 0 || call == 3) out = gqa.forward_varlen(q, cache, cu, args);
        if (call == 1) gqa.forward_varlen_into(q, cache, cu, args, out);
        if (call == 2) gqa.forward_varlen_into(q, cache, cu, args, out, lse);
      });
      if (!ok && !((out.array() == T(7)).all() && (lse.array() == T(7)).all()))
        fail("a refused forward_varlen(q, cache, cu) wrote its output");
      const bool work = std::any_of(Lq.begin(), Lq.end(), [](Index L) { return L > 0; });
      if (ok && (ob & 0x80)) fail("forward_varlen(q, cache, cu) took offsets past the rows of q");
      if (ok && o.bad && work) fail("forward_varlen(q, cache, cu) took an option it must refuse");
      if (ok) {
        for (Index b = 0; b < B; ++b) {
          const Index L = Lq[std::size_t(b)];
          if (L == 0) continue;
          const Matrix<T> qb = q.middleRows(cu[b], L), ob_rows = out.middleRows(cu[b], L);
          Matrix<T> one(L, H * dv), one_lse(H, L);
          if (!attempt("forward_into(q_b, cache, b)", [&] { gqa.forward_into(qb, cache, b, args, one, one_lse); }))
            fail("forward_varlen(q, cache, cu) took a sequence that forward_into(q_b, cache, b) refuses");
          if (!same_bits(one, ob_rows)) fail("forward_varlen(q, cache, cu): a sequence differs from it alone");
          if (call == 2 && !same_bits(one_lse, Matrix<T>(lse.middleCols(cu[b], L))))
            fail("forward_varlen(q, cache, cu): a sequence's lse differs from it alone");
          check_kv_rows(c, cache, b, o, qb, ob_rows, &one_lse, nullptr, "forward_varlen(q, cache, cu)");
        }
      }
    } else if (kind == 5) {
      const Index L = 1 + in.dim(2);
      const bool weights = (ob & 8) != 0;
      const CallOptions<T> o = read_options<T>(in, H);
      const attn::CacheArgs<T> args = cache_args(o.masks);
      const Matrix<T> q = in.matrix<T>(B * L, H * d);
      Matrix<T> out, w;
      const bool ok = attempt("GroupedQueryAttention::forward(q, cache)", [&] {
        if (weights) {
          attn::AttentionResult<T> r = gqa.forward_with_weights(q, cache, -1, args);
          out = std::move(r.output), w = std::move(r.weights);
        } else {
          out = gqa.forward(q, cache, args);
        }
      });
      if (ok && o.bad) fail("forward(q, cache) took an option it must refuse");
      if (ok)
        for (Index b = 0; b < B; ++b) {
          Matrix<T> wb;
          if (weights) wb = w.middleRows(b * H * L, H * L);
          check_kv_rows(c, cache, b, o, Matrix<T>(q.middleRows(b * L, L)), Matrix<T>(out.middleRows(b * L, L)), nullptr,
                        weights ? &wb : nullptr, "forward(q, cache)");
        }
    } else {
      const Index b = in.dim(int(B));
      const bool ok = attempt("KVCache::clear", [&] {
        if (ob & 8)
          cache.clear();
        else
          cache.clear(b);
      });
      if (ok) {
        for (Index s = 0; s < B; ++s)
          if ((ob & 8) || s == b)
            model.k[std::size_t(s)].resize(0, Hkv * d), model.v[std::size_t(s)].resize(0, Hkv * dv);
        changed = true;
      } else if (b < B) {
        fail("KVCache::clear(b) refused a sequence of the batch");
      }
    }
    KVSnapshot<T> now = snapshot(cache);
    if (!changed && !(now == before)) fail("an operation that changed nothing changed the KVCache");
    check_kv_cache(cache, now, model);
    before = std::move(now);
  }
}

// --- PagedKVCache -----------------------------------------------------------------------------------

template <class T>
struct PagedModel {
  std::vector<char> live;
  std::vector<Matrix<T>> k, v;
};

template <class T>
struct PagedSnapshot {
  std::vector<Index> sizes, refs;
  std::vector<std::vector<Index>> tables;
  Index free_pages = 0;
  std::vector<Matrix<T>> rows;
  bool operator==(const PagedSnapshot& o) const {
    if (sizes != o.sizes || refs != o.refs || tables != o.tables || free_pages != o.free_pages ||
        rows.size() != o.rows.size())
      return false;
    for (std::size_t i = 0; i < rows.size(); ++i)
      if (!same_bits(rows[i], o.rows[i])) return false;
    return true;
  }
};

template <class T>
PagedSnapshot<T> snapshot(const attn::PagedKVCache<T>& cache, const PagedModel<T>& m) {
  PagedSnapshot<T> s;
  for (std::size_t id = 0; id < m.live.size(); ++id) {
    if (!cache.is_live(Index(id))) {
      s.sizes.push_back(-1);
      continue;
    }
    s.sizes.push_back(cache.size(Index(id)));
    s.tables.push_back(cache.pages(Index(id)));
    for (Index h = 0; h < cache.kv_heads(); ++h)
      s.rows.push_back(cache.keys(Index(id), h)), s.rows.push_back(cache.values(Index(id), h));
  }
  for (Index g = 0; g < cache.num_pages(); ++g) s.refs.push_back(cache.page_refs(g));
  s.free_pages = cache.free_pages();
  return s;
}

// The cache against the model: liveness, sizes, page tables, reference counts, free pages, the
// stored keys and values (released positions read 0).
template <class T>
void check_paged(const attn::PagedKVCache<T>& cache, const PagedSnapshot<T>& now, const PagedModel<T>& m) {
  std::size_t at = 0;  // now.rows: keys and values of each live sequence's heads, in id order
  const Index P = cache.page_size(), N = cache.num_pages();
  std::vector<Index> held(std::size_t(N), 0);
  for (std::size_t id = 0; id < m.live.size(); ++id) {
    if (cache.is_live(Index(id)) != bool(m.live[id])) fail("PagedKVCache: is_live(id) is not the model's");
    if (!m.live[id]) continue;
    const Index n = m.k[id].rows();
    if (cache.size(Index(id)) != n) fail("PagedKVCache: size(id) is not the positions appended");
    const std::vector<Index>& t = cache.pages(Index(id));
    if (Index(t.size()) != (n + P - 1) / P) fail("PagedKVCache: a page table without one page per page_size positions");
    std::vector<char> released(std::size_t(n), 0);
    const Index first = cache.first_kept(Index(id));
    for (std::size_t x = 0; x < t.size(); ++x) {
      const Index g = t[x];
      if (g < 0 || g > N) fail("PagedKVCache: a page id outside the pool");
      if (g == N) {
        if (Index(x + 1) * P > first) fail("PagedKVCache: a released page at or past first_kept()");
        for (Index r = Index(x) * P; r < std::min(n, Index(x + 1) * P); ++r) released[std::size_t(r)] = 1;
      } else {
        ++held[std::size_t(g)];
      }
    }
    for (Index h = 0; h < cache.kv_heads(); ++h) {
      check_stored(cache.storage(), now.rows[at++], m.k[id], h, cache.head_dim(), &released, "PagedKVCache keys");
      check_stored(cache.storage(), now.rows[at++], m.v[id], h, cache.value_dim(), &released, "PagedKVCache values");
    }
  }
  Index free = 0;
  for (Index g = 0; g < N; ++g) {
    if (cache.page_refs(g) != held[std::size_t(g)]) fail("PagedKVCache: page_refs(g) is not the tables holding g");
    free += held[std::size_t(g)] == 0 ? 1 : 0;
  }
  if (cache.free_pages() != free) fail("PagedKVCache: free_pages() is not the pages no table holds");
}

// head: the page size (1-8), the page count (1-24), the window (bit 0 of its byte: one of 1-12,
// and 0-3 sink tokens), value_dim given (bit 1), the operation count (0-15). Each operation's
// first byte: bits 0-2 the kind (0 add_sequence; 1 fork; 2 free; 3, 4 append; 5, 6 a ragged step;
// 7 set_window), the rest its variants.
template <class T>
void fuzz_paged(Input& in) {
  Core<T> c = read_core<T>(in);
  if (!c.gqa) return;
  const Problem& pr = c.pr;
  const Index P = 1 + in.dim(7), N = 1 + in.dim(23);
  const std::uint8_t wb = in.byte();
  const Index value_dim = (wb & 2) || pr.dv != pr.d ? pr.dv : 0;
  std::optional<attn::PagedKVCache<T>> made;
  if (!attempt("PagedKVCache", [&] { made.emplace(pr.storage, pr.Hkv, pr.d, P, N, value_dim); })) return;
  attn::PagedKVCache<T>& cache = *made;
  if (wb & 1) {
    const Index W = 1 + (wb >> 2) % 12, sinks = in.dim(3);
    if (!attempt("PagedKVCache::set_window", [&] { cache.set_window(W, sinks); }))
      fail("set_window refused a window on a new cache");
  }
  const attn::GroupedQueryAttention<T>& gqa = *c.gqa;
  const Index H = pr.H, d = pr.d, dv = pr.dv, Hkv = pr.Hkv;
  PagedModel<T> model;
  const Index ops = in.dim(15);
  PagedSnapshot<T> before = snapshot(cache, model);
  for (Index op = 0; op < ops; ++op) {
    const std::uint8_t ob = in.byte();
    const int kind = ob & 7;
    const Index slots = Index(model.live.size());
    const auto any_id = [&] { return in.dim(int(slots)); };  // slots: a new, never-used id
    const auto is_live = [&](Index id) { return id >= 0 && id < slots && model.live[std::size_t(id)]; };
    bool changed = false;
    if (kind == 0 || kind == 1) {
      if (slots >= 8) continue;  // a bound on the work per input
      const Index from = kind == 1 ? any_id() : 0;
      Index id = -1;
      const bool ok = attempt(kind == 0 ? "PagedKVCache::add_sequence" : "PagedKVCache::fork",
                              [&] { id = kind == 0 ? cache.add_sequence() : cache.fork(from); });
      if (kind == 1 && ok != is_live(from)) fail("PagedKVCache::fork took a sequence that is not live, or refused one");
      if (kind == 0 && !ok) fail("PagedKVCache::add_sequence refused");
      if (ok) {
        if (id < 0 || id > slots || is_live(id)) fail("PagedKVCache: a new sequence got the id of a live one");
        if (id == slots) model.live.push_back(0), model.k.emplace_back(), model.v.emplace_back();
        model.live[std::size_t(id)] = 1;
        model.k[std::size_t(id)] = kind == 1 ? model.k[std::size_t(from)] : Matrix<T>(0, Hkv * d);
        model.v[std::size_t(id)] = kind == 1 ? model.v[std::size_t(from)] : Matrix<T>(0, Hkv * dv);
        changed = true;
      }
    } else if (kind == 2) {
      const Index id = any_id();
      const bool ok = attempt("PagedKVCache::free", [&] { cache.free(id); });
      if (ok != is_live(id)) fail("PagedKVCache::free took a sequence that is not live, or refused one");
      if (ok) model.live[std::size_t(id)] = 0, changed = true;
    } else if (kind == 3 || kind == 4) {
      const Index id = any_id(), L = in.dim(8);
      const bool wrong = (ob & 0x80) != 0;
      const Matrix<T> k = in.matrix<T>(L, Hkv * d), v = in.matrix<T>(L, Hkv * dv + (wrong ? 1 : 0));
      // Without a window, the pages it takes: one per page_size positions past those held, and a
      // copy of a shared last page it writes into.
      Index take = -1;
      if (is_live(id) && cache.window() == 0) {
        const Index n = cache.size(id), have = Index(cache.pages(id).size());
        const bool copy = L > 0 && n % P != 0 && cache.page_refs(cache.pages(id).back()) > 1;
        take = (n + L + P - 1) / P - have + (copy ? 1 : 0);
      }
      const bool ok = attempt("PagedKVCache::append", [&] { cache.append(id, k, v); });
      if (ok && (!is_live(id) || wrong))
        fail("PagedKVCache::append took a dead sequence or a value of the wrong width");
      if (take >= 0 && !wrong && storable(pr.storage, k) && storable(pr.storage, v) &&
          ok != (take <= before.free_pages))
        fail("PagedKVCache::append: refused with enough free pages, or took more pages than were free");
      if (ok) {
        append_rows(model.k[std::size_t(id)], k), append_rows(model.v[std::size_t(id)], v);
        changed = true;
      }
    } else if (kind == 5 || kind == 6) {
      const Index n = 1 + in.dim(3);
      std::vector<Index> ids, Lq;
      for (Index i = 0; i < n; ++i) ids.push_back(any_id()), Lq.push_back(in.dim(3));
      const int call = (ob >> 3) & 3;
      const CallOptions<T> o = read_options<T>(in, H);
      const attn::CacheArgs<T> args = cache_args(o.masks);
      IndexVector seqs(n);
      for (Index i = 0; i < n; ++i) seqs[i] = ids[std::size_t(i)];
      const IndexVector cu = offsets(Lq);
      const Index total = cu[n];
      const Matrix<T> q = in.matrix<T>(total, H * d);
      Matrix<T> out = Matrix<T>::Constant(total, H * dv, T(7)), lse = Matrix<T>::Constant(H, total, T(7));
      const bool ok = attempt("GroupedQueryAttention::forward_varlen(q, paged, seqs, cu)", [&] {
        if (call == 0 || call == 3) out = gqa.forward_varlen(q, cache, seqs, cu, args);
        if (call == 1) gqa.forward_varlen_into(q, cache, seqs, cu, args, out);
        if (call == 2) gqa.forward_varlen_into(q, cache, seqs, cu, args, out, lse);
      });
      if (!ok && !((out.array() == T(7)).all() && (lse.array() == T(7)).all()))
        fail("a refused forward_varlen(q, paged, ...) wrote its output");
      const bool work = std::any_of(Lq.begin(), Lq.end(), [](Index L) { return L > 0; });
      if (ok && o.bad && work) fail("forward_varlen(q, paged, ...) took an option it must refuse");
      if (ok) {
        // The masks the paged cache applies: its window and sink tokens unless args narrow them.
        attn::Masks<T> eff = o.masks;
        if (cache.window() > 0) {
          if (eff.window == 0) eff.window = cache.window();
          if (eff.sink_tokens == 0) eff.sink_tokens = cache.sink_tokens();
        }
        const attn::CacheArgs<T> wanted = cache_args(eff);
        for (Index i = 0; i < n; ++i) {
          const Index L = Lq[std::size_t(i)], id = ids[std::size_t(i)];
          if (L == 0) continue;
          if (!is_live(id)) fail("forward_varlen(q, paged, ...) took a sequence that is not live");
          const Matrix<T> qi = q.middleRows(cu[i], L), oi = out.middleRows(cu[i], L);
          // The same rows in a KVCache of the same storage, one sequence: the same bits - when
          // every value is finite. A masked key's v_j is multiplied by weight 0 (NaN * 0 = NaN, as
          // PyTorch; README's Semantics table): the paged cache has released what its window left
          // behind (zeros), the KVCache keeps it and masks it.
          const Matrix<T>&mk = model.k[std::size_t(id)], &mv = model.v[std::size_t(id)];
          const bool finite = mv.allFinite();
          Matrix<T> one(L, H * dv), one_lse(H, L);
          if (finite) {
            attn::KVCache<T> flat(pr.storage, 1, Hkv, d, mk.rows(), 0, value_dim);
            flat.append(0, mk, mv);
            if (!attempt("forward_into(q_i, KVCache, 0)", [&] { gqa.forward_into(qi, flat, 0, wanted, one, one_lse); }))
              fail("forward_varlen(q, paged, ...) took a sequence that a KVCache of its rows refuses");
            if (!same_bits(one, oi))
              fail("forward_varlen(q, paged, ...): a sequence differs from a KVCache of its rows");
            if (call == 2 && !same_bits(one_lse, Matrix<T>(lse.middleCols(cu[i], L))))
              fail("forward_varlen(q, paged, ...): a sequence's lse differs from a KVCache of its rows");
          }
          // The reference over the stored keys (released positions read 0 and must be masked).
          MatD sk(mk.rows(), Hkv * d), sv(mk.rows(), Hkv * dv);
          for (Index h = 0; h < Hkv; ++h) put_head(sk, cache.keys(id, h), h), put_head(sv, cache.values(id, h), h);
          if (o.tame && tame(qi) && tame(sk) && tame(sv)) {
            const Reference r = reference(qi.template cast<double>(), sk, sv, H, Hkv, d, dv, ref_options(eff, c.scale));
            check_reference(r, oi, finite ? &one_lse : nullptr, nullptr, max_abs(sv), H, sk.rows(),
                            "forward_varlen(q, paged, ...), sequence " + std::to_string(id));
          }
        }
      }
    } else {
      const Index W = in.dim(12), sinks = in.dim(3);
      bool any_live = false;
      for (const char l : model.live) any_live = any_live || l;
      const bool ok = attempt("PagedKVCache::set_window", [&] { cache.set_window(W, sinks); });
      if (ok && any_live) fail("PagedKVCache::set_window took a window with sequences live");
      if (!ok && !any_live && (W > 0 || sinks == 0)) fail("PagedKVCache::set_window refused a window with none live");
      changed = ok;
    }
    PagedSnapshot<T> now = snapshot(cache, model);
    if (!changed && !(now == before)) fail("an operation that changed nothing changed the PagedKVCache");
    check_paged(cache, now, model);
    before = std::move(now);
  }
}

// --- Packed sequences ----------------------------------------------------------------------------

// head: bits 0-1 sequences - 1, bits 2-3 the call (forward_varlen, _with_lse, _into, _into with
// lse), bit 4 offsets that must be refused; then each sequence's query and key counts (0-12).
template <class T>
void fuzz_packed(Input& in) {
  Core<T> c = read_core<T>(in);
  if (!c.gqa) return;
  const Problem& pr = c.pr;
  const attn::GroupedQueryAttention<T>& gqa = *c.gqa;
  const Index H = pr.H, d = pr.d, dv = pr.dv, Hkv = pr.Hkv;
  const std::uint8_t head = in.byte();
  const Index B = 1 + (head & 3);
  const int call = (head >> 2) & 3;
  std::vector<Index> Lq, Sk;
  for (Index b = 0; b < B; ++b) Lq.push_back(in.dim(12)), Sk.push_back(in.dim(12));
  IndexVector cu_q = offsets(Lq), cu_k = offsets(Sk);
  const Index total_q = cu_q[B], total_k = cu_k[B];
  if (head & 16) {
    const std::uint8_t b = in.byte();
    IndexVector& cu = (b & 1) ? cu_k : cu_q;
    cu[Index(b >> 1) % (B + 1)] += (b & 128) ? -1 : 1;
  }
  // Offsets moved in the middle may still be valid (then they give the sequences new lengths).
  const auto valid = [](const IndexVector& cu, Index total) {
    bool v = cu[0] == 0 && cu[cu.size() - 1] == total;
    for (Index i = 0; i + 1 < cu.size(); ++i) v = v && cu[i + 1] >= cu[i];
    return v;
  };
  const bool valid_offsets = valid(cu_q, total_q) && valid(cu_k, total_k);
  if (valid_offsets)
    for (Index b = 0; b < B; ++b)
      Lq[std::size_t(b)] = cu_q[b + 1] - cu_q[b], Sk[std::size_t(b)] = cu_k[b + 1] - cu_k[b];
  const CallOptions<T> o = read_options<T>(in, H);
  const Matrix<T> q = in.matrix<T>(total_q, H * d), k = in.matrix<T>(total_k, Hkv * d),
                  v = in.matrix<T>(total_k, Hkv * dv);
  Matrix<T> out = Matrix<T>::Constant(total_q, H * dv, T(7)), lse = Matrix<T>::Constant(H, total_q, T(7));
  const bool ok = attempt("GroupedQueryAttention::forward_varlen", [&] {
    if (call == 0) out = gqa.forward_varlen(q, k, v, cu_q, cu_k, o.masks);
    if (call == 1) {
      attn::AttentionLse<T> r = gqa.forward_varlen_with_lse(q, k, v, cu_q, cu_k, o.masks);
      out = std::move(r.output), lse = std::move(r.lse);
    }
    if (call == 2) gqa.forward_varlen_into(q, k, v, cu_q, cu_k, o.masks, out);
    if (call == 3) gqa.forward_varlen_into(q, k, v, cu_q, cu_k, o.masks, out, lse);
  });
  if (!ok && call >= 2 && !((out.array() == T(7)).all() && (lse.array() == T(7)).all()))
    fail("a refused forward_varlen_into wrote its output");
  if (!ok) return;
  if (!valid_offsets) fail("forward_varlen took offsets it must refuse");
  if (o.bad && std::any_of(Lq.begin(), Lq.end(), [](Index L) { return L > 0; }))
    fail("forward_varlen took an option it must refuse");
  const bool has_lse = call == 1 || call == 3;
  attn::GqaArgs<T> one;
  static_cast<attn::Masks<T>&>(one) = o.masks;
  one.batch = 1;
  for (Index b = 0; b < B; ++b) {
    const Index L = Lq[std::size_t(b)], S = Sk[std::size_t(b)];
    if (L == 0) continue;
    if (S == 0) fail("forward_varlen took a sequence with queries and no keys");
    const Matrix<T> qb = q.middleRows(cu_q[b], L), kb = k.middleRows(cu_k[b], S), vb = v.middleRows(cu_k[b], S);
    const Matrix<T> ob = out.middleRows(cu_q[b], L);
    attn::AttentionLse<T> alone;
    if (!attempt("forward_with_lse (one sequence)", [&] { alone = gqa.forward_with_lse(qb, kb, vb, one); }))
      fail("forward_varlen took a sequence that forward_with_lse refuses alone");
    if (!same_bits(alone.output, ob)) fail("forward_varlen: a sequence differs from it alone");
    if (has_lse && !same_bits(alone.lse, Matrix<T>(lse.middleCols(cu_q[b], L))))
      fail("forward_varlen: a sequence's lse differs from it alone");
    if (o.tame && tame(qb) && tame(kb) && tame(vb)) {
      const Reference r = reference(qb.template cast<double>(), kb.template cast<double>(), vb.template cast<double>(),
                                    H, Hkv, d, dv, ref_options(o.masks, c.scale));
      check_reference(r, ob, &alone.lse, nullptr, max_abs(vb), H, S, "forward_varlen, sequence " + std::to_string(b));
    }
  }
}

// --- DecoderAttention -----------------------------------------------------------------------------

// x [n, E] -> x W^T + b in double (W [out, E]; b empty or [out]).
template <class T>
MatD project(const MatD& x, const attn::Linear<T>& l) {
  MatD y = x * l.weight().template cast<double>().transpose();
  if (l.bias().size() > 0) y.rowwise() += l.bias().template cast<double>().transpose();
  return y;
}

// max over rows of |x| |W|^T + |b|: a bound on every element of x W^T + b and its partial sums.
template <class T>
double projection_bound(const MatD& x, const attn::Linear<T>& l) {
  if (x.rows() == 0) return 0;
  MatD y = x.cwiseAbs() * l.weight().template cast<double>().cwiseAbs().transpose();
  if (l.bias().size() > 0) y.rowwise() += l.bias().template cast<double>().cwiseAbs().transpose();
  return y.size() > 0 ? y.maxCoeff() : 0.0;
}

// NeoX RoPE (rotate half, base 10000, every feature) of row r at position r, heads of D features.
void rope_rows(MatD& x, Index heads, Index D) {
  const Index half = D / 2;
  for (Index r = 0; r < x.rows(); ++r)
    for (Index h = 0; h < heads; ++h)
      for (Index k = 0; k < half; ++k) {
        const double angle = double(r) * std::pow(10000.0, -2.0 * double(k) / double(D));
        const double x1 = x(r, h * D + k), x2 = x(r, h * D + k + half);
        x(r, h * D + k) = x1 * std::cos(angle) - x2 * std::sin(angle);
        x(r, h * D + k + half) = x2 * std::cos(angle) + x1 * std::sin(angle);
      }
}

// The last L rows of sequence history X [n, E] through the block, against a reference in double:
// projections, RoPE at positions 0..n-1, causal attention over the whole history under the block's
// window, softcap and ALiBi, and o_proj. Its tolerance: the projections' rounding ((E + 8) eps of
// their bound), what it moves a logit, the storage type's kv_storage_error_bound, through o_proj.
template <class T>
void check_decoder_rows(const attn::DecoderAttention<T>& blk, KVStorage storage, const Matrix<T>& X, Index L,
                        const Matrix<T>& out, const std::string& what) {
  const attn::DecoderAttentionOptions& opt = blk.options();
  const Index H = blk.num_heads(), Hkv = blk.num_kv_heads(), D = blk.head_dim(), E = blk.embed_dim();
  if (!tame(X)) return;
  for (const attn::Linear<T>* l : {&blk.q_proj(), &blk.k_proj(), &blk.v_proj(), &blk.o_proj()})
    if (!tame(l->weight()) || !tame(l->bias())) return;
  const MatD x = X.template cast<double>();
  MatD q = project(x, blk.q_proj()), k = project(x, blk.k_proj()), v = project(x, blk.v_proj());
  if (opt.rope) rope_rows(q, H, D), rope_rows(k, Hkv, D);
  RefOptions o;
  o.scale =
      opt.scale > 0 ? static_cast<double>(static_cast<T>(opt.scale)) : static_cast<double>(T(1) / std::sqrt(T(D)));
  o.causal = attn::Causal::BottomRight;
  o.window = opt.window;
  o.softcap = static_cast<double>(static_cast<T>(opt.softcap));
  if (opt.alibi) {
    const attn::Vector<T> s = attn::alibi_slopes<T>(H);
    for (Index h = 0; h < H; ++h) o.slopes.push_back(static_cast<double>(s[h]));
  }
  const Reference r = reference(MatD(q.bottomRows(L)), k, v, H, Hkv, D, D, o);
  const MatD want = project(r.out, blk.o_proj());

  const double rot = opt.rope ? 1.5 : 1.0;  // a rotation moves an element by at most sqrt(2) of the largest
  const double pq = rot * projection_bound(x, blk.q_proj()), pk = rot * projection_bound(x, blk.k_proj()),
               pv = projection_bound(x, blk.v_proj());
  const double eps = kEps<T>, ep = double(E + 8) * eps * std::max({pq, pk, pv, 1.0});
  const double dlogit = o.scale * double(D) * (pq + pk + ep) * ep + 8 * eps * r.cond;
  const double u = static_cast<double>(attn::storage_unit_roundoff<double>(storage));
  const double dstore = o.scale * double(D) * pq * u * pk;
  if (dlogit > 0.5 || dstore > 0.5) return;  // the bound says too little
  const double attn_err = std::expm1(2 * dlogit) * pv + ep +
                          attn::kv_storage_error_bound<double>(storage, o.scale * double(D) * pq, pk, pv);
  const MatD wo = blk.o_proj().weight().template cast<double>();
  const double wo_rows = wo.size() > 0 ? wo.cwiseAbs().rowwise().sum().maxCoeff() : 0.0;
  const double tol =
      (attn_err + double(H * D + 8) * eps * pv) * wo_rows * 1.01 + kFloor<T> * std::max(1.0, max_abs(want));
  for (Index i = 0; i < L; ++i)
    for (Index e = 0; e < E; ++e) {
      const double a = static_cast<double>(out(i, e)), w = want(i, e);
      if (!(std::abs(a - w) <= tol)) {
        char buf[200];
        std::snprintf(buf, sizeof buf, ": output (%ld, %ld) = %.9g, the reference %.9g (tolerance %.3g)", long(i),
                      long(e), a, w, tol);
        fail(what + buf);
      }
    }
}

// shape: bit 0 a second kv head, bits 1-2 query heads per kv head - 1, bit 3 RoPE, bits 4-5 the
// storage type, bit 6 q/k/v biases, bit 7 an o_proj bias; then embed_dim (1-8), head_dim (1-4,
// doubled with RoPE); opts: bit 0 a window (1-8), 1 softcap, 2 ALiBi, 3 a scale from the bytes, 4
// max_positions 1-32 (else 64), 5 a full KVCache (else make_cache: a ring under a window); batch
// (1-4), capacity (1-16; at least the window for a ring), the weights and biases, and up to 7
// steps. A step's first byte: bits 0-1 forward(x, cache, b), forward(x, cache), forward_varlen,
// with weights (bit 2: every sequence), its rows (0-4 per sequence).
template <class T>
void fuzz_decoder(Input& in) {
  const std::uint8_t shape = in.byte();
  const Index Hkv = 1 + (shape & 1), H = Hkv * (1 + ((shape >> 1) & 3) % 3);
  const bool rope = shape & 8;
  const KVStorage storage = static_cast<KVStorage>((shape >> 4) & 3);
  const Index E = 1 + in.dim(7), D = (rope ? 2 : 1) * (1 + in.dim(3));
  const std::uint8_t opts = in.byte();
  attn::DecoderAttentionOptions opt;
  opt.num_kv_heads = Hkv;
  opt.head_dim = D;
  opt.qkv_bias = shape & 64;
  opt.o_bias = shape & 128;
  if (!rope) opt.rope = std::nullopt;
  if (opts & 1) opt.window = 1 + in.dim(7);
  if (opts & 2) opt.softcap = double(1 + in.dim(31)) / 4;
  opt.alibi = opts & 4;
  if (opts & 8) opt.scale = static_cast<double>(in.value<T>());
  opt.max_positions = (opts & 16) ? 1 + in.dim(31) : 64;
  const Index B = 1 + in.dim(3);
  Index C = 1 + in.dim(15);
  const bool full = opts & 32;
  if (!full) C = std::max(C, opt.window);
  std::optional<attn::DecoderAttention<T>> made;
  if (!attempt("DecoderAttention", [&] { made.emplace(E, H, opt); })) return;
  attn::DecoderAttention<T>& blk = *made;
  blk.q_proj().set_weight(in.matrix<T>(H * D, E));
  blk.k_proj().set_weight(in.matrix<T>(Hkv * D, E));
  blk.v_proj().set_weight(in.matrix<T>(Hkv * D, E));
  blk.o_proj().set_weight(in.matrix<T>(E, H * D));
  if (opt.qkv_bias) {
    blk.q_proj().set_bias(in.vector<T>(H * D));
    blk.k_proj().set_bias(in.vector<T>(Hkv * D));
    blk.v_proj().set_bias(in.vector<T>(Hkv * D));
  }
  if (opt.o_bias) blk.o_proj().set_bias(in.vector<T>(E));
  attn::KVCache<T> cache = full ? attn::KVCache<T>(storage, B, Hkv, D, C) : blk.make_cache(B, C, storage);
  std::vector<Matrix<T>> hist(std::size_t(B), Matrix<T>(0, E));  // every row given to sequence b
  const Index steps = in.dim(7);
  for (Index step = 0; step < steps; ++step) {
    const std::uint8_t sb = in.byte();
    const int kind = sb & 3;
    const bool all = kind == 1 || (kind == 3 && (sb & 4));
    const Index b = (kind == 0 || kind == 3) && !all ? in.dim(int(B) - 1) : 0;
    std::vector<Index> Ls;
    if (kind == 2) {
      for (Index s = 0; s < B; ++s) Ls.push_back(in.dim(4));
    } else {
      const Index L = in.dim(4);
      for (Index s = 0; s < B; ++s) Ls.push_back(all || s == b ? L : 0);
    }
    const IndexVector cu = offsets(Ls);
    const Matrix<T> x = in.matrix<T>(cu[B], E);
    const KVSnapshot<T> before = snapshot(cache);
    Matrix<T> out;
    const bool ok = attempt("DecoderAttention::forward", [&] {
      if (kind == 0) out = blk.forward(x, cache, b);
      if (kind == 1) out = blk.forward(x, cache);
      if (kind == 2) out = blk.forward_varlen(x, cache, cu);
      if (kind == 3)
        out = all ? blk.forward_with_weights(x, cache).output : blk.forward_with_weights(x, cache, b).output;
    });
    if (!ok) {
      if (!(snapshot(cache) == before)) fail("a refused DecoderAttention::forward changed the cache");
      continue;
    }
    if (out.rows() != x.rows() || out.cols() != E) fail("DecoderAttention::forward: output of the wrong shape");
    // Rows of sequence s: [cu[s], cu[s+1]) for forward_varlen, [s*L, (s+1)*L) for every sequence.
    for (Index s = 0; s < B; ++s) {
      const Index L = Ls[std::size_t(s)];
      if (L == 0) continue;
      const Index row0 = kind == 2 ? cu[s] : all ? s * L : 0;
      append_rows(hist[std::size_t(s)], Matrix<T>(x.middleRows(row0, L)));
      if (cache.size(s) != hist[std::size_t(s)].rows())
        fail("DecoderAttention::forward: the cache's size is not the rows given");
      check_decoder_rows(blk, storage, hist[std::size_t(s)], L, Matrix<T>(out.middleRows(row0, L)),
                         "DecoderAttention, sequence " + std::to_string(s));
    }
  }
}

}  // namespace

// The first byte: bits 0-1 the surface (0 KVCache, 1 PagedKVCache, 2 packed, 3 DecoderAttention),
// bit 2 double (else float). With ATTN_FUZZ_VERBOSE set in the environment, says what became of
// each call (returned, or refused and why), to check that a seed does what it is meant to.
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Input in(data, size);
  const std::uint8_t head = in.byte();
  const bool dbl = head & 4;
  try {
    switch (head & 3) {
      case 0:
        dbl ? fuzz_kv_cache<double>(in) : fuzz_kv_cache<float>(in);
        break;
      case 1:
        dbl ? fuzz_paged<double>(in) : fuzz_paged<float>(in);
        break;
      case 2:
        dbl ? fuzz_packed<double>(in) : fuzz_packed<float>(in);
        break;
      default:
        dbl ? fuzz_decoder<double>(in) : fuzz_decoder<float>(in);
        break;
    }
    if (verbose()) std::fprintf(stderr, "serving_fuzz: done\n");
  } catch (const std::invalid_argument& e) {
    // Outside attempt(): only set-up calls this target expects to succeed (set_weight of the right
    // shape). attn's errors there still end the input quietly; anything else is a failure.
    if (!dynamic_cast<const attn::shape_error*>(&e) && !dynamic_cast<const attn::argument_error*>(&e))
      fail(std::string("std::invalid_argument that is not attn's: ") + e.what());
    if (verbose()) std::fprintf(stderr, "serving_fuzz: refused: %s\n", e.what());
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  return 0;
}
