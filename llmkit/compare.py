"""`llmkit compare`: the same work on several models, each in its own fresh subprocess.

The parent validates everything, then runs one worker per model, one after another
(`python -m llmkit.compare`), passing a JSON spec on stdin and reading a JSON row
back from a file. A worker that raises, runs out of memory or is killed fails its own
row only; its memory figures are its own. Workers report their stage on stderr as
`llmkit-stage<TAB>text` lines so the parent can show progress.

Perplexity (`perplexity_of`): the token-level negative log-likelihood averaged over every
predicted token. The text is prefixed with the tokenizer's BOS token (or EOS when it has
no BOS), so its first token is predicted too. Texts longer than the window are scored
with a sliding window: each window of `window` tokens advances by `stride` and only the
tokens not scored by an earlier window count, each with up to window - stride tokens
of context. Bits per byte = total NLL in bits / UTF-8 bytes of the text, comparable
across tokenizers, unlike perplexity.

A model can be a URL (the remote engine): its row runs once whatever --engine says, with the
server's tokenizer, and its perplexity comes from the server's echoed prompt log-probs
(`perplexity_by_echo`), once the engine has checked them against the log-probs the server gives
the same tokens while generating; a server without them, or whose figures fail that check, gets
"n/a (why)" in the cell, never a number. Memory is the server's, from its /metrics (else "remote:
not measured"); load time is connecting and probing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from llmkit.engine import REMOTE_ENGINE, LoadOptions
from llmkit.errors import ContextExceeded, ImplausibleScores, InvalidParams, LlmkitError, UnsupportedFeature, one_line

STAGE_PREFIX = "llmkit-stage\t"
DEFAULT_PROMPT = "The old lighthouse keeper opened his logbook and wrote"
DEFAULT_WINDOW = 512
MAX_TIMEOUT_S = 24 * 3600
FORMATS = ("table", "json", "csv", "markdown")


def reference_text() -> str:
    """The default text for perplexity: a few paragraphs written for llmkit, shipped in the package."""
    return files("llmkit").joinpath("data/reference.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class CompareSpec:
    models: tuple[str, ...]
    prompt: str = DEFAULT_PROMPT
    text: str = field(default_factory=reference_text, repr=False)
    text_name: str = "llmkit reference text"
    runs: int = 3
    warmup: int = 1
    max_new_tokens: int = 32
    window: int = DEFAULT_WINDOW
    stride: int | None = None  # default: half the window
    # device, dtype, quantize and threads (each worker's; threads None: $LLMKIT_THREADS, which workers inherit);
    # each model runs once per name in `engines`, which replaces load.engine
    load: LoadOptions = field(default_factory=LoadOptions)
    timeout_s: float = 1800.0
    engines: tuple[str, ...] = ("transformers",)

    @property
    def effective_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.window // 2)


def check_spec(spec: CompareSpec) -> None:
    """Everything wrong with the arguments, found before any model loads (exit code 2)."""
    from llmkit.params import parse_params

    if not spec.models:
        raise InvalidParams("give at least one model", field="models")
    if any(not m.strip() for m in spec.models):
        raise InvalidParams("a model reference is empty", field="models")
    if spec.runs < 1:
        raise InvalidParams(f"runs must be at least 1 (got {spec.runs})", field="runs")
    if spec.warmup < 0:
        raise InvalidParams(f"warmup must be at least 0 (got {spec.warmup})", field="warmup")
    if not spec.prompt.strip():
        raise InvalidParams("the prompt is empty", field="prompt")
    if not spec.text.strip():
        raise InvalidParams("the text for perplexity is empty", field="text_file")
    if spec.window < 2:
        raise InvalidParams(f"window must be at least 2 tokens (got {spec.window})", field="window")
    if not 1 <= spec.effective_stride <= spec.window - 1:
        raise InvalidParams(
            f"stride must be between 1 and window - 1 = {spec.window - 1} (got {spec.effective_stride})", field="stride"
        )
    if not 0 < spec.timeout_s <= MAX_TIMEOUT_S:
        raise InvalidParams(f"timeout must be between 0 and {MAX_TIMEOUT_S} seconds", field="timeout")
    if not spec.engines:
        raise InvalidParams("give at least one engine", field="engine")
    for name in spec.engines:
        dataclasses.replace(spec.load, engine=name)  # checks the name
    from llmkit.models import check_model, is_url

    if spec.load.remote_model is not None and not any(is_url(m) for m in spec.models):
        raise InvalidParams("--remote-model names a model on a server: use it with a URL model", field="model")
    for reference in spec.models:
        if is_url(reference):
            check_model(reference)  # a malformed URL fails here, before any worker starts
    parse_params(greedy=True, max_new_tokens=spec.max_new_tokens)


def read_text_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParams(f"cannot read {path} as UTF-8 text: {exc}", field="text_file") from None
    if not text.strip():
        raise InvalidParams(f"{path} is empty", field="text_file")
    return text


# --- perplexity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    bits_per_byte: float
    nll_nats: float  # total over predicted tokens
    predicted_tokens: int
    text_bytes: int
    windows: int
    window: int
    stride: int


def sliding_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new) per window over `length` tokens: score ids[begin:end], counting its last `new`
    predictions. Every position 1..length-1 is counted exactly once."""
    spans, counted_until = [], 1  # position 0 is never predicted
    begin = 0
    while counted_until < length:
        end = min(begin + window, length)
        spans.append((begin, end, end - counted_until))
        counted_until = end
        begin += stride
    return spans


