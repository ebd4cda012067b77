"""Generation speed: llmkit's engine against the plain transformers pipeline, same model, one run.

The reference is the tutorial's way: `pipeline("text-generation", model=folder)` called with
`max_new_tokens` and `do_sample=False`. Both sides load the same local safetensors folder (the one
llmkit resolves the model reference to via `llmkit.models.resolve` + `local_folder`), both from a
warm cache, on the same device and dtype, greedy, on the same fixed prompt as plain text.

Measured, per side, `--runs` times after `--warmup` unmeasured runs, interleaved
(llmkit, reference, llmkit, reference, ...) so machine noise hits both alike:

- load_s: wall clock around `load_engine(ref)` / `pipeline(...)` (imports done beforehand).
- ttft_s: time to first token = request start to the first generated token (includes
  tokenization and prefill). llmkit: `result.timings.ttft_s`. Reference: the first `put` of a
  streamer after the one that carries the prompt ids.
- decode_tok_s: (generated - 1) / (t_last - t_first), generated counted in token ids.
  llmkit: `result.timings.decode_tokens_per_s`; reference: from the streamer's timestamps.

The reference gets `min_new_tokens=max_new_tokens`; llmkit may stop earlier at EOS, so generated
counts are printed for both and tok/s always uses the actual counts. Ratios compare medians and
read "> 1 means llmkit is better": reference/llmkit for times, llmkit/reference for speeds.

Configurations (--configs): default (what `llmkit generate` uses: dtype and quantize auto), forward (the
default with every decode step through transformers' forward instead of llmkit's lean step:
LLMKIT_DECODE_STEP=forward), float32, bfloat16, float16, int8 (--quantize int8), bf16-weights (--quantize bf16),
fp16-weights (--quantize fp16), unquantized (the default with --quantize none: what it was before `auto` kept
16-bit weights on CPUs without native BF16); plus the llama.cpp engine and raw llama-cpp-python for GGUF models
when llama-cpp-python is installed (raw gets the engine's thread count, so both run alike). Each row also shows
what the engine chose (EngineInfo.choices) and how many greedy tokens equal the reference's.

Threads: --threads N (or $LLMKIT_THREADS) sets torch's threads for the whole process before anything loads,
so the reference and every llmkit side compute with the same count (llama.cpp's n_threads and
n_threads_batch too); the report names it. The load average and CPU steal are read around the generation
runs (llmkit.measure.LoadWatch); on a busy machine the report says so, as its figures are then not comparable.

Usage: python benchmarks/generate_speed.py --model smollm2-135m --runs 5 [--configs default,int8] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import pipeline
from transformers.generation.streamers import BaseStreamer

from llmkit.devices import requested_threads, use_threads
from llmkit.engine import load_engine
from llmkit.engine.fastpath import Fp16WeightLinear
from llmkit.engine.llamacpp import default_threads, gguf_path_for, llamacpp_installed
from llmkit.errors import InvalidParams
from llmkit.measure import LoadWatch, MachineLoad, cpu_model
from llmkit.models import local_folder, resolve
from llmkit.params import parse_params

DEFAULT_PROMPT = "The history of the printing press begins in"
REFERENCE = "reference"
BANDWIDTH_BYTES = 1 << 30  # 1 GiB read per bandwidth sample
# metric -> (label, higher_is_better)
METRICS = {
    "load_s": ("load (s)", False),
    "ttft_s": ("TTFT (s)", False),
    "decode_tok_s": ("decode (tok/s)", True),
    "generated": ("generated tokens", None),
}


class TokenClock(BaseStreamer):
    """Records when each generated token arrives; the first `put` is the prompt, skipped."""

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.token_ids: list[int] = []
        self.times: list[float] = []

    def put(self, value) -> None:
        now = time.perf_counter()
        if self.prompt_tokens is None:
            self.prompt_tokens = value.numel()
            return
        ids = value.reshape(-1).tolist()
        self.token_ids += ids
        self.times += [now] * len(ids)

    def end(self) -> None:  # nothing to flush
        pass


def run_llmkit(engine, prompt: str, max_new_tokens: int) -> dict:
    result = engine.generate(prompt, parse_params(greedy=True, max_new_tokens=max_new_tokens))
    return {
        "ttft_s": result.timings.ttft_s,
        "decode_tok_s": result.timings.decode_tokens_per_s,
        "generated": result.usage.completion_tokens,
        "prompt_tokens": result.usage.prompt_tokens,
        "token_ids": list(result.completions[0].token_ids),
    }


def run_raw_llamacpp(llm, prompt: str, max_new_tokens: int) -> dict:
    """llama-cpp-python on its own: create_completion, greedy, streamed so the first token is timed."""
    started = time.perf_counter()
    times = []
    for _ in llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, stream=True):
        times.append(time.perf_counter())
    decode_s = times[-1] - times[0]
    return {
        "ttft_s": times[0] - started,
        "decode_tok_s": (len(times) - 1) / decode_s if len(times) > 1 and decode_s > 0 else None,
        "generated": len(times),
        "prompt_tokens": len(llm.tokenize(prompt.encode())),
        "token_ids": [],
    }


def memory_bandwidth(samples: int = 5) -> float:
    """Bytes/s that torch reads from memory with its threads: the median of summing 1 GiB of float32."""
    block = torch.ones(BANDWIDTH_BYTES // 4)
    rates = []
    for _ in range(samples):
        started = time.perf_counter()
        block.sum()
        rates.append(BANDWIDTH_BYTES / (time.perf_counter() - started))
    return statistics.median(rates)


def run_reference(pipe, prompt: str, max_new_tokens: int) -> dict:
    clock = TokenClock()
    started = time.perf_counter()
    pipe(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
    generated = len(clock.token_ids)
    decode_s = clock.times[-1] - clock.times[0]
    return {
        "ttft_s": clock.times[0] - started,
        "decode_tok_s": (generated - 1) / decode_s if generated > 1 and decode_s > 0 else None,
        "generated": generated,
        "prompt_tokens": clock.prompt_tokens,
        "token_ids": clock.token_ids,
    }


def timed(load):
    gc.collect()
    started = time.perf_counter()
    loaded = load()
    return loaded, time.perf_counter() - started


def machine() -> dict:
    cpu = cpu_model()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def summarize(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(metric: str, summary: dict, side: str) -> float | None:
    higher_is_better = METRICS[metric][1]
    ours, ref = summary[side][metric], summary[REFERENCE][metric]
    if higher_is_better is None or not ours or not ref or not ours["median"] or not ref["median"]:
        return None
    return ours["median"] / ref["median"] if higher_is_better else ref["median"] / ours["median"]


CONFIGS = {  # --configs name -> (label, load_engine keyword arguments)
    "default": ("llmkit default", {}),
    "forward": ("llmkit default, transformers' forward", {"decode_step": "forward"}),
    "float32": ("llmkit float32", {"dtype": "float32"}),
    "bfloat16": ("llmkit bfloat16", {"dtype": "bfloat16"}),
    "float16": ("llmkit float16", {"dtype": "float16"}),
    "int8": ("llmkit int8", {"quantize": "int8"}),
    "bf16-weights": ("llmkit bf16 weights", {"quantize": "bf16"}),
    "fp16-weights": ("llmkit fp16 weights", {"quantize": "fp16"}),
    "unquantized": ("llmkit quantize none", {"quantize": "none"}),
}


def bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: parameters and buffers (quantized weights are buffers), fbgemm's
    packed float16 weights (neither), minus the input embedding when the output head does not share it (only one
    row of it is read per token)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "inv_freq" not in name)
    total += sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, Fp16WeightLinear))
    embedding, head = _weight(model.get_input_embeddings()), _weight(model.get_output_embeddings())
    if head is None or head.data_ptr() != embedding.data_ptr():
        total -= embedding.numel() * embedding.element_size()
    return total


def _weight(module):
    """A layer's weight tensor: `weight`, --quantize bf16's `weight_bf16`, a 16-bit embedding's `table` (None for
    int8's and fp16's, separate copies)."""
    for name in ("table", "weight_bf16", "weight"):
        if hasattr(module, name):
            return getattr(module, name)
    return None


def shown_prompt(report: dict) -> str:
    """The prompt as the report's header shows it: whole when short, else its start and its length in tokens."""
    prompt = report["config"]["prompt"]
    if len(prompt) <= 120:
        return repr(prompt)
    counts = [s["prompt_tokens"]["median"] for s in report["summary"].values() if s["prompt_tokens"]]
    return f"{prompt[:60]!r}... ({len(prompt)} characters, {counts[0]:.0f} tokens)"


