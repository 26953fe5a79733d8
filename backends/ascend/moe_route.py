"""moe_route on Ascend: `npu_moe_gating_top_k` (doc page torch_npu-npu_moe_gating_top_k.md, its numpy
"等价计算逻辑").

    norm_type=1 (sigmoid), bias = the correction bias (selection only, in the logits' dtype),
    group_select_mode=1 (group score = sum of its top-2: DeepSeek/GLM noaux_tc), renorm=0,
    routed_scaling_factor, eps=1e-20 (the sigmoid path renormalises: y /= sum(y) + eps).

Declined (-> reference): norm_topk_prob=False (the sigmoid path always renormalises), more than
2048 experts, groups of 2 or fewer experts, group size aligned to 32 times groups over 2048,
k / k_group outside the documented ranges, no correction bias.
"""

from __future__ import annotations

from .common import GATING_MAX_EXPERTS, decline


def moe_route(self, router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
              routed_scaling_factor=1.0):
    """A method of `AscendBackend` (`self.npu`: torch_npu or the emulator)."""
    E = router_logits.shape[1]
    decline(norm_topk_prob, "npu_moe_gating_top_k with sigmoid always renormalises (norm_topk_prob=False)")
    decline(E <= GATING_MAX_EXPERTS, f"npu_moe_gating_top_k takes at most {GATING_MAX_EXPERTS} experts, got {E}")
    decline(n_group > 0 and E % n_group == 0 and E // n_group > 2,
            f"npu_moe_gating_top_k needs groups of more than 2 experts ({E} experts, {n_group} groups)")
    decline(-(-(E // n_group) // 32) * 32 * n_group <= GATING_MAX_EXPERTS,
            "npu_moe_gating_top_k: group size aligned to 32 times group count must be <= 2048")
    decline(1 <= topk_group <= n_group and 1 <= top_k <= E // n_group * topk_group,
            f"npu_moe_gating_top_k needs 1 <= k_group <= group_count and 1 <= k <= E/group_count*k_group "
            f"(k={top_k}, k_group={topk_group}, group_count={n_group})")
    decline(correction_bias is not None, "npu_moe_gating_top_k path expects the correction bias")
    x = router_logits
    bias = correction_bias.to(device=x.device, dtype=x.dtype)   # the op wants bias in x's dtype
    y, ids, _ = self.npu.npu_moe_gating_top_k(
        x, top_k, bias=bias, k_group=topk_group, group_count=n_group,
        group_select_mode=1,              # group score = sum of its top-2 (DeepSeek/GLM noaux_tc)
        renorm=0, norm_type=1,            # sigmoid, then y /= sum(y) + eps
        out_flag=False, routed_scaling_factor=float(routed_scaling_factor), eps=1e-20)
    return ids.long(), y.float()
