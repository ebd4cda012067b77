"""`llmkit serve` as a real process on a free port, talked to over HTTP with httpx and the official openai client."""

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from llmkit.params import parse_params
from tests.server_helpers import ServerProcess, metric, seed_without_eos, sse_events, stream_texts

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(
        tiny_model_dir, tmp_path_factory.mktemp("serve") / "server.log", "--log-format", "json"
    ) as process:
        yield process


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def completion_text(http, **body):
    response = http.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# --- startup and health ---------------------------------------------------------------------------------


def test_health_answers_loading_then_ok(server, http):
    statuses = [status for status, _ in server.health_seen]
    assert statuses[0] == 503 and statuses[-1] == 200
    assert server.health_seen[0][1]["status"] == "loading"
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "tiny-llama" and body["device"] == "cpu"
    assert body["engine"] == "transformers" and body["max_batch_size"] == 16  # the batching scheduler


# --- the openai client --------------------------------------------------------------------------------


def test_openai_completions_and_chat(openai_client):
    completion = openai_client.completions.create(model="anything", prompt=PROMPT, max_tokens=6, seed=1)
    assert completion.object == "text_completion" and completion.model == "tiny-llama"
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    timings = completion.model_extra["timings"]
    assert timings["predicted_n"] == completion.usage.completion_tokens and timings["ttft_ms"] > 0

    chat = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=5,
        temperature=0,
        n=1,
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens <= 5


def test_openai_streaming_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and "timings" in finishing[0].model_extra
    assert all(c.usage is None for c in chunks[:-1])

    text_stream = openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, seed=4, stream=True)
    pieces = list(text_stream)
    assert pieces[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(p.choices[0].text for p in pieces) == completion_text_via(openai_client)


def completion_text_via(openai_client):
    return openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, seed=4).choices[0].text


# --- same text as the CLI engine, alone or batched ------------------------------------------------------


def test_seed_gives_the_same_text_alone_batched_and_in_the_cli_engine(server, http, tiny_engine):
    body = {"prompt": PROMPT, "max_tokens": 20, "seed": 5, "temperature": 1.0, "n": 2}
    alone = http.post("/v1/completions", json=body).json()["choices"]
    metrics = http.get("/metrics").text
    rows_before, steps_before = metric(metrics, "llmkit_batch_rows_sum"), metric(metrics, "llmkit_batch_rows_count")

    ours_done = threading.Event()
    seeds = [seed_without_eos(tiny_engine, f"The sea {i}", 200) for i in range(3)]

    def long_stream(i):  # another request, mid-generation when ours arrives; it hangs up once ours is answered
        with httpx.Client(base_url=server.url, timeout=30) as other:
            with other.stream(
                "POST",
                "/v1/completions",
                json={"prompt": f"The sea {i}", "max_tokens": 200, "seed": seeds[i], "stream": True},
            ) as response:
                events = sse_events(response)
                next(events)
                started.append(i)
                received = 1
                for event in events:
                    received += 1
                    if ours_done.is_set() or event == "[DONE]":
                        break
                return received

    started: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        others = [pool.submit(long_stream, i) for i in range(3)]
        while len(started) < 3 and not any(f.done() for f in others):
            time.sleep(0.01)
        batched = http.post("/v1/completions", json=body).json()["choices"]
        ours_done.set()
        assert all(f.result() > 1 for f in others)
    assert [c["text"] for c in batched] == [c["text"] for c in alone]
    metrics = http.get("/metrics").text
    rows = metric(metrics, "llmkit_batch_rows_sum") - rows_before
    steps = metric(metrics, "llmkit_batch_rows_count") - steps_before
    assert rows > steps > 0  # decode steps ran several requests' rows together

    reference = tiny_engine.generate(PROMPT, parse_params(max_new_tokens=20, seed=5, temperature=1.0, num_sequences=2))
    assert [c.text for c in reference.completions] == [c["text"] for c in alone]


def test_streamed_multibyte_text_is_never_split(http):
    """The stream's pieces add up to the non-streamed text for the same seed, which holds multi-byte characters."""
    checked = 0
    for seed in range(12):
        body = {"prompt": "Caf\u00e9 \u65e5\u672c\u8a9e \U0001f600", "max_tokens": 40, "seed": seed, "temperature": 1.5}
        full = completion_text(http, **body)
        if not any(ord(ch) > 0x7F and ch != "\ufffd" for ch in full):
            continue
        texts, _ = stream_texts(http, "/v1/completions", body)
        assert texts[0] == full
        checked += 1
        break
    assert checked, "no seed produced a multi-byte character"


