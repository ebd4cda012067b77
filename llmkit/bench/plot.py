"""`llmkit bench --plot FILE`: throughput against latency across the sweep, one marker per load point.

The picture people want from a load test: as the load grows, how much more comes out (output
tokens/s, x) and what each user pays for it (latency, y). Two panels share the x axis: TTFT and
TPOT, each as its median (solid) and its highest chosen percentile (dashed), every point labelled
with the swept value. matplotlib is imported here only (the optional `plot` extra); the CLI checks
it is installed before anything runs (llmkit.plots.require_matplotlib).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def point_label(point: dict[str, Any], axis: str | None) -> str:
    if axis == "request_rate":
        return "inf" if point["request_rate"] is None else f"{point['request_rate']:g}/s"
    if axis == "burstiness":
        return "inf" if point["burstiness"] is None else f"b {point['burstiness']:g}"
    return "inf" if point["max_concurrency"] is None else f"c {point['max_concurrency']}"


def plot_sweep(report: dict[str, Any], path: Path) -> None:
    """A PNG from the report's JSON document (runner.BenchReport.to_dict())."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    points = [p for p in report["points"] if p["completed"]]
    top = f"p{report['percentiles'][-1]:g}" if report["percentiles"] else "median"
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (metric, title) in zip(axes, (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"))):
        x = [p["output_throughput"] for p in points]
        for stat, linestyle, marker in (("median", "solid", "o"), (top, "dashed", "s")):
            y = [p[metric][stat] if p[metric] else math.nan for p in points]
            axis.plot(x, y, linestyle=linestyle, marker=marker, label=stat)
        for p, xv in zip(points, x):
            if p[metric]:
                axis.annotate(
                    point_label(p, report["sweep"]),
                    (xv, p[metric]["median"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
        axis.set_xlabel("output tokens/s")
        axis.set_ylabel(title)
        axis.set_title(f"{title} against throughput", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    target = report["target"]
    figure.suptitle(
        f"llmkit bench · {target.get('model') or ''} at {target['url']} ({target['kind']}) · {report['api']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
