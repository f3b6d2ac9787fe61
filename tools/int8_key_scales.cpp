// tools/int8_key_scales.cpp - per-position or per-channel scales for int8 keys: which loses less?
//
// attn's int8 cache quantizes each key row (one position of one kv head) with its own scale,
// max|row| / 127. KIVI (Liu et al. 2024) argues for one scale per channel instead, because real
// keys have outlier channels (a few features much larger than the rest, the same ones at every
// position): a per-position scale is set by the outlier, and the other channels of that row keep
// few steps. This program measures both on the same keys, through attn's reference attention in
// double: the error of one decoding step's output against the unquantized keys (values exact),
// as the median and the max over trials of max|out - exact| / max|v|.
//
//   g++ -std=c++17 -O2 -march=native -Iinclude -isystem /usr/include/eigen3 tools/int8_key_scales.cpp -o /tmp/k8
//   /tmp/k8
//
// Per channel here is the ideal: each channel's scale from its max over all S positions (KIVI
// groups positions and keeps the newest ones unquantized until their group fills). Keys:
// (a) Gaussian N(0, 1); (b) the same with 4 of 128 channels scaled by 10 (outlier channels);
// (c) (b) with a per-position magnitude spread (rows scaled by e^N(0, 0.5)). Queries N(0, 1).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "attn/detail/attention_reference.hpp"
#include "attn/detail/storage.hpp"

namespace {

using attn::Index;
using M = attn::Matrix<double>;

// One query against S keys: the output row, in double.
std::vector<double> attend(const std::vector<double>& q, const M& k, const M& v) {
  attn::detail::AttentionProblem<double> p;
  p.L = 1, p.S = p.mask_keys = k.rows(), p.d = k.cols(), p.dv = v.cols();
  p.q = {q.data(), 0, 0, p.d};
  p.k = {k.data(), 0, 0, p.d};
  p.v = {v.data(), 0, 0, p.dv};
  std::vector<double> out(static_cast<std::size_t>(p.dv));
  p.out = {out.data(), 0, 0, p.dv};
  p.scale = 1.0 / std::sqrt(double(p.d));
  attn::detail::attention_reference(p);
  return out;
}

// Row-wise int8 (attn's scheme): each row quantized with its own scale.
M per_position(const M& k) {
  M out(k.rows(), k.cols());
  std::vector<std::int8_t> q(static_cast<std::size_t>(k.cols()));
  for (Index r = 0; r < k.rows(); ++r) {
    const double s = attn::detail::quantize_row(k.row(r).data(), k.cols(), q.data());
    for (Index c = 0; c < k.cols(); ++c) out(r, c) = s * q[std::size_t(c)];
  }
  return out;
}

// Column-wise int8: each channel quantized with its own scale over all positions.
M per_channel(const M& k) {
  const M t = k.transpose();
  return per_position(t).transpose();
}

}  // namespace

int main() {
  const Index S = 2048, D = 128, trials = 40;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> n01(0.0, 1.0), spread(0.0, 0.5);
  std::printf("int8 keys, S = %lld, D = %lld, %lld trials: max|out - exact| / max|v| (median, max)\n", (long long)S,
              (long long)D, (long long)trials);
  const char* names[] = {"(a) Gaussian keys", "(b) 4 outlier channels x10", "(c) outliers + row magnitudes"};
  for (int kind = 0; kind < 3; ++kind) {
    std::vector<double> e_pos, e_ch;
    for (Index t = 0; t < trials; ++t) {
      M k(S, D), v(S, D);
      for (Index r = 0; r < S; ++r) {
        const double row_scale = kind == 2 ? std::exp(spread(rng)) : 1.0;
        for (Index c = 0; c < D; ++c) k(r, c) = n01(rng) * row_scale * (kind >= 1 && c % 32 == 5 ? 10.0 : 1.0);
      }
      for (Index i = 0; i < v.size(); ++i) v.data()[i] = n01(rng);
      std::vector<double> q(static_cast<std::size_t>(D));
      for (double& x : q) x = n01(rng);
      const std::vector<double> exact = attend(q, k, v), a = attend(q, per_position(k), v),
                                b = attend(q, per_channel(k), v);
      const double vmax = v.cwiseAbs().maxCoeff();
      double ea = 0, eb = 0;
      for (std::size_t c = 0; c < exact.size(); ++c)
        ea = std::max(ea, std::abs(a[c] - exact[c])), eb = std::max(eb, std::abs(b[c] - exact[c]));
      e_pos.push_back(ea / vmax);
      e_ch.push_back(eb / vmax);
    }
    const auto median = [](std::vector<double> x) {
      std::sort(x.begin(), x.end());
      return x[x.size() / 2];
    };
    std::printf("  %-32s per position %.2e, %.2e   per channel %.2e, %.2e\n", names[kind], median(e_pos),
                *std::max_element(e_pos.begin(), e_pos.end()), median(e_ch), *std::max_element(e_ch.begin(), e_ch.end()));
  }
  return 0;
}
