"""Every op of the contract as a PyTorch custom op in the `glm52` namespace.

    torch.ops.glm52.sparse_mla(q, c_cache, ..., scale, return_lse)      the reference (the contract)
    torch.ops.glm52.sparse_mla.<backend>(..., instance=i)                a backend's implementation

One schema per op, written from the contract's signature (`SCHEMAS`): tensors stay tensors, a
`weights.Weight` travels flattened (`data, scales, format, block, aux names, aux tensors, recipe`),
and ops whose result depends on a flag return a fixed tuple (`sparse_mla` always returns
`(out, lse)`, `lse` empty unless asked). Each op has a fake (meta) kernel computed from the
contract's output shapes and dtypes, so torch.compile and FakeTensor tracing need no real data.

A backend is registered once per name (`register`): its overload dispatches on the `instance`
argument to the bound backend that made the call (two backends of one name, e.g. two CUDA
configurations, never share an implementation). A backend whose ops are native kernels
(Triton, torch_npu, a vendor's) is *opaque*: graph capture and torch.compile record one node per
op and call the kernel on replay; one whose ops launch Triton kernels through `wrap_triton` says
`triton_ops = True` and is defined with `torch.library.triton_op`, which torch.compile traces into.
A backend whose ops are plain torch says `opaque_ops = False`:
its overloads are implicit composites, which tracing (make_fx, torch.compile) inlines, so inductor
can fuse them; eager calls stay one call.

`BoundBackend` (registry.py) routes calls through these ops while a graph is being captured or
traced (`BoundBackend.library_calls`); eager steps call the same functions directly, which saves
the dispatcher's few microseconds per op (78 layers x ~20 ops per decode step).
"""

from __future__ import annotations

import inspect
import re
import threading
import weakref
from typing import Any, Callable, Optional

import torch

from ..weights import Weight

NAMESPACE = "glm52"

# op -> (parameters, returns). Parameter kinds: "Tensor", "Tensor?", "Weight" (tensor or Weight),
# "float", "int", "bool"; a default follows "=". The names are the contract's (ops.signature).
SCHEMAS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "rms_norm": ((("x", "Tensor"), ("weight", "Tensor"), ("eps", "float")), "Tensor"),
    "layer_norm": ((("x", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor"), ("eps", "float")), "Tensor"),
    "rope": ((("x", "Tensor"), ("positions", "Tensor"), ("theta", "float")), "Tensor"),
    "linear": ((("x", "Tensor"), ("weight", "Weight")), "Tensor"),
    "mlp": ((("x", "Tensor"), ("w13", "Weight"), ("w2", "Weight")), "Tensor"),
    "moe_route": ((("router_logits", "Tensor"), ("correction_bias", "Tensor?"), ("top_k", "int"),
                   ("n_group", "int=1"), ("topk_group", "int=1"), ("norm_topk_prob", "bool=True"),
                   ("routed_scaling_factor", "float=1.0")), "(Tensor, Tensor)"),
    "moe_experts": ((("x", "Tensor"), ("w13", "Weight"), ("w2", "Weight"), ("topk_ids", "Tensor"),
                     ("topk_weights", "Tensor")), "Tensor"),
    "indexer_topk": ((("q", "Tensor"), ("w", "Tensor"), ("k_cache", "Tensor"), ("block_table", "Tensor"),
                      ("seq_lens", "Tensor"), ("cu_seqlens_q", "Tensor"), ("topk", "int")), "Tensor"),
    "sparse_mla": ((("q", "Tensor"), ("c_cache", "Tensor"), ("kpe_cache", "Tensor"), ("idx", "Tensor"),
                    ("block_table", "Tensor"), ("seq_lens", "Tensor"), ("cu_seqlens_q", "Tensor"),
                    ("scale", "float"), ("return_lse", "bool=False")), "(Tensor, Tensor)"),
    "mtp_verify": ((("draft", "Tensor"), ("target_logits", "Tensor"), ("draft_probs", "Tensor?=None"),
                    ("temperature", "float=0.0"), ("top_p", "float=1.0"), ("uniforms", "Tensor?=None")),
                   "(Tensor, Tensor)"),
}


def _flat_params(op: str) -> list[tuple[str, str, str]]:
    """The schema's parameters of `op`, flattened: [(name, type, default or "")]."""
    out = []
    for name, kind in SCHEMAS[op][0]:
        kind, _, default = kind.partition("=")
        if kind == "Weight":      # aux names travel comma-joined (torch's schema inference takes no str[])
            out += [(name, "Tensor", ""), (f"{name}_scales", "Tensor?", ""), (f"{name}_format", "str", ""),
                    (f"{name}_block", "int[]", ""), (f"{name}_aux_names", "str", ""), (f"{name}_aux", "Tensor[]", ""),
                    (f"{name}_recipe", "str?", "")]
        else:
            out.append((name, kind, default))
    return out


def schema(op: str) -> str:
    """The schema string of `op`'s overloads, e.g. '(Tensor x, ...) -> Tensor'."""
    args = [f"{t} {n}" + (f"={d}" if d else "") for n, t, d in _flat_params(op)]
    return f"({', '.join(args + ['*', 'int instance=0'])}) -> {SCHEMAS[op][1]}"


_PY_TYPES = {"Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "Tensor[]": list[torch.Tensor],
             "float": float, "int": int, "bool": bool, "str": str, "str?": Optional[str], "int[]": list[int]}


def python_signature(op: str) -> inspect.Signature:
    """The schema as an annotated Python signature (what `torch.library.triton_op` infers a schema from)."""
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=_PY_TYPES[t],
                **({"default": _default(t, d)} if d else {})) for n, t, d in _flat_params(op)]
    params.append(P("instance", P.KEYWORD_ONLY, annotation=int, default=0))
    ret = SCHEMAS[op][1]
    return inspect.Signature(params, return_annotation=tuple[torch.Tensor, torch.Tensor] if ret.startswith("(")
                             else torch.Tensor)


