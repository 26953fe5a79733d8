"""MTP speculative decoding (glm52_backends.engine.speculative) and the backends' `mtp_verify` op.

A random checkpoint's MTP drafts are almost never accepted, so the greedy and cache tests mix in a
test draft source (`MixedDrafts`): at each (request, position) a seeded coin decides between the
plain-greedy token and a token that is wrong (the MTP's own proposal when it differs). Acceptance
is still decided by the backend's `mtp_verify` against the target's logits, so a pipeline bug
(cache rollback, positions, hidden rows) changes the output.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from glm52_backends import GLM52
from glm52_backends.ops._paged import gather_paged
from glm52_backends.registry import get_backend
from glm52_backends.sampling import probs_from_logits
from glm52_backends.engine.scheduler import Engine, SamplingParams
from glm52_backends.engine.speculative import DEFAULT_DRAFT_THRESHOLD
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
from conftest import env_vars, speculative

# every backend that runs on this machine: the Ascend backend through its CPU emulator of the
# torch_npu ops. (The CUDA backend under Triton's interpreter is too slow for these generations;
# its mtp_verify is covered by conformance and its greedy model test.)
BACKENDS = ["cpu_ref", "torch", "ascend"]
BACKEND_ENV = {"ascend": {"GLM52_ASCEND_EMULATE": "1"}}
ALPHA = 1e-3                # significance level of the distribution tests
NEW_TOKENS = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is ~10x faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mtp"), mtp=True, layers=4, seed=3, index_topk=8)


_MODELS: dict = {}
_PLAIN: dict = {}


def _backend(name):
    with env_vars(BACKEND_ENV.get(name, {})):
        return get_backend(name)


def _model(ckpt, backend):
    if backend not in _MODELS:
        with env_vars(BACKEND_ENV.get(backend, {})):
            _MODELS[backend] = GLM52(ckpt, backend=backend, dtype=torch.float32, progress=False)
    return _MODELS[backend]


def _prompts(V, lengths=(5, 13, 22), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def _plain(model, backend, prompts):
    key = (backend, tuple(map(tuple, prompts)))
    if key not in _PLAIN:
        _PLAIN[key] = model.generate(prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False).tokens
    return _PLAIN[key]


class MixedDrafts:
    """Test draft source: request i's draft at position pos is the plain-greedy token when a seeded
    coin < rates[i], else a wrong token (the MTP proposal if it differs from the reference, else
    reference + 1). rates[i] = None passes the MTP's proposals through untouched."""

    def __init__(self, reference: list[list[int]], rates, V: int, seed: int = 0):
        self.ref, self.rates, self.V = reference, rates, V
        g = torch.Generator().manual_seed(seed)
        self.coins = torch.rand(len(reference), max(map(len, reference)) + 16, generator=g).tolist()

    def __call__(self, i: int, pos: int, proposed: int) -> int:
        rate = self.rates[i]
        if rate is None or pos >= len(self.ref[i]):
            return proposed
        right = self.ref[i][pos]
        if self.coins[i][pos] < rate:
            return right
        return proposed if proposed != right else (right + 1) % self.V


# ---- greedy: token for token the plain output ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_speculative_equals_plain(ckpt, backend, k):
    model = _model(ckpt, backend)
    V = model.cfg.vocab_size
    prompts = _prompts(V)                                         # 5, 13, 22 tokens (index_topk 8)
    plain = _plain(model, backend, prompts)
    drafts = MixedDrafts([p + o for p, o in zip(prompts, plain)], [0.9, 0.5, None], V, seed=k)
    res, dec = speculative(model, prompts, max_new_tokens=NEW_TOKENS, k=k, stop_at_eos=False,
                                    draft_filter=drafts)
    assert res.tokens == plain
    acc = dec.accepted
    assert max(acc[0]) == k and min(acc[1]) == 0                  # bonus tokens and full rejections
    assert len(set(acc[0]) | set(acc[1])) >= min(k + 1, 3)        # different counts per step
    assert sorted(acc) == [0, 1, 2] and len(acc[2]) >= len(acc[0])  # pure MTP drafts: more steps
    mean = sum(a + 1 for v in acc.values() for a in v) / sum(map(len, acc.values()))
    assert res.stats["mean_acceptance_length"] == pytest.approx(mean)
    assert 1.0 < mean <= k + 1
    assert res.stats["ops"]["mtp_verify"] == "native"


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_speculative_mtp_drafts_chunked_prefill_and_eos(ckpt, backend):
    """The MTP's own drafts only, chunked prefill, and an eos token that ends requests mid-round."""
    model = _model(ckpt, backend)
    prompts = _prompts(model.cfg.vocab_size, (9, 3), seed=1)
    plain = model.generate(prompts, max_new_tokens=20, stop_at_eos=False).tokens
    old = model.cfg.eos_token_id
    model.cfg.eos_token_id = [plain[0][11]]                       # request 0 stops at its 12th token
    try:
        want = model.generate(prompts, max_new_tokens=20, prefill_chunk=4).tokens
        drafts = MixedDrafts([p + o for p, o in zip(prompts, plain)], [0.8, None], model.cfg.vocab_size)
        got, _ = speculative(model, prompts, max_new_tokens=20, k=3, prefill_chunk=4, draft_filter=drafts)
        mtp_only = model.generate(prompts, max_new_tokens=20, speculative=2, prefill_chunk=4)
    finally:
        model.cfg.eos_token_id = old
    assert len(want[0]) == plain[0].index(plain[0][11]) + 1
    assert got.tokens == want and mtp_only.tokens == want


