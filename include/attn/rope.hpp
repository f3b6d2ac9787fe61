// attn/rope.hpp - rotary position embeddings (RoPE), applied in place to the query and key rows.
//
//   attn::RopeCache<float> rope(/*head_dim=*/128, /*max_positions=*/4096, {/*rotary_dim=*/0, 10000.0,
//                               attn::RopeStyle::NeoX});  // Llama; GPTJ for interleaved pairs
//   rope.apply(q, /*heads=*/32, /*batch=*/B, /*start=*/past);  // q: [B*L, 32*128]; row l of each
//   rope.apply(k, /*heads=*/8, B, past);                       //   sequence at position past + l
//   rope.apply(k, 8, B, starts);  // starts [B]: sequence b's rows from starts[b] (a ragged cache)
//
// For k = 0 .. R/2 - 1 (R = rotary_dim) the frequency is theta_k = base^(-2k / R) (changed by a
// RopeScaling, below, for Llama 3 and linear interpolation), and position m
// rotates one pair of each head's first R features by the angle m * theta_k:
//   (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
// NeoX ("rotate half": GPT-NeoX, Llama, HF's rotate_half) pairs feature k with k + R/2;
// GPTJ (interleaved: GPT-J, "rotate_every_two", the original RoFormer) pairs 2k with 2k + 1.
// Features [R, head_dim) pass unchanged (partial rotary: GPT-NeoX, Phi).
//
// Why the rows are rotated once here and not inside the attention kernel: the rotation of a row
// depends only on the row and its own position, so rotating Q and K once costs O((L + S) * d). In
// the kernel every key block is read by every query block, so each K row would be rotated again
// for each of them (L / Br times). It is also how llama.cpp and HF keep a KV cache: the cache
// stores rotated keys, and a decoding step rotates only its new rows, at their absolute positions
// (start = the number of cached tokens). Scores still see only relative positions: q_m . k_n
// depends on m - n alone.
#pragma once

#include <cmath>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/types.hpp"

