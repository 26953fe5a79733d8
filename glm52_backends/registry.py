"""Backend registry: entry points + run-time registration, lazy loading, per-op fallback.

A backend is any object with one method per op it implements (names in `ops.OP_NAMES`), plus
optional `name`, `priority` (higher wins under `auto`), `capabilities` (`ops.Capabilities` or a
dict), `opaque_ops` and `comm` (see `ops/protocol.py`). Every native op's signature is
checked against the contract (`ops.check_signature`) when the backend is bound: a backend whose op
does not match is refused with the op and the difference named. Built-ins register
through the `glm52_backends.backends` entry-point group exactly like a vendor package; nothing is
imported until a backend is asked for, so `import glm52_backends` imports neither triton nor
torch_npu.

This module is the boundary between the model and a backend, checked in both directions:
  - what a factory returns must be a backend (None, a number, a string, ... are refused, naming
    the factory); a factory that raises, or calls `sys.exit`, makes that backend unavailable, never
    the process exit (`glm52 backends` lists it with the reason);
  - every native op's output is checked against the contract (tuple arity, shape, dtype, device:
    each op's `check_output` in ops/<op>.py; metadata only, always on) and an exception from inside an op gets a note
    naming backend, op and layer; a wrong output raises `BackendOutputError` with the same names;
  - with `GLM52_DEBUG=1` (or `BoundBackend(..., debug=True)`) every op's output, native or
    fallback, is also checked for NaN/inf, which finds the first op that produced one.
The layer in these messages comes from `BoundBackend.at_layer(l)`, which the network sets per
layer; without it the messages say "layer unknown".

`BoundBackend`'s ops are typed: each is a class attribute `OpSlot(<the contract's reference>)`, so a
static tool follows `bound.sparse_mla(...)` to `ops/sparse_mla.py` and checks its arguments there.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, ParamSpec, TypeVar, overload

from . import ops
from .ops import (CACHE_FORMAT_OF, NEG_INF_OUTPUTS, OP_NAMES, OUTPUT_CHECKS, REFERENCES, WEIGHT_ARGS, Capabilities,
                  OpUnsupported, check_signature, signature)
from .ops._checks import arg

log = logging.getLogger("glm52_backends")

ENTRY_POINT_GROUP = "glm52_backends.backends"
_RUNTIME: dict[str, Callable[..., Any]] = {}


class BackendUnavailable(RuntimeError):
    """A backend asked for by name that cannot load here; the message says why and what to install."""


class BackendContractError(BackendUnavailable):
    """A backend whose op does not match the contract's signature (the message names op and difference)."""


class BackendOutputError(RuntimeError):
    """A backend op whose output breaks the contract (shape, dtype, device, NaN/inf in debug mode);
    the message names the backend, the op and the layer."""


_NOT_BACKENDS = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def check_backend(backend: Any, source: str = "") -> None:
    """Raise `BackendContractError` for something that is not a backend (None, a number, a string,
    a container, a class), a non-string `name`, capabilities that cannot be read, or a native op
    whose signature differs from the contract (every such op named). `source` names where the
    object came from, e.g. "the factory of backend 'x'"."""
    if isinstance(backend, _NOT_BACKENDS) or isinstance(backend, type):
        what = f"the class {backend.__name__} (pass an instance)" if isinstance(backend, type) else \
            f"{type(backend).__name__} {_short(backend)}"
        raise BackendContractError(f"{source + ' returned ' if source else ''}{what}, which is not a backend "
                                   f"object: a backend has the contract's ops as methods (glm52_backends/ops/"
                                   f"protocol.py)")
    name = getattr(backend, "name", type(backend).__name__)
    if not isinstance(name, str) or not name:
        raise BackendContractError(f"{source or 'a backend'}: its 'name' must be a non-empty string, got {name!r}")
    try:
        Capabilities.coerce(getattr(backend, "capabilities", None))
    except Exception as e:  # noqa: BLE001 - any unreadable capabilities are named
        raise BackendContractError(f"backend {name!r}: cannot read its capabilities "
                                   f"({type(e).__name__}: {e})") from None
    bad = []
    for op in OP_NAMES:
        fn = getattr(backend, op, None)
        if callable(fn):
            why = check_signature(op, fn)
            if why:
                bad.append(f"{op}: {why} (contract: {op}{signature(op)})")
    if bad:
        raise BackendContractError(f"backend {name!r} does not match the op contract: " + "; ".join(bad))


