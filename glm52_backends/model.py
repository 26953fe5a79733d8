"""GLM-5.x (`glm_moe_dsa`) written once against the op contract (spec §3-§8).

The model calls compute only through `self.ops` (a `BoundBackend`); everything else here is
bookkeeping: weight layout, paged caches, batching metadata, sampling.

Letters: T step tokens, B requests, H heads, C latent (kv_lora_rank), dn/dr/dv nope/rope/value
head dims, Hi/Di indexer heads/dim, E experts, I expert width, Hd hidden, V vocabulary.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .cache import PagedCache
from .config import ModelConfig
from .registry import BoundBackend, get_backend
from .sampling import probs_from_logits, sample_from
from .weights import float32_tensor

log = logging.getLogger("glm52_backends")


# ---- weights in compute layout ----------------------------------------------------------------
@dataclass
class Indexer:
    wq_b: torch.Tensor      # [Hi*Di, q_lora]
    wk: torch.Tensor        # [Di, Hd]
    k_norm_w: torch.Tensor  # [Di]
    k_norm_b: torch.Tensor  # [Di]
    w_proj: torch.Tensor    # [Hi, Hd]


@dataclass
class Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    wq_a: torch.Tensor      # [q_lora, Hd]
    q_norm: torch.Tensor    # [q_lora]
    wq_b: torch.Tensor      # [H*(dn+dr), q_lora]
    wkv_a: torch.Tensor     # [C+dr, Hd]
    kv_norm: torch.Tensor   # [C]
    w_uk: torch.Tensor      # [H, dn, C]   kv_b rows 0..dn-1 of each head
    w_uv: torch.Tensor      # [H, dv, C]   kv_b rows dn.. of each head
    wo: torch.Tensor        # [Hd, H*dv]
    indexer: Indexer | None
    w13: torch.Tensor | None = None       # dense MLP [2I, Hd]
    w2: torch.Tensor | None = None        # dense MLP [Hd, I]
    gate: torch.Tensor | None = None      # router [E, Hd]
    gate_bias: torch.Tensor | None = None  # [E] f32
    e_w13: torch.Tensor | None = None     # [E, 2I, Hd] gate rows then up rows
    e_w2: torch.Tensor | None = None      # [E, Hd, I]
    s_w13: torch.Tensor | None = None     # shared expert [2Is, Hd]
    s_w2: torch.Tensor | None = None      # [Hd, Is]
    # MTP layer only
    enorm: torch.Tensor | None = None
    hnorm: torch.Tensor | None = None
    eh_proj: torch.Tensor | None = None   # [Hd, 2Hd]: embedding half first
    head_norm: torch.Tensor | None = None


def build_layers(cfg: ModelConfig, sd: dict[str, torch.Tensor], include_mtp: bool) -> list[Layer]:
    """HF per-expert tensors -> compute layout. Pops from `sd` so memory is not held twice."""
    H, dn, dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    layers = []
    for i in range(cfg.num_hidden_layers + (1 if include_mtp else 0)):
        p = f"model.layers.{i}."
        g = lambda name: sd.pop(p + name)  # noqa: E731
        kv_b = g("self_attn.kv_b_proj.weight").view(H, dn + dv, C)
        indexer = None
        if p + "self_attn.indexer.wk.weight" in sd:
            indexer = Indexer(g("self_attn.indexer.wq_b.weight"), g("self_attn.indexer.wk.weight"),
                              g("self_attn.indexer.k_norm.weight"), g("self_attn.indexer.k_norm.bias"),
                              g("self_attn.indexer.weights_proj.weight"))
        layer = Layer(
            in_norm=g("input_layernorm.weight"), post_norm=g("post_attention_layernorm.weight"),
            wq_a=g("self_attn.q_a_proj.weight"), q_norm=g("self_attn.q_a_layernorm.weight"),
            wq_b=g("self_attn.q_b_proj.weight"), wkv_a=g("self_attn.kv_a_proj_with_mqa.weight"),
            kv_norm=g("self_attn.kv_a_layernorm.weight"), w_uk=kv_b[:, :dn].contiguous(),
            w_uv=kv_b[:, dn:].contiguous(), wo=g("self_attn.o_proj.weight"), indexer=indexer)
        if cfg.is_moe(i):
            E = cfg.n_routed_experts
            layer.gate, layer.gate_bias = g("mlp.gate.weight"), g("mlp.gate.e_score_correction_bias")
            layer.e_w13 = torch.stack([torch.cat([g(f"mlp.experts.{e}.gate_proj.weight"),
                                                  g(f"mlp.experts.{e}.up_proj.weight")]) for e in range(E)])
            layer.e_w2 = torch.stack([g(f"mlp.experts.{e}.down_proj.weight") for e in range(E)])
            if cfg.n_shared_experts:
                layer.s_w13 = torch.cat([g("mlp.shared_experts.gate_proj.weight"),
                                         g("mlp.shared_experts.up_proj.weight")])
                layer.s_w2 = g("mlp.shared_experts.down_proj.weight")
        else:
            layer.w13 = torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")])
            layer.w2 = g("mlp.down_proj.weight")
        if i == cfg.num_hidden_layers:
            layer.enorm, layer.hnorm = g("enorm.weight"), g("hnorm.weight")
            layer.eh_proj, layer.head_norm = g("eh_proj.weight"), g("shared_head.norm.weight")
        layers.append(layer)
    return layers


# ---- one step's batch metadata -------------------------------------------------------------------
@dataclass
class Step:
    """What every op of one forward step needs: token-major, positions, paged-cache addressing."""
    reqs: list                    # request ids, B
    ids: torch.Tensor             # [T] int64
    positions: torch.Tensor       # [T] int64
    cu_seqlens_q: torch.Tensor    # [B+1] int32
    seq_lens: torch.Tensor        # [B] int32 (totals including this step)
    block_table: torch.Tensor     # [B, max_blocks] int32
    slots: torch.Tensor           # [T] int64 flat cache slots of this step's tokens


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    stats: dict[str, Any] = field(default_factory=dict)
    text: list[str] | None = None


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
                from .tiny import random_state_dict
                state_dict = random_state_dict(model, seed=seed, dtype=self.dtype,
                                               include_mtp=bool(include_mtp or (include_mtp is None and model.mtp_layer)))
            sd = dict(state_dict)
        else:
            from .loader import load_checkpoint, load_tokenizer
            self.path = os.fspath(model)
            self.cfg, sd = load_checkpoint(self.path, dtype=self.dtype, device=self.device,
                                           include_mtp=include_mtp, progress=progress)
            self.tokenizer = load_tokenizer(self.path)
        cfg = self.cfg
        self.has_mtp = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in sd
        sd = {k: v.to(self.device, torch.float32 if float32_tensor(k) else self.dtype) for k, v in sd.items()}
        self.embed = sd.pop("model.embed_tokens.weight")
        self.final_norm = sd.pop("model.norm.weight")
        self.lm_head = sd.pop("lm_head.weight")
        self.layers = build_layers(cfg, sd, self.has_mtp)
        self.mtp = self.layers.pop() if self.has_mtp else None
        if sd:
            raise RuntimeError(f"internal: tensors left unused after building the model: {sorted(sd)[:5]}")

    from_pretrained = classmethod(lambda cls, *a, **k: cls(*a, **k))

    @classmethod
    def from_deployment(cls, path: str | os.PathLike, **overrides) -> "GLM52":
        """Build model, backend and device from a deployment YAML (`configs/*.yaml`)."""
        from .deploy import load_deployment
        return load_deployment(path).build_model(**overrides)

    @property
    def backend_name(self) -> str:
        return self.ops.name

    # ---- caches ---------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int, *, block_size: int | None = None, mtp: bool = False) -> PagedCache:
        """A paged cache holding `max_tokens` tokens in total over all requests."""
        bs = block_size or self.block_size
        return PagedCache(self.cfg, max(1, -(-max_tokens // bs)), bs, dtype=self.dtype, device=self.device,
                          mtp=mtp and self.has_mtp)

    def _check_tokens(self, ids: Sequence[int], where: str) -> None:
        V = self.cfg.vocab_size
        for j, t in enumerate(ids):
            if not 0 <= int(t) < V:
                raise ValueError(f"{where}: token id {int(t)} at position {j} is outside the vocabulary [0, {V})")

    def _plan_step(self, cache: PagedCache, chunks: dict[Any, Sequence[int]]) -> Step:
        """Validate and reserve cache room for appending `chunks[req]` to each request."""
        reqs = [r for r, c in chunks.items() if len(c)]
        new_lens = {}
        for r in reqs:
            self._check_tokens(chunks[r], f"request {r!r}")
            n = cache.lens.get(r, 0) + len(chunks[r])
            if n > self.cfg.max_position_embeddings:
                raise ValueError(f"request {r!r}: context of {n} tokens exceeds max_position_embeddings "
                                 f"({self.cfg.max_position_embeddings})")
            new_lens[r] = n
        start = {r: cache.lens.get(r, 0) for r in reqs}
        cache.reserve(new_lens)  # all-or-nothing: raises CacheExhausted before any write
        q_lens = [len(chunks[r]) for r in reqs]
        cu = torch.zeros(len(reqs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        ids = torch.tensor([t for r in reqs for t in chunks[r]], dtype=torch.long)
        pos = torch.cat([torch.arange(start[r], new_lens[r]) for r in reqs])
        slots = torch.cat([cache.slots(r, start[r], new_lens[r]) for r in reqs])
        d = self.device
        return Step(reqs, ids.to(d), pos.to(d), cu.to(d),
                    torch.tensor([new_lens[r] for r in reqs], dtype=torch.int32, device=d),
                    cache.block_table(reqs), slots.to(d))

    # ---- forward ----------------------------------------------------------------------------------
    def _attention(self, l: int, L: Layer, x: torch.Tensor, st: Step, cache: PagedCache,
                   prev_idx: torch.Tensor | None, share: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA over the selected positions. A layer with an indexer runs it unless `share`;
        otherwise it reuses `prev_idx` (IndexShare)."""
        cfg, ops = self.cfg, self.ops
        T = x.shape[0]
        H, dn, dr, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        qr = ops.rms_norm(ops.linear(x, L.wq_a), L.q_norm, cfg.latent_norm_eps)          # [T, q_lora]
        q = ops.linear(qr, L.wq_b).view(T, H, dn + dr)
        q_pe = ops.rope(q[..., dn:], st.positions, cfg.rope_theta)                         # [T, H, dr]
        kva = ops.linear(x, L.wkv_a)                                                       # [T, C+dr]
        c = ops.rms_norm(kva[:, :C], L.kv_norm, cfg.latent_norm_eps)
        k_pe = ops.rope(kva[:, C:], st.positions, cfg.rope_theta)
        PagedCache.write(cache.latent[l], st.slots, torch.cat([c, k_pe], dim=-1))

        if L.indexer is not None and not share:
            idx = self._indexer(l, L.indexer, x, qr, st, cache)
        elif prev_idx is None:
            raise RuntimeError(f"layer {l} is 'shared' but no earlier full layer produced top-k indices")
        else:
            idx = prev_idx                                                                   # IndexShare

        q_lat = torch.einsum("thd,hdc->thc", q[..., :dn], L.w_uk)                          # absorb W_UK
        o_lat, _ = ops.sparse_mla(torch.cat([q_lat, q_pe], -1), cache.latent[l], idx, st.block_table,
                                  st.seq_lens, st.cu_seqlens_q, cfg.softmax_scale, v_dim=C)  # [T, H, C]
        o = torch.einsum("thc,hvc->thv", o_lat, L.w_uv).reshape(T, H * cfg.v_head_dim)     # absorb W_UV
        return ops.linear(o, L.wo), idx

    def _indexer(self, l: int, ix: Indexer, x, qr, st: Step, cache: PagedCache) -> torch.Tensor:
        cfg, ops = self.cfg, self.ops
        T, Hi, Di, dr = x.shape[0], cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        iq = ops.linear(qr, ix.wq_b).view(T, Hi, Di)                   # RoPE on the FIRST dr dims
        iq = torch.cat([ops.rope(iq[..., :dr], st.positions, cfg.rope_theta), iq[..., dr:]], -1)
        ik = ops.layer_norm(ops.linear(x, ix.wk), ix.k_norm_w, ix.k_norm_b, cfg.indexer_norm_eps)
        ik = torch.cat([ops.rope(ik[:, :dr], st.positions, cfg.rope_theta), ik[:, dr:]], -1)
        PagedCache.write(cache.index_k[l], st.slots, ik)
        w = ops.linear(x, ix.w_proj).float() * (Hi ** -0.5 * Di ** -0.5)                 # [T, Hi] f32
        return ops.indexer_topk(iq, w, cache.index_k[l], st.block_table, st.seq_lens, st.cu_seqlens_q,
                                cfg.index_topk)

    def _ffn(self, l: int, L: Layer, x: torch.Tensor) -> torch.Tensor:
        cfg, ops = self.cfg, self.ops
        if L.gate is None:
            return ops.mlp(x, L.w13, L.w2)
        logits = ops.linear(x.float(), L.gate.float())                                    # fp32 router
        ids, w = ops.moe_route(logits, L.gate_bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                               cfg.norm_topk_prob, cfg.routed_scaling_factor)
        y = ops.moe_experts(x, L.e_w13, L.e_w2, ids, w)
        if L.s_w13 is not None:
            y = y + ops.mlp(x, L.s_w13, L.s_w2)
        return y

    def _layer(self, l: int, L: Layer, h, st: Step, cache: PagedCache, prev_idx, share: bool = False):
        ops, eps = self.ops, self.cfg.rms_norm_eps
        a, idx = self._attention(l, L, ops.rms_norm(h, L.in_norm, eps), st, cache, prev_idx, share)
        h = h + a
        h = h + self._ffn(l, L, ops.rms_norm(h, L.post_norm, eps))
        return h, idx

    def _forward(self, st: Step, cache: PagedCache) -> torch.Tensor:
        """One step through every layer; returns the final-normed hidden state [T, Hd]."""
        h = self.embed[st.ids]
        idx = None
        for l, L in enumerate(self.layers):
            h, idx = self._layer(l, L, h, st, cache, idx)
        return self.ops.rms_norm(h, self.final_norm, self.cfg.rms_norm_eps)

    def run(self, cache: PagedCache, chunks: dict[Any, Sequence[int]]) -> tuple[Step, torch.Tensor]:
        """Append tokens to requests; returns the step and the final-normed hidden states [T, Hd]."""
        st = self._plan_step(cache, chunks)
        return st, self._forward(st, cache)

    def run_mtp(self, cache: PagedCache, chunks: dict[Any, Sequence[int]], hidden: torch.Tensor,
                shared_idx: torch.Tensor | None = None) -> tuple[Step, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MTP (nextn) layer over one step (spec §8, vLLM's convention).

        Input at position i: `hidden[i]` (the target's final-normed hidden at i, or the MTP's own
        output when drafting further) and `chunks` token i+1. Returns (step, output hidden [T, Hd]
        fed to the next draft step, logits [T, V] predicting token i+2, top-k indices used).
        `shared_idx` skips the MTP indexer and attends to those positions instead
        (`index_share_for_mtp_iteration`).
        """
        if self.mtp is None:
            raise RuntimeError("this checkpoint has no MTP layer (num_nextn_predict_layers = 0 or "
                               "layer tensors missing); speculative decoding needs it")
        cfg, ops, M = self.cfg, self.ops, self.mtp
        l = cfg.num_hidden_layers
        st = self._plan_step(cache, chunks)
        e = self.embed[st.ids]
        e = torch.where((st.positions == 0)[:, None], torch.zeros_like(e), e)  # vLLM zeroes position 0
        e = ops.rms_norm(e, M.enorm, cfg.rms_norm_eps)
        u = ops.linear(torch.cat([e, ops.rms_norm(hidden, M.hnorm, cfg.rms_norm_eps)], -1), M.eh_proj)
        z, idx = self._layer(l, M, u, st, cache, shared_idx, share=shared_idx is not None)
        logits = self.logits(ops.rms_norm(z, M.head_norm, cfg.rms_norm_eps))
        return st, z, logits, idx

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(h, self.lm_head).float()

    @torch.inference_mode()
    def extend(self, cache: PagedCache, chunks: dict[Any, Sequence[int]], *, last_only: bool = False
               ) -> dict[Any, torch.Tensor]:
        """Append tokens to requests in `cache` (prefill, chunked prefill or decode, mixed freely).

        Returns per request the logits [q_len, V] of the new tokens (only the last one if
        `last_only`). The cache advances; a bad token, an over-long context or a full cache raises
        before anything is written.
        """
        st, h = self.run(cache, chunks)
        cu = st.cu_seqlens_q.tolist()
        if last_only:
            rows = torch.tensor([e - 1 for e in cu[1:]], device=h.device)
            lg = self.logits(h[rows])
            return {r: lg[i:i + 1] for i, r in enumerate(st.reqs)}
        lg = self.logits(h)
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

    # ---- generation -------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
        """logits [B, V] -> tokens [B] (greedy when temperature == 0)."""
        if temperature == 0.0:
            return logits.argmax(-1)
        p = probs_from_logits(logits, temperature, top_p)
        u = torch.rand(logits.shape[0], generator=gen).to(p.device)
        return sample_from(p, u)

    def _encode_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"prompts tensor must be [B, T], got {tuple(prompts.shape)}")
            return prompts.tolist()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer.json in the checkpoint; pass token ids instead")
                p = self.tokenizer.encode(p)
            p = [int(t) for t in p]
            if not p:
                raise ValueError("every prompt needs at least one token")
            out.append(p)
        return out

    def _generation_prompts(self, prompts, max_new_tokens: int, prefill_chunk: int | None) -> list[list[int]]:
        """Check generate()'s arguments; prompts as validated token-id lists."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        prompts = self._encode_prompts(prompts)
        for i, p in enumerate(prompts):
            self._check_tokens(p, f"prompt {i}")
        return prompts

    @torch.inference_mode()
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
        if speculative:
            from .speculative import generate_speculative
            return generate_speculative(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed, k=speculative, stop_at_eos=stop_at_eos,
                                        prefill_chunk=prefill_chunk, cache_tokens=cache_tokens)
        prompts = self._generation_prompts(prompts, max_new_tokens, prefill_chunk)
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        B = len(prompts)
        need = cache_tokens or sum(len(p) + max_new_tokens + self.block_size for p in prompts)
        cache = self.new_cache(need)
        eos = set(self.cfg.eos_token_id) if stop_at_eos else set()
        out: list[list[int]] = [[] for _ in range(B)]
        t0 = time.perf_counter()
        # prefill (chunked or whole), all requests in the same steps
        done_prefill = [0] * B
        last: dict[int, torch.Tensor] = {}
        while any(done_prefill[i] < len(p) for i, p in enumerate(prompts)):
            chunks = {}
            for i, p in enumerate(prompts):
                n = len(p) - done_prefill[i] if prefill_chunk is None else min(prefill_chunk, len(p) - done_prefill[i])
                if n > 0:
                    chunks[i] = p[done_prefill[i]:done_prefill[i] + n]
                    done_prefill[i] += n
            last.update(self.extend(cache, chunks, last_only=True))
        t1 = time.perf_counter()
        active = list(range(B)) if max_new_tokens > 0 else []
        decode_steps = 0
        while active:
            lg = torch.cat([last[i] for i in active])                                   # [B_active, V]
            nxt = self._sample(lg, temperature, top_p, gen).tolist()
            still = []
            for i, t in zip(active, nxt):
                out[i].append(int(t))
                if len(out[i]) < max_new_tokens and int(t) not in eos:
                    still.append(i)
            active = still
            if active:
                last = self.extend(cache, {i: [out[i][-1]] for i in active}, last_only=True)
                decode_steps += 1
        t2 = time.perf_counter()
        n_new = sum(len(o) for o in out)
        stats = {
            "backend": self.backend_name, "requests": B, "prompt_tokens": sum(map(len, prompts)),
            "new_tokens": n_new, "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": decode_steps,
            "tokens_per_s": n_new / (t2 - t0) if t2 > t0 else float("nan"),
            "decode_tokens_per_s": (n_new - B) / (t2 - t1) if t2 > t1 and n_new > B else float("nan"),
            "ops": self.ops.ran_natively(),
        }
        text = [self.tokenizer.decode(o) for o in out] if self.tokenizer is not None else None
        return GenerationResult(out, stats, text)
