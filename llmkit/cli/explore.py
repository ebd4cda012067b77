"""`llmkit explore`: see what sampling parameters do, as a sweep or as the next-token distribution.

`llmkit explore PROMPT` is short for `llmkit explore sweep PROMPT`: the group runs `sweep` whenever its
first argument is not one of its command names. So a prompt that is literally "next-token" or "sweep"
needs the explicit command: `llmkit explore sweep next-token` (or `llmkit explore [OPTIONS] -- next-token`).

The commands only parse, validate (through llmkit.explore and parse_params, before any model loads),
load, and hand the records from llmkit.explore to render.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmkit.cli import options, render
from llmkit.cli.inputs import ChatOpt, PromptArg, SystemOpt, check_system, join_prompt, load_model, read_prompt
from llmkit.cli.parsing import LlmkitGroup, LlmkitTyper
from llmkit.engine import LoadOptions
from llmkit.errors import InvalidParams, UnsupportedFeature
from llmkit.explore import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_TOP,
    MAX_SAMPLES,
    MAX_TOP,
    NEXT_TOKEN_KNOBS,
    NEXT_TOKEN_PRESET,
    PRESET,
    grid_knobs,
    next_token_settings,
    next_token_view,
    parse_grid,
    partial_next_token_view,
    plan_sweep,
    run_sweep,
)
from llmkit.params import GenerationParams, bounds_text, cli_flags, parse_params

DEFAULT_COMMAND = "sweep"

HELP = (
    "See what sampling parameters do. `llmkit explore PROMPT` (short for `explore sweep PROMPT`) generates "
    "under many settings side by side; `llmkit explore next-token PROMPT` shows the next-token distribution "
    "under each setting. A prompt that is literally 'next-token' or 'sweep' needs the explicit form: "
    "`llmkit explore sweep next-token`."
)

SWEEP_EPILOG = """Examples:

  llmkit explore "The sea at night is"

  llmkit explore -m smollm2-135m --samples 5 --seed 7 "Once upon a time"

  llmkit explore --param temperature=0.2,0.7,1.2 --param top_p=0.9,1.0 "The sea at night is"

  llmkit explore --param repetition_penalty=1.0,1.3 --param top_k=50 --csv "A list of fruits:" > sweep.csv
"""

NEXT_TOKEN_EPILOG = """Examples:

  llmkit explore next-token "The capital of France is"

  llmkit explore next-token --temperature 0.5,1,2 --top-p 0.9 "Once upon a time"

  llmkit explore next-token --top 20 --plot next.png "The sea at night is"
"""

PRESET_TEXT = (
    "greedy; temperature 0.3, 0.7, 1.0, 1.5; top-k 10, 50; top-p 0.9, 0.95; min-p 0.05, 0.1 "
    "(each from plain sampling: temperature 1, no top-k / top-p / min-p)"
)


class ExploreGroup(LlmkitGroup):
    """Runs `sweep` when the first argument is not a command name: `llmkit explore PROMPT` works."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def _knob_list(name: str, model: type[GenerationParams] = GenerationParams) -> Any:
    """next-token's option for a knob: its long flags from the table (llmkit/params.py), a list of values."""
    return Annotated[
        Optional[list[str]],
        typer.Option(
            *cli_flags(name, model),
            rich_help_panel=options.GENERATION_PANEL,
            show_default=False,
            help=f"Comma-separated values ({bounds_text(name, model)}), or repeat the option; settings are the product "
            "of all listed values.",
        ),
    ]


@options.load_options("load", remote=True)
def sweep(
    prompt: PromptArg = None,
    *,
    model: options.ModelOpt = None,
    param: Annotated[
        Optional[list[str]],
        typer.Option(
            "--param",
            rich_help_panel=options.GENERATION_PANEL,
            show_default=False,
            help="NAME=V1,V2,...: one axis of a grid over any generation parameter (repeatable; the settings are the "
            f"cartesian product). Without it, the preset: {PRESET_TEXT}.",
        ),
    ] = None,
    samples: Annotated[
        int,
        typer.Option(
            "--samples",
            "-s",
            rich_help_panel=options.GENERATION_PANEL,
            help=f"Samples per setting (1 to {MAX_SAMPLES}); greedy settings run one, being deterministic.",
        ),
    ] = DEFAULT_SAMPLES,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            rich_help_panel=options.GENERATION_PANEL,
            help="Sample j of every setting uses seed + j: the same command gives the same sweep.",
        ),
    ] = DEFAULT_SEED,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-new-tokens",
            *options.OTHER_NAMES["max_new_tokens"],
            rich_help_panel=options.GENERATION_PANEL,
            show_default=False,
            help=f"Tokens to generate per sample ({bounds_text('max_new_tokens')}; default {DEFAULT_MAX_NEW_TOKENS} "
            "here, as a sweep runs many generations).",
        ),
    ] = None,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document with every full text.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV: one row per setting.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Show every sample's whole text, wrapped, instead of one shortened line.")
    ] = False,
    load: LoadOptions,  # --device, --dtype, --quantize, --engine, --threads: from the decorator
) -> None:
    """Generate under many sampling settings (a preset or a --param grid) and compare texts and metrics."""
    check_system(system, chat)
    if as_json and as_csv:
        raise InvalidParams("choose one of --json and --csv", field="output")
    knob_sets = grid_knobs(parse_grid(param)) if param else list(PRESET)
    plan = plan_sweep(
        knob_sets,
        samples=samples,
        seed=seed,
        fixed={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens},
    )
    text = read_prompt(join_prompt(prompt))

    engine = load_model(model, load, chat=chat)
    try:
        unapplied = [note for setting in plan.settings for note in engine.unhonoured(setting.runs[0])]
        if unapplied:  # a server that ignores a knob would label texts with settings that were never applied
            raise UnsupportedFeature(f"{unapplied[0]}; drop the settings that use it")
        with render.explore_progress(plan.runs) as progress:
            result = run_sweep(engine, text, plan, chat=chat, system=system, progress=progress)
    finally:
        engine.close()
    if not engine.info.capabilities.generated_logprobs:
        why = engine.info.capabilities.missing.get("generated_logprobs")
        render.note(f"log p and ppl are '-': the server returns no logprobs{f' ({why})' if why else ''}")
    if as_json:
        render.json_document({**result.to_dict(), "engine": engine.info.setup()})
    elif as_csv:
        render.explore_csv(result.rows())
    else:
        render.sweep_tables(result, wide=wide)
    render.sweep_summary(result, threads=engine.info.threads)


