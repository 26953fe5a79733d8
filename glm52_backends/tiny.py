"""The tiny GLM-5.2: the real architecture at tiny dimensions (`tiny_config`) and its random weights in
the real layout (`random_state_dict`: what `GLM52(cfg)` runs without a checkpoint). Writing such a
model as a checkpoint folder is a dev tool: glm52_backends/devtools/make_tiny.py (`glm52 make-tiny`).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, indexshare_schedule
from .loader import DEFAULT_FP8_BLOCK, SCALE_SUFFIX
from .weights import expected_tensors, float32_tensor, is_fp8_weight, quantize_weight

TINY_DEFAULTS = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
    index_n_heads=4, index_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=4096, rope_theta=10000.0,
)
TINY_INDEX_FREQ, TINY_INDEX_OFFSET = 2, 1  # F S F S ...: shared layers exist at tiny depth


# ---- config ----------------------------------------------------------------------------------

def tiny_config(*, fp8: bool = False, mtp: bool = False, layers: int = 4, vocab_size: int = 256,
                index_topk: int = 8, **overrides) -> tuple[ModelConfig, dict]:
    """The tiny `ModelConfig` and the `config.json` dict that describes it.

    `overrides`: any ModelConfig field, plus `fp8_block=(b0, b1)` and the HF schedule keys
    `index_topk_freq`, `index_skip_topk_offset`, `index_topk_pattern`.
    """
    block = tuple(overrides.pop("fp8_block", DEFAULT_FP8_BLOCK))
    freq = overrides.pop("index_topk_freq", TINY_INDEX_FREQ)
    offset = overrides.pop("index_skip_topk_offset", TINY_INDEX_OFFSET)
    pattern = overrides.pop("index_topk_pattern", None)
    kw = {**TINY_DEFAULTS, "num_hidden_layers": layers, "vocab_size": vocab_size, "index_topk": index_topk,
          "num_nextn_predict_layers": 1 if mtp else 0, "eos_token_id": [vocab_size - 1]}
    if fp8:
        kw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    kw.update(overrides)
    if "indexer_types" not in kw:
        kw["indexer_types"] = indexshare_schedule(kw["num_hidden_layers"], pattern, freq, offset)
    cfg = ModelConfig(**kw)
    d = cfg.to_hf_dict()
    d.update(index_topk_freq=freq, index_skip_topk_offset=offset, index_topk_pattern=pattern)
    return cfg, d


# ---- weights ---------------------------------------------------------------------------------

def _init_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """float32 values with O(1) activations: norms ~1, small biases, linears std ~0.02-0.1."""
    if name.endswith("e_score_correction_bias"):
        return torch.rand(shape, generator=g) * 0.1  # uniform 0..0.1: routing depends on it
    if name.endswith("k_norm.bias"):
        return torch.randn(shape, generator=g) * 0.02
    if len(shape) == 1:  # RMSNorm / LayerNorm weights
        return 1.0 + torch.randn(shape, generator=g) * 0.05
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=g)  # [V, Hd]: unit-scale embeddings
    std = min(0.1, max(0.02, 1.0 / math.sqrt(shape[1])))  # linear [out, in]
    return torch.randn(shape, generator=g) * std


def tiny_tensors(cfg: ModelConfig, *, fp8: bool, seed: int,
                 include_mtp: bool | None = None) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor in its stored dtype (BF16; F32 router bias; FP8 + scale when fp8)."""
    g = torch.Generator().manual_seed(seed)
    block = cfg.fp8_block or DEFAULT_FP8_BLOCK
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_tensors(cfg, include_mtp=include_mtp).items():
        w = _init_tensor(name, shape, g)
        if float32_tensor(name):
            out[name] = w.float()
        elif fp8 and is_fp8_weight(name):   # quantized from the BF16 values, as an FP8 release is from its BF16 master
            q = quantize_weight(w.to(torch.bfloat16).float(), "fp8_block", block=block)
            out[name], out[name + SCALE_SUFFIX] = q.data, q.scales
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def random_state_dict(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      include_mtp: bool | None = None) -> dict[str, torch.Tensor]:
    """Random weights in the real layout, as `load_checkpoint` would return them: equal to loading
    `make_tiny_checkpoint(..., seed=seed)` of the same config (values rounded through BF16, the
    stored dtype), converted to `dtype` (router bias float32)."""
    raw = tiny_tensors(cfg, fp8=False, seed=seed, include_mtp=include_mtp)
    return {k: v.to(torch.float32 if float32_tensor(k) else dtype) for k, v in raw.items()}


__all__ = ["tiny_config", "tiny_tensors", "random_state_dict", "TINY_DEFAULTS"]
