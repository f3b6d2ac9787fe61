#!/usr/bin/python3
"""Write the state_dict fixtures of tests/state_dict_test.cpp into tests/data/state_dict/.

Usage (from the repository root, with Debian's python3-torch):

    /usr/bin/python3 tools/gen_state_dict_fixtures.py [OUTPUT_DIR]

Each file is written by tools/export_state_dict.py, the writer users run on their own modules:
a module's state_dict as PyTorch keeps it (float32, bias_k [1, 1, E], keys under a prefix such as
"attn."), beside float64 inputs and the outputs of the same module converted to float64, and
metadata (strings) with the module's configuration. The C++ test builds the module from the
metadata, loads it by its keys with attn::io::load_state_dict and must reproduce the outputs
(1e-10 in double, where the float32 weights convert exactly; 1e-5 in float).

  mha_bias_kv     {attn: MultiheadAttention(16, 4, add_bias_kv=True), proj: Linear(16, 8)}:
                  keys attn.* and proj.*; self-attention on query [L, B, E] (rows (l, b));
                  attn_output [L*B, E], proj_output [L*B, 8].
  mha_kdim_vdim   {attn: MultiheadAttention(16, 4, kdim=10, vdim=6, batch_first=True)}:
                  q/k/v_proj_weight; query [B*L, E], key [B*S, 10], value [B*S, 6].
  dtypes          F16, BF16 and F32 tensors [4, 8] (special values, then random ones) beside their
                  exact float64 values <name>_as_f64: torch's own bytes and conversions as the oracle.

Deterministic: each case seeds torch from a CRC of its name.
"""

import copy
import os
import sys
import zlib

import torch

import export_state_dict  # tools/export_state_dict.py, beside this script

# Keep nn.MultiheadAttention on its Python path (multi_head_attention_forward): the eval-mode
# fused kernel is taken only when no parameter requires grad.
torch.set_grad_enabled(True)

F64 = torch.float64
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def seed_for(name):
    torch.manual_seed(zlib.crc32(name.encode("utf-8")))


def randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=F64) * scale


def meta_str(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def redraw_(module, scale=0.3):
    """Every parameter redrawn (float32, as trained modules are), so that no bias is left at zero."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(randn(*p.shape, scale=scale).to(p.dtype))


def mha_meta(mha, B, L, S, description):
    return {"embed_dim": mha.embed_dim, "num_heads": mha.num_heads, "kdim": mha.kdim, "vdim": mha.vdim,
            "bias": mha.in_proj_bias is not None, "add_bias_kv": mha.bias_k is not None,
            "add_zero_attn": mha.add_zero_attn, "batch_first": mha.batch_first, "batch": B, "tgt_len": L,
            "src_len": S, "description": description}


@case
def mha_bias_kv():
    E, H, L, B = 16, 4, 5, 2
    block = torch.nn.Module()
    block.attn = torch.nn.MultiheadAttention(E, H, add_bias_kv=True).eval()
    block.proj = torch.nn.Linear(E, 8).eval()
    redraw_(block)
    query = randn(L, B, E)
    ref = copy.deepcopy(block).double()  # the same float32 weights, computed in float64
    out = ref.attn(query, query, query, need_weights=False)[0]
    tensors = {"query": query.reshape(-1, E), "attn_output": out.reshape(-1, E),
               "proj_output": ref.proj(out).reshape(-1, 8)}
    meta = mha_meta(block.attn, B, L, L, "MultiheadAttention(16, 4, add_bias_kv=True) at attn., "
                    "Linear(16, 8) at proj., float32 state_dict; self-attention [L, B, E]")
    meta.update({"proj_in_features": E, "proj_out_features": 8})
    return block.state_dict(), tensors, meta


@case
def mha_kdim_vdim():
    E, H, L, S, B = 16, 4, 4, 6, 2
    block = torch.nn.Module()
    block.attn = torch.nn.MultiheadAttention(E, H, kdim=10, vdim=6, batch_first=True).eval()
    redraw_(block)
    query, key, value = randn(B, L, E), randn(B, S, 10), randn(B, S, 6)
    ref = copy.deepcopy(block).double()
    out = ref.attn(query, key, value, need_weights=False)[0]
    tensors = {"query": query.reshape(-1, E), "key": key.reshape(-1, 10), "value": value.reshape(-1, 6),
               "attn_output": out.reshape(-1, E)}
    meta = mha_meta(block.attn, B, L, S, "MultiheadAttention(16, 4, kdim=10, vdim=6, batch_first=True) "
                    "at attn., float32 state_dict; cross-attention [B, L, E] to [B, S, kdim/vdim]")
    return block.state_dict(), tensors, meta


@case
def dtypes():
    inf, nan = float("inf"), float("nan")
    special = {
        torch.float16: [0.0, -0.0, 1.0, -2.0, 0.1, 65504.0, 2.0 ** -24, 1e-5, inf, -inf, nan, 3.14159],
        torch.bfloat16: [0.0, -0.0, 1.0, -2.5, 0.1, 3e38, 2.0 ** -133, 1e-39, inf, -inf, nan, 3.14159],
        torch.float32: [0.0, -0.0, 1.0, -2.5, 0.1, 3e38, 2.0 ** -149, 1e-39, inf, -inf, nan, 3.14159],
    }
    tensors = {}
    for dtype, name in ((torch.float16, "f16"), (torch.bfloat16, "bf16"), (torch.float32, "f32")):
        values = torch.cat([torch.tensor(special[dtype], dtype=F64), randn(32 - len(special[dtype]), scale=3.0)])
        t = values.to(dtype).reshape(4, 8)
        tensors[name] = t
        tensors[name + "_as_f64"] = t.to(F64)
    return {}, tensors, {"description": "F16, BF16 and F32 tensors and their exact float64 values"}


def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
        print(__doc__)
        return 0 if len(argv) == 2 else 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = argv[1] if len(argv) == 2 else os.path.join(root, "tests", "data", "state_dict")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)  # one reduction order, whatever the machine
    total = 0
    for name, fn in CASES.items():
        seed_for("state_dict/" + name)
        state, tensors, meta = fn()
        meta = {"case": name, "generator": "tools/gen_state_dict_fixtures.py", "torch_version": torch.__version__,
                **meta}
        path = os.path.join(out_dir, name + ".safetensors")
        export_state_dict.export_state_dict(state, path, metadata={k: meta_str(v) for k, v in meta.items()},
                                            extra=tensors)
        total += os.path.getsize(path)
    print(f"wrote {len(CASES)} fixtures, {total} bytes, to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
