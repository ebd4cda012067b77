"""One record per request, and one summary per load point, with vLLM's definitions (benchmarks/serve.py).

Per request (client clock, `time.perf_counter`, from the moment the request is sent, so time spent
waiting for a --max-concurrency slot is not in it):
  TTFT  send -> the first chunk that carries output
  E2E   send -> the last chunk that carries a choice (the usage chunk and [DONE] after it do not count)
  ITL   the gaps between successive output chunks (a chunk may hold several tokens; then its gap does too)
  TPOT  (E2E - TTFT) / (output tokens - 1), for requests with more than one output token

Per point: completed and failed requests (errors by kind), the wall time from the first request's
dispatch to the last one's end, requests/s, output tokens/s, total (prompt + output) tokens/s, and
the distributions of TTFT, TPOT, ITL (pooled over requests) and E2E. Goodput is the completed
requests that met every SLO given, per second; a request with a single output token has TPOT 0 for
it, as in vLLM. Percentiles interpolate linearly between closest ranks (numpy's default) and the
standard deviation is the population one (np.std), so figures match vLLM's on the same records.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import InvalidParams
from llmkit.measure import percentile

DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)
SLO_METRICS = ("ttft", "tpot", "e2e")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `sent_s` is from the point's start."""

    index: int
    ok: bool = False
    sent_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    output_chunks: int = 0
    usage: bool = False  # the token counts came from the server's usage
    output_counted_by: str | None = None  # "usage", "tokenizer" (the text re-encoded by the server) or "chunks"
    text: str = field(default="", repr=False)  # the output, kept to count its tokens when there is no usage
    error_kind: str | None = None  # "http_503", "timeout", "connection", "stream_error", "no_output", "protocol"
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None for one output token or fewer."""
        if (
            not self.ok
            or self.output_tokens is None
            or self.output_tokens < 2
            or self.ttft_s is None
            or self.e2e_s is None
        ):
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        return {
            "index": self.index,
            "ok": self.ok,
            "sent_ms": ms(self.sent_s),
            "ttft_ms": ms(self.ttft_s),
            "tpot_ms": ms(self.tpot_s),
            "e2e_ms": ms(self.e2e_s),
            "itl_ms": [ms(gap) for gap in self.itl_s],
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "output_chunks": self.output_chunks,
            "output_counted_by": self.output_counted_by,
            "usage": self.usage,
            "error_kind": self.error_kind,
            "error": self.error,
        }


# --- distributions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """Mean, median, population standard deviation and the chosen percentiles of some latencies (seconds)."""

    count: int
    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]

    def to_ms(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "count": self.count,
            "mean": round(self.mean * 1000, 3),
            "median": round(self.median * 1000, 3),
            "std": round(self.std * 1000, 3),
        }
        for q, value in self.percentiles:
            record[percentile_key(q)] = round(value * 1000, 3)
        return record

    def at(self, q: float) -> float:
        return dict(self.percentiles)[q]


def percentile_key(q: float) -> str:
    """90 -> "p90", 99.9 -> "p99.9"."""
    return f"p{q:g}"


def distribution(values: Sequence[float], percentiles: Sequence[float]) -> Distribution | None:
    if not values:
        return None
    return Distribution(
        count=len(values),
        mean=statistics.fmean(values),
        median=statistics.median(values),
        std=statistics.pstdev(values) if len(values) > 1 else 0.0,
        percentiles=tuple((q, percentile(values, q)) for q in percentiles),
    )


def parse_percentiles(text: str) -> tuple[float, ...]:
    """`90,95,99` -> (90.0, 95.0, 99.0): each above 0 and at most 100, kept in the order given, no repeats."""
    values: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InvalidParams(
                f"--percentiles must be numbers separated by commas, like 50,90,99 (got {text!r})", field="percentiles"
            ) from None
        if not 0 < value <= 100 or math.isnan(value):
            raise InvalidParams(
                f"--percentiles must each be above 0 and at most 100 (got {part.strip()})", field="percentiles"
            )
        if value not in values:
            values.append(value)
    return tuple(values)


def parse_slo(text: str) -> dict[str, float]:
    """`ttft:200,tpot:50,e2e:2000` (milliseconds) -> {"ttft": 200.0, ...}."""
    slo: dict[str, float] = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*([a-zA-Z0-9]+)\s*[:=]\s*([0-9.]+)\s*(ms)?\s*", part)
        name = match.group(1).lower() if match else ""
        name = "e2e" if name in ("e2el", "e2e") else name
        if not match or name not in SLO_METRICS:
            raise InvalidParams(
                f"--slo must be metric:milliseconds pairs separated by commas, metrics from "
                f"{', '.join(SLO_METRICS)} (got {text!r})",
                field="slo",
            )
        try:
            value = float(match.group(2))
        except ValueError:
            raise InvalidParams(
                f"--slo {name} must be a number of milliseconds (got {match.group(2)!r})", field="slo"
            ) from None
        if value <= 0:
            raise InvalidParams(f"--slo {name} must be above 0 ms (got {match.group(2)})", field="slo")
        slo[name] = value
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Every SLO met (milliseconds, inclusive); TPOT counts as 0 for one output token, as vLLM has it."""
    if not record.ok:
        return False
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2e": record.e2e_s}
    for name, limit in slo.items():
        value = measured[name]
        if value is None or value * 1000 > limit:
            return False
    return True


