"""Benchmarks, installed as `glm52_backends.benchmarks` (the pyproject maps this folder there).

`ops_bench` is `glm52 bench` (per-op timings against floors measured in the run; each op's benchmark
is `ops/<op>.py`, named after the op); the other
files are scripts run by path: `gpu_check.sh` (a GPU machine in one run), `gpu_report.py`
(its Markdown tables), `gpu_model_check.py`, `speculative.py`.
"""
