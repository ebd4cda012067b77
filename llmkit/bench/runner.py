"""The load loop: probe the target once, build the prompts, warm up, then run each load point of the sweep.

A point is a concurrency limit, a request rate and a burstiness. `run_point` follows vLLM's
`benchmark()`: requests go out on the seeded arrival schedule (workload.arrival_offsets), each as
its own task that first waits for a --max-concurrency slot, so the time waiting for a slot is
not counted in its TTFT; the point's wall time runs from the first dispatch to the last answer.
Each point gets a fresh connection pool sized to its concurrency (as vLLM's connector is), the same
prompts and the same arrival seed, so points differ only in the load.

Warm-up requests (the first prompts, not counted) run once, before the first point. Ctrl-C stops
dispatching, cancels what is in flight and returns what was gathered, marked interrupted; a
second Ctrl-C ends the program at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmkit.bench import ceiling, workload
from llmkit.bench.client import (
    Dialect,
    Endpoint,
    ServerTokenizer,
    ShardedClient,
    choose_model,
    new_client,
    probe_request,
    served_models,
    stream_request,
)
from llmkit.bench.metrics import DEFAULT_PERCENTILES, PointSummary, RequestRecord, summarize
from llmkit.bench.workload import LengthRange, Prompt
from llmkit.errors import InvalidParams, LlmkitError

SCHEMA_VERSION = 1
DEFAULT_NUM_PROMPTS = 100
DEFAULT_WARMUP = 1
DEFAULT_REQUEST_TIMEOUT_S = 600.0
CALIBRATION_WORDS = (8, 32)  # two short probe prompts (tiny test models have 256-token contexts): tokens per word
# without the chat template's constant share
FALLBACK_TOKENS_PER_WORD = 1.3  # sizes word prompts only when the server tells nothing; never reported
SWEEP_AXES = {"max-concurrency": "max_concurrency", "request-rate": "request_rate", "burstiness": "burstiness"}


# --- the plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPoint:
    max_concurrency: int | None = None  # None: no limit
    request_rate: float = math.inf
    burstiness: float = 1.0

    def label(self) -> str:
        concurrency = "inf" if self.max_concurrency is None else str(self.max_concurrency)
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}/s"
        return f"concurrency {concurrency}, rate {rate}" + (
            "" if self.burstiness == 1 else f", burstiness {self.burstiness:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_concurrency": self.max_concurrency,
            "request_rate": None if math.isinf(self.request_rate) else self.request_rate,
            "burstiness": None if math.isinf(self.burstiness) else self.burstiness,
        }


def parse_rate(text: str, flag: str = "--request-rate") -> float:
    """`inf` or a positive number of requests per second."""
    try:
        value = float(text)
    except ValueError:
        raise InvalidParams(
            f"{flag} must be a number of requests per second or inf (got {text!r})", field="request_rate"
        ) from None
    if not value > 0:
        raise InvalidParams(f"{flag} must be above 0 (got {text})", field="request_rate")
    return value


def check_concurrency(value: int | None, flag: str = "--max-concurrency") -> int | None:
    if value is not None and value < 1:
        raise InvalidParams(f"{flag} must be at least 1 (got {value})", field="max_concurrency")
    return value


def check_burstiness(value: float, flag: str = "--burstiness") -> float:
    if not value > 0:
        raise InvalidParams(f"{flag} must be above 0 (1: Poisson arrivals; got {value:g})", field="burstiness")
    return value


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`max-concurrency=1,2,4` / `request-rate=1,2,inf` / `burstiness=0.5,1,2` -> (field, values)."""
    name, sep, values = text.partition("=")
    name = name.strip().lstrip("-").replace("_", "-")
    if not sep or name not in SWEEP_AXES or not values.strip():
        raise InvalidParams(
            f"--sweep must be AXIS=V1,V2,... with AXIS one of {', '.join(SWEEP_AXES)} "
            f"(got {text!r}), e.g. --sweep max-concurrency=1,2,4,8",
            field="sweep",
        )
    parsed: list[Any] = []
    for part in values.split(","):
        part = part.strip()
        if name == "max-concurrency":
            if part.lower() in ("inf", "none", "unlimited"):
                parsed.append(None)
                continue
            try:
                parsed.append(check_concurrency(int(part), "--sweep max-concurrency"))
            except ValueError:
                raise InvalidParams(
                    f"--sweep max-concurrency values must be whole numbers or inf (got {part!r})", field="sweep"
                ) from None
        elif name == "request-rate":
            parsed.append(parse_rate(part, "--sweep request-rate"))
        else:
            try:
                parsed.append(check_burstiness(float(part), "--sweep burstiness"))
            except ValueError:
                raise InvalidParams(
                    f"--sweep burstiness values must be numbers (got {part!r})", field="sweep"
                ) from None
    return SWEEP_AXES[name], parsed


