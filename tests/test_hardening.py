"""Hardening: every bad input gets a clear error naming the culprit, nothing is half-written, no
NaN turns silently into tokens. One test group per class of the problem:

  1  data loss and half-written state     (make-tiny, the embedded default, a failed extend)
  2  silent wrong results                 (NaN/inf weights and scales, config ranges, backend outputs)
  3  inputs accepted that should be refused (token ids, sampling, context, caches, backends, YAML)
  4  raw tracebacks                       (the CLI: exit codes, one-line errors)
  5  docs                                 (README)
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from glm52_backends import GLM52, tiny
from glm52_backends.devtools import make_tiny
from glm52_backends.backends.cpu_ref import CpuRefBackend
from glm52_backends.cli import main
from glm52_backends.config import ConfigError, ModelConfig
from glm52_backends.configs import bundled_configs
from glm52_backends.deploy import DeploymentError, from_dict, load_deployment
from glm52_backends.loader import CheckpointError, load_checkpoint, load_config
from glm52_backends.ops import OP_NAMES, Capabilities
from glm52_backends.registry import (BackendContractError, BackendOutputError, BackendUnavailable, get_backend,
                                     list_backends, register_backend, unregister_backend)
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

from conftest import cache_state, same_cache_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = CpuRefBackend()


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("h") / "ck", layers=2, seed=7, index_topk=4)


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """A context of 24 tokens, with the MTP layer: generation runs into the context's end."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("h") / "short", layers=2, seed=8, index_topk=4, mtp=True,
                                max_position_embeddings=24)


@pytest.fixture(scope="module")
def model(ckpt):
    return GLM52(ckpt, backend="cpu_ref", progress=False)


class Wrapping:
    """cpu_ref's ops with some replaced: a backend that misbehaves on purpose."""

    def __init__(self, name: str, **ops):
        self.name = name
        self.capabilities = Capabilities(dtypes=(torch.float32,), weight_formats=("dense", "fp8_block"))
        for op in OP_NAMES:
            setattr(self, op, ops.get(op, getattr(R, op)))


def _edit_config(path, edit):
    file = os.path.join(path, "config.json")
    d = json.load(open(file))
    edit(d)
    json.dump(d, open(file, "w"))
    return file


def _copy_ckpt(src, dst):
    os.makedirs(dst)
    for n in os.listdir(src):
        with open(os.path.join(src, n), "rb") as f, open(os.path.join(dst, n), "wb") as g:
            g.write(f.read())
    return str(dst)


