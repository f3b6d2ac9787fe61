// attn/generate.hpp - text generation from a CausalLM over its KV caches: greedy or sampled
// (temperature, top-k, top-p), one prompt or a batch of prompts of different lengths, stop tokens,
// and a callback per token for streaming. Token ids in, token ids out: tokenization is the
// tokenizer library's (the README pairs attn with one).
//
//   attn::GenerationOptions opt;  opt.max_new_tokens = 64;  opt.stop_tokens = {2};   // </s>
//   opt.do_sample = true;  opt.temperature = 0.7;  opt.top_p = 0.9;  opt.seed = 42;
//   std::vector<int> out = attn::generate(lm, prompt_ids, opt, [](attn::Index, int id) {
//     std::cout << detokenize(id) << std::flush;  return true;                     // false stops
//   });
//
// Each prompt goes through the model in one call (prefill); then every step appends one token per
// unfinished sequence. A batch whose sequences hold the same number of tokens runs as one call;
// otherwise each sequence runs alone (issue 16 brings ragged batches to one call).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "attn/causal_lm.hpp"
#include "attn/detail/check.hpp"
#include "attn/init.hpp"
#include "attn/kv_storage.hpp"
#include "attn/types.hpp"

namespace attn {

struct GenerationOptions {
  Index max_new_tokens = 32;     // tokens generated per sequence, at most
  std::vector<int> stop_tokens;  // a sequence ends after generating one of these (it is kept in the output)
  bool do_sample = false;        // false: greedy, the most likely token (the lowest id among equals)
  double temperature = 1.0;      // sampling: softmax(logits / temperature)
  Index top_k = 0;               // sampling: the k most likely tokens only (ties at the k-th kept); 0: all
  double top_p = 1.0;            // sampling: the fewest most likely tokens whose probability reaches top_p
  std::uint64_t seed = 0;        // sampling: sequence b of a batch draws from Generator(seed + b)
  KVStorage cache_storage = KVStorage::Native;  // the KV caches' element type (attn/kv_storage.hpp)
};

// Called with (sequence index in the batch, token id) as soon as a token is chosen; returning false
// ends that sequence (the token is kept).
using TokenCallback = std::function<bool(Index, int)>;

namespace detail {

inline void check_generation_options(const GenerationOptions& o, const char* where) {
  require_arg(o.max_new_tokens >= 0, where, "max_new_tokens must be >= 0, got ", o.max_new_tokens);
  if (!o.do_sample) return;
  require_arg(std::isfinite(o.temperature) && o.temperature > 0, where,
              "temperature must be finite and > 0 when sampling, got ", o.temperature,
              " (do_sample = false is greedy)");
  require_arg(o.top_k >= 0, where, "top_k must be >= 0 (0: no limit), got ", o.top_k);
  require_arg(o.top_p > 0 && o.top_p <= 1, where, "top_p must be in (0, 1], got ", o.top_p);
}

}  // namespace detail

// The distribution sampling draws the next token from, given the logits [vocab] of the last
// position, in Hugging Face's order of warpers: p = softmax(logits / temperature); then only the
// top_k most likely tokens are kept (every token whose logit equals the k-th largest too); then
// only the fewest most likely tokens whose probabilities, summed, reach top_p (a token is kept when
// the mass of the tokens more likely than it is below top_p); renormalized. In double. Logits must
// be finite or -inf (a token never drawn), not all -inf.
template <class T>
std::vector<double> sampling_distribution(const ConstVectorRef<T>& logits, const GenerationOptions& o) {
  const char* where = "attn::sampling_distribution";
  GenerationOptions checked = o;
  checked.do_sample = true;
  detail::check_generation_options(checked, where);
  const Index V = logits.size();
  detail::require_arg(V > 0, where, "logits is empty");
  std::vector<double> p(static_cast<std::size_t>(V));
  double m = -std::numeric_limits<double>::infinity();
  for (Index i = 0; i < V; ++i) {
    detail::require_arg(std::isfinite(static_cast<double>(logits[i])) || logits[i] < T(0), where, "logits[", i,
                        "] is ", logits[i], ": logits must be finite or -inf");
    p[std::size_t(i)] = static_cast<double>(logits[i]) / o.temperature;
    m = std::max(m, p[std::size_t(i)]);
  }
  detail::require_arg(m > -std::numeric_limits<double>::infinity(), where, "every logit is -inf");
  // Most likely first; among equals the lower id first, so the order (and a draw) is reproducible.
  std::vector<Index> order(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return p[std::size_t(a)] > p[std::size_t(b)]; });
  Index keep = V;
  if (o.top_k > 0 && o.top_k < V) {
    const double kth = p[std::size_t(order[std::size_t(o.top_k - 1)])];
    keep = o.top_k;
    while (keep < V && p[std::size_t(order[std::size_t(keep)])] == kth) ++keep;
  }
  double sum = 0;
  for (Index i = 0; i < V; ++i) p[std::size_t(i)] = std::exp(p[std::size_t(i)] - m);
  for (Index r = 0; r < keep; ++r) sum += p[std::size_t(order[std::size_t(r)])];
  if (o.top_p < 1) {
    double before = 0;
    Index r = 0;
    for (; r < keep; ++r) {
      if (before / sum >= o.top_p) break;  // the tokens before r already reach top_p
      before += p[std::size_t(order[std::size_t(r)])];
    }
    keep = std::max<Index>(r, 1);
    sum = before;
  }
  std::vector<double> out(static_cast<std::size_t>(V), 0.0);
  for (Index r = 0; r < keep; ++r) {
    const std::size_t i = std::size_t(order[std::size_t(r)]);
    out[i] = p[i] / sum;
  }
  return out;
}

