"""Limits on a real server: API key, rate limit, queue overflow, timeout, client disconnect, SIGTERM.

LLMKIT_TEST_STEP_DELAY (a test-only knob read by the batch loop) makes every step of the tiny model take
20 ms, so a request of N tokens takes about N/50 seconds and the timing of these tests is predictable.
"""

import concurrent.futures
import signal
import time

import httpx
import pytest

from tests.server_helpers import ServerProcess, answers_quickly, metric, seed_without_eos, sse_events

API_KEY = "test-key-8d0c6f"
STEP_DELAY = {"LLMKIT_TEST_STEP_DELAY": "0.02"}
RATE = 30  # high enough for the other tests here; the rate test uses a client address of its own


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("serve-limits") / "server.log",
        "--max-batch-size",
        "1",
        "--max-queue",
        "1",
        "--request-timeout",
        "3",
        "--rate-limit",
        f"{RATE}/minute",
        env={**STEP_DELAY, "LLMKIT_API_KEY": API_KEY},
        api_key=API_KEY,
    )
    with process:
        yield process


@pytest.fixture()
def http(server):
    with server.client() as client:
        yield client


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_api_key_is_required_except_for_health(server, http):
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        missing = anonymous.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = anonymous.post("/v1/completions", json={"prompt": "hi"}, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/generate").json() == {
            "error": "missing API key; send it as 'Authorization: Bearer <key>'",
            "field": None,
            "type": "authentication_error",
        }
        assert anonymous.get("/health").status_code == 200
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": API_KEY}).status_code == 200

    from openai import AuthenticationError, OpenAI

    good = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert good.completions.create(model="m", prompt="hi", max_tokens=2).usage.completion_tokens <= 2
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert API_KEY not in server.log()


def test_full_queue_answers_503_with_retry_after(server, http, tiny_engine):
    seed = seed_without_eos(tiny_engine, "a", 40)
    with http.stream(
        "POST", "/v1/completions", json={"prompt": "a", "max_tokens": 40, "seed": seed, "stream": True}
    ) as running:
        events = sse_events(running)
        next(events)  # running: it holds the only batch slot
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(http.post, "/v1/completions", json={"prompt": "b", "max_tokens": 3})
            wait_until(lambda: httpx.get(server.url + "/health").json()["waiting"] == 1)
            overflow = http.post("/v1/completions", json={"prompt": "c", "max_tokens": 3})
            assert overflow.status_code == 503 and overflow.headers["retry-after"] == "1"
            assert overflow.json()["error"]["type"] == "queue_full"
            assert list(events)[-1] == "[DONE]"
            assert queued.result().status_code == 200  # the queued one ran once there was room


def test_timeout_answers_504_and_stops_generation(server, http, tiny_engine):
    seed = seed_without_eos(tiny_engine, "slow", 250)
    started = time.monotonic()
    response = http.post("/v1/completions", json={"prompt": "slow", "max_tokens": 250, "seed": seed})  # >= 5 s
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert 2.5 < time.monotonic() - started < 4.5
    answers_quickly(http)  # the batch has one slot: only free if the timed-out request was dropped
    assert metric(http.get("/metrics").text, "llmkit_requests_ended_total", reason="timeout") >= 1


def test_client_disconnect_mid_stream_stops_generation(server, http, tiny_engine):
    seed = seed_without_eos(tiny_engine, "bye", 90)
    with http.stream(
        "POST", "/v1/completions", json={"prompt": "bye", "max_tokens": 90, "seed": seed, "stream": True}
    ) as response:
        events = sse_events(response)
        next(events)
        next(events)
    wait_until(
        lambda: metric(http.get("/metrics").text, "llmkit_requests_ended_total", reason="disconnect") >= 1, timeout=3
    )
    # the abandoned request (90 steps, 1.8 s) no longer holds the slot
    after = answers_quickly(http, within_s=1.0, prompt="next", max_tokens=3)
    assert after.json()["usage"]["completion_tokens"] <= 3


def test_rate_limit_per_client_answers_429(server):
    transport = httpx.HTTPTransport(local_address="127.0.0.3")  # a client address of its own on loopback
    with httpx.Client(base_url=server.url, transport=transport, headers=server.headers(), timeout=10) as client:
        statuses = [client.get("/v1/models").status_code for _ in range(RATE + 2)]
        assert statuses[:RATE] == [200] * RATE and statuses[RATE] == 429
        limited = client.get("/v1/models")
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
        assert client.get("/health").status_code == 200  # exempt
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=10) as other:
        assert other.get("/v1/models").status_code == 200  # another client is unaffected


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tiny_model_dir, tmp_path, tiny_engine):
    seed = seed_without_eos(tiny_engine, "Once", 60)
    with ServerProcess(tiny_model_dir, tmp_path / "server.log", "--grace-period", "20", env=STEP_DELAY) as process:
        with process.client() as http:
            with http.stream(
                "POST",
                "/v1/completions",
                json={
                    "prompt": "Once",
                    "max_tokens": 60,
                    "stream": True,
                    "seed": seed,
                    "stream_options": {"include_usage": True},
                },
            ) as response:
                events = sse_events(response)
                next(events)
                process.signal(signal.SIGTERM)
                rest = list(events)
            assert rest[-1] == "[DONE]"
            finish = [e["choices"][0]["finish_reason"] for e in rest[:-1] if e["choices"]]
            assert finish[-1] == "length" and rest[-2]["usage"]["completion_tokens"] == 60  # all of them
        assert process.wait(timeout=20) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(process.url + "/health", timeout=2)
