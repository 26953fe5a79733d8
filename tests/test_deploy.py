"""Deployment YAMLs: every bundled config loads; broken variants fail naming the key; from_deployment."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from glm52_backends import cli
from glm52_backends.config import GLM52_CONFIG, ConfigError
from glm52_backends.configs import bundled_configs
from glm52_backends.deploy import DeploymentError, chip_lacks, load_deployment
from glm52_backends.engine import GLM52
from glm52_backends.registry import BackendUnavailable
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

BUNDLED = bundled_configs()
VENDORS_IN_ISSUE = ("nvidia-h100", "nvidia-h200", "nvidia-h20", "ascend-910b", "ascend-910c", "ascend-950",
                    "cambricon-mlu590", "kunlunxin-p800", "hygon-k100", "metax-c500", "mthreads-s4000",
                    "biren-br100", "cpu-tiny")
# further layouts of a product above, each from a published recipe (spec/ascend-and-chips.md §5)
RECIPE_LAYOUTS = ("ascend-910c-1m",)
HARDWARE_KEYS = ("memory_per_device_gb", "devices_per_node", "hbm_tbs", "bf16_tflops", "fp8_tflops")


def test_every_product_of_the_issue_has_a_config():
    assert sorted(BUNDLED) == sorted(VENDORS_IN_ISSUE + RECIPE_LAYOUTS)


def test_ascend_910c_1m_is_the_tutorials_1m_layout(tmp_path):
    """vllm-ascend's GLM5.2 tutorial, "1M context: single A3 node DP1 TP16 (enable_dsa_cp, ...)": GLM-5.2-w4a8c8
    on one A3 node, the cache striped over the TP16 group; the same chip facts as ascend-910c."""
    d, base = load_deployment("ascend-910c-1m"), load_deployment("ascend-910c")
    assert (d.nodes, d.devices_per_node, d.tp, d.dp, d.ep, d.dcp) == (1, 16, 16, 1, 16, 16)
    assert (d.weights_dtype, d.kv_cache_dtype, d.index_cache_dtype) == ("w4a8", "int8", "int8")
    assert (d.max_context, d.max_batch, d.cache_block_size, d.mtp_draft_tokens) == (1048576, 1, 128, 3)
    for k in ("vendor", "chip", "device_type", "backend", "memory_per_device_gb", "memory_utilization",
              "runtime_reserve_gb", "collective", "weight_dtypes", "kv_cache_dtypes", "hbm_tbs", "bf16_tflops",
              "fp8_tflops", "env", "max_batched_tokens"):
        assert getattr(d, k) == getattr(base, k), k
    assert d.offload_gb == 0
    # the C8 caches reach the model as int8 (GLM52 turns them into c8_sfa / c8_li), blocks of 128
    kw = d.engine_config(model=str(tmp_path))[1].settings()
    assert (kw["kv_cache_dtype"], kw["index_cache_dtype"], kw["block_size"]) == ("int8", "int8", 128)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_config_loads(name):
    d = load_deployment(name)
    assert d.name == name
    assert d.plan.world_size == d.devices == d.devices_per_node * d.nodes
    assert (d.plan.tp, d.plan.dp, d.plan.ep, d.plan.dcp) == (d.tp, d.dp, d.ep, d.dcp)
    mcfg = d.model_config()
    assert mcfg.num_attention_heads % d.tp == 0 and mcfg.n_routed_experts % d.ep == 0
    assert d.weights_dtype in d.weight_dtypes and d.kv_cache_dtype in d.kv_cache_dtypes
    lacks, _ = chip_lacks(d.vendor, d.chip)
    assert not set(lacks) & {d.weights_dtype, d.kv_cache_dtype, *d.weight_dtypes, *d.kv_cache_dtypes}
    # the same file by path, and `replace` with no change, give the same config
    assert load_deployment(str(BUNDLED[name])) == d == d.replace()


@pytest.mark.parametrize("name", sorted(n for n in BUNDLED if n != "cpu-tiny"))
def test_hardware_figures_cite_a_source(name):
    """Each non-null hardware figure has a comment with its source; third-party ones say `estimate`."""
    for line in BUNDLED[name].read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*(\w+):\s*([^#]*?)\s*(#.*)?$", line)
        if not m or m.group(1) not in HARDWARE_KEYS or m.group(2) in ("null", ""):
            continue
        comment = (m.group(3) or "").lower()
        assert "source" in comment, f"{name}: {m.group(1)} has no source comment"
        if "third-party" in comment or "[s]" in comment:
            assert "estimate" in comment, f"{name}: {m.group(1)} is third-party but not marked estimate"


# ---- broken variants ---------------------------------------------------------------------------
def _write_variant(tmp_path, base: str, edit) -> str:
    raw = yaml.safe_load(BUNDLED[base].read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / f"{base}-broken.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def _set(dotted: str, value):
    def edit(raw):
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return edit


def _many(*edits):
    def edit(raw):
        for e in edits:
            e(raw)
    return edit


BROKEN = [
    # (id, base config, edit, key named in the error)
    ("unknown top-level key", "ascend-910c", _set("gpu_count", 16), "gpu_count"),
    ("unknown nested key", "ascend-910c", _set("parallel.pp", 2), "parallel.pp"),
    ("wrong type: string for a number", "nvidia-h200", _set("memory_per_device_gb", "141GB"), "memory_per_device_gb"),
    ("wrong type: float for an int", "nvidia-h200", _set("parallel.tp", 8.0), "parallel.tp"),
    ("wrong type: bool for an int", "nvidia-h200", _set("nodes", True), "nodes"),
    ("wrong type: list for a mapping", "nvidia-h200", _set("parallel", [8, 8]), "parallel"),
    ("missing required key", "nvidia-h200", lambda raw: raw.pop("collective"), "collective"),
    ("tp does not divide the 64 heads", "ascend-910c",
     _many(_set("devices_per_node", 12), _set("parallel.tp", 12), _set("parallel.dp", 1), _set("parallel.ep", 1)),
     "parallel.tp"),
    ("ep does not divide the 256 experts", "ascend-910c", _set("parallel.ep", 24), "parallel.ep"),
    ("tp x dp is not the device count", "ascend-910c", _set("parallel.dp", 1), "parallel"),
    ("fp8 weights on 910B", "ascend-910b", _set("dtypes.weights", "fp8"), "dtypes.weights"),
    ("fp8 cache on 910C", "ascend-910c", _set("dtypes.kv_cache", "fp8"), "dtypes.kv_cache"),
    ("910B capabilities claiming fp8", "ascend-910b",
     _set("capabilities.weight_dtypes", ["bf16", "fp8", "w8a8"]), "capabilities.weight_dtypes"),
    ("dtype the YAML's chip lacks", "kunlunxin-p800", _set("dtypes.weights", "w4a8"), "dtypes.weights"),
    ("unknown dtype", "nvidia-h200", _set("dtypes.weights", "int3"), "dtypes.weights"),
    ("context beyond the model", "nvidia-h200", _set("max_context", 2 * 1048576), "max_context"),
    ("dcp not dividing tp", "nvidia-h200", _set("parallel.dcp", 3), "parallel.dcp"),
    ("backend on the wrong device", "nvidia-h200", _set("device_type", "npu"), "backend"),
    ("unknown device type", "cambricon-mlu590", _set("device_type", "gpu"), "device_type"),
    ("model that is not a checkpoint", "cpu-tiny", _set("model", "no/such/folder"), "model"),
    ("zero devices", "cpu-tiny", _set("devices_per_node", 0), "devices_per_node"),
    ("utilization above 1", "cpu-tiny", _set("memory_utilization", 1.5), "memory_utilization"),
    ("blocks of no tokens", "cpu-tiny", _set("cache_block_size", 0), "cache_block_size"),
    ("utilization of zero", "cpu-tiny", _set("memory_utilization", 0), "memory_utilization"),
    ("negative runtime reserve", "cpu-tiny", _set("runtime_reserve_gb", -1), "runtime_reserve_gb"),
    ("negative offload", "cpu-tiny", _set("offload_gb", -2), "offload_gb"),
    ("negative offload with dcp", "nvidia-h200", _set("offload_gb", -1), "offload_gb"),
    ("no memory", "cpu-tiny", _set("memory_per_device_gb", 0), "memory_per_device_gb"),
    ("negative draft tokens", "cpu-tiny", _set("mtp_draft_tokens", -1), "mtp_draft_tokens"),
    ("zero nodes", "cpu-tiny", _set("nodes", 0), "nodes"),
    ("a capability of zero", "nvidia-h200", _set("capabilities.hbm_tbs", 0), "capabilities.hbm_tbs"),
    ("unknown collective", "nvidia-h200", _set("collective", "mpi"), "collective"),
    ("unknown capability dtype", "nvidia-h200", _set("capabilities.kv_cache_dtypes", ["bf16", "fp4"]),
     "capabilities.kv_cache_dtypes"),
    ("an env name that is not one", "ascend-910c", _set("env", {"1BAD": "x"}), "env"),
    ("an empty env value", "ascend-910c", _set("env", {"HCCL_BUFFSIZE": ""}), "env.HCCL_BUFFSIZE"),
    ("dcp of zero", "cpu-tiny", _set("parallel.dcp", 0), "parallel.dcp"),
]


def test_values_at_the_edges_of_their_ranges_load():
    """The least (or most) each range admits loads: no reserve, no offload, no drafts, all the memory,
    one-token blocks."""
    d = load_deployment("cpu-tiny").replace(runtime_reserve_gb=0, offload_gb=0, mtp_draft_tokens=0,
                                            memory_utilization=1, cache_block_size=1)
    assert (d.runtime_reserve_gb, d.offload_gb, d.mtp_draft_tokens, d.memory_utilization, d.cache_block_size) == \
        (0, 0, 0, 1, 1)


def test_offload_with_decode_context_parallelism_loads():
    """Host offload and DCP together: each dcp rank offloads its own 1/dcp of the latent rows (the planner
    counts offload_gb per device against that share, tests/test_planner.py)."""
    d = load_deployment("cpu-tiny").replace(devices_per_node=2, **{"parallel.tp": 2})
    both = d.replace(offload_gb=4, **{"parallel.dcp": 2})
    assert (both.offload_gb, both.dcp) == (4, 2)
    h200 = load_deployment("nvidia-h200").replace(offload_gb=10)
    assert (h200.offload_gb, h200.dcp) == (10, 8)


@pytest.mark.parametrize("base,edit,key", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_variant_names_the_key(tmp_path, base, edit, key):
    path = _write_variant(tmp_path, base, edit)
    with pytest.raises(DeploymentError) as e:
        load_deployment(path)
    assert e.value.key == key
    assert str(e.value).startswith(f"{base}-broken.yaml: '{key}': ")


def test_duplicate_key_is_an_error(tmp_path):
    text = BUNDLED["cpu-tiny"].read_text(encoding="utf-8") + "\nnodes: 2\n"
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DeploymentError, match="'nodes': duplicate key"):
        load_deployment(str(path))


def test_replace_revalidates_and_unknown_names_list_the_bundled():
    d = load_deployment("ascend-910c")
    with pytest.raises(DeploymentError) as e:
        d.replace(**{"parallel.tp": 5})
    assert e.value.key == "parallel"  # 5 x 2 != 16 devices
    assert d.replace(nodes=2, **{"parallel.dp": 4, "parallel.ep": 32}).devices == 32
    with pytest.raises(ConfigError, match="bundled configs: .*ascend-910c"):
        load_deployment("ascend-9999")


# ---- building the model -------------------------------------------------------------------------
def test_from_deployment_builds_the_tiny_model():
    model = GLM52.from_deployment("cpu-tiny", progress=False)
    d = load_deployment("cpu-tiny")
    assert model.backend_name == d.backend == "cpu_ref"
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.has_mtp == (d.mtp_draft_tokens > 0)
    assert model.cfg.num_hidden_layers == d.model_config().num_hidden_layers
    # it is the embedded default model: the same logits as loading that folder directly
    from glm52_backends import default_checkpoint
    ref = GLM52(default_checkpoint(), backend="cpu_ref", progress=False)
    ids = torch.tensor([[3, 17, 200, 5, 9, 41, 77]])
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    out = model.generate([[1, 2, 3]], max_new_tokens=3, speculative=d.mtp_draft_tokens)
    assert len(out.tokens[0]) == 3


def test_from_deployment_overrides_and_refuses_the_planning_only_model(tmp_path):
    ckpt = make_tiny_checkpoint(str(tmp_path / "ck"), mtp=False, layers=2, seed=1)
    model = GLM52.from_deployment(load_deployment("cpu-tiny"), model=ckpt, backend="torch", progress=False)
    assert model.backend_name == "torch" and not model.has_mtp
    with pytest.raises(DeploymentError) as e:
        GLM52.from_deployment("nvidia-h200")
    assert e.value.key == "model"
    assert load_deployment("nvidia-h200").model_config() is GLM52_CONFIG


def test_yaml_model_path_is_resolved_beside_the_yaml(tmp_path):
    make_tiny_checkpoint(str(tmp_path / "ck"), mtp=True, layers=2, seed=2)
    raw = yaml.safe_load(BUNDLED["cpu-tiny"].read_text(encoding="utf-8"))
    raw["model"] = "ck"
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    d = load_deployment(str(tmp_path / "site.yaml"))
    assert d.model == str(tmp_path / "ck") and d.model_config().num_hidden_layers == 2


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ck") / "tiny"), mtp=True, layers=2, seed=3)


TORCH_BACKEND_CONFIGS = sorted(n for n in BUNDLED if load_deployment(n).backend == "torch")


@pytest.mark.parametrize("name", TORCH_BACKEND_CONFIGS)
def test_vendor_yaml_runs_on_the_generic_backend(name, tiny_ckpt):
    """A vendor YAML builds its model on the generic torch backend (here on the CPU, with a tiny checkpoint)."""
    d = load_deployment(name)
    model = GLM52.from_deployment(d, model=tiny_ckpt, device="cpu", progress=False)
    assert model.backend_name == "torch" and model.dtype == d.torch_dtype == torch.bfloat16
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    # `dtypes.weights` is honoured: the BF16 checkpoint is quantized at load as the YAML says
    q = {"fp8": "fp8", "w8a8": "w8a8", "w4a8": "w4a8"}.get(d.weights_dtype, "none")
    assert model.load_stats["quantization"] == q
    if q != "none":
        assert model.load_stats["formats"].keys() > {"dense"}
    ref = GLM52(tiny_ckpt, backend="cpu_ref", dtype=torch.bfloat16, progress=False, quantization=q)
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    if d.device_type != "cpu" and not getattr(torch, d.device_type, None):
        # the device itself is not here: building on it says which adapter is missing
        with pytest.raises(BackendUnavailable, match="needs the torch_"):
            GLM52.from_deployment(d, model=tiny_ckpt, progress=False)


def test_ascend_yamls_pick_block_size_128_and_the_engine_defaults_to_the_backends(tmp_path, monkeypatch):
    for name in ("ascend-910b", "ascend-910c", "ascend-910c-1m", "ascend-950"):
        d = load_deployment(name)
        assert d.cache_block_size == 128
        kw = d.engine_config(model=str(tmp_path))[1].settings()
        assert kw["block_size"] == 128
    assert load_deployment("nvidia-h200").cache_block_size is None
    with pytest.raises(DeploymentError, match="cache_block_size"):
        load_deployment("cpu-tiny").replace(cache_block_size=0)
    monkeypatch.setenv("GLM52_ASCEND_EMULATE", "1")
    from glm52_backends.tiny import tiny_config
    cfg, _ = tiny_config(layers=2)
    assert GLM52(cfg, backend="ascend", progress=False).block_size == 128     # the backend's default
    assert GLM52(cfg, backend="cpu_ref", progress=False).block_size == 16
    assert GLM52(cfg, backend="ascend", block_size=32, progress=False).block_size == 32


def test_env_section_is_validated_and_applied_unless_exported(monkeypatch):
    """`env:` (e.g. the Ascend YAMLs' HCCL settings): names and values checked when the YAML is read, set
    before the process group is created, never over a variable the user exported."""
    from glm52_backends.deploy import DeploymentError, from_dict, load_deployment
    d = load_deployment("ascend-910c")
    assert dict(d.env) == {"HCCL_BUFFSIZE": "200", "HCCL_OP_EXPANSION_MODE": "AIV"}
    monkeypatch.setenv("HCCL_BUFFSIZE", "recorded")      # so the teardown restores the variable's absence
    monkeypatch.delenv("HCCL_BUFFSIZE")
    monkeypatch.setenv("HCCL_OP_EXPANSION_MODE", "HOST")
    assert d.apply_env() == {"HCCL_BUFFSIZE": "200"}
    import os
    assert os.environ["HCCL_BUFFSIZE"] == "200" and os.environ["HCCL_OP_EXPANSION_MODE"] == "HOST"
    raw = dict(d.raw)
    for env, key in (({"bad name": 1}, "env"), ({"X": True}, "env.X"), ({"X": ""}, "env.X"), ({"X": [1]}, "env.X")):
        with pytest.raises(DeploymentError, match=key.replace(".", "\\.")):
            from_dict({**raw, "env": env}, source="t.yaml")
    assert from_dict({k: v for k, v in raw.items() if k != "env"}, source="t.yaml").env == ()
