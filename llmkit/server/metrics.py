"""Prometheus metrics for one app, in the app's own CollectorRegistry (no process globals, so two apps in
one process, as in the tests, never share counters). Names follow Prometheus conventions and vLLM's
where one exists (time to first token, prompt and generation token counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total...: what `llmkit monitor -m URL` reads (Linux)
        ProcessCollector(registry=registry)
        self.requests = Counter(
            "llmkit_requests", "HTTP requests by route and status code.", ["route", "status"], registry=registry
        )
        self.latency = Histogram(
            "llmkit_request_duration_seconds",
            "Request arrival to the last byte sent.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llmkit_time_to_first_token_seconds",
            "Request arrival to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "llmkit_queue_time_seconds",
            "Request arrival to admission into the batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("llmkit_prompt_tokens", "Prompt tokens of completed requests.", registry=registry)
        self.generation_tokens = Counter(
            "llmkit_generation_tokens", "Generated tokens of completed requests.", registry=registry
        )
        self.ended = Counter(
            "llmkit_requests_ended",
            "Generation requests that did not complete, by reason "
            "(disconnect, timeout, shutdown, queue_full, rate_limited, error).",
            ["reason"],
            registry=registry,
        )
        self.steps = Histogram(
            "llmkit_step_duration_seconds",
            "One forward pass of the batch loop.",
            ["kind"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.step_rows = Histogram(
            "llmkit_batch_rows",
            "Sequences in each decode step (the batch size).",
            buckets=ROW_BUCKETS,
            registry=registry,
        )
        self.waiting = Gauge(
            "llmkit_queue_waiting_requests", "Requests waiting for room in the batch.", registry=registry
        )
        self.running = Gauge("llmkit_running_sequences", "Sequences in the running batch.", registry=registry)
        self.ready = Gauge(
            "llmkit_model_ready", "1 once the model is loaded and the batch loop runs.", registry=registry
        )

    def bind(
        self,
        waiting: Callable[[], float],
        running: Callable[[], float],
        ready: Callable[[], float],
        failures: Callable[[], Any] | None = None,
        prefix_cache: Callable[[], Any] | None = None,
    ) -> None:
        """Gauges read live values when scraped; `failures` returns the scheduler's FailureLog (or None),
        `prefix_cache` its PrefixCache (None: off, and its metrics are left out)."""
        self.waiting.set_function(waiting)
        self.running.set_function(running)
        self.ready.set_function(ready)
        if failures is not None:
            self.registry.register(_FailureCounts(failures))
        if prefix_cache is not None:
            self.registry.register(_PrefixCacheMetrics(prefix_cache))

    def observe_step(self, kind: str, rows: int, seconds: float) -> None:
        """The batch loop's hook (called on the inference thread; prometheus_client is thread-safe)."""
        self.steps.labels(kind).observe(seconds)
        if kind == "decode":
            self.step_rows.observe(rows)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PrefixCacheMetrics:
    """llmkit_prefix_cache_*: how often requests found a prefix, how many prompt tokens it saved, and what the
    cache holds, read from the scheduler's PrefixCache when scraped. Hit rate by tokens:
    cached_tokens_total / prompt_tokens_total."""

    COUNTERS = (
        ("lookups", "Requests that looked for a cached prefix of their prompt."),
        ("hits", "Requests that reused a cached prefix."),
        ("prompt_tokens", "Prompt tokens of the requests that looked."),
        ("cached_tokens", "Prompt tokens whose KV came from the cache instead of being computed."),
        ("evictions", "Entries dropped to stay within --prefix-cache-mb."),
    )

    def __init__(self, cache: Callable[[], Any]):
        self.cache = cache

    def collect(self) -> Iterator[Any]:
        cache = self.cache()
        if cache is None:
            return
        stats = cache.stats
        values = {
            "lookups": stats.lookups,
            "hits": stats.hits,
            "prompt_tokens": stats.prompt_tokens,
            "cached_tokens": stats.cached_tokens,
            "evictions": stats.evicted,
        }
        for name, text in self.COUNTERS:
            yield CounterMetricFamily(f"llmkit_prefix_cache_{name}", text, value=values[name])
        yield GaugeMetricFamily("llmkit_prefix_cache_bytes", "Bytes of KV the prefix cache holds.", value=cache.bytes)
        yield GaugeMetricFamily(
            "llmkit_prefix_cache_capacity_bytes", "The prefix cache's bound (--prefix-cache-mb).", value=cache.max_bytes
        )
        yield GaugeMetricFamily("llmkit_prefix_cache_entries", "Prefixes the cache holds.", value=len(cache))


class _FailureCounts:
    """llmkit_failures_total{scope="step"|"request"}, read from the scheduler's FailureLog when scraped."""

    def __init__(self, failures: Callable[[], Any]):
        self.failures = failures

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "llmkit_failures",
            "Generation failures: 'step' is a shared forward pass that "
            "failed every request in it; 'request' is one request that failed alone.",
            labels=["scope"],
        )
        log = self.failures()
        family.add_metric(["step"], log.steps if log else 0)
        family.add_metric(["request"], log.requests if log else 0)
        yield family
