"""The cuda backend on a real CUDA GPU: the interpreter's checks again, now through the tensor
cores (bfloat16/float16 `tl.dot`) and real tile configurations, plus CUDA-graph capture and replay.

Skipped without a GPU (CI has none). `benchmarks/gpu_check.sh` runs this file on the GPU machine,
with conformance at the real GLM-5.2 sizes, the benchmark table and a tiny-checkpoint greedy run.
The checks themselves: tests/cuda_checks.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_checks  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)"),
    pytest.mark.skipif(cuda_checks.DEVICE != "cuda", reason="TRITON_INTERPRET is set: the interpreter test runs these"),
]

CHECKS = [n for n in dir(cuda_checks) if n.startswith(("check_", "gpu_check_"))]


@pytest.mark.parametrize("name", CHECKS)
def test_on_gpu(name):
    pytest.importorskip("triton")
    getattr(cuda_checks, name)()
