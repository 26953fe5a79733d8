"""The paged ops in batched form: gathers over `[T, topk]` and `[T, S]` with masks, no Python loop over
requests and no read back to the host, so a decode step through them can be captured as a graph.

The references (glm52_backends/ops/) loop over requests with host lengths: the readable oracle. These
compute the same thing over the whole step at once, token-major:
  - each token's request comes from `cu_seqlens_q` by `searchsorted`, on the device
    (`step.token_requests`), and its block-table row is gathered per token;
  - `indexer_topk` scores every position of the block table's width `S = max_blocks * block_size`
    (positions past a token's own position masked to -inf; the stable sort puts them last, so the
    selection and its tie rule are the reference's); keys are gathered per token, or, for a step of
    at most `SHARED_KEY_REQUESTS` requests (a prefill), once per request and scored in one GEMM;
  - `sparse_mla` gathers the `[T, topk]` selected rows (-1 entries read block 0 and are masked out with
    `where`, so no NaN in an unread row reaches the output);
  - `moe_experts` runs every expert over every token in two batched GEMMs while the experts are few
    against the routed slots (`ALL_EXPERTS_RATIO`), else gathers each token's K experts' weights
    (`[T, K, 2I, Hd]`) while that fits `GATHER_ELEMENTS`; else (quantized or wide experts) up to
    `MASKED_TOKENS` tokens it runs every expert over every token, masked; a longer step (a prefill)
    runs the reference's loop over experts;
  - `mtp_verify`, greedy: the accepted prefix is a cumulative product of matches;
  - `rms_norm` is torch's fused one, `rope` one complex multiply per pair (the reference's formulas).
Host-side sizes are shapes only (T, topk, the table width): fixed per captured bucket.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.cache_formats import read_index, read_latent
from glm52_backends.ops import REFERENCES
from glm52_backends.ops._paged import masked_softmax
from glm52_backends.quant import matmul_reference
from glm52_backends.step import token_positions, token_requests
from glm52_backends.weights import Weight, select

CHUNK_ELEMENTS = 1 << 22     # bounds a chunk's [tokens, Hi, S] scores and [tokens, topk, Dl] gathers
GATHER_ELEMENTS = 1 << 23    # moe_experts: gathered expert weights per call (dense), beyond this masked experts
SHARED_KEY_REQUESTS = 2      # indexer_topk: up to this many requests, keys gathered once per request
ALL_EXPERTS_RATIO = 4        # moe_experts: every expert over every token while E <= 4 x the routed slots
ALL_EXPERTS_ROWS = 4096      # ... and E x T rows stay this small
MASKED_TOKENS = 256          # moe_experts: up to this many tokens every expert runs masked; beyond, the reference


def as_weight(w) -> Weight:
    return w if isinstance(w, Weight) else Weight(w)


def _chunks(T: int, per_token: int):
    step = max(1, CHUNK_ELEMENTS // max(per_token, 1))
    for a in range(0, T, step):
        yield a, min(a + step, T)


def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False,
               cdt=torch.float32):
    T, H, _ = q.shape
    Dl, bs, MB = c_cache.shape[-1], c_cache.shape[1], block_table.shape[1]
    K = idx.shape[1]
    out = torch.zeros(T, H, Dl, dtype=cdt, device=q.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    req = token_requests(cu_seqlens_q, T)
    for a, e in _chunks(T, K * (Dl + H)):
        sel = idx[a:e].long()                                                     # [q, K]
        keep = sel >= 0
        pos = sel.clamp(min=0)
        blk = block_table[req[a:e]].long().gather(1, (pos // bs).clamp(max=MB - 1))
        blk = torch.where(keep, blk, 0)
        c, kpe = read_latent(c_cache, kpe_cache, blk, pos % bs)                  # [q, K, Dl], [q, K, Dr]
        kv = torch.where(keep[..., None], torch.cat([c.to(cdt), kpe.to(cdt)], -1), 0.0)  # [q, K, Dl+Dr]
        score = torch.bmm(q[a:e].to(cdt), kv.transpose(1, 2)) * scale                   # [q, H, K]
        p, m = masked_softmax(score, keep)                                                # [q, H, K], [q, H]
        out[a:e] = torch.bmm(p, kv[..., :Dl])                                             # [q, H, Dl]
        lse[a:e] = m.float()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, *, cdt=torch.float32):
    T, Hi, Di = q.shape
    B, MB = block_table.shape
    bs = k_cache.shape[1]
    S = MB * bs                                                   # every position the table can address
    n = min(topk, S)
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    req = token_requests(cu_seqlens_q, T)
    qpos = token_positions(seq_lens, cu_seqlens_q, req)
    s = torch.arange(S, device=q.device)
    if B <= SHARED_KEY_REQUESTS:
        # few requests (a prefill): each request's keys gathered once, scored against every token of
        # the chunk as one GEMM, then each token keeps its own request's row (B x the FLOPs, one GEMM)
        live = s[None, :] < seq_lens.long()[:, None]                                        # [B, S]
        blk = torch.where(live, block_table.long()[:, s // bs], 0)
        keys = read_index(k_cache, blk, (s % bs).expand_as(blk))                          # [B, S, Di]
        keys = torch.where(live[..., None], keys.to(cdt), 0.0)
    for a, e in _chunks(T, S * (Hi * B if B <= SHARED_KEY_REQUESTS else Hi + Di)):
        valid = s[None, :] <= qpos[a:e, None]                                             # [q, S] causal
        qa, wa = q[a:e].to(cdt), w[a:e].to(cdt)
        if B <= SHARED_KEY_REQUESTS:
            sc = torch.relu(torch.matmul(qa.reshape(-1, Di), keys.reshape(-1, Di).T))     # [q*Hi, B*S]
            sc = torch.bmm(wa[:, None, :], sc.view(e - a, Hi, B * S)).view(e - a, B, S)   # [q, B, S]
            score = sc.gather(1, req[a:e, None, None].expand(-1, 1, S)).squeeze(1)        # [q, S]
        else:
            blk = torch.where(valid, block_table[req[a:e]].long()[:, s // bs], 0)          # [q, S]
            k = read_index(k_cache, blk, (s % bs).expand_as(blk))                        # [q, S, Di]
            k = torch.where(valid[..., None], k.to(cdt), 0.0)
            score = torch.bmm(wa[:, None, :], torch.relu(torch.bmm(qa, k.transpose(1, 2)))).squeeze(1)  # [q, S]
        score = score.masked_fill(~valid, float("-inf"))
        top = score.sort(dim=-1, descending=True, stable=True).indices[:, :n]             # [q, n]
        keep = torch.arange(n, device=q.device)[None, :] < (qpos[a:e] + 1).clamp(max=topk)[:, None]
        idx[a:e, :n] = torch.where(keep, top, -1).to(torch.int32)
    return idx


def moe_experts(x, w13, w2, topk_ids, topk_weights, *, cdt=torch.float32):
    quant = any(isinstance(w, Weight) and w.quantized for w in (w13, w2))
    T, K = topk_ids.shape
    if not quant:
        w13d = w13.data if isinstance(w13, Weight) else w13
        w2d = w2.data if isinstance(w2, Weight) else w2
        E = w13d.shape[0]
        if E <= ALL_EXPERTS_RATIO * T * K and E * T <= ALL_EXPERTS_ROWS:
            return _moe_all_experts(x, w13d, w2d, topk_ids, topk_weights, cdt)
        if T * K * (w13d[0].numel() + w2d[0].numel()) <= GATHER_ELEMENTS:
            return _moe_gathered(x, w13d, w2d, topk_ids, topk_weights, cdt)
    if T <= MASKED_TOKENS:
        return _moe_masked(x, w13, w2, topk_ids, topk_weights, cdt, quant)
    return REFERENCES["moe_experts"](x, w13, w2, topk_ids, topk_weights, cdt=cdt)   # a long prefill


def _moe_all_experts(x, w13, w2, topk_ids, topk_weights, cdt):
    """Every expert over every token in two batched GEMMs over the stacked weights (no copies), then each
    token's routed experts summed with their weights: E/K times the routed FLOPs, for small steps where
    the experts are used anyway."""
    E, I = w13.shape[0], w2.shape[-1]
    xt = x.to(cdt).T.expand(E, -1, -1)                                                     # [E, Hd, T]
    h = torch.bmm(w13.to(cdt), xt)                                                         # [E, 2I, T]
    o = torch.bmm(w2.to(cdt), F.silu(h[:, :I]) * h[:, I:])                                 # [E, Hd, T]
    valid = topk_ids >= 0
    wts = torch.zeros(x.shape[0], E + 1, dtype=cdt, device=x.device)                      # column E: unused slots
    wts.scatter_add_(1, torch.where(valid, topk_ids.long(), E), torch.where(valid, topk_weights.to(cdt), 0.0))
    return torch.einsum("eht,te->th", o, wts[:, :E]).to(x.dtype)


def _moe_gathered(x, w13, w2, topk_ids, topk_weights, cdt):
    """Each token's K experts' weights gathered: [T, K, 2I, Hd] and [T, K, Hd, I]."""
    I = w2.shape[-1]
    valid = topk_ids >= 0
    e = topk_ids.long().clamp(min=0)                                                        # [T, K]
    T, K = e.shape
    h = torch.bmm(w13[e.flatten()].to(cdt), x.to(cdt).repeat_interleave(K, 0)[:, :, None])  # [T*K, 2I, 1]
    a = F.silu(h[:, :I]) * h[:, I:]
    o = torch.bmm(w2[e.flatten()].to(cdt), a).view(T, K, -1)                                 # [T, K, Hd]
    o = torch.where(valid[..., None], o * topk_weights.to(cdt)[..., None], 0.0)
    return o.sum(1).to(x.dtype)


def _moe_masked(x, w13, w2, topk_ids, topk_weights, cdt, quant):
    """Every expert over every token, weighted by the token's routing weight for it (0 when not routed
    there): E/K times the routed FLOPs, no data-dependent shapes. Quantized experts compute as the
    reference does (the format's activation recipe per token, float64 accumulation)."""
    E, I = w13.shape[0], w2.shape[-1]
    acc = torch.float64 if quant else cdt
    y = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
    wts = topk_weights.to(acc)
    for e in range(E):
        we = torch.where(topk_ids == e, wts, 0.0).sum(1)                                     # [T]
        if quant:
            h = matmul_reference(x, select(as_weight(w13), e)).to(x.dtype).to(cdt)
            a = (F.silu(h[:, :I]) * h[:, I:]).to(x.dtype)
            out = matmul_reference(a, select(as_weight(w2), e))
        else:
            h = x.to(cdt) @ as_weight(w13).data[e].to(cdt).T
            out = (F.silu(h[:, :I]) * h[:, I:]) @ as_weight(w2).data[e].to(cdt).T
        y += out.to(acc) * we[:, None]
    return y.to(x.dtype)


def mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None,
               *, cdt=torch.float32):
    if temperature != 0.0:
        return REFERENCES["mtp_verify"](draft, target_logits, draft_probs, temperature, top_p, uniforms, cdt=cdt)
    B, k = draft.shape
    best = target_logits.argmax(-1)                                                          # [B, k+1]
    run = torch.cumprod((draft.long() == best[:, :k]).long(), dim=1)                         # accepted prefix
    accepted = run.sum(1)                                                                    # [B]
    col = torch.arange(k + 1, device=draft.device)[None, :]
    drafts = torch.cat([draft.long(), torch.zeros_like(draft[:, :1], dtype=torch.long)], 1)
    tokens = torch.where(col < accepted[:, None], drafts, torch.where(col == accepted[:, None], best, -1))
    return accepted.to(torch.int32), tokens.to(torch.int64)


