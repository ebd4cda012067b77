"""Fault replay for `llmkit serve`: hostile and unlucky traffic, one run, one verdict (issue 11).

Replays the fault classes below, one phase at a time, against a server that is already
running (--url) or that this script starts itself on a free loopback port (--serve), while a
thread of its own polls GET /health every 50 ms on a separate connection:

  poison      extreme settings the schema accepts (top_p 1e-50, min_p 1.0, temperature 1e-30
              and 2.0, top_k 1 and 100000, repetition_penalty 0.5 and 2.0, combinations) sent
              while healthy streams run in the same batch; the healthy streams must all finish
              normally (finish_reason stop/length, then [DONE])
  surrogates  lone UTF-16 surrogates ("\\ud800" in the JSON text) in prompt, chat content and
              stop on /v1/completions, /v1/chat/completions and /generate, plus invalid UTF-8
              bytes: must be 400; a valid surrogate pair (an emoji) is the control, 200
  bigbody     eight concurrent chat bodies of 0.9 x the body limit (1 MB by default), and bodies
              over the limit with a Content-Length and chunked: /health must stay under 0.5 s;
              over the limit should be 413
  hangup      a long non-streaming request on a raw socket whose client closes after 1 s: the
              disconnect counter (llmkit_requests_ended_total{reason="disconnect"}) must move
              and the batch rows (/health "running") must free up; how long that takes
  idle        idle sockets, half a request line, half the headers, half a body, headers at one
              byte a second, an idle keep-alive: whether and when the server closes each, and
              its open file descriptors before, while they are open, and after
  load        1,000 requests at concurrency 32: healthy completions, chat and /generate,
              streaming and not, malformed JSON, wrong types ("stream": "yes"), unknown fields,
              out-of-range values, bad messages, clients that hang up mid-stream
  spoof       with --rate-limit on: one address until the first 429, then a burst rotating
              X-Forwarded-For / X-Real-IP / Forwarded: it must still be limited
  sigterm     long streams open, then SIGTERM: each must end with [DONE] (after an error event
              when it was cut short) or finish normally; only with --serve or --pid

How to read the output (stdout; progress goes to stderr):
- One table per phase: a row per kind of request, its answers by status code ("reset",
  "timeout", "refused", "protocol error" when none came), how many completed normally, and
  for SSE answers: [DONE] seen, an error event seen, cut (ended without [DONE], not by us),
  hung up (we closed on purpose). "field" counts 4xx answers to bad input whose error body
  names the offending field (where there is one to name). Phase figures follow the table.
- The summary: requests by status per phase, bad input answered 5xx, cut streams, /health
  latency p50/max per phase, wall time.
- Resources (only when the server's PID is known: --serve, --pid, or found by the port):
  RSS right after the server first says ok, after the warm-up (eight big bodies at once, then 200
  requests of the load phase's mix, 64 with --quick: about where the batch, its KV cache and
  the allocator reach their working size) and after the main phases; growth = after / after
  warm-up - 1.
  The summary also shows RSS after each phase, and the load phase RSS every 100 requests: a
  leak climbs steadily, a transient peak (big bodies) falls back. Open fds after the run.
- Checks: "must" checks gate, "should" checks are reported. Exit status: 0 every must check
  passed, 1 one failed (or the run was interrupted), 2 the run could not happen (bad
  arguments, no server at --url, a server that did not start).
  must: no 5xx for bad input, no 500 at all, 0 streams cut without [DONE], /health max
  < 0.5 s in the bigbody and load phases, RSS growth < 5 % (after warm-up -> after, and over
  the load phase from its 100th request to its last), healthy streams beside poison
  finish normally, lone surrogates get 400, a hung-up request frees its rows, a spoofed
  X-Forwarded-For is still rate-limited, every phase ran and the server stayed up.

With --serve, the phases up to load run on one server (--request-timeout 120, --grace-period
2, --read-timeout 10, so the quick run's 15 s idle window can see half-sent requests cut off);
spoof and sigterm run on a second one started after the first has stopped, with --rate-limit
10/second, so the rate limit never touches the load phase and the two servers never compete
for the CPU. Arguments after `--` go to both `llmkit serve` commands (and win over these).
Against an attached server, give the idle phase a window longer than its --read-timeout
(default 30 s; the full run's window is 40 s, --idle-window changes it). With --pid the
sigterm phase stops that server at the end: leave it out of --phases to keep it running.

The client runs on the same machine as the server (one asyncio loop, httpx, a worker pool at
the stated concurrency, raw sockets for the hang-up and idle phases); bodies are built before
a phase starts so building them never delays the /health poller.

--quick: 200 load requests, 4 healthy streams beside each poison setting sent once, one
hang-up, 3 connections per idle kind held up to 15 s, 4 streams at SIGTERM. Seeds are fixed
(--seed), so two runs send the same requests in the same mix.

Usage:
  python benchmarks/serve_faults.py --serve -m smollm2-135m [--quick] [--json out.json] [-- --dtype float32]
  python benchmarks/serve_faults.py --url http://127.0.0.1:8000 [--api-key K] [--pid N] [--phases poison,load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.table import Table

try:
    import psutil
except ImportError:  # resources are then reported as unknown
    psutil = None

HERE = Path(__file__).resolve().parent

# --- targets ----------------------------------------------------------------------------------
HEALTH_MAX_TARGET_S = 0.5
HEALTH_GATED_PHASES = ("bigbody", "load")
RSS_GROWTH_TARGET = 0.05
HANGUP_FREE_TARGET_S = 1.0  # should: the rows are free within a second of the hang-up
HANGUP_FREE_CAP_S = 15.0  # must: ... at all, within this long
SPOOF_LIMITED_SHARE = 0.5  # a spoofed burst counts as limited when at least this share gets 429
FD_SLACK = 2  # fds after the idle phase may exceed those before by this many

# --- traffic ----------------------------------------------------------------------------------
SEED = 11
LOAD_CONCURRENCY = 32
LOAD_PROGRESS_EVERY = 100
HEALTH_POLL_INTERVAL_S = 0.05
HEALTH_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_BODY_BYTES = 1_000_000
BIG_BODY_SHARE = 0.9
OVER_LIMIT_SHARE = 1.1
UPLOAD_CHUNK_BYTES = 64 * 1024
HEALTHY_BESIDE_POISON_TOKENS = 48
POISON_TOKENS = 8
LOAD_TOKENS = (4, 24)
MID_STREAM_HANG_UP_EVENTS = 2  # a load-phase client hangs up after this many events of a stream of
MID_STREAM_HANG_UP_TOKENS = 32  # ... this many tokens
HANGUP_AFTER_S = 1.0
HANGUP_PROBE_S = 0.3  # an answer within this long means the request was refused (or was too short)
HANGUP_POLL_S = 0.05
HANGUP_SEQUENCES = (2, 16)  # n: two rows (one early end-of-sequence does not end it); 16 if that ends in 1 s
LONG_MAX_TOKENS = (4096, 2048, 1024, 512, 256, 128, 64)  # tried in turn until the server accepts one
SLOW_BYTE_EVERY_S = 1.0
FD_SETTLE_S = 1.0
FD_PEAK_AFTER_S = 1.0
SPOOF_CONTROL_CAP = 400
SPOOF_ROUND = 8
SPOOF_CONCURRENCY = 16
RATE_LIMIT_WAIT_CAP_S = 70.0
SIGTERM_AFTER_S = 0.5
SIGTERM_STREAM_TIMEOUT_S = 90.0
QUIET_WAIT_CAP_S = 30.0
STATUS_WAIT_CAP_S = 60.0

# --- servers this script starts (--serve) -------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"
STARTUP_CAP_S = 300.0
REFUSED_CAP_S = 10.0  # attaching: a URL that refuses connections this long has no server
EXIT_FAILED, EXIT_CANNOT_RUN = 1, 2
STOP_CAP_S = 60.0
SERVE_OPTIONS = ["--request-timeout", "120", "--grace-period", "2", "--read-timeout", "10"]
LIMITED_SERVE_OPTIONS = [*SERVE_OPTIONS, "--rate-limit", "10/second"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PHASES = ("poison", "surrogates", "bigbody", "hangup", "idle", "load", "spoof", "sigterm")
LIMITED_PHASES = ("spoof", "sigterm")  # need --rate-limit / kill the server: always last

COMPLETIONS, CHAT, GENERATE = "/v1/completions", "/v1/chat/completions", "/generate"
MODELS, HEALTH, METRICS = "/v1/models", "/health", "/metrics"
FINISH_REASONS = ("stop", "length")

PROMPTS = [
    "Once upon a time, a lighthouse keeper",
    "Long ago, a robot learning to paint",
    "In a faraway land, two rival bakers",
    "Every morning, a talking cat",
    "The old clock in the hall",
    "A message in a bottle said",
    "On the space station, the night shift",
    "The train that never stops",
]
WORDS = (
    "the sea light house keeper night storm ship wave rock stone bread baker cat clock train station "
    "garden winter city under water dragon mountain village river forest paint robot letter bottle "
    "message road window door morning evening lamp table chair book page story word song"
).split()

LONE_SURROGATE, LONE_LOW_SURROGATE, VALID_PAIR = "\ud800", "\udfff", "\ud83d\ude00"
POISON_SETTINGS = [
    {"top_p": 1e-50},
    {"top_p": 1e-300},
    {"min_p": 1.0},
    {"temperature": 1e-30},
    {"temperature": 2.0},
    {"top_k": 1},
    {"top_k": 100000},
    {"repetition_penalty": 0.5},
    {"repetition_penalty": 2.0},
    {"temperature": 1e-30, "top_p": 1e-50},
    {"temperature": 2.0, "min_p": 1.0, "top_k": 100000},
    {"temperature": 1e-30, "repetition_penalty": 0.5, "top_k": 100000},
    {"temperature": 2.0, "top_p": 1e-50, "repetition_penalty": 2.0},
    {"min_p": 1.0, "top_p": 1e-50, "top_k": 1},
]
MALFORMED_JSON = [
    b'{"prompt": "hi", "max_tokens": 4',
    b"{",
    b"not json at all",
    b"",
    b"[1, 2, 3]",
    b'{"prompt": "hi",}',
    b"null",
    b'"a string"',
    b'{"prompt": "hi"} trailing',
    b'{"prompt": "hi", "max_tokens": 4}\x00',
    b'{"prompt": "\xff\xfe"}',
]
MESSAGES = [{"role": "user", "content": "Name one planet."}]
WRONG_TYPES = [
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 4, "stream": "yes"}, "stream"),
    (GENERATE, {"prompt": "hi", "max_length": 4, "greedy": "yes"}, "greedy"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    (COMPLETIONS, {"prompt": 42, "max_tokens": 4}, "prompt"),
    (CHAT, {"messages": "hello", "max_tokens": 4}, "messages"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "stop": 5}, "stop"),
    (GENERATE, {"prompt": "hi", "num_sequences": 1.5}, "num_sequences"),
    (CHAT, {"messages": [{"role": "user", "content": 7}], "max_tokens": 4}, "messages"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 4, "stream": []}, "stream"),
]
UNKNOWN_FIELDS = [
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 4, "foo": 1}, "foo"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 4, "functions": []}, "functions"),
    (GENERATE, {"prompt": "hi", "max_tokenz": 4}, "max_tokenz"),
]
OUT_OF_RANGE = [
    (COMPLETIONS, {"prompt": "hi", "temperature": 5}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "n": 100}, "n"),
    (GENERATE, {"prompt": "hi", "top_k": -1}, "top_k"),
    (GENERATE, {"prompt": "hi", "seed": -1}, "seed"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 3}, "repetition_penalty"),
]
BAD_MESSAGES = [
    (CHAT, {"messages": [], "max_tokens": 4}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}, "messages"),
    (CHAT, {"messages": [{"content": "hi"}], "max_tokens": 4}, "messages"),
    (
        CHAT,
        {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "max_tokens": 4,
        },
        "messages",
    ),
]
LOAD_MIX = {  # kind -> weight (percent)
    "completion": 14,
    "completion stream": 14,
    "chat": 10,
    "chat stream": 10,
    "generate": 10,
    "hang up mid-stream": 8,
    "malformed JSON": 9,
    "wrong type": 9,
    "unknown field": 6,
    "out of range": 5,
    "bad messages": 5,
}
BAD_LOAD_KINDS = {
    "malformed JSON": None,
    "wrong type": WRONG_TYPES,
    "unknown field": UNKNOWN_FIELDS,
    "out of range": OUT_OF_RANGE,
    "bad messages": BAD_MESSAGES,
}

REPORT_WIDTH = 140  # columns when stdout is not a terminal
console = Console(file=sys.stdout, markup=False, highlight=False, width=None if sys.stdout.isatty() else REPORT_WIDTH)
_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much of each fault a run sends; QUICK_PLAN is the short run."""

    load_requests: int = 1000
    healthy_beside_poison: int = 8
    poison_endpoints: int = 3  # each poison setting on this many endpoints (of three)
    big_bodies: int = 8
    over_limit_bodies: int = 2  # of each kind (Content-Length, chunked)
    hangups: int = 3
    idle_per_kind: int = 12
    idle_window_s: float = 40.0  # longer than the server's default --read-timeout (30 s)
    spoof_burst: int = 60
    sigterm_streams: int = 6
    warmup_requests: int = 200  # the load's own mix: RSS reaches its working size by about its 100th request
    warmup_big_bodies: int = 8  # as many at once as the bigbody phase: the allocator's high-water mark is reached


