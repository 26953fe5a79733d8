"""Decode as captured graphs (engine/graph.py): the same tokens as eager decoding, replays that compute the
new step, inert padding, host reads per step, refusals that name their reason.

On this CPU the capture is "trace" (the step recorded as aten ops over the persistent buffers and the live
cache, replayed without Python: the stand-in of a CUDA/NPU graph) and, in one test, "compile" (that graph
compiled by inductor). Every comparison is against eager decoding of the same model on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from glm52_backends import GLM52, default_checkpoint
from glm52_backends.engine.scheduler import Engine, SamplingParams
from glm52_backends.engine.graph import GraphUnavailable, StaticDecode, buckets
from glm52_backends.engine.host_reads import HostReadInCapture, HostReads
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

from conftest import cache_state, same_cache_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("graph") / "tiny"), layers=4, seed=11, index_topk=8)


def _prompts(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (int(L),), generator=g).tolist() for L in torch.randint(2, 30, (n,), generator=g)]


def _drive(model, graph, budgets, prompts, cache_tokens=1024, prefill_chunk=None, **kw):
    """Greedy decoding through the engine, request i emitting budgets[i] tokens: (each request's
    tokens, the engine). Requests finishing at different times shrink the decode batch."""
    eng = Engine(model, cache_tokens=cache_tokens, graph=graph, max_num_seqs=len(prompts), prefix_caching=False,
                 prefill_chunk=prefill_chunk, max_num_batched_tokens=4096, lockstep=False, **kw)
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        eng.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True), request_id=i)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id] += o.token_ids
    return out, eng


# decode batches that cross buckets (5 -> 8, then 4, 3 -> 4, 2, 1): requests finishing at different times
BUDGETS = [16, 7, 12, 28, 19]


@pytest.mark.parametrize("kw", [dict(), dict(block_size=4), dict(quantization="fp8"),
                                dict(kv_cache_dtype="fp8"), dict(kv_cache_dtype="int8", block_size=4)],
                         ids=["bf16-bs16", "blocks-of-4", "fp8-weights", "fp8-cache", "int8-cache"])
def test_graph_decode_equals_eager(ckpt, kw):
    m = GLM52(ckpt, backend="torch", progress=False, **kw)
    prompts = _prompts()
    eager, _ = _drive(m, False, BUDGETS, prompts)
    graph, eng = _drive(m, "trace", BUDGETS, prompts)
    assert graph == eager
    st = eng.graphs["decode"].stats()
    assert st["graph"] == "trace" and st["graph_buckets"] == [1, 2, 4, 8] and not st["eager_buckets"]


def test_graph_decode_after_chunked_prefill_equals_eager(ckpt):
    m = GLM52(ckpt, backend="torch", progress=False, block_size=4)
    prompts = _prompts(4, seed=8)
    budgets = [5, 9, 9, 5]
    assert (_drive(m, "trace", budgets, prompts, prefill_chunk=5)[0]
            == _drive(m, False, budgets, prompts, prefill_chunk=5)[0])


def test_generate_with_graphs_equals_eager_and_reuses_them(ckpt):
    """Later runs that fit reuse the graphs (and their cache and buffers): requests then sit in other
    blocks than in the run that captured, so the block table must follow them."""
    m = GLM52(ckpt, backend="torch", progress=False, graph="trace", block_size=4)
    prompts = _prompts(3, seed=1)
    later = [prompts[2][:3], prompts[0] + prompts[1]]             # other lengths: other blocks per request
    ref = m.generate(prompts, max_new_tokens=12, stop_at_eos=False, graph=False)
    ref_later = m.generate(later, max_new_tokens=12, stop_at_eos=False, graph=False)
    assert ref.stats["graph"] == "off (graph=False)" and ref.stats["graphs_captured"] == 0
    a = m.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    kept = m.generate_engine
    b = m.generate(later, max_new_tokens=12, stop_at_eos=False)              # fits: the same graphs, reused
    assert m.generate_engine is kept and kept.graphs["decode"].graphs
    assert a.tokens == ref.tokens and b.tokens == ref_later.tokens
    assert a.stats["graph"] == "trace" and a.stats["graphs_captured"] >= 1


def test_a_kept_engine_serves_the_calls_it_fits(ckpt):
    """`generate` reuses the model's captured engine for a call of at most its batch and cache, with the
    same draft count and graph request; anything else gets a new engine."""
    from glm52_backends.engine.generation import fits
    m = GLM52(ckpt, backend="torch", progress=False, block_size=4)
    eng = Engine(m, cache_tokens=64, graph="trace", max_num_seqs=3, lockstep=False)
    cap = eng.cache_capacity
    assert cap == 64 and eng.cache.num_blocks == 17                       # 16 blocks + the null block
    assert fits(eng, k=0, graph="trace", batch=3, cache_tokens=cap)       # exactly its batch and its cache
    assert not fits(eng, k=0, graph="trace", batch=4, cache_tokens=cap)
    assert not fits(eng, k=0, graph="trace", batch=3, cache_tokens=cap + 1)
    assert not fits(eng, k=1, graph="trace", batch=3, cache_tokens=8)
    assert not fits(eng, k=0, graph="compile", batch=3, cache_tokens=8)
    assert not fits(None, k=0, graph="trace", batch=1, cache_tokens=8)
    eager = Engine(m, cache_tokens=64, graph=False, max_num_seqs=3, lockstep=False)
    assert eager.cache_capacity == 64 and not fits(eager, k=0, graph=False, batch=1, cache_tokens=8)


def _twins(ckpt, n: int, seed: int, batch: int):
    """A model, two caches holding the same prefilled prompts, and a static decoder over the first."""
    m = GLM52(ckpt, backend="torch", progress=False, block_size=4)
    prompts = _prompts(n, seed=seed)
    cache, twin = m.new_cache(512), m.new_cache(512)
    for c in (cache, twin):
        m.extend(c, dict(enumerate(prompts)))
    return m, cache, twin, StaticDecode(m, cache, batch, "trace", strict=True)


def test_replay_computes_the_new_step_not_the_captured_one(ckpt):
    """Capture at one step, replay at later ones with other tokens, positions and blocks: the logits
    equal an eager step on an identical twin cache (the captured values would give other logits)."""
    m, cache, twin, static = _twins(ckpt, 2, seed=2, batch=2)
    first = None
    for step, toks in enumerate(([5, 6], [7, 8], [9, 10], [11, 12], [13, 14])):
        with torch.inference_mode():
            got = static.step([0, 1], toks).clone()
        want = torch.cat([v for v in m.extend(twin, {0: [toks[0]], 1: [toks[1]]}, last_only=True).values()])
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"step {step}"
        if first is None:
            first = got
        else:
            assert not torch.allclose(got, first)
    assert len(static.graphs) == 1                                # one capture, four replays
    assert cache.lens == twin.lens


def test_padded_rows_are_inert(ckpt):
    """3 requests in the bucket of 4: the padding row writes only the null block and reads nothing; the
    requests' cache rows equal eager decoding's, and a later request never gets the null block."""
    m, cache, twin, static = _twins(ckpt, 3, seed=3, batch=4)
    null = static.null
    twin.null_block()                                             # the same free list on both
    for toks in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        with torch.inference_mode():
            static.step([0, 1, 2], toks)
        m.extend(twin, {0: [toks[0]], 1: [toks[1]], 2: [toks[2]]}, last_only=True)
    assert sorted(static.graphs) == [4]
    got, want = cache_state(cache), cache_state(twin)
    assert got[1:] == want[1:]                                    # blocks, lengths, free list
    for a, b in zip(got[0], want[0]):                             # rows: a [4, .] GEMM vs a [3, .] one
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    assert all(null not in b for b in cache.blocks.values())
    cache.reserve({"new": cache.free_blocks * cache.block_size})   # every free block: never the null one
    assert null not in cache.blocks["new"]


def test_host_reads_per_decode_step(ckpt):
    """Steady-state decode through the engine: one host read per step (the tokens, with the finiteness
    flags), eager and graph."""
    for graph in (False, "trace"):
        m = GLM52(ckpt, backend="torch", progress=False)
        eng = Engine(m, cache_tokens=512, graph=graph, max_num_seqs=3, prefix_caching=False, lockstep=False)
        for p in _prompts(3, seed=4):
            eng.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True))
        eng.step()                                                # the prefill
        eng.step()                                                # capture (graph) / warm-up
        with HostReads() as reads:
            eng.step()
            eng.step()
        assert reads.count == 2, (graph, reads.where)             # <= 2 is the bar; it is 1 per step
        assert reads.where == ["Tensor.tolist"] * 2


def test_host_read_guard_counts_and_refuses():
    x = torch.arange(6.0)
    with HostReads() as r:
        x.sum().item(), bool(x[1]), x.tolist(), x.nonzero(), int(x[2]), float(x[3])
    assert r.count == 6
    with pytest.raises(HostReadInCapture, match="reads tensor values on the host"):
        with HostReads(forbid=True):
            x.max().item()
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]               # methods restored after the block


def test_a_backend_that_reads_the_host_is_not_captured(ckpt):
    """cpu_ref loops over requests with host lengths: graph=True refuses, naming why; a bucket whose
    capture fails under graph='auto' stays eager (and computes what eager computes)."""
    m = GLM52(ckpt, backend="cpu_ref", progress=False)
    with pytest.raises(GraphUnavailable, match="backend 'cpu_ref' cannot capture the decode step as a trace "
                                               "graph: .*reads tensor values on the host \\(Tensor.tolist\\)"):
        m.generate(_prompts(2), max_new_tokens=3, graph="trace")
    prompts = _prompts(2, seed=5)
    eager, _ = _drive(m, False, [4, 4], prompts)
    # the same decode steps with a trace graph allowed to refuse its capture (graph='auto' keeps it eager)
    eng = Engine(m, cache_tokens=1024, graph=False, max_num_seqs=2, prefix_caching=False, lockstep=False)
    static = eng.graphs["decode"] = StaticDecode(m, eng.cache, 2, "trace", strict=False)
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True), request_id=i)
    got: dict[int, list[int]] = {0: [], 1: []}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.token_ids
    assert got == eager
    assert sorted(static.eager) == [2] and not static.graphs
    assert "reads tensor values on the host (Tensor.tolist)" in static.eager[2]


def test_nan_in_a_graph_step_names_the_step_and_rolls_back(ckpt):
    m = GLM52(ckpt, backend="torch", progress=False)
    eng = Engine(m, cache_tokens=512, graph="trace", max_num_seqs=2, prefix_caching=False, lockstep=False,
                 on_nonfinite="raise")
    for p in _prompts(2, seed=6):
        eng.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True))
    eng.step()                                                     # the prefill
    eng.step()                                                     # decode step 1 (captured)
    assert eng.stats["graph_steps"] == 1
    before = cache_state(eng.cache)
    m.net.final_norm.mul_(float("nan"))                            # the captured graph reads the live weight
    try:
        with pytest.raises(FloatingPointError, match=r"backend 'torch': logits of decode step 2 hold \d+ NaN/inf "
                                                     r"value\(s\) \(rows \[0, 1\]\)"):
            eng.step()
    finally:
        m.net.final_norm.fill_(1.0)
    assert eng.stats["graph_steps"] == 2                           # it was the graph's step that failed
    assert same_cache_state(cache_state(eng.cache), before)


def test_a_failed_generate_leaves_the_kept_engine_empty(ckpt):
    """NaN logits in a captured run: `generate` raises naming them, every request of the kept engine is
    dropped with its blocks, and the next call (the same engine) computes what it computed before."""
    m = GLM52(ckpt, backend="torch", progress=False, graph="trace")
    prompts = _prompts(3, seed=12)
    want = m.generate(prompts, max_new_tokens=5, stop_at_eos=False).tokens
    eng = m.generate_engine
    free, norm = eng.cache.free_blocks, m.net.final_norm.clone()
    m.net.final_norm.mul_(float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="backend 'torch': logits hold"):
            m.generate(prompts, max_new_tokens=5, stop_at_eos=False)
    finally:
        m.net.final_norm.copy_(norm)
    assert m.generate_engine is eng and not eng.requests and not eng.running and not eng.waiting
    assert not eng.cache.lens and eng.cache.free_blocks == free
    assert m.generate(prompts, max_new_tokens=5, stop_at_eos=False).tokens == want


def test_graph_argument_is_checked(ckpt):
    with pytest.raises(ValueError, match="GLM52: graph must be 'auto', True, False, 'trace' or 'compile', got 'yes'"):
        GLM52(ckpt, backend="torch", progress=False, graph="yes")
    m = GLM52(ckpt, backend="torch", progress=False)
    with pytest.raises(ValueError, match="generate: graph must be"):
        m.generate([[1, 2]], max_new_tokens=2, graph=1)
    assert m.generate([[1, 2]], max_new_tokens=2).stats["graph"].startswith("eager: on a cpu device")
    assert buckets(1) == [1] and buckets(5) == [1, 2, 4, 8] and buckets(8) == [1, 2, 4, 8]
    d = GLM52(default_checkpoint(), backend="torch", progress=False)
    assert d.generate([[1, 2]], max_new_tokens=2, speculative=2).stats["graph"].startswith("eager: on a cpu")


@pytest.mark.slow
def test_compiled_graph_equals_eager(tmp_path):
    """graph=True on the CPU: the recorded step compiled by inductor (about 10-30 s on 2 cores)."""
    ckpt = make_tiny_checkpoint(str(tmp_path / "two"), layers=2, seed=12, index_topk=8)
    m = GLM52(ckpt, backend="torch", progress=False)
    prompts = _prompts(2, seed=7)
    ref = m.generate(prompts, max_new_tokens=10, stop_at_eos=False, graph=False)
    out = m.generate(prompts, max_new_tokens=10, stop_at_eos=False, graph=True)
    assert out.tokens == ref.tokens
    assert out.stats["graph"] == "compile" and out.stats["graph_buckets"] == [2]


@pytest.mark.parametrize("kw", [dict(speculative=1), dict(speculative=2), dict(speculative=3),
                                dict(speculative=3, adaptive=True), dict(speculative=3, adaptive=True, draft_threshold=0.9),
                                dict(speculative=2, prefill_chunk=3), dict(speculative=3, quantization="fp8"),
                                dict(speculative=2, kv_cache_dtype="int8", block_size=4)],
                         ids=["k1", "k2", "k3", "adaptive", "adaptive-0.9", "chunked", "fp8-weights", "int8-cache-bs4"])
def test_speculative_graphs_equal_eager(kw):
    """MTP speculative decoding with its verify and draft steps as graphs gives eager's greedy tokens and
    acceptance, for fixed and adaptive drafts (requests padded to k drafts in the verify graph), over a
    batch of 5 whose requests finish at different times (buckets 8, 4, 2, 1) and cross cache blocks."""
    load = {k: kw.pop(k) for k in ("quantization", "kv_cache_dtype", "block_size") if k in kw}
    m = GLM52(default_checkpoint(), backend="torch", progress=False, **load)      # trained: drafts get accepted
    prompts = _prompts()
    budgets = [16, 4, 9, 24, 6]
    eager = [m.generate([p], max_new_tokens=b, graph=False, stop_at_eos=False, **kw) for p, b in zip(prompts, budgets)]
    want = [e.tokens[0] for e in eager]
    out = m.generate(prompts, max_new_tokens=24, graph="trace", stop_at_eos=False, **kw)
    assert [t[:b] for t, b in zip(out.tokens, budgets)] == want
    both = m.generate(prompts, max_new_tokens=24, graph=False, stop_at_eos=False, **kw)
    assert out.tokens == both.tokens and out.stats["mean_acceptance_length"] == both.stats["mean_acceptance_length"]
    st = out.stats
    assert st["graph"] == "trace" and st["graph_buckets"] and not st["eager_buckets"]
    assert bool(st["mtp_graph_buckets"]) == (kw["speculative"] > 1) and not st["mtp_eager_buckets"]
    g = m.generate_engine.graphs               # capture time and count: the verify graphs' and the draft graphs'
    parts = [g[n].stats() for n in ("verify", "mtp") if n in g]
    assert st["graph_capture_s"] > 0
    assert st["graph_capture_s"] == pytest.approx(sum(p["graph_capture_s"] for p in parts))
    assert st["graphs_captured"] == sum(p["graphs_captured"] for p in parts)
    if kw.get("adaptive"):                  # some requests drafted fewer than k: padded in the verify graph
        # (a request's round with one token left drafts none: the mean may dip under 1)
        assert 0 < st["mean_drafted_tokens"] < kw["speculative"]


def test_a_verify_replay_computes_the_new_step():
    """The verify graph of bucket 2, replayed over other requests and tokens, returns their logits
    (equal to an eager verify step on a copy of the state), not the captured step's."""
    m = GLM52(default_checkpoint(), backend="torch", progress=False)
    cache = m.new_cache(4096, mtp=True)
    prompts = _prompts(4, seed=9)
    m.extend(cache, {i: p for i, p in enumerate(prompts)})
    sd = StaticDecode(m, cache, 2, "trace", strict=True, q=3, kind="verify")
    h0, lg0 = sd.step([0, 1], [1, 2, 3, 4, 5, 6])
    for reqs, toks in (([2, 3], [7, 8, 9, 10, 11, 12]), ([1, 0], [13, 14, 15, 16, 17, 18])):
        lens = {r: cache.lens[r] for r in reqs}
        h, lg = sd.step(reqs, toks)
        for r in reqs:                                    # the same tokens again, eagerly, from the same lengths
            cache.truncate(r, lens[r])
        _, he = m.run(cache, {r: toks[3 * b:3 * b + 3] for b, r in enumerate(reqs)})
        torch.testing.assert_close(h, he, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lg, m.logits(he), rtol=1e-5, atol=1e-4)
        assert not torch.allclose(lg, lg0, atol=1e-3)
    assert sd.stats()["graph_buckets"] == [2]
