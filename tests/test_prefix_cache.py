"""The server's prefix cache (engine/prefix_cache.py): a request that starts like an earlier one computes only
the rest, in the transformers and the llama.cpp batchers, and gives the same tokens as with the cache off."""

from __future__ import annotations

import pytest

from llmkit.engine import load_engine
from llmkit.engine.batch import BatchScheduler
from llmkit.engine.prefix_cache import MIN_PREFIX_TOKENS, PrefixCache, common_prefix
from llmkit.engine.scheduling import Finished
from tests.conftest import CHAT_TEMPLATE, build_tiny_model
from tests.server_helpers import completions, run_steps, scheduler_request

SYSTEM = "You are a careful assistant who answers briefly and never makes things up. " * 2
SEEDED = dict(seed=11, temperature=1.0, max_new_tokens=12)
PENALIZED = dict(seed=5, temperature=0.8, repetition_penalty=1.3, max_new_tokens=10)
GREEDY_TWO = dict(seed=2, temperature=0.9, num_sequences=2, max_new_tokens=8)


# --- the store ---------------------------------------------------------------------------------------------


def test_common_prefix_counts_leading_equal_ids():
    assert common_prefix((1, 2, 3, 4), (1, 2, 9)) == 2
    assert common_prefix((1, 2, 3), (1, 2, 3, 4)) == 3
    assert common_prefix((), (1,)) == 0
    assert common_prefix((5,), (6,)) == 0
    long = tuple(range(5000))
    assert common_prefix(long, (*long[:4321], -1)) == 4321


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_lookup_finds_the_longest_prefix_and_keeps_the_last_prompt_token_to_compute():
    cache = PrefixCache(10_000)
    cache.store(ids(40), "forty", 100)
    cache.store([*ids(20), 999, *ids(30, 500)], "branch", 100)
    entry, reused = cache.lookup([*ids(40), 7, 8])
    assert entry is not None and entry.payload == "forty" and reused == 40
    entry, reused = cache.lookup(ids(40))  # the whole entry: all but the last token
    assert entry is not None and reused == 39
    entry, reused = cache.lookup([*ids(20), 999, 500, 501, 77])
    assert entry is not None and entry.payload == "branch" and reused == 23
    assert cache.lookup(ids(MIN_PREFIX_TOKENS - 1) + [-5]) == (None, 0)  # too short to be worth restoring
    assert cache.lookup(ids(30, 1000)) == (None, 0)


def test_a_longer_entry_supersedes_the_ones_it_begins_with_and_a_covered_one_is_not_stored():
    cache = PrefixCache(10_000)
    cache.store(ids(20), "turn 1", 100)
    cache.store(ids(50), "turn 2", 300)
    assert len(cache) == 1 and cache.bytes == 300
    assert not cache.worth_storing(ids(30))  # turn 2 holds it already
    assert not cache.worth_storing(ids(MIN_PREFIX_TOKENS - 1, 900))  # too short
    assert cache.worth_storing([*ids(30), -1])


def test_the_byte_bound_evicts_the_least_recently_used_first():
    cache = PrefixCache(1000)
    for n in range(4):
        cache.store(ids(20, 100 * n), n, 300)
    assert len(cache) == 3 and cache.bytes == 900 and cache.stats.evicted == 1
    assert cache.lookup(ids(20, 0)) == (None, 0)  # the oldest went first
    cache.lookup(ids(21, 100))  # touching entry 1 makes entry 2 the oldest
    cache.store(ids(20, 900), 9, 300)
    assert cache.lookup(ids(21, 200)) == (None, 0)
    assert cache.lookup(ids(21, 100))[0] is not None
    assert not cache.store(ids(20, 5000), "huge", 1001)  # larger than the whole bound: not kept, nothing evicted
    assert len(cache) == 3 and cache.bytes <= 1000


def test_record_counts_hits_and_tokens():
    cache = PrefixCache(1000)
    cache.record(50, 0)
    cache.record(60, 40)
    stats = cache.stats
    assert (stats.lookups, stats.hits, stats.prompt_tokens, stats.cached_tokens) == (2, 1, 110, 40)


