"""PNG charts (the optional `llmkit[plot]` extra). matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.errors import InvalidParams

if TYPE_CHECKING:
    from llmkit.explore import NextTokenView

MIB = 1024 * 1024
SMOOTHING_SAMPLES = 10  # CPU per sample is quantised by 10 ms kernel ticks; a short mean shows the level


def _rolling_mean(values: list[float], window: int) -> list[float]:
    means, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        means.append(total / min(index + 1, window))
    return means


def require_matplotlib() -> None:
    """Call before any model loads, so a missing extra fails fast with exit code 2."""
    if importlib.util.find_spec("matplotlib") is None:
        from llmkit.extras import install_hint

        raise InvalidParams(f"--plot needs matplotlib: {install_hint('plot')}", field="plot")


def _pyplot():
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # a missing glyph is not the user's problem
    return plt


def plot_timeline(sampler, path: Path, title: str) -> None:
    """Memory (RSS) and CPU over time, each phase shaded and named."""
    plt = _pyplot()
    times = [s.t_s for s in sampler.samples]
    figure, (memory_axis, cpu_axis) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    memory_axis.plot(times, [s.rss_bytes / MIB for s in sampler.samples], color="tab:blue")
    memory_axis.set_ylabel("RSS (MiB)")
    cpu = [s.cpu_percent for s in sampler.samples]
    cpu_axis.plot(times, cpu, color="tab:orange", alpha=0.3, linewidth=0.8, label="per sample")
    cpu_axis.plot(times, _rolling_mean(cpu, SMOOTHING_SAMPLES), color="tab:orange", label="rolling mean")
    cpu_axis.legend(loc="lower right", fontsize=8)
    cpu_axis.set_ylabel("CPU (% of one core)")
    cpu_axis.set_xlabel("seconds")
    gpu = [s.gpu_util_percent for s in sampler.samples]
    if any(v is not None for v in gpu):
        cpu_axis.plot(times, [v or 0 for v in gpu], color="tab:green", label="GPU util %")
        cpu_axis.legend(loc="upper right")
    for number, record in enumerate(sampler.phases):
        end = record.end_s if record.end_s is not None else times[-1]
        for axis in (memory_axis, cpu_axis):
            axis.axvspan(record.start_s, end, alpha=0.12, color=f"C{number % 10}")
        if end - record.start_s < 0.04 * times[-1]:
            continue  # too narrow to label
        memory_axis.text(
            (record.start_s + end) / 2,
            1.01,
            record.name,
            transform=memory_axis.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_compare(rows, path: Path) -> None:
    """Bar charts of decode speed, peak memory and bits per byte, one bar per successful model."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("ok")]
    names = [r["model"] for r in ok]
    charts = (
        ("tg_tokens_per_s", "decode tokens/s (higher is better)", 1),
        ("peak_rss_bytes", "peak RSS, MiB (lower is better)", MIB),
        ("bits_per_byte", "bits per byte (lower is better)", 1),
    )
    figure, axes = plt.subplots(1, len(charts), figsize=(4 * len(charts) + 1, 4))
    for axis, (key, title, scale) in zip(axes, charts):
        values = [(r.get(key) or 0) / scale for r in ok]
        axis.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.suptitle("llmkit compare")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_next_token(view: NextTokenView, path: str) -> None:
    """A PNG: one horizontal bar chart per setting, the top tokens in the model's order, cut ones grey."""
    import warnings

    plt = _pyplot()
    count = len(view.settings)
    columns = min(count, 3)
    lines = math.ceil(count / columns)
    rows_per_chart = len(view.settings[0].rows) if view.settings else 0
    fig, axes = plt.subplots(
        lines, columns, figsize=(4.2 * columns, 0.9 + 0.32 * rows_per_chart * lines + 0.6), squeeze=False, sharey=True
    )
    labels = [repr(row.token) for row in view.settings[0].rows] if view.settings else []
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    for ax, setting in zip(axes.flat, view.settings):
        ax.barh(
            range(len(setting.rows)),
            [row.tempered_prob if row.cut_by else 0.0 for row in setting.rows],
            color="#dddddd",
            hatch="//",
            edgecolor="#aaaaaa",
            linewidth=0,
        )  # what a filter took away
        ax.barh(range(len(setting.rows)), [row.prob for row in setting.rows], color="#3b75af")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # most likely on top (idempotent on shared axes, unlike invert)
        ax.set_xlim(0, 1)
        ax.set_title(
            f"{setting.label}\nentropy {setting.entropy_bits:.2f} bits · {setting.kept_tokens} kept", fontsize=9
        )
        for y, row in enumerate(setting.rows):
            note = f"cut by {row.cut_by}" if row.cut_by else f"{row.prob:.3f}"
            ax.text(
                min(max(row.prob, row.tempered_prob if row.cut_by else 0.0), 1) + 0.01, y, note, va="center", fontsize=7
            )
    fig.suptitle(
        f"Next token after {view.prompt!r} · {view.model} "
        "(blue: probability under the setting; hatched grey: cut by a filter)",
        fontsize=10,
    )
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs the font lacks (CJK, emoji) draw as boxes; no need to warn
        fig.savefig(path, dpi=120)
    plt.close(fig)
