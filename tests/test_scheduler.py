"""The continuous-batching engine (engine/scheduler.py) and the prefix sharing of the paged cache.

Greedy output through the engine is compared token for token with `GLM52.generate` on the shipped
default model (trained: its greedy continuations are far from ties), whatever the batch, the step
budget, preemptions, prefix hits or MTP speculation.
"""

from __future__ import annotations

import pytest

from glm52_backends import GLM52, default_checkpoint
from glm52_backends.cache import CacheExhausted, PagedCache
from glm52_backends.loader import load_config
from glm52_backends.engine.scheduler import Engine, ParamError, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["def __init__(self", "import ", "class Foo:", "    def ", "for i in range(10):\n", "x = "]


@pytest.fixture(scope="module")
def model():
    return GLM52(default_checkpoint(), backend="torch", progress=False)


@pytest.fixture(scope="module")
def prompts(model):
    return [model.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """Plain greedy generation of every prompt, 24 new tokens."""
    return model.generate(prompts, max_new_tokens=24).tokens


LONG = '''class Cache:
    """A small cache of computed values, keyed by name."""

    def __init__(self, size=16):
        self.size = size
        self.data = {}
        self.order = []

    def get(self, key, default=None):
        if key in self.data:
            self.order.remove(key)
            self.order.append(key)
            return self.data[key]
        return default

    def put(self, key, value):
        if key not in self.data and len(self.data) >= self.size:
            del self.data[self.order.pop(0)]
        self.data[key] = value
        self.order.append(key)
'''


@pytest.fixture(scope="module")
def long_prompt(model):
    ids = model.tokenizer.encode(LONG)
    assert len(ids) > 100                                # many full blocks of 16
    return ids


def _run(engine: Engine, prompts, params) -> list[list[int]]:
    return [o["token_ids"] for o in engine.generate(prompts, params)]


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=8), dict(max_num_seqs=2)],
                         ids=["one-step-prefill", "budget-8", "two-at-a-time"])
def test_greedy_equals_generate(model, prompts, reference, kw):
    e = Engine(model, **kw)
    assert _run(e, prompts, SamplingParams(max_tokens=24)) == reference
    assert e.cache.used_blocks == 0 and not e.has_unfinished()


def test_speculative_greedy_equals_plain(model, prompts, reference):
    e = Engine(model, speculative=3, max_num_batched_tokens=16)
    assert _run(e, prompts, SamplingParams(max_tokens=24)) == reference
    m = e.metrics()
    assert m["verify_rounds"] > 0 and m["accepted_tokens"] > 0 and 1.0 < m["mean_acceptance_length"] <= 4.0
    # per request: plain decoding beside speculative requests in the same steps
    mixed = [SamplingParams(max_tokens=24, speculative=i % 2 * 2) for i in range(len(prompts))]
    assert _run(Engine(model, speculative=2), prompts, mixed) == reference


def test_preemption_resumes_where_it_stopped(model, prompts):
    ref = model.generate(prompts, max_new_tokens=40).tokens
    for kw in (dict(cache_tokens=96), dict(cache_tokens=64, max_num_batched_tokens=4),
               dict(cache_tokens=128, speculative=2)):
        e = Engine(model, **kw)
        assert _run(e, prompts, SamplingParams(max_tokens=40)) == ref, kw
        assert e.stats["preemptions"] > 0, kw            # the cache was too small for all at once
        assert e.cache.used_blocks == 0


def test_abort_frees_blocks_at_once(model, prompts, reference):
    e = Engine(model, max_num_seqs=2)
    ids = [e.add_request(p, SamplingParams(max_tokens=24)) for p in prompts]
    got = {o.request_id: list(o.token_ids) for o in e.step()}      # two running, four waiting
    assert e.num_running == 2 and e.num_waiting == 4
    held = e.cache.used_blocks
    assert held > 0
    assert e.abort(ids[0]) and e.abort(ids[5])           # one running, one waiting
    assert e.cache.used_blocks < held and e.num_running == 1 and e.num_waiting == 3
    assert not e.abort(ids[0]) and not e.abort("never added")
    while e.has_unfinished():
        for o in e.step():
            assert o.request_id not in (ids[0], ids[5])
            got.setdefault(o.request_id, []).extend(o.token_ids)
    assert [got[i] for i in ids[1:5]] == reference[1:5]  # the others as if alone
    assert e.cache.used_blocks == 0 and e.stats["aborted"] == 2


