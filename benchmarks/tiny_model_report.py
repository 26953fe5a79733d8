"""Report on the embedded default model (the tiny GLM-5.2 trained by glm52_backends/devtools/train_tiny.py).

    python benchmarks/tiny_model_report.py [--checkpoint DIR] [--markdown benchmarks/results/tiny-model.md]

Everything is computed with THIS repository's inference (`GLM52(..., backend="cpu_ref")`, float32):
* held-out bits per byte on Python source that is not in the training set: PyYAML's own source
  (site-packages/yaml/*.py; the training text is the standard library only), each file tokenized,
  prefixed with `<|endoftext|>` (document start, as in training) and scored in windows of
  `--window` tokens (the training context; windows overlap by one token so every token of the file
  is predicted, each window starting from an empty cache), bits / UTF-8 bytes of the files, for
  (a) dense attention (index_topk raised above the window), (b) the indexer's top-k in every layer
  (a copy of the checkpoint with every layer "full", the shared layers' own indexers taken from
  `indexers-per-layer.safetensors`), (c) IndexShare as shipped (the config's schedule);
* MTP speculative decoding, k = 1..4: mean acceptance length (tokens per verify step, bonus
  included) and the decode speed-up over plain greedy decoding on the same prompts (prompts from
  the held-out text; every speculative output is checked token for token against plain greedy);
* the training run's time and speed (training.json in the checkpoint);
* a sample of generated text.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

from glm52_backends import GLM52, default_checkpoint

PER_LAYER_INDEXERS = "indexers-per-layer.safetensors"


# ---- held-out text ----------------------------------------------------------------------------------
def held_out_files() -> list[str]:
    """PyYAML's Python source (a dependency of this package, so present wherever it is installed)."""
    import yaml
    files = sorted(glob.glob(os.path.join(os.path.dirname(yaml.__file__), "*.py")))
    if not files:
        raise RuntimeError(f"no .py files beside {yaml.__file__}")
    return files


def held_out_texts(max_bytes: int | None = None) -> list[tuple[str, str]]:
    out, total = [], 0
    for f in held_out_files():
        with open(f, encoding="utf-8") as fh:
            text = fh.read()
        if max_bytes is not None:
            text = text[:max(0, max_bytes - total)]
        if text:
            out.append((os.path.basename(f), text))
            total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    return out


def windows(ids: list[int], window: int) -> list[list[int]]:
    """Windows of `window` tokens overlapping by one, so every token after the first is predicted once."""
    out, step = [], window - 1
    for s in range(0, max(1, len(ids) - 1), step):
        w = ids[s:s + window]
        if len(w) >= 2:
            out.append(w)
    return out


@torch.inference_mode()
def bits_per_byte(model: GLM52, texts: list[tuple[str, str]], window: int, batch: int = 8) -> tuple[float, int]:
    """(bits per UTF-8 byte, bytes scored) of `texts` under `model`, eos-prefixed, in windows."""
    tok = model.tokenizer
    eos = model.cfg.eos_token_id[0]
    wins, n_bytes = [], 0
    for _, text in texts:
        ids = [eos] + tok.encode(text)
        wins += windows(ids, window)
        n_bytes += len(text.encode("utf-8"))
    nats = 0.0
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        for w, logits in zip(chunk, model(chunk)):
            lp = torch.log_softmax(logits.double(), -1)[:-1]
            nats -= lp.gather(1, torch.tensor(w[1:])[:, None]).sum().item()
    return nats / math.log(2) / n_bytes, n_bytes


def every_layer_variant(ckpt: str, out: str) -> str:
    """A copy of `ckpt` with every layer "full": the shared layers' own indexers added from the side file."""
    from safetensors.torch import load_file, save_file
    side = os.path.join(ckpt, PER_LAYER_INDEXERS)
    if not os.path.isfile(side):
        raise FileNotFoundError(f"{side} is missing: the checkpoint has no per-layer indexers for variant (b)")
    os.makedirs(out, exist_ok=True)
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    tensors.update(load_file(side))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["indexer_types"] = ["full"] * cfg["num_hidden_layers"]
    cfg["index_topk_freq"], cfg["index_skip_topk_offset"] = 1, 0
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    shutil.copyfile(os.path.join(ckpt, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    return out


def load(path: str) -> GLM52:
    return GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)


def bpb_variants(ckpt: str, texts, window: int) -> dict[str, float]:
    model = load(ckpt)
    topk = model.cfg.index_topk
    res = {}
    model.cfg.index_topk = window                                    # (a) dense: top-k covers every key
    res["dense"] = bits_per_byte(model, texts, window)[0]
    model.cfg.index_topk = topk
    res["indexshare"] = bits_per_byte(model, texts, window)[0]       # (c) as shipped
    with tempfile.TemporaryDirectory() as tmp:                       # (b) every layer's own indexer
        res["every_layer"] = bits_per_byte(load(every_layer_variant(ckpt, tmp)), texts, window)[0]
    return res


# ---- speculative decoding ---------------------------------------------------------------------------
def prompts_from(texts, model: GLM52, n: int, length: int) -> list[list[int]]:
    out = []
    for _, text in texts:
        ids = model.tokenizer.encode(text)
        for s in range(0, len(ids) - length, max(length, len(ids) // 2)):
            out.append(ids[s:s + length])
            if len(out) == n:
                return out
    return out


def speculative_rows(model: GLM52, prompts, new_tokens: int, ks=(1, 2, 3, 4), repeats: int = 2,
                     adaptive_ks=(3, 4), thresholds=(0.3, 0.5, 0.7)):
    def timed(**kw):
        best, res = math.inf, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = model.generate(prompts, max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False, **kw)
            best = min(best, time.perf_counter() - t0)
        return res, best
    plain, t_plain = timed()
    n_tok = sum(len(t) for t in plain.tokens)
    rows = [{"k": 0, "acceptance": 1.0, "seconds": t_plain, "tokens_per_s": n_tok / t_plain, "speedup": 1.0}]
    for k in ks:
        res, t = timed(speculative=k)
        if res.tokens != plain.tokens:
            raise RuntimeError(f"speculative k={k} output differs from plain greedy decoding")
        rows.append({"k": k, "acceptance": res.stats["mean_acceptance_length"], "seconds": t,
                     "tokens_per_s": n_tok / t, "speedup": t_plain / t,
                     "drafted": res.stats["mean_drafted_tokens"], "rate": res.stats["draft_acceptance_rate"]})
    for k in adaptive_ks:
        for thr in thresholds:
            res, t = timed(speculative=k, adaptive=True, draft_threshold=thr)
            if res.tokens != plain.tokens:
                raise RuntimeError(f"adaptive k={k} p>{thr} output differs from plain greedy decoding")
            rows.append({"k": k, "threshold": thr, "acceptance": res.stats["mean_acceptance_length"], "seconds": t,
                         "tokens_per_s": n_tok / t, "speedup": t_plain / t,
                         "drafted": res.stats["mean_drafted_tokens"], "rate": res.stats["draft_acceptance_rate"]})
    return rows


# ---- quantized formats ---------------------------------------------------------------------------------
QUANT_RUNS = (("bf16 (as shipped)", None, "auto"), ("fp8_block", "fp8", "auto"), ("w8a8_dynamic", "w8a8", "auto"),
              ("w4a8_dynamic experts", "w4a8", "auto"), ("bf16 + fp8 caches", None, "fp8"),
              ("bf16 + int8 (C8) caches", None, "int8"), ("fp8_block + fp8 caches", "fp8", "fp8"))


def quant_rows(ckpt: str, texts, window: int) -> list[dict]:
    """Held-out bits/byte, logits error against the float model and bytes held, per quantized format
    (weights quantized at load from the BF16 checkpoint; caches in the named format); cpu_ref,
    float32 activations, so the difference is the formats' arithmetic alone."""
    from glm52_backends.weights import Weight
    ref = load(ckpt)
    probe = [w[:window] for w in windows([ref.cfg.eos_token_id[0]] + ref.tokenizer.encode(texts[0][1]), window)[:4]]
    lf = torch.cat(ref(probe)).double()
    rows = []
    for name, q, kv in QUANT_RUNS:
        m = GLM52(ckpt, backend="cpu_ref", dtype=torch.float32, progress=False, quantization=q, kv_cache_dtype=kv)
        lq = torch.cat(m(probe)).double()
        held = 0
        for L in [*m.net.layers, m.net.mtp]:
            for f in getattr(L, "__dataclass_fields__", {}):
                v = getattr(L, f)
                if isinstance(v, Weight):
                    held += v.nbytes if v.quantized else v.data.numel() * 2   # dense linears stored as bf16
        cache = m.new_cache(1024)
        rows.append({"name": name, "bpb": bits_per_byte(m, texts, window)[0],
                     "logits_rel_error": float((lq - lf).norm() / lf.norm()),
                     "argmax_agreement": float((lq.argmax(-1) == lf.argmax(-1)).double().mean()),
                     "layer_linear_bytes": held,
                     "cache_bytes_per_token": sum(t.numel() * t.element_size() for t in cache.tensors()) / 1024})
    return rows


# ---- report -----------------------------------------------------------------------------------------
def sample_text(model: GLM52, prompt: str, n: int, temperature: float = 0.0, seed: int = 0) -> str:
    out = model.generate([prompt], max_new_tokens=n, temperature=temperature, seed=seed,
                         **({"top_p": 0.95} if temperature > 0 else {}))
    return prompt + out.text[0]


def markdown(r: dict) -> str:
    t, c = r["training"], r["config"]
    a = t["args"]
    n_idx = c["indexer_types"].count("full")
    lines = [
        "# The embedded default model: a tiny trained GLM-5.2",
        "",
        f"Generated by `python benchmarks/tiny_model_report.py` on {r['machine']} ({r['date']}). "
        "Every number below is computed with this repository's inference (`GLM52(..., backend=\"cpu_ref\")`, "
        "float32 compute on the BF16 weights).",
        "",
        "## The model",
        "",
        f"`glm52_backends/default_model/` ({r['size_mb']:.1f} MB): BF16 safetensors (router bias F32) + config.json "
        "+ tokenizer.json in the real GLM-5.2 checkpoint format, trained by `python -m glm52_backends.devtools.train_tiny "
        f"--out DIR --steps {a['steps']} --seed {a['seed']} --threads {a['threads']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {t['parameters']:,} (main model + MTP layer; {r['active_params']:,} active per token) |",
        f"| layers | {c['num_hidden_layers']} (layer 0 dense MLP, then MoE) + 1 MTP layer |",
        f"| hidden / heads | {c['hidden_size']} / {c['num_attention_heads']} |",
        f"| MLA | q_lora {c['q_lora_rank']}, kv_lora {c['kv_lora_rank']}, nope {c['qk_nope_head_dim']}, "
        f"rope {c['qk_rope_head_dim']} (interleaved, theta {c['rope_parameters']['rope_theta']:g}), v {c['v_head_dim']} |",
        f"| DSA indexer | {c['index_n_heads']} heads x {c['index_head_dim']}, top-k {c['index_topk']}; IndexShare "
        f"`indexer_types` = {c['indexer_types']} ({n_idx} indexers + the MTP layer's) |",
        f"| MoE | {c['n_routed_experts']} routed experts top-{c['num_experts_per_tok']} (sigmoid, "
        f"`e_score_correction_bias`, aux-loss-free balancing) + {c['n_shared_experts']} shared, width "
        f"{c['moe_intermediate_size']}; dense MLP width {c['intermediate_size']} |",
        f"| vocabulary | {c['vocab_size']} (byte-level BPE trained on the same text; eos `<|endoftext|>` = id "
        f"{c['eos_token_id']}) |",
        f"| context | trained at {a['context']} tokens (`max_position_embeddings` {c['max_position_embeddings']}: "
        "longer contexts run but were never trained) |",
        "",
        "## Training",
        "",
        f"Text: {t['corpus']['files']} `.py` files of the Python {t['python']} standard library "
        f"({t['corpus']['bytes'] / 1e6:.1f} MB, {t['corpus']['tokens']:,} tokens, "
        f"{t['corpus']['bytes'] / t['corpus']['tokens']:.2f} bytes/token; test folders and site-packages excluded). "
        f"{a['steps']} steps of {a['batch']} x {a['context']} tokens ({t['tokens_seen']:,} tokens, "
        f"{t['tokens_seen'] / t['corpus']['tokens']:.2f} epochs), AdamW lr {a['lr']:g} cosine, seed {a['seed']}. "
        f"The first {t['dense_steps']} steps attend densely while the indexers learn (KL to the attention "
        f"distribution, DSA warm-up); the remaining {a['steps'] - t['dense_steps']} attend to the indexers' top-"
        f"{c['index_topk']} with IndexShare (the KL then restricted to the selected keys). MTP trained at depth "
        f"{a['mtp_depth']} (its own output fed back, as drafting does), weight {a['mtp_weight']} per depth.",
        "",
        f"**Training time: {t['train_seconds'] / 60:.1f} min** ({t['total_seconds'] / 60:.1f} min with tokenizer "
        f"and data), **{t['tokens_per_s']:.0f} tokens/s**, on this machine's 2 CPU cores (torch "
        f"{t['torch']}, {a['threads']} thread{'s' if a['threads'] != 1 else ''}), shared with other jobs "
        f"(the test suite ran on the other core for part of the run), so the time varies from run to run. Final training loss (EMA): LM {t['log'][-1]['ema_loss_lm']:.3f} nats/token.",
        "",
        "## Held-out bits per byte",
        "",
        f"Text not in the training set: PyYAML {r['yaml_version']}'s own source (site-packages/yaml/*.py, "
        f"{r['heldout_bytes']:,} bytes), scored in windows of {r['window']} tokens ({r['window'] / c['index_topk']:g}x "
        f"the top-k of {c['index_topk']}: late in a window the indexer keeps only a fraction of the keys).",
        "",
        "| attention | bits/byte |",
        "|---|---|",
        f"| (a) dense (top-k >= context) | {r['bpb']['dense']:.4f} |",
        f"| (b) the indexer's top-{c['index_topk']} in every layer | {r['bpb']['every_layer']:.4f} |",
        f"| (c) IndexShare as shipped | {r['bpb']['indexshare']:.4f} |",
        "",
        "(b): training builds an indexer in every layer. A \"full\" layer's indexer is trained towards the mean "
        "attention distribution of itself and the \"shared\" layers that reuse its top-k (IndexCache's "
        "training-aware objective); each shared layer's own indexer is trained towards its own layer's attention. "
        "The shipped checkpoint leaves the shared layers' indexers out (as GLM-5.2's does) and keeps them in "
        f"`{PER_LAYER_INDEXERS}`; variant (b) is a copy of the checkpoint with every layer \"full\" and those "
        "indexers added. The model was trained (its last phase) with IndexShare's top-k, which is why (c) is the "
        "variant it is used to.",
        "",
        "## MTP speculative decoding",
        "",
        f"{r['spec_prompts']} prompts of {r['spec_prompt_len']} held-out tokens, {r['spec_new']} new tokens each, "
        "greedy, batched, cpu_ref float32; best of 2 runs; every speculative output equals plain greedy decoding "
        "token for token. Acceptance length = tokens emitted per verify step (bonus included; 1.0 = no draft "
        "accepted).",
        "",
        "Adaptive rows (`generate(..., speculative=k, adaptive=True, draft_threshold=p)`): a request stops "
        "drafting in a round once its draft's probability under the MTP layer is <= p (the first draft is always "
        "proposed).",
        "",
        "| k | drafting | drafts per round | accepted / proposed | mean acceptance length | decode tokens/s "
        "| speed-up vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["spec"]:
        k = "plain" if row["k"] == 0 else str(row["k"])
        how = "-" if row["k"] == 0 else (f"adaptive p>{row['threshold']:g}" if "threshold" in row else "fixed")
        acc = "-" if row["k"] == 0 else f"{row['acceptance']:.2f}"
        dr = "-" if row["k"] == 0 else f"{row['drafted']:.2f}"
        rate = "-" if row["k"] == 0 else f"{row['rate']:.0%}"
        lines.append(f"| {k} | {how} | {dr} | {rate} | {acc} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x |")
    lines += [
        "",
        "The speed-up is set by the acceptance length against the cost of a round: k-1 MTP draft steps (each a "
        "full decoder layer, as expensive as a quarter of this 4-layer model), one verify step over k+1 tokens and "
        "the MTP catch-up step. On this tiny model on the CPU every step is dominated by fixed per-step overhead "
        "(Python, op dispatch, the paged cache), so a round costs several plain steps.",
        "",
        "## Sample",
        "",
    ]
    for title, text in r["samples"]:
        lines += [title, "", "```python", text, "```", ""]
    lines += [
        "## Quantized formats",
        "",
        "The shipped BF16 weights quantized at load (`GLM52(path, quantization=...)`: fp8_block 128x128 blocks "
        "with FP8 activations per token per 128; w8a8_dynamic int8 per channel with int8 activations per token; "
        "w4a8_dynamic for the routed experts, the other linears w8a8) and the caches in FlashMLA's fp8 or "
        "Ascend's C8 int8 rows (`kv_cache_dtype=`); cpu_ref executes each format exactly (glm52_backends/"
        "quant.py). Bits/byte on the held-out text above; logits error = ||L_q - L_bf16|| / ||L_bf16|| on 4 "
        "held-out windows; bytes = the decoder layers' linear weights as held (dense ones counted in bf16) and "
        "the paged cache per token (all layers).",
        "",
        "| weights / caches | held-out bits/byte | logits rel. error | argmax agreement | layer linears bytes "
        "| cache bytes/token |",
        "|---|---|---|---|---|---|",
    ]
    for q in r["quant"]:
        lines.append(f"| {q['name']} | {q['bpb']:.4f} | {q['logits_rel_error']:.2e} | {q['argmax_agreement']:.1%} | "
                     f"{q['layer_linear_bytes']:,} | {q['cache_bytes_per_token']:,.0f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the embedded default model")
    ap.add_argument("--markdown", default="benchmarks/results/tiny-model.md")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--window", type=int, default=256, help="scoring window in tokens")
    ap.add_argument("--max-bytes", type=int, default=None, help="score only this many held-out bytes")
    ap.add_argument("--spec-prompts", type=int, default=4)
    ap.add_argument("--spec-prompt-len", type=int, default=32)
    ap.add_argument("--spec-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = a.checkpoint or default_checkpoint()
    import yaml
    texts = held_out_texts(a.max_bytes)
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(ckpt, "training.json"), encoding="utf-8") as f:
        training = json.load(f)
    t0 = time.time()
    bpb = bpb_variants(ckpt, texts, a.window)
    print(f"bits/byte {bpb} ({time.time() - t0:.0f} s)", file=sys.stderr)
    quant = quant_rows(ckpt, texts, a.window)
    print(f"quantized {quant}", file=sys.stderr)
    model = load(ckpt)
    prompts = prompts_from(texts, model, a.spec_prompts, a.spec_prompt_len)
    spec = speculative_rows(model, prompts, a.spec_new)
    print(f"speculative {spec}", file=sys.stderr)
    from glm52_backends.cli import DEFAULT_PROMPTS
    samples = [(f"Greedy, prompt `{DEFAULT_PROMPTS[0]}` (`glm52 generate`'s first default prompt):",
                sample_text(model, DEFAULT_PROMPTS[0], 120)),
               ("Sampled (temperature 0.8, top-p 0.95, seed 0), prompt `class Parser:`:",
                sample_text(model, "class Parser:\n", 160, temperature=0.8))]
    c = model.cfg
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    active = training["parameters"] - (c.num_hidden_layers + 1 - c.first_k_dense_replace) * per_expert * (
        c.n_routed_experts - c.num_experts_per_tok)
    r = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
         "date": time.strftime("%Y-%m-%d"), "config": config, "training": training, "bpb": bpb,
         "window": a.window, "heldout_bytes": sum(len(t.encode("utf-8")) for _, t in texts),
         "yaml_version": yaml.__version__, "spec": spec, "spec_prompts": len(prompts),
         "spec_prompt_len": a.spec_prompt_len, "spec_new": a.spec_new, "samples": samples,
         "active_params": active, "quant": quant,
         "size_mb": sum(os.path.getsize(os.path.join(ckpt, n)) for n in os.listdir(ckpt)) / 1e6}
    os.makedirs(os.path.dirname(os.path.abspath(a.markdown)), exist_ok=True)
    with open(a.markdown, "w", encoding="utf-8") as f:
        f.write(markdown(r))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in r.items() if k not in ("config", "training")}, f, indent=2)
    print(f"wrote {a.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