QUICK_PLAN = Plan(
    load_requests=200,
    healthy_beside_poison=4,
    poison_endpoints=1,
    big_bodies=8,
    over_limit_bodies=1,
    hangups=1,
    idle_per_kind=3,
    idle_window_s=15.0,
    spoof_burst=30,
    sigterm_streams=4,
    warmup_requests=64,
)


# --- one request's outcome ----------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    bad_input: bool = False
    generation: bool = True  # a generation request (False: GET /v1/models and the like)
    expect_field: str | None = None  # the field a 4xx should name, when there is one
    detail: str = ""
    status: int | None = None
    failure: str | None = None  # no (complete) answer: reset, timeout, refused, protocol error...
    stream: bool = False  # the answer was an SSE stream
    done: bool = False  # data: [DONE] seen
    error_event: bool = False  # data: {"error": ...} seen
    finish: list[str] = field(default_factory=list)
    hung_up: bool = False  # the client closed on purpose
    param: str | None = None  # the field a 4xx body named
    retry_after: float | None = None
    latency_s: float = 0.0

    @property
    def label(self) -> str:
        return str(self.status) if self.status is not None else (self.failure or "?")

    @property
    def cut(self) -> bool:
        return self.stream and not self.hung_up and not self.done

    @property
    def normal(self) -> bool:
        return (
            self.status == 200
            and self.failure is None
            and not self.error_event
            and bool(self.finish)
            and all(f in FINISH_REASONS for f in self.finish)
            and (self.done or not self.stream)
        )

    @property
    def server_error(self) -> bool:
        return self.status is not None and self.status >= 500

    @property
    def named_field(self) -> bool:
        if not self.param:
            return False
        return self.expect_field is None or top_field(self.param) == top_field(self.expect_field)


def top_field(name: str) -> str:
    """'messages[0].content' -> 'messages': a field named at any depth counts as named."""
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", name)
    return match.group(0) if match else name


def failure_name(exc: BaseException) -> str:
    for kind, name in (
        (httpx.TimeoutException, "timeout"),
        (httpx.ConnectError, "refused"),
        (httpx.RemoteProtocolError, "protocol error"),
        (httpx.ReadError, "reset"),
        (httpx.WriteError, "write error"),
    ):
        if isinstance(exc, kind):
            return name
    return type(exc).__name__


def error_param(body: Any) -> str | None:
    """The field an error body names: OpenAI's {"error": {"param"}} or the tutorial's {"field"}."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        return error.get("param")
    return body.get("field")


def note_answer(data: bytes, out: Outcome) -> None:
    try:
        body = json.loads(data)
    except ValueError:
        return
    if out.status is not None and out.status >= 400:
        out.param = error_param(body)
        return
    if isinstance(body, dict):
        choices = body.get("choices") or body.get("completions") or []
        out.finish += [c.get("finish_reason") for c in choices if isinstance(c, dict)]


def note_event(data: str, out: Outcome) -> None:
    try:
        event = json.loads(data)
    except ValueError:
        return
    if not isinstance(event, dict):
        return
    if "error" in event:
        out.error_event = True
    for choice in event.get("choices") or []:
        if isinstance(choice, dict) and choice.get("finish_reason"):
            out.finish.append(choice["finish_reason"])


async def read_events(response: httpx.Response, out: Outcome, hang_up_after: int | None) -> None:
    events = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            out.done = True
            return
        events += 1
        note_event(data, out)
        if hang_up_after and events >= hang_up_after:
            out.hung_up = True
            return


async def send(
    client: httpx.AsyncClient,
    path: str,
    body: Any = None,
    *,
    kind: str,
    method: str = "POST",
    bad_input: bool = False,
    expect_field: str | None = None,
    detail: str = "",
    headers: dict[str, str] | None = None,
    hang_up_after: int | None = None,
    on_status: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """One request, classified. Any transport or protocol trouble becomes the outcome, never an exception."""
    out = Outcome(kind, bad_input=bad_input, generation=method == "POST", expect_field=expect_field, detail=detail)
    started = time.perf_counter()
    try:
        async with client.stream(method, path, content=body, headers=headers) as response:
            out.status = response.status_code
            out.retry_after = retry_after(response)
            if on_status:
                on_status(out)
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                out.stream = True
                await read_events(response, out, hang_up_after)
            else:
                note_answer(await response.aread(), out)
    except Exception as exc:
        out.failure = failure_name(exc)
    finally:
        out.latency_s = time.perf_counter() - started
        if on_status and out.status is None:
            on_status(out)
    return out


def retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


async def send_admitted(
    client: httpx.AsyncClient,
    path: str,
    body: Any = None,
    *,
    on_status: Callable[[Outcome], None] | None = None,
    **more: Any,
) -> Outcome:
    """send(), again after Retry-After while the answer is 429 (a rate-limited server), up to a cap."""
    started = time.perf_counter()

    def admitted(out: Outcome) -> None:
        if on_status and out.status != 429:
            on_status(out)

    while True:
        out = await send(client, path, body, on_status=admitted, **more)
        if out.status != 429 or time.perf_counter() - started > RATE_LIMIT_WAIT_CAP_S:
            if on_status:
                on_status(out)
            return out
        await asyncio.sleep(out.retry_after or 1.0)


async def run_pool(
    items: list[Callable[[], Any]],
    concurrency: int,
    report_every: int = 0,
    on_report: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Run request factories with `concurrency` workers (one coroutine each, no thread per request)."""
    pending = iter(items)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        for make in pending:
            outcomes.append(await make())
            if report_every and len(outcomes) % report_every == 0:
                progress(f"  {len(outcomes)}/{len(items)} requests done")
                if on_report:
                    on_report(len(outcomes))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def wait_all(events: list[asyncio.Event], cap_s: float) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), cap_s)
    except asyncio.TimeoutError:
        pass


# --- request bodies -----------------------------------------------------------------------------


def encode(body: Any) -> bytes:
    """JSON text; lone surrogates are written as \\udXXX escapes (ensure_ascii), as a client would send them."""
    return json.dumps(body).encode()


