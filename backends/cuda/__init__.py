"""cuda: the hot ops as Triton kernels (+ torch._grouped_mm where it wins), native on NVIDIA GPUs.

Files, one per op and named after it: indexer_topk.py, sparse_mla.py, moe_route.py, moe_experts.py,
mtp_verify.py; common.py holds the shared host-side checks, the per-step device data
(`CudaStepData`, built once per step by `prepare_step`) and launch helpers. Supporting ops that are
plain GEMMs or elementwise (linear, mlp, rms_norm, layer_norm, rope) run as torch on the device:
cuBLAS is the well-kept library for those, and the contract's references (glm52_backends/ops/) are
device-agnostic torch already.

`create()` returns the backend on the current CUDA device. Without a GPU but with
TRITON_INTERPRET=1 the same kernels run in Triton's CPU interpreter on CPU tensors, and the backend
names itself "cuda (triton interpreter)" (CI checks the kernels that way, slowly, on small shapes).
Kernel modules are imported lazily, after that choice: `triton.jit` reads TRITON_INTERPRET when
it decorates (common.py has no kernels and imports no triton).
"""

from __future__ import annotations

import importlib
import os

import torch

from glm52_backends import ops as contract
from glm52_backends.ops import Capabilities, OpUnsupported
from glm52_backends.registry import BackendUnavailable

from .common import dense, prepare

INSTALL = "pip install 'glm52_backends[cuda]'"


def _kernels(name: str):
    return importlib.import_module(f"{__name__}.{name}")


class CudaBackend:
    """Triton kernels for indexer_topk, sparse_mla, moe_route, moe_experts, mtp_verify.

    `moe_gemm`: "auto" (torch._grouped_mm for bfloat16 on a GPU, Triton otherwise), "grouped_mm"
    or "triton". Shapes, layouts and semantics: glm52_backends/ops/<op>.py.
    `prepare_step(meta)` builds the step's device data once (common.CudaStepData); with a meta the
    cache-reading ops make no host synchronisation.
    """

    priority = 20

    def __init__(self, device: torch.device, interpreter: bool, moe_gemm: str = "auto"):
        if moe_gemm not in ("auto", "grouped_mm", "triton"):
            raise ValueError(f"moe_gemm must be 'auto', 'grouped_mm' or 'triton', got {moe_gemm!r}")
        self.device = device
        self.interpreter = interpreter
        self.moe_gemm = moe_gemm
        self.name = "cuda (triton interpreter)" if interpreter else "cuda"
        self.capabilities = Capabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            # the interpreter computes every tl.dot in float32; float32 keeps CI runs exact
            default_dtype=torch.float32 if interpreter else torch.bfloat16,
            devices=(device.type,),
            weight_formats=("dense",),    # FP8 block-scaled weights are declined -> reference
            cache_formats=("dense",),
            max_topk=None,                # the radix select has no candidate buffer: any topk
            block_sizes=None,
            extra={"moe_gemm": moe_gemm})

    def __repr__(self) -> str:
        return f"CudaBackend(device={self.device}, interpreter={self.interpreter})"

    # ---- per-step data ------------------------------------------------------------------------
    def prepare_step(self, meta):
        """The step's device data (common.CudaStepData): int32 batch tensors, each token's request
        and position; built once per step, no host synchronisation."""
        return prepare(meta)

    # ---- hot ops (Triton) -------------------------------------------------------------------
    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, *, meta=None):
        return _kernels("indexer_topk").indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk,
                                                     meta=meta)

    def sparse_mla(self, q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *,
                   return_lse=False, meta=None):
        return _kernels("sparse_mla").sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q,
                                                 scale, return_lse=return_lse, meta=meta)

    def moe_route(self, router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=1.0):
        return _kernels("moe_route").moe_route(router_logits, correction_bias, top_k, n_group, topk_group,
                                               norm_topk_prob, routed_scaling_factor)

    def moe_experts(self, x, w13, w2, topk_ids, topk_weights):
        return _kernels("moe_experts").moe_experts(x, w13, w2, topk_ids, topk_weights, gemm=self.moe_gemm)

    def mtp_verify(self, draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
        return _kernels("mtp_verify").mtp_verify(draft, target_logits, draft_probs, temperature, top_p, uniforms)

    # ---- supporting ops (torch on the device) --------------------------------------------------
    def linear(self, x, weight):
        """cuBLAS in the input dtype (f32 accumulate); float32 without TF32 (torch's default).
        Dense weights of x's dtype; anything else is declined (the reference casts / dequantizes)."""
        w = dense("linear", "weight", weight)
        if x.dtype != w.dtype:
            raise OpUnsupported(f"linear: x is {x.dtype} but the weight is {w.dtype}")
        return torch.nn.functional.linear(x, w)

    def mlp(self, x, w13, w2):
        w13, w2 = dense("mlp", "w13", w13), dense("mlp", "w2", w2)
        if not x.dtype == w13.dtype == w2.dtype:
            raise OpUnsupported(f"mlp: x is {x.dtype} but the weights are {w13.dtype}/{w2.dtype}")
        I = w2.shape[-1]
        h = torch.nn.functional.linear(x, w13)
        a = (torch.nn.functional.silu(h[..., :I].float()) * h[..., I:].float()).to(x.dtype)
        return torch.nn.functional.linear(a, w2)

    def rms_norm(self, x, weight, eps):
        return contract.rms_norm(x, weight, eps)

    def layer_norm(self, x, weight, bias, eps):
        return contract.layer_norm(x, weight, bias, eps)

    def rope(self, x, positions, theta):
        return contract.rope(x, positions, theta)


def create(**kwargs) -> CudaBackend:
    """The cuda backend on this machine, or BackendUnavailable saying what is missing."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"the cuda backend needs Triton ({e}); {INSTALL}") from e
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if torch.cuda.is_available() and not interpret:
        device = torch.device("cuda", torch.cuda.current_device())
        return CudaBackend(device, interpreter=False, **kwargs)
    if interpret:
        return CudaBackend(torch.device("cpu"), interpreter=True, **kwargs)
    why = ("this torch is a CPU build" if torch.version.cuda is None
           else "torch.cuda.is_available() is False (no NVIDIA GPU or driver visible)")
    raise BackendUnavailable(f"the cuda backend needs a CUDA GPU: {why}. Install a CUDA build of torch and "
                             f"{INSTALL}; set TRITON_INTERPRET=1 to run its kernels on the CPU interpreter (slow)")