# --- the batcher -------------------------------------------------------------------------------------------


def chat_prompt(engine, *turns: str) -> str:
    """The chat template's prompt for a system message and alternating user / assistant turns."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return engine.chat_ids(messages)[0]


def serve_in_order(scheduler, engine, prompts_and_specs, *, together: bool = False):
    """Each (prompt, spec) through `scheduler`, one after another (or all submitted at once): their Results."""
    sinks = []
    for prompt, spec in prompts_and_specs:
        request, sink = scheduler_request(engine, prompt, spec)
        scheduler.submit(request)
        sinks.append(sink)
        if not together:
            run_steps(scheduler)
    run_steps(scheduler)
    assert all(isinstance(sink.final, Finished) for sink in sinks)
    return [sink.final.result for sink in sinks]


def conversation(engine, scheduler, spec, turns: int = 3):
    """A chat whose every request is the last one's prompt and reply plus a new question: (prompt, Result) each."""
    said: list[str] = []
    record = []
    for question in ["hello world", "The quick brown fox?", "Once upon a time", "Tell me about the sea."][:turns]:
        said.append(question)
        prompt = chat_prompt(engine, *said)
        [result] = serve_in_order(scheduler, engine, [(prompt, spec)])
        record.append((prompt, result))
        said.append(result.text)
    return record


@pytest.mark.parametrize("spec", [SEEDED, PENALIZED, GREEDY_TWO], ids=["seeded", "penalty", "two-sequences"])
def test_a_conversation_through_the_batcher_reuses_its_history_and_gives_the_same_tokens(tiny_engine, spec):
    cache = PrefixCache(64 * 2**20)
    record = conversation(tiny_engine, BatchScheduler(tiny_engine, prefix_cache=cache), spec)
    for turn, (prompt, result) in enumerate(record):
        [expected] = serve_in_order(BatchScheduler(tiny_engine), tiny_engine, [(prompt, spec)])
        assert completions(result) == completions(expected), turn
        if turn:  # at least the previous prompt; the rest of its reply unless it tokenizes apart in the template
            assert record[turn - 1][1].usage.prompt_tokens <= result.usage.cached_tokens < result.usage.prompt_tokens
    assert record[0][1].usage.cached_tokens == 0
    assert cache.stats.hits == len(record) - 1 and cache.stats.lookups == len(record)


def test_requests_arriving_together_and_joining_a_running_batch_reuse_a_shared_system_prompt(tiny_engine):
    questions = ["hello world", "Tell me about the sea.", "Once upon a time", "The quick brown fox?"]
    jobs = [(chat_prompt(tiny_engine, q), SEEDED) for q in questions]
    expected = serve_in_order(BatchScheduler(tiny_engine), tiny_engine, jobs, together=True)

    cache = PrefixCache(64 * 2**20)
    scheduler = BatchScheduler(tiny_engine, prefix_cache=cache)
    first, sink = scheduler_request(tiny_engine, *jobs[0])
    scheduler.submit(first)
    scheduler.step()  # its prompt is prefilled and stored; it keeps generating
    assert scheduler.running_rows == 1 and len(cache) == 1
    rest = []
    for job in jobs[1:]:
        request, other = scheduler_request(tiny_engine, *job)
        scheduler.submit(request)
        rest.append(other)
    run_steps(scheduler)
    results = [sink.final.result] + [other.final.result for other in rest]
    for result, reference in zip(results, expected):
        assert completions(result) == completions(reference)
    # The three newcomers are prefilled together: as wide as the longest remainder, each row reusing the rest.
    first_ids = tuple(tiny_engine.prompt_ids(jobs[0][0]))
    shared = [common_prefix(first_ids, tuple(tiny_engine.prompt_ids(prompt))) for prompt, _ in jobs[1:]]
    assert min(shared) >= MIN_PREFIX_TOKENS
    computed = max(r.usage.prompt_tokens - n for r, n in zip(results[1:], shared))
    assert [r.usage.cached_tokens for r in results[1:]] == [r.usage.prompt_tokens - computed for r in results[1:]]
    assert max(r.usage.cached_tokens for r in results[1:]) in shared
    assert cache.stats.hits == 3 and cache.stats.lookups == 4


