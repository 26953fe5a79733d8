"""`glm52 serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    glm52 serve [CKPT] --host 127.0.0.1 --port 8000 [--backend B] [--deployment YAML] [--speculative K]

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
`"stream": true`), GET /v1/models, /health and /metrics (Prometheus text format).

Threads: one engine thread owns the model and the cache and runs `Engine.step()` in a loop
(engine/scheduler.py); HTTP handlers run on uvicorn's event loop, check their request, and hand it
to the engine thread through a queue; each step's outputs come back through the event loop to the
handler that waits on them. A client that disconnects (a closed stream, or a dropped non-streaming
request) aborts its requests, and their cache blocks are free at the engine's next turn.

Why FastAPI + uvicorn: they are the stack the OpenAI-compatible servers people already run use
(vLLM's and SGLang's), so clients and proxies meet the behaviour they expect (SSE framing, disconnect
handling through Starlette's `StreamingResponse`); both are actively maintained and typed, and
uvicorn is the reference ASGI server. aiohttp would also do; FastAPI adds nothing heavy here (the
request bodies are checked by hand below, so that every refusal names its field the OpenAI way).

Log-probabilities (`logprobs`; chat: `logprobs` + `top_logprobs`) come from the engine with each step's
tokens (SamplingParams.logprobs) and are formatted the OpenAI way (`completion_logprobs`, `chat_logprobs`).

Refusals are HTTP 400 with `{"error": {"message", "type": "invalid_request_error", "param", "code"}}`
(404 for an unknown model). Chat prompts use the checkpoint's chat template (`chat_template.jinja`,
or `chat_template` in `tokenizer_config.json`), else `DEFAULT_CHAT_TEMPLATE`.

Under torchrun (`--tp`, `--dp`, `--ep`, or a deployment's parallel section): the first rank of each tp
group builds the engine, serves HTTP and leads; the other ranks of its group follow its model steps
(engine/lockstep.py) and bind nothing. With dp > 1 (ep = 1: independent replicas) each dp group's first
rank serves its share on its own port, `--port` + the group's index (a load balancer in front spreads
the requests). Expert parallelism across dp groups (ep = tp x dp) is refused: every group would have to
join every other group's MoE steps while idle (engine/turns.py), which this engine loop does not do.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (`Request`) at run time

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable

from .config import is_int
from .engine.scheduler import MAX_LOGPROBS, Engine, Logprob, ParamError, RequestOutput, SamplingParams

log = logging.getLogger("glm52_backends.serve")

# The shipped model has no chat template: messages render as GLM's role markers, in plain text
# (`<|system|>`, `<|user|>`, `<|assistant|>` on their own lines, each message's content after its
# marker), ending with `<|assistant|>\n` for the reply; the reply stops at the next role marker.
DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
DEFAULT_CHAT_STOPS = ("<|user|>", "<|system|>", "<|assistant|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "tool", "developer")


class BadRequest(Exception):
    """An HTTP error the client caused: status, message, the field (`param`) and the error type."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request fields ---------------------------------------------------------------------------------
_is_int = is_int   # config.is_int: one definition


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _max_tokens(body: dict, name: str, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < 1:
        raise BadRequest(f"{name} must be a positive integer, got {v!r}", name)
    return v


def _only(body: dict, name: str, allowed: tuple, why: str) -> None:
    """A field this server supports only at its neutral values."""
    if body.get(name) not in allowed:
        raise BadRequest(f"{name}={body.get(name)!r} is not supported ({why})", name)


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise BadRequest(f"stop must be a non-empty string or a list of them, got {v!r}", "stop")
    return v


MAX_N = 128       # choices per prompt at most (OpenAI's limit for n)


def _choices(body: dict) -> int:
    """`n`: choices per prompt, each its own request (a seed given: seed + j for choice j)."""
    n = body.get("n")
    if n is None:
        return 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise BadRequest(f"n must be an integer in [1, {MAX_N}], got {n!r}", "n")
    return n


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request wants log-probabilities for (None: none).
    Completions: `logprobs` an integer 0..20. Chat: `logprobs` true, with `top_logprobs` 0..20."""
    def count(name: str) -> int:
        v = body[name]
        if not _is_int(v) or not 0 <= v <= MAX_LOGPROBS:
            raise BadRequest(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}", name)
        return v
    if not chat:
        _only(body, "top_logprobs", (None,), "a chat completions field; completions take logprobs=N")
        return None if body.get("logprobs") is None else count("logprobs")
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise BadRequest(f"logprobs must be true or false, got {on!r}", "logprobs")
    if body.get("top_logprobs") is not None:
        if not on:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return count("top_logprobs")
    return 0 if on else None


def _echo(body: dict, chat: bool) -> bool:
    """Completions' `echo`: the prompt returned before the completion (with `logprobs`, the prompt
    tokens' log-probabilities too, the first one null)."""
    v = body.get("echo")
    if v is None:
        return False
    if chat:
        _only(body, "echo", (False,), "a completions field")
    if not isinstance(v, bool):
        raise BadRequest(f"echo must be true or false, got {v!r}", "echo")
    return v


def sampling_params(body: dict, default_max_tokens: int | None, chat: bool = False
                    ) -> tuple[SamplingParams, int | None]:
    """SamplingParams from an OpenAI request body (max_tokens None: to the end of the context)."""
    _choices(body)
    _only(body, "best_of", (None, 1, body.get("n")), "best_of > n (ranking choices by log-probability)")
    logprobs = _logprobs(body, chat)
    prompt_logprobs = logprobs if _echo(body, chat) else None
    _only(body, "suffix", (None, ""), "no insertion")
    if body.get("logit_bias"):
        raise BadRequest("logit_bias is not supported", "logit_bias")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise BadRequest(f"stop_token_ids must be a list of integers, got {ids!r}", "stop_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    max_tokens = _max_tokens(body, "max_tokens", None)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        max_tokens = _max_tokens(body, "max_completion_tokens", None)
    spec = body.get("speculative")
    if spec is not None and not _is_int(spec):
        raise BadRequest(f"speculative must be an integer (MTP drafts per round for this request), got {spec!r}",
                         "speculative")
    params = SamplingParams(max_tokens=1, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), seed=seed,
                            stop=_stop(body), stop_token_ids=ids, ignore_eos=ignore_eos, speculative=spec,
                            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 1e4, lo_open=True))
    return params, max_tokens if max_tokens is not None else default_max_tokens


def completion_logprobs(lps: list, text_of, offset: int) -> tuple[dict, int]:
    """The completions API's `logprobs` object for these tokens (`Logprob`s): token strings, their
    log-probabilities, per token a {string: log-probability} of the best alternatives and the token
    itself (as vLLM gives it), and each token's offset in the completion text from `offset`.
    -> (object, the offset after them)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for x in lps:
        t = text_of(x.token)
        out["tokens"].append(t)
        out["token_logprobs"].append(x.logprob)
        if x.logprob is None:           # an echoed prompt's first token: nothing before it to predict it
            out["top_logprobs"].append(None)
        else:
            top = {text_of(i): v for i, v in x.top}
            top.setdefault(t, x.logprob)
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(t)
    return out, offset


def chat_logprobs(lps: list, text_of, bytes_of) -> dict:
    """The chat API's `logprobs` object: per token its string, log-probability, UTF-8 bytes and the
    best alternatives (as many as top_logprobs asked)."""
    def entry(i: int, v: float) -> dict:
        return {"token": text_of(i), "logprob": v, "bytes": list(bytes_of(i))}
    return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(i, v) for i, v in x.top]} for x in lps]}


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest(f"stream_options must be an object, got {opts!r}", "stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise BadRequest(f"stream_options.include_usage must be true or false, got {usage!r}", "stream_options")
    return stream, usage


# ---- the chat template ------------------------------------------------------------------------------
def load_chat_template(path: str | None) -> str | None:
    """The checkpoint's Jinja chat template: `chat_template.jinja`, else `tokenizer_config.json`'s."""
    if not path:
        return None
    file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            t = json.load(f).get("chat_template")
        return t if isinstance(t, str) else None
    return None


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        c = m.get("content")
        if isinstance(c, list):     # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            c = "".join(p["text"] for p in c)
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": c})
    return out


def render_chat(messages: list[dict[str, str]], template: str | None) -> str:
    """The prompt text of a conversation, ending where the assistant's reply begins."""
    if template is None:
        return "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in messages) + "<|assistant|>\n"
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


