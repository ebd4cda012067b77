"""Everything the CLI draws. Results go to stdout; progress, timings and errors to stderr.

Commands hand plain records (Result, EngineInfo, AliasStatus...) to these functions
and never touch rich themselves, so output stays consistent and testable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmkit.errors import one_line

# Tests set COLUMNS and NO_COLOR for stable output; rich reads both.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# `llmkit serve --log-format json` promises JSON lines only: errors, warnings and its banner then go through
# this logger (the server's JSON handler) instead of rich. The CLI's error boundary resets it after each command.
_message_log: logging.Logger | None = None


def messages_to_log(logger: logging.Logger | None) -> None:
    """Send error(), warning() and serve's banner lines to `logger` from now on; None: back to rich."""
    global _message_log
    _message_log = logger


def error(message: str) -> None:
    if _message_log:
        _message_log.error(message, extra={"event": "error"})
        return
    err.print(f"[bold red]error:[/] {escape(message)}")


def warning(message: str) -> None:
    if _message_log:
        _message_log.warning(message, extra={"event": "warning"})
        return
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

    for name, why in model.get("choices", {}).items():
        out.print(f"  [dim]{escape(name)}:[/] {escape(why)}")

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


# --- explore ---

EXPLORE_BAR_WIDTH = 6  # characters per probability bar (eighth blocks: 48 steps)
EXPLORE_TOKEN_WIDTH = 14
EXPLORE_LABEL_WIDTH = 30  # longer grid labels wrap
_EIGHTHS = " ▏▎▍▌▋▊▉"
_NEWLINE_MARK = "↵"


def _explore_bar(fraction: float, width: int = EXPLORE_BAR_WIDTH) -> str:
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def _explore_prob(p: float) -> str:
    if p <= 0:
        return "0"
    return f"{p * 100:.1f}%" if p >= 0.001 else "<0.1%"


def _explore_num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _explore_knobs(knobs: dict[str, Any]) -> str:
    from llmkit.explore import knob_label

    return knob_label(knobs)


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", _NEWLINE_MARK)


@contextmanager
def explore_progress(total: int) -> Iterator[Any]:
    """Progress over a sweep's runs on stderr (terminal only); yields the callback run_sweep calls."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if os.environ.get("LLMKIT_NO_PROGRESS") or not err.is_terminal:
        yield None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("sweeping", total=total)

        def report(done: int, all_runs: int, label: str) -> None:
            progress.update(task, completed=done, total=all_runs, description=escape(label))

        yield report


def sweep_tables(sweep) -> None:
    """Two tables on stdout: every sample's text (one line each), then one row of metrics per setting."""
    from rich import box
    from rich.text import Text

    max_new = sorted({s.params["max_new_tokens"] for s in sweep.settings})
    limit = f"up to {max_new[0]} new tokens" if len(max_new) == 1 else "new tokens per setting"
    seeds = sorted({x.seed for s in sweep.settings for x in s.samples if x.seed is not None})
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        seed_text = f"seeds {seeds[0]}-{seeds[-1]}"
    else:
        seed_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    sampled = f" · {sweep.samples} samples each (greedy: 1), {seed_text}" if seeds else ""
    common = f" · all with {_explore_knobs(sweep.common)}" if sweep.common else ""
    out.print(Text.assemble(("Sweep", "bold"), f" of {len(sweep.settings)} settings on ", (sweep.model, "bold"),
                            f" · {limit}{sampled}{common}"), soft_wrap=False)
    out.print(Text.assemble(f"Prompt ({sweep.prompt_tokens} tokens): ", (repr(sweep.prompt), "dim")),
              soft_wrap=False)

    texts = Table(box=box.SIMPLE_HEAD, padding=(0, 1), expand=True, show_edge=False)
    texts.add_column("setting", style="bold", max_width=EXPLORE_LABEL_WIDTH)
    texts.add_column("seed", justify="right", no_wrap=True, style="dim")
    texts.add_column("text (one line, shortened; --json has it whole)", no_wrap=True, overflow="ellipsis",
                     ratio=1)
    for number, run in enumerate(sweep.settings):
        for j, sample in enumerate(run.samples):
            texts.add_row(run.label if j == 0 else "", "-" if sample.seed is None else str(sample.seed),
                          Text(_one_line(sample.text.strip()) or "(empty)"),
                          end_section=j == len(run.samples) - 1 and number < len(sweep.settings) - 1)
    out.print(texts)

    metrics = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, show_edge=False)
    metrics.add_column("setting", style="bold", max_width=EXPLORE_LABEL_WIDTH)
    for column in ("n", "dist-1", "dist-2", "rep-3", "log p", "ppl", "tokens", "tok/s"):
        metrics.add_column(column, justify="right", no_wrap=True)
    for run in sweep.settings:
        m = run.metrics
        ppl = None if m.perplexity is None else _explore_num(m.perplexity, 1 if m.perplexity < 100 else 0)
        metrics.add_row(run.label, str(m.samples), _explore_num(m.distinct_1), _explore_num(m.distinct_2),
                        _explore_num(m.repetition), _explore_num(m.mean_logprob), ppl or "-",
                        f"{m.mean_tokens:.1f}", _explore_num(m.tokens_per_s, 1))
    out.print(metrics)
    out.print(Text("n: samples · dist-n: distinct-n, unique / all word n-grams over the samples (higher: more "
                   "diverse) · rep-3: share of a sample's word trigrams that repeat an earlier one (higher: "
                   "loops) · log p: mean log-probability of the generated tokens under the unmodified model; "
                   "ppl = exp(-log p) · tokens: mean per sample · tok/s: decode speed", style="dim"),
              soft_wrap=False)


