"""`llmkit serve` under hostile and unlucky traffic (issue 11): one test per class of fault.

Each class: extreme sampling settings beside healthy rows, a row that fails on its own, a forward pass that
fails, lone surrogates, strict types, malformed bodies, a bug's 500 on a keep-alive connection, big bodies
while /health is polled, and admission of a burst. Real server processes on the tiny test model, except where
a fault must be injected into the app (then uvicorn runs the app in-process, still over real sockets).
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import pytest

from llmkit.params import parse_params
from tests.server_helpers import ServerProcess, free_port, metric, seed_without_eos, sse_events

STEP_DELAY = {"LLMKIT_TEST_STEP_DELAY": "0.02"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("serve-hostile") / "server.log") as process:
        yield process


@pytest.fixture()
def http(server):
    with server.client() as client:
        yield client


def post_raw(server, path: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    """POST exact bytes (httpx's json= cannot send a lone surrogate escape, it encodes to UTF-8 first)."""
    return httpx.post(server.url + path, content=body, headers={"content-type": content_type}, timeout=30)


# --- 1. extreme settings cannot hurt the batch; a failing row leaves alone ------------------------------------

EXTREME_SETTINGS = [
    {"top_p": 1e-50},
    {"top_p": 1e-300, "temperature": 2.0},
    {"min_p": 1.0},
    {"temperature": 1e-30},
    {"top_k": 1, "top_p": 1e-50, "min_p": 1.0, "repetition_penalty": 2.0},
    {"top_k": 100000, "temperature": 2.0},
    {"repetition_penalty": 0.5, "min_p": 1e-30},
]


def test_extreme_settings_run_beside_healthy_streams_which_finish_unchanged(server, tiny_engine):
    """The issue's poison: {"top_p": 1e-50} made NaN probabilities and failed every row of its batch."""
    healthy = [{"prompt": f"Once upon a time {i}", "max_tokens": 12, "seed": i, "temperature": 0.9} for i in range(4)]
    expected = [
        tiny_engine.generate(b["prompt"], parse_params(max_new_tokens=12, seed=b["seed"], temperature=0.9))
        for b in healthy
    ]

    def stream(body):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                return list(sse_events(response))

    def poison(spec):
        return httpx.post(
            server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "seed": 1, **spec}, timeout=30
        )

    with concurrent.futures.ThreadPoolExecutor(len(healthy) + len(EXTREME_SETTINGS)) as pool:
        streams = [pool.submit(stream, body) for body in healthy]
        poisons = [pool.submit(poison, spec) for spec in EXTREME_SETTINGS]
        for future, spec in zip(poisons, EXTREME_SETTINGS):
            response = future.result()
            assert response.status_code == 200, (spec, response.text)
            assert response.json()["usage"]["completion_tokens"] >= 1
        for future, reference in zip(streams, expected):
            events = future.result()
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == reference.text
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["failed_steps"] == 0 and health["failed_requests"] == 0


