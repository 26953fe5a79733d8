"""Continuous batching: requests join and leave a running batch step by step (DESIGN.md §8).

    engine = Engine(model, cache_tokens=1 << 16)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=32, temperature=0.7, seed=1))
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutput: new token ids and text, finish reason
            ...
    engine.abort(rid)                      # at any time: its blocks are free at once

A request holds `ids` (prompt + emitted tokens) and `computed`, how many of them the cache holds.
Whenever `computed < len(ids)` the request feeds `ids[computed:computed + n]` in a step: a prefill
chunk, a resumed request's recompute, or a decode (n = 1, only the last emitted token missing);
a chunk that reaches the end of `ids` samples the next token from its last row.

One step (`_schedule`, then one target `model.run` over every chunk, vLLM v1's scheduler):
  1. running requests, oldest first: 1 token each (decode; 1 + drafts under MTP speculation) or
     the next prefill chunk, within `max_num_batched_tokens`. A request whose blocks cannot be
     reserved preempts the newest running request (recompute: its blocks are released, it goes to
     the front of the waiting queue with `computed = 0` and later prefills prompt + emitted tokens
     again, so it continues where it stopped), or waits itself when it is the newest.
  2. waiting requests, first come first served, while the budget, `max_num_seqs` and the free
     blocks allow: the longest run of published full blocks whose content hashes match the
     request's first tokens (a prefix hit: `PagedCache.share`), then a prefill chunk.
After the step every full block of a request is published under the hash of all tokens up to its
end (`PagedCache.publish`): later requests with that prefix skip computing it. Published blocks no
request holds stay findable until `reserve` needs them (least recently used first).
Finished requests (max tokens, EOS or a stop id, a stop string, the end of the context) release
their blocks in the step that finishes them.

MTP speculative decoding per request (`SamplingParams.speculative`, up to the engine's k): a decoding
request drafts with the MTP layer first (its catch-up step over the positions verified since its
last round, then up to k - 1 draft steps, each batched over the requests drafting), and its verify
chunk [last token, d_1..d_k] joins the target step with the other requests' rows; `mtp_verify`
accepts a prefix of the drafts, the target cache is truncated past them and the MTP cache back to the
verified length (engine/speculative.py describes the same round for `generate`). Requests decoding
speculatively skip prefix hits (their MTP cache needs the target's hidden states of every position).

Sampling is per request: temperature (0 = greedy), top-p, and a seed driving the request's own
generator, so a seeded request draws the same numbers whatever else runs beside it.

Captured graphs (`graph=`, engine/graph.py): a target step whose rows are all plain decodes replays
the "decode" graph of its batch bucket, one whose rows all verify the engine's k drafts the "verify"
graph, and MTP draft steps the "mtp" graph, over persistent buffers reading this engine's cache (one
more block: the null block the padding rows write to); anything else runs eagerly.

Several processes (torchrun, tp > 1, ep within the tp group): every rank of a tp group builds the
same engine; the first rank's engine schedules and broadcasts every model step and cache change it
makes (`_call`, `_cache_op`) before making it; the others make them in `follow()` (engine/lockstep.py).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import CacheExhausted, PagedCache
from ..sampling import check_sampling, probs_from_logits, sample_from
from .arguments import check_draft_threshold, finite_logits, graph_choice, nonfinite, positive_int, token_ids
from .graph import StaticDecode, capture_mode
from .lockstep import CacheDiverged, Lockstep, cache_digest, step_keys

FINISH_REASONS = ("stop", "length", "abort", "error")
log = logging.getLogger("glm52_backends.engine")


# ---- per-request parameters ------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """What one request asks for. `max_tokens` new tokens at most (fewer where the context ends
    first); `stop`: strings that end the output (not included in its text; needs a tokenizer);
    `stop_token_ids`: ids that end it (included, like EOS); `ignore_eos`: do not stop at the model's
    EOS; `seed`: the request's own generator (None: drawn from the engine's seed);
    `speculative`: MTP drafts per round (None = the engine's k, 0 = plain decoding); `logprobs`: return
    each new token's log-probability and the `logprobs` most likely alternatives' (None: none; 0: the
    token's own only). Log-probabilities are the model's: log_softmax of the raw logits at that position,
    before penalties, temperature and top-p (what vLLM returns by default); under MTP the target model's.
    Penalties (vLLM's order, before temperature / top-p / greedy): `repetition_penalty` r divides a
    positive logit by r and multiplies a negative one by r for every token in the prompt or the output
    (1 = off); then `frequency_penalty` times the token's count in the output and `presence_penalty` if
    it occurs there at all are subtracted (OpenAI's; 0 = off, in [-2, 2]). Under MTP the target logits
    of each verified position are penalized as if the drafts before it were accepted (only then does
    that position count), so the tokens are plain decoding's. `prompt_logprobs`: the same for each
    prompt token after the first (None for the first), with that many alternatives; such a request
    computes its whole prompt (no prefix-cache hits: a hit computes no logits)."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    speculative: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check(self, vocab_size: int, has_tokenizer: bool, max_k: int) -> None:
        """Each field; a bad one raises `ParamError` naming it."""
        _checked("max_tokens", positive_int, "max_tokens", self.max_tokens)
        _checked("temperature", check_sampling, self.temperature, 1.0)
        _checked("top_p", check_sampling, 0.0, self.top_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ParamError("seed", f"seed must be an integer or null, got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.stop and not has_tokenizer:
            raise ParamError("stop", "stop strings need the checkpoint's tokenizer; this model has none")
        _checked("stop_token_ids", token_ids, list(self.stop_token_ids), "stop_token_ids", vocab_size)
        if not isinstance(self.ignore_eos, bool):
            raise ParamError("ignore_eos", f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        k = self.speculative
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= max_k):
            raise ParamError("speculative", f"speculative must be an integer in [0, {max_k}] (the engine's MTP "
                                            f"drafts per round), got {k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                raise ParamError(name, f"{name} must be a number in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1e4:
            raise ParamError("repetition_penalty", f"repetition_penalty must be a number > 0 (1 = off), got {r!r}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
                raise ParamError(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token) "
                                       f"or null, got {n!r}")


MAX_LOGPROBS = 20          # alternatives per token at most (vLLM's default max_logprobs; OpenAI's top_logprobs)


@dataclass(frozen=True)
class Logprob:
    """One emitted token's log-probability and the most likely alternatives at its position, best first:
    `top` = ((token id, log-probability), ...), as many as the request asked for."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class ParamError(ValueError):
    """A request refused because of one field (`param`, as the OpenAI API names it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _checked(param: str, check, *args):
    """Run a boundary check (its result); its ValueError becomes a ParamError naming `param`."""
    try:
        return check(*args)
    except ParamError:
        raise
    except ValueError as e:
        raise ParamError(param, str(e)) from None


@dataclass
class RequestOutput:
    """What one step produced for one request: its new token ids and the new text they complete
    (text is held back while it may still become a stop string or ends in a partial character)."""
    request_id: Hashable
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None     # "stop" (EOS, a stop id or string), "length", "abort", "error"
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    logprobs: list[Logprob] | None = None    # one per token of token_ids, when the request asked for them
    prompt_logprobs: list[Logprob | None] | None = None   # per prompt token (None first), in its first output


@dataclass
class _Penalty:
    """A penalized request's token statistics on the device: its output's counts [V] (float32), which
    tokens occur in its prompt or output [V] (bool), and how many of its ids are counted."""
    counts: torch.Tensor
    seen: torch.Tensor
    counted: int


@dataclass
class Request:
    rid: Hashable
    prompt: list[int]
    params: SamplingParams
    arrival: float
    budget: int                             # new tokens it may emit (max_tokens, or the context's end)
    k: int                                  # MTP drafts per round; 0 = plain decoding
    gen: torch.Generator
    eos: frozenset[int]
    ids: list[int] = field(default_factory=list)
    computed: int = 0                       # tokens of ids in the target cache
    published: int = 0                      # its leading blocks already published
    hashes: list[bytes] = field(default_factory=list)   # chained content hash of each full block of ids
    cached_tokens: int = 0                  # prompt tokens served by prefix hits (first admission)
    admitted: bool = False
    # detokenization and stop strings
    text: str = ""
    sent: int = 0                           # chars of text already returned
    # speculative state: MTP output (hidden [Hd], logits [V], top-k) at the last verified position, and
    # the (tokens, target hiddens) the MTP cache still lacks (engine/speculative.py's `pending`/`stale`)
    pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    stale_tokens: list[int] = field(default_factory=list)
    stale_hidden: list[torch.Tensor] = field(default_factory=list)
    finish: str | None = None
    accepted: list[int] = field(default_factory=list)    # drafts accepted at each verify round
    drafted: list[int] = field(default_factory=list)     # drafts proposed at each verify round
    penalty: _Penalty | None = None         # its penalties' state on the logits' device (built on first use)
    prompt_lps: list | None = None          # prompt_logprobs as they are computed (sent with the first output)
    prompt_lps_sent: bool = False

    @property
    def n_out(self) -> int:
        return len(self.ids) - len(self.prompt)


@dataclass
class _Row:
    """One request's chunk in a step: its tokens, and its drafts when it verifies."""
    req: Request
    tokens: list[int]
    drafts: list[int] = field(default_factory=list)
    dprobs: list[torch.Tensor] = field(default_factory=list)
    cap: int = 0                            # drafts scheduled (adaptive drafting may propose fewer)

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of ids: its last row picks the next token."""
        return self.req.computed + len(self.tokens) - len(self.drafts) == len(self.req.ids)


def _block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Content hash of a full block: the parent block's hash and this block's token ids."""
    return hashlib.blake2b(parent + b"".join(int(t).to_bytes(4, "little") for t in tokens), digest_size=16).digest()


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> list[torch.Tensor]:
    """log_softmax of logits [N, V] (float32) at `tokens` [N], and the n best values and ids per row:
    [chosen [N], values [N, n], ids [N, n]] on the device."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    return [lp.gather(1, tokens[:, None])[:, 0], top[0], top[1]]


def _confidence(logits: torch.Tensor, q: list[torch.Tensor | None], tokens: list[int]) -> list[float]:
    """The MTP layer's probability of each drafted token (adaptive drafting): the distribution it was
    drawn from where sampling, the softmax of the MTP logits at temperature 1 where greedy."""
    dist = torch.softmax(logits.float(), -1)
    sampled = [b for b, p in enumerate(q) if p is not None]
    if sampled:
        dist[sampled] = torch.stack([q[b] for b in sampled]).to(dist)
    idx = torch.tensor(tokens, dtype=torch.long, device=dist.device)[:, None]
    return dist.gather(1, idx)[:, 0].tolist()


class Engine:
    """A continuous-batching engine over one model and one paged cache (module docstring).

    `cache_tokens`: cache size in tokens (all requests together); `max_num_batched_tokens`: a step's
    token budget (decode tokens and prefill chunks together); `max_num_seqs`: requests running at
    once; `speculative`: MTP drafts per round for requests that do not say (0 = off; needs the MTP
    layer); `prefix_caching`: share full prompt blocks by content hash; `static_batching`: admit
    only into an empty batch (the batch runs to its end before others join: a baseline for
    benchmarks); `seed`: where unseeded requests' generators come from; `graph`: decode steps as
    captured graphs ("auto", True, False, "trace", "compile" as `GLM52.generate` takes it; None = the
    model's `graph`): a step whose rows are all plain decodes (one token each, no MTP), a verify step
    whose rows all carry the engine's k drafts, and the MTP draft steps replay a graph of their batch
    bucket (engine/graph.py, over persistent buffers reading this engine's cache); prefill chunks, mixed
    steps and the MTP catch-up run eagerly.

    Under torchrun with tp > 1 (ep within the tp group) every rank of the tp group builds the same
    Engine: the first rank's (`leads`) schedules and calls `step`, the others call `follow()` and run
    its model steps until it calls `close()` (engine/lockstep.py).
    """

    def __init__(self, model, *, cache_tokens: int = 1 << 15, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, speculative: int = 0, prefix_caching: bool = True,
                 static_batching: bool = False, seed: int = 0, block_size: int | None = None,
                 graph: Any = None, prefill_chunk: int | None = None, draft_threshold: float | None = None,
                 draft_filter: Any = None, lockstep: bool = True, dp_turns: bool = False,
                 on_nonfinite: str = "finish"):
        positive_int("Engine: cache_tokens", cache_tokens)
        positive_int("Engine: prefill_chunk", prefill_chunk, allow_none=True)
        if on_nonfinite not in ("finish", "raise"):
            raise ValueError(f"Engine: on_nonfinite must be 'finish' or 'raise', got {on_nonfinite!r}")
        if draft_filter is not None and not callable(draft_filter):
            raise ValueError(f"Engine: draft_filter must be callable, got {type(draft_filter).__name__}")
        positive_int("Engine: max_num_batched_tokens", max_num_batched_tokens)
        positive_int("Engine: max_num_seqs", max_num_seqs)
        positive_int("Engine: speculative", speculative, allow_zero=True)
        if speculative and model.mtp is None:
            raise ValueError("Engine: speculative decoding needs the MTP layer, which this model does not have")
        if speculative >= max_num_batched_tokens:
            raise ValueError(f"Engine: max_num_batched_tokens ({max_num_batched_tokens}) must exceed speculative + 1 "
                             f"= {speculative + 1} tokens (one verify chunk)")
        plan = getattr(model, "plan", None)
        if getattr(model, "turns", None) is not None and not dp_turns:
            raise ValueError(f"Engine: expert parallelism across dp groups (tp={plan.tp}, dp={plan.dp}, ep={plan.ep}) "
                             f"is not served: every dp group joins every MoE step, so an idle group's engine would "
                             f"have to keep running the others' steps empty while it admits requests; serve with "
                             f"ep = 1 (dp replicas) or ep within one tp group (dp = 1)")
        self.model, self.cfg = model, model.cfg
        comms = getattr(model, "comms", None)
        if lockstep and comms is not None and plan is not None and plan.tp > 1:
            timeout = getattr(comms, "timeout", None)
            self.lockstep: Lockstep | None = Lockstep(comms.tp, timeout.total_seconds() if timeout else None)
        else:
            self.lockstep = None
        graph = getattr(model, "graph", "auto") if graph is None else graph_choice("Engine: graph", graph)
        self.graph_request = graph
        self.graph_mode, self.graph_why = capture_mode(model, graph)
        bs = block_size or model.block_size
        # graphs: one more block, the null block the padding rows of a bucket write to
        self.cache: PagedCache = model.new_cache(cache_tokens + (bs if self.graph_mode else 0), block_size=bs,
                                                 mtp=bool(speculative))
        self.bs = self.cache.block_size
        self.graphs: dict[str, StaticDecode] = {}
        if self.graph_mode:
            strict = graph != "auto"
            self.graphs["decode"] = StaticDecode(model, self.cache, max_num_seqs, self.graph_mode, strict=strict)
            if speculative:
                self.graphs["verify"] = StaticDecode(model, self.cache, max_num_seqs, self.graph_mode, strict=strict,
                                                     q=speculative + 1, kind="verify")
            if speculative > 1:
                self.graphs["mtp"] = StaticDecode(model, self.cache, max_num_seqs, self.graph_mode, strict=strict,
                                                  kind="mtp")
        self._h: torch.Tensor | None = None          # the last target step's hidden states ("logits" reads rows)
        self.max_tokens_step, self.max_seqs, self.k = max_num_batched_tokens, max_num_seqs, speculative
        # a prefill chunk's most tokens per request and step (None: the step's token budget alone)
        self.prefill_chunk = prefill_chunk
        # adaptive drafting (engine/speculative.py): a request stops drafting in a round once the MTP
        # layer's probability of its last draft is <= the threshold; None: up to k drafts every round
        self.draft_threshold = check_draft_threshold(draft_threshold, allow_none=True)
        self.draft_filter = draft_filter     # engine/speculative.py's DraftFilter, keyed by request id
        # "finish": a request whose logits are not finite finishes with an error (a server's requests are
        # independent); "raise": the step is rolled back and FloatingPointError names it (`generate`)
        self.on_nonfinite = on_nonfinite
        self.prefix_caching, self.static = prefix_caching, static_batching
        self.tokenizer = model.tokenizer
        self._seeds = random.Random(seed)
        self._ids = itertools.count()
        self.requests: dict[Hashable, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "prefix_query_tokens": 0,
                      "prefix_hit_tokens": 0, "preemptions": 0, "verify_rounds": 0, "drafted_tokens": 0,
                      "accepted_tokens": 0, "finished": 0, "aborted": 0, "errors": 0, "graph_steps": 0,
                      "decode_steps": 0}
        self.last_step_tokens = 0
        self.finished_log: list[Request] | None = None    # a list: every finished request is kept there

    @property
    def cache_capacity(self) -> int:
        """Tokens the cache holds for requests (all its blocks but the graphs' null block)."""
        return (self.cache.num_blocks - (1 if self.graph_mode else 0)) * self.bs

    def reset(self, *, seed: int = 0, **settings: Any) -> None:
        """Ready for a new run on the same cache and graphs (`generate` reuses a captured engine): every
        request dropped, counters at zero, `settings` (max_num_batched_tokens, prefill_chunk,
        draft_threshold, draft_filter) as given."""
        for rid in list(self.requests):
            self.abort(rid)
        names = {"max_num_batched_tokens": "max_tokens_step", "prefill_chunk": "prefill_chunk",
                 "draft_threshold": "draft_threshold", "draft_filter": "draft_filter"}
        for k, v in settings.items():
            setattr(self, names[k], v)
        self._seeds, self._ids = random.Random(seed), itertools.count()
        self.stats = dict.fromkeys(self.stats, 0)
        self.finished_log = None

    # ---- requests in and out -----------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ids, if the engine can serve it with these parameters; a refusal
        raises `ParamError` naming the field. Reads only the model's config and the cache's size: any
        thread may call it."""
        if isinstance(prompt_ids, (str, bytes)):
            raise ParamError("prompt", "prompt: give token ids (the engine does not tokenize)")
        prompt = _checked("prompt", token_ids, prompt_ids, "prompt", self.cfg.vocab_size)
        if not prompt:
            raise ParamError("prompt", "prompt: empty; give at least one token")
        C = self.cfg.max_position_embeddings
        if len(prompt) >= C:
            raise ParamError("prompt", f"prompt: {len(prompt)} tokens leave no room in the model's context of "
                                       f"{C} tokens")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.check(self.cfg.vocab_size, self.tokenizer is not None, self.k)
        k = self.k if params.speculative is None else params.speculative
        usable = self.cache_capacity // self.bs             # every block but a graph's null block
        need = self.cache.blocks_needed(len(prompt) + 1 + k) * (2 if k else 1)
        if need > usable:
            raise ParamError("prompt", f"prompt: {len(prompt)} tokens need {need} cache blocks of {self.bs} tokens, "
                                       f"the engine's cache has {usable}; raise cache_tokens")
        return prompt

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: Hashable | None = None) -> Hashable:
        """Queue a request (token ids); it joins the running batch at a later step. Returns its id."""
        params = params or SamplingParams()
        self._leading("add_request")
        prompt = self.check_request(prompt_ids, params)
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in the engine")
        k = self.k if params.speculative is None else params.speculative
        C = self.cfg.max_position_embeddings
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        eos = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.cfg.eos_token_id))
        req = Request(rid, prompt, params, time.perf_counter(), min(params.max_tokens, C - len(prompt)), k,
                      torch.Generator().manual_seed(seed), eos, ids=list(prompt))
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, request_id: Hashable) -> bool:
        """Drop a request now, waiting or running; its blocks are free when this returns. False when
        the engine does not hold it (finished already, or never added)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._free(req)
        req.finish = "abort"
        self.stats["aborted"] += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _free(self, req: Request) -> None:
        self._cache_op("release", req.rid)
        self._cache_op("release", ("mtp", req.rid))
        req.computed, req.published, req.pending = 0, 0, None
        req.stale_tokens, req.stale_hidden = [], []

    # ---- scheduling ------------------------------------------------------------------------------------
    def _blocks_for(self, req: Request, n_tokens: int, drafts: int) -> int:
        """New blocks `req` needs to feed `n_tokens` more (target), and its MTP entries under drafting."""
        c = self.cache
        need = c.blocks_needed(req.computed + n_tokens) - len(c.blocks.get(req.rid, ()))
        if drafts:   # MTP cache: caught up to the verified length, then drafts - 1 draft positions
            need += c.blocks_needed(req.computed + drafts - 1) - len(c.blocks.get(("mtp", req.rid), ()))
        return max(need, 0)

    def _drafts(self, req: Request) -> int:
        """Drafts `req` proposes this round: 0 unless it is decoding with speculation; never more than
        the context or its remaining budget can use."""
        if not req.k or req.computed != len(req.ids) - 1 or not (req.stale_tokens or req.pending):
            return 0
        n = req.computed
        return max(0, min(req.k, self.cfg.max_position_embeddings - 1 - n, req.budget - req.n_out - 1))

    def _preempt(self, req: Request) -> None:
        """Recompute later: blocks released, back to the front of the queue, emitted tokens kept."""
        self.running.remove(req)
        self._free(req)
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def _schedule(self) -> list[_Row]:
        rows: list[_Row] = []
        budget, spare = self.max_tokens_step, self.cache.free_blocks
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            d = self._drafts(req)
            n = min(len(req.ids) - req.computed + d, budget)
            if self.prefill_chunk is not None and not d:     # a prefill (or recompute) chunk
                n = min(n, self.prefill_chunk)
            d = min(d, n - 1)
            need = self._blocks_for(req, n, d)
            if need > spare and d:                 # short of blocks: no drafts this round first
                n, d = n - d, 0
                need = self._blocks_for(req, n, d)
            while need > spare and req in self.running:
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    req.finish = "length"          # alone and still short: the cache cannot hold it
                    break
                before = self.cache.free_blocks
                self._preempt(victim)              # the newest (never one scheduled already)
                spare += self.cache.free_blocks - before
            if req.finish is not None:
                i += 1
                continue
            if req not in self.running:            # it was the newest: preempted itself
                break
            if n:
                rows.append(_Row(req, req.ids[req.computed:req.computed + n - d], drafts=[0] * d, cap=d))
            spare -= need
            budget -= n
            i += 1
        if self.static and self.running:
            return rows
        while self.waiting and len(self.running) < self.max_seqs and (budget > 0 or self.static):
            req = self.waiting[0]
            hit = self._prefix_hit(req)
            start = len(hit) * self.bs
            n = min(len(req.ids) - start, budget, self.prefill_chunk or budget)
            # unheld published blocks it takes out of the free count, then the blocks of its chunk
            need = sum(self.cache.holders(b) == 0 for b in hit) + self.cache.blocks_needed(start + n) - len(hit)
            if need > spare:
                break
            self.waiting.popleft()
            if hit:
                self._cache_op("share", req.rid, hit)
                req.computed = start
            if not req.admitted:
                req.admitted, req.cached_tokens = True, start
                self.stats["prompt_tokens"] += len(req.prompt)
                if self.prefix_caching and not req.k:
                    self.stats["prefix_query_tokens"] += len(req.prompt)
                    self.stats["prefix_hit_tokens"] += start
            req.published = len(hit)
            self.running.append(req)
            if n:
                rows.append(_Row(req, req.ids[start:start + n]))
            spare -= need
            budget -= n
        return rows

    def _hashes(self, req: Request) -> list[bytes]:
        """Chained content hashes of the full blocks of `req.ids` (extended as it grows)."""
        h, bs = req.hashes, self.bs
        while (len(h) + 1) * bs <= len(req.ids):
            j = len(h)
            h.append(_block_hash(h[-1] if h else b"", req.ids[j * bs:(j + 1) * bs]))
        return h

    def _prefix_hit(self, req: Request) -> list[int]:
        """Published blocks matching the start of `req.ids`, leaving at least its last token to compute."""
        if not self.prefix_caching or req.k or req.params.prompt_logprobs is not None:
            return []
        keys = self._hashes(req)[:(len(req.ids) - 1) // self.bs]
        return self.cache.lookup(keys)

    def _publish(self, req: Request) -> None:
        if not self.prefix_caching:
            return
        full = min(req.computed // self.bs, len(self._hashes(req)))
        blocks = self.cache.blocks.get(req.rid, [])
        for j in range(req.published, full):
            self._cache_op("publish", blocks[j], req.hashes[j])
        req.published = max(req.published, full)

    # ---- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; the outputs of every request that emitted tokens or finished."""
        self._leading("step")
        outs: list[RequestOutput] = []
        rows = self._schedule()
        for req in [r for r in self.running if r.finish is not None]:      # could not grow: cache too small
            outs.append(self._finish(req))
        rows = [r for r in rows if r.req.finish is None]
        if not rows:
            self.last_step_tokens = 0
            return outs
        self.stats["steps"] += 1
        decoding = all(r.req.computed == len(r.req.ids) - 1 and len(r.tokens) == 1 for r in rows)
        self.stats["decode_steps"] += decoding
        m = self.model
        spec = [r for r in rows if r.drafts]
        mark = self.cache.mark([r.req.rid for r in rows]) if self.on_nonfinite == "raise" else None
        if spec:
            self._draft(spec)
        self.last_step_tokens = sum(len(r.tokens) + len(r.drafts) for r in rows)
        try:
            start, h, lg, first, prompt_rows = self._target(rows)
        except CacheExhausted:
            # the scheduler's count was off: the target step rolled back; so do the draft steps, and
            # the newest request waits to be recomputed
            for r in spec:
                self._cache_op("truncate", ("mtp", r.req.rid), r.req.computed)
            self._preempt(self.running[-1])
            return outs
        picks: dict[Hashable, tuple[int, int]] = {}   # request -> (its first logits row, its logits count)
        for r in rows:
            if r.drafts or r.samples:
                picks[r.req.rid] = (first[r.req.rid], len(r.drafts) + 1)
        new, failed, lps = self._pick(rows, lg, picks, prompt_rows)
        if failed and self.on_nonfinite == "raise":
            self.cache.rollback(mark)                         # the step never happened
            for r in spec:
                self.cache.truncate(("mtp", r.req.rid), r.req.computed)
            what = f"logits of decode step {self.stats['decode_steps']}" if decoding else "logits"
            nonfinite(m.ops, what, sorted(failed, key=list(picks).index), int((~torch.isfinite(lg)).sum()))
        for r in rows:
            req = r.req
            s = start[req.rid]
            if req.rid in failed:
                outs.append(self._finish(req, "error", f"non-finite logits (NaN/inf) from backend {m.backend_name!r}"))
                continue
            fed = len(r.tokens)
            toks = new.get(req.rid, [])
            if r.drafts:
                a = len(toks) - 1                       # drafts accepted
                req.accepted.append(a)
                req.drafted.append(len(r.drafts))
                self.stats["verify_rounds"] += 1
                self.stats["drafted_tokens"] += len(r.drafts)
                self.stats["accepted_tokens"] += a
                self._cache_op("truncate", req.rid, req.computed + fed + a)
                self._cache_op("truncate", ("mtp", req.rid), req.computed)
                fed += a
            if req.k:                                   # the MTP cache's catch-up: token j+1 at position j
                req.stale_hidden.append(h[s:s + fed])
            req.computed += fed
            if not toks:
                self._publish(req)
                if req.k:
                    req.stale_tokens.extend(req.ids[req.computed - fed + 1:req.computed + 1])
                continue
            out = self._emit(req, toks, lps.get(req.rid))
            if req.k:
                req.stale_tokens.extend(req.ids[req.computed - fed + 1:req.computed + 1])
            self._publish(req)
            if out is not None:
                outs.append(out)
        return outs

    def _target(self, rows: list[_Row]) -> tuple[dict[Hashable, int], torch.Tensor | None, torch.Tensor | None,
                                                 dict[Hashable, int]]:
        """The target step over every row: (each request's first row in the step, the final-normed
        hidden states [T, Hd] (None from the decode graph), the f32 logits of the rows that pick tokens:
        the last row of a sampling chunk, every row of a verify chunk (None: none picks), and each
        picking request's first row in those logits, and the rows asked for prompt log-probabilities:
        (request, their rows in those logits, the prompt positions they predict))."""
        kind = self._graph_kind(rows)
        if kind is not None:
            reqs = [r.req.rid for r in rows]
            q = self.graphs[kind].q
            # a verify row with fewer drafts than k (adaptive) is padded with copies of its last draft: the
            # rows past its own are never read, and the rollback drops their cache entries with the rejected
            toks = [t for r in rows for t in (r.tokens + r.drafts + r.drafts[-1:] * (q - 1 - len(r.drafts)))]
            out = self._call(("graph", kind, reqs, toks))
            if out is not None:                   # None: the bucket stays eager (its capture was refused)
                self.stats["graph_steps"] += 1
                start = {rid: b * q for b, rid in enumerate(reqs)}
                return (start, None, out, start, []) if kind == "decode" else (start, *out, start, [])
        chunks = {r.req.rid: r.tokens + r.drafts for r in rows}
        st, h = self._call(("run", chunks))
        start = dict(zip(st.reqs, st.meta.cu_host))
        want: list[int] = []
        first: dict[Hashable, int] = {}
        for r in rows:
            s = start[r.req.rid]
            if r.drafts:
                first[r.req.rid] = len(want)
                want.extend(range(s + len(r.tokens) - 1, s + len(r.tokens) + len(r.drafts)))
            elif r.samples:
                first[r.req.rid] = len(want)
                want.append(s + len(r.tokens) - 1)
        prompt_rows = []              # (request, its logits rows, the prompt positions they predict)
        for r in rows:
            req = r.req
            asked = req.params.prompt_logprobs is not None and not req.prompt_lps_sent
            n = min(len(r.tokens), len(req.prompt) - 1 - req.computed) if asked else 0
            if n > 0:                 # chunk row i predicts prompt token computed + i + 1
                s = start[req.rid]
                prompt_rows.append((req, list(range(len(want), len(want) + n)),
                                    list(range(req.computed + 1, req.computed + 1 + n))))
                want.extend(range(s, s + n))
        return start, h, self._call(("logits", want)) if want else None, first, prompt_rows

    def _graph_kind(self, rows: list[_Row]) -> str | None:
        """Which captured step serves these rows: "decode" (every row one token that samples, from a
        request with a cache and no MTP state to feed), "verify" (every row a decode with the engine's
        k drafts), else None (eager)."""
        if not self.graphs or any(r.req.computed == 0 for r in rows):
            return None
        if all(len(r.tokens) == 1 and not r.drafts and r.samples and not r.req.k for r in rows):
            return "decode"
        if "verify" in self.graphs and all(len(r.tokens) == 1 and r.cap == self.k and r.drafts for r in rows):
            return "verify"
        return None

    # ---- model steps and cache changes: the leader's, followed by the other tp ranks -------------------
    def _cache_op(self, name: str, *args):
        """A change of the cache outside a model step; under lockstep it goes with the next message."""
        out = getattr(self.cache, name)(*args)
        if self.lockstep is not None:
            self.lockstep.ops.append((name, args))
        return out

    def _call(self, call: tuple, tensors: Sequence[torch.Tensor | None] = ()):
        """Run a model step (`_exec`); under lockstep, broadcast it first so every tp rank runs it."""
        if self.lockstep is not None:
            self.lockstep.send(call, tensors, cache_digest(self.cache, step_keys(call)))
        return self._exec(call, tensors)

    def _exec(self, call: tuple, tensors: Sequence[torch.Tensor | None] = ()):
        kind, m = call[0], self.model
        if kind == "run":                         # ("run", chunks) -> (step, hidden)
            st, self._h = m.run(self.cache, call[1])
            return st, self._h
        if kind == "logits":                      # ("logits", rows of the last run's hidden) -> f32 logits
            rows = torch.tensor(call[1], dtype=torch.long, device=self._h.device)
            return m.logits(self._h[rows], check_finite=False)
        if kind == "mtp":                         # ("mtp", chunks) + (hidden, shared top-k)
            return m.run_mtp(self.cache, call[1], *tensors)
        if kind == "graph":                       # ("graph", kind, requests, tokens) [+ (hidden, shared top-k)]
            return self.graphs[call[1]].step(call[2], call[3], *tensors)
        raise ValueError(f"Engine: unknown model step {kind!r}")

    @property
    def leads(self) -> bool:
        """Whether this engine schedules (one process, or the first rank of its tp group)."""
        return self.lockstep is None or self.lockstep.leader

    def _leading(self, what: str) -> None:
        if not self.leads:
            raise RuntimeError(f"Engine.{what}: tp rank {self.lockstep.rank} follows rank 0's steps (Engine.follow); "
                               f"requests go to the tp group's first rank")

    def keepalive(self, every: float | None = None) -> None:
        """Leader, idle: a heartbeat to the followers when nothing was sent for `every` seconds (default
        `KEEPALIVE_S`, or a quarter of the collective timeout: they wait inside a collective, which times
        out), with a digest of the cache they compare."""
        ls = self.lockstep
        if ls is None or not ls.leader or ls.closed:
            return
        if time.monotonic() - ls.sent_at >= (ls.keepalive_s if every is None else every):
            ls.send(("idle", cache_digest(self.cache)))

    def close(self) -> None:
        """Leader: stop the followers (their `follow()` returns). Idempotent; a no-op in one process."""
        ls = self.lockstep
        if ls is not None and ls.leader and not ls.closed:
            ls.send(("stop", cache_digest(self.cache)))

    @torch.inference_mode()
    def follow(self) -> int:
        """A tp rank other than the first: run the leader's model steps, with its cache changes, until it
        calls `close()`; returns the number of messages. A step that raises here raised on the leader
        too (the same inputs and state): it is logged, and the leader's recovery arrives as cache changes.
        Cache entries that differ from the leader's (before a step, at a heartbeat) raise `CacheDiverged`."""
        ls = self.lockstep
        if ls is None or ls.leader:
            raise RuntimeError("Engine.follow: only the ranks of a tp group other than its first follow")
        while True:
            ops, call, tensors, check = ls.recv(self.model.device)
            for name, args in ops:
                getattr(self.cache, name)(*args)
            if check is not None and check != cache_digest(self.cache, step_keys(call)):
                raise CacheDiverged(f"tp rank {ls.rank}: the cache entries of step {call[0]!r} differ from rank 0's "
                                    f"(requests {step_keys(call)[:4]}): a step ran differently on this rank")
            if call[0] in ("idle", "stop"):
                mine = cache_digest(self.cache)
                if call[1] != mine:
                    raise CacheDiverged(f"tp rank {ls.rank}: the paged cache differs from rank 0's (digest {mine} "
                                        f"against {call[1]}): a step ran differently on this rank")
                if call[0] == "stop":
                    return ls.messages
                continue
            try:
                self._exec(call, tensors)
            except Exception as e:  # noqa: BLE001 - the leader met the same failure and recovers from it
                log.warning("tp rank %d: step %r failed as on rank 0 (%s: %s)", ls.rank, call[0], type(e).__name__, e)

    def _pick(self, rows: list[_Row], lg: torch.Tensor | None, picks: dict, prompt_rows: list = ()
              ) -> tuple[dict[Hashable, list[int]], set[Hashable], dict[Hashable, list[Logprob]]]:
        """The tokens each sampling or verifying request emits this step (one for a plain chunk, the
        accepted drafts and one more for a verify chunk), the requests whose logits hold NaN/inf
        (their tokens are void), and for the requests that asked (`SamplingParams.logprobs`) each token's
        log-probability and alternatives (and, for `prompt_rows`, the prompt tokens' into
        `Request.prompt_lps`). Everything is picked on the device and comes back in one host read."""
        if lg is None:
            return {}, set(), {}
        parts: list[torch.Tensor] = [(~torch.isfinite(lg).all(-1)).long()]       # which logits rows are bad
        lp_parts: list[torch.Tensor] = []                                          # log-probabilities, after them
        lp_plan: list[tuple[list[_Row], int, int]] = []                            # (rows, positions each, alternatives)
        plain = [r for r in rows if r.samples and not r.drafts]
        if plain:
            idx = torch.tensor([picks[r.req.rid][0] for r in plain], dtype=torch.long, device=lg.device)
            rows_lg = lg[idx]
            if any(r.req.params.penalized for r in plain):
                rows_lg = torch.stack([self._penalize(x, r.req) if r.req.params.penalized else x
                                       for x, r in zip(rows_lg, plain)])
            toks = self._sample(rows_lg, [r.req for r in plain])[0].long()
            parts.append(toks)
            asked = [j for j, r in enumerate(plain) if r.req.params.logprobs is not None]
            if asked:
                sel = torch.tensor(asked, dtype=torch.long, device=lg.device)
                n = max(plain[j].req.params.logprobs for j in asked)
                lp_parts += _logprobs(lg[idx[sel]], toks[sel], n)
                lp_plan.append(([plain[j] for j in asked], 1, n))
        groups: dict[tuple, list[_Row]] = {}
        for r in rows:
            if r.drafts:
                p = r.req.params
                groups.setdefault((len(r.drafts), p.temperature, p.top_p), []).append(r)
        for (k, temp, top_p), grp in groups.items():
            tgt = torch.stack([lg[picks[r.req.rid][0]:picks[r.req.rid][0] + k + 1] for r in grp])     # [G, k+1, V]
            draft = torch.tensor([r.drafts for r in grp], dtype=torch.long, device=tgt.device)
            dprobs = uni = None
            if temp > 0:
                dprobs = torch.stack([torch.stack(r.dprobs) for r in grp]).to(tgt.device)              # [G, k, V]
                uni = torch.cat([torch.rand(1, k + 1, generator=r.req.gen) for r in grp]).to(tgt.device)
            raw = tgt
            if any(r.req.params.penalized for r in grp):
                tgt = torch.stack([self._penalize(x, r.req, r.drafts) if r.req.params.penalized else x
                                   for x, r in zip(tgt, grp)])
            acc, toks = self.model.ops.mtp_verify(draft, tgt, dprobs, temperature=temp, top_p=top_p, uniforms=uni)
            parts.append(torch.cat([acc.long()[:, None], toks.long()], 1).flatten())
            asked = [j for j, r in enumerate(grp) if r.req.params.logprobs is not None]
            if asked:
                sel = torch.tensor(asked, dtype=torch.long, device=tgt.device)
                n = max(grp[j].req.params.logprobs for j in asked)
                lp_parts += _logprobs(raw[sel].flatten(0, 1), toks[sel].long().clamp(min=0).flatten(), n)
                lp_plan.append(([grp[j] for j in asked], k + 1, n))
        prompt_plan = []
        for req, lrows, positions in prompt_rows:
            n = req.params.prompt_logprobs
            sel = torch.tensor(lrows, dtype=torch.long, device=lg.device)
            nxt = torch.tensor([req.prompt[p] for p in positions], dtype=torch.long, device=lg.device)
            lp_parts += _logprobs(lg[sel], nxt, n)
            prompt_plan.append((req, positions, n))
        # the step's one host read (in float64 when log-probabilities ride along: token ids stay exact)
        wide = torch.float64 if lp_parts else torch.long
        flat = torch.cat([t.to(lg.device, wide).flatten() for t in parts + lp_parts]).tolist()
        bad, at = flat[:lg.shape[0]], lg.shape[0]
        failed = {rid for rid, (a, n) in picks.items() if any(bad[a:a + n])}
        out: dict[Hashable, list[int]] = {}
        for r in plain:
            if r.req.rid not in failed:
                out[r.req.rid] = [int(flat[at])]
            at += 1
        for (k, _, _), grp in groups.items():
            for r in grp:
                a, t = int(flat[at]), [int(x) for x in flat[at + 1:at + k + 2]]
                at += k + 2
                if r.req.rid in failed:
                    continue
                if not 0 <= a <= k or any(x < 0 for x in t[:a + 1]):
                    raise RuntimeError(f"backend {self.model.backend_name!r}: mtp_verify returned accepted={a} and "
                                       f"tokens {t} for k={k}; expected 0..k accepted and a+1 valid tokens")
                out[r.req.rid] = [int(x) for x in t[:a + 1]]
        def take(rows: int, n: int):
            """The next `_logprobs` block of the read: per row its chosen value and its n alternatives."""
            nonlocal at
            chosen, vals, ids = flat[at:at + rows], flat[at + rows:at + rows * (1 + n)], \
                flat[at + rows * (1 + n):at + rows * (1 + 2 * n)]
            at += rows * (1 + 2 * n)
            return [(chosen[i], tuple((int(ids[i * n + c]), vals[i * n + c]) for c in range(n))) for i in range(rows)]

        lps: dict[Hashable, list[Logprob]] = {}
        for grp, m, n in lp_plan:                   # m positions per request of the group
            block = take(len(grp) * m, n)
            for j, r in enumerate(grp):
                if r.req.rid in out:
                    want = r.req.params.logprobs
                    lps[r.req.rid] = [Logprob(tok, block[j * m + i][0], block[j * m + i][1][:want])
                                      for i, tok in enumerate(out[r.req.rid])]
        for req, positions, n in prompt_plan:
            if req.prompt_lps is None:
                req.prompt_lps = [None] * len(req.prompt)
            for p, (v, top) in zip(positions, take(len(positions), n)):
                req.prompt_lps[p] = Logprob(req.prompt[p], v, top)
        return out, failed, lps

    def _penalize(self, logits: torch.Tensor, req: Request, drafts: Sequence[int] = ()) -> torch.Tensor:
        """`req`'s penalties on its logits: [V], or [len(drafts) + 1, V] for a verify chunk, where row j
        counts drafts d_1..d_j as emitted (SamplingParams). The counts live on the device and take the
        tokens emitted since the last call (a preempted request keeps its ids, so its counts stay right)."""
        p, V, dev = req.params, logits.shape[-1], logits.device
        st = req.penalty
        if st is None:
            st = req.penalty = _Penalty(torch.zeros(V, device=dev), torch.zeros(V, dtype=torch.bool, device=dev),
                                        len(req.prompt))
            st.seen[torch.tensor(req.prompt, dtype=torch.long, device=dev)] = True
        if len(req.ids) > st.counted:
            new = torch.tensor(req.ids[st.counted:], dtype=torch.long, device=dev)
            st.counts.index_add_(0, new, torch.ones(new.shape[0], device=dev))
            st.seen[new] = True
            st.counted = len(req.ids)
        counts, seen = st.counts, st.seen
        if drafts:      # position j of the chunk follows drafts d_1..d_j
            d = torch.tensor(list(drafts), dtype=torch.long, device=dev)
            grow = torch.zeros(len(drafts) + 1, V, device=dev)
            grow[torch.arange(1, len(drafts) + 1, device=dev), d] = 1.0
            counts = counts + grow.cumsum(0)
            seen = seen | (counts > 0)
        x = logits.float()
        if p.repetition_penalty != 1:
            r = float(p.repetition_penalty)
            x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        return x - float(p.frequency_penalty) * counts - float(p.presence_penalty) * (counts > 0).float()

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """logits [N, V] -> tokens [N] (argmax where greedy, else drawn with each request's generator)
        and per row the distribution a token was drawn from (None where greedy)."""
        toks = logits.argmax(-1)
        probs: list[torch.Tensor | None] = [None] * len(reqs)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, r in enumerate(reqs):
            if r.params.temperature > 0:
                groups.setdefault((r.params.temperature, r.params.top_p), []).append(i)
        for (temp, top_p), idx in groups.items():
            p = probs_from_logits(logits[idx], temp, top_p)
            u = torch.cat([torch.rand(1, generator=reqs[i].gen) for i in idx]).to(p.device)
            toks[idx] = sample_from(p, u).to(toks.dtype)
            for j, i in enumerate(idx):
                probs[i] = p[j]
        return toks, probs

    # ---- speculative drafting ----------------------------------------------------------------------------
    def catch_up(self, reqs: Sequence[Request]) -> None:
        """Bring the MTP cache of `reqs` level with their target cache (one MTP step over the positions
        verified since their last round) and refresh their pending draft logits (`Request.pending`)."""
        todo = [q for q in reqs if q.stale_tokens]
        if not todo:
            return
        chunks = {("mtp", q.rid): q.stale_tokens for q in todo}
        hid = torch.cat([x for q in todo for x in q.stale_hidden])
        _, z, logits, idx = self._call(("mtp", chunks), (hid, None))
        ends = torch.tensor([len(c) for c in chunks.values()]).cumsum(0) - 1
        for q, e in zip(todo, ends.tolist()):
            q.pending = (z[e], logits[e], idx[e])
            q.stale_tokens, q.stale_hidden = [], []

    def _draft(self, rows: list[_Row]) -> None:
        """Catch the MTP cache of these requests up to their verified length, then draft: d_1 from the
        pending MTP logits, each further draft from one more MTP step (batched over the rows still drafting)."""
        m = self.model
        self.catch_up([r.req for r in rows])
        live = list(rows)
        hid = torch.stack([r.req.pending[0] for r in live])
        logits = torch.stack([r.req.pending[1] for r in live])
        share = torch.stack([r.req.pending[2] for r in live]) if self.cfg.index_share_for_mtp_iteration else None
        want = {id(r): len(r.drafts) for r in live}
        thr, filt = self.draft_threshold, self.draft_filter
        for r in live:
            r.drafts = []
        while True:
            d, q = self._sample(logits, [r.req for r in live])
            d = d.tolist()
            if filt is not None:      # the filter's token instead of the MTP layer's (engine/speculative.py)
                d = [int(filt(r.req.rid, r.req.computed + 1 + len(r.drafts), t)) for r, t in zip(live, d)]
            conf = _confidence(logits, q, d) if thr is not None else None
            for b, r in enumerate(live):
                r.drafts.append(int(d[b]))
                if q[b] is not None:
                    r.dprobs.append(q[b] if filt is None else
                                    torch.nn.functional.one_hot(torch.tensor(d[b]), q[b].shape[-1]).to(q[b]))
            keep = [b for b, r in enumerate(live) if len(r.drafts) < want[id(r)] and (conf is None or conf[b] > thr)]
            if not keep:
                return
            if len(keep) < len(live):
                sel = torch.tensor(keep, dtype=torch.long, device=hid.device)
                hid, share = hid[sel], (share[sel.to(share.device)] if share is not None else None)
                live, d = [live[b] for b in keep], [d[b] for b in keep]
            # the MTP layer at position n + j - 1 (j drafts so far): its own output hidden, token d_j
            keys = [("mtp", r.req.rid) for r in live]
            out = self._call(("graph", "mtp", keys, d), (hid, share)) if "mtp" in self.graphs else None
            if out is not None:
                hid, logits, _ = out
                finite_logits(logits, m.ops, "MTP logits")
            else:
                _, hid, logits, _ = self._call(("mtp", dict(zip(keys, ([t] for t in d)))), (hid, share))

    # ---- emitting and finishing --------------------------------------------------------------------------
    def _emit(self, req: Request, toks: list[int], lps: list[Logprob] | None = None) -> RequestOutput | None:
        """Append new tokens up to the budget, the first stop id, or a stop string (with their
        log-probabilities, when asked for)."""
        took: list[int] = []
        for t in toks:
            req.ids.append(t)
            took.append(t)
            if t in req.eos:
                req.finish = "stop"
                break
            if req.n_out >= req.budget:
                req.finish = "length"
                break
        self.stats["generation_tokens"] += len(took)
        text = self._detokenize(req)
        took_lps = lps[:len(took)] if lps is not None else None
        if req.finish is not None:
            return self._finish(req, req.finish, new_tokens=took, text=text, logprobs=took_lps)
        return RequestOutput(req.rid, took, text, prompt_tokens=len(req.prompt), output_tokens=req.n_out,
                             logprobs=took_lps, prompt_logprobs=self._prompt_logprobs(req))

    @staticmethod
    def _prompt_logprobs(req: Request) -> list[Logprob | None] | None:
        """The request's prompt log-probabilities the first time it has an output (then None)."""
        if req.params.prompt_logprobs is None or req.prompt_lps_sent:
            return None
        req.prompt_lps_sent = True
        return req.prompt_lps if req.prompt_lps is not None else [None] * len(req.prompt)

    def _detokenize(self, req: Request) -> str:
        """New text safe to return: not a possible start of a stop string, not a partial character."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(req.ids[len(req.prompt):])
        stops = req.params.stop
        if stops:
            lo = max(0, len(req.text) - max(map(len, stops)))
            hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
            if hits:
                text, req.finish = text[:min(hits)], "stop"
        req.text = text
        end = len(text)
        if req.finish is None:
            if stops:
                end -= max(map(len, stops)) - 1
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        end = max(end, req.sent)
        new, req.sent = text[req.sent:end], end
        return new

    def _finish(self, req: Request, reason: str | None = None, error: str | None = None, *,
                new_tokens: list[int] | None = None, text: str | None = None,
                logprobs: list[Logprob] | None = None) -> RequestOutput:
        reason = reason or req.finish or "length"
        req.finish = reason
        if req in self.running:
            self.running.remove(req)
        self.requests.pop(req.rid, None)
        self._free(req)
        if self.finished_log is not None:
            self.finished_log.append(req)
        self.stats["finished"] += 1
        self.stats["errors"] += reason == "error"
        if text is None:
            text = req.text[req.sent:] if self.tokenizer is not None else ""
        if logprobs is None and req.params.logprobs is not None:
            logprobs = []
        return RequestOutput(req.rid, new_tokens or [], text, True, reason, len(req.prompt), req.n_out, error,
                             logprobs, None if error else self._prompt_logprobs(req))

    # ---- whole runs --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[dict[str, Any]]:
        """Run `prompts` to the end: per prompt {"token_ids", "text", "finish_reason"}, and "logprobs"
        (a `Logprob` per token) for the requests that asked for them."""
        ps = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, q) for p, q in zip(prompts, ps)]
        res = {i: {"token_ids": [], "text": "", "finish_reason": None} for i in ids}
        for i, q in zip(ids, ps):
            if q is not None and q.logprobs is not None:
                res[i]["logprobs"] = []
            if q is not None and q.prompt_logprobs is not None:
                res[i]["prompt_logprobs"] = None
        while any(res[i]["finish_reason"] is None for i in ids):
            for o in self.step():
                if o.request_id in res:
                    res[o.request_id]["token_ids"] += o.token_ids
                    res[o.request_id]["text"] += o.text
                    if o.logprobs is not None and "logprobs" in res[o.request_id]:
                        res[o.request_id]["logprobs"] += o.logprobs
                    if o.prompt_logprobs is not None:
                        res[o.request_id]["prompt_logprobs"] = o.prompt_logprobs
                    if o.finished:
                        res[o.request_id]["finish_reason"] = o.finish_reason
        return [res[i] for i in ids]

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for /metrics: requests, cache blocks, prefix hits, acceptance length."""
        c, s = self.cache, self.stats
        rounds = s["verify_rounds"]
        return {"running": len(self.running), "waiting": len(self.waiting),
                "cache_blocks_total": c.num_blocks, "cache_blocks_used": c.used_blocks,
                "cache_blocks_cached": c.cached_blocks, "cache_usage": c.used_blocks / c.num_blocks,
                "prefix_evictions": c.evictions,
                "mean_acceptance_length": (s["accepted_tokens"] + rounds) / rounds if rounds else math.nan,
                **s}


__all__ = ["Engine", "SamplingParams", "RequestOutput", "ParamError", "FINISH_REASONS"]