# ==== 1. data loss and half-written state =========================================================
def test_make_tiny_never_overwrites_user_files(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text('{"my": "config"}')
    (user / "tokenizer.json").write_text('{"my": "tokenizer"}')
    with pytest.raises(FileExistsError, match="config.json, tokenizer.json"):
        make_tiny_checkpoint(user, layers=1)
    assert main(["make-tiny", str(user), "--layers", "1"]) == 2
    assert "already holds config.json, tokenizer.json" in capsys.readouterr().err
    assert (user / "config.json").read_text() == '{"my": "config"}'
    assert (user / "tokenizer.json").read_text() == '{"my": "tokenizer"}'
    assert sorted(os.listdir(user)) == ["config.json", "tokenizer.json"]
    # an empty folder, or one holding unrelated files, is fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README").write_text("notes")
    make_tiny_checkpoint(tmp_path / "other", layers=1)
    assert (tmp_path / "other" / "README").read_text() == "notes"
    load_checkpoint(tmp_path / "other", progress=False)


def test_refused_make_tiny_writes_nothing(ckpt, tmp_path):
    valid = _copy_ckpt(ckpt, tmp_path / "valid")
    before = {n: open(os.path.join(valid, n), "rb").read() for n in os.listdir(valid)}
    with pytest.raises(ValueError, match="shards=100000 exceeds"):
        make_tiny_checkpoint(valid, layers=1, shards=100000)         # the old code rewrote config.json first
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint(valid, layers=3)
    assert {n: open(os.path.join(valid, n), "rb").read() for n in os.listdir(valid)} == before
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        make_tiny_checkpoint(tmp_path / "new", layers=0)
    with pytest.raises(ValueError, match="shards"):
        make_tiny_checkpoint(tmp_path / "new", shards=100000)
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["valid"]                   # no temporary folder left behind


def test_make_tiny_killed_part_way_leaves_nothing(tmp_path, monkeypatch):
    def killed(path, vocab_size):
        raise KeyboardInterrupt
    monkeypatch.setattr(make_tiny, "write_tiny_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        make_tiny_checkpoint(tmp_path / "ck", layers=1)
    assert os.listdir(tmp_path) == []                                 # neither the folder nor a temporary one


def test_killed_first_run_is_rebuilt_next_time(tmp_path, monkeypatch):
    default = str(tmp_path / "cache" / "tiny-default")
    real = make_tiny.write_tiny_tokenizer
    monkeypatch.setattr(make_tiny, "write_tiny_tokenizer", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):                            # Ctrl-C while the default is made
        make_tiny.ensure_default_checkpoint(default)
    monkeypatch.setattr(make_tiny, "write_tiny_tokenizer", real)
    assert not os.path.exists(default)
    assert make_tiny.ensure_default_checkpoint(default) == default
    GLM52(default, backend="cpu_ref", progress=False)
    # a default left broken by an older version killed mid-write: config.json there, weights cut short
    file = os.path.join(default, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError):
        load_checkpoint(default, progress=False)
    make_tiny.ensure_default_checkpoint(default)                           # the old code kept the broken one
    out = GLM52(default, backend="cpu_ref", progress=False).generate([[1, 2, 3]], max_new_tokens=2)
    assert len(out.tokens[0]) >= 1


def test_broken_default_holding_foreign_files_is_not_deleted(tmp_path):
    default = tmp_path / "tiny-default"
    default.mkdir()
    (default / "config.json").write_text("{")
    (default / "my-notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="my-notes.txt"):
        make_tiny.ensure_default_checkpoint(str(default))
    assert (default / "my-notes.txt").read_text() == "keep me"


def _flaky_mla(state):
    def sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, *, return_lse=False):
        state["n"] += 1
        if state["n"] == state.get("fail_at"):
            raise RuntimeError("device lost")
        out = R.sparse_mla(q, c_cache, kpe_cache, idx, block_table, seq_lens, cu_seqlens_q, scale,
                           return_lse=return_lse)
        return out * float("nan") if state.get("nan") else out
    return sparse_mla


def test_failed_extend_leaves_the_cache_as_it_was(ckpt):
    state = {"n": 0}
    flaky = GLM52(ckpt, backend=Wrapping("flaky", sparse_mla=_flaky_mla(state)), progress=False)
    good = GLM52(ckpt, backend="cpu_ref", progress=False)
    a, b = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3]
    for bs in (16, 4):                                                # new blocks, and blocks shared with old tokens
        cache, ref = flaky.new_cache(256, block_size=bs), good.new_cache(256, block_size=bs)
        flaky.extend(cache, {"a": a})
        good.extend(ref, {"a": a})
        snap = cache_state(cache)
        state["fail_at"] = state["n"] + 2                              # the second layer's attention of the next step
        with pytest.raises(RuntimeError, match="device lost") as e:
            flaky.extend(cache, {"a": [7, 7], "b": b})
        assert "backend 'flaky', op sparse_mla" in " ".join(getattr(e.value, "__notes__", []))
        assert same_cache_state(cache_state(cache), snap), "the failed step left entries, blocks or lengths behind"
        state["nan"] = True                                            # NaN logits: refused, rolled back too
        with pytest.raises(FloatingPointError, match="NaN/inf"):
            flaky.extend(cache, {"a": [7, 7], "b": b})
        assert same_cache_state(cache_state(cache), snap)
        state["nan"] = False
        got = flaky.extend(cache, {"a": [7, 7], "b": b})              # the retry appends once, correctly
        want = good.extend(ref, {"a": [7, 7], "b": b})
        assert cache.lens == ref.lens == {"a": 13, "b": 18}
        for r in want:
            assert torch.equal(got[r], want[r])


# ==== 2. silent wrong results ======================================================================
def _rewrite(path, edit):
    file = os.path.join(path, "model.safetensors")
    t = load_file(file)
    edit(t)
    save_file(t, file, metadata={"format": "pt"})


@pytest.mark.parametrize("name, value", [
    ("model.layers.0.self_attn.indexer.wk.weight", float("nan")),   # would make every index score NaN
    ("model.layers.1.mlp.experts.3.down_proj.weight", float("inf")),
    ("model.norm.weight", float("-inf")),
])
def test_non_finite_weight_is_refused_naming_the_tensor(ckpt, tmp_path, name, value):
    path = _copy_ckpt(ckpt, tmp_path / "bad")
    _rewrite(path, lambda t: t[name].view(-1).__setitem__(0, value))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{name}' holds 1 NaN/inf value")):
        GLM52(path, backend="cpu_ref", progress=False)


def test_non_finite_fp8_scale_and_overflow_are_refused(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=(16, 16), layers=1, seed=2)
    scale = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"
    _rewrite(path, lambda t: t[scale].view(-1).__setitem__(1, float("nan")))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{scale}' holds 1 NaN/inf")):
        load_checkpoint(path, progress=False)
    path = make_tiny_checkpoint(tmp_path / "big", layers=1, seed=2)   # a bf16 value float16 cannot hold
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(path, lambda t: t[name].view(-1).__setitem__(0, 1e6))
    load_checkpoint(path, progress=False)                              # float32 holds it
    with pytest.raises(CheckpointError, match=f"'{name}' holds 1 NaN/inf value.*after conversion to float16"):
        load_checkpoint(path, dtype=torch.float16, progress=False)


@pytest.mark.parametrize("key, value, fragment", [
    ("rms_norm_eps", -1e-5, "'rms_norm_eps' must be a positive finite number"),
    ("rope_parameters", {"rope_theta": 0.0, "rope_type": "default"}, "'rope_theta' must be a positive finite"),
    ("rope_parameters", {"rope_theta": float("nan"), "rope_type": "default"}, "'rope_theta' must be a finite"),
    ("routed_scaling_factor", float("inf"), "'routed_scaling_factor' must be a finite number"),
    ("moe_layer_freq", 0, "'moe_layer_freq' must be a positive integer"),
    ("n_group", 0, "'n_group' must be a positive integer"),
    ("norm_topk_prob", "yes", "'norm_topk_prob' must be true/false"),
    ("eos_token_id", [255, 9999], "'eos_token_id' 9999 is outside the vocabulary"),
])
def test_config_values_out_of_range_are_refused(ckpt, tmp_path, key, value, fragment):
    path = _copy_ckpt(ckpt, tmp_path / "c")
    file = _edit_config(path, lambda d: d.__setitem__(key, value))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert file in str(e.value) and fragment in str(e.value)


def test_nan_temperature_is_refused_not_sampled(model):
    for t in (float("nan"), float("inf"), -0.5, True, "0.7"):
        with pytest.raises(ValueError, match="temperature"):
            model.generate([[1, 2, 3]], max_new_tokens=2, temperature=t)
    with pytest.raises(ValueError, match="temperature"):               # the sampling helper itself, too
        from glm52_backends.sampling import probs_from_logits
        probs_from_logits(torch.zeros(1, 4), float("nan"))


@pytest.mark.parametrize("op, fn, fragment", [
    ("rms_norm", lambda x, weight, eps: R.rms_norm(x, weight, eps)[..., :-1], "op rms_norm, layer 0 (native): "
                                                                              "the output has shape"),
    ("linear", lambda x, weight: R.linear(x, weight).double(), "op linear, layer 0 (native): the output has "
                                                               "dtype torch.float64, expected torch.float32"),
    ("moe_route", lambda *a: R.moe_route(*a)[0], "op moe_route, layer 1 (native): returned a Tensor, "
                                                 "expected the pair (topk_ids, topk_weights)"),
    ("indexer_topk", lambda *a: R.indexer_topk(*a).long(), "idx has dtype torch.int64"),
])
def test_wrong_op_output_names_backend_and_op(ckpt, op, fn, fragment):
    model = GLM52(ckpt, backend=Wrapping("bad", **{op: fn}), progress=False)
    with pytest.raises(BackendOutputError) as e:
        model([[1, 2, 3, 4, 5]])
    assert str(e.value).startswith("backend 'bad', ") and fragment in str(e.value), str(e.value)


def test_nan_from_an_op_is_reported_not_turned_into_tokens(ckpt):
    state = {"n": 0, "nan": True}
    model = GLM52(ckpt, backend=Wrapping("nan-mla", sparse_mla=_flaky_mla(state)), progress=False)
    with pytest.raises(FloatingPointError, match="backend 'nan-mla': logits hold .* NaN/inf .*GLM52_DEBUG=1"):
        model.generate([[1, 2, 3]], max_new_tokens=3)                   # the old code returned token 0
    model.ops.debug = True                                              # debug mode: the first op is named
    with pytest.raises(BackendOutputError, match=r"backend 'nan-mla', op sparse_mla, layer 0 \(native\): "
                                                 r"the output holds \d+ NaN/inf"):
        model.generate([[1, 2, 3]], max_new_tokens=3)


def test_debug_mode_from_the_environment_and_the_layer_name(monkeypatch):
    monkeypatch.setenv("GLM52_DEBUG", "1")
    bound = get_backend(Wrapping("nan-norm", rms_norm=lambda x, weight, eps: x * float("nan")))
    assert bound.debug
    x = torch.ones(2, 8)
    with bound.at_layer(3):
        with pytest.raises(BackendOutputError, match="backend 'nan-norm', op rms_norm, layer 3 .*NaN/inf"):
            bound.rms_norm(x, torch.ones(8), 1e-5)
    assert bound.layer is None
    monkeypatch.setenv("GLM52_DEBUG", "0")
    assert not get_backend(Wrapping("quiet")).debug


# ==== 3. inputs accepted that should be refused ====================================================
@pytest.mark.parametrize("prompts, fragment", [
    ([[1.0, 2.0]], "token id at position 0 is float 1.0"),
    ([[1, 2.7]], "token id at position 1 is float 2.7"),
    ([[True, 2]], "is bool True"),
    ([["3", 4]], "is str '3'"),
    (torch.tensor([[1.0, 2.0]]), "token ids must be integers, got a tensor of torch.float32"),
    ([[1, 2], [3, 999]], "prompt 1: token id 999 at position 1 is outside the vocabulary"),
    ([list(range(5))] * 0, "no prompts given"),
])
def test_token_ids_must_be_integers(model, prompts, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        model.generate(prompts, max_new_tokens=2)


def test_extend_and_forward_refuse_non_integer_ids(model):
    cache = model.new_cache(64)
    with pytest.raises(ValueError, match=re.escape("request 0: token id at position 1 is float 2.5")):
        model.extend(cache, {0: [1, 2.5]})
    with pytest.raises(ValueError, match="chunks must be a dict"):
        model.extend(cache, [[1, 2]])
    with pytest.raises(ValueError, match="cache must be a PagedCache"):
        model.extend({}, {0: [1]})
    with pytest.raises(ValueError, match="tensor of torch.float32"):
        model(torch.tensor([[1.0, 2.0]]))
    assert cache.lens == {}


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan")])
def test_top_p_outside_0_1_is_refused_even_when_greedy(model, top_p):
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1, 2]], max_new_tokens=2, top_p=top_p)       # the old code ignored it under greedy


