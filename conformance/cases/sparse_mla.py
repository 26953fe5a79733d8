"""sparse_mla's cases (the contract: glm52_backends/ops/sparse_mla.py): decode, prefill, mixed steps,
padding, the lse, odd sizes, the real head widths, and decode context parallelism's merge (judge "dcp").
"""

from __future__ import annotations

import torch

from ..judges import Verdict, close_lse
from .common import (HEAD_DIMS, HEAD_DIMS_BATCH, SIZES, Arg, Batch, Case, CaseInputs, packed, page, randn, randperm,
                     seeded)


def _random_topk(g, batch: Batch, topk: int, *, scatter_pad: bool = False, empty_rows: int = 0) -> torch.Tensor:
    """A valid top-k per token: min(topk, pos+1) distinct causal positions, -1 after (or, with
    `scatter_pad`, -1 scattered between them); the last `empty_rows` rows all -1."""
    idx = torch.full((batch.T, topk), -1, dtype=torch.int32)
    for t, _, pos in batch.tokens():
        n = min(topk, pos + 1)
        idx[t, :n] = randperm(g, pos + 1)[:n].to(torch.int32)
        if scatter_pad:
            idx[t] = idx[t, randperm(g, topk)]
    if empty_rows:
        idx[-empty_rows:] = -1
    return idx


def _mla_inputs(g, batch: Batch, s: dict, topk: int, bs: int, *, lse: bool = False, cache_format: str = "dense",
                **kw) -> CaseInputs:
    """The latent cache as the two paged tensors of the contract, c [NB, BS, Dl] and k_pe [NB, BS, Dr],
    NaN-poisoned in the same slots (or, in a quantized `cache_format`, the two op views of one packed
    storage, poisoned rows all 0xFF); `lse`: ask for the log-sum-exp too."""
    H, Dl, D = s["H"], s["Dl"], s["Dl"] + s["Dr"]
    kv = [randn(g, L, D) for L in batch.seq_lens]
    cache, table = page(g, kv, bs)
    scale = (s.get("dn", 3 * s["Dr"]) + s["Dr"]) ** -0.5                           # (dn + dr)^-0.5
    c, kpe = cache[..., :Dl].contiguous(), cache[..., Dl:].contiguous()
    if cache_format == "dense":
        c_arg, kpe_arg = Arg(c, "act"), Arg(kpe, "act")
    else:
        c_arg, kpe_arg = (Arg(p, "qcache") for p in packed(cache_format, [c, kpe]))
    return CaseInputs(
        {"q": Arg(randn(g, batch.T, H, D), "act"), "c_cache": c_arg, "kpe_cache": kpe_arg,
         "idx": Arg(_random_topk(g, batch, topk, **kw), "int"), "block_table": Arg(table, "int"),
         "seq_lens": Arg(batch.seq_lens_t, "int"), "cu_seqlens_q": Arg(batch.cu_seqlens_q, "int"),
         "scale": Arg(scale, "const")},
        meta={"batch": batch}, kwargs={"return_lse": True} if lse else {})


