"""Seeded CPU inputs: batches, paged caches with poison, and the dtype/device hand-off.

Every tensor of a case comes from a `torch.Generator` on the CPU seeded by the case's name, so
every backend, on every machine, sees bit-identical inputs. A case builds its tensors once in
float32; `for_backend` casts the floating ones to the dtype under test and moves them to the
backend's device, and `for_reference` hands the reference the same dtype-rounded values in
float64 (the reference therefore measures the backend's arithmetic, not input rounding).

Poison. Ops return new tensors, so there is no output buffer to pre-fill; instead everything a
kernel must not read is NaN: cache blocks no request owns, cache slots at or beyond a request's
`seq_len`, and the blocks that block-table padding points to. A kernel that reads outside its
bounds and lets the value reach the output (a masked add instead of a select, a gather of a
`-1` index that wraps to the cache's last slot) produces NaN, and NaN or inf never passes. The
runner further checks the exact shape, dtype and device of every output, so a result that is
short, padded or left partly unwritten fails too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

POISON = float("nan")


def generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by the case's identity (stable across runs and machines)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32("/".join(map(str, key)).encode()))
    return g


def randn(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g)


def randperm(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=g)


# ---- token-major batches ------------------------------------------------------------------------

@dataclass
class Batch:
    """`reqs[b] = (q_len, seq_len)`: request b contributes q_len query tokens, ending at seq_len."""

    reqs: list[tuple[int, int]]

    def __post_init__(self):
        for q, L in self.reqs:
            if not 0 <= q <= L:
                raise ValueError(f"bad request (q_len={q}, seq_len={L})")

    @property
    def T(self) -> int:
        return sum(q for q, _ in self.reqs)

    @property
    def seq_lens(self) -> list[int]:
        return [L for _, L in self.reqs]

    @property
    def cu_seqlens_q(self) -> torch.Tensor:
        cu = [0]
        for q, _ in self.reqs:
            cu.append(cu[-1] + q)
        return torch.tensor(cu, dtype=torch.int32)

    @property
    def seq_lens_t(self) -> torch.Tensor:
        return torch.tensor(self.seq_lens, dtype=torch.int32)

    def tokens(self):
        """(token index t, request b, position pos) for every query token, right-down causal."""
        t = 0
        for b, (q, L) in enumerate(self.reqs):
            for i in range(q):
                yield t, b, L - q + i
                t += 1

    @property
    def positions(self) -> torch.Tensor:
        return torch.tensor([p for _, _, p in self.tokens()], dtype=torch.int64)

    def describe(self) -> str:
        return "reqs(q,L)=" + ",".join(f"({q},{L})" for q, L in self.reqs)


def page(g: torch.Generator, seqs: list[torch.Tensor], block_size: int, spare_blocks: int = 2
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request rows `[L_b, D]` -> (cache `[NB, BS, D]`, block_table `[B, max_blocks] int32`).

    Blocks are handed out in a shuffled order; spare blocks, slots >= L_b and the block a padded
    block-table entry names are all NaN (see the module docstring).
    """
    D = seqs[0].shape[-1]
    need = [-(-s.shape[0] // block_size) for s in seqs]
    nb = sum(need) + spare_blocks
    order = randperm(g, nb).tolist()
    spare = order[sum(need):]
    cache = torch.full((nb, block_size, D), POISON, dtype=seqs[0].dtype)
    table = torch.full((len(seqs), max(need) + 1), spare[0], dtype=torch.int32)  # +1: a padded column
    nxt = 0
    for b, s in enumerate(seqs):
        for j in range(need[b]):
            blk = order[nxt]
            nxt += 1
            table[b, j] = blk
            rows = s[j * block_size:(j + 1) * block_size]
            cache[blk, :rows.shape[0]] = rows
    return cache, table


# ---- hand-off to backend and reference ------------------------------------------------------------

ROLES = ("act", "weight", "qweight", "qcache", "f32", "int", "const")


@dataclass(frozen=True)
class PackedCache:
    """A paged cache in a quantized format (glm52_backends/cache_formats.py): its owning uint8 storage
    `[NB, BS * bytes_per_token]` and which of the format's op views an argument is (`part`: latent 0 =
    c_cache's codes, 1 = kpe_cache's rope; index 0 = k_cache's codes). The arguments of one cache share
    one storage, and so do their copies on a backend's device."""
    fmt: str
    dims: tuple[int, ...]
    storage: torch.Tensor
    block_size: int
    part: int = 0

    def view(self, storage: torch.Tensor) -> torch.Tensor:
        from glm52_backends.cache_formats import op_views
        return op_views(self.fmt, self.dims, storage, self.block_size)[self.part]


def packed(fmt: str, parts: list[torch.Tensor]) -> list[PackedCache]:
    """Paged float caches from `page` (latent: [c, k_pe]; index: [k]) written in format `fmt` as
    PagedCache writes it (`encode_latent` / `encode_index` of the float32 rows). Every row `page`
    poisoned with NaN (unowned blocks, slots past a request's length) is all 0xFF bytes here: NaN
    scales (and NaN e4m3 codes, NaN bf16 rope), so a reader that lets such a row reach its output
    gives NaN. -> one PackedCache per part, sharing the storage."""
    from glm52_backends import cache_formats as cf
    NB, BS = parts[0].shape[:2]
    dims = tuple(t.shape[-1] for t in parts)
    flat = [t.reshape(NB * BS, -1).nan_to_num() for t in parts]
    enc = cf.encode_latent(fmt, *flat) if len(parts) == 2 else cf.encode_index(fmt, *flat)
    storage = cf.allocate(fmt, dims, NB, BS)
    views = cf.part_views(fmt, dims, storage, BS)
    poisoned = parts[0][..., 0].isnan()                                           # [NB, BS]
    for name, v in views.items():
        v.copy_(enc[name].view(NB, BS, -1))
        v[poisoned] = 0xFF
    return [PackedCache(fmt, dims, storage, BS, i) for i in range(len(parts))]     # an op view per part


@dataclass
class Arg:
    """One positional argument of an op call.

    role: "act"    floating, cast to the dtype under test; the reference gets it in float64
          "weight" floating, cast likewise; the reference gets the dtype-rounded tensor and
                   upcasts per use (saves a float64 copy of large expert weights)
          "f32"    float32 by contract whatever the dtype under test (head weights, routing
                   weights, router logits, uniforms); the reference gets it in float64
          "qweight" a quantized `Weight` (glm52_backends/quant.py), built once from the case's seed:
                   the backend gets a copy of its codes and scales on its device, the reference
                   the same object (it computes the format's arithmetic in float64 whatever the dtype)
          "qcache" a `PackedCache` argument: the backend gets its view of a copy of the storage on its
                   device (one copy per storage), the reference the view of the original (it reads
                   the codes dequantized to float32, whatever the dtype)
          "int"    integer tensor, moved as is;  "const": a Python value
    view: applied after the move (hands the backend a non-contiguous view, for instance).
    """

    value: Any
    role: str
    view: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not in {ROLES}")


@dataclass
class CaseInputs:
    args: dict[str, Arg]                      # in the op's positional order
    meta: dict[str, Any] = field(default_factory=dict)  # what judges need besides the args
    kwargs: dict[str, Any] = field(default_factory=dict)  # constant keyword arguments (e.g. return_lse)

    def for_backend(self, dtype: torch.dtype, device: torch.device) -> list[Any]:
        out, storages = [], {}
        for a in self.args.values():
            if a.role == "const":
                out.append(a.value)
                continue
            if a.role == "qweight":
                out.append(_weight_copy(a.value, device))
                continue
            if a.role == "qcache":     # the views of one cache share one copy of its storage
                key = id(a.value.storage)
                if key not in storages:
                    storages[key] = a.value.storage.to(device, copy=True)
                out.append(a.value.view(storages[key]))
                continue
            to = {"act": dtype, "weight": dtype, "f32": torch.float32, "int": a.value.dtype}[a.role]
            v = a.value.to(device=device, dtype=to, copy=True)  # a copy: a backend may not harm the case
            out.append(a.view(v) if a.view else v)
        return out

    def for_reference(self, dtype: torch.dtype) -> list[Any]:
        """With quantized weights the activations stay in `dtype`: the formats define where the
        activation is rounded to its dtype before it is quantized again (the SwiGLU output between
        the two GEMMs, ops/mlp.py), and a float64 activation there would move codes by a step."""
        out = []
        quantized = any(a.role == "qweight" for a in self.args.values())
        for a in self.args.values():
            if a.role in ("const", "qweight"):
                out.append(a.value)
                continue
            if a.role == "qcache":
                out.append(a.value.view(a.value.storage))
                continue
            if a.role == "act" and quantized:
                out.append(a.view(a.value.to(dtype)) if a.view else a.value.to(dtype))
                continue
            v = {"act": lambda t: t.to(dtype).double(), "weight": lambda t: t.to(dtype),
                 "f32": lambda t: t.float().double(), "int": lambda t: t}[a.role](a.value)
            out.append(a.view(v) if a.view else v)
        return out


def _weight_copy(w, device: torch.device):
    """A quantized Weight's tensors copied to `device` (a backend may not harm the case)."""
    from glm52_backends.weights import Weight
    return Weight(w.data.to(device, copy=True), w.scales.to(device, copy=True), w.format, w.block,
                  {k: v.to(device, copy=True) for k, v in w.aux.items()}, w.recipe)


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a backend sees of `t` in `dtype`, in float64 for the judges."""
    return t.to(dtype).double()
