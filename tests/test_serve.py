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


@contextlib.contextmanager
def running_server(*extra: str):
    """(base url, process) of `glm52 serve` on the default model, a free port on 127.0.0.1."""
    cmd = [sys.executable, "-m", "glm52_backends.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--threads", "1", "--cache-tokens", "8192", "--max-num-batched-tokens", "256", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    found = threading.Event()

    def read():                                   # the port is in the startup line; keep draining after
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(START_S), f"server did not start in {START_S} s: {''.join(lines)[-2000:]}"
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {''.join(lines)[-2000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_S)


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


def greedy(client, model_id, prompt, n=12, **kw):
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"return_token_ids": True}, **kw)
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
