"""Start `llmkit serve` as a real process on a free loopback port and read its SSE streams; drive a
scheduler (batch.py, llamacpp_batch.py, serial.py) step by step in-process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m llmkit serve -m MODEL --port P ARGS...`; stderr goes to `log_path`.

    `start()` polls /health from the moment the process exists and keeps every status it saw, so a
    test can check that the server answered 503 "loading" before it answered 200.
    """

    def __init__(
        self, model_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None, api_key: str | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.api_key = api_key
        self.args = [sys.executable, "-m", "llmkit", "serve", "-m", str(model_dir), "--port", str(self.port), *args]
        self.env = {**os.environ, "LLMKIT_NO_PROGRESS": "1", **(env or {})}
        self.health_seen: list[tuple[int, dict]] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmkit serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + "/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            self.health_seen.append((response.status_code, response.json()))
            if response.status_code == 200:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"llmkit serve was not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=30, **kwargs)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def app_client(engine, settings=None, *, ready_within_s: float = 30.0):
    """A FastAPI TestClient over build_app(engine) in this process, once /health answers 200 (the model "loads" on
    the app's own thread even when it is already loaded)."""
    from fastapi.testclient import TestClient

    from llmkit.server.app import build_app
    from llmkit.server.settings import ServerSettings

    with TestClient(build_app(engine, settings or ServerSettings())) as client:
        deadline = time.monotonic() + ready_within_s
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, log_path: Path, *args: str) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`) on `gguf`, a third-party
    target nobody here wrote; yields its base URL (no /v1) once /v1/models answers. Skips without the extra."""
    import pytest

    pytest.importorskip(
        "llama_cpp.server.app", reason="llama-cpp-python's server extra is not installed (llama-cpp-python[server])"
    )
    port = free_port()
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), *args]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not start: {Path(log_path).read_text(errors='replace')[-500:]}")
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def answers_quickly(
    http: httpx.Client, within_s: float = 1.5, prompt: str = "q", max_tokens: int = 2
) -> httpx.Response:
    """A short request that only gets through in time if nothing abandoned still holds the model."""
    started = time.monotonic()
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
    assert response.status_code == 200
    assert time.monotonic() - started < within_s
    return response


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """Each `data:` payload of an SSE response: parsed JSON, or the string '[DONE]'."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: ") :]
        yield data if data == "[DONE]" else json.loads(data)


def stream_texts(http, path: str, body: dict) -> tuple[dict[int, str], list]:
    """(text per choice index, all events) of a streamed request."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            piece = choice["delta"].get("content", "") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts, events


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0.0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


def seed_without_eos(engine, prompt: str, max_new_tokens: int, tries: int = 64) -> int:
    """A seed for which the tiny random model samples `max_new_tokens` tokens without hitting EOS (default sampling
    parameters), so a request with it runs for a known number of steps; the server gives the engine's text."""
    from llmkit.params import parse_params

    for seed in range(tries):
        result = engine.generate(prompt, parse_params(seed=seed, max_new_tokens=max_new_tokens))
        if result.completions[0].finish_reason == "length":
            return seed
    raise AssertionError(f"no seed below {tries} runs {max_new_tokens} tokens without EOS for {prompt!r}")


# --- a scheduler in-process -----------------------------------------------------------------------------


class Collector:
    """A request's sink: its Chunks, then its one Finished or Failed."""

    def __init__(self):
        self.chunks, self.final = [], None

    def __call__(self, event):
        from llmkit.engine.scheduling import Failed, Finished

        if isinstance(event, (Finished, Failed)):
            assert self.final is None, "a request ends once"
            self.final = event
        else:
            self.chunks.append(event)


def scheduler_request(engine, prompt: str, spec: dict, **kwargs):
    """(BatchRequest, its Collector) for `prompt` with the generation parameters in `spec`."""
    from llmkit.engine.scheduling import BatchRequest
    from llmkit.params import parse_params

    sink = Collector()
    return BatchRequest(prompt, engine.prompt_ids(prompt), parse_params(spec), sink, **kwargs), sink


def submit_all(scheduler, engine, prompts, specs, **kwargs) -> list:
    """Submit one request per (prompt, spec) pair, in order; their Collectors."""
    sinks = []
    for prompt, spec in zip(prompts, specs):
        request, sink = scheduler_request(engine, prompt, spec, **kwargs)
        scheduler.submit(request)
        sinks.append(sink)
    return sinks


def run_steps(scheduler, limit: int = 2000) -> int:
    """Step the scheduler until it has nothing left to do; the number of steps that did work."""
    steps = 0
    while scheduler.step():
        steps += 1
        assert steps < limit
    return steps


def completions(result) -> list[tuple]:
    return [(c.text, c.token_ids, c.finish_reason) for c in result.completions]
