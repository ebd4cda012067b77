"""Everything the CLI draws. Results go to stdout; progress, timings and errors to stderr.

Commands hand plain records (Result, EngineInfo, AliasStatus...) to these functions
and never touch rich themselves, so output stays consistent and testable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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
        out.print(
            f"[bold]--- sequence {index + 1} of {total} ---[/]"
            if out.is_terminal
            else f"--- sequence {index + 1} of {total} ---"
        )


def end_text() -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()


# --- generate --logprobs / --show-tokens: each token's share of the text, drawn as it streams ---
# On a terminal each token is coloured by its probability (the raw one, before sampling knobs) and, with
# --show-tokens, shaded light and dark in turn so its boundaries show. Piped, --logprobs leaves the text plain and
# --show-tokens writes one token per line: its id, a tab, the text it adds as a JSON string (joined, they are the
# output; a character split across tokens comes whole with the token that completes it), and with --logprobs a
# tab and its log-prob. A token's share is its offset up to the next token's offset.

PROBABILITY_BANDS = ((0.8, "green", ">= 80%"), (0.5, "yellow", "50-80%"), (0.2, "dark_orange", "20-50%"))
LOW_PROBABILITY = ("red", "< 20%")
TOKEN_SHADES = ("on grey35", "")  # --show-tokens on a terminal: every other token shaded (two greys would be one
# grey on a 16-colour terminal)


def probability_style(logprob: float) -> str:
    """The colour of a token whose log-probability is `logprob` (PROBABILITY_BANDS)."""
    probability = math.exp(logprob) if logprob > -745 else 0.0  # exp underflows to 0 below about -745 anyway
    for floor, style, _ in PROBABILITY_BANDS:
        if probability >= floor:
            return style
    return LOW_PROBABILITY[0]


def colours_tokens() -> bool:
    """Whether generated tokens are drawn with colours and shades (stdout is a terminal) or plain."""
    return out.is_terminal


def token_legend(*, colour: bool, boundaries: bool) -> None:
    """One stderr line saying what the colours (and shades) of the text above mean; terminals only."""
    if not out.is_terminal:
        return
    parts = []
    if colour:
        bands = [(style, label) for _, style, label in PROBABILITY_BANDS] + [LOW_PROBABILITY]
        parts.append("token probability " + " ".join(f"[{style}]{label}[/]" for style, label in bands))
    if boundaries:
        parts.append(f"[{TOKEN_SHADES[0]}]one token[/]the next[{TOKEN_SHADES[0]}]and the next[/]")
    err.print(" · ".join(parts))


def prompt_tokens(tokens: list[tuple[int, str]]) -> None:
    """--show-tokens: the prompt's tokens on stderr, `[id]"text"` each; a piece that is not whole UTF-8 is
    written bytes:\\xNN, unquoted, as the HTTP API names it."""
    listed = " ".join(
        f"[{token}]{piece if piece.startswith('bytes:') else json.dumps(piece, ensure_ascii=False)}"
        for token, piece in tokens
    )
    err.print(escape(f"prompt: {len(tokens)} token{'' if len(tokens) == 1 else 's'}: {listed}"))


class TokenView:
    """Draws one sequence's text token by token (see PROBABILITY_BANDS above): feed() each Chunk's text and
    log-prob entries as they come (or a whole Completion's once), then finish()."""

    def __init__(self, *, colour: bool, boundaries: bool):
        self.terminal = out.is_terminal
        self.colour = colour
        self.boundaries = boundaries
        self.shown = 0  # characters of the sequence's text drawn so far
        self.current: Any = None  # the TokenLogprob whose text is being drawn
        self.started = 0  # tokens begun: the shade alternates on it
        self.share = ""  # piped --show-tokens: the current token's text so far

    def feed(self, fragment: str, entries: Sequence[Any]) -> None:
        cursor = 0
        for entry in entries:
            cut = min(max(entry.offset - self.shown, cursor), len(fragment))
            self._draw(fragment[cursor:cut])
            cursor = cut
            self._begin(entry)
        self._draw(fragment[cursor:])
        self.shown += len(fragment)

    def finish(self) -> None:
        if self.terminal or not self.boundaries:
            end_text()
        else:
            self._line()

    def _begin(self, entry: Any) -> None:
        if self.boundaries and not self.terminal:
            self._line()
        self.current = entry
        self.started += 1
        self.share = ""

    def _line(self) -> None:
        if self.current is None:
            return
        fields = [str(self.current.token), json.dumps(self.share, ensure_ascii=False)]
        if self.colour:
            fields.append(repr(self.current.logprob))
        text("\t".join(fields) + "\n")

    def _draw(self, fragment: str) -> None:
        if not fragment:
            return
        if not self.terminal:
            if self.boundaries:
                self.share += fragment
            else:
                text(fragment)
            return
        styles = []
        if self.colour and self.current is not None:
            styles.append(probability_style(self.current.logprob))
        if self.boundaries and TOKEN_SHADES[self.started % 2]:
            styles.append(TOKEN_SHADES[self.started % 2])
        out.print(Text(fragment, style=" ".join(styles)), end="")


def timing_line(result, threads: int | None = None) -> None:
    """Prompt tokens, generated tokens, TTFT, decode speed and the threads behind it, on stderr."""
    t = result.timings
    decode = f"{t.decode_tokens_per_s:.1f} tok/s decode" if t.decode_tokens_per_s else "decode n/a"
    reasons = ",".join(sorted({c.finish_reason for c in result.completions}))
    seed = f" · seed {result.seed}" if result.seed is not None else ""
    if threads is not None:
        decode += f" · {threads} thread{'' if threads == 1 else 's'}"
    err.print(
        f"[dim]{result.usage.prompt_tokens} prompt tok · {result.usage.completion_tokens} generated tok · "
        f"TTFT {t.ttft_s * 1000:.0f} ms · {decode} · finish {reasons}{seed}[/]"
    )


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


# --- tables that fit the terminal ---
# Every table prints whole headers and whole values, at 80 columns too: no rich squashing ("defini…",
# "TTFT" cut to "14"). Tables are borderless and compact (docker / kubectl style). When a table is
# wider than the terminal, its least important columns are left out, the last first, and a dim line
# under it names them; `--wide` shows every column and lets lines run past the terminal, as
# `kubectl get -o wide` does. A table whose always-shown columns alone are too wide runs past the
# terminal too, rather than cut a value. Prose (descriptions, legends) may wrap between words.

WIDE_NOTE = "--wide shows every column"


@dataclass
class Column:
    header: str
    cells: list[Any]  # one str (rich markup) or Text per row
    justify: Literal["default", "left", "center", "right", "full"] = "right"
    priority: int = 0  # 0: always shown; when the table is too wide, the highest number goes first
    style: str | None = None


def compact_table(**options: Any) -> Table:
    from rich import box

    return Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, show_edge=False, **options)