@pytest.mark.parametrize("speculative", [0, 3])
def test_generation_stops_at_the_context_with_a_finish_reason(short_ckpt, speculative):
    model = GLM52(short_ckpt, backend="cpu_ref", progress=False)
    prompts = [[5] * 10, list(range(1, 20))]                           # 14 and 5 tokens of room
    out = model.generate(prompts, max_new_tokens=100, stop_at_eos=False, speculative=speculative)
    assert [len(t) for t in out.tokens] == [14, 5] and out.finish_reasons == ["context", "context"]
    plain = model.generate(prompts, max_new_tokens=14, stop_at_eos=False)
    assert out.tokens == [plain.tokens[0], plain.tokens[1][:5]]
    assert plain.finish_reasons == ["length", "context"]
    with pytest.raises(ValueError, match=r"prompt 0 has 25 tokens, more than the model's context"):
        model.generate([[1] * 25], max_new_tokens=1)


def test_caches_are_sized_within_the_context(short_ckpt):
    model = GLM52(short_ckpt, backend="cpu_ref", progress=False)
    asked = []
    real = model.new_cache

    def new_cache(max_tokens, **kw):
        asked.append(max_tokens)
        assert max_tokens <= 2 * (24 + 3 + model.block_size), f"a cache for {max_tokens} tokens"
        return real(max_tokens, **kw)
    model.new_cache = new_cache
    model.generate([[1, 2, 3]], max_new_tokens=10**9, stop_at_eos=False)
    model.generate([[1, 2, 3]], max_new_tokens=10**9, stop_at_eos=False, speculative=3)
    assert len(asked) == 2


