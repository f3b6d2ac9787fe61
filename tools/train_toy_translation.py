#!/usr/bin/python3
"""Train a small PyTorch encoder-decoder (nn.Transformer) on a toy translation whose answers can be
checked - reversing a string of lowercase letters - and write

    examples/data/toy_translation.safetensors                     the weights (float32), hyperparameters
    tests/data/translation/toy_translation_greedy.safetensors     PyTorch's greedy outputs and logits

Usage (from the repository root, torch only, CPU, one thread; about 3 minutes):

    /usr/bin/python3 tools/train_toy_translation.py [--steps N] [--out-weights PATH] [--out-fixture PATH]
    /usr/bin/python3 tools/train_toy_translation.py --check     re-load the weights file, re-run greedy
                                                                 decoding: held-out accuracy, and the
                                                                 fixture's outputs and logits reproduced

The fixture lives in a subdirectory of tests/data/ because every *.safetensors file directly in
tests/data/ is a case of tests/pytorch_fixture_test.cpp (PyTorchFixtureFiles.EveryFileHasATest).

Deterministic: fixed seeds (torch, Python's random) and one thread, so running it again on the same
machine rewrites the same weights (the metadata records the training time, which varies; another
CPU's kernels may round differently in the last bit, and training amplifies that). One thread, not
two: Debian's torch links the reference (netlib) BLAS, single-threaded, so a second OpenMP thread
gains little, and on a 2-core machine busy with a compiler it made each step 8x slower.

Training: Adam (betas 0.9, 0.98), lr 3e-3 with 200 warmup steps and a cosine decay, 2000 steps of
32 pairs, gradient norm clipped at 1; every batch has one source length (no padding: 1.6x less
work), the masks are passed all the same, and after training the script asserts that a padded
batch of mixed lengths gives each sequence the logits it gets alone.

The task: source = 4..16 lowercase letters, target = the same letters reversed, then eos.
Vocabulary (V = 29): pad = 0, bos = 1, eos = 2, then "abcdefghijklmnopqrstuvwxyz" (id 3 + index).
200 held-out sources (drawn first, from their own seed) and the fixture's 8 sources never appear
in training.

The model (module names are the weights file's keys):

    src_embed    nn.Embedding(V, d)            tgt_embed  nn.Embedding(V, d)
    pos_embed    nn.Embedding(MAX_LEN, d)      learned positions 0, 1, ..., shared by source and target
    transformer  nn.Transformer(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                dim_feedforward=128, dropout=0.0, batch_first=True)  (relu, post-norm,
                                final LayerNorms encoder.norm and decoder.norm, as nn.Transformer has)
    generator    nn.Linear(d, V)

    src_x  = src_embed(src) * sqrt(d) + pos_embed(0..S-1)           [B, S, d]
    tgt_x  = tgt_embed(tgt) * sqrt(d) + pos_embed(0..T-1)           [B, T, d]
    logits = generator(transformer(src_x, tgt_x, tgt_mask=causal (0 / -inf above the diagonal),
                                   src_key_padding_mask=src==pad, tgt_key_padding_mask=tgt==pad,
                                   memory_key_padding_mask=src==pad))

Greedy decoding (PyTorch has no cache): memory = encoder(src_x) once; then from tgt = [bos], each
step re-runs the decoder over the whole target so far with the causal tgt_mask, takes the argmax of
the last row's logits, appends it; stops after eos or max_new tokens. MAX_LEN = 72 positions: the
benchmark decodes 64 steps without stopping (target positions 0..64); training covers positions
0..15 (source) and 0..16 (target input [bos] + 16 letters), the rest keep their random init.

PyTorch 1.13 details handled here:
  * every evaluation runs PyTorch's Python path ("slow path"): grad stays on and the parameters
    require it. In eval mode under no_grad torch 1.13 would take the fused encoder-layer kernel and,
    with a src_key_padding_mask, the nested-tensor path, which returns zeros after the encoder's
    layers at padded source rows (so encoder.norm.bias after the final norm). Decoder outputs do
    not depend on those rows, but the Python path is what the C++ implementation mirrors.
  * no row is ever fully masked (which gives NaN in 1.13): every source has >= 4 letters, and a
    padded target position still sees bos at position 0 through the causal mask.

Weights file: export_state_dict(model, dtype=float32): every key of the top module (src_embed.weight,
tgt_embed.weight, pos_embed.weight, transformer.encoder.layers.{i}...., transformer.encoder.norm.*,
transformer.decoder.layers.{i}...., transformer.decoder.norm.*, generator.weight, generator.bias);
metadata: export_state_dict's hyperparameters (transformer.d_model, transformer.nhead, ...,
transformer.encoder.layers.0.self_attn.num_heads, ...; attn.export_version) plus vocab, pad_id,
bos_id, eos_id, max_len, task, embed_scale, min_src_len, max_src_len, held_out_accuracy,
held_out_count, train_seconds, train_steps, format, generator, torch_version.

Fixture (tests/data/translation/toy_translation_greedy.safetensors, every tensor F64; ids are exact
integers), for i in 0..7 (held-out sources, lengths 4..16):
    src.{i}     [S_i]      source ids
    greedy.{i}  [n_i]      the float32 model's greedy output ids (eos included when produced, bos not);
                           the float64 model's are asserted equal
    logits.{i}  [n_i, V]   float64 logits (model.double()) of the teacher-forced target
                           [bos] + greedy.{i}[:-1]: row t predicts output token t
metadata: count, vocab, pad_id, bos_id, eos_id, max_new_tokens, source.{i}, output.{i} (strings),
smallest_logit_gap (every greedy step's top-1 minus top-2 float64 logit is >= 1e-3),
held_out_accuracy, train_seconds, weights, generator, torch_version.
"""

