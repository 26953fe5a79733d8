"""`glm52 serve`: the real server in a subprocess on 127.0.0.1, driven by the official `openai` client.

The server starts once for the module (`--port 0`: it binds a free port and prints it), every wait
is bounded, and it is stopped by its own process id.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from glm52_backends import GLM52, default_checkpoint  # noqa: E402

PROMPTS = ["def __init__(self", "import ", "class Foo:", "    def ", "for i in range(10):\n", "x = ",
           "if __name__ ==", "return self.", "try:\n    ", "with open(", "    @property\n", "from os import "]
SHARED = ("class Cache:\n    def __init__(self, size=16):\n        self.size = size\n        self.data = {}\n"
          "        self.order = []\n\n    def get(self, key, default=None):\n        if key in self.data:\n"
          "            return self.data[key]\n        return default\n")
START_S, STOP_S = 60.0, 15.0


def _wait_listening(procs, logs, n_urls: int) -> list[str]:
    """The `n_urls` urls the leading ranks print once they listen, then each answering /health."""
    deadline = time.monotonic() + START_S
    while True:
        urls = [m.group(1) for lines in logs for m in (re.search(r"listening on (http://127\.0\.0\.1:\d+)", x)
                                                         for x in list(lines)) if m]
        if len(urls) >= n_urls:
            break
        dead = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
        assert not dead, f"rank(s) exited {dead} before listening: {''.join(logs[dead[0][0]])[-3000:]}"
        assert time.monotonic() < deadline, f"server did not start in {START_S} s: {''.join(logs[0])[-2000:]}"
        time.sleep(0.05)
    for url in urls:
        while True:
            assert all(p.poll() is None for p in procs), f"a rank exited: {[p.returncode for p in procs]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.1)
    return sorted(urls)


def _drain(stream, lines: list[str]) -> None:
    """Collect a process's stderr lines as they come (it never blocks on a full pipe)."""
    for line in stream:
        lines.append(line)


def _stop(procs, logs) -> list[int]:
    """SIGTERM to the ranks that serve (each stops the ranks following it; all of them when none got to
    serve), SIGKILL to any still running after STOP_S; every process waited for. Their exit codes."""
    serving = [p for p, lines in zip(procs, logs) if any("listening on" in x for x in list(lines))]
    for p in serving or procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=STOP_S)
    return [p.returncode for p in procs]


@contextlib.contextmanager
def running_ranks(world: int, *extra: str, n_urls: int = 1):
    """`glm52 serve` on the default model, launched as `world` ranks the way torchrun launches them
    (RANK / WORLD_SIZE / MASTER_ADDR=127.0.0.1 / MASTER_PORT: a free port; gloo). Yields (the leading
    ranks' urls, every rank's process, every rank's stderr lines); stopped by process id."""
    cmd = [sys.executable, "-m", "glm52_backends.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--threads", "1", "--cache-tokens", "8192", "--max-num-batched-tokens", "256", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if world > 1:
        with socket.socket() as s:                   # a free loopback port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                   GLM52_COLLECTIVE_TIMEOUT_S="120")
    procs, logs = [], []
    try:
        for r in range(world):
            rank_env = dict(env, RANK=str(r), LOCAL_RANK=str(r)) if world > 1 else env
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          env=rank_env))
            logs.append([])
            threading.Thread(target=_drain, args=(procs[-1].stderr, logs[-1]), daemon=True).start()
        yield _wait_listening(procs, logs, n_urls), procs, logs
    finally:
        _stop(procs, logs)


@contextlib.contextmanager
def running_server(*extra: str):
    """(base url, process) of `glm52 serve` on the default model, a free port on 127.0.0.1."""
    with running_ranks(1, *extra) as (urls, procs, _):
        yield urls[0], procs[0]


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0].removeprefix("glm52_")] = float(value)
    return out


def wait_for(cond, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def greedy(client, model_id, prompt, n=12, extra: dict | None = None, **kw):
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"return_token_ids": True, **(extra or {})}, **kw)
    c = r.choices[0]
    return c.text, c.model_extra["token_ids"], c.finish_reason


