"""Cold start: a whole `llmkit generate` process on a cached model against the floor it cannot go under.

The floor is what any program that generates these tokens with this model must pay, measured in fresh processes:

- python: starting the interpreter (`python -c pass`);
- imports: `import torch, transformers` in a fresh process, minus python;
- load: `AutoTokenizer.from_pretrained` + `AutoModelForCausalLM.from_pretrained` of the same local folder llmkit
  loads (the converted safetensors in llmkit's cache), in the dtype llmkit picks, imports done beforehand;
- tokens: the generation itself, as the llmkit run reports it (`timings.total_s` of `--json`: tokenizing,
  prefill and every decode step).

The whole process is the wall time of `llmkit generate -m MODEL --greedy --max-new-tokens N --json PROMPT` from
spawn to exit. Each is run --runs times, interleaved (floor parts, llmkit, floor parts, llmkit...); medians are
compared: whole / floor (the issue's target is at most 1.2x), and the overhead (whole - floor) is printed with the
floor's parts so the next thing to cut is visible.

Usage: LLMKIT_CACHE_DIR=/tmp/llmkit-cache python benchmarks/cold_start.py [--model smollm2-135m] [--tokens 128]
       [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llmkit.measure import cpu_model

PROMPT = "The history of the printing press begins in"
IMPORTS = "import time; t = time.perf_counter(); import torch, transformers; print(time.perf_counter() - t)"
LOAD = """
import sys, time, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
t = time.perf_counter()
AutoTokenizer.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
print(time.perf_counter() - t)
"""


def wall(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - started, out.stdout


def resolved_folder(model: str) -> tuple[str, str]:
    """The local folder llmkit loads for `model`, and the dtype it picks, from a quiet llmkit run."""
    from llmkit.engine import load_engine
    from llmkit.models import local_folder, resolve

    engine = load_engine(model)
    return str(local_folder(resolve(model))), engine.info.dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    env = {**os.environ, "LLMKIT_NO_PROGRESS": "1"}
    folder, dtype = resolved_folder(args.model)
    llmkit = [sys.executable, "-m", "llmkit", "generate", "-m", args.model, "--greedy"]
    llmkit += ["--max-new-tokens", str(args.tokens), "--json", PROMPT]
    samples: dict[str, list[float]] = {"python": [], "imports": [], "load": [], "tokens": [], "whole": []}
    for index in range(args.runs):
        print(f"run {index + 1}/{args.runs}", file=sys.stderr, flush=True)
        samples["python"].append(wall([sys.executable, "-c", "pass"], env)[0])
        samples["imports"].append(float(wall([sys.executable, "-c", IMPORTS], env)[1]))
        samples["load"].append(float(wall([sys.executable, "-c", LOAD, folder, dtype], env)[1]))
        seconds, out = wall(llmkit, env)
        record = json.loads(out)
        samples["whole"].append(seconds)
        samples["tokens"].append(record["timings"]["total_s"])
        generated = record["usage"]["completion_tokens"]
    medians = {key: statistics.median(values) for key, values in samples.items()}
    floor = medians["python"] + medians["imports"] + medians["load"] + medians["tokens"]
    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
        "model": args.model,
        "dtype": dtype,
        "generated_tokens": generated,
        "medians_s": medians,
        "floor_s": floor,
        "whole_over_floor": medians["whole"] / floor,
        "samples_s": samples,
    }
    print(f"{args.model} ({dtype}), {generated} tokens, medians of {args.runs} runs:")
    parts = ", ".join(f"{key} {medians[key]:.2f} s" for key in ("python", "imports", "load", "tokens"))
    print(f"floor {floor:.2f} s ({parts})")
    print(
        f"llmkit generate {medians['whole']:.2f} s: {report['whole_over_floor']:.2f}x the floor "
        f"(overhead {medians['whole'] - floor:.2f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