def register_backend(name: str, factory: Callable[..., Any], *, overwrite: bool = True) -> None:
    """Register `factory` (a zero-argument callable returning a backend object) under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for backend {name!r} must be callable, got {type(factory).__name__}")
    if name in _RUNTIME and not overwrite:
        raise ValueError(f"backend {name!r} is already registered")
    _RUNTIME[name] = factory


def unregister_backend(name: str) -> None:
    _RUNTIME.pop(name, None)


def _entry_point_factories() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.load)  # ep.load imports the module: call it only when asked
    return found


def _factories() -> dict[str, tuple[str, Callable[[], Callable[..., Any]]]]:
    """name -> (source, loader returning the factory). Run-time registrations override entry points."""
    out = {name: ("entry point", load) for name, load in _entry_point_factories().items()}
    for name, fac in _RUNTIME.items():
        out[name] = ("runtime", lambda fac=fac: fac)
    return out


def declared_preparation(name: str) -> Callable[..., dict] | None:
    """What backend `name` declares its load-time preparation (`prepare_weight`) allocates besides each
    weight's own tensors: its factory's `prepared_parts(fmt, shape, activation dtype) -> {part: (shape,
    dtype)}`, read without creating the backend (no device needed: `glm52 plan` on any machine). None
    when the backend declares nothing, or is "auto" or unknown."""
    fn = _declared(name, "prepared_parts")
    return fn if callable(fn) else None


def declared_sparse_mla_lse(name: str) -> bool:
    """Whether backend `name`'s sparse_mla returns the log-sum-exp natively (`Capabilities.sparse_mla_lse`),
    as its factory declares it (`factory.sparse_mla_lse`), read without creating the backend; True when
    it declares nothing."""
    return _declared(name, "sparse_mla_lse") is not False


def _declared(name: str, attr: str) -> Any:
    """An attribute backend `name`'s factory declares (None: none, or the backend is unknown / unloadable)."""
    facs = _factories()
    if name not in facs:
        return None
    try:
        return getattr(facs[name][1](), attr, None)
    except Exception:  # noqa: BLE001 - an unloadable plugin declares nothing; get_backend reports why
        return None


def _instantiate(name: str, **kwargs) -> Any:
    facs = _factories()
    if name not in facs:
        raise BackendUnavailable(
            f"unknown backend {name!r}; registered: {', '.join(sorted(facs)) or 'none'}. "
            f"Vendor packages register through the entry-point group {ENTRY_POINT_GROUP!r}; "
            f"`pip install -e .` makes the built-ins visible.")
    try:
        backend = facs[name][1]()(**kwargs)
    except BackendUnavailable:
        raise
    except SystemExit as e:  # a plugin must not end the process (`glm52 backends` lists the others)
        raise BackendUnavailable(f"backend {name!r} cannot load: its factory or module called "
                                 f"sys.exit({e.code!r})") from None
    except Exception as e:  # noqa: BLE001 - any failure to load is reported with its cause
        raise BackendUnavailable(f"backend {name!r} cannot load: {type(e).__name__}: {e}") from e
    if backend is None:
        raise BackendContractError(f"backend {name!r}: its factory returned None instead of a backend object")
    missing_name = getattr(backend, "name", None)
    if missing_name is None and not isinstance(backend, _NOT_BACKENDS):
        try:
            backend.name = name
        except AttributeError:
            pass
    check_backend(backend, f"the factory of backend {name!r}")
    return backend


class _Reference:
    """The reference ops in float32: the fallback of every backend (the core never imports a backend)."""
    name = "reference"

    def __init__(self):
        import functools

        import torch
        for op, fn in REFERENCES.items():
            setattr(self, op, functools.partial(fn, cdt=torch.float32))


# ---- the output contract ---------------------------------------------------------------------------
# Each op's output check, cache format and weight arguments are declared in its contract file
# (glm52_backends/ops/<op>.py) and collected in `ops` (OUTPUT_CHECKS, CACHE_FORMAT_OF, WEIGHT_ARGS).
# A backend that does not list a cache's format in `Capabilities.cache_formats`, or a weight's format
# in `Capabilities.weight_formats`, gets the reference for that call, exactly as for an op it declines.
def _weight_format(w: Any) -> str:
    return getattr(w, "format", "dense")


