#!/usr/bin/python3
"""Write a PyTorch module's state_dict (or any dict of tensors) as a safetensors file that
attn::io::SafeTensors reads and attn::io::load_state_dict loads, with nothing but torch
(Debian's python3-torch; no `safetensors` package).

Usage, from the command line, on a file written by torch.save (a module or a state_dict); installed
by `cmake --install` as bin/attn-export:

    attn-export MODEL.pt OUT.safetensors [--prefix encoder] [--dtype float32] [--meta KEY=VALUE ...]
    /usr/bin/python3 tools/export_state_dict.py ...        (the same, from a source tree)

or from Python:

    sys.path.insert(0, "tools"); import export_state_dict as esd
    esd.export_state_dict(model, "model.safetensors", metadata={"format": "pt"})
    esd.export_state_dict(model.encoder, "encoder.safetensors", dtype=torch.float32)
    esd.save_file({"x": x, "y": y}, "case.safetensors", metadata={"note": "anything"})

The file's metadata (__metadata__, strings) records the hyperparameters that the tensors' shapes
cannot tell, so that attn can build the module and check it (attn::io::load_state_dict refuses a
file whose metadata disagrees with the module it loads into, naming the key and both values):

    attn.export_version     "1", the layout of these keys
    <path>.<name>           for every nn.MultiheadAttention, nn.TransformerEncoderLayer,
                            nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder
                            and nn.Transformer in the module (named_modules()), under its path
                            ("encoder.nhead", "encoder.layers.0.self_attn.num_heads"); the
                            module itself under the plain names ("nhead"); every key after --prefix
                            (prefix "model": "model.encoder.nhead"), as the tensors' keys.

The names are the constructors' arguments; flags are "true" / "false", floats Python's repr:
    nn.MultiheadAttention           embed_dim, num_heads, kdim, vdim, bias, add_bias_kv,
                                    add_zero_attn, batch_first
    nn.Transformer{Encoder,Decoder}Layer
                                    d_model, nhead, dim_feedforward, activation ("relu", "gelu", or
                                    another function's name, which attn does not have),
                                    layer_norm_eps, batch_first, norm_first, bias
    nn.Transformer{Encoder,Decoder} the first layer's (as above), num_layers, final_norm, and
                                    final_norm_eps with a final nn.LayerNorm
    nn.Transformer                  d_model, nhead, num_encoder_layers, num_decoder_layers,
                                    dim_feedforward, activation, layer_norm_eps, batch_first,
                                    norm_first, bias
A plain state_dict (no module) records only what its keys and shapes prove (embed_dim, kdim, vdim,
bias, add_bias_kv of an attention; d_model, dim_feedforward, bias of a layer; num_layers of a stack
of layers; final_norm when a final norm's weight is there), never the head count: give it with
--meta (--meta encoder.nhead=8). --meta adds or replaces any entry, unprefixed.

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
import re
import struct
import sys

# torch is optional at import, so that --help (and importing this module) works without it; every
# function that reads or writes tensors says so when it is missing.
try:
    import torch
except ImportError:
    torch = None

# The value of "attn.export_version" in every file this writes: the layout of the hyperparameter
# keys above. A reader that finds another (or none) knows the keys may mean something else.
EXPORT_VERSION = "1"
VERSION_KEY = "attn.export_version"

_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
DTYPES = {getattr(torch, name): code for name, code in _DTYPE_NAMES.items()} if torch is not None else {}


def _need_torch():
    if torch is None:
        raise ImportError("export_state_dict.py needs PyTorch (Debian: python3-torch) to read and write tensors")
    return torch


def tensor_bytes(t):
    """The tensor's elements, row-major, little-endian."""
    if sys.byteorder != "little":
        raise RuntimeError("export_state_dict.py writes native bytes and needs a little-endian machine")
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def save_file(tensors, path, metadata=None):
    """tensors: name -> torch tensor (any shape, a dtype of DTYPES); metadata: name -> str."""
    _need_torch()
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


