"""`GLM52`: the user-facing facade over one network, one backend, one device.

    model = GLM52("path/to/GLM-5.2", backend="auto")      # HF folder: BF16 or block-FP8
    logits = model([[1, 2, 3]])                            # stateless full forward
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, speculative=3)

Here: backend and dtype choice, loading (checkpoint, or random weights for a `ModelConfig`), the
tokenizer, paged caches, `extend` (append tokens to requests in a cache) and prompt validation.
The network is `model.Glm52Network`; generation is `engine/generation.py`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..cache import PagedCache
from ..config import ModelConfig
from ..model import Glm52Network
from ..registry import BoundBackend, get_backend
from ..weights import float32_tensor
from .generation import GenerationResult, generate


class GLM52:
    """GLM-5.x inference on a pluggable backend.

    `GLM52(path_or_config, backend="auto" | name | backend object, device=None, dtype=None)`.
    `model(input_ids)` is a stateless full forward; `generate` runs batched paged decoding.
    """

    def __init__(self, model: str | os.PathLike | ModelConfig, *, backend: Any = "auto", device=None,
                 dtype: torch.dtype | None = None, block_size: int = 16, progress: bool = True,
                 include_mtp: bool | None = None, seed: int = 0, state_dict: dict | None = None):
        self.ops: BoundBackend = get_backend(backend)
        caps = self.ops.capabilities
        self.device = torch.device(device if device is not None
                                   else getattr(self.ops.backend, "device", None) or "cpu")
        self.dtype = dtype or caps.get("default_dtype") or torch.float32
        self.block_size = block_size
        self.path = None
        self.tokenizer = None
        if isinstance(model, ModelConfig):
            self.cfg = model
            if state_dict is None:  # random weights in the real layout (benchmarks, planner checks)
                from ..tiny import random_state_dict
                state_dict = random_state_dict(model, seed=seed, dtype=self.dtype,
                                               include_mtp=bool(include_mtp or (include_mtp is None and model.mtp_layer)))
            sd = dict(state_dict)
        else:
            from ..loader import load_checkpoint, load_tokenizer
            self.path = os.fspath(model)
            self.cfg, sd = load_checkpoint(self.path, dtype=self.dtype, device=self.device,
                                           include_mtp=include_mtp, progress=progress)
            self.tokenizer = load_tokenizer(self.path)
        cfg = self.cfg
        self.has_mtp = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in sd
        sd = {k: v.to(self.device, torch.float32 if float32_tensor(k) else self.dtype) for k, v in sd.items()}
        self.net = Glm52Network(cfg, sd, self.ops, self.device, include_mtp=self.has_mtp)

    from_pretrained = classmethod(lambda cls, *a, **k: cls(*a, **k))

    @classmethod
    def from_deployment(cls, deployment: Any, **overrides) -> "GLM52":
        """Build model, backend and device from a deployment YAML (`configs/*.yaml`, a bundled name,
        or a `DeploymentConfig`). Overrides: model, backend, device, dtype and any `GLM52` keyword.
        Runs on one process: the parallel layout is for planning."""
        from ..deploy import load_deployment
        model, kwargs = load_deployment(deployment).model_arguments(**overrides)
        return cls(model, **kwargs)

    # ---- the network's parts, for callers that drive steps themselves ---------------------------
    @property
    def backend_name(self) -> str:
        return self.ops.name

    @property
    def mtp(self):
        return self.net.mtp

    @property
    def layers(self):
        return self.net.layers

    def run(self, cache: PagedCache, chunks: dict[Hashable, Sequence[int]]):
        """Append tokens to requests; (step, final-normed hidden states [T, Hd])."""
        return self.net.run(cache, chunks)

    def run_mtp(self, cache: PagedCache, chunks, hidden: torch.Tensor, shared_idx: torch.Tensor | None = None):
        """The MTP layer over one step: (step, hidden [T, Hd], logits [T, V], top-k used)."""
        return self.net.run_mtp(cache, chunks, hidden, shared_idx)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.net.logits(h)

    # ---- caches ---------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int, *, block_size: int | None = None, mtp: bool = False) -> PagedCache:
        """A paged cache holding `max_tokens` tokens in total over all requests."""
        bs = block_size or self.block_size
        return PagedCache(self.cfg, max(1, -(-max_tokens // bs)), bs, dtype=self.dtype, device=self.device,
                          mtp=mtp and self.has_mtp)

    @torch.inference_mode()
    def extend(self, cache: PagedCache, chunks: dict[Hashable, Sequence[int]], *, last_only: bool = False
               ) -> dict[Hashable, torch.Tensor]:
        """Append tokens to requests in `cache` (prefill, chunked prefill or decode, mixed freely).

        Returns per request the logits [q_len, V] of the new tokens (only the last one if
        `last_only`). The cache advances; a bad token, an over-long context or a full cache raises
        before anything is written.
        """
        st, h = self.net.run(cache, chunks)
        cu = st.meta.cu_host
        if last_only:
            rows = torch.tensor([e - 1 for e in cu[1:]], device=h.device)
            lg = self.net.logits(h[rows])
            return {r: lg[i:i + 1] for i, r in enumerate(st.reqs)}
        lg = self.net.logits(h)
        return {r: lg[cu[i]:cu[i + 1]] for i, r in enumerate(st.reqs)}

    def __call__(self, input_ids) -> torch.Tensor | list[torch.Tensor]:
        """Stateless full forward. `[B, T]` tensor -> logits `[B, T, V]` (f32);
        a list of token-id lists (lengths may differ) -> a list of `[T_i, V]`."""
        as_tensor = isinstance(input_ids, torch.Tensor)
        if as_tensor:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
            prompts = input_ids.tolist()
        else:
            prompts = [list(p) for p in input_ids]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every sequence needs at least one token")
        cache = self.new_cache(sum(len(p) + self.block_size for p in prompts))
        out = self.extend(cache, dict(enumerate(prompts)))
        logits = [out[i] for i in range(len(prompts))]
        return torch.stack(logits) if as_tensor else logits

    forward = __call__

    # ---- prompts ----------------------------------------------------------------------------------
    def check_tokens(self, ids: Sequence[int], where: str) -> None:
        V = self.cfg.vocab_size
        for j, t in enumerate(ids):
            if not 0 <= int(t) < V:
                raise ValueError(f"{where}: token id {int(t)} at position {j} is outside the vocabulary [0, {V})")

    def encode_prompts(self, prompts) -> list[list[int]]:
        """Token-id lists from a `[B, T]` tensor, token-id lists, or strings (with a tokenizer)."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"prompts tensor must be [B, T], got {tuple(prompts.shape)}")
            prompts = prompts.tolist()
        elif isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer.json in the checkpoint; pass token ids instead")
                p = self.tokenizer.encode(p)
            p = [int(t) for t in p]
            if not p:
                raise ValueError("every prompt needs at least one token")
            self.check_tokens(p, f"prompt {i}")
            out.append(p)
        return out

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, speculative: int = 0, prefill_chunk: int | None = None,
                 stop_at_eos: bool = True, cache_tokens: int | None = None) -> GenerationResult:
        """Batched generation over paged caches.

        prompts: list of token-id lists (or strings with a tokenizer), or a `[B, T]` tensor.
        Returns `.tokens` (new ids per prompt) and `.stats` (prefill/decode time, tokens/s,
        which ops ran natively). `prefill_chunk` splits prompts into chunks of that many tokens.
        `speculative=k` drafts k tokens per step with the MTP layer and verifies them in one target
        step (greedy: the same tokens as plain decoding; sampling: the same distribution); stats
        then add `mean_acceptance_length` and `verify_steps`.
        """
        return generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, speculative=speculative, prefill_chunk=prefill_chunk, stop_at_eos=stop_at_eos,
                        cache_tokens=cache_tokens)