def natural_width(table: Table, console: Console | None = None) -> int:
    """The width a table takes when nothing in it is shortened or wrapped."""
    from rich.measure import Measurement

    console = console or out
    return Measurement.get(console, console.options.update(max_width=100_000), table).maximum


def fit_columns(
    columns: list[Column],
    *,
    wide: bool = False,
    width: int | None = None,
    console: Console | None = None,
    **options: Any,
) -> tuple[Table, list[str]]:
    """A compact table of the columns that fit `width` (the console's), and the headers left out."""
    console = console or out
    width = width or console.width
    shown = list(columns)
    while True:
        table = compact_table(**options)
        for column in shown:
            table.add_column(column.header, justify=column.justify, style=column.style, no_wrap=True)
        for cells in zip(*(column.cells for column in shown)):
            table.add_row(*cells)
        size = natural_width(table, console)
        droppable = [c for c in shown if c.priority > 0]
        if wide or size <= width or not droppable:
            break
        shown.remove(max(reversed(droppable), key=lambda c: c.priority))
    if size > width:
        table.width = size  # run past the terminal rather than squash a value
    return table, [c.header for c in columns if c not in shown]


def print_fitted(
    columns: list[Column],
    *,
    wide: bool = False,
    hint: str = WIDE_NOTE,
    title: str | None = None,
    console: Console | None = None,
    **options: Any,
) -> list[str]:
    """Print a title line (wrapped between words), fit_columns' table and, when columns were left out, one dim
    line naming them and `hint`."""
    console = console or out
    if title:
        console.print(title, soft_wrap=False)
    table, hidden = fit_columns(columns, wide=wide, console=console, **options)
    console.print(table, crop=False)
    if hidden:
        console.print(
            f"[dim]not shown at {console.width} columns: {escape(', '.join(hidden))} ({escape(hint)})[/]",
            soft_wrap=False,
        )
    return hidden


def models_table(
    statuses,
    conversions,
    cache_root: str,
    *,
    wide: bool = False,
    cache_bytes: int | None = None,
    removable_bytes: int | None = None,
) -> None:
    """The aliases (columns that do not fit left out, see fit_columns), install hints, and the cache's total."""
    hidden = print_fitted(
        [
            Column("alias", [escape(s.name) for s in statuses], justify="left"),
            Column("installed", ["[green]yes[/]" if s.installed else "[red]no[/]" for s in statuses], justify="left"),
            Column("cached", [human_bytes(s.cache_bytes) if s.cached else "no" for s in statuses]),
            Column("GGUF", [human_bytes(s.gguf_bytes) for s in statuses], priority=2),
            Column("licence", [escape(s.licence) for s in statuses], justify="left", priority=3),
            Column("model", [escape(s.description) for s in statuses], justify="left", priority=1),
        ],
        wide=wide,
        title="Model aliases (work offline once installed)",
    )
    gguf = "" if "GGUF" in hidden else " · GGUF: the model file's size"
    out.print(
        f"[dim]cached: the safetensors conversion's size (later loads take seconds); no: the first load "
        f"converts the GGUF file{gguf}[/]",
        soft_wrap=False,
    )
    for s in statuses:
        if not s.installed:
            out.print(f"{escape(s.name)} is not installed: {escape(s.install_hint)}", soft_wrap=False)
    chat = [s.name for s in statuses if s.chat]
    if chat:  # the default is a base model: say which alias --chat works with
        out.print(f"With a chat template (for --chat): {escape(', '.join(chat))}; the others are base models.")
    total = f" · {human_bytes(cache_bytes)} in all" if cache_bytes is not None else ""
    out.print(f"Cache: {escape(cache_root)}{total}", soft_wrap=False)
    if cache_bytes:
        frees = f"; llmkit cache --clean frees {human_bytes(removable_bytes)}" if removable_bytes else ""
        out.print(f"[dim]llmkit cache lists what is in it{frees}[/]", soft_wrap=False)


