"""Checkpoint loading (glm52_backends.loader), the tiny checkpoint writer (glm52_backends.devtools.make_tiny) and
the config's IndexShare schedule."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm52_backends.config import ConfigError, ModelConfig, indexshare_schedule
from glm52_backends.loader import CheckpointError, load_checkpoint, load_config, load_tokenizer
from glm52_backends.devtools.make_tiny import dequantized_twin, make_tiny_checkpoint
from glm52_backends.tiny import random_state_dict
from glm52_backends.weights import Weight, expected_tensors, is_fp8_weight

KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [40, 64]: partial blocks with block 16


# ---- helpers ---------------------------------------------------------------------------------

def _rewrite(path, edit):
    """Apply `edit(tensors)` to a single-file checkpoint in place."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _edit_config(path, edit):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        d = json.load(f)
    edit(d)
    with open(file, "w") as f:
        json.dump(d, f)
    return file


def _raises(exc, *fragments, **kw):
    """pytest.raises that also checks each fragment appears in the message."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for frag in fragments:
                assert str(frag) in msg, f"{frag!r} not in error: {msg}"
            return out
    return _Ctx()


# ---- happy paths -----------------------------------------------------------------------------

def test_single_file_loads_every_expected_tensor(tiny):
    cfg, w = load_checkpoint(tiny, progress=False)
    want = expected_tensors(cfg)
    assert set(w) == set(want)
    for name, shape in want.items():
        assert tuple(w[name].shape) == shape, name
        assert w[name].dtype == torch.float32
    assert cfg.indexer_types == ["full", "shared", "full", "shared"]
    assert "model.layers.1.self_attn.indexer.wk.weight" not in w  # shared layer: no indexer


def test_random_state_dict_equals_loaded_tiny_checkpoint(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "t", mtp=True, layers=2, seed=5)
    cfg, loaded = load_checkpoint(path, progress=False)
    made = random_state_dict(cfg, seed=5)
    assert made.keys() == loaded.keys()
    assert all(torch.equal(made[k], loaded[k]) for k in made)


def test_sharded_equals_single_file(tmp_path):
    one = make_tiny_checkpoint(tmp_path / "one", seed=3)
    many = make_tiny_checkpoint(tmp_path / "many", seed=3, shards=3)
    assert os.path.isfile(os.path.join(many, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(many, "model.safetensors"))
    _, a = load_checkpoint(one, progress=False)
    _, b = load_checkpoint(many, progress=False)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_conversion_keeps_router_bias_float32(tiny):
    _, w = load_checkpoint(tiny, dtype=torch.bfloat16, progress=False)
    for name, t in w.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, name
    bias = w["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert 0 <= bias.min() and bias.max() <= 0.1 and bias.std() > 0  # randomised: routing is exercised


def test_given_config_skips_config_json(tiny):
    cfg = load_config(tiny)
    os.remove(os.path.join(tiny, "config.json"))
    cfg2, w = load_checkpoint(tiny, cfg, progress=False)
    assert cfg2 == cfg and len(w) == len(expected_tensors(cfg))


def test_mtp_layer(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "mtp", mtp=True, layers=2)
    cfg, w = load_checkpoint(path, progress=False)
    assert cfg.num_nextn_predict_layers == 1 and "model.layers.2.eh_proj.weight" in w
    assert "model.layers.2.self_attn.indexer.wk.weight" in w  # MTP layer always has its indexer
    cfg, w = load_checkpoint(path, include_mtp=False, progress=False)
    assert cfg.num_nextn_predict_layers == 0 and not any(k.startswith("model.layers.2.") for k in w)


def test_mtp_absent_like_hf_save_pretrained(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "mtp", mtp=True, layers=2)
    _rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")])
    cfg, w = load_checkpoint(path, progress=False)  # include_mtp=None: absence is fine
    assert cfg.num_nextn_predict_layers == 0 and len(w) == len(expected_tensors(cfg))
    with _raises(CheckpointError, "MTP layer 2", "model.safetensors"):
        load_checkpoint(path, include_mtp=True, progress=False)


def test_mtp_asked_of_a_config_without_it(tmp_path):
    """include_mtp=True on a model whose config has no MTP layer is refused for that reason (not for the
    missing tensors it then implies)."""
    path = make_tiny_checkpoint(tmp_path / "plain", layers=2)
    with _raises(CheckpointError, "include_mtp=True but the config has num_nextn_predict_layers=0"):
        load_checkpoint(path, include_mtp=True, progress=False)


def test_partial_mtp_layer_is_an_error(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "mtp", mtp=True, layers=2)
    _rewrite(path, lambda t: t.pop("model.layers.2.hnorm.weight"))
    with _raises(CheckpointError, "missing tensor 'model.layers.2.hnorm.weight'"):
        load_checkpoint(path, progress=False)


# ---- FP8 -------------------------------------------------------------------------------------

def test_fp8_checkpoint_format(tiny_fp8):
    raw = load_file(os.path.join(tiny_fp8, "model.safetensors"))
    cfg = load_config(tiny_fp8)
    assert cfg.fp8_block == (16, 16)
    assert cfg.quantization_config["fmt"] == "e4m3"
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            assert t.dtype == torch.float32
        elif is_fp8_weight(name):
            assert t.dtype == torch.float8_e4m3fn and name + "_scale_inv" in raw, name
        else:
            assert t.dtype in (torch.bfloat16, torch.float32), name
    assert raw[KV_A].shape == (40, 64) and raw[KV_A + "_scale_inv"].shape == (3, 4)  # 40 = 16+16+8


def test_fp8_equals_dequantized_twin(tiny_fp8, tmp_path):
    twin = dequantized_twin(tiny_fp8, tmp_path / "twin")
    assert "quantization_config" not in json.load(open(os.path.join(twin, "config.json")))
    _, a = load_checkpoint(tiny_fp8, progress=False, quantization="none")     # dequantized at load
    _, b = load_checkpoint(twin, progress=False)
    assert a.keys() == b.keys()
    assert not any(k.endswith("_scale_inv") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _, q = load_checkpoint(tiny_fp8, progress=False)                         # kept as stored
    assert q.keys() == b.keys()
    for k in q:
        if is_fp8_weight(k):
            assert isinstance(q[k], Weight) and q[k].format == "fp8_block" and q[k].block == (16, 16), k
            assert torch.equal(q[k].dense(), b[k]), k
        else:
            assert torch.equal(q[k], b[k]), k


def test_fp8_dequantization_matches_per_block_loop(tiny_fp8):
    raw = load_file(os.path.join(tiny_fp8, "model.safetensors"))
    w8, s = raw[KV_A], raw[KV_A + "_scale_inv"]
    ref = torch.empty(w8.shape)
    for i in range(w8.shape[0]):
        for j in range(w8.shape[1]):
            ref[i, j] = w8[i, j].float() * s[i // 16, j // 16]
    _, w = load_checkpoint(tiny_fp8, progress=False, quantization="none")
    assert torch.equal(w[KV_A], ref)
    assert ref[32:].abs().sum() > 0  # the partial last row block is really there
    _, q = load_checkpoint(tiny_fp8, progress=False)
    assert torch.equal(q[KV_A].data.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(q[KV_A].scales, s)
    assert torch.equal(q[KV_A].dense(), ref)


def test_fp8_default_block_128_and_sharded(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, shards=2, layers=2)
    cfg, w = load_checkpoint(path, dtype=torch.bfloat16, progress=False, quantization="none")
    assert cfg.fp8_block == (128, 128)  # every tiny weight is one partial block
    assert w[KV_A].dtype == torch.bfloat16 and w[KV_A].abs().max() > 0
    _, q = load_checkpoint(path, dtype=torch.bfloat16, progress=False)
    assert q[KV_A].format == "fp8_block" and q[KV_A].data.dtype == torch.float8_e4m3fn
    assert tuple(q[KV_A].scales.shape) == (1, 1) and q["model.norm.weight"].dtype == torch.bfloat16


# ---- bad checkpoints -------------------------------------------------------------------------

def test_truncated_file(tiny):
    file = os.path.join(tiny, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with _raises(CheckpointError, file, "truncated"):
        load_checkpoint(tiny, progress=False)


def test_header_length_past_file_end(tiny):
    file = os.path.join(tiny, "model.safetensors")
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", 10 ** 9))
    with _raises(CheckpointError, file):
        load_checkpoint(tiny, progress=False)


def test_corrupt_header_json(tiny):
    file = os.path.join(tiny, "model.safetensors")
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    with _raises(CheckpointError, file, "corrupt"):
        load_checkpoint(tiny, progress=False)


def test_missing_tensor(tiny):
    name = "model.layers.2.self_attn.indexer.wk.weight"
    file = _rewrite(tiny, lambda t: t.pop(name))
    with _raises(CheckpointError, f"missing tensor '{name}'", file):
        load_checkpoint(tiny, progress=False)


@pytest.mark.parametrize("name, why", [
    ("model.layers.9.input_layernorm.weight", "layer 9 does not exist"),
    ("model.layers.4.input_layernorm.weight", "layer 4 does not exist"),  # MTP layer, but no MTP in config
    ("model.layers.1.self_attn.indexer.k_norm.bias", "'shared'"),  # third-party style extra indexer
    ("model.rotary_emb.inv_freq", ""),
])
def test_unexpected_tensor(tiny, name, why):
    file = _rewrite(tiny, lambda t: t.__setitem__(name, torch.zeros(16, dtype=torch.bfloat16)))
    with _raises(CheckpointError, f"unexpected tensor '{name}' in {file}", why):
        load_checkpoint(tiny, progress=False)


def test_wrong_shape(tiny):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    file = _rewrite(tiny, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with _raises(CheckpointError, name, file, "shape [95, 48], expected [96, 48]"):
        load_checkpoint(tiny, progress=False)


@pytest.mark.parametrize("name, dtype", [
    ("model.norm.weight", torch.int64),
    ("model.layers.0.mlp.down_proj.weight", torch.float64),
    ("lm_head.weight", torch.float8_e4m3fn),  # FP8 where the real checkpoint never has it
])
def test_wrong_dtype(tiny, name, dtype):
    file = _rewrite(tiny, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with _raises(CheckpointError, name, file):
        load_checkpoint(tiny, progress=False)


def test_fp8_weight_without_scale(tiny_fp8):
    file = _rewrite(tiny_fp8, lambda t: t.pop(KV_A + "_scale_inv"))
    with _raises(CheckpointError, KV_A, file, "_scale_inv"):
        load_checkpoint(tiny_fp8, progress=False)


def test_fp8_scale_wrong_shape(tiny_fp8):
    name = KV_A + "_scale_inv"
    file = _rewrite(tiny_fp8, lambda t: t.__setitem__(name, t[name][:2].clone()))  # forgot the partial block
    with _raises(CheckpointError, name, file, "[2, 4], expected [3, 4]"):
        load_checkpoint(tiny_fp8, progress=False)


def test_fp8_scale_wrong_dtype(tiny_fp8):
    name = KV_A + "_scale_inv"
    file = _rewrite(tiny_fp8, lambda t: t.__setitem__(name, t[name].bfloat16()))
    with _raises(CheckpointError, name, file, "expected F32"):
        load_checkpoint(tiny_fp8, progress=False)


def test_scale_for_unquantized_weight(tiny):
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    file = _rewrite(tiny, lambda t: t.__setitem__(name, torch.ones(1, 1)))
    with _raises(CheckpointError, f"unexpected tensor '{name}' in {file}"):
        load_checkpoint(tiny, progress=False)


def test_index_points_to_missing_shard(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "sh", shards=3)
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    with _raises(CheckpointError, "model-00002-of-00003.safetensors", "missing"):
        load_checkpoint(path, progress=False)


def test_index_maps_tensor_to_wrong_shard(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "sh", shards=2)
    index = os.path.join(path, "model.safetensors.index.json")
    d = json.load(open(index))
    name = "model.layers.3.mlp.experts.7.down_proj.weight"
    assert d["weight_map"][name] == "model-00002-of-00002.safetensors"
    d["weight_map"][name] = "model-00001-of-00002.safetensors"
    json.dump(d, open(index, "w"))
    with _raises(CheckpointError, name, "model-00001-of-00002.safetensors"):
        load_checkpoint(path, progress=False)


def test_no_weights(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "x")
    os.remove(os.path.join(path, "model.safetensors"))
    with _raises(CheckpointError, "model.safetensors"):
        load_checkpoint(path, progress=False)


def test_validation_happens_before_any_tensor_is_read(tiny, monkeypatch):
    import safetensors

    def no_reading(*a, **k):
        raise AssertionError("tensor data read before validation finished")
    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    name = "model.layers.3.mlp.experts.7.down_proj.weight"
    _rewrite(tiny, lambda t: t.pop(name))
    with _raises(CheckpointError, name):
        load_checkpoint(tiny, progress=False)


# ---- bad config.json -------------------------------------------------------------------------

@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.__setitem__("hidden_size", "64"), "hidden_size"),
    (lambda d: d.__setitem__("num_hidden_layers", "4"), "config.json"),
    (lambda d: d.__setitem__("indexer_types", ["full", "shared", "full"]), "indexer_types"),
    (lambda d: d.__setitem__("indexer_types", ["shared", "full", "full", "full"]), "indexer_types"),
    (lambda d: d.__setitem__("model_type", "deepseek_v3"), "model_type"),
    (lambda d: d.__setitem__("rope_parameters", {"rope_type": "yarn", "factor": 4}), "rope_type"),
])
def test_bad_config_field(tiny, edit, fragment):
    file = _edit_config(tiny, edit)
    with _raises(ConfigError, file, fragment):
        load_checkpoint(tiny, progress=False)


def test_bad_config_json(tiny):
    file = os.path.join(tiny, "config.json")
    with open(file, "w") as f:
        f.write('{"hidden_size": 64,')
    with _raises(ConfigError, file, "JSON"):
        load_checkpoint(tiny, progress=False)


def test_missing_config_json(tmp_path):
    with _raises(ConfigError, "config.json"):
        load_config(tmp_path)


def test_config_mismatch_is_checkpoint_error(tiny):
    _edit_config(tiny, lambda d: d.__setitem__("kv_lora_rank", 16))
    with _raises(CheckpointError, "self_attn.kv_a_proj_with_mqa.weight", "expected [24, 64]"):
        load_checkpoint(tiny, progress=False)


# ---- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_roundtrip(tiny):
    tok = load_tokenizer(tiny)
    text = "Hello, wörld! 你好"
    ids = tok.encode(text)
    assert all(0 <= i < 255 for i in ids) and tok.decode(ids) == text
    assert tok.token_to_id("<|endoftext|>") == load_config(tiny).eos_token_id[0] == 255


def test_no_tokenizer_json(tmp_path):
    assert load_tokenizer(tmp_path) is None


# ---- IndexShare schedule (config.py) ---------------------------------------------------------

def _hf(**keys):
    """An HF config dict: GLM-5.2's required keys (config.REQUIRED_KEYS) plus `keys`."""
    from glm52_backends.config import GLM52_CONFIG, REQUIRED_KEYS
    return {**{k: getattr(GLM52_CONFIG, k) for k in REQUIRED_KEYS}, **keys}


