"""Mutation testing: do the tests notice a small, realistic change to a module? (not run by CI)

    python tools/mutate.py conformance/judges.py --tests tests/test_conformance.py tests/test_near_miss.py
    python tools/mutate.py glm52_backends/ops/*.py --tests tests/ops --max 40 --seed 1
    python tools/mutate.py conformance/tolerances.py --list          # the mutants, nothing run
    python tools/mutate.py --known                                   # the audits' survivors, each with its tests
    python tools/mutate.py --known --only transaction,stack --list

Each mutant is one small change to a module's syntax tree: a comparison flipped (< to <=, == to !=,
< to >), an integer constant off by one, a float constant doubled or halved, an arithmetic operator
swapped (+ to -, * to /), a factor dropped (a * b to a), the operands of a non-commutative operator
swapped (a - b to b - a), the first two elements of a list literal swapped ([e, h] to [h, e]),
`and` to `or`, a `not` removed, True to False, min to max. Docstrings,
f-strings and other strings are never mutated (a changed message is rarely a bug the tests must see).

The repository is copied to a temporary folder first (sources and tests only, no .git, no caches),
and every mutant is written and tested there: the working tree is never modified, so several
people can use it at once and an interrupted run (Ctrl-C, a kill, a crash) leaves nothing mutated
behind. Inside the copy, each mutated file is restored after its test run in a `finally`, and the
copy is deleted at the end, also on Ctrl-C. Tests run as `python -m pytest -x -q` with the copy
first on PYTHONPATH and bytecode caching off (a stale .pyc of the same size and second could
otherwise hide a mutant).

A mutant is killed when the tests fail (or time out), survives when they pass. The summary gives
the score per module and lists every survivor with its line, so each can be judged: a test gap,
or an equivalent mutant (one that cannot change behaviour; say why in the report).

`--known` runs the mutants earlier audits found surviving (`KNOWN`: each a text change of one
module and the tests that must kill it), so they stay caught; a known mutant whose text no longer
occurs in its module is an error (update its entry with the code). tests/test_reliability.py checks
that every entry still applies.

Exit status: 0 when every module reached --min-score (default 0), 1 otherwise, 2 on usage errors.
With --known: 0 when every known mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# top-level folders the editable install maps into the glm52_backends namespace (pyproject.toml)
NAMESPACE_DIRS = {"backends": "backends", "conformance": "conformance", "configs": "configs",
                  "benchmarks": "benchmarks"}
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", "build", "dist", ".venv", "venv",
             "node_modules"}


# ---- mutants -------------------------------------------------------------------------------------

@dataclass
class Mutant:
    module: str          # path relative to the repository
    index: int           # position in the module's mutant list (stable for a given source)
    line: int
    what: str            # e.g. "`a < b` -> `a <= b`"
    source: str = field(repr=False, default="")  # the mutated module's source

    @property
    def ident(self) -> str:
        return f"{self.module}:{self.line}#{self.index}"


@dataclass(frozen=True)
class Known:
    """A mutant an audit found surviving: `old` -> `new` (exactly one occurrence) in `module`, and the
    tests that kill it now."""
    name: str
    module: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


_R = "tests/test_reliability.py"
# The survivors of the issue-26 audit (every one changed behaviour and passed the whole suite then).
KNOWN: tuple[Known, ...] = (
    Known("fp8-scale-slice-block", "glm52_backends/loader/slicing.py", "    bs = block[dim]\n", "    bs = block[0]\n",
          (f"{_R}::test_rank_slices_of_non_square_fp8_blocks_equal_the_whole",),
          "a rank's slice of an FP8 scale grid cut in the row block on every dim (square blocks hide it)"),
    Known("plan-o-proj-block", "glm52_backends/parallel.py",
          '("o_proj columns per rank", H * cfg.v_head_dim // tp, b1)',
          '("o_proj columns per rank", H * cfg.v_head_dim // tp, b0)',
          (f"{_R}::test_the_plan_checks_o_proj_columns_against_the_column_block",),
          "the plan checks o_proj's columns against the row block"),
    Known("online-cut-end", "glm52_backends/loader/slicing.py", "    if a % block or (b % block and b != n):\n",
          "    if a % block:\n", (f"{_R}::test_an_online_quantized_cut_is_checked_at_both_ends",),
          "the online-quantized rank cut checked at the start of a slice only"),
    Known("stack-block-recipe", "glm52_backends/weights.py",
          "fmts = {(w.format, w.block, w.recipe) for w in ws}", "fmts = {(w.format,) for w in ws}",
          (f"{_R}::test_stack_refuses_experts_of_different_blocks_or_recipes",),
          "stack accepts experts of different FP8 blocks or recipes and computes them with the first's"),
    Known("transaction-interrupt", "glm52_backends/cache.py", "        except BaseException:\n            self.rollback(mark)",
          "        except Exception:\n            self.rollback(mark)",
          (f"{_R}::test_ctrl_c_inside_a_step_rolls_the_cache_back",),
          "the cache transaction rolls back on Exception only: Ctrl-C leaves lengths advanced, blocks taken"),
    Known("registry-output-device", "glm52_backends/ops/_checks.py",
          "    if device is not None and t.device != device:", "    if False and device is not None and t.device != device:",
          (f"{_R}::test_an_op_output_on_another_device_is_refused",),
          "the registry's check of an op output's device"),
    Known("ep-stage2-empty-step-kind", "glm52_backends/engine/turns.py", "        if kind == self.RUN:\n",
          "        if kind != self.IDLE:\n",
          ("tests/test_distributed.py::test_ep_stage2_adaptive_drafts_where_the_groups_want_different_steps",),
          "EP stage 2 with adaptive drafts: a group runs the other's MTP step empty as a full pass (gloo: "
          "'640 vs 512'); the only test ran fixed-k drafts"),
    Known("sparse-mla-idx-rows", "glm52_backends/ops/sparse_mla.py", "    if idx.dim() != 2 or idx.shape[0] != T:",
          "    if idx.dim() != 2:", (f"{_R}::test_sparse_mla_refuses_an_index_with_more_rows_than_tokens",),
          "the reference sparse_mla accepts an index tensor with more rows than tokens"),
    Known("group-timeout", "glm52_backends/engine/distributed.py",
          "dist.new_group(layout.tp_group_ranks(d), timeout=timeout)", "dist.new_group(layout.tp_group_ranks(d))",
          (f"{_R}::test_every_process_group_gets_the_collective_timeout",),
          "a tp group made without the timeout: a hung rank stalls the others for torch's 30 minutes"),
    Known("int8-nan-laundering", "glm52_backends/quant.py", "    return y + nonfinite_rows(x)[..., None]",
          "    return y", (f"{_R}::test_quantized_matmul_keeps_nan_and_inf_visible",
                         f"{_R}::test_a_w8a8_model_trips_the_finiteness_check_like_a_bf16_one"),
          "the int8 activation codes turn NaN into 0: a W8A8 model never trips the finiteness check"),
    Known("c8-li-unrounded-scale", "glm52_backends/cache_formats.py", "    s = s16.float()\n",
          "    s = (kr.abs().amax(dim=-1) / 127).clamp(max=F16_MAX)\n",
          (f"{_R}::test_c8_li_codes_use_the_stored_f16_scale",),
          "c8_li codes computed with the unrounded f32 scale while the f16 scale is stored"),
    Known("scale-ranges", "glm52_backends/loader/materialise.py", "    why = part_problem(fmt, part, t, K)\n",
          "    why = None\n", (f"{_R}::test_scales_no_quantizer_writes_are_refused_naming_the_tensor",
                            f"{_R}::test_all_zero_fp8_scale_is_refused"),
          "the loader checks only that scales are finite"),
    Known("draft-budget", "glm52_backends/engine/scheduler.py",
          "min(req.k, self.cfg.max_position_embeddings - 1 - n, req.budget - req.n_out - 1)",
          "min(req.k, self.cfg.max_position_embeddings - 1 - n)", (f"{_R}::test_a_request_with_one_token_left_drafts_none",),
          "speculative=k drafts k tokens even when a request has one token left"),
    # the fresh audit of this modules (seed 26, 48 mutants)
    Known("expert-count-bound", "glm52_backends/loader/validation.py", "    if need > len(entries):\n",
          "    if need >= len(entries):\n",
          (f"{_R}::test_a_checkpoint_with_exactly_its_expert_tensors_is_refused_for_what_it_lacks",),
          "the expert-count guard fires on a checkpoint holding exactly its expert tensors: a wrong verdict "
          "instead of the missing-tensor report"),
    Known("ascend-part-type", "glm52_backends/loader/validation.py",
          "            if name in claimed and t is not None and t not in ASCEND_TYPES:",
          "            if name not in claimed and t is not None and t not in ASCEND_TYPES:",
          ("tests/test_quant_loading.py::test_ascend_loader_refuses_by_name",),
          "a scale part's own unknown quantization type in the AscendV1 description passes unnoticed"),
    Known("cache-dtype-and-device", "glm52_backends/engine/arguments.py",
          "    if dt != model.dtype or c0.device.type != dev.type or (dev.index",
          "    if dt != model.dtype and c0.device.type != dev.type or (dev.index",
          ("tests/test_boundaries.py::test_a_cache_of_another_dtype_on_the_same_device_is_refused",),
          "a cache of another dtype on the model's device is taken: rows written and read in the wrong dtype"),
    Known("timeout-upper-bound", "glm52_backends/engine/distributed.py", "v > 86400 * 365", "v > 86400 * 364",
          (f"{_R}::test_a_bad_collective_timeout_is_refused_by_name",),
          "the collective timeout's documented bound (a year) moved without a test noticing"),
    Known("numpy-batch-rows", "glm52_backends/engine/arguments.py", "if prompts.ndim == 2 else",
          "if prompts.ndim == 3 else", ("tests/test_boundaries.py::test_numpy_prompts_are_rows_or_one_prompt",),
          "a 2-D numpy batch of prompts taken as one prompt"),
    Known("finite-logits-any", "glm52_backends/engine/arguments.py", "    if not bool(torch.isfinite(logits).all()):",
          "    if not bool(torch.isfinite(logits).any()):",
          ("tests/test_boundaries.py::test_finite_logits_names_each_bad_row",),
          "logits with some NaN pass the finiteness check (only all-NaN ones are refused)"),
    Known("finite-logits-rows", "glm52_backends/engine/arguments.py", "if logits.dim() > 1 else [0]",
          "if logits.dim() > 2 else [0]", ("tests/test_boundaries.py::test_finite_logits_names_each_bad_row",),
          "the NaN message names row 0 instead of the rows that hold them"),
    # the second audit (seed 28: engine_config, generation, validation, arguments, deploy, files)
    Known("kept-engine-batch", "glm52_backends/engine/generation.py", "and kept.max_seqs >= batch",
          "and kept.max_seqs > batch", ("tests/test_graph.py::test_a_kept_engine_serves_the_calls_it_fits",),
          "a call of exactly the kept engine's batch captures its graphs again"),
    Known("kept-engine-capacity", "glm52_backends/engine/scheduler.py",
          "return (self.cache.num_blocks - (1 if self.graph_mode else 0)) * self.bs",
          "return (self.cache.num_blocks - (2 if self.graph_mode else 0)) * self.bs",
          ("tests/test_graph.py::test_a_kept_engine_serves_the_calls_it_fits",),
          "the kept engine's capacity miscounted (the null block)"),
    Known("prefill-end", "glm52_backends/engine/generation.py",
          "first_pending = {i for i in range(B) if budget[i] > 0}",
          "first_pending = {i for i in range(B) if budget[i] > -1}",
          ("tests/test_boundaries.py::test_generate_with_a_prompt_that_fills_the_context",),
          "a prompt filling the context keeps the prefill open: every step counted as prefill"),
    Known("block-size-least", "glm52_backends/engine_config.py", 'Ascend 128, else 16)", minimum=1)',
          'Ascend 128, else 16)", minimum=2)', ("tests/test_engine_config.py::test_flags_become_settings",),
          "--block-size 1 refused (one-token blocks are valid; the planner's token-granular staging)"),
    Known("cache-layers", "glm52_backends/engine/arguments.py",
          "    if got != want or cache.num_layers != cfg.num_hidden_layers:",
          "    if got != want and cache.num_layers != cfg.num_hidden_layers:",
          ("tests/test_boundaries.py::test_a_cache_of_a_model_with_other_layers_is_refused",),
          "a cache of a model with other layers (same widths) taken: its layers misread"),
    Known("state-dict-five-extra", "glm52_backends/engine/arguments.py", "for k in extra[:5]]", "for k in extra[:4]]",
          ("tests/test_boundaries.py::test_state_dict_problems_name_the_first_five_of_each_kind",),
          "the fifth unexpected tensor of a state_dict not named"),
    # the third audit (seed 29)
    Known("api-only-collective", "glm52_backends/engine_config.py", '"on CPU)", cli=False)', '"on CPU)", cli=True)',
          ("tests/test_engine_config.py::test_generate_and_serve_take_the_same_engine_flags",),
          "an API-only setting (collective) grows a command-line flag"),
    Known("zero-d-tensor-ids", "glm52_backends/engine/arguments.py",
          "        if isinstance(t, torch.Tensor) and t.dim() == 0 and",
          "        if isinstance(t, torch.Tensor) and t.dim() == 1 and",
          ("tests/test_boundaries.py::test_numpy_prompts_are_rows_or_one_prompt",),
          "token ids given as 0-d integer tensors refused"),
    Known("yaml-block-size-zero", "glm52_backends/deploy.py",
          'if top["cache_block_size"] is not None and top["cache_block_size"] <= 0:',
          'if top["cache_block_size"] is not None and top["cache_block_size"] <= -1:',
          ("tests/test_deploy.py::test_broken_variant_names_the_key",),
          "cache_block_size: 0 accepted by the YAML loader"),
    Known("yaml-utilization-zero", "glm52_backends/deploy.py", '    if not 0 < top["memory_utilization"] <= 1:',
          '    if not -1 < top["memory_utilization"] <= 1:', ("tests/test_deploy.py::test_broken_variant_names_the_key",),
          "memory_utilization: 0 accepted (a deployment with no usable memory)"),
    Known("plan-offload-host-share", "glm52_backends/planner.py", "(not offload or c * b * lat / dcp <= host)",
          "(not offload or c * b * lat <= host)",
          ("tests/test_planner.py::test_offload_with_dcp_holds_one_dcp_share_of_the_rows_on_each_devices_host",),
          "host offload with dcp > 1 counts the whole context against each device's host share"),
    Known("dcp-graph-slot-owner", "glm52_backends/cache.py", "        if p % D != self.dcp_rank:",
          "        if p % D == self.dcp_rank:",
          ("tests/test_dcp.py::test_dcp_equals_one_process",),
          "a rank writes the rows another dcp rank stores (eager and captured steps)"),
    Known("dcp-gather-unmasked", "glm52_backends/model.py",
          "sel = torch.where(idx[a:e] >= 0, pos, -1).to(torch.int32)", "sel = pos.expand(e - a, K).to(torch.int32)",
          ("tests/test_dcp.py::test_gather_form_attends_exactly_what_one_process_attends",),
          "the gather form attends the zero rows of unselected entries"),
    Known("yaml-mtp-layer", "glm52_backends/deploy.py",
          'overrides.setdefault("include_mtp", None if self.mtp_draft_tokens > 0 else False)',
          'overrides.setdefault("include_mtp", None if self.mtp_draft_tokens > -1 else False)',
          ("tests/test_engine_config.py::test_a_deployment_loads_the_mtp_layer_only_to_draft_with_it",),
          "a deployment without drafting loads the MTP layer anyway"),
    Known("expert-shards", "glm52_backends/parallel.py", "        return self.ep if self.ep > 1 else self.tp",
          "        return self.ep if self.ep > 2 else self.tp", ("tests/test_engine_config.py::test_expert_shards_are_the_plans",),
          "ep = 2 counted as TP-split experts"),
    # the fourth audit (seed 30)
    Known("flat-list-first-id", "glm52_backends/engine/arguments.py",
          "(isinstance(prompts, Sequence) and prompts and _is_int(prompts[0]))",
          "(isinstance(prompts, Sequence) and prompts and _is_int(prompts[-1]))",
          ("tests/test_boundaries.py::test_a_flat_list_mixing_ids_and_lists_names_the_position",),
          "a flat list mixing ids and lists gets a message about the wrong element"),
    Known("weight-part-one-nan", "glm52_backends/engine/arguments.py",
          "if v.is_floating_point() and not bool(torch.isfinite(v.float()).all()):",
          "if v.is_floating_point() and not bool(torch.isfinite(v.float()).any()):",
          ("tests/test_boundaries.py::test_a_weight_with_one_nan_scale_is_refused",),
          "a user's quantized Weight with one NaN scale among finite ones is taken"),
    Known("written-file-mode", "glm52_backends/files.py", "        os.chmod(tmp, 0o666 & ~umask())",
          "        os.chmod(tmp, 0o667 & ~umask())",
          (f"{_R}::test_a_written_file_gets_the_mode_open_would_give",),
          "files written executable by others"),
)


def known_mutants(names: list[str] | None = None, root: Path = REPO) -> list[tuple[Known, Mutant]]:
    """The `KNOWN` mutants (those named, or all) with their mutated sources; a stale entry raises."""
    chosen = [k for k in KNOWN if not names or k.name in names]
    unknown = sorted(set(names or ()) - {k.name for k in KNOWN})
    if unknown:
        raise SystemExit(f"mutate: no known mutant {', '.join(unknown)}; known: {', '.join(k.name for k in KNOWN)}")
    out = []
    for i, k in enumerate(chosen):
        src = (root / k.module).read_text(encoding="utf-8")
        if src.count(k.old) != 1:
            raise SystemExit(f"mutate: known mutant {k.name!r}: its text occurs {src.count(k.old)} times in "
                             f"{k.module} (expected once); update its entry in KNOWN with the code")
        line = src[:src.index(k.old)].count("\n") + 1
        out.append((k, Mutant(k.module, i, line, f"[{k.name}] {k.why}", src.replace(k.old, k.new, 1))))
    return out


_CMP_SWAP = {ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt, ast.GtE], ast.Gt: [ast.GtE, ast.Lt],
             ast.GtE: [ast.Gt, ast.LtE], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.Is: [ast.IsNot],
             ast.IsNot: [ast.Is], ast.In: [ast.NotIn], ast.NotIn: [ast.In]}
_BIN_SWAP = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult],
             ast.FloorDiv: [ast.Div], ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult],
             ast.BitAnd: [ast.BitOr], ast.BitOr: [ast.BitAnd], ast.LShift: [ast.RShift], ast.RShift: [ast.LShift]}
_NON_COMMUTATIVE = (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_FUNC_SWAP = {"min": "max", "max": "min", "amin": "amax", "amax": "amin", "minimum": "maximum",
              "maximum": "minimum", "clamp_min": "clamp_max", "clamp_max": "clamp_min", "any": "all", "all": "any"}


def _op_text(op: ast.AST) -> str:
    return {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
            ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-",
            ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.BitAnd: "&",
            ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>", ast.And: "and", ast.Or: "or"}.get(type(op), "?")


def _protected(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, f-strings (and all inside), annotations, __main__ guards."""
    out: set[int] = set()

    def mark(node):
        for n in ast.walk(node):
            out.add(id(n))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                mark(body[0])
        if isinstance(node, ast.JoinedStr):
            mark(node)
        if isinstance(node, (ast.arg, ast.AnnAssign)) and getattr(node, "annotation", None) is not None:
            mark(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            mark(node.returns)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            mark(node)
    return out


def _edits(tree: ast.Module) -> list[tuple[int, str, object]]:
    """(line, description, edit) for every mutation point; `edit(node_copy)` applies it to the copy
    of the node found at the same position of a deep-copied tree (matched by walk order)."""
    skip = _protected(tree)
    points = []
    for pos, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        line = getattr(node, "lineno", 0)
        seg = _segment(node)
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                for new in _CMP_SWAP.get(type(op), []):
                    def edit(n, i=i, new=new):
                        n.ops[i] = new()
                    points.append((pos, line, f"`{seg}`: {_op_text(op)} -> {_op_text(new())}", edit))
        elif isinstance(node, ast.BinOp):
            for new in _BIN_SWAP.get(type(node.op), []):
                def edit(n, new=new):
                    n.op = new()
                points.append((pos, line, f"`{seg}`: {_op_text(node.op)} -> {_op_text(new())}", edit))
            if isinstance(node.op, (ast.Mult, ast.Div)):
                points.append((pos, line, f"`{seg}`: drop the factor `{_segment(node.right)}`",
                               ("replace", lambda n: n.left)))
                if isinstance(node.op, ast.Mult):
                    points.append((pos, line, f"`{seg}`: drop the factor `{_segment(node.left)}`",
                                   ("replace", lambda n: n.right)))
            if isinstance(node.op, _NON_COMMUTATIVE):
                def edit(n):
                    n.left, n.right = n.right, n.left
                points.append((pos, line, f"`{seg}`: operands swapped", edit))
        elif isinstance(node, ast.AugAssign):
            for new in _BIN_SWAP.get(type(node.op), []):
                def edit(n, new=new):
                    n.op = new()
                points.append((pos, line, f"`{seg}`: {_op_text(node.op)}= -> {_op_text(new())}=", edit))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            def edit(n, new=new):
                n.op = new()
            points.append((pos, line, f"`{seg}`: {_op_text(node.op)} -> {_op_text(new())}", edit))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            points.append((pos, line, f"`{seg}`: drop the `{type(node.op).__name__.lower()}`",
                           ("replace", lambda n: n.operand)))
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str):
            v = node.value
            if isinstance(v, bool):
                def edit(n):
                    n.value = not n.value
                points.append((pos, line, f"`{v}` -> `{not v}`", edit))
            elif isinstance(v, int):
                for d in (1, -1):
                    def edit(n, d=d):
                        n.value = n.value + d
                    points.append((pos, line, f"`{seg}`: {v} -> {v + d}", edit))
            elif isinstance(v, float):
                for f in ((2.0, 0.5) if v else (None,)):
                    def edit(n, f=f):
                        n.value = n.value * f if f is not None else 1.0
                    new_v = v * f if f is not None else 1.0
                    points.append((pos, line, f"`{seg}`: {v!r} -> {new_v!r}", edit))
        elif isinstance(node, ast.List) and len(node.elts) >= 2 \
                and not any(isinstance(e, ast.Starred) for e in node.elts[:2]):
            def edit(n):
                n.elts[0], n.elts[1] = n.elts[1], n.elts[0]
            points.append((pos, line, f"`{seg}`: first two elements swapped", edit))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                node.func.id if isinstance(node.func, ast.Name) else None
            if name in _FUNC_SWAP:
                def edit(n, new=_FUNC_SWAP[name]):
                    if isinstance(n.func, ast.Attribute):
                        n.func.attr = new
                    else:
                        n.func.id = new
                points.append((pos, line, f"`{seg}`: {name} -> {_FUNC_SWAP[name]}", edit))
    return points