def build_points(base: LoadPoint, sweep: tuple[str, list[Any]] | None) -> list[LoadPoint]:
    if sweep is None:
        return [base]
    axis, values = sweep
    return [LoadPoint(**{**base.__dict__, axis: value}) for value in values]


@dataclass(frozen=True)
class BenchSpec:
    """Everything a run needs, validated by the CLI before anything is sent."""

    points: tuple[LoadPoint, ...]
    num_prompts: int | None = DEFAULT_NUM_PROMPTS  # None with a dataset: each line once
    input_len: LengthRange = LengthRange(workload.DEFAULT_INPUT_LEN, workload.DEFAULT_INPUT_LEN)
    output_len: LengthRange = LengthRange(workload.DEFAULT_OUTPUT_LEN, workload.DEFAULT_OUTPUT_LEN)
    dataset: tuple[Prompt, ...] | None = None
    dataset_path: str | None = None
    api: str = "completions"
    temperature: float = 0.0
    ignore_eos: bool = True
    warmup: int = DEFAULT_WARMUP
    seed: int = 0
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    slo: dict[str, float] | None = None
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    sweep_axis: str | None = None

    def workload_dict(self, prompts: list[Prompt], prompt_source: str) -> dict[str, Any]:
        return {
            "source": "dataset" if self.dataset is not None else "random",
            "dataset": self.dataset_path,
            "prompt_builder": prompt_source,
            "num_prompts": len(prompts),
            "input_len": None if self.dataset is not None else self.input_len.to_list(),
            "output_len": [min(p.max_tokens for p in prompts), max(p.max_tokens for p in prompts)]
            if prompts
            else self.output_len.to_list(),
            "seed": self.seed,
            "warmup": self.warmup,
            "temperature": self.temperature,
            "request_timeout_s": self.request_timeout_s,
        }


# --- what a run gives back ------------------------------------------------------------------------------


@dataclass
class PointResult:
    point: LoadPoint
    summary: PointSummary
    records: list[RequestRecord]
    interrupted: bool = False

    @property
    def ceiling_share(self) -> float:
        return ceiling.ceiling_share(self.summary.request_throughput, self.summary.output_chunk_throughput)

    @property
    def near_ceiling(self) -> bool:
        return ceiling.near_ceiling(self.summary.request_throughput, self.summary.output_chunk_throughput)

    def token_sources(self, api: str, tokenizer: str | None) -> dict[str, str]:
        """Where the point's token counts came from: "usage", "<name> tokenizer", "chunks" or "unknown"."""
        done = [r for r in self.records if r.ok]
        names = {"usage": "usage", "tokenizer": f"{tokenizer} tokenizer", "chunks": "chunks"}
        outputs = sorted({names[r.output_counted_by or "chunks"] for r in done}, key=list(names.values()).index)
        inputs = sorted(
            {
                "usage" if r.usage else (f"{tokenizer} tokenizer" if r.prompt_tokens is not None else "unknown")
                for r in done
            }
        )
        return {"input": " and ".join(inputs) or "-", "output": " and ".join(outputs) or "-"}

    def to_dict(self, *, api: str, tokenizer: str | None, detailed: bool) -> dict[str, Any]:
        record = {
            **self.point.to_dict(),
            "label": self.point.label(),
            "interrupted": self.interrupted,
            **self.summary.to_dict(),
            "token_counts": self.token_sources(api, tokenizer),
            "client_ceiling_share": round(self.ceiling_share, 4),
            "near_client_ceiling": self.near_ceiling,
        }
        if detailed:
            record["requests"] = [r.to_dict() for r in self.records]
        return record


