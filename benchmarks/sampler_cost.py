"""What each sampler costs per decode step: `pick_tokens` alone, on random logits, against plain sampling.

No model runs: the forward pass of even a 135M model (tens of milliseconds on 2 cores) dwarfs these figures,
so this measures only the sampling call a decode step adds. Each setting runs `--steps` calls on logits of
shape [rows, vocab] (49152: SmolLM2's vocabulary) with each row's own seeded generator and, for the
penalties, a history of `--history` generated ids after a 32-token prompt; the figure is the median call
time, and the ratio is against plain sampling (temperature 1, top-k 50) measured the same way.

Usage: python benchmarks/sampler_cost.py [--rows 1] [--vocab 49152] [--steps 200] [--history 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llmkit.engine.sampling import needs_history, pick_tokens  # noqa: E402
from llmkit.params import parse_params  # noqa: E402

PROMPT_LEN = 32
BASE = dict(temperature=1.0, top_k=50, seed=0)
SETTINGS = {
    "plain (temperature 1, top-k 50)": {},
    "greedy": dict(greedy=True),
    "repetition_penalty 1.2": dict(repetition_penalty=1.2),
    "presence 0.5 + frequency 0.5": dict(presence_penalty=0.5, frequency_penalty=0.5),
    "logit_bias (8 tokens)": dict(logit_bias={str(i * 97): 5.0 for i in range(8)}),
    "top_p 0.9": dict(top_p=0.9),
    "typical_p 0.9": dict(typical_p=0.9),
    "top_n_sigma 1.0": dict(top_n_sigma=1.0),
    "xtc 0.5 / 0.1": dict(xtc_probability=0.5, xtc_threshold=0.1),
}


def median_ms(values: dict, rows: int, vocab: int, steps: int, history: int) -> float:
    params = parse_params({**BASE, **values})
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 4
    seen = torch.randint(0, vocab, (rows, PROMPT_LEN + history), generator=torch.Generator().manual_seed(2))
    generators = None if params.is_greedy else [torch.Generator().manual_seed(i) for i in range(rows)]
    kept = seen if needs_history(params) else None
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        pick_tokens(logits, params, generators, kept, PROMPT_LEN)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--history", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        name: median_ms(values, args.rows, args.vocab, args.steps, args.history) for name, values in SETTINGS.items()
    }
    plain = results["plain (temperature 1, top-k 50)"]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"rows={args.rows}, vocab={args.vocab}"
    )
    print(f"{'setting':36} {'median ms/step':>15} {'x plain':>8}")
    for name, ms in results.items():
        print(f"{name:36} {ms:15.3f} {ms / plain:8.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "median_ms": results}, indent=1)
        )


if __name__ == "__main__":
    main()
