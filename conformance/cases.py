"""The case catalogue: per op, the inputs a backend is checked on and how it is judged.

Sizes come from `SIZES["full"]` (the real GLM-5.2 dimensions: indexer 32 heads x 128 with top-k
2048, 64 MLA heads with a 512 + 64 latent, 256 experts top-8, hidden 6144, expert width 2048,
vocabulary 154880) or `SIZES["quick"]` (the same cases scaled down, for interpreters and emulators
in CI). Lengths are written in units of top-k so both scales cover contexts shorter than, equal to
and >= 4x top-k.

Two dimensions are split rather than run at full size together, because one op call would not fit
a 24 GB CI machine: the 256-expert top-8 routing runs with a small hidden size, and the real hidden
6144 x width 2048 experts run with 4 experts (8 full-size experts in float32 alone are 1.2 GB, 256
would be 39 GB).

Every builder draws from a generator seeded by the case's name (`inputs.generator`), so every
backend sees identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from glm52_backends.config import GLM52_CONFIG as _G

from .inputs import Arg, Batch, CaseInputs, generator, page, rand, randn, randperm

JUDGES = ("close", "mla", "topk", "route", "exact", "dcp")


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    build: Callable[[str], CaseInputs]  # scale ("full" | "quick") -> inputs
    judge: str
    about: str = ""

    def __post_init__(self):
        if self.judge not in JUDGES:
            raise ValueError(f"case {self.op}/{self.name}: judge {self.judge!r} not in {JUDGES}")


SIZES = {
    # the real GLM-5.2 dimensions (config.GLM52_CONFIG) and a 64-token paged-cache block
    "full": dict(Hi=_G.index_n_heads, Di=_G.index_head_dim, K=_G.index_topk,                      # indexer
                 H=_G.num_attention_heads, Dl=_G.kv_lora_rank, Dr=_G.qk_rope_head_dim,            # MLA
                 E=_G.n_routed_experts, top=_G.num_experts_per_tok, Hd=_G.hidden_size,           # MoE
                 I=_G.moe_intermediate_size, V=_G.vocab_size, BS=64),
    "quick": dict(Hi=4, Di=16, K=16, H=4, Dl=32, Dr=8, E=32, top=4, Hd=64, I=32, V=97, BS=16),
}


def _g(op: str, name: str, scale: str) -> torch.Generator:
    return generator(op, name, scale)


# ---- indexer_topk -----------------------------------------------------------------------------------

def _indexer_inputs(g, batch: Batch, Hi: int, Di: int, topk: int, bs: int, *, keys=None, q=None, w=None,
                    ) -> CaseInputs:
    keys = keys if keys is not None else [randn(g, L, Di) for L in batch.seq_lens]
    q = q if q is not None else randn(g, batch.T, Hi, Di)
    w = w if w is not None else randn(g, batch.T, Hi) * (Hi ** -0.5 * Di ** -0.5)
    cache, table = page(g, keys, bs)
    return CaseInputs(
        {"q": Arg(q, "act"), "w": Arg(w, "f32"), "k_cache": Arg(cache, "act"), "block_table": Arg(table, "int"),
         "seq_lens": Arg(batch.seq_lens_t, "int"), "cu_seqlens_q": Arg(batch.cu_seqlens_q, "int"),
         "topk": Arg(topk, "const")},
        meta={"batch": batch})


def indexer_scores(args: list, batch: Batch) -> torch.Tensor:
    """Reference scores [T, L_max] in float64, -inf where not causal: an explicit per-token loop over
    heads (a second formulation next to cpu_ref's einsum)."""
    q, w, k_cache, table = args[0].double(), args[1].double(), args[2].double(), args[3]
    bs = k_cache.shape[1]
    Lmax = max(batch.seq_lens)
    out = torch.full((batch.T, Lmax), float("-inf"), dtype=torch.float64)
    for t, b, pos in batch.tokens():
        p = torch.arange(pos + 1)
        k = k_cache[table[b].long()[p // bs], p % bs]                              # [pos+1, Di]
        out[t, :pos + 1] = sum(w[t, h] * torch.relu(k @ q[t, h]) for h in range(q.shape[1]))
    return out


def _idx_real(kind: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        K = s["K"]
        g = _g("indexer_topk", kind, scale)
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
    g = _g("indexer_topk", "relu-ties", scale)
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
    g = _g("indexer_topk", "concentrated", scale)
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
    g = _g("indexer_topk", "odd", scale)
    batch = Batch([(3, 7), (1, 13), (2, 2), (5, 23)])
    return _indexer_inputs(g, batch, 3, 24, 10, 5)


# ---- sparse_mla -----------------------------------------------------------------------------------

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


def _mla_inputs(g, batch: Batch, s: dict, topk: int, bs: int, *, lse: bool = False, **kw) -> CaseInputs:
    """The latent cache as the two paged tensors of the contract, c [NB, BS, Dl] and k_pe [NB, BS, Dr],
    NaN-poisoned in the same slots; `lse`: ask for the log-sum-exp too."""
    H, Dl, D = s["H"], s["Dl"], s["Dl"] + s["Dr"]
    kv = [randn(g, L, D) for L in batch.seq_lens]
    cache, table = page(g, kv, bs)
    scale = (s.get("dn", 3 * s["Dr"]) + s["Dr"]) ** -0.5                           # (dn + dr)^-0.5
    return CaseInputs(
        {"q": Arg(randn(g, batch.T, H, D), "act"), "c_cache": Arg(cache[..., :Dl].contiguous(), "act"),
         "kpe_cache": Arg(cache[..., Dl:].contiguous(), "act"),
         "idx": Arg(_random_topk(g, batch, topk, **kw), "int"), "block_table": Arg(table, "int"),
         "seq_lens": Arg(batch.seq_lens_t, "int"), "cu_seqlens_q": Arg(batch.cu_seqlens_q, "int"),
         "scale": Arg(scale, "const")},
        meta={"batch": batch}, kwargs={"return_lse": True} if lse else {})


def _mla(kind: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        K = s["K"]
        g = _g("sparse_mla", kind, scale)
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
    g = _g("sparse_mla", "dcp-merge", scale)
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


def _mla_odd(scale: str) -> CaseInputs:
    g = _g("sparse_mla", "odd", scale)
    s = {"H": 5, "Dl": 40, "Dr": 8}
    return _mla_inputs(g, Batch([(3, 7), (1, 13), (2, 2)]), s, 7, 3)


# ---- moe_experts / moe_route ---------------------------------------------------------------------------

def _moe_inputs(g, T: int, Hd: int, I: int, E: int, K: int, ids: torch.Tensor | None = None) -> CaseInputs:
    if ids is None:
        ids = torch.stack([randperm(g, E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    wts = rand(g, T, K) * 0.5 + 0.05
    return CaseInputs(
        {"x": Arg(randn(g, T, Hd), "act"),
         "w13": Arg(randn(g, E, 2 * I, Hd, std=Hd ** -0.5), "weight"),
         "w2": Arg(randn(g, E, Hd, I, std=I ** -0.5), "weight"),
         "topk_ids": Arg(ids.long(), "int"), "topk_weights": Arg(wts, "f32")})


def _moe_routing(T: int):
    def build(scale: str) -> CaseInputs:  # the real 256-expert top-8 routing, small hidden size
        s = SIZES[scale]
        E, K = (256, 8) if scale == "full" else (s["E"], s["top"])
        return _moe_inputs(_g("moe_experts", f"T{T}", scale), T, 128 if scale == "full" else s["Hd"],
                           64 if scale == "full" else s["I"], E, K)
    return build


def _moe_real_width(scale: str) -> CaseInputs:  # hidden 6144 x width 2048, every expert used
    s = SIZES[scale]
    return _moe_inputs(_g("moe_experts", "width", scale), 3, s["Hd"], s["I"], 4, 4)


def _moe_special(kind: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = _g("moe_experts", kind, scale)
        Hd, I = (256, 128) if scale == "full" else (s["Hd"], s["I"])
        if kind == "empty-experts":            # 64 experts, 3 tokens x 2: most experts get nothing
            return _moe_inputs(g, 3, Hd, I, 64, 2)
        if kind == "one-expert":               # every token routed to expert 5 (slot 0) and others
            T, E, K = 33, 16, 4
            ids = torch.stack([torch.cat([torch.tensor([5]), (randperm(g, E - 1)[:K - 1] + 6) % E])
                               for _ in range(T)])
            return _moe_inputs(g, T, Hd, I, E, K, ids)
        if kind == "unused-slots":             # -1 ids: slots a router left empty contribute nothing
            T, E, K = 9, 12, 3
            ids = torch.stack([randperm(g, E)[:K] for _ in range(T)])
            ids[::2, -1] = -1
            ids[1, :] = -1
            return _moe_inputs(g, T, Hd, I, E, K, ids)
        if kind == "odd":
            return _moe_inputs(g, 7, 72, 40, 7, 3)
        raise KeyError(kind)
    return build


def _route(kind: str):
    def build(scale: str) -> CaseInputs:
        g = _g("moe_route", kind, scale)
        T, E, K, ng, tg, norm, rsf = {
            "glm52": (17, 256, 8, 1, 1, True, 2.5),          # GLM-5.2: sigmoid, bias, renorm, x2.5
            "grouped": (9, 64, 6, 8, 3, True, 1.0),          # DeepSeek-V3 style group-limited top-k
            "no-renorm": (5, 32, 4, 4, 2, False, 1.5),
            "one-token": (1, 20, 3, 1, 1, True, 2.5),
        }[kind]
        return CaseInputs({"router_logits": Arg(randn(g, T, E, std=2.0), "f32"),
                           "correction_bias": Arg(rand(g, E) * 0.2, "f32"), "top_k": Arg(K, "const"),
                           "n_group": Arg(ng, "const"), "topk_group": Arg(tg, "const"),
                           "norm_topk_prob": Arg(norm, "const"), "routed_scaling_factor": Arg(rsf, "const")})
    return build


def selection_scores(args: list) -> torch.Tensor:
    """moe_route's selection scores [T, E] in float64 with the group limit applied: experts of groups
    outside the `topk_group` best (by the sum of each group's two best scores) are -inf. Written as
    a per-token loop, a second formulation next to cpu_ref's."""
    logits, bias, _, n_group, topk_group = args[:5]
    choice = torch.sigmoid(logits.double()) + bias.double()
    T, E = choice.shape
    per = E // n_group
    for t in range(T):
        groups = [sorted(choice[t, g * per:(g + 1) * per].tolist())[-2:] for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -sum(groups[g]))[:topk_group]
        for g in range(n_group):
            if g not in keep:
                choice[t, g * per:(g + 1) * per] = float("-inf")
    return choice


# ---- mtp_verify ---------------------------------------------------------------------------------------

def _mtp(k: int, temperature: float, top_p: float = 1.0, with_probs: bool = False):
    """B = k + 2 requests whose drafts agree with the target's argmax for 0..k tokens (greedy), or
    drafts drawn near the target's mode (sampling); supplied uniforms drive every random choice."""
    def build(scale: str) -> CaseInputs:
        V = SIZES[scale]["V"]
        name = f"k{k}-t{temperature}-p{top_p}-{'q' if with_probs else 'onehot'}"
        g = _g("mtp_verify", name, scale)
        B = k + 2
        logits = randn(g, B, k + 1, V, std=3.0)
        best = logits.argmax(-1)                                                 # [B, k+1]
        draft = torch.randint(0, V, (B, k), generator=g)
        for b in range(B):
            n = b % (k + 1)                                                      # accept n of k (greedy)
            draft[b, :n] = best[b, :n]
            miss = best[b, n:k]
            draft[b, n:] = torch.where(draft[b, n:] == miss, (miss + 1) % V, draft[b, n:])
        if temperature > 0:                                                      # likely, not certain
            top2 = logits[:, :k].topk(2, -1).indices
            draft = torch.where(rand(g, B, k) < 0.5, top2[..., 0], top2[..., 1])
        probs = torch.softmax(randn(g, B, k, V) + 4.0 * torch.nn.functional.one_hot(draft, V), -1) \
            if with_probs else None
        return CaseInputs({"draft": Arg(draft, "int"), "target_logits": Arg(logits, "f32"),
                           "draft_probs": Arg(probs, "f32") if with_probs else Arg(None, "const"),
                           "temperature": Arg(temperature, "const"), "top_p": Arg(top_p, "const"),
                           "uniforms": Arg(rand(g, B, k + 1), "f32")})
    return build


def verify_ratios(draft, target_logits, draft_probs, temperature, top_p) -> torch.Tensor:
    """p(d)/q(d) [B, k] as the reference computes them (float32)."""
    from glm52_backends.sampling import probs_from_logits
    p = probs_from_logits(target_logits, temperature, top_p, torch.float32)
    k = draft.shape[1]
    q = torch.nn.functional.one_hot(draft.long(), p.shape[-1]).float() if draft_probs is None else draft_probs.float()
    d = draft.long()[..., None]
    return p[:, :k].gather(-1, d)[..., 0] / q.gather(-1, d)[..., 0]


BOUNDARY = 0.005   # u sits this far (relative) above p/q at the first rejection


def _mtp_boundary(with_probs: bool):
    """Requests whose first rejected draft has u = p/q * (1 + 0.5 %): rejected by the contract (accept
    while u < p/q), accepted by a verify with 1 % slack (a `<=` with a margin, or a ratio computed a
    little too large); 0.5 % is far above any float32 rounding of p/q, so every correct backend rejects."""
    def build(scale: str) -> CaseInputs:
        V = SIZES["quick"]["V"]   # the acceptance rule, not the size, is under test (draft q(d) stays ~1)
        g = _g("mtp_verify", f"boundary-{with_probs}", scale)
        B, k, T = 6, 3, 0.8
        logits = randn(g, B, k + 1, V, std=3.0)
        draft = logits[:, :k].topk(3, dim=-1).indices[..., 1]                   # the 2nd most likely: p < 1
        probs = torch.softmax(randn(g, B, k, V) + 8.0 * torch.nn.functional.one_hot(draft, V), -1) \
            if with_probs else None
        ratio = verify_ratios(draft, logits, probs, T, 1.0)
        u = rand(g, B, k + 1)
        for b in range(B):
            n = b % k                                                           # accept n, then the boundary
            u[b, :n] = 0.0
            u[b, n] = float(ratio[b, n]) * (1 + BOUNDARY)
            if not 0.0 < u[b, n] < 1.0:
                raise AssertionError(f"boundary case: u = {float(u[b, n])} outside (0, 1)")
        return CaseInputs({"draft": Arg(draft, "int"), "target_logits": Arg(logits, "f32"),
                           "draft_probs": Arg(probs, "f32") if with_probs else Arg(None, "const"),
                           "temperature": Arg(T, "const"), "top_p": Arg(1.0, "const"),
                           "uniforms": Arg(u, "f32")})
    return build


# ---- supporting ops -----------------------------------------------------------------------------------

def _norm(kind: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = _g(kind, "x", scale)
        if kind == "rms_norm":
            x = randn(g, 5, s["Hd"], std=3.0)
            return CaseInputs({"x": Arg(x, "act"), "weight": Arg(1 + 0.1 * randn(g, s["Hd"]), "weight"),
                               "eps": Arg(1e-5, "const")})
        x = randn(g, 7, s["Di"], std=2.0) + 0.5
        return CaseInputs({"x": Arg(x, "act"), "weight": Arg(1 + 0.1 * randn(g, s["Di"]), "weight"),
                           "bias": Arg(0.1 * randn(g, s["Di"]), "weight"), "eps": Arg(1e-6, "const")})
    return build


def _norm_odd(scale: str) -> CaseInputs:  # 3-D input, odd width
    g = _g("rms_norm", "odd", scale)
    return CaseInputs({"x": Arg(randn(g, 3, 5, 37), "act"), "weight": Arg(1 + 0.1 * randn(g, 37), "weight"),
                       "eps": Arg(1e-6, "const")})


def _rope(kind: str):
    """Positions stay below 256: float32 angles pos * inv_freq carry an absolute error ~pos * 2^-24,
    so two correct float32 implementations drift apart by more than the float32 row beyond a few
    hundred positions. Large positions are covered by the model-level case."""
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = _g("rope", kind, scale)
        T = 9
        x = randn(g, T, s["H"], s["Dr"]) if kind == "heads" else randn(g, T, s["Dr"])
        pos = torch.randint(0, 256, (T,), generator=g)
        return CaseInputs({"x": Arg(x, "act"), "positions": Arg(pos, "int"), "theta": Arg(8e6, "const")})
    return build


def _linear(scale: str) -> CaseInputs:  # kv_a_proj_with_mqa: [576, 6144]
    s = SIZES[scale]
    g = _g("linear", "kv_a", scale)
    return CaseInputs({"x": Arg(randn(g, 5, s["Hd"]), "act"),
                       "weight": Arg(randn(g, s["Dl"] + s["Dr"], s["Hd"], std=s["Hd"] ** -0.5), "weight")})


def _mlp(scale: str) -> CaseInputs:  # the shared expert: [2 x 2048, 6144], [6144, 2048]
    s = SIZES[scale]
    g = _g("mlp", "shared", scale)
    return CaseInputs({"x": Arg(randn(g, 4, s["Hd"]), "act"),
                       "w13": Arg(randn(g, 2 * s["I"], s["Hd"], std=s["Hd"] ** -0.5), "weight"),
                       "w2": Arg(randn(g, s["Hd"], s["I"], std=s["I"] ** -0.5), "weight")})


# ---- quantized weights (glm52_backends/quant.py) ----------------------------------------------------------
# Each format's weights are quantized once from the case's float weights (the model's reshapes
# included: gate/up concatenated after quantizing each, experts stacked), so every backend and the
# reference see the same codes and scales; the activations are the dtype-rounded ones, quantized by
# each side with the format's recipe. Judged by the looser of the dtype row and the format's row.
QUANT_LINEAR_FORMATS = ("fp8_block", "w8a8_dynamic", "w8a8_static", "w4a8_dynamic")
QUANT_FFN_FORMATS = ("fp8_block", "w8a8_dynamic", "w4a8_dynamic")   # static is the recipe's attention format


def _q(w: torch.Tensor, fmt: str, x: torch.Tensor | None = None):
    from glm52_backends.weights import quantize_weight
    if fmt == "w8a8_static":  # calibrated on the case's own input, with an asymmetric offset
        return quantize_weight(w, fmt, input_scale=float(x.abs().max()) * 1.05 / 120, input_offset=5)
    return quantize_weight(w, fmt)


def _q_w13(w13: torch.Tensor, fmt: str):
    from glm52_backends.weights import cat_rows
    I = w13.shape[-2] // 2
    return cat_rows([_q(w13[:I], fmt), _q(w13[I:], fmt)])


def _q_linear(fmt: str, odd: bool = False):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = _g("linear", f"{fmt}-{'odd' if odd else 'kv_a'}", scale)
        N, K = (300, 200) if odd else (s["Dl"] + s["Dr"], s["Hd"])
        x = randn(g, 7 if odd else 5, K)
        x[0, :3] *= 30  # an outlier channel: groups and rows with very different ranges
        w = randn(g, N, K, std=K ** -0.5)
        return CaseInputs({"x": Arg(x, "act"), "weight": Arg(_q(w, fmt, x), "qweight")})
    return build


def _q_mlp(fmt: str):
    def build(scale: str) -> CaseInputs:
        s = SIZES[scale]
        g = _g("mlp", fmt, scale)
        Hd, I = s["Hd"], s["I"]
        return CaseInputs({"x": Arg(randn(g, 4, Hd), "act"),
                           "w13": Arg(_q_w13(randn(g, 2 * I, Hd, std=Hd ** -0.5), fmt), "qweight"),
                           "w2": Arg(_q(randn(g, Hd, I, std=I ** -0.5), fmt), "qweight")})
    return build


def _q_moe(fmt: str, kind: str):
    def build(scale: str) -> CaseInputs:
        from glm52_backends.weights import stack
        s = SIZES[scale]
        g = _g("moe_experts", f"{fmt}-{kind}", scale)
        if kind == "real-width":
            T, Hd, I, E, K = 3, s["Hd"], s["I"], 4, 4
        else:                                    # 16 tokens, unused slots, experts without tokens
            T, Hd, I, E, K = 16, (256 if scale == "full" else s["Hd"]), (128 if scale == "full" else s["I"]), 12, 3
        ids = torch.stack([randperm(g, E)[:K] for _ in range(T)]) if kind == "real-width" else \
            torch.stack([randperm(g, E - 4)[:K] for _ in range(T)])       # the last 4 experts get no token
        if kind != "real-width":
            ids[::3, -1] = -1
        w13 = randn(g, E, 2 * I, Hd, std=Hd ** -0.5)
        w2 = randn(g, E, Hd, I, std=I ** -0.5)
        return CaseInputs(
            {"x": Arg(randn(g, T, Hd), "act"),
             "w13": Arg(stack([_q_w13(w13[e], fmt) for e in range(E)]), "qweight"),
             "w2": Arg(stack([_q(w2[e], fmt) for e in range(E)]), "qweight"),
             "topk_ids": Arg(ids.long(), "int"), "topk_weights": Arg(rand(g, T, K) * 0.5 + 0.05, "f32")})
    return build


# ---- the real attention head widths at short lengths ------------------------------------------------------
# Fused attention ops take only the real head widths (Ascend's npu_lightning_indexer: index head dim
# 128, at most 64 heads; npu_sparse_flash_attention: latent 512 + rope 64; npu_interleave_rope:
# rotary width 64), which the quick scale shrinks. These cases keep GLM-5.2's widths (32 indexer
# heads x 128, a 512 + 64 latent, the 64-wide rotary part) at a few tokens, short contexts and
# top-16, so an emulator or interpreter in CI runs those ops natively, cheaply, at both scales.
HEAD_DIMS = dict(Hi=32, Di=128, H=8, Dl=512, Dr=64, dn=192, K=16, BS=16)
HEAD_DIMS_BATCH = [(1, 37), (3, 20), (2, 2), (4, 16)]   # decode past top-k, a chunk, a 2-token prefill, one block


def _idx_head_dims(scale: str) -> CaseInputs:
    s = HEAD_DIMS
    g = _g("indexer_topk", "head-dims", scale)
    return _indexer_inputs(g, Batch(HEAD_DIMS_BATCH), s["Hi"], s["Di"], s["K"], s["BS"])


def _mla_head_dims(kind: str):
    def build(scale: str) -> CaseInputs:
        s = HEAD_DIMS
        g = _g("sparse_mla", f"head-dims-{kind}", scale)
        if kind == "padding":   # -1 scattered through the rows, one row with no valid index
            return _mla_inputs(g, Batch(HEAD_DIMS_BATCH), s, s["K"], s["BS"], scatter_pad=True, empty_rows=1)
        return _mla_inputs(g, Batch(HEAD_DIMS_BATCH), s, s["K"], s["BS"])
    return build


def _rope_head_dims(scale: str) -> CaseInputs:
    g = _g("rope", "head-dims", scale)
    x = randn(g, 9, HEAD_DIMS["H"], HEAD_DIMS["Dr"])
    pos = torch.randint(0, 256, (9,), generator=g)
    return CaseInputs({"x": Arg(x, "act"), "positions": Arg(pos, "int"), "theta": Arg(8e6, "const")})


# ---- the catalogue -------------------------------------------------------------------------------------

CASES: list[Case] = [
    Case("indexer_topk", "decode", _idx_real("decode"), "topk", "decode, contexts >=4x, =, < top-k and 1"),
    Case("indexer_topk", "prefill", _idx_real("prefill"), "topk", "causal prefill chunk across the top-k boundary"),
    Case("indexer_topk", "mixed", _idx_real("mixed"), "topk", "decode + verify + prefill in one step"),
    Case("indexer_topk", "relu-ties", _idx_relu_ties, "topk", "exact ReLU-zero ties at the boundary"),
    Case("indexer_topk", "concentrated", _idx_concentrated, "topk", "real-like concentrated scores"),
    Case("indexer_topk", "odd", _idx_odd, "topk", "3 heads x 24, top-10, block size 5"),
    Case("indexer_topk", "head-dims", _idx_head_dims, "topk", "32 heads x 128 at any scale, top-16, short"),
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
    *[Case("moe_experts", f"T{T}", _moe_routing(T), "close", f"{T} tokens, 256 experts top-8 (small hidden)")
      for T in (1, 16, 128)],
    Case("moe_experts", "real-width", _moe_real_width, "close", "hidden 6144 x width 2048, 4 experts"),
    Case("moe_experts", "empty-experts", _moe_special("empty-experts"), "close", "most experts get no token"),
    Case("moe_experts", "one-expert", _moe_special("one-expert"), "close", "every token routed to expert 5"),
    Case("moe_experts", "unused-slots", _moe_special("unused-slots"), "close", "-1 ids, one token with none"),
    Case("moe_experts", "odd", _moe_special("odd"), "close", "hidden 72, width 40, 7 experts top-3"),
    *[Case("moe_route", kind, _route(kind), "route") for kind in ("glm52", "grouped", "no-renorm", "one-token")],
    *[Case("mtp_verify", f"greedy-k{k}", _mtp(k, 0.0), "exact", "accepts 0..k across the batch")
      for k in range(1, 6)],
    Case("mtp_verify", "sample-k1", _mtp(1, 1.0), "exact", "rejection sampling, one-hot draft"),
    Case("mtp_verify", "sample-k3", _mtp(3, 0.7), "exact", "rejection sampling, one-hot draft"),
    Case("mtp_verify", "sample-k5-probs-topp", _mtp(5, 1.0, 0.9, True), "exact", "draft probs, top-p 0.9"),
    *[Case("mtp_verify", f"boundary-{'q' if q else 'onehot'}", _mtp_boundary(q), "exact",
           "u 0.5 % above p/q at the first rejection: must reject") for q in (False, True)],
    Case("rms_norm", "hidden", _norm("rms_norm"), "close"),
    Case("rms_norm", "odd", _norm_odd, "close", "3-D input, width 37"),
    Case("layer_norm", "index-key", _norm("layer_norm"), "close"),
    Case("rope", "heads", _rope("heads"), "close", "[T, H, 64]"),
    Case("rope", "shared-key", _rope("key"), "close", "[T, 64]"),
    Case("rope", "head-dims", _rope_head_dims, "close", "[T, 8, 64] at any scale"),
    Case("linear", "kv_a", _linear, "close"),
    Case("mlp", "shared-expert", _mlp, "close"),
    *[Case("linear", f"{fmt}-kv_a", _q_linear(fmt), "close", f"{fmt}: kv_a [576, 6144], an outlier channel")
      for fmt in QUANT_LINEAR_FORMATS],
    *[Case("linear", f"{fmt}-odd", _q_linear(fmt, True), "close", f"{fmt}: [300, 200], partial blocks")
      for fmt in QUANT_LINEAR_FORMATS],
    *[Case("mlp", f"{fmt}-shared-expert", _q_mlp(fmt), "close", f"{fmt}: the shared expert") for fmt in QUANT_FFN_FORMATS],
    *[Case("moe_experts", f"{fmt}-{kind}", _q_moe(fmt, kind), "close", f"{fmt}: {about}")
      for fmt in QUANT_FFN_FORMATS for kind, about in (("real-width", "hidden 6144 x width 2048, 4 experts"),
                                                        ("slots", "16 tokens, -1 slots, idle experts"))],
]
