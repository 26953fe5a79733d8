"""Conformance reports: a markdown table a person reads at a glance, JSON for machines."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .tolerances import table_rows


@dataclass
class CaseResult:
    op: str
    case: str
    dtype: str
    passed: bool = False
    max_abs: float = float("nan")
    rel: float = float("nan")       # judged error: relative error, or top-k score shortfall
    time_ms: float = float("nan")
    path: str = "-"                 # "native" | "fallback" | "-" (did not run)
    detail: str = ""
    about: str = ""
    traceback: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return (f"{status} {self.op:<13} {self.case:<28} {self.dtype:<8} {self.path:<8} "
                f"rel={_num(self.rel)} {self.time_ms:8.2f} ms  {self.detail}").rstrip()


def _num(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


@dataclass
class Report:
    backend: str
    scale: str
    device: str
    dtypes: list[str]
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """Every case passed and at least one ran natively: a backend whose every op fell back to
        the reference would pass on the reference's results alone (nothing of it tested)."""
        return bool(self.results) and all(r.passed for r in self.results) and \
            any(r.path in ("native", "mixed") for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        n, f = len(self.results), len(self.failures)
        native = sum(r.path == "native" for r in self.results)
        return (f"conformance {self.backend} ({self.scale}, {', '.join(self.dtypes)}, {self.device}): "
                f"{n - f} passed, {f} failed of {n} cases; {native} ran natively; {self.seconds:.1f} s")

    def to_dict(self) -> dict:
        return {"backend": self.backend, "scale": self.scale, "device": self.device, "dtypes": self.dtypes,
                "passed": self.passed, "seconds": self.seconds, "tolerances": table_rows(),
                "results": [asdict(r) for r in self.results]}

    def to_json(self, indent: int | None = 2) -> str:
        def clean(v):  # JSON has no NaN/inf
            return None if isinstance(v, float) and not math.isfinite(v) else v
        d = self.to_dict()
        d["results"] = [{k: clean(v) for k, v in r.items()} for r in d["results"]]
        return json.dumps(d, indent=indent)

    def to_markdown(self) -> str:
        lines = [f"# Conformance: {self.backend}", "", self.summary(), "",
                 "| op | case | dtype | result | path | error | time ms | detail |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            lines.append(f"| {r.op} | {r.case} | {r.dtype} | {'pass' if r.passed else '**FAIL**'} | {r.path} | "
                         f"{_num(r.rel)} | {r.time_ms:.2f} | {(r.detail or r.about).replace('|', '/')} |")
        lines += ["", "Error: max|out - ref| / max|ref| (top-k: worst chosen-score shortfall below the "
                  "reference's k-th best, over max|score|).", "", "| dtype | tolerance | reason |", "|---|---|---|"]
        lines += [f"| {t['dtype']} | {t['tol']:.2e} | {t['reason']} |" for t in table_rows()]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return "\n".join([r.line() for r in self.results] + [self.summary()])


def crash_detail(e: BaseException, backend: str) -> str:
    """A failed case's detail for an exception out of the backend's code (a SystemExit named as such)."""
    if isinstance(e, SystemExit):
        return f"backend {backend!r} called sys.exit({e.code!r}) (a backend must raise, not end the process)"
    return f"{type(e).__name__}: {e}"
