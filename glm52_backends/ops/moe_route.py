"""moe_route: GLM-5.2's router (sigmoid scores, correction bias, group-limited top-k).

    moe_route(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor) -> (topk_ids [T, K] int64, topk_weights [T, K] f32)
    router_logits [T, E] f32; s = sigmoid(logits); selection on s + bias, group-limited (keep the
    topk_group groups with the largest sum of top-2 scores); weights s[ids], renormalised (+1e-20)
    when norm_topk_prob, times routed_scaling_factor.
"""

from __future__ import annotations

import torch

from ._checks import arg, pair, tensor


def moe_route(router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
              routed_scaling_factor=1.0, *, cdt=torch.float32):
    T, E = router_logits.shape
    s = torch.sigmoid(router_logits.to(cdt))                                      # [T, E]
    choice = s + correction_bias.to(cdt)                                         # selection only
    if n_group > 1:
        grp = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)   # [T, G]
        keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(1, grp.topk(topk_group, -1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices                                      # [T, K]
    wts = s.gather(1, ids)
    if norm_topk_prob:
        wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
    return ids, (wts * routed_scaling_factor).float()


def check_output(args, kwargs, out):
    """The output check (registry): (topk_ids [T, top_k] int64 or int32, topk_weights [T, top_k] float32)."""
    logits, k = arg(args, kwargs, 0, "router_logits"), arg(args, kwargs, 2, "top_k")
    want = (logits.shape[0], k)
    return (pair(out, "topk_ids, topk_weights")
            or tensor("topk_ids", out[0], want, (torch.int64, torch.int32), logits.device)
            or tensor("topk_weights", out[1], want, (torch.float32,), logits.device))
