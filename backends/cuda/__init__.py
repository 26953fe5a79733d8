"""cuda: the hot ops as Triton kernels (+ torch._grouped_mm where it wins), native on NVIDIA GPUs.

Files, one per op: indexer.py (indexer_topk), sparse_mla.py, moe.py (moe_route, moe_experts),
mtp_verify.py; common.py holds the shared host-side checks and metadata. Supporting ops that are
plain GEMMs or elementwise (linear, mlp, rms_norm, layer_norm, rope) run as torch on the device:
cuBLAS is the well-kept library for those, and the reference's elementwise code is already
device-agnostic.

`create()` returns the backend on the current CUDA device. Without a GPU but with
TRITON_INTERPRET=1 the same kernels run in Triton's CPU interpreter on CPU tensors, and the backend
names itself "cuda (triton interpreter)" (CI checks the kernels that way, slowly, on small shapes).
Kernel modules are imported lazily, after that choice: `triton.jit` reads TRITON_INTERPRET when
it decorates.
"""

from __future__ import annotations

import importlib
import os

import torch

from glm52_backends.registry import BackendUnavailable

INSTALL = "pip install 'glm52_backends[cuda]'"


def _kernels(name: str):
    return importlib.import_module(f"{__name__}.{name}")


class CudaBackend:
    """Triton kernels for indexer_topk, sparse_mla, moe_route, moe_experts, mtp_verify.

    `moe_gemm`: "auto" (torch._grouped_mm for bfloat16 on a GPU, Triton otherwise), "grouped_mm"
    or "triton". Shapes and layouts: glm52_backends/ops.py; semantics: backends/cpu_ref/ops.py.
    """

    priority = 20

    def __init__(self, device: torch.device, interpreter: bool, moe_gemm: str = "auto"):
        if moe_gemm not in ("auto", "grouped_mm", "triton"):
            raise ValueError(f"moe_gemm must be 'auto', 'grouped_mm' or 'triton', got {moe_gemm!r}")
        self.device = device
        self.interpreter = interpreter
        self.moe_gemm = moe_gemm
        self.name = "cuda (triton interpreter)" if interpreter else "cuda"
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
        self.capabilities = {
            "dtypes": dtypes,
            # the interpreter computes every tl.dot in float32; float32 keeps CI runs exact
            "default_dtype": torch.float32 if interpreter else torch.bfloat16,
            "devices": [device.type],
            "fp8": False,          # FP8 block-scaled experts / caches are declined -> reference
            "max_topk": None,      # the radix select has no candidate buffer: any topk
            "moe_gemm": moe_gemm,
        }

    def __repr__(self) -> str:
        return f"CudaBackend(device={self.device}, interpreter={self.interpreter})"

    # ---- hot ops (Triton) -------------------------------------------------------------------
    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
        return _kernels("indexer").indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk)

    def sparse_mla(self, q, kv_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, v_dim=512):
        return _kernels("sparse_mla").sparse_mla(q, kv_cache, idx, block_table, seq_lens, cu_seqlens_q,
                                                 scale, v_dim)

    def moe_route(self, router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=1.0):
        return _kernels("moe").moe_route(router_logits, correction_bias, top_k, n_group, topk_group,
                                         norm_topk_prob, routed_scaling_factor)

    def moe_experts(self, x, w13, w2, topk_ids, topk_weights):
        return _kernels("moe").moe_experts(x, w13, w2, topk_ids, topk_weights, gemm=self.moe_gemm)

    def mtp_verify(self, draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
        return _kernels("mtp_verify").mtp_verify(draft, target_logits, draft_probs, temperature, top_p, uniforms)

    # ---- supporting ops (torch on the device) --------------------------------------------------
    def linear(self, x, weight):
        """cuBLAS in the input dtype (f32 accumulate); float32 without TF32 (torch's default)."""
        if x.dtype != weight.dtype:
            raise ValueError(f"linear: x is {x.dtype} but weight is {weight.dtype}")
        return torch.nn.functional.linear(x, weight)

    def mlp(self, x, w13, w2):
        I = w2.shape[-1]
        h = self.linear(x, w13)
        a = (torch.nn.functional.silu(h[..., :I].float()) * h[..., I:].float()).to(x.dtype)
        return self.linear(a, w2)

    def rms_norm(self, x, weight, eps):
        return _ref().rms_norm(x, weight, eps)

    def layer_norm(self, x, weight, bias, eps):
        return _ref().layer_norm(x, weight, bias, eps)

    def rope(self, x, positions, theta):
        return _ref().rope(x, positions, theta)


def _ref():
    from glm52_backends.backends.cpu_ref import ops
    return ops


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
