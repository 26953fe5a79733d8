"""Reliability (issue 26): one test group per class, each case with the message a user now sees.

  1  hangs                       (every process group gets GLM52_COLLECTIVE_TIMEOUT_S; a stopped rank)
  2  silent wrong results        (scales no quantizer writes, NaN through int8 codes, stack, c8_li)
  3  a model mismatched with its parts (tokenizer vs vocab_size, world size vs plan)
  4  data loss, half-written files (atomic writes, Ctrl-C inside a step, an msModelSlim default folder)
  5  crashes and unclear errors  (sys.exit in a backend op, bad env, non-UTF-8 prompts, YAML merge, ...)
  6  the mutation audit's survivors (non-square FP8 blocks, cut checks, output device, sparse_mla idx)
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm52_backends import GLM52
from glm52_backends.config import ConfigError
from glm52_backends.loader import CheckpointError, load_checkpoint, load_checkpoint_shard, load_tokenizer
from glm52_backends.parallel import LayoutError, ParallelPlan
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

from conftest import Planted, cache_state, env_vars, same_cache_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ASCEND_FILE = "quant_model_weights.safetensors"
Q = "model.layers.0.self_attn.q_a_proj."          # a W8A8 static projection of the tiny recipe
E = "model.layers.1.mlp.experts.0.gate_proj."     # a W8A8 dynamic expert


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("r") / "w8a8", quant="w8a8", layers=2, seed=5, mtp=True)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("r") / "bf16", layers=2, seed=6, mtp=True)


def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(folder: str, file: str, edit) -> None:
    path = os.path.join(folder, file)
    t = load_file(path)
    edit(t)
    save_file(t, path, metadata={"format": "pt"})


# ==== 1. hangs ======================================================================================
def test_every_process_group_gets_the_collective_timeout(bf16, tmp_path, monkeypatch):
    """setup() makes the tp and dp groups with GLM52_COLLECTIVE_TIMEOUT_S (torch's default for a group
    made without one is 30 minutes, whatever the default group's timeout)."""
    import torch.distributed as dist

    from glm52_backends.engine import distributed
    from glm52_backends.loader import load_config
    made = []
    real = dist.new_group

    def spy(*a, **k):
        made.append(k.get("timeout"))
        return real(*a, **k)

    monkeypatch.setattr(dist, "new_group", spy)
    monkeypatch.setenv("GLM52_COLLECTIVE_TIMEOUT_S", "7.5")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        _, _, comms = distributed.setup(ParallelPlan(), load_config(bf16), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert made and all(t == datetime.timedelta(seconds=7.5) for t in made), made
    assert comms.timeout == datetime.timedelta(seconds=7.5)          # for a backend's own groups


@pytest.mark.parametrize("value", ["soon", "-1", "0", "nan", "inf", "31536000.5"])
def test_a_bad_collective_timeout_is_refused_by_name(value, monkeypatch):
    from glm52_backends.engine.distributed import collective_timeout
    monkeypatch.setenv("GLM52_COLLECTIVE_TIMEOUT_S", value)
    with pytest.raises(LayoutError, match=f"GLM52_COLLECTIVE_TIMEOUT_S='{value}': must be a positive number"):
        collective_timeout()
    monkeypatch.setenv("GLM52_COLLECTIVE_TIMEOUT_S", "31536000")             # a year: the most it takes
    assert collective_timeout() == datetime.timedelta(days=365)
    monkeypatch.delenv("GLM52_COLLECTIVE_TIMEOUT_S")
    assert collective_timeout() == datetime.timedelta(seconds=300)


def test_a_stopped_rank_fails_the_others_by_the_timeout(tmp_path, bf16):
    """Rank 1 stops itself (SIGSTOP, as a hung kernel would) after loading; rank 0's first tp collective
    fails after GLM52_COLLECTIVE_TIMEOUT_S = 4 s, not after torch's 30 minutes."""
    import signal
    import subprocess
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GLM52_COLLECTIVE_TIMEOUT_S="4")
    init = tmp_path / "rdzv"
    procs = [subprocess.Popen([sys.executable, worker, str(init), str(r), "2", bf16, "2", "2", "float32",
                               "--stop-after-load"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for r in range(2)]
    try:
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
        assert procs[0].returncode != 0
        assert "timed out" in err.lower() or "timeout" in err.lower(), err[-2000:]
        assert waited < 100, waited
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()


# ==== 2. silent wrong results: values no quantizer writes =============================================
def _bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32).item()) & 0xFFFFFFFF


SCALE_CASES = [
    ("input_scale 0", Q + "input_scale", lambda t: t.zero_(), "value(s) <= 0"),
    ("input_scale 1e-40", Q + "input_scale", lambda t: t.fill_(1e-40), "denormal"),
    ("input_scale negative", Q + "input_scale", lambda t: t.fill_(-0.02), "<= 0"),
    ("input_offset outside int8", Q + "input_offset", lambda t: t.fill_(300.0), "outside int8 [-128, 127]"),
    ("negative per-channel scale", E + "weight_scale", lambda t: t.__setitem__(3, -t[3]), "<= 0"),
    ("weight_offset outside int8", E + "weight_offset", lambda t: t.__setitem__(0, 1000.0), "outside the code range"),
    ("deq_scale 3e38", Q + "deq_scale", lambda t: t.__setitem__(1, 3e38), "overflows float32"),
]


@pytest.mark.parametrize("what,name,edit,reason", SCALE_CASES, ids=[c[0] for c in SCALE_CASES])
def test_scales_no_quantizer_writes_are_refused_naming_the_tensor(w8a8, tmp_path, what, name, edit, reason):
    ck = _copy(w8a8, tmp_path / "ck")

    def change(t):
        edit(t[name])
    _edit_tensors(ck, ASCEND_FILE, change)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck, progress=False)
    msg = str(e.value)
    assert f"tensor '{name}'" in msg and reason in msg and ASCEND_FILE in msg, msg
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):     # dequantized too ("none")
        load_checkpoint(ck, progress=False, quantization="none")


