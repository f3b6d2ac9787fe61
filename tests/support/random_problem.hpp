// tests/support/random_problem.hpp - random attention problems for the differential tests:
// buffers owned here, described by the strided views the kernels take, with a printable
// description and a seed that replays them (ATTN_TEST_SEED=<seed>).
#pragma once

#include <attn/detail/attention_problem.hpp>
#include <attn/mask.hpp>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace attn_test {

using attn::Index;
using attn::detail::AttentionProblem;

// One random problem: buffers owned here, described by the strided views the kernels take.
template <class T>
struct RandomProblem {
  std::vector<T> q, k, v, bias, slopes, sinks;
  std::vector<char> mask_store, pad_store;  // bool buffers (vector<bool> is not addressable)
  AttentionProblem<T> p;
  std::string description;

  explicit RandomProblem(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto pick = [&](Index lo, Index hi) { return std::uniform_int_distribution<Index>(lo, hi)(rng); };
    auto coin = [&](double prob) { return std::bernoulli_distribution(prob)(rng); };
    // Sizes: mostly small, sometimes past one 64-row block, with primes and 1 along the way.
    auto size = [&] { return coin(0.3) ? pick(1, 3) : coin(0.6) ? pick(4, 40) : pick(41, 140); };
    p.batch = pick(1, 3);
    // Grouped-query attention: heads = kv_heads * group, group 1 (plain MHA, kv_heads 0 or H), 2 or
    // 4; kv_heads = 1 is multi-query.
    const Index group = coin(0.5) ? 1 : coin(0.5) ? 2 : 4;
    const Index kv_heads = group == 4 ? pick(1, 2) : pick(1, 3);
    p.heads = kv_heads * group;
    p.kv_heads = group == 1 && coin(0.5) ? 0 : kv_heads;
    p.L = size();
    p.S = size();
    // Head dims: mostly small; sometimes past the micro-kernels' register tiles (4 packets of
    // values, 16-wide transposes of keys) and their edges.
    auto dim = [&] { return coin(0.7) ? pick(1, 33) : coin(0.5) ? pick(34, 140) : 16 * pick(1, 8); };
    p.d = dim();
    p.dv = coin(0.5) ? p.d : dim();
    p.mask_keys = coin(0.8) ? p.S : std::max<Index>(Index(0), p.S - pick(1, 2));  // MHA's extra keys
    p.scale = coin(0.2) ? T(0) : T(std::uniform_real_distribution<double>(0.05, 2.0)(rng));

    std::normal_distribution<double> normal(0.0, 1.0);
    // Heads interleaved in one row (MHA's [B*L, H*D] projections) or stacked (a [B, H, L, D]
    // tensor), with padding at the end of each row so row strides exceed the width.
    const bool interleaved = coin(0.5);
    auto fill = [&](std::vector<T>& buf, attn::detail::Strided<const T>& view, Index heads, Index rows, Index cols) {
      const Index pad = pick(0, 3);
      if (interleaved) {
        view.row_stride = heads * cols + pad;
        view.head_stride = cols;
        view.batch_stride = rows * view.row_stride;
      } else {
        view.row_stride = cols + pad;
        view.head_stride = rows * view.row_stride;
        view.batch_stride = heads * view.head_stride;
      }
      buf.assign(static_cast<std::size_t>(p.batch * view.batch_stride), T(0));
      for (auto& x : buf) x = T(normal(rng));
      view.data = buf.data();
    };
    fill(q, p.q, p.heads, p.L, p.d);
    fill(k, p.k, kv_heads, p.S, p.d);
    fill(v, p.v, kv_heads, p.S, p.dv);

    const Index mk = p.mask_keys;
    const int causal = int(pick(0, 2));
    p.causal = causal == 0 ? attn::Causal::None : causal == 1 ? attn::Causal::TopLeft : attn::Causal::BottomRight;
    const int mask_kind = int(pick(0, 2));  // none, shared [L, S], per head [B*H*L, S]
    if (mask_kind && mk > 0) {
      const Index rows = mask_kind == 1 ? p.L : p.batch * p.heads * p.L;
      mask_store.resize(static_cast<std::size_t>(rows * mk));
      for (auto& x : mask_store) x = coin(0.8);
      p.mask_attends = coin(0.5);
      if (!p.mask_attends)
        for (auto& x : mask_store) x = !x;
      p.mask = {reinterpret_cast<const bool*>(mask_store.data()), mask_kind == 1 ? 0 : p.heads * p.L * mk,
                mask_kind == 1 ? 0 : p.L * mk, mk};
    }
    const int bias_kind = int(pick(0, 2));
    if (bias_kind && mk > 0) {
      const Index rows = bias_kind == 1 ? p.L : p.batch * p.heads * p.L;
      bias.resize(static_cast<std::size_t>(rows * mk));
      for (auto& x : bias) x = coin(0.1) ? -std::numeric_limits<T>::infinity() : T(normal(rng));
      p.bias = {bias.data(), bias_kind == 1 ? 0 : p.heads * p.L * mk, bias_kind == 1 ? 0 : p.L * mk, mk};
    }
    if (coin(0.4) && mk > 0) {
      pad_store.resize(static_cast<std::size_t>(p.batch * mk));
      for (Index b = 0; b < p.batch; ++b) {  // padding at the end of each sequence, sometimes all of it
        const Index len = pick(0, mk);
        for (Index j = 0; j < mk; ++j) pad_store[std::size_t(b * mk + j)] = j >= len;
      }
      p.key_padding = {reinterpret_cast<const bool*>(pad_store.data()), mk, 0, 0};
      p.key_padding_attends = false;
    }
    // Score options: soft-capping, ALiBi (BLOOM's slopes or random ones), a sliding window.
    if (coin(0.25)) p.softcap = T(std::uniform_real_distribution<double>(0.5, 5.0)(rng));
    if (coin(0.25)) {
      const bool standard = coin(0.5);
      const attn::Vector<T> bloom = attn::alibi_slopes<T>(p.heads);
      for (Index h = 0; h < p.heads; ++h)
        slopes.push_back(standard ? bloom[h] : T(std::uniform_real_distribution<double>(0.0, 1.0)(rng)));
      p.alibi_slopes = slopes.data();
    }
    if (coin(0.3)) p.window = pick(1, std::max<Index>(p.S, 1) + 2);
    // Attention sinks: a logit per head in the denominator (gpt-oss), sink tokens kept through the
    // window (StreamingLLM).
    if (coin(0.25)) {
      for (Index h = 0; h < p.heads; ++h) sinks.push_back(T(2.0 * normal(rng)));
      p.sinks = sinks.data();
    }
    if (p.window > 0 && coin(0.4)) p.sink_tokens = pick(1, 4);
    std::ostringstream s;
    s << "seed=" << seed << " B=" << p.batch << " H=" << p.heads << " H_kv=" << p.kv_heads << " L=" << p.L << " S=" << p.S << " d=" << p.d
      << " dv=" << p.dv << " mask_keys=" << mk << " scale=" << p.scale << " causal=" << causal << " mask=" << mask_kind
      << " bias=" << bias_kind << " padding=" << bool(p.key_padding) << " softcap=" << p.softcap << " alibi=" << bool(p.alibi_slopes)
      << " window=" << p.window << " sinks=" << bool(p.sinks) << " sink_tokens=" << p.sink_tokens << (interleaved ? " interleaved" : " stacked");
    description = s.str();
  }
};

