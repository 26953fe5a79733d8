"""End-to-end conformance: the whole model on a backend against the float64 cpu_ref model.

Op-level cases cannot see what goes wrong only when the whole model runs: state a backend keeps
across the calls of a step, an MTP path that drafts from the wrong hidden state, a cache format read
with the wrong scale, per-op error that stays within each op's bound but compounds over the layers.
This suite runs the shipped trained default (the only checkpoint with real MTP acceptance) on the
backend and, on the same prompts, on cpu_ref in float64 with the same weight and cache formats
(quantized at load from the default's float weights, or, for `w8a8-static`, an msModelSlim folder
of the default with calibrated static attention), and judges each row (`ROWS`):

  logits      teacher-forced on the reference's own greedy sequences: max|out - ref| / max|ref| per
              position, its 99th percentile within `GROWTH` x the op-level bound of the row's dtype, weight format and cache format
              (tolerances.py), and the fraction of positions whose top-1 token agrees;
  greedy      the row's mode's tokens against the reference's plain greedy tokens: the first
              divergence is allowed only at a near-tie of the reference (the margin between its token
              and ours at most twice our measured logits error there, or `TIE_FLOOR` of the row's
              largest logit); in a dtype coarser than float32 tokens are reported, not required;
  acceptance  speculative rows: the mean acceptance length against the reference's for the same
              format, k and drafting rule, at least `ACCEPTANCE_RATIO` of it;
  sampled     (temperature 0.8, fixed seed) the reference's mean log-probability of our sampled tokens
              within `SAMPLED_NATS` of its own samples' (a distribution check, not token equality);
  degenerate  NaN/inf logits, no output where the reference has some, collapse to one token or a
              loop of period <= 3 that the reference does not show.

    from glm52_backends.conformance.e2e import run_e2e
    report = run_e2e("torch", quick=True)      # .passed, .to_json(), .to_markdown()
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from glm52_backends.backends.cpu_ref import CpuRefBackend
from glm52_backends.registry import BoundBackend, get_backend

from .model_case import _path
from .tolerances import format_tolerance, parse_dtype, tolerance

# Python source (what the default model was trained on), long enough that prompt + new tokens pass the
# indexer's top-k (64): the sparse selection, IndexShare and the index cache matter in every row
PROMPTS = (
    "import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Parse the command line and run.\"\"\"\n"
    "    if argv is None:\n        argv = sys.argv[1:]\n    for name in argv:\n        path = os.path.join(os.getcwd(), name)\n"
    "        if not os.path.exists(path):\n            print('missing:', path)\n            continue\n",
    "class Parser:\n    \"\"\"A small parser for key = value lines.\"\"\"\n\n    def __init__(self, text, strict=False):\n"
    "        self.text = text\n        self.strict = strict\n        self.items = {}\n\n    def parse(self):\n"
    "        for lineno, line in enumerate(self.text.splitlines(), 1):\n            line = line.strip()\n",
    "def _read(fp, size=-1):\n    data = fp.read(size)\n    if not isinstance(data, bytes):\n"
    "        raise TypeError('expected bytes, got %s' % type(data).__name__)\n    return data\n\n\n"
    "def copy(src, dst, length=16 * 1024):\n    while True:\n        buf = _read(src, length)\n",
    "    def __repr__(self):\n        return '%s(%r, %r)' % (self.__class__.__name__, self.name, self.value)\n\n"
    "    def __eq__(self, other):\n        if not isinstance(other, Item):\n            return NotImplemented\n"
    "        return self.name == other.name and self.value == other.value\n",
)
NEW_TOKENS = 24
# what a dense weight name means in each row's weights column: the format the model's linears run in
WEIGHT_FORMATS = {"none": None, "fp8": "fp8_block", "w8a8": "w8a8_dynamic", "w8a8-static": "w8a8_static",
                  "w4a8": "w4a8_dynamic"}
MODES = ("greedy", "chunked", "spec1", "spec2", "spec3", "adaptive", "sampled", "graph")

# thresholds, each with its reason (the e2e rows of the tolerance table)
GROWTH = {"float32": 2.0, "coarse": 8.0, "quantized": 16.0, "cache": 4.0}
GROWTH_WHY = ("float32: 2x the op bound (honest float32 backends land 1e-6..1e-5 of max|logit|, ~0.03x the op bound; a "
              "backend erring near its op bound in every op compounds past 2x); float16/bfloat16: 8x (the model's "
              "activations are rounded to the dtype between ops, ~60 ops); quantized weights or caches: 16x the "
              "format's one-code-step bound (an activation or cache code moves by one step wherever the float32 value "
              "sits at a rounding boundary the float64 one does not, in every quantized op of every layer); a quantized "
              "cache alone: 4x its format's bound (a row is quantized once and read by one op per layer, 4 layers; "
              "honest: int8 1e-5, fp8 1e-4 of max|logit|)")
LOGITS_QUANTILE = 0.99
LOGITS_QUANTILE_WHY = ("per position max|out - ref| / max|ref|, judged at its 99th percentile: under quantized "
                       "activations a code that moves by one step changes the next layers' inputs, so a few positions "
                       "err far more than the rest (float32 cpu_ref itself, w8a8: median 4e-7, p99 4.5e-3, max 5.8e-2); "
                       "a wrong backend errs at most positions. The max is reported")
TOP1_MIN = {"float32": 0.99, "other": 0.90}
TOP1_WHY = ("float32: a flip needs a near-tie (< 1 % of positions); coarser dtypes move logits by ~1e-2 "
            "and flip up to a few % of the positions")
TIE_FLOOR = 1e-4
TIE_WHY = ("a divergence is a near-tie when the reference's margin between its token and ours is at most "
           "2x our measured logits error at that position (both logits move by at most that; the error counted "
           "at most up to the row's logits bound), or 1e-4 of the row's largest logit")
ACCEPTANCE_RATIO = 0.9
ACCEPTANCE_WHY = ("a draft flips only at an MTP near-tie (rare: acceptance equal in every honest run here); a "
                  "broken MTP path (wrong hidden, wrong cache) drops the acceptance length toward 1.0")
SAMPLED_NATS = 0.5
SAMPLED_WHY = ("same seed and temperature: an honest backend's samples are the reference's or near them; "
               "0.5 nat per token below the reference's own mean log-probability is a different distribution")

THRESHOLDS = [("logits", "p99 over positions <= 2x (float32), 8x (float16/bfloat16), 16x (quantized weights), "
                          "4x (quantized cache) the op bound of the dtype / format", GROWTH_WHY),
              ("logits quantile", "99th percentile of the per-position error", LOGITS_QUANTILE_WHY),
              ("top-1", f">= {TOP1_MIN['float32']:.2f} (float32), >= {TOP1_MIN['other']:.2f} (coarser)", TOP1_WHY),
              ("greedy", "equal, or first divergence at a near-tie", TIE_WHY),
              ("acceptance", f">= {ACCEPTANCE_RATIO:.1f} x the reference's", ACCEPTANCE_WHY),
              ("sampled", f"mean log p >= reference's - {SAMPLED_NATS} nat", SAMPLED_WHY),
              ("degenerate", "none the reference does not show", "NaN/inf, empty, collapse, short loops")]


@dataclass(frozen=True)
class Row:
    weights: str = "none"      # WEIGHT_FORMATS key
    cache: str = "auto"        # kv_cache_dtype: "auto" (the model dtype), "fp8", "int8"
    mode: str = "greedy"       # MODES
    dtype: str = "float32"     # the model dtype on the backend ("native": its own 16-bit dtype, _half_dtype)

    @property
    def name(self) -> str:
        return f"{self.weights}/{self.cache}/{self.mode}/{self.dtype}"


def rows(quick: bool) -> list[Row]:
    """The catalogue: every mode on the float weights, the speculative and greedy rows of every weight
    and cache format, and the backend's own dtype. `quick` keeps one row per concern."""
    if quick:
        return [Row(), Row(mode="spec2"), Row(mode="adaptive"), Row(mode="graph"), Row(weights="fp8"),
                Row(weights="w8a8", mode="spec2"), Row(cache="int8", mode="spec2"), Row(dtype="native")]
    out = [Row(mode=m) for m in MODES]
    for w in ("fp8", "w8a8", "w8a8-static", "w4a8"):
        out += [Row(weights=w), Row(weights=w, mode="spec3")]
    for c in ("fp8", "int8"):
        out += [Row(cache=c), Row(cache=c, mode="spec3")]
    out += [Row(dtype="native"), Row(dtype="native", mode="spec3")]
    return out


