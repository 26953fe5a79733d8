"""W8A8 on Ascend: `linear`, `mlp` and `moe_experts` for the `w8a8_dynamic` and `w8a8_static` weight
formats (their arithmetic: glm52_backends/quant.py), and the once-per-weight preparation they need.

    linear, w8a8_dynamic   npu_dynamic_quant(x) -> (q, s);  npu_quant_matmul(q, W^T, scale, pertoken_scale=s)
    linear, w8a8_static    npu_quantize(x, input scale, input offset) -> q;
                           npu_quant_matmul(q, W^T, deq_scale, bias=quant_bias)     (int32 bias: added
                           to the int32 accumulator, then scaled: y = deq_scale * (q @ W^T + quant_bias))
    mlp                    linear(w13) -> npu_swiglu -> linear(w2): the SwiGLU output, in x's dtype, is the
                           second linear's input (quantised by its own recipe), as the reference does
    moe_experts, dynamic   npu_moe_init_routing_v2(quant_mode=1) -> int8 npu_grouped_matmul(scale,
                           per_token_scale) -> npu_swiglu -> npu_dynamic_quant -> int8 npu_grouped_matmul
                           -> npu_moe_token_unpermute  (the call pattern of vllm-ascend's w8a8_dynamic MoE)

Outputs are in x's dtype, computed by the ops as their docs say (int32 accumulation, then the
scales in float32). Declined (-> reference), each with its reason:
  - activations other than bfloat16/float16 (npu_dynamic_quant takes only those; float32 runs only on
    the emulator with `allow_float32`, like the other half-only ops);
  - w8a8_dynamic weights with a non-zero `offset` (npu_quant_matmul / npu_grouped_matmul with a
    per-token scale take no weight offset; the msModelSlim dynamic weights are symmetric);
  - w8a8_static with half activations when the input offset is not an int8 integer (npu_quantize's
    division form takes int8/int32/bfloat16 zero points; see `_static_quantize`);
  - bfloat16 MoE when a weight's float32 scales are not exactly bfloat16 values: Atlas A2/A3's int8
    grouped matmul outputs bfloat16 only with bfloat16 scales (表 2 of its page), and rounding the
    scales would change the format's arithmetic by up to 2^-9 per channel (float16 uses float32 scales);
  - w8a8_static experts (static is the recipe's attention format; no per-expert static path here),
    w4a8_dynamic everywhere (see `W4A8_DECLINE`), a weight matrix over the ops' 65535 / 65536 limits.

Preparation: what the kernels need besides the stored tensors (float32/bfloat16 scale vectors, the
static format's quantize arguments and int32 bias, and the checks above that read values) is built
ONCE per weight and kept in the backend (`PreparedCache`, keyed by the weight's code tensor; an entry
is rebuilt when any of the weight's tensors is replaced or modified in place, and dropped when the
code tensor is freed: it holds no reference to the codes, which go to the ops as transposed views
`[.., K, N]` made per call, a stride change and no copy). The first call with a weight pays
the host reads of those checks; later calls read nothing back. The codes stay ND (npu_format_cast to
FRACTAL_NZ, which the docs recommend for speed on a device, is not applied: see README).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from glm52_backends.weights import Weight, weight_format

from .common import GMM_INNER_LIMIT, GMM_MAX_GROUPS, UNPERMUTE_MAX_TOPK, decline

INT8_FORMATS = ("w8a8_dynamic", "w8a8_static")
WEIGHT_FORMATS = ("dense",) + INT8_FORMATS
QMM_LAST_DIM = 65535          # npu_quant_matmul: the last dims of x1 and x2 must not exceed this
W4A8_DECLINE = ("w4a8_dynamic is not wired on this backend: on Atlas A2/A3 the documented int4 paths are "
                "int4 x int4 npu_quant_matmul (int4 activations, not this format's int8 ones) and the "
                "weight-only int4 grouped matmul (float activations); the int8 x int4 grouped matmul (S8S4, "
                "K-C int4) is documented for the Ascend 950 only")


def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ---- the once-per-weight preparation ---------------------------------------------------------------

@dataclass
class Prepared:
    """What the int8 kernels take for one `Weight` (a matrix [N, K] or an expert stack [E, N, K])."""
    fmt: str
    scale: torch.Tensor                    # float32 [..., N]: weight scale (dynamic) or deq_scale (static)
    why_not: str | None = None             # a reason to decline every call with this weight
    scale_bf16: torch.Tensor | None = None  # the scales as bfloat16 when exactly representable (grouped matmul)
    bias: torch.Tensor | None = None       # static: quant_bias int32 [N]
    quant_f32: tuple | None = None         # static, float32 x: npu_quantize(div_mode=False) scales, zero points
    quant_half: tuple | None = None        # static, half x: npu_quantize(div_mode=True) scales, zero points
    why_not_half: str | None = None        # static: why half activations are declined


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:        # inference tensors keep no version counter
        return None


def _signature(w: Weight) -> tuple:
    return (w.format, w.recipe) + tuple(
        (k, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, _version(t))
        for k, t in w.tensors().items())


class PreparedCache:
    """Prepared weights keyed by their code tensor (`Weight.data`): rebuilt when the weight's tensors
    change (storage, shape, strides, dtype or in-place version), dropped when the code tensor dies."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, tuple, Prepared]] = {}
        self.built = 0                      # how many preparations ran (tests count them)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, w: Weight) -> Prepared:
        key, sig = id(w.data), _signature(w)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is w.data and hit[1] == sig:
            return hit[2]
        p = _prepare(w)
        self.built += 1
        if hit is None or hit[0]() is not w.data:
            weakref.finalize(w.data, self._entries.pop, key, None)
        self._entries[key] = (weakref.ref(w.data), sig, p)
        return p


