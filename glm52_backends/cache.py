"""Paged caches: the MLA latent cache (every layer) and the index-key cache (IndexShare full layers).

Layout per layer: `[num_blocks, block_size, D]`. The latent cache is two paged tensors per layer,
`c` (kv_lora_rank values after kv_a_layernorm) and `k_pe` (qk_rope_head_dim values after RoPE),
as vllm-ascend and Huawei's GLM-5.2 recipe keep them; `index_k` holds the indexer keys. A request owns a list of blocks; position p of
request r lives in slot `blocks[r][p // bs] * bs + p % bs`. Blocks are reserved for a whole step
before anything is written, so running out raises `CacheExhausted` with the cache unchanged.

Formats (glm52_backends/cache_formats.py): `latent_format` ("dense", "fp8_ds_mla", "c8_sfa") and
`index_format` ("dense", "fp8", "c8_li"). A dense cache is the model dtype, as above. A quantized
one is one uint8 tensor per layer `[num_blocks, block_size * bytes_per_token]` (`tensors()` yields
these owners), and `c[l]`, `k_pe[l]`, `index_k[l]` are the views the ops receive (the codes, and
the bf16 rope of the latent rows); `write_latent` / `write_index` quantize and pack what they write.

A step that fails after reserving (a backend op raising mid-step, NaN logits) must leave the cache
as it was: `with cache.transaction(): ...` records each request's length and block count before the
step's `reserve` and, on any exception, rolls them back by length (blocks handed out return to the
free list in the order they left it). Nothing is copied: a step writes only positions at or past
its requests' old lengths, and no op reads a position at or past a request's length, so the rows it
left behind are unreachable and the next write overwrites them. A retry neither appends twice nor
reads a half-written step. Rejected drafts roll back the same way (`truncate`).

Prefix sharing (the serving engine's prefix cache, engine/scheduler.py): a full block can be
`publish`ed under a content hash (of every token up to its end) and later requests whose prompts
hash the same start on it (`share`) instead of recomputing it. A block counts the requests holding
it; `release` / `truncate` / `rollback` drop one reference, and a published block nobody holds is
kept, still findable, in least-recently-used order: `reserve` takes free blocks first and then
evicts the least recently used of these. `free_blocks` counts both (every block a step may take).
A shared block is always full and its holders only write past it, so no step writes into it.

Decode context parallelism (`dcp_size` D > 1, `dcp_rank` r; ops/dcp.py has the layout): this
cache is one rank's part. Blocks, block tables, lengths, rollback and prefix sharing are kept
exactly as without it (a block still covers `block_size` positions, and every rank of the dcp group
hands out the same block ids), but each block holds only `local_block_size` = block_size / D rows:
those of the positions p with p % D == r, at local row p // D. So a cache of N blocks holds 1/D of
the bytes; `local_slots` says where this rank writes a step's rows.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence

import torch

from . import cache_formats as cf
from .config import ModelConfig


class CacheExhausted(RuntimeError):
    """Not enough free cache blocks for the requested tokens; nothing was allocated."""


class Checkpoint:
    """Requests' block counts and lengths before a step grew them: what `rollback` restores."""

    def __init__(self) -> None:
        self.reserved: dict[Hashable, tuple[int, int | None]] = {}   # req -> (blocks owned, len or None)


class PagedCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", mtp: bool = False,
                 latent_format: str = "dense", index_format: str = "dense", dcp_size: int = 1, dcp_rank: int = 0):
        for what, v in (("num_blocks", num_blocks), ("block_size", block_size), ("dcp_size", dcp_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"cache: {what} must be a positive integer, got {v!r}")
        if isinstance(dcp_rank, bool) or not isinstance(dcp_rank, int) or not 0 <= dcp_rank < dcp_size:
            raise ValueError(f"cache: dcp_rank must be an integer in [0, {dcp_size}), got {dcp_rank!r}")
        if block_size % dcp_size:
            raise ValueError(f"cache: block_size {block_size} must be a multiple of dcp = {dcp_size} (each rank of "
                             f"the dcp group holds block_size / dcp rows of every block)")
        cf.check_format(latent_format, cf.LATENT)
        cf.check_format(index_format, cf.INDEX)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dcp_size, self.dcp_rank = dcp_size, dcp_rank
        self.local_block_size = lbs = block_size // dcp_size     # rows of each block held here
        self.dtype = dtype                       # the model's dtype: what a dense cache holds
        self.device = torch.device(device)
        self.latent_format, self.index_format = latent_format, index_format
        layers = list(range(cfg.num_hidden_layers)) + ([cfg.num_hidden_layers] if mtp else [])
        index_layers = cfg.full_layers + ([cfg.num_hidden_layers] if mtp else [])
        self._latent_dims = (cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        self._index_dims = (cfg.index_head_dim,)
        # owning tensors per layer: dense (c, k_pe) / (k,), or one packed uint8 tensor
        self._latent_store: dict[int, tuple[torch.Tensor, ...]] = {}
        self._index_store: dict[int, tuple[torch.Tensor, ...]] = {}
        self.c, self.k_pe, self.index_k = {}, {}, {}
        zeros = lambda w: torch.zeros(num_blocks, lbs, w, dtype=dtype, device=device)  # noqa: E731
        for l in layers:
            if latent_format == "dense":
                self.c[l], self.k_pe[l] = self._latent_store[l] = (zeros(cfg.kv_lora_rank), zeros(cfg.qk_rope_head_dim))
            else:
                st = cf.allocate(latent_format, self._latent_dims, num_blocks, lbs, device)
                self._latent_store[l] = (st,)
                self.c[l], self.k_pe[l] = cf.op_views(latent_format, self._latent_dims, st, lbs)
        for l in index_layers:
            if index_format == "dense":
                self.index_k[l] = zeros(cfg.index_head_dim)
                self._index_store[l] = (self.index_k[l],)
            else:
                st = cf.allocate(index_format, self._index_dims, num_blocks, lbs, device)
                self._index_store[l] = (st,)
                self.index_k[l], = cf.op_views(index_format, self._index_dims, st, lbs)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low blocks first
        self.blocks: dict[Hashable, list[int]] = {}
        self.lens: dict[Hashable, int] = {}
        self._open: Checkpoint | None = None
        self._null: int | None = None
        # prefix sharing: holders of each block; content hash <-> block of published full blocks; the
        # published blocks no request holds, least recently used first (evicted in that order)
        self._refs: list[int] = [0] * num_blocks
        self._hash_of: dict[int, Hashable] = {}
        self._by_hash: dict[Hashable, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor that owns cache memory (dense: latent c, k_pe, index keys; quantized: the
        packed uint8 tensor of each layer), every layer. Their bytes are the whole cache."""
        for store in (self._latent_store, self._index_store):
            for ts in store.values():
                yield from ts

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (every layer, every block)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_per_token(self) -> dict[str, int]:
        """Bytes one token takes in one layer: {"latent": ..., "index": ...}, from the formats."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        dense = {"latent": sum(self._latent_dims) * itemsize, "index": self._index_dims[0] * itemsize}
        out = {}
        for kind, fmt, dims in (("latent", self.latent_format, self._latent_dims),
                                ("index", self.index_format, self._index_dims)):
            out[kind] = dense[kind] if fmt == "dense" else sum(w for _, w in cf.parts(fmt, *dims))
        return out

    # ---- all or nothing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator["PagedCache"]:
        """Roll every request this block grows back to its length before the block if it raises
        (any exception, Ctrl-C too). Nested transactions join the outer one."""
        if self._open is not None:
            yield self
            return
        mark = self._open = Checkpoint()
        try:
            yield self
        except BaseException:
            self.rollback(mark)
            raise
        finally:
            self._open = None

    def mark(self, reqs: Sequence[Hashable]) -> Checkpoint:
        """The block counts and lengths of `reqs` now, for `rollback` after a step that grew them."""
        mark = Checkpoint()
        mark.reserved = {r: self._state(r) for r in reqs}
        return mark

    def _state(self, r: Hashable) -> tuple[int, int | None]:
        """(blocks owned, length or None when the request is new)."""
        return len(self.blocks.get(r, ())), self.lens.get(r)

    def null_block(self) -> int:
        """A block no request ever gets: padded rows of a static step write there and read nothing
        (vLLM's null block). Taken from the free list on the first call; the same block after."""
        if self._null is None:
            if not self._free:
                raise CacheExhausted("cache exhausted: no block left for the static step's padding block")
            self._null = self._free.pop(0)            # the highest block: requests get low blocks first
        return self._null

    def rollback(self, mark: Checkpoint) -> None:
        """Lengths and blocks back to what they were when `mark` was taken (by length: no copies)."""
        for r, (owned, length) in reversed(mark.reserved.items()):  # undo in reverse order of reserve
            blocks = self.blocks[r]
            self._drop(reversed(blocks[owned:]))          # back in the order pop() handed them out
            del blocks[owned:]
            if length is None:
                self.blocks.pop(r, None)
                self.lens.pop(r, None)
            else:
                self.lens[r] = length

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks a step may take: free ones and published ones no request holds (evicted LRU first)."""
        return len(self._free) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        """Blocks some request holds (shared blocks counted once)."""
        return self.num_blocks - self.free_blocks - (self._null is not None)

    @property
    def cached_blocks(self) -> int:
        """Published blocks no request holds: reusable by a prefix hit until evicted."""
        return len(self._cached)

    def _take(self) -> int:
        """One block for a request: a free one, else the least recently used unheld published one."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(b)]
            self.evictions += 1
        self._refs[b] = 1
        return b

    def _drop(self, blocks) -> None:
        """One holder less for each block; a block nobody holds is free again, or kept for prefix
        hits (most recently used last) when it is published."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def reserve(self, new_lens: dict[Hashable, int]) -> None:
        """Grow requests to the given total lengths, all or nothing."""
        need = {r: self.blocks_needed(n) - len(self.blocks.get(r, ())) for r, n in new_lens.items()}
        total = sum(max(n, 0) for n in need.values())
        if total > self.free_blocks:
            raise CacheExhausted(
                f"cache exhausted: this step needs {total} more blocks of {self.block_size} tokens, "
                f"{self.free_blocks} of {self.num_blocks} are free; lower the batch or context, "
                f"or build the cache with more blocks")
        mark = self._open
        for r, n in need.items():
            if mark is not None and r not in mark.reserved:
                mark.reserved[r] = self._state(r)
            owned = self.blocks.setdefault(r, [])
            owned.extend(self._take() for _ in range(max(n, 0)))
            self.lens[r] = new_lens[r]

    def truncate(self, req: Hashable, new_len: int) -> None:
        """Roll a request back to `new_len` tokens (speculative rejection); frees whole blocks."""
        if not 0 <= new_len <= self.lens[req]:
            raise ValueError(f"cannot truncate request {req!r} from {self.lens[req]} to {new_len} tokens")
        owned = self.blocks[req]
        keep = self.blocks_needed(new_len)
        self._drop(reversed(owned[keep:]))
        del owned[keep:]
        self.lens[req] = new_len

    def release(self, req: Hashable) -> None:
        self._drop(reversed(self.blocks.pop(req, [])))
        self.lens.pop(req, None)

    # ---- prefix sharing ----------------------------------------------------------------------
    def publish(self, block: int, key: Hashable) -> bool:
        """Make a full, finished block findable under `key` (the hash of every token up to its end).
        False when `key` already names a block or this block is published already."""
        if key in self._by_hash or block in self._hash_of:
            return False
        if self._refs[block] <= 0:
            raise ValueError(f"publish: block {block} is held by no request")
        self._by_hash[key], self._hash_of[block] = block, key
        return True

    def lookup(self, keys: Sequence[Hashable]) -> list[int]:
        """The published blocks of the longest run of `keys` from the first (a prompt's block hashes)."""
        out = []
        for k in keys:
            b = self._by_hash.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def holders(self, block: int) -> int:
        """Requests holding `block` (0: free, or published and kept for prefix hits)."""
        return self._refs[block]

    def share(self, req: Hashable, blocks: Sequence[int]) -> None:
        """Start the new request `req` on published blocks (a prefix hit): it holds them too, and its
        length is their tokens. Its own tokens go to blocks after them."""
        if req in self.blocks:
            raise ValueError(f"share: request {req!r} already holds blocks; a prefix hit starts a new request")
        for b in blocks:
            if b not in self._hash_of:
                raise ValueError(f"share: block {b} is not published")
        for b in blocks:
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1
        self.blocks[req] = list(blocks)
        self.lens[req] = len(blocks) * self.block_size

    # ---- step metadata -----------------------------------------------------------------------
    def block_table(self, reqs: Sequence[Hashable]) -> torch.Tensor:
        """[B, max_blocks] int32; unused entries are 0 (kernels never read past seq_len)."""
        width = max((len(self.blocks[r]) for r in reqs), default=0) or 1
        bt = torch.zeros(len(reqs), width, dtype=torch.int32)
        for i, r in enumerate(reqs):
            bt[i, :len(self.blocks[r])] = torch.tensor(self.blocks[r], dtype=torch.int32)
        return bt.to(self.device)

    def slots(self, req: Hashable, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions start..end-1 of `req` (flat index into [NB * BS]). With DCP these
        name a position's place in its block, not a row of this rank: writes use `local_slots`."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(self.blocks[req], dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def local_slots(self, req: Hashable, start: int, end: int) -> tuple[list[int], list[int]]:
        """Of positions start..end-1 of `req`, those this rank stores (p % dcp_size == dcp_rank): (their
        offsets from `start`, their slots in this rank's [NB * local_block_size] rows). Without DCP:
        every position, at `slots`."""
        D, r, bs, lbs = self.dcp_size, self.dcp_rank, self.block_size, self.local_block_size
        blocks = self.blocks[req]
        first = start + (r - start) % D
        mine = range(first, end, D)
        return [p - start for p in mine], [blocks[p // bs] * lbs + (p % bs) // D for p in mine]

    @staticmethod
    def write(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """cache[slots] = values for a dense paged tensor `[NB, BS, D]` (slots index the flattened
        [NB * BS]). Quantized caches are written through `write_latent` / `write_index`."""
        if not cache.is_floating_point() or cache.dtype == torch.float8_e4m3fn:
            raise TypeError(f"PagedCache.write: a {cache.dtype} cache tensor is a quantized cache's view; "
                            f"write it with cache.write_latent / cache.write_index")
        _put(cache, slots, values.to(cache.dtype))

    def write_latent(self, layer: int, slots: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Layer `layer`'s latent rows at `slots`: c [N, kv_lora_rank], k_pe [N, rope dim], in the
        cache's format (quantized and packed when it is not dense)."""
        if self.latent_format == "dense":
            for t, v in zip(self._latent_store[layer], (c, k_pe)):
                _put(t, slots, v.to(t.dtype))
            return
        view = cf.part_views(self.latent_format, self._latent_dims, self._latent_store[layer][0], self.local_block_size)
        for name, rows in cf.encode_latent(self.latent_format, c, k_pe).items():
            _put(view[name], slots, rows)

    def write_index(self, layer: int, slots: torch.Tensor, k: torch.Tensor) -> None:
        """Layer `layer`'s index keys at `slots`: k [N, index_head_dim], in the cache's index format."""
        if self.index_format == "dense":
            t, = self._index_store[layer]
            _put(t, slots, k.to(t.dtype))
            return
        view = cf.part_views(self.index_format, self._index_dims, self._index_store[layer][0], self.local_block_size)
        for name, rows in cf.encode_index(self.index_format, k).items():
            _put(view[name], slots, rows)


def _put(view: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """view[slot // BS, slot % BS] = rows for a paged `[NB, BS, w]` tensor or strided view."""
    slots = slots.to(view.device).long()
    bs = view.shape[1]
    view[slots // bs, slots % bs] = rows
