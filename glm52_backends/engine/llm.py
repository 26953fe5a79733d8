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

from .. import cache_formats
from ..cache import PagedCache
from ..config import ModelConfig
from ..model import Glm52Network
from ..engine_config import EngineConfig
from ..registry import BoundBackend, get_backend
from ..weights import float32_tensor
from . import arguments
from .generation import GenerationResult, generate
from .turns import DpTurns

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_init(model: Any, backend: Any, device: Any, dtype: Any, block_size: Any) -> None:
    """GLM52's own arguments, before anything is loaded."""
    if not isinstance(model, (str, os.PathLike, ModelConfig)):
        raise ValueError(f"GLM52: model must be a checkpoint folder or a ModelConfig, got {type(model).__name__}")
    if backend is None:
        raise ValueError("GLM52: backend=None; give 'auto', a registered name or a backend object")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"GLM52: dtype must be one of {', '.join(str(d) for d in _DTYPES)}, got {dtype!r}")
    arguments.positive_int("GLM52: block_size", block_size, allow_none=True)
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"GLM52: device {device!r} is not a torch device ({e})") from None


def _cache_formats(kv_cache_dtype: Any, index_cache_dtype: Any, dtype: torch.dtype) -> tuple[str, str]:
    """(latent format, index format) from vLLM-style cache dtypes: "auto" (the model dtype), a float
    dtype equal to the model's, "fp8" (= "fp8_e4m3", "fp8_ds_mla"), "int8" (Ascend C8), or a format
    name (cache_formats.py). The index cache follows the latent one when `index_cache_dtype` is None."""
    lat = cache_formats.resolve(cache_formats.LATENT, kv_cache_dtype, dtype)
    if index_cache_dtype is None:
        index_cache_dtype = {"fp8_ds_mla": "fp8", "c8_sfa": "c8_li"}.get(lat, "auto")
    return lat, cache_formats.resolve(cache_formats.INDEX, index_cache_dtype, dtype)


