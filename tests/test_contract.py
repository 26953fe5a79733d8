"""The op contract's own guarantees: signature checks at registration, Weight formats, typed capabilities,
step metadata, collectives, RoPE mode. Each op's reference tests are tests/ops/test_<op>.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from glm52_backends import ops as R
from glm52_backends.config import ConfigError, ModelConfig
from glm52_backends.ops import Capabilities, check_signature
from glm52_backends.ops.comm import Collectives, default_collectives
from glm52_backends.registry import (BackendContractError, BackendUnavailable, get_backend, list_backends,
                                     register_backend, unregister_backend)
from glm52_backends.step import StepMeta
from glm52_backends.weights import WEIGHT_FORMATS, Weight, quantize_weight

F64 = torch.float64


# ---- signatures -------------------------------------------------------------------------------------
class OldSparseMla:
    """A vendor backend written against the old contract (fused kv cache, v_dim)."""
    name = "old-mla"

    def sparse_mla(self, q, kv_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, v_dim=512):
        raise AssertionError("never called")


class NoMetaIndexer:
    """Written to the contract: the step arrives as the loose tensors only, no `meta=` keyword."""
    name = "no-meta"

    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
        raise AssertionError("never called")


class OldMetaIndexer:
    """Written against the old contract: still takes an optional `meta=` (an extra keyword with a default)."""
    name = "old-meta"

    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, *, meta=None):
        raise AssertionError("never called")


class MetaRequiredIndexer:
    """Needs a `meta` the contract no longer passes."""
    name = "meta-required"

    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, *, meta):
        raise AssertionError("never called")


def test_wrong_signature_is_refused_by_name():
    with pytest.raises(BackendContractError) as e:
        get_backend(OldSparseMla())
    msg = str(e.value)
    assert "old-mla" in msg and "sparse_mla" in msg and "'kv_cache'" in msg and "'c_cache'" in msg
    # the contract passes no `meta=`: an op without it binds; one that still has it optional binds too;
    # one that requires it is refused by name
    assert get_backend(NoMetaIndexer()).native_ops == ("indexer_topk",)
    assert get_backend(OldMetaIndexer()).native_ops == ("indexer_topk",)
    with pytest.raises(BackendContractError, match=r"indexer_topk: has a required parameter 'meta' the contract "
                                                   r"does not pass"):
        get_backend(MetaRequiredIndexer())
    # through the registry: asking by name fails loudly, `auto` and the listing skip it with the reason
    register_backend("old-mla", OldSparseMla)
    try:
        with pytest.raises(BackendUnavailable, match="does not match the op contract"):
            get_backend("old-mla")
        info = {b.name: b for b in list_backends()}["old-mla"]
        assert not info.available and "sparse_mla" in info.reason
        assert get_backend("auto").name != "old-mla"
    finally:
        unregister_backend("old-mla")


def test_signature_rules():
    ok = lambda q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False, n_splits=None: 0  # noqa: E731,E501
    assert check_signature("sparse_mla", ok) is None
    assert check_signature("sparse_mla", lambda *a, **k: 0) is None
    assert "needs a default" in check_signature("sparse_mla", lambda q, c_cache, kpe_cache, idx, block_table, seq_lens,
                                                cu_seqlens_q, scale, *, return_lse: 0)
    assert "required parameter 'extra'" in check_signature("rms_norm", lambda x, weight, eps, extra: 0)
    assert "missing 'eps'" in check_signature("rms_norm", lambda x, weight: 0)
    assert "needs a default" in check_signature("moe_route", lambda router_logits, correction_bias, top_k, n_group,
                                                topk_group, norm_topk_prob, routed_scaling_factor: 0)


def test_every_builtin_backend_matches_the_contract():
    for b in list_backends():
        assert "does not match the op contract" not in b.reason, (b.name, b.reason)


# ---- references read only what the contract lets them read: tests/ops/test_sparse_mla.py, test_indexer_topk.py


# ---- Weight -----------------------------------------------------------------------------------------
def test_weight_formats_through_the_reference():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(300, 200, generator=g)
    q = quantize_weight(w, "fp8_block")
    q8, s = q.data, q.scales
    fp8 = Weight(q8, s, "fp8_block")
    dense = fp8.dense()
    assert dense.shape == w.shape and (dense - w).abs().max() < 0.07 * w.abs().max()   # e4m3: 3 mantissa bits
    x = torch.randn(5, 200, generator=g)
    # a quantized weight quantizes its activations too (quant.py): close to, not equal to, weight-only
    y, y_wo = R.linear(x, fp8), R.linear(x, dense)
    assert not torch.equal(y, y_wo) and (y - y_wo).norm() < 0.1 * y_wo.norm()
    assert torch.equal(R.linear(x, Weight(w)), R.linear(x, w))
    e13 = torch.randn(3, 2 * 8, 200, generator=g)
    e2 = torch.randn(3, 200, 8, generator=g)
    ids = torch.tensor([[0, 2], [1, 0]])
    wt = torch.rand(2, 2, generator=g)
    xx = x[:2]
    assert torch.equal(R.moe_experts(xx, Weight(e13), Weight(e2), ids, wt), R.moe_experts(xx, e13, e2, ids, wt))
    assert torch.equal(R.mlp(xx, Weight(e13[0]), Weight(e2[0])), R.mlp(xx, e13[0], e2[0]))
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        Weight(w, format="int3")
    with pytest.raises(ValueError, match="fp8_block needs its scales"):
        Weight(q8, format="fp8_block")


# ---- capabilities, step metadata ------------------------------------------------------------------------
def test_capabilities_typed_and_from_old_dicts():
    c = Capabilities.coerce({"dtypes": [torch.bfloat16], "fp8": True, "max_topk": 2048, "moe_gemm": "auto"})
    assert c.dtypes == (torch.bfloat16,) and "fp8_block" in c.weight_formats and c.max_topk == 2048
    assert c.extra == {"moe_gemm": "auto"} and c.get("moe_gemm") == "auto" and c.get("default_dtype", 7) == 7
    assert get_backend("cpu_ref").capabilities.weight_formats == WEIGHT_FORMATS      # the reference runs every format


def test_step_meta_is_derived_once_and_validated():
    bt = torch.tensor([[3, 1, 0], [2, 0, 0]], dtype=torch.int32)
    m = StepMeta.build([3, 1], [5, 9], bt, 4)
    assert m.cu_host == (0, 3, 4) and m.seq_lens_host == (5, 9) and m.num_tokens == 4 and m.max_q_len == 3
    assert m.positions.tolist() == [2, 3, 4, 8] and m.token_request.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="request 1 has q_len 1 and seq_len 13"):
        StepMeta.build([3, 1], [5, 13], bt, 4)
    with pytest.raises(ValueError, match="q_len 6 and seq_len 5"):
        StepMeta.build([6, 1], [5, 9], bt, 4)
    m2 = StepMeta.from_tensors(bt, torch.tensor([5, 9], dtype=torch.int32), torch.tensor([0, 3, 4], dtype=torch.int32), 4)
    assert torch.equal(m2.positions, m.positions) and m2.cu_host == m.cu_host


def test_model_hands_the_step_to_the_backend_as_its_loose_tensors_only(tmp_path):
    """One carrier: each layer's paged ops get the step's own block_table / seq_lens / cu_seqlens_q
    (the same tensors in every layer of a step), no `meta=` keyword, and a backend's `prepare_step`
    (the old per-step hook) is never called."""
    from glm52_backends import GLM52
    from glm52_backends.backends.cpu_ref import CpuRefBackend
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

    seen = []

    class Spy(CpuRefBackend):
        name = "spy"

        def prepare_step(self, meta):
            raise AssertionError("prepare_step is no longer part of the contract: never called")

    spy = Spy()
    orig_mla, orig_idx = spy.sparse_mla, spy.indexer_topk

    def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False,
                   **extra):
        assert not extra and not return_lse
        seen.append(("mla", block_table, seq_lens, cu_seqlens_q))
        return orig_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale)

    def indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk, **extra):
        assert not extra
        seen.append(("idx", block_table, seq_lens, cu_seqlens_q))
        return orig_idx(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk)
    spy.sparse_mla, spy.indexer_topk = sparse_mla, indexer_topk
    path = make_tiny_checkpoint(str(tmp_path / "t"), layers=3, seed=1, index_topk=4)
    m = GLM52(path, backend=spy, progress=False)
    cache = m.new_cache(64)
    m.extend(cache, {0: [1, 2, 3, 4, 5], 1: [7]})
    assert [s[0] for s in seen].count("mla") == 3                     # every layer
    first = seen[0][1:]
    assert all(all(a is b for a, b in zip(s[1:], first)) for s in seen)   # the step's tensors, not copies
    bt, sl, cu = first
    assert sl.tolist() == [5, 1] and cu.tolist() == [0, 5, 6] and bt.dtype == sl.dtype == cu.dtype == torch.int32


# ---- collectives -------------------------------------------------------------------------------------------
def test_collectives_are_the_identity_on_one_device():
    c = default_collectives()
    assert type(c) is Collectives and c.world_size == 1
    x = torch.randn(4, 6)
    for y in (c.all_reduce(x), c.all_gather(x, 1), c.reduce_scatter(x), c.all_to_all(x), c.broadcast(x)):
        assert y is x


_DIST = r"""
import json, os, sys, torch, torch.distributed as dist
from glm52_backends.ops.comm import TorchDistributed, default_collectives
dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
c = default_collectives()
r = dist.get_rank()
x = torch.arange(8.0).view(2, 4) + 10 * r
out = {"type": type(c).__name__, "all_reduce": c.all_reduce(x.clone()).tolist(),
       "all_gather": c.all_gather(x, dim=1).tolist(), "reduce_scatter": c.reduce_scatter(x.clone(), dim=1).tolist(),
       "broadcast": c.broadcast(x.clone(), src=1).tolist(),
       "all_to_all": c.all_to_all(torch.tensor([[1.0 + r], [2.0 + r], [3.0 + r]]), [1, 2] if r == 0 else [2, 1],
                                  [1, 2] if r == 0 else [2, 1]).tolist()}
