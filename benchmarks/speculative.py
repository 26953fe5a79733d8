"""MTP speculative decoding: speed-up as a function of the draft acceptance rate.

A random checkpoint's MTP drafts are almost never accepted, so this benchmark also drives the
pipeline with a SYNTHETIC DRAFT SOURCE whose acceptance rate r is set: the MTP layer still runs
every draft step (its compute is paid in full), but each drafted token is replaced by the
plain-greedy token with probability r (a seeded coin per request and position) and by a wrong
token otherwise. Verification is real: the target runs over the k+1 tokens and the backend's
`mtp_verify` decides, so per-step acceptance follows r exactly only because the replaced tokens
are right or wrong by construction; the expected tokens per verify step are
(1 - r^(k+1)) / (1 - r). Every speculative run is checked token for token against plain greedy
decoding before its time is reported.

Rows "mtp" use the MTP layer's own drafts (what a random checkpoint achieves).

`--adaptive` compares fixed-k drafting with adaptive drafting (`generate(..., adaptive=True,
draft_threshold=t)`: a round stops drafting once the MTP layer's probability of the last draft is t
or less) for each k and each `--thresholds` t, with the MTP layer's own drafts only (a synthetic
source would make the MTP's confidence meaningless): mean drafts proposed per round, mean
acceptance length, acceptance rate (accepted / proposed drafts) and decode speed. On a random
checkpoint the MTP is never right, so this only measures overhead; run it on a trained checkpoint
(`--checkpoint PATH`, any HF-format GLM-5.x folder with the MTP layer) and, for meaningful
acceptance, prompts it was trained on (`--prompts FILE`: one prompt per line, text when the
checkpoint has a tokenizer.json, or comma-separated token ids; or `--prompt-files F...`: the first
`--prompt-len` tokens of each file, e.g. Python source for the embedded default model).

    python benchmarks/speculative.py --markdown benchmarks/results/speculative-cpu.md
    python benchmarks/speculative.py --backend cuda --device cuda --size small   # where a GPU exists
    python benchmarks/speculative.py --checkpoint glm52_backends/default_model --adaptive \\
        --prompt-files glm52_backends/*.py --prompt-len 64 --k 2 3 5 --thresholds 0.3 0.5 0.7 0.9
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import torch

from glm52_backends import GLM52
from glm52_backends.config import FLOAT_DTYPES
from glm52_backends.engine.generation import generate
from glm52_backends.tiny import tiny_config

# Model sizes: "tiny" is the embedded checkpoint's config; "small" makes the per-token math larger
# than the Python bookkeeping on a CPU (hidden 512, 8 layers, vocab 4096).
SIZES = {
    "tiny": dict(layers=4),
    "small": dict(layers=8, vocab_size=4096, index_topk=32, hidden_size=512, intermediate_size=1024,
                  moe_intermediate_size=256, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, index_n_heads=8, index_head_dim=32,
                  n_routed_experts=16, num_experts_per_tok=4),
}


class SyntheticDraft:
    """SYNTHETIC draft source (benchmark only): the plain-greedy token with probability `rate`,
    else a wrong one. Deterministic in (request, position), so repeated runs see the same drafts."""

    def __init__(self, reference: list[list[int]], rate: float, vocab: int, seed: int = 0):
        self.ref, self.rate, self.V = reference, rate, vocab
        g = torch.Generator().manual_seed(seed)
        width = max(map(len, reference))
        self.coin = torch.rand(len(reference), width, generator=g).tolist()
        self.shift = torch.randint(1, vocab, (len(reference), width), generator=g).tolist()

    def __call__(self, i: int, pos: int, proposed: int) -> int:
        right = self.ref[i][pos]
        return right if self.coin[i][pos] < self.rate else (right + self.shift[i][pos]) % self.V


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", "").strip()
        cpus = fields.get("CPU(s)", "").strip()
        return f"{name} ({cpus} CPUs, {platform.machine()})" if name else platform.processor()
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()


def _clock(device: torch.device):
    """CPU: this process's CPU seconds (with one intra-op thread, other processes sharing the cores
    barely change it, unlike wall time). Elsewhere: wall time after a device synchronize."""
    if device.type == "cpu":
        return time.process_time

    def wall() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return wall


def _best(fn, clock, repeats: int):
    """One warm-up run, then the best of `repeats` timed runs: (last result, seconds)."""
    res, best = fn(), float("inf")
    for _ in range(repeats):
        t0 = clock()
        res = fn()
        best = min(best, clock() - t0)
    return res, best


def _load_prompts(path: str, model) -> list[list[int]]:
    """One prompt per non-empty line: comma-separated token ids, else text (needs a tokenizer)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = [x.strip() for x in line.split(",")]
            if all(x.isdigit() for x in parts):
                out.append([int(x) for x in parts])
            elif model.tokenizer is None:
                raise SystemExit(f"{path}:{n}: a text prompt, but the checkpoint has no tokenizer.json "
                                 f"(give comma-separated token ids)")
            else:
                out.append(model.tokenizer.encode(line))
    if not out:
        raise SystemExit(f"{path}: no prompts in it")
    return model.encode_prompts(out)