_SOURCE: list[str] = [""]


def _segment(node: ast.AST, limit: int = 60) -> str:
    s = ast.get_source_segment(_SOURCE[0], node) or ast.unparse(node)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _apply(tree: ast.Module, pos: int, edit) -> ast.Module:
    new = copy.deepcopy(tree)
    nodes = list(ast.walk(new))
    target = nodes[pos]
    if isinstance(edit, tuple) and edit[0] == "replace":
        repl = edit[1](target)
        for parent in ast.walk(new):
            for fname, value in ast.iter_fields(parent):
                if value is target:
                    setattr(parent, fname, repl)
                    return new
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        if v is target:
                            value[i] = repl
                            return new
        raise RuntimeError("mutation target has no parent")
    edit(target)
    return new


def mutants(module: str, root: Path = REPO) -> list[Mutant]:
    """Every mutant of `module` (a path relative to the repository), in a stable order."""
    src = (root / module).read_text(encoding="utf-8")
    _SOURCE[0] = src
    tree = ast.parse(src)
    out = []
    for i, (pos, line, what, edit) in enumerate(_edits(tree)):
        try:
            code = ast.unparse(ast.fix_missing_locations(_apply(tree, pos, edit)))
            compile(code, module, "exec")
        except (SyntaxError, ValueError, RuntimeError):
            continue
        out.append(Mutant(module, i, line, what, code))
    return out


