#!/usr/bin/python3
"""Train the tiny GPT of examples/: a decoder-only model with Llama's structure (RMSNorm, grouped-
query attention with RoPE, SwiGLU) on two synthetic tasks whose answers can be checked, and write

    examples/data/tiny_gpt.safetensors             the weights (float32) and hyperparameters
    tests/data/gpt/tiny_gpt_generations.safetensors PyTorch's greedy generations and logits

Usage (from the repository root, torch only, CPU; about 4.5 minutes on one core):

    /usr/bin/python3 tools/train_tiny_gpt.py [--steps N] [--out-weights PATH] [--out-fixture PATH]

Deterministic: fixed seeds and one thread, so running it again on the same machine rewrites the same
files (another CPU's torch kernels may round differently in the last bit, and training amplifies
that, so the weights are the committed file, not this script's output on every machine).

The tasks, one character per token (vocabulary VOCAB below; token id = index in VOCAB):

    sort:  "S" + 1..8 digits + "="   ->  the digits in ascending order, then "."   S31415=11345.
    add:   a + "+" + b + "=", a and b of 1..3 digits  ->  a + b in decimal, then "."   123+456=579.

A prompt is everything up to and including "="; the model answers after it and stops with ".".
Training sees only prompts outside the held-out set (HELD_OUT prompts per task, drawn first from
their own seed, with uniform digits) and the fixed prompts of the test; the loss is on the answer
tokens only. A quarter of the training additions have operands rich in nines, for carry chains.

The model (names as Hugging Face's LlamaForCausalLM without its "model." prefix):

    embed_tokens.weight                          [V, d_model]
    layers.{i}.input_layernorm.weight            [d_model]                 RMSNorm
    layers.{i}.self_attn.q_proj.weight           [n_heads * head_dim, d_model]
    layers.{i}.self_attn.k_proj.weight           [n_kv_heads * head_dim, d_model]
    layers.{i}.self_attn.v_proj.weight           [n_kv_heads * head_dim, d_model]
    layers.{i}.self_attn.o_proj.weight           [d_model, n_heads * head_dim]
    layers.{i}.post_attention_layernorm.weight   [d_model]                 RMSNorm
    layers.{i}.mlp.gate_proj.weight              [ffn_dim, d_model]        SwiGLU
    layers.{i}.mlp.up_proj.weight                [ffn_dim, d_model]
    layers.{i}.mlp.down_proj.weight              [d_model, ffn_dim]
    norm.weight                                  [d_model]                 final RMSNorm
    lm_head.weight                               [V, d_model]              untied from embed_tokens

No biases anywhere. Per layer: h = x + o_proj(attn(rope(q), rope(k), v)) on input_layernorm(x),
causal; out = h + mlp(post_attention_layernorm(h)). RMSNorm(x) = x / sqrt(mean(x^2) + rms_eps) * w.
RoPE is GPT-NeoX's "rotate half" over all of head_dim with base rope_base, at positions 0, 1, ...
Query head h reads key/value head h // (n_heads / n_kv_heads) (HF's repeat_kv). Scores are scaled
by 1 / sqrt(head_dim). logits = lm_head(norm(x)).
"""

import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_state_dict as esd  # noqa: E402

VOCAB = "_0123456789+=S."  # "_" pads the training batches and is never predicted
PAD, STOP = VOCAB.index("_"), VOCAB.index(".")

CONFIG = dict(
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=176,
    rope_base=10000.0,
    rms_eps=1e-5,
    max_seq=24,
)

SORT_MAX = 8  # digits
ADD_MAX = 3  # digits per operand
HELD_OUT = 500  # prompts per task
PROMPTS = ["S31415=", "S90817263=", "S5=", "S77012=", "123+456=", "999+1=", "58+67=", "7+5="]


def encode(s):
    return [VOCAB.index(c) for c in s]


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


# ---------------------------------------------------------------------------------------------
# tasks

def sort_example(rng):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, SORT_MAX)))
    return "S" + digits + "=", "".join(sorted(digits)) + "."


