"""`llmkit monitor`'s measurement run: phases, resources and latency of one model, in one process.

Phases, in order, each sampled by measure.ResourceSampler:
  import     importing torch and transformers (0 when the process had them already)
  prepare    one-time GGUF conversion if the model is not cached yet (kept out of `load`)
  load       loading the model from the local cache (cold for this process)
  warmup     runs that are not counted
  inference  the measured runs

For a model behind a URL (the remote engine) the latency figures are the client's, with the same
definitions; `load` is connecting and probing; memory and CPU are the server's, read from its
Prometheus /metrics while the runs go (measure.ServerWatch, under "server" in the report), or
"remote: not measured" when it has none. The phases' own figures are then this client process's.

Returns a MonitorReport of plain values; the CLI renders it and writes JSON/CSV/PNG.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit.engine import LoadOptions
from llmkit.errors import InvalidParams
from llmkit.measure import (
    DEFAULT_SAMPLE_INTERVAL_S,
    LoadWatch,
    MachineLoad,
    ResourceSampler,
    RunLatency,
    ServerWatch,
    environment,
    run_latency,
    summarize,
)
from llmkit.params import GenerationParams, parse_params

SCHEMA = "llmkit.monitor/1"
DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith in "
    "Mainz combined movable metal type, oil-based ink and a screw press. Within fifty years"
)
PHASES = ("import", "prepare", "load", "warmup", "inference")
MAX_RUNS = 10_000

DEFINITIONS = {
    "ttft_s": "time to first token: request start to the first generated token, incl. tokenization and prefill (vLLM)",
    "pp_tokens_per_s": "prompt processing: prompt tokens / TTFT (llama-bench pp)",
    "tg_tokens_per_s": "text generation: (generated - 1) / (last token time - first token time) (llama-bench tg)",
    "tpot_s": "time per output token: (E2E - TTFT) / (generated - 1) (vLLM TPOT)",
    "itl_s": "inter-token latency: gaps between successive tokens, pooled over runs (vLLM ITL)",
    "e2e_s": "end-to-end latency: request start to request finished (vLLM E2E)",
}

Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class MonitorSpec:
    model: str | None
    prompt: str
    runs: int = 5
    warmup: int = 1
    max_new_tokens: int = 64
    load: LoadOptions = field(default_factory=LoadOptions)  # checked when made

    def params(self) -> GenerationParams:
        return parse_params(greedy=True, max_new_tokens=self.max_new_tokens)


def check_spec(spec: MonitorSpec) -> GenerationParams:
    """Everything that can be wrong with the request, found before anything loads."""
    if not 1 <= spec.runs <= MAX_RUNS:
        raise InvalidParams(f"runs must be between 1 and {MAX_RUNS} (got {spec.runs})", field="runs")
    if spec.warmup < 0:
        raise InvalidParams(f"warmup must be at least 0 (got {spec.warmup})", field="warmup")
    if not spec.prompt.strip():
        raise InvalidParams("the prompt is empty", field="prompt")
    return spec.params()


def read_prompt_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidParams(f"cannot read {path}: {exc.strerror}", field="prompt_file") from None
    if not text.strip():
        raise InvalidParams(f"{path} is empty", field="prompt_file")
    return text.rstrip("\n")


@dataclass
class MonitorReport:
    spec: MonitorSpec
    engine: dict[str, Any]
    environment: dict[str, Any]
    prompt_tokens: int
    import_already_done: bool
    rss_before_load_bytes: int
    rss_after_load_bytes: int
    runs: list[RunLatency]
    sampler: ResourceSampler
    machine_load: MachineLoad | None = None  # how busy the machine was during the measured runs
    server: dict[str, Any] | None = None  # a remote model's memory and CPU, from its server (ServerWatch.summary)

    def phase_rows(self) -> list[dict[str, Any]]:
        rows = []
        for record in self.sampler.phases:
            rows.append(
                {
                    "name": record.name,
                    "wall_s": record.wall_s,
                    "cpu_percent": record.cpu_percent,
                    "rss_peak_bytes": self.sampler.peak_rss(record.name),
                    "gpu_util_percent": self.sampler.mean_gpu_util(record.name),
                    "gpu_memory_peak_bytes": self.sampler.peak_gpu_memory(record.name),
                    "cuda_peak_allocated_bytes": record.cuda_peak_allocated_bytes,
                    "cuda_peak_reserved_bytes": record.cuda_peak_reserved_bytes,
                }
            )
        return rows

    def memory(self) -> dict[str, Any]:
        import psutil

        return {
            "rss_before_load_bytes": self.rss_before_load_bytes,
            "rss_after_load_bytes": self.rss_after_load_bytes,
            "rss_peak_load_bytes": self.sampler.peak_rss("load"),
            "rss_peak_inference_bytes": max(
                filter(None, (self.sampler.peak_rss("warmup"), self.sampler.peak_rss("inference")))
            ),
            "system_available_bytes": psutil.virtual_memory().available,
        }

    def summary(self) -> dict[str, Any]:
        pooled_itl = [gap for run in self.runs for gap in run.itl_s]
        figures = {
            "ttft_s": summarize(r.ttft_s for r in self.runs),
            "pp_tokens_per_s": summarize(r.pp_tokens_per_s for r in self.runs),
            "tg_tokens_per_s": summarize(r.tg_tokens_per_s for r in self.runs),
            "tpot_s": summarize(r.tpot_s for r in self.runs),
            "itl_s": summarize(pooled_itl),
            "e2e_s": summarize(r.e2e_s for r in self.runs),
            "generated_tokens": summarize(r.generated_tokens for r in self.runs),
        }
        return {name: asdict(stats) if stats else None for name, stats in figures.items()}

    def to_dict(self) -> dict[str, Any]:
        samples = self.sampler.samples
        duration = samples[-1].t_s - samples[0].t_s if len(samples) > 1 else 0.0
        return {
            "schema": SCHEMA,
            "model": self.engine,
            "environment": self.environment,
            "config": {
                "prompt": self.spec.prompt,
                "prompt_tokens": self.prompt_tokens,
                "runs": self.spec.runs,
                "warmup": self.spec.warmup,
                "max_new_tokens": self.spec.max_new_tokens,
                "params": self.spec.params().model_dump(),
            },
            "import_already_done": self.import_already_done,
            "phases": self.phase_rows(),
            "memory": self.memory(),
            "runs": [run.to_dict() for run in self.runs],
            "summary": self.summary(),
            "definitions": DEFINITIONS,
            "machine_load": self.machine_load.to_dict() if self.machine_load else None,
            **({"server": self.server} if self.server is not None else {}),  # a URL model's: its server's figures
            "sampler": {
                "interval_s": self.sampler.interval_s,
                "samples": len(samples),
                "samples_per_s": (len(samples) - 1) / duration if duration > 0 else None,
            },
        }


def run_monitor(spec: MonitorSpec, sampler: ResourceSampler, progress: Progress | None = None) -> MonitorReport:
    """Measure `spec` with a running `sampler` (the caller owns its lifetime: `with ResourceSampler()`)."""
    params = check_spec(spec)
    report = progress or (lambda stage, done, total: None)

    sampler.phase("import")
    report("import", 0, None)
    import_already_done = "torch" in sys.modules and "transformers" in sys.modules
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from llmkit.devices import cuda_index, resolve_device
    from llmkit.engine import load_engine, prepare
    from llmkit.models import is_url

    # a URL's device is the server's: --device stays as typed (the remote engine refuses one)
    load = spec.load if is_url(spec.model) else dataclasses.replace(spec.load, device=resolve_device(spec.load.device))
    if load.device.startswith("cuda"):
        sampler.watch_gpu(cuda_index(load.device))

    sampler.phase("prepare")
    report("prepare", 0, None)
    prepare(spec.model, load, progress=progress)  # first-use GGUF work: not part of `load`

    sampler.phase("load")
    rss_before_load = sampler.latest().rss_bytes  # the phase's first sample, so its peak is >= this
    report("load", 0, None)
    engine = load_engine(spec.model, load)
    remote = not engine.info.capabilities.local_resources  # memory and CPU are the server's: read its /metrics
    server = ServerWatch(engine.server_metrics) if remote else None
    try:
        sampler.phase("warmup")
        rss_after_load = sampler.latest().rss_bytes
        if server is not None:
            server.start()
        prompt_tokens = None  # the tokenizer's count, from the first answer (a server's own count for a URL)
        for done in range(spec.warmup):
            report("warmup", done, spec.warmup)
            prompt_tokens = engine.generate(spec.prompt, params).usage.prompt_tokens
        sampler.phase("inference")
        watch = LoadWatch()
        runs = []
        for done in range(spec.runs):
            report("inference", done, spec.runs)
            started = time.perf_counter()
            result = engine.generate(spec.prompt, params)
            e2e = time.perf_counter() - started
            runs.append(
                run_latency(
                    result.usage.prompt_tokens, result.timings.token_times_s, e2e, result.usage.completion_tokens
                )
            )
            prompt_tokens = result.usage.prompt_tokens if prompt_tokens is None else prompt_tokens
        report("inference", spec.runs, spec.runs)
        machine_load = watch.stop(engine.info.threads if not remote else 1)  # a client computes on about one thread
        if server is not None:
            server.stop()
        sampler.stop()
    finally:
        if server is not None:
            server.stop()
        engine.close()
    return MonitorReport(
        spec=spec,
        engine=engine.info.to_dict(),
        environment=environment(engine.info.device, engine.info.dtype),
        prompt_tokens=prompt_tokens or 0,
        import_already_done=import_already_done,
        rss_before_load_bytes=rss_before_load,
        rss_after_load_bytes=rss_after_load,
        runs=runs,
        sampler=sampler,
        machine_load=machine_load,
        server=server.summary() if server is not None else None,
    )


def write_timeline(sampler: ResourceSampler, path: Path) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t_s", "phase", "rss_bytes", "cpu_percent", "gpu_util_percent", "gpu_memory_bytes"])
        for s in sampler.samples:
            writer.writerow(
                [
                    f"{s.t_s:.4f}",
                    s.phase,
                    s.rss_bytes,
                    f"{s.cpu_percent:.1f}",
                    "" if s.gpu_util_percent is None else s.gpu_util_percent,
                    "" if s.gpu_memory_bytes is None else s.gpu_memory_bytes,
                ]
            )


__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_SAMPLE_INTERVAL_S",
    "MonitorReport",
    "MonitorSpec",
    "PHASES",
    "check_spec",
    "read_prompt_file",
    "run_monitor",
    "write_timeline",
]
