"""`llmkit bench`: load-test an OpenAI-compatible endpoint, or a model under llmkit's own `serve`.

Every option is checked (and the dataset read, and matplotlib found for --plot) before anything is
started or sent, so a usage error is one line and exit 2 with nothing run. The measuring is in
llmkit/bench/, the drawing in render_bench.py; this module only wires them together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli import options
from llmkit.errors import InvalidParams

LOAD_PANEL = "Load"
PROMPTS_PANEL = "Prompts"
METRICS_PANEL = "Metrics and output"
LOCAL_PANEL = "Local target (bench starts llmkit serve)"

EPILOG = """Examples:

  llmkit bench http://127.0.0.1:8000/v1 --num-prompts 200 --max-concurrency 8

  llmkit bench smollm2-135m --sweep max-concurrency=1,4,16 --input-len 32 --output-len 64

  llmkit bench http://gpu-box:8000/v1#Qwen/Qwen2.5-7B-Instruct --request-rate 4 --slo ttft:500,tpot:50

  llmkit bench http://127.0.0.1:8080 --dataset prompts.jsonl --api chat --json > run.json

  llmkit bench smollm2-135m --sweep request-rate=1,2,4,8 --plot bench.png
"""

TARGET_HELP = (
    "An OpenAI-compatible server's URL (http://host:port or .../v1; URL#name picks the served model, else "
    "the first of /v1/models), or a model reference (alias, folder, .gguf): then bench starts "
    "`llmkit serve` on a free port and stops it after."
)


def bench(
    target: Annotated[str, typer.Argument(show_default=False, help=TARGET_HELP)],
    *,
    num_prompts: Annotated[
        Optional[int],
        typer.Option(
            "--num-prompts",
            rich_help_panel=LOAD_PANEL,
            show_default=False,
            help="Requests per load point (default 100; with --dataset: each line once).",
        ),
    ] = None,
    max_concurrency: Annotated[
        Optional[int],
        typer.Option(
            "--max-concurrency",
            rich_help_panel=LOAD_PANEL,
            show_default=False,
            help="Requests in flight at most (default: no limit).",
        ),
    ] = None,
    request_rate: Annotated[
        str,
        typer.Option(
            "--request-rate",
            rich_help_panel=LOAD_PANEL,
            help="Requests per second, arriving as a Poisson process (see --burstiness); inf sends them all at once.",
        ),
    ] = "inf",
    burstiness: Annotated[
        float,
        typer.Option(
            "--burstiness",
            rich_help_panel=LOAD_PANEL,
            help="Shape of the gamma-distributed gaps between arrivals: 1 is Poisson, below 1 burstier, above 1 "
            "more even.",
        ),
    ] = 1.0,
    sweep: Annotated[
        Optional[str],
        typer.Option(
            "--sweep",
            rich_help_panel=LOAD_PANEL,
            show_default=False,
            help="Run several load points, one table row each: max-concurrency=1,2,4,8 or request-rate=1,2,4,inf "
            "(or burstiness=0.5,1,2).",
        ),
    ] = None,
    warmup: Annotated[
        int,
        typer.Option("--warmup", rich_help_panel=LOAD_PANEL, help="Requests sent before the first point, not counted."),
    ] = 1,
    seed: Annotated[
        int,
        typer.Option("--seed", rich_help_panel=LOAD_PANEL, help="Seed of the arrival times and the random prompts."),
    ] = 0,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            rich_help_panel=LOAD_PANEL,
            help="Seconds one request may take from sending to its last byte; then it counts as failed (timeout).",
        ),
    ] = 600.0,
    input_len: Annotated[
        Optional[str],
        typer.Option(
            "--input-len",
            rich_help_panel=PROMPTS_PANEL,
            show_default=False,
            help="Prompt tokens of the random prompts: N, or a range LOW:HIGH drawn per prompt (default 128).",
        ),
    ] = None,
    output_len: Annotated[
        Optional[str],
        typer.Option(
            "--output-len",
            rich_help_panel=PROMPTS_PANEL,
            show_default=False,
            help="max_tokens per request: N or LOW:HIGH (default 128; with --dataset, for lines without max_tokens).",
        ),
    ] = None,
    range_ratio: Annotated[
        float,
        typer.Option(
            "--range-ratio",
            rich_help_panel=PROMPTS_PANEL,
            help="As vLLM's: lengths drawn from [N(1-r), N(1+r)] for --input-len N and --output-len N.",
        ),
    ] = 0.0,
    dataset: Annotated[
        Optional[Path],
        typer.Option(
            "--dataset",
            rich_help_panel=PROMPTS_PANEL,
            show_default=False,
            help='JSONL file of prompts: lines {"prompt": ...} or {"messages": [...]}, each with an optional '
            '"max_tokens".',
        ),
    ] = None,
    api: Annotated[
        Optional[str],
        typer.Option(
            "--api",
            rich_help_panel=PROMPTS_PANEL,
            show_default=False,
            help="completions or chat (default: chat when the dataset has messages, else completions).",
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option("--temperature", rich_help_panel=PROMPTS_PANEL, help="Sent with every request (0: greedy).")
    ] = 0.0,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            "--ignore-eos/--no-ignore-eos",
            rich_help_panel=PROMPTS_PANEL,
            help="Ask the server to generate max_tokens whatever the text (vLLM, llama.cpp); left out for a server "
            "that refuses the field.",
        ),
    ] = True,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar=["LLMKIT_API_KEY", "OPENAI_API_KEY"],
            show_default=False,
            show_envvar=True,
            help="Bearer key for a URL target. Prefer the environment variables: a command line is visible to "
            "other users.",
        ),
    ] = None,
    percentiles: Annotated[
        str,
        typer.Option(
            "--percentiles",
            rich_help_panel=METRICS_PANEL,
            help="Percentiles of TTFT, TPOT, ITL and E2E, beside the mean and median.",
        ),
    ] = "90,95,99",
    slo: Annotated[
        Optional[str],
        typer.Option(
            "--slo",
            rich_help_panel=METRICS_PANEL,
            show_default=False,
            help="Goodput: requests/s that met every limit, e.g. ttft:500,tpot:50,e2e:5000 (milliseconds).",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", rich_help_panel=METRICS_PANEL, help="Print one JSON document (schema in docs/bench.md)."
        ),
    ] = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", rich_help_panel=METRICS_PANEL, help="Print CSV, one row per load point.")
    ] = False,
    detailed: Annotated[
        bool,
        typer.Option(
            "--detailed",
            rich_help_panel=METRICS_PANEL,
            help="With --json: every request's record too (times, tokens, error).",
        ),
    ] = False,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot",
            rich_help_panel=METRICS_PANEL,
            show_default=False,
            help="Draw output tokens/s against TTFT and TPOT across the sweep to this PNG (needs matplotlib).",
        ),
    ] = None,
    wide: options.WideOpt = False,
    threads: Annotated[
        Optional[int],
        typer.Option(
            "--threads",
            rich_help_panel=LOCAL_PANEL,
            show_default=False,
            help="llmkit serve --threads: CPU threads that compute.",
        ),
    ] = None,
    max_batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--max-batch-size", rich_help_panel=LOCAL_PANEL, show_default=False, help="llmkit serve --max-batch-size."
        ),
    ] = None,
    max_queue: Annotated[
        Optional[int],
        typer.Option(
            "--max-queue",
            rich_help_panel=LOCAL_PANEL,
            show_default=False,
            help="llmkit serve --max-queue (default: room for every prompt, so the server queues rather than refuses).",
        ),
    ] = None,
    engine: Annotated[
        Optional[str],
        typer.Option(
            "--engine",
            rich_help_panel=LOCAL_PANEL,
            show_default=False,
            help="llmkit serve --engine: transformers, llama.cpp or auto.",
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", rich_help_panel=LOCAL_PANEL, show_default=False, help="llmkit serve --dtype."),
    ] = None,
    startup_timeout: Annotated[
        float,
        typer.Option(
            "--startup-timeout",
            rich_help_panel=LOCAL_PANEL,
            help="Seconds llmkit serve may take to load the model (a first GGUF load converts it).",
        ),
    ] = 900.0,
) -> None:
    """Load-test an OpenAI-compatible endpoint: throughput, TTFT, TPOT, ITL, E2E and goodput, as vLLM measures them."""
    from llmkit.bench import client, runner

    spec = _spec(
        num_prompts=num_prompts,
        max_concurrency=max_concurrency,
        request_rate=request_rate,
        burstiness=burstiness,
        sweep=sweep,
        warmup=warmup,
        seed=seed,
        request_timeout=request_timeout,
        input_len=input_len,
        output_len=output_len,
        range_ratio=range_ratio,
        dataset=dataset,
        api=api,
        temperature=temperature,
        ignore_eos=ignore_eos,
        percentiles=percentiles,
        slo=slo,
    )
    if as_json and as_csv:
        raise InvalidParams("give either --json or --csv, not both", field="json")
    if detailed and not as_json:
        raise InvalidParams("--detailed adds every request to the JSON document: use it with --json", field="detailed")
    if plot is not None:
        from llmkit.plots import require_matplotlib

        require_matplotlib()
    local = not client.is_url(target)
    if local:
        _check_local(target, threads, max_batch_size, max_queue, engine, dtype, startup_timeout)
        endpoint = None
    else:
        given = [
            flag
            for flag, value in (
                ("--threads", threads),
                ("--max-batch-size", max_batch_size),
                ("--max-queue", max_queue),
                ("--engine", engine),
                ("--dtype", dtype),
            )
            if value is not None
        ]
        if given:
            raise InvalidParams(
                f"{', '.join(given)} configure the llmkit serve that bench starts for a model; "
                "a URL target is configured by whoever runs it",
                field="target",
            )
        endpoint = client.parse_url(target, api_key)

    from llmkit.cli import render_bench

    server = None
    try:
        if local:
            from llmkit.bench.local import LocalServer, ServeOptions

            server = LocalServer(
                target,
                ServeOptions(
                    threads=threads,
                    max_batch_size=max_batch_size,
                    max_queue=max_queue if max_queue is not None else _room_for(spec),
                    engine=engine,
                    dtype=dtype,
                    request_timeout_s=request_timeout,
                ),
                startup_timeout_s=startup_timeout,
            )
            with render_bench.server_starting(server) as report:
                endpoint = server.start(report)
            render_bench.server_ready(server)
            target_info = {
                "url": endpoint.api_base,
                "kind": "llmkit serve",
                "started_by_bench": True,
                "command": server.display_command(),
                "health": server.health,
            }
        else:
            assert endpoint is not None
            target_info = {
                "url": endpoint.api_base,
                "kind": "url",
                "started_by_bench": False,
                "command": None,
                "health": None,
            }
        with render_bench.progress() as progress:
            result = runner.run(endpoint, spec, target_info, progress)
    finally:
        if server is not None:
            code = server.stop()
            render_bench.server_stopped(server, code)

    document = result.to_dict(detailed=detailed)
    if as_json:
        render_bench.json(document)
    elif as_csv:
        render_bench.csv(document)
    else:
        render_bench.report(document, wide=wide)
    render_bench.warnings(document)
    if plot is not None:
        from llmkit.bench.plot import plot_sweep

        plot_sweep(document, plot)
        render_bench.wrote(plot)
    if result.interrupted:
        raise typer.Exit(130)
    if not any(point["completed"] for point in document["points"]):
        render_bench.nothing_completed(document)
        raise typer.Exit(1)


def _spec(
    *,
    num_prompts,
    max_concurrency,
    request_rate,
    burstiness,
    sweep,
    warmup,
    seed,
    request_timeout,
    input_len,
    output_len,
    range_ratio,
    dataset,
    api,
    temperature,
    ignore_eos,
    percentiles,
    slo,
):
    """Every load, prompt and metric option, validated, as one runner.BenchSpec (nothing is sent yet)."""
    from llmkit.bench import metrics, runner, workload

    if num_prompts is not None and num_prompts < 1:
        raise InvalidParams(f"--num-prompts must be at least 1 (got {num_prompts})", field="num_prompts")
    if warmup < 0:
        raise InvalidParams(f"--warmup must be 0 or more (got {warmup})", field="warmup")
    if not request_timeout > 0:
        raise InvalidParams(f"--request-timeout must be above 0 (got {request_timeout:g})", field="request_timeout")
    if not 0 <= temperature or math.isnan(temperature):
        raise InvalidParams(f"--temperature must be 0 or more (got {temperature:g})", field="temperature")
    base = runner.LoadPoint(
        max_concurrency=runner.check_concurrency(max_concurrency),
        request_rate=runner.parse_rate(request_rate),
        burstiness=runner.check_burstiness(burstiness),
    )
    axis_values = runner.parse_sweep(sweep) if sweep is not None else None
    default_out = workload.LengthRange(workload.DEFAULT_OUTPUT_LEN, workload.DEFAULT_OUTPUT_LEN)
    out_range = workload.with_range_ratio(
        workload.parse_length(output_len, "--output-len") if output_len else default_out, range_ratio, "--output-len"
    )
    prompts = None
    if dataset is not None:
        if input_len is not None:
            raise InvalidParams(
                "--input-len sizes random prompts; --dataset prompts are used as they are", field="input_len"
            )
        prompts = tuple(workload.read_dataset(dataset, out_range.high if output_len else workload.DEFAULT_OUTPUT_LEN))
        in_range = workload.LengthRange(workload.DEFAULT_INPUT_LEN, workload.DEFAULT_INPUT_LEN)
    else:
        in_range = workload.with_range_ratio(
            workload.parse_length(input_len, "--input-len")
            if input_len
            else workload.LengthRange(workload.DEFAULT_INPUT_LEN, workload.DEFAULT_INPUT_LEN),
            range_ratio,
            "--input-len",
        )
    return runner.BenchSpec(
        points=tuple(runner.build_points(base, axis_values)),
        num_prompts=num_prompts if (num_prompts is not None or dataset is not None) else runner.DEFAULT_NUM_PROMPTS,
        input_len=in_range,
        output_len=out_range,
        dataset=prompts,
        dataset_path=str(dataset) if dataset else None,
        api=workload.resolve_api(api, prompts),
        temperature=temperature,
        ignore_eos=ignore_eos,
        warmup=warmup,
        seed=seed,
        percentiles=metrics.parse_percentiles(percentiles),
        slo=metrics.parse_slo(slo) if slo else None,
        request_timeout_s=request_timeout,
        sweep_axis=axis_values[0] if axis_values else None,
    )


def _check_local(target: str, threads, max_batch_size, max_queue, engine, dtype, startup_timeout) -> None:
    """The model reference names something, and the forwarded serve options are sane: before serve starts."""
    from llmkit.models import check_model

    for flag, value in (("--threads", threads), ("--max-batch-size", max_batch_size), ("--max-queue", max_queue)):
        if value is not None and value < 1:
            raise InvalidParams(f"{flag} must be at least 1 (got {value})", field=flag.lstrip("-").replace("-", "_"))
    if not startup_timeout > 0:
        raise InvalidParams(f"--startup-timeout must be above 0 (got {startup_timeout:g})", field="startup_timeout")
    if engine is not None:
        from llmkit.engine import check_engine

        check_engine(engine)
    check_model(target)  # an unknown model or a typo fails here, in a fraction of a second


def _room_for(spec) -> int:
    """bench's own server gets a --max-queue with room for every prompt of the run: it measures, never refuses."""
    return max(spec.num_prompts or len(spec.dataset or ()), spec.warmup, 1)