# ---- caches after rejections ---------------------------------------------------------------------

def _plain_caches(model, seq: list[int], P: int, L: int):
    """The caches plain decoding builds for one request of `seq` (prompt length P) after L target
    positions: prompt prefill then one token per step, the MTP layer fed each step's target hidden
    (entry j from h_j and token j+1). Returns (cache, MTP pending logits at position L-1)."""
    ref = model.new_cache(2 * (L + 2 * model.block_size), mtp=True)
    _, h = model.run(ref, {0: seq[:P]})
    _, _, lg, _ = model.run_mtp(ref, {("mtp", 0): seq[1:P + 1]}, h)
    for j in range(P, L):
        _, h = model.run(ref, {0: [seq[j]]})
        _, _, lg, _ = model.run_mtp(ref, {("mtp", 0): [seq[j + 1]]}, h)
    return ref, lg[-1]


def _assert_same_entries(got, ref, req_got, req_ref, n, what):
    bt_g, bt_r = got.block_table([req_got])[0], ref.block_table([req_ref])[0]
    for kind in ("c", "k_pe", "index_k"):
        for l, c in getattr(got, kind).items():
            a, b = gather_paged(c, bt_g, n), gather_paged(getattr(ref, kind)[l], bt_r, n)
            err = (a - b).abs().max().item()
            assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what} {kind} layer {l}: {err}"


class _mtp_view:
    """Only the MTP layer's caches of a PagedCache (same block bookkeeping)."""

    def __init__(self, cache, cfg):
        l = cfg.num_hidden_layers
        self.c, self.k_pe, self.index_k = {l: cache.c[l]}, {l: cache.k_pe[l]}, {l: cache.index_k[l]}
        self.block_table = cache.block_table


@pytest.mark.parametrize("backend", BACKENDS)
def test_caches_after_rejection_equal_plain_decoding(ckpt, backend):
    model = _model(ckpt, backend)
    cfg = model.cfg
    prompts = _prompts(cfg.vocab_size, (7, 12), seed=2)
    plain = model.generate(prompts, max_new_tokens=24, stop_at_eos=False).tokens
    ref_seq = [p + o for p, o in zip(prompts, plain)]
    k = 3
    drafts = MixedDrafts(ref_seq, [0.6, 0.3], cfg.vocab_size, seed=5)
    eng = Engine(model, speculative=k, cache_tokens=400, draft_filter=drafts, prefix_caching=False)
    assert cfg.num_hidden_layers in eng.cache.c and cfg.num_hidden_layers in eng.cache.index_k
    reqs = [eng.requests[eng.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True), request_id=i)]
            for i, p in enumerate(prompts)]
    eng.step()                                                               # the prefill: first tokens
    rejected_rounds = 0
    for _ in range(5):
        n = {q.rid: q.computed for q in reqs}
        eng.step()
        for q in reqs:
            i, a = q.rid, q.accepted[-1]
            assert eng.cache.lens[i] == n[i] + a + 1 and eng.cache.lens[("mtp", i)] == n[i]
            assert eng.cache.lens[i] == len(q.ids) - 1 == q.computed
            rejected_rounds += a < k
        eng.catch_up(reqs)
        for q in reqs:
            i, L = q.rid, eng.cache.lens[q.rid]
            assert q.ids == ref_seq[i][:L + 1]
            assert eng.cache.lens[("mtp", i)] == L
            assert len(eng.cache.blocks[i]) == eng.cache.blocks_needed(L)          # rejected blocks freed
            ref, pending = _plain_caches(model, q.ids, len(prompts[i]), L)
            _assert_same_entries(eng.cache, ref, i, 0, L, f"request {i} target")
            # the MTP entries: the draft-step entries are gone, the verified ones rebuilt
            mtp_got, mtp_ref = _mtp_view(eng.cache, cfg), _mtp_view(ref, cfg)
            _assert_same_entries(mtp_got, mtp_ref, ("mtp", i), ("mtp", 0), L, f"request {i} MTP")
            assert torch.allclose(q.pending[1], pending, atol=1e-4, rtol=1e-4)
    assert rejected_rounds >= 3


