"""Exact boundaries, where off-by-one bugs live.

  * a paged cache filled to exactly its capacity (then one token more);
  * a block table exactly full (no padding column) read by every backend that runs here;
  * top-k == 0 (the ops; the config refuses it, saying why);
  * a top-p nucleus whose mass hits the threshold exactly, in sampling and in every backend's verify;
  * the planner's usable memory pinned to the YAML, and the fits / does-not-fit boundary;
  * deployments whose ep does not divide the device count.

Error tests check the reason in the message, not only the name of the culprit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from glm52_backends import GLM52
from glm52_backends.cache import CacheExhausted, PagedCache
from glm52_backends.config import ConfigError, ModelConfig
from glm52_backends.conformance.cases import Case
from glm52_backends.conformance.inputs import Arg, Batch, CaseInputs, generator, page, randn
from glm52_backends.conformance.runner import run_case
from glm52_backends.deploy import DeploymentError, load_deployment
from glm52_backends.planner import GiB, plan
from glm52_backends.registry import get_backend
from glm52_backends.sampling import probs_from_logits, sample_from
from glm52_backends.step import StepMeta
from glm52_backends.tiny import tiny_config
from conftest import env_vars

BACKENDS = ["cpu_ref", "torch", "ascend"]
BACKEND_ENV = {"ascend": {"GLM52_ASCEND_EMULATE": "1"}}
CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


_BOUND: dict = {}


def _backend(name):
    if name not in _BOUND:
        with env_vars(BACKEND_ENV.get(name, {})):
            _BOUND[name] = get_backend(name)
    return _BOUND[name]


# ---- the paged cache at capacity ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    cfg, _ = tiny_config(layers=2, vocab_size=64, index_topk=4, index_n_heads=32)
    return GLM52(cfg, backend="cpu_ref", dtype=torch.float32, progress=False, block_size=4)


def test_cache_filled_to_exactly_its_capacity(tiny_model):
    """Three blocks of 4: prompts of 8 and 4 tokens fill them exactly; logits equal a roomy cache's.
    One token more raises CacheExhausted with the reason, leaving the cache as it was; after a
    release the same request continues correctly."""
    m = tiny_model
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 64, (9,), generator=g).tolist(), torch.randint(0, 64, (4,), generator=g).tolist()
    cache = m.new_cache(12)
    assert cache.num_blocks == 3 and cache.block_size == 4
    out = m.extend(cache, {"a": a[:8], "b": b})
    assert cache.free_blocks == 0 and cache.lens == {"a": 8, "b": 4}
    roomy = m.new_cache(64)
    want = m.extend(roomy, {"a": a[:8], "b": b})
    for r in ("a", "b"):
        assert torch.equal(out[r], want[r]), r
    before = ({r: list(v) for r, v in cache.blocks.items()}, dict(cache.lens), cache.free_blocks)
    c_before = {l: t.clone() for l, t in cache.c.items()}
    with pytest.raises(CacheExhausted) as e:
        m.extend(cache, {"a": a[8:9]})
    assert "needs 1 more blocks of 4 tokens, 0 of 3 are free" in str(e.value)
    assert ({r: list(v) for r, v in cache.blocks.items()}, dict(cache.lens), cache.free_blocks) == before
    assert all(torch.equal(cache.c[l], c_before[l]) for l in c_before)            # nothing written
    cache.release("b")
    assert cache.free_blocks == 1
    got = m.extend(cache, {"a": a[8:9]})["a"]
    assert torch.allclose(got, m([a])[0][-1:], atol=1e-5, rtol=1e-5)


def test_a_cache_of_another_dtype_on_the_same_device_is_refused(tiny_model):
    """Same layers and widths, same device, another dtype: refused naming both (a float32 model must
    not write into bfloat16 rows, nor read them back as its own)."""
    m = tiny_model
    other = GLM52(m.cfg, backend="cpu_ref", dtype=torch.bfloat16, progress=False, block_size=4)
    with pytest.raises(ValueError, match=r"cache: torch.bfloat16 on cpu, the model computes in torch.float32"):
        m.extend(other.new_cache(8), {"a": [1, 2, 3]})
    assert m.extend(m.new_cache(8), {"a": [1, 2, 3]})["a"].shape[0] == 3       # its own cache is taken


def test_numpy_prompts_are_rows_or_one_prompt(tiny_model):
    """A 2-D numpy array is a batch of prompts (its rows), a 1-D one a single prompt: the same tokens as
    the lists."""
    np = pytest.importorskip("numpy")
    m = tiny_model
    rows = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]
    want = m.generate(rows, max_new_tokens=3, stop_at_eos=False).tokens
    assert m.generate(np.array(rows), max_new_tokens=3, stop_at_eos=False).tokens == want
    assert m.generate(np.array(rows[1]), max_new_tokens=3, stop_at_eos=False).tokens == want[1:]
    # token ids as 0-d integer tensors (e.g. from iterating a tensor) are the same ids
    assert m.generate([[torch.tensor(t) for t in r] for r in rows], max_new_tokens=3, stop_at_eos=False).tokens == want


def test_generate_with_a_prompt_that_fills_the_context(tiny_model):
    """A prompt of exactly the context emits nothing ("context") beside a request that runs to its
    budget; the prefill is the step that gave the other its first token, the rest are decode steps.
    No prompts at all are refused."""
    m = tiny_model
    C = m.cfg.max_position_embeddings
    full = [i % 60 + 1 for i in range(C)]
    res = m.generate([full, [3, 1, 4]], max_new_tokens=4, stop_at_eos=False)
    assert res.tokens[0] == [] and len(res.tokens[1]) == 4 and res.finish_reasons == ["context", "length"]
    assert res.stats["decode_steps"] == 3 and res.stats["new_tokens"] == 4 and res.stats["prefill_s"] > 0
    assert res.tokens[1] == m.generate([[3, 1, 4]], max_new_tokens=4, stop_at_eos=False).tokens[0]
    with pytest.raises(ValueError, match="prompts: no prompts given"):
        m.generate([], max_new_tokens=4)


def test_cpu_with_an_index_is_the_cpu(tiny_model):
    """`device="cpu:0"` is the CPU: the model takes the caches it makes (tensors there say "cpu")."""
    m = tiny_model
    m0 = GLM52(m.cfg, backend="cpu_ref", dtype=torch.float32, progress=False, block_size=4, device="cpu:0")
    assert m0.device == torch.device("cpu")
    assert m0.generate([[3, 1, 4]], max_new_tokens=3).tokens == m.generate([[3, 1, 4]], max_new_tokens=3).tokens


def test_a_flat_list_mixing_ids_and_lists_names_the_position(tiny_model):
    with pytest.raises(ValueError, match=r"prompt 0: token id at position 1 is list \[2, 3\]"):
        tiny_model.generate([1, [2, 3]], max_new_tokens=2)


def test_a_weight_with_one_nan_scale_is_refused(tiny_model):
    """A user's quantized `Weight` whose scales hold one NaN among finite values is refused, naming it."""
    from glm52_backends.tiny import random_state_dict
    from glm52_backends.weights import quantize_weight
    cfg = tiny_model.cfg
    sd = random_state_dict(cfg, seed=0, dtype=torch.float32, include_mtp=False)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    w = quantize_weight(sd[name], "w8a8_dynamic")
    GLM52(cfg, backend="cpu_ref", progress=False, state_dict={**sd, name: w})        # finite: taken
    w.scales[1] = float("nan")
    with pytest.raises(ValueError, match=rf"Weight '{name}': its scales hold NaN/inf value\(s\)"):
        GLM52(cfg, backend="cpu_ref", progress=False, state_dict={**sd, name: w})