def perplexity_of(engine, text: str, window: int, stride: int) -> Perplexity:
    tokenizer = engine.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = ([start] if start is not None else []) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if engine.info.context_length:
        window = min(window, engine.info.context_length)
        stride = min(stride, window - 1)
    spans = sliding_windows(len(ids), window, stride)
    total = 0.0
    predicted = 0
    for begin, end, new in spans:
        logprobs = engine.token_logprobs(ids[begin:end])
        counted = logprobs[len(logprobs) - new :]
        total -= sum(counted)
        predicted += len(counted)
    return _perplexity(text, total, predicted, windows=len(spans), window=window, stride=stride)


def _perplexity(text: str, nll: float, predicted: int, *, windows: int, window: int, stride: int) -> Perplexity:
    """The record from a text's summed negative log-likelihood (nats) over `predicted` tokens."""
    text_bytes = len(text.encode("utf-8"))
    return Perplexity(
        perplexity=math.exp(nll / predicted),
        bits_per_byte=nll / math.log(2) / text_bytes,
        nll_nats=nll,
        predicted_tokens=predicted,
        text_bytes=text_bytes,
        windows=windows,
        window=window,
        stride=stride,
    )


ECHO_CHARS_PER_TOKEN = 4  # the first piece of text a server scores is window x this many characters


def perplexity_by_echo(engine, text: str, window: int, stride: int) -> Perplexity:
    """perplexity_of for an engine that scores texts, not ids (a server's echo: engine.text_logprobs), with the
    same sliding windows over the text as the server tokenizes it.

    Each request sends a piece of the text starting at a token boundary. Scores are causal, so the first
    `window` tokens of an answer are exact whatever follows them: a piece may be longer than needed and its
    tail unused. The last token of a piece that stops short of the text's end is never counted (cutting the
    text there may have changed it). Tokens already counted by an earlier piece are context; the next piece
    starts window - stride tokens before the first token not counted yet. A refusal for length
    (ContextExceeded) shrinks the window to the context the server states, or halves the piece."""
    if engine.info.context_length:
        window = min(window, engine.info.context_length - 1)  # one generated token rides along with the echo
    stride = min(stride, window - 1)
    begin = counted = 0  # characters: where the piece starts; where the uncounted text starts
    chars = window * ECHO_CHARS_PER_TOKEN
    total, predicted, windows = 0.0, 0, 0
    while counted < len(text):
        piece = text[begin : begin + chars]
        try:
            tokens = engine.text_logprobs(piece)
        except ContextExceeded as exc:
            if exc.context and exc.context - 2 < window:
                window = max(2, exc.context - 2)
                stride = min(stride, window - 1)
            chars //= 2
            if chars < 1:
                raise
            continue
        ends = begin + len(piece) >= len(text)
        usable = tokens[:window]
        if len(tokens) <= window and not ends:
            usable = usable[:-1]  # the piece's last token: cutting the text there may have changed it
            chars = max(chars + 1, int(chars * window / max(len(tokens), 1)))  # reach the window next time
        if not usable:
            continue
        windows += 1
        for token in usable:
            if begin + token.offset >= counted and token.logprob is not None:
                total -= token.logprob
                predicted += 1
        if len(usable) == len(tokens):
            break  # the piece reached the end of the text, and every token of it is scored
        counted = begin + tokens[len(usable)].offset
        back = max(1, len(usable) - (window - stride))
        begin = max(begin + tokens[back].offset, begin + 1)
    if predicted == 0:
        raise UnsupportedFeature("the server scored none of the text's tokens")
    return _perplexity(text, total, predicted, windows=windows, window=window, stride=stride)