def sweep_summary(sweep) -> None:
    runs = sum(len(s.samples) for s in sweep.settings)
    tokens = sum(len(x.token_ids) for s in sweep.settings for x in s.samples)
    def count(n: int, noun: str) -> str:
        return f"{n} {noun}{'' if n == 1 else 's'}"

    err.print(f"[dim]{count(len(sweep.settings), 'setting')} · {count(runs, 'generation')} · "
              f"{count(tokens, 'generated token')} · {sweep.elapsed_s:.1f} s · seed {sweep.seed}[/]")


def explore_csv(rows: list[dict[str, Any]]) -> None:
    """CSV on stdout, one row per record, columns in the first record's key order."""
    import csv

    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    sys.stdout.flush()


def next_token_tables(view) -> None:
    """The top tokens as rows and one bar chart column per setting; entropy, kept and cut mass below."""
    from rich import box
    from rich.text import Text

    out.print(Text.assemble("Next token after ", (repr(view.prompt), "bold"), " on ", (view.model, "bold")),
              soft_wrap=False)
    common = f" · all with {_explore_knobs(view.common)}" if view.common else ""
    out.print(Text(f"{view.prompt_tokens} prompt tokens · vocabulary {view.vocab_size:,} · model entropy "
                   f"{view.model_entropy_bits:.2f} bits (temperature 1, nothing cut){common}", style="dim"),
              soft_wrap=False)
    cell_width = EXPLORE_BAR_WIDTH + 1 + 6
    gap = 2  # SIMPLE_HEAD with collapsed padding: one space of padding, one of divider
    fixed = 3 + EXPLORE_TOKEN_WIDTH + gap
    per_table = max(1, (out.width - fixed) // (cell_width + gap))
    settings = list(view.settings)
    for first in range(0, len(settings), per_table):
        group = settings[first:first + per_table]
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, show_edge=False)
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("token", no_wrap=True, overflow="ellipsis", max_width=EXPLORE_TOKEN_WIDTH)
        for setting in group:
            table.add_column(setting.label, width=cell_width)
        for index, row in enumerate(group[0].rows):
            cells = []
            for setting in group:
                cell = setting.rows[index]
                if cell.cut_by:
                    cells.append(Text(f"cut: {cell.cut_by}", style="dim"))
                else:
                    cells.append(Text.assemble((_explore_bar(cell.prob), "cyan"), " ",
                                               _explore_prob(cell.prob).rjust(6)))
            table.add_row(str(row.rank), Text(repr(row.token)), *cells,
                          end_section=index == len(group[0].rows) - 1)
        table.add_row("", Text("entropy bits", style="dim"), *(f"{s.entropy_bits:.2f}" for s in group))
        table.add_row("", Text("tokens kept", style="dim"), *(f"{s.kept_tokens:,}" for s in group))
        table.add_row("", Text("mass cut", style="dim"),
                      *(_explore_prob(s.cut_mass) if s.cut_mass > 0 else "-" for s in group))
        out.print(table)
    out.print(Text("Bars: probability under each setting (full width = 100%); cut: removed by that filter. "
                   "Temperature reshapes the whole distribution; top-k, top-p and min-p cut its tail and "
                   "renormalise what is left.", style="dim"), soft_wrap=False)


# --- compare ---


