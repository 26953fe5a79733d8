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

    python benchmarks/speculative.py --markdown benchmarks/results/speculative-cpu.md
    python benchmarks/speculative.py --backend cuda --device cuda --size small   # where a GPU exists
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch

from glm52_backends import GLM52
from glm52_backends.engine.speculative import generate_speculative
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu_ref")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=24, help="shortest prompt; the others are 7, 14, ... longer")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point after a warm-up; the best is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg, _ = tiny_config(mtp=True, **SIZES[args.size])
    model = GLM52(cfg, backend=args.backend, device=args.device, include_mtp=True, seed=0)
    V, B, N = cfg.vocab_size, args.batch, args.new_tokens
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (args.prompt_len + 7 * i,), generator=g).tolist() for i in range(B)]

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

    rows = {}  # (rate or None, k) -> (measured mean acceptance length, expected, decode tok/s)
    for k in args.k:
        for rate in [None] + args.rates:
            filt = None if rate is None else SyntheticDraft(reference, rate, V, seed=k)
            run = lambda: generate_speculative(model, prompts, max_new_tokens=N, k=k, stop_at_eos=False,  # noqa: E731
                                               draft_filter=filt)
            res, spec_s = _best(run, clock, args.repeats)
            if res.tokens != want:
                raise SystemExit(f"k={k} r={rate}: speculative output differs from plain greedy")
            expected = float("nan") if rate is None else (k + 1 if rate == 1 else (1 - rate ** (k + 1)) / (1 - rate))
            tps = n_dec / (spec_s - prefill_s)
            rows[rate, k] = (res.stats["mean_acceptance_length"], expected, tps)
            print(f"k={k} {'mtp drafts' if rate is None else f'synthetic r={rate:.2f}'}: acceptance length "
                  f"{res.stats['mean_acceptance_length']:.2f} (expected {expected:.2f}), decode {tps:.1f} tok/s "
                  f"= {tps / plain_tps:.2f}x plain")

    dev = model.device
    where = machine() if dev.type == "cpu" else (torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev))
    timing = ("process CPU time (single-threaded; robust to other processes sharing the machine)"
              if dev.type == "cpu" else "wall time with device synchronize")
    lines = [
        f"# MTP speculative decoding: speed-up against acceptance rate ({dev.type})",
        "",
        f"Machine: {where}; torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); "
        f"Python {platform.python_version()}.",
        f"Backend `{model.backend_name}`, float32, random weights, `{args.size}` config "
        f"(hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers + MTP, vocab {V}, index_topk {cfg.index_topk}); "
        f"batch {B}, prompts {', '.join(str(len(p)) for p in prompts)} tokens, {N} new tokens each, greedy. "
        f"Timing: {timing}, best of {args.repeats} runs after a warm-up; decode = whole run less a "
        f"prefill-only run (the MTP layer's prompt prefill counts as decode).",
        "",
        "Rows `synthetic r`: a **synthetic draft source**. The MTP layer runs every draft step (its compute "
        "is paid), but each drafted token is replaced by the plain-greedy token with probability r, else by "
        "a wrong token; verification is real (one target forward over k+1 tokens per request, then the "
        "backend's `mtp_verify`). Row `mtp drafts`: the random checkpoint's own MTP drafts. Every run's "
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
    cmd = "python benchmarks/speculative.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Reproduce: `{cmd.strip()}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
