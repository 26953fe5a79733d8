"""For the results tables: the CPU's model name, and printing / writing a finished table."""

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


def publish(table: str, out: str | None) -> None:
    """Print a results table and, given a path, write it there (atomically)."""
    print(table)
    if out:
        from glm52_backends.files import write_text
        write_text(out, table)
