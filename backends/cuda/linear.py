"""linear: x @ W.T for dense weights (cuBLAS) and block-FP8 `Weight`s (quantizer + FP8 GEMM).

Contract: glm52_backends/ops/linear.py; the FP8 arithmetic: glm52_backends/quant.py (`fp8_block`).

  dense       `torch.nn.functional.linear` in x's dtype (cuBLAS, f32 accumulation; float32 without
              TF32). A weight of another dtype is declined (the reference casts).
  fp8_block   1. the activations are quantized per token per 128 inputs by the weight's recipe
                 (fp8.py `_act_quant_kernel`: fp8_g128 or fp8_g128_ue8m0, the reference's float32
                 arithmetic, codes and scales written once);
              2. the GEMM, one of:
                 scaled_mm  `torch._scaled_mm` with 1x128 activation scales and 128x128 weight
                            scales (cuBLAS). Needs torch >= 2.10 (2.9 is wrong when K/128 is not a
                            multiple of 4), CUDA >= 12.9, an sm_90 GPU, a bfloat16 output (the
                            only one torch's block-scaled path returns), 128x128 weight blocks, N
                            and K multiples of 16 and row-major codes. Checked once per device
                            against a float32 computation on the same codes before "auto" uses it
                            (a torch that accepts the call but computes something else falls back,
                            with one warning).
                 triton     `_fp8_gemm_kernel`: per 128-wide K block one FP8 tensor-core dot
                            (fp8.py `_dot_fp8`: float16 operands for float32 activations, float32
                            ones under the interpreter), its float32 result times the activation scale
                            of each row and the weight scale of each column added to a float32
                            accumulator (the block-scaled pattern: the dot's own accumulator never
                            spans two scale blocks), rounded once to x's dtype (to nearest even,
                            also under the interpreter: fp8.py `_round_as`). Any row block b0
                            (128, or 1 after a gate/up concatenation of odd widths): each column
                            reads its scale row n // b0. Any N and K: the last blocks are masked,
                            nothing beyond N or K is read.
              "auto" takes scaled_mm where it is supported and verified, triton otherwise.
Declined (OpUnsupported -> the reference): other quantized formats, FP8 blocks of other than 128
inputs, other recipes, non-float activations.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from glm52_backends.ops import OpUnsupported

from .common import FLOATS, FP8_GROUP, capturing, dense, fp8_block, interpreting, is_fp8_block, need
from .fp8 import _dot_fp8, _round_as, dot_mode, quantize_act

GEMMS = ("auto", "scaled_mm", "triton")


@triton.jit
def _fp8_gemm_kernel(q_ptr, qs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                     sq0, sqs0, sqs1, sw0, sw1, sws0, sws1, sy0, B0,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """y[m, n] = sum over K blocks kb of (q[m, kb] . w[n, kb]) * qs[m, kb] * ws[n // B0, kb]."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    ws_row = ws_ptr + (n // B0).to(tl.int64) * sws0              # each column's weight-scale row
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + kk
        k_ok = k < K
        a = tl.load(q_ptr + m64[:, None] * sq0 + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + n64[:, None] * sw0 + k[None, :] * sw1, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(qs_ptr + m64 * sqs0 + kb * sqs1, mask=m_ok, other=0.0)
        b_s = tl.load(ws_row + kb * sws1, mask=n_ok, other=0.0)
        acc += _dot_fp8(a, b, DOT) * a_s[:, None] * b_s[None, :]
    y = _round_as(acc, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)      # exact cast after the rounding
    tl.store(y_ptr + m64[:, None] * sy0 + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def _tiles(M: int, dot: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Decode (M <= 16): 16-row tiles (the tl.dot
    minimum) and 64 columns, so a 6144-wide output still spreads over 96 programs; larger M: 64 or
    128 rows x 128 columns for tensor-core reuse (float16 dots: at most 64 x 128). Not tuned on a
    GPU yet."""
    if M <= 16:
        return 16, 64, 4, 4
    if M <= 64 or dot != "fp8":
        return 64, 128, 4, 3
    return 128, 128, 8, 3


def fp8_gemm_triton(q: torch.Tensor, s: torch.Tensor, w, out_dtype: torch.dtype, dot: str) -> torch.Tensor:
    """The Triton block-scaled GEMM: q [M, K] e4m3 (row-major), s [M, ceil(K/128)] f32, w an
    `fp8_block` Weight [N, K] -> y [M, N] in out_dtype."""
    M, K = q.shape
    N = w.data.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=q.device)
    if M == 0:
        return y
    bm, bn, warps, stages = _tiles(M, dot)
    wrap_triton(_fp8_gemm_kernel)[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        q, s, w.data, w.scales, y, M, N, K, q.stride(0), s.stride(0), s.stride(1),
        w.data.stride(0), w.data.stride(1), w.scales.stride(0), w.scales.stride(1), y.stride(0), w.block[0],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_GROUP, DOT=dot, num_warps=warps, num_stages=stages)
    return y


# ---- torch._scaled_mm ----------------------------------------------------------------------------
_VERIFIED: dict = {}        # device index -> None (verified) or why torch._scaled_mm is not used there


def scaled_mm_unsupported(x: torch.Tensor, w) -> str | None:
    """None when torch._scaled_mm can run this call with 1x128 / 128x128 block scales; else why not."""
    if interpreting() or not x.is_cuda:
        return "torch._scaled_mm runs on a CUDA device only"
    if not hasattr(torch, "_scaled_mm") or torch.__version__ < (2, 10):
        return f"torch {torch.__version__}: block-scaled torch._scaled_mm needs torch >= 2.10"
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return f"CUDA {torch.version.cuda}: cuBLAS block scaling needs CUDA >= 12.9"
    cap = torch.cuda.get_device_capability(x.device)
    if cap != (9, 0):
        return f"sm_{cap[0]}{cap[1]}: cuBLAS 1x128/128x128 block scaling is for sm_90"
    if x.dtype != torch.bfloat16:
        return f"x is {x.dtype}: torch._scaled_mm's block-scaled path returns bfloat16 only"
    if tuple(w.block) != (128, 128):
        return f"weight blocks {tuple(w.block)}: torch._scaled_mm takes 128x128 weight blocks"
    N, K = w.data.shape
    if N % 16 or K % 16:
        return f"weight [{N}, {K}]: torch._scaled_mm needs N and K multiples of 16"
    if w.data.stride() != (K, 1):
        return "the weight's codes are not row-major contiguous"
    return None


def fp8_gemm_scaled_mm(q: torch.Tensor, s: torch.Tensor, w, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm: q [M, K] row-major, s [M, ceil(K/128)] with stride (1, M) (outer-dim-major),
    the weight's codes transposed (column-major [K, N]) and its scales transposed [K/128, N/128]."""
    return torch._scaled_mm(q, w.data.t(), s, w.scales.t(), out_dtype=out_dtype)


def _verify_scaled_mm(device: torch.device) -> str | None:
    """Run torch._scaled_mm once on this device against float32 arithmetic on the same codes and
    scales (K/128 = 3, not a multiple of 4, and M = 3); None if it agrees, else why not."""
    from glm52_backends.quant import dequantize, dequantize_fp8_groups
    from glm52_backends.weights import quantize_weight
    g = torch.Generator().manual_seed(0)
    M, N, K = 3, 256, 384
    w = quantize_weight(torch.randn(N, K, generator=g) * K ** -0.5, "fp8_block").to(device)
    x = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    try:
        q, s = quantize_act(x, False, scales_k_major=True)
        y = fp8_gemm_scaled_mm(q, s, w, torch.bfloat16).float()
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        return f"torch._scaled_mm failed: {type(e).__name__}: {e}"
    want = dequantize_fp8_groups(q, s, FP8_GROUP, torch.float32) @ dequantize(w, torch.float32).T
    err = float((y - want).abs().max() / want.abs().max())
    if not err <= 2 ** -7:                       # bfloat16 output rounding is 2^-9 relative
        return f"torch._scaled_mm disagrees with the block-scaled product (max rel err {err:.1e})"
    return None


def _use_scaled_mm(gemm: str, x: torch.Tensor, w) -> bool:
    why = scaled_mm_unsupported(x, w)
    if gemm == "scaled_mm":
        need(why is None, "linear", f"gemm='scaled_mm': {why}")
        return True
    if gemm == "triton" or why is not None:
        return False
    key = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if key not in _VERIFIED:
        if capturing():                          # the check reads back; verify outside a capture
            return False
        _VERIFIED[key] = _verify_scaled_mm(x.device)
        if _VERIFIED[key] is not None:
            warnings.warn(f"cuda linear: not using torch._scaled_mm on cuda:{key} ({_VERIFIED[key]}); "
                          f"the Triton FP8 GEMM runs instead", RuntimeWarning, stacklevel=3)
    return _VERIFIED[key] is None


# ---- the op --------------------------------------------------------------------------------------
def linear(x, weight, *, gemm: str = "auto"):
    """Contract: glm52_backends/ops/linear.py. x [..., K]; weight [N, K]: a tensor, a dense `Weight`
    or an `fp8_block` `Weight` -> [..., N] in x's dtype. `gemm` picks the FP8 GEMM ("auto" |
    "scaled_mm" | "triton")."""
    if gemm not in GEMMS:
        raise ValueError(f"linear: gemm must be one of {GEMMS}, got {gemm!r}")
    if not is_fp8_block(weight):
        w = dense("linear", "weight", weight)
        if x.dtype != w.dtype:
            raise OpUnsupported(f"linear: x is {x.dtype} but the weight is {w.dtype}")
        return torch.nn.functional.linear(x, w)
    op = "linear"
    w = fp8_block(op, "weight", weight)
    need(x.dtype in FLOATS, op, f"x has dtype {x.dtype}; the FP8 path takes {', '.join(map(str, FLOATS))}")
    N, K = w.data.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must be [..., {K}] for a weight [{N}, {K}], got {list(x.shape)}")
    need(w.device == x.device, op, f"x is on {x.device}, the weight on {w.device}")
    x2 = x.reshape(-1, K)
    ue8m0 = w.recipe.endswith("ue8m0")
    if x2.shape[0] and _use_scaled_mm(gemm, x2, w):
        q, s = quantize_act(x2, ue8m0, scales_k_major=True)
        y = fp8_gemm_scaled_mm(q, s, w, x.dtype)
    else:
        q, s = quantize_act(x2, ue8m0)
        y = fp8_gemm_triton(q, s, w, x.dtype, dot_mode(x.dtype))
    return y.view(*x.shape[:-1], N)
