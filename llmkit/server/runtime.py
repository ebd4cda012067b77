"""The model's life inside the server, and the bridge between asyncio and the inference thread.

One thread owns the model: it loads it (so /health can answer 503 "loading" meanwhile)
and then runs the loop of the engine's scheduler (Engine.scheduler) for the life of the server:
a batcher that decodes many requests in one forward pass (BatchScheduler for transformers,
LlamaCppBatchScheduler for llama.cpp), or one request at a time (SerialScheduler, for an engine
without a batcher). Nothing on the
asyncio side calls the model; handlers tokenize, submit a BatchRequest and await its
events, which the loop hands over with `loop.call_soon_threadsafe` into an
asyncio.Queue per request. This is the shape transformers' serving code argues for
(serving/utils.py): torch work off the event loop, on one thread, so the loop stays
responsive for health checks, streams and new connections.

Health: "loading" until the model is ready; then 503 if the loop thread is dead, or if
it is busy and has not finished a step for `stall_after_s` (a heartbeat). A failed shared
forward pass (every request in it failed) makes the status "degraded" (still 200) until a
step works again, and "failing" (503) after FAILING_AFTER_STEPS in a row; a request that
failed alone only counts. /health shows both counts and the last failure.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from llmkit.engine.types import Chunk
from llmkit.errors import InvalidParams, LlmkitError, ModelNotReady, UnsupportedFeature
from llmkit.server.settings import ServerSettings
from llmkit.server.tokens import TokenText, check_token_ids

if TYPE_CHECKING:
    from llmkit.engine.base import Engine
    from llmkit.engine.scheduling import Scheduler

log = logging.getLogger("llmkit.server")


ENDED_BY = {"timeout": "timeout", "shutting_down": "shutdown", "cancelled": "disconnect"}  # error kind -> reason
FAILING_AFTER_STEPS = 3  # forward passes failed in a row before /health answers 503 "failing"


def _prefix_cache_fields(cache) -> dict[str, Any] | None:
    """What the prefix cache holds and how often it helped (None: off); /metrics has the counters."""
    if cache is None:
        return None
    stats = cache.stats
    return {
        "entries": len(cache),
        "mb": round(cache.bytes / 2**20, 1),
        "capacity_mb": round(cache.max_bytes / 2**20, 1),
        "token_hit_rate": round(stats.cached_tokens / stats.prompt_tokens, 3) if stats.prompt_tokens else None,
    }


def _failure_fields(failures) -> dict[str, Any]:
    """/health's account of what failed: counts, and the last failure with its age."""
    fields: dict[str, Any] = {"failed_steps": failures.steps, "failed_requests": failures.requests}
    if failures.last is not None:
        at, scope, error = failures.last
        fields["last_failure"] = {"scope": scope, "error": error, "seconds_ago": round(time.monotonic() - at, 1)}
    return fields


@dataclass
class Job:
    """One submitted request as the asyncio side sees it."""

    request: Any  # BatchRequest
    queue: asyncio.Queue
    finished: bool = False
    ended_by: str | None = None  # disconnect / timeout / shutdown / error, for metrics and the access log
    recorded: bool = False  # its outcome went into the metrics

    def cancel(self, reason: str) -> None:
        if not self.finished:
            self.ended_by = self.ended_by or reason
            self.request.cancel(reason)


