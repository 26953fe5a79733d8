"""Quantized weights on a tiny checkpoint: bytes held against BF16, and the logits error against the
float model, per format (spec/quantization.md; the arithmetic is glm52_backends/quant.py).

    python benchmarks/quant_report.py [--layers 4] [--seed 0] [--markdown PATH] [--json]

One random tiny checkpoint (`make_tiny_checkpoint`, MTP layer included) is written in every format
with the same seed: BF16, block-FP8 (`--quant fp8`), msModelSlim AscendV1 W8A8 and W4A8 (GLM-5 mixed
recipe, static attention calibrated on the float model, no QuaRot), and the BF16 one is also
quantized at load (`GLM52(..., quantization=...)`, "online"). For each:
* bytes held: every tensor the loaded model holds (`Weight.nbytes` of each linear, plain tensors
  for the rest), loaded with dtype bfloat16, against the BF16 model; `glm52 plan`'s bytes for the
  same format are printed beside them (they must be equal);
* logits error: relative Frobenius norm ||L_q - L_f|| / ||L_f|| over the logits of a few prompts,
  both computed in float32 on cpu_ref (so the difference is the quantization alone), L_f from the
  BF16 checkpoint (the float model); and the share of positions whose argmax agrees.
The weights are random, so these errors say how much each format perturbs a model with no outliers
to protect; they are reported, never gated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from glm52_backends import GLM52
from glm52_backends.weights import Weight

FORMATS = (("bf16", None, None), ("fp8", "fp8", None), ("w8a8", "w8a8", None), ("w4a8", "w4a8", None),
           ("fp8 online", None, "fp8"), ("w8a8 online", None, "w8a8"), ("w4a8 online", None, "w4a8"))


def held_bytes(net) -> int:
    """Bytes of every tensor a `Glm52Network` holds: Weights (data, scales, aux, what the backend prepared at
    load) and plain tensors."""
    seen: set[int] = set()
    total = 0

    def add(v) -> None:
        nonlocal total
        if isinstance(v, Weight):
            for t in v.held_tensors():          # the format's tensors and any the backend prepared at load
                add(t)
        elif isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
        elif hasattr(v, "__dataclass_fields__"):          # Layer, Indexer
            for f in v.__dataclass_fields__:
                add(getattr(v, f))

    for v in (net.embed, net.final_norm, net.lm_head, *net.layers, net.mtp):
        if v is not None:
            add(v)
    return total


def planned_bytes(cfg, weights: str) -> int:
    """`glm52 plan`'s weight bytes on one device for `weights` (fp8 | w8a8 | w4a8 | bf16), MTP included."""
    from glm52_backends.planner import _count_weights
    by, _ = _count_weights(cfg, weights, include_mtp=cfg.num_nextn_predict_layers > 0)
    return int(sum(by.values()))


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + 101)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (24, 17, 9, 31)]


def quant_report(workdir: str, *, layers: int = 4, seed: int = 0, progress: bool = False) -> list[dict]:
    """One row per format: bytes held (bf16 load), planned bytes, ratio to BF16, logits error vs float."""
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    paths = {"bf16": make_tiny_checkpoint(os.path.join(workdir, "bf16"), mtp=True, layers=layers, seed=seed)}
    for q in ("fp8", "w8a8", "w4a8"):
        paths[q] = make_tiny_checkpoint(os.path.join(workdir, q), quant=q, mtp=True, layers=layers, seed=seed)
    ref = GLM52(paths["bf16"], backend="cpu_ref", dtype=torch.float32, progress=progress)
    prompts = _prompts(ref.cfg.vocab_size, seed)
    lf = torch.cat(ref(prompts)).double()
    rows = []
    base = None
    for name, stored, online in FORMATS:
        path = paths[stored or "bf16"]
        m16 = GLM52(path, backend="cpu_ref", dtype=torch.bfloat16, progress=progress, quantization=online)
        nbytes = held_bytes(m16.net)
        base = nbytes if name == "bf16" else base
        m = GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=progress, quantization=online)
        lq = torch.cat(m(prompts)).double()
        rows.append({"format": name, "loaded_as": m.load_stats.get("formats"), "bytes": nbytes,
                     "planned_bytes": planned_bytes(m16.cfg, name.split()[0]) if online is None else None,
                     "ratio_to_bf16": nbytes / base,
                     "logits_rel_error": float((lq - lf).norm() / lf.norm()),
                     "argmax_agreement": float((lq.argmax(-1) == lf.argmax(-1)).double().mean())})
    return rows


def markdown(rows: list[dict], layers: int, seed: int) -> str:
    out = [f"# Quantized formats on a tiny checkpoint ({layers} layers + MTP, seed {seed})", "",
           "Reproduce: `python benchmarks/quant_report.py --layers %d --seed %d`. Bytes: every tensor the loaded "
           "model holds (bf16 compute dtype). Error: ||logits - float logits|| / ||float logits|| (float32 "
           "compute, cpu_ref), random weights: reported, not gated." % (layers, seed), "",
           "| format | bytes held | planned | vs BF16 | logits rel. error | argmax agreement |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        planned = "" if r["planned_bytes"] is None else f"{r['planned_bytes']:,}"
        out.append(f"| {r['format']} | {r['bytes']:,} | {planned} | {r['ratio_to_bf16']:.3f} | "
                   f"{r['logits_rel_error']:.2e} | {r['argmax_agreement']:.1%} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as markdown to PATH")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = quant_report(tmp, layers=args.layers, seed=args.seed)
    text = markdown(rows, args.layers, args.seed)
    print(json.dumps(rows, indent=2) if args.json else text)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
