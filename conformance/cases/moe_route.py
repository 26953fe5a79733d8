"""moe_route's cases (the contract: glm52_backends/ops/moe_route.py), judged against `selection_scores`."""

from __future__ import annotations

import torch

from .common import Arg, Case, CaseInputs, rand, randn, seeded


def _route(kind: str):
    def build(scale: str) -> CaseInputs:
        g = seeded("moe_route", kind, scale)
        T, E, K, ng, tg, norm, rsf = {
            "glm52": (17, 256, 8, 1, 1, True, 2.5),          # GLM-5.2: sigmoid, bias, renorm, x2.5
            "grouped": (9, 64, 6, 8, 3, True, 1.0),          # DeepSeek-V3 style group-limited top-k
            "no-renorm": (5, 32, 4, 4, 2, False, 1.5),
            "one-token": (1, 20, 3, 1, 1, True, 2.5),
        }[kind]
        return CaseInputs({"router_logits": Arg(randn(g, T, E, std=2.0), "f32"),
                           "correction_bias": Arg(rand(g, E) * 0.2, "f32"), "top_k": Arg(K, "const"),
                           "n_group": Arg(ng, "const"), "topk_group": Arg(tg, "const"),
                           "norm_topk_prob": Arg(norm, "const"), "routed_scaling_factor": Arg(rsf, "const")})
    return build


def selection_scores(args: list) -> torch.Tensor:
    """moe_route's selection scores [T, E] in float64 with the group limit applied: experts of groups
    outside the `topk_group` best (by the sum of each group's two best scores) are -inf. Written as
    a per-token loop, a second formulation next to cpu_ref's."""
    logits, bias, _, n_group, topk_group = args[:5]
    choice = torch.sigmoid(logits.double()) + bias.double()
    T, E = choice.shape
    per = E // n_group
    for t in range(T):
        groups = [sorted(choice[t, g * per:(g + 1) * per].tolist())[-2:] for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -sum(groups[g]))[:topk_group]
        for g in range(n_group):
            if g not in keep:
                choice[t, g * per:(g + 1) * per] = float("-inf")
    return choice


CASES: list[Case] = [
    *[Case("moe_route", kind, _route(kind), "route") for kind in ("glm52", "grouped", "no-renorm", "one-token")],
]