def test_int64_deq_scale_decoding_to_denormals_is_refused(w8a8, tmp_path):
    """fp16 models store deq_scale as the float32 bit pattern in int64: a pattern below the smallest
    normal float32 decodes to a denormal scale, which no quantizer writes."""
    ck = _copy(w8a8, tmp_path / "ck")

    def change(t):
        d = t[Q + "deq_scale"]
        bits = torch.tensor([_bits(float(v)) for v in d], dtype=torch.int64)
        bits[2] = 5                                   # 5 * 2**-149: a denormal
        t[Q + "deq_scale"] = bits
    _edit_tensors(ck, ASCEND_FILE, change)
    with pytest.raises(CheckpointError, match=r"deq_scale' \(W8A8 deq_scale\): 1 value\(s\) denormal"):
        load_checkpoint(ck, progress=False)


def test_unchanged_int64_deq_scale_still_loads(w8a8, tmp_path):
    ck = _copy(w8a8, tmp_path / "ck")
    _edit_tensors(ck, ASCEND_FILE, lambda t: t.__setitem__(
        Q + "deq_scale", torch.tensor([_bits(float(v)) for v in t[Q + "deq_scale"]], dtype=torch.int64)))
    _, sd = load_checkpoint(ck, progress=False)
    want = load_file(os.path.join(w8a8, ASCEND_FILE))[Q + "deq_scale"]
    assert torch.equal(sd[Q + "weight"].aux["deq_scale"], want)


def test_all_zero_fp8_scale_is_refused(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=(16, 16), layers=2, seed=2)
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    _edit_tensors(ck, "model.safetensors", lambda t: t[name].zero_())
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' \(fp8_block scales\): .* <= 0.*weight_scale_inv must "
                                              r"be a positive normal float32"):
        load_checkpoint(ck, progress=False)


def test_in_memory_weights_are_checked_like_a_checkpoint():
    from glm52_backends.quant import check_weight
    from glm52_backends.weights import quantize_weight
    w = quantize_weight(torch.randn(8, 16), "w8a8_static", input_scale=0.05)
    check_weight(w, "q")
    w.aux["input_scale"] = torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"q \(w8a8_static\): its input_scale: 1 value\(s\) <= 0"):
        check_weight(w, "q")


