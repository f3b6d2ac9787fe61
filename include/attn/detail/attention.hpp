// attn/detail/attention.hpp - the one dispatch point for the attention core.
//
// Every public class calls detail::attention(); which kernel runs is decided here and nowhere
// else. attention_reference (plain loops) stays beside the fast paths as their test oracle.
#pragma once

#include <vector>

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
//
// A ragged batch is a list of problems ps[0, n), one per sequence, each with its own lengths
// (and its own K and V, query and output rows): each goes to the kernel a call with it alone
// would take, with the block sizes that call would use, so its result is that call's, bitwise;
// the decoding problems go to the decode kernel together, the others to the flash kernel
// together, each kernel splitting all its problems' tasks over the threads at once. (Problems of
// one list share kv_storage and precision.)
template <class T>
void attention(const AttentionProblem<T>* ps, Index n) {
  if (n == 1) {
    const AttentionProblem<T>& p = *ps;
    if (p.weights)
      attention_blocked(p);
    else if (p.L <= kDecodeRows)
      attention_decode(p);
    else
      attention_flash(p, flash_blocks(p));
    return;
  }
  std::vector<AttentionProblem<T>> decode, flash;
  std::vector<FlashBlocks> blocks;
  for (Index i = 0; i < n; ++i) {
    const AttentionProblem<T>& p = ps[i];
    if (p.weights) {
      attention_blocked(p);
    } else if (p.L <= kDecodeRows) {
      decode.push_back(p);
    } else {
      flash.push_back(p);
      blocks.push_back(flash_blocks(p));
    }
  }
  if (!decode.empty()) attention_decode(decode.data(), Index(decode.size()));
  if (!flash.empty()) attention_flash(flash.data(), blocks.data(), Index(flash.size()));
}

template <class T>
void attention(const AttentionProblem<T>& p) {
  attention(&p, 1);
}

// With ATTN_EXTERN_TEMPLATES the kernels are compiled once per program, in the file that includes
// attn/instantiate.hpp, instead of in every translation unit that calls attention(). (attention
// must stay a non-inline function: compilers instantiate inline ones anyway, for inlining.)
#ifdef ATTN_EXTERN_TEMPLATES
extern template void attention<float>(const AttentionProblem<float>*, Index);
extern template void attention<double>(const AttentionProblem<double>*, Index);
#endif

}  // namespace attn::detail
