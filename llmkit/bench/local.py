"""`llmkit bench MODEL`: llmkit's own `serve` in a subprocess on a free loopback port, stopped after.

The server runs in its own session (process group), so a Ctrl-C at the terminal reaches bench
alone: bench prints what it gathered, then stops the server itself with SIGTERM (a graceful stop:
`--grace-period 2`), and kills it if it is still there after STOP_TIMEOUT_S. Its output goes to a
temporary log, removed after a clean stop and named in the error when the server fails to start.
The key variables are dropped from its environment: bench talks to its own server without a key.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmkit.bench.client import API_KEY_ENVS, Endpoint
from llmkit.errors import ModelLoadError, one_line

DEFAULT_STARTUP_TIMEOUT_S = 900.0  # a first load of gemma3-270m de-quantizes for about 75 s on 2 cores
POLL_INTERVAL_S = 0.25
STOP_TIMEOUT_S = 15.0
GRACE_PERIOD_S = 2.0
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class ServeOptions:
    """The `llmkit serve` options bench forwards (None: serve's own default)."""

    threads: int | None = None
    max_batch_size: int | None = None
    max_queue: int | None = None
    engine: str | None = None
    dtype: str | None = None
    request_timeout_s: float | None = None

    def arguments(self) -> list[str]:
        args: list[str] = []
        for flag, value in (
            ("--threads", self.threads),
            ("--max-batch-size", self.max_batch_size),
            ("--max-queue", self.max_queue),
            ("--engine", self.engine),
            ("--dtype", self.dtype),
            ("--request-timeout", self.request_timeout_s),
        ):
            if value is not None:
                args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return args


class LocalServer:
    """One `python -m llmkit serve`: start() waits until it is ready, stop() ends it."""

    def __init__(self, model: str, options: ServeOptions, *, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S):
        self.model, self.options, self.startup_timeout_s = model, options, startup_timeout_s
        self.port = free_port()
        self.root = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.ready_after_s: float | None = None
        self.health: dict | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "-m",
            self.model,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--grace-period",
            f"{GRACE_PERIOD_S:g}",
            *self.options.arguments(),
        ]

    def display_command(self) -> str:
        """What the user would type: `llmkit serve -m MODEL --port P ...`."""
        return " ".join(["llmkit", *self.command[3:]])

    def start(self, report: Callable[[float, dict | None], None] | None = None) -> Endpoint:
        """Start the server and wait until /health answers 200; report(elapsed_s, health) while it loads."""
        import httpx

        env = {key: value for key, value in os.environ.items() if key not in API_KEY_ENVS}
        env["LLMKIT_NO_PROGRESS"] = "1"
        handle, name = tempfile.mkstemp(prefix="llmkit-bench-serve-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(handle, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        started = time.monotonic()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                elapsed = time.monotonic() - started
                code = self.process.poll()
                if code is not None:
                    raise ModelLoadError(
                        f"llmkit serve exited with code {code} before it was ready: "
                        f"{self._last_error()} (log: {self.log_path})"
                    )
                if elapsed > self.startup_timeout_s:
                    self.stop(keep_log=True)
                    raise ModelLoadError(
                        f"llmkit serve was not ready after {self.startup_timeout_s:.0f} s "
                        f"(--startup-timeout; log: {self.log_path})"
                    )
                try:
                    response = client.get(self.root + "/health")
                    self.health = (
                        response.json()
                        if response.headers.get("content-type", "").startswith("application/json")
                        else None
                    )
                    if response.status_code == 200:
                        self.ready_after_s = elapsed
                        return Endpoint(self.root)
                    if self.health and self.health.get("status") in ("error", "failing"):
                        self.stop(keep_log=True)
                        raise ModelLoadError(
                            f"llmkit serve could not load {self.model}: "
                            f"{self.health.get('error') or self._last_error()} (log: {self.log_path})"
                        )
                except httpx.TransportError:
                    pass
                if report is not None:
                    report(elapsed, self.health)
                time.sleep(POLL_INTERVAL_S)

    def _last_error(self) -> str:
        """The server's own error line (`error: ...`) from its log, else its last line."""
        try:
            lines = (
                [
                    line.strip()
                    for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if line.strip()
                ]
                if self.log_path
                else []
            )
        except OSError:
            lines = []
        for line in reversed(lines):
            if line.startswith("error:"):
                return one_line(line[len("error:") :].strip())
        return one_line(lines[-1]) if lines else "no output"

    def stop(self, keep_log: bool = False) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit code (None if it was never started)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not keep_log and self.log_path is not None and process.returncode == 0:
            self.log_path.unlink(missing_ok=True)
        return process.returncode
