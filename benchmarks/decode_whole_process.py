"""Decode speed of whole processes: `llmkit generate` against a plain transformers pipeline script.

What a user waits for is a whole process: import, load, prompt, then the tokens. Each side is run as a fresh
process twice per round, once for --short and once for --long new tokens (greedy); import, load and prefill cost
the same in both, so (long tokens - short tokens) / (long wall - short wall) is the decode speed of the tokens the
longer run adds, streaming, detokenizing and a growing KV cache included.

Sides, interleaved round by round so machine noise hits them alike:

- pipeline: `pipeline("text-generation", model=FOLDER, dtype=float32)` called with max_new_tokens =
  min_new_tokens = N and do_sample=False (the tutorial's way), FOLDER being the local safetensors folder llmkit
  loads for the model;
- llmkit: `llmkit generate -m MODEL --greedy --max-new-tokens N --json PROMPT` (--dtype and --quantize auto,
  or as given: --quantize none shows the default before it kept bfloat16 weights on CPUs without native BF16);
- llmkit, transformers' forward: the same with LLMKIT_DECODE_STEP=forward (every decode step through
  transformers' forward instead of llmkit's lean step), to show what the step itself is worth;
- with --quantize auto, llmkit --quantize none too: what auto's choice of weights is worth.

llmkit may stop early at an end-of-sequence token; the token counts come from its --json and are printed.
Medians over --runs rounds; ratios read "> 1: faster than the pipeline".

Usage: LLMKIT_CACHE_DIR=/tmp/llmkit-cache python benchmarks/decode_whole_process.py [--model smollm2-135m]
       [--short 32] [--long 256] [--runs 3] [--dtype auto] [--quantize auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from cold_start import PROMPT, resolved_folder, wall

from llmkit.engine.decode_step import DECODE_STEP_ENV
from llmkit.measure import cpu_model

PIPELINE = """
import sys, torch
from transformers import pipeline
pipe = pipeline("text-generation", model=sys.argv[1], dtype=torch.float32)
n = int(sys.argv[2])
pipe(sys.argv[3], max_new_tokens=n, min_new_tokens=n, do_sample=False)
"""


def sides(args, folder: str, env: dict[str, str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command without the token count and prompt, environment)."""
    llmkit = [sys.executable, "-m", "llmkit", "generate", "-m", args.model, "--greedy", "--json", "--dtype", args.dtype]
    chosen = {
        "pipeline (float32)": ([sys.executable, "-c", PIPELINE, folder], env),
        "llmkit generate": ([*llmkit, "--quantize", args.quantize], {**env, DECODE_STEP_ENV: "auto"}),
        "llmkit generate, transformers' forward": (
            [*llmkit, "--quantize", args.quantize],
            {**env, DECODE_STEP_ENV: "forward"},
        ),
    }
    if args.quantize == "auto":  # what auto's choice of weights is worth
        chosen["llmkit generate --quantize none"] = ([*llmkit, "--quantize", "none"], {**env, DECODE_STEP_ENV: "auto"})
    return chosen


def run_once(name: str, command: list[str], env: dict[str, str], tokens: int) -> tuple[float, int]:
    """(wall seconds, tokens generated) of one whole process."""
    if name.startswith("pipeline"):
        seconds, _ = wall([*command, str(tokens), PROMPT], env)
        return seconds, tokens
    seconds, out = wall([*command, "--max-new-tokens", str(tokens), PROMPT], env)
    return seconds, json.loads(out)["usage"]["completion_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--long", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="llmkit's --dtype (the pipeline stays float32)")
    parser.add_argument("--quantize", default="auto", help="llmkit's --quantize")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    env = {**os.environ, "LLMKIT_NO_PROGRESS": "1"}
    folder, dtype = resolved_folder(args.model)
    commands = sides(args, folder, env)
    samples: dict[str, dict[str, list]] = {name: {"short": [], "long": [], "tokens": []} for name in commands}
    for index in range(args.runs):
        for name, (command, side_env) in commands.items():
            print(f"round {index + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
            short, short_tokens = run_once(name, command, side_env, args.short)
            long, long_tokens = run_once(name, command, side_env, args.long)
            samples[name]["short"].append(short)
            samples[name]["long"].append(long)
            samples[name]["tokens"].append((short_tokens, long_tokens))

    results = {}
    for name, sample in samples.items():
        short, long = statistics.median(sample["short"]), statistics.median(sample["long"])
        short_tokens, long_tokens = sample["tokens"][-1]
        results[name] = {
            "short_s": short,
            "long_s": long,
            "tokens": [short_tokens, long_tokens],
            "decode_tok_s": (long_tokens - short_tokens) / (long - short),
        }
    reference = results["pipeline (float32)"]["decode_tok_s"]
    print(
        f"{args.model}: llmkit dtype {args.dtype} ({dtype} if auto), quantize {args.quantize}, pipeline float32; "
        "greedy; "
        f"{args.short} vs {args.long} new tokens; medians of {args.runs} rounds; {cpu_model()}, {os.cpu_count()} cores"
    )
    print(f"{'side':40s} {'short s':>8s} {'long s':>8s} {'tokens':>9s} {'decode tok/s':>13s} {'vs pipeline':>12s}")
    for name, result in results.items():
        tokens = "/".join(str(count) for count in result["tokens"])
        ratio = result["decode_tok_s"] / reference
        print(
            f"{name:40s} {result['short_s']:8.2f} {result['long_s']:8.2f} {tokens:>9s} "
            f"{result['decode_tok_s']:13.1f} {ratio:11.2f}x"
        )
    if args.json:
        report = {"model": args.model, "dtype": args.dtype, "results": results, "samples": samples}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