# --- cache ---

CACHE_ACTION = {True: "removes", False: "keeps"}
CACHE_KIND_TEXT = {
    "conversion": "safetensors conversion",
    "joined-gguf": "GGUF file joined from its packages",
    "staging": "unfinished write",
    "unknown": "not llmkit's",
}


def cache_table(entries, root: str, packages: list[tuple[str, int]]) -> None:
    """`llmkit cache`: one entry per row, stacked (its path whole, then what it is for and what --clean does),
    so long names stay whole at 80 columns; the totals and the packages outside the cache below."""
    from rich.cells import cell_len
    from rich.text import Text

    out.print(f"[bold]Cache[/] {escape(root)}", soft_wrap=False)
    if not entries:
        out.print("[dim]empty: nothing converted or joined yet[/]")
    else:

        def table_for(rows: list[tuple[str, str, str | Text, bool]], longest: int) -> Table:
            table = compact_table()
            table.add_column("size", justify="right", no_wrap=True)
            table.add_column("--clean", no_wrap=True)
            table.add_column("entry", overflow="fold", min_width=longest)  # a name never folds
            for size, action, cell, last in rows:
                table.add_row(size, action, cell, end_section=last)
            return table

        longest = max(cell_len(entry.name) for entry in entries)
        rows: list[tuple[str, str, str | Text, bool]] = []
        for index, entry in enumerate(entries):
            rows.append((human_bytes(entry.bytes), CACHE_ACTION[entry.removable], escape(entry.name), False))
            kind = CACHE_KIND_TEXT.get(entry.kind, entry.kind)
            used = f"{kind} for {entry.used_by}; " if entry.used_by else f"{kind}; "
            rows.append(("", "", Text(used + entry.reason, style="dim"), index < len(entries) - 1))
        table = table_for(rows, longest)
        needed = natural_width(table_for(rows[::2], longest))  # the names alone, each on one line
        if needed > out.width:  # a name longer than the room beside the sizes: run past rather than fold it
            table.width = needed
        out.print(table, crop=False)
    total = sum(e.bytes for e in entries)
    removable = sum(e.bytes for e in entries if e.removable)
    out.print(
        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} · {human_bytes(total)} · "
        f"llmkit cache --clean frees {human_bytes(removable)}",
        soft_wrap=False,
    )
    if packages:
        listed = " · ".join(f"{escape(name)} {human_bytes(size)}" for name, size in packages)
        out.print(
            f"[dim]Outside the cache, in the aliases' packages (pip uninstall removes them, --clean never "
            f"does): {listed}[/]",
            soft_wrap=False,
        )


def cache_cleaned(result) -> None:
    """What `llmkit cache --clean` removed (or, with --dry-run, would remove), what it kept and why, what it freed."""
    verb = "would remove" if result.dry_run else "removed"
    for entry in result.removed:
        out.print(f"{verb} {escape(entry.name)} ({human_bytes(entry.bytes)})", soft_wrap=False)
    for entry in result.kept:
        out.print(
            f"[dim]kept {escape(entry.name)} ({human_bytes(entry.bytes)}): {escape(entry.reason)}[/]", soft_wrap=False
        )
    for entry, message in result.failed:
        error(f"could not remove {entry.name}: {message}")
    count = f"{len(result.removed)} entr{'y' if len(result.removed) == 1 else 'ies'}"
    if result.dry_run:
        out.print(
            f"Would remove {count} and free {human_bytes(result.freed_bytes)} in {escape(result.root)}; "
            "llmkit cache --clean removes them",
            soft_wrap=False,
        )
    else:
        out.print(f"Removed {count}, freed {human_bytes(result.freed_bytes)} in {escape(result.root)}", soft_wrap=False)