def test_a_burst_sharing_a_system_prompt_computes_it_once(tiny_engine):
    """Requests that arrive together with nothing cached: the first computes the shared prefix, the others reuse it
    in a second pass of the same step, which also decodes the first ones."""
    jobs = [(chat_prompt(tiny_engine, q), SEEDED) for q in ("hello world", "Tell me about the sea.", "Once upon")]
    jobs.append((chat_prompt(tiny_engine, "hi") + " and more", SEEDED))
    jobs.append(("A prompt that shares nothing with the others, long enough to be cached", SEEDED))
    expected = serve_in_order(BatchScheduler(tiny_engine), tiny_engine, jobs, together=True)
    cache = PrefixCache(64 * 2**20)
    steps: list[tuple[str, int]] = []
    scheduler = BatchScheduler(
        tiny_engine, prefix_cache=cache, on_step=lambda kind, rows, _s: steps.append((kind, rows))
    )
    results = serve_in_order(scheduler, tiny_engine, jobs, together=True)
    for result, reference in zip(results, expected):
        assert completions(result) == completions(reference)
    assert [r.usage.cached_tokens > 0 for r in results] == [False, True, True, True, False]
    # the leaders, then the followers in one pass with the leaders' first decode step (2 + 3 rows)
    assert steps[:2] == [("prefill", 2), ("mixed", 5)]


def test_mixed_remainders_in_one_prefill_stay_exact(tiny_engine):
    """Hits with remainders of different lengths share one forward pass: the shorter ones compute part of their
    prefix again (no holes in a row), and each request reports what it actually reused."""
    long_question = "The quick brown fox jumps over the lazy dog. " * 3
    jobs = [(chat_prompt(tiny_engine, q), SEEDED) for q in ("hi", long_question)]
    expected = serve_in_order(BatchScheduler(tiny_engine), tiny_engine, jobs, together=True)
    cache = PrefixCache(64 * 2**20)
    scheduler = BatchScheduler(tiny_engine, prefix_cache=cache)
    serve_in_order(scheduler, tiny_engine, [(chat_prompt(tiny_engine, "warm up"), dict(max_new_tokens=1))])
    results = serve_in_order(scheduler, tiny_engine, jobs, together=True)
    for result, reference in zip(results, expected):
        assert completions(result) == completions(reference)
    short, long = results
    shared = common_prefix(tuple(tiny_engine.prompt_ids(jobs[0][0])), tuple(tiny_engine.prompt_ids(jobs[1][0])))
    assert long.usage.cached_tokens == shared  # the longest remainder is computed whole
    computed = long.usage.prompt_tokens - shared
    assert short.usage.cached_tokens == short.usage.prompt_tokens - computed > 0  # the same width computed


