"""rms_norm(x, weight, eps) -> weight * x / sqrt(mean(x^2) + eps), statistics in f32 (or f64), x's dtype out."""

from __future__ import annotations

import torch


def rms_norm(x, weight, eps, *, cdt=torch.float32):
    xf = x.to(torch.promote_types(cdt, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(y.dtype) * y).to(x.dtype)