@contextmanager
def loading(model_name: str) -> Iterator[Any]:
    """A transient progress display on stderr while a model loads; yields the progress callback."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if os.environ.get("LLMKIT_NO_PROGRESS") or not err.is_terminal:
        yield None  # a redirected stderr gets no animation frames
        return
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"loading {model_name}", total=None, count="")

        def report(stage: str, done: int, total: int | None) -> None:
            description = stage if total is not None else f"{stage}…"
            if stage.startswith("de-quantizing"):
                description += " (first use only; later loads take seconds)"
            progress.update(
                task, description=description, completed=done, total=total, count=f"{done}/{total}" if total else ""
            )

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
        line.append(
            f"  RSS {mib(sample.rss_bytes)}  CPU {sample.cpu_percent:.0f}%  "
            f"{sampler.elapsed():.1f} s  ({len(sampler.samples)} samples)"
        )
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
    # key, label (short, so the table fits 80 columns; MONITOR_LEGEND says what each is), formatter, definition
    ("ttft_s", "TTFT", _seconds, "vLLM"),
    ("pp_tokens_per_s", "pp tok/s", _rate, "llama-bench"),
    ("tg_tokens_per_s", "tg tok/s", _rate, "llama-bench"),
    ("tpot_s", "TPOT", _seconds, "vLLM"),
    ("itl_s", "ITL", _seconds, "vLLM"),
    ("e2e_s", "E2E", _seconds, "vLLM"),
    ("generated_tokens", "tokens", lambda v: f"{v:.0f}", "tokenizer"),
)
MONITOR_STATS = (("mean", 2), ("median", 0), ("p95", 1), ("stddev", 3), ("min", 2), ("max", 2))  # name, priority
MONITOR_LEGEND = (
    "TTFT: time to first token · pp tok/s: prompt tokens per second · tg tok/s: generated tokens "
    "per second (pp and tg as llama-bench defines them) · TPOT: time per output token after the "
    "first · ITL: inter-token latency, pooled over all runs · E2E: end-to-end latency (TTFT, TPOT, "
    "ITL and E2E as vLLM defines them) · tokens: generated tokens, counted by the tokenizer"
)
MONITOR_HINT = "--json has every figure"


def monitor_report(report: dict[str, Any]) -> None:
    """The final tables of `llmkit monitor` from its JSON document."""
    model, env, config = report["model"], report["environment"], report["config"]
    server = report.get("server")
    if server is not None:  # a model behind a URL: the figures below the latency table are this client's
        out.print(
            f"[bold]{escape(model['model'])}[/] · on {escape(model['location'])} · measured from this client, "
            f"{escape(env['cpu_model'])}"
        )
    else:
        out.print(
            f"[bold]{escape(model['model'])}[/] · {model['parameters'] / 1e6:,.0f}M parameters · "
            f"{model['device']} {model['dtype']} · {model.get('threads') or env['torch_threads']} threads · "
            f"{escape(env['cpu_model'])}"
        )
    out.print(
        f"prompt {config['prompt_tokens']} tokens · {config['max_new_tokens']} new tokens (greedy) · "
        f"{config['runs']} runs after {config['warmup']} warm-up · sampler "
        f"{report['sampler']['samples_per_s'] or 0:.0f} samples/s"
    )

    for name, why in model.get("choices", {}).items():
        out.print(f"  [dim]{escape(name)}:[/] {escape(why)}")

    rows = report["phases"]
    print_fitted(
        [
            Column("phase", [row["name"] for row in rows], justify="left"),
            Column("wall", [_seconds(row["wall_s"]) for row in rows]),
            Column("CPU", ["-" if row["cpu_percent"] is None else f"{row['cpu_percent']:.0f}%" for row in rows]),
            Column("peak RSS", [mib(row["rss_peak_bytes"]) for row in rows]),
            Column(
                "GPU util",
                ["-" if row["gpu_util_percent"] is None else f"{row['gpu_util_percent']:.0f}%" for row in rows],
                priority=1,
            ),
            Column(
                "GPU mem peak",
                [
                    mib(
                        row["cuda_peak_allocated_bytes"]
                        if row["cuda_peak_allocated_bytes"] is not None
                        else row["gpu_memory_peak_bytes"]
                    )
                    for row in rows
                ],
                priority=1,
            ),
        ],
        hint=MONITOR_HINT,
        title="Phases" if server is None else "Phases (this client's process; load: connecting and probing)",
    )

    memory = report["memory"]
    if server is not None:
        out.print(server_resources_line(server))
    out.print(
        ("Client: " if server is not None else "")
        + f"RSS before load {mib(memory['rss_before_load_bytes'])} · after load "
        f"{mib(memory['rss_after_load_bytes'])} · peak during load {mib(memory['rss_peak_load_bytes'])} · "
        f"peak during inference {mib(memory['rss_peak_inference_bytes'])} · system available "
        f"{mib(memory['system_available_bytes'])}"
    )

    summary = [(label, fmt, report["summary"].get(key)) for key, label, fmt, _ in MONITOR_METRICS]
    print_fitted(
        [
            Column("metric", [label for label, _, _ in summary], justify="left"),
            *(
                Column(stat, [fmt(stats[stat]) if stats else "-" for _, fmt, stats in summary], priority=priority)
                for stat, priority in MONITOR_STATS
            ),
        ],
        hint=MONITOR_HINT,
        title="Latency over measured runs",
    )
    out.print(f"[dim]{escape(MONITOR_LEGEND)}[/]", soft_wrap=False)  # prose: wrapped between words


def server_resources_line(server: dict[str, Any]) -> str:
    """What a remote model's server reported about itself while the runs went (measure.ServerWatch.summary)."""
    if not server.get("measured"):
        kv = server.get("kv_cache_usage_peak")
        extra = f" · KV cache peak {kv:.0%}" if kv is not None else ""
        return f"Server: {escape(server.get('note') or 'remote: not measured')}{extra}"
    parts = [f"peak RSS {mib(server['rss_peak_bytes'])}" if server.get("rss_peak_bytes") is not None else None]
    if server.get("cpu_percent") is not None:
        parts.append(f"CPU {server['cpu_percent']:.0f}%")
    if server.get("kv_cache_usage_peak") is not None:
        parts.append(f"KV cache peak {server['kv_cache_usage_peak']:.0%}")
    shown = " · ".join(part for part in parts if part)
    return f"Server (its /metrics, {server['readings']} readings during the runs): {shown}"


def busy_warning(machine_load, measured: str = "the measurement") -> None:
    """One warning line on stderr when the machine was busy while figures were measured (measure.MachineLoad)."""
    warning(machine_load.warning(measured))


