"""How fast `llmkit bench` itself can go: its load loop against a server that answers at once.

The server is a raw asyncio HTTP/1.1 server (no framework, pre-built bytes) in a child process
of this script, so the client's measurement is not charged for the server's CPU (on 2 cores each
gets one). It answers GET /v1/models and streams POST /v1/completions as OpenAI servers do: one
SSE chunk per token, `max_tokens` of them with no delay, then a usage chunk and [DONE], on
keep-alive connections. It has no /tokenize, so bench sizes its prompts from usage, as it does
against llmkit serve.

Two workloads go through bench's own code (llmkit.bench.runner.run: the same connection pool,
requests, SSE parsing and records as `llmkit bench`):
- requests: one-token answers at concurrency 64 -> the requests/s the client completes;
- tokens: 256-token streams at concurrency 16 -> the output chunks/s it reads.
Each runs --repeats times, interleaved; the ceiling is the median run (the best is printed too: on a
shared 2-core machine the runs vary by a third, and a warning should come early rather than late).
The two figures go into llmkit/bench/ceiling.py by hand, with the date and the machine.

Usage: python benchmarks/bench_ceiling.py [--requests 2000] [--streams 200] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmkit.bench import runner  # noqa: E402
from llmkit.bench.client import Endpoint  # noqa: E402
from llmkit.bench.workload import LengthRange  # noqa: E402
from llmkit.measure import cpu_model  # noqa: E402

MODEL = "instant"
CHUNK_TEMPLATE = (
    '{"id":"cmpl-0","object":"text_completion","created":0,"model":"instant","choices":'
    '[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}]}'
)
LAST_TEMPLATE = (
    '{"id":"cmpl-0","object":"text_completion","created":0,"model":"instant","choices":'
    '[{"index":0,"text":" tok","logprobs":null,"finish_reason":"length"}]}'
)


def _chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _event(data: str) -> bytes:
    return _chunked(f"data: {data}\n\n".encode())


TOKEN_EVENT = _event(CHUNK_TEMPLATE)
LAST_EVENT = _event(LAST_TEMPLATE)
DONE = _event("[DONE]") + b"0\r\n\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _json_response(status: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )


MODELS = _json_response("200 OK", {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
NOT_FOUND = _json_response("404 Not Found", {"error": {"message": "no such endpoint", "type": "not_found"}})


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            if method == "GET" and path == "/v1/models":
                writer.write(MODELS)
            elif method == "POST" and path == "/v1/completions":
                request = json.loads(body)
                tokens = max(1, int(request.get("max_tokens", 16)))
                prompt_tokens = len(str(request.get("prompt", "")).split())
                usage = _event(
                    json.dumps(
                        {
                            "id": "cmpl-0",
                            "object": "text_completion",
                            "created": 0,
                            "model": MODEL,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": tokens,
                                "total_tokens": prompt_tokens + tokens,
                            },
                        }
                    )
                )
                writer.write(STREAM_HEAD + TOKEN_EVENT * (tokens - 1) + LAST_EVENT + usage + DONE)
            else:
                writer.write(NOT_FOUND)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve(port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the instant server did not start")


def measure(url: str, *, prompts: int, output_len: int, concurrency: int) -> dict:
    spec = runner.BenchSpec(
        points=(runner.LoadPoint(max_concurrency=concurrency),),
        num_prompts=prompts,
        input_len=LengthRange(16, 16),
        output_len=LengthRange(output_len, output_len),
        warmup=concurrency,
        request_timeout_s=60.0,
    )
    report = runner.run(Endpoint(url), spec, {"url": url, "kind": "instant test server"})
    point = report.points[0].summary
    return {
        "prompts": prompts,
        "output_len": output_len,
        "concurrency": concurrency,
        "completed": point.completed,
        "failed": point.failed,
        "duration_s": point.duration_s,
        "requests_per_s": point.request_throughput,
        "chunks_per_s": point.output_chunk_throughput,
        "tokens_per_s": point.output_throughput,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="one-token requests in the requests workload")
    parser.add_argument("--streams", type=int, default=200, help="256-token streams in the tokens workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the runs to this file")
    args = parser.parse_args()

    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    server.start()
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}"
        runs = {"requests": [], "tokens": []}
        for _ in range(args.repeats):  # interleaved, so a noisy moment hits both alike
            runs["requests"].append(measure(url, prompts=args.requests, output_len=1, concurrency=64))
            runs["tokens"].append(measure(url, prompts=args.streams, output_len=256, concurrency=16))
    finally:
        server.terminate()
        server.join(5)
    requests_per_s = statistics.median(r["requests_per_s"] for r in runs["requests"])
    chunks_per_s = statistics.median(r["chunks_per_s"] for r in runs["tokens"])
    best_requests = max(r["requests_per_s"] for r in runs["requests"])
    best_chunks = max(r["chunks_per_s"] for r in runs["tokens"])
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m_at_end": round(load, 2),
    }
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, load average "
        f"{machine['load_avg_1m_at_end']}"
    )
    for name, results in runs.items():
        for r in results:
            print(
                f"{name:8s} {r['completed']:5d} ok {r['failed']:3d} failed  concurrency {r['concurrency']:3d}  "
                f"{r['duration_s']:6.2f} s  {r['requests_per_s']:8.1f} req/s  {r['chunks_per_s']:9.0f} chunks/s"
            )
    print(
        f"ceiling (median run): {requests_per_s:.0f} requests/s (one-token answers), {chunks_per_s:.0f} output "
        f"chunks/s (256-token streams); best run {best_requests:.0f} requests/s, {best_chunks:.0f} chunks/s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine, "runs": runs, "requests_per_s": requests_per_s, "chunks_per_s": chunks_per_s},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
