"""MTP speculative decoding: draft k tokens with the nextn layer, verify them in one target step.

State of one request between rounds (n = tokens in its target cache):
  seq[0..n]     committed tokens; seq[n] was emitted but is not yet in the target cache
  target cache  positions 0..n-1 (latent: every layer; index keys: the "full" layers)
  MTP cache     positions 0..n-1; entry i was built from (target hidden h_i, token seq[i+1])
  pending       the MTP layer's output hidden, logits and top-k at position n-1: its logits
                predict seq[n+1]

A round (`SpeculativeDecoder.step`):
  draft    d_1 from the pending logits; d_2..d_k by re-applying the MTP layer at positions
           n..n+k-2 to its own output hidden and the previous draft token. With
           `index_share_for_mtp_iteration` these steps skip the MTP indexer and reuse the pending
           top-k row (vLLM's step-0 reuse); otherwise each runs the indexer.
  verify   one target step over [seq[n], d_1..d_k] (positions n..n+k); the backend's `mtp_verify`
           accepts a drafts and emits one more token (the correction, or the bonus when a == k).
  rollback the target cache back to n+a+1 entries (drops the rejected drafts); the MTP cache back
           to n (its draft-step entries came from MTP hiddens, not target ones).
  catch up (lazily, at the start of the request's next round) one MTP step over positions
           n..n+a from the verified target hiddens and tokens seq[n+1..n+a+1]: the MTP entries
           are then exactly those plain decoding would feed it, and the last row is the new
           pending draft. The prompt's MTP prefill is the first catch-up.

Greedy output is the plain greedy output token for token; sampling preserves the target
distribution (Leviathan et al. 2023) because every draft token is drawn from the distribution
passed to `mtp_verify` as `draft_probs`.

Near the end of the context a request drafts fewer tokens (k_i = min(k, context - 1 - n), the
verify step must fit), so generation runs up to the context exactly as plain decoding does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..sampling import check_sampling
from . import arguments
from .decoding import pick, prefill_chunks, run_generation

# draft_filter(request, position, proposed_token) -> token: replaces the MTP layer's token choice
# (the MTP layer still runs), e.g. the benchmark's synthetic draft source with a set acceptance
# rate. Under sampling a filtered token is verified as a deterministic draft (draft_probs one-hot:
# accept with probability p(d), else resample from p without d), which keeps the target
# distribution whatever token the filter returns, as long as it does not look at future randomness.
DraftFilter = Callable[[int, int, int], int]


def _mtp_key(i: int) -> tuple[str, int]:
    """Cache id of request i's MTP entries (the target entries use i itself)."""
    return ("mtp", i)


