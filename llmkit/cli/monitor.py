"""`llmkit monitor`: what a model costs — load time, memory, CPU/GPU and latency over repeated runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli import options, render
from llmkit.engine import LoadOptions
from llmkit.errors import InvalidParams

EPILOG = """Examples:

  llmkit monitor

  llmkit monitor -m smollm2-135m --runs 10 --warmup 2 --max-new-tokens 128

  llmkit monitor --json | jq .summary.tg_tokens_per_s.median

  llmkit monitor --timeline samples.csv --plot monitor.png

  llmkit monitor -m http://127.0.0.1:8000/v1 --runs 10   # client-side latency of any OpenAI-compatible server
"""


@options.load_options("load", remote=True)
def monitor(
    *,
    model: options.ModelOpt = None,
    prompt: Annotated[
        Optional[str],
        typer.Option(
            "--prompt", "-p", show_default=False, help="Prompt to run (default: a fixed ~35-token paragraph)."
        ),
    ] = None,
    prompt_file: Annotated[
        Optional[Path], typer.Option("--prompt-file", show_default=False, help="Read the prompt from this file.")
    ] = None,
    runs: Annotated[int, typer.Option("--runs", "-r", help="Measured runs.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", "-w", help="Runs before measuring, not counted.")] = 1,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", *options.OTHER_NAMES["max_new_tokens"], help="Tokens per run (greedy).")
    ] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document with every figure.")] = False,
    timeline: Annotated[
        Optional[Path],
        typer.Option(
            "--timeline", show_default=False, help="Write the raw samples (time, phase, rss, cpu, gpu) as CSV."
        ),
    ] = None,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot", show_default=False, help="Draw memory and CPU over time, phases marked (needs matplotlib)."
        ),
    ] = None,
    load: LoadOptions,  # --device, --dtype, --quantize, --engine, --threads: from the decorator
) -> None:
    """Measure load time, memory, CPU/GPU, TTFT and tokens/s of a model over repeated runs."""
    from llmkit.monitor import DEFAULT_PROMPT, MonitorSpec, check_spec, read_prompt_file, write_timeline

    if prompt is not None and prompt_file is not None:
        raise InvalidParams("give either --prompt or --prompt-file, not both", field="prompt")
    text = (
        read_prompt_file(prompt_file) if prompt_file is not None else (prompt if prompt is not None else DEFAULT_PROMPT)
    )
    spec = MonitorSpec(model=model, prompt=text, runs=runs, warmup=warmup, max_new_tokens=max_new_tokens, load=load)
    check_spec(spec)
    from llmkit.models import check_model

    check_model(model)  # an unknown model (or a typo: did you mean...) fails before torch loads
    if plot is not None:
        from llmkit.plots import require_matplotlib

        require_matplotlib()

    from llmkit.measure import ResourceSampler
    from llmkit.monitor import run_monitor

    with ResourceSampler() as sampler, render.monitor_live(sampler, spec) as progress:
        report = run_monitor(spec, sampler, progress)

    if as_json:
        render.json_document(report.to_dict())
    else:
        render.monitor_report(report.to_dict())
    if report.machine_load and report.machine_load.busy:
        render.busy_warning(report.machine_load)
    if timeline is not None:
        write_timeline(sampler, timeline)
        render.note(f"wrote {len(sampler.samples)} samples to {timeline}")
    if plot is not None:
        from llmkit.plots import plot_timeline

        plot_timeline(sampler, plot, f"llmkit monitor: {report.engine['model']} on {report.engine['device']}")
        render.note(f"wrote {plot}")
