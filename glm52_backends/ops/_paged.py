"""Helpers the references share: which tokens belong to which request, paged-cache reads.

The references loop over requests with host lengths: `request_spans` reads `cu_seqlens_q` and
`seq_lens` back once per call (the readable oracle; a captured graph refuses it, so a step through
the references stays eager). Cache reads go
through the cache's format (glm52_backends/cache_formats.py): a dense cache's rows come back as
stored, a quantized cache's rows dequantized to float32, and only the rows asked for are read.
"""

from __future__ import annotations

import torch

from ..cache_formats import read_index, read_latent


def request_spans(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(t0, t1, seq_len)] per request: its query tokens t0:t1 and its total length (one host read)."""
    n = seq_lens.shape[0]
    host = torch.cat([cu_seqlens_q.long().flatten(), seq_lens.long().flatten()]).tolist()
    cu, lens = host[:n + 1], host[n + 1:]
    return [(cu[b], cu[b + 1], int(lens[b])) for b in range(len(lens))]


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """Positions 0..n-1 of one request out of a paged cache `[NB, BS, D]` -> `[n, D]`."""
    bs = cache.shape[1]
    pos = torch.arange(n, device=cache.device)
    blocks = block_table_row.long()[pos // bs]
    return cache[blocks, pos % bs]


def gather_positions(cache: torch.Tensor, block_table_row: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows at positions `pos` (any shape, all >= 0) of one request -> `[*pos.shape, D]`. Reads only those rows."""
    bs = cache.shape[1]
    blocks = block_table_row.long()[pos // bs]
    return cache[blocks, pos % bs]


def _where(block_table_row: torch.Tensor, pos: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    return block_table_row.long()[pos // bs], pos % bs


def gather_latent(c_cache: torch.Tensor, kpe_cache: torch.Tensor, block_table_row: torch.Tensor,
                  pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, k_pe) at positions `pos` (all >= 0) of one request -> `[*pos.shape, Dl]`, `[*pos.shape, Dr]`:
    dense rows as stored, quantized rows (fp8_ds_mla, c8_sfa) dequantized to float32. Reads only those rows."""
    blocks, offs = _where(block_table_row, pos, c_cache.shape[1])
    return read_latent(c_cache, kpe_cache, blocks, offs)


def gather_index(k_cache: torch.Tensor, block_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """Index keys at positions 0..n-1 of one request -> `[n, Di]`: dense as stored, quantized (fp8,
    c8_li) dequantized to float32 (c8_li rotated back: the keys themselves)."""
    pos = torch.arange(n, device=k_cache.device)
    blocks, offs = _where(block_table_row, pos, k_cache.shape[1])
    return read_index(k_cache, blocks, offs)


def masked_softmax(score: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of `score [q, H, K]` over the positions `keep [q, K]` marks: (p, lse [q, H]). A row with
    nothing kept gives p = 0 and lse = -inf (no NaN from an empty softmax)."""
    score = score.masked_fill(~keep[:, None, :], float("-inf"))
    m = torch.logsumexp(score, dim=-1)                                           # [q, H]
    empty = (m == float("-inf"))[..., None]                                      # nothing selected
    return torch.where(empty, 0.0, torch.exp(score - torch.where(empty, 0.0, m[..., None]))), m
