"""How a gloo test worker (dist_worker.py, mc2_worker.py, dcp_worker.py) ends its process."""

from __future__ import annotations

import os
import sys


def leave(rc: int) -> None:
    """Exit with `rc` once the results are out and the process group destroyed, skipping the interpreter's
    teardown, where torch's functional-collective threads sometimes abort the process ("terminate called
    without an active exception", exit -6) after a graph-mode run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