@options.load_options("load", remote=True)
@options.generation_options("knobs", names=NEXT_TOKEN_KNOBS, option=_knob_list)  # --temperature ... --min-p
@options.constraint_options("constraint")  # --json-schema ...: the first token's mask, before every setting
def next_token(
    prompt: PromptArg = None,
    *,
    model: options.ModelOpt = None,
    top: Annotated[
        int, typer.Option("--top", help=f"How many of the most likely tokens to show (1 to {MAX_TOP}).")
    ] = DEFAULT_TOP,
    knobs: dict[str, Any],  # {knob: the values typed, or None}, from the decorator
    constraint: Optional[dict[str, Any]] = None,  # GenerationParams.constraint from the structured-output options
    chat: ChatOpt = False,
    system: SystemOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot",
            show_default=False,
            help="Also draw the charts into this PNG file (needs matplotlib, the plot extra).",
        ),
    ] = None,
    load: LoadOptions,  # --device, --dtype, --quantize, --engine, --threads: from the decorator
) -> None:
    """Show the model's next-token distribution under each setting: bars, entropy, and what top-k / top-p cut.

    Without --temperature/--top-k/--top-p/--min-p: temperature 1.0 (the model's own), 0.5, 1.5, top-k 5, top-p 0.9.

    Every setting starts from plain sampling (temperature 1, nothing cut) and changes only the knobs it names.
    """
    check_system(system, chat)
    if not 1 <= top <= MAX_TOP:
        raise InvalidParams(f"--top must be between 1 and {MAX_TOP} (got {top})", field="top")
    given = {name: values for name, values in knobs.items() if values}
    specs = [f"{name}={','.join(values)}" for name, values in given.items()]
    knob_sets = grid_knobs(parse_grid(specs)) if specs else list(NEXT_TOKEN_PRESET)
    settings = next_token_settings(knob_sets)
    constrained = parse_params(constraint=constraint).constraint if constraint else None  # checked before loading
    if plot is not None:
        from llmkit.plots import require_matplotlib

        require_matplotlib()
    text = read_prompt(join_prompt(prompt))

    engine = load_model(model, load, chat=chat)
    try:
        if constrained is not None and not engine.info.capabilities.logits:
            raise UnsupportedFeature("--json-schema and the like need a local model: a server's logits are not seen")
        if engine.info.capabilities.logits:
            logits = engine.next_token_logits(text, chat=chat, system=system)
            allowed = None
            if constrained is not None:
                from llmkit.engine.constrain import allowed_tokens

                allowed = allowed_tokens(engine, constrained, int(logits.reshape(-1).shape[0]))
            view = next_token_view(
                logits,
                settings,
                decode=lambda i: engine.tokenizer.decode([i]),
                top=top,
                model=engine.info.model,
                prompt=text,
                prompt_tokens=len(engine.prompt_ids(text, chat=chat, system=system)),
                allowed=allowed,
                constraint=None if constrained is None else constrained.kind.replace("_", " "),
            )
        else:  # a server: its top_logprobs (one line saying so when it has none)
            shown = engine.next_token_top(text, top, chat=chat, system=system)
            view = partial_next_token_view(shown, settings, model=engine.info.model, prompt=text)
    finally:
        engine.close()
    if as_json:
        render.json_document({**view.to_dict(), "engine": engine.info.setup()})
    else:
        render.next_token_tables(view)
    if plot is not None:
        from llmkit.plots import plot_next_token

        plot_next_token(view, str(plot))
        render.note(f"wrote {plot}")


def build_app(wrap: Callable[[Callable], Callable]) -> typer.Typer:
    """The `explore` group; `wrap` is the CLI's error boundary (cli.wrap_errors)."""
    app = LlmkitTyper(
        cls=ExploreGroup,
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        subcommand_metavar="[sweep | next-token] PROMPT [OPTIONS]",
        pretty_exceptions_enable=False,
    )
    app.command(DEFAULT_COMMAND, epilog=SWEEP_EPILOG)(wrap(sweep))
    app.command("next-token", epilog=NEXT_TOKEN_EPILOG)(wrap(next_token))
    return app
