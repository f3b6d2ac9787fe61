#!/usr/bin/python3
"""Write the state_dict fixtures of tests/state_dict_test.cpp into tests/data/state_dict/.

Usage (from the repository root, with Debian's python3-torch):

    /usr/bin/python3 tools/gen_state_dict_fixtures.py [OUTPUT_DIR [NAME ...]]

NAME: a case or a group of files below (mha_bias_kv, ..., encoder_example, heads4, torch_save,
model_with_encoder); without one, all of them. Float outputs depend on the machine's reductions in
the last bits, so regenerate only the fixtures you change.

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
  transformer_encoder
                  {encoder: TransformerEncoder(TransformerEncoderLayer(16, 4, 24, gelu, batch_first,
                  norm_first), 2 layers, final LayerNorm), head: Linear(16, 3)}: keys encoder.* and
                  head.*; src [B*L, E], encoder_output, head_output; metadata: the hyperparameters
                  (export_state_dict.transformer_encoder_metadata) and PyTorch's key order of the
                  encoder, its layer and its norm (encoder_keys, encoder_layer_keys, layer_norm_keys,
                  comma-separated).
  transformer_decoder_layer
                  {layer: TransformerDecoderLayer(16, 2, 24)}: keys layer.*; tgt [L*B, E], memory
                  [S*B, E], causal tgt_mask; output; PyTorch's key order in layer_keys.

And, for examples/encoder_from_pytorch.cpp (run by ctest), the files its usage describes:
  encoder_example       TransformerEncoder(TransformerEncoderLayer(16, 2, 32), 2 layers, final
                        LayerNorm), saved with torch.save and exported by export_state_dict.py's
                        command line (float32, hyperparameters in the metadata, no other tensor);
  encoder_example_io    src [L, B, E] and PyTorch's float32 output.
  model_with_encoder    a whole model, TinyModel below: self.encoder = TransformerEncoder(
                        TransformerEncoderLayer(8, 4, 12, gelu, batch_first, norm_first), 2 layers,
                        final LayerNorm), self.head = Linear(8, 3); saved with torch.save and
                        exported by the command line with no option: keys encoder.* and head.*,
                        the hyperparameters in the metadata under encoder.*, encoder.layers.<i>.*
                        and encoder.layers.<i>.self_attn.* (the example runs it with --prefix encoder);
  model_with_encoder_io src [B, L, E] and PyTorch's float32 output of model.encoder;
  model_state_dict      the same model's state_dict, torch.save'd and exported by the command line:
                        only what the shapes prove (encoder.num_layers, encoder.d_model, ...; no head
                        count).

For the hyperparameter checks and the errors of attn/io (tests/state_dict_test.cpp,
tests/safetensors_test.cpp):
  heads4                MultiheadAttention(16, 4) exported as a module of its own: its keys and its
                        hyperparameters under the plain names (num_heads "4", ...);
  heads4_no_metadata    the same tensors with no metadata at all (hyperparameters=False);
  torch_save_zip.pt     torch.save(Linear(2, 2).state_dict()): a zip archive, PK\\x03\\x04;
  torch_save_pickle.pt  torch.save({"epoch": 3, "step": 1200, "lr": 0.001}) with
                        _use_new_zipfile_serialization=False: a pickle, \\x80\\x02.

Deterministic: each case seeds torch from a CRC of its name.
"""

import copy
import os
import sys
import tempfile
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


def key_list(module):
    """PyTorch's own state_dict key order, for the C++ test to compare attn's with."""
    return ",".join(module.state_dict().keys())


