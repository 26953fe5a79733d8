"""Shared fixtures and helpers of the test suite (test modules import the helpers: `from conftest import ...`)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from glm52_backends.backends.cpu_ref import CpuRefBackend
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on a shared 2-core machine: one intra-op thread is faster and leaves the other core.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny(tmp_path):
    """A random 4-layer checkpoint (BF16)."""
    return make_tiny_checkpoint(tmp_path / "tiny", layers=4, seed=1)


@pytest.fixture
def tiny_fp8(tmp_path):
    """A random 4-layer block-FP8 checkpoint with 16x16 blocks (several blocks per matrix)."""
    return make_tiny_checkpoint(tmp_path / "fp8", fp8=True, fp8_block=(16, 16), layers=4, seed=2)


@contextmanager
def env_vars(extra: dict[str, str]):
    """Set environment variables for the block, then restore them (removing those that were unset)."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


class Planted(CpuRefBackend):
    """cpu_ref with some ops replaced (a deliberately wrong backend the suite must catch)."""

    def __init__(self, name: str, **ops):
        super().__init__()
        self.name = name
        for op, fn in ops.items():
            setattr(self, op, fn)


def cache_state(cache):
    """What a cache holds as the ops see it: every request's rows at positions below its length, in
    every layer (read through the cache's format), its blocks, its lengths and the free list. Rows at
    or past a request's length are unreachable (no op reads them), so they are not part of it."""
    from glm52_backends.cache_formats import read_index, read_latent
    rows = []
    for r in sorted(cache.lens, key=repr):
        pos = torch.arange(cache.lens[r])
        blocks = torch.tensor(cache.blocks[r], dtype=torch.long)[pos // cache.block_size]
        offs = pos % cache.block_size
        rows += [t.clone() for l in sorted(cache.c) for t in read_latent(cache.c[l], cache.k_pe[l], blocks, offs)]
        rows += [read_index(cache.index_k[l], blocks, offs).clone() for l in sorted(cache.index_k)]
    return rows, {r: list(b) for r, b in cache.blocks.items()}, dict(cache.lens), list(cache._free)


def same_cache_state(a, b) -> bool:
    return (len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
            and a[1:] == b[1:])


def spawn_ranks(argv_of, world: int, *, env: dict | None = None, timeout: float = 240) -> list[tuple[int, str, str]]:
    """Start `world` processes, `argv_of(rank)` each (the ranks of a gloo run), and collect (return code,
    stdout, stderr) in rank order. A rank still running after `timeout` s kills them all: a hang fails the
    test instead of stalling the suite (benchmarks/machine.py `spawn`)."""
    from glm52_backends.benchmarks.machine import spawn
    try:
        return spawn(argv_of, world, env=env, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"a rank hung for {timeout} s") from None


class Rounds:
    """The verify rounds of a `generate(..., speculative=k)` run, per request id: `accepted[i]` /
    `drafted[i]` the drafts accepted / proposed at each of request i's rounds (Request.accepted /
    .drafted of the engine's finished requests)."""

    def __init__(self, engine):
        reqs = {r.rid: r for r in engine.finished_log}
        self.engine = engine
        self.accepted = {i: r.accepted for i, r in reqs.items() if r.accepted}
        self.drafted = {i: r.drafted for i, r in reqs.items() if r.drafted}


def speculative(model, prompts, *, k: int, **kw):
    """`generate(model, prompts, speculative=k, **kw)` (engine/generation.py, with `draft_filter` etc.):
    (result, Rounds)."""
    from glm52_backends.engine.generation import generate
    res, eng = generate(model, prompts, speculative=k, return_engine=True, **kw)
    return res, Rounds(eng)
