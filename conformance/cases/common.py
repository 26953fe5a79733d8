"""What every op's cases share: the `Case` record, the two scales, the case seed, the real head widths
and the quantized-weight helpers.

Sizes come from `SIZES["full"]` (the real GLM-5.2 dimensions: indexer 32 heads x 128 with top-k
2048, 64 MLA heads with a 512 + 64 latent, 256 experts top-8, hidden 6144, expert width 2048,
vocabulary 154880) or `SIZES["quick"]` (the same cases scaled down, for interpreters and emulators
in CI). Lengths are written in units of top-k so both scales cover contexts shorter than, equal to
and >= 4x top-k.

Every builder draws from a generator seeded by the case's name (`seeded`), so every backend sees
identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from glm52_backends.config import GLM52_CONFIG as _G

from ..inputs import Arg, Batch, CaseInputs, generator, packed, page, rand, randn, randperm

__all__ = ["Arg", "Batch", "Case", "CaseInputs", "HEAD_DIMS", "HEAD_DIMS_BATCH", "JUDGES", "QUANT_FFN_FORMATS",
           "QUANT_LINEAR_FORMATS", "SIZES", "packed", "page", "quantized", "quantized_w13", "rand", "randn", "randperm",
           "seeded"]


JUDGES = ("close", "mla", "topk", "route", "exact", "dcp")


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    build: Callable[[str], CaseInputs]  # scale ("full" | "quick") -> inputs
    judge: str
    about: str = ""

    def __post_init__(self):
        if self.judge not in JUDGES:
            raise ValueError(f"case {self.op}/{self.name}: judge {self.judge!r} not in {JUDGES}")


SIZES = {
    # the real GLM-5.2 dimensions (config.GLM52_CONFIG) and a 64-token paged-cache block
    "full": dict(Hi=_G.index_n_heads, Di=_G.index_head_dim, K=_G.index_topk,                      # indexer
                 H=_G.num_attention_heads, Dl=_G.kv_lora_rank, Dr=_G.qk_rope_head_dim,            # MLA
                 E=_G.n_routed_experts, top=_G.num_experts_per_tok, Hd=_G.hidden_size,           # MoE
                 I=_G.moe_intermediate_size, V=_G.vocab_size, BS=64),
    "quick": dict(Hi=4, Di=16, K=16, H=4, Dl=32, Dr=8, E=32, top=4, Hd=64, I=32, V=97, BS=16),
}


def seeded(op: str, name: str, scale: str) -> torch.Generator:
    """The generator of case `op`/`name` at `scale` (inputs.generator: seeded by the case's identity)."""
    return generator(op, name, scale)


# ---- the real attention head widths at short lengths ------------------------------------------------------
# Fused attention ops take only the real head widths (Ascend's npu_lightning_indexer: index head dim
# 128, at most 64 heads; npu_sparse_flash_attention: latent 512 + rope 64; npu_interleave_rope:
# rotary width 64), which the quick scale shrinks. These cases keep GLM-5.2's widths (32 indexer
# heads x 128, a 512 + 64 latent, the 64-wide rotary part) at a few tokens, short contexts and
# top-16, so an emulator or interpreter in CI runs those ops natively, cheaply, at both scales.
HEAD_DIMS = dict(Hi=32, Di=128, H=8, Dl=512, Dr=64, dn=192, K=16, BS=16)
HEAD_DIMS_BATCH = [(1, 37), (3, 20), (2, 2), (4, 16)]   # decode past top-k, a chunk, a 2-token prefill, one block


# ---- quantized weights (glm52_backends/quant.py) ----------------------------------------------------------
# Each format's weights are quantized once from the case's float weights (the model's reshapes
# included: gate/up concatenated after quantizing each, experts stacked), so every backend and the
# reference see the same codes and scales; the activations are the dtype-rounded ones, quantized by
# each side with the format's recipe. Judged by the looser of the dtype row and the format's row.
QUANT_LINEAR_FORMATS = ("fp8_block", "w8a8_dynamic", "w8a8_static", "w4a8_dynamic")
QUANT_FFN_FORMATS = ("fp8_block", "w8a8_dynamic", "w4a8_dynamic")   # static is the recipe's attention format


def quantized(w: torch.Tensor, fmt: str, x: torch.Tensor | None = None):
    from glm52_backends.weights import quantize_weight
    if fmt == "w8a8_static":  # calibrated on the case's own input, with an asymmetric offset
        return quantize_weight(w, fmt, input_scale=float(x.abs().max()) * 1.05 / 120, input_offset=5)
    return quantize_weight(w, fmt)


def quantized_w13(w13: torch.Tensor, fmt: str):
    from glm52_backends.weights import cat_rows
    I = w13.shape[-2] // 2
    return cat_rows([quantized(w13[:I], fmt), quantized(w13[I:], fmt)])