# ---- NaN through int8 codes -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kw", [("w8a8_static", dict(input_scale=0.05)), ("w8a8_dynamic", {}),
                                    ("w4a8_dynamic", {}), ("fp8_block", dict(block=(8, 8)))])
def test_quantized_matmul_keeps_nan_and_inf_visible(fmt, kw):
    """int8 codes hold no NaN (the cast makes NaN code 0, inf 127): the reference keeps a non-finite
    activation row non-finite, so the per-step check sees it as it does for a BF16 model."""
    from glm52_backends.quant import matmul_reference
    from glm52_backends.weights import quantize_weight
    w = quantize_weight(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), fmt, **kw)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    x[1, 2], x[2, 0] = float("nan"), float("inf")
    y = matmul_reference(x, w)
    assert torch.isfinite(y).all(-1).tolist() == [True, False, False]


def test_a_w8a8_model_trips_the_finiteness_check_like_a_bf16_one(w8a8, bf16):
    """NaN out of the q_a_layernorm (width q_lora_rank) reaches the W8A8-static q_b_proj: before, its int8
    codes turned it into 0 and the logits stayed finite."""
    from glm52_backends.backends.cpu_ref import CpuRefBackend
    ref = CpuRefBackend()

    def nan_norm(x, weight, eps):
        out = ref.rms_norm(x, weight, eps)
        return out.fill_(float("nan")) if x.shape[-1] == 48 else out   # q_lora_rank = 48: q_a_layernorm only

    for ck in (bf16, w8a8):
        m = GLM52(ck, backend=Planted("nan-q-norm", rms_norm=nan_norm), progress=False)
        with pytest.raises(FloatingPointError, match="NaN/inf"):
            m.generate([[1, 2, 3]], max_new_tokens=2)


def test_stack_refuses_experts_of_different_blocks_or_recipes():
    from glm52_backends.weights import quantize_weight, stack
    w = torch.randn(16, 16)
    a = quantize_weight(w, "fp8_block", block=(8, 8))
    stack([a, quantize_weight(w, "fp8_block", block=(8, 8))])
    with pytest.raises(ValueError, match=r"stack: experts in different formats/blocks/recipes .*\(4, 4\).*\(8, 8\)"):
        stack([a, quantize_weight(w, "fp8_block", block=(4, 4))])
    with pytest.raises(ValueError, match="fp8_g128_ue8m0"):
        stack([a, quantize_weight(w, "fp8_block", block=(8, 8), recipe="fp8_g128_ue8m0")])
    with pytest.raises(ValueError, match="w8a8_dynamic"):
        stack([a, quantize_weight(w, "w8a8_dynamic")])


def test_c8_li_codes_use_the_stored_f16_scale():
    """The codes divide by the scale as stored (f16), not by the unrounded f32 one: decoding multiplies
    the codes by the stored scale, so only that is exact. Keys chosen where the two give other codes."""
    from glm52_backends.cache_formats import hadamard, quantize_c8_li
    g = torch.Generator().manual_seed(0)
    k = torch.randn(64, 16, generator=g) * 3.1
    q, s16 = quantize_c8_li(k)
    assert s16.dtype == torch.float16
    kr = hadamard(k)
    want = torch.round(kr / s16.float()[:, None]).clamp(-128, 127).to(torch.int8)
    unrounded = torch.round(kr / (kr.abs().amax(-1) / 127)[:, None]).clamp(-128, 127).to(torch.int8)
    assert not torch.equal(want, unrounded)          # the keys do tell the two apart
    assert torch.equal(q, want)