def _serve_app_in_process(app):
    """uvicorn serving `app` on a free loopback port in a thread (real sockets, real keep-alive handling)."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="on", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{config.port}/health", timeout=2).status_code == 200:
                return server, thread, f"http://127.0.0.1:{config.port}"
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("in-process server did not become healthy")


@pytest.fixture()
def inprocess(tiny_engine):
    """(app, url) of build_app over the shared tiny engine, served by uvicorn in this process."""
    from llmkit.server.app import build_app
    from llmkit.server.settings import ServerSettings

    app = build_app(tiny_engine, ServerSettings())
    server, thread, url = _serve_app_in_process(app)
    yield app, url
    server.should_exit = True
    thread.join(20)


def test_a_failing_forward_pass_fails_its_requests_and_health_says_so(inprocess):
    from llmkit.server.runtime import FAILING_AFTER_STEPS

    app, url = inprocess
    engine = app.state.host.scheduler.engine

    def broken(*args, **kwargs):
        raise RuntimeError("forward pass broke")

    body = {"prompt": "hi", "max_tokens": 3}
    with httpx.Client(base_url=url, timeout=30) as client:
        engine.forward_step = broken  # shadows the method on this instance only
        try:
            failed = client.post("/v1/completions", json=body)
            assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
            degraded = client.get("/health")
            assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
            assert degraded.json()["last_failure"]["scope"] == "step"
            assert "forward pass broke" in degraded.json()["last_failure"]["error"]
            for _ in range(FAILING_AFTER_STEPS - 1):
                client.post("/v1/completions", json=body)
            failing = client.get("/health")
            assert failing.status_code == 503 and failing.json()["status"] == "failing"
            assert failing.json()["failed_steps"] == FAILING_AFTER_STEPS
        finally:
            del engine.forward_step
        assert client.post("/v1/completions", json=body).status_code == 200
        healthy = client.get("/health").json()
        assert healthy["status"] == "ok" and healthy["failed_steps"] == FAILING_AFTER_STEPS
        assert metric(client.get("/metrics").text, "llmkit_failures_total", scope="step") == FAILING_AFTER_STEPS


def test_a_request_failing_alone_gets_its_own_error_and_the_stream_beside_it_finishes(
    inprocess, tiny_engine, monkeypatch
):
    """A row forced to fail (its stop-string handling raises from its 4th token) next to a healthy stream, through
    HTTP: the failing request gets its own 500, or, streaming, its own error event and [DONE]."""
    from llmkit.engine.detokenize import StopMatcher

    real_feed = StopMatcher.feed

    def poisoned_feed(self, text):
        self.fed = getattr(self, "fed", 0) + 1
        if "POISON" in self.stops and self.fed > 3:
            raise ValueError("poisoned row")
        return real_feed(self, text)

    monkeypatch.setattr(StopMatcher, "feed", poisoned_feed)
    app, url = inprocess
    seed = seed_without_eos(tiny_engine, "steady", 30)
    expected = tiny_engine.generate("steady", parse_params(seed=seed, max_new_tokens=30)).text
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "steady", "max_tokens": 30, "seed": seed, "stream": True}
        ) as healthy:
            events = sse_events(healthy)
            first = next(events)
            poison = {"prompt": "Once upon a time", "max_tokens": 9, "temperature": 0, "stop": ["POISON"]}
            poisoned = client.post("/v1/completions", json=poison)
            with client.stream("POST", "/v1/completions", json={**poison, "stream": True}) as poisoned_stream:
                assert poisoned_stream.status_code == 200  # its first tokens went out before it failed
                poisoned_events = list(sse_events(poisoned_stream))
            rest = list(events)
        assert poisoned.status_code == 500 and "other requests were not affected" in poisoned.json()["error"]["message"]
        assert poisoned_events[-1] == "[DONE]" and poisoned_events[-2]["error"]["type"] == "server_error"
        assert any(e["choices"] and e["choices"][0]["text"] for e in poisoned_events[:-2])
        assert rest[-1] == "[DONE]"
        assert first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest[:-1]) == expected
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["failed_requests"] == 2 and health["failed_steps"] == 0


# --- 3. lone surrogates, strict types, malformed bodies: 4xx naming the field, before any work ------------------

SURROGATE = "\\ud800"  # the six characters of the JSON escape


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", f'{{"prompt": "a{SURROGATE}b"}}', "prompt"),
        ("/v1/completions", f'{{"prompt": ["{SURROGATE}"]}}', "prompt[0]"),
        ("/v1/completions", f'{{"prompt": "ok", "stop": ["x{SURROGATE}"]}}', "stop[0]"),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{SURROGATE}"}}]}}]}}',
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": "{SURROGATE}"}}',
            "stop",
        ),
        ("/generate", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
        ("/generate", '{"prompt": "ok", "max_length": 200, "stop": "\\udfff"}', "stop"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field_before_any_work(server, path, body, param):
    started = time.monotonic()
    response = post_raw(server, path, body.encode())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    named = error["param"] if isinstance(error, dict) else response.json()["field"]
    assert named == param and "surrogate" in message
    assert time.monotonic() - started < 1.0  # refused before generating (max_length 200 would take longer)
    assert response.headers["x-request-id"]


def test_a_valid_surrogate_pair_is_text(server):
    response = post_raw(server, "/v1/completions", b'{"prompt": "emoji \\ud83d\\ude00", "max_tokens": 2}')
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "content_type", "status", "param", "message"),
    [
        (
            b'{"prompt": "x", "stream": "yes"}',
            "application/json",
            400,
            "stream",
            "stream must be true or false (got 'yes')",
        ),
        (b'{"prompt": "x", "stream": 1}', "application/json", 400, "stream", "stream must be true or false"),
        (
            b'{"prompt": "x", "presence_penalty": false}',
            "application/json",
            400,
            "presence_penalty",
            "presence_penalty must be a number (got False)",
        ),
        (b'{"prompt": "x", "max_tokens": "5"}', "application/json", 400, "max_tokens", "max_tokens must be an integer"),
        (b'{"prompt": "x", "max_tokens": 2.5}', "application/json", 400, "max_tokens", "max_tokens must be an integer"),
        (b'{"prompt": 5}', "application/json", 400, "prompt", "prompt must be a string or a list"),
        (
            b'{"prompt": "x"}',
            "text/plain",
            415,
            "content-type",
            "Content-Type must be application/json (got 'text/plain')",
        ),
        (b'{"prompt": "x"}', "application/x-www-form-urlencoded", 415, "content-type", "Content-Type must be"),
        (
            b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
            "application/json",
            400,
            "max_tokens",
            "an integer of 5000 digits is out of range",
        ),
        (b'{"prompt": "x", "seed": 1' + b"0" * 30 + b"}", "application/json", 400, "seed", "out of range"),
        (b'{"prompt": "x", "temperature": NaN}', "application/json", 400, "temperature", "NaN is not a JSON number"),
        (b'{"prompt": "x", "temperature": 1e999}', "application/json", 400, "temperature", "out of range"),
        (
            b'{"prompt": "x", "logit_bias": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
            "application/json",
            400,
            None,
            "nests too deeply",
        ),
        (
            b'{"prompt": "x", "logit_bias": ' + b"[" * 40 + b"]" * 40 + b"}",
            "application/json",
            400,
            "logit_bias",
            "nests deeper than 32 levels",
        ),
        (b'{"prompt": "caf\xe9"}', "application/json", 400, None, "not valid UTF-8"),
        (b'{"prompt": "x",}', "application/json", 400, None, "not valid JSON"),
        (b"", "application/json", 400, None, "request body is empty"),
        (b"[1, 2]", "application/json", 400, None, "request body must be a JSON object (got list)"),
    ],
)
def test_types_are_strict_and_malformed_bodies_get_a_sentence_naming_the_field(
    server, body, content_type, status, param, message
):
    response = post_raw(server, "/v1/completions", body, content_type)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert response.headers["x-request-id"]


def test_greedy_is_strict_on_generate_too(server):
    response = post_raw(server, "/generate", b'{"prompt": "x", "greedy": "yes"}')
    assert response.status_code == 400 and response.json()["field"] == "greedy"
    assert "greedy must be true or false (got 'yes')" in response.json()["error"]


# --- a bug's 500 keeps the connection usable, and every response has an X-Request-ID ------------------------------


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_a_500_keeps_the_keep_alive_connection_and_carries_a_request_id(inprocess):
    app, url = inprocess

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: t\r\nX-Request-ID: my-id-1\r\n\r\n")
        status, headers, body = _read_response(sock)
        assert status == 500 and headers["x-request-id"] == "my-id-1"
        assert headers.get("connection") != "close"
        assert json.loads(body)["type"] == "server_error"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # the same connection still works
        status, headers, _ = _read_response(sock)
        assert status == 200 and headers["x-request-id"]


# --- 4. big bodies do not stall the event loop -------------------------------------------------------------------


def test_a_prompt_that_cannot_fit_the_context_is_refused_by_its_length_before_tokenizing(server, tiny_engine):
    bound = tiny_engine.max_prompt_chars
    assert bound is not None and bound < 900_000
    started = time.monotonic()
    response = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=30,
        json={"messages": [{"role": "user", "content": "word " * 180_000}]},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert "more than the model's context" in response.json()["error"]["message"]
    assert time.monotonic() - started < 2.0


def test_tokenizing_runs_off_the_event_loop(inprocess, tiny_engine, monkeypatch):
    """A tokenizer that takes a second per prompt (as for 0.9 MB bodies on a real model) leaves /health quick."""
    app, url = inprocess
    real_prompt_ids = type(tiny_engine).prompt_ids

    def slow_prompt_ids(self, prompt, **kwargs):
        time.sleep(1.0)  # blocks whichever thread calls it, like a long tokenization
        return real_prompt_ids(self, prompt, **kwargs)

    monkeypatch.setattr(type(tiny_engine), "prompt_ids", slow_prompt_ids)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [
            pool.submit(httpx.post, url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
            for _ in range(3)
        ]
        time.sleep(0.2)
        latencies = []
        while not all(f.done() for f in slow):
            started = time.monotonic()
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        assert all(f.result().status_code == 200 for f in slow)
    assert latencies and max(latencies) < 0.5


# --- 6. a burst fills the free batch rows first; --max-queue counts what waits beyond them ------------------------


def test_a_burst_gets_the_free_rows_plus_the_queue(tiny_model_dir, tmp_path, tiny_engine):
    seed = seed_without_eos(tiny_engine, "burst", 40)
    with ServerProcess(
        tiny_model_dir, tmp_path / "server.log", "--max-batch-size", "4", "--max-queue", "2", env=STEP_DELAY
    ) as process:
        body = {"prompt": "burst", "max_tokens": 40, "seed": seed}  # >= 0.8 s each: all arrive while they run
        barrier = threading.Barrier(10)

        def send(_):
            barrier.wait()
            return httpx.post(process.url + "/v1/completions", json=body, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            statuses = sorted(pool.map(send, range(10)))
        assert statuses == [200] * 6 + [503] * 4


# --- 2. a non-streaming client that hangs up frees its row within a second --------------------------------------


def test_a_non_streaming_client_that_hangs_up_frees_its_row_within_a_second(tiny_model_dir, tmp_path, tiny_engine):
    seed = seed_without_eos(tiny_engine, "long", 200)
    with (
        ServerProcess(tiny_model_dir, tmp_path / "server.log", "--max-batch-size", "1", env=STEP_DELAY) as process,
        process.client() as http,
    ):
        body = json.dumps({"prompt": "long", "max_tokens": 200, "seed": seed}).encode()  # about 4 s of steps
        with socket.create_connection(("127.0.0.1", process.port)) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            time.sleep(0.5)  # generating now
        hung_up = time.monotonic()
        while metric(http.get("/metrics").text, "llmkit_requests_ended_total", reason="disconnect") < 1:
            assert time.monotonic() - hung_up < 1.0, "the hang-up was not noticed within a second"
            time.sleep(0.02)
        quick = http.post("/v1/completions", json={"prompt": "next", "max_tokens": 2})
        assert quick.status_code == 200 and time.monotonic() - hung_up < 1.5  # the only batch row was free
    assert any("/v1/completions 499" in line for line in process.log().splitlines())


def test_a_bug_while_streaming_still_ends_the_stream_with_an_error_event_and_done(inprocess, monkeypatch):
    from llmkit.server import routes

    real_chunk = routes.Renderer.chunk
    calls = {"n": 0}

    def buggy_chunk(self, chunk, **more):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("a bug in rendering")
        return real_chunk(self, chunk, **more)

    monkeypatch.setattr(routes.Renderer, "chunk", buggy_chunk)
    app, url = inprocess
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream(
            "POST",
            "/v1/completions",
            json={"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0, "stream": True},
        ) as response:
            events = list(sse_events(response))
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        assert client.get("/health").status_code == 200
