"""Host offload of cold latent blocks, one fetch plan per IndexShare group (glm52_backends/cache.py, HostOffload).

The tiny checkpoint (4 layers: full, shared, full, shared; an MTP layer; top-k 8) runs with 4-token
blocks on prompts of 45-77 tokens, so a request spans 12-20 blocks and a staging area of 16 blocks
per layer forces blocks in and out every step. With and without offload: the same logits (exactly:
the ops read the same rows through a remapped block table) and the same tokens, greedy, with chunked
prefill and with MTP speculative decoding; each step's fetch per IndexShare group is logged once,
never more than the blocks selected, and the decode steps fetch less than the dense fetch.
"""

from __future__ import annotations

import pytest
import torch

from glm52_backends import GLM52
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
from glm52_backends.cache import OffloadTooSmall

pytestmark = pytest.mark.usefixtures("one_thread")

BS, SLOTS = 4, 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("offload") / "bf16"), layers=4, seed=3, mtp=True,
                                index_topk=8)


@pytest.fixture(scope="module")
def models(ckpt):
    kw = dict(backend="cpu_ref", dtype=torch.float32, progress=False, block_size=BS)
    return GLM52(ckpt, **kw), GLM52(ckpt, offload=SLOTS, **kw)


def prompts(n=(45, 77)):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in n]


def greedy(model, ps, new, chunk, offload_blocks=None):
    """Chunked prefill then greedy decode through `extend`: (logits of every step, tokens, cache)."""
    cache = model.new_cache(sum(len(p) for p in ps) + len(ps) * new + 8 * BS, offload_blocks=offload_blocks)
    steps, toks = [], {i: [] for i in range(len(ps))}
    last = {}
    for a in range(0, max(map(len, ps)), chunk):
        out = model.extend(cache, {i: p[a:a + chunk] for i, p in enumerate(ps) if p[a:a + chunk]})
        steps.append(out)
        last.update({i: int(lg[-1].argmax()) for i, lg in out.items()})
    for _ in range(new):
        for i, t in last.items():
            toks[i].append(t)
        out = model.extend(cache, {i: [t] for i, t in last.items()})
        steps.append(out)
        last = {i: int(out[i][-1].argmax()) for i in out}
    return steps, toks, cache


def test_greedy_chunked_identical_logits_and_blocks_move(models):
    plain, off = models
    ps = prompts()
    s0, t0, c0 = greedy(plain, ps, 6, 16)
    s1, t1, c1 = greedy(off, ps, 6, 16)
    assert t0 == t1
    for a, b in zip(s0, s1):
        assert a.keys() == b.keys()
        for r in a:
            assert torch.equal(a[r], b[r]), f"request {r}: logits differ with host offload"
    assert c0.offload is None and c1.offload is not None
    log = c1.offload.log
    assert c1.used_blocks > SLOTS                   # more blocks than the staging area: they must move
    decode = [r for r in log if r["tokens"] == len(ps)]
    assert decode and sum(r["fetched_blocks"] for r in decode) > 0
    # one plan per IndexShare group per step (groups 0 and 2; no MTP layer in this cache)
    assert sorted({r["group"] for r in log}) == [0, 2]
    for st in {r["step"] for r in log}:
        assert sorted(r["group"] for r in log if r["step"] == st) == [0, 2]
    for r in decode:                                # a decode step fits: fetched once for the group
        assert r["runs"] == 1
        assert r["fetched_blocks"] <= r["selected_blocks"] <= min(SLOTS, r["dense_blocks"])
        assert r["fetched_bytes"] == r["fetched_blocks"] * r["layers"] * c1.offload.block_bytes
    assert sum(r["fetched_blocks"] for r in decode) < sum(r["dense_blocks"] for r in decode)
    # the device holds the index keys and the staging area, not the latent rows of every block
    assert c1.device_nbytes < c0.nbytes and c0.device_nbytes == c0.nbytes


