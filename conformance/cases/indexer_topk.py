"""indexer_topk's cases (the contract: glm52_backends/ops/indexer_topk.py), judged by top-k validity
against `indexer_scores`.
"""

from __future__ import annotations

import torch

from glm52_backends.cache_formats import read_index

from .common import (HEAD_DIMS, HEAD_DIMS_BATCH, SIZES, Arg, Batch, Case, CaseInputs, packed, page, rand, randn,
                     randperm, seeded)


def _indexer_inputs(g, batch: Batch, Hi: int, Di: int, topk: int, bs: int, *, keys=None, q=None, w=None,
                    cache_format: str = "dense") -> CaseInputs:
    keys = keys if keys is not None else [randn(g, L, Di) for L in batch.seq_lens]
    q = q if q is not None else randn(g, batch.T, Hi, Di)
    w = w if w is not None else randn(g, batch.T, Hi) * (Hi ** -0.5 * Di ** -0.5)
    cache, table = page(g, keys, bs)
    k_cache = Arg(cache, "act") if cache_format == "dense" else Arg(packed(cache_format, [cache])[0], "qcache")
    return CaseInputs(
        {"q": Arg(q, "act"), "w": Arg(w, "f32"), "k_cache": k_cache, "block_table": Arg(table, "int"),
         "seq_lens": Arg(batch.seq_lens_t, "int"), "cu_seqlens_q": Arg(batch.cu_seqlens_q, "int"),
         "topk": Arg(topk, "const")},
        meta={"batch": batch})