namespace attn {

enum class RopeStyle {
  NeoX,  // rotate half: feature k with k + R/2 (GPT-NeoX, Llama, Mistral, HF rotate_half)
  GPTJ,  // interleaved: feature 2k with 2k + 1 (GPT-J, RoFormer, rotate_every_two)
};

// How a checkpoint's rope_scaling changes the frequencies theta_k, for contexts longer than the
// model was trained on (Hugging Face's modeling_rope_utils.py, rope_type "linear" and "llama3"):
//   Linear (position interpolation, Chen et al. 2023):  theta_k / factor
//   Llama3, by the wavelength lambda_k = 2 pi / theta_k and L0 = original_max_positions:
//     lambda_k < L0 / high_freq_factor   theta_k                 (high frequencies unchanged)
//     lambda_k > L0 / low_freq_factor    theta_k / factor        (low frequencies interpolated)
//     otherwise                          (1 - s) theta_k / factor + s theta_k,
//                                        s = (L0 / lambda_k - low_freq_factor) / (high_freq_factor - low_freq_factor)
enum class RopeScalingType { None, Linear, Llama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::None;
  double factor = 1.0;                  // Linear, Llama3
  double low_freq_factor = 1.0;         // Llama3
  double high_freq_factor = 4.0;        // Llama3
  double original_max_positions = 8192;  // Llama3: original_max_position_embeddings
};

struct Rope {
  Index rotary_dim = 0;  // R: the rotated features of each head, even; 0 = all of head_dim
  double base = 10000.0;
  RopeStyle style = RopeStyle::NeoX;
  RopeScaling scaling = {};
};

// theta_k = base^(-2k / R) for k = 0 .. R/2 - 1, then rope.scaling applied (above); in double.
// R must be even and positive (RopeCache checks the rest).
inline std::vector<double> rope_frequencies(const Rope& rope, Index R) {
  const char* where = "attn::rope_frequencies";
  const RopeScaling& sc = rope.scaling;
  detail::require_arg(std::isfinite(rope.base) && rope.base > 0, where, "base must be finite and positive, got ",
                      rope.base);
  detail::require_arg(sc.type == RopeScalingType::None || (std::isfinite(sc.factor) && sc.factor > 0), where,
                      "scaling.factor must be finite and positive, got ", sc.factor);
  detail::require_arg(sc.type != RopeScalingType::Llama3 ||
                          (sc.low_freq_factor > 0 && sc.high_freq_factor > sc.low_freq_factor &&
                           std::isfinite(sc.high_freq_factor) && sc.original_max_positions > 0 &&
                           std::isfinite(sc.original_max_positions)),
                      where, "llama3 scaling needs 0 < low_freq_factor < high_freq_factor and original_max_positions > 0, got ",
                      sc.low_freq_factor, ", ", sc.high_freq_factor, ", ", sc.original_max_positions);
  std::vector<double> theta(static_cast<std::size_t>(R / 2));
  const double two_pi = 6.283185307179586476925;
  for (Index k = 0; k < R / 2; ++k) {
    double t = std::pow(rope.base, -2.0 * double(k) / double(R));
    if (sc.type == RopeScalingType::Linear) {
      t /= sc.factor;
    } else if (sc.type == RopeScalingType::Llama3) {
      const double wavelength = two_pi / t, L0 = sc.original_max_positions;
      if (wavelength > L0 / sc.low_freq_factor) {
        t /= sc.factor;
      } else if (!(wavelength < L0 / sc.high_freq_factor)) {
        const double s = (L0 / wavelength - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor);
        t = (1 - s) * t / sc.factor + s * t;
      }
    }
    theta[std::size_t(k)] = t;
  }
  return theta;
}

namespace detail {

// cos and sin of m * theta_k: [max_positions, R/2] each.
template <class T>
struct RopeTables {
  Matrix<T> cos, sin;
};

// The tables for these frequencies and positions, computed in double and rounded to T; shared by
// every RopeCache built with the same ones while any of them lives. A model's layers all ask for
// the same table, and Llama 3's (131072 positions of 64 frequencies) is 64 MiB in float: once,
// not once per layer.
template <class T>
std::shared_ptr<const RopeTables<T>> rope_tables(Index max_positions, const std::vector<double>& thetas) {
  static std::mutex mutex;
  static std::map<std::pair<Index, std::vector<double>>, std::weak_ptr<const RopeTables<T>>> built;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(max_positions, thetas);
  if (auto shared = built[key].lock()) return shared;
  for (auto it = built.begin(); it != built.end();) it = it->second.expired() ? built.erase(it) : std::next(it);
  auto t = std::make_shared<RopeTables<T>>();
  const Index half = static_cast<Index>(thetas.size());
  t->cos.resize(max_positions, half);
  t->sin.resize(max_positions, half);
  for (Index k = 0; k < half; ++k)
    for (Index m = 0; m < max_positions; ++m) {
      t->cos(m, k) = static_cast<T>(std::cos(double(m) * thetas[std::size_t(k)]));
      t->sin(m, k) = static_cast<T>(std::sin(double(m) * thetas[std::size_t(k)]));
    }
  built[key] = t;
  return t;
}

}  // namespace detail

// The cos and sin tables for positions [0, max_positions), computed once (in double, then
// rounded to T) and shared with every other RopeCache of the same frequencies and positions
// (detail::rope_tables); apply() allocates nothing.
template <class T>
class RopeCache {
  ATTN_CHECK_SCALAR(T);

 public:
  RopeCache(Index head_dim, Index max_positions, const Rope& rope = {})
      : D_(head_dim), R_(rope.rotary_dim ? rope.rotary_dim : head_dim), style_(rope.style) {
    const char* where = "attn::RopeCache";
    detail::require_shape(head_dim > 0 && max_positions > 0, where, "head_dim = ", head_dim,
                          " and max_positions = ", max_positions, " must be positive");
    // The rotation turns pairs of features: the rotated width must be even. Name what the caller set.
    if (rope.rotary_dim == 0)
      detail::require_arg(head_dim % 2 == 0, where, "head_dim = ", head_dim,
                          " is odd: RoPE rotates pairs of features (set Rope::rotary_dim to an even width "
                          "< head_dim to rotate only part of each head)");
    detail::require_arg(R_ > 0 && R_ % 2 == 0 && R_ <= head_dim, where, "rotary_dim = ", rope.rotary_dim,
                        " must be even, positive and at most head_dim = ", head_dim, " (0: all of it)");
    detail::checked_mul(where, "max_positions * rotary_dim / 2", max_positions, R_ / 2);
    tables_ = detail::rope_tables<T>(max_positions, rope_frequencies(rope, R_));
  }

  // x: [B*L, heads*head_dim], B = batch sequences of L rows, in place; row l of every sequence is
  // at absolute position start + l. The batch is always given (1 for one sequence): rotating a
  // batch as one long sequence would put sequence b's rows at b*L + l.
  void apply(MatrixRef<T> x, Index heads, Index batch, Index start) const {
    const char* where = "attn::RopeCache::apply";
    const Index L = check(x, heads, batch, where);
    check_range(start, L, where, "start = ", start);
    for (Index r = 0; r < x.rows(); ++r) rotate_row(x.row(r).data(), heads, start + r % L);
  }

