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
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ModelConfig
from .quant import FORMATS, FP8_MAX, INT4_MAX, INT8_MAX, check_format, dequantize, pack_int4_rows

# ---- Weight ---------------------------------------------------------------------------------------
WEIGHT_FORMATS = tuple(FORMATS)   # "dense" + quant.QUANT_FORMATS (the arithmetic of each: quant.py)
FP8_BLOCK = (128, 128)


@dataclass
class Weight:
    """One linear weight `[out, in]` (or a stack of experts `[E, out, in]`) in a storage format.

    format "dense":  `data` is float32/bfloat16/float16; no scales.
    quantized:       `data` holds the stored codes, `scales` and `aux` the format's other tensors,
                     `recipe` how the op quantizes its activations (glm52_backends/quant.py has the
                     table); e.g. "fp8_block": `data` float8_e4m3fn, `scales` f32 `[ceil(out/b0),
                     ceil(in/b1)]` per matrix (`weight_scale_inv`: dense = data * scale of its block).
    """
    data: torch.Tensor
    scales: torch.Tensor | None = None
    format: str = "dense"
    block: tuple[int, int] = FP8_BLOCK
    aux: dict = field(default_factory=dict)
    recipe: str | None = None
    # What a backend's load-time preparation (`prepare_weight`, registry.py) attached: its kernels' forms
    # of this weight (e.g. a scale in the dtype an op takes). The reference never reads it; a new Weight
    # made from this one (slices, stacks, .to) starts without it. `held_tensors` counts what it allocated.
    prepared: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.format not in WEIGHT_FORMATS:
            raise ValueError(f"Weight: unknown format {self.format!r}; known: {', '.join(WEIGHT_FORMATS)}")
        f = FORMATS[self.format]
        if self.format == "dense":
            if self.scales is not None or self.aux:
                raise ValueError("Weight: a dense weight carries no scales")
            return
        if self.scales is None:
            raise ValueError(f"Weight: format {self.format} needs its scales")
        if self.data.dtype != f.code_dtype:
            raise ValueError(f"Weight: format {self.format} stores {str(f.code_dtype).removeprefix('torch.')} codes, "
                             f"got {str(self.data.dtype).removeprefix('torch.')}")
        missing = [k for k in f.aux if k not in self.aux]
        if missing:
            raise ValueError(f"Weight: format {self.format} needs aux tensor(s) {missing}")
        self.recipe = self.recipe or f.act_recipe
        check_format(self.format, self.recipe)

    @property
    def shape(self) -> torch.Size:
        """The logical shape `[..., out, in]` (int4 codes unpacked)."""
        if self.format == "w4a8_dynamic":
            return torch.Size((*self.data.shape[:-2], self.data.shape[-2] * 2, self.data.shape[-1]))
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def quantized(self) -> bool:
        return self.format != "dense"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this weight holds (data, scales, aux), as `quant.layout` names them."""
        out = {"data": self.data}
        if self.scales is not None:
            out["scales"] = self.scales
        out.update(self.aux)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight keeps alive: the format's (`tensors`) and those its backend preparation
        allocated besides them (`prepared.tensors()`, when it has that method)."""
        extra = getattr(self.prepared, "tensors", None)
        return list(self.tensors().values()) + (list(extra().values()) if callable(extra) else [])

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain tensor (`dtype`: default the data's for dense, float32 otherwise)."""
        if self.format == "dense":
            return self.data if dtype is None else self.data.to(dtype)
        return dequantize(self, dtype or torch.float32)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "Weight":
        """Moved (and, for dense weights, cast); quantized codes keep their dtype, scales stay f32."""
        if self.format == "dense":
            return Weight(self.data.to(device=device, dtype=dtype))
        return Weight(self.data.to(device), self.scales.to(device), self.format, self.block,
                      {k: v.to(device) for k, v in self.aux.items()}, self.recipe)


# ---- quantizing and the reshapes the model does (arithmetic: quant.py) -----------------------------

def quantize_weight(w: torch.Tensor, fmt: str, *, block: tuple[int, int] = (128, 128), recipe: str | None = None,
                    input_scale: float | None = None, input_offset: float = 0.0):
    """float `[N, K]` -> `Weight` of format `fmt` (symmetric per-channel for the int formats; the
    static format needs the calibrated `input_scale`, `input_offset` of its input)."""
    f = check_format(fmt, recipe)
    wf = w.float()
    if fmt == "dense":
        return Weight(w)
    if fmt == "fp8_block":
        N, K = wf.shape
        b0, b1 = block
        nb0, nb1 = -(-N // b0), -(-K // b1)
        padded = torch.zeros(nb0 * b0, nb1 * b1)
        padded[:N, :K] = wf
        amax = padded.view(nb0, b0, nb1, b1).abs().amax(dim=(1, 3))
        scale_inv = (amax / FP8_MAX).clamp(min=1e-12)
        s = scale_inv.repeat_interleave(b0, 0)[:N].repeat_interleave(b1, 1)[:, :K]
        q = (wf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return Weight(q, scale_inv.float(), fmt, block, recipe=recipe or f.act_recipe)
    qmax = INT4_MAX if fmt == "w4a8_dynamic" else INT8_MAX
    scale = (wf.abs().amax(dim=-1) / qmax).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-qmax - 1, qmax)
    offset = torch.zeros_like(scale)
    aux = {"offset": offset}
    if fmt == "w4a8_dynamic":
        aux["scale_bias"] = 8.0 * (q * scale[:, None]).sum(dim=-1)
        return Weight(pack_int4_rows(q.to(torch.int8)), scale, fmt, aux=aux, recipe=recipe or f.act_recipe)
    q = q.to(torch.int8)
    if fmt == "w8a8_static":
        if input_scale is None or not input_scale > 0:
            raise ValueError("w8a8_static needs the calibrated input_scale (> 0) of the layer's input")
        isc = torch.tensor(float(input_scale), dtype=torch.float32)
        ioff = torch.tensor(float(round(input_offset)), dtype=torch.float32)
        aux.update(input_scale=isc, input_offset=ioff, deq_scale=(isc * scale).float(),
                   quant_bias=(-ioff * q.to(torch.float64).sum(dim=-1)).round().to(torch.int32))
    return Weight(q, scale, fmt, aux=aux, recipe=recipe or f.act_recipe)


def cat_rows(ws: list):
    """Weights of one input concatenated along N (gate rows then up rows). Block-FP8 weights whose
    row count is not a multiple of the row block keep their exact scales by going to 1-row blocks."""
    fmts = {w.format for w in ws}
    if len(fmts) != 1:
        raise ValueError(f"cat_rows: weights of different formats {sorted(fmts)}")
    fmt = fmts.pop()
    if fmt == "dense":
        return Weight(torch.cat([w.data for w in ws], dim=-2))
    recipes = {w.recipe for w in ws}
    if len(recipes) != 1:
        raise ValueError(f"cat_rows: weights with different activation recipes {sorted(recipes)}")
    recipe = recipes.pop()
    if fmt == "fp8_block":
        blocks = {w.block for w in ws}
        if len(blocks) != 1:
            raise ValueError(f"cat_rows: different FP8 blocks {sorted(blocks)}")
        b0, b1 = blocks.pop()
        if all(w.data.shape[-2] % b0 == 0 for w in ws[:-1]):
            return Weight(torch.cat([w.data for w in ws], -2), torch.cat([w.scales for w in ws], -2), fmt, (b0, b1),
                          recipe=recipe)
        rows = [w.scales.repeat_interleave(b0, dim=-2)[..., :w.data.shape[-2], :] for w in ws]
        return Weight(torch.cat([w.data for w in ws], -2), torch.cat(rows, -2), fmt, (1, b1), recipe=recipe)
    if fmt == "w8a8_static":
        for k in ("input_scale", "input_offset"):
            if any(not torch.equal(w.aux[k], ws[0].aux[k]) for w in ws[1:]):
                raise ValueError(f"cat_rows: w8a8_static weights of one input must share {k}")
    aux = {k: (ws[0].aux[k] if k in ("input_scale", "input_offset") else torch.cat([w.aux[k] for w in ws], -1))
           for k in ws[0].aux}
    return Weight(torch.cat([w.data for w in ws], -2), torch.cat([w.scales for w in ws], -1), fmt, ws[0].block,
                  aux=aux, recipe=recipe)


def stack(ws: list):
    """Weights of the experts stacked along a new leading dim `[E, ...]`."""
    fmts = {(w.format, w.block, w.recipe) for w in ws}
    if len(fmts) != 1:
        raise ValueError(f"stack: experts in different formats/blocks/recipes {sorted(map(str, fmts))}")
    fmt = ws[0].format
    if fmt == "dense":
        return Weight(torch.stack([w.data for w in ws]))
    return Weight(torch.stack([w.data for w in ws]), torch.stack([w.scales for w in ws]), fmt, ws[0].block,
                  aux={k: torch.stack([w.aux[k] for w in ws]) for k in ws[0].aux}, recipe=ws[0].recipe)


def select(w, e: int):
    """Expert `e` of a stacked weight (a view)."""
    if w.format == "dense":
        return Weight(w.data[e])
    return Weight(w.data[e], w.scales[e], w.format, w.block, aux={k: v[e] for k, v in w.aux.items()}, recipe=w.recipe)


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
