"""Memory planner: does a deployment fit, and how much context x batch does it leave? (DESIGN §6)

    glm52 plan ascend-910c            # one config: table, exit status 1 when it does not fit
    glm52 plan --all                  # one line per bundled config
    glm52 plan --all --markdown benchmarks/results/plan-all.md
    plan(load_deployment("nvidia-h200")).max_context_at_batch

Everything is per device and in bytes; tables print GiB (2**30). Parameter counts come from the
checkpoint inventory (`weights.expected_tensors`), so the planner counts exactly the tensors the
loader loads (GLM-5.2: 753.3B parameters with the MTP layer, 743.4B without).

Assumptions (each one is also in `Plan.assumptions`):

Sharding, following vLLM's DeepSeek-V2/V3.2 model code (`vllm/model_executor/models/deepseek_v2.py`):
  * split by TP: embed_tokens and lm_head (vocab-parallel), q_b_proj, kv_b_proj, o_proj, the dense
    MLPs of layers 0-2, the shared experts;
  * replicated on every device: q_a_proj and kv_a_proj_with_mqa (`ReplicatedLinear`), the whole
    DSA indexer ("no tensor parallel, just replicated"), all norms, the router and its bias, the
    MTP layer's enorm/hnorm/eh_proj;
  * routed experts split over `ep` ranks when expert parallelism is on (ep > 1), else every
    expert is split over the TP group (vLLM without --enable-expert-parallel).
Bytes per weight by `dtypes.weights`: each tensor takes the format `loader.recipe_format` gives it
(the same recipe the loader quantizes with and make-tiny writes) and its bytes are
`quant.layout_nbytes` of that format (the tensors the loader allocates), so a loaded model holds
exactly what is planned (tests/test_quant_loading.py):
  * fp8:  the linears GLM-5.2-FP8 quantizes (`weights.is_fp8_weight`): 1 B + one F32 scale per
          128x128 block (`weight_scale_inv`); gate/up pairs whose rows are not whole blocks are
          concatenated with one scale row per weight row (`weights.cat_rows`);
  * w8a8: the GLM-5 msModelSlim mixed recipe: attention projections W8A8 static (int8 + F32 scale,
          offset, deq_scale, int32 quant_bias per output channel + input scale/offset), dense MLP and
          experts W8A8 dynamic (int8 + F32 scale and offset per channel); kv_b, indexer wk and
          weights_proj, router stay float;
  * w4a8: as w8a8 with the routed experts W4A8 dynamic (0.5 B + F32 scale, offset, scale_bias per channel);
  * bf16 / fp32: 2 B / 4 B everywhere.
  kv_b_proj is held dequantized at the model dtype (BF16) whatever its stored format (MLA absorption,
  model.py); the router weight is held in F32 (the model makes it F32 once), its bias F32. Per-channel
  scales of a row-split (input-split) linear are whole on every rank.
Caches, per token and layer (spec §4.3, §5): latent = kv_lora_rank + qk_rope_head_dim values on
every layer; index keys = index_head_dim values only on IndexShare "full" layers; the MTP layer
adds one of each when MTP drafting is on. Row bytes come from the cache formats' own code
(`cache_formats.bytes_per_token`): fp8 = FlashMLA's fp8_ds_mla latent (656 B) and 132-B index keys,
int8 = Ascend's c8_sfa latent (656 B) and c8_li keys (int8 + an f16 scale, 130 B). The latent
cache is replicated on every TP rank (MLA has one KV head) unless decode context parallelism
(`parallel.dcp`) stripes it over dcp ranks of the TP group. `max_batch` requests of
`max_context` tokens are held per DP replica.
Activations: see `activation_bytes_per_token`; the context workspace is vLLM's sparse-MLA/indexer
prefill gather buffer, 5 x max_context latent rows in BF16.
Host offload (`offload_gb` > 0, GLM52(offload=...)): the latent rows live in host memory, `offload_gb`
per device; with DCP each rank offloads its own 1/dcp of every request's rows and stages 1/dcp of each
selected block, so a device's host share holds context x batch x latent bytes / dcp and its staging
area (1 + draft tokens) x index_topk blocks / dcp per request. A plan fits when both the device and
the host share hold it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from . import cache_formats
from .config import ModelConfig
from .deploy import DeploymentConfig, load_deployment
from .loader import DEFAULT_FP8_BLOCK, recipe_format
from .quant import layout
from .weights import COMPONENTS, expected_tensors, float32_tensor, placement

GiB = 2 ** 30
# vLLM sizes the sparse-MLA prefill workspace as 5 * max_model_len rows of 576 BF16 values and fits
# the indexer's prefill gather buffer (40 * max_model_len * 132 B) inside it.
# source: vllm/v1/attention/backends/mla/indexer.py, get_max_prefill_buffer_size() comment
WORKSPACE_ROWS_PER_CONTEXT_TOKEN = 5
OFFLOAD_BLOCK = 64             # staging block size the planner assumes when the YAML names none (FlashMLA's)



# ---- weights -----------------------------------------------------------------------------------
WEIGHT_SCHEMES = {"fp32": None, "bf16": None, "fp8": "fp8", "w8a8": "w8a8", "w4a8": "w4a8"}   # -> quantization


def tensor_format(name: str, shape: tuple[int, ...], weights_dtype: str,
                  block: tuple[int, int] = DEFAULT_FP8_BLOCK) -> tuple[str, tuple[int, int]]:
    """(format, block) tensor `name` is held in when the model runs `weights_dtype`."""
    if weights_dtype not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown weights dtype {weights_dtype!r}")
    if name.endswith("self_attn.kv_b_proj.weight"):
        return "dense", block                       # dequantized at build for MLA absorption (model.py)
    fmt = recipe_format(name, WEIGHT_SCHEMES[weights_dtype])
    if fmt == "fp8_block" and name.endswith(("gate_proj.weight", "up_proj.weight")) and shape[0] % block[0]:
        block = (1, block[1])                       # weights.cat_rows keeps exact scales with 1-row blocks
    return fmt, block


def _dense_bytes(name: str, weights_dtype: str) -> int:
    if weights_dtype == "fp32" or float32_tensor(name) or name.endswith(".mlp.gate.weight"):
        return 4                                    # the router weight is held in f32 (model.py)
    return 2


def tensor_bytes(name: str, shape: tuple[int, ...], weights_dtype: str,
                 block: tuple[int, int] = DEFAULT_FP8_BLOCK) -> float:
    """Bytes one checkpoint tensor takes in a model loaded with `weights_dtype` (scales included)."""
    return float(sum(_tensor_parts(name, shape, weights_dtype, block, "replicated")))


def _tensor_parts(name: str, shape: tuple[int, ...], weights_dtype: str, block: tuple[int, int],
                  kind: str) -> tuple[int, int]:
    """(bytes split over the ranks, bytes every rank holds whole) for a tensor placed as `kind`
    ("column"/"vocab" split the output rows, "row" the inputs, "replicated" nothing)."""
    fmt, blk = tensor_format(name, shape, weights_dtype, block)
    if fmt == "dense":
        b = math.prod(shape) * _dense_bytes(name, weights_dtype)
        return (0, b) if kind == "replicated" else (b, 0)
    split = whole = 0
    for part, (pshape, dt) in layout(fmt, shape, blk).items():
        b = math.prod(pshape) * dt.itemsize
        per_row = part not in ("input_scale", "input_offset")            # follows the output rows
        follows = {"column": per_row, "vocab": per_row, "row": part == "data" or fmt == "fp8_block"}.get(kind, False)
        split, whole = (split + b, whole) if follows else (split, whole + b)
    return split, whole


_WEIGHT_TABLES: dict[tuple, tuple[dict, dict]] = {}


def _weight_table(cfg: ModelConfig, weights_dtype: str, include_mtp: bool, ep: bool = True, prepared=None,
                  act_dtype: torch.dtype = torch.bfloat16) -> tuple[dict[tuple[str, str], float], dict[str, int]]:
    """(component, split) -> bytes over the whole model, and component -> parameter count.
    `ep`: routed experts whole over EP ranks (else TP-split like a dense MLP). `prepared`: the backend's
    declaration of what its load-time preparation allocates (registry.declared_preparation)."""
    key = (repr(cfg), weights_dtype, include_mtp, ep, prepared, act_dtype)   # ModelConfig's repr is complete
    if key not in _WEIGHT_TABLES:
        _WEIGHT_TABLES[key] = _count_weights(cfg, weights_dtype, include_mtp, ep, prepared, act_dtype)
    return _WEIGHT_TABLES[key]


def _prepared_parts(prepared, fmt: str, shape: tuple[int, ...], act_dtype: torch.dtype, kind: str,
                    expert: bool) -> tuple[int, int]:
    """(bytes split over the ranks, bytes every rank holds whole) of what a backend's load-time preparation
    allocates for one checkpoint tensor, besides the format's tensors. Per-output-channel parts follow the
    output rows as the scales do; single values are whole. An expert's share is its row of the stack's."""
    split = whole = 0
    for pshape, dt in prepared(fmt, ((1,) + tuple(shape)) if expert else tuple(shape), act_dtype).values():
        b = math.prod(pshape) * dt.itemsize
        if math.prod(pshape) > 1 and kind in ("column", "vocab"):
            split += b
        else:
            whole += b
    return split, whole


def _count_weights(cfg: ModelConfig, weights_dtype: str, include_mtp: bool, ep: bool = True, prepared=None,
                   act_dtype: torch.dtype = torch.bfloat16) -> tuple[dict[tuple[str, str], float], dict[str, int]]:
    by: dict[tuple[str, str], float] = {}
    params: dict[str, int] = {c: 0 for c in COMPONENTS}
    block = cfg.fp8_block or DEFAULT_FP8_BLOCK
    for name, shape in expected_tensors(cfg, include_mtp=include_mtp).items():
        where = placement(name, cfg)                 # THE sharding table (weights.SHARDING)
        comp = where.component
        kind = where.kind
        if kind == "expert":                         # EP: whole experts; else TP-split as a dense MLP
            kind = "replicated" if ep else ("row" if name.endswith("down_proj.weight") else "column")
        split, whole = _tensor_parts(name, shape, weights_dtype, block, kind)
        fmt = tensor_format(name, shape, weights_dtype, block)[0]
        if prepared is not None and fmt != "dense":
            ps, pw = _prepared_parts(prepared, fmt, shape, act_dtype, kind, where.kind == "expert")
            split, whole = split + ps, whole + pw
        if where.kind == "expert" and ep:
            split, whole = split + whole, 0
        for s, b in ((where.split, split), ("rep", whole)):
            if b:
                by[(comp, s)] = by.get((comp, s), 0.0) + b
        params[comp] += math.prod(shape)
    return by, params


# ---- caches and activations -------------------------------------------------------------------------
def _cache_bytes(cfg: ModelConfig, kind: str, dtype: str) -> int:
    """One token's row in one layer's cache of kind "latent" | "index", for a YAML cache dtype, from
    the same format code that lays the cache out (cache_formats: what a PagedCache holds)."""
    fmt, dense = cache_formats.format_for(kind, dtype)
    return cache_formats.bytes_per_token(fmt, cfg, kind=kind, dtype=dense or torch.bfloat16)


def latent_bytes_per_token_layer(cfg: ModelConfig, dtype: str) -> int:
    """One token's latent cache row in one layer: c (kv_lora_rank) || k_pe (qk_rope_head_dim);
    GLM-5.2: bf16 1152, fp8 (FlashMLA fp8_ds_mla) 656, int8 (Ascend c8_sfa) 656."""
    return _cache_bytes(cfg, cache_formats.LATENT, dtype)


def index_bytes_per_token_layer(cfg: ModelConfig, dtype: str) -> int:
    """One token's index key in one full layer; GLM-5.2: bf16 256, fp8 132, int8 (Ascend c8_li) 130."""
    return _cache_bytes(cfg, cache_formats.INDEX, dtype)


