"""One rank of a decode-context-parallel test run (tests/test_dcp.py starts W of these).

    python tests/dcp_worker.py INIT_FILE RANK WORLD CKPT TP DCP OUT_JSON [--ep N] [--kv-cache-dtype D]
        [--offload S] [--cp-min N] [--graph MODE] [--backend B] [--merge-tokens N]
        [--dcp-attention lse|gather]

Initialises gloo from a file:// rendezvous, builds GLM52(CKPT, backend="cpu_ref", tp=TP, ep, dcp=DCP)
and writes one JSON object to OUT_JSON (`run`): the logits of a ragged batch of prompts several
times the indexer's top-k, greedy tokens (whole and chunked prefill), MTP speculative tokens, a
digest of every top-k the model attended, cache bytes, wall time. tests/test_dcp.py computes the same
in one process (`run` with no layout) and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch


def prompts(vocab: int) -> list[list[int]]:
    """Three prompts of 41, 30 and 57 tokens (several times the tiny checkpoints' top-k of 8)."""
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (41, 30, 57)]


def run(m, cache_tokens: int = 4096) -> dict:
    """What a rank (or one process) reports for model `m`."""
    digests: list[str] = []
    net = m.net
    if net.dcp > 1:                   # the merged selection of every full layer (the shared ones reuse it)
        orig = net._topk_dcp

        def spy(*a, **k):
            out = orig(*a, **k)
            digests.append(hashlib.sha1(out.cpu().numpy().tobytes()).hexdigest()[:12])
            return out
        net._topk_dcp = spy
    else:
        orig_op = m.ops.indexer_topk

        def spy_op(*a, **k):
            out = orig_op(*a, **k)
            digests.append(hashlib.sha1(out.cpu().numpy().tobytes()).hexdigest()[:12])
            return out
        m.ops.indexer_topk = spy_op
    P = prompts(m.cfg.vocab_size)
    # rows through layer 0's token-wise projections in the one-shot forward: the query side (q_a) and
    # the key side (kv_a, the indexer's wk); under DCP each rank's share (prefill context parallelism)
    from glm52_backends.benchmarks.prefill_cp_worker import count_rows
    rows, orig_linear = count_rows(m)
    t0 = time.perf_counter()
    logits = [x.double().tolist() for x in m(P)]
    m.ops.linear = orig_linear
    if m.graph not in (False, "auto"):      # captured decode steps: the spies (host reads) see prefill only
        if net.dcp > 1:
            net._topk_dcp = orig
        else:
            m.ops.indexer_topk = orig_op
    forward_topk = hashlib.sha1("".join(digests).encode()).hexdigest()
    g = m.generate(P, max_new_tokens=10, stop_at_eos=False)
    greedy, graphs = g.tokens, g.stats.get("graphs_captured", 0)
    chunked = m.generate(P, max_new_tokens=6, stop_at_eos=False, prefill_chunk=7).tokens
    spec = m.generate(P, max_new_tokens=10, stop_at_eos=False, speculative=3, prefill_chunk=16).tokens
    wall = time.perf_counter() - t0
    sampled = m.generate(P, max_new_tokens=6, stop_at_eos=False, temperature=0.8, seed=5).tokens
    held = m.new_cache(cache_tokens, mtp=True)
    topk, n_topk = hashlib.sha1("".join(digests).encode()).hexdigest(), len(digests)
    off = None
    if m.offload is not None:       # host offload: one prefill and one decode step; what this rank fetched
        c = m.new_cache(cache_tokens)
        m.extend(c, dict(enumerate(P)))
        m.extend(c, {i: [1] for i in range(len(P))})
        last = [r for r in c.offload.log if r["step"] == c.offload.step]
        off = {"stage_bytes": c.offload.device_bytes, "decode_fetched": sum(r["fetched_bytes"] for r in last),
               "decode_dense": sum(r["dense_blocks"] * r["layers"] for r in last) * c.offload.block_bytes}
    return {"logits": logits, "proj_rows": rows, "graphs": graphs, "offload": off, "tokens": sum(map(len, P)), "greedy": greedy, "chunked": chunked, "spec": spec, "sampled": sampled,
            "forward_topk": forward_topk,
            "topk": topk, "n_topk": n_topk,
            "cache_bytes": held.nbytes, "cache_blocks": held.num_blocks, "wall_s": wall}


def main() -> int:
    init, rank, world, ckpt, tp, dcp, out = sys.argv[1:8]
    ep = int(sys.argv[sys.argv.index("--ep") + 1]) if "--ep" in sys.argv else 1
    kv = sys.argv[sys.argv.index("--kv-cache-dtype") + 1] if "--kv-cache-dtype" in sys.argv else "auto"
    offload = int(sys.argv[sys.argv.index("--offload") + 1]) if "--offload" in sys.argv else None
    cp_min = int(sys.argv[sys.argv.index("--cp-min") + 1]) if "--cp-min" in sys.argv else None
    graph = sys.argv[sys.argv.index("--graph") + 1] if "--graph" in sys.argv else "auto"
    backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "cpu_ref"
    merge = int(sys.argv[sys.argv.index("--merge-tokens") + 1]) if "--merge-tokens" in sys.argv else None
    attention = sys.argv[sys.argv.index("--dcp-attention") + 1] if "--dcp-attention" in sys.argv else None
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=int(rank), world_size=int(world),
                            timeout=datetime.timedelta(seconds=120))
    from glm52_backends import GLM52
    m = GLM52(ckpt, backend=backend, dtype=torch.float32, progress=False, tp=int(tp), ep=ep, dcp=int(dcp),
              kv_cache_dtype=kv, offload=offload, graph=graph)
    if cp_min is not None:
        m.net.prefill_cp_min_tokens = cp_min
    if merge is not None:
        m.net.dcp_merge_tokens = merge
    if attention is not None:
        m.net.dcp_attention = attention
    res = run(m)
    res.update(rank=int(rank), dcp_rank=m.layout.dcp_rank)
    with open(out, "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from rank_exit import leave
    leave(main())