def test_stop_string_never_leaks_into_the_stream(http, tiny_engine):
    body = {
        "prompt": "The quick brown fox",
        "max_tokens": 30,
        "seed": seed_without_eos(tiny_engine, "The quick brown fox", 30),
    }
    free = completion_text(http, **body)
    stop = free[6:9]
    assert len(stop) == 3
    cut = free[: free.find(stop)]
    texts, events = stream_texts(http, "/v1/completions", {**body, "stop": stop})
    assert texts[0] == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    chat_texts, _ = stream_texts(
        http,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "seed": 1, "stop": [stop, "zz"]},
    )
    assert stop not in chat_texts[0]


def test_generate_keeps_the_tutorial_contract(http):
    response = http.post("/generate", json={"prompt": PROMPT, "max_length": 6, "temperature": 0.7})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["prompt"] == PROMPT
    assert body["generated_text"] == PROMPT + body["completion"]
    assert body["usage"]["completion_tokens"] <= 6 and body["parameters"]["max_length"] == 6
    assert body["inference_time_seconds"] >= 0 and body["parameters"]["temperature"] == 0.7


# --- every 4xx ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "message"),
    [
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": 0},
            400,
            "max_tokens",
            "max_tokens must be between 1 and 4096",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "temperature": 3},
            400,
            "temperature",
            "temperature must be between 0.0 and 2.0",
        ),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature must be a number"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p must be greater than 0.0"),
        ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "n", "n must be 1 with greedy"),
        ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n", "n must be between 1 and 16"),
        ("/v1/completions", {"prompt": "x", "stop": ["a"] * 9}, 400, "stop", "stop takes at most 8"),
        ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed", "seed must be between 0"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 300}, 400, "max_tokens", "exceeds the model's context"),
        ("/v1/completions", {"prompt": "x", "colour": 1}, 400, "colour", "unknown parameter 'colour'"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs must be between 0 and 20"),
        ("/v1/completions", {"prompt": ["x"] * 33}, 400, "prompt", "prompt takes at most 32 prompts"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt", "prompt must not be empty"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing required parameter 'prompt'"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
            400,
            "max_completion_tokens",
            "max_completion_tokens must be between 1",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools",
            "tools is not supported",
        ),
    ],
)
def test_bad_openai_requests_are_400_naming_the_field(http, path, body, status, param, message):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"max_length": 5}, "prompt", "missing required parameter 'prompt'"),
        ({"prompt": "x", "max_length": 99999}, "max_length", "max_length must be between 1 and 4096 (got 99999)"),
        ({"prompt": "x", "temperature": 5}, "temperature", "temperature must be between 0.0 and 2.0 (got 5)"),
        ({"prompt": "x", "max_length": 5, "max_new_tokens": 5}, "max_length", "not both"),
        ({"prompt": "   "}, "prompt", "prompt must not be empty"),
    ],
)
def test_bad_generate_requests_are_400_naming_the_field(http, body, field, message):
    response = http.post("/generate", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": response.json()["error"], "field": field, "type": "invalid_request_error"}
    assert message in response.json()["error"]


def test_malformed_bodies_routes_and_sizes(http):
    bad_json = http.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    not_object = http.post("/v1/completions", json=[1, 2])
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    assert http.get("/v1/nope").status_code == 404 and "error" in http.get("/v1/nope").json()
    assert http.get("/v1/completions").status_code == 405
    huge = {"prompt": "a" * 1_100_000}
    assert http.post("/v1/completions", json=huge).status_code == 413

    def chunked():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * 60_000
        yield b'"}'

    too_big = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and "larger than" in too_big.json()["error"]["message"]


# --- observability --------------------------------------------------------------------------------------


def test_models_request_id_and_metrics_after_traffic(http):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-llama"
    response = http.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, headers={"x-request-id": "trace-123"}
    )
    assert response.headers["x-request-id"] == "trace-123" and response.json()["id"] == "cmpl-trace-123"
    text = http.get("/metrics").text
    assert metric(text, "llmkit_requests_total", route="/v1/completions", status="200") >= 1
    assert metric(text, "llmkit_requests_total", route="/v1/completions", status="400") >= 1
    assert metric(text, "llmkit_generation_tokens_total") >= 3
    assert metric(text, "llmkit_time_to_first_token_seconds_count") >= 1
    assert metric(text, "llmkit_model_ready") == 1.0
    assert metric(text, "llmkit_queue_waiting_requests") == 0.0


def test_json_access_log_has_ids_and_no_prompt_text(server, http):
    http.post(
        "/v1/completions",
        json={"prompt": "a secret prompt text", "max_tokens": 2},
        headers={"x-request-id": "log-check-1"},
    )
    http.get("/health")
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [
        line for line in lines if line.get("logger") == "llmkit.access" and line.get("request_id") == "log-check-1"
    ]
    assert access and access[0]["status"] == 200 and access[0]["completion_tokens"] <= 2
    assert access[0]["latency_ms"] > 0 and access[0]["path"] == "/v1/completions"
    assert "a secret prompt text" not in server.log()