// The next token from the logits [vocab] of the last position: the argmax (greedy; a NaN logit is
// an argument_error), or a draw from sampling_distribution with one uniform number of gen (the
// first token whose cumulative probability, in id order, exceeds it).
template <class T>
int next_token(const ConstVectorRef<T>& logits, const GenerationOptions& o, Generator& gen) {
  if (!o.do_sample) {
    detail::require_arg(logits.size() > 0, "attn::next_token", "logits is empty");
    Index best = 0;
    for (Index i = 0; i < logits.size(); ++i) {
      detail::require_arg(!std::isnan(logits[i]), "attn::next_token", "logits[", i, "] is NaN");
      if (logits[i] > logits[best]) best = i;
    }
    return static_cast<int>(best);
  }
  const std::vector<double> p = sampling_distribution<T>(logits, o);
  const double u = gen.uniform();
  double c = 0;
  int last = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0) continue;
    last = static_cast<int>(i);
    c += p[i];
    if (u < c) return last;
  }
  return last;  // u within rounding of 1
}

// Generates up to max_new_tokens after each prompt (token ids; none empty) and returns the new
// tokens of each, stop token included. The caches hold the longest prompt plus max_new_tokens - 1
// positions, which must fit the model's max_positions().
template <class T>
std::vector<std::vector<int>> generate(const CausalLM<T>& model, const std::vector<std::vector<int>>& prompts,
                                       const GenerationOptions& options = {}, const TokenCallback& on_token = {}) {
  const char* where = "attn::generate";
  detail::check_generation_options(options, where);
  const Index B = static_cast<Index>(prompts.size());
  std::vector<std::vector<int>> out(prompts.size());
  if (B == 0) return out;
  Index longest = 0;
  for (Index b = 0; b < B; ++b) {
    const auto& p = prompts[std::size_t(b)];
    detail::require_arg(!p.empty(), where, "prompts[", b, "] is empty");
    for (std::size_t i = 0; i < p.size(); ++i)
      detail::require_arg(p[i] >= 0 && p[i] < model.vocab_size(), where, "prompts[", b, "][", i, "] = ", p[i],
                          " is outside the vocabulary [0, ", model.vocab_size(), ")");
    longest = std::max(longest, static_cast<Index>(p.size()));
  }
  if (options.max_new_tokens == 0) return out;
  // The last new token is never fed back: the caches hold the prompt and max_new_tokens - 1 more.
  const Index capacity = longest + options.max_new_tokens - 1;
  detail::require_arg(capacity <= model.max_positions(), where, "the longest prompt (", longest, " tokens) and ",
                      options.max_new_tokens, " new tokens need ", capacity,
                      " positions (the last new token is not fed back), beyond the model's max_positions = ",
                      model.max_positions());

  typename CausalLM<T>::Cache cache = model.make_cache(B, capacity, options.cache_storage);
  std::vector<Generator> gens;
  for (Index b = 0; b < B; ++b) gens.emplace_back(options.seed + std::uint64_t(b));
  // The prompts, of any lengths, in one ragged call; then each step one call over the sequences
  // still generating (CausalLM::forward_varlen), each at its own length.
  IndexVector cu(B + 1);
  cu[0] = 0;
  std::vector<int> ids;
  for (Index b = 0; b < B; ++b) {
    const auto& p = prompts[std::size_t(b)];
    ids.insert(ids.end(), p.begin(), p.end());
    cu[b + 1] = cu[b] + static_cast<Index>(p.size());
  }
  Matrix<T> logits = model.forward_varlen(ids, cu, cache, LogitRows::Last);  // [B, vocab]

  std::vector<char> active(std::size_t(B), 1);
  std::vector<int> next(static_cast<std::size_t>(B));
  for (Index step = 0; step < options.max_new_tokens; ++step) {
    bool any = false;
    for (Index b = 0; b < B; ++b) {
      if (!active[std::size_t(b)]) continue;
      const int t = next_token<T>(logits.row(b).transpose(), options, gens[std::size_t(b)]);
      out[std::size_t(b)].push_back(t);
      next[std::size_t(b)] = t;
      bool go = step + 1 < options.max_new_tokens;
      if (std::find(options.stop_tokens.begin(), options.stop_tokens.end(), t) != options.stop_tokens.end()) go = false;
      if (on_token && !on_token(b, t)) go = false;
      active[std::size_t(b)] = go ? 1 : 0;
      any = any || go;
    }
    if (!any) break;
    ids.clear();
    for (Index b = 0; b < B; ++b) {
      if (active[std::size_t(b)]) ids.push_back(next[std::size_t(b)]);
      cu[b + 1] = cu[b] + (active[std::size_t(b)] ? 1 : 0);
    }
    const Matrix<T> step_logits = model.forward_varlen(ids, cu, cache, LogitRows::Last);  // the active rows
    for (Index b = 0, r = 0; b < B; ++b)
      if (active[std::size_t(b)]) logits.row(b) = step_logits.row(r++);
  }
  return out;
}

// One prompt: the new tokens after it.
template <class T>
std::vector<int> generate(const CausalLM<T>& model, const std::vector<int>& prompt,
                          const GenerationOptions& options = {}, const TokenCallback& on_token = {}) {
  return generate<T>(model, std::vector<std::vector<int>>{prompt}, options, on_token).front();
}

}  // namespace attn
