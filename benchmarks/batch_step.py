"""The server's batch passes in one process: what the lean batched step, its in-place cache growth and the mixed
pass are each worth, against the way the batcher ran them before.

A running batch of `--rows` rows of different lengths (left-padded, as `llmkit serve` holds them) is prefilled
once; then, alternately, each path takes a step from its own copy of the same cache, with the same tokens:

- decode steps, three ways: llmkit's lean step writing keys and values into spare columns of the cache's buffers
  (what serve runs), the same step copying the whole cache onto each step (spare columns off: how the cache grew
  before), and transformers' forward;
- a newcomer of `--prompt-tokens` tokens joining the running rows, two ways: one mixed pass (its prompt and the
  running rows' decode step through the weights once, what serve runs) against its prefill and then the decode
  step, two passes (how the batcher ran them before). Each repetition starts from a fresh copy of the caches,
  and the copy is not timed.

Medians of `--repeats` over the whole run; ratios read "> 1: the first path is faster". The model loads with what
serve's `--quantize auto` picks for `--rows` rows (`--quantize` to choose).

Usage: LLMKIT_CACHE_DIR=/tmp/llmkit-cache python benchmarks/batch_step.py [--model smollm2-135m] [--rows 16]
       [--prompt-tokens 32] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import llmkit.engine.decode_step as decode_step
from llmkit.engine import load_engine
from llmkit.engine.base import BatchStep
from llmkit.engine.batch import left_padded
from llmkit.measure import cpu_model

TEXT = "The history of the printing press begins in the workshops of the fifteenth century, "


def copied(engine, cache):
    fresh = engine.new_cache()
    for index, layer in enumerate(cache.layers):
        fresh.update(layer.keys.clone(), layer.values.clone(), index)
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    engine = load_engine(args.model, quantize=args.quantize, batch_rows=args.rows)
    lean = engine._lean
    if lean is None:
        raise SystemExit(f"no lean step for this model: {engine.info.choices['decode_step']}")
    text = engine.prompt_ids(TEXT * 40)
    running_ids = [text[row : row + 40 + 3 * row] for row in range(args.rows)]  # lengths 40, 43, 46, ...
    times: dict[str, list[float]] = {
        name: [] for name in ("spare columns", "copy per step", "forward", "mixed pass", "two passes")
    }

    def decode(cache, mask, tokens, path: str) -> torch.Tensor:
        engine._lean = None if path == "forward" else lean
        decode_step.BATCH_KV_HEADROOM = 0 if path == "copy per step" else headroom
        positions = mask.sum(-1, keepdim=True) - 1
        started = time.perf_counter()
        logits, _ = engine.forward_step(tokens, cache, attention_mask=mask, position_ids=positions)
        times[path].append(time.perf_counter() - started)
        return logits

    headroom = decode_step.BATCH_KV_HEADROOM
    with torch.inference_mode():
        ids, mask, positions = left_padded(running_ids)
        logits, cache = engine.forward_step(ids, engine.new_cache(), attention_mask=mask, position_ids=positions)
        caches = {path: copied(engine, cache) for path in ("spare columns", "copy per step", "forward")}
        tokens = logits.argmax(-1, keepdim=True)
        for _ in range(args.repeats):  # decode steps, the three paths in turn, each on its own cache
            mask = torch.cat([mask, torch.ones((args.rows, 1), dtype=torch.long)], dim=1)
            for path, path_cache in caches.items():
                step_logits = decode(path_cache, mask, tokens, path)
            tokens = step_logits.argmax(-1, keepdim=True)
        engine._lean, decode_step.BATCH_KV_HEADROOM = lean, headroom

        newcomer = left_padded([text[100 : 100 + args.prompt_tokens]])
        step_mask = torch.cat([mask, torch.ones((args.rows, 1), dtype=torch.long)], dim=1)
        step_positions = step_mask.sum(-1, keepdim=True) - 1
        base = caches["spare columns"]
        for _ in range(args.repeats):  # a newcomer joins: one mixed pass, or its prefill and then the decode step
            for path in ("mixed pass", "two passes"):
                running = BatchStep(tokens, copied(engine, base), step_mask, step_positions)
                prompt = BatchStep(newcomer[0], engine.new_cache(), newcomer[1], newcomer[2])
                started = time.perf_counter()
                if path == "mixed pass":
                    engine.forward_mixed(running, prompt)
                else:
                    engine.forward_step(
                        prompt.input_ids,
                        prompt.cache,
                        attention_mask=prompt.attention_mask,
                        position_ids=prompt.position_ids,
                    )
                    engine.forward_step(
                        running.input_ids,
                        running.cache,
                        attention_mask=running.attention_mask,
                        position_ids=running.position_ids,
                    )
                times[path].append(time.perf_counter() - started)

    medians = {path: statistics.median(values) * 1000 for path, values in times.items()}
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: {args.model}; {engine.info.choices.get('quantize', '')}")
    print(f"{args.rows} running rows of 40 to {40 + 3 * (args.rows - 1)} prompt tokens; medians of {args.repeats}")
    print(f"decode step, spare columns (serve):   {medians['spare columns']:7.1f} ms")
    print(
        f"decode step, whole cache copied:      {medians['copy per step']:7.1f} ms  "
        f"({medians['copy per step'] / medians['spare columns']:.2f}x)"
    )
    print(
        f"decode step, transformers' forward:   {medians['forward']:7.1f} ms  "
        f"({medians['forward'] / medians['spare columns']:.2f}x)"
    )
    print(f"a {args.prompt_tokens}-token newcomer joins, mixed pass (serve): {medians['mixed pass']:7.1f} ms")
    print(
        f"a {args.prompt_tokens}-token newcomer joins, two passes:         {medians['two passes']:7.1f} ms  "
        f"({medians['two passes'] / medians['mixed pass']:.2f}x)"
    )
    if args.json:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "median_ms": medians, "cpu": cpu_model()}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