def add_example(rng, carries=False):
    def operand():
        n = rng.randint(1, ADD_MAX)
        if carries:  # nines make long carry chains (999+1), which uniform digits rarely do
            return int("".join("9" if rng.random() < 0.6 else rng.choice("0123456789") for _ in range(n)))
        return rng.randint(0, 10 ** n - 1)

    a, b = operand(), operand()
    return f"{a}+{b}=", f"{a + b}."


def answer(prompt):
    """The correct continuation of a prompt (for the checks)."""
    body = prompt[:-1]
    if body.startswith("S"):
        return "".join(sorted(body[1:])) + "."
    a, b = body.split("+")
    return f"{int(a) + int(b)}."


def held_out_set():
    rng = random.Random(1234)
    out = {}
    for task in (sort_example, add_example):
        prompts = set()
        while len(prompts) < HELD_OUT:
            prompts.add(task(rng)[0])
        out[task.__name__] = sorted(prompts)
    return out


def batch(rng, n, excluded):
    """[n, max_seq] ids (padded), [n, max_seq] targets (-100 outside the answers)."""
    T = CONFIG["max_seq"]
    x = torch.full((n, T), PAD, dtype=torch.long)
    y = torch.full((n, T), -100, dtype=torch.long)
    i = 0
    while i < n:
        if i % 2 == 0:
            prompt, ans = sort_example(rng)
        else:  # a quarter of the additions carry-heavy
            prompt, ans = add_example(rng, carries=i % 8 == 1)
        if prompt in excluded:
            continue
        ids = encode(prompt + ans)
        x[i, : len(ids)] = torch.tensor(ids)
        # Position t predicts token t + 1; only the answer's tokens count.
        y[i, len(prompt) - 1: len(ids) - 1] = torch.tensor(ids[len(prompt):])
        i += 1
    return x, y