def test_models_health_metrics(server, client, model_id):
    url, _ = server
    assert model_id == "glm52-tiny"
    assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}
    m = metrics(url)
    for k in ("requests_running", "requests_waiting", "generation_tokens_per_second", "cache_usage_ratio",
              "cache_blocks_used", "prefix_cache_hits_total", "spec_mean_acceptance_length"):
        assert k in m, k
    assert m["cache_blocks_total"] == 8192 // 16


def test_concurrent_greedy_equals_one_at_a_time(client, model_id):
    alone = [greedy(client, model_id, p) for p in PROMPTS]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        together = list(ex.map(lambda p: greedy(client, model_id, p), PROMPTS))
    assert together == alone
    assert all(len(ids) == 12 or fin == "stop" for _, ids, fin in alone)
    ref = GLM52(default_checkpoint(), backend="torch", progress=False).generate(PROMPTS[:3], max_new_tokens=12)
    assert [ids for _, ids, _ in alone[:3]] == ref.tokens      # the engine's tokens are generate's


def test_stream_joins_to_the_non_streamed_text(client, model_id):
    text, _, fin = greedy(client, model_id, PROMPTS[0], n=20)
    chunks = list(client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    parts = [c.choices[0].text for c in chunks if c.choices]
    assert len(parts) > 1 and "".join(parts) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == fin
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_completions(client, model_id):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A class for a cache"}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=16, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length") and r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=16, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == c.message.content


def test_bad_request_gets_400_and_server_stays_healthy(server, client, model_id):
    url, proc = server
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt="x", max_tokens=-5)
    assert info.value.status_code == 400
    err = info.value.body
    assert err["param"] == "max_tokens" and "max_tokens" in err["message"] and err["type"] == "invalid_request_error"
    for body, field in (({"prompt": "x", "temperature": 9}, "temperature"), ({"prompt": []}, "prompt"),
                        ({"prompt": "x", "top_p": 0}, "top_p"), ({"prompt": [99999]}, "prompt"),
                        ({"messages": []}, "messages")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = httpx.post(url + path, json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", json={"model": "other", "prompt": "x"}, timeout=10).status_code == 404
    assert proc.poll() is None and httpx.get(url + "/health", timeout=5).status_code == 200
    assert greedy(client, model_id, PROMPTS[1], n=4)[2] in ("stop", "length")


def _model_logprobs(prompt_ids, out_ids):
    """float64 log_softmax of the default model's logits at each generated token (teacher-forced)."""
    import torch
    m = GLM52(default_checkpoint(), backend="torch", progress=False)
    lp = torch.log_softmax(m([prompt_ids + out_ids])[0].double(), -1)
    return lp[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(out_ids)]


def test_completion_logprobs_streamed_and_not(client, model_id):
    """logprobs=3: per token its string, the model's log-probability (log_softmax of the raw logits,
    checked against a teacher-forced forward), the 3 best alternatives plus the token itself, and its
    offset in the text; the stream's chunks carry the same, offsets continuing across chunks."""
    r = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    c = r.choices[0]
    ids, lp = c.model_extra["token_ids"], c.logprobs
    assert len(ids) == len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    tok = GLM52(default_checkpoint(), backend="cpu_ref", progress=False).tokenizer
    want = _model_logprobs(tok.encode(PROMPTS[0]), ids)
    for i, (t, v, top) in enumerate(zip(ids, lp.token_logprobs, lp.top_logprobs)):
        assert abs(v - float(want[i, t])) < 1e-4
        assert 3 <= len(top) <= 4 and top[lp.tokens[i]] == v and max(top.values()) == v     # greedy: the best
    chunks = [ch for ch in client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                                     logprobs=3, stream=True, extra_body={"ignore_eos": True})]
    got = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.tokens]
    vals = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    offs = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.text_offset]
    assert got == lp.tokens and offs == lp.text_offset
    assert max(abs(a - b) for a, b in zip(vals, lp.token_logprobs)) < 1e-5                 # float32: batched otherwise


