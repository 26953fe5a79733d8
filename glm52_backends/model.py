"""GLM-5.x (`glm_moe_dsa`): the network only, written once against the op contract (spec §3-§8).

`Glm52Network` holds the weights in compute layout and runs steps: embedding, the decoder layers
(MLA over the indexer's top-k with IndexShare, MoE or dense MLP), the final norm, the MTP layer
and the lm_head. Compute goes through `self.ops` (a `BoundBackend`), the seams between devices
through `self.comm` (ops/comm.py; the identity on one device). Loading, tokenizer, caches,
sampling and generation live in `engine/`; a step's metadata in `step.py`.

Letters: T step tokens, B requests, H heads, C latent (kv_lora_rank), dn/dr/dv nope/rope/value
head dims, Hi/Di indexer heads/dim, E experts, I expert width, Hd hidden, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .cache import PagedCache
from .config import ModelConfig
from .ops import dcp as dcp_ops
from .registry import BackendOutputError, BoundBackend
from .step import Step, plan_step
from .weights import Weight, cat_rows, stack


# ---- weights in compute layout ----------------------------------------------------------------
@dataclass
class Indexer:
    wq_b: Weight            # [Hi*Di, q_lora]
    wk: Weight              # [Di, Hd]
    k_norm_w: torch.Tensor  # [Di]
    k_norm_b: torch.Tensor  # [Di]
    w_proj: Weight          # [Hi, Hd]


@dataclass
class Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    wq_a: Weight            # [q_lora, Hd]
    q_norm: torch.Tensor    # [q_lora]
    wq_b: Weight            # [H*(dn+dr), q_lora]
    wkv_a: Weight           # [C+dr, Hd]
    kv_norm: torch.Tensor   # [C]
    w_uk: torch.Tensor      # [H, dn, C]   kv_b rows 0..dn-1 of each head (absorbed into q)
    w_uv: torch.Tensor      # [H, dv, C]   kv_b rows dn.. of each head (absorbed into the output)
    wo: Weight              # [Hd, H*dv]
    indexer: Indexer | None
    w13: Weight | None = None             # dense MLP [2I, Hd]
    w2: Weight | None = None              # dense MLP [Hd, I]
    gate: Weight | None = None            # router [E, Hd] f32 (made once at build)
    gate_bias: torch.Tensor | None = None  # [E] f32
    e_w13: Weight | None = None           # [E, 2I, Hd] gate rows then up rows
    e_w2: Weight | None = None            # [E, Hd, I]
    s_w13: Weight | None = None           # shared expert [2Is, Hd]
    s_w2: Weight | None = None            # [Hd, Is]
    # MTP layer only
    enorm: torch.Tensor | None = None
    hnorm: torch.Tensor | None = None
    eh_proj: Weight | None = None         # [Hd, 2Hd]: embedding half first
    head_norm: torch.Tensor | None = None


def build_layers(cfg: ModelConfig, sd: dict[str, "torch.Tensor | Weight"], include_mtp: bool, tp: int = 1,
                 experts: range | None = None, dtype: torch.dtype | None = None) -> list[Layer]:
    """HF per-expert tensors -> compute layout. Pops from `sd` so memory is not held twice.
    `sd` holds one rank's slices (parallel.RankLayout): H / tp heads, and the routed `experts`.

    A linear may come as a plain tensor or as a quantized `Weight` (loader.py); its scales follow every
    reshape: gate and up rows concatenated by `weights.cat_rows`, experts stacked by `weights.stack`.
    Norms and the router stay float (the router weight is made float32 once, here). `kv_b_proj` is
    split per head into W_UK / W_UV, which MLA absorbs into the query and the output with einsums; a
    quantized kv_b is dequantized to `dtype` here, once, as vLLM does for MLA absorption
    (`get_and_maybe_dequant_weights` in its MLA attention), so it is held at the model dtype
    (planner.py counts it that way)."""
    H, dn, dv, C = cfg.num_attention_heads // tp, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    experts = experts if experts is not None else range(cfg.n_routed_experts)
    layers = []
    for i in range(cfg.num_hidden_layers + (1 if include_mtp else 0)):
        p = f"model.layers.{i}."
        g = lambda name: sd.pop(p + name)  # noqa: E731

        def W(name: str) -> Weight:        # a linear weight: stored format kept
            v = g(name)
            return v if isinstance(v, Weight) else Weight(v)

        kv_b = g("self_attn.kv_b_proj.weight")
        if isinstance(kv_b, Weight):
            kv_b = kv_b.dense(dtype) if kv_b.quantized else kv_b.data     # dtype None: float32
        kv_b = kv_b.view(H, dn + dv, C)
        indexer = None
        if p + "self_attn.indexer.wk.weight" in sd:
            indexer = Indexer(W("self_attn.indexer.wq_b.weight"), W("self_attn.indexer.wk.weight"),
                              g("self_attn.indexer.k_norm.weight"), g("self_attn.indexer.k_norm.bias"),
                              W("self_attn.indexer.weights_proj.weight"))
        layer = Layer(
            in_norm=g("input_layernorm.weight"), post_norm=g("post_attention_layernorm.weight"),
            wq_a=W("self_attn.q_a_proj.weight"), q_norm=g("self_attn.q_a_layernorm.weight"),
            wq_b=W("self_attn.q_b_proj.weight"), wkv_a=W("self_attn.kv_a_proj_with_mqa.weight"),
            kv_norm=g("self_attn.kv_a_layernorm.weight"), w_uk=kv_b[:, :dn].contiguous(),
            w_uv=kv_b[:, dn:].contiguous(), wo=W("self_attn.o_proj.weight"), indexer=indexer)
        del kv_b
        if cfg.is_moe(i):
            layer.gate = Weight(g("mlp.gate.weight").float())          # the f32 router, made once
            layer.gate_bias = g("mlp.gate.e_score_correction_bias")
            layer.e_w13 = stack([cat_rows([W(f"mlp.experts.{e}.gate_proj.weight"), W(f"mlp.experts.{e}.up_proj.weight")])
                                 for e in experts])
            layer.e_w2 = stack([W(f"mlp.experts.{e}.down_proj.weight") for e in experts])
            if cfg.n_shared_experts:
                layer.s_w13 = cat_rows([W("mlp.shared_experts.gate_proj.weight"), W("mlp.shared_experts.up_proj.weight")])
                layer.s_w2 = W("mlp.shared_experts.down_proj.weight")
        else:
            layer.w13 = cat_rows([W("mlp.gate_proj.weight"), W("mlp.up_proj.weight")])
            layer.w2 = W("mlp.down_proj.weight")
        if i == cfg.num_hidden_layers:
            layer.enorm, layer.hnorm = g("enorm.weight"), g("hnorm.weight")
            layer.eh_proj, layer.head_norm = W("eh_proj.weight"), g("shared_head.norm.weight")
        layers.append(layer)
    return layers


# Prefill context parallelism's query side (Glm52Network._split_tokens): a DCP step of fewer tokens runs the
# query projections on every rank of the group (decode: one more collective per layer would cost more than
# the rows it saves); a longer one splits them over the group.
PREFILL_CP_MIN_TOKENS = 64
# Bytes one DCP merge may hold (Glm52Network._dcp_chunks): a long prefill step's merges run over as many query
# tokens at a time as fit (the top-k candidates, then the gathered queries and partial outputs, or the gathered
# rows), so a 8192-token chunk at dcp16 and top-2048 does not hold 4 GiB of candidates per full layer, and a
# small model's steps merge at once.
DCP_MERGE_BYTES = 256 << 20


def dcp_topk_bytes_per_token(dcp: int, topk: int) -> int:
    """One query token's top-k merge: dcp x topk candidates (score and position in float64, all-gathered),
    with the merge's stable sorts and gathers."""
    return dcp * topk * 64


