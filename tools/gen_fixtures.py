#!/usr/bin/python3
"""Write attn's golden test fixtures: expected values computed by PyTorch in float64.

Usage (from the repository root, with Debian's python3-torch and python3-numpy):

    /usr/bin/python3 tools/gen_fixtures.py [OUTPUT_DIR]

OUTPUT_DIR defaults to tests/data/. One file per case, named after the case
(linear_*, sdpa_*, gqa_*, rope_*, mha_*; and in OUTPUT_DIR/layers/: layer_norm_*, feed_forward_*, encoder_layer_*,
decoder_layer_*, encoder_*), in the safetensors format, written here with json + struct:

    u64 little-endian N | N bytes of JSON header (space padded to a multiple of 8) | raw data

The header maps each tensor name to {"dtype", "shape", "data_offsets"} ("F64" little-endian
doubles, "F16" little-endian IEEE halves - only the large encoder stack's parameters and input, see
encoder_case - or "BOOL" one byte 0/1), and "__metadata__" (string -> string) holds the case's
configuration: kind (linear | sdpa | gqa | rope | mha | layer_norm | feed_forward | encoder_layer |
decoder_layer | encoder), its dimensions and options, and a description.
tests/pytorch_fixture_test.cpp reads every file of OUTPUT_DIR through tests/support/fixture.hpp;
layer_norm_test.cpp, feed_forward_test.cpp and transformer_test.cpp read layers/ (conventions
above the layer cases below).

Conventions (those of attn, see include/attn/types.hpp and mask.hpp):
  * every matrix is 2-D, one token per row;
  * linear:  x [N, in], weight [out, in], bias [out] -> y [N, out]  (torch.nn.Linear);
  * sdpa:    query [L, d], key [S, d], value [S, dv] -> output [L, dv], weights [L, S].
             Torch 1.13 has no F.scaled_dot_product_attention, so the expectation is
             softmax(q k^T * scale + attn_bias, masked) v written out with torch ops, with
             PyTorch 2.x's rule that a query whose keys are all masked gets zeros.
             Masks: attn_mask_attend [L, S] (true = may attend, SDPA's polarity),
             attn_mask_ignore [L, S] (true = masked out), attn_bias [L, S] (added, -inf masks),
             key_padding_mask [1, S] (true = ignore), metadata causal = none | top_left |
             bottom_right (applied on top of the stored masks);
  * gqa, rope: grouped-query attention with the score options, and rotary embeddings (conventions
             above their cases below);
  * mha:     torch.nn.MultiheadAttention(...).double().eval(), every parameter redrawn so that
             no bias is zero, stored under its state_dict name (bias_k / bias_v as [E]).
             query/key/value/output are [B*L, *] in the layout's row order: (b, l) with
             batch_first, else (l, b) (PyTorch's [L, B, E] flattened); unbatched = B 1.
             weights: averaged [B*L, S'] rows (b, l), or per head [B*H*L, S'] rows (b, h, l).
             attn_mask_ignore is MHA's bool attn_mask (true = masked out), [L, S] or
             [B*H, L, S] flattened to [B*H*L, S]; attn_bias is its float attn_mask;
             key_padding_mask [B, S] (true = ignore). attn_mask_is_causal = true marks an
             attn_mask_ignore that is exactly the causal mask named by metadata causal.
             torch_output_has_nan = true marks the cases where PyTorch returns NaN (a sequence
             whose keys are all padded); the C++ test states what attn returns instead.

The script is deterministic: each case seeds torch from a CRC of its name, so running it again
rewrites byte-identical files, and adding a case leaves the others unchanged. (The inputs and
parameters are the same on every machine; an output may differ in its last bit between CPUs whose
torch kernels take different vector paths.)
"""

import json
import os
import struct
import sys
import zlib

import numpy as np
import torch

# Keep the module on PyTorch's Python path (multi_head_attention_forward), not the eval-mode
# fused kernel: the fused path is taken only when no parameter requires grad, and ours do.
torch.set_grad_enabled(True)

F64 = torch.float64
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# safetensors writer

