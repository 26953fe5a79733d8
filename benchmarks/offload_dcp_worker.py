"""One rank of benchmarks/offload_cpu.py's section on host offload under decode context parallelism.

    python benchmarks/offload_dcp_worker.py INIT_FILE RANK WORLD CKPT PROMPTS_JSON SLOTS OUT_JSON [--dcp D]

Initialises gloo from a file:// rendezvous (one thread per rank), builds GLM52(CKPT, backend="cpu_ref",
tp=WORLD, dcp=D (default WORLD), block_size=offload_cpu.BS, offload=max(SLOTS, 2 * top-k)) and runs
offload_cpu.run on the prompts (chunked prefill and greedy decode through `extend`, the cache with SLOTS
staged blocks per layer), then greedy `generate` with MTP speculative decoding (k = 2). Writes one JSON
object: every step's logits, the tokens, this rank's offload log and byte counts.
"""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    init, rank, world, ckpt, prompts_json, slots, out = sys.argv[1:8]
    dcp = int(sys.argv[sys.argv.index("--dcp") + 1]) if "--dcp" in sys.argv else int(world)
    slots = int(slots)
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=int(rank), world_size=int(world),
                            timeout=datetime.timedelta(seconds=300))
    sys.path.insert(0, HERE)
    from offload_cpu import BS, NEW, TOPK, run

    from glm52_backends import GLM52
    with open(prompts_json) as f:
        prompts = json.load(f)
    m = GLM52(ckpt, backend="cpu_ref", dtype=torch.float32, progress=False, block_size=BS, tp=int(world), dcp=dcp,
              offload=max(slots, 2 * TOPK))
    steps, toks, cache = run(m, prompts, slots)
    spec = m.generate(prompts, max_new_tokens=NEW, speculative=2).tokens
    off = cache.offload
    res = {"rank": int(rank), "dcp_rank": m.layout.dcp_rank,
           "steps": [{str(r): lg.double().tolist() for r, lg in s.items()} for s in steps],
           "tokens": {str(i): t for i, t in toks.items()}, "spec": spec, "log": off.log,
           "block_bytes": off.block_bytes, "device_nbytes": cache.device_nbytes, "nbytes": cache.nbytes,
           "used_blocks": cache.used_blocks}
    with open(out, "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from glm52_backends.benchmarks.machine import leave
    leave(main)
