// attn/detail/module_instances.hpp - the module class templates that attn/instantiate.hpp compiles.
//
// With ATTN_EXTERN_TEMPLATES, each module's header declares its float and double members extern
// (ATTN_DETAIL_EXTERN_MODULE, attn/types.hpp), so a translation unit compiles none of them,
// whichever headers it includes; attn/instantiate.hpp compiles every module listed here once per
// program. (Compilers still read the inline members, to inline the small ones; the large ones are
// called. The kernels behind the modules are declared extern at their dispatch points,
// detail/attention.hpp and detail/gemm.hpp.) A new module adds itself to the list below and ends
// its header with ATTN_DETAIL_EXTERN_MODULE(Module).
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
// defined by attn/instantiate.hpp.
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