# ---- the contract's arguments <-> the schema's ---------------------------------------------------
def _default(kind: str, default: str) -> Any:
    v = {"None": None, "True": True, "False": False}.get(default, default)
    return float(v) if kind == "float" else int(v) if kind == "int" else v


def flatten(op: str, args: tuple, kwargs: dict) -> list:
    """The contract call `op(*args, **kwargs)` as the schema's positional arguments (no instance)."""
    params = SCHEMAS[op][0]
    unknown = set(kwargs) - {n for n, _ in params}
    if unknown:
        raise TypeError(f"{op}: unexpected keyword(s) {sorted(unknown)}")
    if len(args) > len(params):
        raise TypeError(f"{op}: takes {len(params)} arguments, got {len(args)}")
    out: list = []
    for i, (name, kind) in enumerate(params):
        kind, _, default = kind.partition("=")
        if i < len(args):
            v = args[i]
        elif name in kwargs:
            v = kwargs[name]
        elif default:
            v = _default(kind, default)
        else:
            raise TypeError(f"{op}: missing argument {name!r}")
        if kind == "Weight":
            w = v if isinstance(v, Weight) else Weight(v)
            names = sorted(w.aux)
            out += [w.data, w.scales, w.format, list(w.block), ",".join(names), [w.aux[n] for n in names], w.recipe]
        else:
            out.append(float(v) if kind == "float" else v)
    return out


def unflatten(op: str, flat: tuple) -> tuple[list, dict]:
    """The schema's positional arguments back into the contract's (args, kwargs)."""
    args: list = []
    kwargs: dict = {}
    i = 0
    for name, kind in SCHEMAS[op][0]:
        kind, _, default = kind.partition("=")
        if kind == "Weight":
            data, scales, fmt, block, names, aux, recipe = flat[i:i + 7]
            i += 7
            names = names.split(",") if names else []
            v: Any = data if fmt == "dense" else Weight(data, scales, fmt, tuple(block), dict(zip(names, aux)),
                                                          recipe)
        else:               # the dispatcher may leave off trailing arguments that equal their defaults
            v = flat[i] if i < len(flat) else _default(kind, default)
            i += 1
        if default:
            kwargs[name] = v
        else:
            args.append(v)
    return args, kwargs


def _as_schema_result(op: str, out: Any, kwargs: dict, like: torch.Tensor) -> Any:
    """A contract result in the schema's fixed form and canonical dtypes."""
    if op == "sparse_mla":
        if kwargs.get("return_lse"):
            return out[0], out[1]
        return out, torch.empty(0, dtype=torch.float32, device=like.device)
    if op == "moe_route":
        return out[0].to(torch.int64), out[1]
    if op == "mtp_verify":
        return out[0], out[1]
    return out


def from_schema_result(op: str, out: Any, kwargs: dict) -> Any:
    """The schema's result back into the contract's (sparse_mla: `out` alone unless lse was asked)."""
    if op == "sparse_mla" and not kwargs.get("return_lse"):
        return out[0]
    return tuple(out) if isinstance(out, (tuple, list)) else out


def _fresh(out: Any, flat: tuple) -> Any:
    """Outputs that alias an input are copied (a custom op must return new tensors)."""
    try:
        ins = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor) and t.numel()}
    except RuntimeError:          # fake tensors (tracing): no storage to compare
        return out

    def own(t):
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() in ins:
            return t.clone()
        return t
    return tuple(own(t) for t in out) if isinstance(out, tuple) else own(out)