// The same problem in double: same strides over converted copies of the buffers.
template <class T>
struct AsDouble {
  std::vector<double> q, k, v, bias, slopes, sinks;
  AttentionProblem<double> p;
  explicit AsDouble(const RandomProblem<T>& r) : q(r.q.begin(), r.q.end()), k(r.k.begin(), r.k.end()), v(r.v.begin(), r.v.end()),
                                                 bias(r.bias.begin(), r.bias.end()), slopes(r.slopes.begin(), r.slopes.end()),
                                                 sinks(r.sinks.begin(), r.sinks.end()) {
    const auto& s = r.p;
    p.batch = s.batch, p.heads = s.heads, p.L = s.L, p.S = s.S, p.d = s.d, p.dv = s.dv, p.mask_keys = s.mask_keys;
    p.scale = double(s.scale);
    p.causal = s.causal;
    p.kv_heads = s.kv_heads;
    p.softcap = double(s.softcap);
    p.window = s.window;
    if (s.alibi_slopes) p.alibi_slopes = slopes.data();
    if (s.sinks) p.sinks = sinks.data();
    p.sink_tokens = s.sink_tokens;
    p.q = {q.data(), s.q.batch_stride, s.q.head_stride, s.q.row_stride};
    p.k = {k.data(), s.k.batch_stride, s.k.head_stride, s.k.row_stride};
    p.v = {v.data(), s.v.batch_stride, s.v.head_stride, s.v.row_stride};
    p.mask = s.mask;
    p.mask_attends = s.mask_attends;
    if (s.bias) p.bias = {bias.data(), s.bias.batch_stride, s.bias.head_stride, s.bias.row_stride};
    p.key_padding = s.key_padding;
    p.key_padding_attends = s.key_padding_attends;
  }
};

// Output [B*H*L, dv], packed, attached to the problem; weights [B*H*L, S] and the log-sum-exp
// [B*H, L] too when given.
template <class T>
struct NonDeduced {
  using type = T;
};
template <class P, class T>
void attach_outputs(P& p, attn::Matrix<T>& out, typename NonDeduced<attn::Matrix<T>>::type* weights = nullptr,
                    typename NonDeduced<attn::Matrix<T>>::type* lse = nullptr) {
  out.setConstant(p.batch * p.heads * p.L, p.dv, T(12345));  // any value left unwritten shows
  p.out = {out.data(), p.heads * p.L * p.dv, p.L * p.dv, p.dv};
  p.weights = {};
  if (weights) {
    weights->setConstant(p.batch * p.heads * p.L, p.S, T(12345));
    p.weights = {weights->data(), p.heads * p.L * p.S, p.L * p.S, p.S};
  }
  p.lse = {};
  if (lse) {
    lse->setConstant(p.batch * p.heads, p.L, T(12345));
    p.lse = {lse->data(), p.heads * p.L, p.L, 1};
  }
}

inline std::uint64_t base_seed() {
  const char* env = std::getenv("ATTN_TEST_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 20261125;
}
// Random cases per test: 300 in optimized builds; 100 unoptimized (the Debug ASan+UBSan build,
// where they are for memory errors on every path, which a third of the cases still reach, and the
// full count took 2 of its 4.5 minutes of tests); 1 when ATTN_TEST_SEED replays one.
inline int cases() {
#if defined(__OPTIMIZE__)
  constexpr int kCases = 300;
#else
  constexpr int kCases = 100;
#endif
  return std::getenv("ATTN_TEST_SEED") ? 1 : kCases;
}

}  // namespace attn_test
