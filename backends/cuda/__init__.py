"""cuda: the hot ops as Triton kernels (+ torch._grouped_mm where it wins), native on NVIDIA GPUs.

Files, one per op and named after it: indexer_topk.py, sparse_mla.py, moe_route.py, moe_experts.py,
mtp_verify.py, linear.py; fp8.py holds the block-FP8 activation quantizer and rounding helpers
shared by linear.py and moe_experts.py; common.py the shared host-side checks, the step data the
paged kernels read (`CudaStepData`, derived on the device from the contract's loose tensors at each
call, no host read) and launch helpers.

Weights: dense (bare tensors or "dense" `Weight`s) and block-FP8 ("fp8_block" `Weight`s: e4m3
codes + f32 scales per 128x128 block, or 1x128 after a gate/up concatenation of odd widths) run
natively in linear, mlp and moe_experts; FP8 activations are quantized per token per 128 inputs by
the weight's recipe (fp8_g128 / fp8_g128_ue8m0) in a Triton kernel. Other formats (int8/int4
Ascend formats) are declined -> reference. Dense linear/mlp are cuBLAS (`torch.nn.functional.linear`);
FP8 linear is `torch._scaled_mm` (1x128 x 128x128 block scales, where torch and the GPU support it)
or a Triton block-scaled FP8 GEMM (linear.py). rms_norm, layer_norm and rope run the contract's
references (device-agnostic torch).

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
from glm52_backends.ops import Capabilities
from glm52_backends.registry import BackendUnavailable

INSTALL = "pip install 'glm52_backends[cuda]'"


def _kernels(name: str):
    return importlib.import_module(f"{__name__}.{name}")


class CudaBackend:
    """Triton kernels for indexer_topk, sparse_mla, moe_route, moe_experts, mtp_verify, FP8 linear.

    `moe_gemm`: "auto" (torch._grouped_mm for bfloat16 on a GPU, Triton otherwise), "grouped_mm"
    or "triton" (dense experts; FP8 experts always run the Triton FP8 kernels).
    `fp8_gemm`: "auto" (torch._scaled_mm where supported and verified, else Triton), "scaled_mm"
    or "triton": the GEMM of FP8 linears. Shapes, layouts and semantics: glm52_backends/ops/<op>.py.
    The cache-reading ops take the step as the contract's loose tensors only and make no host
    synchronisation on any path (grids sized from shapes): a decode step can be captured as a graph.
    """

    priority = 20
    triton_ops = True     # kernels launched through torch.library.wrap_triton: custom ops via triton_op

    def __init__(self, device: torch.device, interpreter: bool, moe_gemm: str = "auto", fp8_gemm: str = "auto"):
        if moe_gemm not in ("auto", "grouped_mm", "triton"):
            raise ValueError(f"moe_gemm must be 'auto', 'grouped_mm' or 'triton', got {moe_gemm!r}")
        if fp8_gemm not in ("auto", "scaled_mm", "triton"):
            raise ValueError(f"fp8_gemm must be 'auto', 'scaled_mm' or 'triton', got {fp8_gemm!r}")
        self.device = device
        self.interpreter = interpreter
        self.moe_gemm = moe_gemm
        self.fp8_gemm = fp8_gemm
        self.name = "cuda (triton interpreter)" if interpreter else "cuda"
        self.capabilities = Capabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            # the interpreter computes every tl.dot in float32; float32 keeps CI runs exact
            default_dtype=torch.float32 if interpreter else torch.bfloat16,
            devices=(device.type,),
            weight_formats=("dense", "fp8_block"),   # linear, mlp, moe_experts; other formats -> reference
            cache_formats=("dense",),
            max_topk=None,                # the radix select has no candidate buffer: any topk
            block_sizes=None,
            extra={"moe_gemm": moe_gemm, "fp8_gemm": fp8_gemm})

    def __repr__(self) -> str:
        return f"CudaBackend(device={self.device}, interpreter={self.interpreter})"

    # ---- hot ops (Triton) -------------------------------------------------------------------
    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
        return _kernels("indexer_topk").indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk)

    def sparse_mla(self, q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *,
                   return_lse=False):
        return _kernels("sparse_mla").sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q,
                                                 scale, return_lse=return_lse)

    def moe_route(self, router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=1.0):
        return _kernels("moe_route").moe_route(router_logits, correction_bias, top_k, n_group, topk_group,
                                               norm_topk_prob, routed_scaling_factor)

    def moe_experts(self, x, w13, w2, topk_ids, topk_weights):
        return _kernels("moe_experts").moe_experts(x, w13, w2, topk_ids, topk_weights, gemm=self.moe_gemm)

    def mtp_verify(self, draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
        return _kernels("mtp_verify").mtp_verify(draft, target_logits, draft_probs, temperature, top_p, uniforms)

    # ---- supporting ops (cuBLAS / FP8 GEMM) --------------------------------------------------
    def linear(self, x, weight):
        """Dense weights of x's dtype: cuBLAS in that dtype (f32 accumulate; float32 without TF32,
        torch's default). "fp8_block" Weights: Triton activation quantizer + torch._scaled_mm or the
        Triton FP8 GEMM (linear.py). Anything else is declined (the reference casts / dequantizes)."""
        return _kernels("linear").linear(x, weight, gemm=self.fp8_gemm)

    def mlp(self, x, w13, w2):
        """Two `linear`s with SiLU*up between, computed in float32 and rounded to x's dtype (the
        reference's roundings); declined when either linear declines its weight."""
        lin = _kernels("linear").linear
        I = w2.shape[-1]
        h = lin(x, w13, gemm=self.fp8_gemm)
        a = (torch.nn.functional.silu(h[..., :I].float()) * h[..., I:].float()).to(x.dtype)
        return lin(a, w2, gemm=self.fp8_gemm)

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