def activation_bytes_per_token(cfg: ModelConfig, d: DeploymentConfig) -> float:
    """Peak live activations per step token on one device, BF16, one layer at a time (estimate).

    hidden   4 Hd                      residual, normed input, attention output, FFN output
    attn     q_lora + (C + Dr)         q_a / kv_a outputs (replicated projections)
             + H/tp (dq + (C+Dr) + C + dv)   per-head q, absorbed q, latent output, value output
             + Hi Di + 2 topk          indexer queries; int32 top-k ids (2 BF16 slots each)
    ffn      max(dense 3 I/tp,  MoE: router 2 E (F32) + shared 3 Is/tp + routed copies)
             routed copies with EP: K/ep (2 Hd + 3 I) (balanced routing: dispatched input,
             gate|up, silu product, output); without EP: K 3 I/tp + Hd
    The MTP layer runs after the main model on the same step, so it adds no peak of its own.
    """
    Hd, H, tp = cfg.hidden_size, cfg.num_attention_heads, d.tp
    C, Dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    hidden = 4 * Hd
    attn = (cfg.q_lora_rank + C + Dr + (H // tp) * (cfg.qk_head_dim + (C + Dr) + C + cfg.v_head_dim)
            + cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_topk)
    dense = 3 * cfg.intermediate_size / tp
    K, I, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
    routed = K / d.ep * (2 * Hd + 3 * I) if d.ep > 1 else K * 3 * I / tp + Hd
    moe = 2 * E + 3 * I * cfg.n_shared_experts / tp + routed
    return 2.0 * (hidden + attn + max(dense, moe))


def dcp_step_bytes(cfg: ModelConfig, d: DeploymentConfig, tokens: int, context: int, dcp: int) -> float:
    """Decode context parallelism's step buffers on one device (0 at dcp 1):

    block table  tokens x ceil(context / block) x 4 B: one int32 row per query token (step.DcpStep)
    one merge    the larger of the top-k merge and the attention merge, each over the query tokens
                 model.DCP_MERGE_BYTES holds at its bytes per token (model._dcp_chunks, the same
                 functions): candidates dcp x topk x 64 B; attention, the lse form: the group's heads x
                 ((C + Dr) x 2 + C x 8) B, or for a backend without a native log-sum-exp (the gather
                 form) topk x 2 latent rows
    """
    if dcp <= 1:
        return 0.0
    from .model import (dcp_attention_bytes_per_token, dcp_gather_bytes_per_token, dcp_merge_tokens,
                        dcp_topk_bytes_per_token)
    from .registry import declared_sparse_mla_lse
    C, Dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if declared_sparse_mla_lse(d.backend):
        attention = dcp_attention_bytes_per_token(cfg.num_attention_heads // d.tp * dcp, C, Dr)
    else:
        attention = dcp_gather_bytes_per_token(cfg.index_topk, latent_bytes_per_token_layer(cfg, d.kv_cache_dtype))
    merge = max(min(tokens, dcp_merge_tokens(per)) * per
                for per in (dcp_topk_bytes_per_token(dcp, cfg.index_topk), attention))
    return dcp_block_table_bytes(tokens, context, d.cache_block_size or 64) + merge


def dcp_block_table_bytes(tokens: int, context: int, block: int) -> int:
    """The per-token block table of a DCP step (step.DcpStep): int32 rows as wide as the longest request's
    blocks, at most ceil(context / block)."""
    return tokens * math.ceil(context / block) * 4


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class PlanRow:
    component: str
    bytes: float  # per device
    how: str


@dataclass
class Plan:
    deployment: DeploymentConfig
    model_name: str
    rows: list[PlanRow]
    usable_bytes: float
    need_bytes: float
    fits: bool
    total_params: int
    params_without_mtp: int
    full_layers: int
    num_layers: int
    latent_bytes_per_token: int      # whole model (all layers + MTP), before DCP striping
    index_bytes_per_token: int
    kv_bytes_per_token_device: float  # latent + index per token on one device (after DCP)
    max_context_at_batch: int        # largest context for `max_batch` requests (capped at the model's)
    max_batch_at_context: int        # most requests of `max_context` tokens
    max_context_one_request: int = 0             # largest context at batch 1, with the YAML's DCP
    max_context_one_request_without_dcp: int = 0  # the same with the latent cache replicated (DCP1)
    max_context_one_request_without_offload: int = 0  # the same without host offload (offload_gb: 0)
    host_bytes_per_device: float = 0.0   # host offload: max_batch x max_context latent rows / dcp (0: no offload)
    host_capacity_bytes: float = 0.0     # offload_gb per device, in bytes
    assumptions: list[str] = field(default_factory=list)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.latent_bytes_per_token + self.index_bytes_per_token

    @property
    def spare_bytes(self) -> float:
        return self.usable_bytes - self.need_bytes

    def to_dict(self) -> dict[str, Any]:
        d = self.deployment
        return {
            "deployment": d.name, "vendor": d.vendor, "chip": d.chip, "model": self.model_name,
            "devices": d.devices, "memory_per_device_gib": d.memory_per_device_gb,
            "layout": {"tp": d.tp, "ep": d.ep, "dp": d.dp, "dcp": d.dcp, "expert_shards": d.expert_shards},
            "dtypes": {"weights": d.weights_dtype, "kv_cache": d.kv_cache_dtype, "index_cache": d.index_cache_dtype},
            "mtp_draft_tokens": d.mtp_draft_tokens, "max_context": d.max_context, "max_batch": d.max_batch,
            "per_device_bytes": {r.component: r.bytes for r in self.rows},
            "usable_bytes": self.usable_bytes, "need_bytes": self.need_bytes, "fits": self.fits,
            "total_params": self.total_params, "params_without_mtp": self.params_without_mtp,
            "latent_bytes_per_token": self.latent_bytes_per_token,
            "index_bytes_per_token": self.index_bytes_per_token,
            "kv_bytes_per_token_device": self.kv_bytes_per_token_device,
            "max_context_at_batch": self.max_context_at_batch,
            "max_context_one_request": self.max_context_one_request,
            "max_context_one_request_without_dcp": self.max_context_one_request_without_dcp,
            "max_context_one_request_without_offload": self.max_context_one_request_without_offload,
            "max_batch_at_context": self.max_batch_at_context,
            "host_bytes_per_device": self.host_bytes_per_device, "host_capacity_bytes": self.host_capacity_bytes,
            "assumptions": list(self.assumptions),
        }

    def table(self) -> str:
        d = self.deployment
        g = lambda b: f"{b / GiB:9.2f}"  # noqa: E731
        ep = f"EP{d.ep}" if d.ep > 1 else f"experts TP-split over {d.tp}"
        lines = [
            f"{self.model_name} on {d.vendor} {d.chip}  ({d.name})",
            f"  devices   {d.devices} x {d.memory_per_device_gb:g} GiB ({d.nodes} node(s) x {d.devices_per_node}); "
            f"usable {d.memory_per_device_gb * d.memory_utilization:.1f} GiB each "
            f"(memory_utilization {d.memory_utilization:g})",
            f"  layout    TP{d.tp} x DP{d.dp}, {ep}, DCP{d.dcp}; collective {d.collective}; "
            f"backend {d.backend} on {d.device_type}",
            f"  dtypes    weights {d.weights_dtype}, latent cache {d.kv_cache_dtype}, index cache "
            f"{d.index_cache_dtype}; MTP draft tokens {d.mtp_draft_tokens}",
            f"  model     {_count(self.total_params)} parameters loaded "
            f"({_count(self.params_without_mtp)} without MTP); IndexShare full layers "
            f"{self.full_layers}/{self.num_layers}",
            f"  request   {d.max_batch} x {d.max_context:,} tokens per DP replica; "
            f"{d.max_batched_tokens:,} tokens per step",
            "",
            f"  {'per device':<30}{'GiB':>9}   how",
        ]
        for r in self.rows:
            lines.append(f"  {r.component:<30}{g(r.bytes)}   {r.how}")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        host = (f"; host {self.host_bytes_per_device / GiB:.2f} of {self.host_capacity_bytes / GiB:.2f} GiB "
                f"per device" if self.host_capacity_bytes else "")
        lines += [
            f"  {'total':<30}{g(self.need_bytes)}   of {self.usable_bytes / GiB:.2f} usable{host} -> {verdict} "
            f"({self.spare_bytes / GiB:+.2f} GiB)",
            "",
            f"  cache per token (whole model): latent {self.latent_bytes_per_token:,} B + index "
            f"{self.index_bytes_per_token:,} B = {self.kv_bytes_per_token:,} B; per device "
            f"{self.kv_bytes_per_token_device:,.0f} B (DCP{d.dcp})",
            f"  largest context at batch {d.max_batch}: {self.max_context_at_batch:,} tokens; "
            f"largest batch at context {d.max_context:,}: {self.max_batch_at_context}",
            f"  largest context of one request: {self.max_context_one_request:,} tokens with DCP{d.dcp}, "
            f"{self.max_context_one_request_without_dcp:,} with the latent cache on every TP rank (DCP1)"
            + (f", {self.max_context_one_request_without_offload:,} without host offload" if d.offload_gb else ""),
        ]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n:,}"


def plan(deploy_cfg: DeploymentConfig | str, model_cfg: ModelConfig | None = None) -> Plan:
    """Per-device memory of `deploy_cfg` (a `DeploymentConfig`, a path or a bundled name). Weights include
    what the deployment's backend allocates at load besides them, where it declares that
    (registry.declared_preparation: e.g. Ascend's bfloat16 expert scales), with bfloat16 activations
    (float32 for fp32 weights)."""
    from .registry import declared_preparation
    d = load_deployment(deploy_cfg)
    cfg = model_cfg or d.model_config()
    mtp = d.mtp_draft_tokens > 0 and cfg.num_nextn_predict_layers > 0
    wd = d.weights_dtype
    prepared = declared_preparation(d.backend)
    by, params = _weight_table(cfg, wd, mtp, ep=d.ep > 1, prepared=prepared,
                               act_dtype=torch.float32 if wd == "fp32" else torch.bfloat16)
    divisor = {"tp": d.tp, "ep": d.expert_shards, "rep": 1}

    def per_device(comp: str) -> float:
        return sum(b / divisor[s] for (c, s), b in by.items() if c == comp)

    quant = {"fp8": "FP8 + 128x128 block scales", "w8a8": "int8 static/dynamic + per-channel scales",
             "w4a8": "int8 static/dynamic + per-channel scales", "bf16": "bf16", "fp32": "fp32"}[wd]
    expert_fmt = "int4 (two per byte) + per-channel scales" if wd == "w4a8" else \
        "int8 dynamic + per-channel scales" if wd == "w8a8" else quant
    how = {
        "embeddings + lm_head": f"{'fp32' if wd == 'fp32' else 'bf16'}, vocab split by TP{d.tp}",
        "attention + indexer": f"{quant}, kv_b dequantized; q_b/kv_b/o split by TP{d.tp}, q_a/kv_a/indexer "
                               f"replicated",
        "dense MLP + shared experts": f"{quant}, split by TP{d.tp}",
        "routed experts": f"{expert_fmt}, split over {d.expert_shards} ranks "
                          f"({'EP' if d.ep > 1 else 'TP'})",
        "norms + router": f"{'fp32' if wd == 'fp32' else 'bf16; router weight and bias f32'}, replicated",
        "MTP layer": f"layer {cfg.num_hidden_layers} by the same rules" if mtp else "not loaded (mtp_draft_tokens = 0)",
    }
    if prepared is not None and wd in ("fp8", "w8a8", "w4a8"):
        for c in ("attention + indexer", "dense MLP + shared experts", "routed experts"):
            how[c] += f"; + what {d.backend} prepares at load"
    rows = [PlanRow(c, per_device(c), how[c]) for c in COMPONENTS]
    weights = sum(r.bytes for r in rows)

    # caches
    n_layers = cfg.num_hidden_layers + (1 if mtp else 0)
    n_full = len(cfg.full_layers) + (1 if mtp else 0)
    lat = latent_bytes_per_token_layer(cfg, d.kv_cache_dtype) * n_layers
    idx = index_bytes_per_token_layer(cfg, d.index_cache_dtype) * n_full
    kv_dev = (lat + idx) / d.dcp
    ws_per_ctx = WORKSPACE_ROWS_PER_CONTEXT_TOKEN * cfg.latent_dim * 2
    act_tok = activation_bytes_per_token(cfg, d)
    reserve = d.runtime_reserve_gb * GiB
    usable = d.memory_per_device_gb * GiB * d.memory_utilization
    k = d.mtp_draft_tokens if mtp else 0

    def logits_bytes(b: int) -> float:  # F32 logits + probabilities over the full vocabulary
        return b * (1 + k) * cfg.vocab_size * 4 * 2

    def step_tokens(c: int, b: int) -> int:
        return max(min(d.max_batched_tokens, c * b), b * (1 + k))

    # host offload (GLM52(offload=...)): the latent rows of the whole context on the host, a staging area on
    # the device sized for the worst decode step, every selected position in its own block:
    # (1 + draft tokens) x index_topk blocks per request. With DCP each rank offloads its own 1/dcp of every
    # request's rows (to its own host share, offload_gb per device) and stages 1/dcp of each selected block.
    block = d.cache_block_size or OFFLOAD_BLOCK
    host = d.offload_gb * GiB

    def latent_tokens(c: int, offload: bool) -> int:
        return min(c, (1 + k) * cfg.index_topk * block) if offload else c

    def parts(c: int, b: int, dcp: int = d.dcp, offload: bool = host > 0) -> dict[str, float]:
        return {"latent": latent_tokens(c, offload) * b * lat / dcp, "index": c * b * idx / dcp,
                "act": step_tokens(c, b) * act_tok + logits_bytes(b) + dcp_step_bytes(cfg, d, step_tokens(c, b), c, dcp),
                "ws": c * ws_per_ctx}

    def need(c: int, b: int, dcp: int = d.dcp, offload: bool = host > 0) -> float:
        return weights + reserve + sum(parts(c, b, dcp, offload).values())

    def fits(c: int, b: int, dcp: int = d.dcp, offload: bool = host > 0) -> bool:
        return need(c, b, dcp, offload) <= usable and (not offload or c * b * lat / dcp <= host)

    p = parts(d.max_context, d.max_batch)
    rows += [
        PlanRow("latent cache", p["latent"],
                f"{lat:,} B/token ({n_layers} layers x {latent_bytes_per_token_layer(cfg, d.kv_cache_dtype)} B "
                f"{d.kv_cache_dtype}) / DCP{d.dcp}" + (
                    f"; offload: {latent_tokens(d.max_context, True):,} tokens staged per request "
                    f"((1 + {k}) x top-{cfg.index_topk} blocks of {block}), the context's "
                    f"{d.max_context * d.max_batch * lat / GiB:.1f} GiB on the host"
                    + (f", {d.max_context * d.max_batch * lat / d.dcp / GiB:.1f} GiB (1/DCP{d.dcp}) per device"
                       if d.dcp > 1 else " per device")
                    + f" (offload_gb {d.offload_gb:g} per device)"
                    if host > 0 else "")),
        PlanRow("index-key cache", p["index"],
                f"{idx:,} B/token ({n_full} full layers x {index_bytes_per_token_layer(cfg, d.index_cache_dtype)} B "
                f"{d.index_cache_dtype}) / DCP{d.dcp}"),
        PlanRow("activations", p["act"],
                f"{step_tokens(d.max_context, d.max_batch):,} step tokens x {act_tok / 1024:.1f} KiB + logits"
                + (f" + DCP step buffers "
                   f"{dcp_step_bytes(cfg, d, step_tokens(d.max_context, d.max_batch), d.max_context, d.dcp) / GiB:.2f}"
                   f" GiB (per-token block table, one merge)" if d.dcp > 1 else "")),
        PlanRow("context workspace", p["ws"], f"{WORKSPACE_ROWS_PER_CONTEXT_TOKEN} x context latent rows, bf16 (vLLM)"),
        PlanRow("runtime reserve", reserve, "runtime context + collective buffers (runtime_reserve_gb)"),
    ]
    total = need(d.max_context, d.max_batch)

    max_pos = cfg.max_position_embeddings
    max_ctx = _largest(lambda c: fits(c, d.max_batch), max_pos)
    max_b = _largest(lambda b: fits(d.max_context, b), 1 << 24)
    # one request: the longest context as the YAML says, with the latent cache replicated (DCP1), and
    # without host offload
    ctx1 = _largest(lambda c: fits(c, 1), max_pos)
    ctx1_no_dcp = _largest(lambda c: fits(c, 1, 1), max_pos)
    ctx1_no_offload = _largest(lambda c: fits(c, 1, offload=False), max_pos)

    n_mtp = sum(params.values())
    without = n_mtp - params["MTP layer"]
    assumptions = [
        "vLLM-style sharding: embeddings/lm_head, q_b/kv_b/o_proj, dense MLP, shared experts split by TP; "
        "q_a/kv_a, indexer, norms, router replicated; routed experts over ep ranks (TP-split when ep = 1)",
        f"weights {wd}: each tensor in the format loader.recipe_format gives it, bytes from quant.layout_nbytes; "
        "kv_b held dequantized (bf16), router weight f32; the rest bf16",
        "latent cache replicated on each TP rank unless striped by DCP; index keys only on IndexShare full layers",
        "max_batch requests of max_context tokens per DP replica",
        "activations: one layer's live BF16 tensors for max_batched_tokens step tokens (estimate); "
        "context workspace: vLLM's 5 x max_model_len latent-row prefill buffer",
        f"runtime reserve {d.runtime_reserve_gb:g} GiB per device (estimate, from the YAML)",
    ]
    if host > 0:
        assumptions.append(
            f"host offload: each device's host share (offload_gb {d.offload_gb:g}) holds its 1/dcp of the "
            f"max_batch x max_context latent rows; the device stages 1/dcp of (1 + draft tokens) x index_topk "
            f"blocks of {block} per request")
    return Plan(deployment=d, model_name=_model_name(d), rows=rows, usable_bytes=usable, need_bytes=total,
                fits=fits(d.max_context, d.max_batch), total_params=n_mtp if mtp else without,
                params_without_mtp=without, full_layers=len(cfg.full_layers), num_layers=cfg.num_hidden_layers,
                latent_bytes_per_token=lat, index_bytes_per_token=idx, kv_bytes_per_token_device=kv_dev,
                max_context_at_batch=max_ctx, max_batch_at_context=max_b, max_context_one_request=ctx1,
                max_context_one_request_without_dcp=ctx1_no_dcp,
                max_context_one_request_without_offload=ctx1_no_offload,
                host_bytes_per_device=d.max_context * d.max_batch * lat / d.dcp if host > 0 else 0.0,
                host_capacity_bytes=host, assumptions=assumptions)


def _model_name(d: DeploymentConfig) -> str:
    return {"glm-5.2": "GLM-5.2", "tiny": "tiny GLM-5.x"}.get(d.model, d.model)


def _largest(ok, hi: int) -> int:
    """Largest n in [0, hi] with ok(n) (ok monotone decreasing); 0 when even ok(1) fails."""
    if not ok(1):
        return 0
    lo = 1
    if ok(hi):
        return hi
    while hi - lo > 1:  # invariant: ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# ---- summaries and the CLI -----------------------------------------------------------------------------
def all_plans(names: list[str] | None = None) -> list[Plan]:
    from glm52_backends.configs import bundled_configs
    return [plan(str(p)) for n, p in bundled_configs().items() if names is None or n in names]


def all_plans_table(plans: list[Plan] | None = None) -> str:
    """One line per bundled config: layout, dtypes, per-device need vs usable, largest context."""
    plans = all_plans() if plans is None else plans
    head = (f"{'config':<20}{'devices':>12}  {'layout':<20}{'weights':<8}{'kv':<6}"
            f"{'need GiB':>9}{'usable':>8}  {'fits':<5}{'context x batch':>18}{'max ctx @batch':>16}"
            f"{'1 request':>12}{'1 req, DCP1':>13}")
    lines = [head, "-" * len(head)]
    for p in plans:
        d = p.deployment
        layout = f"TP{d.tp} DP{d.dp} EP{d.ep}" + (f" DCP{d.dcp}" if d.dcp > 1 else "")
        lines.append(
            f"{d.name:<20}{f'{d.devices}x{d.memory_per_device_gb:g}G':>12}  {layout:<20}{d.weights_dtype:<8}"
            f"{d.kv_cache_dtype:<6}{p.need_bytes / GiB:>9.1f}{p.usable_bytes / GiB:>8.1f}  "
            f"{'yes' if p.fits else 'NO':<5}{f'{d.max_context:,} x {d.max_batch}':>18}"
            f"{f'{p.max_context_at_batch:,}':>16}{f'{p.max_context_one_request:,}':>12}"
            f"{f'{p.max_context_one_request_without_dcp:,}':>13}")
    return "\n".join(lines)


def plans_markdown(plans: list[Plan]) -> str:
    """A markdown summary table (one row per plan) followed by each plan's full per-device table."""
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    out = ["| config | chip | devices | layout | weights / cache | weights GiB | latent + index GiB | "
           "act + workspace GiB | reserve GiB | need / usable GiB | fits | context x batch | "
           "max context @ batch | max batch @ context | max context, 1 request | same, DCP1 |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in plans:
        d, by = p.deployment, {r.component: r.bytes for r in p.rows}
        weights = sum(by[c] for c in COMPONENTS)
        layout = f"TP{d.tp} DP{d.dp} EP{d.ep}" + (f" DCP{d.dcp}" if d.dcp > 1 else "")
        out.append(
            f"| {d.name} | {d.vendor} {d.chip} | {d.nodes} x {d.devices_per_node} x {d.memory_per_device_gb:g} GiB "
            f"| {layout} | {d.weights_dtype} / {d.kv_cache_dtype} | {g(weights)} "
            f"| {g(by['latent cache'] + by['index-key cache'])} | {g(by['activations'] + by['context workspace'])} "
            f"| {g(by['runtime reserve'])} | {g(p.need_bytes)} / {g(p.usable_bytes)} | {'yes' if p.fits else '**no**'} "
            f"| {d.max_context:,} x {d.max_batch} | {p.max_context_at_batch:,} | {p.max_batch_at_context} "
            f"| {p.max_context_one_request:,} | {p.max_context_one_request_without_dcp:,} |")
    for p in plans:
        out += ["", f"### {p.deployment.name}", "", "```text", p.table(), "```"]
    return "\n".join(out) + "\n"


def plan_main(argv: list[str] | None = None) -> int:
    """`glm52 plan CONFIG`: print the per-device memory plan; exit 0 if it fits, else 1."""
    from .config import ConfigError

    ap = argparse.ArgumentParser(
        prog="glm52 plan",
        description="Per-device memory plan of a deployment config: weights (split by TP/EP), latent and "
                    "index-key caches, activations, runtime reserve; whether it fits and the largest "
                    "context x batch that does. Exit status 1 when it does not fit, 2 on a config error.",
        epilog="examples:\n  glm52 plan ascend-910c\n  glm52 plan nvidia-h100 --set dtypes.weights=bf16 --set nodes=1"
               " --set parallel.dp=1\n  glm52 plan --all",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="a deployment YAML path or a bundled name (see --list)")
    ap.add_argument("--all", action="store_true", help="one summary line for every bundled config")
    ap.add_argument("--list", action="store_true", help="list the bundled config names")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key (dotted for nested keys, YAML value), e.g. --set parallel.dp=2")
    ap.add_argument("--json", metavar="PATH", help="also write the plan(s) as JSON to PATH ('-' for stdout)")
    ap.add_argument("--markdown", metavar="PATH", help="also write a markdown report (summary table + each plan's "
                                                       "table) to PATH ('-' for stdout)")
    args = ap.parse_args(argv)

    from .deploy import bundled_names
    if args.list:
        print("\n".join(bundled_names()))
        return 0
    if not args.all and not args.config:
        ap.error("give a CONFIG (a YAML path or one of: " + ", ".join(bundled_names()) + ") or --all")
    try:
        if args.all:
            plans = all_plans()
            if args.set:
                plans = [plan(_apply_sets(p.deployment, args.set)) for p in plans]
            print(all_plans_table(plans))
        else:
            d = _apply_sets(load_deployment(args.config), args.set)
            plans = [plan(d)]
            print(plans[0].table())
    except ConfigError as e:
        print(f"glm52 plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        payload: Any = [p.to_dict() for p in plans] if args.all else plans[0].to_dict()
        _write(args.json, json.dumps(payload, indent=2) + "\n")
    if args.markdown:
        what = "--all" if args.all else args.config
        sets = "".join(f" --set {s}" for s in args.set)
        _write(args.markdown, f"# `glm52 plan {what}`\n\nReproduce: `glm52 plan {what}{sets} --markdown PATH`. "
                              "Bytes per device, GiB = 2**30; assumptions in `glm52_backends/planner.py`.\n\n"
               + plans_markdown(plans))
    return 0 if all(p.fits for p in plans) else 1


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    from .files import write_text
    write_text(path, text)                           # a temp file renamed over: never half-written


def _apply_sets(d: DeploymentConfig, sets: list[str]) -> DeploymentConfig:
    from .deploy import parse_override
    changes = dict(parse_override(s) for s in sets)
    return d.replace(**changes) if changes else d


if __name__ == "__main__":
    sys.exit(plan_main())
