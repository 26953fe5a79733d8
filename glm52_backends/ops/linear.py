"""linear(x, weight) -> x @ W.T in x's dtype.

    x [..., in]; weight [out, in]: a tensor, or a `Weight` (data + scales + format,
    glm52_backends/weights.py) that the reference dequantizes per call.
"""

from __future__ import annotations

import torch

from glm52_backends.weights import as_dense


def linear(x, weight, *, cdt=torch.float32):
    weight = as_dense(weight)
    if x.dtype == weight.dtype and x.dtype not in (torch.float16, torch.bfloat16) and cdt == torch.float32:
        return x @ weight.T
    return (x.to(cdt) @ weight.to(cdt).T).to(x.dtype)