def test_generate_greedy_chunked_and_speculative_tokens_equal(models):
    plain, off = models
    ps = prompts((52, 64))
    ref = plain.generate(ps, max_new_tokens=6, prefill_chunk=16).tokens
    assert off.generate(ps, max_new_tokens=6, prefill_chunk=16).tokens == ref
    assert off.generate(ps, max_new_tokens=6).tokens == ref
    spec0 = plain.generate(ps, max_new_tokens=6, speculative=2)
    spec1 = off.generate(ps, max_new_tokens=6, speculative=2)
    assert spec1.tokens == spec0.tokens == ref


def test_mtp_layer_is_its_own_group(models):
    plain, off = models
    ps = prompts((41,))
    outs = []
    for m in (plain, off):
        cache = m.new_cache(128, mtp=True)
        st, h = m.run(cache, {0: ps[0]})
        _, _, lg, idx = m.run_mtp(cache, {0: ps[0][1:] + [5]}, h)
        _, _, lg2, _ = m.run_mtp(cache, {0: [9]}, h[-1:], shared_idx=idx[-1:])
        outs.append((lg, lg2, cache))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    log = outs[1][2].offload.log
    n = off.cfg.num_hidden_layers
    mtp = [r for r in log if r["group"] == n]
    assert [r["kind"] for r in mtp] == ["mtp", "mtp"] and all(r["layers"] == 1 for r in mtp)


def test_quantized_latent_cache_identical(ckpt):
    kw = dict(backend="cpu_ref", dtype=torch.float32, progress=False, block_size=BS, kv_cache_dtype="fp8")
    plain, off = GLM52(ckpt, **kw), GLM52(ckpt, offload=SLOTS, **kw)
    s0, t0, _ = greedy(plain, prompts((60,)), 3, 20)
    s1, t1, c1 = greedy(off, prompts((60,)), 3, 20)
    assert t0 == t1 and all(torch.equal(a[0], b[0]) for a, b in zip(s0, s1))
    assert sum(r["fetched_blocks"] for r in c1.offload.log) > 0


def test_unstaged_blocks_read_as_poison(models):
    """The null block every unstaged block maps to is NaN: a read of a block the plan did not fetch
    would reach the logits (which the equality tests above would catch)."""
    _, off = models
    cache = off.new_cache(64)
    null = cache.offload.null
    assert torch.isnan(cache.c[0][null]).all() and torch.isnan(cache.k_pe[0][null]).all()
    assert cache.c[0].shape[0] == SLOTS + 1 and cache.offload.lut[0].eq(null).all()


def test_refusals_name_the_culprit(models, ckpt):
    _, off = models
    cache = off.new_cache(128, offload_blocks=2)
    with pytest.raises(OffloadTooSmall, match="offload_blocks >= "):
        off.extend(cache, {0: prompts((40,))[0]})
    assert cache.lens == {}                          # the failed step left the cache as it was
    with pytest.raises(ValueError, match="offload_blocks must be a positive integer"):
        off.new_cache(64, offload_blocks=0)
    with pytest.raises(ValueError, match="graph=True with offload=4"):
        GLM52(ckpt, backend="cpu_ref", progress=False, offload=4, graph=True)
    from glm52_backends.cache import PagedCache
    split = PagedCache(off.cfg, 8, 4, dcp_size=2, offload_blocks=4)       # offload under DCP: local rows staged
    assert split.c[0].shape[:2] == (4 + 1, 2) and torch.isnan(split.c[0][split.offload.null]).all()


def test_a_deployments_offload_gb_stages_the_planners_blocks(ckpt, models):
    """`offload_gb` in a YAML reaches the engine: the staging area the planner counts (max_batch x (1 + MTP
    draft tokens) x top-k blocks per layer), and the model so built generates what one without offload does."""
    from glm52_backends.deploy import load_deployment
    d = load_deployment("cpu-tiny").replace(offload_gb=1, model=ckpt, cache_block_size=BS)
    src, config = d.engine_config(backend="cpu_ref", dtype=torch.float32, progress=False)
    assert config.cache.offload == d.max_batch * (1 + d.mtp_draft_tokens) * 8 > 0
    assert load_deployment("cpu-tiny").engine_config()[1].cache.offload is None
    off = GLM52(src, config)
    P = prompts()
    assert off.generate(P, max_new_tokens=6, stop_at_eos=False).tokens == \
        models[0].generate(P, max_new_tokens=6, stop_at_eos=False).tokens
