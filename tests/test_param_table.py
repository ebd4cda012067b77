"""The parameter table (llmkit/params.py) is the one place a generation parameter is declared.

A copy of GenerationParams with one more sampling knob, `frobnicate` (named `frob` in the OpenAI bodies,
`frob_level` or `frobnicate` in /generate's, `--frobnicate` / `--frob` / `-F` on the command line), is built
here and never registered anywhere: each test checks that the knob reaches one entry point through the
same derivation the real parameters go through. The real table is checked against the real entry points
too, and every bad field is reported, on the command line and over HTTP.
"""

from __future__ import annotations

import inspect
import json
from typing import Annotated, Any

import pytest
import typer
from pydantic import Field, ValidationError, create_model
from typer.testing import CliRunner

from llmkit.cli import options
from llmkit.errors import InvalidParams
from llmkit.params import (
    PARAM_NAMES,
    SAMPLING_KNOBS,
    GenerationParams,
    Name,
    Param,
    body_names,
    cli_flags,
    names_of,
    neutral_values,
    param_table,
    parse_params,
    sampling_key,
)
from tests.server_helpers import app_client

FROB = Param(
    "sampling",
    cli_aliases=("--frob",),
    short="-F",
    openai="frob",
    extension=True,
    generate=(Name("frob_level", "(/generate's name for frobnicate)"), "frobnicate"),
    neutral=0.0,
)
Frobbed = create_model(
    "Frobbed",
    __base__=GenerationParams,
    frobnicate=(Annotated[float, FROB], Field(1.5, ge=0.0, le=5.0, description="How hard to frob the logits.")),
)


def test_the_copy_has_the_knob_and_the_real_table_does_not():
    assert list(Frobbed.model_fields)[-1] == "frobnicate" and "frobnicate" not in PARAM_NAMES
    assert param_table(Frobbed)["frobnicate"] is FROB
    assert names_of("sampling", Frobbed) == (*SAMPLING_KNOBS, "frobnicate")


def test_every_field_must_declare_its_row():
    bare = create_model("Bare", __base__=GenerationParams, bare=(float, Field(1.0, description="No Param.")))
    with pytest.raises(TypeError, match="Bare.bare needs exactly one Param"):
        param_table(bare)
    clash = create_model(
        "Clash", __base__=GenerationParams, twin=(Annotated[float, Param("sampling", openai="temperature")], Field(1.0))
    )
    with pytest.raises(TypeError, match="'temperature' is claimed by temperature and twin"):
        param_table(clash)


# --- the CLI ------------------------------------------------------------------------------------------


def _generation_app(model: type[GenerationParams]) -> tuple[typer.Typer, list[dict[str, Any]]]:
    """A one-command Typer app with the generation options of `model`; the command records what it got."""
    seen: list[dict[str, Any]] = []
    app = typer.Typer()

    @app.command()
    @options.generation_options("generation", model=model)
    def run(*, generation: dict[str, Any], quiet: bool = False) -> None:
        seen.append(generation)

    return app, seen


