"""Log-probabilities, echo, several prompts per body, /tokenize and /detokenize (issue 14, part 2).

The engine's decode loops (single sequence, batched, llama.cpp's) against the engine's own `token_logprobs`
(what compare's perplexity and explore's log p read), the release rule of SequenceState, then a real
`llmkit serve` process on the tiny model: the OpenAI shapes, streaming, lm-evaluation-harness's loglikelihood
request (echo + logprobs, token-id prompts, max_tokens 0 and 1), the `openai` client, and the tokenizer routes.
"""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from llmkit.engine.batch import BatchScheduler
from llmkit.engine.scheduling import Finished, PromptLogprobs
from llmkit.engine.sequence import SequenceState
from llmkit.params import parse_params
from tests.server_helpers import ServerProcess, run_steps, scheduler_request, sse_events

PROMPT = "Once upon a time"
TOLERANCE = 1e-4  # a cached decode step and a full forward pass differ in float32 rounding only


def _decode(engine, prompt: str, spec: dict, logprobs: int | None):
    """(the Chunks, the Result) of the engine's own decode loop, with logprobs asked or not."""
    from llmkit.engine.base import Generation
    from llmkit.engine.sequence import choose_seed

    params = parse_params(spec)
    ids = engine.prompt_ids(prompt)
    generation = Generation(engine._decode(prompt, ids, params, choose_seed(params), 0.0, logprobs=logprobs))
    chunks = list(generation)
    return ids, chunks, generation.result


def _check_raw(engine, ids, completion, top: int) -> None:
    """Each generated token's log p is the unmodified model's (token_logprobs over prompt + generated), its top
    alternatives are the model's most likely tokens, sorted, and the chosen token's own log p is among them or
    below the last."""
    reference = engine.token_logprobs([*ids, *completion.token_ids])[len(ids) - 1 :]
    assert [e.token for e in completion.logprobs] == list(completion.token_ids)
    for entry, expected in zip(completion.logprobs, reference):
        assert entry.logprob == pytest.approx(expected, abs=TOLERANCE)
        assert len(entry.top) == top
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True)
        if top:
            assert entry.logprob <= values[0] + TOLERANCE
            assert entry.token in dict(entry.top) or entry.logprob <= values[-1] + TOLERANCE


# --- the engines -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        dict(greedy=True, max_new_tokens=12),
        dict(seed=3, temperature=0.5, top_k=5, top_p=0.8, repetition_penalty=1.3, max_new_tokens=12),
    ],
    ids=["greedy", "sampled-with-every-transform"],
)
def test_decode_logprobs_are_the_raw_model_distribution(tiny_engine, spec):
    ids, chunks, result = _decode(tiny_engine, PROMPT, spec, logprobs=3)
    plain_ids, plain_chunks, plain = _decode(tiny_engine, PROMPT, spec, logprobs=None)
    completion = result.completions[0]
    assert (completion.text, completion.token_ids) == (plain.completions[0].text, plain.completions[0].token_ids)
    assert plain.completions[0].logprobs is None and all(not c.logprobs for c in plain_chunks)
    _check_raw(tiny_engine, ids, completion, top=3)
    if spec.get("greedy"):  # greedy takes the argmax of the raw distribution: the top alternative
        assert all(entry.top[0][0] == entry.token for entry in completion.logprobs)
    # every token is in exactly one chunk, in order, and the chunks add up to the Completion's record
    assert [e for c in chunks for e in c.logprobs] == list(completion.logprobs)


