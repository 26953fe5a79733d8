"""mtp_verify: accept or reject the MTP layer's draft tokens against the target's logits.

    mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None)
        -> (accepted, tokens)
    draft [B, k] int; target_logits [B, k+1, V]; draft_probs [B, k, V] or None (None = the draft
    is deterministic: q = one-hot); uniforms [B, k+1] f32 in [0,1): column i < k decides draft
    token i, column k draws the correction / bonus token by inverse CDF.
    temperature == 0: accept while draft[i] == argmax target_logits[i]; emit the argmax at the
    first miss, or the bonus argmax target_logits[k] when all k are accepted.
    temperature > 0: p = top_p-filtered softmax(logits / temperature); accept draft i while
    u_i < p(d_i) / q(d_i); at the first rejection sample from norm(max(p - q, 0)); bonus from p.
    returns accepted [B] int32 (drafts accepted, 0..k) and tokens [B, k+1] int64: the accepted
    drafts, then the emitted token, then -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.sampling import probs_from_logits, sample_from

from ._checks import arg, pair, tensor


def mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None,
               *, cdt=torch.float32):
    B, k = draft.shape
    V = target_logits.shape[-1]
    tokens = torch.full((B, k + 1), -1, dtype=torch.int64, device=draft.device)
    accepted = torch.zeros(B, dtype=torch.int32, device=draft.device)
    if temperature == 0.0:
        best = target_logits.argmax(-1)                                           # [B, k+1]
        for b in range(B):
            n = 0
            while n < k and int(draft[b, n]) == int(best[b, n]):
                n += 1
            tokens[b, :n] = draft[b, :n]
            tokens[b, n] = best[b, n]
            accepted[b] = n
        return accepted, tokens
    if uniforms is None:
        raise ValueError("mtp_verify: sampling (temperature > 0) needs the supplied uniforms [B, k+1]")
    p = probs_from_logits(target_logits, temperature, top_p, cdt)                            # [B, k+1, V]
    if draft_probs is None:
        q = F.one_hot(draft.long(), V).to(cdt)                                    # deterministic draft
    else:
        q = draft_probs.to(cdt)
    for b in range(B):
        n = 0
        while n < k:
            d = int(draft[b, n])
            if float(uniforms[b, n]) < float(p[b, n, d] / q[b, n, d]):
                n += 1
            else:
                break
        tokens[b, :n] = draft[b, :n]
        if n < k:                                                                 # correction token
            r = (p[b, n] - q[b, n]).clamp(min=0)
            r = r if float(r.sum()) > 0 else p[b, n]
        else:                                                                     # bonus token
            r = p[b, k]
        tokens[b, n] = sample_from(r[None], uniforms[b, k:k + 1])[0]
        accepted[b] = n
    return accepted, tokens


def check_output(args, kwargs, out):
    """The output check (registry): (accepted [B] int32, tokens [B, k+1] int64)."""
    draft = arg(args, kwargs, 0, "draft")
    B, k = draft.shape
    return (pair(out, "accepted, tokens") or tensor("accepted", out[0], (B,), (torch.int32,), draft.device)
            or tensor("tokens", out[1], (B, k + 1), (torch.int64,), draft.device))