# ---- the scratch copy --------------------------------------------------------------------------

def make_copy(dest: Path) -> Path:
    """Copy the repository's sources and tests into `dest`; link the namespace folders into the
    package so that `glm52_backends.conformance` etc. resolve inside the copy, not the working tree."""
    def ignore(d, names):
        return [n for n in names if n in SKIP_DIRS or n.endswith((".egg-info", ".pyc"))]
    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    pkg = dest / "glm52_backends"
    for sub, folder in NAMESPACE_DIRS.items():
        if (dest / folder).is_dir() and not (pkg / sub).exists():
            os.symlink(dest / folder, pkg / sub, target_is_directory=True)
    return dest


def run_tests(root: Path, tests: list[str], timeout: float, extra: list[str]) -> tuple[str, float]:
    """('passed' | 'failed' | 'timeout', seconds) of the tests in the copy at `root`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *extra, *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", time.perf_counter() - t0
    except BaseException:  # Ctrl-C: stop the test process group too, then let the caller clean up
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    # exit status 5: no tests collected (a wrong path): never a kill
    if rc == 5:
        raise SystemExit(f"mutate: pytest collected no tests from {tests}")
    return ("passed" if rc == 0 else "failed"), time.perf_counter() - t0


def check_import_root(root: Path, module: str) -> None:
    """The copy, not the working tree, must be what the tests import."""
    if not module.endswith(".py"):
        return
    parts = Path(module).with_suffix("").parts
    top = {v: k for k, v in NAMESPACE_DIRS.items()}.get(parts[0])
    dotted = ".".join(["glm52_backends", top, *parts[1:]] if top else parts)
    if dotted.endswith(".__init__"):
        dotted = dotted[: -len(".__init__")]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    code = f"import importlib, sys; m = importlib.import_module({dotted!r}); print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"mutate: cannot import {dotted} in the copy:\n{out.stderr[-2000:]}")
    got = Path(out.stdout.strip()).resolve()
    if root.resolve() not in got.parents:
        raise SystemExit(f"mutate: {dotted} imports from {got}, not from the copy {root}; refusing to run")


# ---- the run -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/mutate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help="module files relative to the repository root")
    ap.add_argument("--known", action="store_true",
                    help="run the known survivors of earlier audits (KNOWN), each against its own tests (or --tests)")
    ap.add_argument("--only", metavar="NAMES", help="with --known: a comma-separated subset of the names")
    ap.add_argument("--tests", nargs="+", default=None, help="pytest paths/ids run against each mutant")
    ap.add_argument("--max", type=int, default=None, help="sample at most this many mutants per module")
    ap.add_argument("--sample", type=int, default=None,
                    help="sample this many mutants over all the modules together (after --max)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument("--lines", metavar="A-B", help="only mutants on lines A..B (e.g. a function's body)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per test run (default: 4 x the unmutated run + 30)")
    ap.add_argument("--pytest-arg", action="append", default=[], help="extra pytest argument (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--json", metavar="PATH", help="write every mutant's outcome as JSON")
    ap.add_argument("--min-score", type=float, default=0.0, help="exit 1 when a module scores below this")
    args = ap.parse_args(argv)
    if args.known:
        return run_known(args)
    if not args.modules:
        ap.error("give module files, or --known")

    modules = []
    for m in args.modules:
        p = Path(m)
        if not p.is_absolute() and (REPO / p).is_file():
            rel = p
        else:
            try:
                rel = p.resolve().relative_to(REPO)
            except ValueError:
                ap.error(f"{m} is not a file of the repository at {REPO}")
        if not (REPO / rel).is_file():
            ap.error(f"no such module: {m}")
        modules.append(str(rel))
    rng = random.Random(args.seed)
    chosen: dict[str, list[Mutant]] = {}
    lo, hi = 0, 1 << 30
    if args.lines:
        try:
            lo, hi = (int(v) for v in args.lines.split("-"))
        except ValueError:
            ap.error(f"--lines wants A-B, got {args.lines!r}")
    for m in modules:
        ms = [x for x in mutants(m) if lo <= x.line <= hi]
        if args.max is not None and len(ms) > args.max:
            ms = sorted(rng.sample(ms, args.max), key=lambda x: x.index)
        chosen[m] = ms
    if args.sample is not None:
        pool = [x for ms in chosen.values() for x in ms]
        keep = {id(x) for x in rng.sample(pool, min(args.sample, len(pool)))}
        chosen = {m: [x for x in ms if id(x) in keep] for m, ms in chosen.items()}
    if args.list:
        for m, ms in chosen.items():
            print(f"{m}: {len(ms)} mutants")
            for x in ms:
                print(f"  {x.ident:<40} {x.what}")
        return 0
    if not args.tests:
        ap.error("--tests is required unless --list")

    def interrupted(signum, frame):  # Ctrl-C, or a kill: clean up like Ctrl-C (also in a background job,
        raise KeyboardInterrupt      # where the shell starts Python with SIGINT ignored)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="mutate-"))
    results: list[dict] = []
    try:
        root = make_copy(tmp / "repo")
        for m in modules:
            check_import_root(root, m)
        status, base = run_tests(root, args.tests, timeout=3600, extra=args.pytest_arg)
        if status != "passed":
            print(f"mutate: the tests fail without any mutant ({status}); fix them first", file=sys.stderr)
            return 2
        timeout = args.timeout or 4 * base + 30
        print(f"unmutated run: {base:.1f} s; timeout per mutant {timeout:.0f} s", flush=True)
        for m, ms in chosen.items():
            target = root / m
            original = target.read_text(encoding="utf-8")
            for x in ms:
                try:
                    target.write_text(x.source, encoding="utf-8")
                    status, secs = run_tests(root, args.tests, timeout, args.pytest_arg)
                finally:
                    target.write_text(original, encoding="utf-8")  # always restored, even on Ctrl-C
                verdict = "survived" if status == "passed" else "killed"
                results.append({"module": m, "mutant": x.ident, "line": x.line, "what": x.what,
                                "outcome": verdict, "tests": status, "seconds": round(secs, 1)})
                print(f"{verdict:<9}{x.ident:<44}{x.what}  ({status}, {secs:.0f} s)", flush=True)
    except KeyboardInterrupt:
        print("\nmutate: interrupted; the copy is removed, the working tree was never touched", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\nscore per module (killed / mutants run):")
    ok = True
    for m in modules:
        rs = [r for r in results if r["module"] == m]
        killed = sum(r["outcome"] == "killed" for r in rs)
        timeouts = sum(r["tests"] == "timeout" for r in rs)
        score = killed / len(rs) if rs else float("nan")
        ok &= not rs or score >= args.min_score
        print(f"  {m:<44} {killed:3d} / {len(rs):3d}  {100 * score:5.1f} %"
              + (f"  ({timeouts} by timeout)" if timeouts else ""))
    total = len(results)
    killed = sum(r["outcome"] == "killed" for r in results)
    if total:
        print(f"  {'all':<44} {killed:3d} / {total:3d}  {100 * killed / total:5.1f} %")
    survivors = [r for r in results if r["outcome"] == "survived"]
    if survivors:
        print("\nsurvivors (a missing test, or an equivalent mutant: say which):")
        for r in survivors:
            print(f"  {r['mutant']:<44}{r['what']}")
    if args.json:
        from glm52_backends.files import write_text
        write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


def run_known(args) -> int:
    """`--known`: every known mutant against its tests (or --tests); 0 when each is killed."""
    chosen = known_mutants(args.only.split(",") if args.only else None)
    if args.list:
        for k, m in chosen:
            print(f"  {k.name:<28} {m.module}:{m.line}  {k.why}\n  {'':<28} tests: {' '.join(args.tests or k.tests)}")
        return 0

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="mutate-"))
    results = []
    try:
        root = make_copy(tmp / "repo")
        for k, m in chosen:
            check_import_root(root, m.module)
            tests = list(args.tests or k.tests)
            status, base = run_tests(root, tests, timeout=3600, extra=args.pytest_arg)
            if status != "passed":
                print(f"mutate: {k.name}: its tests fail without the mutant ({status}); fix them first", file=sys.stderr)
                return 2
            target = root / m.module
            original = target.read_text(encoding="utf-8")
            try:
                target.write_text(m.source, encoding="utf-8")
                status, secs = run_tests(root, tests, args.timeout or 4 * base + 30, args.pytest_arg)
            finally:
                target.write_text(original, encoding="utf-8")
            verdict = "survived" if status == "passed" else "killed"
            results.append({"mutant": k.name, "module": m.module, "line": m.line, "outcome": verdict,
                            "tests": status, "seconds": round(secs, 1)})
            print(f"{verdict:<9}{k.name:<28}{m.module}:{m.line}  ({status}, {secs:.0f} s)", flush=True)
    except KeyboardInterrupt:
        print("\nmutate: interrupted; the copy is removed, the working tree was never touched", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    killed = sum(r["outcome"] == "killed" for r in results)
    print(f"\nknown mutants killed: {killed} / {len(results)}")
    if args.json:
        from glm52_backends.files import write_text
        write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `--list | head`
        sys.exit(0)
