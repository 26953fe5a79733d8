"""moe_experts: permutation, grouped expert GEMMs, weighted combine (routing: moe_route.py).

Which implementation does what (and why):
  permutation    torch (argsort by expert, scatter_add counts, cumsum): a few launches, no host
                 sync, graph-capturable. Rows are sorted by expert, `-1` slots last.
  expert GEMMs   two interchangeable paths, chosen by `gemm=` ("auto" | "grouped_mm" | "triton"):
    grouped_mm   `torch._grouped_mm` (CUTLASS on SM90, bf16) for gate_up and down, with a Triton
                 SiLU*mul between them. Measured near the weight-streaming floor at decode sizes
                 (1.05-1.09x at T=16..128, spec/cuda-perf-anchors.md section 4.3), so "auto" uses it
                 for bfloat16 on a CUDA device whenever this torch has it.
    triton       `_gemm1_kernel` gathers token rows through the sorted order (no permuted copy of
                 x), computes gate and up tiles of the same columns in one program and applies
                 SiLU*mul in the epilogue (the [N, 2I] intermediate never reaches memory);
                 `_gemm2_kernel` is the down projection with the routing weight applied in its
                 epilogue. Used for float32/float16, where `_grouped_mm` is not a fast path, and
                 under the interpreter.
    fp8          block-FP8 experts ("fp8_block" `Weight`s for both w13 and w2, whatever `gemm=`
                 says: torch has no block-scaled grouped GEMM). x is quantized once per token
                 (fp8.py, w13's recipe); `_fp8_gemm1_kernel` gathers the codes through the sorted
                 order, accumulates gate and up per 128-wide K block in float32 (each block's FP8
                 dot times the row's activation scale and the column's weight scale, row n reading
                 scale row n // b0: 128x128 blocks or the 1x128 ones an odd gate/up width leaves),
                 rounds h to x's dtype, applies SiLU*up, rounds to x's dtype (the reference's two
                 roundings) and quantizes its 128 columns per row by w2's recipe in the epilogue
                 (one tile = one group), writing e4m3 codes + scales; `_fp8_gemm2_kernel` is the
                 block-scaled down projection times the routing weight, in float32 (the reference
                 sums the weighted expert outputs unrounded). BLOCK_M 16 at decode sizes, 64 when
                 experts average >= 64 rows (`fp8_block_m`).
  combine        Triton `_combine_kernel`: per token, the sum over its K expert outputs (a gather,
                 deterministic, no atomics), in float32, rounded once to x's dtype.
Weights: bare tensors or "dense" `Weight`s (the paths above), or "fp8_block" `Weight`s (the fp8
path); bare float8 tensors (no scales), other quantized formats and a dense/FP8 mix are declined
(OpUnsupported): the reference runs them.
M-block bookkeeping (`_permute`, `_m_blocks`) and the kernels' prologue (`_block`) are shared by the
dense and FP8 kernels.
Tiles: BLOCK_M 16 rows (decode: ~1 row per expert), BLOCK_N 64, BLOCK_K 64 (dense); FP8: BLOCK_N
= BLOCK_K = 128; checked by an sm_90 ahead-of-time compile (tests/test_cuda_compile.py), not tuned
on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from glm52_backends.weights import Weight

from .common import FLOATS, FP8_GROUP, check_shape, dense, dot_in_f32, fp8_block, interpreting, is_fp8_block, need
from .fp8 import TL_DTYPE, _dot_fp8, _group_scale, _quantize, _round_as, dot_mode, quantize_act

# BLOCK_M 16: the tl.dot minimum, and decode rarely has more rows per expert (T*8/256); BLOCK_N/K
# 64: gemm1 streams gate+up [64, 64] bf16 tiles (16 KB a stage), 36 KB shared at 3 stages on sm_90
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
COMBINE_BLOCK = 256      # hidden values per combine program: 6144 / 256 = 24 programs per token
SILU_BLOCK = 1024        # values per SiLU*mul program (grouped_mm path): 8 a thread on 4 warps
# FP8 expert GEMMs: K blocks and gemm1's column tiles are one 128-input scale group (gemm1's epilogue
# quantizes whole groups); gemm2's output columns 128 wide. BLOCK_M: fp8_block_m().
FP8_BLOCK_N = 128


# ---- expert GEMMs (Triton path) ------------------------------------------------------------------
@triton.jit
def _block(blk_e_ptr, blk_r0_ptr, blk_r1_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The prologue of every expert-GEMM program: its M-block (axis 0: the expert, -1 for a block
    past the last used one; the sorted rows r0 + [0, BLOCK_M) and which of them are < r1) and its
    output columns (axis 1). The caller returns at once when the expert is -1."""
    pid = tl.program_id(0)
    e = tl.load(blk_e_ptr + pid)
    r = tl.load(blk_r0_ptr + pid) + tl.arange(0, BLOCK_M)
    r_ok = r < tl.load(blk_r1_ptr + pid)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, r, r_ok, n


