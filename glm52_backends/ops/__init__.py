"""THE op contract: what every backend computes.

One file per op holds its docstring (shapes, dtypes, layout, scale) and its reference in plain
torch: the definition, the fallback and the test oracle at once; and what the registry enforces of
the op: its output check (`check_output`), the format of the cache it reads (`cache_format`) and
its weight arguments (`WEIGHT_ARGS`), collected below. `cpu_ref` binds these references;
every other backend provides some ops as methods of the same name and signature (the registry
checks each one against `signature(op)` and refuses a backend whose op differs) and declares what it
executes in `Capabilities`. Every op is also a PyTorch custom op, `torch.ops.glm52.<op>` (the
reference) with one overload per backend (ops/library.py), which graph capture records as one node.
Collectives are a separate contract: `ops/comm.py`.

Batches are token-major ("TND"): one step processes `T` query tokens of `B` requests.
  cu_seqlens_q [B+1] int32   request b owns query tokens cu[b]:cu[b+1]
  seq_lens     [B]   int32   each request's total length *including* this step's tokens
  position of query token i of request b = seq_lens[b] - q_len[b] + i   (right-down causal)
Caches are paged: `[num_blocks, block_size, D]`; `block_table [B, max_blocks] int32` maps a
request's position p to slot `block_table[b, p // bs] * bs + p % bs`. Positions (never cache
slots) cross op boundaries. The step reaches the ops through these loose tensors only (one
carrier): an op derives each token's request and position on the device (`step.token_requests`,
`step.token_positions`) and sizes its work from shapes, so a backend's op needs no host read.

Letters: T tokens, B requests, H heads (64), Hi indexer heads (32), Di indexer head dim (128),
Dl latent (512), Dr rope (64), E experts (256), K experts per token (8), Hd hidden (6144),
I expert width (2048), V vocabulary, k draft tokens.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

from .indexer_topk import indexer_topk
from .layer_norm import layer_norm
from .linear import linear
from .mlp import mlp
from .moe_experts import moe_experts
from .moe_route import moe_route
from .mtp_verify import mtp_verify
from .protocol import Backend, Capabilities, OpUnsupported
from .rms_norm import rms_norm
from .rope import rope
from .sparse_mla import sparse_mla

HOT_OPS = ("indexer_topk", "sparse_mla", "moe_experts", "mtp_verify")
SUPPORTING_OPS = ("moe_route", "rms_norm", "layer_norm", "rope", "linear", "mlp")
OP_NAMES = HOT_OPS + SUPPORTING_OPS

# op -> its reference (computing in `cdt`, float32 by default or float64 as the oracle)
REFERENCES: dict[str, Callable[..., Any]] = {
    "indexer_topk": indexer_topk, "sparse_mla": sparse_mla, "moe_experts": moe_experts,
    "mtp_verify": mtp_verify, "moe_route": moe_route, "rms_norm": rms_norm, "layer_norm": layer_norm,
    "rope": rope, "linear": linear, "mlp": mlp,
}
# keyword-only parameters of a reference that belong to the reference, not to the contract (a bound
# backend's ops are typed as these references, `registry.OpSlot`, so static tools show `cdt` too: never pass it)
REFERENCE_ONLY = ("cdt",)


def _contract(op: str):
    """The module ops/<op>.py (the package's attribute of that name is the reference function)."""
    return sys.modules[REFERENCES[op].__module__]


# What each ops/<op>.py declares besides its reference, collected for the registry:
#   check_output(args, kwargs, out) -> what is wrong, or None: the output check of every native call
#   cache_format(args, kwargs) -> the format of the cache handed in (the cache-reading ops)
#   WEIGHT_ARGS ((position, name), ...): the arguments that may be a quantized `Weight`
#   NEG_INF_OUTPUTS {position: name}: float outputs that may hold -inf (debug finiteness check)
OUTPUT_CHECKS: dict[str, Callable[[tuple, dict, Any], str | None]] = {
    op: _contract(op).check_output for op in REFERENCES}
CACHE_FORMAT_OF: dict[str, Callable[[tuple, dict], str]] = {
    op: _contract(op).cache_format for op in REFERENCES if hasattr(_contract(op), "cache_format")}
WEIGHT_ARGS: dict[str, tuple[tuple[int, str], ...]] = {
    op: _contract(op).WEIGHT_ARGS for op in REFERENCES if hasattr(_contract(op), "WEIGHT_ARGS")}
NEG_INF_OUTPUTS: dict[str, dict[int, str]] = {
    op: _contract(op).NEG_INF_OUTPUTS for op in REFERENCES if hasattr(_contract(op), "NEG_INF_OUTPUTS")}


def doc(op: str) -> str:
    """The contract text of `op` (its module's docstring)."""
    return _contract(op).__doc__.strip()


def signature(op: str) -> inspect.Signature:
    """The contract's signature of `op`: the reference's, without its reference-only parameters."""
    sig = inspect.signature(REFERENCES[op])
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n not in REFERENCE_ONLY])


def check_signature(op: str, fn: Callable[..., Any]) -> str | None:
    """None when `fn` can be called every way the contract allows; else what differs.

    The positional parameters must have the contract's names in its order (or `fn` takes *args);
    every contract parameter with a default must have one in `fn` too; every keyword-only contract
    parameter must be accepted (or **kwargs); extra parameters of `fn` must have defaults.
    """
    try:
        got = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins / C functions without a signature: accepted as they are
    want = signature(op)
    P = inspect.Parameter
    g_pos = [p for p in got.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    w_pos = [p for p in want.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == P.VAR_POSITIONAL for p in got.parameters.values())
    var_kw = any(p.kind == P.VAR_KEYWORD for p in got.parameters.values())
    if not var_pos:
        for i, w in enumerate(w_pos):
            if i >= len(g_pos):
                return f"takes {len(g_pos)} positional parameters, the contract has {len(w_pos)} (missing {w.name!r})"
            if g_pos[i].name != w.name:
                return f"positional parameter {i + 1} is named {g_pos[i].name!r}, the contract says {w.name!r}"
            if w.default is not P.empty and g_pos[i].default is P.empty:
                return f"parameter {w.name!r} needs a default (the contract's is {w.default!r})"
    names = {p.name: p for p in got.parameters.values()}
    for w in want.parameters.values():
        if w.kind == P.KEYWORD_ONLY and w.name not in names and not var_kw:
            return f"does not accept the keyword {w.name!r}"
        if w.kind == P.KEYWORD_ONLY and w.name in names and names[w.name].default is P.empty:
            return f"keyword {w.name!r} needs a default (the contract's is {w.default!r})"
    wanted = set(want.parameters)
    for p in got.parameters.values():
        if p.name not in wanted and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and p.default is P.empty:
            if var_pos and p.kind == P.KEYWORD_ONLY or not var_pos:
                return f"has a required parameter {p.name!r} the contract does not pass"
    return None


__all__ = ["OP_NAMES", "HOT_OPS", "SUPPORTING_OPS", "REFERENCES", "OUTPUT_CHECKS", "CACHE_FORMAT_OF", "WEIGHT_ARGS",
           "NEG_INF_OUTPUTS", "OpUnsupported", "Backend", "Capabilities", "doc", "signature", "check_signature", *REFERENCES]
