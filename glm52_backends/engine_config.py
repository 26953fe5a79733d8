"""One engine configuration: what `GLM52(...)`, `glm52 generate`, `glm52 serve` and a deployment YAML
all build.

    cfg = EngineConfig(backend="ascend", quantization="w8a8", parallel=ParallelPlan(tp=8, ep=8),
                       cache=CacheConfig(kv_cache_dtype="int8"))
    GLM52(path, cfg)                          # or GLM52(path, backend="ascend", tp=8, ep=8, ...)
    EngineConfig.from_settings(tp=2, block_size=64)     # the flat names GLM52 takes as keywords

The settings are a tree of frozen dataclasses: the engine's own (`EngineConfig`), the parallel
layout (`parallel.ParallelPlan`) and the paged cache (`CacheConfig`). Each leaf field is one setting,
with one flat name (its field name, unique over the tree), its type, default and help in the field's
metadata. Everything else is derived from these fields, never written again:
  - `GLM52`'s keyword arguments (`from_settings` / `settings`): one per leaf;
  - the command-line flags of `glm52 generate` and `glm52 serve` (`add_arguments` / `from_args`):
    `--<name with dashes>`, typed and range-checked by argparse;
  - the deployment YAML's `parallel:` section (`yaml_schema(ParallelPlan)`), and the `EngineConfig`
    a deployment builds (`DeploymentConfig.engine_config`).
A value's meaning is checked where it is used (`GLM52` names the culprit); argparse checks the types.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterator, NamedTuple

from .config import FLOAT_DTYPES, setting
from .parallel import ParallelPlan

GRAPH_MODES = {"auto": "auto", "on": True, "off": False, "trace": "trace", "compile": "compile"}
QUANTIZATIONS = ("fp8", "w8a8", "w4a8", "none")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: its blocks, its formats, host offload."""

    block_size: int | None = setting(None, "tokens per paged-cache block (default: the backend's, e.g. "
                                           "Ascend 128, else 16)", minimum=1)
    kv_cache_dtype: Any = setting("auto", "latent cache format: auto (the model dtype) | fp8 (fp8_ds_mla) | "
                                          "int8 (Ascend c8_sfa) | a format name", metavar="DTYPE")
    index_cache_dtype: Any = setting(None, "index-key cache format: as the latent's (default: follows it)",
                                     metavar="DTYPE")
    offload: int | None = setting(None, "host offload: latent blocks per layer kept on the device, the rest "
                                        "in host memory (default: the whole cache on the device)", minimum=1)


@dataclass(frozen=True)
class EngineConfig:
    """Model execution: backend, device, dtypes and quantization, graphs, parallel layout, cache."""

    backend: Any = setting("auto", "auto | cpu_ref | cuda | ascend | torch | <plugin>")   # GLM52 also takes an object
    device: Any = setting(None, "torch device (default: the backend's)")
    dtype: Any = setting(None, "float32 | bfloat16 | float16 (default: the backend's)", parse="dtype")
    quantization: str | None = setting(None, "weights: fp8 | w8a8 | w4a8 (quantized at load or as stored) | "
                                             "none (dequantize); default: as the checkpoint stores them",
                                       choices=QUANTIZATIONS)
    graph: Any = setting("auto", "decode steps as graphs: auto (captured on CUDA/NPU, eager on CPU) | on | "
                                 "off | trace | compile", choices=tuple(GRAPH_MODES), parse="graph")
    include_mtp: bool | None = setting(None, "load the MTP layer (default: when the checkpoint has one)", cli=False)
    collective: str | None = setting(None, "process-group backend (default: nccl on CUDA, hccl on NPU, gloo "
                                           "on CPU)", cli=False)
    seed: int = setting(0, "seed of random weights (a ModelConfig given without a state_dict)", cli=False)
    progress: bool = setting(True, "progress bar while loading", cli=False)
    parallel: ParallelPlan = field(default_factory=ParallelPlan)
    cache: CacheConfig = field(default_factory=CacheConfig)

    # ---- the flat names ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, where: str = "EngineConfig", **settings: Any) -> "EngineConfig":
        """From flat setting names (`tp=2, block_size=64, backend="cuda"`); an unknown name is refused
        (TypeError, as Python refuses an unknown keyword), listing the known ones."""
        return cls().replace(where, **settings)

    def replace(self, where: str = "EngineConfig", **settings: Any) -> "EngineConfig":
        """A copy with some settings changed, by flat name."""
        unknown = sorted(set(settings) - set(LEAVES))
        if unknown:
            raise TypeError(f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(LEAVES))}")
        return _rebuild(self, (), settings)

    def settings(self) -> dict[str, Any]:
        """Every setting by flat name (what `from_settings` takes back)."""
        return {name: leaf.get(self) for name, leaf in LEAVES.items()}


