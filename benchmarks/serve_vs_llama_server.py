"""`llmkit serve` against llama.cpp's own `llama-server`, same GGUF, same load, one run.

Both servers are started here on loopback ports and stay up for the whole run; each concurrency
level is measured on one, then the other (the order alternates from level to level, and every
level is repeated `--repeats` times, so machine noise hits both alike). The load is `llmkit bench`
against each server's OpenAI endpoint: the same random prompts (`--input-len` tokens, bench's
`--seed 0`), greedy, `--output-len` new tokens with EOS honoured, `--num-prompts` requests from
that many concurrent clients, one warm-up request first.

llama-server runs with `-np` = the largest level (parallel slots), `-c` = slots x 1024 tokens, the
threads llmkit uses (`-t`), an HTTP thread per client and some (`--threads-http`) and `-fa` as
`--flash-attn` says (its default turns flash attention on; llmkit keeps it off unless
`--llmkit-flash-attn`, see docs/serve.md); llmkit serve with `--max-batch-size` = the largest
level. Point `--llama-server` at the binary (built from the llama.cpp vendored in
llama-cpp-python's source package: cmake -B build && cmake --build build --target llama-server),
or set LLAMA_SERVER. `--engine transformers` (llmkit's default engine) serves the same GGUF's weights,
de-quantized into llmkit's converted folder, with what `--quantize auto` picks for that batch size.

Printed per level: output tok/s (output tokens from usage / the level's wall time), E2E p50/p95 and
TTFT p50/p95 (ms, client-side), the medians over the repeats, and the ratios: llmkit / llama-server
for tok/s (> 1: llmkit serves more), llama-server / llmkit for p95 latency (> 1: llmkit's is lower).

Usage: LLMKIT_CACHE_DIR=/tmp/llmkit-cache python benchmarks/serve_vs_llama_server.py
       [--model smollm2-135m] [--engine llama.cpp] [--levels 16,32,64] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmkit.bench.local import free_port
from llmkit.measure import cpu_model


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until GET url answers 200 (both servers answer /health 503 while loading)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before it was ready ({url})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} was not ready after {timeout_s:.0f} s")


def bench(url: str, args: argparse.Namespace, concurrency: int) -> dict:
    """One `llmkit bench` point against url: its --json point record."""
    command = [
        sys.executable, "-m", "llmkit", "bench", url,
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts or 3 * concurrency), "--max-concurrency", str(concurrency),
        "--no-ignore-eos", "--warmup", "1", "--seed", "0", "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.level_cap_s)
    if done.returncode != 0:
        raise SystemExit(f"llmkit bench failed against {url}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout)["points"][0]


def summary(points: list[dict]) -> dict[str, float]:
    """Medians over the repeats of one level on one server."""

    def median(pick) -> float:
        return statistics.median(pick(p) for p in points)

    return {
        "output_tok_s": median(lambda p: p["output_throughput"]),
        "e2e_p50_ms": median(lambda p: p["e2e_ms"]["median"]),
        "e2e_p95_ms": median(lambda p: p["e2e_ms"]["p95"]),
        "ttft_p50_ms": median(lambda p: p["ttft_ms"]["median"]),
        "ttft_p95_ms": median(lambda p: p["ttft_ms"]["p95"]),
        "output_tokens": median(lambda p: p["total_output_tokens"]),
        "failed": max(p["failed"] for p in points),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a GGUF file or GGUF alias")
    parser.add_argument("--engine", default="llama.cpp", help="llmkit serve's --engine")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"))
    parser.add_argument("--levels", default="16,32,64", help="comma-separated concurrency levels")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=0, help="requests per level (default 3 x the level)")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--flash-attn",
        default="auto",
        choices=["auto", "on", "off"],
        help="llama-server's -fa (its default, auto, turns it on here; llmkit keeps it off, see serve.md)",
    )
    parser.add_argument("--llmkit-flash-attn", action="store_true", help="llmkit serve --flash-attn")
    parser.add_argument("--level-cap-s", type=float, default=900.0)
    parser.add_argument("--logs", default="/tmp")
    parser.add_argument("--json", help="also write the full report to this file")
    args = parser.parse_args()
    if not args.llama_server:
        raise SystemExit("no llama-server: pass --llama-server PATH or set LLAMA_SERVER (see the docstring)")

    from llmkit.engine.llamacpp import gguf_path_for

    gguf = gguf_path_for(args.model)
    levels = [int(level) for level in args.levels.split(",")]
    slots = max(levels)
    llmkit_port, peer_port = free_port(), free_port()
    logs = Path(args.logs)
    servers = {
        "llmkit": (
            [sys.executable, "-m", "llmkit", "serve", "-m", str(gguf), "--engine", args.engine,
             "--port", str(llmkit_port), "--max-batch-size", str(slots), "--max-queue", "1024",
             "--request-timeout", "900", "--threads", str(args.threads),
             *(["--flash-attn"] if args.llmkit_flash_attn else [])],
            f"http://127.0.0.1:{llmkit_port}",
        ),
        "llama-server": (
            [args.llama_server, "-m", str(gguf), "--port", str(peer_port), "-np", str(slots),
             "-c", str(slots * 1024), "-t", str(args.threads), "-tb", str(args.threads),
             "--threads-http", str(slots + 8), "-fa", args.flash_attn],
            f"http://127.0.0.1:{peer_port}",
        ),
    }  # fmt: skip
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"model: {gguf.name}; llmkit serve --engine {args.engine}{' --flash-attn' if args.llmkit_flash_attn else ''}; "
        f"llama-server {args.llama_server} "
        f"-fa {args.flash_attn}; {args.repeats} runs per level, medians"
    )
    processes = {}
    try:
        for name, (command, base) in servers.items():
            log = open(logs / f"serve_vs_llama_server.{name}.log", "w")  # noqa: SIM115  # open while it runs
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            wait_ready(f"{base}/health", processes[name])
        report = []
        for i, level in enumerate(levels):
            points: dict[str, list[dict]] = {"llmkit": [], "llama-server": []}
            for repeat in range(args.repeats):
                order = ["llmkit", "llama-server"] if (i + repeat) % 2 == 0 else ["llama-server", "llmkit"]
                for name in order:
                    points[name].append(bench(f"{servers[name][1]}/v1", args, level))
            rows = {name: summary(p) for name, p in points.items()}
            mine, peer = rows["llmkit"], rows["llama-server"]
            report.append({"concurrency": level, **{name: row for name, row in rows.items()}, "points": points})
            for name, row in rows.items():
                print(
                    f"concurrency {level:3d}  {name:12s}  {row['output_tok_s']:6.1f} out tok/s  "
                    f"E2E p50/p95 {row['e2e_p50_ms']:7.0f}/{row['e2e_p95_ms']:7.0f} ms  "
                    f"TTFT p50/p95 {row['ttft_p50_ms']:6.0f}/{row['ttft_p95_ms']:6.0f} ms  "
                    f"{row['output_tokens']:.0f} tokens, {row['failed']} failed"
                )
            print(
                f"concurrency {level:3d}  ratio: tok/s {mine['output_tok_s'] / peer['output_tok_s']:.2f}x, "
                f"E2E p95 {peer['e2e_p95_ms'] / mine['e2e_p95_ms']:.2f}x, "
                f"TTFT p95 {peer['ttft_p95_ms'] / mine['ttft_p95_ms']:.2f}x (> 1: llmkit better)"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "levels": report}, indent=1))
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
