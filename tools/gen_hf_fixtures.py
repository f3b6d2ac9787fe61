#!/usr/bin/python3
"""Write tiny random-weight Hugging Face checkpoint directories and the outputs their models give,
computed in float64 by forwards written here in plain torch (the `transformers` package is not
installed: each forward below follows Hugging Face's modeling code line by line).

Usage (from the repository root, with Debian's python3-torch):

    /usr/bin/python3 tools/gen_hf_fixtures.py [OUT_DIR]

OUT_DIR defaults to tests/data/hf. For each case:

  OUT_DIR/<case>/                  a checkpoint directory as `save_pretrained` writes it:
      config.json                  the config class's fields (json, indent 2, keys sorted, as HF);
      model.safetensors            or model-0000k-of-00002.safetensors + model.safetensors.index.json
                                   ({"metadata": {"total_size": bytes of tensor data}, "weight_map":
                                   {name: shard}}; tensors split in state_dict order, about half each);
                                   every file's __metadata__ is {"format": "pt"}, tensors named as the
                                   state_dict of the class in "architectures" (a tied lm_head.weight is
                                   left out of the file, as HF does).
  OUT_DIR/<case>_expected.safetensors   every tensor F64, metadata description, source, max_new_tokens.

Cases:
  bert          BertModel, keys under "bert." (as BertFor* checkpoints; no cls.* head), F32, one file.
  roberta       RobertaModel, no prefix, BF16, two shards; positions from padding_idx + 1.
  gpt2          GPT2LMHeadModel (transformer.*), tied head, Conv1D weights [in, out], gelu_new, F32,
                with the old causal-mask buffers attn.bias [1, 1, n_positions, n_positions] and
                attn.masked_bias (-1e4) that old GPT-2 files carry.
  llama3        LlamaForCausalLM, GQA (4 heads, 2 kv heads, head_dim 16), untied, rope_theta 5e5,
                rope_scaling llama3 (factor 8, low 1, high 4, original_max_position_embeddings 64:
                at head_dim 16 one frequency keeps, one is smoothed, six are divided by 8), BF16,
                two shards.
  llama_linear  LlamaForCausalLM as an old (transformers 4.31) checkpoint: rope_scaling {"type":
                "linear", "factor": 2.0} (the old key "type"), no rope_theta in config.json (the
                default 10000 applies), tied head, multi-head (kv heads = heads), the persistent
                buffers model.layers.{i}.self_attn.rotary_emb.inv_freq of transformers <= 4.30 (the
                unscaled float32 inverse frequencies; HF ignores them on load and so do the forwards
                here), F32.
  mistral       MistralForCausalLM, GQA, sliding_window 5 (query i sees keys i-4 .. i), prompts longer
                than the window, F32.
  qwen2         Qwen2ForCausalLM, q/k/v biases (o_proj none), tied head, rope_theta 1e6,
                use_sliding_window false (sliding_window is set, larger than every sequence, as in
                real Qwen2 configs), F32.

Expected tensors (all F64):
  decoders: for i in 0, 1, 2: input_ids.{i} [L_i] (token ids), logits.{i} [L_i, vocab] (one forward
            over the prompt, no cache), greedy.{i} [max_new_tokens] (argmax continuation, 8 steps,
            no stop token, each step a full forward over the whole sequence). At every greedy step
            the best logit beats the second by >= MIN_GAP (1e-3), so a float32 reproduction picks
            the same tokens; prompts are redrawn until that holds, and the script asserts it.
  encoders: a batch of B = 3 sequences right-padded with pad_token_id to one length L:
            input_ids, attention_mask (1 = real token), token_type_ids [B, L];
            last_hidden_state [B*L, hidden] (padded rows included: HF masks padded keys only),
            pooler_output [B, hidden] (tanh(dense(first token))), sentence_embedding [B, hidden]
            (sentence-transformers mean pooling: the mean of the rows with attention_mask 1).

Mirrored from huggingface/transformers v4.53 (the maths of these files is the same from v4.45):
  src/transformers/models/bert/modeling_bert.py        BertEmbeddings, BertSelfAttention,
                                                        BertSelfOutput, BertIntermediate, BertOutput,
                                                        BertPooler, get_extended_attention_mask
  src/transformers/models/roberta/modeling_roberta.py  RobertaEmbeddings,
                                                        create_position_ids_from_input_ids
  src/transformers/models/gpt2/modeling_gpt2.py        GPT2Attention (eager_attention_forward), GPT2MLP,
                                                        GPT2Block, GPT2Model, GPT2LMHeadModel
  src/transformers/pytorch_utils.py                    Conv1D (x @ weight + bias, weight [in, out])
  src/transformers/activations.py                      NewGELUActivation (gelu_new), GELUActivation (erf)
  src/transformers/models/llama/modeling_llama.py      LlamaRMSNorm, LlamaRotaryEmbedding, rotate_half,
                                                        apply_rotary_pos_emb, repeat_kv, LlamaAttention,
                                                        LlamaMLP, LlamaDecoderLayer, LlamaForCausalLM
  src/transformers/modeling_rope_utils.py              _compute_default_rope_parameters,
                                                        _compute_linear_scaling_rope_parameters,
                                                        _compute_llama3_parameters
  src/transformers/models/mistral/modeling_mistral.py  as Llama, plus the sliding window
  src/transformers/masking_utils.py                    sliding_window_overlay: kv_idx > q_idx - W
  src/transformers/models/qwen2/modeling_qwen2.py      as Llama, q/k/v_proj with bias=True

Deliberate differences from HF's arithmetic (all in float64 here; HF would run float32 pieces):
  * inverse frequencies, cos and sin are float64 (HF computes them in float32, whatever the model's
    dtype: `torch.arange(...).float()`, autocast disabled);
  * RMSNorm is float64 throughout (HF's LlamaRMSNorm casts its input to float32, normalizes, casts
    back to the input dtype, then multiplies by the weight);
  * masks use -inf (HF adds torch.finfo(dtype).min; the same softmax when a row keeps a key).

Deterministic: each case seeds torch from a CRC of its name (gen_fixtures.seed_for), one thread;
running the script again rewrites byte-identical files.
"""

