"""mtp_verify on Ascend: torch_npu has no verify op, so these are batched torch ops that run on
the NPU, with no host synchronisation (no per-request loop, no .item())."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.sampling import probs_from_logits, sample_from


def mtp_verify(self, draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
    """A method of `AscendBackend` (plain torch on the tensors' device)."""
    B, k = draft.shape
    V = target_logits.shape[-1]
    dev = target_logits.device
    col = torch.arange(k + 1, device=dev)[None, :]                                  # [1, k+1]
    if temperature == 0.0:
        best = target_logits.argmax(-1)                                              # [B, k+1]
        ok = draft.long() == best[:, :k]
        n = ok.long().cumprod(-1).sum(-1)                                            # [B] accepted
        emit = best.gather(1, n[:, None])                                            # [B, 1]
    else:
        if uniforms is None:
            raise ValueError("mtp_verify: sampling (temperature > 0) needs the supplied uniforms [B, k+1]")
        p = probs_from_logits(target_logits, temperature, top_p, torch.float32)     # [B, k+1, V]
        q = (F.one_hot(draft.long(), V).float() if draft_probs is None
             else draft_probs.to(device=dev, dtype=torch.float32))                  # [B, k, V]
        d = draft.long()[..., None]
        ratio = p[:, :k].gather(-1, d).squeeze(-1) / q.gather(-1, d).squeeze(-1)   # [B, k]
        ok = uniforms[:, :k].to(dev, torch.float32) < ratio
        n = ok.long().cumprod(-1).sum(-1)                                            # [B]
        p_n = p.gather(1, n[:, None, None].expand(B, 1, V)).squeeze(1)               # [B, V]
        q_pad = torch.cat([q, torch.zeros(B, 1, V, device=dev)], 1)                 # no q for the bonus
        q_n = q_pad.gather(1, n[:, None, None].expand(B, 1, V)).squeeze(1)
        r = (p_n - q_n).clamp(min=0)                                                 # residual (bonus: p)
        r = torch.where(r.sum(-1, keepdim=True) > 0, r, p_n)
        emit = sample_from(r, uniforms[:, k].to(dev))[:, None]                      # [B, 1]
    tokens = torch.where(col < n[:, None], F.pad(draft.long(), (0, 1)), -1)
    tokens = torch.where(col == n[:, None], emit, tokens)
    return n.to(torch.int32), tokens
