"""rope(x, positions, theta) -> x rotated in interleaved (GPT-J) pairs (2i, 2i+1).

    x [T, ..., Dr]; positions [T] int; angle = pos * theta^(-2i/Dr), computed in f32 like HF.
GLM-5.2 sets rope_interleave = indexer_rope_interleave = true; a config that says otherwise is
refused when it is read (glm52_backends/config.py).
"""

from __future__ import annotations

import torch

from ._checks import same_as_input


def rope_angles(positions, Dr: int, theta: float, device) -> torch.Tensor:
    """float32 [T, Dr/2]: position x inverse frequency, the angles of interleaved RoPE (every backend's)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, Dr, 2, dtype=torch.float32, device=device) / Dr))
    return positions.to(torch.float32)[:, None] * inv_freq[None, :]


def rope(x, positions, theta, *, cdt=torch.float32):
    Dr = x.shape[-1]
    ang = rope_angles(positions, Dr, theta, x.device)                            # [T, Dr/2]
    cos, sin = ang.cos().to(cdt), ang.sin().to(cdt)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (Dr // 2,)
    cos, sin = cos.view(shape), sin.view(shape)
    xe, xo = x[..., 0::2].to(cdt), x[..., 1::2].to(cdt)
    y = torch.stack([xe * cos - xo * sin, xo * cos + xe * sin], dim=-1)          # [..., Dr/2, 2]
    return y.flatten(-2).to(x.dtype)


# the output check (registry): x's shape, dtype and device
check_output = same_as_input