@pytest.mark.parametrize("share", [True, False])
def test_index_share_for_mtp_iteration(ckpt, share):
    """Draft steps after the first reuse the pending top-k (no MTP indexer call) when the config
    says so, and run the MTP indexer otherwise; the output is plain greedy's either way."""
    model = _model(ckpt, "cpu_ref")
    cfg, k = model.cfg, 4
    old = cfg.index_share_for_mtp_iteration
    cfg.index_share_for_mtp_iteration = share
    try:
        eng = Engine(model, speculative=k, cache_tokens=200)
        q = eng.requests[eng.add_request([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], SamplingParams(max_tokens=20,
                                                                                       ignore_eos=True))]
        eng.step()                                                           # the prefill
        eng.catch_up([q])
        calls = model.ops.calls["indexer_topk"]
        before = calls["native"] + calls["fallback"]
        eng.step()                                                           # k drafts, one verify step
        after = calls["native"] + calls["fallback"]
        assert q.drafted == [k]
    finally:
        cfg.index_share_for_mtp_iteration = old
    # the verify step calls it once per full target layer; draft steps 2..k once each unless shared
    assert after - before == len(cfg.full_layers) + (0 if share else k - 1)


# ---- sampling preserves the target distribution --------------------------------------------------

def _chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x) = Q(df/2, x/2), the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def _target_joint(model, prompt, n: int, temperature: float, top_p: float) -> dict[tuple, float]:
    """Exact probability of every n-token continuation under the target (plain sampling)."""
    joint = {(): 1.0}
    for _ in range(n):
        prefixes = list(joint)
        logits = model(torch.tensor([prompt + list(p) for p in prefixes]))[:, -1]          # [N, V]
        probs = probs_from_logits(logits, temperature, top_p, torch.float64)
        joint = {p + (v,): joint[p] * float(probs[r, v]) for r, p in enumerate(prefixes)
                 for v in range(probs.shape[-1])}
    return joint


def _chi2(counts: dict[tuple, int], joint: dict[tuple, float], N: int) -> tuple[float, int]:
    """Pearson statistic with cells of expected count < 5 pooled into one; returns (stat, df)."""
    stat, pool_obs, pool_exp, cells = 0.0, 0, 0.0, 0
    for cell, p in joint.items():
        e, o = N * p, counts.get(cell, 0)
        if e >= 5:
            stat += (o - e) ** 2 / e
            cells += 1
        else:
            pool_obs, pool_exp = pool_obs + o, pool_exp + e
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        cells += 1
    return stat, cells - 1


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("v4"), mtp=True, layers=1, seed=5, index_topk=4,
                                vocab_size=4)
    return GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)


@pytest.mark.parametrize("k,temperature,top_p", [(2, 1.0, 1.0), (3, 0.8, 0.8)])
def test_sampling_preserves_target_distribution(small_vocab, k, temperature, top_p):
    """Joint distribution of the first three new tokens (64 cells, vocabulary 4) over N runs, batched
    as N identical requests, against the exact target joint: Pearson chi-square at ALPHA."""
    model, N, n = small_vocab, 1000, 3
    prompt = [1, 3, 0, 2, 2, 1]                                              # longer than index_topk
    # n + k - 1 new tokens: a request drafts at most (tokens left - 1), so the second round can still
    # draft all k and both verify outcomes occur; the joint is judged on the first n tokens
    res, dec = speculative(model, [prompt] * N, max_new_tokens=n + k - 1, k=k, temperature=temperature,
                                    top_p=top_p, seed=11, stop_at_eos=False)
    joint = _target_joint(model, prompt, n, temperature, top_p)
    counts: dict[tuple, int] = {}
    for t in res.tokens:
        counts[tuple(t[:n])] = counts.get(tuple(t[:n]), 0) + 1
    assert sum(counts.values()) == N
    impossible = sum(c for cell, c in counts.items() if joint[cell] == 0.0)
    assert impossible == 0, "sampled a continuation the target (top-p) gives probability 0"
    stat, df = _chi2(counts, joint, N)
    p_value = _chi2_sf(stat, df)
    assert p_value > ALPHA, f"chi2 = {stat:.1f} on {df} df, p = {p_value:.2e}"
    # both verify outcomes were exercised: rejections and fully accepted drafts with a bonus token
    seen = {a for v in dec.accepted.values() for a in v}
    assert 0 in seen and k in seen
    # the test can fail: the same counts judged against a nearby wrong target are rejected
    wrong = _target_joint(model, prompt, n, temperature * 1.6, top_p)
    if top_p == 1.0:
        assert _chi2_sf(*_chi2(counts, wrong, N)) < ALPHA


# ---- mtp_verify edge cases -------------------------------------------------------------------------

def _logits(B, k, V, seed):
    return torch.randn(B, k + 1, V, generator=torch.Generator().manual_seed(seed)) * 2