@triton.jit
def _gemm1_kernel(x_ptr, w13_ptr, tok_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, act_ptr,
                  Hd, I, sx0, sx1, sw0, sw1, sw2,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """act[r, n] = silu(x[tok[r]] . W1[e, n]) * (x[tok[r]] . W3[e, n]) for the rows of one M-block."""
    e, r, r_ok, n = _block(blk_e_ptr, blk_r0_ptr, blk_r1_ptr, BLOCK_M, BLOCK_N)
    if e < 0:
        return
    tok = tl.load(tok_ptr + r, mask=r_ok, other=0).to(tl.int64)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    w_base = w13_ptr + e.to(tl.int64) * sw0
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Hd, BLOCK_K):
        k = k0 + kk
        k_ok = k < Hd
        a = tl.load(x_ptr + tok[:, None] * sx0 + k[None, :] * sx1, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + n[:, None] * sw1 + k[None, :] * sw2, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        wu = tl.load(w_base + (I + n[:, None]) * sw1 + k[None, :] * sw2, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            acc_g = tl.dot(a, tl.trans(wg.to(tl.float32)), acc=acc_g, input_precision="ieee")
            acc_u = tl.dot(a, tl.trans(wu.to(tl.float32)), acc=acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, tl.trans(wg), acc=acc_g)
            acc_u = tl.dot(a, tl.trans(wu), acc=acc_u)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + r[:, None].to(tl.int64) * I + n[None, :], act.to(act_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm2_kernel(act_ptr, w2_ptr, rw_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, ys_ptr,
                  Hd, I, sw0, sw1, sw2,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """ys[r, n] = rw[r] * (act[r] . W2[e, n]) for the rows of one M-block."""
    e, r, r_ok, n = _block(blk_e_ptr, blk_r0_ptr, blk_r1_ptr, BLOCK_M, BLOCK_N)
    if e < 0:
        return
    n_ok = n < Hd
    kk = tl.arange(0, BLOCK_K)
    w_base = w2_ptr + e.to(tl.int64) * sw0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + kk
        k_ok = k < I
        a = tl.load(act_ptr + r[:, None].to(tl.int64) * I + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + n[:, None] * sw1 + k[None, :] * sw2, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc=acc)
    rw = tl.load(rw_ptr + r, mask=r_ok, other=0.0)
    tl.store(ys_ptr + r[:, None].to(tl.int64) * Hd + n[None, :], (acc * rw[:, None]).to(ys_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_gemm1_kernel(xq_ptr, xs_ptr, w13_ptr, ws_ptr, tok_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, aq_ptr, as_ptr,
                      Hd, I, G2, sxq0, sxs0, sw0, sw1, sw2, sws0, sws1, sws2, B0,
                      H_DTYPE: tl.constexpr, UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """Block-FP8 gate/up for the rows of one M-block, with the second GEMM's activation quantizer
    in the epilogue: h = (xq[tok[r]] . W13[e, n]) block-scaled, rounded to x's dtype (H_DTYPE) as
    the reference rounds it; act = silu(h_gate) * h_up, rounded to x's dtype; then the tile's
    BLOCK_N (= 128 = one group) columns quantized per row: aq[r, n] e4m3, as[r, column block]."""
    e, r, r_ok, n = _block(blk_e_ptr, blk_r0_ptr, blk_r1_ptr, BLOCK_M, BLOCK_N)
    if e < 0:
        return
    tok = tl.load(tok_ptr + r, mask=r_ok, other=0).to(tl.int64)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    w_base = w13_ptr + e.to(tl.int64) * sw0
    s_base = ws_ptr + e.to(tl.int64) * sws0
    sg_row = s_base + (n // B0) * sws1                   # weight-scale rows of the gate and up columns
    su_row = s_base + ((I + n) // B0) * sws1
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(Hd, BLOCK_K)):
        k = kb * BLOCK_K + kk
        k_ok = k < Hd
        wmask = n_ok[:, None] & k_ok[None, :]
        a = tl.load(xq_ptr + tok[:, None] * sxq0 + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + n[:, None] * sw1 + k[None, :] * sw2, mask=wmask, other=0.0)
        wu = tl.load(w_base + (I + n[:, None]) * sw1 + k[None, :] * sw2, mask=wmask, other=0.0)
        a_s = tl.load(xs_ptr + tok * sxs0 + kb, mask=r_ok, other=0.0)
        sg = tl.load(sg_row + kb * sws2, mask=n_ok, other=0.0)
        su = tl.load(su_row + kb * sws2, mask=n_ok, other=0.0)
        acc_g += _dot_fp8(a, wg, DOT) * a_s[:, None] * sg[None, :]
        acc_u += _dot_fp8(a, wu, DOT) * a_s[:, None] * su[None, :]
    hg = _round_as(acc_g, H_DTYPE)
    hu = _round_as(acc_u, H_DTYPE)
    act = _round_as(hg * tl.sigmoid(hg) * hu, H_DTYPE)
    act = tl.where(n_ok[None, :], act, 0.0)
    s = _group_scale(tl.max(tl.abs(act), axis=1), UE8M0)
    q = _quantize(act, s)
    r64 = r.to(tl.int64)
    tl.store(aq_ptr + r64[:, None] * I + n[None, :], q.to(aq_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])
    tl.store(as_ptr + r64 * G2 + tl.program_id(1), s, mask=r_ok)


@triton.jit
def _fp8_gemm2_kernel(aq_ptr, as_ptr, w2_ptr, ws_ptr, rw_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, ys_ptr,
                      Hd, I, G2, sw0, sw1, sw2, sws0, sws1, sws2, B0,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """Block-FP8 down projection: ys[r, n] = rw[r] * sum_kb (aq[r, kb] . W2[e, n, kb]) * as[r, kb] *
    ws[e, n // B0, kb], float32 (the reference sums the weighted expert outputs unrounded)."""
    e, r, r_ok, n = _block(blk_e_ptr, blk_r0_ptr, blk_r1_ptr, BLOCK_M, BLOCK_N)
    if e < 0:
        return
    n_ok = n < Hd
    r64 = r.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    w_base = w2_ptr + e.to(tl.int64) * sw0
    s_row = ws_ptr + e.to(tl.int64) * sws0 + (n // B0) * sws1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(I, BLOCK_K)):
        k = kb * BLOCK_K + kk
        k_ok = k < I
        a = tl.load(aq_ptr + r64[:, None] * I + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + n[:, None] * sw1 + k[None, :] * sw2, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(as_ptr + r64 * G2 + kb, mask=r_ok, other=0.0)
        w_s = tl.load(s_row + kb * sws2, mask=n_ok, other=0.0)
        acc += _dot_fp8(a, w, DOT) * a_s[:, None] * w_s[None, :]
    rw = tl.load(rw_ptr + r, mask=r_ok, other=0.0)
    tl.store(ys_ptr + r64[:, None] * Hd + n[None, :], acc * rw[:, None], mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _silu_mul_kernel(h_ptr, act_ptr, n_rows, I, BLOCK: tl.constexpr):
    """act[r] = silu(h[r, :I]) * h[r, I:], h [N, 2I] (grouped_mm path)."""
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < I
    g = tl.load(h_ptr + r.to(tl.int64) * 2 * I + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r.to(tl.int64) * 2 * I + I + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(act_ptr + r.to(tl.int64) * I + c, (g * tl.sigmoid(g) * u).to(act_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _combine_kernel(ys_ptr, inv_ptr, ids_ptr, w_ptr, y_ptr, Hd, K,
                    HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """y[t] = sum_k [w[t,k] *] ys[inv[t,k]] over the used slots, accumulated in f32."""
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < Hd
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K):
        slot = t.to(tl.int64) * K + k
        used = tl.zeros((BLOCK,), dtype=tl.int32) + (tl.load(ids_ptr + slot) >= 0).to(tl.int32)
        row = tl.load(inv_ptr + slot).to(tl.int64)
        v = tl.load(ys_ptr + row * Hd + c, mask=ok & (used != 0), other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + slot)
        acc += v
    # rounded to nearest even before the cast (the interpreter's own float32 -> bfloat16 cast truncates)
    tl.store(y_ptr + t.to(tl.int64) * Hd + c, _round_as(acc, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty),
             mask=ok)


def _permute(topk_ids: torch.Tensor, E: int):
    """Sort the T*K slots by expert (`-1` last). Returns (order [N]: sorted row -> flat slot,
    inv [N]: flat slot -> sorted row, counts [E] int64, ends [E] int32 = cumulative counts)."""
    ids = topk_ids.reshape(-1).long()
    key = torch.where(ids < 0, E, ids)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, key, torch.ones_like(key))[:E]
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=ids.device))
    return order, inv, counts, counts.cumsum(0).to(torch.int32)


def _m_blocks(counts: torch.Tensor, ends: torch.Tensor, N: int, E: int, block_m: int = BLOCK_M):
    """M-blocks of `block_m` rows that never straddle two experts: (expert or -1, row0, row1) per
    block, over a static bound ceil(N / block_m) + min(E, N) (no host sync)."""
    nb = (counts + block_m - 1) // block_m
    cum = nb.cumsum(0)
    bound = triton.cdiv(N, block_m) + min(E, N)
    i = torch.arange(bound, device=counts.device)
    e = torch.searchsorted(cum, i, right=True).clamp(max=E - 1)
    start = ends.long() - counts                                                    # [E]
    r0 = start[e] + (i - (cum[e] - nb[e])) * block_m
    blk_e = torch.where(i < cum[-1], e, -1).to(torch.int32)
    return blk_e, r0.to(torch.int32), ends[e].to(torch.int32), bound


def _use_grouped_mm(gemm: str, x: torch.Tensor) -> bool:
    has = hasattr(torch, "_grouped_mm")
    if gemm == "grouped_mm":
        need(has, "moe_experts", "gemm='grouped_mm' but this torch has no torch._grouped_mm")
        return True
    if gemm == "triton":
        return False
    return has and x.is_cuda and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0 and not interpreting()


def moe_experts(x, w13, w2, topk_ids, topk_weights, *, gemm: str = "auto"):
    """Contract: glm52_backends/ops/moe_experts.py. x [T, Hd]; w13 [E, 2I, Hd]; w2 [E, Hd, I] (tensors
    or dense `Weight`s); topk_ids [T, K] (-1 = unused); topk_weights [T, K] f32 -> y [T, Hd] in x's dtype."""
    op = "moe_experts"
    if gemm not in ("auto", "grouped_mm", "triton"):
        raise ValueError(f"{op}: gemm must be 'auto', 'grouped_mm' or 'triton', got {gemm!r}")
    if is_fp8_block(w13) or is_fp8_block(w2):
        return _moe_fp8(x, w13, w2, topk_ids, topk_weights, gemm)
    w13, w2 = dense(op, "w13", w13), dense(op, "w2", w2)
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"{op}: need x [T, Hd], w13 [E, 2I, Hd], w2 [E, Hd, I]; got {list(x.shape)}, "
                         f"{list(w13.shape)}, {list(w2.shape)}")
    T, Hd = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    check_shape(op, "w13", w13, (E, 2 * I, Hd))
    check_shape(op, "w2", w2, (E, Hd, I))
    check_shape(op, "topk_weights", topk_weights, tuple(topk_ids.shape))
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"{op}: topk_ids must be [T={T}, K], got {list(topk_ids.shape)}")
    need(w13.dtype in FLOATS and w2.dtype in FLOATS, op,
         f"expert weights are {w13.dtype}/{w2.dtype} tensors; FP8 experts run natively as 'fp8_block' "
         f"Weights (codes + block scales), bare FP8 tensors carry no scales")
    need(x.dtype in FLOATS, op, f"x has dtype {x.dtype}")
    need(w13.dtype == x.dtype and w2.dtype == x.dtype, op, f"x is {x.dtype}, weights {w13.dtype}/{w2.dtype}")
    K = topk_ids.shape[1]
    y = torch.empty(T, Hd, dtype=x.dtype, device=x.device)
    if T == 0 or K == 0:
        return y.zero_()
    N = T * K
    order, inv, counts, ends = _permute(topk_ids, E)
    tok = (order // K).to(torch.int32)                                               # token of each sorted row
    wflat = topk_weights.reshape(-1).float().contiguous()
    ids_flat = topk_ids.reshape(-1).contiguous()
    if _use_grouped_mm(gemm, x):
        h = torch._grouped_mm(x[tok.long()], w13.transpose(1, 2), offs=ends)         # [N, 2I]
        act = torch.empty(N, I, dtype=x.dtype, device=x.device)
        wrap_triton(_silu_mul_kernel)[(N, triton.cdiv(I, SILU_BLOCK))](h, act, N, I, BLOCK=SILU_BLOCK, num_warps=4)
        ys = torch._grouped_mm(act, w2.transpose(1, 2), offs=ends)                   # [N, Hd]
        has_w = True
    else:
        blk_e, r0, r1, bound = _m_blocks(counts, ends, N, E)
        act = torch.empty(N, I, dtype=x.dtype, device=x.device)
        dot32 = dot_in_f32(x.dtype)
        wrap_triton(_gemm1_kernel)[(bound, triton.cdiv(I, BLOCK_N))](
            x, w13, tok, blk_e, r0, r1, act, Hd, I, x.stride(0), x.stride(1),
            w13.stride(0), w13.stride(1), w13.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_F32=dot32, num_warps=4)
        rw = wflat[order]                                                            # weight of each sorted row
        ys = torch.empty(N, Hd, dtype=x.dtype, device=x.device)
        wrap_triton(_gemm2_kernel)[(bound, triton.cdiv(Hd, BLOCK_N))](
            act, w2, rw, blk_e, r0, r1, ys, Hd, I, w2.stride(0), w2.stride(1), w2.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_F32=dot32, num_warps=4)
        has_w = False
    wrap_triton(_combine_kernel)[(T, triton.cdiv(Hd, COMBINE_BLOCK))](ys, inv, ids_flat, wflat, y, Hd, K,
                                                         HAS_W=has_w, BLOCK=COMBINE_BLOCK, num_warps=4)
    return y


def fp8_block_m(N: int, E: int) -> int:
    """Rows per M-block of the FP8 expert GEMMs: 16 (the tl.dot minimum) while an expert averages
    under 64 rows (decode, small batches: most blocks would be padding otherwise), 64 beyond."""
    return 64 if N >= 64 * E else 16


def _fmt(w) -> str:
    return repr(w.format) if isinstance(w, Weight) else f"a {w.dtype} tensor"


def _moe_fp8(x, w13, w2, topk_ids, topk_weights, gemm: str):
    """Block-FP8 experts (both `fp8_block` Weights): x quantized once per token (w13's recipe), the
    gate/up GEMM with SiLU*up and w2's activation quantizer fused in its epilogue, the down GEMM in
    float32 with the routing weight, the combine rounding once to x's dtype: the reference's
    roundings (glm52_backends/ops/moe_experts.py), none more."""
    op = "moe_experts"
    need(is_fp8_block(w13) and is_fp8_block(w2), op,
         f"w13 is {_fmt(w13)}, w2 {_fmt(w2)}: the FP8 path takes both as 'fp8_block' Weights")
    need(gemm != "grouped_mm", op, "gemm='grouped_mm': torch has no block-scaled grouped GEMM; FP8 experts run "
                                   "the Triton kernels")
    w13, w2 = fp8_block(op, "w13", w13, lead=1), fp8_block(op, "w2", w2, lead=1)
    need(x.dtype in FLOATS, op, f"x has dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, Hd], got {list(x.shape)}")
    T, Hd = x.shape
    E, I2, _ = w13.data.shape
    I = I2 // 2
    check_shape(op, "w13", w13.data, (E, 2 * I, Hd))
    check_shape(op, "w2", w2.data, (E, Hd, I))
    check_shape(op, "topk_weights", topk_weights, tuple(topk_ids.shape))
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"{op}: topk_ids must be [T={T}, K], got {list(topk_ids.shape)}")
    need(w13.device == x.device and w2.device == x.device, op, f"x is on {x.device}, the weights on "
                                                               f"{w13.device}/{w2.device}")
    K = topk_ids.shape[1]
    y = torch.empty(T, Hd, dtype=x.dtype, device=x.device)
    if T == 0 or K == 0:
        return y.zero_()
    N = T * K
    order, inv, counts, ends = _permute(topk_ids, E)
    tok = (order // K).to(torch.int32)
    wflat = topk_weights.reshape(-1).float().contiguous()
    rw = wflat[order]
    bm = fp8_block_m(N, E)
    blk_e, r0, r1, bound = _m_blocks(counts, ends, N, E, bm)
    dot = dot_mode(x.dtype)
    xq, xs = quantize_act(x, w13.recipe.endswith("ue8m0"))                           # once per token
    G2 = triton.cdiv(I, FP8_GROUP)
    aq = torch.empty(N, I, dtype=torch.float8_e4m3fn, device=x.device)
    as_ = torch.empty(N, G2, dtype=torch.float32, device=x.device)
    ws, ws2 = w13.scales, w2.scales
    wrap_triton(_fp8_gemm1_kernel)[(bound, G2)](
        xq, xs, w13.data, ws, tok, blk_e, r0, r1, aq, as_, Hd, I, G2, xq.stride(0), xs.stride(0),
        *w13.data.stride(), *ws.stride(), w13.block[0],
        H_DTYPE=TL_DTYPE[x.dtype], UE8M0=w2.recipe.endswith("ue8m0"), BLOCK_M=bm, BLOCK_N=FP8_GROUP,
        BLOCK_K=FP8_GROUP, DOT=dot, num_warps=8 if bm > 16 else 4, num_stages=3)
    ys = torch.empty(N, Hd, dtype=torch.float32, device=x.device)
    wrap_triton(_fp8_gemm2_kernel)[(bound, triton.cdiv(Hd, FP8_BLOCK_N))](
        aq, as_, w2.data, ws2, rw, blk_e, r0, r1, ys, Hd, I, G2, *w2.data.stride(), *ws2.stride(), w2.block[0],
        BLOCK_M=bm, BLOCK_N=FP8_BLOCK_N, BLOCK_K=FP8_GROUP, DOT=dot, num_warps=8 if bm > 16 else 4, num_stages=3)
    wrap_triton(_combine_kernel)[(T, triton.cdiv(Hd, COMBINE_BLOCK))](ys, inv, topk_ids.reshape(-1).contiguous(), wflat, y, Hd,
                                                         K, HAS_W=False, BLOCK=COMBINE_BLOCK, num_warps=4)
    return y
