"""`llmkit compare`: several models side by side on the same work, each in a fresh subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli import options, render
from llmkit.engine import LoadOptions
from llmkit.errors import InvalidParams

EPILOG = """Examples:

  llmkit compare gemma3-270m smollm2-135m

  llmkit compare gpt2 distilgpt2 --runs 5 --max-new-tokens 64

  llmkit compare ./my-model ./model.Q4_K_M.gguf --format markdown --output report.md

  llmkit compare gemma3-270m smollm2-135m --text-file essay.txt --plot compare.png

  llmkit compare smollm2-135m --engine transformers --engine llama.cpp

  llmkit compare smollm2-135m http://127.0.0.1:8000/v1   # a local model beside a served one
"""


@options.load_options("load", engine=False, remote=True)
def compare(
    models: Annotated[
        list[str],
        typer.Argument(
            show_default=False,
            autocompletion=options.complete_model,
            help="Models to compare: aliases, Hub ids, save_pretrained folders, .gguf files, server URLs "
            "(http://host:port/v1[#name]).",
        ),
    ],
    *,
    prompt: Annotated[
        Optional[str],
        typer.Option(
            "--prompt",
            "-p",
            show_default=False,
            help="Prompt for the speed runs and the greedy sample (default: a fixed sentence).",
        ),
    ] = None,
    text_file: Annotated[
        Optional[Path],
        typer.Option(
            "--text-file",
            show_default=False,
            help="Text for perplexity and bits/byte (default: a few paragraphs shipped with llmkit).",
        ),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", "-r", help="Measured generation runs per model.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", "-w", help="Unmeasured runs first.")] = 1,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", *options.OTHER_NAMES["max_new_tokens"], help="Tokens per run (greedy).")
    ] = 32,
    window: Annotated[
        int, typer.Option("--window", help="Tokens per perplexity window (capped at the model's context).")
    ] = 512,
    stride: Annotated[
        Optional[int],
        typer.Option("--stride", show_default=False, help="Window step for long texts (default: half the window)."),
    ] = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table, json, csv or markdown.")] = "table",
    wide: options.WideOpt = False,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", show_default=False, help="Write the result to this file instead of stdout."),
    ] = None,
    plot: Annotated[
        Optional[Path],
        typer.Option("--plot", show_default=False, help="Bar charts of speed, memory and bits/byte (matplotlib)."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per model before its row fails.")] = 1800.0,
    load: LoadOptions,  # --device, --dtype, --quantize, --threads: from the decorator
    engines: Annotated[
        Optional[list[str]],
        typer.Option(
            "--engine",
            show_default=False,
            rich_help_panel=options.MODEL_PANEL,
            help="transformers (default), llama.cpp or auto; repeat it to compare engines on the same models.",
        ),
    ] = None,
) -> None:
    """Run the same work on every model, each in its own subprocess, and show them side by side.

    Per model: parameters, dtype, size on disk, load time, peak RSS, TTFT and decode tokens/s
    (medians), perplexity and bits per byte on a reference text, and a greedy sample. Exit code 0
    when at least one model succeeded, 1 when none did (then only the failures are printed, on
    stderr), 2 for bad arguments.
    """
    from llmkit.compare import (
        FORMATS,
        CompareSpec,
        check_spec,
        model_runs,
        read_text_file,
        reference_text,
        run_compare,
    )

    if output_format not in FORMATS:
        raise InvalidParams(f"format must be one of {', '.join(FORMATS)} (got {output_format!r})", field="format")
    spec = CompareSpec(
        models=tuple(models),
        prompt=prompt if prompt is not None else CompareSpec.prompt,
        text=read_text_file(text_file) if text_file is not None else reference_text(),
        text_name=str(text_file) if text_file is not None else "llmkit reference text",
        runs=runs,
        warmup=warmup,
        max_new_tokens=max_new_tokens,
        window=window,
        stride=stride,
        load=load,
        timeout_s=timeout,
        engines=tuple(engines or ("transformers",)),
    )
    check_spec(spec)
    if plot is not None:
        from llmkit.plots import require_matplotlib

        require_matplotlib()

    with render.compare_progress(len(model_runs(spec))) as progress:
        rows = run_compare(spec, progress)
    if not any(row.get("ok") for row in rows):  # nothing to compare: no empty table, only what went wrong
        for row in rows:
            render.error(f"{row['model']}: {row.get('error', 'unknown error')}")
        raise typer.Exit(1)

    text = render.compare_output(rows, spec, output_format, to_file=output is not None)
    if output is not None:
        output.write_text(text)
        render.note(f"wrote {output}")
    elif text:
        render.text(text)
    if output_format == "table" and output is None:
        render.compare_table(rows, spec, wide=wide)
    if plot is not None:
        from llmkit.plots import plot_compare

        plot_compare(rows, plot)
        render.note(f"wrote {plot}")
    from llmkit.compare import busy_measurement

    busy = busy_measurement(rows)
    if busy:
        render.busy_warning(*busy)
