"""What the model commands share before they generate: the prompt (argument words or stdin), the rules
between options, and loading the model under a spinner. Nothing here imports torch until a model loads."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmkit.cli import render
from llmkit.errors import InvalidParams
from llmkit.params import check_text

if TYPE_CHECKING:
    from llmkit.engine import LoadOptions
    from llmkit.engine.base import Engine

PROMPT_HELP = (
    "The prompt; quotes are optional, the words are joined with spaces (as `ollama run` does). "
    "Use - (or leave it out) to read it from stdin."
)
PromptArg = Annotated[Optional[list[str]], typer.Argument(show_default=False, help=PROMPT_HELP)]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", show_default=False, help="System message for --chat.")]


def join_prompt(words: list[str] | None) -> str | None:
    """`llmkit generate Tell me a story`: the words of an unquoted prompt, joined by single spaces."""
    return " ".join(words) if words else None


def read_prompt(prompt: str | None, *, input_file: bool = False) -> str:
    """The prompt from the argument or stdin; `input_file`: the command has --input-file (the hint says so)."""
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            ways = (
                "pass one as an argument, pipe it on stdin, or use --input-file"
                if input_file
                else "pass one as an argument or pipe it on stdin"
            )
            raise InvalidParams(f"no prompt: {ways}", field="prompt")
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise InvalidParams(
                f"stdin is not UTF-8 text (byte {exc.start}); convert it, e.g. with iconv", field="prompt"
            ) from None
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # `echo` adds one newline
    if not prompt.strip():
        raise InvalidParams("the prompt is empty", field="prompt")
    return check_text(prompt, "the prompt", "prompt")


def check_system(system: str | None, chat: bool) -> None:
    """--system is a message of the chat template, so it means nothing without --chat."""
    if system is not None and not chat:
        raise InvalidParams("--system needs --chat", field="system")


def load_model(model: str | None, load: LoadOptions, *, chat: bool = False) -> Engine:
    """The engine for `model`, loaded under the spinner. An unknown model, or --chat on a known base model,
    fails first, before torch is imported."""
    from llmkit.engine import load_engine
    from llmkit.models import check_model

    check_model(model, chat=chat)
    from llmkit.models import is_url, shown_url

    with render.loading(shown_url(model) if model and is_url(model) else model or "model") as progress:
        return load_engine(model, load, progress=progress)