def completion(prompt: str, max_tokens: int, seed: int, stream: bool = False, **more: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": stream, **more}


def chat(content: Any, max_tokens: int, seed: int, stream: bool = False, **more: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": stream,
        **more,
    }


def generate(prompt: str, max_length: int, seed: int, **more: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_length": max_length, "seed": seed, **more}


def big_text(rng: random.Random, size: int) -> str:
    words = rng.choices(WORDS, k=size // 5 + 16)
    return " ".join(words)[:size]


def big_chat_body(seed: int, size: int) -> bytes:
    """A chat body of about `size` bytes: prose-like text, so the tokenizer has real work."""
    overhead = len(encode(chat("", 1, seed)))
    return encode(chat(big_text(random.Random(seed), size - overhead), 1, seed))


async def chunks(body: bytes):
    for start in range(0, len(body), UPLOAD_CHUNK_BYTES):
        yield body[start : start + UPLOAD_CHUNK_BYTES]


# --- the server under test ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServedProcess:
    """`python -m llmkit serve` started by this script on a free loopback port, its output in a log file."""

    def __init__(
        self, role: str, model: str, options: list[str], extra: list[str], log_dir: Path, api_key: str | None = None
    ):
        self.role, self.port = role, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve_faults-{role}.log"
        self.log = open(self.log_path, "wb")
        self.command = [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "-m",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *options,
            *extra,
        ]
        env = {**os.environ, "LLMKIT_NO_PROGRESS": "1"}
        if api_key:
            env["LLMKIT_API_KEY"] = api_key  # not on the command line, where other users could read it
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_CAP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@dataclass
class Target:
    url: str
    api_key: str | None = None
    pid: int | None = None
    pid_source: str = "unknown"
    served: ServedProcess | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, connections: int, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            base_url=self.url,
            limits=limits,
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            headers={"content-type": "application/json", **self.auth_headers},
        )

    def raw_request(self, method: str, path: str, body: bytes = b"", *, head_only: bool = False) -> bytes:
        """An HTTP/1.1 request as bytes, for the raw-socket phases."""
        auth = "".join(f"{k}: {v}\r\n" for k, v in self.auth_headers.items())
        length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if method == "POST" else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{length}{auth}\r\n".encode()
        return head if head_only else head + body


def cannot_run(message: str) -> NoReturn:
    """Exit 2: the run could not happen (bad arguments, no server); 1 is kept for a failed must check."""
    print(f"serve_faults: {message}", file=sys.stderr)
    raise SystemExit(EXIT_CANNOT_RUN)


def last_line(path: Path | None) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines() if path else []
    except OSError:
        return ""
    return f": {lines[-1].strip()} (log {path})" if lines else ""


def wait_healthy(
    url: str, proc: subprocess.Popen | None = None, cap_s: float = STARTUP_CAP_S, log_path: Path | None = None
) -> float:
    """Seconds until GET /health says 200. A loading server answers 503 and is waited for; with no process of
    ours to watch, a URL that refuses connections for REFUSED_CAP_S is given up on."""
    started = refused_since = time.monotonic()
    with httpx.Client(timeout=HEALTH_TIMEOUT_S) as client:
        while time.monotonic() - started < cap_s:
            if proc is not None and proc.poll() is not None:
                cannot_run(f"the server exited with {proc.returncode} before it was ready{last_line(log_path)}")
            try:
                if client.get(url + HEALTH).status_code == 200:
                    return time.monotonic() - started
                refused_since = time.monotonic()
            except httpx.ConnectError:
                if proc is None and time.monotonic() - refused_since > REFUSED_CAP_S:
                    cannot_run(f"nothing answers at {url} (connection refused for {REFUSED_CAP_S:.0f} s)")
            except httpx.HTTPError:
                refused_since = time.monotonic()
            time.sleep(0.2)
    cannot_run(f"{url}{HEALTH} did not answer 200 within {cap_s:.0f} s")


def find_listener_pid(port: int) -> int | None:
    """The PID listening on a local port, when psutil may see it (used for RSS and fds only, never signals)."""
    if psutil is None:
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.Error, OSError):
        return None
    return None


class ProcessProbe:
    """RSS and open file descriptors of the server process (psutil), None when unknown."""

    def __init__(self, pid: int | None):
        self.proc = None
        if psutil is not None and pid:
            try:
                self.proc = psutil.Process(pid)
            except psutil.Error:
                self.proc = None

    def rss(self) -> int | None:
        """None once the process is gone (a zombie reports 0)."""
        try:
            return (self.proc.memory_info().rss or None) if self.proc else None
        except psutil.Error:
            return None

    def fds(self) -> int | None:
        try:
            return self.proc.num_fds() if self.proc else None
        except (psutil.Error, AttributeError):
            return None


class HealthPoller:
    """GET /health every HEALTH_POLL_INTERVAL_S on its own thread and connection; samples tagged by phase."""

    def __init__(self, url: str):
        self.url = url + HEALTH
        self.phase = "-"
        self.samples: list[tuple[str, float, str]] = []  # (phase, latency s, status or failure)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-poller", daemon=True)

    def start(self) -> HealthPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HEALTH_TIMEOUT_S + 1)

    def _run(self) -> None:
        with httpx.Client(timeout=HEALTH_TIMEOUT_S) as client:
            while not self._stop.is_set():
                phase, started = self.phase, time.perf_counter()
                try:
                    label = str(client.get(self.url).status_code)
                except httpx.TimeoutException:
                    label = "timeout"
                except httpx.HTTPError as exc:
                    label = failure_name(exc)
                latency = time.perf_counter() - started
                self.samples.append((phase, latency, label))
                self._stop.wait(max(0.0, HEALTH_POLL_INTERVAL_S - latency))

    def stats(self, phase: str) -> dict[str, Any]:
        mine = [(latency, label) for p, latency, label in self.samples if p == phase]
        answered = [latency for latency, label in mine if label not in ("refused", "reset")]
        return {
            "samples": len(mine),
            "p50_s": statistics.median(answered) if answered else None,
            "max_s": max(answered) if answered else None,
            "not_200": dict(Counter(label for _, label in mine if label != "200")),
        }


# --- a run and its phases -----------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    health: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    crashed: str | None = None
    rss_after: int | None = None
    server: str = ""  # "server 2": spoof and sigterm with --serve


@dataclass
class Run:
    target: Target | None  # None until a server is started (--serve with only spoof/sigterm selected)
    plan: Plan
    max_body_bytes: int
    seed: int
    poller: HealthPoller | None = None
    chat_ok: bool = True
    urls: list[str] = field(default_factory=list)  # the servers this run talked to
    long_tokens: int | None = None  # the largest max_tokens the server accepted for a long request
    probe: ProcessProbe | None = None  # the server process, for RSS after each phase
    big_bodies: list[bytes] = field(default_factory=list)

    def rng(self, salt: int) -> random.Random:
        return random.Random(self.seed * 1000 + salt)

    def prepare_big_bodies(self) -> None:
        count = max(self.plan.big_bodies, self.plan.warmup_big_bodies)
        if len(self.big_bodies) < count:
            size = int(self.max_body_bytes * BIG_BODY_SHARE)
            self.big_bodies = [big_chat_body(self.seed + i, size) for i in range(count)]

    def healthy_kind(self, kind: str) -> str:
        """Chat kinds fall back to completions when the model has no chat template."""
        return kind if self.chat_ok or not kind.startswith("chat") else kind.replace("chat", "completion")


def run_phase(run: Run, name: str, phase: Callable[[Run, PhaseResult], Any]) -> PhaseResult:
    result = PhaseResult(name)
    progress(f"phase {name} ...")
    run.poller.phase = name
    started = time.perf_counter()
    try:
        asyncio.run(phase(run, result))
    except Exception as exc:  # the script reports and goes on; a crashed phase fails the run
        result.crashed = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    result.wall_s = time.perf_counter() - started
    run.poller.phase = "-"
    result.health = run.poller.stats(name)
    result.rss_after = run.probe.rss() if run.probe else None
    progress(
        f"phase {name}: {len(result.outcomes)} requests in {result.wall_s:.1f} s"
        + (f" (crashed: {result.crashed})" if result.crashed else "")
    )
    return result


async def probe_chat(run: Run) -> None:
    async with run.target.client(2) as client:
        out = await send(client, CHAT, encode(chat("Hello.", 2, run.seed)), kind="probe")
    run.chat_ok = out.status == 200
    if not run.chat_ok:
        progress(f"chat answered {out.label}: healthy chat requests become completions")


async def warm_up(run: Run, result: PhaseResult) -> None:
    """The big bodies at once, then the load phase's mix, so RSS 'after warm-up' is the server's working size.

    The big bodies go first: they raise RSS for a while (the tokenizer's buffers), and a baseline taken at
    that peak would hide real growth later."""
    await probe_chat(run)
    items = load_items(run, run.rng(99), run.plan.warmup_requests)
    async with run.target.client(LOAD_CONCURRENCY + 4) as client:
        bodies = run.big_bodies[: run.plan.warmup_big_bodies]
        result.outcomes += await asyncio.gather(
            *(send(client, CHAT, body, kind="big body", bad_input=True) for body in bodies)
        )
        makers = [lambda item=item: send_load_item(client, item) for item in items]
        result.outcomes += await run_pool(makers, LOAD_CONCURRENCY)


# --- phase: poison rows beside healthy ones -------------------------------------------------------


def setting_label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in setting.items())


def poison_requests(run: Run) -> list[tuple[str, str, bytes, str]]:
    """(kind, path, body, detail) for each poison setting on `poison_endpoints` of the three endpoints."""
    endpoints = [
        ("poison, completion stream", COMPLETIONS, True),
        ("poison, completion", COMPLETIONS, False),
        ("poison, /generate", GENERATE, False),
    ]
    requests = []
    for i, setting in enumerate(POISON_SETTINGS):
        for j in range(run.plan.poison_endpoints):
            kind, path, stream = endpoints[(i + j) % len(endpoints)]
            prompt, seed = PROMPTS[i % len(PROMPTS)], run.seed + i
            body = (
                generate(prompt, POISON_TOKENS, seed, **setting)
                if path == GENERATE
                else completion(prompt, POISON_TOKENS, seed, stream=stream, **setting)
            )
            requests.append((kind, path, encode(body), setting_label(setting)))
    return requests


def healthy_stream(run: Run, i: int) -> tuple[str, bytes]:
    prompt, seed = PROMPTS[i % len(PROMPTS)], run.seed + 100 + i
    if i % 2 and run.chat_ok:
        return CHAT, encode(chat(prompt, HEALTHY_BESIDE_POISON_TOKENS, seed, stream=True, temperature=0.7))
    return COMPLETIONS, encode(completion(prompt, HEALTHY_BESIDE_POISON_TOKENS, seed, stream=True, temperature=0.7))


async def phase_poison(run: Run, result: PhaseResult) -> None:
    poison = poison_requests(run)
    healthy = [healthy_stream(run, i) for i in range(run.plan.healthy_beside_poison)]
    async with run.target.client(len(poison) + len(healthy) + 2) as client:
        started = [asyncio.Event() for _ in healthy]
        healthy_tasks = [
            asyncio.create_task(
                send(client, path, body, kind="healthy stream beside poison", on_status=lambda _, e=event: e.set())
            )
            for (path, body), event in zip(healthy, started)
        ]
        await wait_all(started, STATUS_WAIT_CAP_S)  # the healthy rows are in the batch: now the poison
        poison_tasks = [
            asyncio.create_task(send(client, path, body, kind=kind, bad_input=True, detail=detail))
            for kind, path, body, detail in poison
        ]
        result.outcomes += await asyncio.gather(*healthy_tasks, *poison_tasks)
    healthy_out = [o for o in result.outcomes if o.kind.startswith("healthy")]
    result.figures["healthy streams normal"] = f"{sum(o.normal for o in healthy_out)}/{len(healthy_out)}"
    for out in result.outcomes:
        if out.kind.startswith("poison") and not out.normal:
            result.notes.append(
                f"{out.kind} {{{out.detail}}}: {out.label}"
                + (", error event" if out.error_event else "")
                + (", cut" if out.cut else "")
            )