@dataclass
class BenchReport:
    target: dict[str, Any]
    workload: dict[str, Any]
    spec: BenchSpec
    tokenizer: str | None
    ignore_eos: str  # "sent", "refused by the server", "off"
    usage: bool | None
    started_at: str
    points: list[PointResult] = field(default_factory=list)
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self, *, detailed: bool = False) -> dict[str, Any]:
        from llmkit import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "llmkit_version": __version__,
            "started_at": self.started_at,
            "target": self.target,
            "api": self.spec.api,
            "workload": self.workload,
            "server": {"tokenizer": self.tokenizer, "ignore_eos": self.ignore_eos, "usage": self.usage},
            "percentiles": list(self.spec.percentiles),
            "slo_ms": dict(self.spec.slo) if self.spec.slo else None,
            "sweep": self.spec.sweep_axis,
            "client_ceiling": ceiling.CLIENT_CEILING.to_dict(),
            "interrupted": self.interrupted,
            "notes": list(self.notes),
            "points": [p.to_dict(api=self.spec.api, tokenizer=self.tokenizer, detailed=detailed) for p in self.points],
        }


class Progress:
    """What the runner tells whoever shows progress; these defaults show nothing (render_bench draws it)."""

    def stage(self, text: str) -> None: ...

    def start_point(self, label: str, total: int) -> None: ...

    def request_done(self, ok: bool) -> None: ...

    def end_point(self) -> None: ...


# --- running ---------------------------------------------------------------------------------------------


def run(endpoint: Endpoint, spec: BenchSpec, target: dict[str, Any], progress: Progress | None = None) -> BenchReport:
    """Run the whole plan; Ctrl-C returns the partial report (interrupted) once a point has begun."""
    return asyncio.run(_run(endpoint, spec, target, progress or Progress()))


async def _run(endpoint: Endpoint, spec: BenchSpec, target: dict[str, Any], progress: Progress) -> BenchReport:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C: Python's own KeyboardInterrupt

    try:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        pass
    try:
        return await _plan_and_run(endpoint, spec, target, progress, stop)
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError, ValueError):
            pass


@dataclass
class Plan:
    """What the probes found and the prompts built from it: everything the load points share."""

    endpoint: Endpoint
    dialect: Dialect
    tokenizer: ServerTokenizer | None
    prompts: list[Prompt]
    builder: str  # how the prompts were made, for the report
    notes: list[str]


async def _plan_and_run(
    endpoint: Endpoint, spec: BenchSpec, target: dict[str, Any], progress: Progress, stop: asyncio.Event
) -> BenchReport:
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    async with new_client(max_connections=None, timeout_s=spec.request_timeout_s) as client:
        plan = await _plan(client, endpoint, spec, progress, stop)
        if spec.warmup:
            progress.stage(f"warming up with {spec.warmup} request{'s' if spec.warmup != 1 else ''}")
            await _warm_up(client, plan, spec, stop)
    dialect, tokenizer = plan.dialect, plan.tokenizer
    ignore_eos = (
        "off"
        if not spec.ignore_eos
        else ("refused by the server, not sent" if "ignore_eos" in dialect.refused else "sent")
    )
    if dialect.usage is False:
        plan.notes.append(
            "the server sent no usage: "
            + (
                f"token counts are its tokenizer's ({tokenizer.name})"
                if tokenizer
                else "output token counts are streamed chunk counts, and prompt token counts are unknown"
            )
        )
    report = BenchReport(
        target={**target, "model": plan.endpoint.model},
        workload=spec.workload_dict(plan.prompts, plan.builder),
        spec=spec,
        tokenizer=tokenizer.name if tokenizer else None,
        ignore_eos=ignore_eos,
        usage=dialect.usage,
        started_at=started_at,
        notes=plan.notes,
    )
    for point in spec.points:
        if stop.is_set():
            break
        result = await run_point(plan.endpoint, dialect, plan.prompts, point, spec, progress, stop)
        if tokenizer is not None and any(r.ok and not r.usage for r in result.records):
            progress.stage("counting output tokens with the server's tokenizer")
            async with new_client(max_connections=None, timeout_s=spec.request_timeout_s) as counting:
                await count_output_tokens(tokenizer.using(counting), result, spec)
        report.points.append(result)
        if result.interrupted:
            report.interrupted = True
            break
    if stop.is_set() and not report.points:
        raise KeyboardInterrupt
    return report


