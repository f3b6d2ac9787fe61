#!/usr/bin/python3
"""Write the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Usage (from the repository root; plain python3, no packages):

    python3 tools/gen_fuzz_corpus.py [OUTPUT_DIR]      # default fuzz/corpus

safetensors_fuzz/  files that open, one feature each (every dtype with its special values, BOOL
                   and the integer dtypes, scalar and empty shapes, metadata, data not aligned
                   for map(), gaps between tensors), a real PyTorch file from tests/data/, and a
                   few malformed ones (each must be an attn::format_error).
attention_fuzz/    inputs in fuzz/attention_fuzz.cpp's byte layout, which the functions below
                   spell out: each public class with each option and mask, both scalar types, 1
                   and 2 threads, shapes large enough that the kernels split work over threads,
                   and calls that must be refused.

Deterministic: the same bytes on every run, so these seeds are regenerated, not merged. Inputs
named regress_* reproduce fixed bugs: those below are rewritten, and any other (a crash file from
tools/fuzz.sh, renamed) is kept as it is; so are the inputs a campaign added (tools/fuzz.sh
--campaign, files named by their SHA-1). The other targets (checkpoint_fuzz, serving_fuzz,
dist_fuzz) have only campaign-grown corpora.
"""

import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- safetensors ---------------------------------------------------------------------------------

