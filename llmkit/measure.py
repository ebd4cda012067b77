"""Clocks and resource probes with one set of definitions, for monitor, compare and serve.

Latency terms follow vLLM's benchmarks and llama-bench, and every figure says which:
  TTFT   request start -> first generated token (includes tokenization and prefill)      [vLLM]
  pp     prompt tokens / TTFT: prompt processing tokens/s                                 [llama-bench]
  tg     (generated tokens - 1) / (last token time - first token time): generation tok/s [llama-bench]
  TPOT   (E2E - TTFT) / (generated tokens - 1): time per output token after the first     [vLLM]
  ITL    gaps between successive tokens of one request                                    [vLLM]
  E2E    request start -> request finished                                                [vLLM]

Memory and CPU come from a background sampler (psutil; NVML for GPUs when present) that a
`with` block starts and always stops and joins. A model that runs on a server (a URL) has its
memory and CPU there: ServerWatch reads what the server reports about itself on its Prometheus
/metrics (process_resident_memory_bytes, process_cpu_seconds_total, a KV cache gauge) while the
runs go, and says "remote: not measured" when it reports none. LoadWatch says whether the machine was busy while a
measurement ran (the rule is MachineLoad's docstring), since figures from a busy machine are not
comparable with a quiet run's. Nothing here prints.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

DEFAULT_SAMPLE_INTERVAL_S = 0.025  # 40 samples a second; the issue asks for at least 20
MIB = 1024 * 1024
MIN_PHASE_FOR_CPU_S = 0.1


# --- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    count: int
    mean: float
    median: float
    p95: float
    stddev: float
    min: float
    max: float


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Iterable[float | None]) -> Stats | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Stats(
        count=len(present),
        mean=statistics.fmean(present),
        median=statistics.median(present),
        p95=percentile(present, 95),
        stddev=statistics.stdev(present) if len(present) > 1 else 0.0,
        min=min(present),
        max=max(present),
    )


# --- one request's latency ------------------------------------------------------------------


@dataclass(frozen=True)
class RunLatency:
    """Latency of one generation, from its token timestamps (seconds from request start)."""

    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    e2e_s: float
    pp_tokens_per_s: float
    tg_tokens_per_s: float | None
    tpot_s: float | None
    itl_s: tuple[float, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["itl_s"] = list(self.itl_s)
        return record


def run_latency(
    prompt_tokens: int, token_times_s: Sequence[float], e2e_s: float, generated_tokens: int | None = None
) -> RunLatency:
    """All per-request figures from the times at which each token appeared (one sequence). `generated_tokens`:
    the count when it differs from the timestamps' (a server's stream, one timestamp per chunk: ITL are then the
    gaps between chunks, as vLLM's benchmark measures them, and tg and TPOT divide by the real count)."""
    if not token_times_s:
        raise ValueError("a run that produced no token has no latency")
    generated = len(token_times_s) if generated_tokens is None else max(generated_tokens, 1)
    ttft = token_times_s[0]
    last = token_times_s[-1]
    after_first = generated - 1
    return RunLatency(
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        ttft_s=ttft,
        e2e_s=e2e_s,
        pp_tokens_per_s=prompt_tokens / ttft if ttft > 0 else 0.0,
        tg_tokens_per_s=after_first / (last - ttft) if after_first > 0 and last > ttft else None,
        tpot_s=(e2e_s - ttft) / after_first if after_first > 0 else None,
        itl_s=tuple(b - a for a, b in zip(token_times_s, token_times_s[1:])),
    )


# --- resources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the sampler started
    phase: str
    rss_bytes: int
    cpu_percent: float  # of one core, like top: 200 means two cores busy
    gpu_util_percent: float | None = None
    gpu_memory_bytes: int | None = None


class _Nvml:
    """NVML (nvidia-ml-py) device probes; absent library or GPU simply yields None."""

    def __init__(self, device_index: int):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:
            self.handle = None

    def read(self) -> tuple[float | None, int | None]:
        if self.handle is None:
            return None, None
        try:
            util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            memory = self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
            return float(util), int(memory)
        except Exception:
            return None, None


