"""Quantized checkpoints kept as stored: block-FP8 (HF), msModelSlim AscendV1 W8A8 / W4A8, online
quantization of a BF16 checkpoint, `quantization="none"`, rank slices, deployment dtypes, and the
planner's bytes against what a loaded model holds (spec/quantization.md)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from glm52_backends import GLM52
from glm52_backends.benchmarks.quant_report import held_bytes, planned_bytes
from glm52_backends.configs import bundled_configs
from glm52_backends.deploy import DeploymentError, from_dict
from glm52_backends.loader import (ASCEND_DESCRIPTION, ASCEND_SINGLE, CheckpointError, load_checkpoint,
                                   load_checkpoint_shard, recipe_format, slice_weight)
from glm52_backends.parallel import ParallelPlan
from glm52_backends.quant import layout_nbytes, matmul_reference, unpack_int4_rows
from glm52_backends.devtools.make_tiny import dequantized_twin, make_tiny_checkpoint
from glm52_backends.weights import Weight, expected_tensors, is_fp8_weight, quantize_weight

SEED, LAYERS = 5, 3
PROMPTS = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5], [250, 4, 8], [8] * 7]
Q_A = "model.layers.1.self_attn.q_a_proj.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"
EXPERT_UP = "model.layers.1.mlp.experts.3.up_proj.weight"
EXPERT_DOWN = "model.layers.1.mlp.experts.3.down_proj.weight"
SHARED_GATE = "model.layers.1.mlp.shared_experts.gate_proj.weight"
ROUTER = "model.layers.1.mlp.gate.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    out = {"bf16": make_tiny_checkpoint(str(d / "bf16"), mtp=True, layers=LAYERS, seed=SEED)}
    for q in ("fp8", "w8a8", "w4a8"):
        out[q] = make_tiny_checkpoint(str(d / q), quant=q, mtp=True, layers=LAYERS, seed=SEED)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same_weight(a: Weight, b: Weight) -> bool:
    return a.format == b.format and a.block == b.block and a.tensors().keys() == b.tensors().keys() and \
        all(torch.equal(_bits(x), _bits(b.tensors()[k])) for k, x in a.tensors().items())


def _copy(src: str, dst) -> str:
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


# ---- block-FP8 ------------------------------------------------------------------------------------
def test_fp8_checkpoint_loads_as_stored_block_fp8_weights(ckpts):
    cfg, sd = load_checkpoint(ckpts["fp8"], dtype=torch.bfloat16, progress=False)
    raw = load_file(os.path.join(ckpts["fp8"], "model.safetensors"))
    quantized = [k for k in sd if is_fp8_weight(k)]
    assert quantized and not any(k.endswith("_scale_inv") for k in sd)
    for k in quantized:
        w = sd[k]
        assert isinstance(w, Weight) and w.format == "fp8_block" and w.data.dtype == torch.float8_e4m3fn, k
        assert torch.equal(_bits(w.data), _bits(raw[k])) and torch.equal(w.scales, raw[k + "_scale_inv"]), k
    # memory = the quantized size: exactly the stored codes and scales, half the BF16 bytes of the codes
    held = sum(sd[k].nbytes for k in quantized)
    stored = sum(raw[k].nbytes + raw[k + "_scale_inv"].nbytes for k in quantized)
    assert held == stored == sum(layout_nbytes("fp8_block", sd[k].shape) for k in quantized)
    assert held < 0.6 * sum(2 * sd[k].shape.numel() for k in quantized)
    assert all(isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float32)
               for k, v in sd.items() if k not in quantized)


def test_fp8_greedy_is_deterministic_from_the_same_weights_and_compared_to_float(ckpts):
    m = GLM52(ckpts["fp8"], backend="cpu_ref", progress=False)
    assert m.layers[1].e_w13.format == "fp8_block" and m.layers[0].w13.format == "fp8_block"
    assert m.layers[1].gate.data.dtype == torch.float32 and m.layers[1].w_uk.dtype == torch.float32
    cfg, sd = load_checkpoint(ckpts["fp8"], progress=False)
    twin = GLM52(cfg, backend="cpu_ref", state_dict=sd, progress=False)
    a = m.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False).tokens
    assert twin.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False).tokens == a
    assert all(torch.equal(x, y) for x, y in zip(m(PROMPTS), twin(PROMPTS)))
    # against the float model (the BF16 checkpoint of the same seed): recorded, not gated
    f = GLM52(ckpts["bf16"], backend="cpu_ref", progress=False)
    b = f.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False).tokens
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    lq, lf = torch.cat(m(PROMPTS)), torch.cat(f(PROMPTS))
    print(f"\nfp8 vs float: greedy tokens equal {same}/{sum(map(len, b))}, logits relative Frobenius error "
          f"{float((lq - lf).norm() / lf.norm()):.3e}")


def test_quantization_none_dequantizes_at_load_as_before(ckpts, tmp_path):
    twin = dequantized_twin(ckpts["fp8"], tmp_path / "twin")
    m = GLM52(ckpts["fp8"], backend="cpu_ref", progress=False, quantization="none")
    t = GLM52(twin, backend="cpu_ref", progress=False)
    assert m.layers[1].wq_a.format == "dense" and m.layers[1].e_w13.format == "dense"
    assert all(torch.equal(x, y) for x, y in zip(m(PROMPTS), t(PROMPTS)))
    _, sd = load_checkpoint(ckpts["w8a8"], progress=False, quantization="none")
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    _, q = load_checkpoint(ckpts["w8a8"], progress=False)
    assert torch.equal(sd[Q_A], q[Q_A].dense()) and torch.equal(sd[EXPERT_UP], q[EXPERT_UP].dense())


# ---- msModelSlim AscendV1 ----------------------------------------------------------------------------
@pytest.mark.parametrize("q", ["w8a8", "w4a8"])
def test_ascend_checkpoints_load_the_mixed_recipe_and_generate(ckpts, q):
    desc = json.load(open(os.path.join(ckpts[q], ASCEND_DESCRIPTION)))
    assert desc[Q_A] == "W8A8" and desc[EXPERT_UP] == ("W4A8_DYNAMIC" if q == "w4a8" else "W8A8_DYNAMIC")
    assert desc[SHARED_GATE] == "W8A8_DYNAMIC" and desc[KV_B] == desc[ROUTER] == "FLOAT"
    assert desc["model.layers.0.self_attn.indexer.wk.weight"] == "FLOAT"
    cfg, sd = load_checkpoint(ckpts[q], progress=False)
    _, ref = load_checkpoint(ckpts["bf16"], progress=False)
    for name, shape in expected_tensors(cfg).items():
        fmt = recipe_format(name, q)
        v = sd[name]
        if fmt == "dense":
            assert isinstance(v, torch.Tensor) and torch.equal(v, ref[name]), name   # floats from the ckpt
            continue
        assert v.format == fmt and tuple(v.shape) == shape, name
        if fmt != "w8a8_static":        # the stored codes are exactly the BF16 weight quantized
            assert _same_weight(v, quantize_weight(ref[name], fmt)), name
    st = sd[Q_A]                        # static: calibrated asymmetric input, the bias it implies
    assert float(st.aux["input_offset"]) != 0 and float(st.aux["input_scale"]) > 0
    assert torch.equal(st.aux["quant_bias"], (-st.aux["input_offset"].double() * st.data.double().sum(-1))
                       .round().to(torch.int32)) and bool(st.aux["quant_bias"].ne(0).any())
    torch.testing.assert_close(st.aux["deq_scale"], st.aux["input_scale"] * st.scales)
    if q == "w4a8":
        codes = unpack_int4_rows(sd[EXPERT_UP].data)
        assert codes.shape == sd[EXPERT_UP].shape and int(codes.min()) >= -8 and int(codes.max()) <= 7
    m = GLM52(ckpts[q], backend="cpu_ref", progress=False)
    out = m.generate(PROMPTS, max_new_tokens=6, stop_at_eos=False)
    assert [len(t) for t in out.tokens] == [6, 6, 6]
    assert m.load_stats["stored"] == q and m.layers[1].wq_a.format == "w8a8_static"
    assert m.layers[1].e_w13.format == recipe_format(EXPERT_UP, q) and m.layers[1].e_w13.shape[0] == 8
    f = GLM52(ckpts["bf16"], backend="cpu_ref", progress=False)
    lq, lf = torch.cat(m(PROMPTS)), torch.cat(f(PROMPTS))
    print(f"\n{q} vs float: logits relative Frobenius error {float((lq - lf).norm() / lf.norm()):.3e}")


def _edit(path: str, fn) -> None:
    file = os.path.join(path, ASCEND_SINGLE)
    t = load_file(file)
    fn(t)
    save_file(t, file, metadata={"format": "pt"})


def _edit_desc(path: str, fn) -> None:
    file = os.path.join(path, ASCEND_DESCRIPTION)
    d = json.load(open(file))
    fn(d)
    json.dump(d, open(file, "w"))


def test_ascend_loader_refuses_by_name(ckpts, tmp_path):
    p = _copy(ckpts["w8a8"], tmp_path / "unknown")
    _edit_desc(p, lambda d: d.__setitem__(EXPERT_UP, "W8A16"))
    with pytest.raises(CheckpointError, match=f"tensor '{EXPERT_UP}': unknown quantization type 'W8A16'"):
        load_checkpoint(p, progress=False)
    p = _copy(ckpts["w8a8"], tmp_path / "unknown_part")        # a part's own type is checked too, not only its weight's
    part = EXPERT_UP.removesuffix("weight") + "weight_scale"
    _edit_desc(p, lambda d: d.__setitem__(part, "W8A16"))
    with pytest.raises(CheckpointError, match=f"tensor '{part}': unknown quantization type 'W8A16'"):
        load_checkpoint(p, progress=False)
    p = _copy(ckpts["w8a8"], tmp_path / "missing")
    _edit(p, lambda t: t.pop(Q_A.removesuffix("weight") + "deq_scale"))
    with pytest.raises(CheckpointError, match=f"missing tensor '{Q_A.removesuffix('weight')}deq_scale' "
                                              f"\\(W8A8 weight '{Q_A}' needs it"):
        load_checkpoint(p, progress=False)
    p = _copy(ckpts["w8a8"], tmp_path / "shape")
    scale = EXPERT_DOWN.removesuffix("weight") + "weight_scale"
    _edit(p, lambda t: t.__setitem__(scale, t[scale][:-1].clone()))
    with pytest.raises(CheckpointError, match=f"tensor '{scale}' in .* has shape \\[63, 1\\], expected \\[64\\] or "
                                              f"\\[64, 1\\] \\(W8A8_DYNAMIC weight \\[64, 32\\]\\)"):
        load_checkpoint(p, progress=False)
    p = _copy(ckpts["w8a8"], tmp_path / "dtype")
    _edit(p, lambda t: t.__setitem__(Q_A, t[Q_A].float()))
    with pytest.raises(CheckpointError, match=f"tensor '{Q_A}' in .* has dtype F32, expected I8"):
        load_checkpoint(p, progress=False)
    p = _copy(ckpts["w8a8"], tmp_path / "norm")
    _edit_desc(p, lambda d: d.__setitem__("model.norm.weight", "W8A8_DYNAMIC"))
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is W8A8_DYNAMIC .* must be FLOAT"):
        load_checkpoint(p, progress=False)
    p = _copy(ckpts["w8a8"], tmp_path / "float-aux")
    _edit(p, lambda t: t.__setitem__(KV_B.removesuffix("weight") + "weight_scale", torch.ones(4, 1)))
    with pytest.raises(CheckpointError, match=f"its weight '{KV_B}' is FLOAT"):
        load_checkpoint(p, progress=False)


def test_ascend_int64_deq_scale_and_unpacked_int4_codes_are_converted(ckpts, tmp_path):
    _, want = load_checkpoint(ckpts["w4a8"], progress=False)
    p = _copy(ckpts["w4a8"], tmp_path / "variants")
    deq = Q_A.removesuffix("weight") + "deq_scale"

    def change(t):
        t[deq] = t[deq].view(torch.int32).to(torch.int64)             # fp16 models: f32 bits in an int64
        t[EXPERT_UP] = unpack_int4_rows(t[EXPERT_UP])                 # int4 codes one per int8
        sb = EXPERT_UP.removesuffix("weight") + "scale_bias"
        t[sb] = torch.cat([t[sb] * 0.25, t[sb] * 0.75], dim=1)        # [N, m], summed over m
    _edit(p, change)
    _, got = load_checkpoint(p, progress=False)
    assert _same_weight(got[Q_A], want[Q_A]) and _same_weight(got[EXPERT_UP], want[EXPERT_UP])
    _edit(p, lambda t: t.__setitem__(EXPERT_UP, t[EXPERT_UP] * 2))   # codes outside int4
    with pytest.raises(CheckpointError, match=f"'{EXPERT_UP}' is W4A8_DYNAMIC with unpacked int8 codes outside"):
        load_checkpoint(p, progress=False)


# ---- online quantization -----------------------------------------------------------------------------
def test_online_fp8_equals_the_offline_checkpoint(ckpts):
    _, on = load_checkpoint(ckpts["bf16"], progress=False, quantization="fp8")
    _, off = load_checkpoint(ckpts["fp8"], progress=False)
    assert on.keys() == off.keys()
    for k in on:
        assert _same_weight(on[k], off[k]) if isinstance(off[k], Weight) else torch.equal(on[k], off[k]), k
    a = GLM52(ckpts["bf16"], backend="cpu_ref", progress=False, quantization="fp8")
    b = GLM52(ckpts["fp8"], backend="cpu_ref", progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a(PROMPTS), b(PROMPTS)))
    assert a.generate(PROMPTS, max_new_tokens=5).tokens == b.generate(PROMPTS, max_new_tokens=5).tokens


@pytest.mark.parametrize("q", ["w8a8", "w4a8"])
def test_online_int_quantization_equals_offline_where_the_formats_coincide(ckpts, q):
    _, on = load_checkpoint(ckpts["bf16"], progress=False, quantization=q)
    _, off = load_checkpoint(ckpts[q], progress=False)
    coincide = 0
    for k, v in on.items():
        if recipe_format(k, q) == "w8a8_static":      # online has no calibration: dynamic instead
            assert v.format == "w8a8_dynamic", k
        elif isinstance(v, Weight):
            assert _same_weight(v, off[k]), k
            coincide += 1
        else:
            assert torch.equal(v, off[k]), k
    assert coincide > 0
    with pytest.raises(CheckpointError, match="asks for block-FP8 weights .*, but checkpoint .* holds msModelSlim"):
        load_checkpoint(ckpts[q], progress=False, quantization="fp8")


def test_quantization_argument_is_checked_and_random_weights_quantize():
    from glm52_backends.tiny import tiny_config
    with pytest.raises(ValueError, match="GLM52: quantization must be None .* got 'int8'"):
        GLM52(tiny_config(layers=2)[0], backend="cpu_ref", quantization="int8", progress=False)
    m = GLM52(tiny_config(layers=2)[0], backend="cpu_ref", quantization="w4a8", progress=False)
    assert m.layers[1].e_w13.format == "w4a8_dynamic" and m.layers[1].wo.format == "w8a8_dynamic"
    assert m.layers[1].s_w13.format == "w8a8_dynamic" and len(m.generate([[1, 2, 3]], max_new_tokens=2).tokens[0]) == 2


# ---- rank slices ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,quantization", [("fp8-8", None), ("w8a8", None), ("w4a8", None), ("bf16", "w8a8")])
def test_rank_slices_equal_slices_of_the_whole_weights(ckpts, tmp_path_factory, which, quantization):
    path = ckpts.get(which) or make_tiny_checkpoint(str(tmp_path_factory.mktemp("f8") / "ck"), quant="fp8",
                                                    fp8_block=(8, 8), mtp=True, layers=LAYERS, seed=SEED)
    cfg, whole = load_checkpoint(path, progress=False, quantization=quantization)
    for tp, ep in ((2, 1), (2, 2)):
        plan = ParallelPlan(tp=tp, ep=ep)
        ranks = []
        for r in range(tp):
            lay = plan.layout(r, cfg)
            stats = {}
            _, sd = load_checkpoint_shard(path, lay, progress=False, stats=stats, quantization=quantization)
            assert 0 < stats["bytes_read"] < stats["bytes_total"]
            for k, v in sd.items():
                want = slice_weight(whole[k], lay.slice_of(k, tuple(whole[k].shape)), k) \
                    if isinstance(whole[k], Weight) else lay.local(k, whole[k])
                assert (_same_weight(v, want) if isinstance(v, Weight) else torch.equal(v, want)), (k, r)
            ranks.append(sd)
        # a row-split (input-split) linear: the ranks' partial products sum to the whole one's (exactly for
        # per-tensor static and per-128 FP8 activation scales; a per-token dynamic scale is each rank's own)
        if whole[O_PROJ].format not in ("w8a8_static", "fp8_block"):
            continue
        x = torch.randn(5, whole[O_PROJ].shape[1], generator=torch.Generator().manual_seed(1))
        parts = torch.chunk(x, tp, dim=1)
        total = sum(matmul_reference(p, sd[O_PROJ]) for p, sd in zip(parts, ranks))
        torch.testing.assert_close(total, matmul_reference(x, whole[O_PROJ]), rtol=1e-12, atol=1e-12)


# ---- the planner counts what the model holds -------------------------------------------------------------
def _tiny_deployment(ckpt: str, weights: str, backend: str | None = None):
    raw = yaml.safe_load(bundled_configs()["cpu-tiny"].read_text(encoding="utf-8"))
    raw["model"] = ckpt
    if backend is not None:           # the plan is the same arithmetic on any device type
        raw["backend"], raw["device_type"] = backend, {"ascend": "npu"}.get(backend, raw["device_type"])
    raw["dtypes"] = {"weights": weights, "kv_cache": "bf16"}
    raw["capabilities"]["weight_dtypes"] = ["fp32", "bf16", "fp8", "w8a8", "w4a8"]
    return from_dict(raw)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "w8a8", "w4a8"])
def test_planned_weight_bytes_equal_the_bytes_the_model_holds(ckpts, fmt):
    from glm52_backends.planner import plan
    from glm52_backends.weights import COMPONENTS
    m = GLM52(ckpts[fmt], backend="cpu_ref", dtype=torch.bfloat16, progress=False)
    p = plan(_tiny_deployment(ckpts[fmt], fmt), m.cfg)
    planned = sum(r.bytes for r in p.rows if r.component in COMPONENTS)
    held = held_bytes(m.net)
    assert planned == held == planned_bytes(m.cfg, fmt), (fmt, planned, held)
    if fmt != "bf16":
        assert held < 0.8 * held_bytes(GLM52(ckpts["bf16"], backend="cpu_ref", dtype=torch.bfloat16,
                                             progress=False).net)


def test_planned_bytes_equal_held_bytes_after_the_ascend_preparation(ckpts, monkeypatch):
    """The Ascend backend prepares W8A8 weights at load (bfloat16 expert scales, the static format's int8
    zero point; codes cast to NZ in place): `glm52 plan` for an ascend deployment counts what that
    allocates, read from the backend's declaration without creating it, and equals what a loaded model
    holds, preparation included."""
    from glm52_backends.planner import plan
    from glm52_backends.weights import COMPONENTS, Weight
    monkeypatch.setenv("GLM52_ASCEND_EMULATE", "1")
    m = GLM52(ckpts["w8a8"], backend="ascend", dtype=torch.bfloat16, progress=False)
    made = 0
    for L in m.net.layers + [m.net.mtp]:
        for v in [*vars(L).values(), *(vars(L.indexer).values() if L.indexer is not None else ())]:
            if isinstance(v, Weight) and v.prepared is not None:
                made += sum(t.numel() * t.element_size() for t in v.prepared.tensors().values())
    assert made > 0 and m.ops.backend.preparations == 0
    planned = sum(r.bytes for r in plan(_tiny_deployment(ckpts["w8a8"], "w8a8", "ascend"), m.cfg).rows
                  if r.component in COMPONENTS)
    assert planned == held_bytes(m.net) == planned_bytes(m.cfg, "w8a8") + made


def test_deployment_weights_dtype_is_honoured_or_refused_by_name(ckpts):
    m = GLM52.from_deployment(_tiny_deployment(ckpts["w8a8"], "w8a8"), progress=False)
    assert m.load_stats["stored"] == "w8a8" and m.layers[1].wq_a.format == "w8a8_static"
    m = GLM52.from_deployment(_tiny_deployment(ckpts["bf16"], "w4a8"), progress=False)
    assert m.layers[1].e_w13.format == "w4a8_dynamic"
    m = GLM52.from_deployment(_tiny_deployment(ckpts["fp8"], "bf16"), progress=False)
    assert m.layers[1].e_w13.format == "dense" and m.load_stats["quantization"] == "none"
    with pytest.raises(DeploymentError, match="'dtypes.weights': 'fp8': quantization='fp8' asks for block-FP8 "
                                              "weights .*, but checkpoint .* holds msModelSlim W4A8 weights"):
        GLM52.from_deployment(_tiny_deployment(ckpts["w4a8"], "fp8"), progress=False)