def test_score_tokens_is_token_logprobs_to_the_bit(tiny_engine):
    ids = tiny_engine.prompt_ids("The sea at night is dark and quiet, and the boats rest")
    scored = tiny_engine.score_tokens(ids, 5)
    assert [e.logprob for e in scored] == tiny_engine.token_logprobs(ids)
    assert [e.token for e in scored] == ids[1:] and all(len(e.top) == 5 for e in scored)
    full = torch.log_softmax(tiny_engine.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    best = full.topk(5, dim=-1)
    for position, entry in enumerate(scored):
        assert [t for t, _ in entry.top] == best.indices[position].tolist()
        assert [v for _, v in entry.top] == pytest.approx(best.values[position].tolist(), abs=1e-5)


def test_batched_logprobs_equal_alone_and_only_for_who_asked(tiny_engine):
    specs = [
        (PROMPT, dict(greedy=True, max_new_tokens=10), 2),
        ("Hello", dict(seed=4, temperature=1.0, num_sequences=2, max_new_tokens=9), None),
        ("The quick brown fox", dict(seed=5, temperature=0.8, max_new_tokens=8), 0),
    ]
    scheduler = BatchScheduler(tiny_engine)
    sinks = []
    for prompt, spec, logprobs in specs:
        request, sink = scheduler_request(tiny_engine, prompt, spec, logprobs=logprobs)
        scheduler.submit(request)
        sinks.append(sink)
    run_steps(scheduler)
    for (prompt, spec, logprobs), sink in zip(specs, sinks):
        assert isinstance(sink.final, Finished)
        ids, _, alone = _decode(tiny_engine, prompt, spec, logprobs)
        for batched, single in zip(sink.final.result.completions, alone.completions):
            assert (batched.text, batched.token_ids) == (single.text, single.token_ids)
            if logprobs is None:
                assert batched.logprobs is None
                continue
            _check_raw(tiny_engine, ids, batched, top=logprobs)
            for ours, theirs in zip(batched.logprobs, single.logprobs):
                assert ours.logprob == pytest.approx(theirs.logprob, abs=TOLERANCE)


def test_echo_scores_the_prompt_first_and_max_tokens_zero_generates_nothing(tiny_engine):
    scheduler = BatchScheduler(tiny_engine)
    only, only_sink = scheduler_request(
        tiny_engine, PROMPT, dict(greedy=True), logprobs=1, prompt_logprobs=1, prompt_only=True
    )
    both, both_sink = scheduler_request(tiny_engine, "Hello", dict(greedy=True, max_new_tokens=4), prompt_logprobs=0)
    scheduler.submit(only)
    scheduler.submit(both)
    run_steps(scheduler)
    scored = only_sink.chunks[0]
    assert isinstance(scored, PromptLogprobs) and len(only_sink.chunks) == 1
    assert [e.logprob for e in scored.entries] == tiny_engine.token_logprobs(tiny_engine.prompt_ids(PROMPT))
    result = only_sink.final.result
    assert result.usage.completion_tokens == 0 and result.completions[0].text == ""
    assert isinstance(both_sink.chunks[0], PromptLogprobs)  # before any Chunk
    assert both_sink.final.result.usage.completion_tokens == 4


def test_a_token_s_log_p_leaves_with_the_text_it_shows(tiny_engine):
    """Held back by the detokenizer (half a character) or the stop matcher: out with its text; a stop string's
    tokens and end of sequence: out with the last chunk. Every token exactly once."""
    tokenizer = tiny_engine.tokenizer
    text = "ab \u65e5\u672c stop and more"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    params = parse_params(max_new_tokens=len(ids) + 1, stop=["stop"])
    state = SequenceState.start(0, tokenizer, [], params, logprobs=True)
    shown, released = "", []
    for position, token in enumerate(ids):
        chunk = state.advance(token, tiny_engine.eos_ids, (-float(position), ()))
        if chunk is None:
            continue
        for entry in chunk.logprobs:
            assert entry.offset <= len(shown + chunk.text)  # its text starts at or before what this chunk shows
            if entry.offset < len(shown + chunk.text):
                assert entry.offset >= len(shown)  # ... and not in an earlier chunk
        shown += chunk.text
        released.extend(chunk.logprobs)
        if chunk.finish_reason:
            break
    assert shown == "ab \u65e5\u672c " and state.finish_reason == "stop"
    assert [e.token for e in released] == state.token_ids == ids[: len(state.token_ids)]
    assert all(e.offset <= len(shown) for e in released)


def test_llama_cpp_batcher_logprobs_and_echo(tmp_path):
    pytest.importorskip("llama_cpp")
    from llmkit.engine import load_engine
    from tests.tiny_gguf import write_tiny_gguf

    llama = load_engine(str(write_tiny_gguf(tmp_path / "tiny.gguf")), engine="llama.cpp")
    assert llama.info.capabilities.decode_logprobs
    scheduler = llama.scheduler()
    spec = dict(seed=2, temperature=0.9, max_new_tokens=8)
    request, sink = scheduler_request(llama, "hello world", spec, logprobs=2, prompt_logprobs=2)
    only, only_sink = scheduler_request(llama, "hello", dict(greedy=True), prompt_logprobs=0, prompt_only=True)
    scheduler.submit(request)
    scheduler.submit(only)
    run_steps(scheduler)
    ids = llama.prompt_ids("hello world")
    assert isinstance(sink.chunks[0], PromptLogprobs)
    assert [e.logprob for e in sink.chunks[0].entries] == llama.token_logprobs(ids)
    completion = sink.final.result.completions[0]
    assert completion.text == llama.generate("hello world", parse_params(spec)).text
    _check_raw(llama, ids, completion, top=2)
    assert only_sink.final.result.usage.completion_tokens == 0
    assert [e.logprob for e in only_sink.chunks[0].entries] == llama.token_logprobs(llama.prompt_ids("hello"))


# --- the server --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("serve-logprobs") / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def _post(http, path: str, body: dict) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_with_max_tokens_zero_is_token_logprobs_exactly(http, tiny_engine):
    """lm-evaluation-harness's loglikelihood: the prompt's log p, nothing generated, the first token null."""
    body = _post(http, "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0})
    choice = body["choices"][0]
    ids = tiny_engine.prompt_ids(PROMPT)
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == tiny_engine.token_logprobs(ids)  # to the bit, through JSON
    assert len(logprobs["tokens"]) == len(ids) and "".join(logprobs["tokens"]) == PROMPT
    assert [PROMPT[o:] for o in logprobs["text_offset"]] == [
        PROMPT[len("".join(logprobs["tokens"][:i])) :] for i in range(len(ids))
    ]
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    scored = zip(logprobs["top_logprobs"][1:], logprobs["tokens"][1:], logprobs["token_logprobs"][1:])
    for top, token, value in scored:
        assert top[token] == value and 1 <= len(top) <= 2  # the most likely token, and the prompt's own


def test_lm_eval_harness_request_shape(http, tiny_engine):
    """local-completions sends token ids, echo, logprobs 1, max_tokens 1, temperature 0 and reads
    token_logprobs[ctxlen:-1] and whether each was the top token."""
    context, continuation = tiny_engine.prompt_ids("The sea at night"), tiny_engine.prompt_ids(" is dark")[1:]
    ids = context + continuation
    body = _post(
        http,
        "/v1/completions",
        {"prompt": [ids, ids[:3]], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234},
    )
    first = sorted(body["choices"], key=lambda c: c["index"])[0]["logprobs"]
    assert len(first["token_logprobs"]) == len(ids) + 1
    scored = first["token_logprobs"][len(context) : -1]
    assert scored == tiny_engine.token_logprobs(ids)[len(context) - 1 :]
    greedy = [value == max(top.values()) for value, top in zip(scored, first["top_logprobs"][len(context) : -1])]
    assert len(greedy) == len(continuation)
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_a_list_of_prompts_is_batched_and_indexed_as_openai_does(http):
    prompts = ["Once upon", "The sea", "Hello"]
    spec = {"max_tokens": 6, "n": 2, "seed": 9, "temperature": 1.0}
    body = _post(http, "/v1/completions", {"prompt": prompts, **spec})
    assert [c["index"] for c in body["choices"]] == list(range(6))
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i, prompt in enumerate(prompts):
        alone = _post(http, "/v1/completions", {"prompt": prompt, **spec})
        assert [c["text"] for c in body["choices"][2 * i : 2 * i + 2]] == [c["text"] for c in alone["choices"]]
        usage = {k: usage[k] + alone["usage"][k] for k in usage}
    assert {k: body["usage"][k] for k in usage} == usage  # each prompt once, every choice's tokens
    assert body["timings"]["prompt_n"] == usage["prompt_tokens"]


def test_streamed_logprobs_add_up_to_the_answer(http):
    body = {"prompt": ["Once upon a time", "Hello"], "max_tokens": 10, "seed": 3, "logprobs": 2, "echo": True}
    whole = _post(http, "/v1/completions", body)
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    merged: dict[int, dict[str, list]] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            into = merged.setdefault(choice["index"], {k: [] for k in choice["logprobs"]})
            for key, values in choice["logprobs"].items():
                into[key].extend(values)
    for choice in whole["choices"]:
        assert texts[choice["index"]] == choice["text"]
        streamed = merged[choice["index"]]
        assert streamed["tokens"] == choice["logprobs"]["tokens"]
        assert streamed["text_offset"] == choice["logprobs"]["text_offset"]  # offsets in the whole text
        assert streamed["token_logprobs"] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=TOLERANCE)


def test_logprobs_do_not_change_the_text(http):
    body = {"prompt": PROMPT, "max_tokens": 16, "seed": 11, "temperature": 0.9, "top_k": 20}
    plain = _post(http, "/v1/completions", body)["choices"][0]
    scored = _post(http, "/v1/completions", {**body, "logprobs": 5})["choices"][0]
    assert plain["text"] == scored["text"] and plain["logprobs"] is None
    assert len(scored["logprobs"]["tokens"]) == _post(http, "/v1/completions", body)["usage"]["completion_tokens"]


def test_chat_logprobs_streamed_or_not(http):
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "seed": 5,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = _post(http, "/v1/chat/completions", body)["choices"][0]
    content = whole["logprobs"]["content"]
    assert whole["logprobs"]["refusal"] is None and content
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 3
        assert all(set(top) == {"token", "logprob", "bytes"} for top in entry["top_logprobs"])
        if not entry["token"].startswith("bytes:"):
            assert bytes(entry["bytes"]).decode("utf-8") == entry["token"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = list(sse_events(response))
    streamed = [e for event in events[:-1] for c in event["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert all(c["logprobs"] is None for c in events[0]["choices"])  # the role chunk carries no token
    plain = _post(http, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})["choices"][0]
    assert plain["logprobs"] is None and plain["message"] == whole["message"]


def test_the_openai_client_parses_them(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=2, echo=True, seed=1)
    logprobs = completion.choices[0].logprobs
    assert completion.choices[0].text.startswith(PROMPT)
    assert logprobs.token_logprobs[0] is None and all(math.isfinite(v) for v in logprobs.token_logprobs[1:])
    assert len(logprobs.tokens) == len(logprobs.text_offset) == completion.usage.total_tokens
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=2, seed=1
    )
    tokens = chat.choices[0].logprobs.content
    assert len(tokens) == chat.usage.completion_tokens and len(tokens[0].top_logprobs) == 2
    batch = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2, seed=1)
    assert sorted(c.index for c in batch.choices) == [0, 1]


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be between 0 and 20 (got 21)"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs", "logprobs must be an integer"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be between 1 and 4096"),
        ("/v1/completions", {"prompt": []}, "prompt", "prompt must not be empty"),
        ("/v1/completions", {"prompt": ["a", 1]}, "prompt", "prompt must be a string or a list"),
        ("/v1/completions", {"prompt": [[1, 99999]]}, "prompt", "token ids must be between 0 and"),
        ("/v1/completions", {"prompt": ["x"] * 33}, "prompt", "prompt takes at most 32 prompts"),
        ("/v1/completions", {"prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens", "max_tokens must be"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
            "logprobs",
            "logprobs must be true or false",
        ),
        ("/tokenize", {"content": "a", "prompt": "b"}, "prompt", "give one of content, prompt or messages"),
        ("/detokenize", {"tokens": [-1]}, "tokens", "token ids must be between 0 and"),
    ],
)
def test_bad_fields_are_400s_naming_them(http, path, body, param, message):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    named = error["param"] if isinstance(error, dict) else response.json()["field"]
    text = error["message"] if isinstance(error, dict) else error
    assert named == param and message in text


