"""The case catalogue: per op, the inputs a backend is checked on and how it is judged.

One file per op, named after it (`cases/sparse_mla.py` holds sparse_mla's cases, next to its contract
glm52_backends/ops/sparse_mla.py); `common.py` holds what they share (`Case`, `SIZES`, the seed, the
real head widths, the quantized-weight helpers). `CASES` is every op's cases in one list, in the
order the suite runs and reports them; a case is named by its op and its name.
"""

from __future__ import annotations

from . import indexer_topk, layer_norm, linear, mlp, moe_experts, moe_route, mtp_verify, rms_norm, rope, sparse_mla
from .common import HEAD_DIMS, HEAD_DIMS_BATCH, JUDGES, QUANT_FFN_FORMATS, QUANT_LINEAR_FORMATS, SIZES, Case
from .indexer_topk import indexer_scores
from .moe_route import selection_scores
from .mtp_verify import BOUNDARY, verify_ratios
from .sparse_mla import DCP_RANKS

CASES: list[Case] = [
    *indexer_topk.CASES, *sparse_mla.CASES, *moe_experts.CASES, *moe_route.CASES, *mtp_verify.CASES,
    *rms_norm.CASES, *layer_norm.CASES, *rope.CASES, *linear.CASES, *mlp.CASES,
    # the quantized weights (glm52_backends/quant.py) after the dense ones
    *linear.QUANT_CASES, *mlp.QUANT_CASES, *moe_experts.QUANT_CASES,
]

__all__ = ["CASES", "Case", "JUDGES", "SIZES", "HEAD_DIMS", "HEAD_DIMS_BATCH", "QUANT_LINEAR_FORMATS",
           "QUANT_FFN_FORMATS", "DCP_RANKS", "BOUNDARY", "indexer_scores", "selection_scores", "verify_ratios"]
