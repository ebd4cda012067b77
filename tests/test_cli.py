"""The CLI as users type it: CliRunner in-process, and real subprocesses where imports or timing matter."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

PROMPT = "Once upon a time"


def test_generate_prompt_argument_streams_text_and_times_on_stderr(cli, tiny_model_dir):
    result = cli("generate", "-m", str(tiny_model_dir), "--greedy", "--max-new-tokens", "8", PROMPT)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert "prompt tok" not in result.stdout
    assert "prompt tok" in result.stderr and "TTFT" in result.stderr and "tok/s decode" in result.stderr


def test_stdin_and_dash_read_the_prompt(cli, tiny_model_dir):
    base = ["generate", "-m", str(tiny_model_dir), "--greedy", "--max-new-tokens", "6", "--json"]
    from_arg = json.loads(cli(*base, PROMPT).stdout)
    from_stdin = json.loads(cli(*base, input=PROMPT + "\n").stdout)
    from_dash = json.loads(cli(*base, "-", input=PROMPT).stdout)
    assert from_arg["prompt"] == from_stdin["prompt"] == from_dash["prompt"] == PROMPT
    assert from_arg["completions"] == from_stdin["completions"] == from_dash["completions"]


def test_json_schema(cli, tiny_model_dir):
    result = cli(
        "generate", "-m", str(tiny_model_dir), "--seed", "5", "-n", "2", "--max-new-tokens", "6", "--json", PROMPT
    )
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert set(record) == {"model", "prompt", "completions", "usage", "timings", "seed", "params", "engine"}
    assert record["engine"]["engine"] == "transformers" and record["engine"]["dtype"] == "float32"
    assert record["engine"]["choices"]["dtype"] == "float32 (LLMKIT_DTYPE=float32)"
    assert [c["index"] for c in record["completions"]] == [0, 1]
    assert set(record["completions"][0]) == {"index", "text", "finish_reason", "generated_tokens"}
    assert record["usage"]["completion_tokens"] == sum(c["generated_tokens"] for c in record["completions"])
    assert record["usage"]["total_tokens"] == record["usage"]["prompt_tokens"] + record["usage"]["completion_tokens"]
    assert set(record["timings"]) == {"ttft_s", "total_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert record["seed"] == 5 and record["params"]["num_sequences"] == 2


def test_seed_reproduces_through_the_cli(cli, tiny_model_dir):
    args = [
        "generate",
        "-m",
        str(tiny_model_dir),
        "--seed",
        "11",
        "--temperature",
        "1.3",
        "--max-new-tokens",
        "12",
        "--no-stream",
        PROMPT,
    ]
    assert cli(*args).stdout == cli(*args).stdout


def test_num_sequences_prints_each(cli, tiny_model_dir):
    result = cli("generate", "-m", str(tiny_model_dir), "--seed", "1", "-n", "3", "--max-new-tokens", "4", PROMPT)
    assert result.exit_code == 0
    assert [line for line in result.stdout.splitlines() if line.startswith("--- sequence")] == [
        f"--- sequence {i} of 3 ---" for i in (1, 2, 3)
    ]


def test_stop_and_chat(cli, tiny_model_dir):
    free = json.loads(
        cli(
            "generate",
            "-m",
            str(tiny_model_dir),
            "--greedy",
            "--max-new-tokens",
            "20",
            "--json",
            "--chat",
            "--system",
            "be brief",
            "hello",
        ).stdout
    )
    text = free["completions"][0]["text"]
    stop = text[2:4]
    cut = json.loads(
        cli(
            "generate",
            "-m",
            str(tiny_model_dir),
            "--greedy",
            "--max-new-tokens",
            "20",
            "--json",
            "--chat",
            "--system",
            "be brief",
            "--stop",
            stop,
            "hello",
        ).stdout
    )
    assert cut["completions"][0]["text"] == text[: text.find(stop)]
    assert cut["completions"][0]["finish_reason"] == "stop"


def test_chat_without_template_exits_2(cli, tiny_model_no_chat_dir):
    result = cli("generate", "-m", str(tiny_model_no_chat_dir), "--chat", "hi")
    assert result.exit_code == 2
    assert "has no chat template" in result.stderr


def test_input_file_runs_every_prompt_once_loaded(cli, tiny_model_dir, tmp_path):
    lines = [
        {"prompt": "hello", "id": "a"},
        {"prompt": "world", "greedy": False, "temperature": 1.5, "seed": 2, "id": "b"},
        {"prompt": "x" * 2000, "id": "too-long"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    result = cli("generate", "-m", str(tiny_model_dir), "--max-new-tokens", "5", "--greedy", "--input-file", str(path))
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "too-long"]
    assert records[0]["params"]["greedy"] is True
    assert records[1]["params"]["temperature"] == 1.5 and records[1]["seed"] == 2
    assert "exceeds the model's context" in records[2]["error"]
    assert result.exit_code == 1  # one prompt failed; the others were still written


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": "bad", "temperature": 9}\n', "line 2: temperature must be between 0.0 and 2.0"),
        ('{"prompt": "ok"}\nnot json\n', "line 2: not valid JSON"),
        ('{"text": "no prompt"}\n', "line 1: needs a JSON object"),
        ('{"prompt": "ok", "colour": 1}\n', "line 1: unknown key(s) colour"),
        ("\n", "holds no prompts"),
        ('{"prompt": "ok"}\n{"prompt": "a\\ud800b"}\n', "line 2: the prompt is not valid Unicode at character 1"),
        ('{"prompt": "ok", "stop": ["\\udfff"]}\n', "line 1: a stop sequence is not valid Unicode"),
    ],
)
def test_bad_input_file_fails_before_loading(cli, tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    result = cli("generate", "-m", str(tmp_path / "no-such-model.gguf"), "--input-file", str(path))
    assert result.exit_code == 2
    assert message in result.stderr  # the bogus model was never reached


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "5"], "temperature must be between 0.0 and 2.0 (got 5.0)"),
        (["--stop", "x\udc80"], "a stop sequence is not valid Unicode"),
        (["--top-p", "1.5"], "top_p must be greater than 0.0 and at most 1.0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be between 1 and 4096"),
        (["--greedy", "-n", "2"], "num_sequences must be 1 with greedy"),
        (["--stop", ""], "stop sequences must not be empty"),
        (["--device", "gpu"], "device must be auto, cpu, cuda, cuda:N or mps"),
        (["--dtype", "int3"], "dtype must be one of"),
        (["--system", "x"], "--system needs --chat"),
    ],
)
def test_bad_parameters_exit_2_before_loading(cli, tmp_path, args, message):
    result = cli("generate", "-m", str(tmp_path / "no-such-model.gguf"), *args, "hi")
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_prompts_that_are_not_unicode_text_exit_2_before_loading(tmp_path):
    """Bytes that are not UTF-8, in an argument or on stdin, reach Python as lone surrogates: one line, exit 2."""
    missing = str(tmp_path / "no-such-model.gguf")
    argument = subprocess.run(
        [sys.executable, "-m", "llmkit", "generate", "-m", missing, "x\udc80y"],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=60,
    )
    piped = subprocess.run(
        [sys.executable, "-m", "llmkit", "generate", "-m", missing],
        input=b"ab\xff\xfe",
        capture_output=True,
        timeout=60,
    )
    assert argument.returncode == 2 and "the prompt is not valid Unicode at character 1" in argument.stderr
    assert piped.returncode == 2 and b"the prompt is not valid Unicode at character 2" in piped.stderr


def test_empty_prompt_and_unknown_model(cli, tmp_path):
    assert cli("generate", "-m", "gemma3-270m", "   ").exit_code == 2
    result = cli("generate", "-m", str(tmp_path / "missing.gguf"), "hi")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_models_lists_aliases(cli):
    result = cli("models", "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    names = [a["name"] for a in document["aliases"]]
    assert names == ["gemma3-270m", "smollm2-135m"]
    gemma = document["aliases"][0]
    assert gemma["installed"] is True  # a normal dependency of llmkit
    table = cli("models")
    assert "gemma3-270m" in table.stdout and "smollm2-135m" in table.stdout


def run_llmkit(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "llmkit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_and_argument_errors_do_not_import_torch():
    probe = (
        "import sys\nfrom llmkit.cli import app\n"
        "for argv in (['--help'], ['generate', '--help'], ['generate', '--temperature', '9', 'x'],\n"
        "             ['monitor', '--help'], ['monitor', '--runs', '0']):\n"
        "    try:\n        app(argv, prog_name='llmkit')\n    except SystemExit:\n        pass\n"
        "print('TORCH' if 'torch' in sys.modules or 'transformers' in sys.modules else 'LIGHT')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "LIGHT"
    started = time.perf_counter()
    assert run_llmkit("--help").returncode == 0
    assert time.perf_counter() - started < 5  # typically ~0.2 s; generous for a loaded CI machine


def test_hub_id_without_network_is_one_line(tmp_path):
    # a closed local port stands in for an unreachable Hub, so this holds on any machine
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "LLMKIT_NO_PROGRESS": "1"}
    started = time.perf_counter()
    out = run_llmkit("generate", "-m", "gpt2", "hi", env=env)
    assert out.returncode == 1
    assert "cannot be reached" in out.stderr and "gemma3-270m" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - started < 30


def test_debug_shows_the_traceback(tmp_path):
    out = run_llmkit("--debug", "generate", "-m", str(tmp_path / "missing.gguf"), "hi")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_pipe_stays_clean(tiny_model_dir):
    out = run_llmkit(
        "generate",
        "-m",
        str(tiny_model_dir),
        "--greedy",
        "--max-new-tokens",
        "5",
        "--json",
        PROMPT,
        env={"LLMKIT_NO_PROGRESS": ""},
    )
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)  # nothing but the JSON line on stdout


def test_a_process_that_loaded_a_model_ends_with_its_code_and_all_its_output(tiny_model_dir):
    """main() skips the interpreter's teardown once torch is loaded (os._exit): the exit code, every byte of
    stdout, and a pipe closed early must come out as they would with a normal exit."""
    many = run_llmkit(
        "generate", "-m", str(tiny_model_dir), "--seed", "1", "-n", "4", "--max-new-tokens", "40", "--json", PROMPT
    )
    assert many.returncode == 0, many.stderr
    record = json.loads(many.stdout)
    assert len(record["completions"]) == 4
    too_long = run_llmkit("generate", "-m", str(tiny_model_dir), "--max-new-tokens", "5", "fox " * 600)
    assert too_long.returncode == 2 and "context" in too_long.stderr
    command = [sys.executable, "-m", "llmkit", "generate", "-m", str(tiny_model_dir), "--max-new-tokens", "60", PROMPT]
    head = subprocess.run(
        " ".join(map(shlex.quote, command)) + " | head -c 3",
        shell=True,
        capture_output=True,  # bytes: 3 bytes of sampled text may end inside a UTF-8 character
        timeout=60,
        env={**os.environ, "LLMKIT_NO_PROGRESS": "1"},
    )
    stderr = head.stderr.decode(errors="replace")
    assert len(head.stdout) <= 3 and "Exception ignored" not in stderr and "Traceback" not in stderr