def _inverse_cdf(p: torch.Tensor, u: float) -> int:
    """The first index whose cumulative mass exceeds u * total (written out, independent of sampling.py)."""
    total, acc = float(p.sum()), 0.0
    for i, x in enumerate(p.tolist()):
        acc += x
        if acc > u * total:
            return i
    return len(p) - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 4])
def test_verify_greedy_all_none_and_partial(backend, k):
    ops = _backend(backend)
    V, B = 11, 3
    lg = _logits(B, k, V, seed=k)
    best = lg.argmax(-1)                                                      # [B, k+1]
    draft = best[:, :k].clone()
    draft[1, 0] = (best[1, 0] + 1) % V                                        # request 1: first draft wrong
    if k > 1:
        draft[2, k - 1] = (best[2, k - 1] + 3) % V                            # request 2: last draft wrong
    acc, toks = ops.mtp_verify(draft, lg)
    assert acc.dtype == torch.int32 and toks.dtype == torch.int64 and toks.shape == (B, k + 1)
    want_acc = [k, 0, k - 1 if k > 1 else 0]
    if k == 1:
        draft[2, 0] = (best[2, 0] + 3) % V
        acc, toks = ops.mtp_verify(draft, lg)
    assert acc.tolist() == want_acc
    assert toks[0].tolist() == best[0].tolist()                               # all accepted + bonus argmax
    assert toks[1].tolist() == [int(best[1, 0])] + [-1] * k                  # none accepted: target's token
    a = want_acc[2]
    assert toks[2].tolist() == draft[2, :a].tolist() + [int(best[2, a])] + [-1] * (k - a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_sampling_all_accepted_bonus_and_none_accepted(backend):
    ops = _backend(backend)
    B, k, V, T = 4, 3, 9, 0.7
    lg = _logits(B, k, V, seed=7)
    p = torch.softmax(lg.double() / T, -1)
    draft = torch.stack([torch.arange(k) % V + b for b in range(B)])         # arbitrary drafts, p > 0
    u = torch.rand(B, k + 1, generator=torch.Generator().manual_seed(1))
    # all accepted (u < p/q for q one-hot is u < p(d)): the bonus token by inverse CDF of p[k]
    u_acc = u.clone()
    u_acc[:, :k] = 0.0
    acc, toks = ops.mtp_verify(draft, lg, None, T, 1.0, u_acc)
    assert acc.tolist() == [k] * B
    for b in range(B):
        assert toks[b, :k].tolist() == draft[b].tolist()
        assert int(toks[b, k]) == _inverse_cdf(p[b, k], float(u[b, k]))
    # none accepted (u_0 above p(d_0)): the correction from p without the draft token (q one-hot)
    u_rej = u.clone()
    u_rej[:, 0] = torch.clamp(p[torch.arange(B), 0, draft[:, 0]].float() + 1e-3, max=0.9999)
    acc, toks = ops.mtp_verify(draft, lg, None, T, 1.0, u_rej)
    assert acc.tolist() == [0] * B
    for b in range(B):
        r = p[b, 0].clone()
        r[draft[b, 0]] = 0.0
        assert int(toks[b, 0]) == _inverse_cdf(r, float(u[b, k])) != int(draft[b, 0])
        assert toks[b, 1:].tolist() == [-1] * k
    # k = 1 with explicit draft probabilities: accept exactly when u < p(d) / q(d)
    q = torch.softmax(torch.randn(B, 1, V, generator=torch.Generator().manual_seed(3)), -1)
    ratio = (p[:, 0].gather(1, draft[:, :1]) / q[:, 0].double().gather(1, draft[:, :1]))[:, 0]
    u1 = torch.stack([torch.clamp(ratio - 1e-3, 0, 0.9999).float(), torch.full((B,), 0.5)], 1)
    acc, _ = ops.mtp_verify(draft[:, :1], lg[:, :2], q, T, 1.0, u1)
    assert acc.tolist() == [1] * B
    assert ratio.max() < 0.99
    u1[:, 0] = (ratio + 1e-3).float()
    acc, toks = ops.mtp_verify(draft[:, :1], lg[:, :2], q, T, 1.0, u1)
    assert acc.tolist() == [0] * B
    for b in range(B):                                # correction from norm(max(p - q, 0)), u = 0.5
        assert int(toks[b, 0]) == _inverse_cdf((p[b, 0] - q[b, 0].double()).clamp(min=0), 0.5)
    with pytest.raises(ValueError, match="uniforms"):
        ops.mtp_verify(draft, lg, None, T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_top_p_rejects_filtered_draft(backend):
    ops = _backend(backend)
    lg = torch.tensor([[[4.0, 3.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]]])      # k = 1, V = 4
    u = torch.tensor([[0.0, 0.3]])
    acc, toks = ops.mtp_verify(torch.tensor([[3]]), lg, None, 1.0, 0.5, u)    # token 3 is outside the nucleus
    assert acc.tolist() == [0] and int(toks[0, 0]) == 0                        # nucleus {0}: only token 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_first_token_follows_target(backend):
    """Drafts drawn from q, verified with q: the first emitted token is distributed as p (chi-square)."""
    ops = _backend(backend)
    V, N, T = 5, 4000, 1.0
    g = torch.Generator().manual_seed(0)
    lg = torch.tensor([1.5, 0.2, -0.5, 1.0, 0.0]).expand(N, 2, V).clone()
    q = torch.softmax(torch.tensor([0.0, 1.5, 0.5, -1.0, 0.3]), -1).expand(N, 1, V).clone()
    draft = torch.multinomial(q[:, 0], 1, generator=g)                       # [N, 1] drawn from q
    acc, toks = ops.mtp_verify(draft, lg, q, T, 1.0, torch.rand(N, 2, generator=g))
    p = torch.softmax(lg[0, 0].double() / T, -1)
    counts = torch.bincount(toks[:, 0], minlength=V).double()
    stat = float(((counts - N * p) ** 2 / (N * p)).sum())
    assert _chi2_sf(stat, V - 1) > ALPHA, f"chi2 {stat:.1f}"
    # the draft alone (no verification) is far from p: the statistic has power here
    qc = torch.bincount(draft[:, 0], minlength=V).double()
    assert _chi2_sf(float(((qc - N * p) ** 2 / (N * p)).sum()), V - 1) < ALPHA
    expected_accept = float(torch.minimum(p, q[0, 0].double()).sum())        # sum_x min(p, q)
    assert abs(acc.double().mean().item() - expected_accept) < 4 * math.sqrt(0.25 / N)


# ---- errors and the command line -------------------------------------------------------------------

def test_speculative_errors(ckpt, tmp_path):
    model = _model(ckpt, "cpu_ref")
    with pytest.raises(ValueError, match="positive integer number of draft tokens"):
        model.generate([[1, 2]], max_new_tokens=4, speculative=-1)
    no_mtp = GLM52(make_tiny_checkpoint(tmp_path / "nomtp", layers=2), backend="cpu_ref", progress=False)
    with pytest.raises(ValueError, match="needs the MTP layer"):
        no_mtp.generate([[1, 2]], max_new_tokens=4, speculative=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1, 2]], max_new_tokens=4, speculative=2, temperature=1.0, top_p=0.0)