# ==== 3. a model mismatched with its parts ==========================================================
def test_another_models_tokenizer_is_refused(tmp_path):
    big = make_tiny_checkpoint(tmp_path / "v1024", layers=1, vocab_size=1024)
    small = make_tiny_checkpoint(tmp_path / "v256", layers=1, vocab_size=256)
    shutil.copy(os.path.join(small, "tokenizer.json"), os.path.join(big, "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the tokenizer has 256 tokens, but the model's "
                                              r"vocab_size is 1024 \(768 of the model's ids would decode to nothing\)"):
        GLM52(big, backend="cpu_ref", progress=False)
    assert load_tokenizer(small).vocab_size == 256


def test_a_one_process_layout_under_a_multi_process_launch_is_refused(bf16, capsys):
    from glm52_backends.cli import main
    from glm52_backends.deploy import DeploymentError, load_deployment
    with env_vars({"WORLD_SIZE": "2"}):
        assert main(["generate", bf16, "--backend", "cpu_ref", "--ids", "1,2", "--max-new-tokens", "1",
                     "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "one of WORLD_SIZE=2 launched processes, but the parallel plan (tp=1, dp=1, ep=1) needs 1" in err
        with pytest.raises(DeploymentError, match=r"'parallel': tp x dp = 1 x 1 = 1 device\(s\), but 2 processes"):
            load_deployment("cpu-tiny").engine_config(model=bf16)
        with env_vars({"WORLD_SIZE": "two"}):
            with pytest.raises(LayoutError, match="WORLD_SIZE='two' in the environment is not an integer"):
                load_deployment("cpu-tiny").engine_config(model=bf16)


# ==== 4. data loss and half-written files ===========================================================
def test_atomic_write_leaves_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    from glm52_backends import files
    f = tmp_path / "report.json"
    f.write_text('{"good": "report"}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        files.write_text(f, "x" * 1000)
    assert f.read_text() == '{"good": "report"}' and os.listdir(tmp_path) == ["report.json"]
    monkeypatch.undo()
    files.write_text(f, "new")
    assert f.read_text() == "new" and os.listdir(tmp_path) == ["report.json"]


def test_conformance_json_is_written_atomically(tmp_path, monkeypatch, capsys):
    from glm52_backends import files
    from glm52_backends.conformance.cli import conformance_main
    f = tmp_path / "conf.json"
    f.write_text("previous")
    args = ["--backend", "cpu_ref", "--quick", "--op", "rms_norm", "--no-model", "--json", str(f)]
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "disk full")))
    assert conformance_main(args) == 2
    assert "cannot write the report" in capsys.readouterr().err
    assert f.read_text() == "previous" and os.listdir(tmp_path) == ["conf.json"]
    monkeypatch.undo()
    assert conformance_main(args) == 0
    assert json.loads(f.read_text())[0]["backend"] == "cpu_ref"


def test_ctrl_c_inside_a_step_rolls_the_cache_back(bf16):
    """KeyboardInterrupt is not an Exception: the step's transaction rolls back on BaseException."""
    m = GLM52(bf16, backend="cpu_ref", progress=False)
    cache = m.new_cache(256, mtp=True)
    m.extend(cache, {0: [1, 2, 3]})
    before = cache_state(cache)
    calls = {"n": 0}
    real = m.ops.sparse_mla

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:                            # the second layer: the first already wrote its rows
            raise KeyboardInterrupt
        return real(*a, **k)

    m.ops.sparse_mla = interrupted
    with pytest.raises(KeyboardInterrupt):
        m.extend(cache, {0: [4, 5], 1: list(range(1, 30))})
    assert same_cache_state(cache_state(cache), before)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        m.run(cache, {0: [4], 2: [7, 8]})
    assert same_cache_state(cache_state(cache), before)
    m.ops.sparse_mla = real
    with pytest.raises(KeyboardInterrupt), cache.transaction():       # the transaction itself
        cache.reserve({9: 40})
        raise KeyboardInterrupt
    assert same_cache_state(cache_state(cache), before)


def test_the_default_on_an_msmodelslim_folder_is_kept(w8a8, tmp_path):
    """ensure_default_checkpoint validates an AscendV1 folder with its description: a whole one is kept,
    never deleted and replaced by a random model."""
    from glm52_backends.devtools import make_tiny
    d = _copy(w8a8, tmp_path / "default")
    before = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}
    assert make_tiny.ensure_default_checkpoint(d) == d
    assert {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)} == before


# ==== 5. crashes and unclear errors ===================================================================
def _exits(*a, **k):
    sys.exit(3)


