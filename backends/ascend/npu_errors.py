"""The emulator's refusals: `NpuOpError` (what the real op would reject; torch_npu raises RuntimeError for
these too) and the check helpers the emulated ops share (emulator.py, emulator_mc2.py)."""

from __future__ import annotations


class NpuOpError(RuntimeError):
    """An argument the real op would reject (torch_npu raises RuntimeError for these too)."""


def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise NpuOpError(f"{op}: {msg}")


def _not_emulated(op: str, what: str) -> NpuOpError:
    return NpuOpError(f"{op}: {what} is not emulated (the Ascend backend never uses it)")
