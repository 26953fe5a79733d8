"""The contract's ops as PyTorch custom ops (glm52_backends/ops/library.py): torch.ops.glm52.<op> is the
reference, each backend gets an overload, graphs record one node per op, and routing a call through the
custom op computes exactly what the direct call computes."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from glm52_backends import GLM52, default_checkpoint
from glm52_backends.backends.generic import TorchDeviceBackend
from glm52_backends.conformance.cases import CASES
from glm52_backends.engine.graph import StaticDecode
from glm52_backends.ops import OP_NAMES, REFERENCES, OpUnsupported, library, signature
from glm52_backends.registry import BoundBackend, get_backend

CPU = torch.device("cpu")


def _case_args(case):
    inp = case.build("quick")
    return tuple(inp.for_backend(torch.float32, CPU)), dict(inp.kwargs)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_every_op_has_a_schema_with_the_contracts_parameter_names():
    assert set(library.SCHEMAS) == set(OP_NAMES)
    for op in OP_NAMES:
        assert [n for n, _ in library.SCHEMAS[op][0]] == list(signature(op).parameters), op
        assert hasattr(torch.ops.glm52, op) or library.packet(op) is not None


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}/{c.name}")
def test_the_default_overload_is_the_reference_and_its_fake_kernel_matches(case):
    """torch.ops.glm52.<op> computes the float32 reference bit for bit; torch's own checker verifies the
    schema (no undeclared mutation or aliasing) and that the fake kernel gives the real output's shapes,
    dtypes and strides class on every conformance case (quick sizes)."""
    args, kwargs = _case_args(case)
    want = REFERENCES[case.op](*args, **kwargs)
    got = library.call(case.op, "default", args, kwargs)
    assert _same(got, tuple(want) if isinstance(want, tuple) else want)
    flat = library.flatten(case.op, args, kwargs)
    if case.name.startswith("cache-"):
        # a quantized cache's codes view keeps its scales in the same storage, past the view's own extent:
        # opcheck runs the op on a copy of each argument alone, which has no scales. The fake kernel is
        # checked on fake tensors of the real views instead (they keep the whole storage, as tracing does).
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode:
            fake = library.packet(case.op)(
                *[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in flat], instance=0)
        real = library.packet(case.op)(*flat, instance=0)
        for f, r in zip(fake if isinstance(fake, tuple) else (fake,), real if isinstance(real, tuple) else (real,)):
            assert f.shape == r.shape and f.dtype == r.dtype
        return
    fp8 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float8_e4m3fn for t in flat)
    # torch's schema test multiplies inputs, which CPU torch cannot do for float8: fake test only there
    tests = ("test_faketensor",) if fp8 else ("test_schema", "test_faketensor")
    torch.library.opcheck(library.packet(case.op), flat, {"instance": 0}, test_utils=tests)


@pytest.mark.parametrize("name", ["torch", "cpu_ref"])
def test_a_call_through_the_library_equals_the_direct_call(name):
    """Every conformance case, every op: through torch.ops.glm52.<op>.<backend> == the backend's direct call."""
    b = get_backend(name)
    for case in CASES:
        args, kwargs = _case_args(case)
        direct = getattr(b, case.op)(*args, **kwargs)
        with b.through_library():
            routed = getattr(b, case.op)(*args, **kwargs)
        assert _same(routed, direct), f"{name}: {case.op}/{case.name}"
    assert b._library is not None and b._library[0] in ("torch_inline", "cpu_ref")


class _Opaque(TorchDeviceBackend):
    """The generic ops as a native-kernel backend would register them: one opaque node per op."""
    name = "opaque torch"
    opaque_ops = True


class _Declines(_Opaque):
    name = "declines norm"

    def rms_norm(self, *a, **k):
        raise OpUnsupported("not this one")