def test_a_cache_too_small_to_hold_a_prompt_changes_nothing(tiny_engine):
    cache = PrefixCache(1024)  # smaller than one prompt's KV
    record = conversation(tiny_engine, BatchScheduler(tiny_engine, prefix_cache=cache), SEEDED, turns=2)
    assert [result.usage.cached_tokens for _, result in record] == [0, 0]
    assert len(cache) == 0 and cache.bytes == 0


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A tiny Gemma 3: one sliding-window layer (8 tokens) and one full one, so prompts are longer than the window."""
    folder = build_tiny_model(tmp_path_factory.mktemp("gemma") / "tiny-gemma", sliding_window=8)
    return load_engine(str(folder), device="cpu")


def test_sliding_window_layers_stay_exact_with_a_cached_prefix(tiny_gemma):
    assert tiny_gemma.model.config.sliding_window == 8
    cache = PrefixCache(64 * 2**20)
    record = conversation(tiny_gemma, BatchScheduler(tiny_gemma, prefix_cache=cache), SEEDED)
    for _prompt, result in record[1:]:
        assert result.usage.cached_tokens > 8
    for prompt, result in record:
        [expected] = serve_in_order(BatchScheduler(tiny_gemma), tiny_gemma, [(prompt, SEEDED)])
        assert completions(result) == completions(expected)
        alone = tiny_gemma.generate(prompt, result_params(SEEDED))
        assert completions(result) == completions(alone)


def test_a_sliding_window_session_stays_exact(tiny_gemma):
    """engine.session() crops a full-length cache (TransformersSession): exact past the window too."""
    from llmkit.engine.base import Session
    from llmkit.params import parse_params

    session = tiny_gemma.session()
    messages = [{"role": "system", "content": SYSTEM}]
    for question in ("hello world", "Once upon a time"):
        messages.append({"role": "user", "content": question})
        generation = session.stream(list(messages), parse_params(SEEDED))
        for _ in generation:
            pass
        expected = Session(tiny_gemma).stream(list(messages), parse_params(SEEDED))
        for _ in expected:
            pass
        assert generation.result.completions[0].token_ids == expected.result.completions[0].token_ids
        messages.append({"role": "assistant", "content": generation.result.text})
    assert generation.result.usage.cached_tokens > 8


def result_params(spec):
    from llmkit.params import parse_params

    return parse_params(spec)


# --- the llama.cpp batcher ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_engine(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from tests.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "chat.gguf", chat_template=CHAT_TEMPLATE)
    return load_engine(str(path), engine="llama.cpp")


def test_the_llamacpp_batcher_restores_a_saved_prompt_state_in_another_sequence(gguf_engine):
    assert gguf_engine.info.capabilities.prefix_states
    cache = PrefixCache(64 * 2**20)
    scheduler = gguf_engine.scheduler(prefix_cache=cache)
    first = conversation(gguf_engine, scheduler, SEEDED, turns=2)
    # Other requests run in between, in other sequences; the first conversation's next turn comes from the cache.
    others = [(chat_prompt(gguf_engine, f"Something else entirely, number {i}"), SEEDED) for i in range(3)]
    serve_in_order(scheduler, gguf_engine, others, together=True)
    said = ["hello world", first[0][1].text, "The quick brown fox?", first[1][1].text, "Tell me about the sea."]
    prompt = chat_prompt(gguf_engine, *said)
    [result, alongside] = serve_in_order(scheduler, gguf_engine, [(prompt, SEEDED), others[0]], together=True)
    assert result.usage.cached_tokens >= first[1][1].usage.prompt_tokens
    # Its own prompt, stored before: all of it but the last two tokens, which are evaluated together (same_batches).
    assert alongside.usage.cached_tokens == alongside.usage.prompt_tokens - 2
    plain = gguf_engine.scheduler()
    for prompt_i, got in [*first, (prompt, result), (others[0][0], alongside)]:
        [expected] = serve_in_order(plain, gguf_engine, [(prompt_i, SEEDED)])
        assert completions(got) == completions(expected)
    assert cache.stats.hits >= 2 and len(cache) >= 2
    # Prompts only: a reply's tokens were computed one at a time, by llama.cpp's one-token kernel, and reusing
    # them could change the next turn's text on quantized weights.
    asked = [*(p for p, _ in first), *(p for p, _ in others), prompt]
    assert {entry.ids for entry in cache._entries.values()} <= {tuple(gguf_engine.prompt_ids(p)) for p in asked}


def test_the_llamacpp_batcher_without_a_cache_reuses_nothing(gguf_engine):
    record = conversation(gguf_engine, gguf_engine.scheduler(), SEEDED, turns=2)
    assert [result.usage.cached_tokens for _, result in record] == [0, 0]


# --- over HTTP -----------------------------------------------------------------------------------------------


def chat_body(history: list[dict[str, str]], **extra) -> dict:
    return {"messages": history, "max_tokens": 8, "seed": 3, "temperature": 1.0, **extra}


def chat_twice(client) -> tuple[dict, dict]:
    """Two turns of one conversation through /v1/chat/completions: the second's body."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello world"}]
    first = client.post("/v1/chat/completions", json=chat_body(history))
    assert first.status_code == 200, first.text
    history += [first.json()["choices"][0]["message"], {"role": "user", "content": "and then?"}]
    second = client.post("/v1/chat/completions", json=chat_body(history))
    assert second.status_code == 200, second.text
    return first.json(), second.json()


