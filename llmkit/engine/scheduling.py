"""What the server's schedulers share: the request record, the events and errors a request ends with,
and the bounded queue with its loop on the inference thread.

Three schedulers stand on this: two through rows.py's continuous batching, BatchScheduler (batch.py)
over the transformers engine's cache tensors and LlamaCppBatchScheduler (llamacpp_batch.py) over the
sequences of a llama.cpp context, and SerialScheduler (serial.py), one request at a time, for an
engine without a batcher. The server (server/runtime.py) sees only what lives here:
`submit` (QueueFull past `max_queue`, ShuttingDown once closing), `BatchRequest.cancel` and
`deadline`, `run_forever` / `close` / `abort` / `join`, the read-only `alive`, `heartbeat`, `busy`,
`waiting`, `running_rows`, `max_batch_size`, the `on_step` metrics hook, and each request's `sink`,
which receives Chunks and then exactly one Finished or Failed. Keeping it in one place is what
lets the routes treat both schedulers alike.

What a request asks for besides text travels on its record, not in GenerationParams (it changes no
token): `logprobs` (each generated token's raw log p and its top N, on the Chunks), `prompt_logprobs`
(the prompt scored in one forward pass, delivered as one PromptLogprobs event before any Chunk) and
`prompt_only` (nothing is generated: the server's echo with max_tokens 0). `submit_all` accepts the
requests of one body (a list of prompts) together or refuses them together.

Everything a scheduler does runs on the single inference thread that owns the model; `submit`,
`cancel` and the read-only properties are the only thread-safe entry points.

LLMKIT_TEST_STEP_DELAY (seconds, test-only): sleeps before every step so the test suite can make a
tiny model slow enough to exercise timeouts, queue overflow and shutdown. Never set it in production.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmkit.engine.prefix_cache import PrefixCache
from llmkit.engine.sequence import choose_seed
from llmkit.engine.types import Chunk, Result, TokenLogprob
from llmkit.errors import Cancelled, GenerationFailed, LlmkitError, QueueFull, RequestTimeout, ShuttingDown
from llmkit.params import GenerationParams

log = logging.getLogger("llmkit.server")

STEP_DELAY_ENV = "LLMKIT_TEST_STEP_DELAY"
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BATCH_SIZE = 16  # rows (requests x n) one forward pass decodes at most (BatchScheduler)
IDLE_WAKE_S = 0.5  # an idle loop still wakes this often, so its heartbeat stays fresh

StepHook = Callable[[str, int, float], None]  # (kind "prefill"|"decode"|"mixed", rows, seconds)


# --- what flows to a request's sink -----------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """The last event of a successful request."""

    result: Result
    queue_s: float  # arrival to admission into the batch
    prefill_s: float  # admission to the first token


@dataclass(frozen=True)
class Failed:
    """The last event of a request that did not complete."""

    error: LlmkitError


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens scored (for a request with prompt_logprobs), before any Chunk: one entry per prompt token
    after the first, with the top `prompt_logprobs` alternatives."""

    entries: tuple[TokenLogprob, ...]


Event = Chunk | PromptLogprobs | Finished | Failed
Sink = Callable[[Event], None]


@dataclass
class BatchRequest:
    """One request for a scheduler. `started` and `deadline` are time.perf_counter() values."""

    prompt: str
    prompt_ids: list[int]
    params: GenerationParams
    sink: Sink
    seed: int | None = None
    started: float = field(default_factory=time.perf_counter)
    deadline: float | None = None
    request_id: str = ""
    cancel_reason: str | None = None  # set from any thread; the loop drops the request at its next step
    logprobs: int | None = None  # each generated token's log p and this many alternatives; None: not asked
    prompt_logprobs: int | None = None  # score the prompt first, with this many alternatives; None: not asked
    prompt_only: bool = False  # generate nothing: Finished follows the prompt's scores (echo with max_tokens 0)

    def __post_init__(self) -> None:
        self.seed = (
            None if self.params.is_greedy else (self.seed if self.seed is not None else choose_seed(self.params))
        )

    @property
    def rows(self) -> int:
        return self.params.num_sequences

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancel_reason = reason

    def ending(self, now: float) -> LlmkitError | None:
        """The error this request must end with at `now` (cancelled, or past its deadline); None to keep it."""
        if self.cancel_reason is not None:
            return Cancelled(f"request {self.cancel_reason}")
        if self.deadline is not None and now >= self.deadline:
            return RequestTimeout(
                "the request took longer than the server's --request-timeout; lower max_tokens or retry later"
            )
        return None


