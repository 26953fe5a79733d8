"""mtp_verify: one fused pass over the target logits, greedy and rejection sampling (Triton).

Kernel versions and their idea:
  _stats_kernel   grid (B*(k+1) rows, V splits): each program reads its slice of one logits row once
                  and writes (max, argmax, sum of exp(x/temp - max)) for that slice. Splitting V keeps
                  all SMs streaming at B=1 (4 rows x 154880 logits would otherwise sit on 4 SMs).
  _verify_kernel  one program per request: merges the slices of its k+1 rows (argmax ties go to
                  the lower token id, as torch.argmax), walks the drafts (greedy: draft == argmax;
                  sampling: u_i < p(d_i) / q(d_i), p(d_i) from the merged max/sum and one logit load),
                  writes accepted and tokens (-1 after the emitted one). Sampling then draws the
                  correction token from norm(max(p - q, 0)) (or the bonus from p) by inverse CDF over
                  that one row: the only logits read twice, 1/(k+1) of the input.
top_p < 1 needs a sort of the row and is declined (OpUnsupported): the reference runs it.
Constants: SPLIT 8192 logits per stats program, BLOCK 2048 per step; not tuned on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import check_float, check_shape, need

# SPLIT 8192: 154880-entry rows give 19 stats programs a row, so B=1, k=3 still has 76 programs;
# BLOCK 2048 on 8 warps = 8 values a thread per step (3 f32/i32 lane vectors: ~40 registers)
SPLIT = 8192
BLOCK = 2048


@triton.jit
def _stats_kernel(logit_ptr, max_ptr, arg_ptr, sum_ptr, V, n_split, inv_temp,
                  SPLIT: tl.constexpr, BLOCK: tl.constexpr, SAMPLE: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    base = logit_ptr + row.to(tl.int64) * V
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    a = tl.zeros((BLOCK,), dtype=tl.int32)
    ssum = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(sp * SPLIT, tl.minimum(sp * SPLIT + SPLIT, V), BLOCK):
        offs = j + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if SAMPLE:
            x = x * inv_temp                                # same argmax, softmax of x / temp
        better = x > m                                      # strict: the earlier id keeps a tie
        m_new = tl.where(better, x, m)
        if SAMPLE:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            ssum = ssum * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
        a = tl.where(better, offs, a)
    mx = tl.max(m, axis=0)
    am = tl.min(tl.where(m == mx, a, 2147483647), axis=0)   # lowest id among the lane maxima
    out = row.to(tl.int64) * n_split + sp
    tl.store(max_ptr + out, mx)
    tl.store(arg_ptr + out, am)
    if SAMPLE:
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        tl.store(sum_ptr + out, tl.sum(ssum * tl.exp(m - mx_safe), axis=0))


@triton.jit
def _row_stats(max_ptr, arg_ptr, sum_ptr, row, n_split, NS_P: tl.constexpr, SAMPLE: tl.constexpr):
    """Merge the V-splits of one row: (max, argmax, sum of exp(. - max))."""
    s = tl.arange(0, NS_P)
    ok = s < n_split
    m = tl.load(max_ptr + row.to(tl.int64) * n_split + s, mask=ok, other=float("-inf"))
    a = tl.load(arg_ptr + row.to(tl.int64) * n_split + s, mask=ok, other=2147483647)
    mx = tl.max(m, axis=0)
    am = tl.min(tl.where(m == mx, a, 2147483647), axis=0)
    tot = 0.0
    if SAMPLE:
        sm = tl.load(sum_ptr + row.to(tl.int64) * n_split + s, mask=ok, other=0.0)
        tot = tl.sum(sm * tl.exp(m - tl.where(mx == float("-inf"), 0.0, mx)), axis=0)
    return mx, am, tot


@triton.jit
def _p_q_chunk(base, qbase, offs, V, inv_temp, mx, tot, rej, d_rej, HAS_Q: tl.constexpr):
    """One chunk of the target probabilities p and of the draft's q on the rejected row (0 elsewhere;
    q = one-hot of the rejected draft when there are no draft_probs)."""
    p = tl.exp(tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp - mx) / tot
    if HAS_Q:
        q = tl.load(qbase + offs, mask=(offs < V) & (rej != 0), other=0.0).to(tl.float32)
    else:
        q = tl.where((offs == d_rej) & (rej != 0), 1.0, 0.0)
    return p, q


@triton.jit
def _verify_kernel(logit_ptr, draft_ptr, dprob_ptr, u_ptr, max_ptr, arg_ptr, sum_ptr, acc_ptr, tok_ptr,
                   V, k, n_split, inv_temp, sd0, sd1,
                   NS_P: tl.constexpr, BLOCK: tl.constexpr, SAMPLE: tl.constexpr, HAS_Q: tl.constexpr):
    b = tl.program_id(0)
    row0 = b * (k + 1)
    n = 0
    go = 1
    for i in range(0, k):
        d = tl.load(draft_ptr + b.to(tl.int64) * sd0 + i * sd1)
        mx, am, tot = _row_stats(max_ptr, arg_ptr, sum_ptr, row0 + i, n_split, NS_P, SAMPLE)
        if SAMPLE:
            x = tl.load(logit_ptr + (row0 + i).to(tl.int64) * V + d).to(tl.float32)
            p = tl.exp(x * inv_temp - mx) / tot
            q = 1.0
            if HAS_Q:
                q = tl.load(dprob_ptr + (row0 - b + i).to(tl.int64) * V + d).to(tl.float32)
            ok = tl.load(u_ptr + b.to(tl.int64) * (k + 1) + i) < p / q
        else:
            ok = d.to(tl.int32) == am
        go = go & ok.to(tl.int32)
        n += go
        tl.store(tok_ptr + b.to(tl.int64) * (k + 1) + i, tl.where(go != 0, d.to(tl.int64), -1))
    tl.store(acc_ptr + b, n)
    row = row0 + n
    mx, am, tot = _row_stats(max_ptr, arg_ptr, sum_ptr, row, n_split, NS_P, SAMPLE)
    tok = am.to(tl.int64)
    if SAMPLE:
        # r = max(p - q, 0) on a rejected row (q = one-hot of the draft when no draft_probs),
        # r = p on the bonus row; all-zero r falls back to p. Inverse CDF: the first id whose
        # running sum exceeds u * sum(r) (the last id if rounding leaves none).
        base = logit_ptr + row.to(tl.int64) * V
        qbase = dprob_ptr + (row0 - b + n).to(tl.int64) * V
        rej = tl.zeros((BLOCK,), dtype=tl.int32) + (n < k).to(tl.int32)       # row n was a rejection
        d_rej = tl.load(draft_ptr + b.to(tl.int64) * sd0 + tl.minimum(n, tl.maximum(k - 1, 0)) * sd1).to(tl.int32)
        rtot = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, V, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            p, q = _p_q_chunk(base, qbase, offs, V, inv_temp, mx, tot, rej, d_rej, HAS_Q)
            rtot += tl.maximum(p - q, 0.0)
        total = tl.sum(rtot, axis=0)
        use_p = total <= 0.0
        total = tl.where(use_p, 1.0, total)        # sum of p, renormalised by construction
        target = tl.load(u_ptr + b.to(tl.int64) * (k + 1) + k) * total
        run = 0.0
        found = V - 1
        done = 0
        for j in range(0, V, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            p, q = _p_q_chunk(base, qbase, offs, V, inv_temp, mx, tot, rej, d_rej, HAS_Q)
            r = tl.where(use_p, p, tl.maximum(p - q, 0.0))
            c = run + tl.cumsum(r, axis=0)
            hit = tl.min(tl.where((c > target) & (offs < V), offs, 2147483647), axis=0)
            take = (hit < 2147483647) & (done == 0)
            found = tl.where(take, hit, found)
            done = done | take.to(tl.int32)
            run += tl.sum(r, axis=0)
        tok = found.to(tl.int64)
    tl.store(tok_ptr + b.to(tl.int64) * (k + 1) + n, tok)
    for i in range(n + 1, k + 1):
        tl.store(tok_ptr + b.to(tl.int64) * (k + 1) + i, -1)


def mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
    """Contract: glm52_backends/ops/mtp_verify.py. draft [B, k] int, target_logits [B, k+1, V] ->
    (accepted [B] int32, tokens [B, k+1] int64, -1 after the emitted token)."""
    op = "mtp_verify"
    if draft.dim() != 2 or target_logits.dim() != 3:
        raise ValueError(f"{op}: need draft [B, k] and target_logits [B, k+1, V], got {list(draft.shape)} "
                         f"and {list(target_logits.shape)}")
    B, k = draft.shape
    V = target_logits.shape[-1]
    check_shape(op, "target_logits", target_logits, (B, k + 1, V))
    check_float(op, target_logits=target_logits)
    sample = temperature != 0.0
    if sample:
        if temperature < 0:
            raise ValueError(f"{op}: temperature must be >= 0, got {temperature}")
        if uniforms is None:
            raise ValueError(f"{op}: sampling (temperature > 0) needs the supplied uniforms [B, k+1]")
        check_shape(op, "uniforms", uniforms, (B, k + 1))
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"{op}: top_p must be in (0, 1], got {top_p}")
        need(top_p == 1.0, op, f"top_p={top_p} < 1 needs a sorted nucleus; the fused kernel samples "
                                "from the full softmax")
        if draft_probs is not None:
            check_shape(op, "draft_probs", draft_probs, (B, k, V))
            check_float(op, draft_probs=draft_probs)
    device = draft.device
    accepted = torch.empty(B, dtype=torch.int32, device=device)
    tokens = torch.empty(B, k + 1, dtype=torch.int64, device=device)
    if B == 0:
        return accepted, tokens
    logits = target_logits.contiguous()
    n_split = triton.cdiv(V, SPLIT)
    rows = B * (k + 1)
    mx = torch.empty(rows, n_split, dtype=torch.float32, device=device)
    am = torch.empty(rows, n_split, dtype=torch.int32, device=device)
    sm = torch.empty(rows, n_split, dtype=torch.float32, device=device) if sample else mx
    inv_temp = 1.0 / temperature if sample else 1.0
    wrap_triton(_stats_kernel)[(rows, n_split)](logits, mx, am, sm, V, n_split, inv_temp,
                                   SPLIT=SPLIT, BLOCK=BLOCK, SAMPLE=sample, num_warps=8)
    dprob = draft_probs.contiguous() if (sample and draft_probs is not None) else logits
    u = uniforms.float().contiguous() if sample else mx
    if k == 0:  # the kernel reads draft[b, 0] unconditionally; give it a row to read
        draft = torch.full((B, 1), -1, dtype=torch.int64, device=device)
    wrap_triton(_verify_kernel)[(B,)](logits, draft, dprob, u, mx, am, sm, accepted, tokens, V, k, n_split, inv_temp,
                         draft.stride(0), draft.stride(1), NS_P=triton.next_power_of_2(n_split), BLOCK=BLOCK,
                         SAMPLE=sample, HAS_Q=sample and draft_probs is not None, num_warps=8)
    return accepted, tokens