def export_state_dict(module_or_state_dict, path, prefix="", dtype=None, metadata=None, extra=None,
                      hyperparameters=True):
    """Writes module.state_dict() (or a state_dict), each key prefixed, optionally converted to a
    floating dtype (integer and bool buffers keep theirs); `extra` adds more named tensors. With
    `hyperparameters`, the metadata starts with hyperparameter_metadata(module_or_state_dict,
    prefix) (the module's hyperparameters, or what a state_dict's shapes prove) and
    attn.export_version; `metadata` adds or replaces entries."""
    _need_torch()
    sd = module_or_state_dict
    meta = {}
    if hyperparameters:
        meta = hyperparameter_metadata(sd, prefix)
        meta[VERSION_KEY] = EXPORT_VERSION
    meta.update(metadata or {})
    metadata = meta
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


def _activation_name(activation, strict=True):
    """'relu' or 'gelu', the activations attn::TransformerOptions has. Another one raises, or with
    strict=False is named ("gelu_tanh", "silu", the function's name) so that a reader can say what
    it is not."""
    F = torch.nn.functional
    if activation is F.relu or isinstance(activation, torch.nn.ReLU):
        return "relu"
    if activation is F.gelu or (isinstance(activation, torch.nn.GELU) and activation.approximate == "none"):
        return "gelu"
    if strict:
        raise ValueError(f"activation {activation!r}: attn's transformer layers have relu and gelu (exact) only")
    if isinstance(activation, torch.nn.GELU):
        return "gelu_" + activation.approximate
    if isinstance(activation, torch.nn.Module):
        return type(activation).__name__.lower()
    return getattr(activation, "__name__", type(activation).__name__)


def _flag(b):
    return "true" if b else "false"


def _float(x):
    return repr(float(x))


def _mha_hyperparameters(mha):
    return {
        "embed_dim": str(mha.embed_dim),
        "num_heads": str(mha.num_heads),
        "kdim": str(mha.kdim),
        "vdim": str(mha.vdim),
        "bias": _flag(mha.in_proj_bias is not None),  # in_proj_bias and out_proj.bias come together
        "add_bias_kv": _flag(mha.bias_k is not None),
        "add_zero_attn": _flag(mha.add_zero_attn),
        "batch_first": _flag(mha.batch_first),
    }


def _layer_hyperparameters(layer, strict=False):
    """An nn.TransformerEncoderLayer's or nn.TransformerDecoderLayer's constructor arguments, read
    from its submodules (PyTorch < 2.1 has no `bias` argument: its layers always have biases)."""
    return {
        "d_model": str(layer.self_attn.embed_dim),
        "nhead": str(layer.self_attn.num_heads),
        "dim_feedforward": str(layer.linear1.out_features),
        "activation": _activation_name(layer.activation, strict),
        "layer_norm_eps": _float(layer.norm1.eps),
        "batch_first": _flag(layer.self_attn.batch_first),
        "norm_first": _flag(layer.norm_first),
        "bias": _flag(layer.linear1.bias is not None),
    }


def _stack_hyperparameters(stack, strict=False):
    """An nn.TransformerEncoder's or nn.TransformerDecoder's: its first layer's (PyTorch deep-copies
    one layer num_layers times), num_layers, final_norm and final_norm_eps."""
    meta = _layer_hyperparameters(stack.layers[0], strict) if len(stack.layers) else {}
    meta["num_layers"] = str(len(stack.layers))
    meta["final_norm"] = _flag(stack.norm is not None)
    if stack.norm is not None and hasattr(stack.norm, "eps"):
        meta["final_norm_eps"] = _float(stack.norm.eps)
    return meta


