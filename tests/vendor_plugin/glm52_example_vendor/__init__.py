"""example_vendor: what a chip vendor's package looks like.

It starts from the generic torch backend (every op = the reference on the configured device) and
replaces one hot op, `moe_experts`, with its own implementation in the shape vendor kernels take
(npu_moe_init_routing -> npu_grouped_matmul -> npu_moe_finalize_routing on Ascend, fused_moe on
CUDA): permute token copies into expert-major order, run one GEMM pair per expert group, scale
and scatter-add back. The package registers through the `glm52_backends.backends` entry point in
its pyproject.toml; nothing in glm52_backends names it.
"""

from __future__ import annotations

from glm52_backends.backends.generic import TorchDeviceBackend
from glm52_backends.ops import OpUnsupported
from glm52_backends.weights import Weight, weight_format

from .moe import grouped_moe_experts


class ExampleVendorBackend(TorchDeviceBackend):
    """The generic torch backend with a permute/grouped-GEMM `moe_experts`."""

    name = "example_vendor"
    priority = 5  # a real vendor backend would rank above the generic one on its own device

    def moe_experts(self, x, w13, w2, topk_ids, topk_weights):
        if weight_format(w13) != "dense" or weight_format(w2) != "dense":
            raise OpUnsupported("the example's grouped GEMM runs dense weights only")  # -> the reference
        unwrap = lambda w: w.data if isinstance(w, Weight) else w  # noqa: E731
        return grouped_moe_experts(x, unwrap(w13), unwrap(w2), topk_ids, topk_weights)


def create(**kwargs) -> ExampleVendorBackend:
    """Entry point: `create(device=None | "cpu" | "mlu" | ...)`, as the generic backend."""
    kwargs.setdefault("device", "cpu")  # the example targets the CPU so it runs anywhere
    return ExampleVendorBackend(**kwargs)


__all__ = ["ExampleVendorBackend", "create", "grouped_moe_experts"]
