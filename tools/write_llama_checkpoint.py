#!/usr/bin/python3
"""Write a random-weight Llama checkpoint directory with TinyLlama-1.1B's shapes, as a benchmark
input (not a test fixture: never commit its output).

Usage (with Debian's python3-torch):

    /usr/bin/python3 tools/write_llama_checkpoint.py OUT_DIR [--shards 2] [--layers 22] [--dtype bfloat16]

OUT_DIR gets what `save_pretrained` writes for TinyLlama/TinyLlama-1.1B-Chat-v1.0's shapes:
config.json (TinyLlama's: vocab 32000, hidden 2048, intermediate 5632, 32 heads, 4 kv heads,
rope_theta 10000, rms_norm_eps 1e-5, max_position_embeddings 2048, untied lm_head; num_hidden_layers
from --layers, default 22; torch_dtype from --dtype), and the weights of LlamaForCausalLM
(model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight,
model.norm.weight, lm_head.weight) in --shards safetensors files
model-0000k-of-0000N.safetensors (split in state_dict order at equal shares of the bytes) plus
model.safetensors.index.json; with --shards 1, one model.safetensors.

Linear and embedding weights are N(0, 0.02^2) (LlamaConfig's initializer_range), norm weights 1, drawn
from a generator seeded with 0 (the same files on every run). The writer streams: each file's header is
computed from the shapes first, then every tensor is drawn in float32 a chunk at a time, converted and
written, so memory stays at one chunk (the 22-layer model is 2.2 GB in bf16).
"""

import argparse
import json
import os
import struct
import sys
import time

import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "use_cache": True,
    "vocab_size": 32000,
}

DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}
CHUNK = 1 << 22  # elements drawn at once


def tensors(config):
    """(name, shape, init) in LlamaForCausalLM's state_dict order; init "normal" or "ones"."""
    E, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    D = E // H
    out = [("model.embed_tokens.weight", (V, E), "normal")]
    for i in range(config["num_hidden_layers"]):
        n = f"model.layers.{i}."
        out += [(n + "self_attn.q_proj.weight", (H * D, E), "normal"),
                (n + "self_attn.k_proj.weight", (KV * D, E), "normal"),
                (n + "self_attn.v_proj.weight", (KV * D, E), "normal"),
                (n + "self_attn.o_proj.weight", (E, H * D), "normal"),
                (n + "mlp.gate_proj.weight", (I, E), "normal"),
                (n + "mlp.up_proj.weight", (I, E), "normal"),
                (n + "mlp.down_proj.weight", (E, I), "normal"),
                (n + "input_layernorm.weight", (E,), "ones"),
                (n + "post_attention_layernorm.weight", (E,), "ones")]
    out.append(("model.norm.weight", (E,), "ones"))
    if not config["tie_word_embeddings"]:
        out.append(("lm_head.weight", (V, E), "normal"))
    return out


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def split(specs, shards, esize):
    """Consecutive groups of specs, each starting where the previous share of the bytes ends."""
    total = sum(numel(s) for _, s, _ in specs) * esize
    parts = [[] for _ in range(shards)]
    done = 0
    for spec in specs:
        parts[min(shards - 1, done * shards // total)].append(spec)
        done += numel(spec[1]) * esize
    if not all(parts):
        raise SystemExit(f"--shards {shards}: more shards than the tensors fill")
    return parts, total


def header_bytes(specs, code, esize):
    """The safetensors header of a file holding specs, tensors in name order (one dtype: the order
    the reference writer uses), and that order."""
    order = sorted(specs, key=lambda s: s[0])
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in order:
        n = numel(shape) * esize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_tensor(f, shape, init, dtype, gen):
    n = numel(shape)
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    if init == "ones":
        f.write(torch.ones(n, dtype=dtype).view(view).numpy().tobytes())
        return
    buf = torch.empty(min(n, CHUNK), dtype=torch.float32)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        chunk = buf[:m].normal_(0.0, 0.02, generator=gen)
        f.write(chunk.to(dtype).view(view).numpy().tobytes())


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = p.parse_args(argv[1:])
    if sys.byteorder != "little":
        raise SystemExit("writes native bytes: needs a little-endian machine")
    if args.shards < 1 or args.layers < 1:
        p.error("--shards and --layers must be at least 1")
    t0 = time.time()
    dtype, code = DTYPES[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    config = dict(CONFIG, num_hidden_layers=args.layers, torch_dtype=args.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specs = tensors(config)
    parts, total = split(specs, args.shards, esize)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, part in enumerate(parts):
        fname = "model.safetensors" if args.shards == 1 else f"model-{k + 1:05d}-of-{args.shards:05d}.safetensors"
        head, order = header_bytes(part, code, esize)
        with open(os.path.join(args.out_dir, fname), "wb") as f:
            f.write(head)
            for name, shape, init in order:
                write_tensor(f, shape, init, dtype, gen)
        weight_map.update({name: fname for name, _, _ in part})
    if args.shards > 1:
        with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
                               sort_keys=True) + "\n")
    params = sum(numel(s) for _, s, _ in specs)
    print(f"wrote {args.out_dir}: {params} parameters, {total} bytes of {args.dtype} in {args.shards} file(s), "
          f"{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