def test_tokenize_and_detokenize_in_both_shapes(http, tiny_engine):
    text = "Hello world, caf\u00e9"
    plain = tiny_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    special = tiny_engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    llama_server = _post(http, "/tokenize", {"content": text})  # llama-server: no special tokens by default
    assert llama_server["tokens"] == plain and llama_server["count"] == len(plain)
    vllm = _post(http, "/v1/tokenize", {"prompt": text, "return_token_strs": True})  # vLLM: with them
    assert vllm["tokens"] == special and vllm["max_model_len"] == 256 and len(vllm["token_strs"]) == len(special)
    assert _post(http, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"] == plain
    pieces = _post(http, "/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == plain
    assert "".join(p["piece"] for p in pieces if isinstance(p["piece"], str)) in text
    chat = _post(http, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat["tokens"] == tiny_engine.chat_ids([{"role": "user", "content": "hi"}])[1]
    for path in ("/detokenize", "/v1/detokenize"):
        assert _post(http, path, {"tokens": plain}) == {"content": text, "prompt": text}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["model_max_length"] == 256 and info["chat_template"]


def test_the_spec_documents_the_new_fields(http):
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0]["maximum"] == 20
    max_tokens = schemas["CompletionRequest"]["properties"]["max_tokens"]
    assert max_tokens["anyOf"][0]["minimum"] == 0 and "echo" in max_tokens["description"]
    assert schemas["ChatRequest"]["properties"]["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert "CompletionLogprobs" in schemas and "ChatLogprobs" in schemas
    assert {"/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize", "/tokenizer_info"} <= set(spec["paths"])


def test_the_tokenizer_routes_answer_as_their_spec_says(server):
    """A short schemathesis run over the routes tests/test_server_schema.py does not list."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

    schema = schemathesis.openapi.from_dict(httpx.get(server.url + "/openapi.json", timeout=10).json())
    operations = {r.ok().label: r.ok() for r in schema.get_all_operations()}
    for label in ("POST /tokenize", "POST /detokenize", "GET /tokenizer_info"):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=15, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
            )
            @given(case=operations[label].as_strategy(generation_mode=mode))
            def run(case):
                case.call_and_validate(
                    base_url=server.url,
                    checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
                    timeout=30,
                )

            if not (mode is GenerationMode.NEGATIVE and label.startswith("GET")):
                run()
    assert "Traceback" not in server.log()


def test_a_request_whose_logprobs_fail_fails_alone(tiny_engine, monkeypatch):
    import llmkit.engine.rows as rows

    def broken(*args, **kwargs):
        raise RuntimeError("poisoned log-softmax")

    monkeypatch.setattr(rows, "raw_logprobs", broken)
    scheduler = BatchScheduler(tiny_engine)
    asked, asked_sink = scheduler_request(tiny_engine, PROMPT, dict(greedy=True, max_new_tokens=6), logprobs=1)
    other, other_sink = scheduler_request(tiny_engine, "Hello", dict(greedy=True, max_new_tokens=6))
    scheduler.submit(asked)
    scheduler.submit(other)
    run_steps(scheduler)
    assert not isinstance(asked_sink.final, Finished) and scheduler.failures.requests == 1
    reference = tiny_engine.generate("Hello", parse_params(greedy=True, max_new_tokens=6))
    assert other_sink.final.result.completions[0].text == reference.text
