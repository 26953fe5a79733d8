"""moe_experts' benchmarks (the contract: glm52_backends/ops/moe_experts.py), routing included
(moe_route, GLM-5.2's rule): "moe_experts" on dense weights and "moe_experts_fp8" on block-FP8
weights, at T = 1, 16, 128, 4096 tokens, against `torch._grouped_mm` alone where torch has it."""

from __future__ import annotations

from .common import F32, Case, Env, dequantized, expected_experts, fp8_weight, fp8_weight_bytes, routed_moe


def _tokens(small: bool) -> tuple[int, ...]:
    return (1, 4, 16, 64) if small else (1, 16, 128, 4096)


def plan(add, d, small: bool, A: int) -> None:
    Ts = _tokens(small)
    for T in Ts:
        ea = expected_experts(T, d.E, d.K)
        add("moe_experts", f"T={T} (routing included)", {"T": T},
            ea * 3 * d.HD * d.I * A + 2 * T * d.HD * A + T * d.E * F32,
            2 * T * d.K * 3 * d.HD * d.I, T < Ts[-1], "<= 1.0x torch._grouped_mm")


def plan_fp8(add, d, small: bool, A: int) -> None:
    Ts = _tokens(small)
    for T in Ts:
        ea = expected_experts(T, d.E, d.K)
        add("moe_experts_fp8", f"T={T} (routing included)", {"T": T},
            ea * (fp8_weight_bytes(2 * d.I, d.HD) + fp8_weight_bytes(d.HD, d.I)) + 2 * T * d.HD * A + T * d.E * F32,
            2 * T * d.K * 3 * d.HD * d.I, T < Ts[-1])


def inputs(env: Env, be, case: Case, ref):
    torch, dev, dt, d = env.torch, env.device, env.dtype, env.d
    T = case.params["T"]
    x = torch.randn(T, d.HD, dtype=dt, device=dev)
    w13 = torch.randn(d.E, 2 * d.I, d.HD, dtype=dt, device=dev) * d.HD ** -0.5
    w2 = torch.randn(d.E, d.HD, d.I, dtype=dt, device=dev) * d.I ** -0.5
    logits = torch.randn(T, d.E, device=dev)
    bias = torch.rand(d.E, device=dev) * 0.1
    ids, wts = ref.moe_route(logits, bias, d.K, 1, 1, True, 2.5)
    order = ids.view(-1).argsort(stable=True)
    offs = torch.bincount(ids.view(-1), minlength=d.E).cumsum(0).to(torch.int32)
    xs = x[order // d.K]
    act = torch.randn(T * d.K, d.I, dtype=dt, device=dev)

    def grouped_mm_alone():
        torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
        return torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)

    ours, reference = routed_moe(be, ref, logits, bias, d.K, x, w13, w2)

    try:    # the baseline where torch has it for this device and dtype
        grouped_mm_alone()
        base, name = grouped_mm_alone, "torch._grouped_mm"
    except Exception:  # noqa: BLE001 - e.g. an accelerator without it: the reference instead
        base, name = reference, "reference"
    return ours, base, reference, "close", name


def inputs_fp8(env: Env, be, case: Case, ref):
    torch, dev, dt, d = env.torch, env.device, env.dtype, env.d
    T = case.params["T"]
    x = torch.randn(T, d.HD, dtype=dt, device=dev)
    w13, w2 = fp8_weight(env, d.E, 2 * d.I, d.HD), fp8_weight(env, d.E, d.HD, d.I)
    logits = torch.randn(T, d.E, device=dev)
    bias = torch.rand(d.E, device=dev) * 0.1

    ours, reference = routed_moe(be, ref, logits, bias, d.K, x, w13, w2)

    ids, _ = ref.moe_route(logits, bias, d.K, 1, 1, True, 2.5)
    order = ids.view(-1).argsort(stable=True)
    offs = torch.bincount(ids.view(-1), minlength=d.E).cumsum(0).to(torch.int32)
    xs = x[order // d.K]
    act = torch.randn(T * d.K, d.I, dtype=dt, device=dev)
    try:
        d13, d2 = dequantized(env, w13), dequantized(env, w2)

        def grouped_mm_alone():
            torch._grouped_mm(xs, d13.transpose(1, 2), offs=offs)
            return torch._grouped_mm(act, d2.transpose(1, 2), offs=offs)
        grouped_mm_alone()
        base, name = grouped_mm_alone, f"torch._grouped_mm ({str(dt)[6:]})"
    except Exception:  # noqa: BLE001 - no _grouped_mm for this device/dtype: the reference instead
        base, name = reference, "reference"
    return ours, base, reference, "close", name
