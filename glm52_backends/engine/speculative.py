"""MTP speculative decoding: draft up to k tokens with the nextn layer, verify them in one target step.

State of one request between rounds (n = tokens in its target cache):
  seq[0..n]     committed tokens; seq[n] was emitted but is not yet in the target cache
  target cache  positions 0..n-1 (latent: every layer; index keys: the "full" layers)
  MTP cache     positions 0..n-1; entry i was built from (target hidden h_i, token seq[i+1])
  pending       the MTP layer's output hidden, logits and top-k at position n-1: its logits
                predict seq[n+1]

A round (`SpeculativeDecoder.step`), for all its requests together:
  draft    d_1 from the pending logits; d_2..d_k_i by re-applying the MTP layer at positions
           n..n+k_i-2 to its own output hidden and the previous draft token (one MTP step for all
           requests still drafting). With `index_share_for_mtp_iteration` these steps skip the MTP
           indexer and reuse the pending top-k row (vLLM's step-0 reuse); otherwise each runs the
           indexer.
  verify   one target step over [seq[n], d_1..d_k_i] per request (positions n..n+k_i; the chunks
           may differ in length); the backend's `mtp_verify`, called once per distinct k_i on
           that group's rows, accepts a drafts and emits one more token (the correction, or the
           bonus when a == k_i).
  rollback the target cache back to n+a+1 entries (drops the rejected drafts); the MTP cache back
           to n (its draft-step entries came from MTP hiddens, not target ones).
  catch up (lazily, at the start of the request's next round) one MTP step over positions
           n..n+a from the verified target hiddens and tokens seq[n+1..n+a+1]: the MTP entries
           are then exactly those plain decoding would feed it, and the last row is the new
           pending draft. The prompt's MTP prefill is the first catch-up.

How many drafts a request proposes in a round (k_i <= k):
  * near the end of the context, k_i <= context - 1 - n (the verify step must fit), so generation
    runs up to the context exactly as plain decoding does;
  * adaptive drafting (`draft_threshold=t`, GLM-5.2's "prediction size from contextual
    certainty"): d_1 is always proposed; after proposing d_j the request drafts d_{j+1} only while
    the MTP layer's probability of d_j is above t (`q_j(d_j) > t`). The draft whose probability is
    t or less is still proposed (it costs one verify position, no MTP step) and is the round's
    last. The probability is that of the distribution the draft came from: under sampling the
    temperature / top-p distribution it was drawn from (the one passed to `mtp_verify`), under
    greedy the MTP logits' softmax at temperature 1 (d_j is its argmax, so this is its top
    probability). t = 0 never stops early (same drafts as fixed k); t = 1 always stops after d_1.
    The MTP step that would produce a dropped draft is not run.

Greedy output is the plain greedy output token for token, whatever each k_i. Sampling preserves the
target distribution (Leviathan et al. 2023) because every draft token is drawn from the
distribution passed to `mtp_verify` as `draft_probs`, and whether to draft one more token depends
only on the drafts so far (never on the verify step's uniforms): given an accepted prefix, the next
emitted token is either a verified draft or the bonus token, each distributed as the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..sampling import check_sampling
from . import arguments
from .decoding import pick, prefill_chunks, run_generation
from .graph import StaticDecode, capture_mode

# draft_filter(request, position, proposed_token) -> token: replaces the MTP layer's token choice
# (the MTP layer still runs), e.g. the benchmark's synthetic draft source with a set acceptance
# rate. Under sampling a filtered token is verified as a deterministic draft (draft_probs one-hot:
# accept with probability p(d), else resample from p without d), which keeps the target
# distribution whatever token the filter returns, as long as it does not look at future randomness.
DraftFilter = Callable[[int, int, int], int]

# adaptive drafting's default: propose the next draft only while the MTP layer gives the last one
# more than this probability (`generate(..., adaptive=True, draft_threshold=...)`)
DEFAULT_DRAFT_THRESHOLD = 0.5


def _mtp_key(i: int) -> tuple[str, int]:
    """Cache id of request i's MTP entries (the target entries use i itself)."""
    return ("mtp", i)


