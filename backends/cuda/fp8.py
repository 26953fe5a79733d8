"""Block-FP8 (`fp8_block`) pieces shared by linear.py and moe_experts.py: the activation quantizer
and the Triton helpers that round to e4m3 and compute a group's scale.

Activation recipe (glm52_backends/quant.py `quantize_fp8_groups`, recipes `fp8_g128` and
`fp8_g128_ue8m0`): per token and per group of 128 inputs, `s = max(amax, 1e-4) / 448` (ue8m0: `s`
rounded up to a power of two), `q = e4m3(clamp(x / s, -448, 448))`. The kernels compute it with the
reference's float32 operations in the reference's order: a correctly rounded division
(`div_rn`, not the GPU's approximate `/`) for both the scale and `x / s`, and the e4m3 rounding
(nearest, ties to even) written out in `_e4m3_rne`, so codes and scales are the reference's bit for
bit except where float32 library functions differ (ue8m0's log2 on a scale within ~3 ulp above a
power of two).

Why the roundings are written out: Triton's interpreter converts float32 to float8e4nv wrongly when
the rounding carries into the exponent (126.6 -> 64 instead of 128), and truncates float32 to
bfloat16. `_e4m3_rne` rounds in float32 arithmetic to a value e4m3 holds exactly, so the final cast
is exact, and `_round_as` rounds to bfloat16 on the bits; both give the GPU's conversions' results,
so the interpreter checks the very code the GPU runs.

No host synchronisation anywhere: the quantizer's grid comes from shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import FP8_GROUP, interpreting, pow2

QUANT_GROUPS = 8        # groups per quantizer program: [8, 128] values (4 KB of bf16) on 4 warps

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _e4m3_rne(v):
    """float32 v with |v| <= 448 -> the nearest float8_e4m3fn value (ties to even) as float32, the
    sign kept (-0.0 for tiny negatives, as torch's cast gives). e4m3 holds 3 mantissa bits: the step
    is 2^(e-3) for a value in [2^e, 2^(e+1)), e >= -6, and 2^-9 below 2^-6 (subnormals). Dividing by
    the step (a power of two: exact), adding and subtracting 1.5 * 2^23 rounds to an integer, ties
    to even (the quotient is below 16), and multiplying back is exact."""
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6) - 3
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - e) << 23).to(tl.float32, bitcast=True)
    r = ((a * inv_step + 12582912.0) - 12582912.0) * step
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_as(v, DTYPE: tl.constexpr):
    """float32 v rounded to DTYPE (nearest, ties to even) and widened back to float32: where the
    reference rounds an intermediate to x's dtype. bfloat16 is rounded on the bits (Triton's
    interpreter truncates float32 -> bfloat16; the GPU's cvt.rn gives the same as this)."""
    if DTYPE == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    else:
        return v.to(DTYPE).to(tl.float32)


@triton.jit
def _group_scale(amax, UE8M0: tl.constexpr):
    """A group's scale from its amax (float32): max(amax, 1e-4) / 448, correctly rounded; ue8m0:
    2^ceil(log2 s), the power of two assembled from its exponent bits (exact)."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if UE8M0:
        e = tl.ceil(tl.log2(s)).to(tl.int32)
        s = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _quantize(v, s):
    """float32 values [R, C] and their group scales [R] -> e4m3 values as float32 (exact)."""
    return _e4m3_rne(tl.clamp(tl.math.div_rn(v, s[:, None]), -448.0, 448.0))


@triton.jit
def _dot_fp8(a, b, DOT: tl.constexpr):
    """a [M, K] . b [N, K]^T for e4m3 tiles -> float32 [M, N]. DOT "fp8": the FP8 tensor-core dot
    (float16/bfloat16 activations on a GPU); "f16": both tiles widened to float16 first (exact: e4m3
    fits in float16) and a float16 dot with float32 accumulation (float32 activations on a GPU: no
    reduced-precision FP8 accumulator, no float32 FMA dot that spills); "f32": widened to float32,
    input_precision="ieee" (Triton's interpreter, whose FP8 and bfloat16 dots are not trusted)."""
    if DOT == "f32":
        p = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    elif DOT == "f16":
        p = tl.dot(a.to(tl.float16), tl.trans(b.to(tl.float16)))
    else:
        p = tl.dot(a, tl.trans(b))
    return p


def dot_mode(dtype: torch.dtype) -> str:
    """The `_dot_fp8` variant for activations of `dtype` (see there)."""
    if interpreting():
        return "f32"
    return "f16" if dtype == torch.float32 else "fp8"


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, sx0, sx1, sq0, ss0, ss1,
                      UE8M0: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """One row, GROUPS groups of GROUP inputs: q[row, k] (e4m3), s[row, g] (f32). Nothing at or
    beyond column K is read or written."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    k = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = k < K
    x = tl.load(x_ptr + row * sx0 + k * sx1, mask=ok, other=0.0).to(tl.float32)
    s = _group_scale(tl.max(tl.abs(x), axis=1), UE8M0)
    q = _quantize(x, s)
    tl.store(q_ptr + row * sq0 + k, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * ss0 + g * ss1, s, mask=g * GROUP < K)


def quantize_act(x: torch.Tensor, ue8m0: bool, *, scales_k_major: bool = False,
                 group: int = FP8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype, any strides) -> (q float8_e4m3fn [M, K] row-major, s float32
    [M, ceil(K/group)]), the recipe of quant.quantize_fp8_groups. `scales_k_major`: `s` laid out
    with stride (1, M) (torch._scaled_mm's layout for 1x128 activation scales)."""
    M, K = x.shape
    G = -(-K // group)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    if scales_k_major:
        s = torch.empty(G, M, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(M, G, dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, s
    groups = min(QUANT_GROUPS, pow2(G))
    wrap_triton(_act_quant_kernel)[(M, triton.cdiv(G, groups))](
        x, q, s, K, x.stride(0), x.stride(1), q.stride(0), s.stride(0), s.stride(1),
        UE8M0=ue8m0, GROUP=group, GROUPS=groups, num_warps=4)
    return q, s