def dcp_attention_bytes_per_token(group_heads: int, C: int, Dr: int) -> int:
    """One query token's lse-form attention merge: the group's queries (BF16), the partial out and its
    weighted copy (F32), every head of the dcp group."""
    return group_heads * ((C + Dr) * 2 + C * 8)


def dcp_gather_bytes_per_token(topk: int, row_bytes: int) -> int:
    """One query token's gather-form attention: its topk rows read here and summed over the group."""
    return topk * 2 * row_bytes


def dcp_merge_tokens(bytes_per_token: int) -> int:
    """Query tokens per DCP merge within DCP_MERGE_BYTES."""
    return max(1, DCP_MERGE_BYTES // max(1, bytes_per_token))


class Glm52Network:
    """The network over one process's weights. `run(cache, chunks)` appends tokens to requests and
    returns their final-normed hidden states; `run_mtp` is the MTP layer; `logits` the lm_head.

    Over several ranks (`layout`, a parallel.RankLayout; `comm`, their collectives) `sd` holds this
    rank's slices: H / tp heads in q_b, kv_b and o_proj (all-reduce after o_proj), the MLP widths
    / tp (all-reduce after the FFN, the routed and shared experts summed first), the vocabulary / tp
    in the embedding (masked lookup + all-reduce) and lm_head (logits all-gathered), the routed
    experts of this rank (ep > 1: each token dispatched to the ranks owning its experts and combined
    back, `_moe_dispatched`) or every expert's width / tp. With decode context parallelism (`dcp_comm`,
    dcp consecutive ranks of the tp group) each rank's cache holds 1/dcp of every request's rows: the
    indexer's local top-k are merged over the group (`_topk_dcp`), attention runs on the rank's rows for
    the group's heads and merges by log-sum-exp (`_sparse_mla_dcp`); ops/dcp.py has the layout. Prefill
    context parallelism: the key-side projections run on the rows this rank stores (`_mine`), the query
    side on a 1/dcp slice of a long step, all-gathered (`_queries`, `_split_tokens`).
    """

    def __init__(self, cfg: ModelConfig, sd: dict[str, torch.Tensor], ops: BoundBackend, device: torch.device,
                 include_mtp: bool, layout=None, comm=None, dp_comm=None, ep_comm=None, dcp_comm=None):
        self.cfg, self.ops, self.device = cfg, ops, device
        self.comm = comm if comm is not None else ops.comm                                # the tp group
        # dcp > 1: decode context parallelism over `dcp_comm` (dcp consecutive ranks of the tp group): each
        # holds 1/dcp of every request's cache rows (ops/dcp.py); None: every rank holds every row
        self.dcp = layout.plan.dcp if layout is not None else 1
        self.dcp_comm = dcp_comm if self.dcp > 1 else None
        self.prefill_cp_min_tokens = PREFILL_CP_MIN_TOKENS     # _split_tokens: shorter steps skip the query split
        self.dcp_merge_tokens: int | None = None    # _dcp_chunks: query tokens per DCP merge (None: DCP_MERGE_BYTES)
        # how attention merges over the dcp group: "lse" (partials merged by their log-sum-exp) when the backend's
        # sparse_mla returns it natively, else "gather" (the selected rows brought to every rank)
        self.dcp_attention = "lse" if ops.capabilities.sparse_mla_lse else "gather"
        if self.dcp > 1 and (dcp_comm is None or dcp_comm.world_size != self.dcp):
            raise RuntimeError(f"internal: dcp = {self.dcp} needs the collectives of a dcp group of that size")
        self.dp_comm = dp_comm if layout is not None and layout.dispatch else None        # EP stage 2
        # ep > 1: the expert-parallel group (every rank: ep = tp x dp); tokens are dispatched to the ranks
        # owning their experts and combined back (ops/comm.py moe_dispatch / moe_combine)
        self.ep_comm = ep_comm if layout is not None and layout.plan.ep > 1 else None
        self._moe_counts = {"rows": 0, "tokens": 0}    # rows moe_experts got here; tokens the layers saw
        self._moe_pairs = None                           # their (row, expert) pairs: a device count, read lazily
        self.dp_counts: list[int] | None = None      # this step's token count per dp group (engine/turns.py)
        tp = layout.plan.tp if layout is not None else 1
        self.heads = cfg.num_attention_heads // tp                                        # local heads
        self.vocab_range = layout.vocab_range(cfg.vocab_size) if layout is not None else (0, cfg.vocab_size)
        e0, e1 = layout.expert_range if layout is not None else (0, cfg.n_routed_experts)
        self.expert_range = (e0, e1) if (e0, e1) != (0, cfg.n_routed_experts) else None     # None: all local
        self.embed = sd.pop("model.embed_tokens.weight")
        self.final_norm = sd.pop("model.norm.weight")
        lm_head = sd.pop("lm_head.weight")
        self.lm_head = lm_head if isinstance(lm_head, Weight) else Weight(lm_head)
        self.layers = build_layers(cfg, sd, include_mtp, tp, range(e0, e1), dtype=self.embed.dtype)
        self.mtp = self.layers.pop() if include_mtp else None
        if sd:
            raise RuntimeError(f"internal: tensors left unused after building the model: {sorted(sd)[:5]}")

    @property
    def moe_stats(self) -> dict[str, int]:
        """Expert dispatch so far: rows moe_experts got on this rank, their (row, expert) pairs, and the tokens
        the MoE layers saw before dispatch (the pair count is read back here, not per layer)."""
        pairs = 0 if self._moe_pairs is None else int(self._moe_pairs)
        return {"rows": self._moe_counts["rows"], "pairs": pairs, "tokens": self._moe_counts["tokens"]}

    def prepare_weights(self, prepare) -> int:
        """Replace every `Weight` of the network by `prepare(name, weight)` (the backend's load-time
        preparation, registry.BoundBackend.prepare_weight), once; returns how many changed."""
        from dataclasses import fields
        changed = 0
        owners = [(f"layers.{i}", L) for i, L in enumerate(self.layers)] + ([("mtp", self.mtp)] if self.mtp else [])
        owners += [(f"{n}.indexer", L.indexer) for n, L in owners if L.indexer is not None]
        for prefix, obj in owners:
            for f in fields(obj):
                w = getattr(obj, f.name)
                if isinstance(w, Weight):
                    new = prepare(f"{prefix}.{f.name}", w)
                    changed += new is not w
                    setattr(obj, f.name, new)
        new = prepare("lm_head", self.lm_head)
        changed += new is not self.lm_head
        self.lm_head = new
        return changed

    # ---- one step ---------------------------------------------------------------------------------
    def plan(self, cache: PagedCache, chunks: dict[Hashable, Sequence[int]]) -> Step:
        """Validate and reserve; the step's metadata is built once (the ops get its tensors).
        (With expert dispatch the engine has agreed the step with the other dp groups first:
        engine/turns.py sets `dp_counts`.)"""
        want = (self.dcp, self.dcp_comm.rank if self.dcp_comm is not None else 0)
        got = (getattr(cache, "dcp_size", 1), getattr(cache, "dcp_rank", 0))
        if got != want:
            raise ValueError(f"cache: built for dcp {got[0]} (rank {got[1]}), but this model runs decode context "
                             f"parallelism dcp {want[0]} (rank {want[1]}); use model.new_cache(...)")
        return plan_step(cache, chunks, vocab_size=self.cfg.vocab_size,
                         max_positions=self.cfg.max_position_embeddings, device=self.device)

    # ---- the cache seam: which rows this rank writes and reads --------------------------------------
    @staticmethod
    def _mine(st: Step, cache: PagedCache, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The step tokens whose cache rows this rank writes: (their slots, their inputs, their positions).
        Every token on one device; under DCP only the rows this rank stores (`st.dcp.rows`, maybe none): the
        key-side projections (latent, k_pe, index keys) run on those rows alone, 1/dcp of the step's tokens,
        with nothing to exchange (prefill context parallelism's key side). Slots None: no row here."""
        if st.dcp is None:
            if getattr(cache, "dcp_size", 1) > 1:
                raise RuntimeError("a step over a decode-context-parallel cache needs this rank's view of it "
                                   "(step.DcpStep, made by plan_step or, for a captured step, by StaticDecode)")
            return st.slots, x, st.positions
        if st.dcp.rows is None:                 # a captured step: every row, the others' to the null block
            return st.dcp.slots, x, st.positions
        if not st.dcp.rows.numel():
            return None, x[:0], st.positions[:0]
        return st.dcp.slots, x[st.dcp.rows], st.positions[st.dcp.rows]

    def _split_tokens(self, st: Step) -> list[int] | None:
        """Prefill context parallelism's query side: under DCP, a step of at least `prefill_cp_min_tokens`
        tokens is cut into dcp consecutive slices (one per rank of the group, sizes returned); each rank
        runs the token-wise query projections on its slice and one all-gather gives every rank every row.
        None: every rank computes every token (one device, or a short step such as decode, where one
        more collective per layer costs more than the rows it saves)."""
        if st.dcp is None:
            return None
        T, D = st.meta.num_tokens, st.dcp.size
        if T < max(self.prefill_cp_min_tokens, D):
            return None
        return [T * (r + 1) // D - T * r // D for r in range(D)]

    def _score_dtype(self, q: torch.Tensor) -> torch.dtype:
        """The precision the backend's indexer scores in (the reference's cdt): float64 for a float64
        model or a float64 reference, else float32."""
        f64 = q.dtype == torch.float64 or getattr(self.ops.backend, "compute_dtype", None) == torch.float64
        return torch.float64 if f64 else torch.float32

    def _dcp_chunks(self, T: int, bytes_per_token: int) -> list[tuple[int, int]]:
        """The query-token ranges a DCP merge runs over: as many tokens at a time as DCP_MERGE_BYTES holds at
        `bytes_per_token` (or `dcp_merge_tokens` when set). The same ranges on every rank (T, the shapes and
        the cache format are)."""
        n = self.dcp_merge_tokens or dcp_merge_tokens(bytes_per_token)
        return [(a, min(a + n, T)) for a in range(0, T, n)] or [(0, 0)]

    def _topk_dcp(self, iq: torch.Tensor, w: torch.Tensor, k_cache: torch.Tensor, st: Step, topk: int) -> torch.Tensor:
        """The global top-k [T, topk] (positions) under DCP: this rank's `indexer_topk` over its rows,
        the candidates' scores, one all-gather of (score, position) over the dcp group, the merge
        (ops/dcp.py merge_topk): one process's selection, in its order, on every rank. Per `_dcp_chunks`
        range of query tokens (each token is its own row of the paged ops under DCP, so a range is a call)."""
        d, out = st.dcp, []
        for a, e in self._dcp_chunks(iq.shape[0], dcp_topk_bytes_per_token(d.size, topk)):
            bt, cu = d.block_table[a:e], d.cu_seqlens_q[:e - a + 1]
            local = self.ops.indexer_topk(iq[a:e], w[a:e], k_cache, bt, d.seq_lens[a:e], cu, topk)
            score = dcp_ops.candidate_scores(iq[a:e], w[a:e], k_cache, bt, local, self._score_dtype(iq))
            pos = dcp_ops.to_global(local, d.size, d.rank)
            both = torch.stack([score.double(), pos.double()], 1)               # [n, 2, topk]: positions exact
            both = self.dcp_comm.all_gather(both, dim=2)                        # [n, 2, D * topk]
            out.append(dcp_ops.merge_topk(both[:, 0], both[:, 1].long(), st.positions[a:e], topk))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _sparse_mla_dcp(self, q: torch.Tensor, l: int, idx: torch.Tensor, st: Step, cache: PagedCache) -> torch.Tensor:
        """MLA under DCP (the reduce-scatter form), per `_dcp_chunks` range of query tokens: the dcp group's
        queries gathered (every head of the group), this rank's `sparse_mla` over the selected positions it
        holds (with their log-sum-exp), each partial weighted by exp(lse_r - lse) and summed over the group,
        each rank keeping its heads."""
        d, comm = st.dcp, self.dcp_comm
        local = dcp_ops.to_local(idx, d.size, d.rank)
        out = []
        C, Dr = self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim
        for a, e in self._dcp_chunks(q.shape[0], dcp_attention_bytes_per_token(self.heads * d.size, C, Dr)):
            qg = comm.all_gather(q[a:e], dim=1)                                  # [n, D*H, C+dr]
            try:
                o, lse = self._partials_dcp(qg, l, local, st, cache, a, e)
            except BackendOutputError as err:     # e.g. a backend that returns `out` alone
                raise BackendOutputError(f"decode context parallelism merges sparse_mla's partial outputs by their "
                                         f"log-sum-exp, which backend {self.ops.name!r} must return when asked "
                                         f"(return_lse=True): {err}") from None
            acc = torch.promote_types(o.dtype, torch.float32)
            lse_all = comm.all_gather(lse.to(acc)[None], dim=0)                  # [D, n, D*H]
            f, _ = dcp_ops.lse_weights(lse.to(acc), lse_all)
            out.append(comm.reduce_scatter(o.to(acc) * f[..., None], dim=1).to(q.dtype))   # [n, H, C]: my heads
        return out[0] if len(out) == 1 else torch.cat(out)

    def _sparse_mla_dcp_gather(self, q: torch.Tensor, l: int, idx: torch.Tensor, st: Step,
                               cache: PagedCache) -> torch.Tensor:
        """MLA under DCP without a log-sum-exp (a backend whose sparse_mla returns none natively): each
        query token's selected rows are brought to every rank of the group, and the op runs on them for
        this rank's heads, unchanged. Per `_dcp_chunks` range: each rank
        reads the selected rows it stores in the cache's own row format (dense or packed bytes) and zeroes
        the others; one all-reduce of the bytes (exact: every byte has one nonzero contributor) gives every
        rank the token's rows in its top-k order. They form a paged cache of one-token requests (token t's
        rows are its blocks; positions 0..topk-1, the -1 entries kept), so the op attends exactly what one
        process attends. Moves topk rows per query token per layer where the lse form moves the group's
        queries and partial outputs; used only when the lse form would run the reference."""
        d, comm, cfg = st.dcp, self.dcp_comm, self.cfg
        if getattr(cache, "offload", None) is not None:
            raise RuntimeError("host offload under decode context parallelism needs sparse_mla's log-sum-exp; "
                               f"backend {self.ops.name!r} returns none natively")
        T, K = idx.shape
        lbs, W = cache.local_block_size, d.block_table.shape[1]
        bsv = math.gcd(K, cache.block_size)                    # the gathered rows' block size: divides topk
        stores = cache.latent_parts(l)                         # [NB, lbs, width] each, as stored
        widths = [t.shape[-1] * t.element_size() for t in stores]
        dev = idx.device
        pos = torch.arange(K, device=dev, dtype=torch.int32)
        out = []
        for a, e in self._dcp_chunks(T, dcp_gather_bytes_per_token(K, sum(widths))):
            n = e - a
            loc = dcp_ops.to_local(idx[a:e], d.size, d.rank).long()                     # [n, K]
            j = loc.clamp(min=0)
            blocks = d.block_table[a:e].long().gather(1, torch.div(j, lbs, rounding_mode="floor").clamp(max=W - 1))
            mine = (loc >= 0)[..., None]
            rows = torch.cat([torch.where(mine, t[blocks, j % lbs], torch.zeros((), dtype=t.dtype, device=t.device))
                              .contiguous().view(torch.uint8) for t in stores], -1)      # [n, K, bytes]
            rows = comm.all_reduce(rows.view(torch.int8)).view(torch.uint8)              # each byte from its owner
            parts = torch.split(rows.reshape(n * K // bsv, bsv, sum(widths)), widths, -1)   # [pages, bsv, w]
            c_v, kpe_v = cache.latent_views([p.contiguous().view(t.dtype) for p, t in zip(parts, stores)])
            sel = torch.where(idx[a:e] >= 0, pos, -1).to(torch.int32)
            bt = torch.arange(n * K // bsv, device=dev, dtype=torch.int32).view(n, K // bsv)
            out.append(self.ops.sparse_mla(q[a:e], c_v, kpe_v, sel, bt, torch.full((n,), K, dtype=torch.int32, device=dev),
                                           torch.arange(n + 1, dtype=torch.int32, device=dev), cfg.softmax_scale))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _partials_dcp(self, qg: torch.Tensor, l: int, local: torch.Tensor, st: Step, cache: PagedCache,
                      a: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (out, lse) for query tokens a..e-1 (qg their gathered queries) over the rows it holds;
        with host offload, the group's fetch runs that overlap a..e staged in turn (one token a row)."""
        d, scale = st.dcp, self.cfg.softmax_scale
        if getattr(cache, "offload", None) is None:
            return self.ops.sparse_mla(qg, cache.c[l], cache.k_pe[l], local[a:e], d.block_table[a:e], d.seq_lens[a:e],
                                       d.cu_seqlens_q[:e - a + 1], scale, return_lse=True)
        parts = []
        for ra, re_, blocks in cache.offload.runs(l):
            lo, hi = max(a, ra), min(e, re_)
            if lo < hi:
                lut = cache.offload.stage_blocks(l, blocks)
                parts.append(self.ops.sparse_mla(qg[lo - a:hi - a], cache.c[l], cache.k_pe[l], local[lo:hi],
                                                 lut[d.block_table[lo:hi].long()].int(), d.seq_lens[lo:hi],
                                                 d.cu_seqlens_q[:hi - lo + 1], scale, return_lse=True))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _sparse_mla_offloaded(self, q: torch.Tensor, l: int, idx: torch.Tensor, st: Step,
                              cache: PagedCache) -> torch.Tensor:
        """`sparse_mla` over the device staging area of a host-offloaded cache (cache.HostOffload): for each run of
        query tokens of the group's plan (one when the step's selection fits), its blocks staged, the
        block table remapped to staging slots. One run is the plain call with only the table changed."""
        off, meta, cfg = cache.offload, st.meta, self.cfg
        runs = off.runs(l)
        if len(runs) == 1:
            lut = off.stage_blocks(l, runs[0][2])
            return self.ops.sparse_mla(q, cache.c[l], cache.k_pe[l], idx, lut[meta.block_table.long()].int(),
                                       meta.seq_lens, meta.cu_seqlens_q, cfg.softmax_scale)
        out = []
        for a, e, blocks in runs:
            lut = off.stage_blocks(l, blocks)
            reqs, q_lens, seq_lens = [], [], []              # the requests' tokens within a..e, as requests
            for b, (t0, t1) in enumerate(zip(meta.cu_host, meta.cu_host[1:])):
                lo, hi = max(a, t0), min(e, t1)
                if lo < hi:
                    reqs.append(b)
                    q_lens.append(hi - lo)
                    seq_lens.append(meta.seq_lens_host[b] - (t1 - hi))
            dev = meta.block_table.device
            cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(device=dev, dtype=torch.int32)
            bt = lut[meta.block_table[torch.tensor(reqs, device=dev)].long()].int()
            out.append(self.ops.sparse_mla(q[a:e], cache.c[l], cache.k_pe[l], idx[a:e], bt,
                                           torch.tensor(seq_lens, dtype=torch.int32, device=dev), cu,
                                           cfg.softmax_scale))
        return torch.cat(out)

    def _attention(self, l: int, L: Layer, x: torch.Tensor, st: Step, cache: PagedCache,
                   prev_idx: torch.Tensor | None, share: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA over the selected positions. A layer with an indexer runs it unless `share`;
        otherwise it reuses `prev_idx` (IndexShare)."""
        cfg, ops, meta = self.cfg, self.ops, st.meta
        T = x.shape[0]
        H, dn, dr, C = self.heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        indexed = L.indexer is not None and not share
        qr, iq, w = self._queries(L, x, st, indexed)
        q = ops.linear(qr, L.wq_b).view(T, H, dn + dr)
        q_pe = ops.rope(q[..., dn:], st.positions, cfg.rope_theta)                         # [T, H, dr]
        mine = self._mine(st, cache, x)                   # the rows this rank writes: (slots, inputs, positions)
        slots, xk, pk = mine
        if slots is not None:
            kva = ops.linear(xk, L.wkv_a)                                                  # [n, C+dr]
            cache.write_latent(l, slots, ops.rms_norm(kva[:, :C], L.kv_norm, cfg.latent_norm_eps),
                               ops.rope(kva[:, C:], pk, cfg.rope_theta))               # in the cache's format

        if indexed:
            idx = self._indexer(l, L.indexer, mine, iq, w, st, cache)
        elif prev_idx is None:
            raise RuntimeError(f"layer {l} is 'shared' but no earlier full layer produced top-k indices")
        else:
            idx = prev_idx                                                                   # IndexShare

        q_lat = torch.matmul(q[..., :dn].transpose(0, 1), L.w_uk).transpose(0, 1)           # absorb W_UK [T, H, C]
        offload = getattr(cache, "offload", None)
        if offload is not None and (indexed or l == cfg.num_hidden_layers):    # the group's top-k is new
            offload.plan(l, idx, st)                                           # host offload: the fetch plan
        if st.dcp is not None:
            attend = self._sparse_mla_dcp if self.dcp_attention == "lse" else self._sparse_mla_dcp_gather
            o_lat = attend(torch.cat([q_lat, q_pe], -1), l, idx, st, cache)
        elif offload is not None:
            o_lat = self._sparse_mla_offloaded(torch.cat([q_lat, q_pe], -1), l, idx, st, cache)
        else:
            o_lat = ops.sparse_mla(torch.cat([q_lat, q_pe], -1), cache.c[l], cache.k_pe[l], idx, meta.block_table,
                                   meta.seq_lens, meta.cu_seqlens_q, cfg.softmax_scale)       # [T, H, C]
        o = torch.matmul(o_lat.transpose(0, 1), L.w_uv.transpose(1, 2))                    # absorb W_UV [H, T, dv]
        o = o.transpose(0, 1).reshape(T, H * cfg.v_head_dim)
        return self.comm.all_reduce(ops.linear(o, L.wo)), idx                              # row-parallel seam

    def _queries(self, L: Layer, x: torch.Tensor, st: Step, indexed: bool):
        """The token-wise query side: qr [T, q_lora] (normed q_a) and, for a layer running its indexer,
        the indexer's roped queries iq [T, Hi, Di] and head weights w [T, Hi] (f32, scaled); else None, None.
        Split over the dcp group for a long step (`_split_tokens`): each rank projects its slice of the
        tokens and one all-gather of [qr | iq | w] gives every rank every row, the numbers unchanged."""
        cfg, ops = self.cfg, self.ops
        Hi, Di, dr = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        counts = self._split_tokens(st)
        pos = st.positions
        if counts is not None:
            r = st.dcp.rank
            a = sum(counts[:r])
            x, pos = x[a:a + counts[r]], pos[a:a + counts[r]]
        n = x.shape[0]
        qr = ops.rms_norm(ops.linear(x, L.wq_a), L.q_norm, cfg.latent_norm_eps)             # [n, q_lora]
        if not indexed:
            return (qr if counts is None else self.dcp_comm.all_gather_rows(qr, counts)), None, None
        ix = L.indexer
        iq = ops.linear(qr, ix.wq_b).view(n, Hi, Di)                   # RoPE on the FIRST dr dims
        iq = torch.cat([ops.rope(iq[..., :dr], pos, cfg.rope_theta), iq[..., dr:]], -1)
        wr = ops.linear(x, ix.w_proj)                                                     # [n, Hi]
        if counts is not None:
            Q = qr.shape[1]
            both = self.dcp_comm.all_gather_rows(torch.cat([qr, iq.reshape(n, Hi * Di), wr.to(qr.dtype)], 1), counts)
            qr, iq, wr = both[:, :Q], both[:, Q:Q + Hi * Di].reshape(-1, Hi, Di), both[:, Q + Hi * Di:].to(wr.dtype)
        return qr, iq, wr.float() * (Hi ** -0.5 * Di ** -0.5)                              # w [T, Hi] f32

    def _indexer(self, l: int, ix: Indexer, mine: tuple, iq: torch.Tensor, w: torch.Tensor, st: Step,
                 cache: PagedCache) -> torch.Tensor:
        """The index keys of the rows this rank stores (`mine`: `_mine`'s slots, inputs and positions),
        written; then the top-k of every query token."""
        cfg, ops, meta = self.cfg, self.ops, st.meta
        dr = cfg.qk_rope_head_dim
        slots, xk, pk = mine
        if slots is not None:
            ik = ops.layer_norm(ops.linear(xk, ix.wk), ix.k_norm_w, ix.k_norm_b, cfg.indexer_norm_eps)
            ik = torch.cat([ops.rope(ik[:, :dr], pk, cfg.rope_theta), ik[:, dr:]], -1)
            cache.write_index(l, slots, ik)                            # in the cache's index format
        if st.dcp is None:
            idx = ops.indexer_topk(iq, w, cache.index_k[l], meta.block_table, meta.seq_lens, meta.cu_seqlens_q,
                                   cfg.index_topk)
        else:
            idx = self._topk_dcp(iq, w, cache.index_k[l], st, cfg.index_topk)
        if getattr(ops, "debug", False) and self.comm.world_size > 1:
            # the indexer is replicated: every tp rank must select the same positions (ties decided
            # the same way); compare with the group's first rank, as DeepSeek's reference does
            first = self.comm.broadcast(idx.clone(), src=0)
            if not torch.equal(first, idx):
                raise RuntimeError(f"layer {l}: the indexer's top-k on tp rank {self.comm.rank} differs from tp rank "
                                   f"0's ({int((first != idx).sum())} entries): the backend's top-k is not "
                                   f"deterministic across ranks")
        return idx

    def _ffn(self, L: Layer, x: torch.Tensor) -> torch.Tensor:
        cfg, ops = self.cfg, self.ops
        if L.gate is None:
            return self.comm.all_reduce(ops.mlp(x, L.w13, L.w2))                            # row-parallel seam
        logits = ops.linear(x.float(), L.gate)                                             # fp32 router
        ids, w = ops.moe_route(logits, L.gate_bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                               cfg.norm_topk_prob, cfg.routed_scaling_factor)
        if self.ep_comm is not None and not getattr(self.comm, "functional", False):
            return self._moe_dispatched(L, x, ids, w)
        # one device, experts TP-split (ep = 1), or a captured step with ep = tp (static shapes; dp > 1 is
        # never captured): every token here, the other ranks' expert slots -1
        if self.expert_range is not None:
            e0, e1 = self.expert_range
            ids = torch.where((ids >= e0) & (ids < e1), ids - e0, -1)
        y = ops.moe_experts(x, L.e_w13, L.e_w2, ids, w)
        if L.s_w13 is not None:
            y = y + ops.mlp(x, L.s_w13, L.s_w2)
        return self.comm.all_reduce(y)                                                     # EP/TP seam

    def _moe_dispatched(self, L: Layer, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Routed experts by dispatch: this tp rank takes its slice of the step's tokens (the tp ranks hold
        the same tokens), sends each token to the ranks owning its experts, computes the rows it receives,
        and gets the weighted outputs of its tokens back. The routed outputs land on the slice's rows, the
        shared expert's TP partial on every row, and the tp all-reduce sums them: every tp rank ends with
        every token's output. A captured step (static shapes) keeps the replicated form (_ffn)."""
        T, tp, r = x.shape[0], self.comm.world_size, self.comm.rank
        a, b = T * r // tp, T * (r + 1) // tp
        per = self.cfg.n_routed_experts // self.ep_comm.world_size
        most = -(-(T if self.dp_comm is None else max(self.dp_counts)) // tp)       # the largest slice of any rank
        xr, idr, wr, handle = self.ep_comm.moe_dispatch(x[a:b], ids[a:b], w[a:b], per, max_rows=most)
        self._moe_counts["rows"] += xr.shape[0]
        pairs = (idr >= 0).sum()                         # (row, expert) computed here; no host read per layer
        self._moe_pairs = pairs if self._moe_pairs is None else self._moe_pairs + pairs
        self._moe_counts["tokens"] += T if self.dp_comm is None else sum(self.dp_counts)   # what the layer saw before
        yr = self.ops.moe_experts(xr, L.e_w13, L.e_w2, idr, wr) if xr.shape[0] else xr.new_zeros(xr.shape)
        y = x.new_zeros(x.shape)
        y[a:b] = self.ep_comm.moe_combine(yr, handle)
        if L.s_w13 is not None:
            y = y + self.ops.mlp(x, L.s_w13, L.s_w2)
        return self.comm.all_reduce(y)                                                     # EP/TP seam

    def _layer(self, l: int, L: Layer, h, st: Step, cache: PagedCache, prev_idx, share: bool = False):
        ops, eps = self.ops, self.cfg.rms_norm_eps
        with ops.at_layer(l):                                    # op errors name the layer
            a, idx = self._attention(l, L, ops.rms_norm(h, L.in_norm, eps), st, cache, prev_idx, share)
            h = h + a
            h = h + self._ffn(L, ops.rms_norm(h, L.post_norm, eps))
        return h, idx

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> [T, Hd]; vocabulary-parallel: rows outside this rank's range are zero, summed."""
        v0, v1 = self.vocab_range
        if (v0, v1) == (0, self.cfg.vocab_size):
            return self.embed[ids]
        mine = (ids >= v0) & (ids < v1)
        e = self.embed[torch.where(mine, ids - v0, 0)] * mine[:, None].to(self.embed.dtype)
        return self.comm.all_reduce(e)

    def forward(self, st: Step, cache: PagedCache) -> torch.Tensor:
        """One step through every layer; returns the final-normed hidden state [T, Hd]."""
        if getattr(cache, "offload", None) is not None:
            cache.offload.begin(st, "target")
        h = self.embedding(st.ids)
        idx = None
        for l, L in enumerate(self.layers):
            h, idx = self._layer(l, L, h, st, cache, idx)
        return self.ops.rms_norm(h, self.final_norm, self.cfg.rms_norm_eps)

    def run(self, cache: PagedCache, chunks: dict[Hashable, Sequence[int]]) -> tuple[Step, torch.Tensor]:
        """Append tokens to requests; returns the step and the final-normed hidden states [T, Hd]."""
        st = self.plan(cache, chunks)
        return st, self.forward(st, cache)

    def run_mtp(self, cache: PagedCache, chunks: dict[Hashable, Sequence[int]], hidden: torch.Tensor,
                shared_idx: torch.Tensor | None = None) -> tuple[Step, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MTP (nextn) layer over one step (spec §8, vLLM's convention).

        Input at position i: `hidden[i]` (the target's final-normed hidden at i, or the MTP's own
        output when drafting further) and `chunks` token i+1. Returns (step, output hidden [T, Hd]
        fed to the next draft step, logits [T, V] predicting token i+2, top-k indices used).
        `shared_idx` skips the MTP indexer and attends to those positions instead
        (`index_share_for_mtp_iteration`).
        """
        if self.mtp is None:
            raise RuntimeError("this checkpoint has no MTP layer (num_nextn_predict_layers = 0 or "
                               "layer tensors missing); speculative decoding needs it")
        st = self.plan(cache, chunks)
        return (st, *self.mtp_forward(st, cache, hidden, shared_idx))

    def mtp_forward(self, st: Step, cache: PagedCache, hidden: torch.Tensor, shared_idx: torch.Tensor | None):
        """The MTP layer over a planned step: (output hidden [T, Hd], logits [T, V], top-k used)."""
        cfg, ops, M = self.cfg, self.ops, self.mtp
        if getattr(cache, "offload", None) is not None:
            cache.offload.begin(st, "mtp")
        e = self.embedding(st.ids)
        e = torch.where((st.positions == 0)[:, None], torch.zeros_like(e), e)  # vLLM zeroes position 0
        e = ops.rms_norm(e, M.enorm, cfg.rms_norm_eps)
        u = ops.linear(torch.cat([e, ops.rms_norm(hidden, M.hnorm, cfg.rms_norm_eps)], -1), M.eh_proj)
        z, idx = self._layer(cfg.num_hidden_layers, M, u, st, cache, shared_idx, share=shared_idx is not None)
        logits = self.logits(ops.rms_norm(z, M.head_norm, cfg.rms_norm_eps))
        return z, logits, idx

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, Hd] -> f32 logits [T, V] (vocabulary-parallel: gathered at the seam)."""
        return self.comm.all_gather(self.ops.linear(h, self.lm_head), dim=-1).float()
