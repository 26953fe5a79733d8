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
  - bfloat16 MoE when a weight's float32 scales are not exactly bfloat16 values: only for weights that
    did not go through the load-time preparation, which rounds them once (below);
  - w8a8_static experts (static is the recipe's attention format; no per-expert static path here),
    w4a8_dynamic everywhere (see `W4A8_DECLINE`), a weight matrix over the ops' 65535 / 65536 limits.

Preparation, once per weight at load (AscendBackend.prepare_weight; the result rides on the weight as
`Weight.prepared`, no cache in the backend):
  - bfloat16 model, expert stacks: the float32 scales rounded to bfloat16 values (Atlas A2/A3's int8
    npu_grouped_matmul outputs bfloat16 only with bfloat16 scales, 表 2), as vllm-ascend does at load,
    and kept as a bfloat16 tensor for the op;
  - float16 model, static linears: deq_scale truncated to the 19 bits npu_trans_quant_param keeps and
    encoded by it as int64 (npu_quant_matmul's float16 output without a per-token scale takes that form;
    its page requires it in graph mode);
  - the codes cast to FRACTAL_NZ (npu_format_cast, 29) in the layout the ops take them, [.., K, N]
    contiguous, the weight keeping a transposed view of it ([.., N, K], same bytes; GLM52_ASCEND_NZ=0
    keeps them ND);
  - the checks that read values (a non-zero offset, an offset that is not int8), the int32 bias, the
    static format's npu_quantize arguments for the model's dtype.
The rounded scales replace the weight's own, so the reference (conformance, fallbacks) computes with
the values the kernels use. `prepared_parts` declares the tensors made besides the weight's; the planner
counts them. A weight that skipped the preparation, or was modified in place since, is prepared for
each call instead (correct, with host reads).
"""

from __future__ import annotations

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
    """What the int8 kernels take for one `Weight` (a matrix [N, K] or an expert stack [E, N, K]) and
    activations of `dtype`, built once at load by `prepare` (AscendBackend.prepare_weight) and kept on the
    weight (`Weight.prepared`). Tensors are the weight's own where the kernels take them as they are;
    `tensors()` lists the ones made besides (what `prepared_parts` declares, what the planner counts)."""
    fmt: str
    dtype: torch.dtype                     # the activations it was built for
    signature: tuple                       # the weight's tensors it was built from (storage, shape, version)
    scale: torch.Tensor                    # the matmul scale: float32 [..., N] (dynamic: weight scale; static:
    #                                        deq_scale), bfloat16 [E, N] (experts, bfloat16 x) or int64 [N]
    #                                        (static, float16 x: npu_trans_quant_param's encoding)
    why_not: str | None = None             # a reason to decline every call with this weight
    bias: torch.Tensor | None = None       # static: quant_bias int32 [N]
    quant: tuple | None = None             # static: npu_quantize's (scale, zero point, div_mode) for `dtype`
    made: tuple = ()                       # names of the fields above that are new tensors

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.made:
            v = getattr(self, name.split(".")[0])
            out[name] = v[int(name.split(".")[1])] if "." in name else v
        return out


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:        # inference tensors keep no version counter
        return None


def _signature(w: Weight) -> tuple:
    """Host metadata only (no device read): the preparation holds while this is unchanged."""
    return (w.format, w.recipe) + tuple(
        (k, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, _version(t))
        for k, t in w.tensors().items())


def prepared_parts(fmt: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors `prepare` makes at load (after prepare_weight's rounding) for a weight of `fmt` and
    logical `shape` run with activations of `dtype`, besides the weight's own: {name: (shape, dtype)}.
    One declaration for the planner and the test that holds `prepare` to it."""
    N = tuple(shape[:-1])                                  # [..., N]: one per output channel
    if fmt == "w8a8_dynamic" and len(shape) == 3 and dtype == torch.bfloat16:
        return {"scale": (N, torch.bfloat16)}             # experts: npu_grouped_matmul's bfloat16 scales
    if fmt == "w8a8_static":
        parts = {"scale": (N, torch.int64)} if dtype == torch.float16 else {}
        if dtype == torch.float32:
            parts["quant.0"] = ((1,), torch.float32)       # 1 / input_scale (div_mode=False)
        else:
            parts["quant.1"] = ((1,), torch.int8)          # the zero point as int8 (div_mode=True)
        return parts
    return {}


ACL_FORMAT_FRACTAL_NZ = 29


def nz_codes(npu, data: torch.Tensor) -> torch.Tensor:
    """int8 codes [.., N, K] cast to FRACTAL_NZ in the layout the ops take them, [.., K, N] contiguous (the
    npu_quant_matmul page's A2/A3 example: x2 transposed to (k, n), made contiguous, then cast to 29);
    returned as the weight's [.., N, K] view of that tensor, so `data.transpose(-1, -2)` is the cast one."""
    kn = data.transpose(-1, -2).contiguous()
    return npu.npu_format_cast(kn, ACL_FORMAT_FRACTAL_NZ).transpose(-1, -2)


def trunc19(scale: torch.Tensor) -> torch.Tensor:
    """float32 values kept to the 19 high bits npu_trans_quant_param stores (sign, exponent, 10 mantissa
    bits: round_mode=0 truncates), as float32."""
    return (scale.float().contiguous().view(torch.int32) & -8192).view(torch.float32)


def prepare(npu, w: Weight, dtype: torch.dtype) -> Prepared:
    """The kernels' view of `w` for activations of `dtype` (host reads: the offset and exactness checks,
    once). In a float16 model a static weight's deq_scale in `trunc19` values (prepare_weight truncates
    it) goes to the op as its exact int64 encoding."""
    sig = _signature(w)
    if w.format == "w8a8_dynamic":
        p = Prepared(w.format, dtype, sig, w.scales.float().contiguous())
        if w.data.dim() == 3 and dtype == torch.bfloat16:
            bf = p.scale.to(torch.bfloat16)
            if bool(torch.equal(bf.float(), p.scale)):
                p.scale, p.made = bf, ("scale",)
            else:
                p.why_not = ("its float32 scales are not bfloat16 values: Atlas A2/A3's int8 npu_grouped_matmul "
                             "outputs bfloat16 only with bfloat16 scales (表 2); prepared at load "
                             "(AscendBackend.prepare_weight) they are rounded once, as vllm-ascend does")
        if bool(w.aux["offset"].any()):
            p.why_not = ("w8a8_dynamic weight with a non-zero offset: npu_quant_matmul / npu_grouped_matmul "
                         "with a per-token scale take no weight offset (symmetric weights only)")
        return p
    # w8a8_static: y = deq_scale * (q_x @ q_W^T + quant_bias); q_x = round(x * (1 / input_scale) + input_offset)
    deq = w.aux["deq_scale"].float().contiguous()
    p = Prepared(w.format, dtype, sig, deq, bias=w.aux["quant_bias"].to(torch.int32).contiguous())
    isc, ioff = w.aux["input_scale"].float().reshape(1), w.aux["input_offset"].float().reshape(1)
    if dtype == torch.float16 and bool(torch.equal(trunc19(deq), deq)):
        # npu_quant_matmul with float16 output and no per-token scale takes the scale as npu_trans_quant_param's
        # int64 (its page: required in graph mode), which keeps 19 bits of the float32: prepare_weight
        # truncates deq_scale to them at load. A weight that skipped that keeps the float32 scale, which
        # 表 2 admits in eager mode.
        p.scale = npu.npu_trans_quant_param(deq)
        p.made = ("scale",)
    if dtype == torch.float32:
        # float32 x (emulator only): div_mode=False with float32 scales = the recipe's own arithmetic
        p.quant = ((1.0 / isc).contiguous(), ioff.contiguous(), False)
        p.made += ("quant.0",)
        return p
    # half x: div_mode=False would need scales in x's dtype (1/input_scale rounded to bfloat16/float16:
    # up to 2^-9 off, shifting codes on many elements); div_mode=True takes float32 scales and divides:
    # x / input_scale differs from x * (1 / input_scale) by at most one float32 rounding, which moves a
    # code by one step only where the value lies within that rounding of a .5 tie (the one-step
    # allowance of spec/quantization.md §2). Its zero points are int8/int32/bfloat16: int8 here.
    o = float(ioff)
    if o == round(o) and -128 <= o <= 127:
        p.quant = (isc.contiguous(), ioff.to(torch.int8), True)
        p.made += ("quant.1",)
    else:
        p.why_not = p.why_not or (f"w8a8_static input_offset {o} is not an int8 integer: npu_quantize's division "
                                  f"form (float32 scale) takes int8/int32/bfloat16 zero points")
    return p


def _format(w, op: str, name: str) -> None:
    fmt = weight_format(w)
    decline(fmt != "w4a8_dynamic", f"{op}: weight {name}: {W4A8_DECLINE}")
    decline(fmt in INT8_FORMATS, f"{op}: weight {name} has format {fmt!r}; this backend runs "
                                 f"{', '.join(WEIGHT_FORMATS)} weights")


def _prepared(backend, w: Weight, op: str, name: str, dtype: torch.dtype) -> Prepared:
    """The preparation made at load when it still describes `w` (same tensors, same version, same
    activation dtype); otherwise one made for this call (a weight that never went through
    prepare_weight, or was modified in place since: correct, but with host reads every call)."""
    _format(w, op, name)
    p = w.prepared
    if not (isinstance(p, Prepared) and p.dtype == dtype and p.signature == _signature(w)):
        p = prepare(backend.npu, w, dtype)
        backend.preparations += 1
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
    return _prepared(backend, w, op, name, x_dtype_of.dtype)


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
        # int8 codes hold no NaN (a NaN input becomes code 0): keep a non-finite input row visible, as the
        # reference does (quant.nonfinite_rows), so the model's finiteness check sees it; no host read
        y = y + torch.where(torch.isfinite(x2).all(-1, keepdim=True), 0.0, float("nan")).to(y.dtype)
    return y.view(*x.shape[:-1], N)


def _static_quantize(npu, x2: torch.Tensor, p: Prepared) -> torch.Tensor:
    """The int8_static recipe through npu_quantize: float32 x (emulator) multiplies by 1/input_scale
    (div_mode=False, scales of x's dtype = float32, exactly the recipe); half x divides by the float32
    input_scale (div_mode=True; see `prepare`)."""
    sc, zp, div = p.quant
    return npu.npu_quantize(x2, sc, zp, torch.qint8, -1, div)


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
    # bfloat16 x: the bfloat16 scales prepared at load; float16 output and float32 (emulator): float32
    p13, p2 = _prepared(backend, w13, op, "w13", x.dtype), _prepared(backend, w2, op, "w2", x.dtype)
    return p13.scale, p2.scale


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