def _transformer_hyperparameters(model):
    layers = list(getattr(model.encoder, "layers", [])) + list(getattr(model.decoder, "layers", []))
    meta = _layer_hyperparameters(layers[0]) if layers else {}
    meta.update({"d_model": str(model.d_model), "nhead": str(model.nhead), "batch_first": _flag(model.batch_first)})
    if hasattr(model.encoder, "layers"):
        meta["num_encoder_layers"] = str(len(model.encoder.layers))
    if hasattr(model.decoder, "layers"):
        meta["num_decoder_layers"] = str(len(model.decoder.layers))
    return meta


def module_hyperparameters(module):
    """The constructor hyperparameters of one module (not its submodules'), as strings, or {} for a
    module attn has no counterpart of."""
    nn = _need_torch().nn
    if isinstance(module, nn.Transformer):
        return _transformer_hyperparameters(module)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return _stack_hyperparameters(module)
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return _layer_hyperparameters(module)
    if isinstance(module, nn.MultiheadAttention):
        return _mha_hyperparameters(module)
    return {}


def _key(prefix, path, name):
    return prefix + (path + "." if path else "") + name


def inferred_hyperparameters(state_dict):
    """What a plain state_dict's keys and shapes prove, under the same keys as
    module_hyperparameters would give: see the module's docstring. Never the head count."""
    keys = set(state_dict)
    meta = {}

    def has(k):
        return k in keys

    def shape(k):
        return tuple(state_dict[k].shape)

    def join(path, name):
        return _key("", path, name)

    def mha_at(path):
        """embed_dim, kdim, vdim, bias, add_bias_kv of an attention at `path`, or None."""
        w, q, k, v = (join(path, n) for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"))
        if not has(join(path, "out_proj.weight")):
            return None
        if has(w) and len(shape(w)) == 2 and shape(w)[0] == 3 * shape(w)[1]:
            e = kd = vd = shape(w)[1]
        elif has(q) and has(k) and has(v) and all(len(shape(x)) == 2 for x in (q, k, v)):
            e, kd, vd = shape(q)[0], shape(k)[1], shape(v)[1]
        else:
            return None
        return {"embed_dim": str(e), "kdim": str(kd), "vdim": str(vd), "bias": _flag(has(join(path, "in_proj_bias"))),
                "add_bias_kv": _flag(has(join(path, "bias_k")))}

    def layer_at(path):
        """d_model, dim_feedforward, bias of a transformer layer at `path`, or None."""
        w1, w2 = join(path, "linear1.weight"), join(path, "linear2.weight")
        attn = mha_at(join(path, "self_attn"))
        if attn is None or not has(w1) or not has(w2) or len(shape(w1)) != 2 or shape(w1)[1] != int(attn["embed_dim"]):
            return None
        return {"d_model": attn["embed_dim"], "dim_feedforward": str(shape(w1)[0]),
                "bias": _flag(has(join(path, "linear1.bias")))}

    paths = {""}
    for k in keys:
        parts = k.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
    layer_numbers = {}  # a stack's path -> the numbers of the layers under <path>.layers.<n>
    for path in sorted(paths):
        attn = mha_at(path)
        if attn is not None:
            meta.update({join(path, n): v for n, v in attn.items()})
        layer = layer_at(path)
        if layer is not None:
            meta.update({join(path, n): v for n, v in layer.items()})
            m = re.fullmatch(r"(?:(.*)\.)?layers\.(\d+)", path)
            if m:
                layer_numbers.setdefault(m.group(1) or "", set()).add(int(m.group(2)))
    for path, numbers in layer_numbers.items():
        # A stack of layers 0 .. n-1: num_layers n, and the first layer's dimensions.
        if numbers != set(range(len(numbers))):
            continue
        meta[join(path, "num_layers")] = str(len(numbers))
        first = layer_at(join(path, "layers.0"))
        meta.update({join(path, n): v for n, v in first.items()})
        if has(join(path, "norm.weight")):  # without one, the stack may still have a norm without weights
            meta[join(path, "final_norm")] = "true"
    return meta


def hyperparameter_metadata(module_or_state_dict, prefix=""):
    """The hyperparameters of a module and of every submodule (named_modules()), each under
    prefix + "<path>.<name>" (the module itself: prefix + "<name>"); for a state_dict, what its shapes
    prove (inferred_hyperparameters), prefixed the same way."""
    nn = _need_torch().nn
    if not isinstance(module_or_state_dict, nn.Module):
        return {prefix + k: v for k, v in inferred_hyperparameters(module_or_state_dict).items()}
    meta = {}
    for path, module in module_or_state_dict.named_modules():
        meta.update({_key(prefix, path, name): v for name, v in module_hyperparameters(module).items()})
    return meta


def transformer_encoder_metadata(encoder):
    """An nn.TransformerEncoder's hyperparameters as metadata (strings), under the names of the
    constructors' arguments: d_model, nhead, num_layers, dim_feedforward, activation ("relu" or
    "gelu"), layer_norm_eps, batch_first, norm_first, bias ("true"/"false"), final_norm, and
    final_norm_eps when it has a final norm. Every layer must be configured as the first (PyTorch's
    TransformerEncoder deep-copies one layer). Raises for what attn cannot build (no layers, another
    activation, a final norm that is not an nn.LayerNorm); hyperparameter_metadata records those."""
    _need_torch()
    if not isinstance(encoder, torch.nn.TransformerEncoder):
        raise TypeError(f"expected an nn.TransformerEncoder, got {type(encoder).__name__}")
    if len(encoder.layers) == 0:
        raise ValueError("the encoder has no layers")
    if encoder.norm is not None and not isinstance(encoder.norm, torch.nn.LayerNorm):
        raise TypeError(f"the final norm is a {type(encoder.norm).__name__}, not an nn.LayerNorm")
    return _stack_hyperparameters(encoder, strict=True)


def main(argv):
    p = argparse.ArgumentParser(
        prog="attn-export",
        description="Write a torch.save'd module or state_dict as safetensors for attn (attn::io::SafeTensors, "
                    "attn::io::load_state_dict), with the hyperparameters of every nn.MultiheadAttention and "
                    "nn.Transformer* module in the file's metadata (a plain state_dict: what its shapes prove).",
        epilog="example: attn-export model.pt model.safetensors --dtype float32; then in C++ "
               "attn::io::load_state_dict(encoder, attn::io::SafeTensors::open(\"model.safetensors\"), \"encoder\")")
    p.add_argument("input", help="a file written by torch.save: an nn.Module or a state_dict")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--prefix", default="",
                   help="prepended to every tensor and hyperparameter key, with a '.' added when missing: "
                        "'model' gives model.encoder.layers.0...")
    p.add_argument("--dtype", choices=["float64", "float32", "float16", "bfloat16"],
                   help="convert floating tensors to this dtype")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="a metadata entry (repeatable; not prefixed), e.g. --meta encoder.nhead=8")
    args = p.parse_args(argv[1:])
    if torch is None:
        p.error("PyTorch is not installed (Debian: python3-torch); it is needed to read " + args.input)
    prefix = args.prefix + "." if args.prefix and not args.prefix.endswith(".") else args.prefix
    # A whole pickled module needs full unpickling (torch >= 2.6 defaults to weights_only=True):
    # export only files you trust, as for any torch.load.
    obj = torch.load(args.input, map_location="cpu", weights_only=False)
    if not isinstance(obj, (torch.nn.Module, dict)):
        p.error(f"{args.input} holds a {type(obj).__name__}, not a module or a state_dict")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    metadata = {"format": "pt", "source": args.input}
    for entry in args.meta:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            p.error(f"--meta {entry!r}: expected KEY=VALUE")
        metadata[key] = value
    export_state_dict(obj, args.output, prefix=prefix, dtype=dtype, metadata=metadata)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