@case
def transformer_encoder():
    E, H, FF, N, L, B = 16, 4, 24, 2, 5, 2
    model = torch.nn.Module()
    layer = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, activation="gelu", batch_first=True,
                                             norm_first=True)
    model.encoder = torch.nn.TransformerEncoder(layer, N, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
    model.head = torch.nn.Linear(E, 3)
    model.eval()
    redraw_(model)
    src = randn(B, L, E)
    ref = copy.deepcopy(model).double()
    out = ref.encoder(src)
    tensors = {"src": src.reshape(-1, E), "encoder_output": out.reshape(-1, E),
               "head_output": ref.head(out).reshape(-1, 3)}
    meta = export_state_dict.transformer_encoder_metadata(model.encoder)
    meta.update({"batch": B, "src_len": L, "encoder_keys": key_list(model.encoder),
                 "encoder_layer_keys": key_list(model.encoder.layers[0]),
                 "layer_norm_keys": key_list(model.encoder.norm),
                 "description": "TransformerEncoder(TransformerEncoderLayer(16, 4, 24, gelu, batch_first, "
                                "norm_first), 2 layers, final LayerNorm) at encoder., Linear(16, 3) at head., "
                                "float32 state_dict; src [B, L, E]"})
    return model.state_dict(), tensors, meta


@case
def transformer_decoder_layer():
    E, H, FF, L, S, B = 16, 2, 24, 4, 6, 2
    block = torch.nn.Module()
    block.layer = torch.nn.TransformerDecoderLayer(E, H, FF, dropout=0.1).eval()  # relu, post-norm, [L, B, E]
    redraw_(block)
    tgt, memory = randn(L, B, E), randn(S, B, E)
    causal = torch.triu(torch.full((L, L), float("-inf"), dtype=F64), diagonal=1)  # attn::Causal::TopLeft
    ref = copy.deepcopy(block).double()
    out = ref.layer(tgt, memory, tgt_mask=causal)
    tensors = {"tgt": tgt.reshape(-1, E), "memory": memory.reshape(-1, E), "output": out.reshape(-1, E)}
    meta = {"d_model": E, "nhead": H, "dim_feedforward": FF, "activation": "relu", "layer_norm_eps": 1e-5,
            "batch_first": False, "norm_first": False, "batch": B, "tgt_len": L, "src_len": S,
            "tgt_is_causal": True, "layer_keys": key_list(block.layer),
            "description": "TransformerDecoderLayer(16, 2, 24) at layer., float32 state_dict; tgt [L, B, E], "
                           "memory [S, B, E], causal tgt_mask"}
    return block.state_dict(), tensors, meta


def write_example(out_dir):
    """encoder_example.safetensors, what the README's first step writes for an nn.TransformerEncoder
    (torch.save, then tools/export_state_dict.py on the command line, float32, the hyperparameters in
    the metadata); encoder_example_io.safetensors, src [L, B, E] and PyTorch's float32 output, for
    examples/encoder_from_pytorch.cpp --check (a ctest). Returns the two paths."""
    seed_for("state_dict/encoder_example")
    E, H, FF, N, L, B = 16, 2, 32, 2, 7, 2
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E, H, FF), N, norm=torch.nn.LayerNorm(E),
                                          enable_nested_tensor=False).eval()
    redraw_(encoder)
    model_path = os.path.abspath(os.path.join(out_dir, "encoder_example.safetensors"))
    io_path = os.path.abspath(os.path.join(out_dir, "encoder_example_io.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the metadata records the input's name: keep it the same on every run
        try:
            torch.save(encoder, "encoder.pt")
            export_state_dict.main(["export_state_dict.py", "encoder.pt", model_path, "--dtype", "float32"])
        finally:
            os.chdir(cwd)
    src = randn(L, B, E).to(torch.float32)
    output = encoder(src).detach()
    export_state_dict.save_file({"src": src, "output": output}, io_path, metadata={
        "generator": "tools/gen_state_dict_fixtures.py", "torch_version": torch.__version__,
        "description": "src [L, B, E] and PyTorch's float32 output of encoder_example.safetensors"})
    return [model_path, io_path]


class TinyModel(torch.nn.Module):
    """A whole model as users have one: the encoder is one submodule among others."""

    def __init__(self):
        super().__init__()
        E = 8
        layer = torch.nn.TransformerEncoderLayer(E, 4, 12, dropout=0.1, activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
        self.head = torch.nn.Linear(E, 3)

    def forward(self, src):
        return self.head(self.encoder(src))


def in_dir(path, fn):
    """Runs fn() in `path`: the exporter records its input's name, so keep it the same on every run."""
    cwd = os.getcwd()
    os.chdir(path)
    try:
        return fn()
    finally:
        os.chdir(cwd)


def write_model_with_encoder(out_dir):
    """model_with_encoder(_io).safetensors and model_state_dict.safetensors: see the docstring."""
    seed_for("state_dict/model_with_encoder")
    model = TinyModel().eval()
    redraw_(model)
    B, L, E = 2, 5, 8
    paths = [os.path.abspath(os.path.join(out_dir, n + ".safetensors"))
             for n in ("model_with_encoder", "model_with_encoder_io", "model_state_dict")]
    with tempfile.TemporaryDirectory() as tmp:
        def export():
            torch.save(model, "model.pt")  # pickles TinyModel by reference: torch.load finds it in this process
            export_state_dict.main(["attn-export", "model.pt", paths[0]])
            torch.save(model.state_dict(), "model_state_dict.pt")
            export_state_dict.main(["attn-export", "model_state_dict.pt", paths[2]])
        in_dir(tmp, export)
    src = randn(B, L, E).to(torch.float32)
    output = model.encoder(src).detach()
    export_state_dict.save_file({"src": src, "output": output}, paths[1], metadata={
        "generator": "tools/gen_state_dict_fixtures.py", "torch_version": torch.__version__,
        "description": "src [B, L, E] and PyTorch's float32 output of model_with_encoder.safetensors' encoder"})
    return paths


def write_heads4(out_dir):
    """heads4.safetensors, heads4_no_metadata.safetensors: see the docstring."""
    seed_for("state_dict/heads4")
    mha = torch.nn.MultiheadAttention(16, 4).eval()
    redraw_(mha)
    paths = [os.path.join(out_dir, n + ".safetensors") for n in ("heads4", "heads4_no_metadata")]
    export_state_dict.export_state_dict(mha, paths[0], metadata={"generator": "tools/gen_state_dict_fixtures.py"})
    export_state_dict.export_state_dict(mha, paths[1], hyperparameters=False)
    return paths


def write_torch_save(out_dir):
    """torch_save_zip.pt and torch_save_pickle.pt: what users try to open before exporting."""
    seed_for("state_dict/torch_save")
    sd = torch.nn.Linear(2, 2).state_dict()
    paths = [os.path.abspath(os.path.join(out_dir, n)) for n in ("torch_save_zip.pt", "torch_save_pickle.pt")]
    torch.save(sd, paths[0])
    # The legacy format names each tensor's storage by its address, different on every run: the
    # pickle holds a checkpoint's plain values instead, which starts the same (\x80\x02).
    torch.save({"epoch": 3, "step": 1200, "lr": 0.001}, paths[1], _use_new_zipfile_serialization=False)
    return paths


# Fixtures of several files each, by name: a function of the output directory returning the paths.
GROUPS = {
    "encoder_example": write_example,
    "model_with_encoder": write_model_with_encoder,
    "heads4": write_heads4,
    "torch_save": write_torch_save,
}


def main(argv):
    if len(argv) >= 2 and argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = argv[1] if len(argv) >= 2 else os.path.join(root, "tests", "data", "state_dict")
    names = argv[2:] or list(CASES) + list(GROUPS)
    unknown = [n for n in names if n not in CASES and n not in GROUPS]
    if unknown:
        print(f"unknown fixtures {unknown}; known: {list(CASES) + list(GROUPS)}", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)  # one reduction order, whatever the machine
    written = []
    for name in names:
        if name in GROUPS:
            written += GROUPS[name](out_dir)
            continue
        seed_for("state_dict/" + name)
        state, tensors, meta = CASES[name]()
        meta = {"case": name, "generator": "tools/gen_state_dict_fixtures.py", "torch_version": torch.__version__,
                **meta}
        path = os.path.join(out_dir, name + ".safetensors")
        export_state_dict.export_state_dict(state, path, metadata={k: meta_str(v) for k, v in meta.items()},
                                            extra=tensors)
        written.append(path)
    total = sum(os.path.getsize(p) for p in written)
    print(f"wrote {len(written)} fixtures, {total} bytes, to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
