"""Model-level behaviour on a tiny random checkpoint in the real format (no HF needed)."""

import pytest
import torch

from glm52_backends import GLM52
from glm52_backends.cache import CacheExhausted
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), layers=4, seed=3, index_topk=8)
    return GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)


def _prompts(seed, lengths, V):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def test_schedule_has_shared_layers(tiny):
    assert "shared" in tiny.cfg.indexer_types and tiny.cfg.indexer_types[0] == "full"


def test_chunked_prefill_and_decode_reproduce_full_forward(tiny):
    V = tiny.cfg.vocab_size
    prompts = _prompts(0, [30, 11, 1], V)                       # > 3x topk, odd, one token
    full = tiny(prompts)
    for chunk in (1, 4, 7):                                      # chunk 1 = token-by-token decode
        cache = tiny.new_cache(200)
        got = {i: [] for i in range(len(prompts))}
        done = [0] * len(prompts)
        while any(d < len(p) for d, p in zip(done, prompts)):
            step = {}
            for i, p in enumerate(prompts):
                if done[i] < len(p):
                    step[i] = p[done[i]:done[i] + chunk]
                    done[i] += len(step[i])
            for i, lg in tiny.extend(cache, step).items():
                got[i].append(lg)
        for i in range(len(prompts)):
            err = (torch.cat(got[i]) - full[i]).abs().max().item()
            assert err <= 1e-5 * full[i].abs().max().item(), f"chunk {chunk}, request {i}: {err}"


def test_generate_equals_repeated_full_forward(tiny):
    V = tiny.cfg.vocab_size
    prompts = _prompts(1, [5, 13], V)
    res = tiny.generate(prompts, max_new_tokens=12, stop_at_eos=False, prefill_chunk=4)
    for p, new in zip(prompts, res.tokens):
        seq = list(p)
        for _ in range(12):
            seq.append(int(tiny([seq])[0][-1].argmax()))
        assert new == seq[len(p):]
    assert res.stats["new_tokens"] == 24 and res.stats["backend"] == "cpu_ref"
    assert res.stats["ops"]["indexer_topk"] == "native"


def test_sampling_is_seeded(tiny):
    p = _prompts(2, [6], tiny.cfg.vocab_size)
    a = tiny.generate(p, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4, stop_at_eos=False).tokens
    b = tiny.generate(p, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4, stop_at_eos=False).tokens
    c = tiny.generate(p, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, stop_at_eos=False).tokens
    assert a == b and a != c


def test_token_id_outside_vocab(tiny):
    V = tiny.cfg.vocab_size
    with pytest.raises(ValueError, match=f"token id {V} at position 2"):
        tiny([[1, 2, V]])
    with pytest.raises(ValueError, match="token id -1"):
        tiny.generate([[1, -1]], max_new_tokens=1)


def test_context_beyond_max_position(tiny):
    cache = tiny.new_cache(64)
    old = tiny.cfg.max_position_embeddings
    tiny.cfg.max_position_embeddings = 10
    try:
        tiny.extend(cache, {"a": list(range(8))})
        with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
            tiny.extend(cache, {"a": [1, 2, 3]})
        assert cache.lens["a"] == 8                          # no partial state
    finally:
        tiny.cfg.max_position_embeddings = old


def test_cache_exhausted_leaves_no_partial_state(tiny):
    cache = tiny.new_cache(32, block_size=16)                # 2 blocks
    tiny.extend(cache, {"a": list(range(20))})               # takes both blocks
    before = {(kind, l): c.clone() for kind in ("c", "k_pe", "index_k") for l, c in getattr(cache, kind).items()}
    with pytest.raises(CacheExhausted, match="needs 2 more blocks"):
        tiny.extend(cache, {"a": list(range(13)), "b": [1]})
    assert cache.lens == {"a": 20} and cache.free_blocks == 0
    assert all(torch.equal(before[kind, l], getattr(cache, kind)[l]) for kind, l in before)
    cache.release("a")
    assert cache.free_blocks == 2


def test_bad_prompts(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        tiny([[]])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        tiny(torch.zeros(3, dtype=torch.long))
