"""Reference ops: plain torch, written like the paper, slow and obviously right.

Every op computes in `cdt` (float32 by default, float64 on request) and returns the input dtype.
The code is device-agnostic torch, so the same functions are the fallback on any device.
Shapes and layouts: `glm52_backends/ops.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.sampling import probs_from_logits, sample_from


def _request_of_tokens(cu_seqlens_q: torch.Tensor) -> tuple[list[int], list[int]]:
    cu = cu_seqlens_q.tolist()
    return cu[:-1], cu[1:]


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """Positions 0..n-1 of one request out of a paged cache `[NB, BS, D]` -> `[n, D]`."""
    bs = cache.shape[1]
    pos = torch.arange(n, device=cache.device)
    blocks = block_table_row.long()[pos // bs]
    return cache[blocks, pos % bs]


def indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, *, cdt=torch.float32):
    T = q.shape[0]
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    for b, (t0, t1) in enumerate(zip(*_request_of_tokens(cu_seqlens_q))):
        if t1 == t0:
            continue
        L = int(seq_lens[b])
        k = gather_paged(k_cache, block_table[b], L).to(cdt)                    # [L, Di]
        qb, wb = q[t0:t1].to(cdt), w[t0:t1].to(cdt)                             # [q, Hi, Di], [q, Hi]
        score = torch.einsum("th,ths->ts", wb, torch.relu(torch.einsum("thd,sd->ths", qb, k)))
        pos = torch.arange(L - (t1 - t0), L, device=q.device)                   # query positions
        causal = torch.arange(L, device=q.device)[None, :] <= pos[:, None]       # [q, L]
        score = score.masked_fill(~causal, float("-inf"))
        n = min(topk, L)
        # stable sort: exact ties (ReLU zeros are common) go to the earlier position, whatever
        # the row length, so decode, chunked prefill and verify steps select the same set
        top = score.sort(dim=-1, descending=True, stable=True).indices[:, :n]    # [q, n]
        n_valid = (pos + 1).clamp(max=topk)                                      # min(topk, pos+1)
        keep = torch.arange(n, device=q.device)[None, :] < n_valid[:, None]
        idx[t0:t1, :n] = torch.where(keep, top, -1).to(torch.int32)
    return idx


def sparse_mla(q, kv_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, v_dim=512, *, cdt=torch.float32):
    T, H, _ = q.shape
    out = torch.zeros(T, H, v_dim, dtype=cdt, device=q.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    for b, (t0, t1) in enumerate(zip(*_request_of_tokens(cu_seqlens_q))):
        if t1 == t0:
            continue
        L = int(seq_lens[b])
        kv = gather_paged(kv_cache, block_table[b], L).to(cdt)                   # [L, Dl+Dr]
        sel = idx[t0:t1].long()                                                  # [q, topk]
        keep = torch.zeros(t1 - t0, L + 1, dtype=torch.bool, device=q.device)    # column L eats the -1s
        keep.scatter_(1, torch.where(sel < 0, L, sel), True)
        keep = keep[:, :L]                                                       # [q, L]
        score = torch.einsum("thd,sd->ths", q[t0:t1].to(cdt), kv) * scale        # [q, H, L]
        score = score.masked_fill(~keep[:, None, :], float("-inf"))
        m = torch.logsumexp(score, dim=-1)                                       # [q, H]
        p = torch.exp(score - m[..., None]).nan_to_num(0.0)                      # empty rows -> 0
        out[t0:t1] = torch.einsum("ths,sc->thc", p, kv[:, :v_dim])
        lse[t0:t1] = m.float()
    return out.to(q.dtype), lse


def moe_experts(x, w13, w2, topk_ids, topk_weights, *, cdt=torch.float32):
    I = w2.shape[-1]
    xc = x.to(cdt)
    y = torch.zeros(x.shape[0], x.shape[1], dtype=cdt, device=x.device)
    for e in topk_ids.unique().tolist():
        if e < 0:
            continue
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = xc[tok] @ w13[e].to(cdt).T                                          # [n, 2I]
        h = F.silu(h[:, :I]) * h[:, I:]
        y.index_add_(0, tok, (h @ w2[e].to(cdt).T) * topk_weights[tok, slot, None].to(cdt))
    return y.to(x.dtype)


def moe_route(router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
              routed_scaling_factor=1.0, *, cdt=torch.float32):
    T, E = router_logits.shape
    s = torch.sigmoid(router_logits.to(cdt))                                      # [T, E]
    choice = s + correction_bias.to(cdt)                                         # selection only
    if n_group > 1:
        grp = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)   # [T, G]
        keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(1, grp.topk(topk_group, -1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices                                      # [T, K]
    wts = s.gather(1, ids)
    if norm_topk_prob:
        wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
    return ids, (wts * routed_scaling_factor).float()


def rms_norm(x, weight, eps, *, cdt=torch.float32):
    xf = x.to(torch.promote_types(cdt, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(y.dtype) * y).to(x.dtype)


def layer_norm(x, weight, bias, eps, *, cdt=torch.float32):
    xf = x.to(torch.promote_types(cdt, torch.float32))
    return F.layer_norm(xf, (x.shape[-1],), weight.to(xf.dtype), bias.to(xf.dtype), eps).to(x.dtype)


def rope(x, positions, theta, *, cdt=torch.float32):
    """Interleaved (GPT-J) RoPE: pair (2i, 2i+1) rotated by pos * theta^(-2i/Dr)."""
    Dr = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, Dr, 2, dtype=torch.float32, device=x.device) / Dr))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]               # [T, Dr/2] (f32 like HF)
    cos, sin = ang.cos().to(cdt), ang.sin().to(cdt)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (Dr // 2,)
    cos, sin = cos.view(shape), sin.view(shape)
    xe, xo = x[..., 0::2].to(cdt), x[..., 1::2].to(cdt)
    y = torch.stack([xe * cos - xo * sin, xo * cos + xe * sin], dim=-1)          # [..., Dr/2, 2]
    return y.flatten(-2).to(x.dtype)


def linear(x, weight, *, cdt=torch.float32):
    if x.dtype == weight.dtype and x.dtype not in (torch.float16, torch.bfloat16) and cdt == torch.float32:
        return x @ weight.T
    return (x.to(cdt) @ weight.to(cdt).T).to(x.dtype)


def mlp(x, w13, w2, *, cdt=torch.float32):
    I = w2.shape[-1]
    h = linear(x, w13, cdt=cdt).to(cdt)
    return linear((F.silu(h[..., :I]) * h[..., I:]).to(x.dtype), w2, cdt=cdt)


def mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None,
               *, cdt=torch.float32):
    B, k = draft.shape
    V = target_logits.shape[-1]
    tokens = torch.full((B, k + 1), -1, dtype=torch.int64, device=draft.device)
    accepted = torch.zeros(B, dtype=torch.int32, device=draft.device)
    if temperature == 0.0:
        best = target_logits.argmax(-1)                                           # [B, k+1]
        for b in range(B):
            n = 0
            while n < k and int(draft[b, n]) == int(best[b, n]):
                n += 1
            tokens[b, :n] = draft[b, :n]
            tokens[b, n] = best[b, n]
            accepted[b] = n
        return accepted, tokens
    if uniforms is None:
        raise ValueError("mtp_verify: sampling (temperature > 0) needs the supplied uniforms [B, k+1]")
    p = probs_from_logits(target_logits, temperature, top_p, cdt)                            # [B, k+1, V]
    if draft_probs is None:
        q = F.one_hot(draft.long(), V).to(cdt)                                    # deterministic draft
    else:
        q = draft_probs.to(cdt)
    for b in range(B):
        n = 0
        while n < k:
            d = int(draft[b, n])
            if float(uniforms[b, n]) < float(p[b, n, d] / q[b, n, d]):
                n += 1
            else:
                break
        tokens[b, :n] = draft[b, :n]
        if n < k:                                                                 # correction token
            r = (p[b, n] - q[b, n]).clamp(min=0)
            r = r if float(r.sum()) > 0 else p[b, n]
        else:                                                                     # bonus token
            r = p[b, k]
        tokens[b, n] = sample_from(r[None], uniforms[b, k:k + 1])[0]
        accepted[b] = n
    return accepted, tokens
