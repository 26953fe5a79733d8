"""The per-op benchmarks of `glm52 bench`, one file per op, named after it: `indexer_topk.py`,
`sparse_mla.py`, `moe_experts.py` (dense and block-FP8 experts), `linear.py` (block-FP8 linears),
`mtp_verify.py`; `common.py` holds what they share. `BENCHES` maps each benchmark's name (what
`--ops` selects and the report's rows carry) to (its plan, its calls), in the order they run.
"""

from __future__ import annotations

from . import indexer_topk, linear, moe_experts, mtp_verify, sparse_mla

BENCHES = {
    "indexer_topk": (indexer_topk.plan, indexer_topk.inputs),
    "sparse_mla": (sparse_mla.plan, sparse_mla.inputs),
    "moe_experts": (moe_experts.plan, moe_experts.inputs),
    "linear_fp8": (linear.plan_fp8, linear.inputs_fp8),
    "moe_experts_fp8": (moe_experts.plan_fp8, moe_experts.inputs_fp8),
    "mtp_verify": (mtp_verify.plan, mtp_verify.inputs),
}
FP8_BENCHES = ("linear_fp8", "moe_experts_fp8")   # block-FP8 weights (1 byte a weight + f32 scales per 128x128 block)
# the names before the benchmarks were named after their ops, still accepted by `--ops`
OLD_NAMES = {"moe": "moe_experts", "moe_fp8": "moe_experts_fp8"}
