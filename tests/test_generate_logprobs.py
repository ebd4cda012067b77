"""`llmkit generate --logprobs / --top-logprobs / --show-tokens` (issue 15, part 3) on the tiny model.

--json carries the numbers `llmkit serve` returns for the same request (checked against /v1/completions in
process); piped output is plain, a terminal gets colours and a legend; --show-tokens lines join back to the text;
bad values and engines without decode log-probs are one line and exit 2; llama.cpp gives the same view.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from tests.server_helpers import app_client

PROMPT = "Once upon a time"
TOLERANCE = 1e-4  # the server's batched decode step and the CLI's single-sequence one differ in float32 rounding
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_json(cli, *args: str) -> dict:
    result = cli("generate", *args, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def shown_tokens(stdout: str) -> list[list[tuple[int, str, float | None]]]:
    """The piped --show-tokens lines, per sequence: (id, text, log-prob or None)."""
    sequences: list[list[tuple[int, str, float | None]]] = [[]]
    for line in stdout.splitlines():
        if line.startswith("--- sequence "):
            if sequences[-1]:
                sequences.append([])
            continue
        fields = line.split("\t")
        assert len(fields) in (2, 3), line
        sequences[-1].append((int(fields[0]), json.loads(fields[1]), float(fields[2]) if len(fields) == 3 else None))
    return sequences


@pytest.fixture(scope="module")
def served(tiny_engine):
    """POST /v1/completions on an in-process llmkit serve app over the tiny model."""
    with app_client(tiny_engine) as client:

        def post(body: dict) -> dict:
            reply = client.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]

        yield post


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (["--greedy"], {"temperature": 0}),
        (
            ["--seed", "5", "--temperature", "0.8", "--top-k", "7", "--repetition-penalty", "1.2"],
            {"seed": 5, "temperature": 0.8, "top_k": 7, "repetition_penalty": 1.2},
        ),
    ],
    ids=["greedy", "sampled"],
)
def test_json_tokens_are_the_numbers_serve_returns(cli, tiny_model_dir, served, flags, body):
    record = run_json(cli, "-m", str(tiny_model_dir), *flags, "--max-new-tokens", "12", "--top-logprobs", "3", PROMPT)
    completion = record["completions"][0]
    tokens = completion["tokens"]
    choice = served({"prompt": PROMPT, "max_tokens": 12, "logprobs": 3, **body})
    expected = choice["logprobs"]
    assert completion["text"] == choice["text"]
    assert len(tokens) == completion["generated_tokens"] == record["usage"]["completion_tokens"]
    assert [t["token"] for t in tokens] == expected["tokens"]
    assert [t["offset"] for t in tokens] == expected["text_offset"]
    assert [t["logprob"] for t in tokens] == pytest.approx(expected["token_logprobs"], abs=TOLERANCE)
    for token, served_top in zip(tokens, expected["top_logprobs"]):
        assert len(token["top_logprobs"]) == 3
        mine = {alt["token"]: alt["logprob"] for alt in token["top_logprobs"]}
        mine.setdefault(token["token"], token["logprob"])  # the server's completions shape adds the chosen token
        assert mine.keys() == served_top.keys()
        assert list(mine.values()) == pytest.approx(list(served_top.values()), abs=TOLERANCE)
        assert bytes(token["bytes"]).decode("utf-8", "replace")  # every token carries its own bytes
        assert all(isinstance(alt["id"], int) for alt in token["top_logprobs"])


def test_logprobs_alone_is_the_chosen_token_only_and_piped_text_is_plain(cli, tiny_model_dir):
    args = ("-m", str(tiny_model_dir), "--greedy", "--max-new-tokens", "10", PROMPT)
    record = run_json(cli, "--logprobs", *args)
    tokens = record["completions"][0]["tokens"]
    assert tokens and all(t["top_logprobs"] == [] and t["logprob"] <= 0 for t in tokens)
    piped = cli("generate", "--logprobs", *args)
    assert piped.exit_code == 0, piped.stderr
    assert piped.stdout == record["completions"][0]["text"] + "\n"
    assert not ANSI.search(piped.stdout + piped.stderr) and "token probability" not in piped.stderr
    plain = run_json(cli, *args)
    assert "tokens" not in plain["completions"][0]  # nothing asked, nothing added to the schema


@pytest.fixture()
def terminal(monkeypatch):
    """stdout and stderr as colour terminals, whatever NO_COLOR says."""
    from rich.console import Console

    from llmkit.cli import render

    monkeypatch.setattr(render, "out", Console(force_terminal=True, no_color=False, color_system="256", width=120))
    monkeypatch.setattr(
        render, "err", Console(stderr=True, force_terminal=True, no_color=False, color_system="256", width=120)
    )


def test_a_terminal_gets_coloured_tokens_and_a_legend(cli, tiny_model_dir, terminal):
    args = ("-m", str(tiny_model_dir), "--greedy", "--max-new-tokens", "10", "-q", PROMPT)
    text = run_json(cli, *args)["completions"][0]["text"]
    coloured = cli("generate", "--logprobs", *args)
    assert coloured.exit_code == 0, coloured.stderr
    assert ANSI.search(coloured.stdout)
    assert ANSI.sub("", coloured.stdout) == PROMPT + text + "\n"  # the dimmed prompt, then the text, coloured
    assert "token probability" in ANSI.sub("", coloured.stderr) and ">= 80%" in ANSI.sub("", coloured.stderr)
    shaded = cli("generate", "--show-tokens", *args)
    assert shaded.exit_code == 0, shaded.stderr
    assert "48;5;" in shaded.stdout  # background shades mark the boundaries
    assert ANSI.sub("", shaded.stdout) == PROMPT + text + "\n"


@pytest.mark.parametrize(
    "flags",
    [
        ["--greedy"],
        ["--seed", "11", "--temperature", "1.5", "--num-sequences", "2", "--logprobs"],
        ["--seed", "3", "--chat", "--no-stream"],
    ],
    ids=["greedy", "two-sampled-sequences-with-logprobs", "chat"],
)
def test_show_tokens_lines_join_back_to_the_text(cli, tiny_model_dir, tiny_engine, flags):
    # The tiny corpus has 日本語 and an emoji: sampled at 1.5 the model often splits a character across tokens.
    prompt = "Café 日本語"
    args = ("-m", str(tiny_model_dir), *flags, "--max-new-tokens", "24", prompt)
    record = run_json(cli, *args)
    result = cli("generate", "--show-tokens", *args)
    assert result.exit_code == 0, result.stderr
    sequences = shown_tokens(result.stdout)
    assert len(sequences) == len(record["completions"])
    for lines, completion in zip(sequences, record["completions"]):
        assert "".join(text for _, text, _ in lines) == completion["text"]
        assert len(lines) == completion["generated_tokens"]
        assert all((value is None) == ("--logprobs" not in flags) for _, _, value in lines)
    prompt_ids = tiny_engine.prompt_ids(prompt, chat="--chat" in flags)
    assert f"prompt: {len(prompt_ids)} tokens: [{prompt_ids[0]}]" in result.stderr


def test_split_characters_are_named_by_their_bytes(tiny_engine):
    from llmkit.cli.generate import token_names

    names = token_names(tiny_engine)
    split = [t for t in tiny_engine.encode("日本語 \U0001f600", "prompt", add_special_tokens=False) if names.text(t)]
    partial = [names.text(t) for t in split if names.text(t).startswith("bytes:")]
    assert all(re.fullmatch(r"bytes:(\\x[0-9a-f]{2})+", piece) for piece in partial)
    assert b"".join(names.bytes_of(t) for t in split).decode("utf-8") == "日本語 \U0001f600"


def test_input_file_lines_carry_their_tokens(cli, tiny_model_dir, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "The sea", "id": "a"}\n{"prompt": "Hello", "id": "b", "seed": 2}\n')
    result = cli("generate", "-m", str(tiny_model_dir), "-f", str(jobs), "--top-logprobs", "2", "-q")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"]
    for line in lines:
        tokens = line["completions"][0]["tokens"]
        assert len(tokens) == line["usage"]["completion_tokens"]
        assert all(len(t["top_logprobs"]) == 2 for t in tokens)


@pytest.mark.parametrize("value", ["21", "-1"])
def test_bad_top_logprobs_is_one_line_before_loading(cli, value):
    result = cli("generate", "-m", "no/such-model", "--top-logprobs", value, PROMPT)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"--top-logprobs must be between 0 and 20 (got {value})" in result.stderr


@pytest.mark.parametrize("flag", ["--logprobs", "--show-tokens"])
def test_an_engine_without_decode_logprobs_refuses_in_one_line(cli, tiny_engine, monkeypatch, flag):
    """What `-m http://...` (engine/remote.py, capabilities.decode_logprobs False) answers."""
    import llmkit.cli.generate as generate

    info = tiny_engine.info
    monkeypatch.setattr(
        tiny_engine,
        "info",
        replace(info, engine="remote", capabilities=replace(info.capabilities, decode_logprobs=False)),
    )
    monkeypatch.setattr(generate, "load_model", lambda *args, **kwargs: tiny_engine)
    result = cli("generate", flag, PROMPT)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"{flag} needs each token's log-prob while generating, which the remote engine does not give" in (
        result.stderr
    )


def test_llama_cpp_gives_the_same_view(cli, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from llmkit.engine import load_engine
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    args = ("-m", str(gguf), "--engine", "llama.cpp", "--greedy", "--max-new-tokens", "8", "hello world")
    record = run_json(cli, "--top-logprobs", "2", *args)
    tokens = record["completions"][0]["tokens"]
    assert len(tokens) == record["usage"]["completion_tokens"] >= 1
    llama = load_engine(str(gguf), engine="llama.cpp")
    try:
        ids = llama.prompt_ids("hello world")
        reference = llama.token_logprobs([*ids, *(t["id"] for t in tokens)])[len(ids) - 1 :]
    finally:
        llama.close()
    assert [t["logprob"] for t in tokens] == pytest.approx(reference, abs=1e-3)
    assert all(t["top_logprobs"][0]["id"] == t["id"] for t in tokens)  # greedy takes the most likely token
    shown = cli("generate", "--show-tokens", "--logprobs", *args)
    assert shown.exit_code == 0, shown.stderr
    (lines,) = shown_tokens(shown.stdout)
    assert "".join(text for _, text, _ in lines) == record["completions"][0]["text"]
    assert [value for _, _, value in lines] == pytest.approx([t["logprob"] for t in tokens], abs=1e-6)
