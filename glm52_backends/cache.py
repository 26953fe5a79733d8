"""Paged caches: the MLA latent cache (every layer) and the index-key cache (IndexShare full layers).

Layout per layer: `[num_blocks, block_size, D]`. The latent cache is two paged tensors per layer,
`c` (kv_lora_rank values after kv_a_layernorm) and `k_pe` (qk_rope_head_dim values after RoPE),
as vllm-ascend and Huawei's GLM-5.2 recipe keep them; `index_k` holds the indexer keys. A request owns a list of blocks; position p of
request r lives in slot `blocks[r][p // bs] * bs + p % bs`. Blocks are reserved for a whole step
before anything is written, so running out raises `CacheExhausted` with the cache unchanged.

A step that fails after reserving (a backend op raising mid-step) must leave the cache exactly as
it was: `with cache.transaction(): ...` records what `reserve` hands out and, in `write`, the old
contents of every slot it overwrites, and on any exception puts both back (bit-identical), so a
retry neither appends twice nor reads a half-written step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence

import torch

from .config import ModelConfig


class CacheExhausted(RuntimeError):
    """Not enough free cache blocks for the requested tokens; nothing was allocated."""


class _Journal:
    """What one step changed, to undo it: requests' previous block counts and lengths, and the old
    rows of every written slot (only the slots a step writes: its new tokens, every layer)."""

    def __init__(self) -> None:
        self.reserved: dict[Hashable, tuple[int, int | None]] = {}   # req -> (blocks owned, len or None)
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (cache, slots, old rows)


# cache tensor id -> the journal of the open transaction of the cache that owns it (see `write`)
_JOURNALS: dict[int, _Journal] = {}


class PagedCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", mtp: bool = False):
        for what, v in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"cache: {what} must be a positive integer, got {v!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype = dtype
        self.device = torch.device(device)
        layers = list(range(cfg.num_hidden_layers)) + ([cfg.num_hidden_layers] if mtp else [])
        index_layers = cfg.full_layers + ([cfg.num_hidden_layers] if mtp else [])
        self.c = {l: torch.zeros(num_blocks, block_size, cfg.kv_lora_rank, dtype=dtype, device=device)
                  for l in layers}
        self.k_pe = {l: torch.zeros(num_blocks, block_size, cfg.qk_rope_head_dim, dtype=dtype, device=device)
                     for l in layers}
        self.index_k = {l: torch.zeros(num_blocks, block_size, cfg.index_head_dim, dtype=dtype, device=device)
                        for l in index_layers}
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low blocks first
        self.blocks: dict[Hashable, list[int]] = {}
        self.lens: dict[Hashable, int] = {}
        self._journal: _Journal | None = None

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every paged tensor of the cache (latent c, k_pe, index keys; every layer)."""
        for d in (self.c, self.k_pe, self.index_k):
            yield from d.values()

    # ---- all or nothing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator["PagedCache"]:
        """Undo everything the block does to this cache if it raises (any exception, Ctrl-C too).
        Nested transactions join the outer one."""
        if self._journal is not None:
            yield self
            return
        journal = self._journal = _Journal()
        ids = [id(t) for t in self.tensors()]
        for i in ids:
            _JOURNALS[i] = journal
        try:
            yield self
        except BaseException:
            self._rollback(journal)
            raise
        finally:
            for i in ids:
                _JOURNALS.pop(i, None)
            self._journal = None

    def _rollback(self, journal: _Journal) -> None:
        for cache, slots, old in reversed(journal.rows):
            cache.view(-1, cache.shape[-1])[slots] = old
        for r, (owned, length) in reversed(journal.reserved.items()):  # undo in reverse order of reserve
            blocks = self.blocks[r]
            self._free.extend(reversed(blocks[owned:]))   # back in the order pop() handed them out
            del blocks[owned:]
            if length is None:
                self.blocks.pop(r, None)
                self.lens.pop(r, None)
            else:
                self.lens[r] = length

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def reserve(self, new_lens: dict[Hashable, int]) -> None:
        """Grow requests to the given total lengths, all or nothing."""
        need = {r: self.blocks_needed(n) - len(self.blocks.get(r, ())) for r, n in new_lens.items()}
        total = sum(max(n, 0) for n in need.values())
        if total > len(self._free):
            raise CacheExhausted(
                f"cache exhausted: this step needs {total} more blocks of {self.block_size} tokens, "
                f"{len(self._free)} of {self.num_blocks} are free; lower the batch or context, "
                f"or build the cache with more blocks")
        j = self._journal
        for r, n in need.items():
            if j is not None and r not in j.reserved:
                j.reserved[r] = (len(self.blocks.get(r, ())), self.lens.get(r))
            owned = self.blocks.setdefault(r, [])
            owned.extend(self._free.pop() for _ in range(max(n, 0)))
            self.lens[r] = new_lens[r]

    def truncate(self, req: Hashable, new_len: int) -> None:
        """Roll a request back to `new_len` tokens (speculative rejection); frees whole blocks."""
        if not 0 <= new_len <= self.lens[req]:
            raise ValueError(f"cannot truncate request {req!r} from {self.lens[req]} to {new_len} tokens")
        owned = self.blocks[req]
        keep = self.blocks_needed(new_len)
        self._free.extend(reversed(owned[keep:]))
        del owned[keep:]
        self.lens[req] = new_len

    def release(self, req: Hashable) -> None:
        self._free.extend(reversed(self.blocks.pop(req, [])))
        self.lens.pop(req, None)

    # ---- step metadata -----------------------------------------------------------------------
    def block_table(self, reqs: Sequence[Hashable]) -> torch.Tensor:
        """[B, max_blocks] int32; unused entries are 0 (kernels never read past seq_len)."""
        width = max((len(self.blocks[r]) for r in reqs), default=0) or 1
        bt = torch.zeros(len(reqs), width, dtype=torch.int32)
        for i, r in enumerate(reqs):
            bt[i, :len(self.blocks[r])] = torch.tensor(self.blocks[r], dtype=torch.int32)
        return bt.to(self.device)

    def slots(self, req: Hashable, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions start..end-1 of `req` (flat index into [NB * BS])."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(self.blocks[req], dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    @staticmethod
    def write(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """cache[slots] = values (rows of the flattened [NB * BS, D]); inside a transaction the old
        rows are kept first so a failed step can put them back."""
        flat = cache.view(-1, cache.shape[-1])
        slots = slots.to(cache.device)
        journal = _JOURNALS.get(id(cache))
        if journal is not None:
            journal.rows.append((cache, slots, flat[slots]))  # advanced indexing: a copy
        flat[slots] = values.to(cache.dtype)