# ---------------------------------------------------------------------------------------------
# the model, in plain torch

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(T, head_dim, base, dtype):
    """cos, sin [T, head_dim] for positions 0..T-1 (HF LlamaRotaryEmbedding, in float64, then cast)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.H, self.Hkv, self.D = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        E = c["d_model"]
        self.q_proj = nn.Linear(E, self.H * self.D, bias=False)
        self.k_proj = nn.Linear(E, self.Hkv * self.D, bias=False)
        self.v_proj = nn.Linear(E, self.Hkv * self.D, bias=False)
        self.o_proj = nn.Linear(self.H * self.D, E, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        q = q * cos[:T] + rotate_half(q) * sin[:T]
        k = k * cos[:T] + rotate_half(k) * sin[:T]
        rep = self.H // self.Hkv  # query head h reads kv head h // rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.D)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = scores.softmax(-1) @ v  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c["d_model"], c["ffn_dim"], bias=False)
        self.up_proj = nn.Linear(c["d_model"], c["ffn_dim"], bias=False)
        self.down_proj = nn.Linear(c["ffn_dim"], c["d_model"], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["d_model"], c["rms_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["d_model"], c["rms_eps"])
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(len(VOCAB), c["d_model"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["d_model"], c["rms_eps"])
        self.lm_head = nn.Linear(c["d_model"], len(VOCAB), bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):  # ids [B, T] -> logits [B, T, V]
        cos, sin = rope_tables(ids.shape[1], self.c["head_dim"], self.c["rope_base"], self.lm_head.weight.dtype)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def generate(model, prompt_ids, max_new):
    """Greedy, without a KV cache: the full forward again at every step. Stops after STOP.
    Returns the new ids and, per step, the gap between the best and the second-best logit."""
    ids = list(prompt_ids)
    new, gaps = [], []
    for _ in range(max_new):
        logits = model(torch.tensor([ids]))[0, -1]
        top2 = logits.topk(2).values
        nxt = int(logits.argmax())
        gaps.append(float(top2[0] - top2[1]))
        ids.append(nxt)
        new.append(nxt)
        if nxt == STOP:
            break
    return new, gaps


def max_new_for(prompt):
    return CONFIG["max_seq"] - len(prompt)


@torch.no_grad()
def accuracy(model, prompts):
    ok = 0
    for p in prompts:
        new, _ = generate(model, encode(p), max_new_for(p))
        ok += decode(new) == answer(p)
    return ok / len(prompts)


# ---------------------------------------------------------------------------------------------

def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out-weights", default=os.path.join(root, "examples", "data", "tiny_gpt.safetensors"))
    ap.add_argument("--out-fixture", default=os.path.join(root, "tests", "data", "gpt", "tiny_gpt_generations.safetensors"))
    args = ap.parse_args(argv[1:])

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    held = held_out_set()
    excluded = set(held["sort_example"]) | set(held["add_example"]) | set(PROMPTS)

    model = TinyGPT(CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"TinyGPT: {n_params} parameters, config {CONFIG}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    t0 = time.time()
    for step in range(args.steps):
        x, y = batch(rng, args.batch, excluded)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, len(VOCAB)), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f} s", flush=True)
    train_s = time.time() - t0
    model.eval()

    acc = {task: accuracy(model, prompts) for task, prompts in held.items()}
    print(f"trained in {train_s:.1f} s; greedy exact-match accuracy on {HELD_OUT} held-out prompts per task: "
          + ", ".join(f"{t.split('_')[0]} {a:.3f}" for t, a in acc.items()))

    # The weights, float32, with what a loader needs in the metadata.
    meta = {k: repr(v) if isinstance(v, float) else str(v) for k, v in CONFIG.items()}
    meta.update({
        "format": "attn-tiny-gpt",
        "vocab": VOCAB,
        "stop_token": ".",
        "tokenizer": "one token per character; id = index in vocab",
        "tasks": "sort: S<digits>= -> sorted digits, then '.'; add: a+b= -> a+b, then '.'",
        "held_out_accuracy_sort": f"{acc['sort_example']:.4f}",
        "held_out_accuracy_add": f"{acc['add_example']:.4f}",
        "train_steps": str(args.steps),
        "generator": "tools/train_tiny_gpt.py",
        "torch_version": torch.__version__,
    })
    os.makedirs(os.path.dirname(args.out_weights), exist_ok=True)
    esd.export_state_dict(model, args.out_weights, dtype=torch.float32, metadata=meta)

    # The fixture: greedy generations of the float32 model, recomputing the full forward each step,
    # checked against the same weights in float64 (a generation that differed would be too close a
    # call for a C++ test to hold token for token); and the float64 logits of the first prompt.
    model64 = TinyGPT(CONFIG).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    model64.eval()
    tensors, fmeta = {}, {"kind": "tiny_gpt_generations", "weights": "examples/data/tiny_gpt.safetensors",
                          "prompts": str(len(PROMPTS)), "vocab": VOCAB, "stop_token": ".",
                          "generator": "tools/train_tiny_gpt.py", "torch_version": torch.__version__}
    worst_gap = float("inf")
    for i, p in enumerate(PROMPTS):
        ids = encode(p)
        new, gaps = generate(model, ids, max_new_for(p))
        new64, _ = generate(model64, ids, max_new_for(p))
        assert new == new64, f"{p}: float32 {decode(new)!r} != float64 {decode(new64)!r}"
        worst_gap = min(worst_gap, min(gaps))
        tensors[f"prompt_ids.{i}"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"generated_ids.{i}"] = torch.tensor(new, dtype=torch.int32)
        tensors[f"logit_gaps.{i}"] = torch.tensor(gaps, dtype=torch.float64)
        fmeta[f"prompt.{i}"] = p
        fmeta[f"generated.{i}"] = decode(new)
        print(f"  {p:>14} -> {decode(new):<10} ({'right' if decode(new) == answer(p) else 'WRONG'}; "
              f"smallest top-2 logit gap {min(gaps):.3f})")
    with torch.no_grad():
        tensors["logits.0"] = model64(torch.tensor([encode(PROMPTS[0])]))[0]  # [len(prompt 0), V], float64
    fmeta["max_new_tokens"] = "max_seq - prompt length (generation stops after stop_token)"
    fmeta["smallest_logit_gap"] = repr(worst_gap)
    os.makedirs(os.path.dirname(args.out_fixture), exist_ok=True)
    esd.save_file(tensors, args.out_fixture, metadata=fmeta)
    for path in (args.out_weights, args.out_fixture):
        print(f"wrote {path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