def load_llmkit(model: str, threads: int | None, options: dict):
    """load_engine with a configuration's options; `decode_step` is set through its environment variable, which
    the engine reads when it loads."""
    from llmkit.engine.decode_step import DECODE_STEP_ENV

    step = options.pop("decode_step", "auto")
    previous = os.environ.get(DECODE_STEP_ENV)
    os.environ[DECODE_STEP_ENV] = step
    try:
        return load_engine(model, threads=threads, **options)
    finally:
        if previous is None:
            del os.environ[DECODE_STEP_ENV]
        else:
            os.environ[DECODE_STEP_ENV] = previous


def sides_for(args, folder: str) -> dict:
    """name -> (load, run, bytes of weights read per token): the reference, then each llmkit path."""
    sides = {
        REFERENCE: (
            lambda: pipeline("text-generation", model=folder),
            run_reference,
            lambda pipe: bytes_per_token(pipe.model),
        )
    }
    for name in args.configs.split(","):
        label, options = CONFIGS[name]
        sides[label] = (
            lambda options=options: load_llmkit(args.model, args.threads, dict(options)),
            run_llmkit,
            lambda engine: bytes_per_token(engine.model),
        )
    gguf = gguf_file(args.model)
    if gguf is not None and llamacpp_installed():
        from llama_cpp import Llama

        size = os.path.getsize(gguf)
        sides["llmkit llama.cpp"] = (
            lambda: load_engine(args.model, engine="llama.cpp", threads=args.threads),
            run_llmkit,
            lambda engine: size,
        )
        sides["raw llama-cpp-python"] = (
            lambda: Llama(
                model_path=str(gguf),
                n_ctx=4096,
                n_threads=default_threads(),
                n_threads_batch=requested_threads(args.threads)[0],
                verbose=False,
            ),
            run_raw_llamacpp,
            lambda llm: size,
        )
    return sides