import argparse
import json
import math
import os
import random
import struct
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_state_dict as esd  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PAD, BOS, EOS = 0, 1, 2
V = 3 + len(LETTERS)
TASK = "reverse"  # "sort" trains too (0.99 held-out in the same budget); reverse reached 1.000
MIN_SRC, MAX_SRC = 4, 16
MAX_LEN = 72  # >= 66: bos + 64 generated tokens (+1), for the benchmark's 64 steps without stopping
D_MODEL, NHEAD, ENC_LAYERS, DEC_LAYERS, FFN = 64, 4, 2, 2, 128
HELD_OUT = 200
FIXTURE_LENGTHS = [4, 5, 7, 9, 11, 13, 15, 16]
MIN_GAP = 1e-3
THREADS = 1  # see the docstring: 2 OpenMP threads ran 8x slower on a busy 2-core machine


def encode(s):
    return [3 + LETTERS.index(c) for c in s]


def decode(ids):
    return "".join(LETTERS[i - 3] if i >= 3 else {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}[i] for i in ids)


def answer(s):
    return s[::-1] if TASK == "reverse" else "".join(sorted(s))


def random_source(rng, n=None):
    n = n if n is not None else rng.randint(MIN_SRC, MAX_SRC)
    return "".join(rng.choice(LETTERS) for _ in range(n))


def held_out_sets():
    """The held-out sources (accuracy) and the fixture's sources, from their own seed."""
    rng = random.Random(4321)
    held = []
    seen = set()
    while len(held) < HELD_OUT:
        s = random_source(rng)
        if s not in seen:
            seen.add(s)
            held.append(s)
    fixture = []
    for n in FIXTURE_LENGTHS:
        s = random_source(rng, n)
        while s in seen:
            s = random_source(rng, n)
        seen.add(s)
        fixture.append(s)
    return held, fixture


def batch(rng, n, excluded):
    """src [n, S] ids, tgt_in [n, T] ([bos] + answer), tgt_out [n, T] (answer + [eos]), pad-filled
    (pad_batch); every source of a batch has the same length, so none is padded in training."""
    pairs = []
    length = rng.randint(MIN_SRC, MAX_SRC)  # one length per batch: no padding, 1.6x less work
    while len(pairs) < n:
        s = random_source(rng, length)
        if s not in excluded:
            pairs.append((encode(s), encode(answer(s))))
    return pad_batch(pairs)


