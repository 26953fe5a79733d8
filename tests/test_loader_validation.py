"""Loader validation at its edges, each error checked for its reason (not only the tensor's name).

  * non-square FP8 blocks ([16, 32] and [32, 16]): scales, dequantisation per block, and a config
    whose block is the transpose of the one the scales were written for;
  * shard / index consistency in both directions: a tensor the index maps to a shard that lacks it,
    a tensor a shard holds that the index does not list, a tensor held by two shards, an FP8 scale
    stored in another shard than its weight (legal, must load);
  * every class of header and tensor problem with the words that say what is wrong, and the
    problem list's truncation.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm52_backends.loader import CheckpointError, load_checkpoint, load_config
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
from glm52_backends.weights import Weight, fp8_scale_shape

KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"      # [40, 64] in the tiny config
Q_B = "model.layers.0.self_attn.q_b_proj.weight"                 # [96, 48]
INDEX = "model.safetensors.index.json"


def _single(path):
    return os.path.join(path, "model.safetensors")


def _rewrite(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _index(path):
    with open(os.path.join(path, INDEX), encoding="utf-8") as f:
        return json.load(f)


def _write_index(path, d):
    with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
        json.dump(d, f)


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, progress=False, **kw)
    return str(e.value)


# ---- non-square FP8 blocks ------------------------------------------------------------------------

@pytest.mark.parametrize("block", [(16, 32), (32, 16)])
def test_non_square_fp8_blocks_load_and_dequantize_per_block(tmp_path, block):
    path = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=block, layers=2, seed=4)
    assert load_config(path).fp8_block == block
    raw = load_file(_single(path))
    b0, b1 = block
    for name in (KV_A, Q_B):
        w8, s = raw[name], raw[name + "_scale_inv"]
        rows, cols = w8.shape
        assert tuple(s.shape) == (-(-rows // b0), -(-cols // b1)) == fp8_scale_shape((rows, cols), block), name
    _, w = load_checkpoint(path, progress=False, quantization="none")
    _, q = load_checkpoint(path, progress=False)                         # kept as stored
    for name in (KV_A, Q_B):
        assert q[name].format == "fp8_block" and q[name].block == block
        assert torch.equal(q[name].dense(), w[name]), name
        w8, s = raw[name], raw[name + "_scale_inv"]
        ref = torch.empty(w8.shape)
        for i in range(w8.shape[0]):
            for j in range(w8.shape[1]):
                ref[i, j] = w8[i, j].float() * s[i // b0, j // b1]
        assert torch.equal(w[name], ref), name
        assert len(set(s.flatten().tolist())) > 1, "scales must differ per block for the check to bite"
    # the same through a Weight in fp8_block format (what a backend with FP8 GEMMs receives)
    dense = Weight(raw[KV_A], raw[KV_A + "_scale_inv"], "fp8_block", block).dense()
    assert torch.equal(dense, w[KV_A])


def test_transposed_block_in_the_config_is_refused_naming_the_shapes(tmp_path):
    """Scales written for [16, 32] blocks, config saying [32, 16]: every scale has the wrong shape."""
    path = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=(16, 32), layers=2, seed=4)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        d = json.load(f)
    d["quantization_config"]["weight_block_size"] = [32, 16]
    with open(cfg_file, "w") as f:
        json.dump(d, f)
    msg = _error(path)
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"                     # [48, 64]
    assert f"tensor '{name}' in {_single(path)} has shape [3, 2], expected [2, 4] (weight [48, 64], block [32, 16])" in msg
    assert msg.count("block [32, 16])") == 10 and "... and " in msg                   # every scale, listed up to 10


def test_non_square_scale_with_the_partial_block_missing(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=(16, 32), layers=2, seed=4)
    name = KV_A + "_scale_inv"
    _rewrite(_single(path), lambda t: t.__setitem__(name, t[name][:2].clone()))   # 40 rows need 3 blocks of 16
    assert "has shape [2, 2], expected [3, 2] (weight [40, 64], block [16, 32])" in _error(path)


# ---- shards and the index, both directions -----------------------------------------------------------

def _shards(tmp_path, n=2, **kw):
    return make_tiny_checkpoint(tmp_path / "sh", shards=n, **kw)


def _holder(path, name):
    return _index(path)["weight_map"][name]


def test_index_maps_a_tensor_to_a_shard_that_lacks_it(tmp_path):
    path = _shards(tmp_path)
    d = _index(path)
    name = "model.layers.3.mlp.experts.7.down_proj.weight"
    other = next(s for s in set(d["weight_map"].values()) if s != d["weight_map"][name])
    d["weight_map"][name] = other
    _write_index(path, d)
    msg = _error(path)
    assert f"tensor '{name}' is mapped to '{other}', which does not hold it" in msg


def test_shard_holds_a_tensor_the_index_does_not_list(tmp_path):
    path = _shards(tmp_path)
    d = _index(path)
    name = "model.norm.weight"
    shard = d["weight_map"].pop(name)
    _write_index(path, d)
    msg = _error(path)
    assert f"{os.path.join(path, shard)}: tensor '{name}' is not listed in {INDEX}" in msg


def test_index_lists_a_tensor_no_shard_holds(tmp_path):
    path = _shards(tmp_path)
    name = "model.norm.weight"
    shard = _holder(path, name)
    _rewrite(os.path.join(path, shard), lambda t: t.pop(name))
    msg = _error(path)
    assert f"tensor '{name}' is mapped to '{shard}', which does not hold it" in msg


def test_index_names_a_shard_file_that_is_missing(tmp_path):
    path = _shards(tmp_path, 3)
    gone = "model-00002-of-00003.safetensors"
    os.remove(os.path.join(path, gone))
    msg = _error(path)
    assert f"shard '{gone}' (holding e.g. tensor '" in msg and f"is missing from {path}" in msg


def test_index_names_a_shard_outside_the_folder(tmp_path):
    path = _shards(tmp_path)
    d = _index(path)
    name = next(iter(d["weight_map"]))
    d["weight_map"][name] = "../" + d["weight_map"][name]
    _write_index(path, d)
    assert "is missing from" in _error(path)


def test_a_tensor_held_by_two_shards_names_where_the_index_maps_it(tmp_path):
    """A duplicate is refused with both shards named (not as 'not listed': the index does list it)."""
    path = _shards(tmp_path)
    name = "model.norm.weight"
    mapped = _holder(path, name)
    other = next(s for s in set(_index(path)["weight_map"].values()) if s != mapped)
    value = load_file(os.path.join(path, mapped))[name]
    _rewrite(os.path.join(path, other), lambda t: t.__setitem__(name, value.clone()))
    msg = _error(path)
    assert (f"{os.path.join(path, other)}: tensor '{name}' is also stored in '{other}', but {INDEX} maps it to "
            f"'{mapped}'; each tensor must be stored once") in msg
    assert "not listed" not in msg


def test_fp8_scale_in_another_shard_than_its_weight_loads(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=(16, 32), shards=2, layers=2, seed=6)
    one = make_tiny_checkpoint(tmp_path / "one", fp8=True, fp8_block=(16, 32), layers=2, seed=6)
    d = _index(path)
    scale = KV_A + "_scale_inv"
    src = d["weight_map"][scale]
    dst = next(s for s in set(d["weight_map"].values()) if s != src)
    value = load_file(os.path.join(path, src))[scale]
    _rewrite(os.path.join(path, src), lambda t: t.pop(scale))
    _rewrite(os.path.join(path, dst), lambda t: t.__setitem__(scale, value.clone()))
    d["weight_map"][scale] = dst
    _write_index(path, d)
    _, a = load_checkpoint(path, progress=False, quantization="none")
    _, b = load_checkpoint(one, progress=False, quantization="none")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, a = load_checkpoint(path, progress=False)
    _, b = load_checkpoint(one, progress=False)
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, Weight):
            assert torch.equal(x.data.view(torch.uint8), y.data.view(torch.uint8)) and torch.equal(x.scales, y.scales)
        else:
            assert torch.equal(x, y), k


def test_malformed_index(tmp_path):
    path = _shards(tmp_path)
    _write_index(path, {"weights": {}})
    assert f"{os.path.join(path, INDEX)}: malformed index (KeyError" in _error(path)
    _write_index(path, {"weight_map": {"a": 3}})
    assert "malformed index (TypeError: weight_map must map tensor names to file names)" in _error(path)
    with open(os.path.join(path, INDEX), "w") as f:
        f.write("{not json")
    assert "malformed index (JSONDecodeError" in _error(path)


# ---- reasons, not only names --------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype,reason", [
    ("model.norm.weight", torch.int64, "has dtype I64, expected one of ['BF16', 'F16', 'F32']"),
    ("model.layers.0.mlp.down_proj.weight", torch.float64,
     "has dtype F64, expected one of ['BF16', 'F16', 'F32'] or F8_E4M3"),                 # an FP8-able weight
    ("lm_head.weight", torch.float8_e4m3fn, "is F8_E4M3, but this tensor is never block-FP8"),
])
def test_wrong_dtype_says_which_dtypes_are_allowed(tiny, name, dtype, reason):
    file = _rewrite(_single(tiny), lambda t: t.__setitem__(name, t[name].to(dtype)))
    assert f"tensor '{name}' in {file} {reason}" in _error(tiny)


def test_wrong_shape_states_both_shapes(tiny):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    file = _rewrite(_single(tiny), lambda t: t.__setitem__(name, t[name][:, :-1].clone()))
    assert f"tensor '{name}' in {file} has shape [96, 47], expected [96, 48]" in _error(tiny)


def test_fp8_weight_without_scale_names_the_missing_scale(tiny_fp8):
    file = _rewrite(_single(tiny_fp8), lambda t: t.pop(KV_A + "_scale_inv"))
    assert f"tensor '{KV_A}' in {file} is F8_E4M3 but has no '{KV_A}_scale_inv'" in _error(tiny_fp8)


def test_scale_of_a_non_fp8_weight_says_why(tiny_fp8):
    name = "model.layers.0.self_attn.q_a_proj.weight"
    file = _rewrite(_single(tiny_fp8), lambda t: t.__setitem__(name, t[name].float().to(torch.bfloat16)))
    assert f"unexpected tensor '{name}_scale_inv' in {file}: its weight is not F8_E4M3" in _error(tiny_fp8)


def test_scale_dtype_reason(tiny_fp8):
    name = KV_A + "_scale_inv"
    file = _rewrite(_single(tiny_fp8), lambda t: t.__setitem__(name, t[name].double()))
    assert f"tensor '{name}' in {file} is F64, expected F32" in _error(tiny_fp8)


def test_problem_list_counts_and_truncates(tiny):
    names = [f"model.layers.{l}.{n}" for l in range(4) for n in ("input_layernorm.weight",
                                                                   "post_attention_layernorm.weight",
                                                                   "self_attn.q_a_layernorm.weight")]
    _rewrite(_single(tiny), lambda t: [t.pop(n) for n in names])
    msg = _error(tiny)
    assert f"does not match its config (12 problems):" in msg
    assert msg.count("missing tensor '") == 10 and msg.rstrip().endswith("... and 2 more")
    assert f"missing tensor '{names[0]}' (expected [64] in {_single(tiny)})" in msg


def test_one_problem_is_singular(tiny):
    name = "model.norm.weight"
    _rewrite(_single(tiny), lambda t: t.pop(name))
    msg = _error(tiny)
    assert "(1 problem):" in msg and "missing tensor 'model.norm.weight'" in msg


def _header(file):
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _put_header(file, header, n_old):
    """Rewrite the header keeping its length (padded with spaces, as safetensors allows)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n_old
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(raw + b" " * (n_old - len(raw)))


@pytest.mark.parametrize("edit,reason", [
    (lambda h, k: h[k].__setitem__("data_offsets", [h[k]["data_offsets"][0], h[k]["data_offsets"][1] - 2]),
     "needs {need} bytes, header gives {got}"),
    (lambda h, k: h[k].__setitem__("shape", "64"), "corrupt safetensors header entry for tensor"),
    (lambda h, k: h[k].__setitem__("data_offsets", [0, 10 ** 12]), "runs past the data end"),
    (lambda h, k: h[k].__setitem__("shape", [-1]), "corrupt safetensors header entry for tensor"),
])
def test_corrupt_header_entries_say_what_is_wrong(tiny, edit, reason):
    file = _single(tiny)
    n, h = _header(file)
    key = "model.norm.weight"
    b, e = h[key]["data_offsets"]
    edit(h, key)
    _put_header(file, h, n)
    msg = _error(tiny)
    assert f"{file}:" in msg and key in msg
    assert reason.format(need=e - b, got=e - b - 2) in msg


def test_truncated_file_reason(tiny):
    file = _single(tiny)
    with open(file, "r+b") as f:
        f.truncate(5)
    assert f"{file}: truncated safetensors file (5 bytes, no header)" in _error(tiny)
