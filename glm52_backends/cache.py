"""Paged caches: the MLA latent cache (every layer) and the index-key cache (IndexShare full layers).

Layout per layer: `[num_blocks, block_size, D]`. The latent cache is two paged tensors per layer,
`c` (kv_lora_rank values after kv_a_layernorm) and `k_pe` (qk_rope_head_dim values after RoPE),
as vllm-ascend and Huawei's GLM-5.2 recipe keep them; `index_k` holds the indexer keys. A request owns a list of blocks; position p of
request r lives in slot `blocks[r][p // bs] * bs + p % bs`. Blocks are reserved for a whole step
before anything is written, so running out raises `CacheExhausted` with the cache unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .config import ModelConfig


class CacheExhausted(RuntimeError):
    """Not enough free cache blocks for the requested tokens; nothing was allocated."""


class PagedCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", mtp: bool = False):
        if block_size <= 0 or num_blocks <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
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
        for r, n in need.items():
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
        cache.view(-1, cache.shape[-1])[slots.to(cache.device)] = values.to(cache.dtype)
