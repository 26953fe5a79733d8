"""sparse_mla: attention of absorbed MLA queries over the top-k selected latent rows (Triton).

Kernel versions and their idea:
  _partial_kernel  one program per (query token, split of the top-k list, BLOCK_H heads). It walks
                   its share of the selected positions in BLOCK_N steps: positions -> cache slots
                   through the block table, gathers the rows c [BLOCK_N, Dl] and k_pe [BLOCK_N, Dr]
                   from their two paged caches once for all BLOCK_H heads, scores = q_lat.c +
                   q_pe.k_pe, online softmax (base 2), acc += p @ c. `-1` entries are masked
                   (their rows are never read); positions are distinct by contract, so idx is read
                   as given, in any order, with no sort.
                   With one split (prefill: T x heads programs fill the GPU) it normalises and
                   writes out (and lse when asked) itself; with several (decode: T is small, so the
                   2048 rows are split across SMs) it writes an unnormalised partial and its
                   log-sum-exp, which the merge needs whether or not the caller asked for lse.
  _combine_kernel  merges the splits of one (token, 16 heads, 128 latent values) by log-sum-exp.
Rows with no valid index: out 0, lse -inf (as the reference).
Host wrapper: each token's request comes from the loose tensors (common.step_data, device ops at
each call). No host read on any path (grids from shapes), so a call can be captured in a CUDA
graph. idx is read as given: a position past the token's own is the caller's contract violation,
not checked here (the check would read back); only positions in 0..seq_len-1 are ever read.

Constants: BLOCK_N 32 rows per step, BLOCK_H up to 32 heads (acc [32, 512] f32 over 8 warps),
splits chosen so that programs ~ 2 x the SM count. Checked by an sm_90 ahead-of-time compile
(tests/test_cuda_compile.py); not tuned on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import check_float, check_shape, dot_in_f32, need, pow2, step_data

# BLOCK_N 32 rows x (512 + 64) bf16 = 36 KB per gathered tile; with BLOCK_H 32 heads the partial kernel
# compiles on sm_90 to ~76 KB shared and ~192 registers on 8 warps (no spills): a [32, 512] f32
# accumulator is 64 registers a thread. 64 heads or 64 rows would double both.
BLOCK_N = 32
MAX_BLOCK_H = 32
LOG2E = 1.4426950408889634


@triton.jit
def _partial_kernel(q_ptr, c_ptr, kpe_ptr, idx_ptr, bt_ptr, req_ptr, seqlen_ptr, out_ptr, lse_ptr, po_ptr, pl_ptr,
                    H, Dl, Dr, BS, topk, chunk, n_splits, scale_log2,
                    sq0, sq1, sq2, sc0, sc1, sc2, sp0, sp1, sp2, si0, si1, sbt0, so0, so1, so2,
                    BLOCK_H: tl.constexpr, DL_P: tl.constexpr, DR_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    DIRECT: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_F32: tl.constexpr):
    t = tl.program_id(0)
    split = tl.program_id(1)
    hb = tl.program_id(2)
    b = tl.load(req_ptr + t)
    L = tl.load(seqlen_ptr + b)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    dl = tl.arange(0, DL_P)
    dr = tl.arange(0, DR_P)
    q_row = q_ptr + t.to(tl.int64) * sq0 + h[:, None] * sq1
    q_lat = tl.load(q_row + dl[None, :] * sq2, mask=h_ok[:, None] & (dl[None, :] < Dl), other=0.0)
    q_pe = tl.load(q_row + (Dl + dr[None, :]) * sq2, mask=h_ok[:, None] & (dr[None, :] < Dr), other=0.0)
    if DOT_F32:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, DL_P), dtype=tl.float32)
    j0 = split * chunk
    j1 = tl.minimum(j0 + chunk, topk)
    idx_row = idx_ptr + t.to(tl.int64) * si0
    for j in range(j0, j1, BLOCK_N):
        jj = j + tl.arange(0, BLOCK_N)
        pos = tl.load(idx_row + jj * si1, mask=jj < j1, other=-1)
        ok = (pos >= 0) & (pos < L)
        blk = tl.load(bt_ptr + b.to(tl.int64) * sbt0 + pos // BS, mask=ok, other=0).to(tl.int64)
        slot = pos % BS
        c = tl.load(c_ptr + (blk * sc0 + slot * sc1)[:, None] + dl[None, :] * sc2,
                    mask=ok[:, None] & (dl[None, :] < Dl), other=0.0)
        pe = tl.load(kpe_ptr + (blk * sp0 + slot * sp1)[:, None] + dr[None, :] * sp2,
                     mask=ok[:, None] & (dr[None, :] < Dr), other=0.0)
        if DOT_F32:
            c = c.to(tl.float32)
            pe = pe.to(tl.float32)
            s = tl.dot(q_lat, tl.trans(c), input_precision="ieee")
            s = tl.dot(q_pe, tl.trans(pe), acc=s, input_precision="ieee")
        else:
            s = tl.dot(q_lat, tl.trans(c))
            s = tl.dot(q_pe, tl.trans(pe), acc=s)
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))                 # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                    # all masked so far
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = tl.dot(p, c, acc=acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(c.dtype), c, acc=acc * alpha[:, None])
        m_i = m_new

    empty = l_i == 0.0
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))   # base 2
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DIRECT:
        tl.store(out_ptr + t.to(tl.int64) * so0 + h[:, None] * so1 + dl[None, :] * so2,
                 o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & (dl[None, :] < Dl))
        if WRITE_LSE:
            tl.store(lse_ptr + t.to(tl.int64) * H + h, lse2 / 1.4426950408889634, mask=h_ok)
    else:
        base = (t.to(tl.int64) * n_splits + split) * H
        tl.store(po_ptr + (base + h[:, None]) * Dl + dl[None, :], o, mask=h_ok[:, None] & (dl[None, :] < Dl))
        tl.store(pl_ptr + base + h, lse2, mask=h_ok)


@triton.jit
def _combine_kernel(po_ptr, pl_ptr, out_ptr, lse_ptr, H, Dl, n_splits, so0, so1, so2,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    db = tl.program_id(2)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    dl = db * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(pl_ptr + (t.to(tl.int64) * n_splits + s) * H + h, mask=h_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for s in range(0, n_splits):
        base = (t.to(tl.int64) * n_splits + s) * H
        wgt = tl.exp2(tl.load(pl_ptr + base + h, mask=h_ok, other=float("-inf")) - m_safe)   # 0 for empty splits
        o = tl.load(po_ptr + (base + h[:, None]) * Dl + dl[None, :], mask=h_ok[:, None] & (dl[None, :] < Dl), other=0.0)
        acc += wgt[:, None] * o
        tot += wgt
    empty = tot == 0.0
    out = acc / tl.where(empty, 1.0, tot)[:, None]
    tl.store(out_ptr + t.to(tl.int64) * so0 + h[:, None] * so1 + dl[None, :] * so2,
             out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & (dl[None, :] < Dl))
    if WRITE_LSE and db == 0:                    # one value block per head block writes the lse
        lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, tot))) / 1.4426950408889634)
        tl.store(lse_ptr + t.to(tl.int64) * H + h, lse, mask=h_ok)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so the merge path is exercised on small cases


def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False,
               n_splits=None):
    """Contract: glm52_backends/ops/sparse_mla.py. q [T, H, Dl+Dr] (q_lat || q_pe), c_cache [NB, BS, Dl],
    kpe_cache [NB, BS, Dr] (q's dtype, any strides), idx [T, topk] int (-1 = none) -> out [T, H, Dl]
    in q.dtype, or (out, lse [T, H] f32) with return_lse. No host synchronisation.
    `n_splits` forces the number of top-k splits (tests, benchmarks); default: enough programs for
    ~2 waves of SMs."""
    op = "sparse_mla"
    check_float(op, q=q, c_cache=c_cache, kpe_cache=kpe_cache)
    need(q.dtype == c_cache.dtype == kpe_cache.dtype, op,
         f"q is {q.dtype}, c_cache {c_cache.dtype}, kpe_cache {kpe_cache.dtype} (the kernels take one dtype; "
         "an FP8 latent cache is not implemented in these kernels)")
    if q.dim() != 3 or c_cache.dim() != 3 or kpe_cache.dim() != 3:
        raise ValueError(f"{op}: need q [T, H, Dl+Dr], c_cache [NB, BS, Dl], kpe_cache [NB, BS, Dr]; got "
                         f"{list(q.shape)}, {list(c_cache.shape)}, {list(kpe_cache.shape)}")
    T, H, D = q.shape
    NB, BS, Dl = c_cache.shape
    Dr = D - Dl
    if Dr <= 0:
        raise ValueError(f"{op}: q's last dim {D} must be Dl + Dr with Dl = c_cache.shape[-1] = {Dl} and Dr > 0")
    check_shape(op, "kpe_cache", kpe_cache, (NB, BS, Dr))
    check_shape(op, "idx", idx, (T, None))
    need(idx.dtype in (torch.int32, torch.int64), op, f"idx has dtype {idx.dtype}, kernels take int32/int64")
    data = step_data(op, T, block_table, seq_lens, cu_seqlens_q)
    need(Dl <= 1024 and Dr <= 256, op, f"Dl={Dl}, Dr={Dr}: kernels take Dl <= 1024, Dr <= 256")
    topk = idx.shape[1]
    device = q.device
    out = torch.empty(T, H, Dl, dtype=q.dtype, device=device)
    lse = torch.empty(T, H, dtype=torch.float32, device=device) if return_lse else None
    if T == 0 or topk == 0:
        if topk == 0:
            out.zero_()
            if lse is not None:
                lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out
    BLOCK_H = min(pow2(H, 16), MAX_BLOCK_H)
    DL_P, DR_P = pow2(Dl, 16), pow2(Dr, 16)
    n_hb = triton.cdiv(H, BLOCK_H)
    if n_splits is None:
        # decode (T small): split the top-k list so ~2 waves of programs cover the SMs, but keep
        # >= 4 BLOCK_N steps per split (each split costs a [H, Dl] f32 partial write + combine read)
        want = 2 * _num_sms(device)
        n_splits = max(1, min(triton.cdiv(topk, 4 * BLOCK_N), want // (T * n_hb)))
    chunk = triton.cdiv(triton.cdiv(topk, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(topk, chunk)
    direct = n_splits == 1
    lse_arg = lse if return_lse else out                 # not written without return_lse
    if direct:
        po = pl = out  # unused
    else:
        po = torch.empty(T, n_splits, H, Dl, dtype=torch.float32, device=device)
        pl = torch.empty(T, n_splits, H, dtype=torch.float32, device=device)
    warps = 8 if Dl * BLOCK_H >= 8192 else 4    # 8 warps once the f32 accumulator is >= 8192 values
    bt = data.block_table
    wrap_triton(_partial_kernel)[(T, n_splits, n_hb)](
        q, c_cache, kpe_cache, idx, bt, data.token_request, data.seq_lens, out, lse_arg, po, pl,
        H, Dl, Dr, BS, topk, chunk, n_splits, float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), c_cache.stride(0), c_cache.stride(1), c_cache.stride(2),
        kpe_cache.stride(0), kpe_cache.stride(1), kpe_cache.stride(2),
        idx.stride(0), idx.stride(1), bt.stride(0), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_H=BLOCK_H, DL_P=DL_P, DR_P=DR_P, BLOCK_N=BLOCK_N, DIRECT=direct, WRITE_LSE=bool(return_lse),
        DOT_F32=dot_in_f32(q.dtype), num_warps=warps)
    if not direct:
        # [16 heads, 128 values] per program: a [32, 512] f32 accumulator on 4 warps (128 registers
        # a thread for it alone) spilled on sm_90; smaller tiles also give decode (T=1) more programs
        CB_H, CB_D = min(BLOCK_H, 16), min(DL_P, 128)
        wrap_triton(_combine_kernel)[(T, triton.cdiv(H, CB_H), triton.cdiv(Dl, CB_D))](
            po, pl, out, lse_arg, H, Dl, n_splits, out.stride(0), out.stride(1), out.stride(2),
            BLOCK_H=CB_H, BLOCK_D=CB_D, WRITE_LSE=bool(return_lse), num_warps=4)
    return (out, lse) if return_lse else out