def _mla(kind: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        K = s["K"]
        g = seeded("sparse_mla", kind, scale)
        if kind == "decode":
            return _mla_inputs(g, Batch([(1, 4 * K + 7), (1, K), (1, K // 3 + 1), (1, 1)]), s, K, s["BS"])
        if kind == "prefill":
            return _mla_inputs(g, Batch([(K // 32 + 3, K + K // 64 + 1)]), s, K, s["BS"])
        if kind in ("mixed", "lse"):
            return _mla_inputs(g, Batch([(4, 2 * K + 3), (1, 1), (3, K // 4 + 2), (1, 4 * K + 1)]), s, K, s["BS"],
                               lse=kind == "lse")
        if kind == "padding":  # -1 scattered through the rows, and two rows with no valid index
            return _mla_inputs(g, Batch([(3, K // 2 + 1), (2, 2 * K)]), s, K, s["BS"], scatter_pad=True, empty_rows=2,
                               lse=True)
        raise KeyError(kind)
    return build


DCP_RANKS = 4     # decode context parallelism cases: the ranks simulated on one device


def _dcp_partition(g, batch: Batch, seqs: list[torch.Tensor], bs: int, D: int):
    """One device standing in for D ranks of decode context parallelism (glm52_backends/ops/dcp.py): each
    rank's local rows (positions p % D == r) of every request paged with block size bs / D, and the
    ops' rows as a rank passes them: one one-token request per (rank, query token), rank-major, over
    the local rows it may see. -> (cache, block_table [D*T, W], seq_lens [D*T], cu_seqlens_q [D*T+1])."""
    from glm52_backends.ops.dcp import visible_rows
    B = len(seqs)
    cache, table = page(g, [s[r::D] for r in range(D) for s in seqs], bs // D)        # row r*B + b
    req = torch.tensor([b for _, b, _ in batch.tokens()], dtype=torch.long)
    rows = torch.cat([table[r * B + req] for r in range(D)])
    lens = torch.cat([visible_rows(batch.positions, D, r) for r in range(D)])
    return cache, rows, lens, torch.arange(D * batch.T + 1, dtype=torch.int32)


def _mla_dcp(scale: str) -> CaseInputs:
    """sparse_mla as each of 4 DCP ranks calls it (its rows of the cache, every selected position mapped
    to its local row or -1), in one call; judged after the merge by log-sum-exp against the reference on
    the whole cache (runner.judge_case, judge "dcp")."""
    from glm52_backends.ops.dcp import to_local
    s = SIZES[scale]
    K, D, bs = s["K"], DCP_RANKS, s["BS"]
    g = seeded("sparse_mla", "dcp-merge", scale)
    batch = Batch([(1, 4 * K + 7), (3, 2 * K + 3), (1, 2), (2, K // 4 + 2)])   # decode, verify, short, prefill
    H, Dl, Dd = s["H"], s["Dl"], s["Dl"] + s["Dr"]
    kv = [randn(g, L, Dd) for L in batch.seq_lens]
    q = randn(g, batch.T, H, Dd)
    idx = _random_topk(g, batch, K, scatter_pad=True)
    idx[1] = -1                                              # a query with nothing selected
    cache, rows, lens, cu = _dcp_partition(g, batch, kv, bs, D)
    whole, table = page(g, kv, bs)
    scale_ = (3 * s["Dr"] + s["Dr"]) ** -0.5
    return CaseInputs(
        {"q": Arg(q.repeat(D, 1, 1), "act"), "c_cache": Arg(cache[..., :Dl].contiguous(), "act"),
         "kpe_cache": Arg(cache[..., Dl:].contiguous(), "act"),
         "idx": Arg(torch.cat([to_local(idx, D, r) for r in range(D)]), "int"), "block_table": Arg(rows, "int"),
         "seq_lens": Arg(lens, "int"), "cu_seqlens_q": Arg(cu, "int"), "scale": Arg(scale_, "const")},
        meta={"batch": batch, "dcp": D,
              "whole": (q, whole[..., :Dl].contiguous(), whole[..., Dl:].contiguous(), idx, table,
                        batch.seq_lens_t, batch.cu_seqlens_q, scale_)},
        kwargs={"return_lse": True})


def judge_dcp(out, inputs: CaseInputs, dtype: torch.dtype, tol: float, reference, ref) -> Verdict:
    """Judge "dcp" (`_mla_dcp`'s case): the backend computes only the D ranks' partials (one call over the
    stacked ranks), so they are judged as any sparse_mla output with its lse, at the op's tolerance,
    against the reference's partials `ref` on the same inputs; then the reference's partials merged by
    log-sum-exp (ops/dcp.merge_attention) must equal `reference`'s sparse_mla on the whole cache (to 1e-6:
    the contract's lse is float32): that the case's rows and the merge compute one device's attention."""
    from glm52_backends.ops.dcp import merge_attention
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        return Verdict(False, detail="sparse_mla(..., return_lse=True) must return (out, lse)")
    D, T = inputs.meta["dcp"], inputs.meta["batch"].T
    o, lse = out
    if tuple(o.shape[:1]) != (D * T,) or tuple(lse.shape[:1]) != (D * T,) or lse.dtype != torch.float32:
        return Verdict(False, detail=f"sparse_mla: out {tuple(o.shape)}, lse {tuple(lse.shape)} {lse.dtype}; "
                                     f"expected {D * T} rows and float32 lse")
    v = close_lse(o, lse, ref[0], ref[1], tol, dtype)
    if not v.passed:
        return v
    whole = [x.to(dtype).double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
             for x in inputs.meta["whole"]]
    want_out, want_lse = reference.sparse_mla(*whole, return_lse=True)
    merged, total = merge_attention(ref[0].double().view(D, T, *ref[0].shape[1:]),
                                    ref[1].double().view(D, T, -1))
    m = close_lse(merged, total.float(), want_out, want_lse, 1e-6, None)
    if not m.passed:
        return Verdict(False, detail=f"the case itself: the reference's partials merged differ from the whole "
                                     f"cache ({m.detail})")
    return v


def _mla_odd(scale: str) -> CaseInputs:
    g = seeded("sparse_mla", "odd", scale)
    s = {"H": 5, "Dl": 40, "Dr": 8}
    return _mla_inputs(g, Batch([(3, 7), (1, 13), (2, 2)]), s, 7, 3)


def _mla_head_dims(kind: str):
    def build(scale: str) -> CaseInputs:
        s = HEAD_DIMS
        g = seeded("sparse_mla", f"head-dims-{kind}", scale)
        if kind == "padding":   # -1 scattered through the rows, one row with no valid index
            return _mla_inputs(g, Batch(HEAD_DIMS_BATCH), s, s["K"], s["BS"], scatter_pad=True, empty_rows=1)
        if kind.startswith("cache-"):   # the latent rows in a quantized format, -1 scattered, a row empty
            return _mla_inputs(g, Batch(HEAD_DIMS_BATCH), s, s["K"], s["BS"], scatter_pad=True, empty_rows=1,
                               cache_format=kind.removeprefix("cache-"))
        return _mla_inputs(g, Batch(HEAD_DIMS_BATCH), s, s["K"], s["BS"])
    return build


CASES: list[Case] = [
    Case("sparse_mla", "decode", _mla("decode"), "mla", "decode, contexts >=4x, =, < top-k and 1"),
    Case("sparse_mla", "prefill", _mla("prefill"), "mla", "causal prefill chunk"),
    Case("sparse_mla", "mixed", _mla("mixed"), "mla", "decode + verify + prefill in one step"),
    Case("sparse_mla", "padding", _mla("padding"), "mla", "-1 scattered, two rows with no valid index (+ lse)"),
    Case("sparse_mla", "lse", _mla("lse"), "mla", "the mixed batch with return_lse=True: out and lse"),
    Case("sparse_mla", "odd", _mla_odd, "mla", "5 heads, latent 40+8, top-7, block size 3"),
    Case("sparse_mla", "dcp-merge", _mla_dcp, "dcp",
         f"{DCP_RANKS} DCP ranks' partial outputs + lse merged vs the whole cache (decode, verify, prefill)"),
    Case("sparse_mla", "head-dims", _mla_head_dims("plain"), "mla", "latent 512+64 at any scale, 8 heads, top-16"),
    Case("sparse_mla", "head-dims-padding", _mla_head_dims("padding"), "mla",
         "latent 512+64, -1 scattered, a row with no valid index"),
    Case("sparse_mla", "cache-fp8_ds_mla", _mla_head_dims("cache-fp8_ds_mla"), "mla",
         "latent 512+64 in FlashMLA's fp8 rows (e4m3 | f32 scales | bf16 rope), -1 scattered, a row empty"),
    Case("sparse_mla", "cache-c8_sfa", _mla_head_dims("cache-c8_sfa"), "mla",
         "latent 512+64 in Ascend's C8 rows (int8 | bf16 rope | f32 scales), -1 scattered, a row empty"),
]
