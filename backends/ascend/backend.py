"""The Ascend backend: the ops of the contract on torch_npu's fused ops, one file per op.

Every op talks to the device through `self.npu`, which is either the `torch_npu` module or the
CPU emulator of the same functions (`emulator.NpuEmulator`), so the layouts, lengths, block tables
and routing bookkeeping are the code that runs on an NPU and the code CI checks.

  indexer_topk.py  npu_lightning_indexer        TND query, PA_BSND key cache, sparse_mode=3
  sparse_mla.py    npu_sparse_flash_attention   attention_mode=2, the c / k_pe caches in place
  moe_route.py     npu_moe_gating_top_k         sigmoid, correction bias, renorm, routed scaling
  moe_experts.py   npu_moe_init_routing_v2 + npu_grouped_matmul + npu_swiglu + npu_grouped_matmul
                   + npu_moe_token_unpermute (float, or int8 for w8a8_dynamic experts)
  mtp_verify.py    batched torch ops (torch_npu has no verify op)
  supporting.py    rms_norm -> npu_rms_norm, rope -> npu_interleave_rope, mlp -> npu_swiglu; linear, layer_norm
  quantized.py     W8A8 (w8a8_dynamic, w8a8_static): npu_dynamic_quant / npu_quantize + npu_quant_matmul for
                   linear and mlp, the int8 MoE path, and the once-per-weight preparation (`prepare_weight`)
  common.py        documented limits, declines, dense weights, the paged ops' step data (`step_for`)
  versions.py      the installed CANN and the torch_npu documentation line it belongs to

Each op first checks the documented limits of its torch_npu op (Atlas A2/A3 columns of the docs of
the installed CANN's release line, `self.installed`); inputs outside them raise `OpUnsupported`,
with the reason (and the version, where the limit is the version's), and the registry runs the
reference with one warning.
Shapes and semantics of the ops: glm52_backends/ops/<op>.py.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from glm52_backends.ops import Capabilities

from . import indexer_topk as _indexer_topk
from . import moe_experts as _moe_experts
from . import moe_route as _moe_route
from . import mtp_verify as _mtp_verify
from . import sparse_mla as _sparse_mla
from . import supporting as _supporting
from .common import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, HALF, line_limits
from .mc2 import Mc2Collectives
from .quantized import INT8_FORMATS, WEIGHT_FORMATS, nz_codes, prepare, trunc19
from .versions import installed


class AscendBackend:
    """The ops on `npu` (torch_npu or the emulator). `device`: where tensors live."""

    def __init__(self, npu, *, name: str, device: torch.device, priority: int, default_dtype: torch.dtype):
        self.npu = npu
        self.name = name
        self.device = device
        self.priority = priority
        self.emulated = bool(getattr(npu, "emulated", False))
        # the ops documented for bfloat16/float16 only (the two attention ops, npu_interleave_rope);
        # the emulator may also accept float32
        self.half_op_dtypes = tuple(getattr(npu, "half_op_dtypes", HALF))
        self.installed = installed(npu)                 # CANN version and torch_npu doc line
        self.line_limits = line_limits(self.installed)  # None: no fused attention ops in that line
        # int8 weights are prepared once at load (prepare_weight; the result rides on each Weight): this
        # counts the preparations made per call instead, for weights that skipped it (quantized.py)
        self.preparations = 0
        self.nz = os.environ.get("GLM52_ASCEND_NZ", "1").strip().lower() not in ("0", "false", "no", "off")
        self.capabilities = Capabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32), default_dtype=default_dtype,
            devices=(device.type,), weight_formats=WEIGHT_FORMATS, cache_formats=("dense", "c8_sfa", "c8_li"),
            max_topk=self.line_limits.max_topk if self.line_limits else 0, block_sizes=BLOCK_SIZES,
            default_block_size=DEFAULT_BLOCK_SIZE,
            sparse_mla_lse=False,     # npu_sparse_flash_attention gives no softmax statistics with PA_BSND
            extra={"half_op_dtypes": self.half_op_dtypes, "emulated": self.emulated, "cann": self.installed.describe(),
                   "limits": f"Atlas A2/A3 columns of the torch_npu op docs ({self.installed.describe()})"})

    def __repr__(self) -> str:
        return f"AscendBackend({self.name!r}, device={self.device}, npu={self.npu!r})"

    def prepare_weight(self, name: str, weight, *, dtype: torch.dtype):
        """Once per weight at load (registry.BoundBackend.prepare_weight): the int8 weights in the forms the
        kernels take (quantized.py, "Preparation"): bfloat16 expert scales in a bfloat16 model, int64
        deq_scale in a float16 one, the codes in FRACTAL_NZ; the result rides on the weight
        (`Weight.prepared`). Chosen over the recipe's int32 output + npu_dequant_swiglu_quant chain for the
        bfloat16 MoE because vllm-ascend, the engine GLM-5.2 users serve with, rounds the scales at load,
        and it keeps one int8 MoE path."""
        fmt = getattr(weight, "format", "dense")
        if fmt not in INT8_FORMATS:
            return weight
        w = weight
        if dtype == torch.bfloat16 and fmt == "w8a8_dynamic" and w.data.dim() == 3:
            rounded = w.scales.to(torch.bfloat16).to(w.scales.dtype)
            if not torch.equal(rounded, w.scales):
                w = dataclasses.replace(w, scales=rounded, prepared=None)
        if dtype == torch.float16 and fmt == "w8a8_static":
            deq = w.aux["deq_scale"]
            kept = trunc19(deq).to(deq.dtype)
            if not torch.equal(kept, deq):
                w = dataclasses.replace(w, aux={**w.aux, "deq_scale": kept}, prepared=None)
        if self.nz:
            w = dataclasses.replace(w, data=nz_codes(self.npu, w.data), prepared=None)
        return dataclasses.replace(w, prepared=prepare(self.npu, w, dtype))

    def setup_parallel(self, comms, layout):
        """Over several ranks with ep > 1: expert dispatch and combine through MC2 (mc2.py), on a process
        group of its own over every rank (MC2's communication domain admits no other op), on Atlas A3 and on
        the emulator (which follows A3's page); None otherwise (the generic all-to-all dispatch)."""
        if layout.plan.ep <= 1 or comms.world.world_size < 2:
            return None
        if not self.emulated and "910_93" not in str(torch.npu.get_device_name()):
            return None       # MC2 is emulated and wired for Atlas A3 (Ascend910_93xx); A2's limits differ
        import torch.distributed as dist
        group = dist.new_group(list(range(comms.world.world_size)), timeout=getattr(comms, "timeout", None))
        return Mc2Collectives(self.npu, group, comms.world)

    # hot ops
    indexer_topk = _indexer_topk.indexer_topk
    sparse_mla = _sparse_mla.sparse_mla
    moe_route = _moe_route.moe_route
    moe_experts = _moe_experts.moe_experts
    mtp_verify = _mtp_verify.mtp_verify
    # supporting ops
    rms_norm = _supporting.rms_norm
    rope = _supporting.rope
    linear = _supporting.linear
    layer_norm = _supporting.layer_norm
    mlp = _supporting.mlp