def test_a_cache_of_a_model_with_other_layers_is_refused(tiny_model):
    """Same widths, dtype and device, another depth: refused (the layers it lacks would be read as empty)."""
    m = tiny_model
    cfg3, _ = tiny_config(layers=3, vocab_size=64, index_topk=4, index_n_heads=32)    # the fixture's, deeper
    deeper = GLM52(cfg3, backend="cpu_ref", dtype=torch.float32, progress=False, block_size=4)
    with pytest.raises(ValueError, match="cache: it was not built for this model"):
        m.extend(deeper.new_cache(8), {"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="cache: it was not built for this model"):
        deeper.extend(m.new_cache(8), {"a": [1, 2, 3]})


def test_state_dict_problems_name_the_first_five_of_each_kind(tiny_model):
    """Up to five missing and five unexpected tensors are named; "first ones" only when there are more."""
    from glm52_backends.tiny import random_state_dict
    cfg = tiny_model.cfg
    sd = random_state_dict(cfg, seed=0, dtype=torch.float32, include_mtp=False)
    extra = {f"model.extra.{i}.weight": torch.zeros(1) for i in range(6)}
    with pytest.raises(ValueError) as e:
        GLM52(cfg, backend="cpu_ref", progress=False, state_dict={**sd, **dict(list(extra.items())[:5])})
    msg = str(e.value)
    assert "(5 problem(s)):" in msg and all(f"unexpected tensor '{k}'" in msg for k in list(extra)[:5])
    with pytest.raises(ValueError) as e:
        GLM52(cfg, backend="cpu_ref", progress=False, state_dict={**sd, **extra})
    assert "(5 problem(s), first ones):" in str(e.value) and "model.extra.5.weight" not in str(e.value)
    gone = dict(list(sd.items())[5:])                                # five missing, named each
    with pytest.raises(ValueError) as e:
        GLM52(cfg, backend="cpu_ref", progress=False, state_dict=gone)
    assert "(5 problem(s)):" in str(e.value) and all(f"missing tensor '{k}'" in str(e.value) for k in list(sd)[:5])


def test_generate_stats_add_up(tiny_model):
    """One prefill step (or one per chunk), then decode steps; rates from the same clocks; nothing
    preempted in a cache sized for the run. Plain runs count decode steps, speculative ones verify steps."""
    m = tiny_model
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    st = m.generate(prompts, max_new_tokens=6, stop_at_eos=False).stats
    assert (st["prefill_steps"], st["decode_steps"], st["preemptions"], st["new_tokens"]) == (1, 5, 0, 12)
    assert st["tokens_per_s"] == pytest.approx(12 / (st["prefill_s"] + st["decode_s"]), rel=1e-9)
    assert st["decode_tokens_per_s"] == pytest.approx((12 - 2) / st["decode_s"], rel=1e-9)
    chunked = m.generate(prompts, max_new_tokens=6, stop_at_eos=False, prefill_chunk=2).stats
    assert (chunked["prefill_steps"], chunked["decode_steps"]) == (3, 5)          # 5 tokens in chunks of 2
    assert "verify_steps" not in st
    mtp = GLM52(tiny_config(layers=2, vocab_size=64, index_topk=4, index_n_heads=32, mtp=True)[0],
                backend="cpu_ref", dtype=torch.float32, progress=False, block_size=4)
    spec = mtp.generate(prompts, max_new_tokens=6, speculative=2, stop_at_eos=False).stats
    assert spec["prefill_steps"] == 1 and spec["verify_steps"] >= 1 and "decode_steps" not in spec


def test_unseeded_sampling_is_seed_zero(tiny_model):
    m = tiny_model
    kw = dict(max_new_tokens=6, temperature=1.0, stop_at_eos=False)
    a = m.generate([[3, 1, 4], [1, 5, 9]], **kw)
    assert a.tokens == m.generate([[3, 1, 4], [1, 5, 9]], seed=0, **kw).tokens
    assert a.tokens != m.generate([[3, 1, 4], [1, 5, 9]], seed=1, **kw).tokens


def test_finite_logits_names_each_bad_row():
    """One NaN anywhere is refused (not only an all-NaN tensor), naming its rows and the count."""
    from glm52_backends.engine.arguments import finite_logits
    ops = get_backend("cpu_ref")
    lg = torch.zeros(4, 6)
    assert finite_logits(lg, ops) is lg
    lg[1, 2], lg[3, 0] = float("nan"), float("inf")
    with pytest.raises(FloatingPointError, match=r"backend 'cpu_ref': logits hold 2 NaN/inf value\(s\) "
                                                 r"\(rows \[1, 3\]\)"):
        finite_logits(lg, ops)
    with pytest.raises(FloatingPointError, match=r"MTP logits hold 1 NaN/inf value\(s\) \(rows \[0\]\)"):
        finite_logits(torch.tensor([0.0, float("nan")]), ops, "MTP logits")


def test_paged_cache_reserve_truncate_at_the_edges():
    cfg, _ = tiny_config(layers=1)
    c = PagedCache(cfg, num_blocks=2, block_size=4)
    c.reserve({0: 8})                                    # exactly the capacity: two blocks
    assert c.free_blocks == 0 and c.blocks[0] == [0, 1]
    c.reserve({0: 8})                                    # no growth: nothing more needed
    with pytest.raises(CacheExhausted, match="needs 1 more blocks of 4 tokens, 0 of 2 are free"):
        c.reserve({0: 9})
    c.truncate(0, 5)                                     # 5 tokens still need both blocks
    assert c.blocks[0] == [0, 1] and c.lens[0] == 5
    c.truncate(0, 4)                                     # exactly one block
    assert c.blocks[0] == [0] and c.free_blocks == 1
    c.truncate(0, 0)
    assert c.blocks[0] == [] and c.free_blocks == 2
    with pytest.raises(ValueError, match="cannot truncate request 0 from 0 to 1 tokens"):
        c.truncate(0, 1)
    with pytest.raises(ValueError, match="num_blocks must be a positive integer, got 0"):
        PagedCache(cfg, num_blocks=0)
    c.reserve({1: 4, 2: 4})                              # two requests, one block each: full again
    assert sorted(c.slots(2, 0, 4).tolist()) == list(range(c.blocks[2][0] * 4, c.blocks[2][0] * 4 + 4))


# ---- the block table exactly full --------------------------------------------------------------------

def test_step_meta_block_table_exactly_full():
    bt = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    meta = StepMeta.build([2], [48], bt, 16)                        # 3 blocks x 16: exactly full
    assert meta.positions.tolist() == [46, 47] and meta.seq_lens_host == (48,)
    with pytest.raises(ValueError, match=r"request 0 has q_len 2 and seq_len 49; need 0 <= q_len <= seq_len <= "
                                         r"48 \(3 blocks of 16\)"):
        StepMeta.build([2], [49], bt, 16)
    with pytest.raises(ValueError, match=r"request 0 has q_len 3 and seq_len 2"):
        StepMeta.build([3], [2], bt, 16)
    with pytest.raises(ValueError, match=r"block_table must be \[B=2, max_blocks\], got \[1, 3\]"):
        StepMeta.build([1, 1], [4, 4], bt, 16)


BS = 16


def _full_table(g, rows: list[torch.Tensor], bs: int = BS):
    """Paged rows with a block table exactly as wide as the longest request needs (conformance's
    `page` adds a padded column; here it is cut off). Unowned blocks and slots are NaN."""
    cache, table = page(g, rows, bs)
    need = max(-(-r.shape[0] // bs) for r in rows)
    return cache, table[:, :need].contiguous()


def _exactly_full_case(op: str, topk: int = 16) -> Case:
    """Request 0 fills its 3 blocks exactly (48 tokens, 3 queries); request 1 has 20 tokens (two
    blocks, its third table entry points to a poisoned block). bfloat16-sized for the Ascend ops:
    64 index heads x 128, 4 MLA heads with a 512 + 64 latent."""
    batch = Batch([(3, 3 * BS), (1, BS + 4)])

    def build(scale: str) -> CaseInputs:
        g = generator("boundaries", op, topk)
        if op == "indexer_topk":
            Hi, Di = 64, 128
            cache, table = _full_table(g, [randn(g, L, Di) for L in batch.seq_lens])
            return CaseInputs({"q": Arg(randn(g, batch.T, Hi, Di), "act"),
                               "w": Arg(randn(g, batch.T, Hi) * (Hi * Di) ** -0.5, "f32"),
                               "k_cache": Arg(cache, "act"), "block_table": Arg(table, "int"),
                               "seq_lens": Arg(batch.seq_lens_t, "int"), "cu_seqlens_q": Arg(batch.cu_seqlens_q, "int"),
                               "topk": Arg(topk, "const")}, meta={"batch": batch})
        H, Dl, Dr = 4, 512, 64
        cache, table = _full_table(g, [randn(g, L, Dl + Dr) for L in batch.seq_lens])
        idx = torch.full((batch.T, topk), -1, dtype=torch.int32)
        for t, _, pos in batch.tokens():
            n = min(topk, pos + 1)
            idx[t, :n] = torch.randperm(pos + 1, generator=g)[:n].to(torch.int32)
        return CaseInputs({"q": Arg(randn(g, batch.T, H, Dl + Dr), "act"),
                           "c_cache": Arg(cache[..., :Dl].contiguous(), "act"),
                           "kpe_cache": Arg(cache[..., Dl:].contiguous(), "act"), "idx": Arg(idx, "int"),
                           "block_table": Arg(table, "int"), "seq_lens": Arg(batch.seq_lens_t, "int"),
                           "cu_seqlens_q": Arg(batch.cu_seqlens_q, "int"), "scale": Arg(192 ** -0.5, "const")},
                          meta={"batch": batch})
    return Case(op, f"exactly-full-topk{topk}", build, "topk" if op == "indexer_topk" else "mla")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["indexer_topk", "sparse_mla"])
def test_block_table_exactly_full_on_every_backend(backend, op):
    """No padding column after the last block: a kernel that reads block_table[b, L // bs] (one past
    the end when L is a multiple of the block size) fails or reads poison here."""
    case = _exactly_full_case(op)
    inputs = case.build("quick")
    assert inputs.args["block_table"].value.shape[1] * BS == 3 * BS                # exactly full
    bound = _backend(backend)
    r = run_case(bound, case, torch.bfloat16, "quick", CPU, inputs)
    assert r.passed, r.line()
    if backend != "cpu_ref":
        assert r.path == "native", f"{backend} declined the exactly-full case, so it was not tested: {r.line()}"


@pytest.mark.filterwarnings("ignore:backend 'ascend:RuntimeWarning")   # the Ascend ops decline top-k 0
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_zero(backend):
    """index_topk == 0: the indexer returns [T, 0]; sparse_mla over empty rows gives zeros and lse -inf."""
    bound = _backend(backend)
    idx_case = _exactly_full_case("indexer_topk", topk=0)
    r = run_case(bound, idx_case, torch.bfloat16, "quick", CPU)
    assert r.passed, r.line()
    mla_case = _exactly_full_case("sparse_mla", topk=0)
    inputs = mla_case.build("quick")
    args = inputs.for_backend(torch.bfloat16, CPU)
    assert args[3].shape == (4, 0)
    out, lse = bound.sparse_mla(*args, return_lse=True)
    assert out.shape == (4, 4, 512) and out.dtype == torch.bfloat16 and (out == 0).all()
    assert lse.shape == (4, 4) and lse.dtype == torch.float32 and torch.isneginf(lse).all()
    assert (bound.sparse_mla(*args) == 0).all()


def test_config_refuses_topk_zero_with_the_reason():
    with pytest.raises(ConfigError, match=r"'index_topk' must be a positive integer, got 0"):
        ModelConfig(index_topk=0).validate()
    with pytest.raises(ConfigError, match=r"'num_experts_per_tok' must be a positive integer, got 0"):
        ModelConfig(num_experts_per_tok=0).validate()


# ---- top-p at the threshold exactly --------------------------------------------------------------------

HALVES = torch.tensor([3.0, 2.0, 1.0, 1.0]) * math.log(2.0)     # float32 softmax: exactly 1/2, 1/4, 1/8, 1/8


def test_top_p_mass_hitting_the_threshold_exactly():
    """The nucleus is the smallest set of most likely tokens with mass >= top_p: when the first j
    tokens reach top_p exactly, token j+1 is out."""
    p = torch.softmax(HALVES, -1)
    assert p.tolist() == [0.5, 0.25, 0.125, 0.125], "float32 softmax is not exact here: the test is moot"
    for top_p, kept in [(0.5, 1), (0.5000001, 2), (0.75, 2), (0.7499999, 2), (0.875, 3), (0.8750001, 4), (1.0, 4)]:
        q = probs_from_logits(HALVES, 1.0, top_p)
        assert int((q > 0).sum()) == kept, (top_p, q.tolist())
        assert float(q.sum()) == pytest.approx(1.0)
    ties = probs_from_logits(torch.zeros(4), 1.0, 0.5)                # ties: exactly two of four
    assert sorted(ties.tolist()) == [0.0, 0.0, 0.5, 0.5]
    assert probs_from_logits(torch.zeros(4), 1.0, 0.25).max() == 1.0   # one token: the top one survives
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        probs_from_logits(HALVES, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        probs_from_logits(HALVES, 1.0, 1.5)
    with pytest.raises(ValueError, match="temperature must be > 0 for sampling, got 0"):
        probs_from_logits(HALVES, 0, 1.0)


def test_sample_from_at_the_ends_of_the_unit_interval():
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    assert sample_from(p, torch.tensor([0.0])).tolist() == [1]               # never a massless first token
    assert sample_from(p, torch.tensor([0.5])).tolist() == [2]               # u * total = cdf[1]: the next one
    assert sample_from(p, torch.tensor([1.0 - 2 ** -24])).tolist() == [2]
    assert sample_from(p, torch.tensor([1.0])).tolist() == [2]               # never past the last with mass


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_top_p_threshold_exactly_on_every_backend(backend):
    """k = 1, u = 0 (accept iff p(draft) > 0 after top-p): with top_p = 0.75 the third token (mass
    before it exactly 0.75) is out, with 0.875 it is in; the correction then comes from the nucleus."""
    ops = _backend(backend)
    lg = HALVES.expand(1, 2, 4).contiguous()
    for top_p, inside in [(0.5, {0}), (0.75, {0, 1}), (0.875, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        for d in range(4):
            acc, tok = ops.mtp_verify(torch.tensor([[d]]), lg, None, 1.0, top_p, torch.tensor([[0.0, 0.0]]))
            assert int(acc[0]) == (d in inside), (backend, top_p, d)
            if d not in inside:                   # the correction: the most likely nucleus token (u = 0)
                assert int(tok[0, 0]) == 0 and int(tok[0, 1]) == -1
            else:                                 # accepted, then the bonus from p at u = 0
                assert tok[0].tolist() == [d, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_rejection_whose_residual_has_no_mass(backend):
    """max(p - q, 0) can sum to 0 at a rejection (q >= p everywhere: float rounding of q == p, or a
    draft distribution with more mass than p); the correction is then drawn from p itself."""
    ops = _backend(backend)
    lg = HALVES.expand(1, 2, 4).contiguous()
    p = torch.softmax(HALVES, -1)
    q = (2 * p).expand(1, 1, 4).contiguous()                          # p / q = 1/2 for every token
    for u0, u1, want in [(0.25, 0.3, None), (0.75, 0.3, 0), (0.75, 0.6, 1), (0.75, 0.8, 2), (0.75, 0.9, 3)]:
        acc, tok = ops.mtp_verify(torch.tensor([[1]]), lg, q, 1.0, 1.0, torch.tensor([[u0, u1]]))
        if want is None:                                               # u < 1/2: accepted, bonus from p
            assert int(acc[0]) == 1 and tok[0].tolist() == [1, 0], backend
        else:
            assert int(acc[0]) == 0 and tok[0].tolist() == [want, -1], (backend, u1)


# ---- planner ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nvidia-h200", "ascend-910c", "cpu-tiny"])
def test_planner_usable_memory_is_pinned_to_the_yaml(name):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
    p = plan(load_deployment(name))
    assert p.usable_bytes == raw["memory_per_device_gb"] * 2 ** 30 * raw.get("memory_utilization", 0.9)
    assert p.need_bytes == pytest.approx(sum(r.bytes for r in p.rows), rel=1e-12)
    assert p.spare_bytes == p.usable_bytes - p.need_bytes
    assert p.fits == (p.need_bytes <= p.usable_bytes)
    rows = {r.component: r.bytes for r in p.rows}
    assert rows["runtime reserve"] == raw["runtime_reserve_gb"] * GiB
    half = plan(load_deployment(name).replace(memory_utilization=raw.get("memory_utilization", 0.9) / 2))
    assert half.usable_bytes == pytest.approx(p.usable_bytes / 2, rel=1e-15) and half.need_bytes == p.need_bytes


def test_planner_fits_exactly_at_the_boundary():
    """usable == need fits; one byte less does not (memory in GiB, 2**30 bytes, utilization 1)."""
    d = load_deployment("ascend-910c")
    need = plan(d).need_bytes
    exact = d.replace(memory_utilization=1.0, memory_per_device_gb=need / GiB)
    p = plan(exact)
    assert p.usable_bytes == need and p.need_bytes == need and p.fits and p.spare_bytes == 0
    short = plan(d.replace(memory_utilization=1.0, memory_per_device_gb=(need - 1) / GiB))
    assert not short.fits and short.spare_bytes == pytest.approx(-1, abs=1e-3)
    assert short.max_context_at_batch < d.max_context <= p.max_context_at_batch


# ---- deployments: ep and the device count ---------------------------------------------------------------

@pytest.mark.parametrize("base,changes,world", [
    ("nvidia-h200", {"parallel.ep": 16}, 8),                          # divides the 256 experts, not 8 devices
    ("ascend-910c", {"parallel.ep": 32}, 16),
    ("ascend-910b", {"nodes": 3, "parallel.dp": 3, "parallel.ep": 16}, 24),   # 24 devices: 16 does not divide
])
def test_ep_not_dividing_the_devices_is_refused_with_the_reason(base, changes, world):
    d = load_deployment(base)
    with pytest.raises(DeploymentError) as e:
        d.replace(**changes)
    ep = changes["parallel.ep"]
    assert e.value.key == "parallel.ep"
    assert f"ep={ep} does not divide the {world} devices (tp x dp)" in str(e.value)


def test_ep_dividing_the_devices_but_not_equal_is_accepted_and_planned():
    """24 devices with EP8: three expert replicas; the planner splits the experts 8 ways."""
    d = load_deployment("ascend-910b").replace(nodes=3, **{"parallel.dp": 3, "parallel.ep": 8})
    assert d.devices == 24 and d.expert_shards == 8
    rows = {r.component: r.bytes for r in plan(d).rows}
    ep4 = {r.component: r.bytes for r in plan(d.replace(**{"parallel.ep": 4})).rows}
    assert rows["routed experts"] == pytest.approx(ep4["routed experts"] * 4 / 8, rel=1e-12)  # whole experts
    # with experts TP-split (ep = 1) the weights divide by tp; w8a8's per-channel scales of the
    # input-split down projections are held whole on every rank, so compare bf16 weights there
    bf = d.replace(**{"dtypes.weights": "bf16"})
    rows = {r.component: r.bytes for r in plan(bf).rows}
    full = {r.component: r.bytes for r in plan(bf.replace(**{"parallel.ep": 1})).rows}
    assert rows["routed experts"] == pytest.approx(full["routed experts"] * d.tp / 8, rel=1e-12)


def test_ep_not_dividing_the_experts_is_named_before_the_devices():
    with pytest.raises(DeploymentError) as e:
        load_deployment("ascend-910b").replace(nodes=3, **{"parallel.dp": 3, "parallel.ep": 12})
    assert e.value.key == "parallel.ep" and "ep=12 does not divide the 256 routed experts" in str(e.value)
