"""Conformance for every registered backend that can load on this machine (DESIGN §5).

Each backend runs in its own process, so environment switches stay where they belong: the Ascend
backend runs on its CPU emulator of the torch_npu ops (GLM52_ASCEND_EMULATE=1), the CUDA backend's
Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1) when there is no GPU. A backend
registered later (a vendor package's entry point) is picked up without touching this file.
A backend that cannot load here is skipped with its own reason, never passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from glm52_backends.registry import list_backends

# backend -> (environment that lets it run here, scale). cpu_ref and the Ascend emulator run the
# full catalogue (the real GLM-5.2 sizes); interpreters run it scaled down.
RUN_AS = {
    "cpu_ref": ({}, "full"),
    "ascend": ({"GLM52_ASCEND_EMULATE": "1"}, "full"),
    "cuda": ({} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"},
             "full" if torch.cuda.is_available() else "quick"),
}
DEFAULT = ({}, "quick")
# The Ascend emulator must run its fused attention ops natively, not only their fallbacks: the
# cases at GLM-5.2's head widths (conformance/cases/common.py HEAD_DIMS) at every scale, and at the full
# scale every indexer and sparse-attention case the torch_npu ops' limits admit.
ASCEND_NATIVE = {"quick": {("indexer_topk", "head-dims"), ("sparse_mla", "head-dims"),
                           ("sparse_mla", "head-dims-padding"), ("rope", "head-dims")},
                 "full": {("indexer_topk", c) for c in ("decode", "prefill", "mixed", "relu-ties", "concentrated",
                                                       "head-dims")}
                 | {("sparse_mla", c) for c in ("decode", "prefill", "mixed", "head-dims", "head-dims-padding")}
                 | {("rope", c) for c in ("heads", "shared-key", "head-dims")}}


def _names() -> list[str]:
    return sorted(b.name for b in list_backends())


@pytest.mark.parametrize("name", _names())
def test_backend_conforms(name, tmp_path):
    env_extra, scale = RUN_AS.get(name, DEFAULT)
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "glm52_backends.cli", "conformance", "--backend", name, "--json", str(out)]
    if scale == "quick":
        cmd.append("--quick")
    env = {**os.environ, **env_extra}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode == 2 and proc.stderr.startswith("glm52 conformance:"):  # BackendUnavailable
        pytest.skip(f"{name} cannot load here: {proc.stderr.strip().splitlines()[-1]}")
    print(proc.stdout[-4000:])
    assert out.exists(), f"no report written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(out.read_text())[0]
    failed = [f"{r['op']}/{r['case']}: {r['detail']}" for r in rep["results"] if not r["passed"]]
    assert proc.returncode == 0 and rep["passed"], "\n".join(failed) or proc.stderr[-3000:]
    assert rep["scale"] == scale and len(rep["results"]) >= 40
    if name == "ascend":
        path = {(r["op"], r["case"]): r["path"] for r in rep["results"]}
        fell_back = sorted(k for k in ASCEND_NATIVE[scale] if path.get(k) != "native")
        assert not fell_back, f"the emulated torch_npu ops fell back on {fell_back}"
