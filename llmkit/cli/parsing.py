"""The Typer command and group classes every llmkit command uses: help that shows a flag as a flag.

Typer 0.29's rich help prints a type for every option, so a flag reads `--greedy <bool>` and
people type `--greedy true`. Here a flag's type column is blank (as in plain click help, git, uv
and gh), and `--greedy true` / `--json false` is a usage error that says to write the flag
alone: a silent `true` would otherwise become the first word of the prompt, since prompts may be
given unquoted (`llmkit generate Tell me a story`).

Nothing here imports torch: `--help` and argument errors stay fast.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

FLAG_VALUES = ("true", "false")  # what the old `<bool>` help invited users to type after a flag


def _blank_flag_types(params: list[Any]) -> None:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # Typer's rich help prints the metavar in the type column when one is set


def refuse_flag_values(command, ctx, args: list[str]) -> None:
    """`--greedy true`: a flag given a value as the next word is a usage error (exit 2), not a prompt word."""
    flags: dict[str, Any] = {}
    takes_value: set[str] = set()
    for param in command.get_params(ctx):
        if getattr(param, "param_type_name", "") != "option":
            continue
        names = [*param.opts, *param.secondary_opts]
        if getattr(param, "is_flag", False):
            flags.update(dict.fromkeys(names, param))
        else:
            takes_value.update(names)
    position = 0
    while position < len(args) - 1:
        word = args[position]
        if word == "--":
            return
        if word in takes_value:
            position += 2  # the next word is this option's value, whatever it looks like
            continue
        if word in flags and args[position + 1].lower() in FLAG_VALUES:
            param, value = flags[word], args[position + 1]
            false = f"{param.secondary_opts[0]} for false" if param.secondary_opts else "leave it out for false"
            raise typer.BadParameter(
                f"{word} is a flag and takes no value: write {word} alone ({false}). A prompt "
                f"that starts with '{value}' goes before the options, or in quotes.",
                ctx=ctx,
            )
        position += 1


class LlmkitCommand(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        _blank_flag_types(self.get_params(ctx))
        super().format_help(ctx, formatter)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        refuse_flag_values(self, ctx, args)
        return super().parse_args(ctx, args)


class LlmkitGroup(TyperGroup):
    """The root app and `explore`: the same flag help as the commands."""

    def format_help(self, ctx, formatter) -> None:
        _blank_flag_types(self.get_params(ctx))
        super().format_help(ctx, formatter)


class LlmkitTyper(typer.Typer):
    """A Typer app whose groups and commands use the classes above unless told otherwise, so a command
    registered later (`app.command()(...)`) gets the same help and parsing without remembering to ask."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("cls", LlmkitGroup)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("cls", LlmkitCommand)
        return super().command(*args, **kwargs)
