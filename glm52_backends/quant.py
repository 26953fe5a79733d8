"""Quantized weight formats and their activation recipes: the arithmetic every backend must match.

Spec: spec/quantization.md. A quantized linear weight is a `weights.Weight` whose `format` names one
of `FORMATS`; its tensors are `data` (the stored codes), `scales` and, per format, `aux` entries.
Shapes below are for one matrix `[N, K]` (out, in); a stack of experts adds a leading `[E]` to every
tensor.

| format         | data                                   | scales                        | aux                                                   | activation recipe |
|----------------|----------------------------------------|-------------------------------|-------------------------------------------------------|-------------------|
| `fp8_block`    | float8_e4m3fn `[N, K]`                 | f32 `[ceil(N/b0), ceil(K/b1)]` (`weight_scale_inv`, a multiplier) | -                  | `fp8_g128` / `fp8_g128_ue8m0` |
| `w8a8_dynamic` | int8 `[N, K]`                          | f32 `[N]` (`weight_scale`)    | `offset` f32 `[N]` (`weight_offset`)                  | `int8_token` |
| `w8a8_static`  | int8 `[N, K]`                          | f32 `[N]` (`weight_scale`)    | `offset` `[N]`, `input_scale` f32 `[]`, `input_offset` f32 `[]`, `deq_scale` f32 `[N]`, `quant_bias` int32 `[N]` | `int8_static` |
| `w4a8_dynamic` | int8 `[N/2, K]`: two int4 codes per byte along N (row 2i in the low nibble, row 2i+1 in the high nibble) | f32 `[N]` | `offset` f32 `[N]`, `scale_bias` f32 `[N]` | `int8_token` |

Activation recipes (x is first cast to float32; all scale arithmetic is float32, as the kernels do):
- `fp8_g128` (DeepSeek-V3.2 `act_quant`): per token and per group of `g = block[1]` inputs,
  `s = max(amax, 1e-4) / 448`; `q = e4m3(clamp(x / s, -448, 448))` (the cast rounds to nearest even).
  `fp8_g128_ue8m0` rounds `s` up to a power of two first (`2 ** ceil(log2 s)`).
- `int8_token` (`npu_dynamic_quant`, symmetric per token): `s = amax / 127`;
  `q = clamp(round_half_even(x / s), -128, 127)`; a row of zeros gets `s = 0`, `q = 0`.
- `int8_static` (msModelSlim W8A8: one scale and offset per tensor, calibrated offline):
  `q = clamp(round_half_even(x * (1 / input_scale) + input_offset), -128, 127)`.

What each format computes (`matmul_reference`, float64 accumulation of the exact products):
- `fp8_block`:     `y = dq(x) @ dq(W).T` with `dq(x) = q * s` per group, `dq(W) = data * block scale`.
- `w8a8_dynamic`, `w4a8_dynamic`: `y = (q_x * s_x) @ ((q_W - offset) * scale).T`.
- `w8a8_static`:   `y = deq_scale * (q_x @ q_W.T + quant_bias)`; exactly what `npu_quant_matmul`
  returns. For a checkpoint written by `weights.quantize_weight`, `deq_scale = input_scale * scale` and
  `quant_bias = -input_offset * sum_k q_W` (so `y ~ x @ W.T`; the weight offset is zero there).
`w4a8_dynamic`'s `scale_bias` (msModelSlim: `8 * sum_k q_W * scale`, summed over its partitions)
is a term Ascend's int4 kernel needs for its own representation; it is derived from the weights,
carried and shape-checked, and takes no part in the arithmetic above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_MAX = 448.0             # largest finite float8_e4m3fn
FP8_AMAX_FLOOR = 1e-4       # DeepSeek act_quant clamps the amax from below
INT8_MIN, INT8_MAX = -128, 127
INT4_MIN, INT4_MAX = -8, 7


@dataclass(frozen=True)
class Format:
    name: str
    act_recipe: str           # the default activation recipe
    recipes: tuple[str, ...]  # the recipes this format accepts
    code_dtype: torch.dtype   # dtype of `data`
    aux: tuple[str, ...]      # names of the aux tensors it carries
    what: str


FORMATS: dict[str, Format] = {
    "dense": Format("dense", "none", ("none",), torch.bfloat16, (), "float weights (bf16/f16/f32)"),
    "fp8_block": Format("fp8_block", "fp8_g128", ("fp8_g128", "fp8_g128_ue8m0"), torch.float8_e4m3fn, (),
                        "FP8 e4m3 + one f32 scale per 128x128 block; activations FP8 per token per 128"),
    "w8a8_dynamic": Format("w8a8_dynamic", "int8_token", ("int8_token",), torch.int8, ("offset",),
                           "int8 + per-channel scale; activations int8 per token (dynamic)"),
    "w8a8_static": Format("w8a8_static", "int8_static", ("int8_static",), torch.int8,
                          ("offset", "input_scale", "input_offset", "deq_scale", "quant_bias"),
                          "int8 + per-channel scale; activations int8 with one calibrated scale/offset"),
    "w4a8_dynamic": Format("w4a8_dynamic", "int8_token", ("int8_token",), torch.int8, ("offset", "scale_bias"),
                           "int4 (two per byte) + per-channel scale; activations int8 per token"),
}
QUANT_FORMATS = tuple(f for f in FORMATS if f != "dense")


def check_format(fmt: str, recipe: str | None = None) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    f = FORMATS[fmt]
    if recipe is not None and recipe not in f.recipes:
        raise ValueError(f"weight format {fmt!r} has no activation recipe {recipe!r}; it takes {', '.join(f.recipes)}")
    return f


# ---- layout: the tensors a Weight of each format holds (shared by the loader, the planner, tests) -----

def layout(fmt: str, shape: tuple[int, ...], block: tuple[int, int] = (128, 128)) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`{part: (shape, dtype)}` of every tensor a `Weight` of format `fmt` and logical shape
    `[..., N, K]` holds ("data", "scales", then the aux names). The planner sums these bytes and a
    loaded model holds exactly them (`Weight.nbytes`)."""
    f = check_format(fmt)
    *lead, N, K = shape
    lead = tuple(lead)
    if fmt == "dense":
        return {"data": (tuple(shape), torch.bfloat16)}
    if fmt == "fp8_block":
        return {"data": (tuple(shape), f.code_dtype),
                "scales": (lead + (-(-N // block[0]), -(-K // block[1])), torch.float32)}
    if fmt == "w4a8_dynamic" and N % 2:
        raise ValueError(f"w4a8_dynamic packs two rows per byte: N = {N} rows is odd")
    data_rows = N // 2 if fmt == "w4a8_dynamic" else N
    out = {"data": (lead + (data_rows, K), f.code_dtype), "scales": (lead + (N,), torch.float32),
           "offset": (lead + (N,), torch.float32)}
    if fmt == "w8a8_static":
        out.update(input_scale=(lead, torch.float32), input_offset=(lead, torch.float32),
                   deq_scale=(lead + (N,), torch.float32), quant_bias=(lead + (N,), torch.int32))
    if fmt == "w4a8_dynamic":
        out["scale_bias"] = (lead + (N,), torch.float32)
    return out


def layout_nbytes(fmt: str, shape: tuple[int, ...], block: tuple[int, int] = (128, 128),
                  dense_dtype: torch.dtype = torch.bfloat16) -> int:
    parts = layout(fmt, shape, block)
    if fmt == "dense":
        parts = {"data": (parts["data"][0], dense_dtype)}
    return sum(math.prod(s) * torch.empty((), dtype=dt).element_size() for s, dt in parts.values())


# ---- the values each part admits (the loader's check; `check_weight` for Weights built in memory) ---------
F32_TINY = torch.finfo(torch.float32).tiny      # smallest normal float32 (1.2e-38)
F32_MAX = torch.finfo(torch.float32).max


def _positive_normal(t: torch.Tensor, what: str, top: float, top_why: str) -> str | None:
    """Every value a positive normal float32 no larger than `top`; else why not (first offender named)."""
    v = t.double().reshape(-1)
    if not v.numel():
        return None
    checks = ((~torch.isfinite(v), "NaN/inf"), (v <= 0, "<= 0"), (v < F32_TINY, "denormal (< 1.2e-38)"),
              (v > top, f"> {top:.3g} ({top_why})"))
    for bad, label in checks:
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            return (f"{int(bad.sum())} value(s) {label}, first {float(v[i]):.6g} at flat index {i}; {what}")
    return None


def part_problem(fmt: str, part: str, t: torch.Tensor, K: int) -> str | None:
    """Why the stored values of part `part` of a `fmt` weight `[N, K]` cannot come from a quantizer (None
    when they can). The ranges and their reasons:
    - scales (`weight_scale_inv`, `weight_scale`): positive normal float32, times the largest code still
      finite. Quantizers write amax / code max floored at a positive value; 0 erases a block or channel, a
      negative scale flips its sign, a denormal loses its precision.
    - `offset` (`weight_offset`): a zero point inside the code range (int8 [-128, 127], int4 [-8, 7]).
    - `input_scale`: positive normal (the activation quantizer multiplies by its reciprocal).
    - `input_offset`: inside int8 [-128, 127] (it is added to int8 codes before they are clamped there).
    - `deq_scale`: positive normal, and the largest accumulator (127 x 128 x K + |quant_bias|) times it
      still finite in float32 (`npu_quant_matmul`'s output).
    Finiteness (NaN/inf) is checked for every float part besides."""
    if part == "scales":
        what = ("block-FP8 weight_scale_inv must be a positive normal float32: a quantizer writes amax / 448, "
                "floored above 0" if fmt == "fp8_block" else
                "a per-channel weight_scale must be a positive normal float32: a quantizer writes amax / code max, "
                "floored above 0")
        return _positive_normal(t, what, F32_MAX / (FP8_MAX if fmt == "fp8_block" else 128.0),
                                "the largest code times it overflows float32")
    if part == "offset":
        lo, hi = (INT4_MIN, INT4_MAX) if fmt == "w4a8_dynamic" else (INT8_MIN, INT8_MAX)
        bad = ~torch.isfinite(t) | (t < lo) | (t > hi)
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            return (f"{int(bad.sum())} value(s) outside the code range [{lo}, {hi}], first "
                    f"{float(t.reshape(-1)[i]):.6g} at flat index {i}; a weight_offset is a zero point among the codes")
    if part == "input_scale":
        return _positive_normal(t, "input_scale must be a positive normal float32: the activations are multiplied "
                                   "by its reciprocal", F32_MAX, "not finite")
    if part == "input_offset":
        v = float(t.reshape(-1)[0]) if t.numel() else 0.0
        if not (math.isfinite(v) and INT8_MIN <= v <= INT8_MAX):
            return (f"value {v:.6g} outside int8 [{INT8_MIN}, {INT8_MAX}]; input_offset is added to the int8 "
                    f"activation codes before they are clamped to that range")
    if part == "deq_scale":
        return _positive_normal(t, "deq_scale (input_scale x weight_scale) must be a positive normal float32",
                                F32_MAX / (INT8_MAX * 128.0 * max(K, 1) + 2.0 ** 31),
                                f"the largest int32 accumulator of K = {K} inputs times it overflows float32")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return f"{int((~torch.isfinite(t)).sum())} NaN/inf value(s)"
    return None


def check_weight(w, name: str = "weight") -> None:
    """`part_problem` for every part of a quantized `Weight` (a stack of experts too): ValueError naming
    the weight and the part."""
    if getattr(w, "format", "dense") == "dense":
        return
    K = w.shape[-1]
    for part, t in w.tensors().items():
        if part == "data":
            continue
        why = part_problem(w.format, part, t, K)
        if why:
            raise ValueError(f"{name} ({w.format}): its {part}: {why}")


# ---- int4 packing -------------------------------------------------------------------------------------

def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7] `[..., N, K]` -> int8 `[..., N/2, K]`: row 2i low nibble, row 2i+1 high."""
    if q.shape[-2] % 2:
        raise ValueError(f"pack_int4_rows: N = {q.shape[-2]} rows is odd")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError("pack_int4_rows: codes outside the int4 range [-8, 7]")
    q = q.to(torch.int16)
    lo, hi = q[..., 0::2, :] & 0xF, q[..., 1::2, :] & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_rows`: int8 `[..., N/2, K]` -> int8 codes `[..., N, K]` in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-2)                         # [..., N/2, 2, K]
    return out.reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1]).to(torch.int8)


# ---- activation recipes -------------------------------------------------------------------------------

def _round_int8(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v).clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def quantize_fp8_groups(x: torch.Tensor, group: int = 128, *, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_g128[_ue8m0]`: x `[..., K]` -> (e4m3 `[..., K]`, f32 scales `[..., ceil(K/group)]`)."""
    K = x.shape[-1]
    G = -(-K // group)
    xf = x.float()
    pad = G * group - K
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    xg = xp.reshape(*x.shape[:-1], G, group)
    amax = xg.abs().amax(dim=-1).clamp(min=FP8_AMAX_FLOOR)
    s = amax / FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (xg / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*x.shape[:-1], G * group)[..., :K], s


def dequantize_fp8_groups(q: torch.Tensor, s: torch.Tensor, group: int = 128, dtype=torch.float64) -> torch.Tensor:
    K = q.shape[-1]
    return q.to(dtype) * s.to(dtype).repeat_interleave(group, dim=-1)[..., :K]


def quantize_int8_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`int8_token`: x `[..., K]` -> (int8 `[..., K]`, f32 scale `[...]`)."""
    xf = x.float()
    s = xf.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return _round_int8(xf / safe[..., None]), s


def quantize_int8_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """`int8_static`: x `[..., K]` -> int8 `[..., K]` with one calibrated scale and offset."""
    inv = 1.0 / input_scale.float()
    return _round_int8(x.float() * inv + input_offset.float())


def quantize_activation(x: torch.Tensor, w) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x quantized as `w`'s format and recipe say -> (codes, scales) (scales None for int8_static)."""
    r = w.recipe
    if r in ("fp8_g128", "fp8_g128_ue8m0"):
        return quantize_fp8_groups(x, w.block[1], ue8m0=r.endswith("ue8m0"))
    if r == "int8_token":
        return quantize_int8_token(x)
    if r == "int8_static":
        return quantize_int8_static(x, w.aux["input_scale"], w.aux["input_offset"]), None
    raise ValueError(f"no activation recipe {r!r}")


# ---- weights: dequantize, quantize ----------------------------------------------------------------------

def codes(w) -> torch.Tensor:
    """The integer/FP8 codes of `w` unpacked to `[..., N, K]` (int4 unpacked)."""
    return unpack_int4_rows(w.data) if w.format == "w4a8_dynamic" else w.data


def dequantize(w, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A quantized `Weight` as a float tensor `[..., N, K]` (what its codes and scales stand for)."""
    if w.format == "dense":
        return w.data.to(dtype)
    if w.format == "fp8_block":
        bo, bi = w.block
        N, K = w.data.shape[-2:]
        s = w.scales.to(dtype).repeat_interleave(bo, dim=-2)[..., :N, :].repeat_interleave(bi, dim=-1)[..., :K]
        return w.data.to(dtype) * s
    q = codes(w).to(dtype)
    return (q - w.aux["offset"].to(dtype)[..., None]) * w.scales.to(dtype)[..., None]


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """float64 `[...]`: 0 for a row of x `[..., K]` that is finite, NaN for one holding NaN/inf. Added to a
    quantized product it keeps a non-finite activation visible: the int8 codes have no NaN (a cast turns
    NaN into code 0 and inf into 127), so without it a W8A8 model would launder NaN into numbers that the
    per-step finiteness check never sees, where a BF16 model trips it. On the device, no host read."""
    ok = torch.isfinite(x).all(dim=-1)
    return torch.where(ok, 0.0, math.nan).to(torch.float64)


def matmul_reference(x: torch.Tensor, w) -> torch.Tensor:
    """The exact arithmetic of format `w.format`: x `[..., K]` quantized by the recipe, both operands
    dequantized, products accumulated in float64. Returns float64 `[..., N]` (w one matrix). A row of x
    holding NaN/inf gives a NaN row (`nonfinite_rows`), whatever the recipe does with it."""
    if w.format == "dense":
        return x.double() @ w.data.double().T
    if w.format == "fp8_block":
        q, s = quantize_activation(x, w)
        y = dequantize_fp8_groups(q, s, w.block[1]) @ dequantize(w, torch.float64).T
    elif w.format == "w8a8_static":
        q, _ = quantize_activation(x, w)
        acc = q.double() @ w.data.double().T + w.aux["quant_bias"].double()
        y = acc * w.aux["deq_scale"].double()
    else:
        q, s = quantize_activation(x, w)
        y = (q.double() * s.double()[..., None]) @ dequantize(w, torch.float64).T
    return y + nonfinite_rows(x)[..., None]