def pad_batch(pairs):
    """(source ids, answer ids) pairs -> src, tgt_in, tgt_out, each padded with PAD on the right."""
    n = len(pairs)
    S = max(len(p[0]) for p in pairs)
    T = max(len(p[1]) for p in pairs) + 1
    src = torch.full((n, S), PAD, dtype=torch.long)
    tgt_in = torch.full((n, T), PAD, dtype=torch.long)
    tgt_out = torch.full((n, T), PAD, dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        src[i, : len(a)] = torch.tensor(a)
        tgt_in[i, : len(b) + 1] = torch.tensor([BOS] + b)
        tgt_out[i, : len(b) + 1] = torch.tensor(b + [EOS])
    return src, tgt_in, tgt_out


def check_padded_batch(model, sources):
    """The masks at work: a right-padded batch of different lengths (src, tgt and memory key padding
    masks all used) gives every sequence's unpadded rows the logits it gets alone. Returns the
    largest difference."""
    pairs = [(encode(s), encode(answer(s))) for s in sources]
    src, tgt_in, _ = pad_batch(pairs)
    worst = 0.0
    with python_path(model):
        batched = model(src, tgt_in).detach()
        for i, (a, b) in enumerate(pairs):
            alone = model(torch.tensor([a]), torch.tensor([[BOS] + b])).detach()[0]
            worst = max(worst, float((batched[i, : len(b) + 1] - alone).abs().max()))
    assert torch.isfinite(batched).all()
    return worst


def run_on(model, src_ids, steps):
    """Greedy decoding for `steps` tokens without stopping at eos (the benchmark's 64 steps): checks
    that the positions beyond training's (up to MAX_LEN - 1) give finite logits."""
    with python_path(model):
        src = torch.tensor([src_ids])
        memory = model.encode(src)
        tgt = [BOS]
        for _ in range(steps):
            logits = model.decode(torch.tensor([tgt]), memory, src)[0, -1].detach()
            assert torch.isfinite(logits).all()
            tgt.append(int(logits.argmax()))
    return tgt[1:]


# ---------------------------------------------------------------------------------------------
# the model

def causal_mask(T, dtype):
    """nn.Transformer.generate_square_subsequent_mask(T): 0 on and below the diagonal, -inf above."""
    return torch.triu(torch.full((T, T), float("-inf"), dtype=dtype), diagonal=1)


class ToyTranslator(nn.Module):
    def __init__(self):
        super().__init__()
        d = D_MODEL
        self.src_embed = nn.Embedding(V, d)
        self.tgt_embed = nn.Embedding(V, d)
        self.pos_embed = nn.Embedding(MAX_LEN, d)
        self.transformer = nn.Transformer(d_model=d, nhead=NHEAD, num_encoder_layers=ENC_LAYERS,
                                          num_decoder_layers=DEC_LAYERS, dim_feedforward=FFN, dropout=0.0,
                                          batch_first=True)
        self.generator = nn.Linear(d, V)
        self.scale = math.sqrt(d)
        # Token embeddings ~ N(0, 1/d), so that scaled by sqrt(d) they are O(1) like the positions.
        nn.init.normal_(self.src_embed.weight, std=d ** -0.5)
        nn.init.normal_(self.tgt_embed.weight, std=d ** -0.5)
        nn.init.normal_(self.pos_embed.weight, std=0.5)

    def embed(self, table, ids):
        pos = torch.arange(ids.shape[1])
        return table(ids) * self.scale + self.pos_embed(pos)

    def encode(self, src):
        return self.transformer.encoder(self.embed(self.src_embed, src), src_key_padding_mask=src == PAD)

    def decode(self, tgt, memory, src):
        T = tgt.shape[1]
        h = self.transformer.decoder(self.embed(self.tgt_embed, tgt), memory,
                                     tgt_mask=causal_mask(T, memory.dtype), tgt_key_padding_mask=tgt == PAD,
                                     memory_key_padding_mask=src == PAD)
        return self.generator(h)

    def forward(self, src, tgt):
        T = tgt.shape[1]
        src_x = self.embed(self.src_embed, src)
        tgt_x = self.embed(self.tgt_embed, tgt)
        h = self.transformer(src_x, tgt_x, tgt_mask=causal_mask(T, src_x.dtype), src_key_padding_mask=src == PAD,
                             tgt_key_padding_mask=tgt == PAD, memory_key_padding_mask=src == PAD)
        return self.generator(h)


def python_path(model):
    """Evaluation on PyTorch's Python path (see the docstring): grad on, parameters requiring it."""
    for p in model.parameters():
        p.requires_grad_(True)
    return torch.enable_grad()


def greedy(model, src_ids, max_new):
    """Greedy decoding of one source, no cache: returns the output ids (eos included when produced)
    and each step's top-1 minus top-2 logit gap."""
    with python_path(model):
        src = torch.tensor([src_ids])
        memory = model.encode(src)
        tgt = [BOS]
        gaps = []
        for _ in range(max_new):
            logits = model.decode(torch.tensor([tgt]), memory, src)[0, -1].detach()
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(logits.argmax())
            tgt.append(nxt)
            if nxt == EOS:
                break
    return tgt[1:], gaps


def max_new_for(src):
    return len(src) + 1  # the answer and eos; a model that runs on is wrong anyway


def accuracy(model, sources):
    ok = 0
    for s in sources:
        out, _ = greedy(model, encode(s), max_new_for(s))
        ok += out == encode(answer(s)) + [EOS]
    return ok / len(sources)


# ---------------------------------------------------------------------------------------------
# reading the weights back (--check), with json + struct, as esd.save_file wrote them

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "I64": torch.int64, "I32": torch.int32,
              "BOOL": torch.bool, "U8": torch.uint8}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=_ST_DTYPES[info["dtype"]]) if b > a else \
            torch.empty(0, dtype=_ST_DTYPES[info["dtype"]])
        tensors[name] = t.reshape(info["shape"])
    return tensors, meta