# --- explore ---

EXPLORE_BAR_WIDTH = 6  # characters per probability bar (eighth blocks: 48 steps)
EXPLORE_TEXT_HEADER = "text (shortened; --wide: whole)"
EXPLORE_TEXT_MIN = 24  # the sweep's text column never gets narrower; setting labels break between knobs instead
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


def pack_label(label: str, width: int) -> str:
    """A setting label on lines of at most `width`, broken only between its knobs, never inside one:
    "temperature 0.7, top-p 0.9" -> "temperature 0.7,\ntop-p 0.9"."""
    from rich.cells import cell_len

    lines: list[str] = []
    line = ""
    for piece in _label_pieces(label):
        joined = f"{line} {piece}" if line else piece
        if line and cell_len(joined) > width:
            lines.append(line)
            line = piece
        else:
            line = joined
    lines.append(line)
    return "\n".join(lines)


def _label_pieces(label: str) -> list[str]:
    """A label's knobs, each with the comma that follows it: the units pack_label never breaks."""
    parts = label.split(", ")
    return [part + ("," if index < len(parts) - 1 else "") for index, part in enumerate(parts)]


def _label_width(labels: list[str], budget: int) -> int:
    """The widest a label column may be: the budget, but never narrower than one knob."""
    from rich.cells import cell_len

    longest = max((cell_len(label) for label in labels), default=0)
    longest_piece = max((cell_len(piece) for label in labels for piece in _label_pieces(label)), default=0)
    return max(min(longest, budget), longest_piece)


def sweep_tables(sweep, *, wide: bool = False) -> None:
    """Two tables on stdout: every sample's text (one shortened line each; whole and wrapped with `wide`), then
    one row of metrics per setting. Labels break between knobs to fit the terminal, never inside one."""
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
    out.print(
        Text.assemble(
            ("Sweep", "bold"),
            f" of {len(sweep.settings)} settings on ",
            (sweep.model, "bold"),
            f" · {limit}{sampled}{common}",
        ),
        soft_wrap=False,
    )
    out.print(Text.assemble(f"Prompt ({sweep.prompt_tokens} tokens): ", (repr(sweep.prompt), "dim")), soft_wrap=False)

    labels = [run.label for run in sweep.settings]
    text_header = "text" if wide else EXPLORE_TEXT_HEADER
    seeds_width = max([4, *(len(str(x.seed)) for s in sweep.settings for x in s.samples)])
    # edges 2, two gaps of 3 (padding 1 + divider 1 + padding 1); the text column keeps room for its header
    label_width = _label_width(labels, out.width - 2 - 6 - seeds_width - max(len(text_header), EXPLORE_TEXT_MIN))
    texts = Table(box=box.SIMPLE_HEAD, padding=(0, 1), expand=True, show_edge=False)
    texts.add_column("setting", style="bold", no_wrap=True)
    texts.add_column("seed", justify="right", no_wrap=True, style="dim")
    if wide:  # the whole text, wrapped between words
        texts.add_column(text_header, overflow="fold", ratio=1, min_width=EXPLORE_TEXT_MIN)
    else:
        texts.add_column(text_header, no_wrap=True, overflow="ellipsis", ratio=1, min_width=len(text_header))
    for number, run in enumerate(sweep.settings):
        for j, sample in enumerate(run.samples):
            texts.add_row(
                pack_label(run.label, label_width) if j == 0 else "",
                "-" if sample.seed is None else str(sample.seed),
                Text(_one_line(sample.text.strip()) or "(empty)"),
                end_section=j == len(run.samples) - 1 and number < len(sweep.settings) - 1,
            )
    out.print(texts)

    def metrics_table(shown_labels: list[str]) -> Table:
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, show_edge=False)
        table.add_column("setting", style="bold", no_wrap=True)
        for column in ("n", "dist-1", "dist-2", "rep-3", "log p", "ppl", "tokens", "tok/s"):
            table.add_column(column, justify="right", no_wrap=True)
        for label, run in zip(shown_labels, sweep.settings):
            m = run.metrics
            ppl = None if m.perplexity is None else _explore_num(m.perplexity, 1 if m.perplexity < 100 else 0)
            table.add_row(
                label,
                str(m.samples),
                _explore_num(m.distinct_1),
                _explore_num(m.distinct_2),
                _explore_num(m.repetition),
                _explore_num(m.mean_logprob),
                ppl or "-",
                f"{m.mean_tokens:.1f}",
                _explore_num(m.tokens_per_s, 1),
            )
        return table

    numbers_width = natural_width(metrics_table([""] * len(labels))) - len("setting")
    label_width = _label_width(labels, out.width - numbers_width)
    metrics = metrics_table([pack_label(label, label_width) for label in labels])
    size = natural_width(metrics)
    if size > out.width:  # one knob wider than the room left: run past the terminal rather than cut it
        metrics.width = size
    out.print(metrics, crop=False)
    out.print(
        Text(
            "n: samples · dist-n: distinct-n, unique / all word n-grams over the samples (higher: more "
            "diverse) · rep-3: share of a sample's word trigrams that repeat an earlier one (higher: "
            "loops) · log p: mean log-probability of the generated tokens under the unmodified model; "
            "ppl = exp(-log p) · tokens: mean per sample · tok/s: decode speed",
            style="dim",
        ),
        soft_wrap=False,
    )


