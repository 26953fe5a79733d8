"""Which torch_npu documentation line the installed (or emulated) CANN belongs to.

The op limits differ between releases, and a call that one release accepts another rejects. The
release lines and their CANN (Ascend/pytorch `COMPATIBILITY.en.md`), with the differences that
matter here (Ascend/op-plugin, branch `<line>`: `docs/context/` on 7.3.0, `docs/zh/custom_APIs/
torch_npu/` later; Atlas A2/A3 columns):

  line    CANN    npu_lightning_indexer                        npu_sparse_flash_attention
  <7.3.0  <8.5.0  absent                                       absent
  7.3.0   8.5.0   N1 = 64 only; weights bf16/fp16 = query dtype; sparse_count 1..2048
  26.0.0  9.0.0   N1 <= 64; weights also float32; sparse_count also 3072..8192 step 1024
  26.1.0  9.1.0   as 26.0.0 (adds the 950 column)
  (`sinks` of npu_sparse_flash_attention is in no released line's schema, only on master.)

  npu_quant_lightning_indexer (int8 query and keys, float16 weights and scales on A2/A3; sparse_count
  1..2048 on every line): on the 7.3.0 and 26.0.0 pages (docs/context; the torch_npu 2.10.0 wheel's
  docstring) N1 = 64 and every input contiguous; the page with the Atlas 350 column (26.1.0 on) takes
  N1 1..64 and a non-contiguous key / key_dequant_scale, which the packed c8_li cache needs.

GLM-5.2 has 32 index heads, so its indexer runs natively from CANN 9.0.0 on, and on a C8 index cache
from CANN 9.1.0 on.

The installed version is read from `torch.version.cann` (torch_npu sets it, e.g. "8.5.0" or
"8.3.RC1"); where that is missing it can be declared with GLM52_ASCEND_CANN=9.1.0. The emulator
emulates the line of its declared CANN (default `EMULATED_CANN`). A version that cannot be
determined is treated as the oldest line with the fused attention ops (7.3.0), the strictest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

ENV_CANN = "GLM52_ASCEND_CANN"
EMULATED_CANN = "9.1.0"  # the newest line whose docs were read: what the emulator emulates by default


@dataclass(frozen=True)
class DocLine:
    """A torch_npu release line (= op-plugin branch) and the CANN release paired with it."""
    name: str
    cann: tuple[int, int, int]

    def __str__(self) -> str:
        return f"torch_npu {self.name} line (CANN {'.'.join(map(str, self.cann))})"


LINES = (DocLine("7.3.0", (8, 5, 0)), DocLine("26.0.0", (9, 0, 0)), DocLine("26.1.0", (9, 1, 0)))
OLDEST = LINES[0]   # the first line with npu_lightning_indexer / npu_sparse_flash_attention


def parse_cann(text: object) -> tuple[int, int, int] | None:
    """(major, minor, patch) from a CANN version string: "8.5.0", "8.3.RC1" (an RC counts as patch
    0), "CANN-9.0.0-xyz", "version=8.5.0.alpha001"; None when there is none to read."""
    if text is None:
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+|RC\d+|rc\d+|T\d+|alpha\w*|beta\w*))?", str(text))
    if not m:
        return None
    patch = m.group(3)
    return int(m.group(1)), int(m.group(2)), int(patch) if patch and patch.isdigit() else 0


def line_for(cann: tuple[int, int, int]) -> DocLine | None:
    """The newest line whose CANN is <= `cann`; None before 8.5.0 (no fused attention ops)."""
    best = None
    for line in LINES:
        if cann >= line.cann:
            best = line
    return best


@dataclass(frozen=True)
class Installed:
    """What the backend knows of the CANN it runs on. `cann` None: not determined (`source` says
    why); `line` is then OLDEST (the strictest limits). `line` None: CANN older than 8.5.0."""
    cann: tuple[int, int, int] | None
    line: DocLine | None
    source: str
    text: str | None = None       # the version as read, e.g. "8.3.RC1"

    def describe(self) -> str:
        if self.cann is None:
            return f"CANN version not determined ({self.source}); assuming the {OLDEST}, the strictest"
        v = self.text or ".".join(map(str, self.cann))
        if self.line is None:
            return f"CANN {v} ({self.source}), older than the {OLDEST}"
        return f"CANN {v} ({self.source}), torch_npu {self.line.name} doc line"


def installed(npu) -> Installed:
    """The CANN of `npu`: the emulator's declared `cann_version`; for torch_npu `torch.version.cann`,
    else the GLM52_ASCEND_CANN declaration."""
    import torch
    declared = os.environ.get(ENV_CANN, "").strip() or None
    if getattr(npu, "emulated", False):
        text, source = npu.cann_version, "emulated"
    elif parse_cann(getattr(torch.version, "cann", None)) is not None:
        text, source = torch.version.cann, "torch.version.cann"
    elif declared is not None:
        text, source = declared, f"declared by {ENV_CANN}"
    else:
        return Installed(None, OLDEST, f"torch.version.cann is unset and {ENV_CANN} is not set")
    cann = parse_cann(text)
    if cann is None:
        return Installed(None, OLDEST, f"{source} = {text!r} is not a version")
    return Installed(cann, line_for(cann), source, str(text).strip())


__all__ = ["DocLine", "LINES", "OLDEST", "ENV_CANN", "EMULATED_CANN", "Installed", "installed", "parse_cann",
           "line_for"]