def test_cli_generate_speculative_prints_acceptance_and_speeds(ckpt, capsys):
    from glm52_backends.cli import main
    rc = main(["generate", ckpt, "--backend", "cpu_ref", "--speculative", "2", "--batch", "2",
               "--max-new-tokens", "6", "--ignore-eos", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mean acceptance length" in out
    assert "without speculation" in out and "with speculation (k=2)" in out
    assert "same tokens as plain greedy: yes" in out


# ---- adaptive draft length -------------------------------------------------------------------------

class DraftRule:
    """Watches a model's steps during speculative decoding (wraps `model.run` and `model.run_mtp`)
    and checks the drafting rule from those calls alone.

    Per request and round: the catch-up MTP step gives the logits that propose d_1; each later MTP
    step of the round feeds the previous draft d_j, which adaptive drafting allows only when
    q(d_j) > threshold and j < cap = min(k, context - 1 - n, left - 1), left being the new tokens the
    request may still emit (`max_new_tokens` less those emitted, bounded by the context: a round emits
    at most its drafts + 1, so a request with one token left drafts none), q being the distribution of
    the logits that proposed d_j: softmax at temperature 1 under greedy, the sampling distribution
    (temperature, top-p) otherwise; the verify step feeds [seq[n], d_1..d_m], whose last draft must be
    at the cap or have q(d_m) <= threshold (threshold None: fixed k, every round drafts the cap).
    Records the drafts of each round per request (`rounds`) and every proposed draft's probability
    (`probs`)."""

    def __init__(self, model, k: int, threshold: float | None, eps: float = 1e-6, temperature: float = 0.0,
                 top_p: float = 1.0, *, max_new_tokens: int):
        self.model, self.k, self.thr, self.eps = model, k, threshold, eps
        self.temperature, self.top_p = temperature, top_p
        self.C = model.cfg.max_position_embeddings
        self.max_new = max_new_tokens
        self.plen: dict[int, int] = {}                  # prompt length of each request (its prefill chunks)
        self.state: dict[int, str] = {}
        self.latest: dict[int, torch.Tensor] = {}
        self.fed: dict[int, list[int]] = {}
        self.rounds: dict[int, list[int]] = {}
        self.probs: list[float] = []

    def _prob(self, i: int, d: int) -> float:
        if self.temperature == 0.0:
            return float(torch.softmax(self.latest[i].float(), -1)[d])
        return float(probs_from_logits(self.latest[i][None], self.temperature, self.top_p)[0, d])

    def cap(self, i: int, n: int) -> int:
        """Drafts request i may propose with n tokens in its target cache."""
        left = min(self.max_new, self.C - self.plen[i]) - (n - self.plen[i] + 1)
        return max(0, min(self.k, self.C - 1 - n, left - 1))

    def __enter__(self):
        m = self.model
        run, run_mtp = m.run, m.run_mtp

        def spy_run(cache, chunks):
            n = {i: cache.lens.get(i, 0) for i in chunks}
            out = run(cache, chunks)
            for i, toks in chunks.items():
                if self.state.get(i, "prefill") == "prefill":                  # a prefill chunk
                    self.plen[i] = self.plen.get(i, 0) + len(toks)
                    self.state[i] = "prefill"
                    continue
                if self.state.get(i) == "drafting":                            # a verify step
                    drafts, cap = [int(t) for t in toks[1:]], self.cap(i, n[i])
                    assert min(1, cap) <= len(drafts) <= cap, (i, drafts, cap)
                    if not drafts:                                             # one token left: a plain step
                        self.rounds.setdefault(i, []).append(0)
                        self.state[i] = "catch-up"
                        continue
                    assert drafts[:-1] == self.fed[i], "the verified drafts are the ones the MTP steps fed"
                    p = self._prob(i, drafts[-1])
                    self.probs.append(p)
                    if self.thr is None:
                        assert len(drafts) == cap, (i, drafts, cap)
                    else:
                        assert len(drafts) == cap or p <= self.thr + self.eps, (i, drafts, p, self.thr)
                    self.rounds.setdefault(i, []).append(len(drafts))
                self.state[i] = "catch-up"
            return out

        def spy_mtp(cache, chunks, hidden, shared_idx=None):
            out = run_mtp(cache, chunks, hidden, shared_idx)
            row = 0
            for (_, i), toks in chunks.items():
                row += len(toks)
                if self.state.get(i) == "drafting":                            # a draft step feeding d_j
                    assert len(toks) == 1
                    d, p = int(toks[0]), self._prob(i, int(toks[0]))
                    self.probs.append(p)
                    self.fed[i].append(d)
                    assert len(self.fed[i]) < self.cap(i, cache.lens[i]), "drafted past the cap"
                    if self.thr is not None:
                        assert p > self.thr - self.eps, f"request {i} drafted on after a draft of probability {p}"
                else:                                                          # the catch-up: a new round
                    self.fed[i] = []
                self.state[i] = "drafting"
                self.latest[i] = out[2][row - 1]
            return out

        m.run, m.run_mtp = spy_run, spy_mtp
        return self

    def __exit__(self, *exc):
        del self.model.run, self.model.run_mtp


def _between(values: list[float], q: float) -> float:
    """A threshold between two distinct observed values, about at quantile q (never equal to one)."""
    v = sorted(set(values))
    j = min(max(int(q * len(v)), 0), len(v) - 2)
    return (v[j] + v[j + 1]) / 2


def _mixed_round(drafted: dict[int, list[int]]) -> bool:
    """Whether some step had requests proposing different numbers of drafts (every request takes
    part in every step until it finishes, so round r of each is step r)."""
    steps = max(map(len, drafted.values()))
    return any(len({v[r] for v in drafted.values() if len(v) > r}) > 1 for r in range(steps))


def _stats_agree(res, dec):
    acc = [a for v in dec.accepted.values() for a in v]
    drafted = [k for v in dec.drafted.values() for k in v]
    assert res.stats["mean_drafted_tokens"] == pytest.approx(sum(drafted) / len(drafted))
    assert res.stats["mean_accepted_drafts"] == pytest.approx(sum(acc) / len(acc))
    assert res.stats["mean_acceptance_length"] == pytest.approx(1 + sum(acc) / len(acc))
    assert res.stats["draft_acceptance_rate"] == pytest.approx(sum(acc) / sum(drafted))
    assert all(0 <= a <= k for va, vk in zip(dec.accepted.values(), dec.drafted.values()) for a, k in zip(va, vk))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_greedy_equals_plain_for_every_threshold(ckpt, backend):
    """Requests of 5, 13 and 22 tokens, k = 4, drafts partly right (so drafts are accepted), adaptive
    thresholds 0, two in the range of the drafts' probabilities, 1 (other backends than cpu_ref: one
    of those two, where their mtp_verify sees groups of different k in one step): plain greedy's
    tokens each time, the drafting rule holds at every step, and the drafts per round follow the
    threshold."""
    model = _model(ckpt, backend)
    V, k = model.cfg.vocab_size, 4
    prompts = _prompts(V)
    plain = _plain(model, backend, prompts)
    drafts = MixedDrafts([p + o for p, o in zip(prompts, plain)], [0.9, 0.5, None], V, seed=7)

    def run(threshold, adaptive=True):
        with DraftRule(model, k, threshold, max_new_tokens=NEW_TOKENS) as rule:
            res, dec = speculative(model, prompts, max_new_tokens=NEW_TOKENS, k=k, stop_at_eos=False,
                                            draft_filter=drafts, adaptive=adaptive,
                                            draft_threshold=threshold)
        assert res.tokens == plain, threshold
        assert rule.rounds == dec.drafted                      # what the model saw = what the decoder reports
        _stats_agree(res, dec)
        assert res.stats["adaptive"] is adaptive and res.stats["draft_threshold"] == threshold
        return res, dec, rule

    fixed, fdec, frule = run(None, adaptive=False)
    # fixed k: every round drafts its cap (DraftRule checks it), k until the last tokens of a request
    assert max(n for v in fdec.drafted.values() for n in v) == k and fixed.stats["mean_drafted_tokens"] > k - 1
    lo, hi = _between(frule.probs, 0.3), _between(frule.probs, 0.7)
    assert 0.0 < lo < hi < 1.0
    if backend != "cpu_ref":
        res, dec, _ = run(lo)
        assert _mixed_round(dec.drafted) and 1.0 < res.stats["mean_drafted_tokens"] < k
        return
    means = []
    for t in (0.0, lo, hi, 1.0):
        res, dec, rule = run(t)
        means.append(res.stats["mean_drafted_tokens"])
        counts = {n for v in dec.drafted.values() for n in v}
        if t == 0.0:                                            # never stops early: exactly fixed k
            assert dec.drafted == fdec.drafted and dec.accepted == fdec.accepted
        elif t == 1.0:                                          # always stops after d_1 (none with one token left)
            assert 1 in counts and counts <= {0, 1} and res.stats["mean_acceptance_length"] <= 2.0
        else:                                                   # rounds of different lengths, within a step too
            assert len(counts) >= 2 and 1.0 < means[-1] < k, (t, counts)
            assert _mixed_round(dec.drafted)
            assert max(a for v in dec.accepted.values() for a in v) >= (2 if t == lo else 1)
    assert means[0] == fixed.stats["mean_drafted_tokens"] and means[-1] <= 1.0
    assert means == sorted(means, reverse=True) and means[1] > means[2], means


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A context of 24 tokens: generation runs into the context's end."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ctx24"), layers=2, seed=8, index_topk=4, mtp=True,
                                max_position_embeddings=24)
    return GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)