def test_a_backend_op_calling_sys_exit_is_a_reported_failure(bf16, capsys):
    from glm52_backends.cli import main
    from glm52_backends.conformance import run
    from glm52_backends.registry import register_backend, unregister_backend
    rep = run(Planted("exits", linear=_exits), quick=True, ops=["linear"], model=False)
    assert not rep.passed
    assert any("backend 'exits', op linear" in r.detail and "called sys.exit(3)" in r.detail
               for r in rep.failures), [r.detail for r in rep.results]
    register_backend("exits-in-op", lambda: Planted("exits-in-op", linear=_exits))
    try:
        rc = main(["generate", bf16, "--backend", "exits-in-op", "--ids", "1,2", "--max-new-tokens", "1", "--quiet"])
    finally:
        unregister_backend("exits-in-op")
    err = capsys.readouterr().err
    assert rc == 2
    assert "glm52 generate: error: " in err and "backend 'exits-in-op', op linear, layer 0 (native): called " \
        "sys.exit(3); a backend must raise" in err, err


def test_ctrl_c_still_ends_conformance():
    from glm52_backends.conformance import run

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(Planted("ctrl-c", linear=ctrl_c), quick=True, ops=["linear"], model=False)


def test_unknown_conformance_ops_are_refused():
    from glm52_backends.conformance import run
    with pytest.raises(ValueError, match=r"unknown op 'nosuch'; the ops are .*rms_norm"):
        run("cpu_ref", quick=True, ops=["nosuch"])
    with pytest.raises(ValueError, match="selects no case"):
        run("cpu_ref", quick=True, ops=["model"], model=False)


def test_a_prompt_that_is_not_utf8_is_refused(bf16):
    m = GLM52(bf16, backend="cpu_ref", progress=False)
    bad = b"def \xff\xfe".decode("utf-8", "surrogateescape")          # what sys.argv holds for such bytes
    with pytest.raises(ValueError, match=r"prompt 0 is not valid UTF-8 text: character 4 is '\\udcff'"):
        m.generate([bad], max_new_tokens=1)


@pytest.mark.parametrize("env,fragment", [
    ({"RANK": "zero"}, "RANK='zero' in the environment is not an integer"),
    ({"WORLD_SIZE": "2x"}, "WORLD_SIZE='2x' in the environment is not an integer"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' in the environment is not an integer"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 in the environment is outside [1, 65535]"),
    ({"RANK": "5"}, "RANK=5 in the environment is outside [0, 1]"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 in the environment is outside [0, 1]"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 in the environment is outside [0, 1]"),
    ({"GLM52_COLLECTIVE_TIMEOUT_S": "a while"}, "GLM52_COLLECTIVE_TIMEOUT_S='a while'"),
])
def test_garbage_in_the_launch_environment_is_refused_by_name(env, fragment):
    import torch.distributed as dist

    from glm52_backends.engine.distributed import init_process_group
    base = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    with env_vars({**base, **env}):
        with pytest.raises(LayoutError, match=__import__("re").escape(fragment)):
            init_process_group("cpu")
    assert not dist.is_initialized()


def test_launch_env_takes_every_rank_in_range():
    from glm52_backends.engine.distributed import launch_env
    for rank in ("0", "1"):
        with env_vars({"RANK": rank, "WORLD_SIZE": "2", "MASTER_PORT": "1", "LOCAL_RANK": rank}):
            assert launch_env() == (int(rank), 2)


def test_the_temporary_file_is_written_beside_its_target(tmp_path, monkeypatch):
    """The rename is atomic only within one file system: the temporary file lives in the target's folder
    (and in the working folder for a bare name), never elsewhere."""
    from glm52_backends import files
    made = []
    real = files.tempfile.mkstemp

    def spy(*a, **k):
        fd, path = real(*a, **k)
        made.append(path)
        return fd, path
    monkeypatch.setattr(files.tempfile, "mkstemp", spy)
    files.write_text(tmp_path / "sub" / "plan.md", "x")
    monkeypatch.chdir(tmp_path)
    files.write_text("bare.md", "y")
    assert [os.path.dirname(os.path.abspath(p)) for p in made] == [str(tmp_path / "sub"), str(tmp_path)]
    assert (tmp_path / "sub" / "plan.md").read_text() == "x" and (tmp_path / "bare.md").read_text() == "y"


def test_a_written_file_gets_the_mode_open_would_give(tmp_path):
    """mkstemp makes 0600; the file ends as a plain `open()` would make it: 0666 less the umask."""
    from glm52_backends import files
    old = os.umask(0o022)
    try:
        files.write_text(tmp_path / "a.md", "x")
        os.umask(0o077)
        files.write_text(tmp_path / "b.md", "y")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.md").st_mode & 0o777, os.stat(tmp_path / "b.md").st_mode & 0o777) == (0o644, 0o600)


def test_an_ascend_folder_without_its_description_says_so(w8a8, tmp_path):
    ck = _copy(w8a8, tmp_path / "ck")
    os.remove(os.path.join(ck, "quant_model_description.json"))
    with pytest.raises(CheckpointError, match=r"holds quant_model_weights.safetensors \(an msModelSlim AscendV1 "
                                              r"folder\) but no quant_model_description.json"):
        load_checkpoint(ck, progress=False)


def test_train_tiny_refuses_an_occupied_out_before_training(tmp_path, monkeypatch, capsys):
    from glm52_backends.devtools import train_tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "training.json").write_text("{}")
    monkeypatch.setattr(train_tiny, "train", lambda a: pytest.fail("trained before checking --out"))
    assert train_tiny.main(["--out", str(out)]) == 2
    assert "already holds training.json" in capsys.readouterr().err
    (out / "training.json").unlink()
    (out / "model-00001-of-00002.safetensors").write_text("")
    assert train_tiny.main(["--out", str(out)]) == 2
    assert "already holds model-00001-of-00002.safetensors" in capsys.readouterr().err


