// attn/detail/attention.hpp - the one dispatch point for the attention core.
//
// Every public class calls detail::attention(); which kernel runs is decided here and nowhere
// else. attention_reference (plain loops) stays beside the fast paths as their test oracle.
#pragma once

#include "attn/detail/attention_blocked.hpp"
#include "attn/detail/attention_problem.hpp"
#include "attn/detail/attention_reference.hpp"

namespace attn::detail {

template <class T>
void attention(const AttentionProblem<T>& p) {
  attention_blocked(p);
}

}  // namespace attn::detail