def test_echo_with_logprobs_scores_the_prompt(client, model_id):
    """What lm-evaluation-harness sends for log-likelihoods (echo, logprobs=1, max_tokens=1): the prompt's
    text before the completion's, and the prompt tokens' log-probabilities (the first null) before the
    generated token's, each the model's given the tokens before it; streamed the same."""
    tok = GLM52(default_checkpoint(), backend="cpu_ref", progress=False).tokenizer
    prompt = PROMPTS[1] + " the value of"
    ids = tok.encode(prompt)
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    c = r.choices[0]
    out = c.model_extra["token_ids"]
    assert c.text.startswith(tok.decode(ids)) and len(c.text) > len(tok.decode(ids))
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = _model_logprobs(ids[:1], ids[1:] + out)
    for i, v in enumerate(lp.token_logprobs[1:]):
        assert abs(v - float(want[i, (ids[1:] + out)[i]])) < 1e-4
    assert "".join(lp.tokens) == c.text and lp.text_offset[-1] == len(tok.decode(ids))
    chunks = [ch.choices[0] for ch in client.completions.create(model=model_id, prompt=prompt, max_tokens=1,
                                                                 temperature=0, echo=True, logprobs=1, stream=True,
                                                                 extra_body={"ignore_eos": True}) if ch.choices]
    assert "".join(ch.text for ch in chunks) == c.text
    streamed = [v for ch in chunks if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert streamed[0] is None and max(abs(a - b) for a, b in zip(streamed[1:], lp.token_logprobs[1:])) < 1e-5
    plain = client.completions.create(model=model_id, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(tok.decode(ids)) and plain.choices[0].logprobs is None


def test_chat_logprobs_with_top_logprobs(client, model_id):
    """logprobs: true with top_logprobs: 2 gives per token its string, log-probability, UTF-8 bytes (they
    join to the content) and 2 alternatives; streamed the same; without top_logprobs none."""
    msgs = [{"role": "user", "content": "A class for a cache"}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=2)
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens
    text = bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace")
    assert text.startswith(c.message.content)                 # a stop string is cut from the content, not the tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[1].logprob <= e.logprob
    stream = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            logprobs=True, top_logprobs=2)
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]                   # float32: batched otherwise
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, content)) < 1e-5
    bare = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=4, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    none = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=4, temperature=0)
    assert none.choices[0].logprobs is None