# ---- the small ops, fused: fewer dispatches per layer (decode on a CPU is bound by them) --------------
def rms_norm(x, weight, eps, *, cdt=torch.float32):
    xf = x.to(torch.promote_types(cdt, torch.float32))
    return F.rms_norm(xf, (x.shape[-1],), weight.to(xf.dtype), eps).to(x.dtype)


_INV_FREQ: dict[tuple, torch.Tensor] = {}      # (Dr, theta, device) -> theta^(-2i/Dr): constants only


def rope(x, positions, theta, *, cdt=torch.float32):
    """Interleaved pairs (2i, 2i+1) as complex numbers times e^(i pos theta^(-2i/Dr)): one multiply."""
    Dr = x.shape[-1]
    key = (Dr, float(theta), x.device)
    inv = _INV_FREQ.get(key)
    if inv is None:
        inv = _INV_FREQ[key] = 1.0 / (theta ** (torch.arange(0, Dr, 2, dtype=torch.float32, device=x.device) / Dr))
    ang = positions.to(torch.float32)[:, None] * inv[None, :]                          # [T, Dr/2] f32, like HF
    rot = torch.complex(ang.cos().to(cdt), ang.sin().to(cdt))
    rot = rot.view((x.shape[0],) + (1,) * (x.dim() - 2) + (Dr // 2,))
    xc = torch.view_as_complex(x.to(cdt).reshape(*x.shape[:-1], Dr // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


OPS = {"sparse_mla": sparse_mla, "indexer_topk": indexer_topk, "moe_experts": moe_experts, "mtp_verify": mtp_verify,
       "rms_norm": rms_norm, "rope": rope}
