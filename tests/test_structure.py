"""The core's import structure: no circles, nothing importing a module that sits above it.

Read from the source with `ast` (every import, also those inside functions), so the picture is
the code's own: `python tests/test_structure.py` prints each core module's imports of the core.
Layers, bottom to top (a module may import its own layer or lower ones):
  0  config (also the dtype names), sampling, configs (the bundled YAMLs), quant (the formats' arithmetic),
     files (atomic writes)
  1  weights, cache, cache_formats (paged-cache row formats), step, ops (the contract)
  2  registry, loader (a package: one file per concern), parallel, engine_config (the one engine
     configuration GLM52, the CLI, serve and the deployment YAML build)
  3  model (the network), tiny (the tiny model's config and random weights)
  4  engine (GLM52, generation), deploy, planner
  5  cli, serve (`glm52 serve`: the HTTP server over the engine), devtools (`glm52 make-tiny`'s checkpoint
     writers, the trainer of the embedded default model: dev tools, outside the runtime)
No core module imports a backend package, the conformance suite, the benchmarks or the dev tools, but
through a declared seam (`SEAMS`): the CLI, whose commands run them.
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "glm52_backends")
LAYER = {"quant": 0, "config": 0, "files": 0, "sampling": 0, "configs": 0, "weights": 1, "cache": 1, "cache_formats": 1, "step": 1, "ops": 1, "registry": 2, "loader": 2,
         "parallel": 2, "engine_config": 2,
         "model": 3, "tiny": 3, "engine": 4, "deploy": 4, "planner": 4, "cli": 5, "serve": 5, "devtools": 5}
OUTSIDE = ("glm52_backends.backends", "glm52_backends.conformance", "glm52_backends.benchmarks")
# What stays out of the runtime -> the core modules that may import it: the declared seams.
SEAMS = {"glm52_backends.conformance": ("glm52_backends.cli",),       # glm52 conformance
         "glm52_backends.benchmarks": ("glm52_backends.cli",),        # glm52 bench
         "glm52_backends.devtools": ("glm52_backends.cli",)}          # glm52 make-tiny


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                name = "glm52_backends" + ("" if rel == "__init__" else "." + rel.removesuffix(".__init__"))
                out[name] = os.path.join(dirpath, f)
    return out


def imports() -> dict[str, set[str]]:
    """core module -> the glm52_backends modules it imports (absolute names)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                cands = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for c in cands:
                if c.startswith(OUTSIDE):
                    deps.add(c)
                    break
                if c in mods and c != "glm52_backends":
                    deps.add(c)
                    break
        graph[name] = deps - {name}
    return graph


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circles():
    g = imports()
    seen, stack, circles = set(), [], []

    def visit(m):
        if m in stack:
            circles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(g.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(g):
        visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_module_imports_one_above_it():
    g = imports()
    up = []
    for m, deps in g.items():
        if m == "glm52_backends":
            continue                 # the package root re-exports (lazily) from every layer
        lm = LAYER.get(_top(m))
        assert lm is not None, f"{m}: add its folder/file to LAYER"
        for d in deps:
            assert not d.startswith(OUTSIDE) or m in _seam(d), \
                f"{m} imports {d}: the core never imports a backend or a suite, but through a seam (SEAMS)"
            ld = LAYER.get(_top(d))
            if ld is not None and ld > lm:
                up.append(f"{m} (layer {lm}) -> {d} (layer {ld})")
    assert not up, "imports that run back up: " + "; ".join(up)


def _seam(mod: str) -> tuple[str, ...]:
    """The core modules that may import `mod`, a module kept out of the runtime (SEAMS)."""
    for outside, importers in SEAMS.items():
        if mod == outside or mod.startswith(outside + "."):
            return importers
    return ()


def test_dev_tools_stay_out_of_the_runtime():
    """Only the seam imports the dev tools; they may import the runtime, never the other way round."""
    strays = [f"{m} -> {d}" for m, deps in imports().items() if _top(m) != "devtools"
              for d in deps if _top(d) == "devtools" and m not in _seam(d)]
    assert not strays, "runtime modules importing the dev tools: " + "; ".join(strays)


def test_model_is_the_network_only():
    deps = {_top(d) for d in imports()["glm52_backends.model"]}
    assert not deps & {"engine", "deploy", "cli", "loader", "tiny", "planner", "sampling"}, deps


if __name__ == "__main__":
    for m, deps in sorted(imports().items()):
        print(f"{m}: {', '.join(sorted(deps)) or '-'}")
    sys.exit(0)
