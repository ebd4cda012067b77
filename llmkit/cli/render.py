"""Everything the CLI draws. Results go to stdout; progress, timings and errors to stderr.

Commands hand plain records (Result, EngineInfo, AliasStatus...) to these functions
and never touch rich themselves, so output stays consistent and testable.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Tests set COLUMNS and NO_COLOR for stable output; rich reads both.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")


def warning(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


def json_line(record: dict[str, Any]) -> None:
    """One JSON document per line on stdout, unbuffered so a pipe sees it at once."""
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def json_document(record: Any) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def text(fragment: str) -> None:
    """Raw generated text, flushed at once so tokens appear as they are produced."""
    sys.stdout.write(fragment)
    sys.stdout.flush()


def prompt_echo(prompt: str) -> None:
    """Show the prompt dimmed before its continuation, on a terminal only (pipes get the text alone)."""
    if out.is_terminal:
        out.print(escape(prompt), style="dim", end="")


def sequence_header(index: int, total: int) -> None:
    if total > 1:
        out.print(f"[bold]--- sequence {index + 1} of {total} ---[/]" if out.is_terminal
                  else f"--- sequence {index + 1} of {total} ---")


def end_text() -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()


def timing_line(result) -> None:
    """Prompt tokens, generated tokens, TTFT and decode speed, on stderr so stdout stays clean."""
    t = result.timings
    decode = f"{t.decode_tokens_per_s:.1f} tok/s decode" if t.decode_tokens_per_s else "decode n/a"
    reasons = ",".join(sorted({c.finish_reason for c in result.completions}))
    seed = f" · seed {result.seed}" if result.seed is not None else ""
    err.print(f"[dim]{result.usage.prompt_tokens} prompt tok · {result.usage.completion_tokens} generated tok · "
              f"TTFT {t.ttft_s * 1000:.0f} ms · {decode} · finish {reasons}{seed}[/]")


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def models_table(statuses, conversions, cache_root: str) -> None:
    table = Table(title="Model aliases (work offline once installed)", title_justify="left")
    for column in ("alias", "installed", "cached", "GGUF", "cache", "licence", "model"):
        wraps = column in ("licence", "model")
        table.add_column(column, no_wrap=not wraps, min_width=12 if wraps else None)
    for s in statuses:
        table.add_row(
            s.name,
            "[green]yes[/]" if s.installed else f"[red]no[/] ({escape(s.install_hint)})",
            "[green]yes[/]" if s.cached else "no",
            human_bytes(s.gguf_bytes),
            human_bytes(s.cache_bytes),
            escape(s.licence),
            escape(s.description),
        )
    out.print(table)
    out.print(f"Cache: {escape(cache_root)}")
    if conversions:
        out.print("Converted GGUF models in the cache:")
        for path, size in conversions:
            out.print(f"  {escape(path.name)}  {human_bytes(size)}")


@contextmanager
def loading(model_name: str) -> Iterator[Any]:
    """A transient progress display on stderr while a model loads; yields the progress callback."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if os.environ.get("LLMKIT_NO_PROGRESS") or not err.is_terminal:
        yield None  # a redirected stderr gets no animation frames
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"loading {model_name}", total=None, count="")

        def report(stage: str, done: int, total: int | None) -> None:
            description = stage if total is not None else f"{stage}…"
            if stage.startswith("de-quantizing"):
                description += " (first use only; later loads take seconds)"
            progress.update(task, description=description, completed=done, total=total,
                            count=f"{done}/{total}" if total else "")

        yield report

# --- monitor ---


def note(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]")


def mib(count: int | None) -> str:
    return "-" if count is None else f"{count / 1048576:,.0f} MiB"