async def _plan(client, endpoint: Endpoint, spec: BenchSpec, progress: Progress, stop: asyncio.Event) -> Plan:
    """Probe the server (models, tokenizer, a first request), then build or read the prompts."""
    progress.stage(f"asking {endpoint.root} for its models")
    endpoint = endpoint.with_model(choose_model(endpoint, await served_models(client, endpoint)))
    dialect = Dialect(spec.api, endpoint.model, spec.temperature, spec.ignore_eos)
    progress.stage("looking for the server's tokenizer")
    tokenizer = await ServerTokenizer.find(client, endpoint)
    _stop_check(stop)
    progress.stage("sending a first request")
    words = workload.reference_words()
    first = await probe_request(
        client, endpoint, dialect, Prompt(" ".join(words[: CALIBRATION_WORDS[0]]), None, 1).body(spec.api), 2
    )
    _stop_check(stop)
    notes: list[str] = []
    count = spec.num_prompts or DEFAULT_NUM_PROMPTS
    if spec.dataset is not None:
        prompts = workload.cycle_to(list(spec.dataset), spec.num_prompts)
        builder = "dataset"
        if tokenizer is not None and spec.api == "completions":
            progress.stage("counting the dataset's prompt tokens with the server's tokenizer")
            prompts = await workload.count_prompt_tokens(tokenizer, prompts)
    elif tokenizer is not None:
        progress.stage(f"building {count} prompts with the server's tokenizer ({tokenizer.name})")
        prompts = await workload.build_token_prompts(tokenizer, count, spec.input_len, spec.output_len, spec.seed)
        builder = f"random tokens ({tokenizer.name} tokenizer)"
    else:
        per_word = await _tokens_per_word(client, endpoint, dialect, first, words)
        if per_word is None:
            notes.append(
                "prompt lengths are approximate: the server has neither a tokenizer endpoint nor usage, "
                f"so words were sized at {FALLBACK_TOKENS_PER_WORD} tokens each"
            )
        prompts = workload.build_word_prompts(
            count, spec.input_len, spec.output_len, spec.seed, per_word or FALLBACK_TOKENS_PER_WORD
        )
        builder = (
            f"random words (sized by the server's usage: {per_word:.2f} tokens per word)"
            if per_word
            else "random words"
        )
    if spec.api == "chat":  # the chat template adds tokens: only the server's usage can count them
        prompts = [Prompt(p.text, p.messages, p.max_tokens, None) for p in prompts]
    _stop_check(stop)
    return Plan(endpoint, dialect, tokenizer, prompts, builder, notes)


async def count_output_tokens(tokenizer, result: PointResult, spec: BenchSpec) -> None:
    """For a server without usage: each output's tokens, its text re-encoded by the server's tokenizer (after
    the point, so the counting costs the measurement nothing); the summary is made again with them."""
    limit = asyncio.Semaphore(workload.TOKENIZE_CONCURRENCY)
    added = await tokenizer.encode("")

    async def one(record: RequestRecord) -> None:
        async with limit:
            record.output_tokens = len(workload.without_added(await tokenizer.encode(record.text), added))
            record.output_counted_by = "tokenizer"

    await asyncio.gather(*(one(r) for r in result.records if r.ok and not r.usage))
    result.summary = summarize(
        result.records,
        result.summary.duration_s,
        percentiles=spec.percentiles,
        slo=spec.slo,
        cancelled=result.summary.cancelled,
    )


def _stop_check(stop: asyncio.Event) -> None:
    if stop.is_set():
        raise KeyboardInterrupt