def test_a_request_with_one_token_left_drafts_none(bf16):
    """A request with b new tokens left drafts at most b - 1: with one left its step is a plain decode
    (no verify round at all), with two it drafts one."""
    from conftest import speculative
    m = GLM52(bf16, backend="cpu_ref", progress=False)
    plain = m.generate([[1, 2, 3], [4, 5]], max_new_tokens=3, stop_at_eos=False).tokens
    res, rounds = speculative(m, [[1, 2, 3], [4, 5]], max_new_tokens=2, k=3, stop_at_eos=False)
    assert rounds.drafted == {} and res.tokens == [p[:2] for p in plain]
    assert rounds.engine.stats["drafted_tokens"] == 0 and rounds.engine.stats["decode_steps"] == 1
    res, rounds = speculative(m, [[1, 2, 3], [4, 5]], max_new_tokens=3, k=3, stop_at_eos=False)
    assert rounds.drafted == {0: [1], 1: [1]} and res.tokens == plain


def test_yaml_merge_keys_are_accepted_and_duplicates_still_refused(tmp_path):
    from glm52_backends.deploy import load_deployment
    src = open(os.path.join(os.path.dirname(__import__("glm52_backends.configs", fromlist=["x"]).__file__),
                            "cpu-tiny.yaml")).read()
    assert "\nparallel:\n" in src
    doc = tmp_path / "m.yaml"                  # `<<:` merges a mapping; the mapping's own keys override it
    doc.write_text(src.replace("\nparallel:\n  tp: 1\n  ep: 1\n  dp: 1\n", "\nparallel:\n  <<: {tp: 1, ep: 4}\n  ep: 1\n  dp: 1\n", 1))
    d = load_deployment(str(doc))
    assert (d.tp, d.dp, d.ep) == (1, 1, 1)          # tp merged in; ep the mapping's own
    doc.write_text(src.replace("\nparallel:\n  tp: 1\n  ep: 1\n  dp: 1\n", "\nparallel:\n  <<: {tp: 3}\n  ep: 1\n  dp: 1\n", 1))
    with pytest.raises(ConfigError, match="'parallel'"):
        load_deployment(str(doc))                  # the merged value is validated like any other
    dup = tmp_path / "dup.yaml"
    dup.write_text(src.replace("\nparallel:\n", "\nparallel:\n  ep: 1\n  ep: 1\n", 1))
    with pytest.raises(ConfigError, match="'ep': duplicate key"):
        load_deployment(str(dup))