def agreeing_prefix(ours: list[int], reference: list[int]) -> int:
    """How many greedy tokens, from the first, equal the reference's."""
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))


def gguf_file(reference: str):
    from llmkit.errors import LlmkitError

    try:
        return gguf_path_for(reference)
    except LlmkitError:
        return None


def benchmark(args) -> dict:
    transformers.logging.set_verbosity_error()  # llmkit's load does the same; keep stderr quiet
    transformers.logging.disable_progress_bar()
    use_threads(args.threads)  # the whole process, before anything loads: every side computes alike
    source = resolve(args.model)
    folder = str(local_folder(source) or source.location)  # a Hub id loads from the HF cache on both sides
    sides = sides_for(args, folder)
    samples = {side: {m: [] for m in (*METRICS, "prompt_tokens")} for side in sides}
    prompt = " ".join([args.prompt] * args.prompt_repeat)
    loaded = {}
    total = args.warmup + args.runs
    for i in range(total):
        print(f"load {i + 1}/{total}", file=sys.stderr)
        for side, (load, _, _) in sides.items():
            loaded.pop(side, None)
            loaded[side], seconds = timed(load)
            if i >= args.warmup:
                samples[side]["load_s"].append(seconds)
    outputs = {}
    watch = LoadWatch()
    for i in range(total):
        print(f"generate {i + 1}/{total}", file=sys.stderr)
        for side, (_, run, _) in sides.items():
            gc.collect()
            result = run(loaded[side], prompt, args.max_new_tokens)
            outputs[side] = result.pop("token_ids")
            if i >= args.warmup:
                for metric, value in result.items():
                    samples[side][metric].append(value)
    machine_load = watch.stop(torch.get_num_threads())
    bandwidth = memory_bandwidth()
    weight_bytes = {side: weight(loaded[side]) for side, (_, _, weight) in sides.items()}
    summary = {side: {m: summarize(v) for m, v in samples[side].items()} for side in sides}
    setups = {side: loaded[side].info.setup() for side in sides if hasattr(loaded[side], "info")}
    return {
        "machine": machine(),
        "machine_load": machine_load.to_dict(),
        "config": {
            "model": args.model,
            "folder": folder,
            "prompt": prompt,
            "runs": args.runs,
            "warmup": args.warmup,
            "max_new_tokens": args.max_new_tokens,
        },
        "memory_bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": weight_bytes,
        "bound_tok_s": {side: bandwidth / size for side, size in weight_bytes.items()},
        "samples": samples,
        "summary": summary,
        "ratios": {
            side: {m: ratio(m, summary, side) for m in METRICS if METRICS[m][1] is not None}
            for side in sides
            if side != REFERENCE
        },
        "setups": setups,
        "greedy_tokens_equal_to_reference": {
            side: [agreeing_prefix(outputs[side], outputs[REFERENCE]), len(outputs[REFERENCE])]
            for side in sides
            if side != REFERENCE and outputs[side]
        },
    }


