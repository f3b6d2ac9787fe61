// attn/detail/attention.hpp - the one dispatch point for the attention core.
//
// Every public class calls detail::attention(); which kernel runs is decided here and nowhere
// else. attention_reference (plain loops) stays beside the fast paths as their test oracle.
#pragma once

#include "attn/detail/attention_blocked.hpp"
#include "attn/detail/attention_flash.hpp"
#include "attn/detail/attention_problem.hpp"
#include "attn/detail/attention_reference.hpp"

namespace attn::detail {

// The flash kernel computes every output without the [L, S] probabilities; when the caller asks
// for them they are written a query block at a time by the blocked kernel instead. Causal
// problems take 64 x 64 blocks: at L = 1024 on this machine causal ran 1.6x faster than full
// with them, 1.2x with the 128 x 256 blocks that are fastest without a mask.
template <class T>
void attention(const AttentionProblem<T>& p) {
  if (p.weights)
    attention_blocked(p);
  else if (p.causal != Causal::None)
    attention_flash(p, FlashBlocks{64, 64});  // finer blocks skip more of the masked triangle
  else
    attention_flash(p);
}

}  // namespace attn::detail
