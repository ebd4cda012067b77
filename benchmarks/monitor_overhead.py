"""What llmkit monitor's background sampler costs: decode tokens/s with and without it running.

One process, one loaded model, greedy runs of the same prompt, alternating
(without, with, without, with, ...) so machine noise hits both sides alike. Reports
the medians of tg (generated tokens after the first / time from first to last token,
llama-bench's definition) and the overhead = 1 - with / without. The target is < 3%.

    python benchmarks/monitor_overhead.py [--model gemma3-270m] [--runs 7] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics

from llmkit.engine import load_engine
from llmkit.measure import ResourceSampler, cpu_model, run_latency
from llmkit.monitor import DEFAULT_PROMPT
from llmkit.params import parse_params

TARGET_OVERHEAD = 0.03


def decode_rate(engine, params) -> float:
    result = engine.generate(DEFAULT_PROMPT, params)
    latency = run_latency(result.usage.prompt_tokens, result.timings.token_times_s, result.timings.total_s)
    return latency.tg_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="llmkit model reference (default: the default model)")
    parser.add_argument("--runs", type=int, default=7, help="measured runs per side")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    engine = load_engine(args.model)
    params = parse_params(greedy=True, max_new_tokens=args.max_new_tokens)
    decode_rate(engine, params)  # warm-up
    without, with_sampler, samples_per_s = [], [], []
    for _ in range(args.runs):
        without.append(decode_rate(engine, params))
        with ResourceSampler() as sampler:
            sampler.phase("inference")
            with_sampler.append(decode_rate(engine, params))
        samples_per_s.append(len(sampler.samples) / sampler.samples[-1].t_s)
    median_without, median_with = statistics.median(without), statistics.median(with_sampler)
    overhead = 1 - median_with / median_without
    report = {
        "model": engine.info.model,
        "device": engine.info.device,
        "dtype": engine.info.dtype,
        "cpu_model": cpu_model(),
        "runs": args.runs,
        "max_new_tokens": args.max_new_tokens,
        "tg_without_sampler": without,
        "tg_with_sampler": with_sampler,
        "median_tg_without_sampler": median_without,
        "median_tg_with_sampler": median_with,
        "median_samples_per_s": statistics.median(samples_per_s),
        "overhead": overhead,
        "target": TARGET_OVERHEAD,
        "within_target": overhead < TARGET_OVERHEAD,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{engine.info.model} on {engine.info.device} ({engine.info.dtype}), {cpu_model()}; "
        f"{args.runs} alternating runs of {args.max_new_tokens} greedy tokens"
    )
    print(f"tg without sampler: median {median_without:.2f} tok/s  (min {min(without):.2f}, max {max(without):.2f})")
    print(
        f"tg with sampler:    median {median_with:.2f} tok/s  (min {min(with_sampler):.2f}, "
        f"max {max(with_sampler):.2f}); sampler {statistics.median(samples_per_s):.0f} samples/s"
    )
    print(
        f"overhead: {overhead * 100:+.2f}% (target < {TARGET_OVERHEAD * 100:.0f}%): "
        f"{'OK' if overhead < TARGET_OVERHEAD else 'ABOVE TARGET'}"
    )


if __name__ == "__main__":
    main()
