"""linear's benchmark on block-FP8 weights ("linear_fp8"; the contract: glm52_backends/ops/linear.py):
GLM-5.2's q_b_proj and o_proj at M = 1, 64, 4096, against `torch._scaled_mm` alone where it runs
(else the dense GEMM on the dequantized weight), checked against the format's exact arithmetic."""

from __future__ import annotations

from .common import Case, Env, dequantized, fp8_weight, fp8_weight_bytes, scaled_mm_alone


def plan_fp8(add, d, small: bool, A: int) -> None:
    # block-FP8 linears: q_b_proj [H*(dn+dr), q_lora] and o_proj [Hd, H*dv]
    Ms = (1, 16, 64) if small else (1, 64, 4096)
    for name, N, Kd in (("q_b_proj", d.H * (d.DN + d.DR), d.QL), ("o_proj", d.HD, d.H * d.DV)):
        for M in Ms:
            add("linear_fp8", f"{name} {N}x{Kd} M={M}", {"M": M, "N": N, "K": Kd},
                fp8_weight_bytes(N, Kd) + M * Kd * A + M * N * A, 2 * M * N * Kd, M < Ms[-1])


def inputs_fp8(env: Env, be, case: Case, ref):
    torch, dev, dt = env.torch, env.device, env.dtype
    p = case.params
    x = torch.randn(p["M"], p["K"], dtype=dt, device=dev)
    w = fp8_weight(env, p["N"], p["K"])
    base = scaled_mm_alone(env, x, w)
    name = "torch._scaled_mm"
    if base is None:
        wd = dequantized(env, w)
        base, name = (lambda: torch.nn.functional.linear(x, wd)), f"{str(dt)[6:]} GEMM"
    return (lambda: be.linear(x, w)), base, (lambda: ref.linear(x, w)), "close", name