def _setup(args):
    """(model, prompts, description of the model) from --checkpoint or --size."""
    dtype = FLOAT_DTYPES[args.dtype]
    if args.checkpoint:
        model = GLM52(args.checkpoint, backend=args.backend, device=args.device, dtype=dtype, progress=False)
        if not model.has_mtp:
            raise SystemExit(f"{args.checkpoint}: no MTP layer (num_nextn_predict_layers = 0 or its tensors "
                             f"missing); speculative decoding needs it")
        what = f"checkpoint `{args.checkpoint}`"
    else:
        cfg, _ = tiny_config(mtp=True, **SIZES[args.size])
        model = GLM52(cfg, backend=args.backend, device=args.device, dtype=dtype, include_mtp=True, seed=0)
        what = f"random weights, `{args.size}` config"
    cfg = model.cfg
    what += (f" (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers + MTP, vocab {cfg.vocab_size}, "
             f"index_topk {cfg.index_topk})")
    if args.prompts:
        prompts = _load_prompts(args.prompts, model)[:args.batch]
    elif args.prompt_files:
        if model.tokenizer is None:
            raise SystemExit("--prompt-files needs a checkpoint with a tokenizer.json")
        prompts = []
        for path in args.prompt_files[:args.batch]:
            with open(path, encoding="utf-8", errors="replace") as f:
                prompts.append(model.tokenizer.encode(f.read())[:args.prompt_len])
        prompts = model.encode_prompts(prompts)
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len + 7 * i,), generator=g).tolist()
                   for i in range(args.batch)]
    C = cfg.max_position_embeddings
    if max(map(len, prompts)) + args.new_tokens + max(args.k) + 1 > C:
        raise SystemExit(f"prompts of up to {max(map(len, prompts))} tokens + {args.new_tokens} new tokens do not "
                         f"fit the context ({C}); use --new-tokens or shorter prompts")
    return model, prompts, what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu_ref")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="random-weight config (without --checkpoint)")
    ap.add_argument("--checkpoint", help="an HF-format GLM-5.x folder with the MTP layer (instead of random weights)")
    ap.add_argument("--prompts", help="file, one prompt per line (text, or comma-separated ids); default: random ids")
    ap.add_argument("--prompt-files", nargs="+", metavar="FILE",
                    help="one prompt per file: its first --prompt-len tokens (needs the checkpoint's tokenizer)")
    ap.add_argument("--batch", type=int, default=4, help="requests (the first BATCH prompts of --prompts)")
    ap.add_argument("--prompt-len", type=int, default=24,
                    help="shortest random prompt; the others are 7, 14, ... longer")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0],
                    help="synthetic acceptance rates (not with --adaptive)")
    ap.add_argument("--adaptive", action="store_true",
                    help="compare fixed k with adaptive drafting at each --thresholds value (MTP drafts only)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9],
                    help="adaptive drafting thresholds, each in [0, 1] (with --adaptive)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point after a warm-up; the best is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, prompts, what = _setup(args)
    cfg = model.cfg
    V, B, N = cfg.vocab_size, len(prompts), args.new_tokens

    # reference (also the synthetic source's right answers) and the plain baseline
    longest = model.generate(prompts, max_new_tokens=N + max(args.k) + 1, stop_at_eos=False).tokens
    reference = [p + t for p, t in zip(prompts, longest)]
    want = [t[:N] for t in longest]
    clock = _clock(model.device)
    # decode time = a whole run less a prefill-only run (prompt prefill + first token, identical in both)
    _, prefill_s = _best(lambda: model.generate(prompts, max_new_tokens=1, stop_at_eos=False), clock, args.repeats)
    plain, plain_s = _best(lambda: model.generate(prompts, max_new_tokens=N, stop_at_eos=False), clock, args.repeats)
    assert plain.tokens == want
    n_dec = B * (N - 1)
    plain_tps = n_dec / (plain_s - prefill_s)
    print(f"plain greedy: prefill {prefill_s * 1e3:.1f} ms, decode {plain_tps:.1f} tok/s")

    def timed(label: str, **kw):
        res, spec_s = _best(lambda: generate(model, prompts, max_new_tokens=N, stop_at_eos=False, **kw),
                            clock, args.repeats)
        if res.tokens != want:
            raise SystemExit(f"{label}: speculative output differs from plain greedy")
        return res.stats, n_dec / (spec_s - prefill_s)

    dev = model.device
    where = machine() if dev.type == "cpu" else (torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev))
    timing = ("process CPU time (single-threaded; robust to other processes sharing the machine)"
              if dev.type == "cpu" else "wall time with device synchronize")
    source = (f" from {args.prompts}" if args.prompts else " (the first tokens of "
              f"{', '.join(os.path.basename(f) for f in args.prompt_files[:B])})" if args.prompt_files else " (random ids)")
    setup = (f"Backend `{model.backend_name}`, {args.dtype}, {what}; batch {B}, prompts "
             f"{', '.join(str(len(p)) for p in prompts)} tokens{source}, "
             f"{N} new tokens each, greedy. Timing: {timing}, best of {args.repeats} runs after a warm-up; "
             f"decode = whole run less a prefill-only run (the MTP layer's prompt prefill counts as decode).")
    header = [f"Machine: {where}; torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); "
              f"Python {platform.python_version()}.", setup, ""]
    if args.adaptive:
        lines = _adaptive_rows(args, timed, plain_tps, B, header, dev.type)
    else:
        lines = _rate_rows(args, timed, plain_tps, B, header, dev.type, reference, V)
    cmd = "python benchmarks/speculative.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Reproduce: `{cmd.strip()}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def _adaptive_rows(args, timed, plain_tps: float, B: int, header: list[str], dev_type: str) -> list[str]:
    """Fixed k against adaptive drafting at each threshold, MTP drafts only."""
    bad = [t for t in args.thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise SystemExit(f"--thresholds must be in [0, 1], got {bad}")
    rows = []
    for k in args.k:
        for t in [None] + args.thresholds:
            label = f"k={k} " + ("fixed" if t is None else f"adaptive p>{t:g}")
            st, tps = timed(label, speculative=k, adaptive=t is not None, draft_threshold=t)
            rows.append((k, t, st, tps))
            print(f"{label}: {st['mean_drafted_tokens']:.2f} drafts/round, acceptance length "
                  f"{st['mean_acceptance_length']:.2f}, acceptance rate {st['draft_acceptance_rate']:.1%}, "
                  f"decode {tps:.1f} tok/s = {tps / plain_tps:.2f}x plain")
    lines = [f"# MTP speculative decoding: adaptive against fixed draft length ({dev_type})", "", *header,
             "Drafts: the MTP layer's own. `adaptive p>t`: a request drafts its next token only while the MTP "
             "layer's probability of its last draft is above t (the first draft is always proposed). "
             "Acceptance length: tokens emitted per request per verify step (bonus counted); acceptance rate: "
             "accepted / proposed drafts. Every run's tokens were checked equal to plain greedy decoding's.",
             "", f"Plain decoding: **{plain_tps:.1f} tok/s** decode (batch {B}).", "",
             "| k | drafting | drafts / round | acceptance length | acceptance rate | decode tok/s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for k, t, st, tps in rows:
        lines.append(f"| {k} | {'fixed' if t is None else f'adaptive p>{t:g}'} | {st['mean_drafted_tokens']:.2f} | "
                     f"{st['mean_acceptance_length']:.2f} | {st['draft_acceptance_rate']:.1%} | {tps:.1f} | "
                     f"**{tps / plain_tps:.2f}x** |")
    return lines


def _rate_rows(args, timed, plain_tps: float, B: int, header: list[str], dev_type: str, reference, V: int
               ) -> list[str]:
    """Speed-up against a synthetic acceptance rate, and the MTP layer's own drafts."""
    rows = {}  # (rate or None, k) -> (measured mean acceptance length, expected, decode tok/s)
    for k in args.k:
        for rate in [None] + args.rates:
            filt = None if rate is None else SyntheticDraft(reference, rate, V, seed=k)
            st, tps = timed(f"k={k} r={rate}", speculative=k, draft_filter=filt)
            expected = float("nan") if rate is None else (k + 1 if rate == 1 else (1 - rate ** (k + 1)) / (1 - rate))
            rows[rate, k] = (st["mean_acceptance_length"], expected, tps)
            print(f"k={k} {'mtp drafts' if rate is None else f'synthetic r={rate:.2f}'}: acceptance length "
                  f"{st['mean_acceptance_length']:.2f} (expected {expected:.2f}), decode {tps:.1f} tok/s "
                  f"= {tps / plain_tps:.2f}x plain")
    lines = [
        f"# MTP speculative decoding: speed-up against acceptance rate ({dev_type})",
        "", *header,
        "Rows `synthetic r`: a **synthetic draft source**. The MTP layer runs every draft step (its compute "
        "is paid), but each drafted token is replaced by the plain-greedy token with probability r, else by "
        "a wrong token; verification is real (one target forward over k+1 tokens per request, then the "
        "backend's `mtp_verify`). Row `mtp drafts`: the checkpoint's own MTP drafts. Every run's "
        "tokens were checked equal to plain greedy decoding's.",
        "",
        f"Plain decoding: **{plain_tps:.1f} tok/s** decode (batch {B}). Each cell: mean acceptance length "
        "measured (expected (1-r^(k+1))/(1-r)) / decode speed-up over plain.",
        "",
        "| drafts | " + " | ".join(f"k={k}" for k in args.k) + " |",
        "|---|" + "---|" * len(args.k),
    ]
    for rate in [None] + args.rates:
        cells = []
        for k in args.k:
            acc, exp, tps = rows[rate, k]
            cells.append(f"{acc:.2f}" + ("" if rate is None else f" ({exp:.2f})") + f" / **{tps / plain_tps:.2f}x**")
        lines.append(f"| {'mtp drafts' if rate is None else f'synthetic r={rate:.2f}'} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