def test_cached_tokens_reach_the_usage_metrics_and_health(tiny_engine):
    from llmkit.server.settings import ServerSettings
    from tests.server_helpers import app_client

    with app_client(tiny_engine, ServerSettings(prefix_cache_mb=16)) as client:
        first, second = chat_twice(client)
        health = client.get("/health").json()
        metrics = client.get("/metrics").text
        streamed = client.post(
            "/v1/completions",
            json={
                "prompt": SYSTEM + " Once upon",
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] <= cached < second["usage"]["prompt_tokens"]
    assert second["timings"]["cache_n"] == cached
    assert health["prefix_cache"]["entries"] >= 1 and health["prefix_cache"]["capacity_mb"] == 16
    assert 0 < health["prefix_cache"]["token_hit_rate"] < 1
    assert "llmkit_prefix_cache_hits_total 1.0" in metrics
    assert f"llmkit_prefix_cache_cached_tokens_total {float(cached)}" in metrics
    assert "llmkit_prefix_cache_capacity_bytes 1.6777216e+07" in metrics
    events = [line for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert '"prompt_tokens_details"' in events[-1]


def test_the_cache_turned_off_gives_the_same_text_and_reports_no_reuse(tiny_engine):
    from llmkit.server.settings import ServerSettings
    from tests.server_helpers import app_client

    with app_client(tiny_engine, ServerSettings(prefix_cache_mb=16)) as client:
        cached = chat_twice(client)
    with app_client(tiny_engine, ServerSettings(prefix_cache_mb=0)) as client:
        plain = chat_twice(client)
        health = client.get("/health").json()
        metrics = client.get("/metrics").text
    for on, off in zip(cached, plain):
        assert on["choices"] == off["choices"]
    assert plain[1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert health["prefix_cache"] is None and "llmkit_prefix_cache" not in metrics


def test_a_negative_prefix_cache_size_is_refused(cli):
    result = cli("serve", "--prefix-cache-mb", "-1")
    assert result.exit_code == 2 and "prefix-cache-mb must be at least 0" in result.output


def test_same_batches_keeps_the_last_token_in_company_as_a_whole_prompt_would():
    from llmkit.engine.llamacpp import same_batches

    assert same_batches(185, 186, 512) == 184  # a whole prompt of 186 ends in a batch of 186, not one of 1
    assert same_batches(184, 186, 512) == 184
    assert same_batches(0, 10, 512) == 0
    assert same_batches(512, 513, 512) == 512  # a whole prompt of 513 ends with a lone token: so may this
    assert same_batches(100, 513, 512) == 0
    assert same_batches(600, 1025, 512) == 512


def test_a_reused_prefix_gives_the_seeded_tokens_of_a_whole_prompt_on_the_shipped_gguf():
    """The shipped SmolLM2 GGUF (Q4_1): with its last prompt token computed alone, the 20th token at temperature 1
    came out differently; computed with the one before it, every token is the same."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import time

    from llmkit.params import parse_params

    engine = load_engine("smollm2-135m", engine="llama.cpp")
    prompt = "You are a helpful assistant. " * 30 + "Tell me about the sea."
    ids = engine.prompt_ids(prompt)
    params = parse_params(dict(seed=3, temperature=1.0, max_new_tokens=24))

    def tokens(cached: int) -> tuple[int, ...]:
        decode = engine._decode(prompt, ids, params, 3, time.perf_counter(), cached=cached)
        while True:
            try:
                next(decode)
            except StopIteration as done:
                return done.value.completions[0].token_ids

    whole = tokens(0)
    assert tokens(len(ids) - 1) == whole
    assert tokens(len(ids) // 2) == whole
