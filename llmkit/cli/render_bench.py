"""Everything `llmkit bench` draws: its progress, its tables, its JSON and CSV. Results go to stdout;
progress, the local server's lines and warnings to stderr.

It works from the report's JSON document (llmkit.bench.runner.BenchReport.to_dict()), so the table,
the CSV and --json cannot disagree, and reuses render.py's consoles, fitted tables and message lines.
"""

from __future__ import annotations

import csv as _csv
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.markup import escape

from llmkit.cli import render
from llmkit.cli.render import Column, err, out, print_fitted

BENCH_HINT = "--wide shows every column; --json has every figure"
METRIC_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}
LEGEND = (
    "latencies in ms, measured by the client as vLLM's `bench serve` does · TTFT: send to first output chunk · "
    "TPOT: (E2E - TTFT) / (output tokens - 1) · ITL: gaps between output chunks, pooled · E2E: send to last "
    "chunk · req/s, tok/s: over the point's wall time · out: output tokens · total: prompt + output tokens"
)


def _quiet() -> bool:
    return bool(os.environ.get("LLMKIT_NO_PROGRESS"))


def _animated() -> bool:
    return err.is_terminal and not _quiet()


# --- the local server ---------------------------------------------------------------------------------


@contextmanager
def server_starting(server) -> Iterator[Any]:
    """A line saying which llmkit serve bench starts, then a live 'loading' line until /health says 200."""
    err.print(
        f"[bold]llmkit bench[/] · starting [cyan]{escape(server.display_command())}[/] "
        "[dim](llmkit serve, stopped after the run)[/]",
        soft_wrap=False,
    )
    if not _animated():
        yield None
        return
    from rich.status import Status

    with Status("starting llmkit serve…", console=err) as status:

        def report(elapsed_s: float, health: dict | None) -> None:
            state = (health or {}).get("status", "starting")
            status.update(f"llmkit serve: {escape(str(state))} {server.model} · {elapsed_s:.0f} s")

        yield report


def server_ready(server) -> None:
    health = server.health or {}
    facts = " · ".join(
        f"{key} {health[key]}"
        for key in ("engine", "dtype", "threads", "max_batch_size")
        if health.get(key) is not None
    )
    render.note(
        f"llmkit serve ready after {server.ready_after_s:.1f} s · {health.get('model', server.model)}"
        + (f" · {facts}" if facts else "")
    )


def server_stopped(server, code: int | None) -> None:
    if code not in (0, None):
        render.warning(f"llmkit serve exited with code {code} when stopped (log: {server.log_path})")
    elif code == 0:
        render.note("llmkit serve stopped")


# --- progress while running -----------------------------------------------------------------------------


@contextmanager
def progress() -> Iterator[Any]:
    """The runner's Progress: a live bar per load point on a terminal; one line per point in a log; nothing
    with LLMKIT_NO_PROGRESS=1."""
    from llmkit.bench.runner import Progress

    if not _animated():

        class Lines(Progress):
            def __init__(self) -> None:
                self.number = 0

            def start_point(self, label: str, total: int) -> None:
                self.number += 1
                if not _quiet():
                    err.print(f"[dim]point {self.number}: {escape(label)}, {total} requests[/]", soft_wrap=False)

        yield Lines()
        return

    from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
    ]
    with RichProgress(*columns, console=err, transient=True) as bar:
        stage_task = bar.add_task("starting", total=None, failed="", count="")

        class Live(Progress):
            task = None
            failed = 0
            total = 0

            def stage(self, text: str) -> None:
                bar.update(stage_task, description=escape(text))

            def start_point(self, label: str, total: int) -> None:
                if stage_task in bar.task_ids:
                    bar.remove_task(stage_task)
                self.failed = 0
                self.total = total
                self.task = bar.add_task(escape(label), total=total, failed="", count=f"0/{total}")

            def request_done(self, ok: bool) -> None:
                if self.task is None:
                    return
                if not ok:
                    self.failed += 1
                done = int(bar.tasks[self.task].completed) + 1
                bar.update(
                    self.task,
                    advance=1,
                    count=f"{done}/{self.total}",
                    failed=f"[red]{self.failed} failed[/]" if self.failed else "",
                )

            def end_point(self) -> None:
                if self.task is not None:
                    bar.remove_task(self.task)

        yield Live()


# --- results ------------------------------------------------------------------------------------------------


def json(document: dict[str, Any]) -> None:
    render.json_document(document)