@pytest.mark.parametrize("n", [0, -5, 2.5, True, None])
def test_new_cache_needs_a_positive_size(model, n):
    with pytest.raises(ValueError, match="new_cache: max_tokens must be a positive integer"):
        model.new_cache(n)


@pytest.mark.parametrize("kw, fragment", [
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer >= 0"),
    (dict(prefill_chunk=0), "prefill_chunk must be a positive integer"),
    (dict(seed="x"), "seed must be an integer"),
    (dict(cache_tokens=0), "cache_tokens must be a positive integer"),
    (dict(speculative=1.5), "speculative must be 0"),
])
def test_generation_arguments_are_checked(model, kw, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        model.generate([[1, 2]], **{"max_new_tokens": 2, **kw})


def test_a_factory_must_return_a_backend(monkeypatch):
    register_backend("returns-none", lambda: None)
    register_backend("returns-int", lambda: 5)
    register_backend("exits", lambda: sys.exit(3))
    try:
        with pytest.raises(BackendUnavailable, match="backend 'returns-none': its factory returned None"):
            get_backend("returns-none")
        with pytest.raises(BackendContractError, match="the factory of backend 'returns-int' returned int 5, "
                                                       "which is not a backend object"):
            get_backend("returns-int")
        with pytest.raises(BackendUnavailable, match=r"backend 'exits' cannot load: .*called sys.exit\(3\)"):
            get_backend("exits")
        info = {b.name: b for b in list_backends()}
        assert not info["returns-none"].available and not info["exits"].available and info["cpu_ref"].available
    finally:
        for n in ("returns-none", "returns-int", "exits"):
            unregister_backend(n)
    with pytest.raises(BackendContractError, match="backend=None"):
        get_backend(None)
    with pytest.raises(BackendContractError, match="the class CpuRefBackend"):
        get_backend(CpuRefBackend)
    with pytest.raises(ValueError, match="backend=None"):
        GLM52(ModelConfig(), backend=None)


def _cpu_tiny_raw():
    return yaml.safe_load(bundled_configs()["cpu-tiny"].read_text(encoding="utf-8"))


@pytest.mark.parametrize("key, text", [
    ("memory_per_device_gb", ".nan"), ("memory_per_device_gb", ".inf"), ("runtime_reserve_gb", ".inf"),
    ("memory_utilization", ".nan"),
])
def test_non_finite_memory_figures_in_a_deployment_are_refused(tmp_path, key, text):
    raw = _cpu_tiny_raw()
    raw[key] = 1.0
    body = yaml.safe_dump(raw).replace(f"{key}: 1.0", f"{key}: {text}")
    (tmp_path / "site.yaml").write_text(body, encoding="utf-8")
    with pytest.raises(DeploymentError, match=f"site.yaml: '{key}': must be a finite number") as e:
        load_deployment(str(tmp_path / "site.yaml"))
    assert e.value.key == key
    raw = _cpu_tiny_raw()
    raw["capabilities"]["hbm_tbs"] = float("nan")
    with pytest.raises(DeploymentError, match="'capabilities.hbm_tbs': must be a finite number or null"):
        from_dict(raw)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "kv_lora_rank", "n_routed_experts"])