def check(args):
    torch.set_num_threads(THREADS)
    tensors, meta = read_safetensors(args.out_weights)
    assert meta["task"] == TASK and meta["vocab"] == LETTERS and int(meta["max_len"]) == MAX_LEN, meta
    model = ToyTranslator()
    model.load_state_dict(tensors, strict=True)
    model.eval()
    held, _ = held_out_sets()
    t0 = time.time()
    acc = accuracy(model, held)
    print(f"{args.out_weights}: greedy exact-match accuracy on {len(held)} held-out sources {acc:.3f} "
          f"(recorded {meta.get('held_out_accuracy')}), {time.time() - t0:.1f} s")
    ok = acc >= 0.98
    if os.path.exists(args.out_fixture):
        fx, fmeta = read_safetensors(args.out_fixture)
        model64 = ToyTranslator().double()
        model64.load_state_dict({k: v.double() for k, v in tensors.items()})
        model64.eval()
        worst = 0.0
        for i in range(int(fmeta["count"])):
            src = [int(x) for x in fx[f"src.{i}"]]
            want = [int(x) for x in fx[f"greedy.{i}"]]
            got, _ = greedy(model, src, max_new_for(src))
            with python_path(model64):
                logits = model64(torch.tensor([src], dtype=torch.long), torch.tensor([[BOS] + want[:-1]]))[0].detach()
            worst = max(worst, float((logits - fx[f"logits.{i}"]).abs().max()))
            if got != want:
                ok = False
                print(f"  fixture {i}: greedy {decode(got)!r} != stored {decode(want)!r}")
        print(f"{args.out_fixture}: greedy outputs {'reproduced' if ok else 'DIFFER'}; "
              f"float64 logits differ by at most {worst:.3g}")
        ok = ok and worst < 1e-9
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------