def score_text(engine, text: str, window: int, stride: int) -> tuple[Perplexity | None, str | None, str | None]:
    """(perplexity, None, None), or for an engine that cannot score this text (a server without prompt log-probs,
    or whose log-probs fail the remote engine's sanity check): (None, a few words for the cell, the whole why)."""
    capabilities = engine.info.capabilities
    if capabilities.logits:
        return perplexity_of(engine, text, window, stride), None, None
    if not capabilities.prompt_logprobs:
        why = capabilities.missing.get("prompt_logprobs")
        return None, "server has no prompt logprobs", f"the server has no prompt log-probs{f' ({why})' if why else ''}"
    try:
        return perplexity_by_echo(engine, text, window, stride), None, None
    except ImplausibleScores as exc:
        return None, exc.short, str(exc)
    except UnsupportedFeature as exc:
        return None, "server has no prompt logprobs", str(exc)
    except LlmkitError as exc:  # the server failed while scoring: the row keeps its other figures
        return None, "server error while scoring", str(exc)


# --- the worker (one model, in its own process) ------------------------------------------------


def _stage(text: str) -> None:
    sys.stderr.write(f"{STAGE_PREFIX}{text}\n")
    sys.stderr.flush()


def _disk_bytes(source) -> int | None:
    from llmkit.models import ALIASES, alias_gguf_path, folder_bytes

    if source.kind == "alias":
        return alias_gguf_path(ALIASES[source.location]).stat().st_size
    if source.kind in ("gguf", "folder"):
        return folder_bytes(Path(source.location))
    try:  # a Hub id: the snapshot folder it loaded from, in the local Hugging Face cache
        from huggingface_hub import snapshot_download

        return folder_bytes(Path(snapshot_download(source.location, local_files_only=True)))
    except Exception:  # not cached as a snapshot (or no longer): the size is unknown, not an error
        return None


def measure_model(spec: CompareSpec, reference: str, engine_name: str = "transformers") -> dict[str, Any]:
    """Everything compare shows for one model; runs inside the worker process."""
    import statistics

    from llmkit.devices import cuda_index, resolve_device
    from llmkit.engine import load_engine, prepare
    from llmkit.measure import LoadWatch, ResourceSampler, ServerWatch, run_latency
    from llmkit.models import resolve
    from llmkit.params import parse_params

    source = resolve(reference)
    _stage("preparing")
    if source.kind == "url":  # the server's device, dtype and threads: the local models' settings stay theirs
        load = LoadOptions(engine=REMOTE_ENGINE, remote_model=spec.load.remote_model, api_key=spec.load.api_key)
    else:
        load = dataclasses.replace(spec.load.for_local(), engine=engine_name, device=resolve_device(spec.load.device))
    prepare(reference, load, progress=lambda stage, done, total: _stage(f"{stage} {done}/{total}" if total else stage))
    server: ServerWatch | None = None
    with ResourceSampler() as sampler:
        if load.device.startswith("cuda"):
            sampler.watch_gpu(cuda_index(load.device))
        sampler.phase("load")
        _stage("loading" if source.kind != "url" else "connecting")
        engine = load_engine(reference, load)
        local = engine.info.capabilities.local_resources
        sampler.phase("inference")
        if not local:
            server = ServerWatch(engine.server_metrics)
            server.start()
        params = parse_params(greedy=True, max_new_tokens=spec.max_new_tokens)
        for index in range(spec.warmup):
            _stage(f"warm-up {index + 1}/{spec.warmup}")
            engine.generate(spec.prompt, params)
        latencies, sample = [], None
        watch = LoadWatch()
        for index in range(spec.runs):
            _stage(f"run {index + 1}/{spec.runs}")
            started = time.perf_counter()
            result = engine.generate(spec.prompt, params)
            latencies.append(
                run_latency(
                    result.usage.prompt_tokens,
                    result.timings.token_times_s,
                    time.perf_counter() - started,
                    result.usage.completion_tokens,
                )
            )
            sample = result.text
        machine_load = watch.stop(engine.info.threads if local else 1)  # a client computes on about one thread
        _stage("perplexity")
        sampler.phase("perplexity")
        scored, not_scored, why_not = score_text(engine, spec.text, spec.window, spec.effective_stride)
        if server is not None:
            server.stop()
        engine.close()
    peaks = [sampler.peak_rss(name) or 0 for name in ("load", "inference", "perplexity")]
    gpu = [p.cuda_peak_allocated_bytes for p in sampler.phases if p.cuda_peak_allocated_bytes is not None]
    tg = [lat.tg_tokens_per_s for lat in latencies if lat.tg_tokens_per_s is not None]
    disk = _disk_bytes(source) if local else None
    resources = server.summary() if server is not None else None
    peak_rss = max(peaks) if local else (resources or {}).get("rss_peak_bytes")
    return {
        "model": row_label(reference, engine_name, spec),
        "reference": reference,
        "engine_name": engine_name,
        "ok": True,
        "worker_pid": os.getpid(),
        "engine": engine.info.to_dict(),
        "parameters": engine.info.parameters or None,  # a server does not say
        "dtype": engine.info.dtype,
        "device": engine.info.device,
        "threads": engine.info.threads,
        "machine_load": machine_load.to_dict(),
        "disk_bytes": disk,
        "load_s": engine.info.load_s,
        "peak_rss_bytes": peak_rss,
        "peak_rss_load_bytes": peaks[0] if local else None,
        "server": resources,  # a remote model's memory and CPU, from its /metrics (None: a local model)
        "gpu_peak_allocated_bytes": max(gpu) if gpu else None,
        "ttft_s": statistics.median(lat.ttft_s for lat in latencies),
        "tg_tokens_per_s": statistics.median(tg) if tg else None,
        "generated_tokens": statistics.median(lat.generated_tokens for lat in latencies),
        "perplexity": scored.perplexity if scored else None,
        "bits_per_byte": scored.bits_per_byte if scored else None,
        "scoring": asdict(scored) if scored else None,
        "perplexity_na": not_scored,  # why there is no perplexity, in a few words ("server has no prompt logprobs")
        "perplexity_why": why_not,
        "sample": sample,
    }


