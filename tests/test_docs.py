"""The documentation stays true to the code: links resolve, and documented command lines still parse.

Files checked: README.md, ARCHITECTURE.md and docs/*.md.

- Every relative link (`[text](path)`, `[text](path#anchor)`, `[text](#anchor)`) points at a file in the
  repository, and an anchor into a Markdown file names one of its headings, slugged as GitHub does it.
- Every `llmkit ...` command line in a fenced console/bash block parses against the real Typer app,
  in-process and without loading a model: Typer answers `llmkit <command path> --help` (so the command
  names exist), every option the line names is one that command accepts, and the command's own parser
  (click's make_context, which runs no command) takes the whole line: option values of the right type,
  the right number of arguments, flags without values.

Nothing here imports torch; the whole module runs in a few seconds.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = [*(p for p in (ROOT / "README.md", ROOT / "ARCHITECTURE.md") if p.is_file()), *sorted(DOCS.glob("*.md"))]

SHELL_LANGUAGES = {"console", "bash", "sh", "shell", "shell-session", "zsh"}
# Command lines that are documented on purpose but cannot be parsed as written (placeholders). Keep it short:
# every entry is a line the test would otherwise check. (path relative to the repository, the line's text)
SKIP: set[tuple[str, str]] = set()
# A group that runs a default command when its first argument is not a command name (cli/explore.py).
DEFAULT_SUBCOMMAND: dict[tuple[str, ...], str] = {("explore",): "sweep"}
HELP_OPTIONS = {"--help", "-h"}
# Every command should be documented by at least one real example.
DOCUMENTED_COMMANDS = {
    ("generate",),
    ("explore", "sweep"),
    ("explore", "next-token"),
    ("monitor",),
    ("compare",),
    ("serve",),
    ("models",),
    ("cache",),
}


# --- reading Markdown ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    language: str
    start: int  # line number of the first line inside the fence
    lines: tuple[str, ...]


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[Block]]:
    """(prose lines with their numbers, fenced blocks)."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    fence: str | None = None
    language, start, body = "", 0, list[str]()
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, language, start, body = match.group(1), match.group(2).lower(), number + 1, []
            else:
                prose.append((number, line))
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not match.group(2):
            blocks.append(Block(language, start, tuple(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"a code fence opened on line {start - 1} is never closed"
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose:
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def relative_links(path: Path) -> list[tuple[int, str]]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    links = []
    for number, line in prose:
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(1)
            if target and not SCHEME.match(target):
                links.append((number, target))
    return links


def link_problem(doc: Path, target: str) -> str | None:
    """Why `target`, a relative link in `doc`, does not resolve; None when it does."""
    location, _, anchor = target.partition("#")
    resolved = (doc.parent / location).resolve() if location else doc
    if not resolved.is_relative_to(ROOT):
        return f"{target}: outside the repository"
    if not resolved.exists():
        return f"{target}: no such file {resolved.relative_to(ROOT)}"
    if anchor:
        if resolved.suffix != ".md":
            return f"{target}: an anchor into a file that is not Markdown"
        if anchor not in anchors(resolved):
            return f"{target}: {resolved.relative_to(ROOT)} has no heading with the anchor #{anchor}"
    return None


# --- reading command lines ----------------------------------------------------------------------------


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """The commands of a shell block: `$ ` lines of a console block, every non-comment line of a script;
    a line ending in a backslash, or inside an open quote, goes on on the next, as in the shell."""
    commands: list[tuple[int, str]] = []
    pending: tuple[int, str, str] | None = None  # (first line, text so far, what joins the next line)
    for offset, line in enumerate(block.lines):
        number = block.start + offset
        if pending is not None:
            start, text = pending[0], pending[1] + pending[2] + line.strip()
        elif block.language == "console":
            if not line.startswith("$ "):
                continue
            start, text = number, line[2:].strip()
        else:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start, text = number, line.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip(), " ")
        elif not _quotes_closed(text):
            pending = (start, text, "\n")
        else:
            pending = None
            commands.append((start, text))
    assert pending is None, f"the command on line {pending[0]} never ends"
    return commands


def _quotes_closed(text: str) -> bool:
    try:
        shlex.split(text)
    except ValueError:  # "No closing quotation": the command goes on on the next line
        return False
    return True


SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def llmkit_invocations(command: str) -> list[list[str]]:
    """The argument lists of every `llmkit ...` (or `python -m llmkit ...`) in a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        words = _without_redirections(words)
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words[:1] == ["llmkit"]:
            found.append(words[1:])
        elif len(words) >= 3 and words[0] in ("python", "python3") and words[1:3] == ["-m", "llmkit"]:
            found.append(words[3:])
    return found


def _without_redirections(words: list[str]) -> list[str]:
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d*[<>]+&?", word):
            skip = True  # the redirection's target follows
        else:
            kept.append(word)
    return kept


@dataclass(frozen=True)
class Documented:
    doc: str  # path relative to the repository
    line: int
    text: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def documented_commands() -> list[Documented]:
    found = []
    for doc in DOC_FILES:
        _, blocks = split_markdown(doc.read_text(encoding="utf-8"))
        name = str(doc.relative_to(ROOT))
        for block in blocks:
            if block.language not in SHELL_LANGUAGES:
                continue
            for number, text in shell_lines(block):
                if (name, text) in SKIP:
                    continue
                for args in llmkit_invocations(text):
                    found.append(Documented(name, number, text, tuple(args)))
    return found


# --- checking them against the app --------------------------------------------------------------------


def _option_names(command) -> dict[str, bool]:
    """Every option spelling the command accepts -> whether it takes a value."""
    names: dict[str, bool] = dict.fromkeys(HELP_OPTIONS, False)
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        takes_value = not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        for name in (*param.opts, *param.secondary_opts):
            names[name] = takes_value
    return names


def resolve_command(root: Any, args: list[str]) -> tuple[tuple[str, ...], Any, list[str], list[str]]:
    """(command path, the command, the root's own options, the words after the command path).

    Raises ValueError with the reason when the words name no command."""
    root_names = _option_names(root)
    words = list(args)
    root_words: list[str] = []
    while words and words[0].startswith("-"):
        if words[0] not in root_names:
            raise ValueError(f"{words[0]} is not an option of llmkit itself (options go after the command)")
        root_words.append(words.pop(0))
    command, path = root, tuple[str, ...]()
    while hasattr(command, "commands"):
        if words and words[0] in command.commands:
            name = words.pop(0)
        elif path in DEFAULT_SUBCOMMAND:
            name = DEFAULT_SUBCOMMAND[path]
        else:
            raise ValueError(f"no command {words[0] if words else '(none)'!r} in llmkit {' '.join(path)}".rstrip())
        path, command = (*path, name), command.commands[name]
    return path, command, root_words, words


def unknown_options(command, words: list[str]) -> list[str]:
    """The option words in `words` that `command` does not accept (values of options are skipped)."""
    names = _option_names(command)
    unknown, position = [], 0
    while position < len(words):
        word = words[position]
        position += 1
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            continue
        name = word.split("=", 1)[0] if word.startswith("--") else word
        if name not in names:
            unknown.append(word)
        elif names[name] and "=" not in word:
            position += 1  # its value, whatever it looks like
    return unknown


@pytest.fixture(scope="module")
def root_command():
    import typer

    from llmkit.cli import app

    return typer.main.get_command(app)


@pytest.fixture(scope="module")
def help_exit_code():
    """`llmkit <path> --help` through Typer, once per command path: its exit code."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    runner, codes = CliRunner(), {}

    def run(path: tuple[str, ...]) -> int:
        if path not in codes:
            codes[path] = runner.invoke(app, [*path, "--help"]).exit_code
        return codes[path]

    return run


def problems_of(documented: Documented, root, help_exit_code) -> list[str]:
    """What is wrong with one documented command line; empty when it parses."""
    import typer

    try:
        path, command, root_words, words = resolve_command(root, list(documented.args))
    except ValueError as exc:
        return [str(exc)]
    problems = []
    if help_exit_code(path) != 0:
        problems.append(f"llmkit {' '.join(path)} --help exits {help_exit_code(path)}")
    unknown = unknown_options(command, words)
    if unknown:
        problems.append(f"llmkit {' '.join(path)} has no option {', '.join(unknown)}")
    if not unknown and not HELP_OPTIONS & {*words, *root_words}:
        try:
            command.make_context(path[-1], list(words))  # parses and converts; runs nothing
        except typer.TyperException as exc:  # click's UsageError and its kinds: the line does not parse
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            problems.append(f"llmkit {' '.join(path)} does not parse it: {message}")
    return problems


# --- the tests ----------------------------------------------------------------------------------------


def test_the_documentation_files_exist():
    for name in ("README.md", "ARCHITECTURE.md", "docs/README.md"):
        assert (ROOT / name).is_file(), f"{name} is missing"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    problems = [
        f"{doc.relative_to(ROOT)}:{number}: {problem}"
        for number, target in relative_links(doc)
        if (problem := link_problem(doc, target))
    ]
    assert not problems, "\n".join(problems)


def test_the_docs_index_links_every_page():
    index = DOCS / "README.md"
    linked = {(DOCS / target.partition("#")[0]).resolve() for _, target in relative_links(index)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {', '.join(missing)}"


def test_documented_command_lines_parse(root_command, help_exit_code):
    documented = documented_commands()
    problems = [
        f"{item}\n    {problem}" for item in documented for problem in problems_of(item, root_command, help_exit_code)
    ]
    assert not problems, "documented command lines that no longer parse:\n" + "\n".join(problems)


def test_every_command_has_a_documented_example(root_command):
    paths = set()
    for item in documented_commands():
        try:
            paths.add(resolve_command(root_command, list(item.args))[0])
        except ValueError:
            pass
    missing = sorted(" ".join(path) for path in DOCUMENTED_COMMANDS - paths)
    assert not missing, f"no console example of: {', '.join(missing)}"


@pytest.mark.parametrize(
    "line, expected",
    [
        ("llmkit generate --temprature 0.5 hi", "has no option --temprature"),
        ("llmkit genrate hi", "no command 'genrate'"),
        ("llmkit explore next-token --samples 3 hi", "has no option --samples"),
        ("llmkit monitor --runs many", "does not parse it"),
        ("llmkit generate --greedy true hi", "does not parse it"),
        ("echo hi | LLMKIT_DEBUG=1 llmkit serve --max-batch 4", "has no option --max-batch"),
    ],
)
def test_the_command_check_catches_what_it_should(root_command, help_exit_code, line, expected):
    invocations = llmkit_invocations(line)
    assert len(invocations) == 1
    problems = problems_of(Documented("test", 0, line, tuple(invocations[0])), root_command, help_exit_code)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    "heading, slug",
    [
        ("`llmkit generate`", "llmkit-generate"),
        ("Many prompts: `--input-file`", "many-prompts---input-file"),
        (
            "Benchmark: llmkit serve against the tutorial's Flask server",
            "benchmark-llmkit-serve-against-the-tutorials-flask-server",
        ),
        ("`--engine llama.cpp`", "--engine-llamacpp"),
    ],
)
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug
