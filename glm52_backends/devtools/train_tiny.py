"""Train a tiny GLM-5.2 on the Python standard library's source and write it as a checkpoint.

    python -m glm52_backends.devtools.train_tiny --out DIR [--steps N] [--seed S] [--hidden 128] ...

The model has the real GLM-5.2 architecture at tiny size (spec §3-§8): MLA with q/kv LoRA latents
and a decoupled interleaved RoPE part, the DSA lightning indexer with IndexShare ("full"/"shared"
layers), a dense first layer then sigmoid-routed experts + 1 shared expert with the aux-loss-free
`e_score_correction_bias`, and the MTP (nextn) layer.

How it is trained
* Main model: HF transformers' `GlmMoeDsaForCausalLM` (eager attention), built with an indexer in
  EVERY layer so that every layer's indexer can be trained; the shipped config marks the IndexShare
  layers "shared" and leaves their indexers out (they go to `indexers-per-layer.safetensors`, used by
  benchmarks/tiny_model_report.py for the "top-k in every layer" variant).
* Indexer (the DSA paper's recipe): each indexer's score distribution softmax(I[t, :]) is trained
  by a KL loss towards the attention distribution (mean over heads, detached) of the layers it
  serves, its inputs detached so this loss touches only the indexer. A "full" layer serves itself
  and the "shared" layers after it (IndexCache's training-aware centroid); a shared layer's own
  indexer serves only itself. Phase 1 (`--dense-frac` of the steps) trains the model with dense
  attention; phase 2 attends to the indexers' top-k (IndexShare as shipped: shared layers reuse the
  previous full layer's top-k) and the KL is restricted to the selected keys.
* HF runs the indexer under `no_grad` and only returns its top-k; this script replaces each
  indexer's forward with the same math (interleaved RoPE via HF's own function, ReLU per head before
  the head weights, LayerNorm eps 1e-6) that also keeps the scores for the KL loss, and returns
  either every key (phase 1) or the top-k (phase 2).
* MTP: our own module, exactly what glm52_backends/model.py runs (vLLM's convention, spec §8):
  at position i, u = eh_proj([enorm(embed(token_{i+1})); hnorm(h_i)]) with h_i the main model's
  final-normed hidden and the embedding zeroed at position 0; one decoder layer (HF's
  `GlmMoeDsaDecoderLayer`, own full indexer, MoE); logits = lm_head(shared_head.norm(z)) predict
  token i+2. A second application (`--mtp-depth 2`) feeds its own output z as the hidden, as
  speculative drafting does for drafts 2..k, predicting token i+3.
* MoE balance: after each step every router's correction bias moves by `--bias-rate` towards
  balanced load (sign of mean load minus expert load; DeepSeek-V3's aux-loss-free balancing).
* Tokenizer: byte-level BPE trained with `tokenizers` on the same text, `<|endoftext|>` = eos,
  written as tokenizer.json. Documents (files) are joined with eos.

The shipped model (glm52_backends/default_model) is these defaults with `--threads 1` (the run's
two cores were shared with other jobs; see benchmarks/results/tiny-model.md).

The output folder is a BF16 checkpoint in the real format (router bias F32), config.json,
tokenizer.json and training.json (arguments, losses, time, tokens/s); `GLM52(DIR)` loads it.
The training text is every .py file under sysconfig's stdlib path except test folders,
site-packages and `HELD_OUT_STDLIB`; evaluation uses text outside it (PyYAML's source).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import sysconfig
import time

HELD_OUT_STDLIB: tuple[str, ...] = ()  # stdlib files (relative paths) kept out of training
EOS = "<|endoftext|>"
PER_LAYER_INDEXERS = "indexers-per-layer.safetensors"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "tests", "test"}


# ---- data ---------------------------------------------------------------------------------------
def stdlib_files(max_bytes: int | None = None) -> list[str]:
    """The training files, sorted: stdlib .py files outside test folders and site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            if f.endswith(".py") and os.path.relpath(p, root) not in HELD_OUT_STDLIB:
                out.append(p)
    out.sort()
    if not out:
        raise RuntimeError(f"no .py files under the stdlib path {root}")
    if max_bytes is not None:
        keep, total = [], 0
        for p in out:
            if total >= max_bytes:
                break
            keep.append(p)
            total += os.path.getsize(p)
        out = keep
    return out


