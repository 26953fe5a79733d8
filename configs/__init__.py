"""Bundled deployment configs: one YAML per chip vendor/product, plus `cpu-tiny` (DESIGN §6).

`load_deployment("ascend-910c")` in `glm52_backends.deploy` resolves a bare name to the file here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def bundled_configs() -> dict[str, Path]:
    """name (file stem) -> path of every bundled `*.yaml`, sorted by name."""
    root = files(__name__)
    found = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            found[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(found.items()))