import json
import math
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_state_dict import save_file  # noqa: E402
from gen_fixtures import seed_for  # noqa: E402

F64 = torch.float64
NEG_INF = float("-inf")
HF_VERSION = "4.53.0"
MAX_NEW_TOKENS = 8
MIN_GAP = 1e-3  # best minus second-best logit at every greedy step
MIN_DISTINCT = 4  # distinct tokens in a greedy continuation: not one token repeated
WEIGHT_STD = 0.2  # not HF's initializer_range 0.02: outputs that vary visibly with the input


# ---------------------------------------------------------------------------------------------
# building blocks, each as in the HF file named

def linear(x, sd, name):
    """nn.Linear: x W^T (+ b), W [out, in]."""
    y = x @ sd[name + ".weight"].T
    if name + ".bias" in sd:
        y = y + sd[name + ".bias"]
    return y


def conv1d(x, sd, name):
    """pytorch_utils.Conv1D: torch.addmm(bias, x, weight), weight [in, out] (transposed against
    nn.Linear)."""
    return x @ sd[name + ".weight"] + sd[name + ".bias"]


def layer_norm(x, sd, name, eps):
    """nn.LayerNorm over the last dim (biased variance)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def rms_norm(x, weight, eps):
    """LlamaRMSNorm: weight * x * rsqrt(mean(x^2) + eps)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def gelu_erf(x):
    """activations.GELUActivation ("gelu"): 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_new(x):
    """activations.NewGELUActivation ("gelu_new"): the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def silu(x):
    return x * torch.sigmoid(x)