class ModelHost:
    """Loads the engine on the inference thread, runs its scheduler's loop there, and answers health questions."""

    def __init__(self, engine_or_loader, settings: ServerSettings, on_step: Callable | None = None):
        self._engine_or_loader = engine_or_loader
        self.settings = settings
        self.on_step = on_step
        self.state = "loading"  # loading -> ready -> stopping; or error
        self.error: str | None = None
        self.engine: Engine | None = None  # set once loaded: every route runs after /health says ready
        self.scheduler: Scheduler | None = None
        self.started_at = time.monotonic()
        self.created = time.time()
        self.on_fatal: Callable[[str], None] | None = None  # the CLI stops uvicorn when the model cannot load
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="llmkit-inference", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            engine = self._engine_or_loader
            if not hasattr(engine, "tokenizer"):  # a loader: load here, on the thread that will own the model
                engine = engine()
            scheduler = self._scheduler_for(engine)
            engine.max_prompt_chars  # noqa: B018 (computed once here, not on the first request: 0.3 s for 262k entries)
        except LlmkitError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:
            log.exception("model loading failed")
            self._fail(f"could not load the model: {type(exc).__name__}: {exc}")
            return
        self.engine, self.scheduler = engine, scheduler
        if self.state == "loading":
            self.state = "ready"
            log.info(
                "model %s ready on %s (%s, threads %s), loaded in %.1f s",
                engine.info.model,
                engine.info.device,
                engine.info.dtype,
                engine.info.threads,
                engine.info.load_s,
                extra={"event": "ready", "threads": engine.info.threads},
            )
        scheduler.run_forever()
        if self.state == "ready":
            log.error("the generation loop stopped unexpectedly")

    def _scheduler_for(self, engine):
        """The engine's own scheduler (Engine.scheduler: a batcher, or one request at a time), with the prefix cache
        when the engine can use one."""
        capabilities = engine.info.capabilities
        prefix_cache = None
        if self.settings.prefix_cache_mb > 0 and capabilities.batching:  # the batchers keep one; serial.py does not
            from llmkit.engine.prefix_cache import PrefixCache

            prefix_cache = PrefixCache(self.settings.prefix_cache_mb * 2**20)
        options: dict[str, Any] = {"flash_attn": True} if self.settings.flash_attn else {}
        return engine.scheduler(
            max_batch_size=self.settings.max_batch_size,
            max_queue=self.settings.max_queue,
            on_step=self.on_step,
            prefix_cache=prefix_cache,
            **options,
        )

    def _fail(self, message: str) -> None:
        self.state, self.error = "error", message
        log.error("model failed to load: %s", message, extra={"event": "load_failed"})
        if self.on_fatal:
            self.on_fatal(message)

    def begin_shutdown(self) -> None:
        """SIGTERM: /health answers 503 "shutting_down" and new requests are refused; running ones go on."""
        if self.state != "error":
            self.state = "stopping"
        if self.scheduler is not None:
            self.scheduler.close()

    def abort_requests(self) -> None:
        """The grace period is over: every request left fails with ShuttingDown, so each still gets its
        terminal answer (a 503, or an error event and [DONE] on a stream) while its connection is open."""
        self.begin_shutdown()
        if self.scheduler is not None:
            self.scheduler.abort()

    def stop(self, timeout: float = 5.0) -> None:
        """The app's lifespan ends: fail whatever is left and let the loop exit."""
        self.abort_requests()
        if self.scheduler is not None:
            self.scheduler.join(timeout)

    # --- health -------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        name = self.engine.info.model if self.engine else self.settings.model_name
        if self.state == "loading":
            return 503, {"status": "loading", "model": name}
        if self.state == "error":
            return 503, {"status": "error", "model": name, "error": self.error}
        if self.state == "stopping":
            return 503, {"status": "shutting_down", "model": name}
        scheduler = self.scheduler
        if scheduler is None or not scheduler.alive:
            return 503, {"status": "error", "model": name, "error": "the generation loop is not running"}
        silent = time.monotonic() - scheduler.heartbeat
        if scheduler.busy and silent > self.settings.stall_after_s:
            return 503, {"status": "stuck", "model": name, "seconds_since_last_step": round(silent, 1)}
        failures = scheduler.failures
        if failures.steps_in_a_row >= FAILING_AFTER_STEPS:
            return 503, {"status": "failing", "model": name, **_failure_fields(failures)}
        info = self.require_engine().info
        return 200, {
            "status": "degraded" if failures.steps_in_a_row else "ok",
            "model": name,
            "engine": info.engine,
            "device": info.device,
            "dtype": info.dtype,
            "quantize": info.quantize,
            "threads": info.threads,
            "waiting": scheduler.waiting,
            "running": scheduler.running_rows,
            "max_batch_size": scheduler.max_batch_size,
            "prefix_cache": _prefix_cache_fields(scheduler.prefix_cache),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            **_failure_fields(failures),
        }

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.scheduler is not None and self.scheduler.alive

    def require_engine(self) -> Engine:
        return self._require_ready()[0]

    def _require_ready(self) -> tuple[Engine, Scheduler]:
        if self.state == "loading":
            raise ModelNotReady("the model is still loading; retry in a few seconds (GET /health says when)")
        if not self.ready or self.engine is None or self.scheduler is None:
            raise ModelNotReady("the model is not available: " + (self.error or "the server is shutting down"))
        return self.engine, self.scheduler

    # --- prompts -------------------------------------------------------------------------------
    # Templating and tokenizing a big body takes a second of CPU: it runs on a worker thread so the event loop
    # keeps answering /health and streams (the Rust tokenizer releases the GIL while it works). A text that
    # cannot fit the context is refused by its length in characters first, before any of that work.

    async def completion_ids(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidParams("prompt must not be empty", field="prompt")
        engine = self.require_engine()
        engine.check_prompt_chars(len(prompt))
        return await run_in_threadpool(engine.prompt_ids, prompt)

    async def prompt_of_ids(self, ids: list[int], field: str = "prompt") -> tuple[str, list[int]]:
        """(the text of token ids a client sent as its prompt, the ids), after checking every id is the model's."""
        engine = self.require_engine()
        check_token_ids(ids, self.vocab_size, field)
        return await run_in_threadpool(engine.tokenizer.decode, ids), ids

    @property
    def vocab_size(self) -> int:
        """Token ids the model knows: 0 to vocab_size - 1."""
        engine = self.require_engine()
        size = getattr(engine, "vocab_size", None)
        return int(size) if isinstance(size, int) else len(engine.tokenizer)  # type: ignore[arg-type]

    @functools.cached_property
    def token_text(self) -> TokenText:
        """Each token's text and bytes, as the logprobs fields show them (cached per token id)."""
        return TokenText(self.require_engine().tokenizer)

    async def chat_ids(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        engine = self.require_engine()
        if not engine.info.has_chat_template:
            raise UnsupportedFeature(
                f"model {engine.info.model} has no chat template; use /v1/completions or "
                "serve a chat model (e.g. smollm2-135m)"
            )
        engine.check_prompt_chars(sum(len(m["content"]) for m in messages), field="messages")
        return await run_in_threadpool(engine.chat_ids, messages)

    def check_context(self, prompt_tokens: int, params) -> None:
        self.require_engine().check_context(prompt_tokens, params)

    async def prepare_constraint(self, params) -> None:
        """Build the engine's view of its vocabulary for constrained decoding (seconds on a 262k vocabulary, once)
        on a worker thread, so the first constrained request does not stall every running row of the batch."""
        build = getattr(self.require_engine(), "constraint_tokenizer", None)
        if params.constraint is not None and build is not None:
            await run_in_threadpool(build)

    # --- submitting ---------------------------------------------------------------------------

    def submit(self, prompt: str, ids: list[int], params, *, request_id: str, arrived: float, outputs=None) -> Job:
        return self.submit_many([(prompt, ids)], params, request_id=request_id, arrived=arrived, outputs=outputs)[0]

    def submit_many(
        self, prompts: list[tuple[str, list[int]]], params, *, request_id: str, arrived: float, outputs=None
    ) -> list[Job]:
        """One job per (prompt text, ids), all queued together or none (QueueFull, ShuttingDown: 503). `outputs`
        (schemas.Outputs) says what each asks to see besides its text."""
        from llmkit.engine.scheduling import BatchRequest

        scheduler = self._require_ready()[1]
        loop = asyncio.get_running_loop()
        jobs = []
        for prompt, ids in prompts:
            queue: asyncio.Queue = asyncio.Queue()

            def sink(event, queue: asyncio.Queue = queue) -> None:  # inference thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # the event loop is closed: the server is gone
                    pass

            request = BatchRequest(
                prompt,
                ids,
                params,
                sink,
                started=arrived,
                deadline=arrived + self.settings.request_timeout_s,
                request_id=request_id,
                logprobs=getattr(outputs, "logprobs", None),
                prompt_logprobs=getattr(outputs, "prompt_logprobs", None),
                prompt_only=bool(getattr(outputs, "prompt_only", False)),
            )
            jobs.append(Job(request, queue))
        scheduler.submit_all([job.request for job in jobs])  # QueueFull / ShuttingDown propagate as 503
        return jobs

    async def events(self, job: Job) -> AsyncGenerator[Any, None]:
        """Chunks (after one PromptLogprobs, when it asked for them), then one Finished; raises the request's
        LlmkitError (timeout, shutdown, OOM, Cancelled...).

        A client that hangs up cancels the job from outside (routes.py watches the connection), and the
        scheduler then ends it with Cancelled.
        """
        from llmkit.engine.scheduling import Failed, Finished, PromptLogprobs
        from llmkit.errors import RequestTimeout

        deadline = job.request.deadline
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                job.cancel("timeout")
                raise RequestTimeout(
                    "the request took longer than the server's --request-timeout "
                    f"({self.settings.request_timeout_s:g} s); lower max_tokens or retry later"
                )
            try:
                event = await asyncio.wait_for(job.queue.get(), timeout=remaining)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, (Chunk, PromptLogprobs)):
                yield event
            elif isinstance(event, Finished):
                job.finished = True
                yield event
                return
            elif isinstance(event, Failed):
                job.finished = True
                job.ended_by = job.ended_by or ENDED_BY.get(event.error.kind, "error")
                raise event.error