def read_texts(files: list[str]) -> list[str]:
    texts = []
    for p in files:
        try:
            with open(p, encoding="utf-8") as f:
                texts.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are not UTF-8: skipped
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (`tokenizers`), `<|endoftext|>` special (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_corpus(tok, texts: list[str]):
    import torch
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# ---- model ----------------------------------------------------------------------------------------
def indexshare_types(layers: int, freq: int, offset: int) -> list[str]:
    from ..config import indexshare_schedule
    return indexshare_schedule(layers, None, freq, offset)


def model_dims(a) -> dict:
    """The checkpoint's shape fields (config.json names)."""
    return dict(hidden_size=a.hidden, intermediate_size=a.intermediate, moe_intermediate_size=a.moe_intermediate,
                num_attention_heads=a.heads, q_lora_rank=a.q_lora, kv_lora_rank=a.kv_lora,
                qk_nope_head_dim=a.nope_dim, qk_rope_head_dim=a.rope_dim, v_head_dim=a.v_dim,
                index_n_heads=a.index_heads, index_head_dim=a.index_dim, n_routed_experts=a.experts,
                num_experts_per_tok=a.experts_per_tok, n_shared_experts=1, n_group=1, topk_group=1,
                first_k_dense_replace=1, rope_theta=a.rope_theta)


def hf_config(a, vocab_size: int, eos: int):
    from transformers import GlmMoeDsaConfig
    d = model_dims(a)
    theta = d.pop("rope_theta")
    cfg = GlmMoeDsaConfig(vocab_size=vocab_size, num_hidden_layers=a.layers, num_key_value_heads=a.heads,
                          index_topk=a.index_topk, indexer_types=["full"] * a.layers,
                          rope_parameters={"rope_theta": theta, "rope_type": "default"},
                          max_position_embeddings=a.max_positions, tie_word_embeddings=False,
                          eos_token_id=eos, pad_token_id=None, bos_token_id=None, initializer_range=0.02,
                          attn_implementation="eager", **d)
    cfg._attn_implementation = "eager"  # attention probabilities are the indexer's KL target
    return cfg


class _State:
    """What one forward pass records (per layer index) for the indexer loss and the MoE balance."""

    def __init__(self, types: list[str], topk: int):
        self.types, self.topk = types, topk
        self.reset(sparse=False)

    def reset(self, sparse: bool) -> None:
        self.sparse, self.record = sparse, True
        self.scores: dict[int, object] = {}   # layer -> indexer scores [B, S, T] (causal -inf), with grad
        self.probs: dict[int, object] = {}    # layer -> attention distribution [B, S, T] (mean over heads)
        self.used: dict[int, object] = {}     # layer -> top-k indices the attention used (sparse phase)
        self.loads: list = []                 # (router, expert counts)
        self.last_topk = None


def _patch_indexer(ix, layer: int, state: _State):
    """Replace HF's no-grad indexer forward by the same math that keeps the scores (see module doc)."""
    import torch
    import torch.nn.functional as F
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

    def forward(hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                past_key_values=None):
        x, qr = hidden_states.detach(), q_resid.detach()             # the indexer loss trains only the indexer
        B, S, _ = x.shape
        cos, sin = position_embeddings
        q = ix.wq_b(qr).view(B, S, ix.n_heads, ix.head_dim)
        q_rot, q_pass = q.split([ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], -1)
        k = ix.k_norm(ix.wk(x)).unsqueeze(2)
        k_rot, k_pass = k.split([ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], -1)
        q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q, k = torch.cat([q_rot, q_pass], -1), torch.cat([k_rot, k_pass], -1).squeeze(2)
        s = F.relu(torch.einsum("bshd,btd->bsht", q, k) * ix.softmax_scale)
        w = ix.weights_proj(x) * ix.n_heads ** -0.5
        scores = torch.einsum("bsh,bsht->bst", w, s)
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        scores = scores.masked_fill(~allowed, float("-inf"))
        T = scores.shape[-1]
        if state.record:
            state.scores[layer] = scores
        if not state.sparse:
            top = torch.arange(T).expand(B, S, T)                      # every key: dense attention
        elif layer < len(state.types) and state.types[layer] == "shared":
            top = state.last_topk                                      # IndexShare: the previous full layer's
        else:
            top = scores.detach().topk(min(state.topk, T), -1).indices
            if layer < len(state.types):
                state.last_topk = top
        if state.record and state.sparse:
            state.used[layer] = top
        return top.to(torch.int32)

    ix.forward = forward


def instrument(hf, mtp, state: _State) -> None:
    """Patch every indexer; record attention probabilities and router loads."""
    layers = list(hf.model.layers) + [mtp.layer]
    for l, layer in enumerate(layers):
        attn = layer.self_attn
        _patch_indexer(attn.indexer, l, state)

        def keep_probs(mod, inp, out, l=l):
            if state.record:
                state.probs[l] = out[1].detach().float().mean(1)       # [B, S, T]
        attn.register_forward_hook(keep_probs)
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            def keep_load(mod, inp, out):
                state.loads.append((mod, out[2].detach().flatten()))
            gate.register_forward_hook(keep_load)


def build_mtp(hf_cfg):
    """The MTP (nextn) layer: enorm, hnorm, eh_proj, one decoder layer, shared_head.norm."""
    import torch
    from torch import nn
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer, GlmMoeDsaRMSNorm

    L, H = hf_cfg.num_hidden_layers, hf_cfg.hidden_size
    c = copy.deepcopy(hf_cfg)
    c.indexer_types = list(hf_cfg.indexer_types) + ["full"]          # the MTP layer always has its indexer
    c.mlp_layer_types = list(hf_cfg.mlp_layer_types) + ["sparse"]

    class MTP(nn.Module):
        def __init__(self):
            super().__init__()
            eps = hf_cfg.rms_norm_eps
            self.enorm, self.hnorm = GlmMoeDsaRMSNorm(H, eps), GlmMoeDsaRMSNorm(H, eps)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
            self.layer = GlmMoeDsaDecoderLayer(c, L)
            self.head_norm = GlmMoeDsaRMSNorm(H, eps)

        def forward(self, hidden, next_ids, positions, embed, rotary, mask):
            """hidden [B, S', H] at `positions` [S'], next_ids [B, S'] = token i+1 -> (z, normed output)."""
            e = embed(next_ids)
            e = torch.where((positions == 0)[None, :, None], torch.zeros_like(e), e)   # vLLM zeroes position 0
            u = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(hidden)], -1))
            pe = rotary(u, position_ids=positions[None])
            z, _ = self.layer(u, attention_mask=mask, position_ids=positions[None], position_embeddings=pe)
            return z, self.head_norm(z)

    return MTP()


