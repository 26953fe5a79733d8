"""EP stage 2: the dp groups step together (spec/distributed.md §2.3).

With dp > 1 and ep = tp x dp every MoE layer dispatches tokens to the experts of every rank (an
all-to-all all ranks join), so every group runs every step that any group runs: a group with no
tokens for it runs it empty (the "dummy forward").
A step is one pass through the model (RUN) or through the MTP layer (MTP). Before each of its own
steps a group exchanges (token count, step kind) with the others, one small all-gather; the higher
kind goes first, and the groups that wanted the other kind run it empty and exchange again. The
network reads the agreed token counts (`net.dp_counts`) for the most rows any rank dispatches (the
`max_rows` of a fused dispatch such as MC2, which sizes its buffers by it) and its statistics.

This is the engine's business, not the network's: it decides what runs when, and it reads the
exchange back to the host (one read per step, only in this layout).
"""

from __future__ import annotations

import torch


class DpTurns:
    IDLE, MTP, RUN = 0, 1, 2          # a step of the higher kind goes first

    def __init__(self, net, dp_comm):
        self.net, self.dp_comm = net, dp_comm
        self.empty_steps = {self.RUN: 0, self.MTP: 0}   # steps of each kind this group ran empty (for tests)

    def _exchange(self, n_tokens: int, kind: int) -> list[tuple[int, int]]:
        """(token count, kind wanted) of every dp group: one small all-gather per step."""
        mine = torch.tensor([n_tokens, kind], dtype=torch.int64, device=self.net.device)
        return [(int(n), int(k)) for n, k in self.dp_comm.all_gather(mine[None], dim=0).tolist()]

    def _empty_step(self, kind: int, got: list[tuple[int, int]], cache) -> None:
        """This group's part of another group's step: the same kind of pass with no tokens."""
        net = self.net
        self.empty_steps[kind] += 1
        net.dp_counts = [n if k == kind else 0 for n, k in got]
        st = net.plan(cache, {})
        if kind == self.RUN:
            net.forward(st, cache)
        else:
            net.mtp_forward(st, cache, torch.zeros(0, net.cfg.hidden_size, dtype=net.embed.dtype,
                                                   device=net.device), None)

    def take(self, kind: int, n_tokens: int, cache) -> None:
        """Wait (running the other groups' steps empty) until a step of `kind` runs; set the counts."""
        while True:
            got = self._exchange(n_tokens, kind)
            step = max(k for _, k in got)
            if step == kind:
                self.net.dp_counts = [n if k == kind else 0 for n, k in got]
                return
            self._empty_step(step, got, cache)

    def serve_idle(self, cache) -> None:
        """Join the other dp groups' steps with no tokens of this group's own until every group is idle
        (each step starts with the exchange, which also tells when all groups have finished; then they
        return together). `cache` needs the MTP layer's entries when the others run speculative decoding."""
        while True:
            got = self._exchange(0, self.IDLE)
            step = max(k for _, k in got)
            if step == self.IDLE:
                return
            self._empty_step(step, got, cache)