def test_json_output_with_one_new_token_is_valid_json(bf16, capsys):
    from glm52_backends.cli import main
    assert main(["generate", bf16, "--backend", "cpu_ref", "--ids", "1,2", "--batch", "1", "--max-new-tokens", "1",
                 "--json", "--quiet"]) == 0
    out = capsys.readouterr().out

    def no_nan(c):
        raise AssertionError(f"{c} in the JSON output")
    d = json.loads(out, parse_constant=no_nan)
    assert d["stats"]["decode_tokens_per_s"] is None and len(d["tokens"][0]) == 1


def test_a_set_value_that_is_not_yaml_names_the_key():
    from glm52_backends.deploy import parse_override
    assert parse_override("parallel.dp=2") == ("parallel.dp", 2)
    with pytest.raises(ConfigError, match=r"--set parallel.dp: the value '\[2' is not valid YAML"):
        parse_override("parallel.dp=[2")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("parallel.dp")


def test_a_huge_expert_count_is_refused_before_building_the_inventory(bf16, tmp_path):
    ck = _copy(bf16, tmp_path / "ck")
    f = os.path.join(ck, "config.json")
    d = json.load(open(f))
    d["n_routed_experts"] = 10 ** 8
    json.dump(d, open(f, "w"))
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=r"n_routed_experts = 100000000 in 1 MoE layer\(s\) needs 300,000,000 "
                                              r"expert tensors"):
        load_checkpoint(ck, progress=False)
    assert time.monotonic() - t0 < 10


def test_a_checkpoint_with_exactly_its_expert_tensors_is_refused_for_what_it_lacks(bf16, tmp_path):
    """The expert-count guard is a bound, not a verdict: a checkpoint holding as many tensors as its
    experts need (here: those and nothing else) gets the ordinary missing-tensor report."""
    ck = _copy(bf16, tmp_path / "ck")
    n = json.load(open(os.path.join(ck, "config.json")))["num_hidden_layers"]     # the MTP layer's experts go too

    def experts_only(t):
        for k in [k for k in t if ".mlp.experts." not in k or int(k.split(".")[2]) >= n]:
            t.pop(k)
    _edit_tensors(ck, "model.safetensors", experts_only)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck, progress=False)
    assert "missing tensor 'model.embed_tokens.weight'" in str(e.value) and "n_routed_experts" not in str(e.value)


def test_a_config_json_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    fifo = folder / "config.json"
    os.mkfifo(fifo)

    def unblock():                     # a reader blocked in open() gets '{}' and fails the test instead of hanging
        time.sleep(5)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return                     # no reader: nothing was blocked
        os.write(fd, b"{}")
        os.close(fd)
    threading.Thread(target=unblock, daemon=True).start()
    for call in (lambda: load_checkpoint(str(folder), progress=False),
                 lambda: __import__("glm52_backends.config", fromlist=["x"]).ModelConfig.from_file(str(folder))):
        with pytest.raises(ConfigError, match="config.json: not a regular file"):
            call()


# ==== 6. the mutation audit's survivors ===============================================================
def test_rank_slices_of_non_square_fp8_blocks_equal_the_whole(tmp_path):
    """Block (8, 16): a row cut (q_b, kv_b, gate/up) slices the scale grid in 8-row blocks, a column cut
    (o_proj, down) in 16-column blocks. Each rank's loaded slice = the whole weight cut in memory."""
    from glm52_backends.loader import slice_weight
    from glm52_backends.weights import Weight
    ck = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=(8, 16), layers=2, seed=4, mtp=True)
    cfg, whole = load_checkpoint(ck, progress=False)
    plan = ParallelPlan(tp=2, ep=2)
    plan.validate(cfg, fp8_block=(8, 16))
    cut = {"col": 0, "row": 0}
    for rank in range(2):
        layout = plan.layout(rank, cfg)
        _, part = load_checkpoint_shard(ck, layout, progress=False)
        for name, w in part.items():
            s = layout.slice_of(name, tuple(whole[name].shape))
            if not isinstance(w, Weight) or s == "all":
                continue
            want = slice_weight(whole[name], s, name)
            assert torch.equal(w.scales, want.scales) and torch.equal(w.data.view(torch.uint8),
                                                                          want.data.view(torch.uint8)), name
            cut["col" if s[0] == 0 else "row"] += 1
    assert cut["col"] and cut["row"]