def sweep_summary(sweep, threads: int | None = None) -> None:
    runs = sum(len(s.samples) for s in sweep.settings)
    tokens = sum(len(x.token_ids) for s in sweep.settings for x in s.samples)

    def count(n: int, noun: str) -> str:
        return f"{n} {noun}{'' if n == 1 else 's'}"

    threads_text = f" · {count(threads, 'thread')}" if threads is not None else ""
    err.print(
        f"[dim]{count(len(sweep.settings), 'setting')} · {count(runs, 'generation')} · "
        f"{count(tokens, 'generated token')} · {sweep.elapsed_s:.1f} s{threads_text} · seed {sweep.seed}[/]"
    )


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

    out.print(
        Text.assemble("Next token after ", (repr(view.prompt), "bold"), " on ", (view.model, "bold")), soft_wrap=False
    )
    common = f" · all with {_explore_knobs(view.common)}" if view.common else ""
    if view.partial:  # a server's top_logprobs: what they cover, and the cap
        shown = len(view.settings[0].rows) if view.settings else 0
        limits = [f"it returns at most {view.cap}"] if view.cap else []
        if view.asked:
            limits.append(f"{view.asked} asked: tokens that read the same come back as one")
        said = f" ({'; '.join(limits)})" if limits else ""
        scope = (
            f"the server's top {shown} tokens{said} cover "
            f"{view.shown_mass or 0:.1%} of the probability · model entropy ≥ {view.model_entropy_bits:.2f} bits"
        )
    else:
        scope = f"vocabulary {view.vocab_size:,} · model entropy {view.model_entropy_bits:.2f} bits"
    out.print(
        Text(f"{view.prompt_tokens} prompt tokens · {scope} (temperature 1, nothing cut){common}", style="dim"),
        soft_wrap=False,
    )
    if getattr(view, "constraint", None):  # the mask comes before every knob: say what it took away
        out.print(
            Text(
                f"constraint {view.constraint}: removed {view.constraint_removed_tokens:,} of {view.vocab_size:,} "
                f"tokens, holding {view.constraint_removed_mass:.1%} of the model's probability; every setting "
                "samples from the rest",
                style="dim",
            ),
            soft_wrap=False,
        )
    from rich.cells import cell_len

    cell_width = EXPLORE_BAR_WIDTH + 1 + 6
    settings = list(view.settings)
    # Tokens show whole: the token column takes the longest one, up to what leaves room for one setting
    # (a longer token folds onto a second line, never cut); headers break between knobs, never inside one.
    longest_token = max((cell_len(repr(row.token)) for s in settings for row in s.rows), default=0)
    widths = [max(cell_width, _label_width([s.label], cell_width)) for s in settings]
    token_width = max(len("entropy bits"), min(longest_token, out.width - 2 - 3 - 4 - max(widths, default=0)))

    def build(group: list[Any]) -> Table:
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, show_edge=False)
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("token", overflow="fold", width=token_width)
        for setting in group:
            width = widths[settings.index(setting)]
            table.add_column(pack_label(setting.label, width), width=width, no_wrap=True)
        return table

    groups: list[list[Any]] = []
    for setting in settings:
        if groups and natural_width(build([*groups[-1], setting])) <= out.width:
            groups[-1].append(setting)
        else:
            groups.append([setting])
    for group in groups:
        table = build(group)
        for index, row in enumerate(group[0].rows):
            cells = []
            for setting in group:
                cell = setting.rows[index]
                if cell.cut_by:
                    cells.append(Text(f"cut: {cell.cut_by}", style="dim"))
                else:
                    value = f"{setting.mark}{_explore_prob(cell.prob)}"
                    cells.append(Text.assemble((_explore_bar(cell.prob), "cyan"), " ", value.rjust(6)))
            table.add_row(str(row.rank), Text(repr(row.token)), *cells, end_section=index == len(group[0].rows) - 1)
        table.add_row("", Text("entropy bits", style="dim"), *(_entropy_cell(view, s) for s in group))
        table.add_row(
            "",
            Text("tokens kept", style="dim"),
            *("?" if s.kept_tokens is None else f"{s.kept_tokens:,}" for s in group),
        )
        table.add_row("", Text("mass cut", style="dim"), *(_mass_cut_cell(s.cut_mass) for s in group))
        out.print(table)
    out.print(
        Text(
            "Bars: probability under each setting (full width = 100%); cut: removed by that filter. "
            "Temperature reshapes the whole distribution; top-k, top-p and min-p cut its tail and "
            "renormalise what is left."
            + (
                " A server gives only its top tokens: a setting is exact where what it keeps is provably among "
                "them; ≤ marks upper bounds (a temperature alone), ≈ a setting computed over them alone; ? is not "
                "known from them."
                if view.partial
                else ""
            ),
            style="dim",
        ),
        soft_wrap=False,
    )


def _entropy_cell(view, setting) -> str:
    """A partial view's entropy is exact where the setting keeps only shown tokens, a bound for plain sampling."""
    if view.partial and setting.exact and setting.kept_tokens is None:
        return f"≥{setting.entropy_bits:.2f}"
    return f"{setting.entropy_bits:.2f}" if setting.exact else f"≈{setting.entropy_bits:.2f}"


