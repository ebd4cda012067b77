"""`llmkit chat` through a pipe (CliRunner with input) and through a pseudo-terminal, on the tiny model."""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time

import pytest

from llmkit.cli.chat import one_line
from llmkit.params import parse_params

GREEDY = ("--device", "cpu", "--greedy", "-q")


def reference(engine, messages, **values) -> str:
    """The reply computed from scratch (the base Session keeps nothing), as `generate` would."""
    from llmkit.engine.base import Session

    generation = Session(engine).stream(messages, parse_params({"greedy": True, **values}))
    for _ in generation:
        pass
    return generation.result.completions[0].text


def chat(cli, model, *lines: str, args=GREEDY):
    return cli("chat", "-m", str(model), *args, input="".join(line + "\n" for line in lines))


def test_pipe_replies_equal_engine_generation(cli, tiny_model_dir, tiny_engine):
    result = chat(cli, tiny_model_dir, "hello there", "how are you", args=(*GREEDY, "--max-new-tokens", "8"))
    assert result.exit_code == 0, result.output
    first = reference(tiny_engine, [{"role": "user", "content": "hello there"}], max_new_tokens=8)
    history = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "how are you"},
    ]
    second = reference(tiny_engine, history, max_new_tokens=8)
    assert result.stdout.splitlines() == [one_line(first), one_line(second)]
    assert ">>>" not in result.stdout and "\x1b[" not in result.stdout


def test_set_system_clear_exit(cli, tiny_model_dir, tiny_engine):
    result = chat(
        cli,
        tiny_model_dir,
        "/set temperature 3",
        "/set max_tokens 4",
        "/set nonsense 1",
        "/set",
        "/system Be brief.",
        "/system",
        "hi",
        "/clear",
        "hi",
        "/exit",
        "never sent",
    )
    assert result.exit_code == 1  # a command failed: a script sees it, the session went on
    assert result.stderr.count("temperature must be between 0.0 and 2.0 (got 3.0)") == 1
    assert "unknown parameter" in result.stderr
    assert "max_new_tokens = 4" in result.stderr
    assert "system: Be brief." in result.stderr
    expected = reference(
        tiny_engine, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], max_new_tokens=4
    )
    assert result.stdout.splitlines() == [one_line(expected)] * 2  # /clear: the second "hi" starts afresh


def test_save_then_load_round_trip(cli, tiny_model_dir, tiny_engine, tmp_path):
    path = tmp_path / "chat.json"
    saved = chat(cli, tiny_model_dir, "/set max_new_tokens 5", "/system Talk.", "hello", f"/save {path}")
    assert saved.exit_code == 0, saved.output
    record = json.loads(path.read_text())
    assert record["llmkit_chat"] == 1 and record["system"] == "Talk."
    assert record["params"]["max_new_tokens"] == 5 and record["params"]["greedy"] is True
    first = saved.stdout.splitlines()[0]
    assert record["messages"][0] == {"role": "user", "content": "hello"}
    assert one_line(record["messages"][1]["content"]) == first

    loaded = chat(cli, tiny_model_dir, f"/load {path}", "again", args=("--device", "cpu", "-q"))
    assert loaded.exit_code == 0, loaded.output
    history = [{"role": "system", "content": "Talk."}, *record["messages"], {"role": "user", "content": "again"}]
    assert loaded.stdout.splitlines() == [one_line(reference(tiny_engine, history, max_new_tokens=5))]

    (tmp_path / "bad.json").write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    bad = chat(cli, tiny_model_dir, f"/load {tmp_path / 'bad.json'}")
    assert bad.exit_code == 1 and "message 1 needs" in bad.stderr


def test_model_without_chat_template_exits_2(cli, tiny_model_no_chat_dir):
    result = chat(cli, tiny_model_no_chat_dir, "hi")
    assert result.exit_code == 2
    assert "has no chat template, which llmkit chat needs" in result.stderr
    assert "smollm2-135m" in result.stderr


def test_base_alias_refused_before_loading(cli):
    started = time.perf_counter()
    result = chat(cli, "gemma3-270m", "hi")
    assert result.exit_code == 2 and "no chat template" in result.stderr
    assert time.perf_counter() - started < 5


def test_bad_starting_value_exits_2(cli, tiny_model_dir):
    result = chat(cli, tiny_model_dir, "hi", args=("--num-sequences", "2"))
    assert result.exit_code == 2 and "num_sequences must be 1" in result.stderr


# --- a real terminal ---------------------------------------------------------------------------------


def read_until(fd: int, wanted: bytes, seen: bytearray, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {wanted!r}; got {bytes(seen)[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the terminal closed before {wanted!r}; got {bytes(seen)[-500:]!r}")
            seen.extend(chunk)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_interactive_session_in_a_pseudo_terminal(tiny_model_dir):
    import pty

    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    args = [sys.executable, "-m", "llmkit", "chat", "-m", str(tiny_model_dir), "--device", "cpu", "--greedy"]
    args += ["--max-new-tokens", "150", "--logit-bias", f"{eos}=-100"]  # a long reply, for Ctrl-C to stop
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its controlling terminal, so ^C is SIGINT
        os.environ.update(NO_COLOR="1", COLUMNS="120", LLMKIT_NO_PROGRESS="1")
        os.execv(sys.executable, args)
    seen = bytearray()
    try:
        read_until(fd, b">>> ", seen)
        assert b"/help" in seen  # the banner

        def send(line: bytes, *wanted: bytes) -> bytes:
            del seen[:]
            os.write(fd, line)
            for each in wanted:
                read_until(fd, each, seen)
            return bytes(seen)

        send(b"/set max_new_tokens 6\r", b"max_new_tokens = 6", b">>> ")
        send(b"one line \\\r", b"... ")  # a backslash continues the message
        send(b"and two\r", b"cached", b">>> ")  # the streamed reply, then the footer
        send(b"/set max_new_tokens 150\r", b">>> ")  # room left in the tiny model's 256-token context
        echoed = send(b"tell me more\r", b"tell me more\r\n")
        while len(seen) <= len(echoed) + 2:  # wait until a few characters of the reply are drawn
            assert select.select([fd], [], [], 30)[0], bytes(seen)
            seen.extend(os.read(fd, 64))
        send(b"\x03", b"stopped (Ctrl-C)", b">>> ")  # Ctrl-C during the reply: the session goes on
        shown = send(b"/stats\r", b"context used", b">>> ")
        assert re.search(rb"messages in history +4", shown), shown  # the stopped reply's part is kept
        os.write(fd, b"\x04")  # Ctrl-D leaves
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_a_long_conversation_gets_the_room_left_in_the_context(cli, tiny_model_dir):
    """The tiny model's context is 256 tokens: when a turn's history leaves less than max_new_tokens, the reply is
    cut at the context and says so, rather than refused; a history that fills the context is refused in one line
    and the session goes on."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    args = (*GREEDY, "--max-new-tokens", "90", "--logit-bias", f"{eos}=-100")
    result = chat(cli, tiny_model_dir, "hello there", "and again", args=args)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    assert "the reply was cut at the model's context of 256 tokens" in result.stderr
    args = (*GREEDY, "--max-new-tokens", "150", "--logit-bias", f"{eos}=-100")
    full = chat(cli, tiny_model_dir, "hello there", "and again", "/clear", "hi", args=args)
    assert full.exit_code == 1  # a turn failed (piped); the ones after it still ran
    assert "no longer fits the model's context of 256 tokens; /clear starts over" in full.stderr
    assert len(full.stdout.splitlines()) == 2
