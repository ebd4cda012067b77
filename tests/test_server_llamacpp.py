"""`llmkit serve --engine llama.cpp` on a tiny GGUF written by the test: the SerialScheduler alone
(in-process, no HTTP), then the real server as a process: the same text as the engine (and as
`llmkit generate --engine llama.cpp`) for a seed, streams, stop strings, chat, requests served one
after the other, timeouts, and /health naming the engine.

LLMKIT_TEST_STEP_DELAY makes every step of the served model take 20 ms (a step is one chunk, usually
one token), so a request of N tokens takes about N/50 seconds and the timing checks are predictable.
"""

import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import pytest

from llmkit.engine.scheduling import Failed, Finished
from llmkit.errors import Cancelled, QueueFull, RequestTimeout, ShuttingDown
from llmkit.params import parse_params
from tests.server_helpers import (
    ServerProcess,
    answers_quickly,
    completions,
    free_port,
    run_steps,
    scheduler_request,
    seed_without_eos,
    sse_events,
    stream_texts,
)
from tests.tiny_gguf import write_tiny_gguf

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]' from the checkout)"
)

PROMPT = "hello world"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
STEP_DELAY = {"LLMKIT_TEST_STEP_DELAY": "0.02"}
REQUEST_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    from llmkit.engine import load_engine

    return load_engine(str(tiny_gguf), engine="llama.cpp")


# --- the scheduler alone --------------------------------------------------------------------------------


def test_scheduler_gives_the_engines_text_one_request_after_another(llama):
    from llmkit.engine.serial import SerialScheduler

    specs = [
        dict(greedy=True, max_new_tokens=12),
        dict(seed=3, temperature=1.0, max_new_tokens=15),
        dict(seed=5, temperature=0.9, top_p=0.9, num_sequences=2, max_new_tokens=10),
        dict(seed=7, repetition_penalty=1.3, temperature=0.7, max_new_tokens=14),
    ]
    prompts = [PROMPT, "The quick brown fox", "Once upon a time", "hello"]
    steps = []
    scheduler = SerialScheduler(llama, on_step=lambda kind, rows, seconds: steps.append((kind, rows)))
    sinks = []
    for prompt, spec in zip(prompts, specs):
        req, sink = scheduler_request(llama, prompt, spec)
        scheduler.submit(req)
        sinks.append(sink)
    assert scheduler.waiting == 4 and scheduler.running_rows == 0 and scheduler.busy
    scheduler.step()
    assert scheduler.waiting == 3 and scheduler.running_rows == 1  # one runs, the rest wait their turn
    run_steps(scheduler)
    assert not scheduler.busy and scheduler.max_batch_size == 1
    for prompt, spec, sink in zip(prompts, specs, sinks):
        reference = llama.generate(prompt, parse_params(spec))
        assert isinstance(sink.final, Finished)
        assert completions(sink.final.result) == completions(reference)
        assert sink.final.result.seed == reference.seed
        for index, completion in enumerate(reference.completions):  # the chunks add up to the text
            assert "".join(c.text for c in sink.chunks if c.index == index) == completion.text
    assert [kind for kind, _ in steps].count("prefill") == 4 and {rows for _, rows in steps} == {1}
    first, second = sinks[0].final, sinks[1].final
    assert first.queue_s >= 0 and first.prefill_s > 0
    # The second waited in the queue for all of the first; its timings count from its arrival, as batched ones do.
    assert second.queue_s >= first.result.timings.total_s - first.queue_s
    assert second.result.timings.ttft_s >= second.queue_s


