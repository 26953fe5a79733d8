"""Weights: the checkpoint's tensor inventory, the `Weight` object, and THE sharding table.

- `expected_tensors(cfg)`: what a GLM-5.x checkpoint of a given config holds (spec §2, §10); the
  loader validates against it, `make-tiny` writes it, the planner counts it.
- `Weight`: a linear weight as the ops receive it: data + scales + format. Ops (`linear`, `mlp`,
  `moe_experts`) accept a `Weight` or a bare tensor; a backend declares the formats it executes
  (`Capabilities.weight_formats`) and declines the others, which then run on the reference.
- `SHARDING`: tensor-name pattern -> placement over tensor/expert-parallel ranks, read by the
  loader, the model and the planner alike (spec/distributed.md §1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig

# ---- Weight ---------------------------------------------------------------------------------------
WEIGHT_FORMATS = ("dense", "fp8_block")
FP8_BLOCK = (128, 128)


@dataclass
class Weight:
    """One linear weight `[out, in]` (or a stack of experts `[E, out, in]`) in a storage format.

    format "dense":     `data` is float32/bfloat16/float16; `scales` is None.
    format "fp8_block": `data` float8_e4m3fn, `scales` f32 `[ceil(out/128), ceil(in/128)]` per matrix
                        (`weight_scale_inv`: dense = data * scale of its 128x128 block).
    """
    data: torch.Tensor
    scales: torch.Tensor | None = None
    format: str = "dense"
    block: tuple[int, int] = FP8_BLOCK

    def __post_init__(self):
        if self.format not in WEIGHT_FORMATS:
            raise ValueError(f"Weight: unknown format {self.format!r}; known: {', '.join(WEIGHT_FORMATS)}")
        if self.format == "dense" and self.scales is not None:
            raise ValueError("Weight: a dense weight carries no scales")
        if self.format == "fp8_block" and self.scales is None:
            raise ValueError("Weight: format fp8_block needs its block scales")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain tensor (`dtype`: default the data's for dense, float32 otherwise)."""
        if self.format == "dense":
            return self.data if dtype is None else self.data.to(dtype)
        bo, bi = self.block
        s = self.scales.float()
        s = s.repeat_interleave(bo, dim=-2)[..., :self.data.shape[-2], :]
        s = s.repeat_interleave(bi, dim=-1)[..., :self.data.shape[-1]]
        return (self.data.float() * s).to(dtype or torch.float32)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "Weight":
        """Moved (and, for dense weights, cast); quantized data keeps its dtype, scales stay f32."""
        if self.format == "dense":
            return Weight(self.data.to(device=device, dtype=dtype))
        return Weight(self.data.to(device), self.scales.to(device), self.format, self.block)


def as_dense(w: "torch.Tensor | Weight") -> torch.Tensor:
    """A bare tensor for either form (what the reference computes with)."""
    return w.dense() if isinstance(w, Weight) else w


def weight_format(w: "torch.Tensor | Weight") -> str:
    return w.format if isinstance(w, Weight) else "dense"

# In a block-FP8 checkpoint these linear weights are F8_E4M3 with a `weight_scale_inv` (spec §10).
# Everything else (embeddings, lm_head, norms, router, indexer weights_proj, MTP glue) stays BF16,
# the correction bias F32. The loader decides by the presence of a scale tensor, not by this list.
_FP8_SUFFIXES = (
    "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "self_attn.indexer.wq_b.weight",
    "self_attn.indexer.wk.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
)