def _mass_cut_cell(cut_mass: float | None) -> str:
    if cut_mass is None:
        return "?"
    return _explore_prob(cut_mass) if cut_mass > 0 else "-"


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
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
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


def _compare_cell(key: str, value: Any, row: dict[str, Any] | None = None) -> str:
    if value is None and row is not None:
        if key == "perplexity" and row.get("perplexity_na"):
            return f"n/a ({row['perplexity_na']})"  # a server without (trustworthy) prompt log-probs
        if key == "bits_per_byte" and row.get("perplexity_na"):
            return "n/a"
        if key == "peak_rss_bytes" and row.get("server") is not None:
            return "remote: not measured"  # the server's /metrics has no memory figure
    if value is None:
        return "-"
    return COMPARE_FORMATS.get(key, str)(value)


# compare's columns at 80: the highest number is left out first (ties: the rightmost); 0 always shows.
# The greedy sample is never a column: it is listed under the table.
COMPARE_PRIORITY = {
    "model": 0,
    "tg_tokens_per_s": 0,
    "peak_rss_bytes": 1,
    "ttft_s": 1,
    "bits_per_byte": 1,
    "parameters": 2,
    "load_s": 3,
    "disk_bytes": 3,
    "relative_speed": 4,
    "perplexity": 4,
    "dtype": 5,
}


def compare_table(rows, spec, console: Console | None = None, *, wide: bool = False) -> None:
    """The comparison as a table that fits the terminal (the best value of each column in bold green), the
    greedy samples and the failures below it."""
    from llmkit.compare import COLUMNS, best_values

    console = console or out
    best = best_values(rows)
    ok = [row for row in rows if row.get("ok")]
    columns = []
    for key, label, _ in COLUMNS:
        if key == "sample":
            continue
        cells = []
        for row in ok:
            cell = escape(_compare_cell(key, row.get(key), row))
            cells.append(f"[bold green]{cell}[/]" if key in best and row.get(key) == best[key] else cell)
        columns.append(
            Column(
                label,
                cells,
                justify="left" if key in ("model", "dtype") else "right",
                priority=COMPARE_PRIORITY.get(key, 3),
            )
        )
    print_fitted(
        columns,
        wide=wide,
        console=console,
        title=f"{len(rows)} models · {spec.runs} runs of {spec.max_new_tokens} greedy tokens after "
        f"{spec.warmup} warm-up · perplexity on {escape(spec.text_name)}",
    )
    console.print(
        "[dim]speed: decode tokens/s relative to the fastest; perplexity is per token and not "
        "comparable across tokenizers, bits/byte is.[/]",
        soft_wrap=False,
    )
    samples = [row for row in ok if row.get("sample") is not None]
    if samples:
        console.print(f"[dim]greedy samples (first {SAMPLE_CHARS} characters; --format json has them whole):[/]")
        for row in samples:
            console.print(
                f"  [bold]{escape(row['model'])}[/]: {escape(_compare_cell('sample', row['sample']))}", soft_wrap=False
            )
    _compare_threads_line(rows, console)
    for row in ok:
        if row.get("server") is not None:
            console.print(f"[dim]{escape(row['model'])}: {_compare_remote_note(row)}[/]", soft_wrap=False)
    for row in rows:
        if not row.get("ok"):
            console.print(f"[bold red]failed:[/] {escape(row['model'])}: {escape(row.get('error', 'unknown error'))}")


def _compare_threads_line(rows, console: Console) -> None:
    """The compute threads behind the table's speeds, under it."""
    from llmkit.compare import threads_text

    text = threads_text(rows)
    if text:
        console.print(f"[dim]{escape(text)}[/]")


def _compare_remote_note(row: dict[str, Any]) -> str:
    """A URL row's figures in words: whose memory, and why there is no perplexity when there is none."""
    server = row.get("server") or {}
    memory = (
        "peak RSS is the server's (its /metrics)"
        if server.get("measured")
        else escape(server.get("note") or "remote: not measured")
    )
    why = f"; perplexity n/a: {escape(row['perplexity_why'])}" if row.get("perplexity_why") else ""
    return f"a server: TTFT and tok/s measured from this client; {memory}{why}"


def _compare_threads_markdown(rows) -> list[str]:
    from llmkit.compare import threads_text

    text = threads_text(rows)
    return [f"\n{text}"] if text else []