def test_bad_logprobs_get_400_naming_the_field(server):
    url, _ = server
    for path, body, field in (("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
                              ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
                              ("/v1/completions", {"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "top_logprobs": 2}, "top_logprobs"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "logprobs": 3}, "logprobs"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "echo": True}, "echo"),
                              ("/v1/completions", {"prompt": "x", "echo": 1}, "echo")):
        r = httpx.post(url + path, json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)


def test_penalties_reach_the_engine(client, model_id):
    """frequency_penalty over HTTP gives the engine's penalized greedy tokens (tests/test_scheduler.py checks
    those against the written-out rule), different from the unpenalized ones; out of range is a 400."""
    from glm52_backends.engine.scheduler import Engine, SamplingParams
    plain = greedy(client, model_id, PROMPTS[2], n=12, extra={"ignore_eos": True})[1]
    pen = greedy(client, model_id, PROMPTS[2], n=12, extra={"ignore_eos": True, "repetition_penalty": 1.5},
                 frequency_penalty=1.0)[1]
    m = GLM52(default_checkpoint(), backend="torch", progress=False)
    want = Engine(m).generate([m.tokenizer.encode(PROMPTS[2])], SamplingParams(
        max_tokens=12, ignore_eos=True, frequency_penalty=1.0, repetition_penalty=1.5))[0]["token_ids"]
    assert pen == want and pen != plain
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt="x", max_tokens=2, presence_penalty=2.5)
    assert info.value.body["param"] == "presence_penalty"


def test_n_choices_per_prompt(client, model_id):
    """n=3 sampled with a seed: three choices per prompt in OpenAI's index order (prompt i's choice j at
    i * n + j), each its own request (seed + j: the same call gives the same choices, and they differ),
    the prompt's tokens counted once in the usage; chat too, streamed as well."""
    prompts = [PROMPTS[0], PROMPTS[3]]
    kw = dict(model=model_id, prompt=prompts, max_tokens=8, temperature=1.0, seed=7, n=3,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    ids = [c.model_extra["token_ids"] for c in a.choices]
    assert ids == [c.model_extra["token_ids"] for c in b.choices]                 # seeded: reproducible
    assert len({tuple(x) for x in ids[:3]}) > 1 and len({tuple(x) for x in ids[3:]}) > 1
    one = client.completions.create(model=model_id, prompt=prompts[0], max_tokens=8, temperature=1.0, seed=8,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    assert one.choices[0].model_extra["token_ids"] == ids[1]                       # choice 1 is seed + 1
    tok = GLM52(default_checkpoint(), backend="cpu_ref", progress=False).tokenizer
    assert a.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert a.usage.completion_tokens == 48
    msgs = [{"role": "user", "content": "A class for a cache"}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    streamed = {}
    for ch in client.chat.completions.create(model=model_id, messages=msgs, max_tokens=6, temperature=1.0, seed=3,
                                             n=2, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert streamed == {c.index: c.message.content for c in r.choices}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt="x", max_tokens=2, n=0)
    assert info.value.body["param"] == "n"


def test_forty_sampled_requests_from_eight_threads(client, model_id):
    def one(i):
        r = client.completions.create(model=model_id, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8,
                                      temperature=0.9, top_p=0.95, seed=i)
        return r.choices[0].finish_reason, r.usage.completion_tokens

    with cf.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(one, range(40)))
    assert len(res) == 40 and all(f in ("stop", "length") and 1 <= n <= 8 for f, n in res)
    assert sum(f == "length" for f, _ in res) > 20


def test_aborted_stream_frees_its_blocks(server, model_id):
    url, _ = server
    wait_for(lambda: metrics(url)["requests_running"] == 0, "an idle server")
    before = metrics(url)
    body = {"model": model_id, "prompt": SHARED, "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    m = metrics(url)
                    assert m["requests_running"] == 1 and m["cache_blocks_used"] > 0
                    break                              # leaving the block closes the connection
    wait_for(lambda: metrics(url)["requests_aborted_total"] == before["requests_aborted_total"] + 1, "the abort")
    after = metrics(url)
    assert after["requests_running"] == 0 and after["cache_blocks_used"] == 0
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < 3000


def test_shared_prefix_is_served_from_the_prefix_cache(server, client, model_id):
    url, _ = server
    ref = GLM52(default_checkpoint(), backend="torch", progress=False)
    tails = ["\n    def put(self, key, value):\n", "\n    def clear(self):\n"]
    want = ref.generate([SHARED + t for t in tails], max_new_tokens=10).tokens
    first = greedy(client, model_id, SHARED + tails[0], n=10)
    before = metrics(url)
    second = greedy(client, model_id, SHARED + tails[1], n=10)
    after = metrics(url)
    hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
    assert hits >= 16 * (len(ref.tokenizer.encode(SHARED)) // 16 - 1) > 0
    assert [first[1], second[1]] == want                   # the same tokens as without the prefix cache


def test_speculative_server_gives_the_plain_greedy_tokens(client, model_id):
    plain = [greedy(client, model_id, p, n=16) for p in PROMPTS[:4]]
    with running_server("--speculative", "2") as (url, _):
        spec_client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        with cf.ThreadPoolExecutor(4) as ex:
            spec = list(ex.map(lambda p: greedy(spec_client, model_id, p, n=16), PROMPTS[:4]))
        m = metrics(url)
    assert spec == plain
    assert m["spec_verify_rounds_total"] > 0 and 1.0 < m["spec_mean_acceptance_length"] <= 3.0


# ---- under torchrun -------------------------------------------------------------------------------------
def test_tp2_server_equals_one_process_generate():
    """tp2 with ep2 (experts dispatched within the tp group) over gloo, two processes: rank 0 serves and
    leads, rank 1 follows its steps. Concurrent greedy completions, plain and MTP-speculative per request
    in the same steps, under preemption (a 16-block cache) and prefix hits, give one process's
    `GLM52.generate` tokens; rank 1 binds nothing and, stopped with rank 0, exits 0 (its cache matched
    rank 0's at every heartbeat and at the stop)."""
    ref = GLM52(default_checkpoint(), backend="torch", progress=False)
    want = ref.generate(PROMPTS, max_new_tokens=16).tokens
    tails = ["\n    def put(self, key, value):\n", "\n    def clear(self):\n"]
    want_shared = ref.generate([SHARED + t for t in tails], max_new_tokens=8).tokens
    with running_ranks(2, "--tp", "2", "--ep", "2", "--backend", "torch", "--speculative", "2",
                       "--cache-tokens", "256") as (urls, procs, logs):
        assert len(urls) == 1 and "following the tp group's first rank" in "".join(logs[1])
        client = openai.OpenAI(base_url=urls[0] + "/v1", api_key="unused", timeout=60, max_retries=0)

        def one(i):
            return greedy(client, "glm52-tiny", PROMPTS[i], n=16, extra={"speculative": 2 * (i % 2)})[1]
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            got = list(ex.map(one, range(len(PROMPTS))))
        text, _, _ = greedy(client, "glm52-tiny", PROMPTS[0], n=16)
        stream = client.completions.create(model="glm52-tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == text
        shared = [greedy(client, "glm52-tiny", SHARED + t, n=8, extra={"speculative": 0})[1] for t in tails]
        m = metrics(urls[0])
        codes = _stop(procs, logs)
    assert got == want
    assert shared == want_shared
    assert m["preemptions_total"] > 0 and m["spec_verify_rounds_total"] > 0 and m["prefix_cache_hits_total"] > 0
    assert m["cache_blocks_used"] == 0
    assert codes == [0, 0], "".join(logs[1])[-2000:]


def test_dp2_tp2_each_group_serves_its_share():
    """tp2 x dp2 (ep = 1: two replicas), four processes: each dp group's first rank serves on its own
    port and leads its tp group (the second group's leader is global rank 2). Each server's greedy
    tokens are one process's, and each counts only its own share."""
    want = GLM52(default_checkpoint(), backend="torch", progress=False).generate(PROMPTS[:8], max_new_tokens=12).tokens
    with running_ranks(4, "--tp", "2", "--dp", "2", "--backend", "torch", n_urls=2) as (urls, procs, logs):
        assert len(set(urls)) == 2
        assert sum("following the tp group's first rank" in "".join(x) for x in logs) == 2
        clients = [openai.OpenAI(base_url=u + "/v1", api_key="unused", timeout=60, max_retries=0) for u in urls]
        with cf.ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda i: greedy(clients[i % 2], "glm52-tiny", PROMPTS[i])[1], range(8)))
        ms = [metrics(u) for u in urls]
        codes = _stop(procs, logs)
    assert got == want
    assert [m["requests_finished_total"] for m in ms] == [4, 4]
    assert codes == [0, 0, 0, 0], [("".join(x))[-3000:] for x in logs[1:2]]


def test_tp2_server_replays_captured_decode_graphs():
    """`--graph trace` over tp2 ep2 dcp2: the decode steps of both ranks replay their captured graphs (rank 0
    sends each step's requests and tokens; the tp and dcp seams are functional collectives recorded in the
    graphs; each rank holds half of every request's cache); the tokens are eager one-process generate's."""
    want = GLM52(default_checkpoint(), backend="torch", progress=False).generate(PROMPTS[:4], max_new_tokens=12).tokens
    with running_ranks(2, "--tp", "2", "--ep", "2", "--dcp", "2", "--backend", "torch", "--graph", "trace",
                       "--max-num-seqs", "2") as (urls, procs, logs):
        client = openai.OpenAI(base_url=urls[0] + "/v1", api_key="unused", timeout=60, max_retries=0)
        with cf.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: greedy(client, "glm52-tiny", p)[1], PROMPTS[:4]))
        m = metrics(urls[0])
        codes = _stop(procs, logs)
    assert got == want
    assert m["graph_steps_total"] > 0 and "graphs trace" in "".join(logs[0])
    assert "tp2 dp1 ep2 dcp2, cache" in "".join(logs[0]) and "(8 rows of each here)" in "".join(logs[0])
    assert codes == [0, 0], "".join(logs[1])[-2000:]


def test_serve_refuses_expert_parallelism_across_dp_groups():
    from glm52_backends.serve import serve_main
    with pytest.raises(ValueError, match="--dp 2 with --ep 4: expert parallelism across dp groups is not served"):
        serve_main(["--tp", "2", "--dp", "2", "--ep", "4"])


def test_offload_server_gives_the_plain_greedy_tokens():
    """`--offload 8`: the latent rows live in host memory and each step stages what its top-k selects into
    8 device blocks per layer (twelve concurrent requests select more than that together, so steps run
    in several staged runs); the greedy tokens are one process's without offload."""
    want = GLM52(default_checkpoint(), backend="torch", progress=False).generate(PROMPTS, max_new_tokens=12).tokens
    with running_ranks(1, "--backend", "torch", "--offload", "8") as (urls, procs, logs):
        client = openai.OpenAI(base_url=urls[0] + "/v1", api_key="unused", timeout=60, max_retries=0)
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            got = list(ex.map(lambda p: greedy(client, "glm52-tiny", p)[1], PROMPTS))
    assert got == want
    assert "8 latent blocks per layer staged from host memory" in "".join(logs[0])


# ---- the request fields, without a server ---------------------------------------------------------------
def test_sampling_fields_boundaries():
    """sampling_params on request bodies: every new field's accepted extremes and first refusals, and the
    defaults when a field is absent (penalties off, no log-probabilities, one choice)."""
    from glm52_backends.serve import BadRequest, _choices, sampling_params

    def params(chat=False, **body):
        return sampling_params(body, 16, chat=chat)[0]

    def refused(field, chat=False, **body):
        with pytest.raises(BadRequest) as info:
            sampling_params(body, 16, chat=chat)
        assert info.value.param == field, body

    p = params()
    assert (p.logprobs, p.prompt_logprobs, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == \
        (None, None, 0.0, 0.0, 1.0) and _choices({}) == 1
    assert _choices({"n": 1}) == 1 and _choices({"n": 128}) == 128
    for n in (0, 129, 2.0, True):
        refused("n", n=n)
    assert params(logprobs=0).logprobs == 0 and params(logprobs=20).logprobs == 20
    for v in (-1, 21, True, 1.5):
        refused("logprobs", logprobs=v)
    assert params(chat=True, logprobs=True).logprobs == 0 and params(chat=True, logprobs=False).logprobs is None
    assert params(chat=True, logprobs=True, top_logprobs=0).logprobs == 0
    assert params(chat=True, logprobs=True, top_logprobs=20).logprobs == 20
    refused("top_logprobs", chat=True, logprobs=True, top_logprobs=21)
    refused("top_logprobs", chat=True, top_logprobs=1)
    refused("top_logprobs", top_logprobs=1)
    assert params(echo=True, logprobs=2).prompt_logprobs == 2 and params(echo=True).prompt_logprobs is None
    assert params(echo=False, logprobs=2).prompt_logprobs is None
    refused("echo", chat=True, echo=True)
    for name in ("presence_penalty", "frequency_penalty"):
        assert getattr(params(**{name: -2}), name) == -2.0 and getattr(params(**{name: 2}), name) == 2.0
        refused(name, **{name: 2.01})
        refused(name, **{name: -2.01})
    assert params(repetition_penalty=1e-3).repetition_penalty == 1e-3
    assert params(repetition_penalty=1e4).repetition_penalty == 1e4
    refused("repetition_penalty", repetition_penalty=0)
    assert params(best_of=3, n=3).max_tokens == 1 and params(best_of=1).max_tokens == 1
    refused("best_of", best_of=3, n=2)
    assert params(logprobs=2).prompt_logprobs is None                         # no echo: no prompt scores
    refused("repetition_penalty", repetition_penalty=1.01e4)
    # the older fields: defaults (OpenAI's temperature 1, top_p 1) and refusals
    assert (p.temperature, p.top_p, p.seed, p.speculative) == (1.0, 1.0, None, None)
    assert sampling_params({"max_completion_tokens": 5, "max_tokens": 9}, 16)[1] == 5
    assert sampling_params({"max_completion_tokens": None, "max_tokens": 9}, 16)[1] == 9
    assert sampling_params({}, 16)[1] == 16 and sampling_params({}, None)[1] is None
    assert params(seed=4).seed == 4 and params(speculative=2).speculative == 2
    refused("seed", seed="4")
    refused("speculative", speculative=1.5)
    refused("stop_token_ids", stop_token_ids=[1, "2"])
    refused("stop_token_ids", stop_token_ids=5)
