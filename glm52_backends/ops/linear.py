"""linear(x, weight) -> x @ W.T in x's dtype.

    x [..., in]; weight [out, in]: a tensor, or a `Weight` (data + scales + format,
    glm52_backends/weights.py).
    A quantized `Weight` computes what its format says (glm52_backends/quant.py): x is quantized by
    the format's activation recipe (FP8 per token per 128 inputs, int8 per token, or int8 with the
    calibrated static scale), both operands are dequantized and the products accumulate in float64.
    The reference keeps the weight in its stored format and dequantizes per call.
"""

from __future__ import annotations

import torch

from glm52_backends.quant import matmul_reference
from glm52_backends.weights import Weight

from ._checks import arg, shape_of, tensor


def linear(x, weight, *, cdt=torch.float32):
    if isinstance(weight, Weight):
        if weight.quantized:
            if weight.data.dim() != 2:
                raise ValueError(f"linear: a quantized weight must be one matrix, got shape {tuple(weight.shape)}")
            return matmul_reference(x, weight).to(x.dtype)
        weight = weight.data
    if x.dtype == weight.dtype and x.dtype not in (torch.float16, torch.bfloat16) and cdt == torch.float32:
        return x @ weight.T
    return (x.to(cdt) @ weight.to(cdt).T).to(x.dtype)


def check_output(args, kwargs, out):
    """The output check (registry): [..., out] in x's dtype, on x's device."""
    x, w = arg(args, kwargs, 0, "x"), arg(args, kwargs, 1, "weight")
    return tensor("the output", out, (*x.shape[:-1], shape_of(w)[-2]), (x.dtype,), x.device)


# the `Weight` arguments: a format the backend does not list in `Capabilities.weight_formats` runs on
# the reference (registry)
WEIGHT_ARGS = ((1, "weight"),)
