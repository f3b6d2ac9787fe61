#!/usr/bin/python3
"""Write golden fixtures for PyTorch's decoder stack and full encoder-decoder: expected values
computed by PyTorch 1.13 in float64, in the format and conventions of tools/gen_fixtures.py's
layer cases (its safetensors writer, seeding and helpers are imported from there).

Usage (from the repository root, with Debian's python3-torch and python3-numpy; about a second):

    /usr/bin/python3 tools/gen_transformer_fixtures.py [OUTPUT_DIR]

OUTPUT_DIR defaults to tests/data/layers/. The cases:

    transformer_decoder_stack       nn.TransformerDecoder(layer, num_layers=3, norm=LayerNorm), relu,
                                    post-norm, [L, B, E] (batch_first=False); tgt_mask causal (0 / -inf,
                                    generate_square_subsequent_mask), memory_key_padding_mask with one
                                    padded key in sequence 1
    transformer_decoder_norm_first  nn.TransformerDecoder(layer, num_layers=2), norm_first, gelu,
                                    batch_first, no final norm, tgt_mask causal, no
                                    tgt_key_padding_mask, memory_key_padding_mask (2 padded keys in
                                    sequence 1)
    transformer_full                nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2,
                                    num_decoder_layers=2, dim_feedforward=24, batch_first=True):
                                    src_key_padding_mask = memory_key_padding_mask, tgt_mask causal

Tensors (as the decoder_layer_* cases of gen_fixtures.py; F64 unless said otherwise):

    decoder stacks (kind "decoder"):
        tgt [B*L, E], memory [B*S, E]              inputs, rows in the layout's order: (l, b) for
                                                   [L, B, E], (b, l) with batch_first
        tgt_mask [L, L]                            F64 additive: 0 / -inf above the diagonal
        memory_key_padding_mask [B, S]             BOOL, true = ignore
        output [B*L, E]                            the expected output, rows as tgt's
        layers.{i}.self_attn.in_proj_weight ...    every parameter under the module's state_dict
        norm.weight, norm.bias                     name (the final norm only with final_norm)
    transformer (kind "transformer"):
        src [B*S, E], tgt [B*L, E]                 inputs, rows (b, s) / (b, l) (batch_first)
        tgt_mask [L, L]                            F64 additive, causal
        src_key_padding_mask [B, S]                BOOL, true = ignore
        memory_key_padding_mask [B, S]             BOOL, the same as src_key_padding_mask
        memory [B*S, E]                            the encoder's output (after encoder.norm), as the
                                                   layers compute it at every row, padded ones too
        output [B*L, E]                            the expected output (after decoder.norm)
        encoder.layers.{i}..., encoder.norm.*, decoder.layers.{i}..., decoder.norm.*   parameters

Metadata: gen_fixtures.py's transformer_meta (kind, d_model, nhead, dim_feedforward, activation,
layer_norm_eps, batch_first, norm_first, bias, batch, unbatched, description) plus case, generator,
torch_version, tgt_len, memory_len (stacks) / src_len (transformer), tgt_is_causal, memory_causal
("none"), src_is_causal (transformer, false); and every key tools/export_state_dict.py's
export_state_dict would write for the module (hyperparameter_metadata: num_layers, final_norm,
final_norm_eps, layers.0.d_model, layers.0.self_attn.num_heads, ... for a stack;
num_encoder_layers, num_decoder_layers, encoder.num_layers, decoder.final_norm, ... for
nn.Transformer; and attn.export_version). Where both name a key they agree (asserted).

Every parameter is redrawn (gen_fixtures.redraw_layer_parameters: PyTorch's clones start equal and
its init leaves biases zero), seeded from the case's name as in gen_fixtures.py, so the files are
byte-identical from run to run.

The expectations are PyTorch's Python path ("slow path"): parameters require grad and grad is on
(gen_fixtures.py turns it on at import), so neither the encoder's nested-tensor fast path nor the
fused layer kernels run. For transformer_full the script also runs
the module under no_grad, where torch 1.13's encoder takes the nested-tensor fast path
(enable_nested_tensor=True is nn.Transformer's default; batch_first, post-norm,
src_key_padding_mask given, even nhead): its layers then return ZEROS at the padded rows
(to_padded_tensor(0.)), and the encoder's final norm turns them into LayerNorm(0) =
encoder.norm.bias, instead of what the layers compute there. The decoder never reads those rows
(memory_key_padding_mask masks them: their softmax weight is exactly 0), so the script asserts that
both paths agree on `memory` at the unpadded rows and on `output` everywhere, to 1e-12, and that the
fast path did put encoder.norm.bias at the padded rows (metadata fast_path_checked = true): `memory`
holds the slow path's rows, which is what a straightforward implementation computes.
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_state_dict as esd  # noqa: E402
import gen_fixtures as gf  # noqa: E402  (turns grad on: PyTorch's Python path, see above)

F64 = torch.float64
GENERATOR = "tools/gen_transformer_fixtures.py"


def export_metadata(module):
    """What export_state_dict(module, ...) writes as metadata: the hyperparameters of the module and
    of its submodules, and attn.export_version."""
    meta = esd.hyperparameter_metadata(module)
    meta[esd.VERSION_KEY] = esd.EXPORT_VERSION
    return meta


def merge_metadata(case_meta, export_meta, name):
    out = {k: gf._meta_str(v) for k, v in case_meta.items()}
    for k, v in export_meta.items():
        if k in out and out[k] != v:
            raise AssertionError(f"{name}: metadata {k}: case says {out[k]!r}, export_state_dict {v!r}")
        out[k] = v
    return out


def causal_mask(L):
    """generate_square_subsequent_mask(L) in float64: 0 on and below the diagonal, -inf above."""
    m = torch.nn.Transformer.generate_square_subsequent_mask(L).to(F64)
    assert torch.equal(m, gf.layer_mask("causal_top_left", 1, 1, L, L)[0])
    return m


def decoder_stack_case(name, description, num_layers, E, H, L, S, B, FF, activation, batch_first, norm_first,
                       final_norm, memory_padding):
    gf.seed_for(name)
    layer = torch.nn.TransformerDecoderLayer(E, H, FF, dropout=0.1, activation=activation, batch_first=batch_first,
                                             norm_first=norm_first, dtype=F64)
    norm = torch.nn.LayerNorm(E, dtype=F64) if final_norm else None
    dec = torch.nn.TransformerDecoder(layer, num_layers, norm=norm).eval()
    gf.redraw_layer_parameters(dec, True)
    tgt, tgt2d = gf.layer_input(B, L, E, False, batch_first)
    memory, memory2d = gf.layer_input(B, S, E, False, batch_first)
    tmask = causal_mask(L)
    mkpm = gf.lengths_padding(memory_padding)(B, S)
    out = dec(tgt, memory, tgt_mask=tmask, memory_key_padding_mask=mkpm)
    assert torch.isfinite(out).all()
    t = {"tgt": tgt2d, "memory": memory2d, "tgt_mask": tmask, "memory_key_padding_mask": mkpm,
         "output": out.reshape(-1, E), **gf.layer_parameters(dec, True)}
    meta = gf.transformer_meta("decoder", E, H, FF, activation, 1e-5, batch_first, norm_first, True, B, False,
                               description)
    meta.update({"tgt_len": L, "memory_len": S, "tgt_is_causal": True, "memory_causal": "none",
                 "num_layers": num_layers, "final_norm": final_norm})
    return t, merge_metadata(meta, export_metadata(dec), name)


def transformer_case(name, description, E, H, num_encoder_layers, num_decoder_layers, FF, L, S, B, src_padding):
    gf.seed_for(name)
    model = torch.nn.Transformer(d_model=E, nhead=H, num_encoder_layers=num_encoder_layers,
                                 num_decoder_layers=num_decoder_layers, dim_feedforward=FF, dropout=0.1,
                                 batch_first=True, dtype=F64).eval()
    gf.redraw_layer_parameters(model, True)
    src, src2d = gf.layer_input(B, S, E, False, True)
    tgt, tgt2d = gf.layer_input(B, L, E, False, True)
    tmask = causal_mask(L)
    kpm = gf.lengths_padding(src_padding)(B, S)

    # The slow path (grad on, parameters require grad): the expectation.
    assert torch.is_grad_enabled()
    memory = model.encoder(src, src_key_padding_mask=kpm)
    out = model(src, tgt, tgt_mask=tmask, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
    out_parts = model.decoder(tgt, memory, tgt_mask=tmask, memory_key_padding_mask=kpm)
    assert torch.equal(out, out_parts)
    assert torch.isfinite(out).all() and torch.isfinite(memory).all()

    # torch 1.13's fast path (no_grad, eval): nested tensors in the encoder, zeros at padded rows.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        memory_fast = model.encoder(src, src_key_padding_mask=kpm)
        out_fast = model(src, tgt, tgt_mask=tmask, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
    real = ~kpm
    assert torch.allclose(memory_fast[real], memory[real], rtol=0, atol=1e-12), \
        float((memory_fast[real] - memory[real]).abs().max())
    assert torch.allclose(out_fast, out, rtol=0, atol=1e-12), float((out_fast - out).abs().max())
    # Zeros after the layers, then the final norm: LayerNorm(0) = its bias, at every padded row.
    bias_rows = model.encoder.norm.bias.detach().expand(int(kpm.sum()), E)
    fast_checked = torch.equal(memory_fast[kpm], bias_rows) and not torch.allclose(memory[kpm], bias_rows)
    assert fast_checked, "torch's fast path no longer differs at the padded rows as described above"

    t = {"src": src2d, "tgt": tgt2d, "tgt_mask": tmask, "src_key_padding_mask": kpm,
         "memory_key_padding_mask": kpm.clone(), "memory": memory.reshape(-1, E), "output": out.reshape(-1, E),
         **gf.layer_parameters(model, True)}
    meta = gf.transformer_meta("transformer", E, H, FF, "relu", 1e-5, True, False, True, B, False, description)
    meta.update({"src_len": S, "tgt_len": L, "src_is_causal": False, "tgt_is_causal": True, "memory_causal": "none",
                 "num_encoder_layers": num_encoder_layers, "num_decoder_layers": num_decoder_layers,
                 "fast_path_checked": fast_checked})
    return t, merge_metadata(meta, export_metadata(model), name)


CASES = {
    "transformer_decoder_stack": lambda: decoder_stack_case(
        "transformer_decoder_stack",
        "TransformerDecoder: 3 layers, relu, post-norm, final norm, [L, B, E], causal tgt_mask, "
        "memory_key_padding_mask (sequence 1: last key padded)",
        num_layers=3, E=16, H=4, L=4, S=5, B=2, FF=24, activation="relu", batch_first=False, norm_first=False,
        final_norm=True, memory_padding=[5, 4]),
    "transformer_decoder_norm_first": lambda: decoder_stack_case(
        "transformer_decoder_norm_first",
        "TransformerDecoder: 2 layers, gelu, norm_first, no final norm, batch_first, causal tgt_mask, "
        "no tgt_key_padding_mask, memory_key_padding_mask (sequence 1: 2 keys padded)",
        num_layers=2, E=16, H=4, L=4, S=5, B=2, FF=24, activation="gelu", batch_first=True, norm_first=True,
        final_norm=False, memory_padding=[5, 3]),
    "transformer_full": lambda: transformer_case(
        "transformer_full",
        "nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=24, "
        "batch_first=True): src_key_padding_mask = memory_key_padding_mask (sequence 1: last key padded), "
        "causal tgt_mask; expectation from the slow path",
        E=16, H=4, num_encoder_layers=2, num_decoder_layers=2, FF=24, L=4, S=5, B=2, src_padding=[5, 4]),
}


def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
        print(__doc__)
        return 0 if len(argv) == 2 else 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = argv[1] if len(argv) == 2 else os.path.join(root, "tests", "data", gf.LAYER_DIR)
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)  # one reduction order, whatever the machine
    for name, fn in CASES.items():
        tensors, meta = fn()
        meta = {"case": name, "generator": GENERATOR, "torch_version": torch.__version__, **meta}
        path = os.path.join(out_dir, name + ".safetensors")
        gf.write_safetensors(path, tensors, meta)
        print(f"wrote {path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