def test_adaptive_greedy_up_to_the_context_end(short_model):
    """Near the end of the context a request drafts at most context - 1 - n tokens, adaptive or
    not; requests capped there and requests drafting more share the same verify step."""
    model, k = short_model, 4
    V = model.cfg.vocab_size
    prompts = [[5] * 10, list(range(1, 20)), [7, 3, 9]]                      # 14, 5 and 21 tokens of room
    plain = model.generate(prompts, max_new_tokens=100, stop_at_eos=False)
    assert plain.finish_reasons == ["context"] * 3
    drafts = MixedDrafts([p + o for p, o in zip(prompts, plain.tokens)], [0.9, 0.9, 0.7], V, seed=3)
    probs, capped_in_mixed_round = [], False
    for t in (0.0, "mid", 1.0):
        if t == "mid":
            t = _between(probs, 0.5)
        with DraftRule(model, k, t, max_new_tokens=100) as rule:
            res, dec = speculative(model, prompts, max_new_tokens=100, k=k, stop_at_eos=False,
                                            draft_filter=drafts, adaptive=True, draft_threshold=t)
        probs += rule.probs
        assert res.tokens == plain.tokens and res.finish_reasons == ["context"] * 3, t
        assert rule.rounds == dec.drafted
        _stats_agree(res, dec)
        if t == 0.0:                                  # the cap binds: fewer than k drafts in some rounds
            assert {n for v in dec.drafted.values() for n in v} - {k}
            capped_in_mixed_round = _mixed_round(dec.drafted)
    assert capped_in_mixed_round