# --- one load point ------------------------------------------------------------------------------------


@dataclass
class PointSummary:
    completed: int
    failed: int
    cancelled: int  # sent or waiting when Ctrl-C stopped the run: neither completed nor failed
    errors: dict[str, int]
    error_samples: dict[str, str]
    duration_s: float
    total_input_tokens: int | None  # None when some prompt's count is unknown (no usage, no tokenizer)
    total_output_tokens: int
    output_chunks: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float | None
    output_chunk_throughput: float
    request_goodput: float | None
    peak_concurrency: int
    latency: dict[str, Distribution | None]  # ttft, tpot, itl, e2e

    def to_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "errors": dict(self.errors),
            "error_samples": dict(self.error_samples),
            "duration_s": round(self.duration_s, 4),
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "output_chunks": self.output_chunks,
            "request_throughput": _round(self.request_throughput),
            "output_throughput": _round(self.output_throughput),
            "total_token_throughput": _round(self.total_token_throughput),
            "output_chunk_throughput": _round(self.output_chunk_throughput),
            "request_goodput": _round(self.request_goodput),
            "peak_concurrency": self.peak_concurrency,
            **{f"{name}_ms": (dist.to_ms() if dist else None) for name, dist in self.latency.items()},
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    percentiles: Sequence[float],
    slo: dict[str, float] | None = None,
    cancelled: int = 0,
) -> PointSummary:
    """A point's figures from its records (the failed ones included) and its wall time."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for record in failed:
        kind = record.error_kind or "error"
        errors[kind] = errors.get(kind, 0) + 1
        samples.setdefault(kind, record.error or kind)
    prompt_counts = [r.prompt_tokens for r in done]
    total_input = sum(c for c in prompt_counts if c is not None) if all(c is not None for c in prompt_counts) else None
    total_output = sum(r.output_tokens or 0 for r in done)
    chunks = sum(r.output_chunks for r in done)
    per_s = (lambda amount: amount / duration_s) if duration_s > 0 else (lambda amount: 0.0)
    latency = {
        "ttft": distribution([r.ttft_s for r in done if r.ttft_s is not None], percentiles),
        "tpot": distribution([t for t in (r.tpot_s for r in done) if t is not None], percentiles),
        "itl": distribution([gap for r in done for gap in r.itl_s], percentiles),
        "e2e": distribution([r.e2e_s for r in done if r.e2e_s is not None], percentiles),
    }
    return PointSummary(
        completed=len(done),
        failed=len(failed),
        cancelled=cancelled,
        errors=errors,
        error_samples=samples,
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        output_chunks=chunks,
        request_throughput=per_s(len(done)),
        output_throughput=per_s(total_output),
        total_token_throughput=None if total_input is None else per_s(total_input + total_output),
        output_chunk_throughput=per_s(chunks),
        request_goodput=per_s(sum(meets_slo(r, slo) for r in done)) if slo else None,
        peak_concurrency=peak_concurrency(done),
        latency=latency,
    )


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at once (half-open intervals [sent, sent + E2E))."""
    events = sorted(
        [(r.sent_s, 1) for r in records if r.e2e_s is not None]
        + [(r.sent_s + r.e2e_s, -1) for r in records if r.e2e_s is not None]
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak
