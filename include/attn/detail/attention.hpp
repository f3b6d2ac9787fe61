// attn/detail/attention.hpp - the one dispatch point for the attention core.
//
// Every public class calls detail::attention(); which kernel runs is decided here and nowhere
// else. attention_reference (plain loops) stays beside the fast paths as their test oracle.
#pragma once

#include "attn/detail/attention_blocked.hpp"
#include "attn/detail/attention_decode.hpp"
#include "attn/detail/attention_flash.hpp"
#include "attn/detail/attention_problem.hpp"
#include "attn/detail/attention_reference.hpp"

namespace attn::detail {

// The flash kernel computes every output without the [L, S] probabilities; when the caller asks
// for them they are written a query block at a time by the blocked kernel instead. A decoding
// step (at most kDecodeRows queries per head) is memory-bound: the decode kernel reads K and V in
// place and splits the keys over the threads.
template <class T>
void attention(const AttentionProblem<T>& p) {
  if (p.weights)
    attention_blocked(p);
  else if (p.L <= kDecodeRows)
    attention_decode(p);
  else
    attention_flash(p, flash_blocks(p));
}

// With ATTN_EXTERN_TEMPLATES the kernels are compiled once per program, in the file that includes
// attn/instantiate.hpp, instead of in every translation unit that calls attention(). (attention
// must stay a non-inline function: compilers instantiate inline ones anyway, for inlining.)
#ifdef ATTN_EXTERN_TEMPLATES
extern template void attention<float>(const AttentionProblem<float>&);
extern template void attention<double>(const AttentionProblem<double>&);
#endif

}  // namespace attn::detail
