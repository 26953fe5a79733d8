"""Deployment configs (DESIGN §6): one YAML says which chip, how many, which dtypes and layout.

    cfg = load_deployment("ascend-910c")            # a bundled name, or a path to a YAML file
    plan(cfg).fits                                  # glm52_backends.planner
    GLM52.from_deployment("cpu-tiny")               # model + backend + device from the YAML

Every key is checked on load: an unknown or duplicate key, a wrong type, a parallel layout that
does not fit the devices or does not divide heads/experts, a dtype the chip lacks (by its own
`capabilities`, and by `CHIP_LACKS`, facts a YAML cannot overrule, e.g. no FP8 on 910B/910C), a
built-in backend on a device it does not run on -> one `DeploymentError` (a `ConfigError`) whose
message starts with the file and the offending key, e.g.
`ascend-910b.yaml: 'dtypes.weights': 'fp8' is not supported by Huawei Ascend 910B (...)`.
Whether the named backend is installed is checked when the model is built, not on load, so any
YAML can be planned on any machine.

Schema (types; defaults for optional keys):

    vendor: str                 chip: str                   description: str = ""
    device_type: str            torch device type: cpu cuda npu mlu musa xpu supa mps hpu
    backend: str                a registered backend name or "auto"
    dtypes: {weights: fp32|bf16|fp8|w8a8|w4a8, kv_cache: fp32|bf16|fp8|int8,
             index_cache: same choices, default = kv_cache}
    memory_per_device_gb: number    devices_per_node: int    nodes: int
    memory_utilization: number = 0.9   fraction of device memory the engine may use
    runtime_reserve_gb: number = 2.0   non-tensor memory: runtime context, collective buffers
    collective: str             nccl hccl cncl bkcl rccl mccl sccl gloo
    parallel: {tp: int = 1, ep: int = 1, dp: int = 1, dcp: int = 1}   (parallel.ParallelPlan's fields)
    model: str                  "tiny" | "glm-5.2" (the real architecture, planning only) | checkpoint folder
    mtp_draft_tokens: int = 0   max_context: int    max_batch: int   (requests per DP replica)
    max_batched_tokens: int = 8192   tokens per forward step (prefill chunk)
    cache_block_size: int|null = null   tokens per paged-cache block (null: the backend's default)
    capabilities: {weight_dtypes: [str], kv_cache_dtypes: [str],
                   hbm_tbs: number|null, bf16_tflops: number|null, fp8_tflops: number|null}
    env: {NAME: str|number} = {}        environment set at setup unless already exported (HCCL_BUFFSIZE, ...)
    offload_gb: number = 0      host memory per device for cold latent-cache blocks (0: no offload;
                                the planner models GLM52(offload=...): index keys and a staging area on
                                the device, the latent rows of the whole context on the host; with
                                parallel.dcp > 1 each device offloads only its own 1/dcp of every
                                request's latent rows and stages 1/dcp of each selected block, so its
                                host share holds context x batch x latent bytes / dcp)

Units: `memory_per_device_gb` is the capacity the vendor quotes; HBM capacities are binary, so the
planner reads it as GiB (2**30 bytes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import GLM52_CONFIG, ConfigError, ModelConfig
from .engine_config import EngineConfig, yaml_schema
from .parallel import ParallelPlan

WEIGHT_DTYPES = ("fp32", "bf16", "fp8", "w8a8", "w4a8")
CACHE_DTYPES = ("fp32", "bf16", "fp8", "int8")
DEVICE_TYPES = ("cpu", "cuda", "npu", "mlu", "musa", "xpu", "supa", "mps", "hpu")
COLLECTIVES = ("nccl", "hccl", "cncl", "bkcl", "rccl", "mccl", "sccl", "gloo")
ARCH_MODELS = ("tiny", "glm-5.2")

# Formats a chip's software stack lacks, whatever a YAML's `capabilities` claims: (substring of
# "vendor chip", lowercased) -> (formats, source). spec/ascend-and-chips.md §4, §6.
CHIP_LACKS: dict[str, tuple[tuple[str, ...], str]] = {
    "910b": (("fp8",), "torch_npu op docs: no fp8 on Atlas A2; int8 W8A8/W4A8 and C8 caches instead"),
    "910c": (("fp8",), "torch_npu op docs: Atlas A3 excludes fp8/hif8; int8 W8A8/W4A8 and C8 caches instead"),
    "p800": (("fp8",), "vLLM-Kunlun accepts fp32/fp16/bf16/int8 only"),
    "biren": (("fp8",), "SGLang's supa platform: supports_fp8=False"),
}
# Built-in backends and the device types they run on (vendor plugins and `torch` run anywhere).
BACKEND_DEVICES = {"cpu_ref": ("cpu",), "cuda": ("cuda",), "ascend": ("npu",)}


def chip_lacks(vendor: str, chip: str) -> tuple[tuple[str, ...], str]:
    """(formats the chip lacks, source) from `CHIP_LACKS`; ((), "") for chips with no entry."""
    key = f"{vendor} {chip}".lower()
    for part, facts in CHIP_LACKS.items():
        if part in key:
            return facts
    return (), ""


class DeploymentError(ConfigError):
    """A deployment YAML that cannot describe a valid deployment; `.key` names the culprit."""

    def __init__(self, where: str, key: str, msg: str):
        self.where, self.key = where, key
        super().__init__(f"{where}: '{key}': {msg}")


# ---- schema ---------------------------------------------------------------------------------------
_REQUIRED = object()
# key -> (type name, default). Type names: str, int, number, dict, strlist, number|null.
_TOP: dict[str, tuple[str, Any]] = {
    "vendor": ("str", _REQUIRED),
    "chip": ("str", _REQUIRED),
    "description": ("str", ""),
    "device_type": ("str", _REQUIRED),
    "backend": ("str", _REQUIRED),
    "dtypes": ("dict", _REQUIRED),
    "memory_per_device_gb": ("number", _REQUIRED),
    "memory_utilization": ("number", 0.9),
    "runtime_reserve_gb": ("number", 2.0),
    "devices_per_node": ("int", _REQUIRED),
    "nodes": ("int", _REQUIRED),
    "collective": ("str", _REQUIRED),
    "parallel": ("dict", _REQUIRED),
    "model": ("str", _REQUIRED),
    "mtp_draft_tokens": ("int", 0),
    "max_context": ("int", _REQUIRED),
    "max_batch": ("int", _REQUIRED),
    "max_batched_tokens": ("int", 8192),
    "cache_block_size": ("int|null", None),
    "capabilities": ("dict", _REQUIRED),
    "env": ("dict", None),
    "offload_gb": ("number", 0.0),
}
_DTYPES = {"weights": ("str", _REQUIRED), "kv_cache": ("str", _REQUIRED), "index_cache": ("str", None)}
_PARALLEL = yaml_schema(ParallelPlan)     # the engine's own fields (engine_config.py): tp, dp, ep, dcp
_CAPS = {"weight_dtypes": ("strlist", _REQUIRED), "kv_cache_dtypes": ("strlist", _REQUIRED),
         "hbm_tbs": ("number|null", None), "bf16_tflops": ("number|null", None),
         "fp8_tflops": ("number|null", None)}


@dataclass(frozen=True)
class DeploymentConfig:
    """A validated deployment YAML. Build variants with `cfg.replace(**{"dtypes.weights": "bf16"})`."""

    name: str
    vendor: str
    chip: str
    device_type: str
    backend: str
    weights_dtype: str
    kv_cache_dtype: str
    index_cache_dtype: str
    memory_per_device_gb: float
    memory_utilization: float
    runtime_reserve_gb: float
    devices_per_node: int
    nodes: int
    collective: str
    tp: int
    ep: int
    dp: int
    dcp: int
    model: str
    mtp_draft_tokens: int
    max_context: int
    max_batch: int
    max_batched_tokens: int
    cache_block_size: int | None
    weight_dtypes: tuple[str, ...]
    kv_cache_dtypes: tuple[str, ...]
    description: str = ""
    hbm_tbs: float | None = None
    offload_gb: float = 0.0                    # host memory per device for offloaded latent blocks (its 1/dcp)
    bf16_tflops: float | None = None
    fp8_tflops: float | None = None
    env: tuple[tuple[str, str], ...] = ()      # environment the runtime reads at setup (e.g. HCCL_BUFFSIZE)
    source: str = "<dict>"
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def devices(self) -> int:
        """Devices the deployment holds: devices_per_node x nodes (= the plan's world size, checked on load)."""
        return self.devices_per_node * self.nodes

    @property
    def plan(self) -> ParallelPlan:
        """The parallel layout (`parallel:`), whose `world_size` is the processes it runs as."""
        return ParallelPlan(tp=self.tp, dp=self.dp, ep=self.ep, dcp=self.dcp)

    @property
    def expert_shards(self) -> int:
        """Ranks the routed experts are split over: EP when enabled, else TP-sharded experts (vLLM)."""
        return self.plan.expert_shards

    @property
    def torch_dtype(self):
        """Compute dtype of the engine: fp32 stays fp32; every other format computes in bf16."""
        import torch
        return torch.float32 if self.weights_dtype == "fp32" else torch.bfloat16

    def model_config(self) -> ModelConfig:
        return resolve_model_config(self.model)

    def replace(self, **changes: Any) -> "DeploymentConfig":
        """A re-validated copy with dotted keys changed, e.g. `replace(nodes=2, **{"parallel.dp": 4})`."""
        raw = _deepcopy(self.raw)
        for dotted, value in changes.items():
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise DeploymentError(self.source, dotted, f"'{p}' is not a mapping")
            node[leaf] = value
        return from_dict(raw, source=self.source, name=self.name)

    # ---- building ----------------------------------------------------------------------------
    def engine_config(self, **overrides: Any) -> tuple[Any, EngineConfig]:
        """(model, the `EngineConfig`) for `GLM52(model, config)` on this deployment's backend and device
        (`GLM52.from_deployment` calls this). Overrides: model (a checkpoint), and any setting by its
        flat name (`EngineConfig.settings()`). Under torchrun (WORLD_SIZE > 1) the YAML's `parallel`
        layout and `collective` apply; in one process the whole model runs there (the layout is for
        planning)."""
        from .engine_config import LEAVES
        from .registry import get_backend

        unknown = sorted(set(overrides) - set(LEAVES) - {"model"})
        if unknown:
            raise ValueError(f"{os.path.basename(self.source)}: unknown override{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; known: model, {', '.join(sorted(LEAVES))}")
        src = overrides.pop("model", None) or self.model
        device = overrides.pop("device", None) or self.device_type
        backend = overrides.pop("backend", None) or self.backend
        dtype = overrides.pop("dtype", None) or self.torch_dtype
        # MTP drafting wants the MTP layer when the checkpoint has one; without drafting skip it
        overrides.setdefault("include_mtp", None if self.mtp_draft_tokens > 0 else False)
        if src == "glm-5.2":
            raise DeploymentError(self.source, "model",
                                  "'glm-5.2' names the published architecture, for planning only (its weights "
                                  "are 1.5 TB); point 'model' at a checkpoint folder, or pass model=PATH")
        if isinstance(backend, str) and backend in ("torch", "cpu_ref"):
            backend = get_backend(backend, device=device)  # these two run on any device they are given
        model_arg = tiny_checkpoint() if src == "tiny" else src
        if "quantization" not in overrides:     # `dtypes.weights`, honoured (not only planned)
            overrides["quantization"] = self.checkpoint_quantization(model_arg)
        if self.cache_block_size is not None:
            overrides.setdefault("block_size", self.cache_block_size)
        # dtypes.kv_cache / index_cache -> GLM52's vLLM-style cache dtypes (cache_formats.py): fp8 ->
        # fp8_ds_mla latent / fp8 index keys, int8 -> Ascend c8_sfa / c8_li; a float one is the model's dtype
        import torch
        floats = {"fp32": torch.float32, "bf16": torch.bfloat16}
        for key, yaml_value in (("kv_cache_dtype", self.kv_cache_dtype), ("index_cache_dtype", self.index_cache_dtype)):
            overrides.setdefault(key, "auto" if floats.get(yaml_value) == dtype else yaml_value)
        from .parallel import launched_world
        world = launched_world()       # WORLD_SIZE checked: garbage there is refused naming it
        if world > 1:
            # under torchrun: the YAML's layout over the launched ranks (one process: the whole model)
            for k, v in dataclasses.asdict(self.plan).items():
                overrides.setdefault(k, v)
            overrides.setdefault("collective", self.collective)
            n = overrides["tp"] * overrides["dp"]
            if n != world:   # a one-device layout would run the whole model on every rank and exit 0
                raise DeploymentError(os.path.basename(self.source), "parallel",
                                      f"tp x dp = {overrides['tp']} x {overrides['dp']} = {n} device(s), but "
                                      f"{world} processes were launched (WORLD_SIZE={world}); launch {n}, or "
                                      f"set parallel.tp / parallel.dp to match")
        if self.offload_gb > 0:     # host offload: the planner's staging area (the worst decode step's blocks)
            from .loader.layout import load_config
            topk = (model_arg if isinstance(model_arg, ModelConfig) else load_config(model_arg)).index_topk
            overrides.setdefault("offload", self.max_batch * (1 + self.mtp_draft_tokens) * topk)
        return model_arg, EngineConfig.from_settings(os.path.basename(self.source), backend=backend, device=device,
                                                     dtype=dtype, **overrides)

    def apply_env(self) -> dict[str, str]:
        """Set the YAML's `env` variables (communication libraries read them when the process group is
        created: HCCL_BUFFSIZE, HCCL_OP_EXPANSION_MODE, ...) where the environment does not already set
        them: an explicit `export` wins. Returns what was set."""
        done = {}
        for k, v in self.env:
            if k not in os.environ:
                os.environ[k] = done[k] = v
        return done

    def checkpoint_quantization(self, model: Any) -> str:
        """`GLM52(quantization=...)` for `dtypes.weights` on checkpoint `model` (a folder or a
        ModelConfig): fp8 -> block-FP8 (as stored, or quantized at load from BF16); w8a8 -> as stored
        (msModelSlim W8A8) or W8A8 dynamic from BF16; w4a8 -> as stored or W4A8 routed experts from BF16;
        bf16 / fp32 -> dense (a quantized checkpoint dequantized). A format the checkpoint cannot
        give is refused here, naming the key."""
        q = {"fp8": "fp8", "w8a8": "w8a8", "w4a8": "w4a8", "bf16": "none", "fp32": "none"}[self.weights_dtype]
        if q == "none" or isinstance(model, ModelConfig):
            return q
        from .loader import checkpoint_quantization, quantization_problem
        try:
            stored = checkpoint_quantization(model)
        except (ValueError, OSError):
            return q                # not a readable checkpoint: GLM52 names the problem when it loads it
        why = quantization_problem(stored, q, f"checkpoint {os.fspath(model)}")
        if why:
            raise DeploymentError(os.path.basename(self.source), "dtypes.weights", f"{self.weights_dtype!r}: {why}")
        return q


# ---- model resolution -------------------------------------------------------------------------------
def tiny_model_config() -> ModelConfig:
    """The config of the embedded default model (`glm52 generate`'s default: 4 layers + MTP)."""
    return ModelConfig.from_file(tiny_checkpoint())


def tiny_checkpoint() -> str:
    """The embedded default: the tiny trained GLM-5.2 shipped in the package (`default_checkpoint()`)."""
    from .loader import default_checkpoint
    return default_checkpoint()


def resolve_model_config(model: str) -> ModelConfig:
    if model == "glm-5.2":
        return GLM52_CONFIG
    if model == "tiny":
        return tiny_model_config()
    return ModelConfig.from_file(model)


# ---- loading --------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue         # `<<: *anchor`: merged keys may be overridden by the mapping's own (YAML merge)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DeploymentError(loader.name, str(key), f"duplicate key (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def parse_override(text: str) -> tuple[str, Any]:
    """`--set KEY=VALUE` -> (dotted key, the value parsed as YAML); a missing `=` or a value that is
    not YAML is refused naming the key (`glm52 plan --set`)."""
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. parallel.dp=2)")
    try:
        return key, yaml.load(value, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())
        raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML ({why})") from None


