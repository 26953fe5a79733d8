"""mtp_verify's reference tests (the contract: glm52_backends/ops/mtp_verify.py): greedy verifies by hand,
rejection sampling preserving the target's law, and the sampler it draws with."""

from __future__ import annotations

import torch

from glm52_backends import ops as R
from glm52_backends.conformance.inputs import generator

D64 = torch.float64


def test_mtp_verify_greedy_by_hand():
    logits = torch.full((3, 4, 6), -1.0)
    best = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2], [3, 3, 3, 3]])
    logits.scatter_(2, best[..., None], 5.0)
    draft = torch.tensor([[1, 2, 3], [0, 0, 1], [3, 3, 2]])
    acc, tok = R.mtp_verify(draft, logits)
    assert acc.tolist() == [3, 0, 2]                                  # all (bonus), none, two
    assert tok.tolist() == [[1, 2, 3, 4], [5, -1, -1, -1], [3, 3, 3, -1]]


def test_mtp_verify_sampling_preserves_the_target_distribution():
    """Leviathan et al.: drafting from q and verifying against p emits tokens distributed as p.
    With k = 1 the first emitted token's law is exactly p; a chi-square test over 20000 draws
    (draft drawn from q with its own uniform) must not reject at significance 1e-3."""
    g = generator("naive", "mtp-law")
    V, N = 6, 20000
    target = torch.randn(V, generator=g, dtype=D64)
    p = torch.softmax(target / 0.8, 0)
    q = torch.softmax(torch.randn(V, generator=g, dtype=D64), 0)
    u_draft = torch.rand(N, generator=g, dtype=D64)
    draft = torch.searchsorted(q.cumsum(0), u_draft * q.sum()).clamp(max=V - 1)
    acc, tok = R.mtp_verify(draft[:, None], target.expand(N, 2, V), q.expand(N, 1, V), 0.8, 1.0,
                            torch.rand(N, 2, generator=g, dtype=D64), cdt=D64)
    first = tok[:, 0]
    counts = torch.bincount(first, minlength=V).double()
    chi2 = float(((counts - N * p) ** 2 / (N * p)).sum())
    # chi-square with V-1 = 5 degrees of freedom: P(X > 20.52) = 1e-3
    assert chi2 < 20.52, (chi2, counts.tolist(), (N * p).tolist())
    assert 0.2 < acc.double().mean() < 0.99                           # the draft is neither always right nor never
    # the test has power: the drafts themselves (law q, what accepting everything would emit) are rejected
    chi2_wrong = float(((torch.bincount(draft, minlength=V).double() - N * p) ** 2 / (N * p)).sum())
    assert chi2_wrong > 20.52


def test_sample_from_never_returns_a_token_without_mass():
    from glm52_backends.sampling import sample_from
    p = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    top = torch.tensor([1 - 1e-9, 1 - 1e-9], dtype=torch.float64)      # rounds to 1.0 in float32
    assert sample_from(p, top).tolist() == [1, 2]
    assert sample_from(p, torch.tensor([0.0, 0.0])).tolist() == [0, 1]
    assert sample_from(p, torch.tensor([0.29, 0.49])).tolist() == [0, 1]
    assert sample_from(p, torch.tensor([0.31, 0.51])).tolist() == [1, 2]