def test_steps_mix_decode_and_prefill_within_budget(model, prompts, long_prompt):
    e = Engine(model, max_num_batched_tokens=8)
    a = e.add_request(prompts[0], SamplingParams(max_tokens=60, ignore_eos=True))
    while e.requests[a].n_out == 0:
        e.step()
    b = e.add_request(long_prompt, SamplingParams(max_tokens=2))
    req_b = e.requests[b]
    mixed = 0
    while req_b.n_out == 0:
        before = req_b.computed
        outs = e.step()
        assert e.last_step_tokens <= 8
        if any(o.request_id == a and o.token_ids for o in outs) and 0 < req_b.computed - before:
            mixed += 1                                   # a decoded while b prefilled a chunk of 7
            assert req_b.computed - before == min(7, len(long_prompt) - before)
    assert mixed == -(-len(long_prompt) // 7)            # every chunk of b's prompt ran beside a's decode
    got = list(e.requests[a].ids[len(prompts[0]):])
    while e.has_unfinished():
        for o in e.step():
            got += o.token_ids if o.request_id == a else []
    assert got == model.generate([prompts[0]], max_new_tokens=60, stop_at_eos=False).tokens[0]


def test_sampling_per_request_seed(model, prompts):
    sp = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    together = _run(Engine(model), prompts, sp)
    alone = _run(Engine(model), prompts[2:3], sp)
    assert together[2] == alone[0]                       # the same draws whatever runs beside it
    other = _run(Engine(model), prompts[2:3], SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=8))
    greedy = _run(Engine(model), prompts[2:3], SamplingParams(max_tokens=16))
    assert other != alone or greedy != alone             # seeds matter; sampling is not greedy
    spec = _run(Engine(model, speculative=2), prompts, sp)
    assert all(len(t) == 16 for t in spec)