def attention(q, k, v, allowed):
    """eager_attention_forward: softmax(q k^T / sqrt(D), masked) v.
    q [H, L, D], k/v [H, S, D], allowed [L, S] (true = may attend) -> [H, L, D]."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, NEG_INF)
    return torch.softmax(s, dim=-1) @ v


def causal_allowed(L, window=None):
    """[L, L], key j visible to query i: j <= i, and with a sliding window W also j > i - W
    (masking_utils.sliding_window_overlay: W keys, the query's own included)."""
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(L).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    return allowed


def heads(x, n):
    """[L, n*D] -> [n, L, D]."""
    L = x.shape[0]
    return x.view(L, n, -1).transpose(0, 1)


def merge_heads(x):
    """[n, L, D] -> [L, n*D]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


# ---------------------------------------------------------------------------------------------
# BERT / RoBERTa (modeling_bert.py, modeling_roberta.py)

def bert_forward(sd, config, input_ids, attention_mask, token_type_ids, prefix=""):
    """BertModel / RobertaModel. input_ids, attention_mask, token_type_ids [B, L] (long) ->
    last_hidden_state [B, L, E], pooler_output [B, E]."""
    p = prefix
    B, L = input_ids.shape
    H = config["num_attention_heads"]
    eps = config["layer_norm_eps"]
    if config["model_type"] == "roberta":
        # create_position_ids_from_input_ids: real tokens count from padding_idx + 1, pads keep
        # padding_idx.
        pad = config["pad_token_id"]
        mask = input_ids.ne(pad).int()
        position_ids = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad
    else:
        position_ids = torch.arange(L).unsqueeze(0).expand(B, L)
    # BertEmbeddings: word + token_type + position, LayerNorm (dropout off in eval).
    h = (sd[p + "embeddings.word_embeddings.weight"][input_ids]
         + sd[p + "embeddings.token_type_embeddings.weight"][token_type_ids]
         + sd[p + "embeddings.position_embeddings.weight"][position_ids])
    h = layer_norm(h, sd, p + "embeddings.LayerNorm", eps)
    act = {"gelu": gelu_erf, "gelu_new": gelu_new}[config["hidden_act"]]
    out = []
    for b in range(B):
        # get_extended_attention_mask: padded keys are masked for every query, padded queries too
        # get outputs (over the real keys).
        allowed = attention_mask[b].bool().unsqueeze(0).expand(L, L)
        x = h[b]
        for i in range(config["num_hidden_layers"]):
            n = f"{p}encoder.layer.{i}."
            q = heads(linear(x, sd, n + "attention.self.query"), H)
            k = heads(linear(x, sd, n + "attention.self.key"), H)
            v = heads(linear(x, sd, n + "attention.self.value"), H)
            a = merge_heads(attention(q, k, v, allowed))
            # BertSelfOutput: post-norm residual
            x = layer_norm(linear(a, sd, n + "attention.output.dense") + x, sd, n + "attention.output.LayerNorm", eps)
            f = act(linear(x, sd, n + "intermediate.dense"))  # BertIntermediate
            x = layer_norm(linear(f, sd, n + "output.dense") + x, sd, n + "output.LayerNorm", eps)  # BertOutput
        out.append(x)
    last = torch.stack(out)
    pooled = torch.tanh(linear(last[:, 0], sd, p + "pooler.dense"))  # BertPooler
    return last, pooled


# ---------------------------------------------------------------------------------------------
# GPT-2 (modeling_gpt2.py)

def gpt2_forward(sd, config, ids):
    """GPT2LMHeadModel over one sequence: ids [L] -> logits [L, vocab]."""
    L = ids.shape[0]
    H = config["n_head"]
    eps = config["layer_norm_epsilon"]
    act = {"gelu_new": gelu_new, "gelu": gelu_erf}[config["activation_function"]]
    h = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][torch.arange(L)]
    allowed = causal_allowed(L)
    for i in range(config["n_layer"]):
        n = f"transformer.h.{i}."
        x = layer_norm(h, sd, n + "ln_1", eps)
        q, k, v = conv1d(x, sd, n + "attn.c_attn").split(config["n_embd"], dim=-1)  # fused along out
        a = merge_heads(attention(heads(q, H), heads(k, H), heads(v, H), allowed))  # scale_attn_weights
        h = h + conv1d(a, sd, n + "attn.c_proj")
        x = layer_norm(h, sd, n + "ln_2", eps)
        h = h + conv1d(act(conv1d(x, sd, n + "mlp.c_fc")), sd, n + "mlp.c_proj")
    h = layer_norm(h, sd, "transformer.ln_f", eps)
    return h @ sd["transformer.wte.weight"].T  # lm_head tied to wte


# ---------------------------------------------------------------------------------------------
# Llama, Mistral, Qwen2 (modeling_llama.py, modeling_mistral.py, modeling_qwen2.py,
# modeling_rope_utils.py)

def head_dim(config):
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_inv_freq(config):
    """modeling_rope_utils: the inverse frequencies [head_dim / 2] per rope_scaling type."""
    dim = head_dim(config)
    base = config.get("rope_theta", 10000.0)  # LlamaConfig's default when config.json has none
    # _compute_default_rope_parameters
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    scaling = config.get("rope_scaling")
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))  # BC: "rope_type" was "type"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":  # _compute_linear_scaling_rope_parameters
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":  # _compute_llama3_parameters
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # wavelen < high_freq_wavelen: kept; wavelen > low_freq_wavelen: divided by factor
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        # in between: interpolated with a smooth factor
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    raise ValueError(f"rope_scaling type {rope_type!r} is not mirrored here")


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep):
    """[kv_heads, L, D] -> [kv_heads * n_rep, L, D]: kv head j serves query heads j*n_rep .. +n_rep-1."""
    kvh, L, D = x.shape
    return x[:, None].expand(kvh, n_rep, L, D).reshape(kvh * n_rep, L, D)


def layer_window(config, i):
    """The sliding window of layer i, or None."""
    if config["model_type"] == "mistral":
        return config.get("sliding_window")
    if config["model_type"] == "qwen2":  # layer_types: sliding only with use_sliding_window, from max_window_layers
        if config.get("use_sliding_window") and i >= config.get("max_window_layers", 0):
            return config.get("sliding_window")
    return None


def llama_forward(sd, config, ids):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM over one sequence:
    ids [L] -> logits [L, vocab]."""
    L = ids.shape[0]
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    eps = config["rms_norm_eps"]
    h = sd["model.embed_tokens.weight"][ids]
    # LlamaRotaryEmbedding: freqs = positions x inv_freq, emb = cat(freqs, freqs), cos/sin in the
    # model's dtype
    freqs = torch.arange(L, dtype=F64).unsqueeze(1) * rope_inv_freq(config).unsqueeze(0)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
    for i in range(config["num_hidden_layers"]):
        n = f"model.layers.{i}."
        x = rms_norm(h, sd[n + "input_layernorm.weight"], eps)
        q = heads(linear(x, sd, n + "self_attn.q_proj"), H)
        k = heads(linear(x, sd, n + "self_attn.k_proj"), KV)
        v = heads(linear(x, sd, n + "self_attn.v_proj"), KV)
        q = q * cos + rotate_half(q) * sin  # apply_rotary_pos_emb
        k = k * cos + rotate_half(k) * sin
        a = attention(q, repeat_kv(k, H // KV), repeat_kv(v, H // KV), causal_allowed(L, layer_window(config, i)))
        h = h + linear(merge_heads(a), sd, n + "self_attn.o_proj")
        x = rms_norm(h, sd[n + "post_attention_layernorm.weight"], eps)
        # LlamaMLP: down(silu(gate(x)) * up(x))
        h = h + linear(silu(linear(x, sd, n + "mlp.gate_proj")) * linear(x, sd, n + "mlp.up_proj"), sd,
                       n + "mlp.down_proj")
    h = rms_norm(h, sd["model.norm.weight"], eps)
    head = sd["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else sd["lm_head.weight"]
    return h @ head.T


# ---------------------------------------------------------------------------------------------
# checkpoint writing

def write_json(path, obj):
    """As save_pretrained: indent 2, keys sorted, a final newline."""
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def nbytes(t):
    return t.numel() * t.element_size()


def write_checkpoint(folder, config, sd, shards):
    """config.json plus the state_dict sd (ordered as the model's state_dict, stored dtypes) in one
    file or in `shards` files with an index, split in state_dict order at equal shares of the bytes."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    write_json(os.path.join(folder, "config.json"), config)
    meta = {"format": "pt"}
    if shards == 1:
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata=meta)
        return
    total = sum(nbytes(t) for t in sd.values())
    parts = [dict() for _ in range(shards)]
    done = 0
    for name, t in sd.items():
        k = min(shards - 1, done * shards // total)  # the share that the tensor's first byte falls in
        parts[k][name] = t
        done += nbytes(t)
    assert all(parts), "a shard would be empty"
    weight_map = {}
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(folder, fname), metadata=meta)
        weight_map.update({name: fname for name in part})
    write_json(os.path.join(folder, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---------------------------------------------------------------------------------------------
# random weights

def w(*shape, std=WEIGHT_STD):
    return torch.randn(*shape, dtype=F64) * std


def norm_weight(n):
    return 1.0 + w(n, std=0.1)


def small_bias(n):
    return w(n, std=0.05)


def stored(sd, dtype):
    """The state_dict as the file holds it (floats in `dtype`), and the float64 values of exactly
    those stored numbers (what the forwards read)."""
    st = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return st, {k: v.to(F64) for k, v in st.items()}


# ---------------------------------------------------------------------------------------------
# decoders: prompts, logits, greedy continuations

def greedy(forward, sd, config, ids, steps):
    """Greedy continuation, each step a full forward over the sequence so far; also the smallest
    gap between the best and the second-best logit over the steps."""
    seq = ids.clone()
    out, gap = [], float("inf")
    for _ in range(steps):
        last = forward(sd, config, seq)[-1]
        top = torch.topk(last, 2).values
        gap = min(gap, float(top[0] - top[1]))
        nxt = int(torch.argmax(last))
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    return out, gap


def decoder_expected(forward, sd, config, lengths, low=0):
    """input_ids.{i}, logits.{i}, greedy.{i} for prompts of the given lengths; each prompt drawn
    again until every greedy step has a gap >= MIN_GAP and the continuation is not one token."""
    vocab = config["vocab_size"]
    t = {}
    for i, L in enumerate(lengths):
        tries = 0
        for _ in range(200):
            ids = torch.randint(low, vocab, (L,))
            gen, gap = greedy(forward, sd, config, ids, MAX_NEW_TOKENS)
            tries += 1
            if gap >= MIN_GAP and len(set(gen)) >= MIN_DISTINCT:
                break
        else:
            raise RuntimeError(f"no prompt of length {L} gives a clear greedy continuation")
        assert gap >= MIN_GAP and len(set(gen)) >= MIN_DISTINCT
        t[f"input_ids.{i}"] = ids.to(F64)
        t[f"logits.{i}"] = forward(sd, config, ids)
        t[f"greedy.{i}"] = torch.tensor(gen, dtype=F64)
        print(f"    prompt {i}: L={L} greedy={gen} min gap={gap:.4f} ({tries} draws)")
    return t


def decoder_meta(description, source):
    return {"description": description, "source": source, "max_new_tokens": str(MAX_NEW_TOKENS),
            "prompts": "3", "min_greedy_gap": repr(MIN_GAP)}


def llama_state_dict(config, qkv_bias=False, old_inv_freq=False):
    """LlamaForCausalLM's state_dict order (Mistral, Qwen2 the same), float64 random values."""
    E, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    D = head_dim(config)
    # Untied: embeddings of scale 1. Tied: the LM head's scale, so that the residual stream of a
    # token does not simply vote for the token itself.
    sd = {"model.embed_tokens.weight": w(V, E, std=WEIGHT_STD if config.get("tie_word_embeddings") else 1.0)}
    for i in range(config["num_hidden_layers"]):
        n = f"model.layers.{i}."
        for proj, rows in (("q", H * D), ("k", KV * D), ("v", KV * D)):
            sd[n + f"self_attn.{proj}_proj.weight"] = w(rows, E)
            if qkv_bias:
                sd[n + f"self_attn.{proj}_proj.bias"] = w(rows, std=0.1)
        sd[n + "self_attn.o_proj.weight"] = w(E, H * D)
        if old_inv_freq:
            # transformers <= 4.30: LlamaRotaryEmbedding registered inv_freq as a persistent
            # float32 buffer (unscaled; the forwards recompute it from config.json).
            sd[n + "self_attn.rotary_emb.inv_freq"] = 1.0 / (
                10000 ** (torch.arange(0, D, 2).float() / D))
        sd[n + "mlp.gate_proj.weight"] = w(I, E)
        sd[n + "mlp.up_proj.weight"] = w(I, E)
        sd[n + "mlp.down_proj.weight"] = w(E, I)
        sd[n + "input_layernorm.weight"] = norm_weight(E)
        sd[n + "post_attention_layernorm.weight"] = norm_weight(E)
    sd["model.norm.weight"] = norm_weight(E)
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = w(V, E)
    return sd


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


SRC_LLAMA = f"transformers {HF_VERSION} src/transformers/models/llama/modeling_llama.py, modeling_rope_utils.py"


@case
def llama3():
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 512,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 64, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": HF_VERSION,
        "use_cache": True,
        "vocab_size": 128,
    }
    # The llama3 rule must act in all three ways at this head_dim: kept, smoothed, divided.
    default = rope_inv_freq({**config, "rope_scaling": None})
    scaled = rope_inv_freq(config)
    ratio = default / scaled
    kept, divided = int((ratio == 1).sum()), int((ratio == 8).sum())
    assert kept >= 1 and divided >= 1 and kept + divided < ratio.numel(), ratio
    print(f"    llama3 inv_freq ratios default/scaled: {[round(float(r), 4) for r in ratio]}")
    sd, sd64 = stored(llama_state_dict(config), torch.bfloat16)
    t = decoder_expected(llama_forward, sd64, config, [3, 7, 12])
    return config, sd, 2, t, decoder_meta(
        "LlamaForCausalLM, GQA 4/2 heads, head_dim 16, rope llama3 scaling, BF16 weights in 2 shards; "
        "expected in float64 from the stored bf16 values", SRC_LLAMA)


@case
def llama_linear():
    config = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "type": "linear"},
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vocab_size": 96,
    }
    sd, sd64 = stored(llama_state_dict(config, old_inv_freq=True), torch.float32)
    t = decoder_expected(llama_forward, sd64, config, [3, 7, 12])
    return config, sd, 1, t, decoder_meta(
        "LlamaForCausalLM as a transformers 4.31 checkpoint: rope_scaling {type: linear, factor 2}, no "
        "rope_theta (10000), tied lm_head, rotary_emb.inv_freq buffers (ignored), F32", SRC_LLAMA)


@case
def mistral():
    config = {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "model_type": "mistral",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": HF_VERSION,
        "use_cache": True,
        "vocab_size": 100,
    }
    sd, sd64 = stored(llama_state_dict(config), torch.float32)
    t = decoder_expected(llama_forward, sd64, config, [6, 9, 13])
    return config, sd, 1, t, decoder_meta(
        "MistralForCausalLM, GQA 4/2 heads, sliding_window 5 (query i sees keys i-4..i), prompts longer "
        "than the window, F32",
        f"transformers {HF_VERSION} src/transformers/models/mistral/modeling_mistral.py, masking_utils.py")


@case
def qwen2():
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 100,
        "eos_token_id": 101,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "max_window_layers": 2,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 64,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": HF_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 110,
    }
    sd, sd64 = stored(llama_state_dict(config, qkv_bias=True), torch.float32)
    t = decoder_expected(llama_forward, sd64, config, [3, 7, 12])
    return config, sd, 1, t, decoder_meta(
        "Qwen2ForCausalLM, GQA 4/2 heads, q/k/v biases, tied lm_head, rope_theta 1e6, no sliding window, F32",
        f"transformers {HF_VERSION} src/transformers/models/qwen2/modeling_qwen2.py")