def _meta_str(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest string that round-trips the double
    return str(value)


def write_safetensors(path, tensors, metadata):
    """tensors: name -> float64, float16 or bool torch tensor; metadata: name -> str/int/float/bool."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype == F64:
            dtype, raw = "F64", t.numpy().astype("<f8").tobytes()
        elif t.dtype == torch.bool:
            dtype, raw = "BOOL", t.numpy().astype(np.uint8).tobytes()
        elif t.dtype == torch.float16:
            dtype, raw = "F16", t.numpy().astype("<f2").tobytes()
        else:
            raise TypeError(f"{path}: tensor {name} has dtype {t.dtype}; only float64, float16 and bool are written")
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {k: _meta_str(v) for k, v in metadata.items()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


# ---------------------------------------------------------------------------------------------
# helpers

def seed_for(name):
    torch.manual_seed(zlib.crc32(name.encode("utf-8")))


def randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=F64) * scale


def causal_allowed(L, S, alignment):
    """[L, S] bool, true = query i may see key j."""
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    if alignment == "top_left":
        return j <= i
    if alignment == "bottom_right":
        return j <= i + (S - L)
    raise ValueError(alignment)


def random_mask(rows, cols, p_true, keep_one_value):
    """Bool [rows, cols], true with probability p_true; every row keeps at least one entry equal
    to keep_one_value, so no row is masked out entirely by accident."""
    m = torch.rand(rows, cols) < p_true
    for r in range(rows):
        if not bool((m[r] == keep_one_value).any()):
            m[r, int(torch.randint(cols, ()))] = keep_one_value
    return m


def sdpa_expected(q, k, v, scale, allowed=None, bias=None):
    """softmax(q k^T * scale + bias) v over the allowed keys; all-masked rows give zeros."""
    s = (q @ k.T) * scale
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, NEG_INF)
    dead = torch.isneginf(s.max(dim=-1, keepdim=True).values)  # every key masked
    w = torch.softmax(s, dim=-1)
    w = torch.where(dead, torch.zeros_like(w), w)
    return w @ v, w


# ---------------------------------------------------------------------------------------------
# cases

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# --- linear -----------------------------------------------------------------------------------

def linear_case(name, bias):
    seed_for(name)
    n, fin, fout = 5, 7, 4
    fc = torch.nn.Linear(fin, fout, bias=bias, dtype=F64)
    x = randn(n, fin)
    y = fc(x)
    t = {"x": x, "weight": fc.weight, "y": y}
    if bias:
        t["bias"] = fc.bias
    meta = {"kind": "linear", "in_features": fin, "out_features": fout, "bias": bias,
            "description": f"torch.nn.Linear({fin}, {fout}, bias={bias})"}
    return t, meta


@case
def linear_bias():
    return linear_case("linear_bias", True)


@case
def linear_no_bias():
    return linear_case("linear_no_bias", False)


# --- sdpa -------------------------------------------------------------------------------------

def sdpa_case(name, L, S, d, dv, description, scale=None, causal="none", attend=None, ignore=None,
              bias=None, key_padding=None, qkv=None):
    """attend / ignore / bias / key_padding are callables (L, S) -> tensor, drawn after q, k, v."""
    seed_for(name)
    if qkv is None:
        q, k, v = randn(L, d), randn(S, d), randn(S, dv)
    else:
        q, k, v = qkv()
    t = {"query": q, "key": k, "value": v}
    allowed = torch.ones(L, S, dtype=torch.bool)
    if attend is not None:
        t["attn_mask_attend"] = attend(L, S)
        allowed &= t["attn_mask_attend"]
    if ignore is not None:
        t["attn_mask_ignore"] = ignore(L, S)
        allowed &= ~t["attn_mask_ignore"]
    if bias is not None:
        t["attn_bias"] = bias(L, S)
    if key_padding is not None:
        t["key_padding_mask"] = key_padding(L, S)
        allowed &= ~t["key_padding_mask"]  # [1, S] broadcast over queries
    if causal != "none":
        allowed &= causal_allowed(L, S, causal)
    eff_scale = scale if scale is not None else 1.0 / float(np.sqrt(d))
    out, w = sdpa_expected(q, k, v, eff_scale, allowed, t.get("attn_bias"))
    t["output"], t["weights"] = out, w
    usable = allowed if bias is None else allowed & torch.isfinite(t["attn_bias"])
    meta = {"kind": "sdpa", "L": L, "S": S, "d": d, "dv": dv,
            "scale": "default" if scale is None else scale, "causal": causal,
            "all_masked_rows": int((~usable.any(dim=-1)).sum()), "description": description}
    return t, meta


def bias_with_neg_inf(L, S):
    b = randn(L, S, scale=2.0)
    holes = random_mask(L, S, 0.25, False)  # true = -inf; every row keeps a finite entry
    return b.masked_fill(holes, NEG_INF)


@case
def sdpa_plain():
    return sdpa_case("sdpa_plain", 5, 7, 8, 6, "no mask, L != S, d != dv, scale 1/sqrt(d)")


@case
def sdpa_custom_scale():
    return sdpa_case("sdpa_custom_scale", 4, 6, 8, 5, "explicit scale 0.37", scale=0.37)


@case
def sdpa_bool_attend():
    return sdpa_case("sdpa_bool_attend", 5, 6, 4, 3, "bool mask, true = may attend (SDPA polarity)",
                     attend=lambda L, S: random_mask(L, S, 0.6, True))


@case
def sdpa_bool_ignore():
    return sdpa_case("sdpa_bool_ignore", 5, 6, 4, 3, "bool mask, true = masked out (MHA polarity)",
                     ignore=lambda L, S: random_mask(L, S, 0.4, False))


@case
def sdpa_additive_bias():
    return sdpa_case("sdpa_additive_bias", 4, 7, 6, 6, "float bias added to the logits, some -inf",
                     bias=bias_with_neg_inf)


@case
def sdpa_causal_top_left_l_lt_s():
    return sdpa_case("sdpa_causal_top_left_l_lt_s", 4, 7, 5, 3, "causal top-left, L < S: j <= i",
                     causal="top_left")


@case
def sdpa_causal_top_left_l_gt_s():
    return sdpa_case("sdpa_causal_top_left_l_gt_s", 7, 4, 5, 3, "causal top-left, L > S: j <= i",
                     causal="top_left")


@case
def sdpa_causal_bottom_right_l_lt_s():
    return sdpa_case("sdpa_causal_bottom_right_l_lt_s", 4, 7, 5, 3,
                     "causal bottom-right, L < S: j <= i + S - L (KV cache)", causal="bottom_right")


@case
def sdpa_causal_bottom_right_l_gt_s():
    return sdpa_case("sdpa_causal_bottom_right_l_gt_s", 7, 4, 5, 3,
                     "causal bottom-right, L > S: queries 0..2 see no key and give zeros",
                     causal="bottom_right")


@case
def sdpa_key_padding():
    def padding(L, S):
        m = torch.zeros(1, S, dtype=torch.bool)
        m[0, S - 2:] = True  # the last two keys are padding
        return m
    return sdpa_case("sdpa_key_padding", 5, 6, 4, 4, "key_padding_mask [1, S], true = ignore",
                     key_padding=padding)


@case
def sdpa_combined():
    def padding(L, S):
        m = torch.zeros(1, S, dtype=torch.bool)
        m[0, 1] = True
        m[0, S - 1] = True
        return m
    return sdpa_case("sdpa_combined", 5, 7, 6, 4,
                     "attend mask + float bias with -inf + causal bottom-right + key padding, custom scale",
                     scale=0.5, causal="bottom_right",
                     attend=lambda L, S: random_mask(L, S, 0.7, True),
                     bias=bias_with_neg_inf, key_padding=padding)


@case
def sdpa_all_masked_row():
    def ignore(L, S):
        m = random_mask(L, S, 0.3, False)
        m[2, :] = True  # query 2 may attend nothing: its output and weights are zeros
        return m
    return sdpa_case("sdpa_all_masked_row", 5, 6, 4, 5, "query 2 has every key masked -> zeros",
                     ignore=ignore)


@case
def sdpa_large_logits():
    # Logits near +-1e4 with O(1) differences: a softmax without the max subtraction overflows
    # (or underflows to 0/0). q and k are multiples of 1/4 below 2^8 and the scale is 1/sqrt(4),
    # so every logit is exact in float too, and float can meet its tolerance.
    def qkv():
        L, S, d, dv = 4, 6, 4, 3
        q = torch.round(randn(L, d, scale=4.0)) / 4
        k = torch.round(randn(S, d, scale=4.0)) / 4
        q[:, 0] = torch.tensor([144.0, -144.0, 144.0, 100.0], dtype=F64)
        k[:, 0] = 144.0
        return q, k, randn(S, dv)
    return sdpa_case("sdpa_large_logits", 4, 6, 4, 3,
                     "logits about +-1e4 (exact in float): the softmax must subtract the row max",
                     qkv=qkv)


# --- gqa: grouped-query attention with the score options, and rope ------------------------------
# gqa:  query [L, H*d], key [S, H_kv*d], value [S, H_kv*dv] -> output [L, H*dv] (head h in columns
#       [h*d, (h+1)*d)); metadata heads, kv_heads, causal, window (0 = none), softcap (0 = none),
#       rope = none | neox | gptj (with rope_dim, rope_base: query and key are stored unrotated;
#       keys sit at positions 0..S-1 and queries at S-L..S-1, a decoding step from a cache);
#       alibi_slopes [H] when ALiBi is on. Written out by hand: K/V heads repeated with
#       repeat_interleave, ALiBi as BLOOM adds it (slope * key position, which differs from attn's
#       slope * (j - i_abs) by a constant per row: the softmax is the same).
#       The cases with "lse" (gqa_sink*, gqa_lse_*) also hold B sequences, rows (b, l) - query
#       [B*L, H*d], key/value [B*S, *], output [B*L, H*dv] - and:
#         lse [H, B*L]   each row's log-sum-exp of its masked logits, column b*L + l (-inf when every
#                        key is masked and there is no sink);
#         sinks [H]      attention sinks (gpt-oss): one logit per head that joins every row's softmax
#                        denominator and has no value. As gpt-oss's reference computes them: a column
#                        of sinks[h] concatenated to the [.., L, S] logits, softmax, that column
#                        dropped, then @ v; lse = logsumexp over the concatenated row;
#       and metadata batch (B), sink_tokens (keys [0, sink_tokens) exempt from the window,
#       StreamingLLM: visible iff |a - j| < window or j < sink_tokens, causal still applies) and
#       all_masked_rows (rows (b, l) that see no key: output zeros, lse = sinks[h] or -inf).
#       The older cases have none of these, so that their files stay byte-identical: the test
#       reads them as B = 1, sink_tokens = 0 and no lse to check.
# rope: x [rows, H*D] -> output [rows, H*D], row r at position start + r; metadata heads,
#       head_dim, rope_dim, rope_base, style, start.

def alibi_get_slopes(n):
    """The ALiBi paper's get_slopes (as in BLOOM's build_alibi_tensor), in plain Python."""
    import math
    def pow2(m):
        start = 2 ** (-2 ** -(math.log2(m) - 3))
        return [start * start ** i for i in range(m)]
    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + alibi_get_slopes(2 * closest)[0::2][: n - closest]


def rope_neox_torch(x, positions, rope_dim, base):
    """HF LlamaRotaryEmbedding + rotate_half, on x [rows, D] with partial rotary (GPT-NeoX)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=F64) / rope_dim))
    freqs = torch.outer(positions.to(F64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    xr, xp = x[..., :rope_dim], x[..., rope_dim:]
    x1, x2 = xr[..., : rope_dim // 2], xr[..., rope_dim // 2:]
    rotate_half = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos + rotate_half * sin, xp), dim=-1)


def rope_gptj_torch(x, positions, rope_dim, base):
    """GPT-J's fixed_pos_embedding + rotate_every_two + duplicate_interleave, on x [rows, D]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=F64) / rope_dim))
    sinusoid = torch.outer(positions.to(F64), inv_freq)
    sin = sinusoid.sin().repeat_interleave(2, dim=-1)
    cos = sinusoid.cos().repeat_interleave(2, dim=-1)
    xr, xp = x[..., :rope_dim], x[..., rope_dim:]
    x1, x2 = xr[..., ::2], xr[..., 1::2]
    rotate_every_two = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return torch.cat((xr * cos + rotate_every_two * sin, xp), dim=-1)


def rope_heads(x, heads, positions, style, rope_dim, base):
    """x [rows, heads*D]: each head rotated alike."""
    rows = x.shape[0]
    xh = x.reshape(rows, heads, -1).transpose(0, 1)  # [heads, rows, D]
    f = rope_neox_torch if style == "neox" else rope_gptj_torch
    return f(xh, positions, rope_dim, base).transpose(0, 1).reshape(rows, -1)


def gqa_case(name, description, L, S, H, Hkv, d, dv, causal="none", window=0, softcap=0.0, alibi=False,
             q_scale=1.0, rope="none", rope_dim=None, rope_base=10000.0, B=1, sinks=False, sink_tokens=0,
             lse=False):
    """lse: write the lse tensor and the batch, sink_tokens and all_masked_rows metadata (a case with
    B > 1, sinks or sink_tokens needs them); off for the cases that predate them."""
    assert lse or (B == 1 and not sinks and sink_tokens == 0), f"{name}: B, sinks and sink_tokens need lse=True"
    # BLOOM's ALiBi shifts each row's logits by a constant: harmless to the softmax, not to the lse or
    # to a softmax with a sink column. A case with both would need attn's slope * (j - a).
    assert not (alibi and lse), f"{name}: ALiBi is written BLOOM's way, which changes the lse"
    seed_for(name)
    q, k, v = randn(B * L, H * d, scale=q_scale), randn(B * S, Hkv * d), randn(B * S, Hkv * dv)
    t = {"query": q, "key": k, "value": v}
    if rope != "none":
        rope_dim = rope_dim or d
        q = rope_heads(q, H, torch.arange(S - L, S).repeat(B), rope, rope_dim, rope_base)
        k = rope_heads(k, Hkv, torch.arange(S).repeat(B), rope, rope_dim, rope_base)
    qh = q.reshape(B, L, H, d).transpose(1, 2)                                         # [B, H, L, d]
    kh = k.reshape(B, S, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)    # [B, H, S, d]
    vh = v.reshape(B, S, Hkv, dv).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)   # [B, H, S, dv]
    s = (qh @ kh.transpose(-1, -2)) / float(np.sqrt(d))                                # [B, H, L, S]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)  # Gemma 2: cap, then mask
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    a = i if causal == "top_left" else i + (S - L)  # the query's absolute position
    allowed = torch.ones(L, S, dtype=torch.bool)
    if causal != "none":
        allowed &= j <= a
    if window > 0:
        allowed &= ((a - j).abs() < window) | (j < sink_tokens)  # StreamingLLM: sink tokens skip the window
    if alibi:
        slopes = torch.tensor(alibi_get_slopes(H), dtype=F64)
        t["alibi_slopes"] = slopes
        s = s + slopes.view(H, 1, 1) * torch.arange(S, dtype=F64).view(1, 1, S)  # BLOOM: slope * key position
    s = s.masked_fill(~allowed, NEG_INF)
    if sinks:
        t["sinks"] = randn(H, scale=1.5)
        # gpt-oss's sdpa: the sink joins each row as one more logit, whose weight is then dropped. A row
        # with every key masked puts all its weight on the sink: its output is zeros.
        sc = torch.cat([s, t["sinks"].view(1, H, 1, 1).expand(B, H, L, 1)], dim=-1)
        w = torch.softmax(sc, dim=-1)[..., :-1]
    else:
        sc = s
        dead = torch.isneginf(s.max(dim=-1, keepdim=True).values)
        w = torch.where(dead, torch.zeros_like(s), torch.softmax(s, dim=-1))
    t["output"] = (w @ vh).transpose(1, 2).reshape(B * L, H * dv)
    meta = {"kind": "gqa", "L": L, "S": S, "heads": H, "kv_heads": Hkv, "d": d, "dv": dv, "causal": causal,
            "window": window, "softcap": float(softcap), "rope": rope, "rope_dim": rope_dim or 0,
            "rope_base": float(rope_base), "description": description}
    if lse:
        t["lse"] = torch.logsumexp(sc, dim=-1).transpose(0, 1).reshape(H, B * L)  # [B, H, L] -> [H, B*L]
        meta.update({"batch": B, "sink_tokens": sink_tokens,
                     "all_masked_rows": B * int((~allowed.any(dim=-1)).sum())})
    return t, meta


@case
def gqa_group2_causal():
    return gqa_case("gqa_group2_causal", "GQA: 4 query heads on 2 K/V heads, causal bottom-right, L < S",
                    L=5, S=7, H=4, Hkv=2, d=8, dv=6, causal="bottom_right")


@case
def gqa_mqa():
    return gqa_case("gqa_mqa", "MQA: 4 query heads on 1 K/V head, no mask", L=4, S=6, H=4, Hkv=1, d=8, dv=8)


@case
def gqa_alibi_8_heads():
    return gqa_case("gqa_alibi_8_heads", "ALiBi, get_slopes(8), causal, BLOOM's slope * key position",
                    L=6, S=6, H=8, Hkv=8, d=4, dv=4, causal="bottom_right", alibi=True)


@case
def gqa_window_causal():
    return gqa_case("gqa_window_causal", "sliding window 3 + causal bottom-right (Mistral), MQA, L < S",
                    L=8, S=12, H=2, Hkv=1, d=4, dv=4, causal="bottom_right", window=3)


@case
def gqa_window_bidirectional():
    return gqa_case("gqa_window_bidirectional", "sliding window 3 without causal: |i - j| < 3",
                    L=8, S=8, H=2, Hkv=2, d=4, dv=4, window=3)


@case
def gqa_softcap():
    return gqa_case("gqa_softcap", "logit soft-capping 2.0 (Gemma 2: cap, then mask), causal top-left, large logits",
                    L=5, S=6, H=2, Hkv=2, d=8, dv=8, causal="top_left", softcap=2.0, q_scale=4.0)


@case
def gqa_rope_neox_decode():
    return gqa_case("gqa_rope_neox_decode", "RoPE NeoX (Llama) on q at positions 5, 6 and k at 0..6; GQA, causal",
                    L=2, S=7, H=4, Hkv=2, d=8, dv=8, causal="bottom_right", rope="neox")


def sink_token_only_rows(L, S, causal, window, sink_tokens):
    """How many queries see keys only among the sink tokens [0, sink_tokens), and at least one."""
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    a = i if causal == "top_left" else i + (S - L)
    causal_ok = j <= a if causal != "none" else torch.ones(L, S, dtype=torch.bool)
    in_window = causal_ok & ((a - j).abs() < window)
    via_sink = causal_ok & (j < sink_tokens)
    return int((~in_window.any(dim=-1) & via_sink.any(dim=-1)).sum())


@case
def gqa_sinks():
    return gqa_case("gqa_sinks", "attention sinks [H] (gpt-oss): GQA 4 heads on 2, causal bottom-right, L < S, B 2",
                    L=5, S=7, H=4, Hkv=2, d=8, dv=6, causal="bottom_right", B=2, sinks=True, lse=True)


@case
def gqa_sink_tokens_window():
    # Query 8 sees keys 6, 7, 8 through the window and keys 0, 1 as sink tokens; query 1 sees 0, 1.
    return gqa_case("gqa_sink_tokens_window",
                    "sink_tokens 2 (StreamingLLM) through sliding window 3, causal, L = S = 9, MQA; lse",
                    L=9, S=9, H=2, Hkv=1, d=4, dv=4, causal="bottom_right", window=3, sink_tokens=2, lse=True)


@case
def gqa_sinks_window_sink_tokens_softcap():
    # Top-left, L > S: queries 6 and 7 are past every key of the window (6 - 4 = 2 is not < 2) and
    # see only the sink tokens 0, 1; query 5 sees key 4 and the sink tokens.
    assert sink_token_only_rows(8, 5, "top_left", 2, 2) == 2
    return gqa_case("gqa_sinks_window_sink_tokens_softcap",
                    "sinks [H] + sink_tokens 2 + window 2 + softcap 2.0, causal top-left, L 8 > S 5 (queries 6, 7 "
                    "see only the sink tokens), GQA 4 on 2, B 2, large logits",
                    L=8, S=5, H=4, Hkv=2, d=8, dv=4, causal="top_left", window=2, softcap=2.0, q_scale=4.0,
                    B=2, sinks=True, sink_tokens=2, lse=True)


@case
def gqa_sinks_all_masked_rows():
    return gqa_case("gqa_sinks_all_masked_rows",
                    "sinks [H], causal bottom-right, L 6 > S 4: queries 0, 1 see no key (output zeros, "
                    "lse = sinks[h]), MHA 2 heads, B 2",
                    L=6, S=4, H=2, Hkv=2, d=4, dv=4, causal="bottom_right", B=2, sinks=True, lse=True)


@case
def gqa_lse_all_masked_rows():
    return gqa_case("gqa_lse_all_masked_rows",
                    "no sinks, causal bottom-right, L 6 > S 4: queries 0, 1 see no key (output zeros, lse -inf), "
                    "window 3, B 2",
                    L=6, S=4, H=2, Hkv=1, d=4, dv=4, causal="bottom_right", window=3, B=2, lse=True)


def rope_case(name, description, rows, H, D, style, start, rope_dim=None, base=10000.0):
    seed_for(name)
    x = randn(rows, H * D)
    rope_dim = rope_dim or D
    out = rope_heads(x, H, torch.arange(start, start + rows), style, rope_dim, base)
    meta = {"kind": "rope", "heads": H, "head_dim": D, "rope_dim": rope_dim, "rope_base": float(base),
            "style": style, "start": start, "description": description}
    return {"x": x, "output": out}, meta


@case
def rope_neox():
    return rope_case("rope_neox", "RoPE rotate_half (HF Llama), positions 5..8", 4, 2, 8, "neox", 5)


@case
def rope_neox_partial():
    return rope_case("rope_neox_partial", "RoPE rotate_half on the first 4 of 8 features (GPT-NeoX rotary_pct 0.5)",
                     3, 2, 8, "neox", 11, rope_dim=4)


@case
def rope_gptj():
    return rope_case("rope_gptj", "RoPE interleaved (GPT-J rotate_every_two), base 500, positions 3..5",
                     3, 2, 8, "gptj", 3, base=500.0)


# --- mha --------------------------------------------------------------------------------------

def mha_case(name, description, E, H, L, S=None, B=1, unbatched=False, batch_first=False,
             kdim=None, vdim=None, bias=True, add_bias_kv=False, add_zero_attn=False,
             self_attention=None, need_weights=True, average_attn_weights=True,
             attn_mask=None, attn_bias=None, key_padding=None, causal="none", param_scale=0.3):
    """attn_mask: callable (B, H, L, S) -> bool, true = masked, [L, S] or [B*H, L, S];
    attn_bias: the same, float; key_padding: callable (B, S) -> bool [B, S], true = ignore."""
    seed_for(name)
    if S is None:
        S = L
    if self_attention is None:
        self_attention = S == L and kdim is None and vdim is None
    assert not (unbatched and B != 1)
    mha = torch.nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                      kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=F64).eval()
    with torch.no_grad():  # redraw every parameter: PyTorch's init leaves the biases at zero
        for _, p in sorted(mha.named_parameters()):
            p.copy_(randn(*p.shape, scale=param_scale))

    kd, vd = kdim or E, vdim or E

    def inputs(n, width):  # torch's layout, and attn's 2-D rows
        if unbatched:
            x = randn(n, width)
            return x, x
        if batch_first:
            x = randn(B, n, width)
        else:
            x = randn(n, B, width)
        return x, x.reshape(-1, width)

    query, query2d = inputs(L, E)
    if self_attention:
        key = value = query
        key2d = value2d = query2d
    else:
        key, key2d = inputs(S, kd)
        value, value2d = inputs(S, vd)

    t = {"query": query2d, "key": key2d, "value": value2d}
    for pname, p in mha.state_dict().items():
        t[pname] = p.reshape(-1) if pname in ("bias_k", "bias_v") else p

    kwargs = {}
    if attn_mask is not None:
        m = attn_mask(B, H, L, S)
        kwargs["attn_mask"] = m
        t["attn_mask_ignore"] = m.reshape(-1, S)
    if attn_bias is not None:
        m = attn_bias(B, H, L, S)
        kwargs["attn_mask"] = m
        t["attn_bias"] = m.reshape(-1, S)
    if key_padding is not None:
        m = key_padding(B, S)
        t["key_padding_mask"] = m
        kwargs["key_padding_mask"] = m[0] if unbatched else m
    if causal != "none":
        assert attn_mask is not None and torch.equal(t["attn_mask_ignore"], ~causal_allowed(L, S, causal)), \
            "a causal MHA case stores exactly its causal mask"

    out, w = mha(query, key, value, need_weights=need_weights, average_attn_weights=average_attn_weights,
                 **kwargs)
    t["output"] = out.reshape(-1, E)
    S2 = S + int(add_bias_kv) + int(add_zero_attn)
    if need_weights:
        t["weights"] = w.reshape(-1, S2)  # [B, L, S'] or [B, H, L, S'] (unbatched: no B)

    has_nan = bool(torch.isnan(t["output"]).any())
    meta = {"kind": "mha", "embed_dim": E, "num_heads": H, "kdim": kd, "vdim": vd, "bias": bias,
            "add_bias_kv": add_bias_kv, "add_zero_attn": add_zero_attn, "batch_first": batch_first,
            "batch": B, "unbatched": unbatched, "tgt_len": L, "src_len": S, "self_attention": self_attention,
            "need_weights": need_weights, "average_attn_weights": average_attn_weights,
            "causal": causal, "attn_mask_is_causal": causal != "none",
            "torch_output_has_nan": has_nan, "description": description}
    return t, meta


def mask_2d(p):
    return lambda B, H, L, S: random_mask(L, S, p, False)


def lengths_padding(lengths):
    """key_padding_mask [B, S]: sequence b has lengths[b] real keys, the rest is padding."""
    def build(B, S):
        m = torch.zeros(B, S, dtype=torch.bool)
        for b, n in enumerate(lengths):
            m[b, n:] = True
        return m
    return build


@case
def mha_self_unbatched():
    return mha_case("mha_self_unbatched", "self-attention, unbatched [L, E] input", E=8, H=2, L=5,
                    unbatched=True)


@case
def mha_batch_first():
    return mha_case("mha_batch_first", "self-attention, batch_first [B, L, E]", E=12, H=3, L=4, B=3,
                    batch_first=True)


@case
def mha_seq_first():
    return mha_case("mha_seq_first", "self-attention, default layout [L, B, E]", E=8, H=2, L=5, B=2)


@case
def mha_cross():
    return mha_case("mha_cross", "cross-attention L != S, batch_first", E=8, H=4, L=4, S=6, B=2,
                    batch_first=True)


@case
def mha_kdim_vdim():
    return mha_case("mha_kdim_vdim", "kdim = 5, vdim = 7 != E: q/k/v_proj_weight", E=8, H=2, L=3, S=6, B=2,
                    kdim=5, vdim=7)


@case
def mha_no_bias():
    return mha_case("mha_no_bias", "bias=False: no in_proj_bias, no out_proj.bias", E=8, H=2, L=4, S=5, B=2,
                    bias=False)


@case
def mha_add_bias_kv():
    return mha_case("mha_add_bias_kv", "add_bias_kv: one learned key/value appended", E=8, H=2, L=4, B=2,
                    batch_first=True, add_bias_kv=True)


@case
def mha_add_zero_attn():
    return mha_case("mha_add_zero_attn", "add_zero_attn: one zero key/value per head appended", E=8, H=2,
                    L=4, S=5, B=2, add_zero_attn=True)


@case
def mha_bias_kv_zero_attn_masks():
    return mha_case("mha_bias_kv_zero_attn_masks",
                    "add_bias_kv + add_zero_attn with a 2-D bool mask and key padding (S' = S + 2)",
                    E=12, H=3, L=5, S=6, B=2, batch_first=True, add_bias_kv=True, add_zero_attn=True,
                    attn_mask=mask_2d(0.3), key_padding=lengths_padding([6, 4]))


@case
def mha_bool_mask_2d():
    return mha_case("mha_bool_mask_2d", "bool attn_mask [L, S], true = masked", E=8, H=2, L=5, S=6, B=2,
                    attn_mask=mask_2d(0.35))


@case
def mha_bool_mask_3d():
    return mha_case("mha_bool_mask_3d", "bool attn_mask [B*H, L, S], index b*H + h", E=12, H=3, L=4, S=5, B=2,
                    batch_first=True, attn_mask=lambda B, H, L, S: random_mask(B * H * L, S, 0.35, False)
                    .reshape(B * H, L, S))


@case
def mha_float_mask():
    def bias(B, H, L, S):
        return bias_with_neg_inf(L, S)
    return mha_case("mha_float_mask", "float attn_mask [L, S] added to the logits, some -inf", E=8, H=2,
                    L=4, S=6, B=2, attn_bias=bias)


@case
def mha_float_mask_3d_key_padding():
    def bias(B, H, L, S):
        return randn(B * H, L, S, scale=1.5)
    return mha_case("mha_float_mask_3d_key_padding", "float attn_mask [B*H, L, S] with bool key padding",
                    E=8, H=2, L=4, S=5, B=2, batch_first=True, attn_bias=bias,
                    key_padding=lengths_padding([3, 5]))


@case
def mha_key_padding():
    return mha_case("mha_key_padding", "key_padding_mask [B, S], true = ignore", E=8, H=2, L=5, B=3,
                    key_padding=lengths_padding([5, 3, 1]))


@case
def mha_weights_per_head():
    return mha_case("mha_weights_per_head", "average_attn_weights=False: weights [B*H*L, S] rows (b, h, l)",
                    E=12, H=4, L=3, S=5, B=2, average_attn_weights=False, attn_mask=mask_2d(0.3))


@case
def mha_no_weights():
    return mha_case("mha_no_weights", "need_weights=False", E=8, H=2, L=4, B=2, batch_first=True,
                    need_weights=False, key_padding=lengths_padding([4, 2]))


@case
def mha_causal_top_left():
    return mha_case("mha_causal_top_left", "causal self-attention: bool mask triu(1), also metadata causal",
                    E=8, H=2, L=6, B=2, batch_first=True, causal="top_left",
                    attn_mask=lambda B, H, L, S: ~causal_allowed(L, S, "top_left"))


@case
def mha_causal_bottom_right():
    return mha_case("mha_causal_bottom_right",
                    "causal cross-attention L < S, bottom-right (j <= i + S - L) as a bool mask",
                    E=8, H=2, L=3, S=6, B=2, causal="bottom_right", average_attn_weights=False,
                    attn_mask=lambda B, H, L, S: ~causal_allowed(L, S, "bottom_right"))


@case
def mha_all_keys_padded():
    return mha_case("mha_all_keys_padded",
                    "batch entry 1 has every key padded: PyTorch 1.13 returns NaN for it", E=8, H=2, L=4, S=5,
                    B=3, key_padding=lengths_padding([5, 0, 2]))


@case
def mha_all_keys_padded_zero_attn():
    return mha_case("mha_all_keys_padded_zero_attn",
                    "every key of batch entry 0 padded, add_zero_attn: the zero key takes weight 1",
                    E=8, H=2, L=4, S=5, B=2, batch_first=True, add_zero_attn=True,
                    key_padding=lengths_padding([0, 3]))


@case
def mha_large():
    # Weights drawn at the scale of 1 / sqrt(fan_in) keep the logits O(1) at E = 256.
    return mha_case("mha_large", "E = 256, H = 8, L = 128, B = 2, batch_first, key padding", E=256, H=8,
                    L=128, B=2, batch_first=True, key_padding=lengths_padding([128, 100]),
                    param_scale=1.0 / 16.0)


# --- layers: LayerNorm, the feed-forward block, transformer layers and an encoder stack ---------
#
# Written to the subdirectory layers/ (tests/data/layers/), read by tests/layer_norm_test.cpp,
# feed_forward_test.cpp and transformer_test.cpp. Parameters are stored under their state_dict
# names (self_attn.in_proj_weight, linear1.weight, norm1.bias, layers.0.self_attn..., norm.weight).
# Inputs and outputs are [B*L, d_model] in the layout's row order, as for mha. Masks are stored
# under PyTorch's argument names with PyTorch's meaning: a BOOL mask is true = masked out (attn's
# IgnoreMask), an F64 mask is added to the logits (AdditiveMask); [L, S] or [B*H, L, S] flattened
# to [B*H*L, S]; *_key_padding_mask [B, S], true = ignore.
#
# Torch 1.13 lacks three things PyTorch 2.x has; the cases get the same numbers without them:
#   * bias=False (TransformerEncoderLayer, TransformerDecoderLayer, LayerNorm; PyTorch >= 2.1):
#     every bias it would remove (in_proj_bias, out_proj.bias, linear1/2.bias, norm*.bias) is set
#     to zero and not stored - the module computes exactly what bias=False would;
#   * is_causal / tgt_is_causal (PyTorch >= 2.0, where it is only a hint that the mask IS the causal
#     mask): the case passes the causal mask itself (generate_square_subsequent_mask: 0 / -inf)
#     and metadata is_causal = true says so; the C++ test runs it with the mask and again with
#     attn::Causal::TopLeft instead of the mask;
#   * memory_is_causal: likewise, with memory_causal = top_left | bottom_right naming the
#     alignment of the stored [L, S] memory_mask (L != S, so the alignment matters).
# The expectations come from PyTorch's Python path (parameters require grad, so the eval-mode fast
# path torch._transformer_encoder_layer_fwd is not taken); where the fast path applies
# (batch_first, no src_mask, even nhead) the case also runs it under no_grad and asserts that the
# two agree to 1e-12 (metadata fast_path_checked). The encoder stacks use
# enable_nested_tensor=False: with the default True, torch 1.13's nested-tensor fast path returns
# zeros at padded positions instead of what the layers compute there.

LAYER_DIR = "layers"
SUBDIR = {}  # case name -> subdirectory of the output directory


def layer_case(fn):
    CASES[fn.__name__] = fn
    SUBDIR[fn.__name__] = LAYER_DIR
    return fn


def layer_norm_case(name, description, N, E, eps=1e-5, elementwise_affine=True, bias=True, x=None):
    seed_for(name)
    ln = torch.nn.LayerNorm(E, eps=eps, elementwise_affine=elementwise_affine, dtype=F64)
    if elementwise_affine:
        with torch.no_grad():
            ln.weight.copy_(1 + randn(E, scale=0.3))
            ln.bias.copy_(randn(E, scale=0.3) if bias else torch.zeros(E, dtype=F64))  # bias=False (torch >= 2.1)
    if x is None:
        x = randn(N, E, scale=2.0)
    t = {"x": x, "y": ln(x)}
    if elementwise_affine:
        t["weight"] = ln.weight
        if bias:
            t["bias"] = ln.bias
    meta = {"kind": "layer_norm", "normalized_shape": E, "eps": eps, "elementwise_affine": elementwise_affine,
            "bias": bias, "description": description}
    return t, meta


@layer_case
def layer_norm_affine():
    return layer_norm_case("layer_norm_affine", "LayerNorm(10), random weight and bias", N=6, E=10)


@layer_case
def layer_norm_no_affine():
    return layer_norm_case("layer_norm_no_affine", "LayerNorm(12, eps=1e-3, elementwise_affine=False)", N=5,
                           E=12, eps=1e-3, elementwise_affine=False)


@layer_case
def layer_norm_no_bias():
    return layer_norm_case("layer_norm_no_bias", "LayerNorm(7, bias=False): weight only (zero bias in torch 1.13)",
                           N=4, E=7, bias=False)


@layer_case
def layer_norm_large_offset():
    # Rows 1e4 + noise, every value a multiple of 1/64 below 2^15: exact in float, and with E = 8
    # the sum, the mean and the deviations are exact in float too. The one-pass variance
    # E[x^2] - E[x]^2 loses everything here (1e8 - 1e8); the two-pass one is exact.
    seed_for("layer_norm_large_offset")
    x = 1e4 + torch.round(randn(4, 8, scale=128.0)) / 64
    return layer_norm_case("layer_norm_large_offset", "LayerNorm(8), rows 1e4 + noise: needs a two-pass variance",
                           N=4, E=8, x=x)


def feed_forward_case(name, description, N, E, FF, activation, bias=True):
    seed_for(name)
    linear1 = torch.nn.Linear(E, FF, bias=bias, dtype=F64)
    linear2 = torch.nn.Linear(FF, E, bias=bias, dtype=F64)
    act = {"relu": torch.nn.functional.relu, "gelu": torch.nn.functional.gelu}[activation]
    x = randn(N, E, scale=2.0)
    t = {"x": x, "y": linear2(act(linear1(x))), "linear1.weight": linear1.weight, "linear2.weight": linear2.weight}
    if bias:
        t["linear1.bias"], t["linear2.bias"] = linear1.bias, linear2.bias
    meta = {"kind": "feed_forward", "d_model": E, "dim_feedforward": FF, "activation": activation, "bias": bias,
            "description": description}
    return t, meta


@layer_case
def feed_forward_relu():
    return feed_forward_case("feed_forward_relu", "linear2(relu(linear1(x))), 16 -> 40 -> 16", N=7, E=16, FF=40,
                             activation="relu")


@layer_case
def feed_forward_gelu_no_bias():
    return feed_forward_case("feed_forward_gelu_no_bias", "linear2(gelu(linear1(x))) (exact erf gelu), no biases",
                             N=5, E=12, FF=20, activation="gelu", bias=False)


# The biases that PyTorch 2.x's bias=False removes from a transformer layer.
def _is_layer_bias(pname):
    return pname.endswith(".bias") or pname.endswith("in_proj_bias")


def redraw_layer_parameters(module, bias, scale=None):
    """Every parameter redrawn (PyTorch's init leaves biases at zero and norms at 1/0): matrices
    ~ N(0, scale^2) (default 1/sqrt(fan_in)), norm weights 1 + N(0, 0.1^2) ... Without bias the
    biases are zeroed, as if bias=False."""
    with torch.no_grad():
        for pname, p in sorted(module.named_parameters()):
            leaf = pname.rsplit(".", 1)[-1]
            is_norm = ".norm" in "." + pname
            if _is_layer_bias(pname) and not bias:
                p.zero_()
            elif p.dim() == 2:
                p.copy_(randn(*p.shape, scale=scale if scale is not None else 1.0 / float(np.sqrt(p.shape[1]))))
            elif is_norm and leaf == "weight":
                p.copy_(1 + randn(*p.shape, scale=0.1))
            else:
                p.copy_(randn(*p.shape, scale=0.1))


def layer_parameters(module, bias, prefix="", dtype=F64):
    """state_dict tensors, without the biases bias=False removes."""
    return {prefix + n: p.to(dtype) for n, p in module.state_dict().items() if bias or not _is_layer_bias(n)}


def layer_input(B, n, E, unbatched, batch_first, scale=1.0):
    """torch's layout, and attn's 2-D rows."""
    if unbatched:
        x = randn(n, E, scale=scale)
        return x, x
    x = randn(B, n, E, scale=scale) if batch_first else randn(n, B, E, scale=scale)
    return x, x.reshape(-1, E)


def layer_mask(kind, B, H, L, S):
    """kind: None | bool | float | bool3d | float3d | causal_top_left | causal_bottom_right.
    Returns (torch's mask, the stored 2-D mask)."""
    if kind is None:
        return None, None
    if kind == "bool":
        m = random_mask(L, S, 0.35, False)
    elif kind == "float":
        m = bias_with_neg_inf(L, S)
    elif kind == "bool3d":
        m = random_mask(B * H * L, S, 0.35, False).reshape(B * H, L, S)
    elif kind == "float3d":
        m = randn(B * H, L, S, scale=1.5)
    elif kind.startswith("causal_"):
        # generate_square_subsequent_mask's form (0 where allowed, -inf above the diagonal),
        # bottom-right aligned when asked and L != S.
        m = torch.zeros(L, S, dtype=F64).masked_fill(~causal_allowed(L, S, kind[len("causal_"):]), NEG_INF)
    else:
        raise ValueError(kind)
    return m, m.reshape(-1, S)


def unbatched_padding(m, unbatched):
    return None if m is None else (m[0] if unbatched else m)


def transformer_meta(kind, E, H, FF, activation, eps, batch_first, norm_first, bias, B, unbatched, description):
    return {"kind": kind, "d_model": E, "nhead": H, "dim_feedforward": FF, "activation": activation,
            "layer_norm_eps": eps, "batch_first": batch_first, "norm_first": norm_first, "bias": bias,
            "batch": B, "unbatched": unbatched, "description": description}


def encoder_fast_path(layer, src, src_mask, padding, expected):
    """Runs torch 1.13's eval-mode fast path where it applies and checks it against the Python
    path; returns whether it ran."""
    if not (layer.self_attn.batch_first and src.dim() == 3 and src_mask is None and layer.self_attn.num_heads % 2 == 0):
        return False
    with torch.no_grad():
        fast = layer(src, src_key_padding_mask=padding)
    assert torch.allclose(fast, expected, rtol=0, atol=1e-12), float((fast - expected).abs().max())
    return True


def encoder_layer_case(name, description, E, H, L, B=2, FF=None, activation="relu", eps=1e-5, batch_first=False,
                       norm_first=False, bias=True, unbatched=False, src_mask=None, padding=None):
    """src_mask: a layer_mask kind; padding: lengths of the B sequences (src_key_padding_mask)."""
    seed_for(name)
    FF = FF or 2 * E
    layer = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, activation=activation, layer_norm_eps=eps,
                                             batch_first=batch_first, norm_first=norm_first, dtype=F64).eval()
    redraw_layer_parameters(layer, bias)
    src, src2d = layer_input(B, L, E, unbatched, batch_first)
    mask, mask2d = layer_mask(src_mask, B, H, L, L)
    kpm = lengths_padding(padding)(B, L) if padding is not None else None
    out = layer(src, src_mask=mask, src_key_padding_mask=unbatched_padding(kpm, unbatched))
    t = {"src": src2d, "output": out.reshape(-1, E), **layer_parameters(layer, bias)}
    if mask is not None:
        t["src_mask"] = mask2d
    if kpm is not None:
        t["src_key_padding_mask"] = kpm
    meta = transformer_meta("encoder_layer", E, H, FF, activation, eps, batch_first, norm_first, bias, B, unbatched,
                            description)
    meta.update({"src_len": L, "is_causal": src_mask == "causal_top_left",
                 "fast_path_checked": encoder_fast_path(layer, src, mask, kpm, out)})
    return t, meta


@layer_case
def encoder_layer_relu():
    return encoder_layer_case("encoder_layer_relu", "relu, post-norm, [L, B, E], no mask", E=16, H=4, L=5)


@layer_case
def encoder_layer_gelu_batch_first_padding():
    return encoder_layer_case("encoder_layer_gelu_batch_first_padding",
                              "gelu, post-norm, batch_first, src_key_padding_mask", E=16, H=2, L=6,
                              activation="gelu", batch_first=True, padding=[6, 4])


@layer_case
def encoder_layer_norm_first_float_mask():
    return encoder_layer_case("encoder_layer_norm_first_float_mask",
                              "relu, norm_first, batch_first, float src_mask [L, L] with -inf", E=24, H=3, L=5,
                              FF=40, batch_first=True, norm_first=True, src_mask="float")


@layer_case
def encoder_layer_norm_first_bool_mask_padding():
    return encoder_layer_case("encoder_layer_norm_first_bool_mask_padding",
                              "gelu, norm_first, [L, B, E], bool src_mask [L, L] + key padding, eps 1e-3", E=16,
                              H=4, L=7, activation="gelu", eps=1e-3, norm_first=True, src_mask="bool",
                              padding=[7, 5])


@layer_case
def encoder_layer_bool_mask_3d():
    return encoder_layer_case("encoder_layer_bool_mask_3d", "bool src_mask [B*H, L, L], batch_first", E=16, H=2,
                              L=4, batch_first=True, src_mask="bool3d")


@layer_case
def encoder_layer_float_mask_3d_padding():
    return encoder_layer_case("encoder_layer_float_mask_3d_padding",
                              "float src_mask [B*H, L, L] + bool key padding, gelu", E=16, H=2, L=5,
                              activation="gelu", src_mask="float3d", padding=[3, 5])


@layer_case
def encoder_layer_causal():
    return encoder_layer_case("encoder_layer_causal",
                              "is_causal: src_mask = generate_square_subsequent_mask(L), key padding, batch_first",
                              E=16, H=4, L=6, batch_first=True, src_mask="causal_top_left", padding=[6, 4])


@layer_case
def encoder_layer_no_bias():
    return encoder_layer_case("encoder_layer_no_bias", "bias=False (zeroed in torch 1.13), gelu, norm_first",
                              E=16, H=2, L=5, activation="gelu", norm_first=True, bias=False, padding=[5, 2])


@layer_case
def encoder_layer_unbatched():
    return encoder_layer_case("encoder_layer_unbatched", "unbatched [L, E] input, float src_mask", E=32, H=4, L=5,
                              B=1, FF=48, unbatched=True, src_mask="float")


def decoder_layer_case(name, description, E, H, L, S, B=2, FF=None, activation="relu", eps=1e-5,
                       batch_first=False, norm_first=False, bias=True, tgt_mask=None, memory_mask=None,
                       tgt_padding=None, memory_padding=None):
    seed_for(name)
    FF = FF or 2 * E
    layer = torch.nn.TransformerDecoderLayer(E, H, FF, dropout=0.1, activation=activation, layer_norm_eps=eps,
                                             batch_first=batch_first, norm_first=norm_first, dtype=F64).eval()
    redraw_layer_parameters(layer, bias)
    tgt, tgt2d = layer_input(B, L, E, False, batch_first)
    memory, memory2d = layer_input(B, S, E, False, batch_first)
    tmask, tmask2d = layer_mask(tgt_mask, B, H, L, L)
    mmask, mmask2d = layer_mask(memory_mask, B, H, L, S)
    tkpm = lengths_padding(tgt_padding)(B, L) if tgt_padding is not None else None
    mkpm = lengths_padding(memory_padding)(B, S) if memory_padding is not None else None
    out = layer(tgt, memory, tgt_mask=tmask, memory_mask=mmask, tgt_key_padding_mask=tkpm,
                memory_key_padding_mask=mkpm)
    t = {"tgt": tgt2d, "memory": memory2d, "output": out.reshape(-1, E), **layer_parameters(layer, bias)}
    for key, value in (("tgt_mask", tmask2d), ("memory_mask", mmask2d), ("tgt_key_padding_mask", tkpm),
                       ("memory_key_padding_mask", mkpm)):
        if value is not None:
            t[key] = value
    meta = transformer_meta("decoder_layer", E, H, FF, activation, eps, batch_first, norm_first, bias, B, False,
                            description)
    memory_causal = memory_mask[len("causal_"):] if memory_mask and memory_mask.startswith("causal_") else "none"
    meta.update({"tgt_len": L, "memory_len": S, "tgt_is_causal": tgt_mask == "causal_top_left",
                 "memory_causal": memory_causal})
    return t, meta


@layer_case
def decoder_layer_relu():
    return decoder_layer_case("decoder_layer_relu", "relu, post-norm, [L, B, E], L != S, no mask", E=16, H=4, L=5,
                              S=7)


@layer_case
def decoder_layer_gelu_batch_first_masks():
    return decoder_layer_case("decoder_layer_gelu_batch_first_masks",
                              "gelu, post-norm, batch_first: bool tgt_mask, float memory_mask, both key paddings",
                              E=16, H=2, L=4, S=6, activation="gelu", batch_first=True, tgt_mask="bool",
                              memory_mask="float", tgt_padding=[4, 3], memory_padding=[6, 2])


@layer_case
def decoder_layer_norm_first():
    return decoder_layer_case("decoder_layer_norm_first",
                              "relu, norm_first, [L, B, E]: float tgt_mask [B*H, L, L], bool memory_mask [B*H, L, S]",
                              E=24, H=3, L=5, S=3, FF=32, norm_first=True, tgt_mask="float3d", memory_mask="bool3d",
                              memory_padding=[3, 2])


@layer_case
def decoder_layer_causal():
    return decoder_layer_case("decoder_layer_causal",
                              "tgt_is_causal (subsequent mask) and a bottom-right causal memory_mask, L < S, "
                              "batch_first, gelu, norm_first", E=16, H=4, L=4, S=7, activation="gelu",
                              batch_first=True, norm_first=True, tgt_mask="causal_top_left",
                              memory_mask="causal_bottom_right", tgt_padding=[4, 2])


@layer_case
def decoder_layer_no_bias():
    return decoder_layer_case("decoder_layer_no_bias", "bias=False (zeroed in torch 1.13), post-norm, eps 1e-4",
                              E=16, H=2, L=5, S=6, eps=1e-4, bias=False, tgt_mask="causal_top_left",
                              memory_padding=[6, 3])


def encoder_case(name, description, num_layers, E, H, L, B, FF, activation, batch_first, norm_first, final_norm,
                 src_mask=None, padding=None, store=F64, param_scale=None):
    """nn.TransformerEncoder(layer, num_layers, norm, enable_nested_tensor=False), every layer's
    parameters redrawn (PyTorch's clones start equal). store = torch.float16 keeps the parameters
    and src in half precision: the case computes in float64 on exactly the stored (rounded)
    values, so the file is a quarter of the size and the comparison as clean as in float64."""
    seed_for(name)
    layer = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, activation=activation, batch_first=batch_first,
                                             norm_first=norm_first, dtype=F64)
    norm = torch.nn.LayerNorm(E, dtype=F64) if final_norm else None
    enc = torch.nn.TransformerEncoder(layer, num_layers, norm=norm, enable_nested_tensor=False).eval()
    redraw_layer_parameters(enc, True, param_scale)
    src, src2d = layer_input(B, L, E, False, batch_first)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(p.to(store).to(F64))
        src = src.to(store).to(F64)
        src2d = src2d.to(store).to(F64)
    mask, mask2d = layer_mask(src_mask, B, H, L, L)
    kpm = lengths_padding(padding)(B, L) if padding is not None else None
    out = enc(src, mask=mask, src_key_padding_mask=kpm)
    t = {"src": src2d.to(store), "output": out.reshape(-1, E), **layer_parameters(enc, True, dtype=store)}
    if mask is not None:
        t["mask"] = mask2d
    if kpm is not None:
        t["src_key_padding_mask"] = kpm
    meta = transformer_meta("encoder", E, H, FF, activation, 1e-5, batch_first, norm_first, True, B, False,
                            description)
    meta.update({"src_len": L, "num_layers": num_layers, "final_norm": final_norm, "is_causal": False})
    return t, meta


@layer_case
def encoder_3_layers_final_norm():
    return encoder_case("encoder_3_layers_final_norm",
                        "TransformerEncoder: 3 layers, gelu, norm_first, final norm, [L, B, E], float mask + padding",
                        num_layers=3, E=16, H=2, L=5, B=2, FF=32, activation="gelu", batch_first=False,
                        norm_first=True, final_norm=True, src_mask="float", padding=[5, 3])


@layer_case
def encoder_6_layers_e256():
    # 3.16 M parameters: 25 MB in float64, 12.6 MB in float32, 6.3 MB in float16 (stored so).
    return encoder_case("encoder_6_layers_e256",
                        "TransformerEncoder: 6 layers, d_model 256, nhead 8, dim_feedforward 512, L 128, B 2, "
                        "gelu, post-norm, batch_first, key padding; parameters and src stored as float16",
                        num_layers=6, E=256, H=8, L=128, B=2, FF=512, activation="gelu", batch_first=True,
                        norm_first=False, final_norm=False, padding=[128, 97], store=torch.float16)


# ---------------------------------------------------------------------------------------------

def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
        print(__doc__)
        return 0 if len(argv) == 2 else 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = argv[1] if len(argv) == 2 else os.path.join(root, "tests", "data")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)  # one reduction order, whatever the machine
    total = 0
    for name, fn in CASES.items():
        tensors, meta = fn()
        meta = {"case": name, "generator": "tools/gen_fixtures.py", "torch_version": torch.__version__, **meta}
        os.makedirs(os.path.join(out_dir, SUBDIR.get(name, "")), exist_ok=True)
        path = os.path.join(out_dir, SUBDIR.get(name, ""), name + ".safetensors")
        write_safetensors(path, tensors, meta)
        total += os.path.getsize(path)
    stale = []
    for d in sorted({""} | set(SUBDIR.values())):
        folder = os.path.join(out_dir, d)
        for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            name = f[: -len(".safetensors")]
            if f.endswith(".safetensors") and (name not in CASES or SUBDIR.get(name, "") != d):
                stale.append(os.path.join(d, f))
    for f in stale:
        print(f"warning: {os.path.join(out_dir, f)} is not a case of this script (stale?)", file=sys.stderr)
    print(f"wrote {len(CASES)} fixtures, {total} bytes, to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
