"""Sampling arithmetic shared by generation and the reference `mtp_verify`.

Every draw is an inverse-CDF lookup driven by a supplied uniform number, so a run is reproducible
from its seed and a backend's verify op can be checked against the reference on the same numbers.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_sampling(temperature, top_p) -> tuple[float, float]:
    """The sampling arguments as floats: temperature finite and >= 0 (0 = greedy), top_p in (0, 1].
    NaN, inf, bools and non-numbers are refused (a NaN temperature would sample from NaN
    probabilities: always the last token, usually EOS)."""
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return float(temperature), float(top_p)


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the smallest top-p nucleus, renormalised."""
    temperature, top_p = check_sampling(temperature, top_p)
    if temperature == 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    p = torch.softmax(logits.to(dtype) / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = p.sort(dim=-1, descending=True)
        before = sp.cumsum(-1) - sp                       # mass of strictly more likely tokens
        sp = sp.masked_fill(before >= top_p, 0.0)         # the top token always survives
        p = torch.zeros_like(p).scatter_(-1, si, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample_from(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index whose cumulative mass exceeds u * total.  p [N, V] (unnormalised ok), u [N]."""
    c = p.cumsum(-1)
    target = (u.to(c.dtype) * c[:, -1]).unsqueeze(-1)
    i = torch.searchsorted(c.contiguous(), target.contiguous(), right=True).squeeze(-1)
    # u * total can round up to the total: never step past the last token that has any mass
    last = p.shape[-1] - 1 - (p > 0).flip(-1).int().argmax(-1)
    return torch.minimum(i, last)
