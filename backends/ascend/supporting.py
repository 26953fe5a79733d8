"""The supporting ops on Ascend.

    rms_norm   -> npu_rms_norm (gamma in x's dtype)
    rope       -> npu_interleave_rope, as vllm-ascend and Huawei's GLM-5.2 recipe rotate q_pe
    mlp        -> npu_swiglu between two F.linear
    linear, layer_norm: plain torch (F.linear, F.layer_norm) on the device
Weights of linear/mlp: bare tensors, dense `Weight`s, or w8a8_dynamic / w8a8_static `Weight`s, which
run through npu_dynamic_quant / npu_quantize + npu_quant_matmul (quantized.py); other formats are
declined (-> reference).

rope: npu_interleave_rope (doc page torch_npu-npu_interleave_rope.md, on every line since 7.0.0)
takes x [B, N, S, 64] with GPT-J pairs (2i, 2i+1), splits the pairs into halves, rotates in
rotate-half form with cos/sin [B, 1, S, 64] (each half-angle table twice) and returns the half
layout. The contract keeps the pairs, so x goes in as [T, N, 1, 64] and the result is put back
into pairs (one permuted copy of the output). npu_rotary_mul(rotary_mode="interleave"), the
previous choice, is documented for the training products only. Declined (-> reference): a rotary
width other than 64 (the op's only D), float32 on the device (bfloat16/float16 on Atlas A2/A3).
"""

from __future__ import annotations

import torch.nn.functional as F

from glm52_backends.ops.rope import rope_angles
from glm52_backends.weights import weight_format

from . import quantized
from .common import FLOATS, IROPE_DIM, decline, dense


def rms_norm(self, x, weight, eps):
    decline(weight.dtype == x.dtype, f"npu_rms_norm needs gamma in x's dtype ({weight.dtype} != {x.dtype})")
    decline(x.dtype in FLOATS, f"npu_rms_norm: dtype {x.dtype}")
    decline(weight.dim() == 1 and weight.shape[0] == x.shape[-1], "npu_rms_norm: gamma must be [D]")
    if x.dim() == 1:
        return self.npu.npu_rms_norm(x[None], weight, epsilon=float(eps))[0][0]
    return self.npu.npu_rms_norm(x, weight, epsilon=float(eps))[0]


def rope(self, x, positions, theta):
    """Interleaved (GPT-J) RoPE through npu_interleave_rope, x viewed as [B=T, N, S=1, 64]."""
    Dr = x.shape[-1]
    T = x.shape[0]
    decline(Dr == IROPE_DIM, f"npu_interleave_rope needs a rotary width of {IROPE_DIM}, got {Dr}")
    decline(x.dtype in self.half_op_dtypes, f"npu_interleave_rope takes bfloat16/float16, got {x.dtype}")
    if T == 0:
        return x.clone()
    N = x[0].numel() // Dr
    ang = rope_angles(positions, Dr, theta, x.device)                                # [T, Dr/2]
    cos = ang.cos().to(x.dtype).repeat(1, 2).view(T, 1, 1, Dr)                      # half layout, twice
    sin = ang.sin().to(x.dtype).repeat(1, 2).view(T, 1, 1, Dr)
    y = self.npu.npu_interleave_rope(x.reshape(T, N, 1, Dr).contiguous(), cos, sin)   # [T, N, 1, Dr], halves
    return y.view(T, N, 2, Dr // 2).transpose(-1, -2).reshape(x.shape)               # back to pairs


def linear(self, x, weight):
    if weight_format(weight) != "dense":
        return quantized.linear(self, x, weight)
    weight = dense(weight, "linear", "weight")
    decline(x.dtype == weight.dtype, f"linear: x {x.dtype} and weight {weight.dtype} differ")
    return F.linear(x, weight)


def layer_norm(self, x, weight, bias, eps):
    xf = x.float()
    return F.layer_norm(xf, (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def mlp(self, x, w13, w2):
    if weight_format(w13) != "dense" or weight_format(w2) != "dense":
        return quantized.mlp(self, x, w13, w2)
    w13, w2 = dense(w13, "mlp", "w13"), dense(w2, "mlp", "w2")
    decline(x.dtype == w13.dtype == w2.dtype, "mlp: x and weights must share one dtype")
    return F.linear(self.npu.npu_swiglu(F.linear(x, w13), dim=-1), w2)