def test_scheduler_cancel_and_deadlines_free_the_model(llama):
    from llmkit.engine.serial import SerialScheduler

    scheduler = SerialScheduler(llama)
    gone, gone_sink = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=200))
    queued, queued_sink = scheduler_request(llama, "hello", dict(greedy=True, max_new_tokens=5))
    late, late_sink = scheduler_request(llama, "hello", dict(greedy=True, max_new_tokens=5), deadline=0.0)
    keep, keep_sink = scheduler_request(llama, "The quick brown fox", dict(seed=3, temperature=1.0, max_new_tokens=15))
    for req in (gone, queued, late, keep):
        scheduler.submit(req)
    scheduler.step()
    scheduler.step()
    assert isinstance(late_sink.final, Failed) and isinstance(late_sink.final.error, RequestTimeout)
    assert gone_sink.chunks and gone_sink.final is None and scheduler.running_rows == 1
    queued.cancel("disconnect")  # cancelled while waiting: it never runs
    gone.cancel("disconnect")  # cancelled while running: dropped before its next chunk
    chunks_before = len(gone_sink.chunks)
    scheduler.step()
    assert isinstance(gone_sink.final, Failed) and isinstance(gone_sink.final.error, Cancelled)
    assert isinstance(queued_sink.final, Failed) and isinstance(queued_sink.final.error, Cancelled)
    assert len(gone_sink.chunks) == chunks_before and not queued_sink.chunks
    assert scheduler.running_rows == 0 and scheduler.waiting == 1
    run_steps(scheduler)
    reference = llama.generate("The quick brown fox", parse_params(seed=3, temperature=1.0, max_new_tokens=15))
    assert completions(keep_sink.final.result) == completions(reference)  # the abandoned one left no trace

    expiring, expiring_sink = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=200))
    scheduler.submit(expiring)
    scheduler.step()
    scheduler.step()
    expiring.deadline = time.perf_counter()  # passes its deadline mid-generation
    scheduler.step()
    assert isinstance(expiring_sink.final, Failed) and isinstance(expiring_sink.final.error, RequestTimeout)
    assert not scheduler.busy


def test_scheduler_queue_bound(llama):
    from llmkit.engine.serial import SerialScheduler

    scheduler = SerialScheduler(llama, max_queue=1)
    first, first_sink = scheduler_request(llama, "a", dict(greedy=True, max_new_tokens=4))
    second, second_sink = scheduler_request(llama, "b", dict(greedy=True, max_new_tokens=4))
    scheduler.submit(first)  # the one slot is free: it will run at the next step, not count against the queue
    scheduler.submit(second)  # waits: the queue (1) is full now
    with pytest.raises(QueueFull, match="at capacity"):
        scheduler.submit(scheduler_request(llama, "c", dict(greedy=True))[0])
    scheduler.step()  # the first runs, the second still waits
    assert scheduler.waiting == 1 and scheduler.running_rows == 1
    with pytest.raises(QueueFull):
        scheduler.submit(scheduler_request(llama, "d", dict(greedy=True))[0])
    run_steps(scheduler)
    assert isinstance(first_sink.final, Finished) and isinstance(second_sink.final, Finished)


def test_scheduler_thread_drains_on_close_and_fails_all_on_abort(llama):
    from llmkit.engine.serial import SerialScheduler

    scheduler = SerialScheduler(llama).start()
    short = [scheduler_request(llama, p, dict(greedy=True, max_new_tokens=6)) for p in ("a", "b")]
    for req, _ in short:
        scheduler.submit(req)
    scheduler.close()
    assert scheduler.join(10) and not scheduler.alive
    assert all(isinstance(sink.final, Finished) for _, sink in short)
    with pytest.raises(ShuttingDown):
        scheduler.submit(scheduler_request(llama, "c", dict(greedy=True))[0])

    scheduler = SerialScheduler(llama, step_delay_s=0.01).start()
    long, long_sink = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=200))
    waiting, waiting_sink = scheduler_request(llama, "hello", dict(greedy=True, max_new_tokens=5))
    scheduler.submit(long)
    scheduler.submit(waiting)
    deadline = time.monotonic() + 5
    while not long_sink.chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.abort()
    assert scheduler.join(10) and not scheduler.alive
    for sink in (long_sink, waiting_sink):
        assert isinstance(sink.final, Failed) and isinstance(sink.final.error, ShuttingDown)