def _non_finite(op: str, out: Any) -> str | None:
    """NaN/inf in a float output (an output the op declares in NEG_INF_OUTPUTS, e.g. sparse_mla's lse,
    may be -inf: a row with nothing to attend)."""
    import torch
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    neg_inf = NEG_INF_OUTPUTS.get(op, {})
    for i, t in enumerate(outs):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        bad = (torch.isnan(t) | torch.isposinf(t)) if i in neg_inf else ~torch.isfinite(t)
        n = int(bad.sum())
        if n:
            what = neg_inf[i] if i in neg_inf else "the output" if len(outs) == 1 else f"output {i}"
            return f"{what} holds {n} NaN/inf value(s) of {t.numel()}"
    return None


def debug_enabled() -> bool:
    """GLM52_DEBUG set to anything but '', '0', 'false', 'no': finiteness after every op."""
    return os.environ.get("GLM52_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


class _LayerScope:
    """What `BoundBackend.at_layer` returns: usable as a plain call or as a `with` block."""

    def __init__(self, bound: "BoundBackend", prev: Any):
        self.bound, self.prev = bound, prev

    def __enter__(self) -> "_LayerScope":
        return self

    def __exit__(self, *exc) -> None:
        self.bound.layer = self.prev


class _LibraryScope:
    """What `BoundBackend.through_library` returns: sets `library_calls` for a `with` block."""

    def __init__(self, bound: "BoundBackend"):
        self.bound, self.prev = bound, bound.library_calls

    def __enter__(self) -> "_LibraryScope":
        self.bound.library_calls = True
        return self

    def __exit__(self, *exc) -> None:
        self.bound.library_calls = self.prev


P = ParamSpec("P")
R = TypeVar("R")


class OpSlot(Generic[P, R]):
    """One op of `BoundBackend`, declared on the class from the contract's reference function:
    `sparse_mla = OpSlot(ops.sparse_mla)`. For static tools (pyright, mypy, an IDE) `bound.sparse_mla`
    then has the reference's parameters and return type, and go-to-definition lands in ops/<op>.py.

    At run time, `bound.<op>` is the dispatcher `BoundBackend._make(op)` builds (native or reference,
    with the contract's checks). `BoundBackend.__init__` binds every op once and the slot caches the
    dispatcher in the instance's `__dict__`, so a call costs one plain attribute lookup. The slot
    defines only `__get__` (a non-data descriptor): assigning `bound.<op> = f` shadows it on that
    instance (tests and workers wrap ops this way) and `del bound.<op>` goes back to the dispatcher.
    On the class, `BoundBackend.<op>` is the slot itself (`.reference`, `.name`).

    The static type is the reference's, which includes its reference-only keyword `cdt`
    (`ops.REFERENCE_ONLY`, the reference's compute dtype): not part of the contract, never passed by
    the model, and not accepted by a backend's native op; pass only the contract's arguments.
    """

    __slots__ = ("reference", "name")

    def __init__(self, reference: Callable[P, R]) -> None:
        self.reference = reference
        self.name: str = getattr(reference, "__name__", "")

    def __set_name__(self, owner: type, name: str) -> None:
        if name != self.name:
            raise TypeError(f"{owner.__name__}.{name} = OpSlot({self.name or self.reference!r}): an op's slot "
                            f"must carry that op's reference (ops.{name})")

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> OpSlot[P, R]: ...

    @overload
    def __get__(self, obj: BoundBackend, owner: type | None = None) -> Callable[P, R]: ...

    def __get__(self, obj: BoundBackend | None, owner: type | None = None) -> Callable[P, R] | OpSlot[P, R]:
        if obj is None:
            return self
        fn = obj._make(self.name)
        obj.__dict__[self.name] = fn    # cached: later lookups find the instance attribute, not the slot
        return fn

    def __repr__(self) -> str:
        return f"OpSlot({self.name})"


class BoundBackend:
    """A backend with every op of the contract: native where it has one, reference otherwise.

    A missing op, or a native op that raises `OpUnsupported` for some input, runs the reference
    on the same tensors with one warning per (backend, op). `calls` counts native and fallback
    calls per op, which is what reports mean by "ran natively". Every native output is checked
    against the contract (`BackendOutputError` naming backend, op and layer); `debug` (default:
    the GLM52_DEBUG environment variable) also checks every output for NaN/inf.

    Each op is an `OpSlot` typed as the contract's reference (its parameters, its docs in ops/<op>.py).
    """

    # ---- the ops of the contract (ops.OP_NAMES), one slot each; tests/test_contract.py checks the set ----
    indexer_topk = OpSlot(ops.indexer_topk)
    sparse_mla = OpSlot(ops.sparse_mla)
    moe_experts = OpSlot(ops.moe_experts)
    mtp_verify = OpSlot(ops.mtp_verify)
    moe_route = OpSlot(ops.moe_route)
    rms_norm = OpSlot(ops.rms_norm)
    layer_norm = OpSlot(ops.layer_norm)
    rope = OpSlot(ops.rope)
    linear = OpSlot(ops.linear)
    mlp = OpSlot(ops.mlp)

    def __init__(self, backend: Any, reference: Any | None = None, *, debug: bool | None = None):
        check_backend(backend)
        if reference is None:
            reference = _Reference()
        self.backend = backend
        self.reference = reference
        self.name: str = getattr(backend, "name", type(backend).__name__)
        self.native_ops = tuple(op for op in OP_NAMES if callable(getattr(backend, op, None)))
        self.calls: dict[str, dict[str, int]] = {op: {"native": 0, "fallback": 0} for op in OP_NAMES}
        self.debug = debug_enabled() if debug is None else bool(debug)
        self.layer: Any = None  # set per layer by the network (`at_layer`); None = unknown
        self._warned: set[str] = set()
        # while True, ops run through their torch.library custom ops (torch.ops.glm52.<op>.<overload>):
        # set by graph capture and tracing (`through_library`), so a graph records one node per op
        self.library_calls = False
        self._library: tuple[str, int] | None = None          # (overload, instance), made on first use
        for op in OP_NAMES:     # bind every op now (its slot caches the dispatcher on this instance)
            getattr(self, op)
        if not self.native_ops and not isinstance(backend, _Reference):
            msg = (f"backend {self.name!r} implements none of the contract's ops: everything runs on the "
                   f"reference (conformance fails such a backend: nothing of it would be tested)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)

    def at_layer(self, layer: Any) -> _LayerScope:
        """Name `layer` in the errors of the ops that follow: `ops.at_layer(l)`, or
        `with ops.at_layer(l): ...` to restore the previous one afterwards."""
        scope = _LayerScope(self, self.layer)
        self.layer = layer
        return scope

    def native_fn(self, op: str) -> Callable[..., Any]:
        """The backend's own function for `op` (what its custom-op overload calls)."""
        return getattr(self.backend, op)

    def through_library(self) -> "_LibraryScope":
        """`with ops.through_library(): ...`: calls in the block go through the ops' custom ops
        (ops/library.py), so make_fx / torch.compile / graph capture see one `glm52::` node per op."""
        return _LibraryScope(self)

    def library_op(self, op: str) -> tuple[str, int]:
        """(overload, instance) of this backend's custom ops, registering them on first use."""
        if self._library is None:
            from .ops import library
            self._library = library.register(self, self.native_ops,
                                             opaque=bool(getattr(self.backend, "opaque_ops", True)),
                                             triton=bool(getattr(self.backend, "triton_ops", False)))
        return self._library

    def _run(self, op: str, fn: Callable[..., Any], args: tuple, kwargs: dict, native: bool) -> Any:
        """`fn(*args, **kwargs)`, through the custom op while `library_calls` is set."""
        if self.library_calls and (native or isinstance(self.reference, _Reference)):
            from .ops import library
            overload, instance = self.library_op(op) if native else ("default", 0)
            try:
                flat = library.flatten(op, args, kwargs)
            except TypeError:
                return fn(*args, **kwargs)          # arguments outside the schema: a direct call
            return library.from_schema_result(
                op, library.packet(op, overload)(*flat, instance=instance), kwargs)
        return fn(*args, **kwargs)

    def expert_collectives(self, comms: Any, layout: Any) -> Any:
        """The collectives expert parallelism dispatches through, set up once with the process groups:
        the backend's own (`backend.setup_parallel(comms, layout)` returning a `Collectives` with its
        `moe_dispatch` / `moe_combine`, e.g. Ascend's MC2) or torch.distributed's all-to-all over every
        rank (`comms.world`). The hook also hands the backend the groups (tp, dp, world) it may need."""
        hook = getattr(self.backend, "setup_parallel", None)
        own = hook(comms, layout) if callable(hook) else None
        if own is None:
            return comms.world
        from .ops.comm import Collectives
        if not isinstance(own, Collectives) or own.world_size != comms.world.world_size:
            raise BackendContractError(
                f"backend {self.name!r}: setup_parallel returned {type(own).__name__}; expected None or a "
                f"Collectives over all {comms.world.world_size} ranks (ops/comm.py) for the expert dispatch")
        return own

    def prepare_weight(self, name: str, weight: Any, *, dtype: Any) -> Any:
        """The backend's load-time preparation of one weight (`backend.prepare_weight(name, weight,
        dtype=)`, optional: e.g. scales in the form its kernels take), called once per weight after
        loading and sharding. The result must be a `Weight` of the same logical shape and format, or
        the weight itself; anything else is refused, naming the backend and the weight."""
        hook = getattr(self.backend, "prepare_weight", None)
        if not callable(hook):
            return weight
        from .weights import Weight
        out = hook(name, weight, dtype=dtype)
        if out is weight:
            return weight
        if not isinstance(out, Weight) or not isinstance(weight, Weight) or tuple(out.shape) != tuple(weight.shape) \
                or out.format != weight.format:
            raise BackendContractError(
                f"backend {self.name!r}: prepare_weight({name!r}) returned {type(out).__name__} "
                f"{tuple(getattr(out, 'shape', ()))} {getattr(out, 'format', '')!r}; expected a Weight of shape "
                f"{tuple(weight.shape)} in format {getattr(weight, 'format', 'dense')!r}")
        return out

    def where(self, op: str) -> str:
        """'backend 'x', op linear, layer 3' for messages."""
        layer = "layer unknown" if self.layer is None else f"layer {self.layer}"
        return f"backend {self.name!r}, op {op}, {layer}"

    def _warn(self, op: str, why: str) -> None:
        if op not in self._warned:
            self._warned.add(op)
            msg = f"backend {self.name!r}: {op} falls back to the reference ({why})"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)

    def _note(self, e: BaseException, op: str, path: str) -> None:
        note = f"raised in {self.where(op)} ({path})"
        if hasattr(e, "add_note"):
            e.add_note(note)
        else:  # Python 3.10: kept where the CLI reads it
            e.__notes__ = [*getattr(e, "__notes__", []), note]

    def _check(self, op: str, args: tuple, kwargs: dict, out: Any, path: str) -> None:
        why = None
        if path == "native":
            try:
                why = OUTPUT_CHECKS[op](args, kwargs, out)
            except (AttributeError, TypeError, ValueError, IndexError):
                why = None  # inputs outside the contract that the op accepted: nothing to compare against
        if why is None and self.debug:
            why = _non_finite(op, out)
        if why is not None:
            raise BackendOutputError(f"{self.where(op)} ({path}): {why} (the contract: glm52_backends/ops/{op}.py)")

    def _make(self, op: str) -> Callable[..., Any]:
        ref = getattr(self.reference, op)
        native = getattr(self.backend, op, None) if op in self.native_ops else None
        counts = self.calls[op]

        def fallback(args, kwargs):
            counts["fallback"] += 1
            try:
                out = self._run(op, ref, args, kwargs, False)
            except SystemExit as e:
                raise BackendOutputError(f"{self.where(op)} (reference fallback): called sys.exit({e.code!r}); "
                                         f"an op must raise, not end the process") from None
            except Exception as e:
                self._note(e, op, "reference fallback")
                raise
            if self.debug:
                self._check(op, args, kwargs, out, "reference fallback")
            return out

        cache_format = None if isinstance(self.backend, _Reference) else CACHE_FORMAT_OF.get(op)
        readable = tuple(dict.fromkeys(("dense",) + tuple(self.capabilities.cache_formats)))
        weight_args = None if isinstance(self.backend, _Reference) else WEIGHT_ARGS.get(op)
        runs = tuple(dict.fromkeys(("dense",) + tuple(self.capabilities.weight_formats)))
        if native is None:
            def call(*args, **kwargs):
                self._warn(op, "not implemented by this backend")
                return fallback(args, kwargs)
        else:
            def call(*args, **kwargs):
                if cache_format is not None:       # a cache in a format the backend does not read
                    fmt = cache_format(args, kwargs)
                    if fmt not in readable:
                        self._warn(op, f"the cache is {fmt!r}; the backend reads {', '.join(readable)}")
                        return fallback(args, kwargs)
                if weight_args is not None:        # a weight in a format the backend does not run
                    for i, name in weight_args:
                        fmt = _weight_format(arg(args, kwargs, i, name))
                        if fmt not in runs:
                            self._warn(op, f"weight {name} is {fmt!r}; the backend runs {', '.join(runs)} "
                                           f"(Capabilities.weight_formats)")
                            return fallback(args, kwargs)
                try:
                    out = self._run(op, native, args, kwargs, True)
                except OpUnsupported as e:
                    self._warn(op, f"declined: {e}")
                    return fallback(args, kwargs)
                except SystemExit as e:     # a plugin's op must not end the process; name it and its layer
                    raise BackendOutputError(f"{self.where(op)} (native): called sys.exit({e.code!r}); a backend "
                                             f"must raise, not end the process") from None
                except Exception as e:
                    self._note(e, op, "native")
                    raise
                self._check(op, args, kwargs, out, "native")
                counts["native"] += 1
                return out
        call.__name__ = op
        return call

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities.coerce(getattr(self.backend, "capabilities", None))

    @property
    def comm(self):
        """The backend's collectives if it brings its own, else torch.distributed's / one device's."""
        from .ops.comm import default_collectives
        return getattr(self.backend, "comm", None) or default_collectives()

    def ran_natively(self) -> dict[str, str]:
        """op -> 'native' | 'fallback' | 'mixed' | 'unused' for the calls made so far."""
        out = {}
        for op, c in self.calls.items():
            n, f = c["native"], c["fallback"]
            out[op] = "unused" if n + f == 0 else "native" if f == 0 else "fallback" if n == 0 else "mixed"
        return out

    def __repr__(self) -> str:
        return f"BoundBackend({self.name!r}, native={list(self.native_ops)})"


def get_backend(name: str | Any = "auto", **kwargs) -> BoundBackend:
    """A ready backend. `name` is a registered name, "auto", or a backend object."""
    if isinstance(name, BoundBackend):
        return name
    if not isinstance(name, str):
        if name is None:
            raise BackendContractError("backend=None: give a registered name, 'auto', or a backend object")
        return BoundBackend(name)
    if not name:
        raise BackendUnavailable("backend '': give a registered name or 'auto'")
    if name != "auto":
        return BoundBackend(_instantiate(name, **kwargs))
    candidates = []
    for cand in _factories():
        try:
            b = _instantiate(cand, **kwargs) if cand == "cpu_ref" else _instantiate(cand)
        except BackendUnavailable as e:
            log.info("auto: skipping backend %r (%s)", cand, e)
            continue
        candidates.append((getattr(b, "priority", 0), cand, b))
    if not candidates:
        raise BackendUnavailable("no backend could load; `pip install -e .` registers cpu_ref")
    candidates.sort(key=lambda c: (-c[0], c[1]))
    _, chosen, b = candidates[0]
    log.info("auto: chose backend %r", chosen)
    return BoundBackend(b)


@dataclass
class BackendInfo:
    name: str
    available: bool
    source: str
    reason: str = ""
    native_ops: list[str] = field(default_factory=list)
    priority: int = 0
    label: str = ""  # the name reports use, e.g. "ascend (emulated)"


def list_backends() -> list[BackendInfo]:
    """Every registered backend, whether it loads here, and if not, why."""
    out = []
    for name, (source, _) in sorted(_factories().items()):
        try:
            b = _instantiate(name)
        except BackendUnavailable as e:
            out.append(BackendInfo(name, False, source, reason=str(e)))
            continue
        out.append(BackendInfo(name, True, source, native_ops=[op for op in OP_NAMES if callable(getattr(b, op, None))],
                               priority=getattr(b, "priority", 0), label=str(getattr(b, "name", name))))
    return out