# ---- the engine thread ------------------------------------------------------------------------------
class EngineLoop:
    """Runs `engine.step()` on its own thread. `submit` and `abort` may be called from any thread;
    each request's outputs go to its `sink` (called on the engine thread)."""

    def __init__(self, engine: Engine, rate_window_s: float = 10.0):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._stop = threading.Event()
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self.window = rate_window_s
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="glm52-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, rid: str, prompt: list[int], params: SamplingParams, sink: Callable[[RequestOutput], None]) -> None:
        self._cmds.put(("add", rid, prompt, params, sink))

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid))

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last `window` seconds."""
        r = list(self._rate)
        now = time.monotonic()
        r = [x for x in r if x[0] >= now - self.window]
        if len(r) < 2 or r[-1][0] <= r[0][0]:
            return 0.0
        return (r[-1][1] - r[0][1]) / max(now - r[0][0], 1e-9)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                cmd = self._cmds.get(timeout=0.05) if block else self._cmds.get_nowait()
            except queue.Empty:
                return
            block = False
            if cmd[0] == "add":
                _, rid, prompt, params, sink = cmd
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                    self._sinks[rid] = sink
                except ValueError as e:
                    sink(RequestOutput(rid, [], "", True, "error", error=str(e)))
            else:
                self.engine.abort(cmd[1])
                self._sinks.pop(cmd[1], None)

    def _run(self) -> None:
        try:
            self._loop()
        finally:                                # under torchrun: the followers stop with the leader
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001 - a follower already gone; nothing left to stop
                log.exception("could not stop the ranks following this engine")

    def _loop(self) -> None:
        import torch
        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if not self.engine.has_unfinished():
                    self.engine.keepalive()     # followers wait inside a collective: keep it from timing out
                    continue
                stop = False
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                    log.exception("engine step failed; failing its requests")
                    self.errors += 1
                    outs = []
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid)
                        outs.append(RequestOutput(rid, [], "", True, "error", error=f"engine step failed: {e}"))
                    # under torchrun the ranks may have left the step at different collectives: they cannot
                    # be trusted to agree again, so serving ends (/health answers 503)
                    stop = self.engine.lockstep is not None
                now = time.monotonic()
                self._rate.append((now, self.engine.stats["generation_tokens"]))
                while self._rate and self._rate[0][0] < now - self.window:
                    self._rate.popleft()
                for o in outs:
                    sink = self._sinks.pop(o.request_id, None) if o.finished else self._sinks.get(o.request_id)
                    if sink is not None:
                        sink(o)
                if stop:
                    log.error("the tp ranks following this engine may have diverged: the engine stops")
                    return


# ---- the app ----------------------------------------------------------------------------------------
# The exposed metrics, one per line: name, type, the engine's metric it shows (Engine.metrics(); "@rate":
# the loop's generation rate over its window), help text ({window}: that window in seconds).
METRICS = """
requests_running              gauge    running                 Requests in the running batch.
requests_waiting              gauge    waiting                 Requests waiting to be scheduled (new or preempted).
generation_tokens_per_second  gauge    @rate                   Tokens generated per second over the last {window} s.
prompt_tokens_total           counter  prompt_tokens           Prompt tokens of admitted requests.
generation_tokens_total       counter  generation_tokens       Tokens generated.
cache_blocks_total            gauge    cache_blocks_total      Blocks of the paged cache.
cache_blocks_used             gauge    cache_blocks_used       Blocks some request holds.
cache_blocks_cached           gauge    cache_blocks_cached     Published prefix blocks no request holds (evictable).
cache_usage_ratio             gauge    cache_usage             Used blocks / all blocks.
prefix_cache_queries_total    counter  prefix_query_tokens     Prompt tokens looked up in the prefix cache.
prefix_cache_hits_total       counter  prefix_hit_tokens       Prompt tokens served from the prefix cache.
prefix_cache_evictions_total  counter  prefix_evictions        Published blocks evicted for new ones.
preemptions_total             counter  preemptions             Requests preempted (to be recomputed).
steps_total                   counter  steps                   Engine steps run.
graph_steps_total             counter  graph_steps             Target steps replayed from captured graphs (decode, verify).
requests_finished_total       counter  finished                Requests finished (any reason).
requests_aborted_total        counter  aborted                 Requests aborted (client gone).
spec_verify_rounds_total      counter  verify_rounds           Speculative verify rounds.
spec_draft_tokens_total       counter  drafted_tokens          MTP draft tokens proposed.
spec_accepted_tokens_total    counter  accepted_tokens         MTP draft tokens accepted.
spec_mean_acceptance_length   gauge    mean_acceptance_length  Tokens per verify round, the bonus counted (NaN: none ran).
"""


def metrics_text(loop: EngineLoop, model_name: str) -> str:
    """Prometheus text exposition (version 0.0.4) of the engine's gauges and counters (`METRICS`)."""
    m = {**loop.engine.metrics(), "@rate": loop.tokens_per_s()}
    lab = f'{{model_name="{model_name}"}}'
    out = []
    for line in METRICS.strip().splitlines():
        name, kind, key, help_ = line.split(None, 3)
        out += [f"# HELP glm52_{name} {help_.format(window=f'{loop.window:g}')}", f"# TYPE glm52_{name} {kind}",
                f"glm52_{name}{lab} {_num(m[key])}"]
    return "\n".join(out) + "\n"


