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

Host offload (`offload_blocks` S; `HostOffload` below): the latent rows of every block live in host memory
(`_latent_store`), the index keys on the device; `c[l]` / `k_pe[l]` are then the op views of a device
staging area of S blocks (+ one null block) per layer, filled per IndexShare group by the model's
fetch plan and kept equal to the host rows by `write_latent` (write-through). Off by default.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence

import torch

from . import cache_formats as cf
from .config import ModelConfig
from .ops.dcp import to_local


class CacheExhausted(RuntimeError):
    """Not enough free cache blocks for the requested tokens; nothing was allocated."""


class Checkpoint:
    """Requests' block counts and lengths before a step grew them: what `rollback` restores."""

    def __init__(self) -> None:
        self.reserved: dict[Hashable, tuple[int, int | None]] = {}   # req -> (blocks owned, len or None)


class PagedCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", mtp: bool = False,
                 latent_format: str = "dense", index_format: str = "dense", dcp_size: int = 1, dcp_rank: int = 0,
                 offload_blocks: int | None = None):
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
        self.num_layers = cfg.num_hidden_layers        # the target layers it was built for (MTP's: one more)
        layers = list(range(cfg.num_hidden_layers)) + ([cfg.num_hidden_layers] if mtp else [])
        index_layers = cfg.full_layers + ([cfg.num_hidden_layers] if mtp else [])
        self._latent_dims = (cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        self._index_dims = (cfg.index_head_dim,)
        # owning tensors per layer: dense (c, k_pe) / (k,), or one packed uint8 tensor
        self._latent_store: dict[int, tuple[torch.Tensor, ...]] = {}
        self._index_store: dict[int, tuple[torch.Tensor, ...]] = {}
        self.c, self.k_pe, self.index_k = {}, {}, {}
        zeros = lambda w, dev=device: torch.zeros(num_blocks, lbs, w, dtype=dtype, device=dev)  # noqa: E731
        # host offload (HostOffload): the latent rows live in host memory, the ops read a device staging area
        host = device if offload_blocks is None else "cpu"
        for l in layers:
            if latent_format == "dense":
                self.c[l], self.k_pe[l] = self._latent_store[l] = (zeros(cfg.kv_lora_rank, host),
                                                                   zeros(cfg.qk_rope_head_dim, host))
            else:
                st = cf.allocate(latent_format, self._latent_dims, num_blocks, lbs, host)
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
        self.offload: HostOffload | None = None
        if offload_blocks is not None:
            if self.device.type != "cpu" and torch.cuda.is_available():     # pinned: asynchronous fetches
                self._latent_store = {l: tuple(t.pin_memory() for t in ts) for l, ts in self._latent_store.items()}
            self.offload = HostOffload(self, cfg, offload_blocks, layers)
            for l in layers:                     # the ops see the device staging area (HostOffload)
                if latent_format == "dense":
                    self.c[l], self.k_pe[l] = self.offload.stage[l]
                else:
                    self.c[l], self.k_pe[l] = cf.op_views(latent_format, self._latent_dims, self.offload.stage[l][0], lbs)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor that owns cache memory (dense: latent c, k_pe, index keys; quantized: the
        packed uint8 tensor of each layer), every layer. Their bytes are the whole cache. With host
        offload the latent ones are in host memory, and the staging area (`offload.stage`) comes last."""
        for store in (self._latent_store, self._index_store):
            for ts in store.values():
                yield from ts
        if self.offload is not None:
            for ts in self.offload.stage.values():
                yield from ts

    @property
    def device_nbytes(self) -> int:
        """Bytes the cache holds on its device: `nbytes`, less the host-offloaded latent rows."""
        if self.offload is None:
            return self.nbytes
        host = sum(t.numel() * t.element_size() for ts in self._latent_store.values() for t in ts)
        return self.nbytes - host

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
        D, r = self.dcp_size, self.dcp_rank
        first = start + (r - start) % D
        mine = range(first, end, D)
        return [p - start for p in mine], [self.slot_here(req, p) for p in mine]

    def slot_here(self, req: Hashable, p: int) -> int | None:
        """Position p of `req`: its slot in this rank's rows, None when another dcp rank stores it."""
        D = self.dcp_size
        if p % D != self.dcp_rank:
            return None
        return self.blocks[req][p // self.block_size] * self.local_block_size + (p % self.block_size) // D

    @staticmethod
    def write(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """cache[slots] = values for a dense paged tensor `[NB, BS, D]` (slots index the flattened
        [NB * BS]). Quantized caches are written through `write_latent` / `write_index`."""
        if not cache.is_floating_point() or cache.dtype == torch.float8_e4m3fn:
            raise TypeError(f"PagedCache.write: a {cache.dtype} cache tensor is a quantized cache's view; "
                            f"write it with cache.write_latent / cache.write_index")
        _put(cache, slots, values.to(cache.dtype))

    def latent_parts(self, layer: int) -> list[torch.Tensor]:
        """A layer's latent rows as they are stored, one [num_blocks, local_block_size, width] tensor per part:
        dense (c, k_pe) in the model dtype, a packed format's parts as uint8 (cache_formats.part_views). With
        host offload, the host rows."""
        store = self._latent_store[layer]
        if self.latent_format == "dense":
            return list(store)
        return list(cf.part_views(self.latent_format, self._latent_dims, store[0], self.local_block_size).values())

    def latent_views(self, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ops' (c_cache, kpe_cache) over rows laid out as `latent_parts` gives them, [pages, bs, width]
        each (e.g. rows gathered elsewhere): the same format, any block size."""
        if self.latent_format == "dense":
            c, k_pe = parts
            return c, k_pe
        flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1)   # the storage: each part's rows in turn
        return cf.op_views(self.latent_format, self._latent_dims, flat, parts[0].shape[1])

    def write_latent(self, layer: int, slots: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Layer `layer`'s latent rows at `slots`: c [N, kv_lora_rank], k_pe [N, rope dim], in the
        cache's format (quantized and packed when it is not dense). With host offload: the host rows,
        and the staged copy of a block resident on the device (HostOffload)."""
        self._put_latent(self._latent_store[layer], slots, c, k_pe)
        if self.offload is not None:
            self.offload.write_through(layer, slots, lambda store, at, keep: self._put_latent(store, at, c[keep.to(c.device)],
                                                                                            k_pe[keep.to(k_pe.device)]))

    def _put_latent(self, store: tuple[torch.Tensor, ...], slots: torch.Tensor, c: torch.Tensor,
                    k_pe: torch.Tensor) -> None:
        if self.latent_format == "dense":
            for t, v in zip(store, (c, k_pe)):
                _put(t, slots, v.to(t.device, t.dtype))
            return
        view = cf.part_views(self.latent_format, self._latent_dims, store[0], self.local_block_size)
        for name, rows in cf.encode_latent(self.latent_format, c, k_pe).items():
            _put(view[name], slots, rows.to(view[name].device))

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


# ---- host offload of cold latent blocks -----------------------------------------------------------
# Host offload of cold latent blocks, one fetch plan per IndexShare group.
#
# `PagedCache(..., offload_blocks=S)` (`GLM52(..., offload=S)`, `model.new_cache(..., offload_blocks=S)`)
# keeps the cache in two places:
#
# - host memory: the latent rows (`c`, `k_pe`, in the cache's format) of every block of every layer,
#   authoritative (pinned when the device is not the CPU);
# - the device: the index keys of every block (the indexer scores every position, so they stay fully
#   resident), and per latent layer a staging area of S blocks plus one null block. `cache.c[l]` and
#   `cache.k_pe[l]` are the op views of that staging area.
#
# IndexShare groups: a full layer and the shared layers after it use one top-k, so they read the same
# blocks; the MTP layer is a group of its own. Each group has one residency map (block -> staging slot),
# used by all its layers: a block is resident for the group or not, in every layer of it at once.
#
# A step, per group, when the group's top-k is known (its full layer, or the MTP layer):
#   plan      the blocks the top-k selects (every query token's positions, through its request's block
#             table), minus those resident: that is the fetch. Slots come from free ones, then from the
#             least recently used resident blocks the step does not select.
#   fetch     host -> staging, once for the whole group: the block's rows of every layer of the group.
#   attend    each layer calls `sparse_mla` unchanged on the staging views, with the step's block table
#             remapped (block id -> slot; every block not staged -> the null block, filled with NaN / 0xFF
#             bytes: the op contract says unselected rows never reach the output, and the poison makes any
#             read of an unstaged block visible).
# The shared layers of the group find every block resident: they fetch nothing.
#
# Writes go to the host rows and, for a block resident in the layer's group, to its staged copy too
# (write-through), so a staged block always equals its host rows and needs no write-back.
#
# A step whose selected blocks exceed S (a prefill chunk: every early position is selected) runs
# `sparse_mla` over consecutive runs of its query tokens whose selections fit, each staged in turn;
# then a layer may fetch again what an earlier layer of the group evicted (the bytes are counted).
# One query token needing more than S blocks raises `OffloadTooSmall`.
#
# `log` records per step and group the blocks selected, fetched, and the dense fetch (every block of
# the step's requests), for the tables (benchmarks/offload_cpu.py). Under decode context parallelism each
# rank offloads its own rows (1/dcp of every block: the staging area and the host rows are in the local
# block size) and plans from the selected positions it holds; the ranks' plans differ, their ops do not
# communicate. Captured graph steps are refused with the reason.
class OffloadTooSmall(RuntimeError):
    """A query token selects more blocks than the offload staging area holds."""


class HostOffload:
    """The staging area, residency maps and fetch plans of one `PagedCache` (see the comment above)."""

    def __init__(self, cache, cfg, slots: int, layers: Sequence[int]):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots <= 0:
            raise ValueError(f"cache: offload_blocks must be a positive integer (device-resident latent blocks "
                             f"per layer), got {slots!r}")
        self.cache, self.slots, self.null = cache, slots, slots      # slot `slots` is the null block
        n = cfg.num_hidden_layers
        self.group_of = {l: (cfg.index_source(l) if l < n else n) for l in layers}   # leader layer of each
        self.members: dict[int, list[int]] = {}
        for l in layers:
            self.members.setdefault(self.group_of[l], []).append(l)
        fmt, dims, lbs, dev = cache.latent_format, cache._latent_dims, cache.local_block_size, cache.device
        self.stage: dict[int, tuple[torch.Tensor, ...]] = {}
        for l in layers:                           # the device staging area: S blocks + the null block
            if fmt == "dense":
                st = tuple(torch.zeros(slots + 1, lbs, w, dtype=cache.dtype, device=dev) for w in dims)
                for t in st:
                    t[slots] = float("nan")
            else:
                st = (cf.allocate(fmt, dims, slots + 1, lbs, dev),)
                st[0][slots] = 0xFF
            self.stage[l] = st
        self.block_bytes = sum(t[0].numel() * t.element_size() for t in self.stage[layers[0]])   # one layer
        NB = cache.num_blocks
        self.lut = {g: torch.full((NB,), self.null, dtype=torch.long) for g in self.members}  # block -> slot
        self.lut_dev = {g: t.to(dev) for g, t in self.lut.items()}
        self.owner = {g: [-1] * slots for g in self.members}                                  # slot -> block
        self.used = {g: [0] * slots for g in self.members}                                    # last step used
        self.plans: dict[int, list[tuple[int, int, list[int]]]] = {}   # group -> this step's token runs
        self.step, self.kind, self.reqs = 0, None, []
        self.log: list[dict] = []

    # ---- bytes -----------------------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        """Bytes of the staging areas (every latent layer, S + 1 blocks each)."""
        return sum(t.numel() * t.element_size() for st in self.stage.values() for t in st)

    # ---- a step ----------------------------------------------------------------------------------
    def begin(self, st, kind: str) -> None:
        """A new step (`kind` "target" or "mtp") of the model over this cache."""
        if not isinstance(st.meta.seq_lens_host, tuple):
            raise RuntimeError("a cache with host offload plans each step's fetch on the host from the top-k; a "
                               "captured graph step cannot replay that (run decode steps eagerly: graph=False)")
        self.step += 1
        self.kind, self.reqs, self.plans = kind, list(st.reqs), {}

    def _dense_blocks(self) -> int:
        """Distinct blocks the step's requests hold: what fetching their whole context would move."""
        return len({b for r in self.reqs for b in self.cache.blocks[r]})

    def plan(self, layer: int, idx: torch.Tensor, st) -> None:
        """The group's top-k `idx` [T, topk] (positions, -1 none) is known: split its query tokens into
        runs whose selected blocks fit the staging area (one run when the step fits) and log them."""
        g = self.group_of[layer]
        meta, d = st.meta, st.dcp
        if d is None:           # positions, through each token's block table
            rows, bt, bs = idx.long(), meta.block_table.index_select(0, meta.token_request.long()).long(), \
                self.cache.block_size
        else:                   # DCP: this rank's local rows of the selection (ops/dcp.py), its local block size
            rows, bt, bs = to_local(idx, d.size, d.rank).long(), d.block_table.long(), self.cache.local_block_size
        keep = rows >= 0
        blk = torch.where(keep, bt.gather(1, rows.clamp(min=0) // bs), -1)
        per_token = [sorted(set(row) - {-1}) for row in blk.tolist()]                   # the plan's host read
        runs: list[tuple[int, int, list[int]]] = []
        a, cur = 0, set()
        for t, need in enumerate(per_token):
            if len(need) > self.slots:
                raise OffloadTooSmall(
                    f"host offload: query token {t} of this step selects {len(need)} blocks at layer {layer}, more "
                    f"than the {self.slots} blocks of the staging area; build the cache with offload_blocks >= "
                    f"{len(need)} (the top-k spans at most index_topk blocks)")
            if len(cur | set(need)) > self.slots:
                runs.append((a, t, sorted(cur)))
                a, cur = t, set()
            cur |= set(need)
        runs.append((a, len(per_token), sorted(cur)))
        self.plans[g] = runs
        union = set().union(*map(set, per_token)) if per_token else set()
        self.log.append({"step": self.step, "kind": self.kind, "group": g, "layers": len(self.members[g]),
                         "tokens": len(per_token), "dense_blocks": self._dense_blocks(), "selected_blocks": len(union),
                         "runs": len(runs), "fetched_blocks": 0, "fetched_bytes": 0})

    def runs(self, layer: int) -> list[tuple[int, int, list[int]]]:
        g = self.group_of[layer]
        if g not in self.plans:
            raise RuntimeError(f"internal: layer {layer} attends before its IndexShare group (layer {g}) planned "
                               f"its fetch this step")
        return self.plans[g]

    def stage_blocks(self, layer: int, blocks: list[int]) -> torch.Tensor:
        """Make `blocks` resident for the group of `layer` (fetching the missing ones for every layer
        of the group); returns the group's block -> slot map on the device [num_blocks]."""
        g = self.group_of[layer]
        lut, owner, used = self.lut[g], self.owner[g], self.used[g]
        want = set(blocks)
        missing = [b for b in blocks if int(lut[b]) == self.null]
        if missing:
            free = [s for s in range(self.slots) if owner[s] < 0]
            free += sorted((s for s in range(self.slots) if owner[s] >= 0 and owner[s] not in want),
                           key=lambda s: (used[s], s))                          # least recently used first
            slots = free[:len(missing)]
            if len(slots) < len(missing):
                raise RuntimeError(f"internal: host offload planned {len(blocks)} blocks for {self.slots} slots")
            for s in slots:
                if owner[s] >= 0:
                    lut[owner[s]] = self.null
            src = torch.tensor(missing, dtype=torch.long)
            dst = torch.tensor(slots, dtype=torch.long, device=self.cache.device)
            for m in self.members[g]:                           # one fetch for the whole group
                for host, stg in zip(self.cache._latent_store[m], self.stage[m]):
                    stg[dst] = host[src].to(stg.device, non_blocking=True)
            for b, s in zip(missing, slots):
                owner[s], lut[b] = b, s
            self.lut_dev[g] = lut.to(self.cache.device)
            rec = next(r for r in reversed(self.log) if r["group"] == g)
            rec["fetched_blocks"] += len(missing)
            rec["fetched_bytes"] += len(missing) * self.block_bytes * len(self.members[g])
        for b in blocks:
            used[int(lut[b])] = self.step
        return self.lut_dev[g]

    def write_through(self, layer: int, slots: torch.Tensor, put) -> None:
        """Rows just written to the host at `slots` also go to the staged copies of resident blocks:
        `put(store, slots, rows_mask)` writes the kept rows into a staging store at the given slots."""
        lbs = self.cache.local_block_size
        slots = slots.long().cpu()
        where = self.lut[self.group_of[layer]][slots // lbs]
        keep = where != self.null
        if bool(keep.any()):
            put(self.stage[layer], where[keep] * lbs + slots[keep] % lbs, keep)