def test_a_missing_shape_key_is_named_not_defaulted(ckpt, tmp_path, key):
    path = _copy_ckpt(ckpt, tmp_path / "c")
    _edit_config(path, lambda d: d.pop(key))
    with pytest.raises(ConfigError, match=f"required key '{key}' missing"):  # the old code took GLM-5.2's value
        GLM52(path, backend="cpu_ref", progress=False)


def test_weights_and_constructor_arguments_are_checked():
    cfg = tiny.tiny_config(layers=1)[0]
    sd = tiny.random_state_dict(cfg)
    sd.pop("model.norm.weight")
    sd["model.layers.0.input_layernorm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"missing tensor 'model.norm.weight'.*\n.*input_layernorm.weight' has "
                                         r"shape \[3\], expected \[64\]"):
        GLM52(cfg, backend="cpu_ref", state_dict=sd)                    # the old code: a bare KeyError
    sd = tiny.random_state_dict(cfg)
    sd["lm_head.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'lm_head.weight' holds 1 NaN/inf"):
        GLM52(cfg, backend="cpu_ref", state_dict=sd)
    for kw, fragment in ((dict(dtype="bf16"), "dtype must be one of"), (dict(device="nosuch"), "device 'nosuch'"),
                         (dict(block_size=0), "block_size must be a positive integer")):
        with pytest.raises(ValueError, match=fragment):
            GLM52(cfg, backend="cpu_ref", **kw)
    with pytest.raises(ValueError, match="unknown override 'temprature'"):
        GLM52.from_deployment("cpu-tiny", temprature=0.5)