class GLM52:
    """GLM-5.x inference on a pluggable backend.

    `GLM52(path_or_config, config=None, *, state_dict=None, **settings)`: the engine's settings are one
    `EngineConfig` (engine_config.py; `self.config`), given whole and/or as keywords by their flat names
    (`backend="auto" | name | backend object`, `device`, `dtype`, `quantization`, `graph`, `tp`, `dp`,
    `ep`, `dcp`, `block_size`, `kv_cache_dtype`, `index_cache_dtype`, `offload`, ...; a keyword changes
    the given config). `quantization`: None runs the checkpoint's stored format (BF16, block-FP8,
    msModelSlim W8A8 / W4A8: quantized linears stay quantized on the device); "fp8" / "w8a8" / "w4a8"
    quantize a BF16 checkpoint's linears at load (online; w8a8 online is dynamic only); "none"
    dequantizes a quantized checkpoint at load (loader.py has the table).
    `model(input_ids)` is a stateless full forward; `generate` runs batched paged decoding.
    """

    def __init__(self, model: str | os.PathLike | ModelConfig, config: EngineConfig | None = None, *,
                 state_dict: dict | None = None, **settings: Any):
        if config is not None and not isinstance(config, EngineConfig):
            raise ValueError(f"GLM52: config must be an EngineConfig (engine_config.py), got {type(config).__name__}")
        # every setting: the config's, changed by the keyword arguments (flat names: EngineConfig.settings())
        self.config = (config or EngineConfig()).replace("GLM52", **settings)
        c = self.config
        backend, device, dtype, block_size = c.backend, c.device, c.dtype, c.cache.block_size
        progress, include_mtp, seed, collective, quantization = (c.progress, c.include_mtp, c.seed, c.collective,
                                                                 c.quantization)
        graph, offload = c.graph, c.cache.offload
        kv_cache_dtype, index_cache_dtype = c.cache.kv_cache_dtype, c.cache.index_cache_dtype
        _check_init(model, backend, device, dtype, block_size)
        self.graph = arguments.graph_choice("GLM52: graph", graph)
        # host offload of cold latent blocks (cache.HostOffload): the device-resident latent blocks per layer of
        # every cache `new_cache` makes; None: the whole cache on the device
        arguments.positive_int("GLM52: offload", offload, allow_none=True)
        self.offload = offload
        if offload is not None:
            if self.graph is True or self.graph in ("trace", "compile"):
                raise ValueError(f"GLM52: graph={self.graph!r} with offload={offload}: each step's fetch is planned on "
                                 f"the host from the top-k, which a captured graph cannot replay (graph=False)")
            self.graph = False      # "auto": decode steps run eagerly
        # `generate`'s engine (engine/scheduler.py) when it captured graphs: its cache and graphs serve later calls
        self.generate_engine = None
        self.deployment = None            # the DeploymentConfig of `from_deployment` (its step budget: the CLI's chunk)
        arguments.quantization(quantization)
        self.ops: BoundBackend = get_backend(backend)
        caps = self.ops.capabilities
        self.device = torch.device(device if device is not None
                                   else getattr(self.ops.backend, "device", None) or "cpu")
        if self.device.type == "cpu":     # one CPU device: "cpu:0" is where tensors say "cpu"
            self.device = torch.device("cpu")
        self.dtype = dtype or caps.get("default_dtype") or torch.float32
        # cache formats (cache_formats.py): "auto" = the model dtype; "fp8" -> fp8_ds_mla latent + fp8
        # index keys, "int8" -> Ascend c8_sfa + c8_li; the index cache follows the latent's unless named
        self.kv_cache_format, self.index_cache_format = _cache_formats(kv_cache_dtype, index_cache_dtype, self.dtype)
        # tokens per cache block: asked for, else the backend's (Ascend's fused attention: 128), else 16
        self.block_size = block_size or caps.default_block_size or 16
        self.path = None
        self.tokenizer = None
        # many devices: this rank's layout, device and collectives (parallel.py, engine/distributed.py)
        self.plan = c.parallel
        if self.plan.dcp > 1:     # decode context parallelism: each rank of a dcp group holds 1/dcp of every block
            if self.block_size % self.plan.dcp:
                raise ValueError(f"GLM52: block_size {self.block_size} must be a multiple of dcp = {self.plan.dcp} "
                                 f"(each rank of the dcp group holds block_size / dcp rows of every cache block)")
            if offload is not None and not caps.sparse_mla_lse:
                raise ValueError(f"GLM52: offload={offload} with dcp = {self.plan.dcp} needs sparse_mla's log-sum-exp, "
                                 f"which backend {self.ops.name!r} does not return natively (its DCP attention "
                                 f"gathers the selected rows from the cache instead); use one or the other")
        self.layout, self.comms, self.load_stats = None, None, {}
        if self.plan.world_size > 1:
            from ..loader import load_config
            from .distributed import setup
            cfg0 = model if isinstance(model, ModelConfig) else load_config(model)
            self.layout, self.device, self.comms = setup(self.plan, cfg0, self.device, collective)
        else:   # a one-process plan under a launch of several would run the whole model on every rank
            from .distributed import check_world
            check_world(self.plan)
        if isinstance(model, ModelConfig):
            self.cfg = model
            if state_dict is None:  # random weights in the real layout (benchmarks, planner checks)
                from ..tiny import random_state_dict
                state_dict = random_state_dict(model, seed=seed, dtype=self.dtype,
                                               include_mtp=bool(include_mtp or (include_mtp is None and model.mtp_layer)))
            else:  # the user's weights: names, shapes, dtypes, NaN/inf checked like a checkpoint's
                arguments.state_dict(model, state_dict, isinstance(state_dict, dict) and
                                     f"model.layers.{model.num_hidden_layers}.eh_proj.weight" in state_dict)
            from ..loader import convert_state_dict, local_part
            sd = convert_state_dict(dict(state_dict), quantization)   # quantized / dequantized as asked
            if self.layout is not None:      # whole tensors in memory: keep this rank's slices
                sd = {k: v for k, v in ((k, local_part(self.layout, k, v)) for k, v in sd.items()) if v is not None}
        else:
            from ..loader import load_checkpoint, load_checkpoint_shard, load_tokenizer
            self.path = os.fspath(model)
            if self.layout is not None:      # read only this rank's slices
                self.cfg, sd = load_checkpoint_shard(self.path, self.layout, dtype=self.dtype, device=self.device,
                                                     include_mtp=include_mtp, progress=progress, stats=self.load_stats,
                                                     quantization=quantization)
            else:
                self.cfg, sd = load_checkpoint(self.path, dtype=self.dtype, device=self.device,
                                               include_mtp=include_mtp, progress=progress, stats=self.load_stats,
                                               quantization=quantization)
            self.tokenizer = load_tokenizer(self.path)
        cfg = self.cfg
        self.has_mtp = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in sd
        sd = {k: v.to(self.device, torch.float32 if float32_tensor(k) else self.dtype) for k, v in sd.items()}
        self.net = Glm52Network(cfg, sd, self.ops, self.device, include_mtp=self.has_mtp, layout=self.layout,
                                comm=self.comms.tp if self.comms else None,
                                dp_comm=self.comms.dp if self.comms else None,
                                ep_comm=self.ops.expert_collectives(self.comms, self.layout) if self.comms else None,
                                dcp_comm=self.comms.dcp if self.comms else None)
        self.net.prepare_weights(lambda name, w: self.ops.prepare_weight(name, w, dtype=self.dtype))
        # EP stage 2: the dp groups agree on every step before it runs (engine/turns.py)
        self.turns = DpTurns(self.net, self.net.dp_comm) if self.net.dp_comm is not None else None

    from_pretrained = classmethod(lambda cls, *a, **k: cls(*a, **k))

    @classmethod
    def from_deployment(cls, deployment: Any, **overrides) -> "GLM52":
        """Build model, backend and device from a deployment YAML (`configs/*.yaml`, a bundled name,
        or a `DeploymentConfig`): its `EngineConfig` (`DeploymentConfig.engine_config`). Overrides:
        model (a checkpoint) and any setting by its flat name (`EngineConfig.settings()`). In one
        process the whole model runs there; under torchrun the YAML's parallel layout applies."""
        from ..deploy import load_deployment
        d = load_deployment(deployment)
        model, config = d.engine_config(**overrides)
        d.apply_env()                     # before the process group: HCCL / NCCL read it at setup
        m = cls(model, config)
        m.deployment = d
        return m

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

    # Every step goes through these three: its inputs are checked here, it runs as one cache
    # transaction (a failure rolls the requests back by length), and logits must come out finite.
    def run(self, cache: PagedCache, chunks: dict[Hashable, Sequence[int]]):
        """Append tokens to requests; (step, final-normed hidden states [T, Hd])."""
        chunks = self._step_inputs(cache, chunks)
        self._turn(DpTurns.RUN, chunks, cache)
        with cache.transaction():
            return self.net.run(cache, chunks)

    def run_mtp(self, cache: PagedCache, chunks, hidden: torch.Tensor, shared_idx: torch.Tensor | None = None):
        """The MTP layer over one step: (step, hidden [T, Hd], logits [T, V], top-k used)."""
        chunks = self._step_inputs(cache, chunks)
        T = sum(len(c) for c in chunks.values())
        if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape) != (T, self.cfg.hidden_size):
            raise ValueError(f"run_mtp: hidden must be [T={T}, hidden_size={self.cfg.hidden_size}] (one row per "
                             f"token of the chunks), got {tuple(getattr(hidden, 'shape', ())) or type(hidden).__name__}")
        self._turn(DpTurns.MTP, chunks, cache)
        with cache.transaction():
            st, z, logits, idx = self.net.run_mtp(cache, chunks, hidden, shared_idx)
            arguments.finite_logits(logits, self.ops, "MTP logits")
        return st, z, logits, idx

    def logits(self, h: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        """[T, Hd] final-normed hidden states -> f32 logits [T, V], checked finite unless told not to."""
        self.ops.at_layer(None)
        lg = self.net.logits(h)
        return arguments.finite_logits(lg, self.ops) if check_finite else lg

    def _step_inputs(self, cache: PagedCache, chunks) -> dict[Hashable, list[int]]:
        chunks = arguments.chunks(cache, chunks, self.cfg.vocab_size)
        arguments.cache_fits(self, cache)
        self.ops.at_layer(None)
        return chunks

    def _turn(self, kind: int, chunks: dict, cache: PagedCache) -> None:
        """With expert dispatch: wait until the dp groups agree to run this step (engine/turns.py)."""
        if self.turns is not None:
            self.turns.take(kind, sum(len(c) for c in chunks.values()), cache)

    # ---- caches ---------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int, *, block_size: int | None = None, mtp: bool = False,
                  kv_cache_dtype: str | torch.dtype | None = None,
                  index_cache_dtype: str | torch.dtype | None = None, offload_blocks: int | None = None) -> PagedCache:
        """A paged cache holding `max_tokens` tokens in total over all requests (a positive integer;
        more than the requests can use is allowed, but a request never grows past the context).
        `kv_cache_dtype` / `index_cache_dtype`: as `GLM52(...)` takes them; None = the model's.
        With dcp > 1 this rank's part: the same blocks, each holding block_size / dcp rows (1/dcp of the bytes).
        `offload_blocks`: host offload (cache.HostOffload) with that many device-resident latent blocks per layer;
        None = the model's `offload`."""
        arguments.positive_int("new_cache: max_tokens", max_tokens)
        arguments.positive_int("new_cache: offload_blocks", offload_blocks, allow_none=True)
        arguments.positive_int("new_cache: block_size", block_size, allow_none=True)
        bs = block_size or self.block_size
        lat, idx = self.kv_cache_format, self.index_cache_format
        if kv_cache_dtype is not None or index_cache_dtype is not None:
            lat, idx = _cache_formats(lat if kv_cache_dtype is None else kv_cache_dtype, index_cache_dtype, self.dtype)
        D = self.plan.dcp
        return PagedCache(self.cfg, max(1, -(-max_tokens // bs)), bs, dtype=self.dtype, device=self.device,
                          mtp=mtp and self.has_mtp, latent_format=lat, index_format=idx, dcp_size=D,
                          dcp_rank=self.layout.dcp_rank if D > 1 else 0,
                          offload_blocks=self.offload if offload_blocks is None else offload_blocks)

    @torch.inference_mode()
    def extend(self, cache: PagedCache, chunks: dict[Hashable, Sequence[int]], *, last_only: bool = False,
               check_finite: bool = True) -> dict[Hashable, torch.Tensor]:
        """Append tokens to requests in `cache` (prefill, chunked prefill or decode, mixed freely).

        Returns per request the logits [q_len, V] of the new tokens (only the last one if
        `last_only`). The cache advances; a bad token, an over-long context or a full cache raises
        before anything is written, and a step that fails later (a backend op raising, NaN logits)
        leaves the cache exactly as it was. `check_finite=False` leaves the NaN/inf check of the
        logits to the caller (the decoders fold it into their one host read per step, and roll the
        step back themselves when it fails).
        """
        chunks = self._step_inputs(cache, chunks)
        self._turn(DpTurns.RUN, chunks, cache)
        with cache.transaction():
            st, h = self.net.run(cache, chunks)
            cu = st.meta.cu_host
            if last_only:
                h = h[torch.tensor([e - 1 for e in cu[1:]], device=h.device)]
            lg = self.logits(h, check_finite)
            if last_only:
                return {r: lg[i:i + 1] for i, r in enumerate(st.reqs)}
            return {r: lg[cu[i]:cu[i + 1]] for i, r in enumerate(st.reqs)}

    def __call__(self, input_ids) -> torch.Tensor | list[torch.Tensor]:
        """Stateless full forward. `[B, T]` tensor -> logits `[B, T, V]` (f32);
        a list of token-id lists (lengths may differ) -> a list of `[T_i, V]`."""
        as_tensor = isinstance(input_ids, torch.Tensor)
        if as_tensor and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        prompts = self.encode_prompts(input_ids if as_tensor or not isinstance(input_ids, (str, bytes))
                                      else [input_ids])
        if self.plan.dp > 1:                 # dp groups split the requests; every rank gets every result
            from .distributed import forward_dp
            logits = forward_dp(self, prompts)
        else:
            cache = self.new_cache(sum(len(p) + self.block_size for p in prompts))
            out = self.extend(cache, dict(enumerate(prompts)))
            logits = [out[i] for i in range(len(prompts))]
        return torch.stack(logits) if as_tensor else logits

    forward = __call__

    # ---- prompts ----------------------------------------------------------------------------------
    def check_tokens(self, ids: Sequence[int], where: str) -> list[int]:
        """`ids` as ints in the vocabulary; floats, bools and strings are refused, not converted."""
        return arguments.token_ids(ids, where, self.cfg.vocab_size)

    def encode_prompts(self, prompts) -> list[list[int]]:
        """Token-id lists from a `[B, T]` integer tensor, token-id lists, or strings (with a
        tokenizer); each non-empty and within the context (engine/arguments.py)."""
        return arguments.prompts(self, prompts)

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, speculative: int = 0, prefill_chunk: int | None = None,
                 stop_at_eos: bool = True, cache_tokens: int | None = None, adaptive: bool = False,
                 draft_threshold: float | None = None, graph: Any = None) -> GenerationResult:
        """Batched generation over paged caches.

        prompts: list of token-id lists (or strings with a tokenizer), or a `[B, T]` tensor.
        Returns `.tokens` (new ids per prompt) and `.stats` (prefill/decode time, tokens/s,
        which ops ran natively). `prefill_chunk` splits prompts into chunks of that many tokens.
        `speculative=k` drafts k tokens per step with the MTP layer and verifies them in one target
        step (greedy: the same tokens as plain decoding; sampling: the same distribution); stats
        then add `mean_acceptance_length` (tokens per verify step, the bonus counted),
        `mean_drafted_tokens`, `draft_acceptance_rate` and `verify_steps`.
        `adaptive=True` (with `speculative=k`) drafts up to k: a request stops drafting in a round
        once the MTP layer's probability of its last draft is `draft_threshold` or less (a number
        in [0, 1], default 0.5; the first draft is always proposed; engine/speculative.py).
        `graph`: decode steps as captured graphs ("auto", True, False; None = the model's `graph`;
        engine/graph.py); stats say which mode ran (`graph`) and how many were captured.
        """
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                  speculative=speculative, prefill_chunk=prefill_chunk, stop_at_eos=stop_at_eos,
                  cache_tokens=cache_tokens, adaptive=adaptive, draft_threshold=draft_threshold,
                  graph=self.graph if graph is None else graph)
        if self.plan.dp > 1:                 # checked on every rank first: a refusal must not strand a group
            from .distributed import generate_dp
            arguments.generation(**kw)
            if speculative and not self.has_mtp:
                raise ValueError("speculative decoding needs the MTP layer, which this model does not have")
            return generate_dp(self, self.encode_prompts(prompts), generate, **kw)
        return generate(self, prompts, **kw)
