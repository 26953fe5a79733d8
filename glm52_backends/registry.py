"""Backend registry: entry points + run-time registration, lazy loading, per-op fallback.

A backend is any object with one method per op it implements (names in `ops.OP_NAMES`), plus
optional `name`, `priority` (higher wins under `auto`), `capabilities` (`ops.Capabilities` or a
dict), `prepare_step(meta)` and `comm` (see `ops/protocol.py`). Every native op's signature is
checked against the contract (`ops.check_signature`) when the backend is bound: a backend whose op
does not match is refused with the op and the difference named. Built-ins register
through the `glm52_backends.backends` entry-point group exactly like a vendor package; nothing is
imported until a backend is asked for, so `import glm52_backends` imports neither triton nor
torch_npu.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

from .ops import OP_NAMES, REFERENCES, Capabilities, OpUnsupported, check_signature, signature

log = logging.getLogger("glm52_backends")

ENTRY_POINT_GROUP = "glm52_backends.backends"
_RUNTIME: dict[str, Callable[..., Any]] = {}


class BackendUnavailable(RuntimeError):
    """A backend asked for by name that cannot load here; the message says why and what to install."""


class BackendContractError(BackendUnavailable):
    """A backend whose op does not match the contract's signature (the message names op and difference)."""


def check_backend(backend: Any) -> None:
    """Raise `BackendContractError` naming every native op whose signature differs from the contract."""
    name = getattr(backend, "name", type(backend).__name__)
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
    except Exception as e:  # noqa: BLE001 - any failure to load is reported with its cause
        raise BackendUnavailable(f"backend {name!r} cannot load: {type(e).__name__}: {e}") from e
    missing_name = getattr(backend, "name", None)
    if missing_name is None:
        try:
            backend.name = name
        except AttributeError:
            pass
    check_backend(backend)
    return backend


class _Reference:
    """The reference ops in float32: the fallback of every backend (the core never imports a backend)."""
    name = "reference"

    def __init__(self):
        import functools

        import torch
        for op, fn in REFERENCES.items():
            setattr(self, op, functools.partial(fn, cdt=torch.float32))


class BoundBackend:
    """A backend with every op of the contract: native where it has one, reference otherwise.

    A missing op, or a native op that raises `OpUnsupported` for some input, runs the reference
    on the same tensors with one warning per (backend, op). `calls` counts native and fallback
    calls per op, which is what reports mean by "ran natively".
    """

    def __init__(self, backend: Any, reference: Any | None = None):
        check_backend(backend)
        if reference is None:
            reference = _Reference()
        self.backend = backend
        self.reference = reference
        self.name: str = getattr(backend, "name", type(backend).__name__)
        self.native_ops = tuple(op for op in OP_NAMES if callable(getattr(backend, op, None)))
        self.calls: dict[str, dict[str, int]] = {op: {"native": 0, "fallback": 0} for op in OP_NAMES}
        self._warned: set[str] = set()
        for op in OP_NAMES:
            setattr(self, op, self._make(op))

    def _warn(self, op: str, why: str) -> None:
        if op not in self._warned:
            self._warned.add(op)
            msg = f"backend {self.name!r}: {op} falls back to the reference ({why})"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)

    def _make(self, op: str) -> Callable[..., Any]:
        ref = getattr(self.reference, op)
        native = getattr(self.backend, op, None) if op in self.native_ops else None
        counts = self.calls[op]

        if native is None:
            def call(*args, **kwargs):
                self._warn(op, "not implemented by this backend")
                counts["fallback"] += 1
                return ref(*args, **kwargs)
        else:
            def call(*args, **kwargs):
                try:
                    out = native(*args, **kwargs)
                except OpUnsupported as e:
                    self._warn(op, f"declined: {e}")
                    counts["fallback"] += 1
                    return ref(*args, **kwargs)
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

    def prepare_step(self, meta) -> None:
        """Let the backend build its per-step data once (`meta.backend_data`)."""
        hook = getattr(self.backend, "prepare_step", None)
        meta.backend_data = hook(meta) if callable(hook) else None

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
        return BoundBackend(name)
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
