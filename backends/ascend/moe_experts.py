"""moe_experts on Ascend: `npu_moe_init_routing_v2` -> `npu_grouped_matmul` -> `npu_swiglu` ->
`npu_grouped_matmul` -> `npu_moe_token_unpermute` (the doc pages of those five ops).

    dropless routing, expert_tokens_num_type=1 (counts per expert) -> group_list_type=1,
    group_type=0, split_item=2, weights as transposed views [E, Hd, 2I] / [E, I, Hd] (no copy);
    expanded_row_idx (gather form, row_idx_type=0) is the unpermute's sorted_indices.

Unused slots (id -1; the model's router never leaves one, a caller may): the fused path sizes
every buffer by T*K slots (npu_grouped_matmul wants the group sizes to sum to x's rows, and
npu_moe_token_unpermute wants T*K distinct row indices), so a -1 slot still takes a row. It is
routed to its own token's first used expert with weight 0, never to a fixed expert: the row is a
duplicate of a row that token already adds with its own weight, so a non-finite expert output
(0 * inf = NaN) can only reach a token whose result is non-finite already (as in the reference),
never another token. A token with no used slot at all gets 0 (its row of the output set in place).

Weights: bare tensors or dense `Weight`s (float grouped matmuls), or w8a8_dynamic `Weight`s: then
the routing quantises each row per token (`quant_mode=1`) and the two grouped matmuls are int8 with
per-channel and per-token scales, the SwiGLU output requantised by npu_dynamic_quant in between
(quantized.py; the same routing bookkeeping and unpermute). Declined (-> reference): other weight
formats, x and dense weights of different dtypes, fewer than 2 or more than 1024 experts (a
group_list of length 1 is rejected), inner dims >= 65536, top-k > 512, and the int8 path's own
limits (quantized.py).
"""

from __future__ import annotations

import torch

from glm52_backends.weights import weight_format

from . import quantized
from .common import GMM_INNER_LIMIT, GMM_MAX_GROUPS, UNPERMUTE_MAX_TOPK, decline, dense


def moe_experts(self, x, w13, w2, topk_ids, topk_weights):
    """A method of `AscendBackend` (`self.npu`: torch_npu or the emulator)."""
    T, Hd = x.shape
    K = topk_ids.shape[1]
    int8 = weight_format(w13) != "dense" or weight_format(w2) != "dense"
    if int8:
        s13, s2 = quantized.check_moe(self, x, w13, w2, K)
        E = w13.shape[0]
    else:
        w13, w2 = dense(w13, "moe_experts", "w13"), dense(w2, "moe_experts", "w2")
        E, I2, _ = w13.shape
        decline(w13.dtype == x.dtype and w2.dtype == x.dtype,
                f"npu_grouped_matmul needs x and weights of one dtype (x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype})")
        decline(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}")
        decline(2 <= E <= GMM_MAX_GROUPS, f"npu_grouped_matmul (one 3-D weight) takes 2..{GMM_MAX_GROUPS} "
                                          f"groups (group_list of length 1 is rejected), got {E}")
        decline(max(Hd, I2 // 2) < GMM_INNER_LIMIT, f"npu_grouped_matmul inner dims must be < {GMM_INNER_LIMIT}")
        decline(K <= UNPERMUTE_MAX_TOPK, f"npu_moe_token_unpermute takes topK <= {UNPERMUTE_MAX_TOPK}, got {K}")
    if T == 0:
        return torch.zeros_like(x)
    # contract: id -1 = slot unused. It takes its token's first used expert with weight 0.
    unused = topk_ids < 0                                                             # [T, K]
    first = (~unused).to(torch.int8).argmax(1, keepdim=True)                          # first used slot (0: none)
    own = topk_ids.gather(1, first).clamp(min=0)                                      # [T, 1]
    ids = torch.where(unused, own, topk_ids).to(torch.int32).contiguous()             # [T, K]
    probs = topk_weights.float().masked_fill(unused, 0.0).contiguous()                # [T, K]
    if int8:   # 1.-2. quantised: routing with dynamic int8 rows, int8 grouped GEMMs (quantized.py)
        y, row_of = quantized.moe_experts_int8(self, x, w13, w2, s13, s2, ids, T, K, E)
    else:
        # 1. sort the T*K (token, slot) rows by expert; counts per expert for the grouped GEMMs
        xs, row_of, counts, _ = self.npu.npu_moe_init_routing_v2(
            x.contiguous(), ids, active_num=T * K, expert_num=E, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=-1, row_idx_type=0)              # xs [T*K, Hd]
        # 2. grouped GEMMs over the sorted rows; weights as transposed views [E, Hd, 2I] / [E, I, Hd]
        h = self.npu.npu_grouped_matmul([xs], [w13.transpose(1, 2)], group_list=counts, split_item=2,
                                        group_type=0, group_list_type=1)[0]          # [T*K, 2I]
        a = self.npu.npu_swiglu(h, dim=-1)                                           # silu(gate) * up
        y = self.npu.npu_grouped_matmul([a], [w2.transpose(1, 2)], group_list=counts, split_item=2,
                                        group_type=0, group_list_type=1)[0]          # [T*K, Hd]
    # 3. back to token order, weighted sum over the K slots (row_of[t*K + k] = row of that slot)
    out = self.npu.npu_moe_token_unpermute(y, row_of, probs=probs)                   # [T, Hd]
    return out.masked_fill_(unused.all(1, keepdim=True), 0)                          # tokens with no expert
