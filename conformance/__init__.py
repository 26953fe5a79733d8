"""The conformance suite: every backend against the reference on identical inputs (DESIGN §5).

    from glm52_backends.conformance import run
    report = run("cuda", quick=False)          # or a backend object registered at run time
    report.passed, report.failures, report.to_json(), report.to_markdown()

`cases/` is the catalogue (one file per op, `cases/<op>.py`), `tolerances.py` the one tolerance
table, `judges.py` how outputs are judged, `runner.py` runs them, `report.py` prints them; `glm52 conformance` is the command line.
`e2e.py` runs the whole model end to end (`run_e2e`, `glm52 conformance --e2e`).
"""

from .e2e import E2EReport, run_e2e
from .report import CaseResult, Report
from .runner import run

__all__ = ["run", "run_e2e", "Report", "E2EReport", "CaseResult"]
