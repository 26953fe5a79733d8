"""One rank of benchmarks/prefill_cp_cpu.py: time one long prefill on a layout (or in one process).

    python benchmarks/prefill_cp_worker.py INIT_FILE RANK WORLD CKPT TP DCP OUT_JSON [--tokens N]
        [--reps R] [--cp-min N] [--backend B]

WORLD > 1: gloo from a file:// rendezvous (one thread per rank, like tests/dcp_worker.py), GLM52(CKPT,
tp=TP, dcp=DCP); WORLD = 1: one process, no process group. One prompt of N random tokens (seed 11) is
prefilled whole (`extend(cache, {0: prompt}, last_only=True)` into a fresh cache) once to warm up, with
layer 0's token-wise projections counted (rows through wq_a, wkv_a, the indexer's wk and wq_b: the
backend's `linear` wrapped, as tests/dcp_worker.py does), then R times, timed, the ranks lined up by a
barrier before each. `--cp-min N` sets `net.prefill_cp_min_tokens` (10**9: the query split off). Writes
one JSON object: the times, the seconds spent per timed prefill inside the backend's linear, indexer_topk
and sparse_mla and inside the collectives, the rows, the cache bytes, the last token's logits.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def prompt(vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(11)).tolist()


def count_rows(m) -> tuple[dict[str, int], object]:
    """Wrap the backend's linear: rows through layer 0's wq_a / wkv_a / indexer wk / indexer wq_b."""
    L0, rows = m.net.layers[0], {"wq_a": 0, "wkv_a": 0, "wk": 0, "wq_b_index": 0}
    watch = {id(L0.wq_a): "wq_a", id(L0.wkv_a): "wkv_a"}
    if L0.indexer is not None:
        watch.update({id(L0.indexer.wk): "wk", id(L0.indexer.wq_b): "wq_b_index"})
    orig = m.ops.linear

    def spy(x, w, *a, **k):
        if id(w) in watch:
            rows[watch[id(w)]] += x.shape[0]
        return orig(x, w, *a, **k)
    m.ops.linear = spy
    return rows, orig


def _timed(obj, name: str, spent: dict[str, float], key: str) -> None:
    f = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[key] += time.perf_counter() - t
    setattr(obj, name, timed)


def time_parts(m) -> dict[str, float]:
    """Wrap the backend's linear, indexer_topk and sparse_mla and every collective of the tp and dcp groups
    with timers (gloo on CPU is synchronous: a collective's time includes waiting for the slower rank)."""
    spent = {"linear": 0.0, "indexer_topk": 0.0, "sparse_mla": 0.0, "collectives": 0.0}
    for name in ("linear", "indexer_topk", "sparse_mla"):
        _timed(m.ops, name, spent, name)
    seen = set()
    for comm in (m.net.comm, m.net.dcp_comm):
        if comm is None or id(comm) in seen or getattr(comm, "world_size", 1) <= 1:
            continue
        seen.add(id(comm))
        for name in ("all_reduce", "all_gather", "reduce_scatter", "all_gather_rows", "broadcast"):
            _timed(comm, name, spent, "collectives")
    return spent


def main() -> int:
    init, rank, world, ckpt, tp, dcp, out = sys.argv[1:8]
    arg = lambda name, d: sys.argv[sys.argv.index(name) + 1] if name in sys.argv else d  # noqa: E731
    n, reps = int(arg("--tokens", 2048)), int(arg("--reps", 3))
    cp_min, backend = arg("--cp-min", None), arg("--backend", "cpu_ref")
    torch.set_num_threads(1)
    world = int(world)
    dist = None
    if world > 1:
        import datetime

        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=int(rank), world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    from glm52_backends import GLM52
    kw = dict(tp=int(tp), dcp=int(dcp)) if world > 1 else {}
    m = GLM52(ckpt, backend=backend, dtype=torch.float32, progress=False, **kw)
    if cp_min is not None:
        m.net.prefill_cp_min_tokens = int(cp_min)
    P = prompt(m.cfg.vocab_size, n)

    def prefill():
        cache = m.new_cache(n + m.block_size)
        out = m.extend(cache, {0: P}, last_only=True)
        return cache, out[0][-1]

    rows, orig = count_rows(m)
    cache, last = prefill()                              # warm-up, with layer 0's rows counted
    m.ops.linear = orig
    spent = time_parts(m)
    times, parts = [], {k: [] for k in spent}
    for _ in range(reps):
        if dist is not None:
            dist.barrier()
        for k in spent:
            spent[k] = 0.0
        t0 = time.perf_counter()
        cache, last = prefill()
        times.append(time.perf_counter() - t0)
        for k, v in spent.items():
            parts[k].append(v)
    res = {"rank": int(rank), "tokens": n, "times": times, "parts": parts, "proj_rows": rows,
           "cache_bytes": cache.nbytes, "last_logits": last.double().tolist(),
           "dcp_rank": m.layout.dcp_rank if m.layout is not None else 0}
    with open(out, "w") as f:
        json.dump(res, f)
    if dist is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from glm52_backends.benchmarks.machine import leave
    leave(main)
