"""Decode context parallelism (DCP): each rank of a dcp group holds 1/dcp of every request's cache.

Under gloo (tests/dcp_worker.py, one thread per rank, file:// rendezvous) tp2 dcp2 and tp4 dcp4 give one
process's logits, greedy tokens (whole and chunked prefill), MTP speculative tokens and indexer
selections on prompts of 30-57 tokens (the checkpoint's top-k is 8), and each rank's cache holds 1/dcp
of one process's bytes. In one process: the layout (cache rows, slots), the top-k and attention merges
against the references on the whole cache in float64, and refusals naming the culprit.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from conftest import spawn_ranks

from glm52_backends import GLM52
from glm52_backends.cache import PagedCache
from glm52_backends.ops import dcp
from glm52_backends.ops.indexer_topk import indexer_topk
from glm52_backends.ops.sparse_mla import sparse_mla
from glm52_backends.parallel import LayoutError, ParallelPlan
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
from glm52_backends.tiny import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dcp_worker import run  # noqa: E402

WORKER = os.path.join(HERE, "dcp_worker.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("dcp") / "bf16"), layers=4, seed=3, mtp=True, index_topk=8)


@pytest.fixture(scope="module")
def one_process(ckpt):
    """What one process computes, per cache format."""
    got = {}

    def get(kv: str = "auto", backend: str = "cpu_ref"):
        if (kv, backend) not in got:
            got[kv, backend] = run(GLM52(ckpt, backend=backend, dtype=torch.float32, progress=False,
                                         kv_cache_dtype=kv))
        return got[kv, backend]
    return get


def run_ranks(tmp_path, ckpt, tp, d, extra=(), timeout=240):
    init = tmp_path / f"rdzv-{tp}-{d}-{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GLM52_DEBUG="0")
    outs = [tmp_path / f"out-{tp}-{d}-{r}.json" for r in range(tp)]
    for rc, _, e in spawn_ranks(lambda r: [sys.executable, WORKER, str(init), str(r), str(tp), ckpt, str(tp), str(d),
                                           str(outs[r]), *extra], tp, env=env, timeout=timeout):
        assert rc == 0, e[-3000:]
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.parametrize("tp,d,extra,bound", [
    (2, 2, ("--cp-min", "1", "--graph", "trace", "--backend", "torch", "--dcp-attention", "gather"), 0.6),
    (4, 4, ("--ep", "4", "--kv-cache-dtype", "fp8", "--merge-tokens", "7"), 0.35),
    (2, 2, ("--offload", "8", "--merge-tokens", "5"), None)],
    ids=["tp2-dcp2-graph-gather-split-every-step", "tp4-dcp4-ep4-fp8-cache", "tp2-dcp2-offload"])
def test_dcp_equals_one_process(tmp_path, ckpt, one_process, tp, d, extra, bound):
    """Every rank: logits within 1e-4 (relative) of one process's, the same greedy, chunked-prefill and
    MTP speculative tokens, the same top-k at every full layer of every step, and 1/dcp of its cache bytes;
    the ranks agree bitwise on logits and on sampled tokens. The tp4 case also dispatches experts (ep4) and
    keeps the cache as FlashMLA's fp8 rows (index keys fp8), one process likewise. Prefill context parallelism:
    the key-side projections run on the rows each rank stores (together the step's tokens, once), the query
    side on a 1/dcp slice when the step is long (every step in the first case, the 128-token forward in the
    second). The merges run over query-token ranges (`dcp_merge_tokens`): 7 and 5 tokens at a time in the
    second and third cases, so every prefill step merges in several ranges. The first (the torch backend: the references read host lengths, so they stay eager; one process
    likewise) also decodes (greedy, MTP verify and draft steps) through captured graphs: each
    rank's step writes every token's row, those another rank stores to the null block. The third keeps each rank's latent rows in host memory (offload, 8 staged blocks, the top-k: the batch's
    prefill runs in several fetch runs) and still equals one process without offload. The first merges
    attention in the gather form (the selected rows brought to every rank: a backend whose sparse_mla
    returns no log-sum-exp; its packed formats are checked bitwise below), the others by log-sum-exp."""
    kv = extra[extra.index("--kv-cache-dtype") + 1] if "--kv-cache-dtype" in extra else "auto"
    backend = extra[extra.index("--backend") + 1] if "--backend" in extra else "cpu_ref"
    ref = one_process(kv, backend)
    outs = run_ranks(tmp_path, ckpt, tp, d, extra)
    assert sorted(o["dcp_rank"] for o in outs) == sorted(r % d for r in range(tp))
    T = outs[0]["tokens"]
    for g in range(tp // d):            # each dcp group: the key side once over the group, the query side split
        group = [o for o in outs if o["rank"] // d == g]
        for side in ("wkv_a", "wk"):
            assert sum(o["proj_rows"][side] for o in group) == T, (side, [o["proj_rows"] for o in group])
        assert sorted(o["proj_rows"]["wq_a"] for o in group) == sorted(T * (r + 1) // d - T * r // d for r in range(d))
    if "--graph" in extra:
        assert all(o["graphs"] > 0 for o in outs), [o["graphs"] for o in outs]
    if "--offload" in extra:
        for o in outs:
            off = o["offload"]
            assert 0 < off["decode_fetched"] < off["decode_dense"], off
    for o in outs:
        worst = 0.0
        for got, want in zip(o["logits"], ref["logits"]):
            got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
            assert got.shape == want.shape
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        assert worst <= 1e-4, f"rank {o['rank']}: logits differ from one process by {worst:.2e} (relative)"
        assert o["greedy"] == ref["greedy"] and o["chunked"] == ref["chunked"] and o["spec"] == ref["spec"]
        assert o["forward_topk"] == ref["forward_topk"], "a merged top-k of the forward differs"
        if "--graph" not in extra:          # (a captured step's top-k is not seen by the spy)
            assert o["n_topk"] == ref["n_topk"] > 0
            assert o["topk"] == ref["topk"], "a merged top-k differs"
        if bound is not None:
            ratio = o["cache_bytes"] / ref["cache_bytes"]
            assert o["cache_blocks"] == ref["cache_blocks"] and ratio <= bound, (ratio, bound)
            assert ratio == pytest.approx(1 / d)
    assert all(o["sampled"] == outs[0]["sampled"] and o["logits"] == outs[0]["logits"] for o in outs)


# ---- one process: the layout and the merges ------------------------------------------------------------

def _cfg():
    return tiny_config(layers=4, mtp=True, index_topk=8)[0]


def test_cache_rows_are_token_interleaved_and_hold_one_dcp_th():
    cfg = _cfg()
    whole = PagedCache(cfg, 10, 8)
    parts = [PagedCache(cfg, 10, 8, dcp_size=4, dcp_rank=r) for r in range(4)]
    assert all(p.nbytes * 4 == whole.nbytes for p in parts)
    for c in [whole, *parts]:
        c.reserve({"a": 5, "b": 19})            # the same blocks everywhere
    assert all(p.blocks == whole.blocks for p in parts)
    seen = set()
    for r, p in enumerate(parts):
        offs, slots = p.local_slots("b", 3, 19)
        pos = [3 + o for o in offs]
        assert pos == [q for q in range(3, 19) if q % 4 == r]
        bl = whole.blocks["b"]
        assert slots == [bl[q // 8] * 2 + (q % 8) // 4 for q in pos]
        seen |= set(pos)
    assert seen == set(range(3, 19))
    with pytest.raises(ValueError, match="block_size 6 must be a multiple of dcp = 4"):
        PagedCache(cfg, 4, 6, dcp_size=4, dcp_rank=0)
    with pytest.raises(ValueError, match=r"dcp_rank must be an integer in \[0, 2\)"):
        PagedCache(cfg, 4, 8, dcp_size=2, dcp_rank=2)


def _partition(seqs, bs, D, positions, req):
    """Each rank's local rows of every request (p % D == r) paged with block size bs / D, one row per
    (query token) as a rank passes it to the ops: [(cache, block_table [T, W], seq_lens [T], cu [T+1])]."""
    out = []
    for r in range(D):
        local = [s[r::D] for s in seqs]
        lbs = bs // D
        nb = sum(-(-len(x) // lbs) for x in local) + 1
        cache = torch.full((nb, lbs, seqs[0].shape[-1]), float("nan"), dtype=seqs[0].dtype)
        table = torch.zeros(len(seqs), max(-(-len(x) // lbs) for x in local) + 1, dtype=torch.int32)
        nxt = 0
        for b, x in enumerate(local):
            for j in range(-(-len(x) // lbs)):
                table[b, j] = nxt
                cache[nxt, :len(x[j * lbs:(j + 1) * lbs])] = x[j * lbs:(j + 1) * lbs]
                nxt += 1
        T = positions.shape[0]
        out.append((cache, table[req], dcp.visible_rows(positions, D, r), torch.arange(T + 1, dtype=torch.int32)))
    return out


def _whole(seqs, bs):
    nb = sum(-(-len(s) // bs) for s in seqs)
    cache = torch.full((nb, bs, seqs[0].shape[-1]), float("nan"), dtype=seqs[0].dtype)
    table = torch.zeros(len(seqs), max(-(-len(s) // bs) for s in seqs), dtype=torch.int32)
    nxt = 0
    for b, s in enumerate(seqs):
        for j in range(-(-len(s) // bs)):
            table[b, j] = nxt
            cache[nxt, :len(s[j * bs:(j + 1) * bs])] = s[j * bs:(j + 1) * bs]
            nxt += 1
    return cache, table


def _batch(reqs):
    """(q_len, seq_len) per request -> seq_lens, cu_seqlens_q, positions [T], request of each token [T]."""
    cu, pos, req = [0], [], []
    for b, (q, L) in enumerate(reqs):
        cu.append(cu[-1] + q)
        pos += range(L - q, L)
        req += [b] * q
    return (torch.tensor([L for _, L in reqs], dtype=torch.int32), torch.tensor(cu, dtype=torch.int32),
            torch.tensor(pos), torch.tensor(req))


@pytest.mark.parametrize("D", [2, 3, 4])
def test_merged_topk_is_one_process_topk(D):
    """Every rank's indexer_topk over its rows, the candidates' scores, the merge: exactly the reference's
    top-k over the whole cache (same positions, same order), with many exact ReLU-zero ties (float64)."""
    g = torch.Generator().manual_seed(100 + D)
    Hi, Di, topk, bs = 3, 8, 6, 4 * D
    reqs = [(1, 37), (5, 23), (1, 2), (9, 9), (2, 41)]                  # decode, verify, tiny, prefill
    seqs = [torch.randn(L, Di, generator=g, dtype=torch.float64) for _, L in reqs]
    seqs[4][::3] = seqs[4][1]                                            # exact duplicate keys: equal scores
    seq_lens, cu, pos, req = _batch(reqs)
    q = torch.randn(pos.shape[0], Hi, Di, generator=g, dtype=torch.float64)
    q[::2] = -q[::2].abs()
    seqs = [s.abs() if b % 2 else s for b, s in enumerate(seqs)]          # q < 0 vs k > 0: ReLU zeros
    w = torch.randn(pos.shape[0], Hi, generator=g, dtype=torch.float64)
    cache, table = _whole(seqs, bs)
    want = indexer_topk(q, w, cache, table, seq_lens, cu, topk, cdt=torch.float64)
    scores, positions = [], []
    for r, (c, bt, sl, cq) in enumerate(_partition(seqs, bs, D, pos, req)):
        local = indexer_topk(q, w, c, bt, sl, cq, topk, cdt=torch.float64)
        scores.append(dcp.candidate_scores(q, w, c, bt, local, torch.float64))
        positions.append(dcp.to_global(local, D, r))
    got = dcp.merge_topk(torch.cat(scores, 1), torch.cat(positions, 1), pos, topk)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    ties = sum(int((torch.sort(s).values.diff() == 0).sum()) for s in scores)
    assert ties > 0                                                        # the tie rule was exercised


@pytest.mark.parametrize("D", [2, 4])
def test_attention_merged_by_lse_is_the_whole_attention(D):
    """sparse_mla on each rank's rows (selected positions it holds) merged by log-sum-exp = the reference
    over the whole cache, in float64; a query with nothing selected stays out 0, lse -inf."""
    g = torch.Generator().manual_seed(7 + D)
    H, Dl, Dr, topk, bs = 3, 16, 4, 9, 4 * D
    reqs = [(1, 30), (4, 17), (1, 1), (6, 6)]
    seqs = [torch.randn(L, Dl + Dr, generator=g, dtype=torch.float64) for _, L in reqs]
    seq_lens, cu, pos, req = _batch(reqs)
    T = pos.shape[0]
    q = torch.randn(T, H, Dl + Dr, generator=g, dtype=torch.float64)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    for t in range(T):
        n = min(topk, int(pos[t]) + 1)
        idx[t, torch.randperm(topk, generator=g)[:n]] = torch.randperm(int(pos[t]) + 1, generator=g)[:n].to(torch.int32)
    idx[2] = -1
    cache, table = _whole(seqs, bs)
    want, want_lse = sparse_mla(q, cache[..., :Dl], cache[..., Dl:], idx, table, seq_lens, cu, 0.3, return_lse=True,
                                cdt=torch.float64)
    outs, lses = [], []
    for r, (c, bt, sl, cq) in enumerate(_partition(seqs, bs, D, pos, req)):
        o, lse = sparse_mla(q, c[..., :Dl], c[..., Dl:], dcp.to_local(idx, D, r), bt, sl, cq, 0.3, return_lse=True,
                            cdt=torch.float64)
        outs.append(o)
        lses.append(lse.double())
    got, lse = dcp.merge_attention(torch.stack(outs), torch.stack(lses))
    # the contract's lse is float32 (ops/sparse_mla.py): each partial's weight exp(lse_r - lse) carries its
    # rounding, ~1e-7 relative; the partial outputs themselves are float64
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)) and torch.isneginf(lse[2]).all()
    fin = ~torch.isneginf(want_lse)
    assert (lse[fin] - want_lse[fin].double()).abs().max() <= 1e-6       # lse: float32 out of the op
    assert (got[2] == 0).all()
    # the reduce-scatter form: each rank's factor, summed over ranks, is the same merge
    acc = sum(outs[r] * dcp.lse_weights(lses[r], torch.stack(lses))[0][..., None] for r in range(D))
    assert (acc - got).abs().max() <= 1e-12 * want.abs().max()             # the same arithmetic in float64


def _backend(kind: str):
    """cpu_ref with a sparse_mla whose lse is off on the first quarter of the rows (the first rank's, in
    the conformance case: its partial gets the wrong weight), or missing (`out` alone when asked)."""
    from glm52_backends.backends.cpu_ref import CpuRefBackend
    be = CpuRefBackend()
    be.name = kind
    ref = be.sparse_mla

    def lse_off(*a, return_lse=False, **k):
        out = ref(*a, return_lse=return_lse, **k)
        if not return_lse:
            return out
        lse = out[1].clone()
        lse[:lse.shape[0] // 4] += 0.05
        return out[0], lse

    def no_lse(*a, return_lse=False, **k):
        return ref(*a, **k)
    be.sparse_mla = lse_off if kind == "lse off" else no_lse
    return be


class _ThreadGroup:
    """D ranks as threads of one process: `rank(r)`'s all_reduce sums what every rank passes (each thread
    blocks until all have), as the dcp group's collective would."""

    def __init__(self, D: int):
        import threading
        self.world_size, self.barrier, self.slots = D, threading.Barrier(D, timeout=60), [None] * D

    def rank(self, r: int):
        group = self

        class Rank:
            rank, world_size = r, group.world_size

            @staticmethod
            def all_reduce(x):
                group.slots[r] = x.clone()
                group.barrier.wait()
                total = torch.stack(group.slots).sum(0).to(x.dtype)
                group.barrier.wait()
                return total
        return Rank()