def _prepare(w: Weight) -> Prepared:
    """The kernels' view of `w` (host reads: the offset and exactness checks, once)."""
    scale = w.scales.float().contiguous()
    p = Prepared(w.format, scale)
    bf = scale.to(torch.bfloat16)
    p.scale_bf16 = bf if bool(torch.equal(bf.float(), scale)) else None
    if w.format == "w8a8_dynamic":
        if bool(w.aux["offset"].any()):
            p.why_not = ("w8a8_dynamic weight with a non-zero offset: npu_quant_matmul / npu_grouped_matmul "
                         "with a per-token scale take no weight offset (symmetric weights only)")
        return p
    # w8a8_static: y = deq_scale * (q_x @ q_W^T + quant_bias); q_x = round(x * (1 / input_scale) + input_offset)
    isc, ioff = w.aux["input_scale"].float().reshape(1), w.aux["input_offset"].float().reshape(1)
    p.scale = w.aux["deq_scale"].float().contiguous()
    p.bias = w.aux["quant_bias"].to(torch.int32).contiguous()
    # float32 x (emulator only): div_mode=False with float32 scales = the recipe's own arithmetic
    p.quant_f32 = ((1.0 / isc).contiguous(), ioff.contiguous())
    # half x: div_mode=False would need scales in x's dtype (1/input_scale rounded to bfloat16/float16:
    # up to 2^-9 off, shifting codes on many elements); div_mode=True takes float32 scales and divides:
    # x / input_scale differs from x * (1 / input_scale) by at most one float32 rounding, which moves a
    # code by one step only where the value lies within that rounding of a .5 tie (the one-step
    # allowance of spec/quantization.md §2). Its zero points are int8/int32/bfloat16: int8 here.
    o = float(ioff)
    if o == round(o) and -128 <= o <= 127:
        p.quant_half = (isc.contiguous(), ioff.to(torch.int8))
    else:
        p.why_not_half = (f"w8a8_static input_offset {o} is not an int8 integer: npu_quantize's division form "
                          f"(float32 scale) takes int8/int32/bfloat16 zero points")
    return p


def _format(w, op: str, name: str) -> None:
    fmt = weight_format(w)
    decline(fmt != "w4a8_dynamic", f"{op}: weight {name}: {W4A8_DECLINE}")
    decline(fmt in INT8_FORMATS, f"{op}: weight {name} has format {fmt!r}; this backend runs "
                                 f"{', '.join(WEIGHT_FORMATS)} weights")


