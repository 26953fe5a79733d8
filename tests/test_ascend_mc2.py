"""Ascend MC2 (npu_moe_distribute_dispatch_v2 / _combine_v2) on the emulator, over gloo ranks.

The op pair against a float64 oracle of every rank's inputs, the wheel's meta shapes and the documented
checks (tests/mc2_worker.py `ops`); then GLM-5.2 on the emulated Ascend backend laid out over the ranks
with its expert dispatch through MC2: tokens equal one process (greedy and MTP speculative), MC2 ran on
every rank, and each rank computed about the (token, expert) pairs routed to its experts.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from conftest import spawn_ranks

from glm52_backends import GLM52
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mc2_worker.py")
PROMPT_TOKENS = 18 + 2 + 9          # the worker's three prompts


def ranks(tmp_path, world, *args, timeout=240):
    init = tmp_path / f"rdzv-{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GLM52_ASCEND_EMULATE="1")
    outs = []
    for rc, o, e in spawn_ranks(lambda r: [sys.executable, WORKER, str(init), str(r), str(world), *map(str, args)],
                                world, env=env, timeout=timeout):
        assert rc == 0, e[-3000:]
        outs.append(json.loads(o.strip().splitlines()[-1]))
    return outs


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_and_combine_match_the_oracle(tmp_path, world):
    for o in ranks(tmp_path, world, "ops"):
        assert o["ragged"]["err"] <= o["ragged"]["bound"] and o["masked"]["err"] <= o["masked"]["bound"]
        for key in ("dup", "h", "name", "rank", "experts", "tp", "mask", "global_bs", "buffer"):
            assert o[key].startswith("npu_moe_distribute_dispatch_v2: "), o[key]


def test_mc2_fits_the_documented_limits_and_the_hccl_buffer(monkeypatch):
    from glm52_backends.backends.ascend.mc2 import mc2_fits
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    # GLM-5.2 at ep16 on A3: 2 * (16 * bs * 16 * 12800 + 8 * bs * 12288) bytes = 6.4375 MB per token per card
    assert mc2_fits(6144, 31, 8, 256, 16) is None
    assert "need a 206 MB HCCL buffer, HCCL_BUFFSIZE is 200 MB" in mc2_fits(6144, 32, 8, 256, 16)
    monkeypatch.setenv("HCCL_BUFFSIZE", "1024")
    assert mc2_fits(6144, 159, 8, 256, 16) is None and mc2_fits(6144, 160, 8, 256, 16) is not None
    assert "hidden size 512" in mc2_fits(512, 4, 8, 256, 16)
    assert "513 tokens per card" in mc2_fits(6144, 513, 8, 256, 16)
    assert "top-k 17" in mc2_fits(6144, 4, 17, 256, 16)
    assert "experts over" in mc2_fits(6144, 4, 8, 250, 16)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model at hidden size 1024, the smallest MC2 takes on Atlas A3."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("mc2") / "h1024"), layers=3, seed=5, mtp=True,
                                hidden_size=1024)


@pytest.mark.parametrize("tp,ep,dp", [(2, 2, 1), (2, 4, 2)])
def test_model_dispatches_through_mc2_and_equals_one_process(tmp_path, wide, monkeypatch, tp, ep, dp):
    monkeypatch.setenv("GLM52_ASCEND_EMULATE", "1")
    one = GLM52(wide, backend="ascend", dtype=torch.float32, progress=False)
    prompts = [[3, 17, 200, 5, 9, 41, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [250, 4], [8] * 9]
    greedy = one.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
    spec = one.generate(prompts, max_new_tokens=8, stop_at_eos=False, speculative=2).tokens
    outs = ranks(tmp_path, tp * dp, "model", wide, tp, ep, dp)
    cfg = one.net.cfg
    for o in outs:
        assert o["kind"] == "Mc2Collectives" and o["calls"] > 0 and not o["fallbacks"], o
        assert o["greedy"] == greedy and o["spec"] == spec
        moe = o["moe"]
        # one row per (token, expert) pair routed here: about tokens x top-k / ep, never the tokens x
        # top-k of the replicated form (every token, the other ranks' slots routed to a local expert)
        assert moe["rows"] == moe["pairs"] > 0
        assert moe["pairs"] <= 0.75 * moe["tokens"] * cfg.num_experts_per_tok, moe
    pairs = sum(o["moe"]["pairs"] for o in outs)
    tokens = outs[0]["moe"]["tokens"]
    # every (token, expert) pair computed exactly once across the ranks (the tp ranks split the tokens)
    assert all(o["moe"]["tokens"] == tokens for o in outs) and pairs == tokens * cfg.num_experts_per_tok
