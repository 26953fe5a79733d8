"""mtp_verify's cases (the contract: glm52_backends/ops/mtp_verify.py): greedy and sampled verifies,
and the acceptance boundary.
"""

from __future__ import annotations

import torch

from .common import SIZES, Arg, Case, CaseInputs, rand, randn, seeded


def _mtp(k: int, temperature: float, top_p: float = 1.0, with_probs: bool = False):
    """B = k + 2 requests whose drafts agree with the target's argmax for 0..k tokens (greedy), or
    drafts drawn near the target's mode (sampling); supplied uniforms drive every random choice."""
    def build(scale: str) -> CaseInputs:
        V = SIZES[scale]["V"]
        name = f"k{k}-t{temperature}-p{top_p}-{'q' if with_probs else 'onehot'}"
        g = seeded("mtp_verify", name, scale)
        B = k + 2
        logits = randn(g, B, k + 1, V, std=3.0)
        best = logits.argmax(-1)                                                 # [B, k+1]
        draft = torch.randint(0, V, (B, k), generator=g)
        for b in range(B):
            n = b % (k + 1)                                                      # accept n of k (greedy)
            draft[b, :n] = best[b, :n]
            miss = best[b, n:k]
            draft[b, n:] = torch.where(draft[b, n:] == miss, (miss + 1) % V, draft[b, n:])
        if temperature > 0:                                                      # likely, not certain
            top2 = logits[:, :k].topk(2, -1).indices
            draft = torch.where(rand(g, B, k) < 0.5, top2[..., 0], top2[..., 1])
        probs = torch.softmax(randn(g, B, k, V) + 4.0 * torch.nn.functional.one_hot(draft, V), -1) \
            if with_probs else None
        return CaseInputs({"draft": Arg(draft, "int"), "target_logits": Arg(logits, "f32"),
                           "draft_probs": Arg(probs, "f32") if with_probs else Arg(None, "const"),
                           "temperature": Arg(temperature, "const"), "top_p": Arg(top_p, "const"),
                           "uniforms": Arg(rand(g, B, k + 1), "f32")})
    return build


def verify_ratios(draft, target_logits, draft_probs, temperature, top_p) -> torch.Tensor:
    """p(d)/q(d) [B, k] as the reference computes them (float32)."""
    from glm52_backends.sampling import probs_from_logits
    p = probs_from_logits(target_logits, temperature, top_p, torch.float32)
    k = draft.shape[1]
    q = torch.nn.functional.one_hot(draft.long(), p.shape[-1]).float() if draft_probs is None else draft_probs.float()
    d = draft.long()[..., None]
    return p[:, :k].gather(-1, d)[..., 0] / q.gather(-1, d)[..., 0]


BOUNDARY = 0.005   # u sits this far (relative) above p/q at the first rejection


def _mtp_boundary(with_probs: bool):
    """Requests whose first rejected draft has u = p/q * (1 + 0.5 %): rejected by the contract (accept
    while u < p/q), accepted by a verify with 1 % slack (a `<=` with a margin, or a ratio computed a
    little too large); 0.5 % is far above any float32 rounding of p/q, so every correct backend rejects."""
    def build(scale: str) -> CaseInputs:
        V = SIZES["quick"]["V"]   # the acceptance rule, not the size, is under test (draft q(d) stays ~1)
        g = seeded("mtp_verify", f"boundary-{with_probs}", scale)
        B, k, T = 6, 3, 0.8
        logits = randn(g, B, k + 1, V, std=3.0)
        draft = logits[:, :k].topk(3, dim=-1).indices[..., 1]                   # the 2nd most likely: p < 1
        probs = torch.softmax(randn(g, B, k, V) + 8.0 * torch.nn.functional.one_hot(draft, V), -1) \
            if with_probs else None
        ratio = verify_ratios(draft, logits, probs, T, 1.0)
        u = rand(g, B, k + 1)
        for b in range(B):
            n = b % k                                                           # accept n, then the boundary
            u[b, :n] = 0.0
            u[b, n] = float(ratio[b, n]) * (1 + BOUNDARY)
            if not 0.0 < u[b, n] < 1.0:
                raise AssertionError(f"boundary case: u = {float(u[b, n])} outside (0, 1)")
        return CaseInputs({"draft": Arg(draft, "int"), "target_logits": Arg(logits, "f32"),
                           "draft_probs": Arg(probs, "f32") if with_probs else Arg(None, "const"),
                           "temperature": Arg(T, "const"), "top_p": Arg(1.0, "const"),
                           "uniforms": Arg(u, "f32")})
    return build


CASES: list[Case] = [
    *[Case("mtp_verify", f"greedy-k{k}", _mtp(k, 0.0), "exact", "accepts 0..k across the batch")
      for k in range(1, 6)],
    Case("mtp_verify", "sample-k1", _mtp(1, 1.0), "exact", "rejection sampling, one-hot draft"),
    Case("mtp_verify", "sample-k3", _mtp(3, 0.7), "exact", "rejection sampling, one-hot draft"),
    Case("mtp_verify", "sample-k5-probs-topp", _mtp(5, 1.0, 0.9, True), "exact", "draft probs, top-p 0.9"),
    *[Case("mtp_verify", f"boundary-{'q' if q else 'onehot'}", _mtp_boundary(q), "exact",
           "u 0.5 % above p/q at the first rejection: must reject") for q in (False, True)],
]
