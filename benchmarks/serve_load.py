"""Serving under load: `llmkit serve` against the tutorial's Flask server, same model, one run.

Both servers are started here on loopback ports and stay up for the whole run (an idle one
costs no CPU); the concurrency levels are interleaved (llmkit at 1, reference at 1, llmkit
at 4, ...) so machine noise hits both alike. Each level sends a fixed number of requests
from that many concurrent clients (httpx, asyncio), under a hard time cap per level.

Requests: distinct prompts, greedy (temperature 0), `max_tokens` new tokens (64 by default).
llmkit: POST /v1/completions with stream=true. Reference: POST /generate with max_length
(read as new tokens on both sides, see flask_reference.py).

Measured per level, per server:
- output tok/s: output tokens of the completed requests / wall time of the level (first
  request sent to last response done). Output tokens are counted the same way for both:
  the continuation's text re-tokenized with the model's tokenizer (no special tokens).
- req/s: completed requests / the same wall time.
- latency p50/p95: request sent to last byte received.
- TTFT p50/p95: request sent to the first non-empty text chunk. The reference does not
  stream, so its TTFT is its latency: that is when its user sees the first word.
Ratios read "> 1 means llmkit is better": llmkit/reference for tok/s, reference/llmkit for
latencies.

Usage: LLMKIT_CACHE_DIR=/tmp/llmkit-cache python benchmarks/serve_load.py [--model smollm2-135m]
       [--levels 1,4,16] [--max-tokens 64] [--level-cap-s 240] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmkit.measure import cpu_model

HERE = Path(__file__).resolve().parent
TOPICS = [
    "a lighthouse keeper",
    "a robot learning to paint",
    "the first day of school",
    "a dragon who is afraid of heights",
    "a city under the sea",
    "a lost umbrella",
    "two rival bakers",
    "a talking cat",
    "a storm at sea",
    "a message in a bottle",
    "an old clock",
    "a mountain village",
    "a space station",
    "a garden in winter",
    "a detective in Paris",
    "a train that never stops",
]
STARTUP_CAP_S = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


OPENERS = ["Once upon a time,", "Long ago,", "In a faraway land,", "Every morning,"]


def prompts(count: int) -> list[str]:
    """Distinct story openings (an instruct model given an instruction as raw text tends to stop at once)."""
    return [f"{OPENERS[(i // len(TOPICS)) % len(OPENERS)]} {TOPICS[i % len(TOPICS)]}" for i in range(count)]


class Server:
    def __init__(self, name: str, args: list[str], log_path: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "wb")
        env = {**os.environ, "LLMKIT_NO_PROGRESS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, *args, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=HERE.parent,
        )

    def wait_healthy(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < STARTUP_CAP_S:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} was not healthy after {STARTUP_CAP_S:.0f} s; see {self.log.name}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def call_llmkit(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, float | None]:
    text, first = "", None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            piece = event["choices"][0]["text"] if event["choices"] else ""
            if piece and first is None:
                first = time.perf_counter()
            text += piece
    return text, first


async def call_reference(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, float | None]:
    response = await client.post("/generate", json={"prompt": prompt, "max_length": max_tokens, "temperature": 0})
    response.raise_for_status()
    full = response.json()["generated_text"]
    return full.removeprefix(prompt), None


async def run_level(
    server: Server, call, concurrency: int, count: int, max_tokens: int, cap_s: float, count_tokens
) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    records: list[dict] = []
    failures: list[str] = []

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        async with semaphore:
            sent = time.perf_counter()
            try:
                text, first = await call(client, prompt, max_tokens)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            done = time.perf_counter()
            records.append(
                {"latency_s": done - sent, "ttft_s": (first or done) - sent, "tokens": count_tokens(text), "end": done}
            )

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=cap_s, limits=limits) as client:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(one(client, p)) for p in prompts(count)]
        _, pending = await asyncio.wait(tasks, timeout=cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall = (max(r["end"] for r in records) if records else time.perf_counter()) - started
    return summarize(records, wall, count, failures, timed_out=len(pending))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(records: list[dict], wall: float, sent: int, failures: list[str], timed_out: int) -> dict:
    tokens = sum(r["tokens"] for r in records)
    latencies = [r["latency_s"] for r in records]
    ttfts = [r["ttft_s"] for r in records]
    return {
        "sent": sent,
        "completed": len(records),
        "failed": len(failures),
        "timed_out": timed_out,
        "failures": failures[:3],
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall if wall > 0 and records else 0.0,
        "req_s": len(records) / wall if wall > 0 and records else 0.0,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
    }


def machine() -> dict:
    cpu = cpu_model()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import torch
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def ratio(ours: float | None, ref: float | None, higher_is_better: bool) -> str:
    if not ours or not ref:
        return "-"
    return f"{(ours / ref if higher_is_better else ref / ours):.1f}x"


def table(report: dict) -> str:
    lines = [
        "| concurrency | server | done/sent | output tok/s | req/s | latency p50 / p95 (s) | TTFT p50 / p95 (s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for level in report["levels"]:
        for side in ("llmkit", "reference"):
            r = level[side]
            lines.append(
                f"| {level['concurrency']} | {side} | {r['completed']}/{r['sent']} | "
                f"{fmt(r['output_tok_s'])} | {fmt(r['req_s'], digits=2)} | "
                f"{fmt(r['latency_p50_s'], digits=2)} / {fmt(r['latency_p95_s'], digits=2)} | "
                f"{fmt(r['ttft_p50_s'], digits=2)} / {fmt(r['ttft_p95_s'], digits=2)} |"
            )
        ours, ref = level["llmkit"], level["reference"]
        lines.append(
            f"| {level['concurrency']} | **ratio** | | **{ratio(ours['output_tok_s'], ref['output_tok_s'], True)}**"
            f" | {ratio(ours['req_s'], ref['req_s'], True)} | "
            f"{ratio(ours['latency_p50_s'], ref['latency_p50_s'], False)} / "
            f"**{ratio(ours['latency_p95_s'], ref['latency_p95_s'], False)}** | "
            f"{ratio(ours['ttft_p50_s'], ref['ttft_p50_s'], False)} / "
            f"{ratio(ours['ttft_p95_s'], ref['ttft_p95_s'], False)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="any llmkit model reference")
    parser.add_argument("--levels", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: max(16, 2 x concurrency))"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--level-cap-s", type=float, default=240.0, help="hard time cap per level and server")
    parser.add_argument("--dtype", default="auto", help="llmkit's --dtype (the reference pipeline uses float32)")
    parser.add_argument("--logs", default="/tmp", help="folder for the two servers' logs")
    parser.add_argument("--json", help="also write the full report to this file")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from llmkit.models import local_folder, resolve

    source = resolve(args.model)
    folder = str(local_folder(source) or source.location)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    logs = Path(args.logs)
    report = {"machine": machine(), "model": source.name, "max_tokens": args.max_tokens, "levels": []}
    servers = {
        "llmkit": Server(
            "llmkit",
            [
                "-m",
                "llmkit",
                "serve",
                "-m",
                args.model,
                "--max-batch-size",
                "16",
                "--max-queue",
                "256",
                "--dtype",
                args.dtype,
                "--request-timeout",
                "600",
            ],
            logs / "serve_load-llmkit.log",
        ),
        "reference": Server(
            "reference", [str(HERE / "flask_reference.py"), "--model-folder", folder], logs / "serve_load-reference.log"
        ),
    }
    calls = {"llmkit": call_llmkit, "reference": call_reference}
    try:
        for name, server in servers.items():
            report[f"{name}_startup_s"] = server.wait_healthy()
        for name, server in servers.items():  # warm-up, unmeasured
            asyncio.run(run_level(server, calls[name], 1, 1, 8, args.level_cap_s, count_tokens))
        for concurrency in levels:
            count = args.requests or max(16, 2 * concurrency)
            level = {"concurrency": concurrency}
            for name, server in servers.items():
                print(f"level {concurrency}: {name}, {count} requests ...", file=sys.stderr, flush=True)
                level[name] = asyncio.run(
                    run_level(server, calls[name], concurrency, count, args.max_tokens, args.level_cap_s, count_tokens)
                )
            report["levels"].append(level)
    finally:
        for name, server in servers.items():
            report[f"{name}_exit_code"] = server.stop()
    m = report["machine"]
    print(
        f"Model {report['model']}, greedy, {args.max_tokens} new tokens, loopback; {m['cpu']}, {m['cores']} cores, "
        f"load average {m['load_avg_1m_at_start']}, torch {m['torch']}, transformers {m['transformers']}"
    )
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