# --- phase: lone surrogates -----------------------------------------------------------------------


def surrogate_requests() -> list[tuple[str, str, bytes, str | None, str]]:
    """(kind, path, body, field the 400 should name, detail); the controls expect 200."""
    bad, pair = LONE_SURROGATE, VALID_PAIR
    cases = [
        (COMPLETIONS, completion(f"hi {bad} there", 4, 1), "prompt", "completions prompt"),
        (COMPLETIONS, completion(LONE_LOW_SURROGATE, 4, 1, stream=True), "prompt", "completions prompt, stream"),
        (COMPLETIONS, completion([f"{bad}"], 4, 1), "prompt", "completions prompt list"),
        (COMPLETIONS, completion("hi", 4, 1, stop=bad), "stop", "completions stop"),
        (COMPLETIONS, completion("hi", 4, 1, stop=["ok", "\udc00"]), "stop", "completions stop list"),
        (COMPLETIONS, completion("\ude00\ud83d reversed pair", 4, 1), "prompt", "completions reversed pair"),
        (CHAT, chat(f"{bad} hello", 4, 1), "messages", "chat content"),
        (CHAT, chat(f"{bad} hello", 4, 1, stream=True), "messages", "chat content, stream"),
        (CHAT, chat([{"type": "text", "text": bad}], 4, 1), "messages", "chat content parts"),
        (
            CHAT,
            {"messages": [{"role": "system", "content": bad}, *MESSAGES], "max_tokens": 4},
            "messages",
            "chat system message",
        ),
        (CHAT, chat("hello", 4, 1, stop=[bad]), "stop", "chat stop"),
        (GENERATE, generate(f"{bad}", 4, 1), "prompt", "/generate prompt"),
        (GENERATE, generate("hi", 4, 1, stop=bad), "stop", "/generate stop"),
    ]
    requests = [("lone surrogate", path, encode(body), name, detail) for path, body, name, detail in cases]
    requests.append(
        (
            "invalid UTF-8 bytes",
            COMPLETIONS,
            b'{"prompt": "hi \xed\xa0\x80 there", "max_tokens": 4}',
            None,
            "completions prompt, UTF-8 encoded surrogate",
        )
    )
    controls = [
        (COMPLETIONS, completion(f"smile {pair}", 4, 1), "completions"),
        (CHAT, chat(f"smile {pair}", 4, 1), "chat"),
        (GENERATE, generate(f"smile {pair}", 4, 1), "/generate"),
    ]
    requests += [
        ("valid surrogate pair (control)", path, encode(body), None, detail) for path, body, detail in controls
    ]
    return requests


async def phase_surrogates(run: Run, result: PhaseResult) -> None:
    requests = surrogate_requests()
    if not run.chat_ok:
        requests = [r for r in requests if not (r[0].startswith("valid") and r[1] == CHAT)]
    async with run.target.client(len(requests)) as client:
        result.outcomes += await asyncio.gather(
            *(
                send(
                    client,
                    path,
                    body,
                    kind=kind,
                    bad_input=not kind.startswith("valid"),
                    expect_field=name,
                    detail=detail,
                )
                for kind, path, body, name, detail in requests
            )
        )
    for out in result.outcomes:
        expected = 200 if out.kind.startswith("valid") else 400
        if out.status != expected:
            result.notes.append(f"{out.detail}: {out.label} (expected {expected})")


# --- phase: big bodies ------------------------------------------------------------------------------


async def phase_bigbody(run: Run, result: PhaseResult) -> None:
    over = b"x" * int(run.max_body_bytes * OVER_LIMIT_SHARE)  # never parsed: the size alone must refuse it
    path = CHAT if run.chat_ok else COMPLETIONS
    bodies = run.big_bodies[: run.plan.big_bodies]
    if path == COMPLETIONS:
        bodies = [encode({"prompt": json.loads(b)["messages"][0]["content"], "max_tokens": 1}) for b in bodies]
    async with run.target.client(len(bodies) + 2 * run.plan.over_limit_bodies + 2) as client:
        tasks = [send(client, path, body, kind=f"{len(body) / 1e6:.2f} MB body", bad_input=True) for body in bodies]
        tasks += [
            send(client, path, over, kind="over the limit, Content-Length", bad_input=True)
            for _ in range(run.plan.over_limit_bodies)
        ]
        tasks += [
            send(client, path, chunks(over), kind="over the limit, chunked", bad_input=True)
            for _ in range(run.plan.over_limit_bodies)
        ]
        result.outcomes += await asyncio.gather(*tasks)
    result.figures["body limit assumed"] = f"{run.max_body_bytes} bytes (--max-body-bytes)"
    result.figures["big bodies"] = f"{len(bodies)} x {len(bodies[0]) if bodies else 0} bytes, concurrently"


# --- phase: a non-streaming client hangs up -----------------------------------------------------------


def parse_status(data: bytes | None) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data or b"")
    return int(match.group(1)) if match else None


async def read_some(reader: asyncio.StreamReader, timeout_s: float) -> bytes | None:
    """Bytes the server sent within timeout_s (b'' when it closed), None when it sent nothing."""
    try:
        return await asyncio.wait_for(reader.read(65536), max(timeout_s, 0.0))
    except asyncio.TimeoutError:
        return None
    except OSError:
        return b""


def close_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except OSError:
        pass


def long_candidates(run: Run) -> list[int]:
    if run.long_tokens:
        return [t for t in LONG_MAX_TOKENS if t <= run.long_tokens]
    return list(LONG_MAX_TOKENS)


async def start_long_request(run: Run, seed: int) -> tuple[asyncio.StreamWriter | None, dict[str, Any]]:
    """A long non-streaming completion on a raw socket, kept open HANGUP_AFTER_S; None if it ended first."""
    for n in HANGUP_SEQUENCES:
        writer, record = await start_long_request_n(run, seed, n)
        if writer is not None or "answered_before_hangup" not in record:
            break
    return writer, record


async def start_long_request_n(run: Run, seed: int, n: int) -> tuple[asyncio.StreamWriter | None, dict[str, Any]]:
    for max_tokens in long_candidates(run):
        body = encode(completion(PROMPTS[seed % len(PROMPTS)], max_tokens, seed, n=n, temperature=1.0))
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(run.target.host, run.target.port), CONNECT_TIMEOUT_S
            )
            writer.write(run.target.raw_request("POST", COMPLETIONS, body))
            await writer.drain()
        except (OSError, asyncio.TimeoutError) as exc:
            return None, {"max_tokens": max_tokens, "n": n, "error": f"could not send: {type(exc).__name__}"}
        sent = time.perf_counter()
        answer = await read_some(reader, HANGUP_PROBE_S)
        if answer is not None and parse_status(answer) == 400:  # too long for the model's context: try shorter
            close_quietly(writer)
            continue
        if answer is None:
            run.long_tokens = max_tokens
            answer = await read_some(reader, HANGUP_AFTER_S - (time.perf_counter() - sent))
            if answer is None:
                return writer, {"max_tokens": max_tokens, "n": n}
        close_quietly(writer)
        return None, {"max_tokens": max_tokens, "n": n, "answered_before_hangup": parse_status(answer) or "closed"}
    return None, {"error": f"every max_tokens in {LONG_MAX_TOKENS} was refused with 400"}


