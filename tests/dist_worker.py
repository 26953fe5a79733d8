"""One rank of a distributed test run (tests/test_distributed.py starts W of these).

    python tests/dist_worker.py INIT_FILE RANK WORLD CKPT TP EP DTYPE [--dp N] [--die-after-load] [--skew-topk]
        [--adaptive] [--own-dispatch] [--graph MODE] [--stop-after-load]

Initialises gloo from a file:// rendezvous (no ports), builds GLM52(CKPT, backend="cpu_ref", tp, ep)
-- which finds the process group up and lays the model out over it -- and prints one JSON line:
logits of a ragged batch, greedy and MTP-speculative tokens, a digest of every indexer top-k
(equal on every rank), bytes read and held. `--die-after-load` exits rank 1 abruptly before the
first collective of the forward pass (the others must fail with a clear error, not hang).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist


def held_bytes(net) -> int:
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if hasattr(t, "data") and not isinstance(t, torch.Tensor):
            t = t.data                                   # a Weight
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in (net.embed, net.final_norm, net.lm_head):
        add(t)
    for L in net.layers + ([net.mtp] if net.mtp is not None else []):
        for v in vars(L).values():
            if v is not None and not isinstance(v, (int, float, str)):
                if hasattr(v, "wq_b") and hasattr(v, "wk"):          # the indexer's weights
                    for w in vars(v).values():
                        add(w)
                else:
                    add(v)
    return total


def main() -> int:
    init, rank, world, ckpt, tp, ep, dtype = sys.argv[1:8]
    die = "--die-after-load" in sys.argv
    dp = int(sys.argv[sys.argv.index("--dp") + 1]) if "--dp" in sys.argv else 1
    torch.set_num_threads(1)
    rank, world = int(rank), int(world)
    import datetime
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from glm52_backends import GLM52
    dt = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[dtype]
    backend = "cpu_ref"
    if "--own-dispatch" in sys.argv:        # a backend that brings its own expert dispatch (as MC2 would)
        from glm52_backends.backends.cpu_ref import CpuRefBackend
        from glm52_backends.ops.comm import TorchDistributed

        class CountingDispatch(TorchDistributed):
            calls = 0

            def moe_dispatch(self, *a, **k):
                CountingDispatch.calls += 1
                return super().moe_dispatch(*a, **k)

        class OwnDispatch(CpuRefBackend):
            name = "own dispatch"

            def setup_parallel(self, comms, layout):
                self.groups = comms
                return CountingDispatch()
        backend = OwnDispatch()
    if dt == torch.float64:
        from glm52_backends.backends.cpu_ref import CpuRefBackend
        backend = CpuRefBackend(torch.float64)
    if "--graph" in sys.argv:               # graph mode against eager, both on the capture-safe torch backend
        mode = sys.argv[sys.argv.index("--graph") + 1]
        m = GLM52(ckpt, backend="torch", dtype=dt, progress=False, tp=int(tp), ep=int(ep), dp=dp)
        prompts = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5], [250, 4], [8] * 9]
        eager = m.generate(prompts, max_new_tokens=10, stop_at_eos=False, graph=False)
        graph = m.generate(prompts, max_new_tokens=10, stop_at_eos=False, graph=mode)
        spec_eager = m.generate(prompts, max_new_tokens=10, stop_at_eos=False, speculative=2, graph=False)
        spec_graph = m.generate(prompts, max_new_tokens=10, stop_at_eos=False, speculative=2, graph=mode)
        print(json.dumps({"rank": rank, "eager": eager.tokens, "graph": graph.tokens, "spec_eager": spec_eager.tokens,
                          "spec_graph": spec_graph.tokens, "spec_buckets": spec_graph.stats["graph_buckets"],
                          "stats": {k: graph.stats[k] for k in ("graph", "graph_buckets", "eager_buckets")}}))
        dist.destroy_process_group()
        return 0
    if "--adaptive" in sys.argv:            # adaptive drafts only (EP stage 2: the groups want different step kinds)
        m = GLM52(ckpt, backend=backend, dtype=dt, progress=False, tp=int(tp), ep=int(ep), dp=dp)
        prompts = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5], [250, 4], [8] * 9, [1, 2]]
        runs = {str(t): m.generate(prompts, max_new_tokens=9, stop_at_eos=False, speculative=3, adaptive=True,
                                   draft_threshold=t) for t in (0.0, 0.02)}
        print(json.dumps({"rank": rank, "adaptive": {t: r.tokens for t, r in runs.items()},
                          "drafted": {t: r.stats.get("mean_drafted_tokens") for t, r in runs.items()},
                          "empty_steps": {str(k): v for k, v in m.turns.empty_steps.items()}}))
        dist.destroy_process_group()
        return 0
    m = GLM52(ckpt, backend=backend, dtype=dt, progress=False, tp=int(tp), ep=int(ep), dp=dp)
    if "--stop-after-load" in sys.argv and rank == 1:     # hung (SIGSTOP): the others must fail by the timeout
        import signal
        os.kill(os.getpid(), signal.SIGSTOP)
    if die and rank == 1:
        os._exit(3)
    digests = []
    orig = m.ops.indexer_topk

    skew = "--skew-topk" in sys.argv and rank == 1

    def spy(*a, **k):
        out = orig(*a, **k)
        if skew and out.shape[1] > 1:          # a rank-dependent top-k: what the debug check must catch
            out = out.clone()
            out[0] = out[0].roll(1)
        digests.append(hashlib.sha1(out.cpu().numpy().tobytes()).hexdigest()[:12])
        return out
    m.ops.indexer_topk = spy
    prompts = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [250, 4], [8] * 9]
    logits = [x.double().tolist() for x in m(prompts)]
    greedy = m.generate(prompts, max_new_tokens=12, stop_at_eos=False).tokens
    chunked = m.generate(prompts, max_new_tokens=4, stop_at_eos=False, prefill_chunk=5).tokens
    spec = m.generate(prompts, max_new_tokens=12, stop_at_eos=False, speculative=3).tokens if m.has_mtp else None
    sampled = m.generate(prompts, max_new_tokens=8, stop_at_eos=False, temperature=0.8, seed=7).tokens
    out = {"rank": rank, "dp_rank": m.layout.dp_rank, "logits": logits, "greedy": greedy, "chunked": chunked, "spec": spec, "sampled": sampled,
           "topk": hashlib.sha1("".join(digests).encode()).hexdigest(), "n_topk": len(digests),
           "bytes_read": m.load_stats.get("bytes_read"), "bytes_total": m.load_stats.get("bytes_total"),
           "held": held_bytes(m.net), "moe": dict(m.net.moe_stats),
           "sent_bytes": getattr(m.net.ep_comm, "sent_bytes", 0) if m.net.ep_comm is not None else 0,
           "own_dispatch_calls": type(m.net.ep_comm).calls if hasattr(type(m.net.ep_comm), "calls") else None}
    print(json.dumps(out))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from rank_exit import leave
    leave(main())