def _init_mtp(mtp, std: float, gen) -> None:
    import torch
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "bias" not in name else p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)


def causal_mask(S: int, dtype):
    import torch
    m = torch.full((S, S), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


# ---- losses ---------------------------------------------------------------------------------------
def indexer_loss(state: _State, groups: dict[int, list[int]]):
    """Sum over indexers of the mean (over queries) KL(target attention || softmax(index scores)),
    restricted to the keys the attention could see (causal; the selected top-k in the sparse phase).
    Also returns the top-k recall (target mass inside the indexer's own top-k) per indexer."""
    import torch
    total, recall = 0.0, {}
    for f, served in groups.items():
        if f not in state.scores:
            continue
        scores = state.scores[f]
        p = torch.stack([state.probs[l] for l in served]).mean(0)
        support = torch.isfinite(scores)
        if state.sparse:
            sel = torch.zeros_like(support).scatter_(-1, state.used[served[0]].long(), True)
            support = support & sel
        logq = torch.log_softmax(scores.masked_fill(~support, float("-inf")), -1)
        kl = torch.where(support, torch.special.xlogy(p, p) - p * logq.masked_fill(~support, 0.0), 0.0)
        total = total + kl.sum(-1).mean()

        with torch.no_grad():
            top = scores.topk(min(state.topk, scores.shape[-1]), -1).indices
            recall[f] = float(p.gather(-1, top).sum(-1).mean())
    return total, recall


def kl_groups(types: list[str], mtp_layer: int) -> dict[int, list[int]]:
    """indexer layer -> the layers whose attention it is trained to predict."""
    groups, last = {}, None
    for l, t in enumerate(types):
        if t == "full":
            groups[l], last = [l], l
        else:
            groups[last].append(l)
            groups[l] = [l]            # its own (unshipped) indexer: for the every-layer top-k variant
    groups[mtp_layer] = [mtp_layer]
    return groups


# ---- export ---------------------------------------------------------------------------------------
def checkpoint_tensors(hf, mtp, n_layers: int) -> dict:
    """Every tensor under its checkpoint name (per-expert weights), float32, indexers in all layers."""
    sd = {}

    def put_layer(prefix: str, layer_sd: dict):
        for k, v in layer_sd.items():
            if k.endswith("mlp.experts.gate_up_proj"):
                I = v.shape[1] // 2
                for e in range(v.shape[0]):
                    sd[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = v[e, :I]
                    sd[f"{prefix}mlp.experts.{e}.up_proj.weight"] = v[e, I:]
            elif k.endswith("mlp.experts.down_proj"):
                for e in range(v.shape[0]):
                    sd[f"{prefix}mlp.experts.{e}.down_proj.weight"] = v[e]
            else:
                sd[prefix + k] = v

    full = hf.state_dict()
    sd["model.embed_tokens.weight"] = full["model.embed_tokens.weight"]
    sd["model.norm.weight"] = full["model.norm.weight"]
    sd["lm_head.weight"] = full["lm_head.weight"]
    for l in range(n_layers):
        pre = f"model.layers.{l}."
        put_layer(pre, {k[len(pre):]: v for k, v in full.items() if k.startswith(pre)})
    m = mtp.state_dict()
    pre = f"model.layers.{n_layers}."
    put_layer(pre, {k[len("layer."):]: v for k, v in m.items() if k.startswith("layer.")})
    sd[pre + "enorm.weight"] = m["enorm.weight"]
    sd[pre + "hnorm.weight"] = m["hnorm.weight"]
    sd[pre + "eh_proj.weight"] = m["eh_proj.weight"]
    sd[pre + "shared_head.norm.weight"] = m["head_norm.weight"]
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def write_checkpoint(out: str, tensors: dict, tok, a, vocab_size: int, eos: int, info: dict) -> str:
    """The shipped checkpoint: IndexShare config, shared layers' indexers in a side file."""
    import torch
    from safetensors.torch import save_file
    from .. import tiny
    from ..weights import expected_tensors, float32_tensor
    from . import make_tiny

    types = indexshare_types(a.layers, a.index_freq, a.index_offset)
    cfg, cfg_dict = tiny.tiny_config(mtp=True, layers=a.layers, vocab_size=vocab_size, index_topk=a.index_topk,
                                     index_topk_freq=a.index_freq, index_skip_topk_offset=a.index_offset,
                                     indexer_types=types, eos_token_id=[eos],
                                     max_position_embeddings=a.max_positions, **model_dims(a))
    want = expected_tensors(cfg, include_mtp=True)
    side = {k: v for k, v in tensors.items() if k not in want and ".self_attn.indexer." in k}
    main = {k: v for k, v in tensors.items() if k in want}
    stray = set(tensors) - set(main) - set(side)
    missing = set(want) - set(main)
    bad = [k for k in main if tuple(main[k].shape) != tuple(want[k])]
    if stray or missing or bad:
        raise RuntimeError(f"export does not match the checkpoint layout: unexpected {sorted(stray)[:5]}, "
                           f"missing {sorted(missing)[:5]}, wrong shapes {bad[:5]}")
    cast = lambda d: {k: v.float() if float32_tensor(k) else v.to(torch.bfloat16) for k, v in d.items()}
    why = out_problem(out)
    if why:
        raise OSError(why)
    with make_tiny._staged(out) as tmp:
        make_tiny.write_safetensors(tmp, cast(main))
        save_file(cast(side), os.path.join(tmp, PER_LAYER_INDEXERS), metadata={"format": "pt"})
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "training.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        for n in (PER_LAYER_INDEXERS, "tokenizer.json", "training.json"):
            os.chmod(os.path.join(tmp, n), 0o666 & ~make_tiny._umask())
        make_tiny._write_config(tmp, cfg_dict)
    return out


def out_problem(out: str) -> str | None:
    """Why `--out` cannot take the checkpoint (checked before training; `write_checkpoint` checks again):
    a file there, a folder holding a file the checkpoint writes, or no writable folder; None when fine."""
    from . import make_tiny
    try:
        make_tiny._refuse_existing(out)
        make_tiny._check_writable(out)
    except (FileExistsError, PermissionError) as e:
        return str(e)
    if os.path.isdir(out):
        clash = sorted(n for n in os.listdir(out) if n in (PER_LAYER_INDEXERS, "training.json"))
        if clash:
            return (f"{out} already holds {', '.join(clash)}; nothing was written (files are never replaced: choose a "
                    f"new or empty folder, or remove them first)")
    return None


# ---- training -------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m glm52_backends.devtools.train_tiny",
        description="Train a tiny GLM-5.2 (MLA + DSA indexer with IndexShare + MoE + MTP) on the Python "
                    "standard library's source, on the CPU, and write it as a BF16 checkpoint in the real "
                    "format (config.json + model.safetensors + tokenizer.json) that GLM52(DIR) loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint folder to create (must not hold a checkpoint)")
    ap.add_argument("--steps", type=int, default=450, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=0, help="seeds the tokenizer-independent RNG: init and batches")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (results are bit-identical only for the same count)")
    g = ap.add_argument_group("data")
    g.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (eos included)")
    g.add_argument("--context", type=int, default=256, help="training sequence length")
    g.add_argument("--batch", type=int, default=8, help="sequences per step")
    g.add_argument("--max-corpus-mb", type=float, default=None, help="use only the first N MB of files (tests)")
    g = ap.add_argument_group("model")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--intermediate", type=int, default=384, help="dense MLP width (layer 0)")
    g.add_argument("--moe-intermediate", type=int, default=96, help="routed and shared expert width")
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--experts-per-tok", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--q-lora", type=int, default=96)
    g.add_argument("--kv-lora", type=int, default=64)
    g.add_argument("--nope-dim", type=int, default=32)
    g.add_argument("--rope-dim", type=int, default=16)
    g.add_argument("--v-dim", type=int, default=32)
    g.add_argument("--index-heads", type=int, default=8, help="more heads: fewer exact-0 ReLU ties")
    g.add_argument("--index-dim", type=int, default=32)
    g.add_argument("--index-topk", type=int, default=64)
    g.add_argument("--index-freq", type=int, default=2, help="IndexShare: index_topk_freq")
    g.add_argument("--index-offset", type=int, default=1, help="IndexShare: index_skip_topk_offset")
    g.add_argument("--rope-theta", type=float, default=10000.0)
    g.add_argument("--max-positions", type=int, default=4096, help="config max_position_embeddings")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=60)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--dense-frac", type=float, default=0.5,
                   help="fraction of steps with dense attention (indexer warm-up); then top-k attention")
    g.add_argument("--mtp-depth", type=int, default=2, choices=(1, 2), help="MTP applications trained")
    g.add_argument("--mtp-weight", type=float, default=0.3, help="weight of each MTP loss")
    g.add_argument("--bias-rate", type=float, default=2e-3, help="router correction-bias update speed")
    g.add_argument("--log-every", type=int, default=50)
    a = ap.parse_args(argv)
    for k in ("steps", "threads", "vocab", "context", "batch", "layers", "hidden", "index_topk"):
        if getattr(a, k) <= 0:
            ap.error(f"--{k.replace('_', '-')} must be positive")
    if a.vocab < 300:
        ap.error("--vocab must be at least 300 (256 byte tokens, eos and some merges)")
    if a.rope_dim > a.index_dim:
        ap.error("--rope-dim must not exceed --index-dim (the indexer ropes its first rope-dim dims)")
    if not 0.0 <= a.dense_frac <= 1.0:
        ap.error("--dense-frac must be in [0, 1]")
    return a


