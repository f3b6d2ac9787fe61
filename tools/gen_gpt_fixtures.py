#!/usr/bin/python3
"""Write the golden fixtures of the Llama-style layers (RMSNorm, SwiGLU) into tests/data/gpt/:
expected values computed by PyTorch in float64, in the format and with the conventions of
tools/gen_fixtures.py (whose writer this script uses).

Usage (from the repository root, with Debian's python3-torch and python3-numpy):

    /usr/bin/python3 tools/gen_gpt_fixtures.py [OUTPUT_DIR]

OUTPUT_DIR defaults to tests/data/gpt/. One file per case:

  * rms_norm_*: x [N, E], weight [E] -> y [N, E]; metadata dim, eps. torch 1.13 has no
    nn.RMSNorm, so the expectation is Hugging Face's LlamaRMSNorm written out:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    Read by tests/rms_norm_test.cpp.
  * swiglu_*: x [N, d_model], gate_proj.weight / up_proj.weight [ffn_dim, d_model],
    down_proj.weight [d_model, ffn_dim] (and .bias with bias) -> y [N, d_model]; metadata
    d_model, ffn_dim, bias. The expectation is LlamaMLP's
        y = down_proj(F.silu(gate_proj(x)) * up_proj(x))
    Read by tests/swiglu_test.cpp.

The tiny GPT's generations (tests/data/gpt/tiny_gpt_generations.safetensors) come from
tools/train_tiny_gpt.py, not from here.

Deterministic, as gen_fixtures.py: each case seeds torch from a CRC of its name.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import F64, randn, seed_for, write_safetensors  # noqa: E402

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def rms_norm_torch(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_norm_case(name, description, N, E, eps, x=None):
    seed_for(name)
    weight = 1 + randn(E, scale=0.3)
    if x is None:
        x = randn(N, E, scale=2.0)
    return ({"x": x, "weight": weight, "y": rms_norm_torch(x, weight, eps)},
            {"kind": "rms_norm", "dim": E, "eps": eps, "description": description})


@case
def rms_norm_llama():
    return rms_norm_case("rms_norm_llama", "LlamaRMSNorm(10, eps=1e-6), random weight", N=6, E=10, eps=1e-6)


@case
def rms_norm_row_scales():
    # Rows of very different scales: 1e3 (eps negligible), 1 and 1e-3, where mean(x^2) ~ 1e-6 is
    # of the order of eps = 1e-5 and changes the result; and a row of zeros, which stays zero.
    seed_for("rms_norm_row_scales")
    E = 64
    x = torch.cat([randn(1, E, scale=1e3), randn(2, E), randn(2, E, scale=1e-3), torch.zeros(1, E, dtype=F64)])
    return rms_norm_case("rms_norm_row_scales", "LlamaRMSNorm(64, eps=1e-5), rows of scale 1e3, 1, 1e-3 and 0",
                         N=6, E=E, eps=1e-5, x=x)


def swiglu_case(name, description, N, E, FF, bias, x_scale=2.0):
    seed_for(name)
    gate = torch.nn.Linear(E, FF, bias=bias, dtype=F64)
    up = torch.nn.Linear(E, FF, bias=bias, dtype=F64)
    down = torch.nn.Linear(FF, E, bias=bias, dtype=F64)
    x = randn(N, E, scale=x_scale)
    t = {"x": x, "y": down(F.silu(gate(x)) * up(x)), "gate_proj.weight": gate.weight, "up_proj.weight": up.weight,
         "down_proj.weight": down.weight}
    if bias:
        t["gate_proj.bias"], t["up_proj.bias"], t["down_proj.bias"] = gate.bias, up.bias, down.bias
    return t, {"kind": "swiglu", "d_model": E, "ffn_dim": FF, "bias": bias, "description": description}


@case
def swiglu_llama():
    return swiglu_case("swiglu_llama", "down_proj(silu(gate_proj(x)) * up_proj(x)), 16 -> 44 -> 16, no bias",
                       N=7, E=16, FF=44, bias=False)


@case
def swiglu_bias():
    return swiglu_case("swiglu_bias", "SwiGLU 12 -> 20 -> 12 with biases (mlp_bias = true)", N=5, E=12, FF=20,
                       bias=True)


@case
def swiglu_saturated():
    # |gate| up to a few hundred: silu(g) is g for large g and -0 for large negative g, where
    # exp(-g) overflows float.
    return swiglu_case("swiglu_saturated", "SwiGLU 8 -> 24 -> 8, x of scale 200: silu saturates both ways", N=4,
                       E=8, FF=24, bias=False, x_scale=200.0)


def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
        print(__doc__)
        return 0 if len(argv) == 2 else 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = argv[1] if len(argv) == 2 else os.path.join(root, "tests", "data", "gpt")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    total = 0
    for name, fn in CASES.items():
        with torch.no_grad():
            tensors, meta = fn()
        meta = {"case": name, "generator": "tools/gen_gpt_fixtures.py", "torch_version": torch.__version__, **meta}
        path = os.path.join(out_dir, name + ".safetensors")
        write_safetensors(path, tensors, meta)
        total += os.path.getsize(path)
    print(f"wrote {len(CASES)} fixtures, {total} bytes, to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
