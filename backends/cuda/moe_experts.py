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
  combine        Triton `_combine_kernel`: per token, the sum over its K expert outputs (a gather,
                 deterministic, no atomics), in float32, rounded once to x's dtype.
Weights: bare tensors or `Weight`s of format "dense"; FP8 block-scaled expert weights (a "fp8_block"
`Weight`, or float8 tensors) are declined (OpUnsupported): the reference runs them.
Tiles: BLOCK_M 16 rows (decode: ~1 row per expert), BLOCK_N 64, BLOCK_K 64; checked by an sm_90
ahead-of-time compile (tests/test_cuda_compile.py), not tuned on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FLOATS, check_shape, dense, dot_in_f32, interpreting, need

# BLOCK_M 16: the tl.dot minimum, and decode rarely has more rows per expert (T*8/256); BLOCK_N/K
# 64: gemm1 streams gate+up [64, 64] bf16 tiles (16 KB a stage), 36 KB shared at 3 stages on sm_90
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
COMBINE_BLOCK = 256      # hidden values per combine program: 6144 / 256 = 24 programs per token
SILU_BLOCK = 1024        # values per SiLU*mul program (grouped_mm path): 8 a thread on 4 warps


# ---- expert GEMMs (Triton path) ------------------------------------------------------------------
@triton.jit
def _gemm1_kernel(x_ptr, w13_ptr, tok_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, act_ptr,
                  Hd, I, sx0, sx1, sw0, sw1, sw2,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """act[r, n] = silu(x[tok[r]] . W1[e, n]) * (x[tok[r]] . W3[e, n]) for the rows of one M-block."""
    pid = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(blk_e_ptr + pid)
    if e < 0:
        return
    r0 = tl.load(blk_r0_ptr + pid)
    r1 = tl.load(blk_r1_ptr + pid)
    r = r0 + tl.arange(0, BLOCK_M)
    r_ok = r < r1
    tok = tl.load(tok_ptr + r, mask=r_ok, other=0).to(tl.int64)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
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
    pid = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(blk_e_ptr + pid)
    if e < 0:
        return
    r0 = tl.load(blk_r0_ptr + pid)
    r1 = tl.load(blk_r1_ptr + pid)
    r = r0 + tl.arange(0, BLOCK_M)
    r_ok = r < r1
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
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
    tl.store(y_ptr + t.to(tl.int64) * Hd + c, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _permute(topk_ids: torch.Tensor, E: int):
    """Sort the T*K slots by expert (`-1` last). Returns (order [N]: sorted row -> flat slot,
    inv [N]: flat slot -> sorted row, counts [E] int64, ends [E] int32 = cumulative counts)."""
    ids = topk_ids.reshape(-1).long()
    key = torch.where(ids < 0, E, ids)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, key, torch.ones_like(key))[:E]
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=ids.device))
    return order, inv, counts, counts.cumsum(0).to(torch.int32)


def _m_blocks(counts: torch.Tensor, ends: torch.Tensor, N: int, E: int):
    """M-blocks of BLOCK_M rows that never straddle two experts: (expert or -1, row0, row1) per block,
    over a static bound ceil(N / BLOCK_M) + min(E, N) (no host sync)."""
    nb = (counts + BLOCK_M - 1) // BLOCK_M
    cum = nb.cumsum(0)
    bound = triton.cdiv(N, BLOCK_M) + min(E, N)
    i = torch.arange(bound, device=counts.device)
    e = torch.searchsorted(cum, i, right=True).clamp(max=E - 1)
    start = ends.long() - counts                                                    # [E]
    r0 = start[e] + (i - (cum[e] - nb[e])) * BLOCK_M
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
         f"expert weights are {w13.dtype}/{w2.dtype}; FP8 block-scaled experts are not implemented natively")
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
        _silu_mul_kernel[(N, triton.cdiv(I, SILU_BLOCK))](h, act, N, I, BLOCK=SILU_BLOCK, num_warps=4)
        ys = torch._grouped_mm(act, w2.transpose(1, 2), offs=ends)                   # [N, Hd]
        has_w = True
    else:
        blk_e, r0, r1, bound = _m_blocks(counts, ends, N, E)
        act = torch.empty(N, I, dtype=x.dtype, device=x.device)
        dot32 = dot_in_f32(x.dtype)
        _gemm1_kernel[(bound, triton.cdiv(I, BLOCK_N))](
            x, w13, tok, blk_e, r0, r1, act, Hd, I, x.stride(0), x.stride(1),
            w13.stride(0), w13.stride(1), w13.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_F32=dot32, num_warps=4)
        rw = wflat[order]                                                            # weight of each sorted row
        ys = torch.empty(N, Hd, dtype=x.dtype, device=x.device)
        _gemm2_kernel[(bound, triton.cdiv(Hd, BLOCK_N))](
            act, w2, rw, blk_e, r0, r1, ys, Hd, I, w2.stride(0), w2.stride(1), w2.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_F32=dot32, num_warps=4)
        has_w = False
    _combine_kernel[(T, triton.cdiv(Hd, COMBINE_BLOCK))](ys, inv, ids_flat, wflat, y, Hd, K,
                                                         HAS_W=has_w, BLOCK=COMBINE_BLOCK, num_warps=4)
    return y
