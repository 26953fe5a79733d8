"""The supporting ops on Ascend.

    rms_norm   -> npu_rms_norm (gamma in x's dtype)
    rope       -> npu_rotary_mul, rotary_mode="interleave", x as SBND [T, 1, N, Dr], cos/sin S11D
    mlp        -> npu_swiglu between two F.linear
    linear, layer_norm: plain torch (F.linear, F.layer_norm) on the device
Weights of linear/mlp: bare tensors or dense `Weight`s; other formats are declined (-> reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import FLOATS, ROPE_MAX_DIM, decline, dense


def rms_norm(self, x, weight, eps):
    decline(weight.dtype == x.dtype, f"npu_rms_norm needs gamma in x's dtype ({weight.dtype} != {x.dtype})")
    decline(x.dtype in FLOATS, f"npu_rms_norm: dtype {x.dtype}")
    decline(weight.dim() == 1 and weight.shape[0] == x.shape[-1], "npu_rms_norm: gamma must be [D]")
    if x.dim() == 1:
        return self.npu.npu_rms_norm(x[None], weight, epsilon=float(eps))[0][0]
    return self.npu.npu_rms_norm(x, weight, epsilon=float(eps))[0]


def rope(self, x, positions, theta):
    """Interleaved (GPT-J) RoPE through npu_rotary_mul, x viewed as SBND [T, 1, N, Dr]."""
    Dr = x.shape[-1]
    T = x.shape[0]
    N = x[0].numel() // Dr if T else 1
    decline(x.dtype in FLOATS, f"npu_rotary_mul: dtype {x.dtype}")
    decline(Dr % 2 == 0 and Dr < ROPE_MAX_DIM, f"npu_rotary_mul needs D even and < {ROPE_MAX_DIM}, got {Dr}")
    decline(N < 1000, f"npu_rotary_mul interleave mode needs B * N < 1000, got {N}")
    if T == 0:
        return x.clone()
    inv_freq = 1.0 / (theta ** (torch.arange(0, Dr, 2, dtype=torch.float32, device=x.device) / Dr))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]                   # [T, Dr/2]
    cos = ang.cos().repeat_interleave(2, -1).to(x.dtype).view(T, 1, 1, Dr)          # S11D
    sin = ang.sin().repeat_interleave(2, -1).to(x.dtype).view(T, 1, 1, Dr)
    y = self.npu.npu_rotary_mul(x.reshape(T, 1, N, Dr), cos, sin, rotary_mode="interleave")
    return y.view(x.shape)


def linear(self, x, weight):
    weight = dense(weight, "linear", "weight")
    decline(x.dtype == weight.dtype, f"linear: x {x.dtype} and weight {weight.dtype} differ")
    return F.linear(x, weight)


def layer_norm(self, x, weight, bias, eps):
    xf = x.float()
    return F.layer_norm(xf, (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def mlp(self, x, w13, w2):
    w13, w2 = dense(w13, "mlp", "w13"), dense(w2, "mlp", "w2")
    decline(x.dtype == w13.dtype == w2.dtype, "mlp: x and weights must share one dtype")
    return F.linear(self.npu.npu_swiglu(F.linear(x, w13), dim=-1), w2)