class SpeculativeDecoder:
    """Batched MTP speculative decoding over one paged cache holding target and MTP entries.

    `prefill(prompts)` -> the first token of each request; `step(reqs)` -> one draft/verify round
    for the given requests, returning per request (accepted drafts, emitted tokens). `seq[i]` holds
    prompt + emitted tokens; `cache` is the shared `PagedCache` (request i: target entries under
    id i, MTP entries under `("mtp", i)`).
    """

    steps_stat = "verify_steps"

    def __init__(self, model, k: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 cache_tokens: int, draft_filter: DraftFilter | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative needs a positive integer number of draft tokens, got {k!r}")
        if model.mtp is None:
            raise ValueError("speculative decoding needs the MTP layer, which this model does not have "
                             "(num_nextn_predict_layers = 0, or model.layers.N.* tensors missing, or "
                             "loaded with include_mtp=False)")
        self.model, self.k = model, k
        self.temperature, self.top_p = check_sampling(temperature, top_p)
        self.sampling = self.temperature > 0.0
        self.gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self.draft_filter = draft_filter
        self.cache = model.new_cache(cache_tokens, mtp=True)
        self.seq: list[list[int]] = []
        # request -> MTP output hidden [Hd], logits [V], top-k row [topk] at position n-1
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # request -> (tokens seq[m+1..n], target hiddens [n-m, Hd]) the MTP cache still lacks
        self.stale: dict[int, tuple[list[int], torch.Tensor]] = {}
        self.accepted: dict[int, list[int]] = {}  # request -> drafts accepted at each of its verify steps

    # ---- sampling ---------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [N, V] -> tokens [N] and, when sampling, the distribution they came from [N, V]."""
        return pick(logits, self.temperature, self.top_p, self.gen)

    # ---- prefill ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], prefill_chunk: int | None = None) -> list[int]:
        """Target prefill of new requests (ids continue from `len(seq)`); returns their first tokens.
        The MTP layer's prefill over the prompt runs lazily with the first `step`."""
        m = self.model
        base = len(self.seq)
        reqs = list(range(base, base + len(prompts)))
        hidden: dict[int, list[torch.Tensor]] = {i: [] for i in reqs}
        for chunks in prefill_chunks({i: prompts[i - base] for i in reqs}, prefill_chunk):
            st, h = m.run(self.cache, chunks)
            cu = st.meta.cu_host
            for b, i in enumerate(st.reqs):
                hidden[i].append(h[cu[b]:cu[b + 1]])
        last = torch.stack([hidden[i][-1][-1] for i in reqs])                        # [B, Hd]
        first, _ = self._pick(m.logits(last))
        for i, t in zip(reqs, first.tolist()):
            p = [int(x) for x in prompts[i - base]]
            self.seq.append(p + [int(t)])
            self.stale[i] = (self.seq[i][1:], torch.cat(hidden[i]))                   # token j+1 at position j
        return [int(t) for t in first.tolist()]

    # ---- one round --------------------------------------------------------------------------------
    @torch.inference_mode()
    def catch_up(self, reqs: Sequence[int]) -> None:
        """Bring the MTP cache of `reqs` level with the target cache (one MTP step over the verified
        positions) and refresh their pending draft."""
        todo = [i for i in reqs if i in self.stale]
        if not todo:
            return
        chunks = {_mtp_key(i): self.stale[i][0] for i in todo}
        _, z, logits, idx = self.model.run_mtp(self.cache, chunks, torch.cat([self.stale[i][1] for i in todo]))
        ends = torch.tensor([len(c) for c in chunks.values()]).cumsum(0) - 1
        for i, e in zip(todo, ends.tolist()):
            self.pending[i] = (z[e], logits[e], idx[e])
            del self.stale[i]

    @torch.inference_mode()
    def step(self, reqs: Sequence[int]) -> dict[int, tuple[int, list[int]]]:
        """One draft/verify round for `reqs`; returns per request (accepted drafts a, the a+1 tokens
        emitted: accepted drafts then the target's own token). `seq` and the caches advance.
        A request within k tokens of the context's end drafts only as many as still fit."""
        C = self.model.cfg.max_position_embeddings
        by_k: dict[int, list[int]] = {}
        for i in reqs:
            n = len(self.seq[i]) - 1                       # the verify step feeds positions n..n+k
            if n + 1 >= C:
                raise ValueError(f"request {i} has filled the context ({C} tokens); nothing more fits")
            by_k.setdefault(min(self.k, C - 1 - n), []).append(i)
        out: dict[int, tuple[int, list[int]]] = {}
        for k in sorted(by_k, reverse=True):
            out.update(self._round(by_k[k], k))
        return out

    def _round(self, reqs: list[int], k: int) -> dict[int, tuple[int, list[int]]]:
        """One draft/verify round with k drafts per request."""
        m, cache = self.model, self.cache
        self.catch_up(reqs)
        n = {i: len(self.seq[i]) - 1 for i in reqs}                                  # target cache lengths
        # ---- draft: k tokens per request --------------------------------------------------------
        hid = torch.stack([self.pending[i][0] for i in reqs])                        # [B, Hd]
        logits = torch.stack([self.pending[i][1] for i in reqs])                     # [B, V]
        share = torch.stack([self.pending[i][2] for i in reqs]) if m.cfg.index_share_for_mtp_iteration else None
        drafts, dprobs = [], []
        for j in range(k):
            d, q = self._pick(logits)
            d = d.tolist()
            if self.draft_filter is not None:
                d = [int(self.draft_filter(i, n[i] + 1 + j, t)) for i, t in zip(reqs, d)]
                if q is not None:
                    q = F.one_hot(torch.tensor(d, device=q.device), q.shape[-1]).to(q.dtype)
            drafts.append(d)
            dprobs.append(q)
            if j < k - 1:  # MTP at position n+j: hidden = its own output at n+j-1, token = draft j
                _, hid, logits, _ = m.run_mtp(cache, {_mtp_key(i): [d[b]] for b, i in enumerate(reqs)}, hid, share)
        draft = torch.tensor(drafts, dtype=torch.long).T                             # [B, k]
        # ---- verify: one target step over [seq[n], d_1..d_k] per request -------------------------
        st, h = m.run(cache, {i: [self.seq[i][-1]] + draft[b].tolist() for b, i in enumerate(reqs)})
        tgt = m.logits(h).view(len(reqs), k + 1, -1)                                 # [B, k+1, V]
        dev = tgt.device
        draft_probs = torch.stack(dprobs, 1).to(dev) if self.sampling else None      # [B, k, V]
        u = torch.rand(len(reqs), k + 1, generator=self.gen).to(dev) if self.sampling else None
        acc, toks = m.ops.mtp_verify(draft.to(dev), tgt, draft_probs, temperature=self.temperature,
                                     top_p=self.top_p, uniforms=u)
        acc, toks = acc.tolist(), toks.tolist()
        # ---- commit, roll back, queue the MTP catch-up ------------------------------------------
        out = {}
        for b, i in enumerate(reqs):
            a = int(acc[b])
            if not 0 <= a <= k or any(t < 0 for t in toks[b][:a + 1]):
                raise RuntimeError(f"backend {m.backend_name!r}: mtp_verify returned accepted={a} and tokens "
                                   f"{toks[b]} for k={k}; expected 0..k accepted and a+1 valid tokens")
            new = [int(t) for t in toks[b][:a + 1]]
            self.accepted.setdefault(i, []).append(a)
            self.seq[i].extend(new)
            cache.truncate(i, n[i] + a + 1)                       # keep seq[n], d_1..d_a
            cache.truncate(_mtp_key(i), n[i])                     # drop the draft-step entries
            rows = h[b * (k + 1):b * (k + 1) + a + 1]             # target hiddens at n..n+a
            self.stale[i] = (self.seq[i][n[i] + 1:n[i] + a + 2], rows)
            out[i] = (a, new)
        return out


def generate_speculative(model, prompts, *, max_new_tokens: int, k: int, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                         prefill_chunk: int | None = None, cache_tokens: int | None = None,
                         draft_filter: DraftFilter | None = None, return_decoder: bool = False):
    """`GLM52.generate(..., speculative=k)`: same arguments and result as plain generation, plus
    stats `mean_acceptance_length` (tokens emitted per request per verify step, the bonus token
    counted; 1.0 = no draft ever accepted), `verify_steps` and `speculative`."""
    arguments.generation(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         speculative=k, prefill_chunk=prefill_chunk, stop_at_eos=stop_at_eos,
                         cache_tokens=cache_tokens)
    prompts = model.encode_prompts(prompts)
    # target: prompt + new + k drafts in flight (never past the context); MTP: the same less two;
    # a spare block per cache id
    budget = arguments.budgets(model, prompts, max_new_tokens)
    C = model.cfg.max_position_embeddings
    need = cache_tokens or sum(2 * (min(len(p) + n + k, C) + model.block_size) for p, n in zip(prompts, budget))
    dec = SpeculativeDecoder(model, k, temperature=temperature, top_p=top_p, seed=seed, cache_tokens=need,
                             draft_filter=draft_filter)
    res = run_generation(model, dec, prompts, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                         prefill_chunk=prefill_chunk, extra_stats={"speculative": k})
    lens = [a + 1 for acc in dec.accepted.values() for a in acc]   # tokens per verify step, bonus counted
    res.stats["mean_acceptance_length"] = sum(lens) / len(lens) if lens else float("nan")
    return (res, dec) if return_decoder else res


__all__ = ["SpeculativeDecoder", "generate_speculative", "DraftFilter"]