@pytest.mark.parametrize("temperature,top_p,threshold", [(1.0, 1.0, 0.4), (0.8, 0.9, 0.5)])
def test_adaptive_sampling_preserves_target_distribution(small_vocab, temperature, top_p, threshold):
    """Sampling with adaptive drafting (k = 3; thresholds where rounds of 1, 2 and 3 drafts all
    occur): the drafting rule holds with the sampling distribution's probabilities, and the joint
    distribution of the first three new tokens is the target's (chi-square)."""
    model, N, n, k = small_vocab, 1000, 3, 3
    prompt = [1, 3, 0, 2, 2, 1]
    new = n + k - 1                 # so that a round can draft all k (one with b tokens left drafts <= b - 1)
    with DraftRule(model, k, threshold, temperature=temperature, top_p=top_p, max_new_tokens=new) as rule:
        res, dec = speculative(model, [prompt] * N, max_new_tokens=new, k=k, temperature=temperature,
                                        top_p=top_p, seed=12, stop_at_eos=False, adaptive=True,
                                        draft_threshold=threshold)
    assert rule.rounds == dec.drafted
    drafted = [d for v in dec.drafted.values() for d in v]
    assert {1, 2, 3} <= set(drafted), sorted(set(drafted))
    assert 1.0 < res.stats["mean_drafted_tokens"] < k
    _stats_agree(res, dec)
    joint = _target_joint(model, prompt, n, temperature, top_p)
    counts: dict[tuple, int] = {}
    for t in res.tokens:
        counts[tuple(t[:n])] = counts.get(tuple(t[:n]), 0) + 1
    assert sum(c for cell, c in counts.items() if joint[cell] == 0.0) == 0
    stat, df = _chi2(counts, joint, N)
    assert _chi2_sf(stat, df) > ALPHA, f"chi2 = {stat:.1f} on {df} df"
    assert 0 in {a for v in dec.accepted.values() for a in v}
    if top_p == 1.0:                                    # power: a nearby wrong target is rejected
        assert _chi2_sf(*_chi2(counts, _target_joint(model, prompt, n, temperature * 1.6, top_p), N)) < ALPHA


