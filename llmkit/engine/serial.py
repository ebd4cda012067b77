"""The server's scheduler for an engine that cannot batch: one request at a time.

Both engines llmkit ships batch (batch.py, llamacpp_batch.py); this is what `Engine.scheduler`
gives any other engine that keeps the contract (tests/test_engine_contract.py serves one), so such
an engine can be served before it has a batcher. The loop takes the oldest waiting request and runs
it through the engine's own stream path (`Engine.stream_ids` -> `_decode`, the code behind
`llmkit generate`, so a seed gives the same text), handing each Chunk to the request's sink. One step advances the
running request by one chunk (usually one token); before each, the loop checks the request's cancel
flag and deadline and its own abort flag, so a client that hung up, a timeout or a shutdown frees
the model within a token. Requests behind it wait in the shared bounded queue (scheduling.py),
where they can time out or be cancelled too. The events (Chunks, then Finished or Failed) and
their timings (counted from arrival, as BatchScheduler's) are the same, so the routes cannot tell
the two schedulers apart; /health shows max_batch_size 1.

The `on_step` hook sees one "prefill" step per request (its first chunk: prompt evaluation and the
first token) and one "decode" step per later chunk, each with 1 row.

Log-probabilities: a request that asks for them is started with the engine's `stream_ids(...,
logprobs=N)` (an engine whose `info.capabilities.decode_logprobs` says it can; the server refuses the
field otherwise), which puts them on the Chunks; a request that asks for its prompt's has the prompt
scored first (one PromptLogprobs event), and one that generates nothing ends there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from llmkit.engine.base import Generation
from llmkit.engine.scheduling import (
    DEFAULT_MAX_QUEUE,
    BatchRequest,
    Failed,
    Finished,
    Scheduler,
    StepHook,
    answer_prompt_only,
)
from llmkit.errors import GenerationFailed, LlmkitError, OutOfMemory

log = logging.getLogger("llmkit.server")


@dataclass
class _Running:
    request: BatchRequest
    generation: Generation
    admitted: float  # perf_counter when it left the queue
    chunks: int = 0


class SerialScheduler(Scheduler):
    """Runs queued requests one after another through `engine.stream_ids`; see the module docstring."""

    max_batch_size = 1

    def __init__(
        self,
        engine,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        step_delay_s: float | None = None,
        on_step: StepHook | None = None,
    ):
        super().__init__(max_queue=max_queue, step_delay_s=step_delay_s, on_step=on_step)
        self.engine = engine
        self._running: _Running | None = None  # touched only by the loop thread
        self._answered = False  # the last _start_next answered a request without starting it (or failed it)
        self._starting = False  # a request has left the queue and is not yet _running (read by submit)

    @property
    def running_rows(self) -> int:
        running = self._running
        return running.request.rows if running else 0

    @property
    def running_requests(self) -> int:
        return 1 if self._running or self._starting else 0

    def _slots(self, request: BatchRequest) -> int:
        return 1  # one request at a time, whatever its n

    def _slots_in_use(self) -> int:
        return self.running_requests

    def step(self) -> bool:
        """Drop cancelled/expired requests, start the oldest waiting one if none runs, advance it one chunk."""
        now = time.perf_counter()
        self._reap_waiting(now)
        if self._running is not None:
            error = self._running.request.ending(now)
            if error is not None:
                self._fail_running(error)
                return True
        if self._running is None:
            self._running = self._start_next()
            if self._running is None:
                return self._answered
            self._answered = False
        running = self._running
        started = time.perf_counter()
        try:
            self._advance(running)
        except MemoryError:
            self._fail_running(OutOfMemory("ran out of memory while generating; lower max_tokens or n"))
        except LlmkitError as exc:
            self._fail_running(exc)
        except Exception as exc:  # a bug in the decode loop: fail this request (the only one running), keep serving
            log.exception("generation step failed for request %s", running.request.request_id or "?")
            self.failures.request_failed(f"{type(exc).__name__}: {exc}")
            self._fail_running(GenerationFailed("generation failed for this request (see the server log)"))
        if self.on_step:
            self.on_step("prefill" if running.chunks <= 1 else "decode", 1, time.perf_counter() - started)
        self.steps += 1
        return True

    def _start_next(self) -> _Running | None:
        """The oldest waiting request, started; None when none waits, or when the one taken was answered (or failed)
        without a generation: `_answered` says which."""
        self._answered = False
        with self._cv:
            if not self._waiting:
                return None
            request = self._waiting.popleft()
            self._starting = True
        try:
            admitted = time.perf_counter()
            try:
                if answer_prompt_only(self.engine, request, admitted):
                    self._answered = True
                    return None
                generation = self._stream(request)
            except Exception as exc:  # scoring its prompt or starting its decode failed: that request alone
                self._answered = True
                self._fail_alone(request, exc)
                return None
            return _Running(request, generation, admitted=admitted)
        finally:
            self._starting = False

    def _stream(self, request: BatchRequest) -> Generation:
        return self.engine.stream_ids(
            request.prompt,
            request.prompt_ids,
            request.params,
            seed=request.seed,
            started=request.started,
            logprobs=request.logprobs,
        )

    def _fail_alone(self, request: BatchRequest, exc: Exception) -> None:
        if isinstance(exc, LlmkitError):
            error: LlmkitError = exc
        elif isinstance(exc, MemoryError):
            error = OutOfMemory("ran out of memory scoring the prompt; shorten it")
        else:
            log.exception("scoring the prompt failed for request %s", request.request_id or "?")
            error = GenerationFailed("generation failed for this request (see the server log)")
        self.failures.request_failed(f"{type(exc).__name__}: {exc}")
        request.sink(Failed(error))

    def _advance(self, running: _Running) -> None:
        """Hand over the next chunk; once the last sequence has finished, the Result follows in the same step."""
        request = running.request
        for chunk in running.generation:
            running.chunks += 1
            request.sink(chunk)
            if not (chunk.finish_reason and chunk.index == request.rows - 1):
                return
        result = running.generation.result
        queue_s = running.admitted - request.started
        self._running = None
        request.sink(Finished(result, queue_s=queue_s, prefill_s=result.timings.ttft_s - queue_s))

    def _fail_running(self, error: LlmkitError) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.generation.close()
            running.request.sink(Failed(error))