def compare_output(rows, spec, output_format: str, *, to_file: bool) -> str:
    """json, csv and markdown as text; the table format as plain text when it goes to a file."""
    import csv
    import io

    from llmkit.compare import COLUMNS, flat_rows

    if output_format == "json":
        return (
            json.dumps(
                {
                    "spec": {
                        "models": list(spec.models),
                        "prompt": spec.prompt,
                        "text": spec.text_name,
                        "runs": spec.runs,
                        "warmup": spec.warmup,
                        "max_new_tokens": spec.max_new_tokens,
                        "window": spec.window,
                        "stride": spec.effective_stride,
                        "threads": spec.load.threads,
                    },
                    "rows": rows,
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
    if output_format == "csv":
        buffer = io.StringIO()
        records = flat_rows(rows)
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()
    if output_format == "markdown":
        numeric = [key not in ("model", "dtype", "sample") for key, _, _ in COLUMNS]
        lines = [
            "| " + " | ".join(label for _, label, _ in COLUMNS) + " |",
            "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
        ]
        for row in rows:
            if row.get("ok"):
                cells = [_compare_cell(key, row.get(key), row).replace("|", "\\|") for key, _, _ in COLUMNS]
                lines.append("| " + " | ".join(cells) + " |")
        lines += _compare_threads_markdown(rows)
        for row in rows:
            if not row.get("ok"):
                lines.append(f"\nFailed: `{row['model']}`: {row.get('error', 'unknown error')}")
        return "\n".join(lines) + "\n"
    if to_file:  # the table, without colours
        plain = Console(record=True, width=160, file=io.StringIO(), color_system=None)
        compare_table(rows, spec, plain, wide=True)
        return plain.export_text()
    return ""


# --- serve ---


def serve_banner(
    url: str,
    model: str,
    *,
    api_key: bool,
    rate_limit: str | None,
    max_batch_size: int,
    max_queue: int,
    request_timeout_s: float,
    engine: str = "transformers",
    threads: int | None = None,
    prefix_cache_mb: int = 0,
    flash_attn: bool = False,
) -> None:
    """What `llmkit serve` listens on and how it is configured (stderr; never shows the API key); threads: those
    asked for (None: the engine's default, which /health and the "ready" line report once loaded)."""
    if _message_log:
        _message_log.info(
            "llmkit serve on %s: loading %s in the background",
            url,
            model,
            extra={
                "event": "starting",
                "url": url,
                "model": model,
                "engine": engine,
                "max_batch_size": max_batch_size,
                "max_queue": max_queue,
                "request_timeout_s": request_timeout_s,
                "api_key_required": api_key,
                "rate_limit": rate_limit,
                "threads": threads,
                "prefix_cache_mb": prefix_cache_mb,
                "flash_attn": flash_attn,
            },
        )
        return
    err.print(f"[bold]llmkit serve[/] · {escape(url)} · loading [cyan]{escape(model)}[/] in the background")
    err.print(
        f"[dim]  OpenAI API {escape(url)}/v1 (completions, chat/completions, models) · simple API "
        f"POST /generate · GET /health · GET /metrics[/]"
    )
    batching = {
        "transformers": f"batches up to {max_batch_size} sequences",
        "llama.cpp": f"llama.cpp engine: batches up to {max_batch_size} sequences",
    }.get(engine, f"engine {engine}: batches up to {max_batch_size} sequences")
    if flash_attn:
        batching += ", flash attention on"
    prefix_cache = f"{prefix_cache_mb} MB" if prefix_cache_mb else "off"
    err.print(
        f"[dim]  {batching} · prefix cache {prefix_cache} · queue {max_queue} · timeout "
        f"{request_timeout_s:g} s · API key {'required' if api_key else 'off'} · rate limit "
        f"{rate_limit or 'off'} · threads {threads or 'default'} · Ctrl-C stops gracefully[/]"
    )


def serve_stopped() -> None:
    if _message_log:
        _message_log.info("llmkit serve stopped", extra={"event": "stopped"})
        return
    err.print("[dim]llmkit serve stopped[/]")


# --- chat ---

CHAT_PROMPT = ">>> "  # plain text: colour codes in input()'s prompt would confuse readline's cursor arithmetic
CHAT_CONTINUE = "... "


def chat_prompt(*, continued: bool = False) -> str:
    """What input() shows on a terminal; a pipe gets no prompt at all."""
    return CHAT_CONTINUE if continued else CHAT_PROMPT


def chat_banner(model: str, commands: int) -> None:
    err.print(f"[dim]chatting with {escape(model)} · /help lists the {commands} commands · Ctrl-D leaves[/]")


def chat_footer(result, cached: int, *, stopped: bool = False) -> None:
    """One line per turn on stderr: generated tokens, TTFT, decode speed, the prompt and its cached part."""
    t = result.timings
    speed = f"{t.decode_tokens_per_s:.1f} tok/s" if t.decode_tokens_per_s else "tok/s n/a"
    end = " · stopped (Ctrl-C)" if stopped else ""
    err.print(
        f"[dim]{result.usage.completion_tokens} tok · TTFT {t.ttft_s * 1000:.0f} ms · {speed} · "
        f"prompt {result.usage.prompt_tokens} tok, {cached} cached{end}[/]"
    )


def chat_stopped() -> None:
    """Ctrl-C during a reply that had not produced its Result: the line ends, the session goes on."""
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print("[dim]stopped (Ctrl-C)[/]")


def chat_note(message: str) -> None:
    err.print(escape(message), soft_wrap=True)


def chat_help(commands: Sequence[tuple[str, str]], notes: Sequence[str]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True, style="bold")
    table.add_column()
    for usage, what in commands:
        table.add_row(escape(usage), escape(what))
    err.print(table)
    for line in notes:
        err.print(f"[dim]{escape(line)}[/]")


def chat_params(rows: Sequence[tuple[str, str, bool]]) -> None:
    """/set alone: every parameter, its current value, and a mark where it differs from the table's default."""
    table = Table(box=None, pad_edge=False)
    table.add_column("parameter", no_wrap=True)
    table.add_column("value")
    table.add_column("")
    for name, value, changed in rows:
        table.add_row(name, escape(value), "set" if changed else "")
    err.print(table)


def chat_stats(rows: Sequence[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, value)
    err.print(table)