def train(a) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import GlmMoeDsaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()

    files = stdlib_files(None if a.max_corpus_mb is None else int(a.max_corpus_mb * 1e6))
    texts = read_texts(files)
    tok = train_tokenizer(texts, a.vocab)
    vocab_size, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    data = encode_corpus(tok, texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts)} files, {n_bytes / 1e6:.1f} MB, {len(data):,} tokens "
          f"({n_bytes / len(data):.2f} bytes/token), vocab {vocab_size}; tokenizer {time.time() - t0:.0f} s",
          file=sys.stderr)
    S = a.context
    if len(data) < S + 2:
        raise RuntimeError(f"the corpus has {len(data)} tokens, fewer than one training window ({S + 2})")

    hcfg = hf_config(a, vocab_size, eos)
    hf = GlmMoeDsaForCausalLM(hcfg)
    hf.train()
    gen = torch.Generator().manual_seed(a.seed)
    mtp = build_mtp(hcfg)
    _init_mtp(mtp, hcfg.initializer_range, gen)
    types = indexshare_types(a.layers, a.index_freq, a.index_offset)
    state = _State(types, a.index_topk)
    instrument(hf, mtp, state)
    groups = kl_groups(types, a.layers)
    mask = causal_mask(S, torch.float32)

    params = [p for p in list(hf.parameters()) + list(mtp.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        p = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    n_dense = int(round(a.dense_frac * a.steps))
    positions = torch.arange(S)
    log, ema, t_train = [], None, time.time()
    bar = tqdm(range(a.steps), desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        sparse = step >= n_dense
        starts = torch.randint(0, len(data) - S - 1, (a.batch,), generator=gen)
        win = torch.stack([data[s:s + S + 1] for s in starts.tolist()]).long()
        x, y = win[:, :S], win[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        state.reset(sparse=sparse)
        h = hf.model(input_ids=x, attention_mask=None).last_hidden_state     # final-normed hidden [B, S, H]
        loss_main = F.cross_entropy(hf.lm_head(h).flatten(0, 1), y.flatten())
        # MTP at positions 0..S-2: hidden h_i, token i+1, target token i+2
        z1, o1 = mtp(h[:, :-1], x[:, 1:], positions[:-1], hf.model.embed_tokens, hf.model.rotary_emb,
                     mask[..., :S - 1, :S - 1])
        loss_mtp = [F.cross_entropy(hf.lm_head(o1).flatten(0, 1), y[:, 1:].flatten())]
        loss_idx, recall = indexer_loss(state, groups)
        if a.mtp_depth >= 2:
            # the draft's second step: hidden = its own output at i, token i+2, at position i+1, target i+3
            state.record = False
            _, o2 = mtp(z1[:, :-1], x[:, 2:], positions[1:-1], hf.model.embed_tokens, hf.model.rotary_emb,
                        mask[..., :S - 2, :S - 2])
            loss_mtp.append(F.cross_entropy(hf.lm_head(o2).flatten(0, 1), y[:, 2:].flatten()))
        loss = loss_main + a.mtp_weight * sum(loss_mtp) + loss_idx
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():                          # aux-loss-free balance: move each router's bias
            for router, ids in state.loads:
                load = torch.bincount(ids, minlength=a.experts).float()
                router.e_score_correction_bias += a.bias_rate * torch.sign(load.mean() - load)
        cur = [loss_main.item()] + [v.item() for v in loss_mtp] + [float(loss_idx)]
        ema = cur if ema is None else [0.95 * e + 0.05 * c for e, c in zip(ema, cur)]
        bar.set_postfix(lm=f"{ema[0]:.3f}", mtp=f"{ema[1]:.3f}", idx=f"{ema[-1]:.3f}",
                        phase="topk" if sparse else "dense")
        if step % a.log_every == 0 or step == a.steps - 1:
            elapsed = time.time() - t_train
            rec = {"step": step, "phase": "topk" if sparse else "dense", "lr": lr_at(step),
                   "loss_lm": cur[0], "loss_mtp": cur[1:-1], "loss_indexer_kl": cur[-1],
                   "ema_loss_lm": ema[0], "indexer_topk_recall": recall,
                   "elapsed_s": round(elapsed, 1), "tokens_per_s": round((step + 1) * a.batch * S / elapsed, 1)}
            log.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    bar.close()
    t_end = time.time()
    n_params = sum(p.numel() for p in params)
    info = {
        "args": {k: v for k, v in vars(a).items() if k != "out"},
        "python": sys.version.split()[0], "torch": torch.__version__,
        "corpus": {"files": len(texts), "bytes": n_bytes, "tokens": int(len(data)),
                   "source": "stdlib .py files under sysconfig.get_paths()['stdlib'] (no test folders, "
                             "no site-packages)", "held_out_stdlib": list(HELD_OUT_STDLIB)},
        "parameters": n_params, "train_seconds": round(t_end - t_train, 1),
        "total_seconds": round(t_end - t0, 1),
        "tokens_seen": a.steps * a.batch * S, "tokens_per_s": round(a.steps * a.batch * S / (t_end - t_train), 1),
        "dense_steps": n_dense, "log": log,
    }
    hf.eval()
    tensors = checkpoint_tensors(hf, mtp, a.layers)
    write_checkpoint(a.out, tensors, tok, a, vocab_size, eos, info)
    print(f"wrote {a.out}: {n_params:,} parameters, {info['train_seconds']:.0f} s training, "
          f"{info['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    return info


def main(argv=None) -> int:
    a = parse_args(argv)
    why = out_problem(a.out)
    if why:                     # before the corpus is read and the model trained, not after
        print(f"train_tiny: error: {why}", file=sys.stderr)
        return 2
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"train_tiny: error: needs {e.name}: pip install 'glm52_backends[dev]'", file=sys.stderr)
        return 2
    train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
