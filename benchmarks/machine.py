"""The machine a benchmark ran on, for the results tables: the CPU's model name."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """/proc/cpuinfo's model name (Linux), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
