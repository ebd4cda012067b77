"""Structured output (llmkit/engine/constrain.py): whatever a random model samples, a constrained output matches.

The tiny random model samples at temperature 1 with several seeds, so nothing but the mask keeps its output in
shape: every output that ends with "stop" must validate, and every one must end with "stop" (the schemas bound
their strings and arrays, so the budget is enough)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from llmkit.errors import InvalidParams
from llmkit.params import parse_params
from tests.server_helpers import app_client, completions, run_steps, scheduler_request

pytest.importorskip("llguidance", reason="llguidance is not installed (pip install -e '.[structured]')")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema checks the outputs (the test extra installs it)")

SEEDS = range(4)
BUDGET = 160  # new tokens: enough for every schema below to close, sampled at random

NAME = {"type": "string", "minLength": 1, "maxLength": 8}
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": NAME},
                "required": ["id", "name"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "bounded_number_and_pattern": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        },
        "required": ["score", "code"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "x": {"type": "integer", "minimum": -9, "maximum": 9},
            "label": NAME,
            "note": {"anyOf": [{"type": "null"}, NAME]},
        },
        "required": ["kind"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 5},
}


def json_schema(schema: dict) -> dict:
    return {"kind": "json_schema", "value": json.dumps(schema)}


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


# --- the engine: every output validates -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_output_validates(tiny_engine, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        params = parse_params(max_new_tokens=BUDGET, temperature=1.0, seed=seed, constraint=json_schema(schema))
        completion = tiny_engine.generate("Once upon a time", params).completions[0]
        assert completion.finish_reason == "stop", (seed, completion.text)
        assert_valid(completion.text, schema)


def test_any_json_object_and_several_sequences(tiny_engine):
    params = parse_params(
        max_new_tokens=BUDGET, temperature=1.0, top_k=20, seed=11, num_sequences=3, constraint={"kind": "json_object"}
    )
    result = tiny_engine.generate("Hello", params)
    assert len(result.completions) == 3
    for completion in result.completions:
        if completion.finish_reason == "stop":  # any object may nest without bound: only a finished one must parse
            assert isinstance(json.loads(completion.text), dict)
        else:
            assert completion.text.startswith("{")
    assert any(c.finish_reason == "stop" for c in result.completions)


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"kind": "regex", "value": r"[0-9]{3}-[a-z]{2,4}"}, re.compile(r"[0-9]{3}-[a-z]{2,4}").fullmatch),
        ({"kind": "choice", "value": ("yes", "no", "maybe so")}, lambda text: text in ("yes", "no", "maybe so")),
        (
            {"kind": "grammar", "value": 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'},
            re.compile(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)").fullmatch,
        ),
        ({"kind": "grammar", "value": 'root ::= "say " ("hi" | "bye") "!"'}, re.compile(r"say (hi|bye)!").fullmatch),
    ],
    ids=["regex", "choice", "lark", "gbnf"],
)
def test_regex_choice_and_grammars(tiny_engine, constraint, check):
    for seed in SEEDS:
        params = parse_params(max_new_tokens=60, temperature=1.0, seed=seed, constraint=constraint)
        completion = tiny_engine.generate("The sea", params).completions[0]
        assert completion.finish_reason == "stop" and check(completion.text), (seed, completion.text)


def test_greedy_and_streaming_agree(tiny_engine):
    params = parse_params(greedy=True, max_new_tokens=BUDGET, constraint=json_schema(SCHEMAS["nested"]))
    result = tiny_engine.generate("Hello", params)
    assert_valid(result.text, SCHEMAS["nested"])
    streamed = "".join(chunk.text for chunk in tiny_engine.stream("Hello", params))
    assert streamed == result.text


def test_the_overlapped_mask_gives_the_same_tokens(tiny_engine, monkeypatch):
    from llmkit.engine import constrain

    params = parse_params(max_new_tokens=BUDGET, temperature=1.0, seed=6, constraint=json_schema(SCHEMAS["flat"]))
    monkeypatch.setattr(constrain, "OVERLAP", False)
    after = tiny_engine.generate("Hello", params)
    monkeypatch.setattr(constrain, "OVERLAP", True)  # the next mask computed on a thread while the model runs
    overlapped = tiny_engine.generate("Hello", params)
    assert completions(overlapped) == completions(after)
    assert_valid(overlapped.text, SCHEMAS["flat"])


def test_without_a_constraint_nothing_changes(tiny_engine):
    params = parse_params(max_new_tokens=20, temperature=1.0, seed=3)
    assert params.constraint is None
    first = tiny_engine.generate("Hello", params)
    assert tiny_engine.generate("Hello", params).text == first.text


# --- validation before any load ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (json_schema({"type": "object", "if": {"type": "object"}, "then": {}}), ['"if"', "not supported"]),
        (json_schema({"type": "array", "uniqueItems": True}), ['"uniqueItems"']),
        ({"kind": "regex", "value": "[a-"}, ["regex", "unclosed"]),
        ({"kind": "grammar", "value": "start: missing"}, ["grammar", "missing"]),
    ],
)
def test_an_unsupported_feature_is_named(constraint, words):
    with pytest.raises(InvalidParams) as caught:
        parse_params(constraint=constraint)
    assert caught.value.field == "constraint"
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_a_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(InvalidParams, match=r"needs the llguidance library: pip install .*structured"):
        parse_params(constraint={"kind": "json_object"})


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_json_schema_from_a_file_and_inline(cli, tiny_model_dir, tmp_path):
    path = tmp_path / "person.json"
    path.write_text(json.dumps(SCHEMAS["flat"]))
    long_inline = json.dumps(SCHEMAS["nested"])  # longer than a file name may be
    assert len(long_inline) > 255
    for given, schema in ((str(path), SCHEMAS["flat"]), (long_inline, SCHEMAS["nested"])):
        out = cli(
            "generate", "-m", str(tiny_model_dir), "--seed", "2", "-t", "1", "--max-tokens", str(BUDGET), "-q",
            "--json-schema", given, "Hello",
        )  # fmt: skip
        assert out.exit_code == 0, out.output
        assert_valid(out.stdout.strip(), schema)


def test_cli_choice_regex_and_json_record(cli, tiny_model_dir):
    out = cli("generate", "-m", str(tiny_model_dir), "--seed", "1", "--choice", "yes,no", "--json", "Is it?")
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["completions"][0]["text"] in ("yes", "no")
    assert record["params"]["constraint"] == {"kind": "choice", "value": ["yes", "no"]}
    out = cli("generate", "-m", str(tiny_model_dir), "--seed", "1", "--regex", "[a-c]{4}", "-q", "Hi")
    assert re.fullmatch("[a-c]{4}", out.stdout.strip()), out.output


def test_cli_json_object_and_a_grammar_file(cli, tiny_model_dir, tmp_path):
    out = cli("generate", "-m", str(tiny_model_dir), "--seed", "4", "--json-object", "--max-tokens", "200", "-q", "Hi")
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("{")
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "answer: " [0-9] [0-9]?\n')
    out = cli("generate", "-m", str(tiny_model_dir), "--seed", "4", "--grammar", str(grammar), "-q", "Q?")
    assert re.fullmatch(r"answer: [0-9]{1,2}", out.stdout.strip()), out.output


def test_input_file_lines_take_their_own_constraint(cli, tiny_model_dir, tmp_path):
    lines = [
        {"prompt": "a", "constraint": {"kind": "choice", "value": ["left", "right"]}},
        {"prompt": "b"},  # the command line's --regex
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    out = cli("generate", "-m", str(tiny_model_dir), "--seed", "1", "--regex", "[0-9]{3}", "--input-file", str(path))
    assert out.exit_code == 0, out.output
    first, second = (json.loads(line)["completions"][0]["text"] for line in out.stdout.splitlines())
    assert first in ("left", "right") and re.fullmatch("[0-9]{3}", second)


def test_explore_next_token_shows_what_the_constraint_removed(cli, tiny_model_dir):
    out = cli(
        "explore", "next-token", "-m", str(tiny_model_dir), "--choice", "yes,no", "--temperature", "1", "--json", "Hi"
    )
    assert out.exit_code == 0, out.output
    view = json.loads(out.stdout)
    assert view["constraint"] == "choice"
    assert 0 < view["constraint_removed_tokens"] < view["vocab_size"]
    assert 0.0 <= view["constraint_removed_mass"] <= 1.0
    (setting,) = view["settings"]
    kept = [row for row in setting["rows"] if row["cut_by"] is None]
    assert kept and abs(sum(row["prob"] for row in kept) - 1.0) < 1e-4  # the choices' first tokens hold it all
    assert all(row["prob"] == 0.0 for row in setting["rows"] if row["cut_by"] == "constraint")
    shown = cli("explore", "next-token", "-m", str(tiny_model_dir), "--regex", "[0-9]+", "Hi")
    assert shown.exit_code == 0, shown.output
    assert "constraint regex: removed" in shown.stdout and "cut: constraint" in shown.stdout


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--json-schema", '{"type": "array", "uniqueItems": true}'], ["uniqueItems", "not supported"]),
        (["--json-schema", "{not json"], ["not valid JSON"]),
        (["--json-schema", "no-such-file.json"], ["--json-schema", "cannot read"]),
        (["--regex", "a", "--choice", "b"], ["give one constraint", "--regex and --choice"]),
        (["--choice", "a,,b"], ["--choice"]),
    ],
)
def test_cli_bad_constraint_is_exit_2_before_loading(cli, flags, words):
    out = cli("generate", "-m", "no-such-model-anywhere", *flags, "Hi")  # validation comes before the model
    assert out.exit_code == 2, out.output
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert all(word in out.stderr for word in words), out.stderr


def test_help_imports_neither_torch_nor_llguidance():
    import subprocess

    code = "import sys; from llmkit.cli import app; print('torch' in sys.modules, 'llguidance' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- the server's batches: a row's constraint travels with the row ----------------------------------------------


def test_batched_rows_with_different_constraints_and_one_without(tiny_engine):
    from llmkit.engine.batch import BatchScheduler

    specs = [
        dict(seed=1, temperature=1.0, max_new_tokens=BUDGET, constraint=json_schema(SCHEMAS["flat"])),
        dict(seed=2, temperature=1.0, max_new_tokens=30),  # unconstrained: the same text as alone
        dict(
            seed=3,
            temperature=1.0,
            max_new_tokens=40,
            num_sequences=2,
            constraint={"kind": "regex", "value": "[xyz]{5}"},
        ),
        dict(seed=4, temperature=1.0, max_new_tokens=BUDGET, constraint=json_schema(SCHEMAS["array_of_enums"])),
    ]
    scheduler = BatchScheduler(tiny_engine, max_batch_size=8)
    sinks = []
    for i, spec in enumerate(specs):
        request, sink = scheduler_request(tiny_engine, f"prompt number {i}", spec)
        scheduler.submit(request)
        sinks.append(sink)
    run_steps(scheduler)
    results = [sink.final.result for sink in sinks]
    assert_valid(results[0].text, SCHEMAS["flat"])
    alone = tiny_engine.generate("prompt number 1", parse_params(specs[1]))
    assert completions(results[1]) == completions(alone)
    assert all(re.fullmatch("[xyz]{5}", c.text) for c in results[2].completions)
    assert_valid(results[3].text, SCHEMAS["array_of_enums"])
    constrained_alone = tiny_engine.generate("prompt number 0", parse_params(specs[0]))
    assert completions(results[0]) == completions(constrained_alone)  # a seed means the same text alone or batched


# --- HTTP ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(tiny_engine):
    with app_client(tiny_engine) as client:
        yield client


CHAT = {"messages": [{"role": "user", "content": "Give me a person."}], "max_tokens": BUDGET, "temperature": 1.0}


def test_chat_response_format_json_schema(http):
    schema = SCHEMAS["nested"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    for seed in SEEDS:
        reply = http.post("/v1/chat/completions", json={**CHAT, "seed": seed, "response_format": fmt})
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert_valid(choice["message"]["content"], schema)


def test_completions_json_object_and_guided_fields(http):
    body = {"prompt": "Hello", "max_tokens": BUDGET, "seed": 5, "temperature": 1.0}
    reply = http.post("/v1/completions", json={**body, "response_format": {"type": "json_object"}})
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["text"]
    assert text.startswith("{")
    reply = http.post("/v1/completions", json={**body, "guided_choice": ["left", "right"]})
    assert reply.json()["choices"][0]["text"] in ("left", "right")
    reply = http.post("/v1/completions", json={**body, "guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", reply.json()["choices"][0]["text"])
    reply = http.post("/v1/completions", json={**body, "guided_json": SCHEMAS["flat"]})
    assert_valid(reply.json()["choices"][0]["text"], SCHEMAS["flat"])
    reply = http.post("/v1/chat/completions", json={**CHAT, "guided_grammar": 'root ::= "a" | "b"'})
    assert reply.json()["choices"][0]["message"]["content"] in ("a", "b")
    reply = http.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}, "max_tokens": 3})
    assert reply.status_code == 200, reply.text


def test_streaming_over_http_validates(http):
    from tests.server_helpers import sse_events

    schema = SCHEMAS["bounded_number_and_pattern"]
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    body = {**CHAT, "seed": 9, "stream": True, "response_format": fmt}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [event for event in sse_events(response) if event != "[DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])  # type: ignore[index]
    assert_valid(text, schema)
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}},
                }
            },
            "response_format",
            ['"if"', "not supported"],
        ),
        ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", ["uniqueItems"]),
        ({"response_format": {"type": "xml"}}, "response_format", ["json_object", "'xml'"]),
        ({"guided_regex": "[a-"}, "guided_regex", ["regex"]),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", ["give one of"]),
    ],
)
def test_unsupported_is_a_400_naming_the_field(http, extra, param, words):
    reply = http.post("/v1/chat/completions", json={**CHAT, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    assert all(word in error["message"] for word in words), error["message"]


# --- llama.cpp -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from llmkit.engine import load_engine
    from tests.tiny_gguf import write_tiny_gguf

    return load_engine(str(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")), engine="llama.cpp")


def test_llamacpp_engine_enforces_the_same_constraints(llama):
    schema = SCHEMAS["optional_fields"]
    for seed in SEEDS:
        params = parse_params(max_new_tokens=BUDGET, temperature=1.0, seed=seed, constraint=json_schema(schema))
        completion = llama.generate("hello world", params).completions[0]
        assert completion.finish_reason == "stop", (seed, completion.text)
        assert_valid(completion.text, schema)
    params = parse_params(
        max_new_tokens=30, temperature=1.0, seed=1, num_sequences=2, constraint={"kind": "regex", "value": "[a-e]{3}"}
    )
    assert all(re.fullmatch("[a-e]{3}", c.text) for c in llama.generate("hello", params).completions)


# --- the real default model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_fills_a_schema(tmp_path):
    import os

    from llmkit.engine import load_engine

    os.environ.pop("LLMKIT_MODEL", None)
    engine = load_engine(None)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }
    params = parse_params(max_new_tokens=80, greedy=True, constraint=json_schema(schema))
    result = engine.generate("Describe Paris as JSON:", params)
    assert result.completions[0].finish_reason == "stop"
    assert_valid(result.text, schema)