# ---- fake kernels: the contract's output shapes ---------------------------------------------------
def _fake(op: str) -> Callable[..., Any]:
    def fake(*flat, instance=0):
        args, kwargs = unflatten(op, flat)
        x = args[0]
        if op in ("rms_norm", "layer_norm", "rope", "moe_experts"):
            return x.new_empty(x.shape)
        if op == "linear":
            return x.new_empty((*x.shape[:-1], args[1].shape[-2]))     # a Weight's logical shape
        if op == "mlp":
            return x.new_empty((*x.shape[:-1], args[2].shape[-2]))
        if op == "moe_route":
            T, k = x.shape[0], args[2]
            return x.new_empty((T, k), dtype=torch.int64), x.new_empty((T, k), dtype=torch.float32)
        if op == "indexer_topk":
            return x.new_empty((x.shape[0], args[6]), dtype=torch.int32)
        if op == "sparse_mla":
            T, H = x.shape[:2]
            lse = x.new_empty((T, H) if kwargs.get("return_lse") else (0,), dtype=torch.float32)
            return x.new_empty((T, H, args[1].shape[-1])), lse
        if op == "mtp_verify":
            B, k = x.shape
            return x.new_empty((B,), dtype=torch.int32), x.new_empty((B, k + 1), dtype=torch.int64)
        raise AssertionError(op)
    return fake


# ---- definitions ---------------------------------------------------------------------------------
_LOCK = threading.Lock()
_LIB: torch.library.Library | None = None
_DEFINED: set[str] = set()                                   # "op.overload"
_INSTANCES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_NEXT = [1]


def _library() -> torch.library.Library:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
        from . import REFERENCES
        for op in SCHEMAS:
            _define(op, "default", lambda op=op: REFERENCES[op], opaque=True)
    return _LIB


def _define(op: str, overload: str, target: Callable[[], Callable[..., Any]] | None, *, opaque: bool,
            triton: bool = False) -> None:
    """Define `glm52::op.overload`; `target()` gives the function to call (None: the calling instance's)."""
    key = f"{op}.{overload}"
    if key in _DEFINED:
        return
    lib = _LIB
    name = op if overload == "default" else key
    if not triton:
        lib.define(name + schema(op))

    def impl(*flat, instance=0):
        fn = target() if target is not None else _INSTANCES[instance].native_fn(op)
        args, kwargs = unflatten(op, flat)
        out = _as_schema_result(op, fn(*args, **kwargs), kwargs, flat[0])
        return _fresh(out, flat) if opaque else out

    if triton:            # Triton kernels launched through wrap_triton: inductor traces into the op
        sig = python_signature(op)

        def traced(*a, **kw):
            bound = sig.bind(*a, **kw)
            bound.apply_defaults()              # the dispatcher may leave off arguments equal to their defaults
            return impl(*bound.args, instance=bound.kwargs.get("instance", 0))
        traced.__signature__ = sig
        torch.library.triton_op(f"{NAMESPACE}::{name}", traced, mutates_args=())
    elif opaque:
        lib.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", _fake(op), lib=lib)
    else:
        lib.impl(name, impl, "CompositeImplicitAutograd")
    _DEFINED.add(key)


def overload_name(backend_name: str) -> str:
    """A backend's name as an overload name: 'ascend (emulated)' -> 'ascend_emulated'."""
    name = re.sub(r"\W+", "_", backend_name).strip("_").lower() or "backend"
    return "b_" + name if name[0].isdigit() or name == "default" else name


def register(bound: Any, ops: tuple[str, ...], *, opaque: bool, triton: bool = False) -> tuple[str, int]:
    """Define the overloads of `bound`'s native ops (once per backend name) and enrol `bound` as an
    instance they dispatch to: (overload name, instance handle). `bound.native_fn(op)` is called.
    `triton`: the ops launch Triton kernels through `torch.library.wrap_triton`; they are defined with
    `torch.library.triton_op`, so torch.compile sees their kernels (their fake kernels are traced)."""
    overload = overload_name(bound.name) + ("" if opaque else "_inline")
    with _LOCK:
        _library()
        for op in ops:
            _define(op, overload, None, opaque=opaque, triton=triton)
        handle = _NEXT[0]
        _NEXT[0] += 1
        _INSTANCES[handle] = bound
    return overload, handle


def packet(op: str, overload: str = "default"):
    """`torch.ops.glm52.<op>.<overload>` (the reference's overload is always defined)."""
    with _LOCK:
        _library()
    return getattr(getattr(getattr(torch.ops, NAMESPACE), op), overload)


def call(op: str, overload: str, args: tuple, kwargs: dict, instance: int = 0) -> Any:
    """`op(*args, **kwargs)` through the custom op `glm52::op.overload`, in the contract's form."""
    return from_schema_result(op, packet(op, overload)(*flatten(op, args, kwargs), instance=instance), kwargs)


__all__ = ["NAMESPACE", "SCHEMAS", "schema", "flatten", "unflatten", "register", "packet", "call",
           "overload_name", "from_schema_result"]