async def _tokens_per_word(
    client, endpoint: Endpoint, dialect: Dialect, first: RequestRecord, words: list[str]
) -> float | None:
    """The server's prompt tokens per word of the reference text, from the usage of two probe prompts (so
    the chat template's constant tokens cancel out); None when the server sends no usage."""
    if not first.usage or first.prompt_tokens is None:
        return None
    small, large = CALIBRATION_WORDS
    try:
        second = await probe_request(
            client, endpoint, dialect, Prompt(" ".join(words[:large]), None, 1).body(dialect.api), 2
        )
    except LlmkitError:  # e.g. a context too short for it: the first probe's ratio will do
        return first.prompt_tokens / small
    if not second.usage or second.prompt_tokens is None or second.prompt_tokens <= first.prompt_tokens:
        return first.prompt_tokens / small
    return (second.prompt_tokens - first.prompt_tokens) / (large - small)


async def _warm_up(client, plan: Plan, spec: BenchSpec, stop: asyncio.Event) -> None:
    """The first prompts, sent at the first point's concurrency; their answers are dropped."""
    limit = asyncio.Semaphore(spec.points[0].max_concurrency or spec.warmup)
    endpoint, dialect = plan.endpoint, plan.dialect

    async def one(index: int) -> None:
        prompt = plan.prompts[index % len(plan.prompts)]
        async with limit:
            await stream_request(
                client,
                endpoint.api_base + dialect.path,
                dialect.body(prompt.body(dialect.api), prompt.max_tokens),
                endpoint.headers(),
                index=-1,
                timeout_s=spec.request_timeout_s,
            )

    tasks = [asyncio.ensure_future(one(i)) for i in range(spec.warmup)]
    await _until_done_or_stopped(tasks, stop)


async def _until_done_or_stopped(tasks: Sequence[asyncio.Future[Any]], stop: asyncio.Event) -> bool:
    """Wait for every task, or for `stop`: then cancel the rest. True when stopped."""
    if not tasks:
        return stop.is_set()
    waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    everything: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
    try:
        await asyncio.wait([everything, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if everything.done():
        return False
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    everything.cancel()
    await asyncio.gather(everything, return_exceptions=True)
    return True


async def run_point(
    endpoint: Endpoint,
    dialect: Dialect,
    prompts: list[Prompt],
    point: LoadPoint,
    spec: BenchSpec,
    progress: Progress,
    stop: asyncio.Event | None = None,
) -> PointResult:
    """Every prompt once, at this point's load; the records of those that finished and the summary."""
    stop = stop or asyncio.Event()
    offsets = workload.arrival_offsets(len(prompts), point.request_rate, point.burstiness, spec.seed)
    limit = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
    url, headers = endpoint.api_base + dialect.path, endpoint.headers()
    bodies = [dialect.body(p.body(dialect.api), p.max_tokens) for p in prompts]
    records: list[RequestRecord] = []
    progress.start_point(point.label(), len(prompts))

    async with ShardedClient(
        max_connections=point.max_concurrency, expected_requests=len(prompts), timeout_s=spec.request_timeout_s
    ) as client:
        start = time.perf_counter()

        async def one(index: int) -> None:
            async with limit if limit is not None else contextlib.nullcontext():
                outcome = await stream_request(
                    client,
                    url,
                    bodies[index],
                    headers,
                    index=index,
                    timeout_s=spec.request_timeout_s,
                    point_start=start,
                    prompt_tokens=prompts[index].prompt_tokens,
                )
            records.append(outcome.record)
            progress.request_done(outcome.record.ok)

        tasks: list[asyncio.Future] = []
        stopped = False
        for index, offset in enumerate(offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            if stop.is_set():
                stopped = True
                break
            tasks.append(asyncio.ensure_future(one(index)))
        stopped = await _until_done_or_stopped(tasks, stop) or stopped
        duration = time.perf_counter() - start
    progress.end_point()
    records.sort(key=lambda r: r.index)
    summary = summarize(
        records, duration, percentiles=spec.percentiles, slo=spec.slo, cancelled=len(prompts) - len(records)
    )
    return PointResult(point, summary, records, interrupted=stopped)