@case
def gpt2():
    config = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 99,
        "embd_pdrop": 0.1,
        "eos_token_id": 99,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_embd": 32,
        "n_head": 4,
        "n_inner": None,
        "n_layer": 2,
        "n_positions": 64,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "torch_dtype": "float32",
        "transformers_version": HF_VERSION,
        "use_cache": True,
        "vocab_size": 100,
    }
    E, V, P = config["n_embd"], config["vocab_size"], config["n_positions"]  # n_inner None: 4 * n_embd
    sd = {"transformer.wte.weight": w(V, E), "transformer.wpe.weight": w(P, E, std=0.5)}
    for i in range(config["n_layer"]):
        n = f"transformer.h.{i}."
        sd[n + "ln_1.weight"], sd[n + "ln_1.bias"] = norm_weight(E), small_bias(E)
        # GPT2Attention's own buffers come before its submodules in the state_dict
        sd[n + "attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        sd[n + "attn.masked_bias"] = torch.tensor(-1e4)
        sd[n + "attn.c_attn.weight"], sd[n + "attn.c_attn.bias"] = w(E, 3 * E), small_bias(3 * E)
        sd[n + "attn.c_proj.weight"], sd[n + "attn.c_proj.bias"] = w(E, E), small_bias(E)
        sd[n + "ln_2.weight"], sd[n + "ln_2.bias"] = norm_weight(E), small_bias(E)
        sd[n + "mlp.c_fc.weight"], sd[n + "mlp.c_fc.bias"] = w(E, 4 * E), small_bias(4 * E)
        sd[n + "mlp.c_proj.weight"], sd[n + "mlp.c_proj.bias"] = w(4 * E, E), small_bias(E)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = norm_weight(E), small_bias(E)
    sd, sd64 = stored(sd, torch.float32)
    t = decoder_expected(gpt2_forward, sd64, config, [3, 7, 12])
    return config, sd, 1, t, decoder_meta(
        "GPT2LMHeadModel, Conv1D weights [in, out], gelu_new, tied lm_head (no lm_head.weight in the "
        "file), old attn.bias / attn.masked_bias buffers, F32",
        f"transformers {HF_VERSION} src/transformers/models/gpt2/modeling_gpt2.py, pytorch_utils.py (Conv1D), "
        "activations.py (NewGELUActivation)")


# ---------------------------------------------------------------------------------------------
# encoders

def bert_state_dict(config, prefix):
    """BertModel's state_dict order under `prefix`, float64 random values."""
    E, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    p = prefix
    pad = config["pad_token_id"]
    word = w(V, E, std=0.5)
    word[pad] = 0  # nn.Embedding(padding_idx=pad_token_id) starts, and stays, at zero
    pos = w(config["max_position_embeddings"], E, std=0.5)
    if config["model_type"] == "roberta":
        pos[pad] = 0  # RobertaEmbeddings: position_embeddings has padding_idx too
    sd = {p + "embeddings.word_embeddings.weight": word,
          p + "embeddings.position_embeddings.weight": pos,
          p + "embeddings.token_type_embeddings.weight": w(config["type_vocab_size"], E, std=0.5),
          p + "embeddings.LayerNorm.weight": norm_weight(E),
          p + "embeddings.LayerNorm.bias": small_bias(E)}
    for i in range(config["num_hidden_layers"]):
        n = f"{p}encoder.layer.{i}."
        for m in ("query", "key", "value"):
            sd[n + f"attention.self.{m}.weight"], sd[n + f"attention.self.{m}.bias"] = w(E, E), small_bias(E)
        sd[n + "attention.output.dense.weight"], sd[n + "attention.output.dense.bias"] = w(E, E), small_bias(E)
        sd[n + "attention.output.LayerNorm.weight"] = norm_weight(E)
        sd[n + "attention.output.LayerNorm.bias"] = small_bias(E)
        sd[n + "intermediate.dense.weight"], sd[n + "intermediate.dense.bias"] = w(I, E), small_bias(I)
        sd[n + "output.dense.weight"], sd[n + "output.dense.bias"] = w(E, I), small_bias(E)
        sd[n + "output.LayerNorm.weight"], sd[n + "output.LayerNorm.bias"] = norm_weight(E), small_bias(E)
    sd[p + "pooler.dense.weight"], sd[p + "pooler.dense.bias"] = w(E, E), small_bias(E)
    return sd


def encoder_expected(sd64, config, input_ids, attention_mask, token_type_ids, prefix):
    last, pooled = bert_forward(sd64, config, input_ids, attention_mask, token_type_ids, prefix)
    m = attention_mask.to(F64).unsqueeze(-1)
    mean = (last * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers Pooling (mean)
    B, L, E = last.shape
    return {"input_ids": input_ids.to(F64), "attention_mask": attention_mask.to(F64),
            "token_type_ids": token_type_ids.to(F64), "last_hidden_state": last.reshape(B * L, E),
            "pooler_output": pooled, "sentence_embedding": mean}


def padded_batch(lengths, L, pad, draw):
    """[B, L] ids (draw(n) gives a sequence of n real tokens), right-padded with pad, and the mask."""
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = draw(n)
        mask[b, :n] = 1
    return ids, mask


def encoder_meta(description, source, B, L):
    return {"description": description, "source": source, "max_new_tokens": "0", "batch": str(B), "seq_len": str(L)}


@case
def bert():
    config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 32,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": HF_VERSION,
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": 112,
    }
    prefix = "bert."
    sd, sd64 = stored(bert_state_dict(config, prefix), torch.float32)
    CLS, SEP = 101, 102
    lengths, L = [9, 6, 4], 9

    def draw(n):  # [CLS] a ... [SEP] b ... [SEP]
        seq = torch.randint(1, 100, (n,))
        seq[0], seq[n // 2], seq[n - 1] = CLS, SEP, SEP
        return seq
    ids, mask = padded_batch(lengths, L, config["pad_token_id"], draw)
    tt = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        tt[b, n // 2 + 1:n] = 1  # sentence B: after the first [SEP], up to the last real token
    t = encoder_expected(sd64, config, ids, mask, tt, prefix)
    return config, sd, 1, t, encoder_meta(
        "BertModel under the prefix bert. (no cls.* head), erf GELU, layer_norm_eps 1e-12, F32; a batch of 3 "
        "right-padded sequences (lengths 9, 6, 4) with token types 1 in the second segment",
        f"transformers {HF_VERSION} src/transformers/models/bert/modeling_bert.py", len(lengths), L)


@case
def roberta():
    lengths, L = [8, 5, 3], 8
    config = {
        "architectures": ["RobertaModel"],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "classifier_dropout": None,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": L + 2,
        "model_type": "roberta",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "torch_dtype": "bfloat16",
        "transformers_version": HF_VERSION,
        "type_vocab_size": 1,
        "use_cache": True,
        "vocab_size": 120,
    }
    sd, sd64 = stored(bert_state_dict(config, ""), torch.bfloat16)

    def draw(n):  # <s> ... </s>, no <pad> inside
        seq = torch.randint(3, config["vocab_size"], (n,))
        seq[0], seq[n - 1] = config["bos_token_id"], config["eos_token_id"]
        return seq
    ids, mask = padded_batch(lengths, L, config["pad_token_id"], draw)
    t = encoder_expected(sd64, config, ids, mask, torch.zeros_like(ids), "")
    return config, sd, 2, t, encoder_meta(
        "RobertaModel (no prefix), positions from padding_idx + 1 (pads keep padding_idx), type_vocab_size 1, "
        "BF16 weights in 2 shards; a batch of 3 right-padded sequences (lengths 8, 5, 3); expected in float64 "
        "from the stored bf16 values",
        f"transformers {HF_VERSION} src/transformers/models/roberta/modeling_roberta.py, "
        "models/bert/modeling_bert.py", len(lengths), L)


# ---------------------------------------------------------------------------------------------

def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
        print(__doc__)
        return 0 if len(argv) == 2 else 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = argv[1] if len(argv) == 2 else os.path.join(root, "tests", "data", "hf")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)  # one reduction order, whatever the machine
    for name, fn in CASES.items():
        print(name)
        seed_for(name)
        with torch.no_grad():
            config, sd, shards, expected, meta = fn()
        write_checkpoint(os.path.join(out_dir, name), config, sd, shards)
        meta = {"case": name, "generator": "tools/gen_hf_fixtures.py", "torch_version": torch.__version__, **meta}
        save_file(expected, os.path.join(out_dir, name + "_expected.safetensors"), metadata=meta)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    print(f"wrote {len(CASES)} cases, {total} bytes, to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