def test_the_plan_checks_o_proj_columns_against_the_column_block():
    from glm52_backends.tiny import tiny_config
    cfg, _ = tiny_config(layers=2)               # o_proj columns per rank at tp2: 4 x 24 / 2 = 48
    ParallelPlan(tp=2, ep=2).validate(cfg, fp8_block=(16, 16))
    with pytest.raises(LayoutError, match="o_proj columns per rank = 48 is not a whole number of 32-wide FP8"):
        ParallelPlan(tp=2, ep=2).validate(cfg, fp8_block=(16, 32))        # 48 rows-blocks of 16 would pass
    # an MLP width is cut in rows (gate/up: blocks of 8) and in columns (down: blocks of 16): both must be whole
    narrow, _ = tiny_config(layers=2, intermediate_size=16)
    with pytest.raises(LayoutError, match="dense MLP width per rank = 8 is not a whole number of 16-wide FP8"):
        ParallelPlan(tp=2, ep=2).validate(narrow, fp8_block=(8, 16))


def test_an_online_quantized_cut_is_checked_at_both_ends():
    from glm52_backends.loader.slicing import _check_cut
    _check_cut("w", (0, 0, 128), 256, 128, "FP8")
    _check_cut("w", (0, 128, 200), 200, 128, "FP8")                     # the last slice may end at the edge
    with pytest.raises(CheckpointError, match=r"w: the rank's slice \[0, 100\) cuts a 128-wide FP8 block"):
        _check_cut("w", (0, 0, 100), 256, 128, "FP8")
    with pytest.raises(CheckpointError, match=r"slice \[64, 128\)"):
        _check_cut("w", (0, 64, 128), 256, 128, "FP8")


def test_an_op_output_on_another_device_is_refused():
    from glm52_backends.backends.cpu_ref import CpuRefBackend
    from glm52_backends.registry import BackendOutputError, get_backend
    ref = CpuRefBackend()
    b = get_backend(Planted("meta-out", rms_norm=lambda x, weight, eps: ref.rms_norm(x, weight, eps).to("meta")))
    with pytest.raises(BackendOutputError, match="the output is on meta, expected cpu"):
        b.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)


def test_sparse_mla_refuses_an_index_with_more_rows_than_tokens():
    from glm52_backends.ops.sparse_mla import sparse_mla as ref
    q = torch.randn(2, 2, 12)
    c, kpe = torch.randn(1, 4, 8), torch.randn(1, 4, 4)
    args = (c, kpe)
    meta = (torch.zeros(1, 1, dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
            torch.tensor([0, 2], dtype=torch.int32), 0.5)
    ref(q, *args, torch.tensor([[0, -1], [0, 1]], dtype=torch.int32), *meta)
    with pytest.raises(ValueError, match=r"sparse_mla: idx must be \[T=2, topk\] \(one row per query token\), got "
                                         r"\(3, 2\)"):
        ref(q, *args, torch.tensor([[0, -1], [0, 1], [1, 0]], dtype=torch.int32), *meta)


def test_every_known_survivor_still_applies():
    """tools/mutate.py --known replays the audit's survivors against the tests above; each entry's text
    must still occur once in its module (a refactor updates the entry instead of silently dropping it)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    try:
        import mutate
    finally:
        sys.path.pop(0)
    got = mutate.known_mutants()
    assert len(got) == len(mutate.KNOWN) >= 8
    for k, m in got:
        assert m.source != open(os.path.join(mutate.REPO, k.module), encoding="utf-8").read()
        for t in k.tests:                  # each killing test exists under its name
            path, _, name = t.partition("::")
            assert f"def {name}(" in open(os.path.join(mutate.REPO, path), encoding="utf-8").read(), t
