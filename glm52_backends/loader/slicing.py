"""A rank's slice (dim, start, stop) of a weight, in logical coordinates, mapped onto each stored part:
block-FP8 scales in whole blocks, int4 rows in whole bytes, per-channel scales with the output rows
(whole when the inputs are split), a static bias on the first rank only. Slices come from THE
sharding table (`parallel.RankLayout.slice_of`).
"""

from __future__ import annotations

import torch

from ..weights import Weight
from .headers import CheckpointError

def _scale_slice(where, block: tuple[int, int], name: str):
    """The scale grid's slice for a weight slice: whole blocks on the same dim."""
    if where == "all":
        return "all"
    dim, a, b = where
    bs = block[dim]
    if a % bs:
        raise CheckpointError(f"{name}: the rank's slice starts at {a}, inside a {bs}-wide FP8 block")
    return dim, a // bs, -(-b // bs)


def _part_where(fmt: str, part: str, where, block: tuple[int, int], name: str, packed: bool):
    """The slice of one stored part of a quantized weight for the weight's logical slice `where`."""
    if where == "all":
        return "all"
    dim, a, b = where
    if fmt == "fp8_block":
        return where if part == "data" else _scale_slice(where, block, name)
    if part == "data":
        if dim == 0 and packed:
            if a % 2 or b % 2:
                raise CheckpointError(f"{name}: the rank's rows [{a}, {b}) split a byte of two int4 rows")
            return 0, a // 2, b // 2
        return where
    if part in ("input_scale", "input_offset") or dim == 1:
        return "all"                  # per-tensor, or per output row while the inputs are split
    return 0, a, b


def _check_cut(name: str, where, n: int, block: int, what: str) -> None:
    """An online-quantized slice must cut whole blocks, so every rank quantizes as one process does."""
    if where == "all":
        return
    _, a, b = where
    if a % block or (b % block and b != n):
        raise CheckpointError(f"{name}: the rank's slice [{a}, {b}) cuts a {block}-wide {what} block; quantizing it "
                              f"online would differ from one process (use another layout)")


def slice_weight(w: Weight, where, block_check: str = "") -> Weight:
    """A rank's (dim, start, stop) slice of an in-memory `Weight` in logical coordinates (the same
    rules as reading one from a checkpoint: FP8 scales in whole blocks, int4 rows in whole bytes,
    per-channel scales whole when the inputs are split, a static bias on the first rank only)."""
    if where == "all":
        return w
    dim, a, b = where
    if w.format == "dense":
        return Weight(w.data.narrow(dim, a, b - a))

    def cut(t: torch.Tensor, s):
        if s == "all":
            return t
        d, x, y = s
        return t.narrow(d, x, y - x)

    name = block_check or "weight"
    data = cut(w.data, _part_where(w.format, "data", where, w.block, name, w.format == "w4a8_dynamic"))
    scales = cut(w.scales, _part_where(w.format, "scales", where, w.block, name, False))
    aux = {k: cut(v, _part_where(w.format, k, where, w.block, name, False)) for k, v in w.aux.items()}
    if w.format == "w8a8_static" and dim == 1 and a > 0:
        aux["quant_bias"] = torch.zeros_like(aux["quant_bias"])
    return Weight(data, scales, w.format, w.block, aux=aux, recipe=w.recipe)


def local_part(layout_, name: str, v: "torch.Tensor | Weight"):
    """This rank's part of a tensor or `Weight` already in memory (None: another rank's expert)."""
    shape = tuple(v.shape)
    s = layout_.slice_of(name, shape)
    if s is None:
        return None
    if isinstance(v, Weight):
        return slice_weight(v, s, name)
    return layout_.local(name, v)