print(json.dumps(out))
dist.destroy_process_group()
"""


def test_torch_distributed_collectives_on_two_gloo_ranks(tmp_path):
    init = f"file://{tmp_path / 'rdzv'}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _DIST, init, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e
        outs.append(json.loads(o.strip().splitlines()[-1]))
    a = torch.arange(8.0).view(2, 4)
    b = a + 10
    for r, o in enumerate(outs):
        assert o["type"] == "TorchDistributed"
        assert o["all_reduce"] == (a + b).tolist()
        assert o["all_gather"] == torch.cat([a, b], 1).tolist()
        assert o["reduce_scatter"] == (a + b)[:, 2 * r:2 * r + 2].tolist()
        assert o["broadcast"] == b.tolist()
    # rank 0 sends its row 0 to itself and rows 1-2 to rank 1; rank 1 sends rows 0-1 to rank 0, row 2 to itself
    assert outs[0]["all_to_all"] == [[1.0], [2.0], [3.0]] and outs[1]["all_to_all"] == [[2.0], [3.0], [4.0]]


# ---- RoPE mode ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["rope_interleave", "indexer_rope_interleave"])
def test_non_interleaved_rope_is_refused(tmp_path, key):
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(str(tmp_path / "t"), layers=2, seed=1)
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    cfg[key] = False
    open(os.path.join(path, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"'{key}' is False: only interleaved"):
        ModelConfig.from_file(path)


# ---- the typed ops surface of a bound backend -----------------------------------------------------------------
def test_bound_backend_declares_one_typed_slot_per_op_of_the_contract():
    import typing

    from glm52_backends.registry import BoundBackend, OpSlot
    slots = {name: v for klass in BoundBackend.__mro__ for name, v in vars(klass).items() if isinstance(v, OpSlot)}
    assert set(slots) == set(R.OP_NAMES), "no op missing, none extra"
    for op in R.OP_NAMES:
        slot = vars(BoundBackend)[op]                    # on the class itself (what a static tool reads)
        assert isinstance(slot, OpSlot) and getattr(BoundBackend, op) is slot, op
        assert slot.reference is R.REFERENCES[op] and slot.name == op, op
    # a non-data descriptor: an instance attribute (a test's spy) shadows it
    assert not hasattr(OpSlot, "__set__") and not hasattr(OpSlot, "__delete__")
    # the static type: the slot is built from Callable[P, R] and an instance's op is that Callable[P, R]
    P, Ret = OpSlot.__parameters__
    op_type = typing.Callable[P, Ret]
    assert typing.get_type_hints(OpSlot.__init__)["reference"] == op_type
    assert op_type in typing.get_args(typing.get_type_hints(OpSlot.__get__)["return"])
    if sys.version_info >= (3, 11):                      # the overloads: instance -> the op, class -> the slot
        hints = [typing.get_type_hints(f) for f in typing.get_overloads(OpSlot.__get__)]
        assert {(h["obj"], h["return"]) for h in hints} == {(BoundBackend, op_type),
                                                             (type(None), OpSlot[P, Ret])}


def test_bound_backend_op_dispatches_through_its_slot():
    bound = get_backend("cpu_ref", compute_dtype=F64)
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 48, generator=g, dtype=F64), torch.randn(48, generator=g, dtype=F64)
    assert "rms_norm" in vars(bound)                     # bound once, cached on the instance
    fn = bound.rms_norm
    assert fn is bound.rms_norm and fn.__name__ == "rms_norm"
    torch.testing.assert_close(fn(x, w, 1e-6), R.rms_norm(x, w, 1e-6, cdt=F64), rtol=0, atol=0)
    assert bound.calls["rms_norm"] == {"native": 1, "fallback": 0}
    # an instance attribute shadows the slot (workers and tests wrap ops so); deleting it restores dispatch
    seen = []
    bound.rms_norm = lambda *a, **k: seen.append(a) or fn(*a, **k)
    bound.rms_norm(x, w, 1e-6)
    assert len(seen) == 1 and bound.calls["rms_norm"]["native"] == 2
    del bound.rms_norm
    torch.testing.assert_close(bound.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6, cdt=F64), rtol=0, atol=0)
    assert bound.calls["rms_norm"]["native"] == 3 and len(seen) == 1