@contextmanager
def compare_progress(total: int) -> Iterator[Any]:
    """Overall progress over models, with the current model's stage, on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    def quiet(index: int, count: int, model: str, stage: str) -> None:
        if stage == "starting":
            err.print(f"[dim][{index + 1}/{count}] {escape(model)}[/]")

    if not err.is_terminal or os.environ.get("LLMKIT_NO_PROGRESS"):
        yield quiet
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("comparing", total=total)

        def report(index: int, count: int, model: str, stage: str) -> None:
            description = f"{escape(model)}: {escape(stage)}" if model else "done"
            progress.update(task, completed=index, description=description)

        yield report


SAMPLE_CHARS = 60


COMPARE_FORMATS = {
    "parameters": lambda v: f"{v / 1e6:,.0f}M",
    "disk_bytes": human_bytes,
    "peak_rss_bytes": human_bytes,
    "load_s": "{:.2f}".format,
    "ttft_s": lambda v: f"{v * 1000:.0f} ms",
    "tg_tokens_per_s": "{:.1f}".format,
    "relative_speed": "{:.2f}x".format,
    "perplexity": "{:,.2f}".format,
    "bits_per_byte": "{:.3f}".format,
    "sample": lambda v: one_line(v, SAMPLE_CHARS),
}


def _compare_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    return COMPARE_FORMATS.get(key, str)(value)


def compare_table(rows, spec, console: Console | None = None) -> None:
    """The comparison as a rich table: the best value of each column in bold green; failures below."""
    from llmkit.compare import COLUMNS, best_values

    console = console or out
    best = best_values(rows)
    table = Table(title=f"{len(rows)} models · {spec.runs} runs of {spec.max_new_tokens} greedy tokens after "
                        f"{spec.warmup} warm-up · perplexity on {escape(spec.text_name)}",
                  title_justify="left")
    for key, label, _ in COLUMNS:
        table.add_column(label, justify="left" if key in ("model", "dtype", "sample") else "right",
                         overflow="fold", no_wrap=key != "sample")
    for row in rows:
        if not row.get("ok"):
            continue
        cells = []
        for key, _, _ in COLUMNS:
            cell = escape(_compare_cell(key, row.get(key)))
            cells.append(f"[bold green]{cell}[/]" if key in best and row.get(key) == best[key] else cell)
        table.add_row(*cells)
    console.print(table)
    console.print("[dim]speed: decode tokens/s relative to the fastest; perplexity is per token and not "
                  "comparable across tokenizers, bits/byte is.[/]")
    for row in rows:
        if not row.get("ok"):
            console.print(f"[bold red]failed:[/] {escape(row['model'])}: {escape(row.get('error', 'unknown error'))}")


def compare_output(rows, spec, output_format: str, *, to_file: bool) -> str:
    """json, csv and markdown as text; the table format as plain text when it goes to a file."""
    import csv
    import io

    from llmkit.compare import COLUMNS, flat_rows

    if output_format == "json":
        return json.dumps({"spec": {"models": list(spec.models), "prompt": spec.prompt, "text": spec.text_name,
                                    "runs": spec.runs, "warmup": spec.warmup,
                                    "max_new_tokens": spec.max_new_tokens, "window": spec.window,
                                    "stride": spec.effective_stride},
                           "rows": rows}, indent=2, ensure_ascii=False) + "\n"
    if output_format == "csv":
        buffer = io.StringIO()
        records = flat_rows(rows)
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()
    if output_format == "markdown":
        numeric = [key not in ("model", "dtype", "sample") for key, _, _ in COLUMNS]
        lines = ["| " + " | ".join(label for _, label, _ in COLUMNS) + " |",
                 "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
        for row in rows:
            if row.get("ok"):
                cells = [_compare_cell(key, row.get(key)).replace("|", "\\|") for key, _, _ in COLUMNS]
                lines.append("| " + " | ".join(cells) + " |")
        for row in rows:
            if not row.get("ok"):
                lines.append(f"\nFailed: `{row['model']}`: {row.get('error', 'unknown error')}")
        return "\n".join(lines) + "\n"
    if to_file:  # the table, without colours
        plain = Console(record=True, width=160, file=io.StringIO(), color_system=None)
        compare_table(rows, spec, plain)
        return plain.export_text()
    return ""


# --- serve ---


def serve_banner(url: str, model: str, *, api_key: bool, rate_limit: str | None, max_batch_size: int,
                 max_queue: int, request_timeout_s: float, engine: str = "transformers") -> None:
    """What `llmkit serve` listens on and how it is configured (stderr; never shows the API key)."""
    if _message_log:
        _message_log.info("llmkit serve on %s: loading %s in the background", url, model, extra={
            "event": "starting", "url": url, "model": model, "engine": engine, "max_batch_size": max_batch_size,
            "max_queue": max_queue, "request_timeout_s": request_timeout_s, "api_key_required": api_key,
            "rate_limit": rate_limit})
        return
    err.print(f"[bold]llmkit serve[/] · {escape(url)} · loading [cyan]{escape(model)}[/] in the background")
    err.print(f"[dim]  OpenAI API {escape(url)}/v1 (completions, chat/completions, models) · tutorial API "
              f"POST /generate · GET /health · GET /metrics[/]")
    batching = {"transformers": f"batches up to {max_batch_size} sequences",
                "llama.cpp": "llama.cpp engine: one request at a time"}.get(
        engine, f"engine {engine}: batches up to {max_batch_size} sequences with transformers, one at a time "
                "with llama.cpp")
    err.print(f"[dim]  {batching} · queue {max_queue} · timeout "
              f"{request_timeout_s:g} s · API key {'required' if api_key else 'off'} · rate limit "
              f"{rate_limit or 'off'} · Ctrl-C stops gracefully[/]")


def serve_stopped() -> None:
    if _message_log:
        _message_log.info("llmkit serve stopped", extra={"event": "stopped"})
        return
    err.print("[dim]llmkit serve stopped[/]")