def test_the_knob_becomes_an_option_whose_value_reaches_the_params():
    app, seen = _generation_app(Frobbed)
    runner = CliRunner()
    result = runner.invoke(app, ["--frobnicate", "2.5", "--temperature", "0.3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    values = seen[-1]
    assert values["frobnicate"] == 2.5 and values["temperature"] == 0.3 and values["top_k"] is None
    params = Frobbed.from_values(values)
    assert isinstance(params, Frobbed) and params.frobnicate == 2.5 and params.top_k == 50
    for flag in ("--frob", "-F"):
        assert runner.invoke(app, [flag, "4"], catch_exceptions=False).exit_code == 0
        assert seen[-1]["frobnicate"] == 4.0
    assert runner.invoke(app, [], catch_exceptions=False).exit_code == 0
    options_of_the_table = [name for name in Frobbed.model_fields if name != "constraint"]  # constraint_options' own
    assert seen[-1] == {name: None for name in options_of_the_table}  # nothing typed: nothing overrides

    help_text = runner.invoke(app, ["--help"], catch_exceptions=False, env={"COLUMNS": "200"}).output
    assert "--frobnicate,--frob" in help_text and "-F" in help_text
    assert "How hard to frob the logits. (between 0.0 and 5.0; default 1.5)" in help_text


def test_a_bad_knob_value_fails_like_every_other():
    app, seen = _generation_app(Frobbed)
    CliRunner().invoke(app, ["--frobnicate", "9", "--top-k", "-1"], catch_exceptions=False)
    with pytest.raises(InvalidParams) as caught:
        Frobbed.from_values(seen[-1])
    assert caught.value.errors == [
        ("top_k", "top_k must be between 0 and 100000 (got -1)"),
        ("frobnicate", "frobnicate must be between 0.0 and 5.0 (got 9.0)"),
    ]


def test_generate_and_next_token_take_their_options_from_the_real_table(cli):
    from llmkit.cli.explore import next_token
    from llmkit.cli.generate import generate
    from llmkit.explore import NEXT_TOKEN_KNOBS

    table_options = [name for name in PARAM_NAMES if param_table()[name].kind != "constraint"]
    assert set(table_options) <= set(inspect.signature(generate).parameters)
    assert "generation" not in inspect.signature(generate).parameters
    assert {"json_schema", "json_object", "regex", "choice", "grammar"} <= set(inspect.signature(generate).parameters)
    assert set(NEXT_TOKEN_KNOBS) <= set(inspect.signature(next_token).parameters)
    assert set(NEXT_TOKEN_KNOBS) <= set(SAMPLING_KNOBS)  # each is a stage of sampling.next_token_probs
    help_text = cli("generate", "--help").stdout
    for name in table_options:
        assert ",".join(cli_flags(name)) in help_text, name
    for name, spec in param_table().items():
        assert options.OTHER_NAMES.get(name, ()) == spec.cli_aliases


def test_generate_hands_a_new_knob_on_to_validation(monkeypatch, tmp_path):
    """generate's own code, given the copy's options: the knob's value travels from the flag to validation."""
    from llmkit.cli import generate as generate_cmd
    from llmkit.cli import wrap_errors

    monkeypatch.setattr(generate_cmd, "parse_params", Frobbed.from_values)
    app = typer.Typer()
    with_frob = options.generation_options("generation", model=Frobbed)
    app.command()(wrap_errors(options.load_options("load")(with_frob(inspect.unwrap(generate_cmd.generate)))))
    result = CliRunner().invoke(app, ["-m", str(tmp_path / "none.gguf"), "--frob", "9", "-t", "3", "hi"])
    assert result.exit_code == 2
    assert (
        "temperature must be between 0.0 and 2.0 (got 3.0); frobnicate must be between 0.0 and 5.0 (got 9.0)"
        in result.stderr
    )


def test_a_command_cannot_own_a_parameter_named_like_an_option():
    def clash(*, generation: dict, seed: int = 0) -> None: ...

    with pytest.raises(TypeError, match="clashes: seed"):
        options.generation_options("generation")(clash)


# --- the HTTP bodies --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bodies():
    from llmkit.server.schemas import request_models

    return request_models(Frobbed)


OPENAI_BODIES = [("completions", {"prompt": "x"}), ("chat", {"messages": [{"role": "user", "content": "x"}]})]


@pytest.mark.parametrize(("api", "base"), OPENAI_BODIES)
def test_the_knob_is_in_the_openai_bodies_under_its_openai_name(bodies, api, base):
    model = getattr(bodies, api)
    schema = model.model_json_schema()["properties"]["frob"]
    assert schema["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 5.0}
    assert schema["description"] == "How hard to frob the logits. (llmkit extension)"
    assert "frobnicate" not in model.model_fields
    params = model.model_validate({**base, "frob": 3.0, "max_tokens": 7}).to_params()
    assert isinstance(params, Frobbed) and params.frobnicate == 3.0 and params.max_new_tokens == 7
    with pytest.raises(ValidationError):  # the body keeps the bounds, so /openapi.json shows them
        model.model_validate({**base, "frob": 9.0})
    assert model.PARAMS is Frobbed


def test_the_knob_is_in_the_generate_body_under_both_its_names(bodies):
    model = bodies.generate
    properties = model.model_json_schema()["properties"]
    assert properties["frob_level"]["description"] == "How hard to frob the logits. (/generate's name for frobnicate)"
    assert properties["frobnicate"]["description"] == "How hard to frob the logits."
    assert model.model_validate({"prompt": "x", "frob_level": 2.0}).to_params().frobnicate == 2.0
    assert model.model_validate({"prompt": "x", "frobnicate": 0.5}).to_params().frobnicate == 0.5
    with pytest.raises(InvalidParams, match="give frob_level or frobnicate, not both") as caught:
        model.model_validate({"prompt": "x", "frob_level": 2.0, "frobnicate": 0.5}).to_params()
    assert caught.value.field == "frob_level"


def test_errors_about_the_knob_name_what_the_client_sent(bodies):
    from llmkit.server.schemas import param_fields, param_sentence

    assert param_fields(Frobbed)["frob"] == param_fields(Frobbed)["frob_level"] == "frobnicate"
    # a bad value the body's own validation catches (the server's 400 for a RequestValidationError)
    assert param_sentence("frob", 9, Frobbed) == "frob must be between 0.0 and 5.0 (got 9)"
    assert param_sentence("frob_level", -1, Frobbed) == "frob_level must be between 0.0 and 5.0 (got -1)"
    # a value only GenerationParams refuses (model_construct skips the body's checks), with another bad field
    body = bodies.completions.model_construct(prompt="x", frob=9.0, n=0)
    with pytest.raises(InvalidParams) as caught:
        body.to_params()
    assert caught.value.errors == [
        ("n", "n must be between 1 and 16 (got 0)"),  # in the table's field order
        ("frob", "frob must be between 0.0 and 5.0 (got 9.0)"),
    ]
    assert caught.value.field == "n"


def test_the_real_bodies_are_built_from_the_real_table():
    from llmkit.server.schemas import PARAM_FIELDS, ChatRequest, CompletionRequest, GenerateRequest

    for model, api in ((CompletionRequest, "completions"), (ChatRequest, "chat"), (GenerateRequest, "generate")):
        names = {name.name for names in body_names(api).values() for name in names}
        assert names <= set(model.model_fields), api
        assert model.PARAMS is GenerationParams
    assert {"max_tokens", "n", "max_completion_tokens", "max_length"} <= set(PARAM_FIELDS)
    assert "greedy" not in CompletionRequest.model_fields and "greedy" in GenerateRequest.model_fields
    assert "max_completion_tokens" not in CompletionRequest.model_fields


# --- explore and the batch key ----------------------------------------------------------------------


def test_the_knob_is_a_grid_name_and_starts_from_its_neutral_value():
    from llmkit.explore import GRID_NAMES, PLAIN_SAMPLING, RESERVED, grid_names

    assert grid_names(Frobbed) == (*GRID_NAMES, "frobnicate")
    assert neutral_values(Frobbed) == {**PLAIN_SAMPLING, "frobnicate": 0.0}
    assert set(RESERVED) == set(names_of("draws"))  # --param refuses exactly what explore sets itself
    assert not set(GRID_NAMES) & set(RESERVED)
    assert PLAIN_SAMPLING == {
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "typical_p": 1.0,
        "top_n_sigma": 0.0,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "greedy": False,
    }


def test_two_params_that_differ_only_in_the_knob_are_not_sampled_together():
    from llmkit.engine.rows import _sampling_key

    soft, hard = Frobbed(frobnicate=0.5, seed=1), Frobbed(frobnicate=2.0, seed=1)
    assert _sampling_key(soft) != _sampling_key(hard)
    assert _sampling_key(soft) == _sampling_key(Frobbed(frobnicate=0.5, seed=2))
    # greedy decoding ignores temperature and the filters, not a knob that says nothing about it
    assert _sampling_key(Frobbed(greedy=True, frobnicate=0.5)) != _sampling_key(Frobbed(greedy=True, frobnicate=2.0))
    assert _sampling_key(Frobbed(greedy=True, top_k=3)) == _sampling_key(Frobbed(temperature=0.0, top_k=7))


@pytest.mark.parametrize(
    ("name", "value"),
    [("temperature", 1.3), ("top_k", 7), ("top_p", 0.5), ("min_p", 0.2), ("repetition_penalty", 1.2), ("greedy", True)],
)
def test_every_real_sampling_knob_is_in_the_batch_key(name, value):
    from llmkit.engine.rows import _sampling_key

    assert _sampling_key(parse_params({name: value})) != _sampling_key(parse_params({}))


@pytest.mark.parametrize(
    ("name", "value"), [("seed", 5), ("num_sequences", 3), ("max_new_tokens", 9), ("stop", ["\n"])]
)
def test_draws_and_stops_are_not_in_the_batch_key(name, value):
    assert sampling_key(parse_params({name: value})) == sampling_key(parse_params({}))


# --- every bad field, on the command line and over HTTP ---------------------------------------------


def test_the_cli_names_every_bad_field_in_one_line_and_exits_2(cli, tmp_path):
    result = cli(
        "generate",
        "-m",
        str(tmp_path / "no-such-model.gguf"),
        "--temperature",
        "5",
        "--top-k",
        "-1",
        "--max-new-tokens",
        "0",
        "hi",
    )
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    for sentence in (
        "max_new_tokens must be between 1 and 4096 (got 0)",
        "temperature must be between 0.0 and 2.0 (got 5.0)",
        "top_k must be between 0 and 100000 (got -1)",
    ):
        assert sentence in result.stderr


@pytest.fixture(scope="module")
def client(tiny_engine):
    with app_client(tiny_engine) as test_client:
        yield test_client


CHAT = {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        # refused by the body's own types and bounds (FastAPI's validation)
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": 0, "temperature": 5, "top_k": -1},
            [
                ("max_tokens", "max_tokens must be between 1 and 4096 (got 0)"),
                ("temperature", "temperature must be between 0.0 and 2.0 (got 5)"),
                ("top_k", "top_k must be between 0 and 100000 (got -1)"),
            ],
        ),
        # in the body's field order: its own fields (prompt, stream...), then the generation parameters
        (
            "/v1/chat/completions",
            {**CHAT, "max_completion_tokens": 0, "stream": "yes"},
            [
                ("stream", "stream must be true or false (got 'yes')"),
                ("max_completion_tokens", "max_completion_tokens must be between 1 and 4096 (got 0)"),
            ],
        ),
        (
            "/v1/completions",
            {"temperature": "hot"},
            [
                ("prompt", "missing required parameter 'prompt'"),
                ("temperature", "temperature must be a number (got 'hot')"),
            ],
        ),
        # accepted by the body, refused by to_params (unsupported fields, then GenerationParams' rules)
        (
            "/v1/completions",
            {"prompt": "x", "suffix": "!", "best_of": 2, "n": 2, "temperature": 0},
            [
                ("suffix", "suffix is not supported by llmkit serve; leave it out"),
                ("best_of", "best_of is not supported by llmkit serve; leave it out"),
                (
                    "n",
                    "n must be 1 with greedy decoding, which gives identical sequences; sample (temperature > 0) "
                    "for several",
                ),
            ],
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_tokens": 3, "max_completion_tokens": 4, "stop": [""]},
            [
                ("max_tokens", "give max_tokens or max_completion_tokens, not both"),
                ("stop", "stop sequences must not be empty strings"),
            ],
        ),
    ],
)
def test_openai_400s_list_every_bad_field(client, path, body, expected):
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "errors"}
    assert error["param"] == expected[0][0] and error["type"] == "invalid_request_error"
    assert error["message"] == "; ".join(message for _, message in expected)
    assert error["errors"] == [{"param": field, "message": message} for field, message in expected]


