"""The cuda backend's Triton kernels under Triton's CPU interpreter, against the contract's references
(glm52_backends/ops/), the step passed as the contract's loose tensors only.

`triton.jit` reads TRITON_INTERPRET when it decorates, so the checks run in one worker process
started with TRITON_INTERPRET=1 (this file, run as a script); the pytest process never sets it.
Inputs are small, odd-sized and paged with NaN in every slot a kernel must not read. The
reference runs in float64 on the same dtype-rounded inputs. Under the interpreter every tl.dot
is computed in float32 (see backends/cuda/common.py), so float16/bfloat16 runs check loads,
layouts, masking and the output rounding, not the GPU's half-precision MMA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

HERE = os.path.abspath(__file__)


# The checks live in cuda_checks.py (shared with the GPU run, tests/test_cuda_gpu.py).
sys.path.insert(0, os.path.dirname(HERE))
import cuda_checks  # noqa: E402

CHECKS = [n for n in dir(cuda_checks) if n.startswith("check_")]


# ---- worker plumbing ------------------------------------------------------------------------------
def _worker() -> None:
    """Read check names from stdin, run each, answer one JSON line per check."""
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")  # numpy overflow on masked lanes
    for line in sys.stdin:
        name = line.strip()
        try:
            getattr(cuda_checks, name)()
            res = {"ok": True}
        except BaseException:  # noqa: BLE001 - reported to the pytest process
            res = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


@pytest.fixture(scope="module")
def worker():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, HERE, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.mark.parametrize("name", CHECKS)
def test_under_interpreter(worker, name):
    worker.stdin.write(name + "\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    assert line, f"the interpreter worker died while running {name}"
    res = json.loads(line)
    assert res["ok"], res.get("error")


def test_unavailable_without_gpu_or_interpreter():
    """Without a GPU and without TRITON_INTERPRET the backend refuses to load and says why."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from glm52_backends.registry import get_backend, BackendUnavailable\n"
            "try:\n    get_backend('cuda')\nexcept BackendUnavailable as e:\n    print('UNAVAILABLE', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "UNAVAILABLE" in out and "needs a CUDA GPU" in out and "TRITON_INTERPRET=1" in out


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
