"""One decode step: llmkit's lean step against transformers' forward, step by step, in one process.

A whole generation on a shared machine varies by more than the step's own gain, so this interleaves at the
finest grain there is: the prompt is prefilled once, its KV copied, and then each token is fed to both paths
alternately (lean, forward, lean, forward...), the same token to both, each path keeping its own cache. The
median step time of each path is printed per stretch of cache length, with the ratio forward / lean (> 1: the
lean step is faster). Both paths' logits are compared on every step (they must be the same bits).

Usage: LLMKIT_CACHE_DIR=/tmp/llmkit-cache python benchmarks/decode_step.py [--model smollm2-135m]
       [--dtype auto] [--steps 256] [--prompt-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from llmkit.engine import load_engine
from llmkit.measure import cpu_model

TEXT = "The history of the printing press begins in the workshops of the fifteenth century, "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    engine = load_engine(args.model, dtype=args.dtype)
    if engine._lean is None:
        raise SystemExit(f"no lean step for this model: {engine.info.choices['decode_step']}")
    ids = engine.prompt_ids(TEXT * 40)[: args.prompt_tokens]
    times: dict[str, list[float]] = {"lean": [], "forward": []}
    with torch.inference_mode():
        logits, cache = engine.forward_step(torch.tensor([ids]), None)
        forward_cache = copy.deepcopy(cache)
        run = engine._lean.begin(cache, len(ids) + args.steps)
        tokens = logits.argmax(-1, keepdim=True)
        for _ in range(args.steps):
            started = time.perf_counter()
            with engine.step_context(1):
                lean = run.step(tokens)
            times["lean"].append(time.perf_counter() - started)
            started = time.perf_counter()
            forward, forward_cache = engine.forward_step(tokens, forward_cache)
            times["forward"].append(time.perf_counter() - started)
            if not torch.equal(lean, forward):
                raise SystemExit("the lean step's logits differ from transformers' forward")
            tokens = forward.argmax(-1, keepdim=True)

    stretch = max(1, args.steps // 4)
    rows = []
    for start in range(0, args.steps, stretch):
        lean = statistics.median(times["lean"][start : start + stretch]) * 1000
        forward = statistics.median(times["forward"][start : start + stretch]) * 1000
        cached = f"{len(ids) + start}-{len(ids) + min(start + stretch, args.steps) - 1}"
        rows.append({"cache_tokens": cached, "lean_ms": lean, "forward_ms": forward, "ratio": forward / lean})
    lean_all = statistics.median(times["lean"]) * 1000
    forward_all = statistics.median(times["forward"]) * 1000
    print(
        f"{args.model} {engine.info.dtype}, {cpu_model()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; {len(ids)} prompt tokens, {args.steps} steps each, alternating; logits equal"
    )
    print(f"{'cache tokens':>14s} {'lean ms':>9s} {'forward ms':>11s} {'forward/lean':>13s}")
    for row in rows:
        print(f"{row['cache_tokens']:>14s} {row['lean_ms']:9.1f} {row['forward_ms']:11.1f} {row['ratio']:12.2f}x")
    print(f"{'all':>14s} {lean_all:9.1f} {forward_all:11.1f} {forward_all / lean_all:12.2f}x")
    if args.json:
        report = {"model": args.model, "dtype": engine.info.dtype, "stretches": rows, "step_s": times}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