@dataclass
class PhaseRecord:
    name: str
    start_s: float
    end_s: float | None = None
    cpu_start_s: float = 0.0
    cpu_end_s: float | None = None
    cuda_peak_allocated_bytes: int | None = None
    cuda_peak_reserved_bytes: int | None = None

    @property
    def wall_s(self) -> float:
        return (self.end_s or self.start_s) - self.start_s

    @property
    def cpu_percent(self) -> float | None:
        """Process CPU time over wall time in this phase, in % of one core (None under 0.1 s: the
        kernel counts CPU time in 10 ms ticks, too coarse for shorter phases)."""
        if self.end_s is None or self.cpu_end_s is None or self.wall_s < MIN_PHASE_FOR_CPU_S:
            return None
        return 100 * (self.cpu_end_s - self.cpu_start_s) / self.wall_s


class ResourceSampler:
    """Samples RSS, CPU and GPU in a background thread; phases mark what the process is doing.

    with ResourceSampler() as sampler:
        sampler.phase("load"); ...; sampler.phase("inference"); ...
    The thread is stopped and joined when the block exits, whatever happens inside.
    """

    def __init__(self, interval_s: float = DEFAULT_SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.phases: list[PhaseRecord] = []
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None
        self._cuda = False
        self._t0 = 0.0
        self._current = "idle"

    def watch_gpu(self, index: int) -> None:
        """Also record torch.cuda peaks per phase and NVML utilisation/memory for CUDA device `index`."""
        self._nvml = _Nvml(index)
        self._cuda = True

    # lifecycle
    def __enter__(self) -> ResourceSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._process.cpu_percent(None)  # prime: the first call always returns 0
        self._take_sample()
        self._thread = threading.Thread(target=self._loop, name="llmkit-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._close_phase()
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._take_sample()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    # phases
    def phase(self, name: str) -> None:
        """Close the current phase and open `name` (also resets CUDA peak counters)."""
        self._close_phase()
        self._current = name
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.phases.append(PhaseRecord(name, self.elapsed(), cpu_start_s=self._cpu_seconds()))
        self._take_sample()

    def _close_phase(self) -> None:
        if not self.phases or self.phases[-1].end_s is not None:
            return
        record = self.phases[-1]
        self._take_sample()
        record.end_s = self.elapsed()
        record.cpu_end_s = self._cpu_seconds()
        if self._cuda:
            import torch

            record.cuda_peak_allocated_bytes = torch.cuda.max_memory_allocated()
            record.cuda_peak_reserved_bytes = torch.cuda.max_memory_reserved()

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    # sampling
    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take_sample(timed=True)

    def _take_sample(self, timed: bool = False) -> None:
        """timed: a regular tick. Samples taken at phase boundaries reuse the last CPU reading,
        since a CPU percentage over the few milliseconds since the last tick means nothing."""
        gpu_util, gpu_memory = self._nvml.read() if self._nvml else (None, None)
        if timed or not self.samples:
            cpu = self._process.cpu_percent(None)
        else:
            cpu = self.samples[-1].cpu_percent
        self.samples.append(
            Sample(
                t_s=self.elapsed(),
                phase=self._current,
                rss_bytes=self._process.memory_info().rss,
                cpu_percent=cpu,
                gpu_util_percent=gpu_util,
                gpu_memory_bytes=gpu_memory,
            )
        )

    def latest(self) -> Sample:
        return self.samples[-1]

    # summaries
    def in_phase(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == name]

    def peak_rss(self, name: str) -> int | None:
        values = [s.rss_bytes for s in self.in_phase(name)]
        return max(values) if values else None

    def mean_gpu_util(self, name: str) -> float | None:
        values = [s.gpu_util_percent for s in self.in_phase(name) if s.gpu_util_percent is not None]
        return statistics.fmean(values) if values else None

    def peak_gpu_memory(self, name: str) -> int | None:
        values = [s.gpu_memory_bytes for s in self.in_phase(name) if s.gpu_memory_bytes is not None]
        return max(values) if values else None


# --- the environment ------------------------------------------------------------------------


def cpu_model() -> str:
    from llmkit.devices import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def environment(device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Versions and machine facts a figure needs beside it to mean anything."""
    import torch
    import transformers

    from llmkit import __version__

    info: dict[str, Any] = {
        "llmkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "memory_total_bytes": psutil.virtual_memory().total,
        "memory_available_bytes": psutil.virtual_memory().available,
    }
    if device and device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        info["gpu_name"] = torch.cuda.get_device_name(index)
        info["gpu_memory_total_bytes"] = torch.cuda.get_device_properties(index).total_memory
    return info


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


# --- how busy the machine was ------------------------------------------------------------------

LOAD_MARGIN = 0.5  # runnable tasks of others beyond the free cores still taken as noise (a shell, kernel threads)
STEAL_BUSY_PERCENT = 5.0  # CPU time a hypervisor gave to other VMs, in % of all of this machine's CPU time
MIN_STEAL_CPU_S = 1.0  # CPU-seconds (all cores) a window needs for steal to mean anything: 100 ticks of 10 ms


@dataclass(frozen=True)
class MachineLoad:
    """How busy the machine was while a measurement ran; busy: its figures are not comparable with a quiet run.

    The rule (judge_load). The 1-minute load average counts every runnable task on the machine, this
    measurement's own threads included, so comparing it with the cores as it is would call every
    multi-threaded run busy. While the measurement computes, its `threads` add at most `threads` to it;
    `others_load` = load average - threads (at least 0) is what the rest of the machine asked for, at the
    least. The measurement leaves `free_cores` = cores - threads (at least 0) to the rest. Busy when the
    others asked for more than the free cores, by more than LOAD_MARGIN: then they took turns on the
    measurement's cores, and each step of a multi-threaded decode waits for its slowest thread. (For
    threads <= cores this is: load average > cores + LOAD_MARGIN.) Also busy when the hypervisor took more
    than STEAL_BUSY_PERCENT of the CPU time during the measurement: neighbours of a VM, which no load
    average inside it shows. `cores` are all the machine's logical CPUs, as the load average is
    machine-wide. The load average is the higher of the readings at the start and the end, so a
    measurement shorter than a minute is judged mostly by the minute before it; steal covers the
    measurement itself (None when it was too short to tell, or on systems without it).
    """

    cores: int
    threads: int
    load_average: float | None
    steal_percent: float | None
    others_load: float | None
    free_cores: int
    busy: bool
    reason: str  # why busy, in words ("" when not)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def warning(self, measured: str = "the measurement") -> str:
        """One sentence for a busy machine: what was seen and what to do."""
        fewer = "" if self.threads == 1 else ", or with fewer threads (--threads 1)"
        return (
            f"the machine was busy during {measured} ({self.reason}): its figures are not comparable with a "
            f"quiet run's; measure again when the machine is quiet{fewer}"
        )


def judge_load(*, cores: int, threads: int, load_average: float | None, steal_percent: float | None) -> MachineLoad:
    """The busy rule of MachineLoad on given readings (pure, so it is tested on any readings)."""
    free = max(0, cores - threads)
    others = None if load_average is None else max(0.0, load_average - threads)
    reasons = []
    if others is not None and others > free + LOAD_MARGIN:
        reasons.append(
            f"load average {load_average:.1f} on {cores} cores while this measurement computed with "
            f"{threads} thread{'' if threads == 1 else 's'}"
        )
    if steal_percent is not None and steal_percent > STEAL_BUSY_PERCENT:
        reasons.append(f"the hypervisor took {steal_percent:.0f}% of the CPU time (steal)")
    return MachineLoad(
        cores=cores,
        threads=threads,
        load_average=load_average,
        steal_percent=steal_percent,
        others_load=others,
        free_cores=free,
        busy=bool(reasons),
        reason="; ".join(reasons),
    )


def steal_percent(before, after) -> float | None:
    """CPU steal between two psutil.cpu_times() readings, in % of all CPU time (guest time is already
    inside user time on Linux, so it is not added twice); None without a steal counter or enough time."""
    if getattr(before, "steal", None) is None or getattr(after, "steal", None) is None:
        return None
    fields = [name for name in after._fields if name not in ("guest", "guest_nice")]
    total = sum(getattr(after, name) - getattr(before, name) for name in fields)
    if total < MIN_STEAL_CPU_S:
        return None
    return 100 * max(0.0, after.steal - before.steal) / total


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class LoadWatch:
    """Readings of the load average and CPU steal at the start and the end of a measurement.

    watch = LoadWatch()            # the start
    ...                            # the measured runs
    machine = watch.stop(threads)  # a MachineLoad (judge_load's rule)
    """

    def __init__(self) -> None:
        self._loads = [load_average()]
        self._cpu = psutil.cpu_times()

    def stop(self, threads: int | None) -> MachineLoad:
        cores = os.cpu_count() or 1
        loads = [value for value in (*self._loads, load_average()) if value is not None]
        return judge_load(
            cores=cores,
            threads=threads or cores,
            load_average=max(loads) if loads else None,
            steal_percent=steal_percent(self._cpu, psutil.cpu_times()),
        )


# --- a server's own figures (a model behind a URL) -----------------------------------------------------

SERVER_WATCH_INTERVAL_S = 0.5
SERVER_RSS = "process_resident_memory_bytes"  # prometheus_client's process collector (vLLM, most Python servers)
SERVER_CPU = "process_cpu_seconds_total"
# KV cache use as a fraction: vLLM (new and old names), llama-server (--metrics)
SERVER_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")
NOT_MEASURED = "remote: not measured"


def parse_prometheus(text: str) -> dict[str, float]:
    """A Prometheus text exposition -> {sample name: value}; a name with several label sets keeps the largest
    (the figures read here are one per process or model). Unreadable text gives what was read before it."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                if math.isfinite(value):
                    values[sample.name] = max(value, values.get(sample.name, value))
    except ValueError:
        pass
    return values


class ServerWatch:
    """Reads a server's own figures (`read`: an engine's server_metrics) every interval in a thread while the
    measured runs go; stop() joins it and says what was seen (summary)."""

    def __init__(self, read: Callable[[], dict[str, float] | None], interval_s: float = SERVER_WATCH_INTERVAL_S):
        self.read = read
        self.interval_s = interval_s
        self.readings: list[tuple[float, dict[str, float]]] = []
        self.offered = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ServerWatch:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._take()
        if self.offered:
            self._thread = threading.Thread(target=self._loop, name="llmkit-server-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._take()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def _take(self) -> None:
        try:
            reading = self.read()
        except Exception:  # a server that stops answering /metrics mid-run: the readings so far stand
            reading = None
        if reading is None:
            if not self.readings:
                self.offered = False
            return
        self.readings.append((time.perf_counter(), reading))

    def summary(self) -> dict[str, Any]:
        """{"measured", "note", "rss_peak_bytes", "cpu_percent", "kv_cache_usage_peak", "readings"}."""
        record: dict[str, Any] = {"measured": False, "readings": len(self.readings)}
        if not self.readings:
            record["note"] = f"{NOT_MEASURED} (the server has no Prometheus /metrics)"
            return record
        rss = [r[SERVER_RSS] for _, r in self.readings if SERVER_RSS in r]
        cpu = [(t, r[SERVER_CPU]) for t, r in self.readings if SERVER_CPU in r]
        kv = [r[name] for _, r in self.readings for name in SERVER_KV_CACHE if name in r]
        record["rss_peak_bytes"] = int(max(rss)) if rss else None
        span = cpu[-1][0] - cpu[0][0] if len(cpu) > 1 else 0.0
        record["cpu_percent"] = 100 * (cpu[-1][1] - cpu[0][1]) / span if span > 0 else None
        record["kv_cache_usage_peak"] = max(kv) if kv else None
        record["measured"] = any(record[key] is not None for key in ("rss_peak_bytes", "cpu_percent"))
        if not record["measured"]:
            record["note"] = f"{NOT_MEASURED} (its /metrics has no {SERVER_RSS} or {SERVER_CPU})"
        return record