class _Doubles(_Opaque):
    """Same name as _Opaque, different result: the two must not share an implementation."""
    name = "opaque torch"

    def rms_norm(self, x, weight, eps):
        return REFERENCES["rms_norm"](x, weight, eps) * 2


def test_two_backends_of_one_name_keep_their_own_implementations():
    a, b = BoundBackend(_Opaque()), BoundBackend(_Doubles())
    x, w = torch.randn(3, 8), torch.randn(8)
    with a.through_library(), b.through_library():
        ya, yb = a.rms_norm(x, w, 1e-6), b.rms_norm(x, w, 1e-6)
    assert a._library[0] == b._library[0] == "opaque_torch" and a._library[1] != b._library[1]
    assert torch.equal(ya, a.backend.rms_norm(x, w, 1e-6))
    assert torch.equal(yb, REFERENCES["rms_norm"](x, w, 1e-6) * 2)


def _trace(model, n=2):
    cache = model.new_cache(2048)
    model.extend(cache, {r: [5 + r, 6, 7, 8][: 4 - r] for r in range(n)})
    sd = StaticDecode(model, cache, n, "trace", strict=True)
    before = {op: dict(c) for op, c in model.ops.calls.items()}
    gm = make_fx(lambda *bufs: sd._forward(n, *bufs), tracing_mode="real")(*sd._inputs())
    gm.graph.eliminate_dead_code()         # as StaticDecode does: a declined op's dangling node goes
    calls = {op: {k: v - before[op][k] for k, v in c.items()} for op, c in model.ops.calls.items()}
    nodes = collections.Counter(str(nd.target) for nd in gm.graph.nodes
                                if nd.op == "call_function" and str(nd.target).startswith("glm52."))
    return calls, nodes


def test_a_captured_step_records_one_node_per_op_call():
    """An opaque backend's decode step traces to exactly one glm52:: node per op call of the step (and
    nothing of the op's insides); an op the backend declines at capture is recorded as the reference's
    overload, so the decision is made once, before the graph exists."""
    calls, nodes = _trace(GLM52(default_checkpoint(), backend=_Opaque(), progress=False))
    want = {f"glm52.{op}.opaque_torch": c["native"] for op, c in calls.items() if c["native"]}
    assert dict(nodes) == want and want["glm52.sparse_mla.opaque_torch"] == 4     # 4 layers
    with pytest.warns(RuntimeWarning, match="rms_norm falls back"):
        calls, nodes = _trace(GLM52(default_checkpoint(), backend=_Declines(), progress=False))
    assert nodes["glm52.rms_norm.default"] == calls["rms_norm"]["fallback"] > 0
    assert "glm52.rms_norm.declines_norm" not in nodes and nodes["glm52.sparse_mla.declines_norm"] == 4
    prompts = [[5, 6, 7, 8], [9, 10]]
    want = GLM52(default_checkpoint(), backend=_Declines(), progress=False).generate(prompts, 5, graph=False).tokens
    out = GLM52(default_checkpoint(), backend=_Declines(), progress=False).generate(prompts, 5, graph="trace")
    assert out.tokens == want and out.stats["graph_buckets"] == [2]        # the replays never raise


@pytest.mark.parametrize("mode", ["trace", "compile"])
def test_graphs_of_opaque_custom_ops_decode_what_eager_decodes(mode):
    """Replays of the custom-op graph (trace: FX; compile: inductor around the opaque nodes, through
    their fake kernels) give eager's greedy tokens (3 requests: the bucket of 4, one padding row)."""
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    eager = GLM52(default_checkpoint(), backend=_Opaque(), progress=False)
    want = eager.generate(prompts, max_new_tokens=8, graph=False).tokens
    m = GLM52(default_checkpoint(), backend=_Opaque(), progress=False)
    out = m.generate(prompts, max_new_tokens=8, graph=mode)
    assert out.tokens == want
    assert out.stats["graph_buckets"] == [4] and out.stats["eager_buckets"] == []