def safetensors(tensors, metadata=None, align=True, header=None):
    """tensors: [(name, dtype, shape, data bytes)] in data order; returns the file's bytes."""
    h, data = {}, b""
    if metadata is not None:
        h["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = header if header is not None else json.dumps(h, separators=(",", ":"))
    if align:
        text += " " * (-len(text) % 8)
    text = text.encode()
    return struct.pack("<Q", len(text)) + text + data


def f32(*xs):
    return struct.pack("<%df" % len(xs), *xs)


def f64(*xs):
    return struct.pack("<%dd" % len(xs), *xs)


def u16(*xs):
    return struct.pack("<%dH" % len(xs), *xs)


INF, NAN = float("inf"), float("nan")


def safetensors_corpus():
    c = {}
    c["f32_f64_metadata"] = safetensors(
        [("weight", "F32", [2, 3], f32(1, -2, 0.5, 0, -0.0, 3e38)), ("bias", "F64", [3], f64(1e-310, -1, 2))],
        metadata={"format": "pt", "note": "seed"})
    # F16: 1, -2, max, smallest subnormal, inf, -inf, NaN, -0; BF16 the same kinds.
    c["f16_bf16"] = safetensors([
        ("h", "F16", [2, 4], u16(0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0xFC00, 0x7E00, 0x8000)),
        ("b", "BF16", [8], u16(0x3F80, 0xC000, 0x7F7F, 0x0001, 0x7F80, 0xFF80, 0x7FC0, 0x8000))])
    c["f8"] = safetensors([("e5m2", "F8_E5M2", [1, 8], bytes([0x3C, 0xC0, 0x7B, 0x01, 0x7C, 0xFC, 0x7E, 0x80])),
                           ("e4m3", "F8_E4M3", [8], bytes([0x38, 0xC0, 0x7E, 0x01, 0x7F, 0xFF, 0x08, 0x80]))])
    c["scalar_and_empty"] = safetensors([("s", "F32", [], f32(2.5)), ("e", "F32", [0, 4], b""),
                                         ("e3", "F64", [2, 0, 3], b""), ("one", "F64", [1, 1, 3], f64(1, 2, 3))])
    c["bool_and_integers"] = safetensors([
        ("mask", "BOOL", [2, 3], bytes([1, 0, 1, 1, 0, 0])), ("bad_mask", "BOOL", [2], bytes([1, 2])),
        ("u8", "U8", [2], bytes([0, 255])), ("i8", "I8", [2], bytes([0, 128])), ("i16", "I16", [1], u16(7)),
        ("u16", "U16", [1], u16(7)), ("i32", "I32", [1], struct.pack("<i", -1)),
        ("u32", "U32", [1], struct.pack("<I", 1)), ("i64", "I64", [1], struct.pack("<q", -1)),
        ("u64", "U64", [1], struct.pack("<Q", 1))])
    # A header of odd length: the data starts unaligned, so map() refuses and matrix() converts.
    c["unaligned"] = safetensors([("x", "F32", [3], f32(1, 2, 3)), ("y", "F64", [1], f64(4))], align=False)
    # A gap of 4 bytes between the tensors (allowed here), and an unknown field (ignored).
    gap = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})
    c["gap_unknown_field"] = safetensors([], header=gap) + f32(1, 0, 2)
    c["malformed_overlap"] = safetensors([], header=json.dumps({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})) + bytes(12)
    c["malformed_duplicate"] = safetensors(
        [], header='{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],'
                   '"data_offsets":[0,4]}}') + bytes(4)
    c["malformed_shape"] = safetensors([], header=json.dumps({
        "a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})) + bytes(4)
    c["malformed_length"] = struct.pack("<Q", 2 ** 63) + b"{}"
    c["malformed_json"] = safetensors([], header='{"a": [1, 2')
    with open(os.path.join(ROOT, "tests", "data", "linear_bias.safetensors"), "rb") as f:
        c["pytorch_linear_bias"] = f.read()
    # Nesting past the limit of 64 levels (deep enough, 300,000 levels, it overflowed the stack:
    # SafeTensorsTest.RejectsDeepNestingWithoutOverflowingTheStack).
    c["regress_deep_nesting"] = safetensors([], header=json.dumps(
        {"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "note": []}}).replace("[]", "[" * 80 + "]" * 80))
    # Valid JSON followed by a NUL and garbage: nlohmann stopped at the NUL and the file opened
    # (issue 18); trailing garbage without one; both are format_errors now, as in Python's json.
    one = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    c["regress_nul_after_header"] = safetensors([], header=one + "\0garbage") + f32(1)
    c["regress_trailing_garbage"] = safetensors([], header=one + " x") + f32(1)
    # Many empty tensors (the 1.5 million, scaled down): a header cheap per byte to write
    # and costly per byte to hold.
    c["many_empty_tensors"] = safetensors([], header="{" + ",".join(
        '"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(300)) + "}")
    return c


# --- attention_fuzz's byte layout ----------------------------------------------------------------

SPECIAL = ["0", "-0", "nan", "inf", "-inf", "max", "lowest", "denorm_min", "-denorm_min", "subnormal", "min",
           "epsilon", "1e30", "-1e30", "1e15", "-1e15", "88.5", "-104", "710", "1e-20", "1e6", "-1e6", "sqrt_max",
           "-sqrt_max"]


def val(x):
    """One value byte: x in [-7.25, 7.1875] in steps of 1/16, or the name of a special value."""
    if isinstance(x, str):
        return 232 + SPECIAL.index(x)
    b = round(x * 16) + 116
    assert 0 <= b < 232, x
    return b


def values(n, start=0):
    """n plain values, a fixed pattern in [-1.5, 1.5]."""
    return [val(((start + 7 * i) % 13 - 6) / 4) for i in range(n)]


def bits(n, pattern):
    """n bools packed 8 to a byte, least significant bit first; pattern(i) -> bool."""
    out = [0] * ((n + 7) // 8)
    for i in range(n):
        if pattern(i):
            out[i // 8] |= 1 << (i % 8)
    return out


def masks(B, H, L, S, mask=None, bias=None, padding=None, causal=0, window=None, softcap=None, alibi=None):
    """attention_fuzz's read_masks. mask: (per_head, attend, pattern); bias: (per_head, [values]);
    padding: (attend, pattern); causal: 0 none, 1 top-left, 2 bottom-right; window: byte;
    softcap: value; alibi: [H values]."""
    which = (1 if mask else 0) | (2 if bias else 0) | (4 if padding else 0) | (causal << 3)
    which |= (32 if window is not None else 0) | (64 if softcap is not None else 0) | (128 if alibi else 0)
    out = [which]
    if mask:
        per_head, attend, pattern = mask
        out += [(4 if per_head else 0) | (8 if attend else 0)]
        out += bits((B * H * L if per_head else L) * S, pattern)
    if bias:
        per_head, vals = bias
        out += [4 if per_head else 0] + [val(v) for v in vals]
    if padding:
        attend, pattern = padding
        out += [8 if attend else 0] + bits(B * S, pattern)
    if window is not None:
        out += [window]
    if softcap is not None:
        out += [val(softcap)]
    if alibi:
        out += [0] + [val(v) for v in alibi]
    return out


def head(op, double=False, two_threads=False):
    return [op | (4 if double else 0) | (8 if two_threads else 0)]


def sdpa(L, S, d, dv, call=0, scale=None, q=None, k=None, v=None, double=False, two_threads=False, **m):
    """call: 0 forward, 1 forward_into, 2 forward_with_weights."""
    mode = (1 if scale is not None else 0) | (call << 1)
    out = head(0, double, two_threads) + [mode, L, S, d, dv]
    if scale is not None:
        out += [val(scale)]
    out += q or values(L * d, 1)
    out += k or values(S * d, 2)
    out += v or values(S * dv, 3)
    return bytes(out + masks(1, 1, L, S, **m))


def mha(E, H, B, L, S=None, kdim=0, vdim=0, bias=True, bias_kv=False, zero_attn=False, batch_first=False,
        inputs=0, need_weights=False, average=True, into=False, double=False, two_threads=False, short=False, **m):
    """inputs: 0 self-attention (one matrix), 1 key and value one matrix, 2 three matrices.
    short: stop after the shapes (see gqa)."""
    opts = (1 if bias else 0) | (2 if bias_kv else 0) | (4 if zero_attn else 0) | (8 if batch_first else 0)
    opts |= (16 if kdim else 0) | (32 if vdim else 0) | (inputs << 6)
    mode = (1 if need_weights else 0) | (2 if average else 0) | (4 if into else 0)
    out = head(1, double, two_threads) + [opts, mode, E, H] + ([kdim] if kdim else []) + ([vdim] if vdim else [])
    S = L if inputs == 0 else S
    out += [B, L] + ([S] if inputs else [])
    if short:
        return bytes(out)
    kd, vd = kdim or E, vdim or E
    if kd == E and vd == E:
        out += values(3 * E * E, 4)
    else:
        out += values(E * E, 5) + values(E * kd, 6) + values(E * vd, 7)
    if bias:
        out += values(3 * E, 8)
    if bias_kv:
        out += values(2 * E, 9)
    out += values(E * E, 10) + (values(E, 11) if bias else [])
    out += values(B * L * E, 12)
    if inputs >= 1:
        out += values(B * S * kd, 13)
    if inputs >= 2:
        out += values(B * S * vd, 14)
    return bytes(out + masks(B, H, L, S, **m))


def gqa(H, Hkv, B, L, S, d, dv, scale=None, into=False, double=False, two_threads=False, raw_kv_heads=False,
        short=False, **m):
    """Hkv must divide H unless raw_kv_heads. short: stop after the shapes, so that the values come
    from attention_fuzz's stream past the end (and every later choice, the masks, reads 0): big
    shapes in a few bytes."""
    mode = (1 if scale is not None else 0) | (2 if into else 0) | (32 if raw_kv_heads else 0)
    if raw_kv_heads or H == 0:
        kv = Hkv
    else:
        kv = [h for h in range(1, H + 1) if H % h == 0].index(Hkv)
    out = head(2, double, two_threads) + [mode, H, kv] + ([val(scale)] if scale is not None else [])
    out += [B, L, S, d, dv]
    if short:
        return bytes(out)
    out += values(B * L * H * d, 15) + values(B * S * Hkv * d, 16) + values(B * S * Hkv * dv, 17)
    return bytes(out + masks(B, H, L, S, **m))


def attention_corpus():
    c = {}
    c["sdpa_plain"] = sdpa(3, 4, 2, 3)
    c["sdpa_weights_causal_bottom_right_padding_f64"] = sdpa(
        5, 3, 4, 2, call=2, double=True, causal=2, padding=(False, lambda i: i == 2))
    c["sdpa_every_mask"] = sdpa(
        6, 7, 3, 2, call=2, mask=(False, True, lambda i: i % 5 != 1),
        bias=(False, [(i % 7 - 3) / 2 for i in range(42)]), padding=(True, lambda i: i != 0), causal=1, window=4,
        softcap=2.5, alibi=[0.5])
    c["sdpa_decode_window_into"] = sdpa(1, 9, 4, 4, call=1, causal=1, window=3)
    c["sdpa_minus_inf_bias_scale"] = sdpa(
        2, 3, 2, 2, scale=-0.25, bias=(False, ["-inf", 0, 1, "-inf", "-inf", "-inf"]))
    c["sdpa_special_values"] = sdpa(2, 2, 2, 2, q=[val("nan"), val("inf"), val("1e30"), val("denorm_min")],
                                     k=[val("sqrt_max"), val("-0"), val("max"), val("subnormal")])
    c["sdpa_scale_nan_refused"] = sdpa(2, 2, 2, 2, scale="nan")
    c["sdpa_zero_keys_refused"] = sdpa(2, 0, 2, 2)
    c["mha_self_weights_averaged"] = mha(8, 2, 2, 3, need_weights=True, causal=2)
    c["mha_kdim_vdim_bias_kv_zero_attn_per_head_f64"] = mha(
        6, 3, 2, 3, S=4, kdim=5, vdim=4, bias_kv=True, zero_attn=True, batch_first=True, inputs=2, need_weights=True,
        average=False, double=True, padding=(False, lambda i: i % 4 == 3))
    c["mha_shared_kv_into_masks"] = mha(
        4, 2, 3, 2, S=5, inputs=1, into=True, two_threads=True, mask=(True, False, lambda i: i % 3 == 0),
        bias=(True, [(i % 5 - 2) / 4 for i in range(3 * 2 * 2 * 5)]))
    c["mha_no_bias_batch_first"] = mha(4, 4, 2, 2, S=3, bias=False, batch_first=True, inputs=2, window=2)
    c["mha_heads_not_dividing_refused"] = mha(6, 4, 1, 2)
    c["mha_decode_threads"] = mha(40, 8, 40, 4, S=40, inputs=2, two_threads=True, short=True)
    c["gqa_group2_causal_alibi"] = gqa(4, 2, 2, 5, 7, 3, 2, causal=2, window=4, alibi=[0.5, 0.25, 0.125, 0.0625])
    c["gqa_mqa_top_left_softcap_f64"] = gqa(4, 1, 1, 6, 4, 2, 3, double=True, causal=1, softcap=1.5,
                                            padding=(True, lambda i: i < 3))
    c["gqa_scale_into_mask_per_head"] = gqa(2, 2, 2, 3, 3, 2, 2, scale=0.5, into=True,
                                            mask=(True, True, lambda i: i % 4 != 0))
    c["gqa_kv_heads_not_dividing_refused"] = gqa(4, 3, 1, 2, 2, 2, 2, raw_kv_heads=True)
    # Enough work that the flash and decode kernels split it over two threads (values from the stream).
    c["gqa_flash_threads"] = gqa(32, 8, 8, 40, 40, 16, 16, two_threads=True, short=True)
    c["gqa_decode_threads"] = gqa(32, 4, 8, 2, 40, 40, 40, short=True)
    # A window of Index's largest value overflowed a + window (signed: undefined behaviour) in the
    # kernels' key ranges, with bottom-right positions (a > 0) and top-left ones.
    c["regress_window_index_max"] = sdpa(3, 4, 2, 3, window=255)
    c["regress_window_index_max_top_left"] = gqa(2, 1, 1, 5, 2, 2, 2, causal=1, window=254)
    return c


def grown(name):
    """An input a fuzzing campaign added (tools/fuzz.sh --campaign): libFuzzer names them by SHA-1."""
    return len(name) == 40 and all(ch in "0123456789abcdef" for ch in name)


def write(directory, corpus):
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # regenerate, keeping the regression and campaign inputs
        if not name.startswith("regress_") and not grown(name):
            os.remove(os.path.join(directory, name))
    for name, data in sorted(corpus.items()):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "fuzz", "corpus")
    write(os.path.join(out, "safetensors_fuzz"), safetensors_corpus())
    write(os.path.join(out, "attention_fuzz"), attention_corpus())


if __name__ == "__main__":
    main()