class Leaf(NamedTuple):
    """One setting: its flat name, its path in the tree, its field."""
    name: str
    path: tuple[str, ...]
    field: dataclasses.Field

    def get(self, cfg: EngineConfig) -> Any:
        v: Any = cfg
        for p in self.path:
            v = getattr(v, p)
        return v

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.field.metadata)


def _nested(cls: type) -> dict[str, type]:
    """Fields of `cls` that are themselves settings dataclasses (from their default factories)."""
    out = {}
    for f in fields(cls):
        if f.default_factory is not dataclasses.MISSING and is_dataclass(f.default_factory):
            out[f.name] = f.default_factory
    return out


def _leaves(cls: type, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    sub = _nested(cls)
    for f in fields(cls):
        if f.name in sub:
            yield from _leaves(sub[f.name], path + (f.name,))
        else:
            yield Leaf(f.name, path + (f.name,), f)


def _leaf_table() -> dict[str, Leaf]:
    out: dict[str, Leaf] = {}
    for leaf in _leaves(EngineConfig):
        if leaf.name in out:       # a flat name must say one thing
            raise AssertionError(f"setting {leaf.name!r} appears at {out[leaf.name].path} and {leaf.path}")
        if "help" not in leaf.field.metadata:
            raise AssertionError(f"setting {'.'.join(leaf.path)} has no help text (use parallel.setting)")
        out[leaf.name] = leaf
    return out


LEAVES: dict[str, Leaf] = _leaf_table()


def _rebuild(obj: Any, path: tuple[str, ...], settings: dict[str, Any]) -> Any:
    changes = {}
    sub = _nested(type(obj))
    for f in fields(obj):
        if f.name in sub:
            inner = {k: v for k, v in settings.items() if LEAVES[k].path[:len(path) + 1] == path + (f.name,)}
            if inner:
                changes[f.name] = _rebuild(getattr(obj, f.name), path + (f.name,), inner)
        elif f.name in settings:
            changes[f.name] = settings[f.name]
    return dataclasses.replace(obj, **changes) if changes else obj


# ---- the command line ------------------------------------------------------------------------------
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def int_at_least(low: int):
    """An argparse type: an integer >= `low`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}")
        return v
    parse.__name__ = "integer"
    return parse


def dtype_name(text: str) -> str:
    """An argparse type: a float dtype name of config.FLOAT_DTYPES."""
    if text not in FLOAT_DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(FLOAT_DTYPES)}")
    return text


def _converter(leaf: Leaf) -> Callable[[str], Any] | None:
    m = leaf.meta
    if m.get("minimum") is not None:
        return int_at_least(m["minimum"])
    if m.get("parse") == "dtype":
        return dtype_name
    return None


def add_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """Add a flag per command-line setting (those not marked cli=False). Each defaults
    to None (= not given: the engine's default, or a deployment's value, applies)."""
    for name, leaf in LEAVES.items():
        m = leaf.meta
        if not m.get("cli", True):
            continue
        kw: dict[str, Any] = {"default": None, "dest": name}
        default = leaf.field.default
        shown = "" if default is None or default is dataclasses.MISSING else f" (default {default})"
        kw["help"] = m["help"] + shown
        if m.get("choices"):
            kw["choices"] = m["choices"]
        conv = _converter(leaf)
        if conv is not None:
            kw["type"] = conv
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        if m.get("parse") == "graph":      # `--graph` alone: on; `--eager`: off
            kw.update(nargs="?", const="on")
            kw["help"] += "; --graph alone: on"
        parser.add_argument(flag(name), **kw)
        if m.get("parse") == "graph":
            parser.add_argument("--eager", dest=name, action="store_const", const="off",
                                help="the same as --graph off")


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (flat names -> values as GLM52 takes them)."""
    out = {}
    for name, leaf in LEAVES.items():
        v = getattr(args, name, None)
        if v is None or not leaf.meta.get("cli", True):
            continue
        if leaf.meta.get("parse") == "graph":
            v = GRAPH_MODES[v]
        elif leaf.meta.get("parse") == "dtype":
            v = FLOAT_DTYPES[v]
        out[name] = v
    return out


# ---- YAML ------------------------------------------------------------------------------------------
def yaml_schema(cls: type) -> dict[str, tuple[str, Any]]:
    """A settings dataclass's fields as a deployment-YAML section schema: key -> (type name, default)
    (deploy.py's type names: int, str, number, ...). Derived, so the YAML accepts what the engine does."""
    kinds = {"int": "int", "int | None": "int|null", "str": "str", "float": "number"}   # the types deploy checks
    out = {}
    for f in fields(cls):
        if f.type not in kinds:
            raise AssertionError(f"{cls.__name__}.{f.name}: type {f.type} has no YAML type name")
        out[f.name] = (kinds[f.type], f.default)
    return out


__all__ = ["EngineConfig", "CacheConfig", "ParallelPlan", "LEAVES", "add_arguments", "from_args", "flag",
           "yaml_schema", "GRAPH_MODES"]