def _num(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return str(int(v))
    return "NaN" if math.isnan(v) else repr(float(v))


def build_app(loop: EngineLoop, model_name: str, chat_template: str | None = None):
    """The FastAPI app over a started `EngineLoop`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    engine = loop.engine
    tok = engine.tokenizer
    C = engine.cfg.max_position_embeddings
    app = FastAPI(title="glm52 serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(BadRequest)
    async def _bad(_req, e: BadRequest):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        if not loop.alive():
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(loop, model_name), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "glm52_backends", "max_model_len": C}]}

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        name = body.get("model")
        if name is not None and name != model_name:
            raise BadRequest(f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                             status=404, code="model_not_found")
        return body

    def encode(text: str, param: str, special: bool = True) -> list[int]:
        if tok is None:
            raise BadRequest(f"{param}: text needs the checkpoint's tokenizer; this model has none (give token ids)",
                             param)
        return tok.encode(text, add_special_tokens=special)

    def completion_prompts(body: dict) -> list[list[int]]:
        p = body.get("prompt")
        if isinstance(p, str):
            return [encode(p, "prompt")]
        if isinstance(p, list) and p and all(_is_int(t) for t in p):
            return [p]
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            return [encode(x, "prompt") for x in p]
        if isinstance(p, list) and p and all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return p
        raise BadRequest("prompt must be a non-empty string, a list of strings, a list of token ids or a list of "
                         f"lists of token ids; got {json.dumps(p)[:80]}", "prompt")

    def admit(prompts: list[list[int]], params: SamplingParams, max_tokens: int | None) -> list[SamplingParams]:
        """Each prompt's own parameters (max_tokens defaults to the rest of the context), checked."""
        out = []
        for p in prompts:
            q = SamplingParams(**{**params.__dict__, "max_tokens": max_tokens or max(1, C - len(p))})
            try:
                engine.check_request(p, q)
            except ParamError as e:
                raise BadRequest(str(e), e.param) from None
            out.append(q)
        return out

    async def run(request: Request, rid: str, prompts: list[list[int]], params: list[SamplingParams]):
        """Submit every prompt; yield (index, RequestOutput) as they come; abort what is left on exit."""
        q: asyncio.Queue = asyncio.Queue()
        ev = asyncio.get_running_loop()
        live = set()
        for i, (p, sp) in enumerate(zip(prompts, params)):
            sub = f"{rid}-{i}"
            live.add(sub)
            loop.submit(sub, p, sp, lambda o, i=i: ev.call_soon_threadsafe(q.put_nowait, (i, o)))
        try:
            while live:
                try:
                    i, o = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    if not loop.alive():        # the engine stopped: nothing more comes
                        for sub in sorted(live):
                            yield int(sub.rsplit("-", 1)[1]), RequestOutput(sub, [], "", True, "error",
                                                                             error="the engine stopped")
                        live.clear()
                    continue
                if o.finished:
                    live.discard(o.request_id)
                yield i, o
        finally:
            for sub in live:                    # the client went away (or the handler failed): free them
                loop.abort(sub)

    def usage(outs: dict[int, list[RequestOutput]], n: int) -> dict:
        """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
        pt = sum(o[-1].prompt_tokens for i, o in outs.items() if i % n == 0)
        ct = sum(o[-1].output_tokens for o in outs.values())
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}

    def error_of(o: RequestOutput) -> BadRequest:
        return BadRequest(o.error or "the request failed", None, status=500, kind="server_error")

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def text_of(i: int) -> str:
        return tok.decode([i]) if tok is not None else f"token_id:{i}"

    def bytes_of(i: int) -> bytes:
        return tok.token_bytes(i) if tok is not None else text_of(i).encode()

    def echoed(prompt: list[int], o: RequestOutput) -> tuple[str, list]:
        """An echoed prompt: its text (the tokenizer's decoding; none without one) and its tokens'
        log-probabilities from the engine (`Logprob(first token, None)` first)."""
        text = tok.decode(prompt) if tok is not None else ""
        lps = o.prompt_logprobs or [None] * len(prompt)
        return text, [x if x is not None else Logprob(prompt[j], None) for j, x in enumerate(lps)]

    async def respond(request: Request, body: dict, prompts: list[list[int]], params: list[SamplingParams],
                      chat: bool):
        stream, include_usage = _stream_flags(body)
        echo = _echo(body, chat)
        n = _choices(body)
        if n > 1:       # choice j of prompt i is request i * n + j (the OpenAI order of `index`)
            prompts = [p for p in prompts for _ in range(n)]
            params = [dataclasses.replace(q, seed=None if q.seed is None else q.seed + j) for q in params
                      for j in range(n)]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        want_ids = body.get("return_token_ids") is True
        if not stream:
            outs: dict[int, list[RequestOutput]] = {i: [] for i in range(len(prompts))}
            async for i, o in run(request, rid, prompts, params):
                outs[i].append(o)
            if any(not o or not o[-1].finished for o in outs.values()):
                return JSONResponse({"error": {"message": "client disconnected", "type": "aborted"}}, status_code=499)
            bad = [o[-1] for o in outs.values() if o[-1].finish_reason == "error"]
            if bad:
                raise error_of(bad[0])
            choices = []
            for i, o in outs.items():
                text = "".join(x.text for x in o)
                c = {"index": i, "finish_reason": o[-1].finish_reason, "logprobs": None}
                lps = [x for part in o for x in part.logprobs or ()]
                if echo:
                    ptext, plps = echoed(prompts[i], next((x for x in o if x.prompt_logprobs), o[0]))
                    text, lps = ptext + text, plps + lps
                if params[i].logprobs is not None:
                    c["logprobs"] = chat_logprobs(lps, text_of, bytes_of) if chat else \
                        completion_logprobs(lps, text_of, 0)[0]
                c.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                if want_ids:
                    c["token_ids"] = [t for x in o for t in x.token_ids]
                choices.append(c)
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": choices, "usage": usage(outs, n)}

        async def events():
            obj_chunk = obj + ".chunk" if chat else obj
            head = {"id": rid, "object": obj_chunk, "created": int(time.time()), "model": model_name}
            last: dict[int, RequestOutput] = {}
            offsets = [0] * len(prompts)                # completions' text_offset, per choice
            if chat:
                for i in range(len(prompts)):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None, "logprobs": None}]})
            async for i, o in run(request, rid, prompts, params):
                first = i not in last
                last[i] = o
                if o.finish_reason == "error":
                    yield sse(error_of(o).body())
                    break
                if echo and first:            # the prompt, before the completion's first chunk
                    ptext, plps = echoed(prompts[i], o)
                    c = {"index": i, "text": ptext, "finish_reason": None, "logprobs": None}
                    if params[i].logprobs is not None:
                        c["logprobs"], offsets[i] = completion_logprobs(plps, text_of, offsets[i])
                    yield sse({**head, "choices": [c]})
                if not o.text and not o.finished and not o.logprobs:
                    continue
                c = {"index": i, "finish_reason": o.finish_reason if o.finished else None, "logprobs": None}
                if o.logprobs is not None:
                    if chat:
                        c["logprobs"] = chat_logprobs(o.logprobs, text_of, bytes_of)
                    else:
                        c["logprobs"], offsets[i] = completion_logprobs(o.logprobs, text_of, offsets[i])
                c.update({"delta": {"content": o.text} if o.text else {}} if chat else {"text": o.text})
                if want_ids:
                    c["token_ids"] = o.token_ids
                yield sse({**head, "choices": [c]})
            if include_usage and len(last) == len(prompts):
                yield sse({**head, "choices": [], "usage": usage({i: [o] for i, o in last.items()}, n)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompts = completion_prompts(body)
        params, max_tokens = sampling_params(body, 16)      # OpenAI's legacy default: 16 tokens
        return await respond(request, body, prompts, admit(prompts, params, max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        msgs = _messages(body)
        params, max_tokens = sampling_params(body, None, chat=True)
        text = render_chat(msgs, chat_template)
        prompt = encode(text, "messages", special=chat_template is None)
        if chat_template is None:
            params.stop = list(params.stop) + [s for s in DEFAULT_CHAT_STOPS if s not in params.stop]
        return await respond(request, body, [prompt], admit([prompt], params, max_tokens), chat=True)

    return app


# ---- the command ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from . import engine_config
    from .engine_config import int_at_least as _int_at_least
    ap = argparse.ArgumentParser(prog="glm52 serve", description="OpenAI-compatible server (completions, chat "
                                 "completions, models, health, metrics) over the continuous-batching engine.")
    ap.add_argument("checkpoint", nargs="?", help="HF-format GLM-5.x folder (default: the embedded tiny model)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=_int_at_least(0), default=8000, help="port (default 8000; 0 = any free port)")
    ap.add_argument("--deployment", metavar="YAML", help="a deployment config (configs/*.yaml or a bundled name)")
    ap.add_argument("--speculative", type=_int_at_least(0), default=0, metavar="K",
                    help="MTP draft tokens per verify round (0 = off; needs the MTP layer); a request may ask "
                         "for fewer with the body field \"speculative\"")
    ap.add_argument("--cache-tokens", type=_int_at_least(1), default=1 << 15,
                    help="paged cache size in tokens, all requests together (default 32768)")
    ap.add_argument("--max-num-batched-tokens", type=_int_at_least(1),
                    help="token budget of one step: decode tokens and prefill chunks together (default: the "
                         "deployment's max_batched_tokens with --deployment, else 512)")
    ap.add_argument("--max-num-seqs", type=_int_at_least(1), default=64, help="requests running at once (default 64)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="do not share prompt blocks by content hash")
    ap.add_argument("--served-model-name", help="the model id clients name (default: the checkpoint folder's name)")
    ap.add_argument("--threads", type=_int_at_least(1), help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of unseeded requests' generators")
    ap.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    # the engine's settings (engine_config.py): --backend, --dtype, --tp, --dp, --ep, --graph, cache formats, ...;
    # dp groups serve as replicas on --port + their index (with --ep 1); --dcp splits every request's cache
    # over the tp group's ranks, --offload keeps cold latent blocks in host memory
    engine_config.add_arguments(ap)
    return ap


class _Terminated(BaseException):
    """SIGTERM reached `serve_main` (after uvicorn's graceful shutdown, or before it started)."""


def _terminated(signum, frame):
    raise _Terminated()


def serve_main(argv: list[str]) -> int:
    from .engine_config import EngineConfig, from_args
    args = _parser().parse_args(argv)
    settings = {**from_args(args), "progress": False}
    plan = EngineConfig.from_settings("glm52 serve", **settings).parallel
    if plan.dp > 1 and plan.ep > 1:
        raise ValueError(f"--dp {plan.dp} with --ep {plan.ep}: expert parallelism across dp groups is not served "
                         f"(every group would join every other group's MoE steps while idle); use --ep 1 for dp "
                         f"replicas, or --dp 1 with --ep {plan.tp} (within the tp group)")
    if args.port and args.port + plan.dp - 1 > 65535:
        raise ValueError(f"--port {args.port} with --dp {plan.dp}: the dp groups serve on ports {args.port}.."
                         f"{args.port + plan.dp - 1}, past 65535")
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"glm52 serve needs FastAPI and uvicorn ({', '.join(missing)} missing): "
                          f"pip install 'glm52_backends[serve]'")
    import torch
    import uvicorn

    from .loader import default_checkpoint
    from .engine import GLM52
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.checkpoint or default_checkpoint()
    if not args.deployment:   # under torchrun the layout must cover the launched ranks (else each runs it all)
        from .engine.distributed import check_world
        check_world(plan)
    if args.deployment:
        model = GLM52.from_deployment(args.deployment, model=args.checkpoint or None, **settings)
        path = model.path or path
    else:
        model = GLM52(path, **settings)
    budget = args.max_num_batched_tokens or (model.deployment.max_batched_tokens if args.deployment else 512)
    engine = Engine(model, cache_tokens=args.cache_tokens, max_num_batched_tokens=budget,
                    max_num_seqs=args.max_num_seqs, speculative=args.speculative,
                    prefix_caching=not args.no_prefix_caching, seed=args.seed)
    layout = model.layout
    where = "" if layout is None else f" (rank {layout.rank}: tp {layout.tp_rank}/{model.plan.tp}, dp group " \
                                      f"{layout.dp_rank}/{model.plan.dp})"
    if not engine.leads:
        print(f"glm52 serve{where}: following the tp group's first rank", file=sys.stderr, flush=True)
        engine.follow()
        return 0
    name = args.served_model_name or ("glm52-tiny" if os.path.abspath(path) == os.path.abspath(default_checkpoint())
                                      else os.path.basename(os.path.normpath(path)))
    port = args.port + layout.dp_rank if layout is not None and args.port else args.port
    import socket
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, port))                  # port 0: the system picks a free one, printed below
    except OSError as e:
        sock.close()
        engine.close()                                # the followers stop too
        raise ValueError(f"--host {args.host} --port {port}: cannot bind ({e.strerror or e})") from None
    port = sock.getsockname()[1]
    loop = EngineLoop(engine).start()
    # uvicorn shuts down gracefully on SIGTERM and then raises it again: with this handler that ends
    # serve_main through its `finally` (the engine thread stops, and stops the ranks following it)
    import signal
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        app = build_app(loop, name, load_chat_template(model.path))
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))
        p, cache = model.plan, engine.cache
        layout = f"tp{p.tp} dp{p.dp} ep{p.ep} dcp{p.dcp}, " if p.world_size > 1 else ""
        where_kv = (f" ({cache.local_block_size} rows of each here)" if p.dcp > 1 else "") + (
            f", {cache.offload.slots} latent blocks per layer staged from host memory" if cache.offload else "")
        print(f"glm52 serve{where}: {name} on backend {model.backend_name}, {layout}cache {cache.num_blocks} blocks "
              f"of {engine.bs} tokens{where_kv}, speculative {args.speculative}, "
              f"graphs {engine.graph_mode or engine.graph_why}; "
              f"listening on http://{args.host}:{port}", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    except _Terminated:
        pass                                          # SIGTERM: a graceful stop, exit status 0
    finally:
        loop.stop()                                   # the engine thread stops the followers as it ends
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0


__all__ = ["build_app", "EngineLoop", "serve_main", "DEFAULT_CHAT_TEMPLATE", "render_chat", "BadRequest"]