def csv_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per load point: load, counts, throughputs, then every latency figure in ms."""
    rows = []
    for point in document["points"]:
        row: dict[str, Any] = {
            key: point[key]
            for key in (
                "label",
                "max_concurrency",
                "request_rate",
                "burstiness",
                "completed",
                "failed",
                "cancelled",
                "duration_s",
                "total_input_tokens",
                "total_output_tokens",
                "output_chunks",
                "request_throughput",
                "output_throughput",
                "total_token_throughput",
                "request_goodput",
                "peak_concurrency",
            )
        }
        row["errors"] = ";".join(f"{kind}:{count}" for kind, count in point["errors"].items())
        for metric in METRIC_LABELS:
            figures = point[f"{metric}_ms"] or {}
            for stat in ("mean", "median", "std", *(f"p{q:g}" for q in document["percentiles"])):
                row[f"{metric}_ms_{stat}"] = figures.get(stat)
        row["input_tokens_from"] = point["token_counts"]["input"]
        row["output_tokens_from"] = point["token_counts"]["output"]
        row["near_client_ceiling"] = point["near_client_ceiling"]
        rows.append(row)
    return rows


def csv(document: dict[str, Any]) -> None:
    rows = csv_rows(document)
    if not rows:
        return
    writer = _csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    sys.stdout.flush()


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _rate(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _stat(point: dict[str, Any], metric: str, stat: str) -> str:
    figures = point[f"{metric}_ms"]
    return _ms(figures.get(stat)) if figures else "-"


def _title(document: dict[str, Any]) -> list[str]:
    target, work = document["target"], document["workload"]
    model = f"{escape(str(target['model']))} at " if target.get("model") else ""
    kind = "llmkit serve, started by bench" if target["started_by_bench"] else "URL"
    lines = [f"[bold]llmkit bench[/] · {model}{escape(target['url'])} ({kind}) · {document['api']} API"]
    if work["source"] == "dataset":
        what = f"prompts from {escape(str(work['dataset']))}"
    else:
        low, high = work["input_len"]
        what = f"{low if low == high else f'{low}-{high}'} prompt tokens of {escape(work['prompt_builder'])}"
    out_low, out_high = work["output_len"]
    out_text = str(out_low) if out_low == out_high else f"{out_low}-{out_high}"
    server = document["server"]
    lines.append(
        f"{work['num_prompts']} requests per point · {what} · max_tokens {out_text} · ignore_eos "
        f"{escape(server['ignore_eos'])} · temperature {work['temperature']:g} · seed {work['seed']} · "
        f"{work['warmup']} warm-up"
    )
    return lines


def report(document: dict[str, Any], *, wide: bool = False) -> None:
    """The run on stdout: what was measured, one row per load point, the latency detail of a single point,
    token counts, failures and the notes."""
    for line in _title(document):
        out.print(line, soft_wrap=False)
    points = document["points"]
    if not points:
        out.print("[dim]no load point ran[/]")
        return
    top = f"p{document['percentiles'][-1]:g}" if document["percentiles"] else "median"
    sloed = document["slo_ms"] is not None
    columns = [
        Column("conc", ["inf" if p["max_concurrency"] is None else str(p["max_concurrency"]) for p in points]),
        Column("rate/s", ["inf" if p["request_rate"] is None else f"{p['request_rate']:g}" for p in points]),
    ]
    if any(p["burstiness"] != 1 for p in points):
        columns.append(Column("burst", ["inf" if p["burstiness"] is None else f"{p['burstiness']:g}" for p in points]))
    columns += [
        Column("ok", [str(p["completed"]) for p in points]),
        Column("fail", [f"[red]{p['failed']}[/]" if p["failed"] else "0" for p in points]),
        Column("req/s", [_rate(p["request_throughput"], 2) for p in points]),
        Column("out tok/s", [_rate(p["output_throughput"]) for p in points]),
    ]
    if sloed:
        columns.append(Column("good req/s", [_rate(p["request_goodput"], 2) for p in points]))
    columns += [
        Column("TTFT p50", [_stat(p, "ttft", "median") for p in points]),
        Column("TPOT p50", [_stat(p, "tpot", "median") for p in points]),
        Column("E2E p50", [_stat(p, "e2e", "median") for p in points], priority=1),
        Column(f"TTFT {top}", [_stat(p, "ttft", top) for p in points], priority=2),
        Column(f"TPOT {top}", [_stat(p, "tpot", top) for p in points], priority=2),
        Column(f"E2E {top}", [_stat(p, "e2e", top) for p in points], priority=3),
        Column("ITL p50", [_stat(p, "itl", "median") for p in points], priority=3),
        Column(f"ITL {top}", [_stat(p, "itl", top) for p in points], priority=4),
        Column("total tok/s", [_rate(p["total_token_throughput"]) for p in points], priority=4),
        Column("time s", [f"{p['duration_s']:.1f}" for p in points], priority=5),
        Column("peak", [str(p["peak_concurrency"]) for p in points], priority=6),
    ]
    print_fitted(columns, wide=wide, hint=BENCH_HINT)
    if len(points) == 1 and points[0]["completed"]:
        _latency_detail(points[0], document["percentiles"], wide=wide)
    _token_line(document)
    for point in points:
        if point["failed"] or point["cancelled"]:
            _failures(point)
    if sloed:
        limits = ", ".join(f"{name.upper()} <= {value:g} ms" for name, value in document["slo_ms"].items())
        out.print(
            f"[dim]good req/s: completed requests per second that met every SLO ({escape(limits)})[/]", soft_wrap=False
        )
    out.print(f"[dim]{escape(LEGEND)}[/]", soft_wrap=False)  # prose: wrapped between words


def _latency_detail(point: dict[str, Any], percentiles: list[float], *, wide: bool) -> None:
    stats = [("mean", 0), ("median", 0), *((f"p{q:g}", 1) for q in percentiles), ("std", 2)]
    rows = [metric for metric in METRIC_LABELS if point[f"{metric}_ms"]]
    print_fitted(
        [
            Column("ms", [METRIC_LABELS[m] for m in rows], justify="left"),
            *(Column(stat, [_stat(point, m, stat) for m in rows], priority=priority) for stat, priority in stats),
            Column("n", [str(point[f"{m}_ms"]["count"]) for m in rows], priority=3),
        ],
        wide=wide,
        hint=BENCH_HINT,
    )


def _token_line(document: dict[str, Any]) -> None:
    points = document["points"]
    sources = points[-1]["token_counts"]
    origin = f"prompt counts from {sources['input']}, output from {sources['output']}"
    if len(points) == 1:
        point = points[0]
        inputs = "?" if point["total_input_tokens"] is None else f"{point['total_input_tokens']:,}"
        text = f"tokens: {inputs} prompt + {point['total_output_tokens']:,} output ({origin})"
    else:
        text = f"tokens: {origin}; --json has each point's totals"
    out.print(f"[dim]{escape(text)}[/]", soft_wrap=False)


def _failures(point: dict[str, Any]) -> None:
    kinds = ", ".join(f"{kind} x{count}" for kind, count in point["errors"].items())
    cancelled = f"; {point['cancelled']} not finished (interrupted)" if point["cancelled"] else ""
    out.print(
        f"[red]{escape(point['label'])}: {point['failed']} failed[/]"
        + (f" ({escape(kinds)})" if kinds else "")
        + escape(cancelled),
        soft_wrap=False,
    )
    for kind, sample in point["error_samples"].items():
        out.print(f"  [dim]{escape(kind)}: {escape(sample)}[/]", soft_wrap=False)


def warnings(document: dict[str, Any]) -> None:
    """On stderr: points near the client's own ceiling (warnings), what the counts rest on (notes), an interruption."""
    ceiling = document["client_ceiling"]
    for point in document["points"]:
        if point["near_client_ceiling"]:
            render.warning(
                f"{point['label']}: {point['request_throughput']:.0f} req/s and {point['output_chunk_throughput']:.0f} "
                f"output chunks/s are {point['client_ceiling_share'] * 100:.0f}% of what this client can drive "
                f"({ceiling['requests_per_s']:.0f} req/s, {ceiling['chunks_per_s']:.0f} chunks/s on a "
                f"{ceiling['machine']}, {ceiling['measured']}): the client may be what limits this figure; run "
                "bench from another machine or several processes"
            )
    for note in document["notes"]:
        render.note(note)
    if document["interrupted"]:
        point = document["points"][-1] if document["points"] else None
        done = f" ({point['completed'] + point['failed']} of the last point's requests finished)" if point else ""
        render.warning(f"interrupted: these are partial results{done}")


def nothing_completed(document: dict[str, Any]) -> None:
    render.error("every request failed; nothing was measured (the errors are listed above)")


def wrote(path: Path) -> None:
    render.note(f"wrote {path}")
