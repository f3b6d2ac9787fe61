// attn/attn.hpp - everything attn offers, in one include.
#pragma once

#include "attn/decoder_attention.hpp"
#include "attn/error.hpp"
#include "attn/feed_forward.hpp"
#include "attn/grouped_query_attention.hpp"
#include "attn/init.hpp"
#include "attn/kv_cache.hpp"
#include "attn/kv_storage.hpp"
#include "attn/layer_norm.hpp"
#include "attn/linear.hpp"
#include "attn/mask.hpp"
#include "attn/precision.hpp"
#include "attn/multi_head_attention.hpp"
#include "attn/rms_norm.hpp"
#include "attn/rope.hpp"
#include "attn/scaled_dot_product_attention.hpp"
#include "attn/storage.hpp"
#include "attn/swiglu.hpp"
#include "attn/threads.hpp"
#include "attn/transformer.hpp"
#include "attn/types.hpp"
#include "attn/version.hpp"
#include "attn/weight.hpp"

// ATTN_EXTERN_TEMPLATES: the modules' members declared extern (attn/instantiate.hpp compiles them).
#include "attn/detail/module_instances.hpp"