class FailureLog:
    """What failed on the inference thread, for /health and /metrics (written by the loop, read anywhere).

    A *step* failure is a shared forward pass that raised: every request in it failed. A *request*
    failure is one request's own work (its sampling, detokenizing, stop strings) that raised: that
    request failed alone and the others went on.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.requests = 0
        self.steps_in_a_row = 0  # forward passes failed since the last one that worked
        self.last: tuple[float, str, str] | None = None  # (time.monotonic(), "step" | "request", error)

    def step_failed(self, error: str) -> None:
        self.steps += 1
        self.steps_in_a_row += 1
        self.last = (time.monotonic(), "step", error)

    def step_worked(self) -> None:
        self.steps_in_a_row = 0

    def request_failed(self, error: str) -> None:
        self.requests += 1
        self.last = (time.monotonic(), "request", error)


class Scheduler:
    """The bounded FIFO queue and the inference-thread loop; a subclass provides `step` and what is running."""

    max_batch_size: int
    prefix_cache: PrefixCache | None = None  # the KV of earlier requests (engine/prefix_cache.py); None: off

    def __init__(
        self, *, max_queue: int = DEFAULT_MAX_QUEUE, step_delay_s: float | None = None, on_step: StepHook | None = None
    ):
        self.max_queue = max_queue
        self.step_delay_s = float(os.environ.get(STEP_DELAY_ENV) or 0) if step_delay_s is None else step_delay_s
        self.on_step = on_step  # metrics hook
        self._cv = threading.Condition()
        self._waiting: collections.deque[BatchRequest] = collections.deque()
        self._closing = False  # no new requests; finish what is there
        self._abort = False  # drop everything and exit
        self._thread: threading.Thread | None = None
        self._exited = False
        self.heartbeat = time.monotonic()
        self.steps = 0
        self.failures = FailureLog()

    # --- thread-safe API ----------------------------------------------------------------------

    def submit(self, request: BatchRequest) -> None:
        """Accept `request` if it gets a free batch slot at the next step, or if fewer than `max_queue`
        requests wait beyond the free slots; otherwise QueueFull. (A burst therefore fills the batch
        first and only what is left over counts against the queue.)"""
        self.submit_all([request])

    def submit_all(self, requests: list[BatchRequest]) -> None:
        """Accept every one of `requests` (one body's prompts) as `submit` would one after the other, or none:
        QueueFull (or ShuttingDown) before any of them is queued."""
        with self._cv:
            if self._closing or self._abort:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            accepted = 0
            try:
                for request in requests:
                    queued, fits = self._queued_beyond_room(request)
                    if not fits and queued >= self.max_queue:
                        raise QueueFull(
                            f"the server is at capacity ({self.running_requests} requests running, {queued} "
                            f"waiting for room, --max-queue {self.max_queue}); retry shortly"
                        )
                    self._waiting.append(request)
                    accepted += 1
            except QueueFull:
                for _ in range(accepted):
                    self._waiting.pop()
                raise
            self._cv.notify()

    def _slots(self, request: BatchRequest) -> int:
        """Batch slots `request` takes: its rows; one bigger than the batch runs alone, so it takes them all."""
        return min(request.rows, self.max_batch_size)

    def _queued_beyond_room(self, newcomer: BatchRequest) -> tuple[int, bool]:
        """(waiting requests that will not get a slot at the next step, whether `newcomer` would get one).

        Admission is FIFO, so once one waiting request does not fit, every later one waits too.
        Called with the lock held."""
        free = self.max_batch_size - self._slots_in_use()
        queued = 0
        for request in self._waiting:
            if queued or self._slots(request) > free:
                queued += 1
            else:
                free -= self._slots(request)
        return queued, not queued and self._slots(newcomer) <= free

    def _slots_in_use(self) -> int:
        """Batch slots held by running requests, and by those being admitted (thread-safe read)."""
        raise NotImplementedError

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        raise NotImplementedError

    @property
    def running_requests(self) -> int:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """False once the loop has exited (or its thread died); True while it runs or is about to."""
        return not self._exited and (self._thread is None or self._thread.is_alive())

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or self.running_requests > 0

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self.run_forever, name="llmkit-inference", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop admitting new requests; the loop exits once the queue and the running requests are done."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def abort(self) -> None:
        """Fail everything still waiting or running with ShuttingDown and exit the loop."""
        with self._cv:
            self._closing = self._abort = True
            self._cv.notify()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self.alive

    # --- the loop -----------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Run on the inference thread until close() drains it or abort() stops it."""
        import torch

        self._thread = threading.current_thread()
        try:
            with torch.inference_mode():
                while True:
                    self.heartbeat = time.monotonic()
                    with self._cv:
                        if self._abort:
                            break
                        if not self.busy:
                            if self._closing:
                                break
                            self._cv.wait(timeout=IDLE_WAKE_S)
                            continue
                    if self.step_delay_s:
                        time.sleep(self.step_delay_s)
                    self._step_guarded()
        finally:
            self._exited = True
            self._fail_all(ShuttingDown("the server shut down before this request finished"))

    def step(self) -> bool:
        """One scheduling step; True if work was done."""
        raise NotImplementedError

    def _step_guarded(self) -> None:
        """step(), but an error that escapes it (a scheduler bug) fails what is running, not the loop."""
        try:
            self.step()
        except Exception as exc:
            log.exception("scheduler step failed")
            self.failures.step_failed(f"{type(exc).__name__}: {exc}")
            self._fail_running(GenerationFailed("generation failed inside the server (see the server log)"))

    # --- helpers for subclasses (inference thread) ----------------------------------------------

    def _reap_waiting(self, now: float) -> None:
        """Fail waiting requests that were cancelled or passed their deadline; keep the rest in order."""
        with self._cv:
            kept: collections.deque[BatchRequest] = collections.deque()
            for request in self._waiting:
                error = request.ending(now)
                if error is None:
                    kept.append(request)
                else:
                    request.sink(Failed(error))
            self._waiting = kept

    def _fail_all(self, error: LlmkitError) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._closing = True
        for request in waiting:
            request.sink(Failed(error))
        self._fail_running(error)

    def _fail_running(self, error: LlmkitError) -> None:
        """Fail whatever is running with `error` and forget it."""
        raise NotImplementedError


def score_prompt(engine, ids: list[int], top: int) -> tuple[TokenLogprob, ...]:
    """The prompt's tokens after the first, each with its log p and the `top` most likely tokens at its position."""
    return tuple(engine.score_tokens(ids, top))


def answer_prompt_only(engine, request: BatchRequest, admitted: float) -> bool:
    """Score the prompt of a request that asked for it (a PromptLogprobs event) and, for one that generates
    nothing, finish it; True when the request is done. Runs on the inference thread; raises what scoring raises."""
    from llmkit.engine.sequence import build_prompt_result

    if request.prompt_logprobs is not None:
        request.sink(PromptLogprobs(score_prompt(engine, request.prompt_ids, request.prompt_logprobs)))
    if not request.prompt_only:
        return False
    elapsed = time.perf_counter() - request.started
    result = build_prompt_result(
        request.prompt,
        request.prompt_ids,
        request.params,
        request.seed,
        elapsed,
        logprobs=request.logprobs is not None,
    )
    queue_s = admitted - request.started
    request.sink(Finished(result, queue_s=queue_s, prefill_s=max(elapsed - queue_s, 0.0)))
    return True