_ENDED = re.compile(r'^llmkit_requests_ended_total\{[^}]*reason="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)


async def ended_count(client: httpx.AsyncClient, reason: str) -> float | None:
    """llmkit_requests_ended_total{reason=...} from /metrics; 0 when the label has not appeared yet."""
    try:
        response = await client.get(METRICS)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return sum(float(value) for label, value in _ENDED.findall(response.text) if label == reason)


async def running_rows(client: httpx.AsyncClient) -> int | None:
    try:
        response = await client.get(HEALTH)
        return int(response.json().get("running"))
    except (httpx.HTTPError, ValueError, TypeError, AttributeError):
        return None


async def wait_quiet(client: httpx.AsyncClient, cap_s: float = QUIET_WAIT_CAP_S) -> int | None:
    """Wait until no row is running (left over from earlier phases); the rows running then."""
    started = time.perf_counter()
    rows = await running_rows(client)
    while rows and time.perf_counter() - started < cap_s:
        await asyncio.sleep(0.1)
        rows = await running_rows(client)
    return rows


async def watch_release(client: httpx.AsyncClient, before: float, baseline: int) -> dict[str, Any]:
    """Seconds from the hang-up until the disconnect counter moved and until the rows were free."""
    started = time.perf_counter()
    counter_s = free_s = None
    while time.perf_counter() - started < HANGUP_FREE_CAP_S and (counter_s is None or free_s is None):
        now = time.perf_counter() - started
        count, rows = await asyncio.gather(ended_count(client, "disconnect"), running_rows(client))
        if counter_s is None and count is not None and count > before:
            counter_s = now
        if free_s is None and rows is not None and rows <= baseline:
            free_s = now
        await asyncio.sleep(HANGUP_POLL_S)
    return {"counter_moved_s": counter_s, "rows_free_s": free_s}


async def hangup_once(run: Run, client: httpx.AsyncClient, attempt: int) -> dict[str, Any]:
    baseline = await wait_quiet(client) or 0
    before = await ended_count(client, "disconnect")
    writer, record = await start_long_request(run, run.seed + attempt)
    if writer is None:
        return record
    record["rows_running_at_hangup"] = await running_rows(client)
    close_quietly(writer)
    if before is None:
        record["error"] = "GET /metrics did not answer 200"
        before = float("inf")
    record.update(await watch_release(client, before, baseline))
    return record


async def phase_hangup(run: Run, result: PhaseResult) -> None:
    attempts = []
    async with run.target.client(4) as client:
        for attempt in range(run.plan.hangups):
            attempts.append(await hangup_once(run, client, attempt))
    result.figures["attempts"] = attempts
    for i, record in enumerate(attempts):
        if "answered_before_hangup" in record:
            result.notes.append(
                f"attempt {i + 1}: the request ended ({record['answered_before_hangup']}) before "
                f"the hang-up; the model is too fast for this check"
            )
        if "error" in record:
            result.notes.append(f"attempt {i + 1}: {record['error']}")


# --- phase: idle and half-sent connections -------------------------------------------------------------


def idle_payloads(target: Target) -> dict[str, tuple[bytes, bool]]:
    """kind -> (bytes sent at once, then one more byte every SLOW_BYTE_EVERY_S?)."""
    host = f"Host: {target.host}:{target.port}\r\n"
    body = b'{"prompt": "hello", "max_tokens": 4}'
    half_body = (
        target.raw_request("POST", COMPLETIONS, body, head_only=True).replace(
            f"Content-Length: {len(body)}".encode(), f"Content-Length: {2 * len(body)}".encode()
        )
        + body[: len(body) // 2]
    )
    return {
        "idle, nothing sent": (b"", False),
        "half a request line": (b"POST /v1/compl", False),
        "half the headers": (f"POST {COMPLETIONS} HTTP/1.1\r\n{host}Content-Ty".encode(), False),
        "half a body": (half_body, False),
        "headers at 1 byte/s": (f"POST {COMPLETIONS} HTTP/1.1\r\n{host}X-Slow: ".encode(), True),
        "idle keep-alive after a request": (target.raw_request("GET", HEALTH), False),
    }


async def trickle(writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(SLOW_BYTE_EVERY_S)
        writer.write(b"a")
        await writer.drain()


async def hold_connection(target: Target, kind: str, payload: bytes, slow: bool, window_s: float) -> dict[str, Any]:
    """Open, send the payload, and read until the server closes or the window ends."""
    record: dict[str, Any] = {"kind": kind, "opened": False, "closed_s": None, "answer": "-"}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        record["answer"] = f"connect failed: {type(exc).__name__}"
        return record
    record["opened"] = True
    started = time.perf_counter()
    slow_task = asyncio.create_task(trickle(writer)) if slow else None
    try:
        if payload:
            writer.write(payload)
            await writer.drain()
        while (left := window_s - (time.perf_counter() - started)) > 0:
            data = await read_some(reader, left)
            if data is None:
                break
            if data and record["answer"] == "-":
                record["answer"] = data.split(b"\r\n", 1)[0].decode("latin-1")[:40]
            if not data:
                record["closed_s"] = time.perf_counter() - started
                break
    except OSError:
        record["closed_s"] = time.perf_counter() - started
    finally:
        if slow_task:
            slow_task.cancel()
            await asyncio.gather(slow_task, return_exceptions=True)
        close_quietly(writer)
    return record


def summarize_connections(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind in dict.fromkeys(r["kind"] for r in records):
        mine = [r for r in records if r["kind"] == kind]
        closed = [r["closed_s"] for r in mine if r["closed_s"] is not None]
        rows.append(
            {
                "kind": kind,
                "opened": sum(r["opened"] for r in mine),
                "closed_by_server": len(closed),
                "closed_p50_s": statistics.median(closed) if closed else None,
                "closed_max_s": max(closed) if closed else None,
                "answers": dict(Counter(r["answer"] for r in mine)),
            }
        )
    return rows


async def phase_idle(run: Run, result: PhaseResult) -> None:
    probe = run.probe or ProcessProbe(run.target.pid)
    window = run.plan.idle_window_s
    result.figures["fds before"] = probe.fds()
    tasks = [
        asyncio.create_task(hold_connection(run.target, kind, payload, slow, window))
        for kind, (payload, slow) in idle_payloads(run.target).items()
        for _ in range(run.plan.idle_per_kind)
    ]
    await asyncio.sleep(FD_PEAK_AFTER_S)
    result.figures["fds while open"] = probe.fds()
    records = await asyncio.gather(*tasks)
    await asyncio.sleep(FD_SETTLE_S)
    result.figures["fds after"] = probe.fds()
    result.figures["window_s"] = window
    result.figures["connections"] = summarize_connections(records)


# --- phase: mixed load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadItem:
    kind: str
    path: str
    body: bytes
    bad_input: bool = False
    expect_field: str | None = None
    hang_up_after: int | None = None


def healthy_item(run: Run, kind: str, rng: random.Random, i: int) -> LoadItem:
    kind = run.healthy_kind(kind)
    prompt, seed, tokens = PROMPTS[i % len(PROMPTS)], run.seed + i, rng.randint(*LOAD_TOKENS)
    temperature = rng.choice((0.0, 0.7, 1.0))
    stream = kind.endswith("stream") or kind == "hang up mid-stream"
    if kind == "generate":
        body = generate(prompt, tokens, seed, temperature=temperature)
    elif kind.startswith("chat"):
        body = chat(prompt, tokens, seed, stream=stream, temperature=temperature)
    else:
        tokens = MID_STREAM_HANG_UP_TOKENS if kind == "hang up mid-stream" else tokens
        body = completion(prompt, tokens, seed, stream=stream, temperature=temperature)
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    path = {"generate": GENERATE, "chat": CHAT, "chat stream": CHAT}.get(kind, COMPLETIONS)
    return LoadItem(
        kind, path, encode(body), hang_up_after=MID_STREAM_HANG_UP_EVENTS if kind == "hang up mid-stream" else None
    )


def bad_item(kind: str, rng: random.Random) -> LoadItem:
    if kind == "malformed JSON":
        return LoadItem(kind, rng.choice((COMPLETIONS, CHAT, GENERATE)), rng.choice(MALFORMED_JSON), bad_input=True)
    path, body, name = rng.choice(BAD_LOAD_KINDS[kind])
    return LoadItem(kind, path, encode(body), bad_input=True, expect_field=name)


def load_items(run: Run, rng: random.Random, count: int) -> list[LoadItem]:
    kinds = rng.choices(list(LOAD_MIX), weights=list(LOAD_MIX.values()), k=count)
    return [
        bad_item(kind, rng) if kind in BAD_LOAD_KINDS else healthy_item(run, kind, rng, i)
        for i, kind in enumerate(kinds)
    ]


async def send_load_item(client: httpx.AsyncClient, item: LoadItem) -> Outcome:
    return await send(
        client,
        item.path,
        item.body,
        kind=item.kind,
        bad_input=item.bad_input,
        expect_field=item.expect_field,
        hang_up_after=item.hang_up_after,
    )


async def phase_load(run: Run, result: PhaseResult) -> None:
    items = load_items(run, run.rng(1), run.plan.load_requests)
    rss_trend: list[tuple[int, int]] = []  # (requests done, server RSS bytes)

    def sample_rss(done: int) -> None:
        rss = run.probe.rss() if run.probe else None
        if rss is not None:
            rss_trend.append((done, rss))

    started, cpu = time.perf_counter(), time.process_time()
    async with run.target.client(LOAD_CONCURRENCY + 4) as client:
        makers = [lambda item=item: send_load_item(client, item) for item in items]
        result.outcomes += await run_pool(
            makers, LOAD_CONCURRENCY, report_every=LOAD_PROGRESS_EVERY, on_report=sample_rss
        )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    healthy = [o for o in result.outcomes if not o.bad_input and not o.hung_up]
    result.figures["concurrency"] = LOAD_CONCURRENCY
    result.figures["requests/s"] = round(len(result.outcomes) / wall, 1) if wall > 0 else None
    result.figures["healthy requests normal"] = f"{sum(o.normal for o in healthy)}/{len(healthy)}"
    result.figures["client CPU (this script, all threads)"] = f"{cpu / wall:.0%} of one core" if wall > 0 else None
    if rss_trend:
        result.figures["server RSS MiB after N requests"] = ", ".join(f"{n}: {rss / 2**20:.0f}" for n, rss in rss_trend)
        result.figures["rss_trend"] = rss_trend


# --- phase: spoofed forwarding headers ---------------------------------------------------------------------


def spoofed_headers(rng: random.Random) -> dict[str, str]:
    address = f"{rng.choice((198, 203))}.{rng.choice((51, 0))}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    return {"x-forwarded-for": address, "x-real-ip": address, "forwarded": f"for={address}"}


async def burst_until_limited(client: httpx.AsyncClient) -> list[Outcome]:
    """GET /v1/models from one address in rounds until the first 429 (or the cap): the bucket is then empty."""
    outcomes: list[Outcome] = []
    while len(outcomes) < SPOOF_CONTROL_CAP and not any(o.status == 429 for o in outcomes):
        outcomes += await asyncio.gather(
            *(send(client, MODELS, method="GET", kind="one address (control)") for _ in range(SPOOF_ROUND))
        )
    return outcomes


async def phase_spoof(run: Run, result: PhaseResult) -> None:
    rng = run.rng(7)
    async with run.target.client(SPOOF_CONCURRENCY) as client:
        control = await burst_until_limited(client)
        headers = [spoofed_headers(rng) for _ in range(run.plan.spoof_burst)]
        spoofed = await asyncio.gather(
            *(send(client, MODELS, method="GET", kind="rotating X-Forwarded-For", headers=h) for h in headers)
        )
    result.outcomes += control + list(spoofed)
    limited = sum(o.status == 429 for o in spoofed)
    result.figures["requests until the first 429 (one address)"] = next(
        (i + 1 for i, o in enumerate(control) if o.status == 429), None
    )
    result.figures["spoofed requests answered 429"] = f"{limited}/{len(spoofed)}"
    result.figures["rate limit seen"] = any(o.status == 429 for o in control)
    result.figures["spoofed still limited"] = (limited / len(spoofed) >= SPOOF_LIMITED_SHARE) if spoofed else None
    if not result.figures["rate limit seen"]:
        result.notes.append(f"no 429 in {len(control)} requests from one address: is --rate-limit on?")


# --- phase: SIGTERM mid-stream ------------------------------------------------------------------------------


async def long_stream_tokens(run: Run, client: httpx.AsyncClient) -> int | None:
    """The largest max_tokens the server accepts for a streamed completion (a 200 starts it: we close at once)."""
    for max_tokens in long_candidates(run):
        body = encode(completion(PROMPTS[0], max_tokens, run.seed, stream=True))
        out = await send_admitted(client, COMPLETIONS, body, kind="probe", hang_up_after=1)
        if out.status == 200:
            return max_tokens
        if out.status != 400:
            return None
    return None


def wait_exit(target: Target, cap_s: float) -> tuple[int | None, float | None]:
    """(exit code if known, seconds until the process was gone) after the signal."""
    started = time.perf_counter()
    if target.served is not None:
        try:
            code = target.served.proc.wait(cap_s)
            return code, time.perf_counter() - started
        except subprocess.TimeoutExpired:
            return None, None
    while time.perf_counter() - started < cap_s:
        if not process_alive(target.pid):
            return None, time.perf_counter() - started
        time.sleep(0.05)
    return None, None


def process_alive(pid: int) -> bool:
    """False once the process is gone or a zombie (exited, not yet reaped by its parent)."""
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


async def phase_sigterm(run: Run, result: PhaseResult) -> None:
    target = run.target
    async with target.client(run.plan.sigterm_streams + 2, timeout_s=SIGTERM_STREAM_TIMEOUT_S) as client:
        await wait_quiet(client)
        tokens = await long_stream_tokens(run, client)
        if tokens is None:
            result.notes.append("no long stream was accepted; the phase could not run")
            return
        started = [asyncio.Event() for _ in range(run.plan.sigterm_streams)]
        bodies = [
            encode(
                completion(
                    PROMPTS[i % len(PROMPTS)], tokens, run.seed + i, stream=True, temperature=1.0, n=HANGUP_SEQUENCES[0]
                )
            )
            for i in range(len(started))
        ]
        tasks = [
            asyncio.create_task(
                send_admitted(
                    client, COMPLETIONS, body, kind="long stream at SIGTERM", on_status=lambda _, e=event: e.set()
                )
            )
            for body, event in zip(bodies, started)
        ]
        await wait_all(started, STATUS_WAIT_CAP_S)
        await asyncio.sleep(SIGTERM_AFTER_S)
        result.figures["streams open at SIGTERM"] = sum(not t.done() for t in tasks)
        os.kill(target.pid, signal.SIGTERM)
        progress(f"SIGTERM sent to {target.pid}")
        exit_code, exit_s = await asyncio.to_thread(wait_exit, target, SIGTERM_STREAM_TIMEOUT_S)
        result.outcomes += await asyncio.gather(*tasks)
    result.figures["max_tokens per stream"] = tokens
    result.figures["server gone after (s)"] = round(exit_s, 2) if exit_s is not None else "still running"
    result.figures["exit code"] = exit_code if target.served is not None else "unknown (not our child)"
    outs = result.outcomes
    result.figures["finished normally"] = sum(o.normal for o in outs)
    result.figures["error event, then [DONE]"] = sum(o.error_event and o.done for o in outs)
    result.figures["cut without [DONE]"] = sum(o.cut for o in outs)


RAW_PHASES = {"hangup": "raw sockets, see above", "idle": "raw sockets, see above"}
PHASE_FUNCTIONS = {
    "poison": phase_poison,
    "surrogates": phase_surrogates,
    "bigbody": phase_bigbody,
    "hangup": phase_hangup,
    "idle": phase_idle,
    "load": phase_load,
    "spoof": phase_spoof,
    "sigterm": phase_sigterm,
}


# --- checks ---------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    target: str
    measured: str
    result: str  # PASS, FAIL, n/a
    must: bool


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def all_outcomes(results: list[PhaseResult]) -> list[Outcome]:
    return [o for r in results for o in r.outcomes]


def by_name(results: list[PhaseResult], name: str) -> PhaseResult | None:
    return next((r for r in results if r.name == name and not r.skipped), None)


def traffic_checks(results: list[PhaseResult]) -> list[Check]:
    outs = all_outcomes(results)
    bad = [o for o in outs if o.bad_input]
    bad_5xx = [o for o in bad if o.server_error]
    five_hundred = [o for o in outs if o.status == 500]
    cut = [o for o in outs if o.cut]
    named = [o for o in bad if o.status is not None and 400 <= o.status < 500 and o.expect_field]
    accepted = [o for o in bad if o.status == 200 and not o.kind.startswith("poison") and "body" not in o.kind]
    return [
        Check("bad input answered without a 5xx", "0", f"{len(bad_5xx)} of {len(bad)}", verdict(not bad_5xx), True),
        Check("no 500 (a 500 is a bug)", "0", str(len(five_hundred)), verdict(not five_hundred), True),
        Check(
            "streams ended without a terminal event",
            "0",
            f"{len(cut)} of {sum(o.stream for o in outs)} streams",
            verdict(not cut),
            True,
        ),
        Check(
            "bad-input 4xx names the field",
            "all",
            f"{sum(o.named_field for o in named)}/{len(named)}",
            verdict(all(o.named_field for o in named) if named else None),
            False,
        ),
        Check(
            "bad input refused (not 200)",
            "all",
            f"{len(accepted)} accepted" + (f" ({', '.join(sorted({o.kind for o in accepted}))})" if accepted else ""),
            verdict(not accepted if bad else None),
            False,
        ),
    ]


def health_checks(results: list[PhaseResult]) -> list[Check]:
    checks = []
    for name in HEALTH_GATED_PHASES:
        result = by_name(results, name)
        worst = result.health.get("max_s") if result else None
        checks.append(
            Check(
                f"/health max latency, {name}",
                f"< {HEALTH_MAX_TARGET_S} s",
                "-" if worst is None else f"{worst:.3f} s",
                verdict(None if worst is None else worst < HEALTH_MAX_TARGET_S),
                True,
            )
        )
    return checks


def poison_and_surrogate_checks(results: list[PhaseResult]) -> list[Check]:
    checks = []
    poison = by_name(results, "poison")
    if poison:
        healthy = [o for o in poison.outcomes if o.kind.startswith("healthy")]
        rows = [o for o in poison.outcomes if o.kind.startswith("poison")]
        checks.append(
            Check(
                "healthy streams beside poison finish normally",
                "all",
                f"{sum(o.normal for o in healthy)}/{len(healthy)}",
                verdict(all(o.normal for o in healthy)),
                True,
            )
        )
        checks.append(
            Check(
                "poison rows complete normally themselves",
                "all",
                f"{sum(o.normal for o in rows)}/{len(rows)}",
                verdict(all(o.normal for o in rows)),
                False,
            )
        )
    surrogates = by_name(results, "surrogates")
    if surrogates:
        lone = [o for o in surrogates.outcomes if not o.kind.startswith("valid")]
        pairs = [o for o in surrogates.outcomes if o.kind.startswith("valid")]
        checks.append(
            Check(
                "lone surrogates and invalid UTF-8 answered 400",
                "all",
                f"{sum(o.status == 400 for o in lone)}/{len(lone)}",
                verdict(all(o.status == 400 for o in lone)),
                True,
            )
        )
        checks.append(
            Check(
                "valid surrogate pairs accepted",
                "200",
                f"{sum(o.status == 200 for o in pairs)}/{len(pairs)}",
                verdict(all(o.status == 200 for o in pairs)),
                False,
            )
        )
    bigbody = by_name(results, "bigbody")
    if bigbody:
        over = [o for o in bigbody.outcomes if o.kind.startswith("over")]
        checks.append(
            Check(
                "bodies over the limit answered 413",
                "413",
                ", ".join(f"{k}x{v}" for k, v in Counter(o.label for o in over).items()),
                verdict(all(o.status == 413 for o in over)),
                False,
            )
        )
    return checks


def hangup_checks(results: list[PhaseResult]) -> list[Check]:
    hangup = by_name(results, "hangup")
    if not hangup or hangup.crashed:
        return []
    attempts = [a for a in hangup.figures.get("attempts", []) if "answered_before_hangup" not in a and "error" not in a]
    if not attempts:
        return [
            Check(
                "hung-up request noticed and its rows freed",
                f"within {HANGUP_FREE_CAP_S:g} s",
                "no attempt was still running at the hang-up",
                "n/a",
                True,
            )
        ]
    freed = [
        max(a["counter_moved_s"] or 0, a["rows_free_s"] or 0)
        if a["counter_moved_s"] is not None and a["rows_free_s"] is not None
        else None
        for a in attempts
    ]
    worst = None if None in freed else max(freed)
    measured = f"{sum(f is not None for f in freed)}/{len(freed)}" + ("" if worst is None else f", worst {worst:.2f} s")
    return [
        Check(
            "hung-up request noticed and its rows freed",
            f"within {HANGUP_FREE_CAP_S:g} s",
            measured,
            verdict(worst is not None),
            True,
        ),
        Check(
            "... within a second of the hang-up",
            f"< {HANGUP_FREE_TARGET_S:g} s",
            "-" if worst is None else f"{worst:.2f} s",
            verdict(worst is not None and worst < HANGUP_FREE_TARGET_S),
            False,
        ),
    ]


def connection_checks(results: list[PhaseResult]) -> list[Check]:
    idle = by_name(results, "idle")
    if not idle or idle.crashed:
        return []
    rows = idle.figures.get("connections", [])
    open_kinds = [r["kind"] for r in rows if r["closed_by_server"] < r["opened"]]
    before, after = idle.figures.get("fds before"), idle.figures.get("fds after")
    fds_ok = None if before is None or after is None else after <= before + FD_SLACK
    return [
        Check(
            "idle and half-sent connections closed by the server",
            f"within {idle.figures['window_s']:g} s (--idle-window)",
            "all closed" if not open_kinds else "still open: " + "; ".join(open_kinds),
            verdict(not open_kinds),
            False,
        ),
        Check(
            "server fds back after the idle phase",
            f"<= before + {FD_SLACK}",
            f"{before} -> {idle.figures.get('fds while open')} -> {after}",
            verdict(fds_ok),
            False,
        ),
    ]


def spoof_and_sigterm_checks(results: list[PhaseResult]) -> list[Check]:
    checks = []
    spoof = by_name(results, "spoof")
    if spoof and not spoof.crashed:
        limited = spoof.figures.get("spoofed still limited")
        checks.append(
            Check(
                "rotating X-Forwarded-For still rate-limited",
                f">= {SPOOF_LIMITED_SHARE:.0%} 429",
                spoof.figures.get("spoofed requests answered 429", "-")
                if spoof.figures.get("rate limit seen")
                else "no rate limit seen",
                verdict(limited if spoof.figures.get("rate limit seen") else None),
                True,
            )
        )
    sigterm = by_name(results, "sigterm")
    if sigterm and not sigterm.crashed and sigterm.outcomes:
        code = sigterm.figures.get("exit code")
        checks.append(
            Check(
                "streams at SIGTERM end with [DONE] or finish",
                "all",
                f"{len(sigterm.outcomes) - sigterm.figures['cut without [DONE]']}/{len(sigterm.outcomes)}",
                verdict(sigterm.figures["cut without [DONE]"] == 0),
                True,
            )
        )
        if isinstance(code, int) or code is None:
            checks.append(Check("server exits 0 after SIGTERM", "0", str(code), verdict(code == 0), False))
    return checks


def load_rss_check(results: list[PhaseResult]) -> list[Check]:
    """Growth over the load phase from its first sample on: the same traffic throughout, so a leak shows as a
    climb, while the warm-up baseline can sit on a transient peak or dip of the allocator."""
    load = by_name(results, "load")
    trend = load.figures.get("rss_trend", []) if load else []
    if len(trend) < 2:
        return []
    (first_n, first), (last_n, last) = trend[0], trend[-1]
    growth = last / first - 1
    return [
        Check(
            f"RSS growth over the load, request {first_n} -> {last_n}",
            f"< {RSS_GROWTH_TARGET:.0%}",
            f"{growth:+.1%}",
            verdict(growth < RSS_GROWTH_TARGET),
            True,
        )
    ]


def resource_checks(resources: dict[str, Any]) -> list[Check]:
    if not resources.get("main_phases"):
        return []
    warm, after = resources.get("rss_after_warmup"), resources.get("rss_after")
    growth = None if not warm or not after else after / warm - 1
    return [
        Check(
            "RSS growth after warm-up",
            f"< {RSS_GROWTH_TARGET:.0%}",
            ("unknown (no PID)" if not resources.get("pid") else "unknown (the run stopped early)")
            if growth is None
            else f"{growth:+.1%}",
            verdict(None if growth is None else growth < RSS_GROWTH_TARGET),
            True,
        )
    ]


def run_checks(results: list[PhaseResult], resources: dict[str, Any]) -> list[Check]:
    crashed = [r.name for r in results if r.crashed]
    measured = (
        ", ".join(
            filter(
                None,
                [
                    "crashed: " + ", ".join(crashed) if crashed else "",
                    "interrupted" if resources.get("interrupted") else "",
                ],
            )
        )
        or "all"
    )
    return [
        Check(
            "every phase ran to its end",
            "all",
            measured,
            verdict(not crashed and not resources.get("interrupted")),
            True,
        )
    ]


def evaluate(results: list[PhaseResult], resources: dict[str, Any]) -> list[Check]:
    checks = (
        run_checks(results, resources)
        + traffic_checks(results)
        + health_checks(results)
        + poison_and_surrogate_checks(results)
        + hangup_checks(results)
        + connection_checks(results)
        + spoof_and_sigterm_checks(results)
        + resource_checks(resources)
        + load_rss_check(results)
    )
    if "server_up_after_main_phases" in resources:
        up = resources["server_up_after_main_phases"]
        checks.append(Check("server up after the main phases", "/health 200", "yes" if up else "no", verdict(up), True))
    return checks


# --- rendering ------------------------------------------------------------------------------------------------


def fmt_s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def by_status(outcomes: list[Outcome]) -> str:
    counts = Counter(o.label for o in outcomes)
    return " ".join(f"{label}x{n}" for label, n in sorted(counts.items())) or "-"


def kind_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for kind in dict.fromkeys(o.kind for o in outcomes):
        mine = [o for o in outcomes if o.kind == kind]
        streams = [o for o in mine if o.stream]
        fourxx = [o for o in mine if o.expect_field and o.status is not None and 400 <= o.status < 500]
        latencies = [o.latency_s for o in mine]
        rows.append(
            {
                "kind": kind,
                "sent": len(mine),
                "by_status": dict(Counter(o.label for o in mine)),
                "normal": sum(o.normal for o in mine) if any(o.generation for o in mine) else None,
                "streams": len(streams),
                "done": sum(o.done for o in streams),
                "error_event": sum(o.error_event for o in streams),
                "cut": sum(o.cut for o in streams),
                "hung_up": sum(o.hung_up for o in streams),
                "field_named": f"{sum(o.named_field for o in fourxx)}/{len(fourxx)}" if fourxx else "-",
                "latency_p50_s": statistics.median(latencies),
                "latency_max_s": max(latencies),
            }
        )
    return rows


def phase_table(result: PhaseResult) -> Table:
    where = f" ({result.server})" if result.server else ""
    table = Table(
        title=f"phase {result.name}{where} · {result.wall_s:.1f} s · /health p50 "
        f"{fmt_s(result.health.get('p50_s'))} s, max {fmt_s(result.health.get('max_s'))} s",
        title_justify="left",
    )
    for column in (
        "kind",
        "sent",
        "by status",
        "normal",
        "SSE",
        "[DONE]",
        "error",
        "cut",
        "hung up",
        "field",
        "p50 / max s",
    ):
        table.add_column(
            column, justify="left" if column in ("kind", "by status") else "right", no_wrap=column == "kind"
        )
    for row in kind_rows(result.outcomes):
        sse = [str(row[k]) if row["streams"] else "-" for k in ("streams", "done", "error_event", "cut", "hung_up")]
        table.add_row(
            row["kind"],
            str(row["sent"]),
            " ".join(f"{k}x{v}" for k, v in sorted(row["by_status"].items())),
            "-" if row["normal"] is None else str(row["normal"]),
            *sse,
            row["field_named"],
            f"{row['latency_p50_s']:.2f} / {row['latency_max_s']:.2f}",
        )
    return table


def seconds_or_never(record: dict[str, Any], key: str) -> str:
    if key not in record:
        return "-"
    return "never" if record[key] is None else f"{record[key]:.2f}"


def hangup_table(attempts: list[dict[str, Any]]) -> Table:
    table = Table(title="hang-ups: seconds from the client's close", title_justify="left")
    for column in ("attempt", "max_tokens", "n", "rows at hang-up", "disconnect counter moved", "rows free", "note"):
        table.add_column(column, justify="right")
    for i, a in enumerate(attempts):
        note = (
            f"answered {a['answered_before_hangup']} before the hang-up"
            if "answered_before_hangup" in a
            else a.get("error", "")
        )
        table.add_row(
            str(i + 1),
            str(a.get("max_tokens", "-")),
            str(a.get("n", "-")),
            str(a.get("rows_running_at_hangup", "-")),
            seconds_or_never(a, "counter_moved_s"),
            seconds_or_never(a, "rows_free_s"),
            note,
        )
    return table


def connections_table(figures: dict[str, Any]) -> Table:
    table = Table(
        title=f"connections held up to {figures['window_s']:g} s · server fds before "
        f"{figures.get('fds before')}, while open {figures.get('fds while open')}, after "
        f"{figures.get('fds after')}",
        title_justify="left",
    )
    for column in ("kind", "opened", "closed by server", "closed after p50 / max s", "server sent"):
        table.add_column(column, justify="left" if column in ("kind", "server sent") else "right")
    for row in figures["connections"]:
        table.add_row(
            row["kind"],
            str(row["opened"]),
            str(row["closed_by_server"]),
            f"{fmt_s(row['closed_p50_s'], 1)} / {fmt_s(row['closed_max_s'], 1)}",
            "; ".join(f"{k} x{v}" for k, v in row["answers"].items()),
        )
    return table


def print_phase(result: PhaseResult) -> None:
    if result.skipped:
        console.print(f"phase {result.name}: skipped ({result.skipped})\n")
        return
    if result.outcomes:
        console.print(phase_table(result))
    if result.name == "hangup" and result.figures.get("attempts"):
        console.print(hangup_table(result.figures["attempts"]))
    if result.name == "idle" and result.figures.get("connections"):
        console.print(connections_table(result.figures))
    for key, value in result.figures.items():
        if key not in ("attempts", "connections", "window_s", "rss_trend") and not key.startswith("fds"):
            console.print(f"  {key}: {value}")
    if result.health.get("not_200"):
        console.print(f"  /health answers other than 200: {result.health['not_200']}")
    for note in result.notes:
        console.print(f"  note: {note}")
    if result.crashed:
        console.print(f"  CRASHED: {result.crashed}")
    console.print()


def summary_table(results: list[PhaseResult]) -> Table:
    table = Table(title="summary", title_justify="left")
    for column in (
        "phase",
        "requests",
        "by status",
        "bad input 5xx",
        "cut streams",
        "/health p50 s",
        "/health max s",
        "wall s",
        "RSS after",
    ):
        table.add_column(column, justify="left" if column in ("phase", "by status") else "right")
    for r in results:
        if r.skipped:
            table.add_row(r.name, "-", f"skipped: {r.skipped}", "-", "-", "-", "-", "-", "-")
            continue
        name = f"{r.name} ({r.server})" if r.server else r.name
        table.add_row(
            name,
            str(len(r.outcomes)),
            by_status(r.outcomes) if r.outcomes else RAW_PHASES.get(r.name, "-"),
            str(sum(o.bad_input and o.server_error for o in r.outcomes)),
            str(sum(o.cut for o in r.outcomes)),
            fmt_s(r.health.get("p50_s")),
            fmt_s(r.health.get("max_s")),
            f"{r.wall_s:.1f}",
            fmt_mb(r.rss_after),
        )
    return table


def resources_table(resources: dict[str, Any]) -> Table:
    table = Table(
        title=f"server process (PID {resources.get('pid') or 'unknown'}, {resources.get('pid_source')})",
        title_justify="left",
    )
    for column in (
        "RSS before warm-up",
        "after warm-up",
        "after",
        "growth after warm-up",
        "open fds after warm-up",
        "open fds after",
    ):
        table.add_column(column, justify="right")
    warm, after = resources.get("rss_after_warmup"), resources.get("rss_after")
    growth = f"{after / warm - 1:+.1%}" if warm and after else "-"
    table.add_row(
        fmt_mb(resources.get("rss_before_warmup")),
        fmt_mb(warm),
        fmt_mb(after),
        growth,
        str(resources.get("fds_after_warmup", "-")),
        str(resources.get("fds_after", "-")),
    )
    return table


def legend() -> str:
    return (
        "normal: 200 with every finish_reason stop/length (and [DONE] for SSE); SSE: answers that were event "
        "streams; error: an error event came; cut: ended without [DONE] and not by us; field: 4xx answers to "
        "bad input that named the field; p50 / max s: request latency."
    )


def checks_table(checks: list[Check]) -> Table:
    table = Table(title="checks", title_justify="left")
    for column in ("check", "gate", "target", "measured", "result"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, "must" if c.must else "should", c.target, c.measured, c.result)
    return table


def report_record(
    args: argparse.Namespace,
    urls: list[str],
    results: list[PhaseResult],
    resources: dict[str, Any],
    checks: list[Check],
    wall_s: float,
) -> dict[str, Any]:
    return {
        "script": "benchmarks/serve_faults.py",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "urls": urls,
        "served": bool(args.serve),
        "model": args.model if args.serve else None,
        "quick": args.quick,
        "seed": args.seed,
        "wall_s": round(wall_s, 1),
        "phases": {
            r.name: {
                "skipped": r.skipped,
                "crashed": r.crashed,
                "wall_s": round(r.wall_s, 2),
                "rss_after": r.rss_after,
                "by_status": dict(Counter(o.label for o in r.outcomes)),
                "bad_input_5xx": sum(o.bad_input and o.server_error for o in r.outcomes),
                "cut_streams": sum(o.cut for o in r.outcomes),
                "health": r.health,
                "kinds": kind_rows(r.outcomes),
                "figures": r.figures,
                "notes": r.notes,
            }
            for r in results
        },
        "resources": resources,
        "checks": [c.__dict__ for c in checks],
        "passed": not any(c.must and c.result == "FAIL" for c in checks),
    }


def machine() -> dict[str, Any]:
    try:
        from llmkit.measure import cpu_model

        cpu = cpu_model()
    except Exception:
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


# --- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after -- go to `llmkit serve` (with --serve).",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", action="store_true", help="start `python -m llmkit serve` here (and stop it)")
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL, help="model for --serve (any llmkit reference)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLMKIT_API_KEY"),
        help="sent as a Bearer token (default: $LLMKIT_API_KEY); with --serve, the servers require it",
    )
    parser.add_argument("--pid", type=int, help="the server's PID (--url): RSS, fds, and the sigterm phase")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {','.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="a short run (200 load requests, 10 s idle window...)")
    parser.add_argument("--requests", type=int, help="requests in the load phase (default 1000, --quick 200)")
    parser.add_argument(
        "--idle-window",
        type=float,
        help="seconds the idle phase holds its connections (default 40, --quick 15); make it longer "
        "than the server's --read-timeout",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="the server's --max-body-bytes (big bodies are 0.9 of it, too-big ones 1.1)",
    )
    parser.add_argument("--logs", default=tempfile.gettempdir(), help="folder for the logs of servers started here")
    parser.add_argument("--json", help="write the full record to this file ('-': stdout, tables go to stderr)")
    args = parser.parse_args(argv)
    args.extra = extra
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if extra and not args.serve:
        parser.error("arguments after -- are for --serve")
    return args


def start_server(args: argparse.Namespace, role: str, options: list[str]) -> Target:
    served = ServedProcess(role, args.model, options, args.extra, Path(args.logs), api_key=args.api_key)
    progress(f"starting {role} server: {' '.join(served.command[1:])} (log {served.log_path})")
    try:
        ready_s = wait_healthy(served.url, served.proc, log_path=served.log_path)
    except BaseException:  # not ready, or interrupted while waiting: leave no server behind
        served.stop()
        raise
    progress(f"{role} server ready in {ready_s:.1f} s")
    return Target(served.url, args.api_key, served.proc.pid, "started here", served)


def attach(args: argparse.Namespace) -> Target:
    target = Target(args.url.rstrip("/"), args.api_key, args.pid, "--pid" if args.pid else "unknown")
    wait_healthy(target.url)
    listener = find_listener_pid(target.port) if target.host in LOCAL_HOSTS else None
    if target.pid is not None and listener is not None and listener != target.pid:
        cannot_run(
            f"--pid {target.pid} does not listen on port {target.port} (PID {listener} does); "
            "refusing to measure or signal the wrong process"
        )
    if target.pid is None and listener is not None:
        target.pid, target.pid_source = listener, "found by port (never signalled)"
    try:
        status = httpx.get(target.url + MODELS, headers=target.auth_headers, timeout=HEALTH_TIMEOUT_S).status_code
    except httpx.HTTPError as exc:
        cannot_run(f"GET {MODELS} failed: {failure_name(exc)}")
    if status == 401:
        cannot_run("the server answered 401: pass --api-key (or set LLMKIT_API_KEY)")
    return target


def skip_reason(name: str, args: argparse.Namespace) -> str | None:
    if name == "sigterm" and not args.serve and not args.pid:
        return "needs --serve or --pid"
    return None


def run_phases(run: Run, names: list[str], args: argparse.Namespace, results: list[PhaseResult]) -> None:
    """Appends each phase's result as it ends, so an interrupted run still reports the phases it finished."""
    for name in names:
        reason = skip_reason(name, args)
        results.append(PhaseResult(name, skipped=reason) if reason else run_phase(run, name, PHASE_FUNCTIONS[name]))


def server_up(target: Target) -> bool:
    try:
        return httpx.get(target.url + HEALTH, timeout=HEALTH_TIMEOUT_S).status_code == 200
    except httpx.HTTPError:
        return False


def run_main_phases(
    run: Run, names: list[str], args: argparse.Namespace, results: list[PhaseResult], resources: dict[str, Any]
) -> None:
    if not names:
        return
    if args.serve:
        run.target = start_server(args, "main", SERVE_OPTIONS)
    target = run.target
    probe = run.probe = ProcessProbe(target.pid)
    resources.update(pid=target.pid, pid_source=target.pid_source, rss_before_warmup=probe.rss(), main_phases=names)
    run.poller = HealthPoller(target.url).start()
    try:
        run.prepare_big_bodies()
        warm = run_phase(run, "warm-up", warm_up)
        if any(o.status == 429 for o in warm.outcomes):
            resources["rate_limited_in_warmup"] = True
            progress(
                "warning: the server answers this client 429 (--rate-limit): the main phases will count "
                "429s instead of the faults; attach them to a server without a rate limit"
            )
        resources.update(
            rss_after_warmup=probe.rss(),
            fds_after_warmup=probe.fds(),
            warmup={"by_status": dict(Counter(o.label for o in warm.outcomes)), "crashed": warm.crashed},
        )
        run_phases(run, names, args, results)
        time.sleep(FD_SETTLE_S)
        resources.update(rss_after=probe.rss(), fds_after=probe.fds(), server_up_after_main_phases=server_up(target))
    finally:
        run.poller.stop()
        if target.served:
            resources["main_server_exit_code"] = target.served.stop()


def run_limited_phases(run: Run, names: list[str], args: argparse.Namespace, results: list[PhaseResult]) -> None:
    if not names:
        return
    target = start_server(args, "limited", LIMITED_SERVE_OPTIONS) if args.serve else run.target
    limited = replace(run, target=target, poller=HealthPoller(target.url).start(), probe=ProcessProbe(target.pid))
    if target.url not in run.urls:
        run.urls.append(target.url)
    first = len(results)
    try:
        run_phases(limited, names, args, results)
    finally:
        for result in results[first:]:
            result.server = "server 2" if args.serve else ""
        limited.poller.stop()
        if target.served:
            target.served.stop()


def stop_on_sigterm() -> None:
    """SIGTERM (a CI timeout, say) unwinds like Ctrl-C: servers started here are stopped, what ran is reported."""

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stop_on_sigterm()
    plan = QUICK_PLAN if args.quick else Plan()
    if args.requests:
        plan = replace(plan, load_requests=args.requests)
    if args.idle_window:
        plan = replace(plan, idle_window_s=args.idle_window)
    main_names = [p for p in PHASES if p in args.phases and p not in LIMITED_PHASES]
    limited_names = [p for p in PHASES if p in args.phases and p in LIMITED_PHASES]
    started = time.perf_counter()
    run = Run(None if args.serve else attach(args), plan, args.max_body_bytes, args.seed)
    resources: dict[str, Any] = {}
    results: list[PhaseResult] = []
    try:
        run_main_phases(run, main_names, args, results, resources)
        if run.target and run.target.url not in run.urls:
            run.urls.insert(0, run.target.url)
        run_limited_phases(run, limited_names, args, results)
    except KeyboardInterrupt:
        progress("interrupted: stopping, then reporting the phases that ended")
        resources["interrupted"] = True
    finally:
        if run.target and run.target.served:
            run.target.served.stop()
    checks = evaluate(results, resources)
    record = report_record(args, run.urls, results, resources, checks, time.perf_counter() - started)
    render(results, resources, checks, record, args)
    return 0 if record["passed"] else EXIT_FAILED


def render(
    results: list[PhaseResult],
    resources: dict[str, Any],
    checks: list[Check],
    record: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    global console
    if args.json == "-":
        console = Console(file=sys.stderr, markup=False, highlight=False, width=console.width)
    m = record["machine"]
    where = " and ".join(record["urls"]) or "-"
    console.print(
        f"llmkit serve under faults · {where}"
        + (f" · model {args.model}" if args.serve else "")
        + (
            f" · started with {' '.join(SERVE_OPTIONS)} (spoof, sigterm: {' '.join(LIMITED_SERVE_OPTIONS)})"
            f"{' ' + ' '.join(args.extra) if args.extra else ''}"
            if args.serve
            else ""
        )
    )
    console.print(
        f"{'quick' if args.quick else 'full'} run, seed {args.seed}, {record['when']} · {m['cpu']}, "
        f"{m['cores']} cores, Python {m['python']} · {record['wall_s']} s in all\n"
    )
    console.print(legend() + "\n")
    for result in results:
        print_phase(result)
    console.print(summary_table(results))
    console.print(resources_table(resources))
    console.print(checks_table(checks))
    if resources.get("rate_limited_in_warmup"):
        console.print("warning: the server rate-limited this client during the warm-up; the main phases counted 429s")
    failed = [c.name for c in checks if c.must and c.result == "FAIL"]
    console.print("result: " + ("PASS" if not failed else f"FAIL ({len(failed)} must check(s): {'; '.join(failed)})"))
    if args.json == "-":
        print(json.dumps(record, indent=2, default=str))
    elif args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
