#!/usr/bin/env python3
"""tools/ort_decode_models.py - the one-node ONNX models that tools/ort_decode.sh times.

Writes, into OUT_DIR, one model per (num_heads, kv_num_heads) pair: a single
com.microsoft.GroupQueryAttention node (fp32, head size D, no rotary, causal), every
dimension but the head widths symbolic, so one model serves every batch size and cache length:

  query          [B, 1, H*D]          the new token's query (sequence_length 1: a decode step)
  key, value     [B, 1, Hkv*D]        the new token's key and value
  past_key       [B, Hkv, S_max, D]   the KV cache (BNSH), bound by ort_decode.js to the same
  past_value     [B, Hkv, S_max, D]   buffers as present_key/present_value ("past/present
                                      share buffer": ORT's CPU kernel compares the pointers)
  seqlens_k      [B] int32            total keys - 1 per batch entry (S - 1)
  total_sequence_length [] int32      S, the longest total in the batch
  -> output      [B, 1, H*D]
  -> present_key, present_value [B, Hkv, S_max, D]

The numpy reference for the correctness check is here too (`--check CASE.json`): ort_decode.js
runs ORT on a small case and dumps inputs, ORT's output and the cache as ORT left it; this
recomputes the step in float64 and prints the max abs error (exit status 1 above 1e-4 of the
output's magnitude, or if the cache rows differ).

Usage:
  ort_decode_models.py OUT_DIR [--heads 32:32,32:8,4:2] [--head-dim 128]
  ort_decode_models.py --check CASE.json      (numpy reference for the small check case)

Needs Debian's python3-onnx (onnx 1.12: its checker knows opsets up to 17, so the model is
stamped opset 23 without running the checker; the only node is in the com.microsoft domain).
"""
import argparse
import json
import os
import sys


def make_gqa_model(num_heads, kv_num_heads, head_dim):
    from onnx import TensorProto, helper

    hd = num_heads * head_dim
    kvd = kv_num_heads * head_dim
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("query", f32, ["B", 1, hd]),
        helper.make_tensor_value_info("key", f32, ["B", 1, kvd]),
        helper.make_tensor_value_info("value", f32, ["B", 1, kvd]),
        helper.make_tensor_value_info("past_key", f32, ["B", kv_num_heads, "S_max", head_dim]),
        helper.make_tensor_value_info("past_value", f32, ["B", kv_num_heads, "S_max", head_dim]),
        helper.make_tensor_value_info("seqlens_k", i32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", f32, ["B", 1, hd]),
        helper.make_tensor_value_info("present_key", f32, ["B", kv_num_heads, "S_max", head_dim]),
        helper.make_tensor_value_info("present_value", f32, ["B", kv_num_heads, "S_max", head_dim]),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        [i.name for i in inputs],
        [o.name for o in outputs],
        domain="com.microsoft",
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        name="gqa",
    )
    graph = helper.make_graph([node], f"gqa_H{num_heads}_Hkv{kv_num_heads}_D{head_dim}", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
        producer_name="attn tools/ort_decode_models.py",
    )
    model.ir_version = 10  # onnx 1.12 would stamp 8; ORT 1.30 reads 10
    return model


def write_models(out_dir, pairs, head_dim):
    import onnx

    os.makedirs(out_dir, exist_ok=True)
    for h, hkv in pairs:
        path = os.path.join(out_dir, f"gqa_H{h}_Hkv{hkv}_D{head_dim}.onnx")
        onnx.save(make_gqa_model(h, hkv, head_dim), path)
        print(path)


def reference(case):
    """Plain numpy decode step: each batch entry b has total = seqlens_k[b] + 1 keys, the first
    total - 1 from the cache and the last the new key; query head h reads kv head h // (H / Hkv)."""
    import numpy as np

    B, H, Hkv, D, S_max = case["B"], case["H"], case["Hkv"], case["D"], case["S_max"]
    q = np.asarray(case["query"], dtype=np.float64).reshape(B, H, D)
    k_new = np.asarray(case["key"], dtype=np.float64).reshape(B, Hkv, D)
    v_new = np.asarray(case["value"], dtype=np.float64).reshape(B, Hkv, D)
    K = np.asarray(case["past_key"], dtype=np.float64).reshape(B, Hkv, S_max, D).copy()
    V = np.asarray(case["past_value"], dtype=np.float64).reshape(B, Hkv, S_max, D).copy()
    out = np.zeros((B, H, D))
    for b in range(B):
        t = case["seqlens_k"][b] + 1
        K[b, :, t - 1] = k_new[b]
        V[b, :, t - 1] = v_new[b]
        for h in range(H):
            g = h // (H // Hkv)
            s = K[b, g, :t] @ q[b, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[b, h] = p @ V[b, g, :t]
    return out.reshape(B, 1, H * D), K, V


def check(path):
    import numpy as np

    with open(path) as f:
        case = json.load(f)
    out, K, V = reference(case)
    got = np.asarray(case["ort_output"], dtype=np.float64).reshape(out.shape)
    err = float(np.max(np.abs(got - out)))
    # ORT wrote the new key/value into the shared cache at position seqlens_k[b]: compare the
    # cache as ORT left it (past buffer after the run) with the reference's, valid rows only.
    B = case["B"]
    kv_err = 0.0
    for name, ref in (("ort_past_key_after", K), ("ort_past_value_after", V)):
        after = np.asarray(case[name], dtype=np.float64).reshape(ref.shape)
        for b in range(B):
            t = case["seqlens_k"][b] + 1
            kv_err = max(kv_err, float(np.max(np.abs(after[b, :, :t] - ref[b, :, :t]))))
    scale = float(np.max(np.abs(out)))
    print(json.dumps({"max_abs_err": err, "max_abs_ref": scale, "cache_max_abs_err": kv_err}))
    return 0 if err <= 1e-4 * max(1.0, scale) and kv_err == 0.0 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--heads", default="32:32,32:8,4:2", help="num_heads:kv_num_heads pairs")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--check", metavar="CASE.json", help="compare ORT's output in CASE.json with numpy")
    a = ap.parse_args()
    if a.check:
        return check(a.check)
    if not a.out_dir:
        ap.error("OUT_DIR is required")
    pairs = [tuple(int(x) for x in p.split(":")) for p in a.heads.split(",")]
    write_models(a.out_dir, pairs, a.head_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
