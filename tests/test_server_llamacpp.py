"""`llmkit serve --engine llama.cpp` on a tiny GGUF written by the test: the batcher alone (in-process,
no HTTP; rows decoded together give each request the engine's text, on the shipped SmolLM2 GGUF too),
then the real server as a process: the same text as the engine (and as `llmkit generate --engine
llama.cpp`) for a seed, streams, stop strings, chat, concurrent requests batched, timeouts, and
/health naming the engine.

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
    submit_all,
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


# --- the batcher alone -----------------------------------------------------------------------------------


SPECS = [
    dict(greedy=True, max_new_tokens=12),
    dict(seed=3, temperature=1.0, max_new_tokens=15),
    dict(seed=5, temperature=0.9, top_p=0.9, num_sequences=2, max_new_tokens=10),
    dict(seed=7, repetition_penalty=1.3, temperature=0.7, max_new_tokens=14),
]
PROMPTS = [PROMPT, "The quick brown fox", "Once upon a time", "hello"]


def assert_engines_text(llama, prompt, spec, sink):
    reference = llama.generate(prompt, parse_params(spec))
    assert isinstance(sink.final, Finished), sink.final
    assert completions(sink.final.result) == completions(reference)
    assert sink.final.result.seed == reference.seed
    for index, completion in enumerate(reference.completions):  # the chunks add up to the text
        assert "".join(c.text for c in sink.chunks if c.index == index) == completion.text


def test_batcher_decodes_requests_together_with_the_engines_text(llama):
    steps = []
    scheduler = llama.scheduler(on_step=lambda kind, rows, seconds: steps.append((kind, rows)))
    sinks = submit_all(scheduler, llama, PROMPTS, SPECS)
    scheduler.step()
    assert scheduler.waiting == 0 and scheduler.running_rows == 5  # all four at once, n=2 taking two rows
    run_steps(scheduler)
    assert not scheduler.busy and scheduler.max_batch_size == 16
    for prompt, spec, sink in zip(PROMPTS, SPECS, sinks):
        assert_engines_text(llama, prompt, spec, sink)
    assert steps[0] == ("prefill", 5) and steps[1] == ("decode", 5)
    assert sorted(scheduler._free) == list(range(scheduler.context.rows))  # every sequence given back


def test_a_request_arriving_mid_decode_joins_the_running_rows(llama):
    steps = []
    scheduler = llama.scheduler(on_step=lambda kind, rows, seconds: steps.append((kind, rows)))
    early, early_sink = scheduler_request(llama, PROMPTS[1], SPECS[1])
    scheduler.submit(early)
    for _ in range(4):
        scheduler.step()
    late, late_sink = scheduler_request(llama, PROMPTS[2], SPECS[2])
    scheduler.submit(late)
    scheduler.step()  # the newcomer's prefill; the running row waits one step
    scheduler.step()
    assert steps[-2:] == [("prefill", 2), ("decode", 3)] and early_sink.final is None
    run_steps(scheduler)
    assert_engines_text(llama, PROMPTS[1], SPECS[1], early_sink)
    assert_engines_text(llama, PROMPTS[2], SPECS[2], late_sink)


def test_a_newcomer_takes_the_lowest_free_sequence_and_steps_run_in_sequence_order(llama, monkeypatch):
    scheduler = llama.scheduler()
    sent = []
    real_decode = scheduler.context.decode

    def recording(tokens, positions, seqs, logits):
        sent.append(list(seqs))
        return real_decode(tokens, positions, seqs, logits)

    monkeypatch.setattr(scheduler.context, "decode", recording)
    first, _ = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=100))
    second, second_sink = scheduler_request(llama, PROMPTS[1], SPECS[1])
    scheduler.submit(first)
    scheduler.submit(second)
    scheduler.step()
    first.cancel("disconnect")
    scheduler.step()  # the first leaves: sequence 0 is free, the second runs in sequence 1
    late, late_sink = scheduler_request(llama, PROMPTS[3], SPECS[3])
    scheduler.submit(late)
    scheduler.step()
    assert late_sink is not None and scheduler._seqs == [1, 0]  # rows in arrival order, the newcomer in sequence 0
    scheduler.step()
    assert sent[-1] == [0, 1]  # a decode step goes in sequence order
    run_steps(scheduler)
    assert_engines_text(llama, PROMPTS[1], SPECS[1], second_sink)
    assert_engines_text(llama, PROMPTS[3], SPECS[3], late_sink)


def test_batcher_cancel_and_deadlines_free_their_rows(llama):
    scheduler = llama.scheduler()
    gone, gone_sink = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=200))
    late, late_sink = scheduler_request(llama, "hello", dict(greedy=True, max_new_tokens=5), deadline=0.0)
    keep, keep_sink = scheduler_request(llama, "The quick brown fox", dict(seed=3, temperature=1.0, max_new_tokens=15))
    for req in (gone, late, keep):
        scheduler.submit(req)
    scheduler.step()
    while not gone_sink.chunks:  # a token's text may wait for the next (half a UTF-8 character)
        scheduler.step()
    assert isinstance(late_sink.final, Failed) and isinstance(late_sink.final.error, RequestTimeout)
    assert gone_sink.final is None and scheduler.running_rows == 2
    gone.cancel("disconnect")  # cancelled while running: dropped before its next token
    chunks_before = len(gone_sink.chunks)
    scheduler.step()
    assert isinstance(gone_sink.final, Failed) and isinstance(gone_sink.final.error, Cancelled)
    assert len(gone_sink.chunks) == chunks_before and scheduler.running_rows == 1
    run_steps(scheduler)
    reference = llama.generate("The quick brown fox", parse_params(seed=3, temperature=1.0, max_new_tokens=15))
    assert completions(keep_sink.final.result) == completions(reference)  # its batch mate left no trace

    expiring, expiring_sink = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=200))
    scheduler.submit(expiring)
    scheduler.step()
    scheduler.step()
    expiring.deadline = time.perf_counter()  # passes its deadline mid-generation
    scheduler.step()
    assert isinstance(expiring_sink.final, Failed) and isinstance(expiring_sink.final.error, RequestTimeout)
    assert not scheduler.busy and sorted(scheduler._free) == list(range(scheduler.context.rows))


def test_batcher_queue_bound(llama):
    scheduler = llama.scheduler(max_batch_size=1, max_queue=1)
    first, first_sink = scheduler_request(llama, "a", dict(greedy=True, max_new_tokens=4))
    second, second_sink = scheduler_request(llama, "b", dict(greedy=True, max_new_tokens=4))
    scheduler.submit(first)  # the one row is free: it will run at the next step, not count against the queue
    scheduler.submit(second)  # waits: the queue (1) is full now
    with pytest.raises(QueueFull, match="at capacity"):
        scheduler.submit(scheduler_request(llama, "c", dict(greedy=True))[0])
    scheduler.step()  # the first runs, the second still waits
    assert scheduler.waiting == 1 and scheduler.running_rows == 1
    with pytest.raises(QueueFull):
        scheduler.submit(scheduler_request(llama, "d", dict(greedy=True))[0])
    run_steps(scheduler)
    assert isinstance(first_sink.final, Finished) and isinstance(second_sink.final, Finished)


def test_a_request_bigger_than_the_batch_runs_alone(llama):
    scheduler = llama.scheduler(max_batch_size=2)
    spec = dict(seed=9, temperature=1.0, num_sequences=4, max_new_tokens=6)
    big, big_sink = scheduler_request(llama, PROMPT, spec)
    scheduler.submit(big)
    scheduler.step()
    assert scheduler.running_rows == 4
    run_steps(scheduler)
    assert_engines_text(llama, PROMPT, spec, big_sink)


def test_a_request_whose_prompt_fails_fails_alone(llama, monkeypatch):
    scheduler = llama.scheduler()
    poisoned_ids = llama.prompt_ids("poisoned prompt")
    real_evaluate = scheduler.context.evaluate

    def evaluate(ids, seq, start):
        if list(ids) == poisoned_ids:
            raise RuntimeError("llama_decode returned -1")
        return real_evaluate(ids, seq, start)

    monkeypatch.setattr(scheduler.context, "evaluate", evaluate)
    bad, bad_sink = scheduler_request(llama, "poisoned prompt", dict(greedy=True, max_new_tokens=5))
    good, good_sink = scheduler_request(llama, PROMPTS[1], SPECS[1])
    scheduler.submit(bad)
    scheduler.submit(good)
    run_steps(scheduler)
    assert isinstance(bad_sink.final, Failed) and "other requests were not affected" in str(bad_sink.final.error)
    assert_engines_text(llama, PROMPTS[1], SPECS[1], good_sink)
    assert scheduler.failures.requests == 1 and scheduler.failures.steps == 0
    assert sorted(scheduler._free) == list(range(scheduler.context.rows))


def test_a_request_longer_than_its_sequence_is_refused_alone(llama):
    scheduler = llama.scheduler()
    too_long, too_long_sink = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=4096))
    good, good_sink = scheduler_request(llama, PROMPTS[1], SPECS[1])
    scheduler.submit(too_long)
    scheduler.submit(good)
    run_steps(scheduler)
    assert isinstance(too_long_sink.final, Failed) and "exceeds the 4096 tokens of a sequence" in str(
        too_long_sink.final.error
    )
    assert_engines_text(llama, PROMPTS[1], SPECS[1], good_sink)


def test_a_failed_decode_step_fails_its_batch_and_the_next_request_is_served(llama, monkeypatch):
    scheduler = llama.scheduler()
    real_decode = scheduler.context.decode
    calls = []

    def flaky(tokens, positions, seqs, logits):
        calls.append(len(tokens))
        if len(calls) == 3:
            raise RuntimeError("llama_decode returned 1")
        return real_decode(tokens, positions, seqs, logits)

    monkeypatch.setattr(scheduler.context, "decode", flaky)
    one, one_sink = scheduler_request(llama, PROMPTS[1], SPECS[1])
    scheduler.submit(one)
    run_steps(scheduler)
    assert isinstance(one_sink.final, Failed) and scheduler.failures.steps == 1
    assert scheduler.running_rows == 0 and sorted(scheduler._free) == list(range(scheduler.context.rows))
    again, again_sink = scheduler_request(llama, PROMPTS[1], SPECS[1])
    scheduler.submit(again)
    run_steps(scheduler)
    assert_engines_text(llama, PROMPTS[1], SPECS[1], again_sink)


def test_batcher_thread_drains_on_close_and_fails_all_on_abort(llama):
    scheduler = llama.scheduler().start()
    short = [scheduler_request(llama, p, dict(greedy=True, max_new_tokens=6)) for p in ("a", "b")]
    for req, _ in short:
        scheduler.submit(req)
    scheduler.close()
    assert scheduler.join(10) and not scheduler.alive
    assert all(isinstance(sink.final, Finished) for _, sink in short)
    with pytest.raises(ShuttingDown):
        scheduler.submit(scheduler_request(llama, "c", dict(greedy=True))[0])

    scheduler = llama.scheduler(step_delay_s=0.01).start()
    long, long_sink = scheduler_request(llama, PROMPT, dict(greedy=True, max_new_tokens=200))
    scheduler.submit(long)
    deadline = time.monotonic() + 5
    while not long_sink.chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.abort()
    assert scheduler.join(10) and not scheduler.alive
    assert isinstance(long_sink.final, Failed) and isinstance(long_sink.final.error, ShuttingDown)


def test_batched_rows_give_the_engines_text_on_the_shipped_gguf():
    """The shipped SmolLM2 GGUF (Q4_1, llama.cpp's quantized kernels): sixteen requests decoded together, each
    with its own settings and prompt length, give what each gives alone through `llmkit generate`."""
    from llmkit.engine import load_engine

    engine = load_engine("smollm2-135m", engine="llama.cpp")
    specs = [
        dict(greedy=True, max_new_tokens=24),
        dict(seed=1, temperature=0.9, top_p=0.95, max_new_tokens=24),
        dict(seed=2, temperature=1.0, num_sequences=2, max_new_tokens=16),
        dict(seed=3, temperature=0.7, repetition_penalty=1.3, max_new_tokens=20),
    ]
    # Prompt lengths from 11 to 600 tokens: some past llama.cpp's 512-token prompt chunk and its long-cache paths.
    cases = [(f"Question {i}: why is the sky blue?" + " Explain." * (i**3 // 3), specs[i % 4]) for i in range(13)]
    scheduler = engine.scheduler()
    sinks = []
    for prompt, spec in cases:
        req, sink = scheduler_request(engine, prompt, spec)
        scheduler.submit(req)
        sinks.append(sink)
    scheduler.step()
    assert scheduler.running_rows == 13 + 3  # n=2 for three of them: the whole batch decodes at once
    run_steps(scheduler)
    for (prompt, spec), sink in zip(cases, sinks):
        assert_engines_text(engine, prompt, spec, sink)


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
    assert body["max_batch_size"] == 16 and body["running"] == 0 and body["waiting"] == 0


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


def test_concurrent_requests_are_batched(server, llama):
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
    # Neither waited for the other's generation (40 steps of 20 ms): they ran in the same batch.
    running_ms = first["total_ms"] - first["queue_ms"]
    assert running_ms > 700 and second["queue_ms"] < 0.5 * running_ms


def test_timeout_answers_504_and_frees_the_model(http, llama):
    seed = seed_without_eos(llama, "slow", 250)  # 250 steps of 20 ms: longer than the 3 s timeout
    started = time.monotonic()
    response = http.post("/v1/completions", json={"prompt": "slow", "max_tokens": 250, "seed": seed})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert REQUEST_TIMEOUT_S - 0.5 < time.monotonic() - started < REQUEST_TIMEOUT_S + 1.5
    answers_quickly(http)
    # the timed-out one was dropped, not left running (it would run about 2 s more); the quick one's own row may
    # still be counted for a moment after its response, while the loop finishes the step that ended it
    deadline = time.monotonic() + 0.5
    while http.get("/health").json()["running"] != 0:
        assert time.monotonic() < deadline, "a request is still running after the timeout"
        time.sleep(0.02)


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


def test_flash_attention_is_llamacpps_and_asked_for(llama, tiny_engine, cli, tiny_model_dir):
    from llmkit.errors import UnsupportedFeature

    scheduler = llama.scheduler(flash_attn=True)
    sinks = submit_all(scheduler, llama, PROMPTS, SPECS)
    run_steps(scheduler)
    for spec, sink in zip(SPECS, sinks):  # its text may differ from the engine's; its shape may not
        assert isinstance(sink.final, Finished)
        assert len(sink.final.result.completions) == spec.get("num_sequences", 1)
        assert all(0 < len(c.token_ids) <= spec["max_new_tokens"] for c in sink.final.result.completions)
    with pytest.raises(UnsupportedFeature, match="applies to the llama.cpp engine"):
        tiny_engine.scheduler(flash_attn=True)
    refused = cli("serve", "-m", str(tiny_model_dir), "--flash-attn")
    assert refused.exit_code == 2 and "--flash-attn applies to the llama.cpp engine" in refused.stderr