@contextmanager
def monitor_live(sampler, spec) -> Iterator[Any]:
    """Phase, progress over runs, current RSS and CPU, redrawn on stderr while monitor runs."""
    from rich.live import Live
    from rich.text import Text

    state = {"phase": "starting", "done": 0, "total": None}

    def report(stage: str, done: int, total: int | None) -> None:
        state.update(phase=stage, done=done, total=total)

    def view() -> Text:
        sample = sampler.latest()
        progress = f" {state['done']}/{state['total']}" if state["total"] else ""
        line = Text()
        line.append(f"{state['phase']}{progress}", style="bold cyan")
        line.append(f"  RSS {mib(sample.rss_bytes)}  CPU {sample.cpu_percent:.0f}%  "
                    f"{sampler.elapsed():.1f} s  ({len(sampler.samples)} samples)")
        if sample.gpu_util_percent is not None:
            line.append(f"  GPU {sample.gpu_util_percent:.0f}% {mib(sample.gpu_memory_bytes)}")
        return line

    if not err.is_terminal or os.environ.get("LLMKIT_NO_PROGRESS"):
        yield report
        return
    with Live(get_renderable=view, console=err, refresh_per_second=8, transient=True):
        yield report


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


MONITOR_METRICS = (
    # key, label, formatter, whose definition
    ("ttft_s", "TTFT", _seconds, "vLLM"),
    ("pp_tokens_per_s", "pp (prompt tok/s)", _rate, "llama-bench"),
    ("tg_tokens_per_s", "tg (generated tok/s)", _rate, "llama-bench"),
    ("tpot_s", "TPOT", _seconds, "vLLM"),
    ("itl_s", "ITL (pooled)", _seconds, "vLLM"),
    ("e2e_s", "E2E latency", _seconds, "vLLM"),
    ("generated_tokens", "generated tokens", lambda v: f"{v:.0f}", "tokenizer"),
)


def monitor_report(report: dict[str, Any]) -> None:
    """The final tables of `llmkit monitor` from its JSON document."""
    model, env, config = report["model"], report["environment"], report["config"]
    out.print(f"[bold]{escape(model['model'])}[/] · {model['parameters'] / 1e6:,.0f}M parameters · "
              f"{model['device']} {model['dtype']} · torch {env['torch_threads']} threads · "
              f"{escape(env['cpu_model'])}")
    out.print(f"prompt {config['prompt_tokens']} tokens · {config['max_new_tokens']} new tokens (greedy) · "
              f"{config['runs']} runs after {config['warmup']} warm-up · sampler "
              f"{report['sampler']['samples_per_s'] or 0:.0f} samples/s")

    phases = Table(title="Phases", title_justify="left")
    for column in ("phase", "wall", "CPU", "peak RSS", "GPU util", "GPU mem peak"):
        phases.add_column(column, justify="left" if column == "phase" else "right")
    for row in report["phases"]:
        cuda = row["cuda_peak_allocated_bytes"]
        phases.add_row(row["name"], _seconds(row["wall_s"]),
                       "-" if row["cpu_percent"] is None else f"{row['cpu_percent']:.0f}%",
                       mib(row["rss_peak_bytes"]),
                       "-" if row["gpu_util_percent"] is None else f"{row['gpu_util_percent']:.0f}%",
                       mib(cuda if cuda is not None else row["gpu_memory_peak_bytes"]))
    out.print(phases)

    memory = report["memory"]
    out.print(f"RSS before load {mib(memory['rss_before_load_bytes'])} · after load "
              f"{mib(memory['rss_after_load_bytes'])} · peak during load {mib(memory['rss_peak_load_bytes'])} · "
              f"peak during inference {mib(memory['rss_peak_inference_bytes'])} · system available "
              f"{mib(memory['system_available_bytes'])}")

    latency = Table(title="Latency over measured runs", title_justify="left")
    for column in ("metric", "mean", "median", "p95", "stddev", "min", "max", "definition"):
        latency.add_column(column, justify="left" if column in ("metric", "definition") else "right")
    for key, label, fmt, source in MONITOR_METRICS:
        stats = report["summary"].get(key)
        if stats is None:
            latency.add_row(label, *["-"] * 6, source)
            continue
        latency.add_row(label, *(fmt(stats[k]) for k in ("mean", "median", "p95", "stddev", "min", "max")), source)
    out.print(latency)
