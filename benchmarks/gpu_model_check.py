"""GLM52 on the cuda backend against cpu_ref on one tiny checkpoint: greedy tokens, logits, MTP.

    python benchmarks/gpu_model_check.py [--json PATH]

Writes a tiny checkpoint in the real GLM-5.2 format (4 layers with IndexShare full and shared
layers, 32 indexer heads, top-k 8, an MTP layer), then
  - float32: the cuda model's greedy tokens must equal cpu_ref's (float32 dots are exact-IEEE in the
    kernels), and its logits must agree with the float64 reference to the float32 tolerance;
  - bfloat16: logits error against the float64 reference and greedy-token agreement, reported
    (bfloat16 through a whole network legitimately flips top-k selections, so tokens may differ);
  - MTP speculative decoding (k=3) through the cuda backend must give plain greedy's tokens;
  - tokens/s of each run (a tiny model: launch-bound, not a performance figure).
Runs on the interpreter too (TRITON_INTERPRET=1, CPU), with the same checks. Exit 1 on a failed check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    import torch
    from glm52_backends import GLM52
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

    res: dict = {"torch": torch.__version__, "checks": {}}
    ok = True

    def check(name: str, passed: bool, detail: str = "") -> None:
        nonlocal ok
        ok = ok and passed
        res["checks"][name] = {"passed": passed, "detail": detail}
        print(f"{'PASS' if passed else 'FAIL'} {name} {detail}", flush=True)

    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_checkpoint(d, layers=4, seed=7, index_topk=8, mtp=True)
        ref64 = GLM52(path, backend="cpu_ref", dtype=torch.float64, progress=False)
        ref32 = GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)
        models = {dt: GLM52(path, backend="cuda", dtype=dt, progress=False)
                  for dt in ((torch.float32, torch.bfloat16) if not _interpreting() else (torch.float32,))}
    any_model = next(iter(models.values()))
    res["backend"] = any_model.backend_name
    res["device"] = torch.cuda.get_device_name() if any_model.device.type == "cuda" else "cpu (interpreter)"
    g = torch.Generator().manual_seed(0)
    V = ref32.cfg.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (37, 5, 8, 1)]
    n_new = args.new_tokens

    want_logits = torch.cat(ref64(prompts))
    ref_run = ref32.generate(prompts, max_new_tokens=n_new, stop_at_eos=False)
    res["cpu_ref_float32_tokens_per_s"] = ref_run.stats["tokens_per_s"]
    for dt, m in models.items():
        name = str(dt).removeprefix("torch.")
        got = torch.cat([x.double().cpu() for x in m(prompts)])
        rel = float((got - want_logits).abs().max() / want_logits.abs().max())
        m.generate(prompts, max_new_tokens=2, stop_at_eos=False)                  # compile / warm up
        t0 = time.perf_counter()
        run = m.generate(prompts, max_new_tokens=n_new, stop_at_eos=False)
        wall = time.perf_counter() - t0
        same = sum(a == b for ra, rb in zip(run.tokens, ref_run.tokens) for a, b in zip(ra, rb))
        total = sum(len(r) for r in ref_run.tokens)
        ops = run.stats["ops"]
        res[name] = {"logits_rel_err_vs_float64": rel, "greedy_tokens_equal": run.tokens == ref_run.tokens,
                     "tokens_agreeing": f"{same}/{total}", "tokens_per_s": run.stats["tokens_per_s"],
                     "wall_s": wall, "ops": ops}
        native = all(ops.get(op) == "native" for op in ("indexer_topk", "sparse_mla", "moe_route", "moe_experts"))
        check(f"{name} hot ops native", native, json.dumps(ops))
        if dt == torch.float32:
            check("float32 logits vs float64 reference", rel <= 3.05e-5, f"rel err {rel:.2e} (tolerance 3.05e-5)")
            check("float32 greedy tokens equal cpu_ref", run.tokens == ref_run.tokens, f"{same}/{total} agree")
            spec = m.generate(prompts, max_new_tokens=n_new, speculative=3, stop_at_eos=False)
            check("float32 MTP speculative (k=3) equals plain greedy", spec.tokens == ref_run.tokens,
                  f"mean acceptance length {spec.stats.get('mean_acceptance_length', float('nan')):.2f}")
            res["speculative_stats"] = {k: v for k, v in spec.stats.items() if isinstance(v, (int, float, str))}
        else:
            print(f"INFO {name}: logits rel err {rel:.2e} vs float64; greedy tokens agreeing {same}/{total}",
                  flush=True)
    res["passed"] = ok
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if ok else 1


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
