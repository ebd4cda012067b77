"""Prefix reuse in a conversation: time to first token of later turns with the kept KV cache vs recomputing.

A 10-turn conversation (--turns) whose history starts at about 1,000 tokens: a system message made of the shipped
reference text (llmkit/data/reference.txt) repeated until it reaches --history-tokens, then short questions, each
answered greedily with --max-new-tokens. The same conversation runs twice per --runs, alternating:

- reuse: `engine.session()` (TransformersSession / LlamaCppSession), which computes only the tokens after what
  its cache holds;
- recompute: the base `Session(engine)`, which prefills the whole history every turn.

Measured: each turn's `result.timings.ttft_s` (request start to the first token: chat template, tokenizing,
prefill, the first sampling), for turns 2..N (turn 1 has nothing to reuse); reported as medians over all runs,
with the ratio recompute / reuse (the target is at least 5x). Both conversations are greedy, so each turn's
tokens must match; the report says whether they did. The load average is read around the runs
(llmkit.measure.LoadWatch): on a busy machine the figures are not comparable.

Usage: python benchmarks/chat_prefix.py --model smollm2-135m [--engine llama.cpp] [--dtype float32] [--runs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib.resources import files

from llmkit.engine import load_engine
from llmkit.engine.base import Session
from llmkit.measure import LoadWatch, cpu_model
from llmkit.params import parse_params

QUESTIONS = [
    "Summarize the text in one sentence.",
    "What is its main subject?",
    "Name one detail from it.",
    "Why does that detail matter?",
    "Say it more simply.",
    "What would you ask the author?",
    "Give the text a title.",
    "Which word in it is the rarest?",
    "What comes next?",
    "Thank you. Anything else?",
]


def history(engine, tokens: int) -> str:
    """The reference text repeated until it is about `tokens` tokens long."""
    text = files("llmkit.data").joinpath("reference.txt").read_text(encoding="utf-8")
    words = text.split()
    per_word = engine.count_tokens(text) / len(words)
    wanted = int(tokens / per_word)
    return " ".join((words * (wanted // len(words) + 1))[:wanted])


def converse(session: Session, system: str, turns: int, max_new_tokens: int) -> list[tuple[float, int, tuple]]:
    """(ttft_s, cached prompt tokens, generated token ids) of each turn."""
    params = parse_params(max_new_tokens=max_new_tokens, greedy=True)
    messages = [{"role": "system", "content": system}]
    record = []
    for question in (QUESTIONS * (turns // len(QUESTIONS) + 1))[:turns]:
        messages.append({"role": "user", "content": question})
        generation = session.stream(list(messages), params)
        for _ in generation:
            pass
        result = generation.result
        record.append((result.timings.ttft_s, result.usage.cached_tokens, result.completions[0].token_ids))
        messages.append({"role": "assistant", "content": result.text})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--dtype", default="auto", help="transformers only: auto, float32, bfloat16")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    settings = {"dtype": args.dtype} if args.dtype != "auto" else {}
    engine = load_engine(args.model, engine=args.engine, **settings)
    system = history(engine, args.history_tokens)
    converse(Session(engine), system, 1, 2)  # warm-up: first-call allocations, kernel choices
    reuse: list[float] = []
    recompute: list[float] = []
    cached: list[int] = []
    prompt_tokens = len(engine.chat_ids([{"role": "system", "content": system}])[1])
    same_tokens = True
    watch = LoadWatch()
    started = time.perf_counter()
    for _ in range(args.runs):
        kept = converse(engine.session(), system, args.turns, args.max_new_tokens)
        fresh = converse(Session(engine), system, args.turns, args.max_new_tokens)
        same_tokens &= [ids for _, _, ids in kept] == [ids for _, _, ids in fresh]
        reuse += [ttft for ttft, _, _ in kept[1:]]
        recompute += [ttft for ttft, _, _ in fresh[1:]]
        cached += [tokens for _, tokens, _ in kept[1:]]
    machine = watch.stop(engine.info.threads)
    report = {
        "model": engine.info.model,
        "engine": engine.info.engine,
        "dtype": engine.info.dtype,
        "threads": engine.info.threads,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "turns": args.turns,
        "runs": args.runs,
        "history_prompt_tokens": prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "ttft_reuse_median_s": statistics.median(reuse),
        "ttft_recompute_median_s": statistics.median(recompute),
        "ratio": statistics.median(recompute) / statistics.median(reuse),
        "cached_tokens_median": statistics.median(cached),
        "same_tokens": same_tokens,
        "wall_s": time.perf_counter() - started,
        "machine": machine.to_dict(),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{report['model']} ({report['engine']}, {report['dtype']}, {report['threads']} threads) on {report['cpu']}, "
        f"{report['date']}"
    )
    print(
        f"{args.turns} turns x {args.runs} runs, history {prompt_tokens} prompt tokens, "
        f"{args.max_new_tokens} new tokens per turn"
    )
    print(
        f"TTFT turns 2..{args.turns}, median: reuse {report['ttft_reuse_median_s'] * 1000:.1f} ms "
        f"(median {report['cached_tokens_median']:.0f} prompt tokens cached), recompute "
        f"{report['ttft_recompute_median_s'] * 1000:.1f} ms: {report['ratio']:.1f}x lower with reuse"
    )
    print(f"same tokens with and without reuse: {'yes' if same_tokens else 'NO'}")
    if machine.busy:
        print(machine.warning("the measurement"))


if __name__ == "__main__":
    main()