def test_stop_strings_and_ids(model, prompts, reference):
    e = Engine(model)
    text = model.tokenizer.decode(reference[0])
    stop = text[8:12]
    out = e.generate([prompts[0]], SamplingParams(max_tokens=24, stop=[stop]))[0]
    assert out["finish_reason"] == "stop" and out["text"] == text[:text.index(stop)]
    out = e.generate([prompts[0]], SamplingParams(max_tokens=24, stop_token_ids=[reference[0][5]]))[0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == reference[0][:reference[0].index(reference[0][5]) + 1]
    out = e.generate([prompts[0]], SamplingParams(max_tokens=24))[0]
    assert out["finish_reason"] == "length" and out["text"] == text


@pytest.mark.parametrize("field,kw", [("max_tokens", dict(max_tokens=-5)), ("temperature", dict(temperature=-1.0)),
                                      ("top_p", dict(top_p=0.0)), ("stop_token_ids", dict(stop_token_ids=[99999])),
                                      ("stop", dict(stop=[""])), ("speculative", dict(speculative=3))])
def test_bad_params_name_the_field(model, prompts, field, kw):
    e = Engine(model)
    with pytest.raises(ParamError) as info:
        e.add_request(prompts[0], SamplingParams(**kw))
    assert info.value.param == field and field in str(info.value)
    with pytest.raises(ParamError, match="prompt"):
        e.add_request([], SamplingParams())
    assert not e.has_unfinished()


def test_static_batching_admits_only_into_an_empty_batch(model, prompts, reference):
    e = Engine(model, static_batching=True)
    a = e.add_request(prompts[0], SamplingParams(max_tokens=24))
    got = {a: [t for o in e.step() for t in o.token_ids]}
    b = e.add_request(prompts[1], SamplingParams(max_tokens=24))
    got[b] = []
    while e.requests.get(a) is not None:
        assert e.num_waiting == 1                        # b waits for a's batch to end
        for o in e.step():
            got[o.request_id] += o.token_ids
    while e.has_unfinished():
        for o in e.step():
            got[o.request_id] += o.token_ids
    assert [got[a], got[b]] == reference[:2]


# ---- prefix caching -------------------------------------------------------------------------------------
def test_prefix_hits_share_blocks_and_give_the_same_tokens(model, long_prompt):
    tails = [model.tokenizer.encode(t) for t in ("\nx = 1", "\ndef f(")]
    ps = [long_prompt + t for t in tails]
    ref = model.generate(ps, max_new_tokens=12).tokens
    e = Engine(model)
    a = e.add_request(ps[0], SamplingParams(max_tokens=12))
    e.step()                                             # a prefilled: its full blocks published
    b = e.add_request(ps[1], SamplingParams(max_tokens=12))
    e.step()
    ra, rb = e.requests[a], e.requests[b]
    n_shared = len(long_prompt) // e.bs
    assert rb.cached_tokens == n_shared * e.bs > 0
    shared = e.cache.blocks[a][:n_shared]
    assert e.cache.blocks[b][:n_shared] == shared
    assert all(e.cache.holders(x) == 2 for x in shared)
    got = {a: list(ra.ids[len(ps[0]):]), b: list(rb.ids[len(ps[1]):])}
    while e.has_unfinished():
        for o in e.step():
            got[o.request_id] += o.token_ids
    assert [got[a], got[b]] == ref
    assert e.cache.used_blocks == 0 and e.cache.cached_blocks >= n_shared   # kept for later hits
    assert all(e.cache.holders(x) == 0 for x in shared)
    assert e.stats["prefix_hit_tokens"] == n_shared * e.bs
    off = Engine(model, prefix_caching=False)
    assert _run(off, ps, SamplingParams(max_tokens=12)) == ref and off.stats["prefix_hit_tokens"] == 0


def _tiny_cache(num_blocks=4, bs=4) -> PagedCache:
    return PagedCache(load_config(default_checkpoint()), num_blocks, bs)


def test_cache_refcounts_publish_share_release():
    c = _tiny_cache()
    c.reserve({"a": 8})                                  # blocks 0, 1
    assert c.blocks["a"] == [0, 1] and c.holders(0) == 1
    assert c.publish(0, "h0") and c.publish(1, "h1")
    assert not c.publish(0, "again") and not c.publish(1, "h1")     # each block and each hash once
    assert c.lookup(["h0", "h1", "h2"]) == [0, 1] and c.lookup(["h1"]) == [1] and c.lookup(["zz", "h0"]) == []
    c.share("b", [0, 1])
    assert c.lens["b"] == 8 and c.holders(0) == c.holders(1) == 2 and c.used_blocks == 2
    c.reserve({"b": 9})                                  # b's own token goes past the shared blocks
    assert c.blocks["b"] == [0, 1, 2]
    c.release("a")
    assert c.holders(0) == 1 and c.used_blocks == 3 and c.free_blocks == 1
    c.release("b")
    assert c.used_blocks == 0 and c.cached_blocks == 2 and c.free_blocks == 4
    assert c.lookup(["h0", "h1"]) == [0, 1]              # unheld but still findable
    c.reserve({"x": 1})
    with pytest.raises(ValueError, match="already holds"):
        c.share("x", [0])                                # a prefix hit starts a request
    c.release("x")
    with pytest.raises(ValueError, match="not published"):
        c.share("y", [3])


def test_cache_evicts_least_recently_used_published_blocks():
    c = _tiny_cache()
    c.reserve({"a": 4, "b": 4})                          # a: block 0, b: block 1
    c.publish(c.blocks["a"][0], "A")
    c.publish(c.blocks["b"][0], "B")
    c.release("a")
    c.release("b")                                       # LRU order: A, then B
    c.share("c", c.lookup(["B"]))                        # B held again: not evictable
    c.release("c")                                       # now A, B in use order (B most recent)
    c.reserve({"d": 12})                                 # 2 free blocks + 1 eviction: A goes first
    assert c.evictions == 1 and c.lookup(["A"]) == [] and c.lookup(["B"]) != []
    with pytest.raises(CacheExhausted):
        c.reserve({"e": 8})                              # B alone is left: one block
    assert c.lookup(["B"]) != [] and "e" not in c.blocks  # all or nothing: nothing evicted
    c.reserve({"e": 4})
    assert c.lookup(["B"]) == [] and c.evictions == 2


def test_cache_rollback_with_shared_blocks():
    c = _tiny_cache(num_blocks=6)
    c.reserve({"a": 8})
    c.publish(0, "h0")
    c.share("b", [0])
    free_before = list(c._free)
    with pytest.raises(RuntimeError):
        with c.transaction():
            c.reserve({"b": 10, "a": 12})
            raise RuntimeError("a step failing part-way")
    assert c.blocks == {"a": [0, 1], "b": [0]} and c.lens == {"a": 8, "b": 4} and c._free == free_before
    assert c.holders(0) == 2
    c.truncate("b", 0)                                   # drops its hold on the shared block
    assert c.holders(0) == 1 and c.blocks["b"] == []


def test_engine_refuses_what_its_cache_or_budget_cannot_hold(model, long_prompt):
    e = Engine(model, cache_tokens=64)
    with pytest.raises(ParamError, match="cache blocks") as info:
        e.add_request(long_prompt, SamplingParams())
    assert info.value.param == "prompt"
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(model, speculative=4, max_num_batched_tokens=4)


@pytest.mark.parametrize("graph", [False, "trace"])
def test_a_prompt_that_fills_the_cache_exactly_is_served(model, long_prompt, graph):
    """An eager engine's cache has no null block: a prompt whose prompt + 1 tokens fill every block is
    served, one token more is refused (it used to lose a block to a null block only graphs keep)."""
    e = Engine(model, cache_tokens=64, graph=graph, max_num_seqs=1)
    assert e.cache_capacity == 64
    fits = long_prompt[:63]
    out = e.generate([fits], SamplingParams(max_tokens=1, ignore_eos=True))
    assert len(out[0]["token_ids"]) == 1
    with pytest.raises(ParamError, match="need 5 cache blocks of 16 tokens, the engine's cache has 4"):
        e.add_request(long_prompt[:64], SamplingParams(max_tokens=1))


# ---- captured graphs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(speculative=3, max_num_batched_tokens=16)], ids=["decode", "mtp-k3"])
def test_graph_steps_equal_eager(model, prompts, reference, kw):
    """graph="trace" (the CPU's capture, engine/graph.py): plain decode steps, and under MTP the verify
    steps and the draft steps, replay their batch bucket's graph over the engine's cache; the greedy
    tokens are eager generate's. Prefill chunks and mixed steps stay eager."""
    e = Engine(model, graph="trace", **kw)
    assert e.graph_mode == "trace" and set(e.graphs) == ({"decode", "verify", "mtp"} if kw else {"decode"})
    assert _run(e, prompts, SamplingParams(max_tokens=24)) == reference
    assert 0 < e.stats["graph_steps"] < e.stats["steps"]           # the prefill step ran eagerly
    used = "verify" if kw else "decode"
    assert e.graphs[used].stats()["graph_buckets"] and not e.graphs[used].stats()["eager_buckets"]
    if kw:
        assert e.graphs["mtp"].stats()["graph_buckets"] and e.metrics()["accepted_tokens"] > 0
    assert e.cache.used_blocks == 0
    eager = Engine(model)                                          # auto on a CPU: eager
    assert eager.graph_mode is None and not eager.graphs and "eager" in eager.graph_why


def test_one_process_engine_leads_and_has_no_followers(model):
    e = Engine(model)
    assert e.leads and e.lockstep is None
    e.keepalive(0.0)
    e.close()                                                      # no-ops in one process
    with pytest.raises(RuntimeError, match="only the ranks of a tp group other than its first follow"):
        e.follow()


# ---- log-probabilities ------------------------------------------------------------------------------------
def _teacher_logprobs(model, prompt, out):
    """float64 log_softmax of the model's own logits over prompt + the generated tokens, at each new token."""
    import torch
    lp = torch.log_softmax(model([prompt + out])[0].double(), -1)
    return lp[len(prompt) - 1:len(prompt) - 1 + len(out)]


@pytest.mark.parametrize("kw", [dict(), dict(speculative=3), dict(graph="trace"),
                                dict(speculative=2, graph="trace")], ids=["plain", "mtp3", "graph", "mtp2-graph"])
def test_logprobs_are_the_models_log_softmax_at_each_token(model, prompts, kw):
    """Each new token's log-probability and its 4 alternatives are log_softmax of the raw logits at its
    position (teacher-forced over the generated sequence), however the token was produced: plain
    decoding, MTP verify rounds (several tokens per round), captured graphs; greedy, so the token is
    the best alternative. Every token of the output has one, also where a round overshoots the budget."""
    e = Engine(model, **kw)
    params = [SamplingParams(max_tokens=n, logprobs=4, ignore_eos=True) for n in (9, 13, 7)]
    outs = e.generate(prompts[:3], params)
    for p, o in zip(prompts, outs):
        lps = o["logprobs"]
        assert [x.token for x in lps] == o["token_ids"] and len(lps) == len(o["token_ids"]) > 0
        want = _teacher_logprobs(model, p, o["token_ids"])
        for i, x in enumerate(lps):
            assert abs(x.logprob - float(want[i, x.token])) < 1e-4
            assert len(x.top) == 4 and x.top[0][0] == x.token and x.top[0][1] == x.logprob
            assert [v for _, v in x.top] == sorted((v for _, v in x.top), reverse=True)
            assert len({t for t, _ in x.top}) == 4
            for t, v in x.top:
                assert abs(v - float(want[i, t])) < 1e-4
            assert abs(x.top[-1][1] - float(want[i].topk(4).values[-1])) < 1e-4     # the best 4, not any 4


def test_sampled_tokens_get_the_raw_log_probability_and_asking_is_optional(model, prompts):
    """At temperature 0.9 and top-p 0.8 the log-probability is the raw distribution's (before temperature and
    top-p), at the token actually drawn; logprobs=0 gives the token's own only; not asking gives None; the
    tokens are the same whether or not log-probabilities are asked for."""
    e = Engine(model, speculative=2)
    base = dict(max_tokens=8, temperature=0.9, top_p=0.8, seed=11, ignore_eos=True)
    with_lp, zero, without = e.generate([prompts[0]] * 3, [SamplingParams(**base, logprobs=2),
                                                           SamplingParams(**base, logprobs=0), SamplingParams(**base)])
    assert with_lp["token_ids"] == zero["token_ids"] == without["token_ids"]
    assert "logprobs" not in without
    want = _teacher_logprobs(model, prompts[0], with_lp["token_ids"])
    for i, (x, z) in enumerate(zip(with_lp["logprobs"], zero["logprobs"])):
        assert abs(x.logprob - float(want[i, x.token])) < 1e-4 and z.top == () and abs(z.logprob - x.logprob) < 1e-5
        assert len(x.top) == 2 and abs(x.top[0][1] - float(want[i].max())) < 1e-4


@pytest.mark.parametrize("bad", [21, -1, True, 2.0, "3"])
def test_logprobs_out_of_range_is_refused_naming_the_field(model, prompts, bad):
    with pytest.raises(ParamError, match="logprobs must be an integer in \\[0, 20\\]") as info:
        Engine(model).add_request(prompts[0], SamplingParams(logprobs=bad))
    assert info.value.param == "logprobs"


# ---- penalties ---------------------------------------------------------------------------------------------
def _penalized_greedy(model, prompt, n, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy decoding with the penalties written out (float64, a full forward per token)."""
    import torch
    ids = list(prompt)
    V = model.cfg.vocab_size
    for _ in range(n):
        x = model([ids])[0][-1].double()
        out = torch.tensor(ids[len(prompt):], dtype=torch.long)
        counts = torch.bincount(out, minlength=V).double()
        seen = torch.zeros(V, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
        x = x - frequency * counts - presence * (counts > 0).double()
        ids.append(int(x.argmax()))
    return ids[len(prompt):]


PENALTIES = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0, frequency_penalty=-0.5),
             dict(repetition_penalty=1.8)]


@pytest.mark.parametrize("kw", [dict(), dict(speculative=3), dict(speculative=2, graph="trace")],
                         ids=["plain", "mtp3", "mtp2-graph"])
def test_penalized_greedy_tokens_are_the_written_out_rule(model, prompts, kw):
    """Presence, frequency and repetition penalties: the engine's greedy tokens are the rule's, computed
    here with a full forward per token; under MTP the verified positions are penalized as if the drafts
    before them were accepted, so speculation gives the same tokens. The default model repeats itself
    unpenalized, so each penalty changes the output."""
    e = Engine(model, **kw)
    plain = e.generate(prompts[:3], SamplingParams(max_tokens=12, ignore_eos=True))
    for pen in PENALTIES:
        outs = e.generate(prompts[:3], SamplingParams(max_tokens=12, ignore_eos=True, **pen))
        keys = {"presence_penalty": "presence", "frequency_penalty": "frequency", "repetition_penalty": "repetition"}
        want = [_penalized_greedy(model, p, 12, **{keys[k]: v for k, v in pen.items()}) for p in prompts[:3]]
        assert [o["token_ids"] for o in outs] == want, pen
        assert [o["token_ids"] for o in outs] != [o["token_ids"] for o in plain], pen


@pytest.mark.parametrize("field,bad", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("presence_penalty", True),
                                       ("repetition_penalty", 0), ("repetition_penalty", -1.0),
                                       ("frequency_penalty", "1")])
def test_penalties_out_of_range_are_refused_naming_the_field(model, prompts, field, bad):
    with pytest.raises(ParamError, match=field) as info:
        Engine(model).add_request(prompts[0], SamplingParams(**{field: bad}))
    assert info.value.param == field


@pytest.mark.parametrize("kw", [dict(), dict(prefill_chunk=5), dict(speculative=2, max_num_batched_tokens=16)],
                         ids=["whole", "chunks-of-5", "mtp2-budget16"])
def test_prompt_logprobs_are_the_models_at_each_prompt_token(model, long_prompt, prompts, kw):
    """prompt_logprobs=2: None for the first prompt token, then each prompt token's log-probability given
    the ones before it and the 2 best alternatives (teacher-forced check), in the request's first output,
    whether the prompt runs whole or in chunks; a second request with the same prompt computes it again
    (no prefix-cache hit) and gets the same values."""
    import torch
    e = Engine(model, **kw)
    p = long_prompt[:70]
    lp = torch.log_softmax(model([p])[0].double(), -1)
    first, second, other = e.generate([p, p, prompts[1]], [SamplingParams(max_tokens=2, prompt_logprobs=2)] * 2 +
                                      [SamplingParams(max_tokens=2)])
    assert "prompt_logprobs" not in other
    for out in (first, second):
        got = out["prompt_logprobs"]
        assert len(got) == len(p) and got[0] is None
        for i in range(1, len(p)):
            x = got[i]
            assert x.token == p[i] and abs(x.logprob - float(lp[i - 1, p[i]])) < 1e-4
            assert len(x.top) == 2 and abs(x.top[0][1] - float(lp[i - 1].max())) < 1e-4
    assert e.stats["prefix_hit_tokens"] == 0


def test_a_verify_chunks_penalties_count_the_drafts_before_each_position(model, prompts):
    """Engine._penalize on a verify chunk [k + 1, V]: row j is penalized with the output's counts plus drafts
    d_1..d_j (each counted once), the repetition penalty on the prompt, the output and those drafts; a
    second call sees the tokens emitted since the first."""
    import torch
    from glm52_backends.engine.scheduler import Request
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=1.3, repetition_penalty=1.6)
    prompt = prompts[0]
    req = Request("r", prompt, params, 0.0, 16, 3, g, frozenset(), ids=prompt + [5, 9, 5])
    drafts = [9, 9, 11]
    logits = torch.randn(4, V, generator=g) * 3
    e = Engine(model)

    def rule(x, out, before):
        seen = torch.zeros(V, dtype=torch.bool)
        seen[torch.tensor(prompt + out + before)] = True
        counts = torch.bincount(torch.tensor(out + before, dtype=torch.long), minlength=V).double()
        x = torch.where(seen, torch.where(x > 0, x / 1.6, x * 1.6), x)
        return x - 1.3 * counts - 0.7 * (counts > 0).double()

    got = e._penalize(logits, req, drafts)
    for j in range(4):
        assert torch.allclose(got[j].double(), rule(logits[j].double(), [5, 9, 5], drafts[:j]), atol=1e-5), j
    req.ids += [11, 2]                                              # emitted since: counted on the next call
    got = e._penalize(logits[0], req)
    assert torch.allclose(got.double(), rule(logits[0].double(), [5, 9, 5, 11, 2], []), atol=1e-5)
