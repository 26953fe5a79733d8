"""The one engine configuration (engine_config.py): GLM52's keywords, `glm52 generate` / `glm52 serve`
flags and the deployment YAML's `parallel:` section all come from its fields, and build the same thing."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from glm52_backends import cli, serve
from glm52_backends.deploy import _PARALLEL, load_deployment
from glm52_backends.engine import GLM52
from glm52_backends.engine_config import (LEAVES, CacheConfig, EngineConfig, add_arguments, flag, from_args,
                                          yaml_schema)
from glm52_backends.loader import default_checkpoint
from glm52_backends.parallel import LayoutError, ParallelPlan


def test_every_setting_has_one_flat_name_and_a_help_text():
    names = [leaf.name for leaf in LEAVES.values()]
    assert len(names) == len(set(names))
    tree = {f.name for f in dataclasses.fields(EngineConfig)} - {"parallel", "cache"}
    tree |= {f.name for f in dataclasses.fields(ParallelPlan)} | {f.name for f in dataclasses.fields(CacheConfig)}
    assert set(LEAVES) == tree                     # every leaf field of the tree, nothing else
    for leaf in LEAVES.values():
        assert leaf.meta["help"].strip(), leaf.name


def test_flat_settings_round_trip_and_unknown_names_are_refused():
    c = EngineConfig.from_settings(tp=2, dcp=2, block_size=64, kv_cache_dtype="fp8", backend="torch")
    assert c.parallel == ParallelPlan(tp=2, dcp=2) and c.cache.block_size == 64 and c.backend == "torch"
    assert EngineConfig.from_settings(**c.settings()) == c
    assert c.replace(tp=4).parallel.tp == 4 and c.parallel.tp == 2          # frozen: replace makes a copy
    with pytest.raises(TypeError, match="unknown setting 'block'.*known: backend, block_size"):
        EngineConfig.from_settings(block=16)
    with pytest.raises(LayoutError, match="dcp = 3 must divide tp = 2"):
        EngineConfig.from_settings(tp=2, dcp=3)


def test_the_yaml_parallel_section_is_the_plans_fields():
    assert _PARALLEL == yaml_schema(ParallelPlan)
    assert set(_PARALLEL) == {f.name for f in dataclasses.fields(ParallelPlan)}
    assert all(kind == "int" and default == 1 for kind, default in _PARALLEL.values())


def _help_of(parser) -> str:
    return parser.format_help()


def test_generate_and_serve_take_the_same_engine_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    gen = capsys.readouterr().out
    srv = _help_of(serve._parser())
    for name, leaf in LEAVES.items():
        if not leaf.meta.get("cli", True):     # API-only (--seed there is the sampling seed, not this one)
            continue
        assert flag(name) in gen and flag(name) in srv, name
    # API-only settings: no flag of theirs (`--seed` of both commands is the sampling seed, not the weights')
    api_only = {n for n, leaf in LEAVES.items() if not leaf.meta.get("cli", True)}
    assert api_only == {"include_mtp", "collective", "seed", "progress"}
    for name in api_only - {"seed"}:
        assert flag(name) not in gen and flag(name) not in srv, name


@pytest.mark.parametrize("argv, want", [
    ([], {}),
    (["--graph"], {"graph": True}), (["--eager"], {"graph": False}), (["--graph", "trace"], {"graph": "trace"}),
    (["--dtype", "bf16", "--tp", "2", "--block-size", "32"], {"dtype": torch.bfloat16, "tp": 2, "block_size": 32}),
    (["--kv-cache-dtype", "fp8", "--quantization", "w8a8"], {"kv_cache_dtype": "fp8", "quantization": "w8a8"}),
    (["--block-size", "1", "--offload", "1", "--dcp", "1"], {"block_size": 1, "offload": 1, "dcp": 1}),   # the least
])
def test_flags_become_settings(argv, want):
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert from_args(ap.parse_args(argv)) == want


@pytest.mark.parametrize("argv", [["--tp", "0"], ["--block-size", "x"], ["--block-size", "0"], ["--offload", "0"],
                                  ["--dtype", "int8"],
                                  ["--quantization", "int4"], ["--graph", "sometimes"]])
def test_bad_flags_are_refused_by_the_parser(argv, capsys):
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_a_config_and_its_keywords_build_the_same_model():
    path = default_checkpoint()
    cfg = EngineConfig(backend="cpu_ref", progress=False, cache=CacheConfig(block_size=8))
    a = GLM52(path, cfg)
    b = GLM52(path, backend="cpu_ref", progress=False, block_size=8)
    c = GLM52(path, cfg, block_size=4)                     # keywords change the given config
    assert a.config == b.config == cfg and a.block_size == b.block_size == 8
    assert c.block_size == 4 and c.config.cache.block_size == 4 and cfg.cache.block_size == 8
    p = [[3, 14, 15, 92, 65]]
    ra, rb = a.generate(p, max_new_tokens=4), b.generate(p, max_new_tokens=4)
    assert ra.tokens == rb.tokens
    with pytest.raises(TypeError, match="GLM52: unknown setting 'blocksize'"):
        GLM52(path, blocksize=8)
    with pytest.raises(ValueError, match="config must be an EngineConfig"):
        GLM52(path, {"backend": "cpu_ref"})


def test_a_deployment_builds_an_engine_config():
    d = load_deployment("cpu-tiny")
    model, cfg = d.engine_config(block_size=32)
    assert isinstance(cfg, EngineConfig) and cfg.cache.block_size == 32 and cfg.device == d.device_type
    assert cfg.dtype == d.torch_dtype and model == default_checkpoint()
    m = GLM52.from_deployment("cpu-tiny", block_size=32, progress=False)
    assert m.config.replace(backend=None) == cfg.replace(progress=False, backend=None) and m.block_size == 32
    assert m.backend_name == cfg.backend.name == "cpu_ref"     # cpu_ref / torch: built for the YAML's device
    with pytest.raises(ValueError, match="unknown override 'blocks'"):
        d.engine_config(blocks=32)
    assert d.plan == ParallelPlan(tp=d.tp, dp=d.dp, ep=d.ep, dcp=d.dcp) and d.devices == d.plan.world_size


def test_a_deployment_loads_the_mtp_layer_only_to_draft_with_it():
    """`mtp_draft_tokens` > 0 asks for the MTP layer (when the checkpoint has one); 0 skips it."""
    d = load_deployment("cpu-tiny")
    assert d.mtp_draft_tokens > 0 and d.engine_config()[1].include_mtp is None
    assert GLM52.from_deployment(d, progress=False).has_mtp
    plain = d.replace(mtp_draft_tokens=0)
    assert plain.engine_config()[1].include_mtp is False
    assert not GLM52.from_deployment(plain, progress=False).has_mtp


def test_expert_shards_are_the_plans():
    """EP when enabled, else the tp ranks (experts TP-split): one definition, the plan's."""
    for tp, dp, ep, want in ((1, 2, 2, 2), (2, 1, 1, 2), (2, 2, 4, 4), (1, 1, 1, 1)):
        plan = ParallelPlan(tp=tp, dp=dp, ep=ep)
        d = load_deployment("cpu-tiny").replace(devices_per_node=tp * dp, **{"parallel.tp": tp, "parallel.dp": dp,
                                                                             "parallel.ep": ep})
        assert plan.expert_shards == d.expert_shards == want, (tp, dp, ep)


def test_offload_with_decode_context_parallelism_is_accepted():
    d = load_deployment("cpu-tiny").replace(devices_per_node=2, **{"parallel.tp": 2})
    both = d.replace(offload_gb=4, **{"parallel.dcp": 2})
    assert (both.offload_gb, both.dcp) == (4, 2)
