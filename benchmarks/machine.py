"""For the results tables: the CPU's model name, printing / writing a finished table, and gloo rank runs
(`run_ranks` starts them, `leave` ends a worker)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time


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


def run_ranks(tmp: str, worker: str, args_of_rank, world: int, timeout: float = 900) -> list[dict]:
    """`world` processes of `worker` (one thread each, file:// rendezvous under `tmp`), rank r given
    `[init, r, world, *args_of_rank(r, out_r)]`; each writes one JSON object to its out_r. Returns them in
    rank order; a rank that fails or runs past `timeout` raises with the ranks' stderr tails."""
    init = os.path.join(tmp, f"rdzv-{time.monotonic_ns()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    outs = [os.path.join(tmp, f"rank-{time.monotonic_ns()}-{r}.json") for r in range(world)]
    argv = [[sys.executable, worker, init, str(r), str(world), *map(str, args_of_rank(r, outs[r]))]
            for r in range(world)]
    errs = [e[-2000:] for rc, _, e in spawn(lambda r: argv[r], world, env=env, timeout=timeout) if rc]
    if errs:
        raise RuntimeError("\n".join(errs))
    res = []
    for o in outs:
        with open(o) as f:
            res.append(json.load(f))
    return res


def spawn(argv_of, world: int, *, env: dict | None = None, timeout: float = 240) -> list[tuple[int, str, str]]:
    """Start `world` processes, `argv_of(rank)` each (the ranks of a gloo run), and collect (return code,
    stdout, stderr) in rank order. A rank still running after `timeout` s kills them all and raises
    TimeoutError: a hang fails instead of stalling."""
    procs = [subprocess.Popen(argv_of(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    results = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise TimeoutError(f"a rank ran past {timeout} s") from None
        results.append((p.returncode, o, e))
    return results


def leave(main) -> None:
    """A worker's exit: its docstring for -h (or too few arguments), else `main()`'s status, skipping the
    interpreter's teardown, where torch's collective threads sometimes abort a finished run."""
    doc = sys.modules["__main__"].__doc__ or ""
    if "-h" in sys.argv or "--help" in sys.argv or len(sys.argv) < 8:
        print(doc)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