@pytest.mark.parametrize("lat", ["dense", "fp8_ds_mla", "c8_sfa"])
def test_gather_form_attends_exactly_what_one_process_attends(lat):
    """The gather form of DCP attention (for a backend without a native log-sum-exp): each rank's
    selected rows, zero elsewhere, summed bytewise over the group, attended by the op as one-token
    requests: bitwise the reference over the whole cache, in the dense, fp8 (FlashMLA rows) and int8 (C8)
    formats, two ranks as threads, merged 5 query tokens at a time; a token with nothing selected gives 0."""
    import types

    from glm52_backends.model import Glm52Network
    from glm52_backends.registry import get_backend
    from glm52_backends.step import DcpStep
    cfg, D, bs, topk = _cfg(), 2, 16, 8
    g = torch.Generator().manual_seed(5)
    reqs = {"a": 37, "b": 12, "c": 21}
    caches = [PagedCache(cfg, 12, bs, latent_format=lat, dtype=torch.bfloat16, dcp_size=D, dcp_rank=r) for r in range(D)]
    whole = PagedCache(cfg, 12, bs, latent_format=lat, dtype=torch.bfloat16)
    C, Dr, l = cfg.kv_lora_rank, cfg.qk_rope_head_dim, 1
    for name, L in reqs.items():
        c, kpe = torch.randn(L, C, generator=g), torch.randn(L, Dr, generator=g)
        for cache in (whole, *caches):
            cache.reserve({name: L})
            offs, slots = cache.local_slots(name, 0, L)
            cache.write_latent(l, torch.tensor(slots), c[offs], kpe[offs])
    order = ["a"] * 3 + ["b"] + ["c"] * 4                   # query tokens: the last positions of each request
    pos = torch.tensor([34, 35, 36, 11, 17, 18, 19, 20])
    T = len(order)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    for t in range(T):
        n = min(topk, int(pos[t]) + 1) - (t == 2)              # token 2 leaves one slot empty
        idx[t, :n] = torch.randperm(int(pos[t]) + 1, generator=g)[:n].to(torch.int32)
    idx[3] = -1                                                # token 3 selects nothing
    q = torch.randn(T, cfg.num_attention_heads, C + Dr, generator=g).to(torch.bfloat16)
    ops = get_backend("cpu_ref")
    want = ops.sparse_mla(q, whole.c[l], whole.k_pe[l], idx, whole.block_table(order), (pos + 1).to(torch.int32),
                          torch.arange(T + 1, dtype=torch.int32), cfg.softmax_scale)
    group, got = _ThreadGroup(D), [None] * D

    def rank(r):
        cache = caches[r]
        me = types.SimpleNamespace(dcp_comm=group.rank(r), ops=ops, cfg=cfg, dcp_merge_tokens=5)
        me._dcp_chunks = lambda n, per_token: Glm52Network._dcp_chunks(me, n, per_token)
        st = types.SimpleNamespace(dcp=DcpStep(D, r, cache.block_table(order), dcp.visible_rows(pos, D, r),
                                               torch.arange(T + 1, dtype=torch.int32), None, torch.zeros(T)))
        got[r] = Glm52Network._sparse_mla_dcp_gather(me, q, l, idx, st, cache)

    import threading
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(D)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in range(D):
        assert got[r] is not None and torch.equal(got[r], want), (lat, r, (got[r].float() - want.float()).abs().max())
    assert not want[3].any()