def _prepared(backend, w: Weight, op: str, name: str) -> Prepared:
    _format(w, op, name)
    p = backend.prepared.get(w)
    decline(p.why_not is None, f"{op}: weight {name}: {p.why_not}")
    return p


def _act_dtype(backend, x: torch.Tensor, op: str) -> None:
    decline(x.dtype in backend.half_op_dtypes,
            f"{op}: the int8 path quantises with npu_dynamic_quant / npu_quantize and outputs through "
            f"npu_quant_matmul, which take bfloat16/float16 activations, got {_name(x.dtype)}")


# ---- linear ----------------------------------------------------------------------------------------

def check_linear(backend, x_dtype_of: torch.Tensor, K: int, w, op: str, name: str):
    """Decline up front what `quant_linear` cannot run; -> the Prepared weight."""
    _format(w, op, name)
    _act_dtype(backend, x_dtype_of, op)
    decline(w.data.dim() == 2, f"{op}: a quantised weight must be one matrix, got shape {tuple(w.shape)}")
    N, Kw = w.shape
    decline(K == Kw, f"{op}: x has {K} inputs, weight {name} takes {Kw}")
    decline(K <= QMM_LAST_DIM and N <= QMM_LAST_DIM,
            f"{op}: npu_quant_matmul takes x1 / x2 last dims <= {QMM_LAST_DIM}, weight {name} is [{N}, {K}]")
    p = _prepared(backend, w, op, name)
    if p.fmt == "w8a8_static" and x_dtype_of.dtype != torch.float32:
        decline(p.why_not_half is None, f"{op}: weight {name}: {p.why_not_half}")
    return p


def quant_linear(backend, x: torch.Tensor, w: Weight, p: Prepared) -> torch.Tensor:
    npu = backend.npu
    K, N = x.shape[-1], w.shape[-2]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:                    # npu_quant_matmul refuses an empty x1
        return x.new_zeros(*x.shape[:-1], N)
    if p.fmt == "w8a8_dynamic":
        q, s = npu.npu_dynamic_quant(x2)                                              # int8 [M, K], f32 [M]
        y = npu.npu_quant_matmul(q, w.data.t(), p.scale, pertoken_scale=s, output_dtype=x.dtype)
    else:
        q = _static_quantize(npu, x2, p)
        y = npu.npu_quant_matmul(q, w.data.t(), p.scale, bias=p.bias, output_dtype=x.dtype)
    return y.view(*x.shape[:-1], N)


def _static_quantize(npu, x2: torch.Tensor, p: Prepared) -> torch.Tensor:
    """The int8_static recipe through npu_quantize: float32 x (emulator) multiplies by 1/input_scale
    (div_mode=False, scales of x's dtype = float32, exactly the recipe); half x divides by the float32
    input_scale (div_mode=True; see `_prepare`)."""
    if x2.dtype == torch.float32:
        sc, zp = p.quant_f32
        return npu.npu_quantize(x2, sc, zp, torch.qint8, -1, False)
    sc, zp = p.quant_half
    return npu.npu_quantize(x2, sc, zp, torch.qint8, -1, True)


def linear(backend, x, weight):
    """linear for a quantised `Weight` (supporting.linear hands it over)."""
    p = check_linear(backend, x, x.shape[-1], weight, "linear", "weight")
    return quant_linear(backend, x, weight, p)


# ---- mlp ------------------------------------------------------------------------------------------------

