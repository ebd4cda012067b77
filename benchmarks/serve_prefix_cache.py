"""The server's prefix cache under load: 16 concurrent multi-turn chat users, `llmkit serve` with the cache on
(--prefix-cache-mb, its default) against the same server with it off (--prefix-cache-mb 0), one run.

Both servers run the same model and engine and stay up for the whole run (an idle one costs no CPU); the runs
alternate (off, on, off, on...) so machine noise hits both alike. In each run --users clients (16) hold one
conversation each through POST /v1/chat/completions (stream=true, greedy): a system message of about
--history-tokens tokens shared by every user (the shipped reference text, as a product's long instructions
or a document everybody asks about would be), then --turns questions, each sent as soon as that user's previous
answer has arrived, with the whole history as the chat template writes it. Every user starts at once.

Measured per run:
- TTFT: request sent to the first non-empty content chunk, over every request, and over turns 2 and later
  (which could reuse their own history; turn 1 can reuse only the shared system message);
- output tok/s: completion tokens (the server's usage) of every request / the run's wall time;
- cached tokens: the share of prompt tokens the server reported in usage.prompt_tokens_details.cached_tokens.
Ratios read "> 1 means the cache is better": off/on for TTFT, on/off for throughput. Greedy on both sides, so each
user's answers should be the same text with and without the cache; the report says whether they were.

Usage: LLMKIT_CACHE_DIR=/tmp/llmkit-cache python benchmarks/serve_prefix_cache.py [--model smollm2-135m]
       [--engine transformers|llama.cpp] [--users 16] [--turns 4] [--history-tokens 1000] [--max-tokens 32]
       [--runs 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prefix import QUESTIONS  # noqa: E402  (sibling scripts)
from serve_load import Server, fmt, machine, percentile  # noqa: E402

OPENERS = ["Hi!", "Hello.", "Good morning.", "Hey there.", "Greetings.", "Hi, quick one.", "Hello again.", "Yo."]


def system_text(history_tokens: int) -> str:
    """The reference text repeated to about `history_tokens` tokens (4 characters a token, roughly)."""
    text = files("llmkit.data").joinpath("reference.txt").read_text(encoding="utf-8")
    wanted = history_tokens * 4
    return (text * (wanted // len(text) + 1))[:wanted]


async def one_turn(client: httpx.AsyncClient, messages: list[dict], max_tokens: int) -> dict:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, first, usage = "", None, None
    sent = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                piece = choice.get("delta", {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
    done = time.perf_counter()
    assert usage is not None, "no usage chunk"
    return {"text": text, "ttft_s": (first or done) - sent, "end": done, "usage": usage}


async def user(client: httpx.AsyncClient, index: int, system: str, turns: int, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    record = []
    for turn in range(turns):
        question = QUESTIONS[turn % len(QUESTIONS)]
        if turn == 0:
            question = f"{OPENERS[index % len(OPENERS)]} (user {index}) {question}"
        messages.append({"role": "user", "content": question})
        answer = await one_turn(client, messages, max_tokens)
        answer["turn"] = turn
        record.append(answer)
        messages.append({"role": "assistant", "content": answer["text"]})
    return record


async def run(server: Server, users: int, turns: int, system: str, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(base_url=server.url, timeout=1800, limits=limits) as client:
        started = time.perf_counter()
        records = await asyncio.gather(*(user(client, i, system, turns, max_tokens) for i in range(users)))
    flat = [r for rs in records for r in rs]
    wall = max(r["end"] for r in flat) - started
    prompt = sum(r["usage"]["prompt_tokens"] for r in flat)
    cached = sum(r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in flat)
    later = [r["ttft_s"] for r in flat if r["turn"] > 0]
    return {
        "wall_s": wall,
        "requests": len(flat),
        "output_tokens": sum(r["usage"]["completion_tokens"] for r in flat),
        "output_tok_s": sum(r["usage"]["completion_tokens"] for r in flat) / wall,
        "ttft_p50_s": percentile([r["ttft_s"] for r in flat], 50),
        "ttft_p95_s": percentile([r["ttft_s"] for r in flat], 95),
        "later_ttft_p50_s": percentile(later, 50),
        "later_ttft_p95_s": percentile(later, 95),
        "prompt_tokens": prompt,
        "cached_share": cached / prompt if prompt else 0.0,
        "texts": [[r["text"] for r in rs] for rs in records],
    }


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    logs = Path("/tmp")
    common = ["-m", "llmkit", "serve", "-m", args.model, "--engine", args.engine, "--max-batch-size", str(args.users)]
    servers = {
        "off": Server("cache off", [*common, "--prefix-cache-mb", "0"], logs / "prefix-cache-off.log"),
        "on": Server("cache on", common, logs / "prefix-cache-on.log"),
    }
    try:
        for server in servers.values():
            server.wait_healthy()
        system = system_text(args.history_tokens)
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for index in range(args.runs):
            for name in ("off", "on"):
                print(f"run {index + 1}/{args.runs}: cache {name}...", file=sys.stderr, flush=True)
                results[name].append(asyncio.run(run(servers[name], args.users, args.turns, system, args.max_tokens)))
    finally:
        for server in servers.values():
            server.stop()

    same = all(off["texts"] == on["texts"] for off, on in zip(results["off"], results["on"]))
    summary = {
        name: {
            key: median_of(runs, key)
            for key in (
                "wall_s",
                "output_tok_s",
                "ttft_p50_s",
                "ttft_p95_s",
                "later_ttft_p50_s",
                "later_ttft_p95_s",
                "cached_share",
            )
        }
        for name, runs in results.items()
    }
    off, on = summary["off"], summary["on"]
    report = {
        "machine": machine(),
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
        "summary": summary,
        "ttft_p50_ratio": off["ttft_p50_s"] / on["ttft_p50_s"],
        "later_ttft_p50_ratio": off["later_ttft_p50_s"] / on["later_ttft_p50_s"],
        "throughput_ratio": on["output_tok_s"] / off["output_tok_s"],
        "same_text": same,
        "runs": {name: [{k: v for k, v in r.items() if k != "texts"} for r in runs] for name, runs in results.items()},
    }
    rows = [
        "| cache | TTFT p50 / p95 (s) | turns 2+ TTFT p50 / p95 (s) | output tok/s | wall (s) | prompt tokens cached |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("off", "on"):
        s = summary[name]
        rows.append(
            f"| {name} | {fmt(s['ttft_p50_s'], digits=2)} / {fmt(s['ttft_p95_s'], digits=2)} "
            f"| {fmt(s['later_ttft_p50_s'], digits=2)} / {fmt(s['later_ttft_p95_s'], digits=2)} "
            f"| {fmt(s['output_tok_s'])} | {fmt(s['wall_s'])} | {fmt(s['cached_share'], 100, 0)}% |"
        )
    print(
        f"{args.model} ({args.engine}), {args.users} users x {args.turns} turns, a shared system message of about "
        f"{args.history_tokens} tokens, {args.max_tokens} new tokens, medians of {args.runs} run(s)"
    )
    print("\n".join(rows))
    print(
        f"TTFT p50: {report['ttft_p50_ratio']:.1f}x lower with the cache "
        f"(turns 2+: {report['later_ttft_p50_ratio']:.1f}x); throughput {report['throughput_ratio']:.2f}x; "
        f"same text with and without: {'yes' if same else 'no'}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