def test_conformance_judges_the_dcp_merge():
    """The conformance case (sparse_mla dcp-merge) passes the reference and the torch backend, and fails a
    backend whose lse is off or missing."""
    from glm52_backends.conformance import cases, runner
    from glm52_backends.registry import get_backend
    case = next(c for c in cases.CASES if (c.op, c.name) == ("sparse_mla", "dcp-merge"))
    for name in ("cpu_ref", "torch"):
        r = runner.run_case(get_backend(name), case, torch.float32, "quick", torch.device("cpu"))
        assert r.passed and r.path == "native", (name, r.detail)

    for bad in (_backend("lse off"), _backend("no lse")):
        r = runner.run_case(get_backend(bad), case, torch.float32, "quick", torch.device("cpu"))
        assert not r.passed, bad.name


def test_bad_dcp_layouts_are_refused_by_name(ckpt):
    with pytest.raises(LayoutError, match="dcp = 3 must divide tp = 4"):
        ParallelPlan(tp=4, dcp=3)
    with pytest.raises(LayoutError, match="dcp must be a positive integer"):
        ParallelPlan(tp=2, dcp=0)
    with pytest.raises(LayoutError, match="dcp = 2 must divide tp = 1"):
        GLM52(ckpt, backend="cpu_ref", dcp=2, progress=False)
    ParallelPlan(tp=4, dcp=2).validate(_cfg())


