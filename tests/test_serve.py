"""``rdn serve-chat``: the OpenAI-compatible API against a live server, the batcher against
the greedy full-recomputation oracle, limits and bad input.

The model is the session fixture ``chat_project`` (tests/chat_fixture.py): a tiny RDN model
trained to answer 16 calculator prompts through the calculator tool (stages ``rl``/``sft``),
and an untrained ``base`` that rambles without stopping."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import REPO, torch_threads

pytestmark = pytest.mark.integration

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_answer(conv: list[dict]) -> str:
    """What a correct reply reads: the tool call as ``rdn chat`` shows it, then the answer."""
    python, output, text = conv[1]["content"]
    return f"[calc {python['text']} = {output['text']}]{text['text']}"


class ServerProcess:
    """``rdn serve-chat`` as a subprocess on a free loopback port, stopped by PID."""

    def __init__(self, root: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "rdn.cli.main", "serve-chat", "--port", str(self.port),
                                      *args], cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve-chat exited {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"serve-chat did not answer /health in 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(chat_project, tmp_path_factory):
    root, convs = chat_project
    srv = ServerProcess(root, tmp_path_factory.mktemp("serve") / "server.log", "--api-key", KEY, "--max-tokens", "100")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


# --------------------------------------------------------------------------- the openai client

def test_openai_client_non_streaming(client, chat_project):
    _, convs = chat_project
    r = client.chat.completions.create(model="rl", messages=[convs[0][0]], temperature=0)
    assert r.object == "chat.completion" and r.model == "rl"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_answer(convs[0])
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["rl", "sft", "base"]


def test_openai_client_streaming_equals_non_streaming(client, chat_project):
    _, convs = chat_project
    conv = convs[1]
    stream = client.chat.completions.create(model="rl", messages=[conv[0]], temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(deltas) == expected_answer(conv)
    assert len(deltas) > 3                                  # streamed, not one piece
    assert any(d.startswith("[calc ") for d in deltas)      # the tool call arrives as one delta
    assert finish == "stop"
    plain = client.chat.completions.create(model="rl", messages=[conv[0]], temperature=0)
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_openai_client_n_choices(client, chat_project):
    _, convs = chat_project
    r = client.chat.completions.create(model="sft", messages=[convs[2][0]], n=3, temperature=0.7, seed=5,
                                       max_tokens=40)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    again = client.chat.completions.create(model="sft", messages=[convs[2][0]], n=3, temperature=0.7, seed=5,
                                           max_tokens=40)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded


def test_earlier_tool_calls_are_sent_back_as_tool_tokens(client, chat_project):
    from rdn.inference.reply import tool_calls_to_parts

    _, convs = chat_project
    text = expected_answer(convs[3])
    assert tool_calls_to_parts(text) == convs[3][1]["content"]   # the inverse of how replies are shown
    r = client.chat.completions.create(model="rl", temperature=0, max_tokens=30, messages=[
        convs[3][0], {"role": "assistant", "content": text}, convs[4][0]])
    assert r.choices[0].finish_reason in ("stop", "length")


# --------------------------------------------------------------------------- concurrency

def test_sixteen_concurrent_calculator_requests_are_batched_and_correct(server, chat_project):
    _, convs = chat_project

    def ask(conv) -> str:
        r = httpx.post(f"{server.url}/v1/chat/completions", headers=auth(), timeout=120,
                       json={"model": "rl", "messages": [conv[0]], "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    alone = [ask(c) for c in convs]                         # one at a time
    before = httpx.get(f"{server.url}/health").json()["models"]["rl"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, convs))
    after = httpx.get(f"{server.url}/health").json()["models"]["rl"]
    assert together == alone
    assert together == [expected_answer(c) for c in convs]   # the calculator's numbers
    assert after["max_batch_seen"] >= 4, after               # served together, not one after another
    # fewer forward steps than tokens: rows shared steps
    assert after["steps"] - before["steps"] < after["tokens"] - before["tokens"]
    assert after["running"] == 0 and after["waiting"] == 0


# --------------------------------------------------------------------------- limits and bad input

@pytest.mark.parametrize("body, status, names", [
    (b'{"messages": [{"role": "user"', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (json.dumps({"messages": []}), 400, "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages.0.role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}), 400, "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 99}), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 101}), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi " * 200}]}), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}), 404, "model"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}), 400,
     "last message"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}), 400,
     "messages.1"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 1_100_000}]}), 413, "limit"),
])
def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, body, status, names):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=30,
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert names in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
    ok = httpx.post(f"{server.url}/v1/chat/completions", headers=auth(), timeout=30,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200


def test_api_key_is_required(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    missing = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    wrong = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401 and "no API key" in missing.json()["error"]["message"]
    assert wrong.status_code == 401 and "wrong API key" in wrong.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers=auth()).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200      # health and the page stay open
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_binds_loopback_by_default(server):
    out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout if _has("ss") else ""
    if out:
        line = next(l for l in out.splitlines() if f":{server.port} " in l)
        assert "127.0.0.1:" in line, line
    assert server.url.startswith("http://127.0.0.1:")
    from rdn.cli.main import build_parser

    args = build_parser().parse_args(["serve-chat"])
    assert args.host == "127.0.0.1"


def _has(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


def test_serve_chat_without_checkpoints_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rdn.cli.main", "serve-chat", "--port", "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1
    assert "no tokenizer here" in r.stderr and str(tmp_path) in r.stderr


# --------------------------------------------------------------------------- in-process: slow model, cancellation

@pytest.fixture(scope="module")
def slow_server(chat_project):
    """The app in this process (uvicorn in a thread) with a 1.5 s request limit; the untrained
    ``base`` model sleeps 20 ms per forward, so 100 tokens take about 2 s."""
    import uvicorn

    from rdn.serve.app import Models, ServeConfig, create_app

    root, _ = chat_project
    config = ServeConfig(root=root, default_stage="base", request_timeout=1.5, device="cpu")
    models = Models(config)
    batcher = models.batcher("base")
    batcher.engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(config, models), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield url, batcher
    server.should_exit = True
    thread.join(10)


def _wait_idle(batcher, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = batcher.stats()
        if s["running"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.02)
    return batcher.stats()


def test_a_client_that_disconnects_mid_stream_frees_its_slot(slow_server):
    url, batcher = slow_server
    before = batcher.tokens
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]       # the role chunk and a couple of tokens
    assert got[0].startswith("data: ")
    t0 = time.monotonic()
    stats = _wait_idle(batcher)
    assert stats["running"] == 0, stats                  # freed well before the 100 tokens (2 s) were done
    assert time.monotonic() - t0 < 1.0
    assert batcher.tokens - before < 60


def test_a_request_over_the_time_limit_is_stopped(slow_server):
    url, batcher = slow_server
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0})
    assert r.status_code == 504, r.text
    assert "1.5s" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 3.0
    assert _wait_idle(batcher)["running"] == 0


# --------------------------------------------------------------------------- the batcher against the oracle

def test_rows_joining_a_running_batch_decode_as_they_would_alone(chat_project):
    """Greedy tokens of rows admitted at different steps (a prompt longer than the batch's
    position waits, shorter ones join mid-way) equal full recomputation of each prompt alone."""
    from rdn.inference.load import load_engine
    from rdn.inference.engine import greedy_reference
    from rdn.serve.batcher import Batcher, Row

    root, convs = chat_project
    with torch_threads(1):
        engine, _ = load_engine(root / "artifacts" / "checkpoints" / "base", root / "artifacts" / "tokenizer", "cpu")
        tok = engine.tok
        prompts = [tok.encode(t, prepend="<|bos|>") for t in
                   ["def f(x):\n    return [x", "a", "class A:\n    pass\n\n\nclass B(A):\n    def g(self):", "(("]]
        want = [greedy_reference(engine.model, p, 12, engine.coords) for p in prompts]
        got = {i: [] for i in range(len(prompts))}
        ends = {}
        step_gate = threading.Event()

        def sink(i):
            def put(event):
                if event[0] == "token":
                    got[i].append(event[1])
                    if i == 0 and len(got[0]) == 4:
                        step_gate.set()
                else:
                    ends[i] = event
            return put

        batcher = Batcher(engine, max_batch=8, name="oracle")
        batcher.engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
        try:
            batcher.submit([Row(prompts[0], 12, sink(0))])
            assert step_gate.wait(10)
            batcher.submit([Row(p, 12, sink(i)) for i, p in enumerate(prompts) if i > 0])
            deadline = time.monotonic() + 20
            while len(ends) < len(prompts) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            batcher.close()
    assert ends == {i: ("end", "length") for i in range(len(prompts))}
    assert batcher.max_rows_seen >= 2
    assert got == dict(enumerate(want))


def test_stop_sequences_hold_back_a_possible_start(chat_project):
    from rdn.serve.app import ChoiceText
    from rdn.tokenizer import Tokenizer

    root, _ = chat_project
    tok = Tokenizer.load(root / "artifacts" / "tokenizer")
    text = "The answer is 42. Done"
    ct = ChoiceText(tok, ["42."])
    out = "".join(ct.feed(t) for t in tok.encode(text))
    assert ct.stopped and out == "The answer is " and ct.text == out
    free = ChoiceText(tok, ["zzz"])
    streamed = "".join(free.feed(t) for t in tok.encode(text + " z")) + free.close()
    assert streamed == text + " z" and not free.stopped


def test_top_p_keeps_the_smallest_nucleus(chat_project):
    """A row with a tiny top_p always takes the most likely token, at any temperature."""
    from rdn.inference.load import load_engine
    from rdn.serve.batcher import Batcher, Row

    root, convs = chat_project
    engine, _ = load_engine(root / "artifacts" / "checkpoints" / "base", root / "artifacts" / "tokenizer", "cpu")
    prompt = engine.tok.encode("import os", prepend="<|bos|>")
    runs = {}
    batcher = Batcher(engine, name="top-p")
    try:
        for name, t, p in [("greedy", 0.0, 1.0), ("nucleus", 1.5, 1e-6)]:
            done = threading.Event()
            toks: list[int] = []
            batcher.submit([Row(prompt, 8, lambda e, toks=toks, done=done: toks.append(e[1]) if e[0] == "token"
                                else done.set(), temperature=t, top_p=p, seed=3)])
            assert done.wait(20)
            runs[name] = toks
    finally:
        batcher.close()
    assert runs["nucleus"] == runs["greedy"]
