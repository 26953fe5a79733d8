"""indexer_topk: fused lightning-indexer scores + exact top-k selection (Triton).

Kernel versions and their idea:
  _scores_kernel  one program per (tile of <= BLOCK_M query tokens of one request, BLOCK_N key
                  positions). The tile's queries are one [BLOCK_M*Hi, Di] operand, so every key row
                  is read once per tile (decode with MTP drafts: once per request); the
                  [BLOCK_M*Hi, BLOCK_N] products are ReLU'd, weighted and summed over heads in
                  registers: a [T, L, H] tensor never exists. Output: fp32 scores [T, Lcap] written
                  only where s <= pos(t) (Lcap = max_blocks * block_size, a shape, so no host sync).
  _select_kernel  one program per query token: exact radix select of the k-th largest score. Keys
                  are the order-preserving uint32 images of the fp32 scores; four 8-bit histogram
                  passes each narrow the bucket holding the k-th key, counting exactly how many keys
                  lie strictly above it, so nothing is ever dropped however concentrated the scores
                  are (no candidate buffer to overflow). A last pass writes every key > tau and the
                  first (k - count_above) keys == tau in position order, i.e. ties go to the earlier
                  position, the same set the reference's stable sort picks. Valid entries first,
                  then -1. Rows with pos + 1 <= k take every position without selecting.
Host wrapper: the step's int32 tensors, each token's request and position come from the loose
tensors (common.step_data, device ops at each call); the query-tile table (request and first token
of each tile, over a bound that depends on shapes only) is built on the device at each call. No
host read on any path: grids are sized from shapes, so a call can be captured in a CUDA graph.

Constants: BLOCK_N 64 keys x Di 128 per score tile, BLOCK_M up to 4 query tokens (4 x 32 heads =
128 rows, at most 128 rows for wider indexers), SELECT_BLOCK 1024 scores per select step. Chosen
from the Triton MMA minimums and register budgets and checked by an sm_90 ahead-of-time compile
(tests/test_cuda_compile.py: shared memory, registers, spills); not tuned on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import CudaStepData, check_float, check_shape, dot_in_f32, need, pow2, step_data

# BLOCK_N 64 keys: at Hi=32, Di=128 bf16 the [128, 128] query + [64, 128] key tiles compile to
# 48 KB shared / 112 registers on sm_90 (no spills), so several programs fit per SM
BLOCK_N = 64
MAX_BLOCK_M = 4          # query tokens per tile: 4 x 32 heads = 128 MMA rows, every key row read once
MAX_ROWS = 128           # query rows (tokens x heads) per tile: caps shared memory for wide indexers
# select: 1024 scores per step on 8 warps = 4 per thread; histograms are 256 bins (8-bit digits)
SELECT_BLOCK = 1024
SELECT_WARPS = 8


@triton.jit
def _scores_kernel(q_ptr, w_ptr, k_ptr, bt_ptr, seqlen_ptr, cu_ptr, tile_req_ptr, tile_start_ptr, s_ptr,
                   Hi, Di, BS, Lcap,
                   sq0, sq1, sq2, sw0, sw1, sk0, sk1, sk2, sbt0,
                   BLOCK_M: tl.constexpr, HI_P: tl.constexpr, DI_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_F32: tl.constexpr):
    tile = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.load(tile_req_ptr + tile)
    if b < 0:
        return
    t0 = tl.load(tile_start_ptr + tile)
    c0 = tl.load(cu_ptr + b)
    c1 = tl.load(cu_ptr + b + 1)
    L = tl.load(seqlen_ptr + b)
    pos0 = L - (c1 - c0) + (t0 - c0)                       # position of the tile's first token
    n_tok = tl.minimum(c1 - t0, BLOCK_M)
    last_pos = pos0 + n_tok - 1
    p0 = kb * BLOCK_N
    if p0 > last_pos:
        return

    # queries of the tile as one operand: row r = m * HI_P + h   [BLOCK_M*HI_P, DI_P]
    r = tl.arange(0, BLOCK_M * HI_P)
    m = r // HI_P
    h = r % HI_P
    d = tl.arange(0, DI_P)
    row_ok = (m < n_tok) & (h < Hi)
    q = tl.load(q_ptr + (t0 + m)[:, None].to(tl.int64) * sq0 + h[:, None] * sq1 + d[None, :] * sq2,
                mask=row_ok[:, None] & (d[None, :] < Di), other=0.0)
    wt = tl.load(w_ptr + (t0 + m).to(tl.int64) * sw0 + h * sw1, mask=row_ok, other=0.0)   # [BLOCK_M*HI_P] f32

    # key rows p0 .. p0+BLOCK_N-1 through the block table   [BLOCK_N, DI_P]
    p = p0 + tl.arange(0, BLOCK_N)
    p_ok = p <= last_pos
    blk = tl.load(bt_ptr + b.to(tl.int64) * sbt0 + p // BS, mask=p_ok, other=0)
    k = tl.load(k_ptr + blk[:, None].to(tl.int64) * sk0 + (p % BS)[:, None] * sk1 + d[None, :] * sk2,
                mask=p_ok[:, None] & (d[None, :] < Di), other=0.0)
    if DOT_F32:
        dots = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        dots = tl.dot(q, tl.trans(k))                                                  # f32 accumulate
    contrib = tl.maximum(dots, 0.0) * wt[:, None]                                      # [BM*HI_P, BN]
    score = tl.sum(tl.reshape(contrib, (BLOCK_M, HI_P, BLOCK_N)), axis=1)              # [BM, BN]

    mm = tl.arange(0, BLOCK_M)
    causal = (mm[:, None] < n_tok) & (p[None, :] <= pos0 + mm[:, None])
    tl.store(s_ptr + (t0 + mm)[:, None].to(tl.int64) * Lcap + p[None, :], score, mask=causal)


@triton.jit
def _radix_digit(s_row, n, prefix, k_rem, SHIFT: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """One 8-bit radix pass: histogram the digit at SHIFT of the keys inside the current bucket
    (keys whose bits above SHIFT+8 equal `prefix`'s), then find the digit holding the k_rem-th
    largest key. Returns (prefix with that digit set, k_rem minus the keys strictly above it)."""
    bins = tl.arange(0, 256)
    hist = tl.zeros((256,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(s_row + offs, mask=ok, other=0.0)
        u = x.to(tl.uint32, bitcast=True)
        key = tl.where((u >> 31) != 0, ~u, u | 0x80000000)                 # order-preserving
        if not FIRST:
            ok = ok & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        digit = ((key >> SHIFT) & 255).to(tl.int32)
        hist += tl.histogram(digit, 256, mask=ok)
    # count_ge[b] = keys in the bucket whose digit >= b (a suffix sum: total - inclusive prefix
    # + own bin; a [256, 256] compare-and-sum here took all 255 registers and spilled on sm_90)
    count_ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    best = tl.max(tl.where(count_ge >= k_rem, bins, -1), axis=0)           # digit of the k_rem-th key
    above = tl.sum(tl.where(bins > best, hist, 0), axis=0)
    return prefix | (best.to(tl.uint32) << SHIFT), k_rem - above


@triton.jit
def _select_kernel(s_ptr, pos_ptr, idx_ptr, Lcap, K,
                   BLOCK: tl.constexpr):
    t = tl.program_id(0)
    n = tl.load(pos_ptr + t) + 1                          # causal row length
    s_row = s_ptr + t.to(tl.int64) * Lcap
    o_row = idx_ptr + t.to(tl.int64) * K
    if n <= K:                                            # every position is selected
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(o_row + offs, tl.where(offs < n, offs, -1), mask=offs < K)
        return

    prefix = tl.zeros((), dtype=tl.uint32)
    k_rem = K
    prefix, k_rem = _radix_digit(s_row, n, prefix, k_rem, 24, True, BLOCK)
    prefix, k_rem = _radix_digit(s_row, n, prefix, k_rem, 16, False, BLOCK)
    prefix, k_rem = _radix_digit(s_row, n, prefix, k_rem, 8, False, BLOCK)
    prefix, k_rem = _radix_digit(s_row, n, prefix, k_rem, 0, False, BLOCK)
    tau = prefix                                          # the k-th largest key, exactly
    n_above = K - k_rem                                   # keys > tau; k_rem ties (== tau) to take

    n_gt = 0
    n_eq = 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(s_row + offs, mask=ok, other=0.0)
        u = x.to(tl.uint32, bitcast=True)
        key = tl.where((u >> 31) != 0, ~u, u | 0x80000000)
        gt = ok & (key > tau)
        eq = ok & (key == tau)
        gt_i = gt.to(tl.int32)
        eq_i = eq.to(tl.int32)
        slot_gt = n_gt + tl.cumsum(gt_i, axis=0) - 1
        rank_eq = n_eq + tl.cumsum(eq_i, axis=0) - 1
        tl.store(o_row + slot_gt, offs, mask=gt)
        tl.store(o_row + n_above + rank_eq, offs, mask=eq & (rank_eq < k_rem))
        n_gt += tl.sum(gt_i, axis=0)
        n_eq += tl.sum(eq_i, axis=0)


def _tiles(data: CudaStepData, T: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query tiles of <= block_m consecutive tokens of one request: (request of each tile or -1,
    its first token, the number of tiles launched). At most ceil(T / block_m) + B tiles exist, a
    bound from shapes, so the grid never depends on the lengths' values (no host read)."""
    cu, B = data.cu_seqlens_q.long(), data.num_requests
    n_tiles = (cu[1:] - cu[:-1] + block_m - 1) // block_m                                # [B]
    cum = n_tiles.cumsum(0)
    bound = triton.cdiv(T, block_m) + B
    i = torch.arange(bound, device=cu.device)
    tb = torch.searchsorted(cum, i, right=True).clamp(max=B - 1)                          # [bound]
    start = cu[:-1][tb] + (i - (cum[tb] - n_tiles[tb])) * block_m
    return torch.where(i < cum[-1], tb, -1).to(torch.int32), start.to(torch.int32), bound


def indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
    """Contract: glm52_backends/ops/indexer_topk.py. q [T, Hi, Di], w [T, Hi] f32, k_cache [NB, BS, Di]
    (same dtype as q), any strides -> idx [T, topk] int32 on q's device. No host synchronisation:
    shapes and dtypes are checked, the lengths' values are the caller's contract."""
    op = "indexer_topk"
    check_float(op, q=q, k_cache=k_cache)
    need(q.dtype == k_cache.dtype, op, f"q is {q.dtype} but k_cache is {k_cache.dtype}")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [T, Hi, Di], got shape {list(q.shape)}")
    T, Hi, Di = q.shape
    check_shape(op, "w", w, (T, Hi))
    check_shape(op, "k_cache", k_cache, (None, None, Di))
    if not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"{op}: topk must be a positive int, got {topk!r}")
    NB, BS, _ = k_cache.shape
    data = step_data(op, T, block_table, seq_lens, cu_seqlens_q)
    need(Hi <= 128 and Di <= 256, op, f"Hi={Hi}, Di={Di}: kernels take Hi <= 128 and Di <= 256")
    device = q.device
    idx = torch.empty(T, topk, dtype=torch.int32, device=device)
    if T == 0:
        return idx
    w = w.float()

    HI_P, DI_P = pow2(Hi), pow2(Di, 16)
    # BLOCK_M from T (a shape; per-request q_len would need a host sync): decode batches of
    # 1-token requests get partly empty tiles, which only idles MMA rows of a memory-bound kernel.
    # At most MAX_ROWS query rows per tile: Hi=32 -> 4 tokens; Hi=64/128 -> 2/1 (at Hi=128, Di=256
    # a 4-token [512, 256] bf16 query operand alone is 256 KB, over H100's 227 KB shared memory).
    BLOCK_M = min(pow2(T), MAX_BLOCK_M, max(1, MAX_ROWS // HI_P))
    BLOCK_M = max(BLOCK_M, pow2(16 // HI_P))          # tl.dot needs >= 16 rows
    tile_req, tile_start, bound = _tiles(data, T, BLOCK_M)

    bt = data.block_table
    Lcap = bt.shape[1] * BS
    scores = torch.empty(T, Lcap, dtype=torch.float32, device=device)
    grid = (bound, triton.cdiv(Lcap, BLOCK_N))
    wrap_triton(_scores_kernel)[grid](q, w, k_cache, bt, data.seq_lens, data.cu_seqlens_q, tile_req, tile_start, scores,
                         Hi, Di, BS, Lcap,
                         q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
                         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
                         BLOCK_M=BLOCK_M, HI_P=HI_P, DI_P=DI_P, BLOCK_N=BLOCK_N,
                         DOT_F32=dot_in_f32(q.dtype), num_warps=4)
    wrap_triton(_select_kernel)[(T,)](scores, data.positions, idx, Lcap, topk, BLOCK=SELECT_BLOCK, num_warps=SELECT_WARPS)
    return idx
