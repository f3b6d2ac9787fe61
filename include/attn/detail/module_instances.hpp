// attn/detail/module_instances.hpp - ATTN_EXTERN_TEMPLATES for the module classes.
//
// With ATTN_EXTERN_TEMPLATES, a translation unit that includes attn/attn.hpp compiles none of the
// modules' member functions for float and double: they are declared extern here and compiled once
// per program, by attn/instantiate.hpp. (Compilers still read the inline members, to inline the
// small ones; the large ones are called. The kernels behind the modules are declared extern at
// their dispatch points, detail/attention.hpp and detail/gemm.hpp, whatever header is included.)
#pragma once

#include "attn/causal_lm.hpp"
#include "attn/decoder_attention.hpp"
#include "attn/decoder_layer.hpp"
#include "attn/embedding.hpp"
#include "attn/feed_forward.hpp"
#include "attn/grouped_query_attention.hpp"
#include "attn/kv_cache.hpp"
#include "attn/layer_norm.hpp"
#include "attn/linear.hpp"
#include "attn/multi_head_attention.hpp"
#include "attn/rms_norm.hpp"
#include "attn/rope.hpp"
#include "attn/scaled_dot_product_attention.hpp"
#include "attn/swiglu.hpp"
#include "attn/transformer.hpp"
#include "attn/weight.hpp"

// The module class templates, as X(Module) each: attn::Module<float> and attn::Module<double> are
// declared extern below and defined by attn/instantiate.hpp.
#define ATTN_DETAIL_MODULES(X) \
  X(Weight)                    \
  X(Linear)                    \
  X(ScaledDotProductAttention) \
  X(MultiHeadAttention)        \
  X(GroupedQueryAttention)     \
  X(KVCache)                   \
  X(DecoderAttention)          \
  X(LayerNorm)                 \
  X(RMSNorm)                   \
  X(RopeCache)                 \
  X(SwiGLU)                    \
  X(FeedForward)               \
  X(TransformerEncoderLayer)   \
  X(TransformerDecoderLayer)   \
  X(TransformerEncoder)        \
  X(TransformerDecoder)        \
  X(Transformer)               \
  X(Embedding)                 \
  X(DecoderLayer)              \
  X(CausalLM)

#ifdef ATTN_EXTERN_TEMPLATES
#define ATTN_DETAIL_EXTERN_MODULE(Module)    \
  extern template class attn::Module<float>; \
  extern template class attn::Module<double>;
ATTN_DETAIL_MODULES(ATTN_DETAIL_EXTERN_MODULE)
#undef ATTN_DETAIL_EXTERN_MODULE
#endif