@dataclass
class E2EResult:
    weights: str
    cache: str
    mode: str
    dtype: str
    passed: bool = False
    skipped: str = ""                  # why the row did not run here (e.g. no graph capture on this backend)
    logits_rel: float = float("nan")     # the LOGITS_QUANTILE of the per-position error (judged)
    logits_max: float = float("nan")     # the largest per-position error (reported)
    logits_bound: float = float("nan")
    top1: float = float("nan")
    greedy: str = "-"                  # "equal", "near-tie at r/p", "DIVERGES at r/p", "reported"
    acceptance: float | None = None
    ref_acceptance: float | None = None
    sampled_logp: float | None = None
    ref_sampled_logp: float | None = None
    degenerate: str = ""
    path: str = "-"
    seconds: float = 0.0
    detail: str = ""

    @property
    def name(self) -> str:
        return f"{self.weights}/{self.cache}/{self.mode}/{self.dtype}"

    def line(self) -> str:
        status = "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"
        acc = "" if self.acceptance is None else f" accept {self.acceptance:.2f} (ref {self.ref_acceptance:.2f})"
        return (f"{status} {self.name:<32} logits p99 {_num(self.logits_rel)} (<= {_num(self.logits_bound)}) "
                f"max {_num(self.logits_max)} "
                f"top1 {_num(self.top1, '.3f')} greedy {self.greedy}{acc} {self.seconds:5.1f} s  "
                f"{self.skipped or self.detail}").rstrip()