def test_generate_400s_list_every_bad_field_in_its_own_shape(client):
    response = client.post("/generate", json={"prompt": "x", "max_length": 0, "temperature": 5, "greedy": "yes"})
    assert response.status_code == 400
    expected = [
        ("max_length", "max_length must be between 1 and 4096 (got 0)"),
        ("temperature", "temperature must be between 0.0 and 2.0 (got 5)"),
        ("greedy", "greedy must be true or false (got 'yes')"),
    ]
    assert response.json() == {
        "error": "; ".join(m for _, m in expected),
        "field": "max_length",
        "type": "invalid_request_error",
        "errors": [{"field": field, "message": message} for field, message in expected],
    }
    consistent = client.post(
        "/generate",
        json={"prompt": "x", "greedy": True, "num_sequences": 2, "stop": [""], "max_length": 3, "max_new_tokens": 3},
    )
    assert consistent.status_code == 400
    assert [e["field"] for e in consistent.json()["errors"]] == ["max_length", "stop", "num_sequences"]


def test_one_bad_field_keeps_the_single_error_shape(client):
    response = client.post("/v1/completions", json={"prompt": "x", "temperature": 5})
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = client.post(
        "/generate", content=json.dumps({"prompt": "x", "max_length": 0}), headers={"content-type": "application/json"}
    )
    assert set(response.json()) == {"error", "field", "type"}