def test_glm52_indexshare_schedule():
    types = indexshare_schedule(78, freq=4, offset=3)
    full = [i for i, t in enumerate(types) if t == "full"]
    assert full == [0, 1, 2] + list(range(6, 75, 4))
    assert len(full) == 21 and full[-1] == 74
    cfg = ModelConfig.from_hf_dict(_hf(index_topk_freq=4, index_skip_topk_offset=3))
    assert cfg.full_layers == full
    assert cfg.index_source(5) == 2 and cfg.index_source(6) == 6 and cfg.index_source(77) == 74


def test_hf_default_schedule_is_all_full():
    assert ModelConfig.from_hf_dict(_hf(num_hidden_layers=6)).indexer_types == ["full"] * 6


def test_index_topk_pattern_overrides_freq():
    cfg = ModelConfig.from_hf_dict(_hf(num_hidden_layers=4, index_topk_pattern="FFSF",
                                       index_topk_freq=2, index_skip_topk_offset=1))
    assert cfg.indexer_types == ["full", "full", "shared", "full"]
    with pytest.raises(ConfigError, match="index_topk_pattern"):
        ModelConfig.from_hf_dict(_hf(num_hidden_layers=4, index_topk_pattern="FFS"))


def test_explicit_indexer_types_override_everything():
    explicit = ["full", "shared", "shared", "full"]
    cfg = ModelConfig.from_hf_dict(_hf(num_hidden_layers=4, indexer_types=explicit, index_topk_pattern="FFFF",
                                       index_topk_freq=2, index_skip_topk_offset=1))
    assert cfg.indexer_types == explicit


def test_tiny_config_json_has_real_field_names(tiny):
    d = json.load(open(os.path.join(tiny, "config.json")))
    assert d["model_type"] == "glm_moe_dsa" and d["architectures"] == ["GlmMoeDsaForCausalLM"]
    assert d["index_topk_freq"] == 2 and d["index_skip_topk_offset"] == 1
    assert d["indexer_types"] == indexshare_schedule(4, freq=2, offset=1)
    assert d["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert d["eos_token_id"] == [255] and d["dtype"] == "bfloat16"
