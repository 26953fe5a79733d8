"""mlp(x, w13, w2) -> W2 (silu(W1 x) * W3 x): the dense MLP and the shared expert.

    x [..., Hd]; w13 [2I, Hd] (gate rows then up rows); w2 [Hd, I]; tensors or `Weight`s.
    Quantized weights: two `linear`s (glm52_backends/quant.py), the SwiGLU output rounded to
    x.dtype is the second one's input, quantized by its recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import linear

from ._checks import arg, shape_of, tensor


def mlp(x, w13, w2, *, cdt=torch.float32):
    I = w2.shape[-1]
    h = linear(x, w13, cdt=cdt).to(cdt)
    return linear((F.silu(h[..., :I]) * h[..., I:]).to(x.dtype), w2, cdt=cdt)


def check_output(args, kwargs, out):
    """The output check (registry): [..., hidden] in x's dtype, on x's device."""
    x, w2 = arg(args, kwargs, 0, "x"), arg(args, kwargs, 2, "w2")
    return tensor("the output", out, (*x.shape[:-1], shape_of(w2)[-2]), (x.dtype,), x.device)


# the `Weight` arguments: a format the backend does not list in `Capabilities.weight_formats` runs on
# the reference (registry)
WEIGHT_ARGS = ((1, "w13"), (2, "w2"))
