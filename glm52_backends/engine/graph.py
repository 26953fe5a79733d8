"""Decode as captured graphs: persistent step buffers, batches padded to buckets, one graph per bucket.

A decode step (one new token per request) reads its inputs from buffers that live as long as the
decoder: token ids, positions, cache slots, sequence lengths, and a block table of fixed width (the
context limit in blocks). The host fills them in place; the batch is padded up to the next bucket
(1, 2, 4, 8, ... up to the decoder's batch) and padded rows are inert: position -1 (the indexer
selects nothing, so attention reads nothing), sequence length 0, and their cache writes go to the
cache's null block, which no request owns. A bucket's step is captured once and replayed on the
buffers: the ops, their fallback decisions and their output checks run at capture only.

How a step is captured (`capture_mode`):
  - "cuda" / "npu": `torch.cuda.CUDAGraph` / `torch.npu.NPUGraph` (aclgraph), after a warm-up run on
    a side stream; replay launches the whole step at once.
  - "trace": the CPU stand-in of a device graph. The step is recorded as an FX graph of aten ops
    (`make_fx`, real tensors): weights, caches and buffers are held by reference, so replay reads
    the buffers' current values and writes the live cache, exactly as a device graph does; any
    Python value the step used is frozen, exactly as a device graph freezes it.
  - "compile": "trace", then the recorded graph compiled by torch.compile (inductor: fused C++ on a
    CPU). It pays off only over long runs: compiling costs tens of seconds per bucket.
Capture enforces the discipline a device imposes: a host read inside the step (`.item()`,
`.tolist()`, `nonzero`, ..., see host_reads.py) or an op that asks for the step's host lengths
(`DeviceOnlyLengths`) refuses the capture with the reason. `graph="auto"` then keeps that bucket
eager; `graph=True` raises it.

`GLM52(graph="auto")` captures on CUDA and NPU devices and stays eager on the CPU, where replaying
aten ops costs what eager costs (benchmarks/results/engine-cpu.md) and compiling costs more than a
short run gains; `graph=True` captures everywhere ("compile" on the CPU), `graph=False` never.
Over several processes (tp, and ep within the tp group) the step's collectives are captured too:
while tracing they are torch's functional collectives (ops/comm.py), which the graph records and
replays. Under decode context parallelism (dcp > 1) a step writes every token's cache row, those
another rank stores to the null block (the host fills each rank's local slots), so its shapes do not
depend on which rank stores which position; the dcp group's collectives are captured as the tp ones.
Speculative decoding (engine/speculative.py) captures its verify step (kind "verify": k+1
tokens per request) and its MTP draft step (kind "mtp"). Not captured: prefill and chunked-prefill
steps and the MTP catch-up step (their shapes vary), and runs whose dp groups share their experts
(ep = tp x dp: they agree on every step on the host); dp replicas (ep = 1) capture as one group does.
The serving engine (engine/scheduler.py) replays these graphs for its decode, verify and draft steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence

import torch

from ..cache import PagedCache
from ..step import DcpStep, DeviceOnlyLengths, Step, StepMeta
from .host_reads import HostReads

log = logging.getLogger("glm52_backends")

GRAPH_CHOICES = ("auto", True, False)


class GraphUnavailable(RuntimeError):
    """A step that cannot be captured here (the message says why)."""


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, ... up to the first power of two >= `max_batch`: the padded batch sizes."""
    out = [1]
    while out[-1] < max_batch:
        out.append(out[-1] * 2)
    return out