def worker_main() -> None:
    """`python -m llmkit.compare OUT.json < spec.json`: measure one model, write its row."""
    request = json.load(sys.stdin)
    spec = CompareSpec(
        **{
            **request["spec"],
            "models": tuple(request["spec"]["models"]),
            "engines": tuple(request["spec"]["engines"]),
            "load": LoadOptions(**request["spec"]["load"]),
        }
    )
    out_path = Path(sys.argv[1])
    label = row_label(request["model"], request["engine"], spec)
    try:
        row = measure_model(spec, request["model"], request["engine"])
    except LlmkitError as exc:
        row = {"model": label, "ok": False, "error": str(exc)}
    except MemoryError as exc:
        row = {"model": label, "ok": False, "error": f"out of memory ({exc})"}
    except Exception as exc:  # a crash of this model must not stop the comparison
        trace = traceback.format_exc(limit=-3)
        row = {"model": label, "ok": False, "error": f"{type(exc).__name__}: {one_line(exc)}", "traceback": trace}
    out_path.write_text(json.dumps(row))


# --- the parent -------------------------------------------------------------------------------


Progress = Callable[[int, int, str, str], None]
"""progress(model_index, model_count, model, stage)"""


def row_label(reference: str, engine_name: str, spec: CompareSpec) -> str:
    """The model reference, with the engine named when the comparison runs several (a URL: never a key in it)."""
    from llmkit.models import is_url, shown_url

    if is_url(reference):
        return shown_url(reference)
    return reference if len(spec.engines) == 1 else f"{reference} [{engine_name}]"


def model_runs(spec: CompareSpec) -> list[tuple[str, str]]:
    """(reference, engine) per row: a local model once per engine, a URL once (its server is its engine)."""
    from llmkit.models import is_url

    runs = []
    for reference in spec.models:
        runs += [(reference, REMOTE_ENGINE)] if is_url(reference) else [(reference, name) for name in spec.engines]
    return runs