def _cell(text: str) -> str:
    """Text for a markdown table cell: its pipes escaped."""
    return text.replace("|", "\\|")


def _num(x, fmt: str = ".1e") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


@dataclass
class E2EReport:
    backend: str
    device: str
    scale: str                          # "quick" | "full" | "selected" (run_e2e(select=...))
    results: list[E2EResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        ran = [r for r in self.results if not r.skipped]
        return bool(ran) and all(r.passed for r in ran)

    @property
    def failures(self) -> list[E2EResult]:
        return [r for r in self.results if not r.skipped and not r.passed]

    def summary(self) -> str:
        ran = [r for r in self.results if not r.skipped]
        skipped = len(self.results) - len(ran)
        return (f"e2e conformance {self.backend} ({self.scale}, {self.device}): "
                f"{len(ran) - len(self.failures)} passed, {len(self.failures)} failed of {len(ran)} rows"
                f"{f', {skipped} skipped' if skipped else ''}; {self.seconds:.1f} s")

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"backend": self.backend, "device": self.device, "scale": self.scale, "passed": self.passed,
                "seconds": self.seconds, "thresholds": [dict(check=c, bound=b, reason=w) for c, b, w in THRESHOLDS],
                "results": [{k: clean(v) for k, v in asdict(r).items()} for r in self.results]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        lines = [f"# End-to-end conformance: {self.backend}", "", self.summary(), "",
                 "| weights | cache | mode | dtype | result | logits err p99 (bound) | max | top-1 | greedy | "
                 "acceptance (ref) | sampled log p (ref) | path | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---:|"]
        for r in self.results:
            res = "skip" if r.skipped else "pass" if r.passed else "**FAIL**"
            acc = "-" if r.acceptance is None else f"{r.acceptance:.2f} ({r.ref_acceptance:.2f})"
            smp = "-" if r.sampled_logp is None else f"{r.sampled_logp:.2f} ({r.ref_sampled_logp:.2f})"
            lines.append(f"| {r.weights} | {r.cache} | {r.mode} | {r.dtype} | {res} | {_num(r.logits_rel)} "
                         f"({_num(r.logits_bound)}) | {_num(r.logits_max)} | {_num(r.top1, '.3f')} | {r.greedy} | {acc} | {smp} | {r.path} | "
                         f"{r.seconds:.1f} |")
            if r.skipped or (not r.passed and r.detail):
                lines[-1] += f"\n| | | | | {(r.skipped or r.detail).replace('|', '/')} | | | | | | | | |"
        lines += ["", "| check | bound | reason |", "|---|---|---|"]
        lines += [f"| {_cell(c)} | {_cell(b)} | {_cell(w)} |" for c, b, w in THRESHOLDS]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return "\n".join([r.line() for r in self.results] + [self.summary()])


# ---- checkpoints and the reference -----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _static_checkpoint() -> str:
    """An msModelSlim W8A8 folder of the default model: attention projections static (calibrated on
    the float model), MLP and experts dynamic (the GLM-5 mixed recipe, make_tiny.ascendv1_tensors)."""
    from safetensors.torch import load_file

    from glm52_backends.devtools.make_tiny import ascendv1_tensors, write_safetensors
    from glm52_backends.loader import ASCEND_DESCRIPTION, default_checkpoint, load_config
    src = default_checkpoint()
    cfg = load_config(src)
    raw = load_file(os.path.join(src, "model.safetensors"))
    tensors, desc = ascendv1_tensors(cfg, "w8a8", seed=0, raw=raw)
    out = tempfile.mkdtemp(prefix="glm52-e2e-w8a8-static-")
    write_safetensors(out, tensors, 1, ascend=True)
    with open(os.path.join(out, ASCEND_DESCRIPTION), "w", encoding="utf-8") as f:
        json.dump(desc, f)
    for name in ("config.json", "tokenizer.json"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "wb") as b:
            b.write(a.read())
    return out


def _load(row: Row, backend: Any, dtype: torch.dtype):
    from glm52_backends import GLM52, default_checkpoint
    if row.weights == "w8a8-static":
        path, quant = _static_checkpoint(), None
    else:
        path, quant = default_checkpoint(), row.weights
    return GLM52(path, backend=backend, dtype=dtype, quantization=quant, kv_cache_dtype=row.cache, progress=False)


def _gen_kwargs(mode: str) -> dict:
    return {"greedy": {}, "graph": {}, "chunked": {"prefill_chunk": 5}, "spec1": {"speculative": 1},
            "spec2": {"speculative": 2}, "spec3": {"speculative": 3},
            "adaptive": {"speculative": 3, "adaptive": True},
            "sampled": {"temperature": 0.8, "seed": 1234}}[mode]


class _Reference:
    """The float64 cpu_ref model of one (weights, cache) pair, and what the rows compare against."""

    def __init__(self, weights: str, cache: str):
        self.model = _load(Row(weights, cache), CpuRefBackend(torch.float64), torch.float64)
        self.prompts = self.model.encode_prompts(list(PROMPTS))
        self.greedy = self.model.generate(self.prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False).tokens
        self.seqs = [p + t for p, t in zip(self.prompts, self.greedy)]
        self.logits = [x.double() for x in self.model(self.seqs)]
        self._acc: dict[str, float] = {}
        self._sampled: tuple[list[list[int]], float] | None = None

    def acceptance(self, mode: str) -> float:
        if mode not in self._acc:
            res = self.model.generate(self.prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False, **_gen_kwargs(mode))
            self._acc[mode] = float(res.stats["mean_acceptance_length"])
        return self._acc[mode]

    def logp(self, tokens: list[list[int]]) -> float:
        """Mean log-probability per generated token under this model (temperature 0.8, as sampled)."""
        seqs = [p + t for p, t in zip(self.prompts, tokens)]
        total, n = 0.0, 0
        for p, s, lg in zip(self.prompts, seqs, self.model(seqs)):
            lp = torch.log_softmax(lg.double() / 0.8, -1)
            for j in range(len(p), len(s)):
                total += float(lp[j - 1, s[j]])
                n += 1
        return total / max(n, 1)

    def sampled(self) -> tuple[list[list[int]], float]:
        if self._sampled is None:
            toks = self.model.generate(self.prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False,
                                       **_gen_kwargs("sampled")).tokens
            self._sampled = (toks, self.logp(toks))
        return self._sampled


@functools.lru_cache(maxsize=8)
def reference(weights: str, cache: str) -> _Reference:
    return _Reference(weights, cache)


# ---- judging ---------------------------------------------------------------------------------------
def _degenerate(toks: list[list[int]], ref: list[list[int]]) -> str:
    def flags(seq: list[int]) -> set[str]:
        out = set()
        if not seq:
            out.add("empty")
        elif len(seq) >= 8 and len(set(seq)) == 1:
            out.add("collapse")
        tail = seq[-12:]
        if len(tail) == 12 and any(all(tail[i] == tail[i - p] for i in range(p, 12)) for p in (1, 2, 3)):
            out.add("loop")
        return out
    bad = []
    for r, (a, b) in enumerate(zip(toks, ref)):
        extra = flags(a) - flags(b)
        if extra:
            bad.append(f"request {r}: {', '.join(sorted(extra))}")
    return "; ".join(bad)


def _first_divergence(got: list[list[int]], want: list[list[int]]) -> tuple[int, int] | None:
    for r, (a, b) in enumerate(zip(got, want)):
        for j in range(max(len(a), len(b))):
            if j >= len(a) or j >= len(b) or a[j] != b[j]:
                return r, j
    return None


# a quantized cache's code step, as the format rows of the tolerance table budget it
CACHE_FORMAT_ROWS = {"fp8": "fp8_block", "int8": "w8a8_dynamic"}


def _bound(row: Row, dtype: torch.dtype) -> float:
    """The row's logits bound: its dtype's op bound x GROWTH, or its quantized weight / cache format's."""
    bound = tolerance(dtype).tol * GROWTH["float32" if dtype == torch.float32 else "coarse"]
    for fmt, growth in ((WEIGHT_FORMATS[row.weights], GROWTH["quantized"]), (CACHE_FORMAT_ROWS.get(row.cache), GROWTH["cache"])):
        if fmt is not None:
            bound = max(bound, format_tolerance(fmt).tol * growth)
    return bound


def _half_dtype(caps) -> torch.dtype | None:
    """The row dtype "native": the backend's own 16-bit dtype (its default when that is one, else
    bfloat16 or float16 where it runs them)."""
    default = caps.get("default_dtype")
    if default in (torch.bfloat16, torch.float16):
        return default
    runs = caps.get("dtypes", ())
    return next((d for d in (torch.bfloat16, torch.float16) if d in runs), None)


def run_row(bound: BoundBackend, row: Row) -> E2EResult:
    caps = bound.capabilities
    dtype = _half_dtype(caps) if row.dtype == "native" else parse_dtype(row.dtype)
    dname = str(dtype).removeprefix("torch.") if dtype is not None else "none"
    res = E2EResult(row.weights, row.cache, row.mode, dname)
    if dtype is None:
        res.skipped = "the backend runs neither bfloat16 nor float16"
        return res
    if dtype not in caps.get("dtypes", (torch.float32,)):
        res.skipped = f"the backend does not run {dname}"
        return res
    t0 = time.perf_counter()
    try:
        ref = reference(row.weights, row.cache)
        model = _load(row, BoundBackend(bound.backend, debug=bound.debug), dtype)    # this row's op counters
        exact = dtype == torch.float32
        # logits, teacher-forced on the reference's greedy sequences
        got = [x.double().cpu() for x in model(ref.seqs)]
        if any(not torch.isfinite(x).all() for x in got):
            res.degenerate = "NaN/inf logits"
        err = [(a - b).abs() for a, b in zip(got, ref.logits)]
        scale = max(float(b.abs().max()) for b in ref.logits)
        per_position = torch.cat([e.amax(-1) for e in err]) / scale
        res.logits_rel = float(torch.quantile(per_position, LOGITS_QUANTILE))
        res.logits_max = float(per_position.max())
        res.logits_bound = _bound(row, dtype)
        agree = [(a.argmax(-1) == b.argmax(-1)).double() for a, b in zip(got, ref.logits)]
        res.top1 = float(torch.cat(agree).mean())
        top1_min = TOP1_MIN["float32" if exact else "other"]
        fails = []
        if not res.logits_rel <= res.logits_bound:
            fails.append(f"logits error {res.logits_rel:.2e} (p99 over positions) > {res.logits_bound:.2e}")
        if not res.top1 >= top1_min:
            fails.append(f"top-1 agreement {res.top1:.3f} < {top1_min}")
        # the row's mode
        kw = _gen_kwargs(row.mode)
        if row.mode == "graph":
            from glm52_backends.engine.graph import GraphUnavailable
            try:
                out = model.generate(ref.prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False,
                                     graph="trace" if model.device.type == "cpu" else True)
            except GraphUnavailable as e:
                res.skipped = f"no graph capture on this backend here: {e}"
                res.seconds = time.perf_counter() - t0
                return res
        else:
            out = model.generate(ref.prompts, max_new_tokens=NEW_TOKENS, stop_at_eos=False, **kw)
        toks = out.tokens
        if row.mode == "sampled":
            rtoks, rlp = ref.sampled()
            res.sampled_logp, res.ref_sampled_logp = ref.logp(toks), rlp
            res.greedy = "equal" if toks == rtoks else "differs (sampled)"
            if res.sampled_logp < rlp - SAMPLED_NATS:
                fails.append(f"sampled tokens' mean log p {res.sampled_logp:.2f} < reference's {rlp:.2f} - "
                             f"{SAMPLED_NATS}")
            deg = _degenerate(toks, rtoks)
        else:
            div = _first_divergence(toks, ref.greedy)
            if div is None:
                res.greedy = "equal"
            else:
                r, j = div
                p = len(ref.prompts[r]) + j - 1            # the logits row that chose token j
                want_lg = ref.logits[r][p]
                ours = toks[r][j] if j < len(toks[r]) else None
                margin = float(want_lg.max() - want_lg[ours]) if ours is not None else math.inf
                ours_err = min(float(err[r][p].max()), res.logits_bound * scale)     # a wrong backend excuses nothing
                tie = margin <= max(2 * ours_err, TIE_FLOOR * float(want_lg.abs().max()))
                if tie:
                    res.greedy = f"near-tie at {r}/{j}"
                elif exact:
                    res.greedy = f"DIVERGES at {r}/{j}"
                    fails.append(f"request {r} diverges at token {j} with a reference margin of {margin:.3g} "
                                 f"(our logits error there {float(err[r][p].max()):.3g})")
                else:
                    res.greedy = f"differs at {r}/{j} (reported)"
            deg = _degenerate(toks, ref.greedy)
        if deg:
            res.degenerate = "; ".join(x for x in (res.degenerate, deg) if x)
        if res.degenerate:
            fails.append(f"degenerate output: {res.degenerate}")
        if "speculative" in kw:
            res.acceptance = float(out.stats["mean_acceptance_length"])
            res.ref_acceptance = ref.acceptance(row.mode)
            if not res.acceptance >= ACCEPTANCE_RATIO * res.ref_acceptance:
                fails.append(f"MTP acceptance length {res.acceptance:.2f} < {ACCEPTANCE_RATIO} x the reference's "
                             f"{res.ref_acceptance:.2f}")
        res.path = _path(model.ops.ran_natively())
        res.passed = not fails
        res.detail = "; ".join(fails)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a crash (sys.exit too) is a failed row, with its cause
        res.passed, res.detail = False, (f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else
                                         f"the backend called sys.exit({e.code!r}) (it must raise, not end the process)")
    res.seconds = time.perf_counter() - t0
    return res


def run_e2e(backend: Any = "cpu_ref", quick: bool = False, *, select: list[Row] | None = None,
            progress: bool = False) -> E2EReport:
    """Run the e2e rows (`rows(quick)`, or `select`) of `backend` (a name, a backend object or a
    `BoundBackend`) against the float64 reference. Returns an `E2EReport`."""
    bound = get_backend(backend)
    device = str(getattr(bound.backend, "device", None) or "cpu")
    report = E2EReport(bound.name, device, "selected" if select is not None else "quick" if quick else "full")
    t0 = time.perf_counter()
    for row in (select if select is not None else rows(quick)):
        r = run_row(bound, row)
        report.results.append(r)
        if progress:
            print(r.line(), flush=True)
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["run_e2e", "run_row", "rows", "Row", "E2EResult", "E2EReport", "THRESHOLDS", "reference"]