  // x: [B*L, heads*head_dim], in place; starts: [B], row l of sequence b at position starts[b] + l
  // (a batch whose sequences hold different numbers of cached positions).
  void apply(MatrixRef<T> x, Index heads, Index batch, const Eigen::Ref<const IndexVector>& starts) const {
    const char* where = "attn::RopeCache::apply";
    const Index L = check(x, heads, batch, where);
    detail::require_len(where, "starts", starts.size(), batch, "[batch] = [", batch, "]");
    for (Index b = 0; b < batch; ++b) check_range(starts[b], L, where, "starts[", b, "] = ", starts[b]);
    for (Index r = 0; r < x.rows(); ++r) rotate_row(x.row(r).data(), heads, starts[r / L] + r % L);
  }

  // x: [rows, heads*head_dim], in place; positions: [rows], row r at position positions[r].
  void apply(MatrixRef<T> x, Index heads, const Eigen::Ref<const IndexVector>& positions) const {
    const char* where = "attn::RopeCache::apply";
    check(x, heads, 1, where);
    detail::require_len(where, "positions", positions.size(), x.rows(), "[rows] = [", x.rows(), "]");
    for (Index r = 0; r < x.rows(); ++r)
      detail::require_arg(positions[r] >= 0 && positions[r] < max_positions(), where, "positions[", r, "] = ",
                          positions[r], " is outside the table's [0, ", max_positions(), ")");
    for (Index r = 0; r < x.rows(); ++r) rotate_row(x.row(r).data(), heads, positions[r]);
  }

  Index head_dim() const { return D_; }
  Index rotary_dim() const { return R_; }
  Index max_positions() const { return tables_->cos.rows(); }
  RopeStyle style() const { return style_; }

 private:
  // Checks x [B*L, heads*head_dim] and returns L.
  Index check(const MatrixRef<T>& x, Index heads, Index batch, const char* where) const {
    // x.cols() / D_ == heads, not x.cols() == heads * D_: a huge heads must not wrap around.
    detail::require_shape(heads > 0 && x.cols() % D_ == 0 && x.cols() / D_ == heads, where, "x has shape ",
                          detail::shape(x.rows(), x.cols()),
                          ", expected [rows, heads*head_dim] = [rows, ", heads, "*", D_, "]");
    detail::require_shape(batch > 0 && x.rows() % batch == 0, where, "x has shape ",
                          detail::shape(x.rows(), x.cols()), ", expected [B*L, heads*head_dim] with B = batch = ",
                          batch);
    return x.rows() / batch;
  }

  // Positions [first, first + n) must lie in the table; `what...` names first in the message.
  template <class... What>
  void check_range(Index first, Index n, const char* where, const What&... what) const {
    // first before first + n, so that the sum cannot wrap around for a huge first.
    detail::require_arg(first >= 0 && first <= max_positions() && n <= max_positions() - first, where, what...,
                        " with ", n, " rows per sequence reaches outside the table's positions [0, ",
                        max_positions(), ") (max_positions)");
  }

  void rotate_row(T* row, Index heads, Index m) const {
    const T* c = tables_->cos.row(m).data();
    const T* s = tables_->sin.row(m).data();
    const Index half = R_ / 2;
    for (Index h = 0; h < heads; ++h) {
      T* x = row + h * D_;
      // NeoX pairs (k, k + R/2); GPTJ pairs (2k, 2k + 1).
      const Index stride = style_ == RopeStyle::NeoX ? 1 : 2, offset = style_ == RopeStyle::NeoX ? half : 1;
      for (Index k = 0; k < half; ++k) {
        T& x1 = x[k * stride];
        T& x2 = x[k * stride + offset];
        const T a = x1, b = x2;
        x1 = a * c[k] - b * s[k];
        x2 = b * c[k] + a * s[k];
      }
    }
  }

  Index D_, R_;
  RopeStyle style_;
  std::shared_ptr<const detail::RopeTables<T>> tables_;  // immutable, shared
};

// The same, as a free function: x [B*L, heads*head_dim] rotated in place, row l of each of the
// batch sequences at start + l.
template <class T>
void apply_rope(MatrixRef<T> x, Index heads, Index batch, Index start, const RopeCache<T>& cache) {
  cache.apply(x, heads, batch, start);
}

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(RopeCache);