# --- the real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    process = ServerProcess(
        tiny_gguf,
        tmp_path_factory.mktemp("serve-llamacpp") / "server.log",
        "--engine",
        "llama.cpp",
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        env=STEP_DELAY,
    )
    with process:
        yield process


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def test_health_names_the_engine(server, http):
    assert server.health_seen[-1][0] == 200
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["engine"] == "llama.cpp" and body["model"] == "tiny-chat.gguf"
    assert body["device"] == "cpu" and body["dtype"] == "ALL_F32"
    assert body["max_batch_size"] == 1 and body["running"] == 0 and body["waiting"] == 0


def test_completions_give_the_engines_text_streamed_or_not(http, llama):
    spec = dict(seed=5, temperature=1.0, max_new_tokens=16, num_sequences=2)
    reference = llama.generate(PROMPT, parse_params(spec))
    body = {"prompt": PROMPT, "seed": 5, "temperature": 1.0, "max_tokens": 16, "n": 2}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [c["text"] for c in answer["choices"]] == [c.text for c in reference.completions]
    assert [c["finish_reason"] for c in answer["choices"]] == [c.finish_reason for c in reference.completions]
    assert answer["usage"]["completion_tokens"] == reference.usage.completion_tokens
    assert answer["usage"]["prompt_tokens"] == reference.usage.prompt_tokens
    assert answer["model"] == "tiny-chat.gguf" and answer["timings"]["predicted_n"] == reference.usage.completion_tokens

    texts, events = stream_texts(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert texts == {c.index: c.text for c in reference.completions}
    assert events[-2]["usage"]["completion_tokens"] == reference.usage.completion_tokens
    finishing = [e for e in events[:-2] if e["choices"][0]["finish_reason"]]
    assert len(finishing) == 2 and "timings" in finishing[-1]


def test_seed_gives_the_same_text_as_llmkit_generate(http, cli, tiny_gguf):
    result = cli(
        "generate",
        "-m",
        str(tiny_gguf),
        "--engine",
        "llama.cpp",
        "--seed",
        "11",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.2",
        "--json",
        PROMPT,
    )
    assert result.exit_code == 0, result.stderr
    cli_text = json.loads(result.stdout)["completions"][0]["text"]
    responses = [
        http.post("/v1/completions", json={"prompt": PROMPT, "seed": 11, "max_tokens": 12, "temperature": 1.2})
        for _ in range(2)
    ]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    served = [r.json()["choices"][0]["text"] for r in responses]
    assert served == [cli_text, cli_text]
    other = http.post("/v1/completions", json={"prompt": PROMPT, "seed": 12, "max_tokens": 12, "temperature": 1.2})
    assert other.json()["choices"][0]["text"] != cli_text  # the seed, not luck, fixes the text


def test_generate_endpoint(http, llama):
    reference = llama.generate(PROMPT, parse_params(seed=2, temperature=0.7, max_new_tokens=8))
    response = http.post("/generate", json={"prompt": PROMPT, "max_length": 8, "temperature": 0.7, "seed": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["model"] == "tiny-chat.gguf" and body["seed"] == 2
    assert body["completion"] == reference.text and body["generated_text"] == PROMPT + reference.text
    assert body["usage"]["completion_tokens"] == reference.usage.completion_tokens
    assert body["parameters"]["max_length"] == 8


def test_chat_completions_use_the_files_template(http, llama):
    assert llama.info.has_chat_template
    reference = llama.generate("hi there", parse_params(seed=4, max_new_tokens=10), chat=True)
    body = {"messages": [{"role": "user", "content": "hi there"}], "seed": 4, "max_tokens": 10}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": reference.text}
    assert answer["usage"]["prompt_tokens"] == reference.usage.prompt_tokens
    texts, events = stream_texts(http, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert texts[0] == reference.text


def ascii_stop(llama, prompt):
    """(seed, stop): a seed whose 30 sampled tokens hold three plain letters, which then serve as a stop string."""
    for seed in range(64):
        text = llama.generate(prompt, parse_params(seed=seed, max_new_tokens=30)).text
        for start in range(2, len(text) - 3):
            if text[start : start + 3].isascii() and text[start : start + 3].isalpha():
                return seed, text, text[start : start + 3]
    raise AssertionError("no seed gave three ascii letters in a row")


def test_stop_strings_cut_the_text_and_never_leak(http, llama):
    seed, free, stop = ascii_stop(llama, "The quick brown fox")
    cut = free[: free.find(stop)]
    reference = llama.generate("The quick brown fox", parse_params(seed=seed, max_new_tokens=30, stop=[stop]))
    assert reference.text == cut
    body = {"prompt": "The quick brown fox", "seed": seed, "max_tokens": 30, "stop": stop}
    answer = http.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"] == cut and answer["choices"][0]["finish_reason"] == "stop"
    texts, events = stream_texts(http, "/v1/completions", body)
    assert texts[0] == cut and stop not in texts[0]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_are_served_one_after_the_other(server, llama):
    prompts = ["Once upon a time", "The sea"]
    seeds = [seed_without_eos(llama, p, 40) for p in prompts]

    def ask(i):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post("/v1/completions", json={"prompt": prompts[i], "seed": seeds[i], "max_tokens": 40})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(ask, range(2)))
    assert [r.status_code for r in responses] == [200, 200]
    answers = [r.json() for r in responses]
    for prompt, seed, answer in zip(prompts, seeds, answers):
        assert answer["choices"][0]["text"] == llama.generate(prompt, parse_params(seed=seed, max_new_tokens=40)).text
        assert answer["usage"]["completion_tokens"] == 40
    first, second = sorted((a["timings"] for a in answers), key=lambda t: t["queue_ms"])
    # The second waited for (nearly) all of the first's generation, 20 ms a step; batched, it would not wait.
    running_ms = first["total_ms"] - first["queue_ms"]
    assert running_ms > 200 and second["queue_ms"] >= 0.6 * running_ms


def test_timeout_answers_504_and_frees_the_model(http, llama):
    seed = seed_without_eos(llama, "slow", 250)  # 250 steps of 20 ms: longer than the 3 s timeout
    started = time.monotonic()
    response = http.post("/v1/completions", json={"prompt": "slow", "max_tokens": 250, "seed": seed})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert REQUEST_TIMEOUT_S - 0.5 < time.monotonic() - started < REQUEST_TIMEOUT_S + 1.5
    answers_quickly(http)  # one request at a time: this only runs at once if the timed-out one was dropped
    assert http.get("/health").json()["running"] == 0


def test_stream_disconnect_frees_the_model(server, http, llama):
    seed = seed_without_eos(llama, "bye", 120)
    with http.stream(
        "POST", "/v1/completions", json={"prompt": "bye", "max_tokens": 120, "seed": seed, "stream": True}
    ) as response:
        events = sse_events(response)
        next(events)
        next(events)
    answers_quickly(http, prompt="next", max_tokens=3)  # the abandoned request (120 steps, 2.4 s) is gone


# --- what serve refuses -----------------------------------------------------------------------------------


def test_serve_rejects_a_bad_engine_and_a_folder_for_llamacpp(cli, tiny_model_dir, tmp_path):
    bad = cli("serve", "-m", str(tiny_model_dir), "--engine", "vllm")
    assert bad.exit_code == 2 and "engine must be one of" in bad.stderr
    folder = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "-m",
            str(tiny_model_dir),
            "--engine",
            "llama.cpp",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert folder.returncode != 0
    assert "llama.cpp engine loads GGUF files" in folder.stderr
