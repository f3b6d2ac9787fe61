#!/usr/bin/python3
"""Write attn's golden test fixtures: expected values computed by PyTorch in float64.

Usage (from the repository root, with Debian's python3-torch and python3-numpy):

    /usr/bin/python3 tools/gen_fixtures.py [OUTPUT_DIR]

OUTPUT_DIR defaults to tests/data/. One file per case, named after the case
(linear_*, sdpa_*, mha_*), in the safetensors format, written here with json + struct:

    u64 little-endian N | N bytes of JSON header (space padded to a multiple of 8) | raw data

The header maps each tensor name to {"dtype", "shape", "data_offsets"} ("F64" little-endian
doubles, or "BOOL" one byte 0/1), and "__metadata__" (string -> string) holds the case's
configuration: kind (linear | sdpa | mha), its dimensions and options, and a description.
tests/pytorch_fixture_test.cpp reads every file through tests/support/fixture.hpp.

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
rewrites byte-identical files, and adding a case leaves the others unchanged.
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
    """tensors: name -> float64 or bool torch tensor; metadata: name -> str/int/float/bool."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype == F64:
            dtype, raw = "F64", t.numpy().astype("<f8").tobytes()
        elif t.dtype == torch.bool:
            dtype, raw = "BOOL", t.numpy().astype(np.uint8).tobytes()
        else:
            raise TypeError(f"{path}: tensor {name} has dtype {t.dtype}; only float64 and bool are written")
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
        path = os.path.join(out_dir, name + ".safetensors")
        write_safetensors(path, tensors, meta)
        total += os.path.getsize(path)
    stale = sorted(f for f in os.listdir(out_dir)
                   if f.endswith(".safetensors") and f[: -len(".safetensors")] not in CASES)
    for f in stale:
        print(f"warning: {os.path.join(out_dir, f)} is not a case of this script (stale?)", file=sys.stderr)
    print(f"wrote {len(CASES)} fixtures, {total} bytes, to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
