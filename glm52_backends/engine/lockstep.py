"""Serving over several processes: the first rank of a tp group leads, the others follow its steps.

With tp > 1 (and ep within the tp group) every rank holds a slice of every layer, so every model
step is a set of collectives all ranks of the group join, with the same inputs. The serving engine
(engine/scheduler.py) decides on the group's first rank only: it admits and aborts requests,
schedules, samples, checks stop conditions and prefix hits, and preempts. Every rank builds the same
`Engine` (same arguments: the same cache blocks and graph buffers); the followers' engines never
schedule. Before each model step the leader broadcasts one message over the tp group:

  * the cache changes it made since its last message, in order (`release`, `truncate`, `share`,
    `publish`): the followers' block tables, reference counts and free lists stay the leader's; the
    reservations a step makes inside the model are deterministic, so they agree too;
  * the step: ("run", chunks); ("mtp", chunks) with its input hidden states and shared top-k rows as
    tensors (broadcast after the message); ("logits", rows of the last run's hidden states); or
    ("graph", kind, requests, tokens) for a step through a captured graph (engine/graph.py);

and then every rank runs that step. Each step message carries a digest of the leader's cache
entries the step uses; a follower whose own differ raises `CacheDiverged` before the step's
collectives (it exits, and the leader's step fails at once instead of at the collective timeout).
The followers need nothing the leader computes after a step (sampled tokens, accepted drafts): they
reach them as the next message's chunks and cache changes. A step that raises on the leader raises
on the followers too (the same inputs, the same state): a follower logs it and waits for the next
message, in which the leader's recovery (a preemption, the requests' aborts) arrives as cache changes.

While idle the leader sends a heartbeat every `KEEPALIVE_S` seconds, or a quarter of the collective
timeout when that is shorter (a follower waits for the next message inside a collective, which fails
after the collective timeout), carrying the digest of its whole cache; ("stop", digest) ends the
followers' loop.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence

import torch

KEEPALIVE_S = 2.0


class CacheDiverged(RuntimeError):
    """A follower's cache no longer holds what the leader's holds (a step ran differently on a rank)."""


def cache_digest(cache, keys: Sequence | None = None) -> str:
    """A digest of what decides a step's cache reads and writes: the blocks and length of each entry in
    `keys` (None: every entry), and the free counts."""
    h = hashlib.blake2b(digest_size=12)
    for key in (sorted(cache.lens, key=repr) if keys is None else keys):
        h.update(repr((key, cache.lens.get(key), cache.blocks.get(key))).encode())
    h.update(repr((cache.free_blocks, cache.cached_blocks)).encode())
    return h.hexdigest()


def step_keys(call: tuple) -> list:
    """The cache entries a step message's step reads and grows."""
    if call[0] in ("run", "mtp"):
        return list(call[1])
    if call[0] == "graph":
        return list(call[2])
    return []


class Lockstep:
    """The message channel of one tp group (`comm`: the group's `TorchDistributed`): the leader's
    `send`, the followers' `recv`. `ops` collects the leader's cache changes until its next message."""

    def __init__(self, comm, timeout_s: float | None = None):
        import torch.distributed as dist
        self.dist, self.group = dist, comm.group
        self.rank, self.size = comm.rank, comm.world_size
        self.src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self.ops: list[tuple[str, tuple]] = []
        self.sent_at = time.monotonic()
        self.messages = 0
        self.closed = False
        # heartbeats well inside the collective timeout (`GLM52_COLLECTIVE_TIMEOUT_S`)
        self.keepalive_s = KEEPALIVE_S if timeout_s is None else min(KEEPALIVE_S, timeout_s / 4)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, call: tuple, tensors: Sequence[torch.Tensor | None] = (), check: str | None = None) -> None:
        """Broadcast the pending cache changes, `call` and `check` (the digest of the leader's cache entries
        the step uses, after the changes), then the call's tensors (None entries stay None)."""
        if self.closed:
            raise RuntimeError("the engine's followers were stopped (Engine.close); it runs no more steps")
        metas = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
        msg, self.ops = (self.ops, call, metas, check), []
        self.dist.broadcast_object_list([msg], src=self.src, group=self.group)
        for t in tensors:
            if t is not None:
                self.dist.broadcast(t.contiguous().reshape(-1).view(torch.uint8), src=self.src, group=self.group)
        self.sent_at = time.monotonic()
        self.messages += 1
        if call[0] == "stop":
            self.closed = True

    def recv(self, device: torch.device) -> tuple[list[tuple[str, tuple]], tuple, list[torch.Tensor | None], str | None]:
        """(cache changes, call, tensors, check) of the leader's next message."""
        box: list = [None]
        self.dist.broadcast_object_list(box, src=self.src, group=self.group)
        ops, call, metas, check = box[0]
        tensors: list[torch.Tensor | None] = []
        for meta in metas:
            if meta is None:
                tensors.append(None)
                continue
            shape, dtype = meta
            buf = torch.empty(math.prod(shape) * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8,
                              device=device)
            self.dist.broadcast(buf, src=self.src, group=self.group)
            tensors.append(buf.view(dtype).view(shape))
        self.messages += 1
        return ops, call, tensors, check


__all__ = ["Lockstep", "CacheDiverged", "cache_digest", "step_keys", "KEEPALIVE_S"]
