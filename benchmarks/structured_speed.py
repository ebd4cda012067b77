"""Structured output speed: decoding with a JSON schema against decoding without one, same model, one run.

Three sides, interleaved (plain, schema, schema with overlap, plain, ...) so machine noise hits all alike, each
`--runs` times after one unmeasured warm-up:

- plain: no constraint;
- schema: the JSON schema below, the mask computed after the forward pass (llmkit's default);
- schema, overlap: the same with llmkit.engine.constrain.OVERLAP on (the next mask computed on a thread while the
  model runs), to show what the overlap buys.

All sample at temperature 0.8 with the same seeds. decode tok/s is `result.timings.decode_tokens_per_s`: generated
tokens after the first over the time from the first to the last. The schema side stops when the JSON is complete,
so it may generate fewer tokens; tok/s uses the actual counts. The ratio is median(schema) / median(plain);
the target is >= 0.90.

Before the runs it measures llguidance itself on the model's vocabulary: building its tokenizer, compiling the
schema (median of 20 LLMatcher constructions), and computing one mask (median over the tokens of a document that
follows the schema, fed to the matcher one by one).

Usage: python benchmarks/structured_speed.py --model smollm2-135m [--engine llama.cpp] [--runs 5] [--max-tokens 96]
       python benchmarks/structured_speed.py --model gemma3-270m --costs-only   # llguidance's own costs alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from llmkit.engine import constrain, load_engine
from llmkit.measure import cpu_model
from llmkit.params import parse_params

PROMPT = "A shopping list as JSON, with each item's name, quantity and aisle:\n"
SCHEMA = {
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 24},
        "items": {
            "type": "array",
            "minItems": 4,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 12},
                    "aisle": {"enum": ["produce", "dairy", "bakery", "pantry", "frozen"]},
                },
                "required": ["name", "quantity", "aisle"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["store", "items"],
    "additionalProperties": False,
}
SAMPLE = {
    "store": "Corner Market",
    "items": [
        {"name": "apples", "quantity": 6, "aisle": "produce"},
        {"name": "milk", "quantity": 1, "aisle": "dairy"},
        {"name": "bread", "quantity": 2, "aisle": "bakery"},
        {"name": "rice", "quantity": 1, "aisle": "pantry"},
    ],
}


def library_costs(engine) -> dict[str, float]:
    """llguidance on this model's vocabulary: tokenizer build, schema compile and per-token mask times (ms)."""
    import llguidance

    started = time.perf_counter()
    tokenizer = engine.constraint_tokenizer()
    tokenizer_ms = (time.perf_counter() - started) * 1000
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=constrain.JSON_LAYOUT)
    compiles = []
    for _ in range(20):
        started = time.perf_counter()
        llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        compiles.append((time.perf_counter() - started) * 1000)
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    text = json.dumps(SAMPLE)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    bits = np.full(((engine.vocab_size + 31) // 32,), -1, dtype=np.int32)
    masks, steps = [], []
    logits = torch.randn(1, engine.vocab_size)
    guide = constrain.TokenGuide(matcher.deep_copy())
    for token in ids:
        started = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        masks.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()  # the whole step as the decode loops run it: mask, unpack, -inf
        constrain.MaskComputer(None).apply(logits, [guide])
        steps.append((time.perf_counter() - started) * 1000)
        if not matcher.consume_token(token) or guide.consume(token):
            break  # the tokenizer split the text in a way the grammar's layout does not take: stop measuring there
    return {
        "vocab": engine.vocab_size,
        "tokenizer_build_ms": tokenizer_ms,
        "schema_compile_ms": statistics.median(compiles),
        "mask_ms_median": statistics.median(masks) if masks else float("nan"),
        "mask_ms_max": max(masks) if masks else float("nan"),
        "mask_tokens": len(masks),
        "step_ms_median": statistics.median(steps) if steps else float("nan"),
    }


def run(engine, params) -> tuple[float, int]:
    result = engine.generate(PROMPT, params)
    return result.timings.decode_tokens_per_s or 0.0, result.usage.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--costs-only", action="store_true", help="Measure llguidance alone, no decoding runs.")
    args = parser.parse_args()

    engine = load_engine(args.model, engine=args.engine)
    costs = library_costs(engine)
    if args.costs_only:
        print(f"model: {args.model}, engine: {args.engine}; llguidance: {costs}")
        return
    constraint = {"kind": "json_schema", "value": json.dumps(SCHEMA)}
    sides = {
        "plain": (None, True),
        "schema": (constraint, False),
        "schema, overlap": (constraint, True),
    }
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    counts: dict[str, list[int]] = {name: [] for name in sides}
    load_before = os.getloadavg()[0]
    for repeat in range(args.runs + 1):
        for name, (spec, overlap) in sides.items():
            constrain.OVERLAP = overlap
            params = parse_params(max_new_tokens=args.max_tokens, temperature=0.8, seed=repeat, constraint=spec)
            speed, count = run(engine, params)
            if repeat:  # the first round warms up
                speeds[name].append(speed)
                counts[name].append(count)
    constrain.OVERLAP = False
    plain = statistics.median(speeds["plain"])
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
    print(f"load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"model: {args.model}, engine: {args.engine} ({engine.info.threads} threads), {args.runs} runs each")
    print(
        f"llguidance: vocabulary {costs['vocab']}, tokenizer build {costs['tokenizer_build_ms']:.0f} ms, "
        f"schema compile {costs['schema_compile_ms']:.2f} ms, mask {costs['mask_ms_median']:.3f} ms/token median "
        f"({costs['mask_ms_max']:.3f} max, {costs['mask_tokens']} tokens); whole masking step "
        f"{costs['step_ms_median']:.3f} ms/token median"
    )
    for name in sides:
        median = statistics.median(speeds[name])
        print(
            f"{name:20s} decode {median:7.1f} tok/s (median; runs {', '.join(f'{s:.1f}' for s in speeds[name])}); "
            f"tokens {statistics.median(counts[name]):.0f}; ratio to plain {median / plain:.3f}"
        )


if __name__ == "__main__":
    main()
