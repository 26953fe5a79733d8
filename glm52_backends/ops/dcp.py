"""Decode context parallelism (DCP): where a request's cache rows live, and how the ranks' partial
results merge into one process's. Not an op of the contract: the model calls the contract's ops
(`indexer_topk`, `sparse_mla`) on each rank's rows and merges their outputs with these functions.

Layout: token-interleaved. Over `D` ranks, position p of every request is stored on rank p % D, as
that rank's local row p // D. The cache's blocks stay the unit of bookkeeping: a block of `bs`
positions (bs divisible by D) is one block id on every rank, and each rank holds bs / D rows of it
(positions b*bs + r, b*bs + r + D, ...). So the block table, the free list, the lengths, rollback
and prefix sharing are the same on every rank and the same as one process's, and a rank's local
rows form an ordinary paged cache of block size bs / D under that same block table: local row j
sits at slot `block_table[j // (bs/D)] * (bs/D) + j % (bs/D)`.

Why tokens and not whole blocks: every rank holds ceil(L/D) or floor(L/D) rows of a request of any
length L (a block-interleaved layout leaves the ranks past the last block empty for short requests
and grows one rank at a time during decode), so memory and the attention work per rank are even at
every length, and a decode step appends to one rank in turn. vLLM's DCP interleaves by token too
(`cp_kv_cache_interleave_size` = 1 by default).

Query token at position t on rank r sees its local rows 0 .. n-1 with n = (t + D - r) // D (the
positions p <= t with p % D = r). The paged ops take that as a one-token request of length n, so
each rank calls them unchanged, with one row per query token (`step.DcpStep`).

Merges:
  top-k      each rank's `indexer_topk` keeps its best min(topk, n) rows; their scores are computed
             again (`candidate_scores`, the reference's arithmetic) and the D candidate lists are
             ordered as one process orders all positions: score descending, ties to the lower
             position (`merge_topk`). The global top-k is a subset of the union (each of its
             positions has fewer than topk positions ahead of it, on its own rank too), so the
             merged list is one process's list, in its order.
  attention  each rank attends to the selected positions it holds: out_r = softmax over its rows,
             lse_r their log-sum-exp. Then lse = logsumexp_r lse_r and out = sum_r exp(lse_r - lse)
             out_r (`merge_attention`; `lse_weights` gives each rank its factor for the
             reduce-scatter form the model uses). A rank with no selected row has lse_r = -inf and
             weight 0; a query with none anywhere gets out 0, lse -inf, as the op does.
"""

from __future__ import annotations

import torch

from ..cache_formats import read_index


def check_block_size(block_size: int, size: int) -> None:
    """A block must split evenly over the ranks: bs / D rows each."""
    if size < 1 or block_size % size:
        raise ValueError(f"decode context parallelism: block_size {block_size} must be a multiple of dcp = {size} "
                         f"(each rank holds block_size / dcp rows of every block)")


def owner(positions: torch.Tensor, size: int) -> torch.Tensor:
    """The rank storing each position."""
    return positions % size


def visible_rows(positions: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """[T] int32: how many of rank `rank`'s rows a query at each position sees (p <= t, p % D == rank);
    0 for a padded row (position -1)."""
    return torch.div(positions.long() + size - rank, size, rounding_mode="floor").clamp(min=0).to(torch.int32)


def to_local(idx: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Global positions (-1 = none) -> this rank's local rows, -1 where another rank holds the position."""
    idx = idx.long()
    mine = (idx >= 0) & (idx % size == rank)
    return torch.where(mine, torch.div(idx, size, rounding_mode="floor"), -1).to(torch.int32)


def to_global(local: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """This rank's local rows (-1 = none) -> global positions (-1 kept)."""
    local = local.long()
    return torch.where(local >= 0, local * size + rank, -1)


def candidate_scores(q: torch.Tensor, w: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                     local: torch.Tensor, cdt: torch.dtype = torch.float32) -> torch.Tensor:
    """The indexer scores of each token's candidate rows, as the reference computes them:
    sum_h w[t,h] * relu(q[t,h] . k[s]) in `cdt`, -inf where `local` is -1.
    q [T, Hi, Di], w [T, Hi], k_cache [NB, bs_l, Di] (any index format: read dequantized),
    block_table [T, W] (each token's row), local [T, K] local rows -> [T, K]."""
    bs = k_cache.shape[1]
    keep = local >= 0
    j = local.long().clamp(min=0)
    blocks = block_table.long().gather(1, torch.div(j, bs, rounding_mode="floor").clamp(max=block_table.shape[1] - 1))
    keys = read_index(k_cache, blocks, j % bs).to(cdt)                                  # [T, K, Di]
    s = torch.einsum("th,thk->tk", w.to(cdt), torch.relu(torch.einsum("thd,tkd->thk", q.to(cdt), keys)))
    return s.masked_fill(~keep, float("-inf"))


def merge_topk(scores: torch.Tensor, positions: torch.Tensor, query_positions: torch.Tensor, topk: int
               ) -> torch.Tensor:
    """The global top-k from every rank's candidates: scores [T, N] and their global positions [T, N]
    (-1 = no candidate), query_positions [T] -> [T, topk] int32, the min(topk, t+1) best first (score
    descending, equal scores to the lower position: one process's stable sort), -1 after."""
    T, N = positions.shape
    pos = positions.long()
    valid = pos >= 0
    big = torch.iinfo(torch.int64).max
    by_pos = torch.where(valid, pos, big).sort(dim=-1, stable=True).indices        # ascending position first
    s = torch.where(valid, scores, float("-inf")).gather(1, by_pos)
    p = pos.gather(1, by_pos)
    order = s.sort(dim=-1, descending=True, stable=True).indices                   # then score, ties kept in order
    top = p.gather(1, order)[:, :topk]
    if top.shape[1] < topk:
        top = torch.cat([top, top.new_full((T, topk - top.shape[1]), -1)], 1)
    n = (query_positions.long() + 1).clamp(min=0, max=topk)
    keep = torch.arange(topk, device=top.device)[None, :] < n[:, None]
    return torch.where(keep, top, -1).to(torch.int32)


def lse_weights(lse: torch.Tensor, lse_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's factor exp(lse - total) [T, H], the total log-sum-exp [T, H]) from its lse [T, H]
    and every rank's lse_all [D, T, H]. Factor 0 where this rank had nothing (or no rank had)."""
    total = torch.logsumexp(lse_all, dim=0)
    empty = torch.isneginf(total) | torch.isneginf(lse)
    f = torch.exp(torch.where(empty, float("-inf"), lse - torch.where(empty, 0.0, total)))
    return f, total


def merge_attention(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The all-gather form: every rank's partial out [D, T, H, C] and lse [D, T, H] -> (out [T, H, C]
    in float32 or float64 (outs' precision, at least float32), lse [T, H])."""
    acc = torch.promote_types(outs.dtype, torch.float32)
    total = torch.logsumexp(lses.to(acc), dim=0)
    out = torch.zeros(outs.shape[1:], dtype=acc, device=outs.device)
    for r in range(outs.shape[0]):
        f, _ = lse_weights(lses[r].to(acc), lses.to(acc))
        out = out + outs[r].to(acc) * f[..., None]
    return out, total