def test_a_backend_without_native_lse_attends_in_the_gather_form(ckpt, monkeypatch):
    """Ascend's sparse_mla gives no log-sum-exp natively: its DCP attention takes the gather form, and host
    offload with DCP (which merges staged partials by lse) is refused on it, naming both."""
    monkeypatch.setenv("GLM52_ASCEND_EMULATE", "1")
    from glm52_backends.registry import declared_sparse_mla_lse, get_backend
    assert get_backend("ascend").capabilities.sparse_mla_lse is False is declared_sparse_mla_lse("ascend")
    assert get_backend("cpu_ref").capabilities.sparse_mla_lse is True is declared_sparse_mla_lse("cpu_ref")
    with pytest.raises(ValueError, match="offload=8 with dcp = 2 needs sparse_mla's log-sum-exp, which backend "
                                         "'ascend \\(emulated\\)'"):
        GLM52(ckpt, backend="ascend", tp=2, dcp=2, offload=8, progress=False)


def test_a_backend_without_lse_is_named(ckpt):
    """DCP merges sparse_mla's partials by their log-sum-exp: a backend returning `out` alone is refused
    naming the backend and what DCP needs (the merge path driven here over one rank)."""
    from glm52_backends.ops.comm import Collectives
    from glm52_backends.registry import BackendOutputError
    from glm52_backends.step import DcpStep
    m = GLM52(ckpt, backend="cpu_ref", dtype=torch.float32, progress=False)
    cache = m.new_cache(64)
    st = m.net.plan(cache, {0: [1, 2, 3]})
    st.dcp = DcpStep(1, 0, st.meta.block_table, st.meta.seq_lens, st.meta.cu_seqlens_q, torch.arange(3), st.slots)
    m.net.dcp_comm = Collectives()
    H, C, dr = m.net.heads, m.cfg.kv_lora_rank, m.cfg.qk_rope_head_dim
    q = torch.randn(3, H, C + dr)
    idx = torch.tensor([[0, -1], [0, 1], [2, 1]], dtype=torch.int32)
    ok = m.net._sparse_mla_dcp(q, 0, idx, st, cache)                          # one rank: the op's own out
    want = m.ops.sparse_mla(q, cache.c[0], cache.k_pe[0], idx, st.meta.block_table, st.meta.seq_lens,
                            st.meta.cu_seqlens_q, m.cfg.softmax_scale)
    assert torch.allclose(ok, want, rtol=1e-6, atol=1e-6)
    from glm52_backends.registry import get_backend
    m.net.ops = get_backend(_backend("no lse"))
    with pytest.raises(BackendOutputError, match="log-sum-exp, which backend 'no lse' must return"):
        m.net._sparse_mla_dcp(q, 0, idx, st, cache)


def test_deployment_dcp_reaches_the_model(monkeypatch):
    """Under torchrun a deployment's parallel.dcp is passed to GLM52 (it executes, not only planned)."""
    from glm52_backends.deploy import load_deployment
    d = load_deployment("cpu-tiny").replace(**{"parallel.tp": 2, "parallel.dcp": 2, "devices_per_node": 2})
    monkeypatch.setenv("WORLD_SIZE", "2")
    kw = d.engine_config()[1].settings()
    assert kw["tp"] == 2 and kw["dcp"] == 2