@pytest.mark.parametrize("kw, fragment", [
    (dict(speculative=2, adaptive=1), "adaptive must be True or False, got 1"),
    (dict(speculative=2, adaptive="yes"), "adaptive must be True or False"),
    (dict(adaptive=True), "adaptive=True needs speculative=k > 0"),
    (dict(speculative=2, draft_threshold=0.5), "draft_threshold=0.5 is used only with adaptive=True"),
    (dict(speculative=2, adaptive=True, draft_threshold=1.5), "draft_threshold must be a probability in [0, 1]"),
    (dict(speculative=2, adaptive=True, draft_threshold=-0.1), "draft_threshold must be a probability in [0, 1]"),
    (dict(speculative=2, adaptive=True, draft_threshold=float("nan")), "draft_threshold must be a probability"),
    (dict(speculative=2, adaptive=True, draft_threshold=True), "draft_threshold must be a probability"),
    (dict(speculative=2, adaptive=True, draft_threshold="0.5"), "draft_threshold must be a probability"),
])
def test_adaptive_arguments_are_checked(ckpt, kw, fragment):
    model = _model(ckpt, "cpu_ref")
    with pytest.raises(ValueError, match=re.escape(fragment)):
        model.generate([[1, 2]], max_new_tokens=2, **kw)


def test_adaptive_default_threshold_and_decoder_check(ckpt):
    model = _model(ckpt, "cpu_ref")
    out = model.generate([[1, 2, 3]], max_new_tokens=3, speculative=2, adaptive=True, stop_at_eos=False)
    assert out.stats["adaptive"] is True and out.stats["draft_threshold"] == DEFAULT_DRAFT_THRESHOLD
    fixed = model.generate([[1, 2, 3]], max_new_tokens=3, speculative=2, stop_at_eos=False)
    assert fixed.stats["adaptive"] is False and fixed.stats["draft_threshold"] is None
    assert out.tokens == fixed.tokens
    with pytest.raises(ValueError, match=re.escape("draft_threshold must be a probability in [0, 1]")):
        Engine(model, speculative=2, cache_tokens=64, draft_threshold=2)


def test_cli_generate_adaptive(ckpt, capsys):
    from glm52_backends.cli import main
    rc = main(["generate", ckpt, "--backend", "cpu_ref", "--speculative", "2", "--adaptive", "--draft-threshold",
               "0", "--batch", "2", "--max-new-tokens", "6", "--ignore-eos", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "with speculation (k=2, adaptive p>0)" in out
    assert "same tokens as plain greedy: yes" in out
    assert main(["generate", ckpt, "--backend", "cpu_ref", "--speculative", "2", "--batch", "2", "--max-new-tokens",
                 "6", "--ignore-eos", "--quiet"]) == 0
    fixed = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("drafts per verify step:")]
    assert line and line == [x for x in fixed.splitlines() if x.startswith("drafts per verify step:")]   # threshold 0:
    # never stops early, the drafts of fixed k (which drafts fewer only for a request's last tokens)
    assert main(["generate", ckpt, "--backend", "cpu_ref", "--adaptive", "--quiet"]) == 2
    assert "--adaptive needs --speculative K > 0" in capsys.readouterr().err
    assert main(["generate", ckpt, "--speculative", "2", "--draft-threshold", "0.3", "--quiet"]) == 2
    assert "--draft-threshold is used only with --adaptive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", ckpt, "--speculative", "2", "--adaptive", "--draft-threshold", "1.5"])
    assert e.value.code == 2 and "--draft-threshold" in capsys.readouterr().err
