"""mtp_verify's benchmark (the contract: glm52_backends/ops/mtp_verify.py): greedy verifies of 3 draft
tokens over the whole vocabulary, checked exactly against the reference."""

from __future__ import annotations

from .common import F32, Case, Env


def plan(add, d, small: bool, A: int) -> None:
    for B, tgt in ((8 if small else 64, "<= 1.5x floor"), (1, "<= 15 us")):
        add("mtp_verify", f"greedy B={B} k=3 V={d.V}", {"B": B, "k": 3}, B * 4 * d.V * F32, 0.0, True, tgt)


def inputs(env: Env, be, case: Case, ref):
    torch, dev, d = env.torch, env.device, env.d
    p = case.params
    B, k = p["B"], p["k"]
    lg = torch.randn(B, k + 1, d.V, device=dev)
    draft = lg[:, :k].argmax(-1)
    draft[::2, 1] = 0                                          # half the requests miss at 1
    base = lambda: ref.mtp_verify(draft, lg)  # noqa: E731
    return (lambda: be.mtp_verify(draft, lg)), base, base, "exact", "reference"