def run_worker(
    spec: CompareSpec, reference: str, on_stage: Callable[[str], None], engine_name: str = "transformers"
) -> dict[str, Any]:
    from llmkit.models import is_url

    label = row_label(reference, engine_name, spec)
    load = spec.load if is_url(reference) else spec.load.for_local()  # a key goes only to a URL's worker
    payload = json.dumps(
        {
            "spec": {
                **asdict(spec),
                "models": list(spec.models),
                "engines": list(spec.engines),
                "load": load.to_dict(),
            },
            "model": reference,
            "engine": engine_name,
        }
    )
    with tempfile.TemporaryDirectory(prefix="llmkit-compare-") as scratch:
        out_path = Path(scratch) / "row.json"
        env = {**os.environ, "LLMKIT_NO_PROGRESS": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "llmkit.compare", str(out_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert process.stdin is not None and process.stderr is not None
        process.stdin.write(payload)
        process.stdin.close()
        other_lines: list[str] = []
        stderr = process.stderr

        def read_stderr() -> None:
            for line in stderr:
                if line.startswith(STAGE_PREFIX):
                    on_stage(line[len(STAGE_PREFIX) :].strip())
                elif line.strip():
                    other_lines.append(line.rstrip())

        reader = threading.Thread(target=read_stderr, name="llmkit-compare-stderr", daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=spec.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            reader.join()
            return {"model": label, "ok": False, "error": f"took longer than the {spec.timeout_s:.0f} s timeout"}
        reader.join()
        if out_path.is_file():
            return json.loads(out_path.read_text())
    if code < 0:
        reason = "killed (out of memory?)" if code == -9 else f"killed by signal {-code}"
    else:
        reason = f"exited with code {code}"
    detail = f": {other_lines[-1]}" if other_lines else ""
    return {"model": label, "ok": False, "error": f"worker {reason}{detail}"}


def run_compare(spec: CompareSpec, progress: Progress | None = None) -> list[dict[str, Any]]:
    check_spec(spec)
    rows = []
    runs = model_runs(spec)
    for index, (reference, engine_name) in enumerate(runs):
        label = row_label(reference, engine_name, spec)

        def on_stage(stage: str, index: int = index, label: str = label) -> None:
            if progress:
                progress(index, len(runs), label, stage)

        on_stage("starting")
        rows.append(run_worker(spec, reference, on_stage, engine_name))
    if progress:
        progress(len(runs), len(runs), "", "done")
    add_relative_speed(rows)
    return rows


def add_relative_speed(rows: Sequence[dict[str, Any]]) -> None:
    """Each successful row's decode speed as a fraction of the fastest (1.0 for the fastest)."""
    speeds = [r["tg_tokens_per_s"] for r in rows if r.get("ok") and r.get("tg_tokens_per_s")]
    fastest = max(speeds) if speeds else None
    for row in rows:
        if row.get("ok"):
            row["relative_speed"] = row["tg_tokens_per_s"] / fastest if fastest and row["tg_tokens_per_s"] else None


def busy_measurement(rows: Sequence[dict[str, Any]]):
    """(MachineLoad of the first row measured on a busy machine, "the runs of <labels>"), or None when none was."""
    from llmkit.measure import MachineLoad

    busy = [row for row in rows if row.get("ok") and (row.get("machine_load") or {}).get("busy")]
    if not busy:
        return None
    return MachineLoad(**busy[0]["machine_load"]), f"the runs of {', '.join(row['model'] for row in busy)}"


def threads_text(rows: Sequence[dict[str, Any]]) -> str | None:
    """The compute threads behind the speeds: "threads: 2", or per row when they differ."""
    counts = {row["model"]: row.get("threads") for row in rows if row.get("ok") and row.get("threads") is not None}
    if not counts or all(count is None for count in counts.values()):
        return None
    if len(set(counts.values())) == 1:
        return f"threads: {next(iter(counts.values()))} per model"
    return "threads: " + ", ".join(f"{model} {count}" for model, count in counts.items())


# --- flat records for csv / markdown / json -----------------------------------------------------

COLUMNS = (
    # key, label, lower_is_better (None: not ranked)
    ("model", "model", None),
    ("parameters", "params", None),
    ("dtype", "dtype", None),
    ("disk_bytes", "disk", True),
    ("load_s", "load s", True),
    ("peak_rss_bytes", "peak RSS", True),
    ("ttft_s", "TTFT", True),
    ("tg_tokens_per_s", "tg tok/s", False),
    ("relative_speed", "speed", False),
    ("perplexity", "perplexity", True),
    ("bits_per_byte", "bits/byte", True),
    ("sample", "sample", None),
)


def best_values(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best value of each ranked column among successful rows."""
    best = {}
    ok_rows = [r for r in rows if r.get("ok")]
    for key, _, lower in COLUMNS:
        values = [r[key] for r in ok_rows if r.get(key) is not None]
        if lower is not None and values:
            best[key] = min(values) if lower else max(values)
    return best


def flat_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    flat = []
    for row in rows:
        record = {key: row.get(key) for key, _, _ in COLUMNS}
        record["threads"] = row.get("threads")
        record["perplexity_na"] = row.get("perplexity_na")
        record["busy"] = (row.get("machine_load") or {}).get("busy")
        record["ok"] = row.get("ok", False)
        record["error"] = row.get("error")
        flat.append(record)
    return flat


if __name__ == "__main__":
    worker_main()
