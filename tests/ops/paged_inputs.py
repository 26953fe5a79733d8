"""Paged inputs the reference tests of tests/ops build by hand (float64, seeded)."""

from __future__ import annotations

import torch

from glm52_backends.conformance.inputs import Batch, page

D64 = torch.float64


def batch_caches(g, batch: Batch, D: int, bs: int):
    rows = [torch.randn(L, D, generator=g, dtype=D64) for L in batch.seq_lens]
    cache, table = page(g, rows, bs)
    return rows, cache, table


def paged_case(g, lens, bs, D, n_blocks_extra=3):
    need = [-(-L // bs) for L in lens]
    nb = sum(need) + n_blocks_extra
    order = torch.randperm(nb, generator=g)
    table = torch.full((len(lens), max(need) + 1), int(order[-1]), dtype=torch.int32)
    j = 0
    for b, n in enumerate(need):
        table[b, :n] = order[j:j + n].int()
        j += n
    cache = torch.randn(nb, bs, D, generator=g, dtype=D64)
    return cache, table