def indexer_scores(args: list, batch: Batch) -> torch.Tensor:
    """Reference scores [T, L_max] in float64, -inf where not causal: an explicit per-token loop over
    heads (a second formulation next to cpu_ref's einsum). A quantized cache is read dequantized
    (cache_formats.read_index: the keys the stored codes and scales give)."""
    q, w, k_cache, table = args[0].double(), args[1].double(), args[2], args[3]
    bs = k_cache.shape[1]
    Lmax = max(batch.seq_lens)
    out = torch.full((batch.T, Lmax), float("-inf"), dtype=torch.float64)
    for t, b, pos in batch.tokens():
        p = torch.arange(pos + 1)
        k = read_index(k_cache, table[b].long()[p // bs], p % bs).double()         # [pos+1, Di]
        out[t, :pos + 1] = sum(w[t, h] * torch.relu(k @ q[t, h]) for h in range(q.shape[1]))
    return out


def _idx_real(kind: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        K = s["K"]
        g = seeded("indexer_topk", kind, scale)
        batch = {
            # decode: one query each, contexts >= 4x, = and < top-k, and a single-token context
            "decode": Batch([(1, 4 * K + 7), (1, K), (1, K // 3 + 1), (1, 1)]),
            # prefill chunk whose rows cross the top-k boundary (pos + 1 < K for the first ones)
            "prefill": Batch([(K // 16 + 3, K + K // 32 + 1)]),
            # a step mixing decode, multi-token verify and a prefill chunk of different lengths
            "mixed": Batch([(1, 4 * K + 1), (4, 2 * K + 3), (K // 8 + 1, K // 2 + 5), (1, 1)]),
        }[kind]
        return _indexer_inputs(g, batch, s["Hi"], s["Di"], K, s["BS"])
    return build


def _idx_relu_ties(scale: str) -> CaseInputs:
    """Most keys score exactly 0 (every head's q.k < 0, killed by ReLU) and the top-k boundary falls
    inside that tie: any choice among the zeros is valid, a missing or non-causal one is not."""
    s = SIZES[scale]
    Hi, Di, K = s["Hi"], s["Di"], s["K"]
    g = seeded("indexer_topk", "relu-ties", scale)
    batch = Batch([(2, 3 * K), (1, K + 3)])
    q = randn(g, batch.T, Hi, Di).abs()                                          # positive queries
    keys = []
    for L in batch.seq_lens:
        k = -randn(g, L, Di).abs()                                               # dead: all dots < 0
        live = randperm(g, L)[: K // 2]                                          # fewer live than K
        k[live] = randn(g, len(live), Di).abs()
        keys.append(k)
    w = rand(g, batch.T, Hi) + 0.1                                               # positive weights
    return _indexer_inputs(g, batch, Hi, Di, K, s["BS"], keys=keys, q=q, w=w)


def _idx_concentrated(scale: str) -> CaseInputs:
    """Scores concentrated like real indexer scores: a few heavy keys (the first token, the recent
    window) over a long tail whose scores differ only in the 4th-5th significant digit."""
    s = SIZES[scale]
    Hi, Di, K = s["Hi"], s["Di"], s["K"]
    g = seeded("indexer_topk", "concentrated", scale)
    batch = Batch([(1, 3 * K + 11), (3, 2 * K)])
    base = randn(g, Di)
    keys = []
    for L in batch.seq_lens:
        k = base + 1e-3 * randn(g, L, Di)                                        # near-identical tail
        k[0] += 2.0 * base                                                       # attention sink
        k[-K // 8:] += 0.5 * randn(g, K // 8, Di)                                # recent window
        keys.append(k)
    q = base + 0.1 * randn(g, batch.T, Hi, Di)
    w = rand(g, batch.T, Hi) * (Hi ** -0.5 * Di ** -0.5)
    return _indexer_inputs(g, batch, Hi, Di, K, s["BS"], keys=keys, q=q, w=w)


def _idx_odd(scale: str) -> CaseInputs:
    g = seeded("indexer_topk", "odd", scale)
    batch = Batch([(3, 7), (1, 13), (2, 2), (5, 23)])
    return _indexer_inputs(g, batch, 3, 24, 10, 5)


def _idx_head_dims(scale: str) -> CaseInputs:
    s = HEAD_DIMS
    g = seeded("indexer_topk", "head-dims", scale)
    return _indexer_inputs(g, Batch(HEAD_DIMS_BATCH), s["Hi"], s["Di"], s["K"], s["BS"])


def _idx_cache_format(fmt: str):
    """The head-dims case with its keys stored in a quantized index format (as PagedCache writes it;
    poisoned rows all 0xFF: NaN scales), judged on the keys the codes give."""
    def build(scale: str) -> CaseInputs:
        s = HEAD_DIMS
        g = seeded("indexer_topk", f"cache-{fmt}", scale)
        return _indexer_inputs(g, Batch(HEAD_DIMS_BATCH), s["Hi"], s["Di"], s["K"], s["BS"], cache_format=fmt)
    return build


CASES: list[Case] = [
    Case("indexer_topk", "decode", _idx_real("decode"), "topk", "decode, contexts >=4x, =, < top-k and 1"),
    Case("indexer_topk", "prefill", _idx_real("prefill"), "topk", "causal prefill chunk across the top-k boundary"),
    Case("indexer_topk", "mixed", _idx_real("mixed"), "topk", "decode + verify + prefill in one step"),
    Case("indexer_topk", "relu-ties", _idx_relu_ties, "topk", "exact ReLU-zero ties at the boundary"),
    Case("indexer_topk", "concentrated", _idx_concentrated, "topk", "real-like concentrated scores"),
    Case("indexer_topk", "odd", _idx_odd, "topk", "3 heads x 24, top-10, block size 5"),
    Case("indexer_topk", "head-dims", _idx_head_dims, "topk", "32 heads x 128 at any scale, top-16, short"),
    Case("indexer_topk", "cache-fp8", _idx_cache_format("fp8"), "topk",
         "32 heads x 128, keys in the fp8 index cache (e4m3 + f32 scale per 128)"),
    Case("indexer_topk", "cache-c8_li", _idx_cache_format("c8_li"), "topk",
         "32 heads x 128, keys in Ascend's C8 index cache (int8 of the Hadamard-rotated key + f16 scale)"),
]