class SpeculativeDecoder:
    """Batched MTP speculative decoding over one paged cache holding target and MTP entries.

    `prefill(prompts)` -> the first token of each request; `step(reqs)` -> one draft/verify round
    for the given requests, returning per request (accepted drafts, emitted tokens). `seq[i]` holds
    prompt + emitted tokens; `cache` is the shared `PagedCache` (request i: target entries under
    id i, MTP entries under `("mtp", i)`). `draft_threshold=None` drafts k tokens per round (fewer
    only at the end of the context); a number in [0, 1] drafts adaptively (module docstring).
    `accepted[i]` / `drafted[i]`: drafts accepted / proposed at each of request i's rounds.
    """

    steps_stat = "verify_steps"

    def __init__(self, model, k: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 cache_tokens: int, draft_filter: DraftFilter | None = None, draft_threshold: float | None = None,
                 graph="auto", batch: int = 1, budget: Sequence[int] | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative needs a positive integer number of draft tokens, got {k!r}")
        if model.mtp is None:
            raise ValueError("speculative decoding needs the MTP layer, which this model does not have "
                             "(num_nextn_predict_layers = 0, or model.layers.N.* tensors missing, or "
                             "loaded with include_mtp=False)")
        self.model, self.k = model, k
        self.threshold = arguments.check_draft_threshold(draft_threshold, allow_none=True)
        self.temperature, self.top_p = check_sampling(temperature, top_p)
        self.sampling = self.temperature > 0.0
        self.gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self.draft_filter = draft_filter
        self.graph_mode, self.graph_why = capture_mode(model, graph)
        self.verify_graph = self.mtp_graph = None
        if self.graph_mode:
            # the verify step (k+1 tokens per request) and the MTP draft step as graphs over one cache;
            # the catch-up MTP step (a+1 tokens, a varies) and the prefill stay eager
            self.cache = model.new_cache(cache_tokens + model.block_size, mtp=True)    # + the null block
            strict = graph != "auto"
            self.verify_graph = StaticDecode(model, self.cache, batch, self.graph_mode, strict=strict, q=k + 1,
                                             kind="verify")
            if k > 1:
                self.mtp_graph = StaticDecode(model, self.cache, batch, self.graph_mode, strict=strict, kind="mtp")
        else:
            self.cache = model.new_cache(cache_tokens, mtp=True)
        self.seq: list[list[int]] = []
        self.prompt_len: list[int] = []
        # request -> the most new tokens it may emit (`max_new_tokens`, less near the context's end): a
        # request with b tokens left drafts at most b - 1 (a round emits up to its drafts + 1), none at 1
        self.budget = None if budget is None else [int(b) for b in budget]
        # request -> MTP output hidden [Hd], logits [V], top-k row [topk] at position n-1
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # request -> (tokens seq[m+1..n], target hiddens [n-m, Hd]) the MTP cache still lacks
        self.stale: dict[int, tuple[list[int], torch.Tensor]] = {}
        self.accepted: dict[int, list[int]] = {}  # request -> drafts accepted at each of its verify steps
        self.drafted: dict[int, list[int]] = {}   # request -> drafts proposed at each of its verify steps

    # ---- sampling ---------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [N, V] -> tokens [N] and, when sampling, the distribution they came from [N, V]."""
        return pick(logits, self.temperature, self.top_p, self.gen)

    def _confidence(self, logits: torch.Tensor, q: torch.Tensor | None, tokens: list[int]) -> list[float]:
        """The MTP layer's probability of each drafted token: q (the distribution it was drawn from)
        under sampling, the softmax of the MTP logits at temperature 1 under greedy."""
        dist = q if q is not None else torch.softmax(logits.float(), -1)
        idx = torch.tensor(tokens, dtype=torch.long, device=dist.device)[:, None]
        return dist.gather(1, idx)[:, 0].tolist()

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
            self.prompt_len.append(len(p))
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
        A request within k tokens of the context's end drafts only as many as still fit, and one with
        b new tokens left (`budget`) at most b - 1: with one left it drafts none (a plain decode step)."""
        C = self.model.cfg.max_position_embeddings
        cap: dict[int, int] = {}
        for i in reqs:
            n = len(self.seq[i]) - 1                       # the verify step feeds positions n..n+k_i
            if n + 1 >= C:
                raise ValueError(f"request {i} has filled the context ({C} tokens); nothing more fits")
            cap[i] = min(self.k, C - 1 - n)
            if self.budget is not None and i < len(self.budget):
                left = self.budget[i] - (len(self.seq[i]) - self.prompt_len[i])    # new tokens still wanted
                cap[i] = max(0, min(cap[i], left - 1))
        return self._round(list(reqs), cap) if cap else {}

    def _draft(self, reqs: list[int], cap: dict[int, int], n: dict[int, int]
               ) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
        """Per request its drafts d_1..d_k_i (k_i <= cap[i]; adaptive drafting stops earlier) and,
        when sampling, the distribution each was drawn from. Each MTP step runs for the requests
        still drafting only."""
        m, cache, thr = self.model, self.cache, self.threshold
        hid = torch.stack([self.pending[i][0] for i in reqs])                        # [B, Hd]
        logits = torch.stack([self.pending[i][1] for i in reqs])                     # [B, V]
        share = torch.stack([self.pending[i][2] for i in reqs]) if m.cfg.index_share_for_mtp_iteration else None
        drafts: dict[int, list[int]] = {i: [] for i in reqs}
        dprobs: dict[int, list[torch.Tensor]] = {i: [] for i in reqs}
        live = list(reqs)                                   # requests still drafting: the rows of hid etc.
        while True:
            d, q = self._pick(logits)
            d = d.tolist()
            if self.draft_filter is not None:
                d = [int(self.draft_filter(i, n[i] + 1 + len(drafts[i]), t)) for i, t in zip(live, d)]
            conf = self._confidence(logits, q, d) if thr is not None else None
            if self.draft_filter is not None and q is not None:
                q = F.one_hot(torch.tensor(d, device=q.device), q.shape[-1]).to(q.dtype)
            for b, i in enumerate(live):
                drafts[i].append(d[b])
                if q is not None:
                    dprobs[i].append(q[b])
            keep = [b for b, i in enumerate(live)
                    if len(drafts[i]) < cap[i] and (conf is None or conf[b] > thr)]
            if not keep:
                return drafts, dprobs
            if len(keep) < len(live):
                rows = torch.tensor(keep, dtype=torch.long, device=hid.device)
                hid = hid[rows]
                share = share[rows.to(share.device)] if share is not None else None
                live, d = [live[b] for b in keep], [d[b] for b in keep]
            # MTP at position n+j-1 (j drafts so far): hidden = its own output there, token = d_j
            out = None
            if self.mtp_graph is not None:
                out = self.mtp_graph.step([_mtp_key(i) for i in live], d, hid, share)
            if out is not None:
                hid, logits, _ = out
                arguments.finite_logits(logits, m.ops, "MTP logits")
            else:
                _, hid, logits, _ = m.run_mtp(cache, {_mtp_key(i): [t] for i, t in zip(live, d)}, hid, share)

    def _verify(self, draft: list[list[int]], tgt: torch.Tensor, dprobs: list[list[torch.Tensor]]
                ) -> tuple[list[int], list[list[int]]]:
        """`mtp_verify` over requests with the same number of drafts k: draft [G][k], target logits
        [G, k+1, V] -> (accepted, tokens) as lists."""
        m, k, dev = self.model, len(draft[0]), tgt.device
        draft_probs = torch.stack([torch.stack(p) for p in dprobs]).to(dev) if self.sampling else None  # [G, k, V]
        u = torch.rand(len(draft), k + 1, generator=self.gen).to(dev) if self.sampling else None
        acc, toks = m.ops.mtp_verify(torch.tensor(draft, dtype=torch.long, device=dev), tgt, draft_probs,
                                     temperature=self.temperature, top_p=self.top_p, uniforms=u)
        return acc.tolist(), toks.tolist()

    def _verify_graph(self, reqs: list[int], cap: dict[int, int], drafts: dict[int, list[int]]):
        """The verify step through its graph: (hidden [n*(k+1), Hd], logits [n*(k+1), V]), or None (no
        graph, its bucket eager, or a request too near the context's end for k+1 positions). A request
        with fewer drafts (adaptive) is padded with copies of its last draft: the rows past its own are
        never read, and its rollback drops their cache entries like any rejected draft's."""
        if self.verify_graph is None or any(cap[i] < self.k for i in reqs):
            return None
        toks = [t for i in reqs for t in ([self.seq[i][-1]] + drafts[i] + [drafts[i][-1]] * (self.k - len(drafts[i])))]
        return self.verify_graph.step(reqs, toks)

    def stats(self) -> dict:
        """Whether graphs ran: the verify step's buckets, and the MTP draft step's."""
        if self.verify_graph is None:
            return {"graph": self.graph_why, "graphs_captured": 0}
        v, d = self.verify_graph.stats(), self.mtp_graph.stats() if self.mtp_graph is not None else {}
        return {"graph": v["graph"], "graphs_captured": v["graphs_captured"] + d.get("graphs_captured", 0),
                "graph_buckets": v["graph_buckets"], "eager_buckets": v["eager_buckets"],
                "mtp_graph_buckets": d.get("graph_buckets", []), "mtp_eager_buckets": d.get("eager_buckets", []),
                "graph_capture_s": round(v["graph_capture_s"] + d.get("graph_capture_s", 0.0), 3)}

    def _round(self, reqs: list[int], cap: dict[int, int]) -> dict[int, tuple[int, list[int]]]:
        """One draft/verify round: request i drafts up to cap[i] tokens."""
        m, cache = self.model, self.cache
        self.catch_up(reqs)
        n = {i: len(self.seq[i]) - 1 for i in reqs}                                  # target cache lengths
        drafting = [i for i in reqs if cap[i] > 0]       # the others verify their last token alone
        drafts, dprobs = self._draft(drafting, cap, n) if drafting else ({}, {})
        for i in reqs:
            drafts.setdefault(i, [])
            dprobs.setdefault(i, [])
        # ---- verify: one target step over [seq[n], d_1..d_k_i] per request -----------------------
        out = self._verify_graph(reqs, cap, drafts)
        if out is not None:                 # every request verified k+1 tokens (the last ones padding)
            h, lg = out
            arguments.finite_logits(lg, m.ops)
            start = {i: b * (self.k + 1) for b, i in enumerate(reqs)}
        else:
            st, h = m.run(cache, {i: [self.seq[i][-1]] + drafts[i] for i in reqs})
            lg = m.logits(h)                                                         # [sum(k_i + 1), V]
            start = dict(zip(st.reqs, st.meta.cu_host))
        by_k: dict[int, list[int]] = {}
        for i in reqs:
            by_k.setdefault(len(drafts[i]), []).append(i)
        verdict: dict[int, tuple[int, list[int]]] = {}
        for k in sorted(by_k, reverse=True):
            group = by_k[k]
            if len(group) == len(reqs) and lg.shape[0] == len(reqs) * (k + 1):       # the usual case: no copy
                tgt = lg.view(len(reqs), k + 1, -1)
            else:
                rows = torch.tensor([start[i] + r for i in group for r in range(k + 1)], device=lg.device)
                tgt = lg[rows].view(len(group), k + 1, -1)                           # [G, k+1, V]
            if k == 0:       # no draft: the target's own token, picked as plain decoding picks it
                acc, toks = [0] * len(group), [[t] for t in self._pick(tgt[:, 0])[0].tolist()]
            else:
                acc, toks = self._verify([drafts[i] for i in group], tgt, [dprobs[i] for i in group])
            verdict.update((i, (int(a), t)) for i, a, t in zip(group, acc, toks))
        # ---- commit, roll back, queue the MTP catch-up ------------------------------------------
        out = {}
        for i in reqs:
            k, (a, toks) = len(drafts[i]), verdict[i]
            if not 0 <= a <= k or any(t < 0 for t in toks[:a + 1]):
                raise RuntimeError(f"backend {m.backend_name!r}: mtp_verify returned accepted={a} and tokens "
                                   f"{toks} for k={k}; expected 0..k accepted and a+1 valid tokens")
            new = [int(t) for t in toks[:a + 1]]
            self.accepted.setdefault(i, []).append(a)
            self.drafted.setdefault(i, []).append(k)
            self.seq[i].extend(new)
            cache.truncate(i, n[i] + a + 1)                       # keep seq[n], d_1..d_a
            cache.truncate(_mtp_key(i), n[i])                     # drop the draft-step entries
            rows = h[start[i]:start[i] + a + 1]                   # target hiddens at n..n+a
            self.stale[i] = (self.seq[i][n[i] + 1:n[i] + a + 2], rows)
            out[i] = (a, new)
        return out


def speculative_stats(dec: SpeculativeDecoder) -> dict[str, float]:
    """Per request and verify step: `mean_acceptance_length` (tokens emitted, the bonus counted; 1.0
    = no draft ever accepted), `mean_drafted_tokens` (drafts proposed), `mean_accepted_drafts`, and
    `draft_acceptance_rate` (accepted drafts / proposed drafts). NaN when no verify step ran."""
    acc = [a for v in dec.accepted.values() for a in v]
    drafted = [k for v in dec.drafted.values() for k in v]
    nan = float("nan")
    return {"mean_acceptance_length": (sum(acc) + len(acc)) / len(acc) if acc else nan,
            "mean_accepted_drafts": sum(acc) / len(acc) if acc else nan,
            "mean_drafted_tokens": sum(drafted) / len(drafted) if drafted else nan,
            "draft_acceptance_rate": sum(acc) / sum(drafted) if sum(drafted) else nan}


def generate_speculative(model, prompts, *, max_new_tokens: int, k: int, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                         prefill_chunk: int | None = None, cache_tokens: int | None = None,
                         adaptive: bool = False, draft_threshold: float | None = None,
                         draft_filter: DraftFilter | None = None, return_decoder: bool = False, graph="auto"):
    """`GLM52.generate(..., speculative=k)`: same arguments and result as plain generation.
    `adaptive=True` stops a request's drafting early when the MTP layer is unsure (module
    docstring; `draft_threshold`, default `DEFAULT_DRAFT_THRESHOLD`). Stats add `speculative` (k),
    `adaptive`, `draft_threshold` (None when fixed), `verify_steps` and `speculative_stats`'s."""
    arguments.generation(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         speculative=k, prefill_chunk=prefill_chunk, stop_at_eos=stop_at_eos,
                         cache_tokens=cache_tokens, adaptive=adaptive, draft_threshold=draft_threshold)
    threshold = (DEFAULT_DRAFT_THRESHOLD if draft_threshold is None else float(draft_threshold)) if adaptive else None
    prompts = model.encode_prompts(prompts)
    # target: prompt + new + k drafts in flight (never past the context); MTP: the same less two;
    # a spare block per cache id
    budget = arguments.budgets(model, prompts, max_new_tokens)
    C = model.cfg.max_position_embeddings
    need = cache_tokens or sum(2 * (min(len(p) + n + k, C) + model.block_size) for p, n in zip(prompts, budget))
    dec = SpeculativeDecoder(model, k, temperature=temperature, top_p=top_p, seed=seed, cache_tokens=need,
                             draft_filter=draft_filter, draft_threshold=threshold, graph=graph, batch=len(prompts),
                             budget=budget)
    res = run_generation(model, dec, prompts, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                         prefill_chunk=prefill_chunk,
                         extra_stats={"speculative": k, "adaptive": adaptive, "draft_threshold": threshold})
    res.stats.update(speculative_stats(dec))
    return (res, dec) if return_decoder else res


__all__ = ["SpeculativeDecoder", "generate_speculative", "speculative_stats", "DraftFilter", "DEFAULT_DRAFT_THRESHOLD"]