# ==== 4. no tracebacks; exit codes =================================================================
def test_cli_bad_arguments_exit_2_naming_the_argument(ckpt, capsys):
    for argv, fragment in ((["generate", "--dtype", "nosuch"], "argument --dtype: unknown dtype 'nosuch'"),
                           (["generate", "--ids", "1,a"], "argument --ids: 'a' in '1,a' is not an integer"),
                           (["generate", "--top-p", "0"], "argument --top-p: 0 must be a finite number in (0, 1]"),
                           (["generate", "--temperature", "nan"], "argument --temperature"),
                           (["generate", "--max-new-tokens", "-1"], "argument --max-new-tokens: -1 must be >= 0"),
                           (["make-tiny", "x", "--layers", "0"], "argument --layers: 0 must be >= 1"),
                           (["conformance", "--op", "nosuch"], "argument --op: unknown op 'nosuch'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and fragment in err and "Traceback" not in err, (argv, err)


def test_cli_errors_are_one_line_with_exit_2(ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [
        (["generate", ckpt, "--backend", "cpu_ref", "--quiet", "--ids", "1,999"], "token id 999"),
        (["generate", ckpt, "--backend", "nosuch", "--quiet"], "unknown backend 'nosuch'"),
        (["plan", "cpu-tiny", "--json", str(tmp_path / "file" / "plan.json")], str(tmp_path / "file")),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as e:                               # refused before any case runs
        main(["conformance", "--quick", "--json", str(tmp_path / "file" / "r.json")])
    assert e.value.code == 2 and "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["conformance", "--quick", "--markdown", str(tmp_path)])
    assert e.value.code == 2 and "is a folder" in capsys.readouterr().err


def test_cli_speculative_with_no_new_tokens_and_version(short_ckpt, capsys):
    assert main(["generate", short_ckpt, "--backend", "cpu_ref", "--quiet", "--speculative", "2", "--batch", "2",
                 "--max-new-tokens", "0"]) == 0                        # the old code divided by zero
    out = capsys.readouterr().out
    assert "speed-up              : n/a" in out and "n/a (no verify step ran)" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"glm52 \d+\.\d+", capsys.readouterr().out)


def test_cli_a_failing_backend_op_names_backend_and_op(ckpt, capsys):
    def boom(x, weight):
        raise RuntimeError("kernel launch failed")
    register_backend("boom", lambda: Wrapping("boom", linear=boom))
    try:
        assert main(["generate", ckpt, "--backend", "boom", "--quiet", "--max-new-tokens", "1"]) == 2
    finally:
        unregister_backend("boom")
    err = capsys.readouterr().err
    assert "kernel launch failed" in err and "backend 'boom', op linear" in err and "Traceback" not in err


def test_a_backend_with_no_native_op_fails_conformance(capsys):
    class Empty:
        name = "empty"
        capabilities = Capabilities()
    register_backend("empty", Empty)
    try:
        with pytest.warns(RuntimeWarning, match="implements none of the contract's ops"):
            rc = main(["conformance", "--backend", "empty", "--quick", "--op", "rms_norm", "--no-model"])
    finally:
        unregister_backend("empty")
    out = capsys.readouterr().out
    assert rc == 1 and "0 ran natively" in out and "ran none of its" in out   # the old code: exit 0


def test_a_plugin_calling_sys_exit_does_not_kill_glm52_backends(capsys):
    def bad_plugin():
        sys.exit("vendor runtime not found")
    register_backend("exiting-plugin", bad_plugin)
    try:
        assert main(["backends"]) == 0
    finally:
        unregister_backend("exiting-plugin")
    out = capsys.readouterr().out
    assert "exiting-plugin" in out and "called sys.exit('vendor runtime not found')" in out
    assert any(line.startswith("cpu_ref") and "yes" in line for line in out.splitlines())


# ==== 5. docs ======================================================================================
def test_readme_stays_inside_the_repository_and_documents_the_rules():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert "../" not in text, "the README points outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)", text):                # markdown links: local targets exist
        if not re.match(r"[a-z]+://", target):
            assert os.path.exists(os.path.join(REPO, target)), target
    for path in re.findall(r"`((?:glm52_backends|backends|conformance|benchmarks|tests|configs)/[\w/.-]+)`", text):
        assert os.path.exists(os.path.join(REPO, path.rstrip("/"))), path
    assert "default_checkpoint()" in text and "default_model/" in text and "train_tiny" in text
    assert re.search(r"`0` success; `1` a check failed.*`2` bad input or environment", text, re.S)
    assert "one warning per backend and op" in text and "GLM52_DEBUG" in text
    assert "--version" in text