def fmt(stats: dict | None, metric: str) -> str:
    if stats is None:
        return "n/a"
    digits = {"load_s": 3, "ttft_s": 3, "decode_tok_s": 1}.get(metric, 0)
    return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}-{stats['max']:.{digits}f}]"


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m, c = report["machine"], report["config"]
    console = Console(width=140)
    console.print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}"
    )
    console.print(
        f"model: {c['model']} ({c['folder']}); greedy, max_new_tokens {c['max_new_tokens']}, "
        f"{c['runs']} runs after {c['warmup']} warm-up, interleaved; prompt {shown_prompt(report)}"
    )
    console.print(
        f"memory bandwidth (torch, 1 GiB sum): {report['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
        "bound = bandwidth / bytes of weights read per token"
    )
    table = Table(
        "configuration",
        "load (s)",
        "TTFT (s)",
        "decode (tok/s)",
        "bound (tok/s)",
        "decode vs ref",
        "TTFT vs ref",
        title="median \\[min-max]; ratios > 1: better than the reference",
    )
    for side, stats in report["summary"].items():
        ratios = report["ratios"].get(side, {})
        table.add_row(
            side,
            fmt(stats["load_s"], "load_s"),
            fmt(stats["ttft_s"], "ttft_s"),
            fmt(stats["decode_tok_s"], "decode_tok_s"),
            f"{report['bound_tok_s'][side]:.0f}",
            f"{ratios['decode_tok_s']:.2f}x" if ratios.get("decode_tok_s") else "",
            f"{ratios['ttft_s']:.2f}x" if ratios.get("ttft_s") else "",
        )
    console.print(table)
    for side, setup in report["setups"].items():
        console.print(
            f"{side}: {setup['engine']} {setup['dtype']}, quantize {setup['quantize']}; "
            f"{setup['choices'].get('decode_matmul', '')}"
        )
    for side, (same, total) in report["greedy_tokens_equal_to_reference"].items():
        console.print(f"{side}: first {same} of {total} greedy tokens equal to the reference's")
    busy = MachineLoad(**report["machine_load"])
    if busy.busy:
        console.print(f"[yellow]warning:[/] {busy.warning('the generation runs')}", markup=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="any llmkit model reference")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument(
        "--prompt-repeat", type=int, default=1, help="the prompt N times, space-separated: a long prompt for prefill"
    )
    parser.add_argument(
        "--configs",
        default="default,float32,bfloat16,int8",
        help=f"llmkit transformers configurations, comma-separated, from: {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads for every side (default: $LLMKIT_THREADS, else torch's: one per "
        "physical core); on a busy machine try 1",
    )
    parser.add_argument("--json", action="store_true", help="print everything as one JSON document")
    args = parser.parse_args()
    try:
        requested_threads(args.threads)
    except InvalidParams as exc:
        parser.error(str(exc))
    if args.runs < 1 or args.warmup < 0 or args.max_new_tokens < 2:
        parser.error("need --runs >= 1, --warmup >= 0, --max-new-tokens >= 2")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    report = benchmark(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