def capture_mode(model, graph) -> tuple[str | None, str]:
    """(mode, why): how decode steps of `model` are captured under `graph` ("auto" | True | False),
    or (None, the reason they run eagerly)."""
    if graph is False:
        return None, "off (graph=False)"
    strict = graph != "auto"
    if getattr(model, "turns", None) is not None:       # dp > 1 with expert dispatch across the groups
        why = (f"eager: {model.plan.dp} dp groups agree on every step on the host (engine/turns.py), which a "
               f"graph cannot replay")
        if strict:
            raise GraphUnavailable(f"graph={graph!r}: {why}")
        return None, why
    kind = torch.device(model.device).type
    if graph in ("trace", "compile"):
        if kind != "cpu":
            raise GraphUnavailable(f"graph={graph!r} is the CPU's capture; on {kind} use graph=True")
        return graph, graph
    if kind in ("cuda", "npu"):
        return kind, kind
    if graph is True:
        return "compile", "compile"
    return None, f"eager: on a {kind} device graph='auto' stays eager (graph=True compiles)"


KINDS = ("decode", "verify", "mtp")


class StaticDecode:
    """Steps of up to `max_batch` requests, `q` new tokens each, over persistent buffers, one graph per
    bucket. `kind` says what a step computes and returns (f32 logits on the device, nothing read back):
      "decode"  the target model, q = 1: logits [n, V];
      "verify"  the target model over q = k+1 tokens per request (the speculative verify step):
                (final-normed hidden [n*q, Hd], logits [n*q, V]);
      "mtp"     the MTP layer, q = 1, with the input hidden [n, Hd] and (IndexShare for the MTP
                iteration) the shared top-k [n, topk] as buffers too: (hidden, logits, top-k)."""

    def __init__(self, model, cache, max_batch: int, mode: str, *, strict: bool = False, q: int = 1,
                 kind: str = "decode"):
        if kind not in KINDS or q < 1 or (kind != "verify" and q != 1):
            raise ValueError(f"StaticDecode: kind {kind!r} with q={q}")
        self.model, self.cache, self.mode, self.strict, self.q, self.kind = model, cache, mode, strict, q, kind
        cfg, dev = model.cfg, model.device
        self.bs = cache.block_size
        # decode context parallelism: this rank stores position p (p % D == rank) at a local slot of block size
        # bs / D; the slots buffer holds local slots, the null block's for positions another rank stores
        self.D, self.lbs = cache.dcp_size, cache.local_block_size
        self.width = -(-min(cfg.max_position_embeddings, cache.num_blocks * self.bs) // self.bs)
        self.null = cache.null_block()
        self.buckets = buckets(max_batch)
        N = self.buckets[-1]
        i32, i64 = torch.int32, torch.long
        self.ids = torch.zeros(N * q, dtype=i64, device=dev)
        self.positions = torch.full((N * q,), -1, dtype=i64, device=dev)
        self.slots = torch.full((N * q,), self.null * self.lbs, dtype=i64, device=dev)
        self.seq_lens = torch.zeros(N, dtype=i32, device=dev)
        self.block_table = torch.full((N, self.width), self.null, dtype=i32, device=dev)
        self.cu = torch.arange(N + 1, dtype=i32, device=dev) * q       # q query tokens per row: fixed
        self.token_request = torch.arange(N, dtype=i32, device=dev).repeat_interleave(q)
        self.extra: tuple[torch.Tensor, ...] = ()
        if kind == "mtp":
            hidden = torch.zeros(N, cfg.hidden_size, dtype=model.net.embed.dtype, device=dev)
            share = (torch.full((N, cfg.index_topk), -1, dtype=i32, device=dev)
                     if cfg.index_share_for_mtp_iteration else None)
            self.extra = (hidden,) if share is None else (hidden, share)
        # host mirror of the block table, and the block list each row was last written from
        self._bt_host = torch.full((N, self.width), self.null, dtype=i32)
        self._rows: list[list[int]] = [[] for _ in range(N)]
        self.graphs: dict[int, object] = {}        # bucket -> replay() returning the output buffers
        self.eager: dict[int, str] = {}            # bucket -> why it was not captured
        self.capture_s = 0.0
        self._pool = None

    # ---- the step, as captured ---------------------------------------------------------------------
    def _inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.ids, self.positions, self.slots, self.seq_lens, self.block_table, *self.extra)

    def _forward(self, n: int, ids, positions, slots, seq_lens, block_table, *extra):
        """The step of bucket n over the buffers (`_inputs()`): what a graph records (see the class)."""
        net, q = self.model.net, self.q
        meta = StepMeta(self.cu[:n + 1], seq_lens[:n], block_table[:n], positions[:n * q], self.token_request[:n * q],
                        tuple(range(0, (n + 1) * q, q)), DeviceOnlyLengths(n), self.bs)
        dcp = DcpStep.static(self.cache, meta, slots[:n * q]) if self.D > 1 else None
        st = Step([None] * n, ids[:n * q], slots[:n * q], meta, dcp)
        comms = [c for c in (net.comm, net.dcp_comm) if getattr(c, "functional", None) is not None]
        was = [c.functional for c in comms]
        for c in comms:                     # tp and dcp seams as functional collectives: recorded, replayed
            c.functional = True
        try:
            with self.model.ops.through_library():           # one torch.ops.glm52 node per op
                if self.kind == "mtp":
                    share = extra[1][:n] if len(extra) > 1 else None
                    return net.mtp_forward(st, self.cache, extra[0][:n], share)
                h = net.forward(st, self.cache)
                return net.logits(h) if self.kind == "decode" else (h, net.logits(h))
        finally:
            for c, w in zip(comms, was):
                c.functional = w

    def _capture(self, n: int):
        what = f"decode step (bucket {n})"
        t0 = time.perf_counter()
        if self.mode in ("trace", "compile"):
            from torch.fx.experimental.proxy_tensor import make_fx
            with HostReads(forbid=True, what=what):
                gm = make_fx(lambda *bufs: self._forward(n, *bufs), tracing_mode="real")(*self._inputs())
            # an op that declined (OpUnsupported) after it was recorded leaves a node nothing uses: it
            # would run, and raise again, on every replay
            gm.graph.eliminate_dead_code()
            gm.recompile()
            # inductor compiles the recorded graph (outside the guard: dynamo declines to compile under
            # an active dispatch mode); the first call compiles, here rather than in a timed step
            fn = torch.compile(gm, dynamic=False, fullgraph=True) if self.mode == "compile" else gm

            def replay(fn=fn):
                return fn(*self._inputs())
            replay()
        else:
            api = getattr(torch, self.mode)
            with HostReads(forbid=True, what=what):
                side = api.Stream()
                side.wait_stream(api.current_stream())
                with api.stream(side):
                    self._forward(n, *self._inputs())      # warm-up: kernels compiled, workspaces sized
                api.current_stream().wait_stream(side)
                g = api.CUDAGraph() if self.mode == "cuda" else api.NPUGraph()
                if self._pool is None:
                    self._pool = api.graph_pool_handle()
                with api.graph(g, pool=self._pool):
                    out = self._forward(n, *self._inputs())

            def replay(g=g, out=out):
                g.replay()
                return out
        self.capture_s += time.perf_counter() - t0
        return replay

    def _graph(self, n: int):
        if n in self.graphs or n in self.eager:
            return self.graphs.get(n)
        try:
            self.graphs[n] = self._capture(n)
        except RuntimeError as e:
            # a host read, host lengths, or the device refusing an op inside capture: strict raises;
            # "auto" keeps the bucket eager (the eager step raises again if the step itself is broken)
            if self.strict:
                raise GraphUnavailable(f"backend {self.model.backend_name!r} cannot capture the decode step as a "
                                       f"{self.mode} graph: {e}") from e
            self.eager[n] = str(e)
            log.warning("decode bucket %d stays eager: %s", n, e)
        return self.graphs.get(n)

    # ---- one step ----------------------------------------------------------------------------------
    def _fill(self, reqs: Sequence[Hashable], tokens: Sequence[int], N: int) -> None:
        """Buffers of rows 0..N-1: requests' rows (q tokens each, just reserved), then inert padding."""
        cache, q = self.cache, self.q
        n = len(reqs)
        pos = [cache.lens[r] - q + j for r in reqs for j in range(q)]          # the new tokens' positions
        null = self.null * self.lbs                          # rows another dcp rank stores, and padding, go here
        slots = [cache.slot_here(r, p) for r, p in zip((r for r in reqs for _ in range(q)), pos)]
        slots = [null if s is None else s for s in slots]
        pad = (N - n) * q
        host = torch.tensor([list(tokens) + [0] * pad, pos + [j - q for j in range(q)] * (N - n),
                             slots + [null] * pad], dtype=torch.long)
        self.ids[:N * q].copy_(host[0], non_blocking=True)
        self.positions[:N * q].copy_(host[1], non_blocking=True)
        self.slots[:N * q].copy_(host[2], non_blocking=True)
        self.seq_lens[:N].copy_(torch.tensor([cache.lens[r] for r in reqs] + [0] * (N - n), dtype=torch.int32),
                                non_blocking=True)
        dirty = False
        for i in range(N):
            blocks = cache.blocks[reqs[i]] if i < n else []
            held = self._rows[i]                      # the blocks this row of the table holds now
            if held == blocks:
                continue
            row = self._bt_host[i]
            start = len(held) if held == blocks[:len(held)] else 0     # grown: write only the new blocks
            if start == 0:
                row.fill_(self.null)
            if len(blocks) > start:
                row[start:len(blocks)] = torch.tensor(blocks[start:], dtype=torch.int32)
            self._rows[i] = list(blocks)
            dirty = True
        if dirty:
            self.block_table[:N].copy_(self._bt_host[:N], non_blocking=True)

    def step(self, reqs: Sequence[Hashable], tokens: Sequence[int], hidden: torch.Tensor | None = None,
             shared_idx: torch.Tensor | None = None):
        """Append `tokens` (q per request, in request order) to `reqs` in the cache (reserving room) and
        replay the bucket's graph: the step's outputs on the device, rows of the n requests only (see
        the class). An "mtp" step also takes the input hidden [n, Hd] and, with IndexShare for the MTP
        iteration, the shared top-k [n, topk]. None when the bucket runs eagerly (nothing is changed
        then: the caller runs the step its usual way)."""
        n, q = len(reqs), self.q
        if len(tokens) != n * q:
            raise ValueError(f"StaticDecode.step: {len(tokens)} tokens for {n} requests of {q}")
        N = next(b for b in self.buckets if b >= n)
        if N in self.eager:
            return None
        cache = self.cache
        mark = cache.mark(reqs)
        cache.reserve({r: cache.lens[r] + q for r in reqs})
        try:
            self._fill(reqs, tokens, N)
            if self.kind == "mtp":
                self.extra[0][:n].copy_(hidden, non_blocking=True)
                if len(self.extra) > 1:
                    self.extra[1][:n].copy_(shared_idx, non_blocking=True)
                    self.extra[1][n:N].fill_(-1)          # padding rows select nothing
            replay = self._graph(N)
            if replay is None:
                cache.rollback(mark)
                return None
            out = replay()
            return tuple(t[:n * q] for t in out) if isinstance(out, tuple) else out[:n * q]
        except BaseException:
            cache.rollback(mark)
            raise

    def serves(self, model, mode: str, tokens: int, batch: int) -> bool:
        """Whether this decoder's cache and buffers can serve a new run of `batch` requests holding up to
        `tokens` tokens (its graphs are then reused: they read this cache and these buffers)."""
        return (self.model is model and self.mode == mode and batch <= self.buckets[-1] and self.kind == "decode"
                and (self.cache.num_blocks - 1) * self.bs >= tokens)

    def reset(self) -> PagedCache:
        """Every request released: the cache and graphs ready for a new run."""
        for r in list(self.cache.lens):
            self.cache.release(r)
        return self.cache

    def stats(self) -> dict:
        return {"graph": self.mode, "graphs_captured": len(self.graphs), "graph_buckets": sorted(self.graphs),
                "eager_buckets": sorted(self.eager), "graph_capture_s": round(self.capture_s, 3)}