def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out-weights", default=os.path.join(root, "examples", "data", "toy_translation.safetensors"))
    ap.add_argument("--out-fixture", default=os.path.join(root, "tests", "data", "translation",
                                                          "toy_translation_greedy.safetensors"))
    ap.add_argument("--check", action="store_true", help="only re-load the weights file and re-run greedy decoding")
    args = ap.parse_args(argv[1:])
    if args.check:
        return check(args)

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    rng = random.Random(0)
    held, fixture_sources = held_out_sets()
    excluded = set(held) | set(fixture_sources)

    model = ToyTranslator()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ToyTranslator: {n_params} parameters; task {TASK}, sources of {MIN_SRC}..{MAX_SRC} letters")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        src, tgt_in, tgt_out = batch(rng, args.batch, excluded)
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f} s", flush=True)
    train_s = time.time() - t0
    model.eval()

    t1 = time.time()
    acc = accuracy(model, held)
    print(f"trained in {train_s:.1f} s ({args.steps} steps of {args.batch}); greedy exact-match accuracy on "
          f"{HELD_OUT} held-out sources: {acc:.3f} ({time.time() - t1:.1f} s)")
    if acc < 0.98:
        print("warning: held-out accuracy below 0.98", file=sys.stderr)
    pad_diff = check_padded_batch(model, held[:16])
    assert pad_diff < 1e-4, f"a padded batch differs from its sequences run alone by {pad_diff}"
    assert len(run_on(model, encode(held[0]), MAX_LEN - 2)) == MAX_LEN - 2
    print(f"padded batch = sequences alone to {pad_diff:.2g}; {MAX_LEN - 2} greedy steps without stopping run")

    # The weights, float32; export_state_dict adds the hyperparameters of transformer.* itself.
    meta = {
        "format": "attn-toy-translation",
        "task": TASK,
        "vocab": LETTERS,
        "pad_id": str(PAD),
        "bos_id": str(BOS),
        "eos_id": str(EOS),
        "max_len": str(MAX_LEN),
        "embed_scale": repr(math.sqrt(D_MODEL)),
        "min_src_len": str(MIN_SRC),
        "max_src_len": str(MAX_SRC),
        "held_out_accuracy": f"{acc:.4f}",
        "held_out_count": str(HELD_OUT),
        "train_seconds": f"{train_s:.1f}",
        "train_steps": str(args.steps),
        "generator": "tools/train_toy_translation.py",
        "torch_version": torch.__version__,
    }
    os.makedirs(os.path.dirname(args.out_weights), exist_ok=True)
    esd.export_state_dict(model, args.out_weights, dtype=torch.float32, metadata=meta)

    # The fixture: the float32 model's greedy outputs (the float64 model's must be the same), and the
    # float64 logits of the teacher-forced target.
    model64 = ToyTranslator().double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    model64.eval()
    tensors = {}
    fmeta = {"kind": "toy_translation_greedy", "weights": "examples/data/toy_translation.safetensors",
             "count": str(len(fixture_sources)), "task": TASK, "vocab": LETTERS, "pad_id": str(PAD),
             "bos_id": str(BOS), "eos_id": str(EOS), "max_new_tokens": "len(src) + 1 (stops after eos)",
             "held_out_accuracy": f"{acc:.4f}", "train_seconds": f"{train_s:.1f}",
             "generator": "tools/train_toy_translation.py", "torch_version": torch.__version__}
    worst_gap = float("inf")
    for i, s in enumerate(fixture_sources):
        ids = encode(s)
        out, _ = greedy(model, ids, max_new_for(ids))
        out64, gaps64 = greedy(model64, ids, max_new_for(ids))
        assert out == out64, f"{s}: float32 {decode(out)!r} != float64 {decode(out64)!r}"
        assert min(gaps64) >= MIN_GAP, f"{s}: a greedy step's top-2 logit gap is {min(gaps64)}"
        worst_gap = min(worst_gap, min(gaps64))
        with python_path(model64):
            logits = model64(torch.tensor([ids]), torch.tensor([[BOS] + out[:-1]]))[0].detach()  # [n, V]
        assert [int(x) for x in logits.argmax(-1)] == out
        tensors[f"src.{i}"] = torch.tensor(ids, dtype=torch.float64)
        tensors[f"greedy.{i}"] = torch.tensor(out, dtype=torch.float64)
        tensors[f"logits.{i}"] = logits
        fmeta[f"source.{i}"] = s
        fmeta[f"output.{i}"] = decode(out)
        print(f"  {s:>16} -> {decode(out):<24} ({'right' if out == encode(answer(s)) + [EOS] else 'WRONG'}; "
              f"smallest top-2 logit gap {min(gaps64):.3f})")
    fmeta["smallest_logit_gap"] = repr(worst_gap)
    os.makedirs(os.path.dirname(args.out_fixture), exist_ok=True)
    esd.save_file(tensors, args.out_fixture, metadata=fmeta)
    for path in (args.out_weights, args.out_fixture):
        print(f"wrote {path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
