"""The model's life inside the server, and the bridge between asyncio and the inference thread.

One thread owns the model: it loads it (so /health can answer 503 "loading" meanwhile)
and then runs the scheduler's loop for the life of the server: BatchScheduler for the
transformers engine, which batches requests into one forward pass, and SerialScheduler,
one request at a time, for engines that cannot (llama.cpp). Nothing on the
asyncio side calls the model; handlers tokenize, submit a BatchRequest and await its
events, which the loop hands over with `loop.call_soon_threadsafe` into an
asyncio.Queue per request. This is the shape transformers' serving code argues for
(serving/utils.py): torch work off the event loop, on one thread, so the loop stays
responsive for health checks, streams and new connections.

Health: "loading" until the model is ready; then 503 if the loop thread is dead, or if
it is busy and has not finished a step for `stall_after_s` (a heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from llmkit.engine.types import Chunk
from llmkit.errors import InvalidParams, LlmkitError, UnsupportedFeature
from llmkit.server.settings import ServerSettings

log = logging.getLogger("llmkit.server")

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


class ModelNotReady(LlmkitError):
    http_status = 503
    kind = "model_not_ready"


@dataclass
class Job:
    """One submitted request as the asyncio side sees it."""

    request: Any  # BatchRequest
    queue: asyncio.Queue
    finished: bool = False
    ended_by: str | None = None  # disconnect / timeout / error, for metrics
    disconnected: Callable[[], Awaitable[bool]] | None = None  # polled while waiting; None while streaming
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
        self.engine = None
        self.scheduler = None
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
            log.info("model %s ready on %s (%s), loaded in %.1f s", engine.info.model, engine.info.device,
                     engine.info.dtype, engine.info.load_s, extra={"event": "ready"})
        scheduler.run_forever()
        if self.state == "ready":
            log.error("the generation loop stopped unexpectedly")

    def _scheduler_for(self, engine):
        """Batching needs the transformers engine's KV caches; any other engine serves one request at a time."""
        if engine.info.engine == "transformers":
            from llmkit.engine.batch import BatchScheduler

            return BatchScheduler(engine, max_batch_size=self.settings.max_batch_size,
                                  max_queue=self.settings.max_queue, on_step=self.on_step)
        from llmkit.engine.serial import SerialScheduler

        return SerialScheduler(engine, max_queue=self.settings.max_queue, on_step=self.on_step)

    def _fail(self, message: str) -> None:
        self.state, self.error = "error", message
        log.error("model failed to load: %s", message, extra={"event": "load_failed"})
        if self.on_fatal:
            self.on_fatal(message)

    def stop(self, timeout: float = 5.0) -> None:
        """After uvicorn's grace period: fail whatever is left and let the loop exit."""
        self.state = "stopping" if self.state != "error" else self.state
        if self.scheduler is not None:
            self.scheduler.abort()
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
        info = self.engine.info
        return 200, {"status": "ok", "model": name, "engine": info.engine, "device": info.device,
                     "dtype": info.dtype, "quantize": info.quantize, "waiting": scheduler.waiting,
                     "running": scheduler.running_rows,
                     "max_batch_size": scheduler.max_batch_size,
                     "uptime_s": round(time.monotonic() - self.started_at, 1)}

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.scheduler is not None and self.scheduler.alive

    def require_engine(self):
        if self.state == "loading":
            raise ModelNotReady("the model is still loading; retry in a few seconds (GET /health says when)")
        if not self.ready:
            raise ModelNotReady("the model is not available: " + (self.error or "the server is shutting down"))
        return self.engine

    # --- prompts (asyncio thread; the fast tokenizer only reads shared state) ------------------

    def completion_ids(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidParams("prompt must not be empty", field="prompt")
        return self.require_engine().prompt_ids(prompt)

    def chat_ids(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        engine = self.require_engine()
        if not engine.info.has_chat_template:
            raise UnsupportedFeature(f"model {engine.info.model} has no chat template; use /v1/completions or "
                                     "serve a chat model (e.g. smollm2-135m)")
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's TemplateError: e.g. roles that must alternate
            raise InvalidParams(f"messages: the model's chat template rejected them: {exc}", field="messages") from None
        ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise InvalidParams("messages are empty after applying the chat template", field="messages")
        return text, ids

    def check_context(self, prompt_tokens: int, params) -> None:
        self.require_engine().check_context(prompt_tokens, params)

    # --- submitting ---------------------------------------------------------------------------

    def submit(self, prompt: str, ids: list[int], params, *, request_id: str, arrived: float) -> Job:
        from llmkit.engine.scheduling import BatchRequest

        self.require_engine()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:  # inference thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        request = BatchRequest(prompt, ids, params, sink, started=arrived,
                               deadline=arrived + self.settings.request_timeout_s, request_id=request_id)
        job = Job(request, queue)
        self.scheduler.submit(request)  # QueueFull / ShuttingDown propagate as 503
        return job

    async def events(self, job: Job) -> AsyncIterator[Any]:
        """Chunks, then one Finished; raises the request's LlmkitError (timeout, shutdown, OOM, Cancelled...).

        `job.disconnected`, when set, is polled while waiting so a client that gave up stops its generation;
        a streaming response clears it once it starts, and Starlette cancels the stream on a disconnect.
        """
        from llmkit.engine.scheduling import Cancelled, Failed, Finished, RequestTimeout

        deadline = job.request.deadline
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                job.cancel("timeout")
                raise RequestTimeout("the request took longer than the server's --request-timeout "
                                     f"({self.settings.request_timeout_s:g} s); lower max_tokens or retry later")
            try:
                event = await asyncio.wait_for(job.queue.get(), timeout=min(remaining, DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                if job.disconnected is not None and await job.disconnected():
                    job.cancel("disconnect")
                    raise Cancelled("the client disconnected") from None
                continue
            if isinstance(event, Chunk):
                yield event
            elif isinstance(event, Finished):
                job.finished = True
                yield event
                return
            elif isinstance(event, Failed):
                job.finished = True
                job.ended_by = job.ended_by or ("timeout" if isinstance(event.error, RequestTimeout) else "error")
                raise event.error
