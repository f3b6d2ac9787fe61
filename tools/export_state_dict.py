#!/usr/bin/python3
"""Write a PyTorch module's state_dict (or any dict of tensors) as a safetensors file that
attn::io::SafeTensors reads and attn::io::load_state_dict loads, with nothing but torch
(Debian's python3-torch; no `safetensors` package).

Usage, from the command line, on a file written by torch.save (a module or a state_dict):

    /usr/bin/python3 tools/export_state_dict.py MODEL.pt OUT.safetensors [--prefix attn.] [--dtype float32]
                                                [--meta KEY=VALUE ...]

(an nn.TransformerEncoder's hyperparameters go into the file's metadata by themselves, see
transformer_encoder_metadata; --meta adds or replaces any entry), or from Python:

    sys.path.insert(0, "tools"); import export_state_dict as esd
    esd.export_state_dict(model, "model.safetensors", metadata={"format": "pt"})
    esd.export_state_dict(model.encoder, "encoder.safetensors", dtype=torch.float32,
                          metadata=esd.transformer_encoder_metadata(model.encoder))
    esd.save_file({"x": x, "y": y}, "case.safetensors", metadata={"note": "anything"})

In C++ (examples/encoder_from_pytorch.cpp builds the encoder from the metadata):

    auto st = attn::io::SafeTensors::open("model.safetensors");
    attn::io::load_state_dict(mha, st, "encoder.layers.0.self_attn");
    attn::io::load_state_dict(encoder, st, "encoder");  // an attn::TransformerEncoder, every layer

The format: u64 little-endian N | N bytes of JSON header, space padded to a multiple of 8 |
raw little-endian data. Tensors are laid out largest element first (then by name), as the
reference writer does, so every tensor starts aligned for its type and attn can map F32 and
F64 tensors without a copy. dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.
"""

import argparse
import json
import struct
import sys

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_bytes(t):
    """The tensor's elements, row-major, little-endian."""
    if sys.byteorder != "little":
        raise RuntimeError("export_state_dict.py writes native bytes and needs a little-endian machine")
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def save_file(tensors, path, metadata=None):
    """tensors: name -> torch tensor (any shape, a dtype of DTYPES); metadata: name -> str."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"{path}: metadata must map strings to strings, got {k!r}: {v!r}")
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    for name in order:
        if name == "__metadata__":
            raise ValueError(f"{path}: '__metadata__' cannot name a tensor")
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise TypeError(f"{path}: tensor {name} has dtype {t.dtype}; writable: {sorted(DTYPES.values())}")
        raw = tensor_bytes(t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def export_state_dict(module_or_state_dict, path, prefix="", dtype=None, metadata=None, extra=None):
    """Writes module.state_dict() (or a state_dict), each key prefixed, optionally converted to a
    floating dtype (integer and bool buffers keep theirs); `extra` adds more named tensors."""
    sd = module_or_state_dict
    if isinstance(sd, torch.nn.Module):
        sd = sd.state_dict()
    tensors = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[prefix + k] = v
    for k, v in (extra or {}).items():
        if k in tensors:
            raise ValueError(f"{path}: extra tensor {k} collides with a state_dict key")
        tensors[k] = v
    save_file(tensors, path, metadata)


def _activation_name(activation):
    """'relu' or 'gelu', the activations attn::TransformerOptions has."""
    F = torch.nn.functional
    if activation is F.relu or isinstance(activation, torch.nn.ReLU):
        return "relu"
    if activation is F.gelu or (isinstance(activation, torch.nn.GELU) and activation.approximate == "none"):
        return "gelu"
    raise ValueError(f"activation {activation!r}: attn's transformer layers have relu and gelu (exact) only")


def transformer_encoder_metadata(encoder):
    """An nn.TransformerEncoder's hyperparameters as metadata (strings), under the names of the
    constructors' arguments: d_model, nhead, num_layers, dim_feedforward, activation ("relu" or
    "gelu"), layer_norm_eps, batch_first, norm_first, bias ("true"/"false"), final_norm, and
    final_norm_eps when it has a final norm. Every layer must be configured as the first (PyTorch's
    TransformerEncoder deep-copies one layer)."""
    if not isinstance(encoder, torch.nn.TransformerEncoder):
        raise TypeError(f"expected an nn.TransformerEncoder, got {type(encoder).__name__}")
    if len(encoder.layers) == 0:
        raise ValueError("the encoder has no layers")
    layer = encoder.layers[0]
    if encoder.norm is not None and not isinstance(encoder.norm, torch.nn.LayerNorm):
        raise TypeError(f"the final norm is a {type(encoder.norm).__name__}, not an nn.LayerNorm")

    def flag(b):
        return "true" if b else "false"

    meta = {
        "d_model": str(layer.self_attn.embed_dim),
        "nhead": str(layer.self_attn.num_heads),
        "num_layers": str(len(encoder.layers)),
        "dim_feedforward": str(layer.linear1.out_features),
        "activation": _activation_name(layer.activation),
        "layer_norm_eps": repr(float(layer.norm1.eps)),
        "batch_first": flag(layer.self_attn.batch_first),
        "norm_first": flag(layer.norm_first),
        "bias": flag(layer.linear1.bias is not None),
        "final_norm": flag(encoder.norm is not None),
    }
    if encoder.norm is not None:
        meta["final_norm_eps"] = repr(float(encoder.norm.eps))
    return meta


def main(argv):
    p = argparse.ArgumentParser(description="Write a torch.save'd module or state_dict as safetensors.")
    p.add_argument("input", help="a file written by torch.save: an nn.Module or a state_dict")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--prefix", default="", help="prepended to every key, e.g. 'encoder.'")
    p.add_argument("--dtype", choices=["float64", "float32", "float16", "bfloat16"],
                   help="convert floating tensors to this dtype")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="a metadata entry (repeatable), e.g. --meta nhead=8")
    args = p.parse_args(argv[1:])
    # A whole pickled module needs full unpickling (torch >= 2.6 defaults to weights_only=True):
    # export only files you trust, as for any torch.load.
    obj = torch.load(args.input, map_location="cpu", weights_only=False)
    if not isinstance(obj, (torch.nn.Module, dict)):
        p.error(f"{args.input} holds a {type(obj).__name__}, not a module or a state_dict")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    metadata = {"format": "pt", "source": args.input}
    if isinstance(obj, torch.nn.TransformerEncoder):
        metadata.update(transformer_encoder_metadata(obj))
    for entry in args.meta:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            p.error(f"--meta {entry!r}: expected KEY=VALUE")
        metadata[key] = value
    export_state_dict(obj, args.output, prefix=args.prefix, dtype=dtype, metadata=metadata)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