def mlp(backend, x, w13, w2):
    """mlp with at least one quantised weight: linear(w13) -> npu_swiglu -> linear(w2), each linear by
    its weight's format (a dense one through F.linear in x's dtype, as supporting.mlp does)."""
    import torch.nn.functional as F
    for w, name in ((w13, "w13"), (w2, "w2")):
        if weight_format(w) != "dense":
            _format(w, "mlp", name)
    I2 = w13.shape[-2]
    decline(I2 % 2 == 0 and w2.shape[-1] == I2 // 2, f"mlp: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} "
                                                     f"do not chain")
    preps = []
    for w, name, K in ((w13, "w13", x.shape[-1]), (w2, "w2", I2 // 2)):
        if weight_format(w) == "dense":
            t = w.data if isinstance(w, Weight) else w
            decline(t.dtype == x.dtype, f"mlp: x {_name(x.dtype)} and dense weight {name} {_name(t.dtype)} differ")
            preps.append(t)
        else:
            preps.append(check_linear(backend, x, K, w, "mlp", name))

    def lin(v, w, p):
        return F.linear(v, p) if isinstance(p, torch.Tensor) else quant_linear(backend, v, w, p)

    h = lin(x, w13, preps[0])
    return lin(backend.npu.npu_swiglu(h, dim=-1), w2, preps[1])


# ---- moe_experts ------------------------------------------------------------------------------------------

def check_moe(backend, x, w13, w2, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decline up front; -> the grouped matmuls' scales of w13 and w2 for x's dtype."""
    op = "moe_experts"
    f13, f2 = weight_format(w13), weight_format(w2)
    for w, name in ((w13, "w13"), (w2, "w2")):
        if weight_format(w) != "dense":
            _format(w, op, name)
    decline(f13 == f2 == "w8a8_dynamic",
            f"{op}: experts in formats {f13!r} / {f2!r}; the int8 MoE path runs w8a8_dynamic w13 and w2 "
            f"(w8a8_static is the recipe's attention format), the dense path dense ones")
    _act_dtype(backend, x, op)
    decline(w13.data.dim() == 3 and w2.data.dim() == 3,
            f"{op}: expert weights are stacks [E, N, K], got w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)}")
    E, I2, Hd = w13.shape
    decline(tuple(w2.shape) == (E, Hd, I2 // 2) and I2 % 2 == 0 and x.shape[-1] == Hd,
            f"{op}: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not chain")
    decline(2 <= E <= GMM_MAX_GROUPS, f"npu_grouped_matmul (one 3-D weight) takes 2..{GMM_MAX_GROUPS} groups "
                                      f"(group_list of length 1 is rejected), got {E}")
    decline(max(Hd, I2 // 2) < GMM_INNER_LIMIT, f"npu_grouped_matmul inner dims must be < {GMM_INNER_LIMIT}")
    decline(K <= UNPERMUTE_MAX_TOPK, f"npu_moe_token_unpermute takes topK <= {UNPERMUTE_MAX_TOPK}, got {K}")
    p13, p2 = _prepared(backend, w13, op, "w13"), _prepared(backend, w2, op, "w2")
    scales = []
    for p, name in ((p13, "w13"), (p2, "w2")):
        if x.dtype == torch.bfloat16:
            decline(p.scale_bf16 is not None,
                    f"{op}: weight {name}'s float32 scales are not bfloat16 values; Atlas A2/A3's int8 "
                    f"npu_grouped_matmul outputs bfloat16 only with bfloat16 scales (表 2), and rounding them "
                    f"would change the format's arithmetic (float16 activations take float32 scales)")
            scales.append(p.scale_bf16)
        else:                               # float16 output: float32 scales; float32 (emulator): float32
            scales.append(p.scale)
    return scales[0], scales[1]


def moe_experts_int8(backend, x, w13, w2, s13, s2, ids, T: int, K: int, E: int):
    """The int8 expert MLPs over the T*K routed rows -> y [T*K, Hd] in x's dtype, rows in the
    expert-sorted order of `row_of` (returned too, for the unpermute)."""
    npu = backend.npu
    # 1. sort the T*K (token, slot) rows by expert and quantise each row per token (dynamic int8)
    xq, row_of, counts, xs = npu.npu_moe_init_routing_v2(
        x.contiguous(), ids, active_num=T * K, expert_num=E, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, quant_mode=1, row_idx_type=0)                    # int8 [T*K, Hd], f32 [T*K]
    # 2. int8 grouped GEMM with per-channel and per-token scales -> x's dtype
    h = npu.npu_grouped_matmul([xq], [w13.data.transpose(1, 2)], scale=[s13], per_token_scale=[xs], group_list=counts,
                               split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype)[0]
    a = npu.npu_swiglu(h, dim=-1)                                                    # silu(gate) * up
    aq, as_ = npu.npu_dynamic_quant(a)                                               # requantise per row
    y = npu.npu_grouped_matmul([aq], [w2.data.transpose(1, 2)], scale=[s2], per_token_scale=[as_], group_list=counts,
                               split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype)[0]
    return y, row_of