def is_fp8_weight(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(_FP8_SUFFIXES) and ".mlp.gate.weight" not in name


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Tensors of decoder layer `i` (i == num_hidden_layers is the MTP layer)."""
    p = f"model.layers.{i}."
    Hd, H = cfg.hidden_size, cfg.num_attention_heads
    t: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (Hd,),
        p + "post_attention_layernorm.weight": (Hd,),
        p + "self_attn.q_a_proj.weight": (cfg.q_lora_rank, Hd),
        p + "self_attn.q_a_layernorm.weight": (cfg.q_lora_rank,),
        p + "self_attn.q_b_proj.weight": (H * cfg.qk_head_dim, cfg.q_lora_rank),
        p + "self_attn.kv_a_proj_with_mqa.weight": (cfg.latent_dim, Hd),
        p + "self_attn.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        p + "self_attn.kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        p + "self_attn.o_proj.weight": (Hd, H * cfg.v_head_dim),
    }
    mtp = i >= cfg.num_hidden_layers
    if mtp or cfg.indexer_types[i] == "full":  # the MTP layer always has its own indexer
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        t.update({
            p + "self_attn.indexer.wq_b.weight": (Hi * Di, cfg.q_lora_rank),
            p + "self_attn.indexer.wk.weight": (Di, Hd),
            p + "self_attn.indexer.k_norm.weight": (Di,),
            p + "self_attn.indexer.k_norm.bias": (Di,),
            p + "self_attn.indexer.weights_proj.weight": (Hi, Hd),
        })
    if cfg.is_moe(i):
        I, Is = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        t[p + "mlp.gate.weight"] = (cfg.n_routed_experts, Hd)
        t[p + "mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        if cfg.n_shared_experts:
            t.update({p + "mlp.shared_experts.gate_proj.weight": (Is, Hd),
                      p + "mlp.shared_experts.up_proj.weight": (Is, Hd),
                      p + "mlp.shared_experts.down_proj.weight": (Hd, Is)})
        for e in range(cfg.n_routed_experts):
            q = f"{p}mlp.experts.{e}."
            t.update({q + "gate_proj.weight": (I, Hd), q + "up_proj.weight": (I, Hd), q + "down_proj.weight": (Hd, I)})
    else:
        I = cfg.intermediate_size
        t.update({p + "mlp.gate_proj.weight": (I, Hd), p + "mlp.up_proj.weight": (I, Hd),
                  p + "mlp.down_proj.weight": (Hd, I)})
    if mtp:
        t.update({p + "enorm.weight": (Hd,), p + "hnorm.weight": (Hd,), p + "eh_proj.weight": (Hd, 2 * Hd),
                  p + "shared_head.norm.weight": (Hd,)})
    return t


def expected_tensors(cfg: ModelConfig, *, include_mtp: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint (weights only; FP8 scales are derived by `fp8_scale_shape`)."""
    t = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
         "model.norm.weight": (cfg.hidden_size,),
         "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        t.update(layer_tensors(cfg, i))
    if include_mtp is None:
        include_mtp = cfg.num_nextn_predict_layers > 0
    if include_mtp:
        t.update(layer_tensors(cfg, cfg.num_hidden_layers))
    return t


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """`weight_scale_inv` shape of a block-quantized `[out, in]` weight: partial last blocks count."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def float32_tensor(name: str) -> bool:
    """Tensors kept in float32 whatever the model dtype (router bias; spec §1.1)."""
    return name.endswith("e_score_correction_bias")


# ---- THE sharding table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """How one tensor is laid out over the ranks of a parallel plan.

    kind: "replicated" | "column" (output rows split over TP: dim 0) | "row" (inputs split over
          TP: dim 1; an all-reduce follows) | "vocab" (vocabulary rows split over TP: dim 0) |
          "expert" (whole experts over EP ranks; TP-split when ep = 1)
    component: the planner's row this tensor counts in.
    """
    kind: str
    component: str

    @property
    def split(self) -> str:
        """The planner's divisor: "tp", "ep" or "rep"."""
        return {"replicated": "rep", "expert": "ep"}.get(self.kind, "tp")

    @property
    def dim(self) -> int | None:
        return {"column": 0, "vocab": 0, "row": 1}.get(self.kind)


ATTN, DENSE, EXPERTS, EMBED, NORMS, MTP = ("attention + indexer", "dense MLP + shared experts", "routed experts",
                                          "embeddings + lm_head", "norms + router", "MTP layer")
COMPONENTS = (EMBED, ATTN, DENSE, EXPERTS, NORMS, MTP)   # the planner's rows, in its order

# name pattern (re.fullmatch; L = a layer number) -> placement. First match wins; the layout is
# vLLM's and DeepSeek's reference (spec/distributed.md §1): q_a/kv_a/latent norms/indexer/router/
# eh_proj replicated; heads split in q_b, kv_b, o_proj; dense MLP and shared expert by width;
# experts by EP; embedding and lm_head by vocabulary.
SHARDING: tuple[tuple[str, Placement], ...] = (
    (r"model\.embed_tokens\.weight", Placement("vocab", EMBED)),
    (r"lm_head\.weight", Placement("vocab", EMBED)),
    (r"model\.norm\.weight", Placement("replicated", NORMS)),
    (r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight", Placement("replicated", NORMS)),
    (r"model\.layers\.\d+\.self_attn\.(q_a_layernorm|kv_a_layernorm)\.weight", Placement("replicated", NORMS)),
    (r"model\.layers\.\d+\.self_attn\.indexer\.k_norm\.(weight|bias)", Placement("replicated", NORMS)),
    (r"model\.layers\.\d+\.self_attn\.(q_a_proj|kv_a_proj_with_mqa)\.weight", Placement("replicated", ATTN)),
    (r"model\.layers\.\d+\.self_attn\.indexer\.(wq_b|wk|weights_proj)\.weight", Placement("replicated", ATTN)),
    (r"model\.layers\.\d+\.self_attn\.(q_b_proj|kv_b_proj)\.weight", Placement("column", ATTN)),
    (r"model\.layers\.\d+\.self_attn\.o_proj\.weight", Placement("row", ATTN)),
    (r"model\.layers\.\d+\.mlp\.gate\.(weight|e_score_correction_bias)", Placement("replicated", NORMS)),
    (r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight", Placement("expert", EXPERTS)),
    (r"model\.layers\.\d+\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight", Placement("column", DENSE)),
    (r"model\.layers\.\d+\.mlp\.(shared_experts\.)?down_proj\.weight", Placement("row", DENSE)),
    (r"model\.layers\.\d+\.(enorm|hnorm|shared_head\.norm)\.weight", Placement("replicated", NORMS)),
    (r"model\.layers\.\d+\.eh_proj\.weight", Placement("replicated", ATTN)),
)
_SHARDING_RE = tuple((re.compile(p), pl) for p, pl in SHARDING)


def placement(name: str, cfg: ModelConfig | None = None) -> Placement:
    """The placement of checkpoint tensor `name`; with `cfg`, tensors of the MTP layer count in
    the planner's "MTP layer" component (their placement follows the same rules)."""
    for rx, pl in _SHARDING_RE:
        if rx.fullmatch(name):
            if cfg is not None and name.startswith(f"model.layers.{cfg.num_hidden_layers}."):
                return Placement(pl.kind, MTP)
            return pl
    raise KeyError(f"no sharding rule for tensor {name!r}: add one to glm52_backends.weights.SHARDING")