def bundled_names() -> list[str]:
    from glm52_backends.configs import bundled_configs
    return list(bundled_configs())


def find_config(path_or_name: str | os.PathLike) -> Path:
    """A YAML path: an existing file, or a bundled config named by its stem ("ascend-910c")."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    from glm52_backends.configs import bundled_configs
    bundled = bundled_configs()
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    if p.parent == Path(".") and stem in bundled:
        return bundled[stem]
    raise ConfigError(f"{os.fspath(path_or_name)}: no such deployment file; bundled configs: "
                      f"{', '.join(bundled) or 'none'}")


def load_deployment(path_or_name: "str | os.PathLike | dict | DeploymentConfig") -> DeploymentConfig:
    """Load and validate a deployment YAML (a path, a bundled name, a dict, or a loaded config)."""
    if isinstance(path_or_name, DeploymentConfig):
        return path_or_name
    if isinstance(path_or_name, dict):
        return from_dict(path_or_name)
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise ConfigError(f"a deployment is a YAML path, a bundled name, a dict or a DeploymentConfig; "
                          f"got {type(path_or_name).__name__}")
    path = find_config(path_or_name)
    where = path.name
    try:
        with open(path, encoding="utf-8") as f:
            loader = _StrictLoader(f)
            loader.name = where
            try:
                raw = loader.get_single_data()
            finally:
                loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: malformed YAML ({e})") from None
    except RecursionError:
        raise ConfigError(f"{where}: malformed YAML (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror or e})") from None
    return from_dict(raw, source=str(path), name=path.stem, where=where)


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "str":
        return isinstance(v, str) and v != ""
    if kind in ("int", "int|null"):
        return (v is None and kind == "int|null") or (isinstance(v, int) and not isinstance(v, bool))
    if kind in ("number", "number|null"):  # finite: YAML's .nan / .inf are not a memory size
        return (v is None and kind == "number|null") or \
            (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    if kind == "dict":
        return isinstance(v, dict)
    if kind == "strlist":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    raise AssertionError(kind)


_KIND_WORDS = {"str": "a non-empty string", "int": "an integer", "int|null": "an integer or null",
               "number": "a finite number",
               "number|null": "a finite number or null", "dict": "a mapping", "strlist": "a list of strings"}


def _section(where: str, d: Any, schema: dict, prefix: str) -> dict[str, Any]:
    """Check one mapping against its schema: unknown keys, missing keys, types; fill defaults."""
    if not isinstance(d, dict):
        raise DeploymentError(where, prefix.rstrip(".") or "<top level>", f"must be a mapping, got {d!r}")
    for k in d:
        if k not in schema:
            raise DeploymentError(where, f"{prefix}{k}", f"unknown key; known keys here: {', '.join(schema)}")
    out = {}
    for k, (kind, default) in schema.items():
        if k not in d:
            if default is _REQUIRED:
                raise DeploymentError(where, f"{prefix}{k}", "missing (required)")
            out[k] = default
            continue
        if not _type_ok(kind, d[k]):
            raise DeploymentError(where, f"{prefix}{k}", f"must be {_KIND_WORDS[kind]}, got {d[k]!r}")
        out[k] = d[k]
    return out


def from_dict(raw: dict, *, source: str = "<dict>", name: str | None = None,
              where: str | None = None) -> DeploymentConfig:
    """Validate a parsed YAML mapping (see the module docstring for the schema)."""
    where = where or os.path.basename(source)
    top = _section(where, raw, _TOP, "")
    dt = _section(where, top["dtypes"], _DTYPES, "dtypes.")
    par = _section(where, top["parallel"], _PARALLEL, "parallel.")
    caps = _section(where, top["capabilities"], _CAPS, "capabilities.")

    def bad(key: str, msg: str) -> DeploymentError:
        return DeploymentError(where, key, msg)

    # scalar ranges
    for k in ("devices_per_node", "nodes", "max_context", "max_batch", "max_batched_tokens"):
        if top[k] <= 0:
            raise bad(k, f"must be a positive integer, got {top[k]}")
    for k in ("tp", "ep", "dp", "dcp"):
        if par[k] <= 0:
            raise bad(f"parallel.{k}", f"must be a positive integer, got {par[k]}")
    if top["mtp_draft_tokens"] < 0:
        raise bad("mtp_draft_tokens", f"must be >= 0, got {top['mtp_draft_tokens']}")
    if top["cache_block_size"] is not None and top["cache_block_size"] <= 0:
        raise bad("cache_block_size", f"must be a positive integer or null, got {top['cache_block_size']}")
    if top["memory_per_device_gb"] <= 0:
        raise bad("memory_per_device_gb", f"must be > 0, got {top['memory_per_device_gb']}")
    if not 0 < top["memory_utilization"] <= 1:
        raise bad("memory_utilization", f"must be in (0, 1], got {top['memory_utilization']}")
    if top["runtime_reserve_gb"] < 0:
        raise bad("runtime_reserve_gb", f"must be >= 0, got {top['runtime_reserve_gb']}")
    if top["offload_gb"] < 0:
        raise bad("offload_gb", f"must be >= 0, got {top['offload_gb']}")
    for k, v in caps.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            raise bad(f"capabilities.{k}", f"must be > 0 or null, got {v}")

    env = []
    for k, v in (top["env"] or {}).items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise bad("env", f"{k!r} is not an environment variable name")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or v == "":
            raise bad(f"env.{k}", f"must be a non-empty string or a number, got {v!r}")
        env.append((k, str(v)))

    # enumerations
    if top["device_type"] not in DEVICE_TYPES:
        raise bad("device_type", f"{top['device_type']!r} is not a torch device type this project knows "
                                 f"({', '.join(DEVICE_TYPES)})")
    if top["collective"] not in COLLECTIVES:
        raise bad("collective", f"{top['collective']!r} is not a known collective backend ({', '.join(COLLECTIVES)})")
    for k, allowed in (("weight_dtypes", WEIGHT_DTYPES), ("kv_cache_dtypes", CACHE_DTYPES)):
        for v in caps[k]:
            if v not in allowed:
                raise bad(f"capabilities.{k}", f"{v!r} is not one of {', '.join(allowed)}")
    dt["index_cache"] = dt["index_cache"] or dt["kv_cache"]
    chip = f"{top['vendor']} {top['chip']}"
    lacks, why = chip_lacks(top["vendor"], top["chip"])
    for k, allowed, supported in (("weights", WEIGHT_DTYPES, caps["weight_dtypes"]),
                                  ("kv_cache", CACHE_DTYPES, caps["kv_cache_dtypes"]),
                                  ("index_cache", CACHE_DTYPES, caps["kv_cache_dtypes"])):
        if dt[k] not in allowed:
            raise bad(f"dtypes.{k}", f"{dt[k]!r} is not one of {', '.join(allowed)}")
        if dt[k] in lacks:
            raise bad(f"dtypes.{k}", f"{dt[k]!r} is not supported by {chip} ({why})")
        if dt[k] not in supported:
            caps_key = "weight_dtypes" if k == "weights" else "kv_cache_dtypes"
            raise bad(f"dtypes.{k}", f"{dt[k]!r} is not supported by {chip} "
                                     f"(capabilities.{caps_key}: {', '.join(supported)})")
    for k in ("weight_dtypes", "kv_cache_dtypes"):
        for v in caps[k]:
            if v in lacks:
                raise bad(f"capabilities.{k}", f"lists {v!r}, which {chip} does not have ({why})")
    runs_on = BACKEND_DEVICES.get(top["backend"])
    if runs_on and top["device_type"] not in runs_on:
        raise bad("backend", f"backend {top['backend']!r} runs on {'/'.join(runs_on)}, not on device_type "
                             f"{top['device_type']!r} (the 'torch' backend runs on any torch device)")

    # the model: needed to check the parallel layout against heads and experts
    model = top["model"]
    if model not in ARCH_MODELS:
        p = Path(model).expanduser()
        if not p.is_absolute() and not p.exists() and source not in ("<dict>",):
            beside = Path(source).parent / p   # relative paths may be relative to the YAML
            p = beside if beside.exists() else p
        if not (p / "config.json").is_file():
            raise bad("model", f"{model!r} is neither 'tiny', 'glm-5.2' nor a checkpoint folder with a "
                               f"config.json")
        model = str(p)
    try:
        mcfg = resolve_model_config(model)
    except ConfigError as e:
        raise bad("model", str(e)) from None

    tp, ep, dp, dcp = par["tp"], par["ep"], par["dp"], par["dcp"]
    world = top["devices_per_node"] * top["nodes"]
    if tp * dp != world:
        raise bad("parallel", f"tp x dp = {tp} x {dp} = {tp * dp} must equal the devices "
                              f"(devices_per_node x nodes = {top['devices_per_node']} x {top['nodes']} = {world})")
    if mcfg.num_attention_heads % tp:
        raise bad("parallel.tp", f"tp={tp} does not divide the {mcfg.num_attention_heads} attention heads")
    if mcfg.n_routed_experts % ep:
        raise bad("parallel.ep", f"ep={ep} does not divide the {mcfg.n_routed_experts} routed experts")
    if ep == 1 and mcfg.moe_intermediate_size % tp:
        raise bad("parallel.tp", f"without expert parallelism each expert is split by tp; tp={tp} does not "
                                 f"divide moe_intermediate_size {mcfg.moe_intermediate_size}")
    if mcfg.intermediate_size % tp:
        raise bad("parallel.tp", f"tp={tp} does not divide the dense MLP width {mcfg.intermediate_size}")
    if world % ep:
        raise bad("parallel.ep", f"ep={ep} does not divide the {world} devices (tp x dp)")
    if tp % dcp:
        raise bad("parallel.dcp", f"dcp={dcp} must divide tp={tp}: decode context parallelism shards "
                                  f"the cache inside the TP group")
    if top["max_context"] > mcfg.max_position_embeddings:
        raise bad("max_context", f"{top['max_context']} exceeds the model's max_position_embeddings "
                                 f"({mcfg.max_position_embeddings})")
    if top["mtp_draft_tokens"] and not mcfg.num_nextn_predict_layers:
        raise bad("mtp_draft_tokens", f"{top['mtp_draft_tokens']} draft tokens need an MTP layer; "
                                      f"the model has num_nextn_predict_layers = 0")

    return DeploymentConfig(
        name=name or os.path.splitext(os.path.basename(source))[0],
        vendor=top["vendor"], chip=top["chip"], description=top["description"],
        device_type=top["device_type"], backend=top["backend"],
        weights_dtype=dt["weights"], kv_cache_dtype=dt["kv_cache"], index_cache_dtype=dt["index_cache"],
        memory_per_device_gb=float(top["memory_per_device_gb"]),
        memory_utilization=float(top["memory_utilization"]),
        runtime_reserve_gb=float(top["runtime_reserve_gb"]),
        devices_per_node=top["devices_per_node"], nodes=top["nodes"], collective=top["collective"],
        tp=tp, ep=ep, dp=dp, dcp=dcp, model=model, mtp_draft_tokens=top["mtp_draft_tokens"],
        max_context=top["max_context"], max_batch=top["max_batch"],
        max_batched_tokens=top["max_batched_tokens"], cache_block_size=top["cache_block_size"],
        weight_dtypes=tuple(caps["weight_dtypes"]), kv_cache_dtypes=tuple(caps["kv_cache_dtypes"]),
        hbm_tbs=caps["hbm_tbs"], bf16_tflops=caps["bf16_tflops"], fp8_tflops=caps["fp8_tflops"],
        env=tuple(env), offload_gb=float(top["offload_gb"]), source=source, raw=_deepcopy(raw),
    )


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


__all__ = ["DeploymentConfig", "DeploymentError", "load_deployment", "from_dict", "find_config", "chip_lacks",
           "bundled_names", "resolve_model_config", "tiny_model_config", "tiny_checkpoint", "WEIGHT_DTYPES",
           "CACHE_DTYPES"]

