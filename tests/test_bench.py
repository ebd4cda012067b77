"""`llmkit bench`: the pure parts by exact values (arrivals, percentiles, goodput, SSE, the request
record), then real runs against two servers nobody here wrote the client for: `llmkit serve` on the tiny
model, and llama-cpp-python's server on the tiny GGUF; and once with bench starting its own server.

The server runs use the tiny random models, so texts are noise and timings tiny: the checks are the
bookkeeping (every request counted once, token totals equal to the per-request counts, TTFT <= E2E,
the documented JSON keys), not speed.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmkit.bench import client as bench_client
from llmkit.bench import metrics, runner, workload
from llmkit.bench.ceiling import ClientCeiling, ceiling_share, near_ceiling
from llmkit.bench.client import SSEParser, choice_output, parse_url, stream_request
from llmkit.bench.metrics import RequestRecord, distribution, meets_slo, summarize
from llmkit.errors import InvalidParams
from tests.server_helpers import ServerProcess, free_port, llama_cpp_server
from tests.tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-test-key"
SMALL = ["--input-len", "12", "--output-len", "6", "--warmup", "1"]


# --- arrivals ------------------------------------------------------------------------------------------


def _gaps(offsets: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *offsets], offsets)]


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (4.0, 0.5), (0.25, 2.0)])
def test_arrival_gaps_are_gamma_with_mean_one_over_rate(burstiness, cv):
    """Gaps of a gamma with shape = burstiness: the coefficient of variation is 1/sqrt(shape) (1 for Poisson), and
    the schedule is scaled so the n-th request goes out at n/rate exactly."""
    count, rate = 4000, 8.0
    offsets = workload.arrival_offsets(count, rate, burstiness, seed=3)
    gaps = _gaps(offsets)
    assert offsets[-1] == pytest.approx(count / rate)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.12)
    assert all(g >= 0 for g in gaps) and offsets == sorted(offsets)


def test_arrivals_are_seeded_and_infinite_rate_sends_all_at_once():
    assert workload.arrival_offsets(50, 2.0, 1.0, seed=7) == workload.arrival_offsets(50, 2.0, 1.0, seed=7)
    assert workload.arrival_offsets(50, 2.0, 1.0, seed=7) != workload.arrival_offsets(50, 2.0, 1.0, seed=8)
    assert workload.arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5
    assert _gaps(workload.arrival_offsets(4, 2.0, math.inf, seed=0)) == pytest.approx([0.5] * 4)  # regular


# --- statistics, goodput -------------------------------------------------------------------------------


def test_distribution_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [0.011, 0.5, 0.02, 0.3, 0.25, 0.9, 0.013, 0.7]
    dist = distribution(values, (50, 90, 95, 99, 99.9))
    assert dist.count == 8
    assert dist.mean == pytest.approx(np.mean(values))
    assert dist.median == pytest.approx(np.median(values))
    assert dist.std == pytest.approx(np.std(values))  # population, as vLLM's np.std
    for q, value in dist.percentiles:
        assert value == pytest.approx(np.percentile(values, q))
    assert set(dist.to_ms()) == {"count", "mean", "median", "std", "p50", "p90", "p95", "p99", "p99.9"}
    assert distribution([], (50,)) is None


def record(index=0, *, ok=True, ttft=0.1, e2e=1.0, tokens=10, prompt=5, sent=0.0, itl=(), kind=None):
    return RequestRecord(
        index=index,
        ok=ok,
        sent_s=sent,
        ttft_s=ttft if ok else None,
        e2e_s=e2e if ok else None,
        itl_s=list(itl),
        prompt_tokens=prompt,
        output_tokens=tokens if ok else None,
        output_chunks=tokens if ok else 0,
        usage=ok,
        error_kind=kind,
        error=None if ok else f"{kind} happened",
    )


def test_tpot_and_goodput_follow_vllm():
    fast = record(ttft=0.1, e2e=1.0, tokens=10)  # TPOT 0.1
    slow_start = record(ttft=0.6, e2e=1.5, tokens=10)  # TPOT 0.1, TTFT over
    single = record(ttft=0.2, e2e=0.2, tokens=1)  # no TPOT; counts as 0 for the SLO
    assert fast.tpot_s == pytest.approx(0.1)
    assert single.tpot_s is None
    slo = metrics.parse_slo("ttft:500,tpot:100")
    assert slo == {"ttft": 500.0, "tpot": 100.0}
    assert [meets_slo(r, slo) for r in (fast, slow_start, single)] == [True, False, True]
    assert not meets_slo(record(ok=False, kind="timeout"), slo)
    summary = summarize([fast, slow_start, single, record(ok=False, kind="http_503")], 2.0, percentiles=(99,), slo=slo)
    assert summary.request_goodput == pytest.approx(2 / 2.0)
    assert summary.request_throughput == pytest.approx(3 / 2.0)
    assert summarize([fast], 1.0, percentiles=(99,)).request_goodput is None


def test_summary_counts_tokens_errors_and_peak_concurrency():
    records = [
        record(0, sent=0.0, e2e=1.0, tokens=4, prompt=3, itl=(0.3, 0.3, 0.3)),
        record(1, sent=0.5, e2e=1.0, tokens=6, prompt=7),
        record(2, sent=2.0, e2e=0.5, tokens=2, prompt=1),
        record(3, ok=False, kind="http_503"),
        record(4, ok=False, kind="http_503"),
        record(5, ok=False, kind="timeout"),
    ]
    summary = summarize(records, 4.0, percentiles=(50,), cancelled=1)
    assert (summary.completed, summary.failed, summary.cancelled) == (3, 3, 1)
    assert summary.errors == {"http_503": 2, "timeout": 1}
    assert summary.error_samples["timeout"] == "timeout happened"
    assert (summary.total_input_tokens, summary.total_output_tokens) == (11, 12)
    assert summary.output_throughput == pytest.approx(12 / 4.0)
    assert summary.total_token_throughput == pytest.approx(23 / 4.0)
    assert summary.peak_concurrency == 2  # [0, 1) and [0.5, 1.5) overlap; [2, 2.5) is alone
    assert summary.latency["itl"].count == 3
    unknown = summarize([record(prompt=None)], 1.0, percentiles=(50,))
    assert unknown.total_input_tokens is None and unknown.total_token_throughput is None


@pytest.mark.parametrize("text", ["", "ttft", "ttft:", "speed:5", "ttft:-1", "ttft:0"])
def test_bad_slo_is_a_usage_error(text):
    with pytest.raises(InvalidParams):
        metrics.parse_slo(text)


def test_parsers_of_lengths_percentiles_sweeps_and_urls():
    assert workload.parse_length("64:128", "--input-len") == workload.LengthRange(64, 128)
    assert workload.with_range_ratio(workload.parse_length("100", "x"), 0.5, "x") == workload.LengthRange(50, 150)
    for bad in ("0", "8:4", "abc", "-3"):
        with pytest.raises(InvalidParams):
            workload.parse_length(bad, "--input-len")
    assert metrics.parse_percentiles("50, 99.9,50") == (50.0, 99.9)
    with pytest.raises(InvalidParams):
        metrics.parse_percentiles("0,101")
    assert runner.parse_sweep("max-concurrency=1,4,inf") == ("max_concurrency", [1, 4, None])
    assert runner.parse_sweep("request-rate=0.5,inf") == ("request_rate", [0.5, math.inf])
    for bad in ("concurrency=1", "max-concurrency=0", "request-rate=-1", "max-concurrency="):
        with pytest.raises(InvalidParams):
            runner.parse_sweep(bad)
    endpoint = parse_url("http://host:8000/v1#org/model-7b", "k")
    assert (endpoint.root, endpoint.api_base, endpoint.model) == (
        "http://host:8000",
        "http://host:8000/v1",
        "org/model-7b",
    )
    assert parse_url("https://example.com/openai/v1/").root == "https://example.com/openai"
    assert parse_url("http://127.0.0.1:9").model is None
    for bad in ("ftp://host", "http://", "http://host:99999", "http://host/v1?x=1"):
        with pytest.raises(InvalidParams):
            parse_url(bad)


def test_ceiling_share_takes_the_larger_of_requests_and_chunks():
    ceiling = ClientCeiling(requests_per_s=100.0, chunks_per_s=10_000.0, measured="today", machine="here")
    assert ceiling_share(20.0, 6_000.0, ceiling) == pytest.approx(0.6)
    assert near_ceiling(60.0, 10.0, ceiling) and not near_ceiling(40.0, 4_000.0, ceiling)


# --- SSE ----------------------------------------------------------------------------------------------

STREAM = (
    'data: {"choices": [{"index": 0, "text": "Hé", "finish_reason": null}]}\n\n'
    ": ping\n\n"
    'data: {"choices": [{"index": 0, "text": "llo", "finish_reason": null}]}\r\n\r\n'
    'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'
    'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}\n\n'
    "data: [DONE]\n\n"
).encode()


def parse_in_pieces(data: bytes, size: int) -> list[str]:
    parser = SSEParser()
    events = []
    for start in range(0, len(data), size):
        events += parser.feed(data[start : start + size])
    return events + parser.close()


def test_sse_events_are_the_same_however_the_bytes_are_split():
    whole = parse_in_pieces(STREAM, len(STREAM))
    assert len(whole) == 5 and whole[-1] == "[DONE]"
    assert json.loads(whole[0])["choices"][0]["text"] == "Hé"
    for size in range(1, 12):  # splits inside "data:", inside \r\n, inside the two bytes of é
        assert parse_in_pieces(STREAM, size) == whole


def test_sse_multiline_data_a_last_event_without_blank_line_and_bare_cr():
    assert parse_in_pieces(b"data: a\ndata: b\n\nevent: x\ndata:c\r\rdata: last", 3) == ["a\nb", "c", "last"]


def test_which_choices_carry_output():
    assert choice_output({"text": "a"}) == "a"
    assert choice_output({"text": "", "finish_reason": None}) == ""  # a token that ends inside a UTF-8 character
    assert choice_output({"text": "", "finish_reason": "length"}) is None  # closes only
    assert choice_output({"delta": {"role": "assistant", "content": ""}}) is None  # opens only
    assert choice_output({"delta": {"role": "assistant"}}) is None
    assert choice_output({"delta": {"content": "x"}, "finish_reason": "stop"}) == "x"
    assert choice_output({"delta": {}, "finish_reason": "stop"}) is None
    assert choice_output({"delta": {"reasoning_content": "hmm"}}) == "hmm"


def run_stream(handler, *, timeout_s=5.0):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await stream_request(
                http, "http://test/v1/completions", {"prompt": "x"}, {}, index=0, timeout_s=timeout_s
            )

    return asyncio.run(go()).record


def sse_response(data: bytes, size: int = 5, delay: float = 0.0, status: int = 200):
    async def body():
        for start in range(0, len(data), size):
            if delay:
                await asyncio.sleep(delay)
            yield data[start : start + size]

    return lambda request: httpx.Response(status, headers={"content-type": "text/event-stream"}, content=body())


def test_a_streamed_request_becomes_a_record_with_usage():
    result = run_stream(sse_response(STREAM, delay=0.002))
    assert result.ok and result.usage and result.output_counted_by == "usage"
    assert (result.prompt_tokens, result.output_tokens, result.output_chunks) == (4, 3, 2)
    assert result.text == "Héllo"
    assert 0 < result.ttft_s <= result.e2e_s
    assert len(result.itl_s) == 1 and result.itl_s[0] > 0
    assert result.tpot_s == pytest.approx((result.e2e_s - result.ttft_s) / 2)


def test_without_usage_the_output_is_counted_in_chunks():
    chat = (
        b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": ""}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": "b"}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    result = run_stream(sse_response(chat))
    assert result.ok and not result.usage
    assert (result.output_tokens, result.output_chunks, result.output_counted_by) == (3, 3, "chunks")
    assert result.prompt_tokens is None


def test_failures_are_sorted_by_kind():
    error_event = STREAM.replace(
        b'data: {"choices": [{"index": 0, "text": "llo"',
        b'data: {"error": {"message": "stop", "type": "shutting_down"}}\n\ndata: {"x": [',
    )
    result = run_stream(sse_response(error_event))
    assert (result.ok, result.error_kind) == (False, "stream_error") and "shutting_down" in result.error

    busy = run_stream(
        lambda request: httpx.Response(503, json={"error": {"message": "queue is full", "type": "queue_full"}})
    )
    assert busy.error_kind == "http_503" and "queue_full: queue is full" in busy.error

    def refuse(request):
        raise httpx.ConnectError("connection refused")

    assert run_stream(refuse).error_kind == "connection"
    assert run_stream(sse_response(b"data: [DONE]\n\n")).error_kind == "no_output"
    assert run_stream(sse_response(b"data: {not json\n\n")).error_kind == "protocol"
    slow = run_stream(sse_response(STREAM, size=20, delay=0.2), timeout_s=0.3)
    assert slow.error_kind == "timeout" and not slow.ok


# --- prompts --------------------------------------------------------------------------------------------


class CharTokenizer:
    """A fake server tokenizer: one token per character, and a BOS before every text."""

    async def encode(self, text):
        return [0] + [ord(c) for c in text]

    async def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


def test_token_prompts_have_the_length_asked_and_follow_the_seed():
    def build(seed):
        return asyncio.run(
            workload.build_token_prompts(
                CharTokenizer(), 20, workload.LengthRange(5, 9), workload.LengthRange(3, 3), seed
            )
        )

    prompts = build(1)
    assert all(5 <= p.prompt_tokens <= 9 and len(p.text) == p.prompt_tokens for p in prompts)
    assert {p.max_tokens for p in prompts} == {3}
    assert [p.text for p in prompts] == [p.text for p in build(1)]
    assert [p.text for p in prompts] != [p.text for p in build(2)]


def test_word_prompts_are_sized_by_tokens_per_word():
    prompts = workload.build_word_prompts(
        10, workload.LengthRange(30, 30), workload.LengthRange(4, 8), seed=0, tokens_per_word=1.5
    )
    assert all(len(p.text.split()) == 20 and 4 <= p.max_tokens <= 8 and p.prompt_tokens is None for p in prompts)


def test_dataset_lines_and_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Hello", "max_tokens": 5}\n\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    prompts = workload.read_dataset(good, 7)
    assert [(p.text, p.max_tokens) for p in prompts] == [("Hello", 5), (None, 7)]
    assert prompts[1].body("chat") == {"messages": [{"role": "user", "content": "Hi"}]}
    assert workload.resolve_api(None, prompts) == "chat"
    with pytest.raises(InvalidParams, match="--api chat"):
        workload.resolve_api("completions", prompts)
    assert [p.max_tokens for p in workload.cycle_to(prompts, 5)] == [5, 7, 5, 7, 5]
    for text, message in (
        ("not json\n", "line 1 is not JSON"),
        ('{"prompt": 3}\n', "non-empty string"),
        ('{"prompt": "a", "n": 2}\n', "unknown keys: n"),
        ("[1]\n", "JSON object"),
        ('{"prompt": "a", "max_tokens": 0}\n', "max_tokens"),
        ("\n", "no prompts"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(InvalidParams, match=re.escape(message)):
            workload.read_dataset(bad, 7)


# --- the command line, before anything runs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["ftp://host"], "must start with http:// or https://"),
        (["http://127.0.0.1:1", "--sweep", "speed=1,2"], "--sweep must be AXIS="),
        (["http://127.0.0.1:1", "--json", "--csv"], "either --json or --csv"),
        (["http://127.0.0.1:1", "--threads", "2"], "configure the llmkit serve that bench starts"),
        (["http://127.0.0.1:1", "--request-rate", "fast"], "--request-rate must be a number"),
        (["no-such-model-anywhere/x.gguf"], "no such file or folder"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(cli, args, message):
    result = cli("bench", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_dataset_that_is_not_jsonl_exits_2(cli, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("Hello\nWorld\n")
    result = cli("bench", "http://127.0.0.1:1", "--dataset", str(data))
    assert result.exit_code == 2
    assert "line 1 is not JSON" in result.output


def test_nothing_listening_exits_1_with_one_line(cli):
    result = cli("bench", f"http://127.0.0.1:{free_port()}/v1")
    assert result.exit_code == 1, result.output
    assert "connection refused" in result.output and result.output.count("\n") == 1


# --- against llmkit serve ---------------------------------------------------------------------------------

TOP_KEYS, POINT_KEYS, LATENCY_KEYS, REQUEST_KEYS = "The document", "A point", "A latency", "A request (`--detailed`)"


def documented_keys() -> dict[str, set[str]]:
    """The keys of each table under docs/bench.md's "JSON schema", by the heading above the table."""
    text = (ROOT / "docs" / "bench.md").read_text(encoding="utf-8")
    schema = text.split("## JSON schema", 1)[1]
    tables: dict[str, set[str]] = {}
    heading = None
    for line in schema.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
        match = re.match(r"\| `([^`]+)` \|", line)
        if match and heading:
            tables.setdefault(heading, set()).add(match.group(1))
    return tables


@pytest.fixture(scope="module")
def serve(tiny_model_dir, tmp_path_factory):
    with ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("bench") / "serve.log",
        "--max-batch-size",
        "4",
        env={"LLMKIT_API_KEY": API_KEY},
    ) as process:
        yield process


@pytest.fixture()
def keyless(monkeypatch):
    for name in bench_client.API_KEY_ENVS:
        monkeypatch.delenv(name, raising=False)


def bench_json(cli, *args) -> dict:
    result = cli("bench", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_bookkeeping(document: dict) -> None:
    """Every request counted once; token totals are the sums of the requests'; TTFT <= E2E for each."""
    for point in document["points"]:
        assert point["completed"] + point["failed"] + point["cancelled"] == document["workload"]["num_prompts"]
        done = [r for r in point["requests"] if r["ok"]]
        assert len(done) == point["completed"] and len(point["requests"]) == document["workload"]["num_prompts"]
        assert point["total_output_tokens"] == sum(r["output_tokens"] for r in done)
        if point["total_input_tokens"] is not None:
            assert point["total_input_tokens"] == sum(r["prompt_tokens"] for r in done)
        assert all(r["ttft_ms"] <= r["e2e_ms"] for r in done)
        assert point["output_chunks"] == sum(r["output_chunks"] for r in done)
        assert point["ttft_ms"]["count"] == point["completed"]


def test_bench_against_llmkit_serve(cli, serve, keyless):
    document = bench_json(
        cli,
        serve.url + "/v1",
        "--api-key",
        API_KEY,
        "--num-prompts",
        "10",
        "--max-concurrency",
        "3",
        *SMALL,
        "--slo",
        "ttft:60000,e2e:60000",
        "--detailed",
    )
    check_bookkeeping(document)
    point = document["points"][0]
    assert point["completed"] == 10 and point["failed"] == 0
    server = document["server"]
    assert server["ignore_eos"] == "refused by the server, not sent" and server["usage"] is True  # extra="forbid"
    if server["tokenizer"] is not None:  # llmkit serve's /tokenize (vLLM's shape): prompts built to the length
        assert server["tokenizer"] == "vLLM"
        assert all(r["prompt_tokens"] == 12 for r in point["requests"])
    assert point["token_counts"] == {"input": "usage", "output": "usage"}
    assert all(r["usage"] for r in point["requests"])
    assert point["request_goodput"] == pytest.approx(point["request_throughput"], rel=0.01)
    assert 1 <= point["peak_concurrency"] <= 3
    assert document["target"]["kind"] == "url" and isinstance(document["target"]["model"], str)

    keys = documented_keys()
    assert set(document) == keys[TOP_KEYS]
    assert set(point) == keys[POINT_KEYS]
    assert set(point["ttft_ms"]) == (keys[LATENCY_KEYS] - {"p90"}) | {"p90", "p95", "p99"}
    assert set(point["requests"][0]) == keys[REQUEST_KEYS]
    assert document["schema_version"] == 1


def test_bench_sweep_table_csv_and_plot(cli, serve, keyless, tmp_path):
    pytest.importorskip("matplotlib")
    args = [
        serve.url,
        "--api-key",
        API_KEY,
        "--num-prompts",
        "4",
        *SMALL,
        "--sweep",
        "max-concurrency=1,4",
        "--api",
        "chat",
    ]
    table = cli("bench", *args, "--plot", str(tmp_path / "sweep.png"))
    assert table.exit_code == 0, table.output
    assert "llmkit bench" in table.stdout and "chat API" in table.stdout
    rows = [line.split() for line in table.stdout.splitlines() if re.match(r"^\s+(1|4)\s+inf\s", line)]
    assert [row[0] for row in rows] == ["1", "4"] and all(row[2] == "4" for row in rows)
    assert (tmp_path / "sweep.png").stat().st_size > 1000

    csv = cli("bench", *args, "--csv")
    lines = csv.stdout.strip().splitlines()
    assert lines[0].startswith("label,max_concurrency,request_rate") and len(lines) == 3
    assert "ttft_ms_p99" in lines[0]


def test_a_missing_key_and_an_unknown_model_exit_2(cli, serve, keyless):
    refused = cli("bench", serve.url)
    assert refused.exit_code == 2 and "--api-key" in refused.output
    unknown = cli("bench", serve.url + "/v1#no-such-model", "--api-key", API_KEY)
    assert unknown.exit_code == 2 and "'no-such-model' is not served" in unknown.output


def test_a_point_near_the_clients_ceiling_is_warned_about(cli, serve, keyless, monkeypatch):
    from llmkit.bench import ceiling

    monkeypatch.setattr(
        ceiling,
        "CLIENT_CEILING",
        ClientCeiling(requests_per_s=2.0, chunks_per_s=10.0, measured="2026-12-01", machine="toy"),
    )
    result = cli("bench", serve.url, "--api-key", API_KEY, "--num-prompts", "3", *SMALL)
    assert result.exit_code == 0, result.output
    assert "of what this client can drive" in result.stderr and "toy" in result.stderr


def test_plot_without_matplotlib_fails_before_anything_runs(cli, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = cli("bench", f"http://127.0.0.1:{free_port()}", "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and "--plot needs matplotlib: pip install" in result.output


def test_ctrl_c_prints_the_partial_results(serve, keyless):
    command = [
        sys.executable,
        "-m",
        "llmkit",
        "bench",
        serve.url,
        "--num-prompts",
        "40",
        "--request-rate",
        "4",
        *SMALL,
        "--json",
    ]
    env = {**os.environ, "LLMKIT_API_KEY": API_KEY}
    env.pop("LLMKIT_NO_PROGRESS", None)  # a log gets one line as each point starts: the cue for Ctrl-C
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    first = process.stderr.readline()
    assert first.startswith("point 1: "), first
    time.sleep(2.0)  # about 8 of the 40 requests, 4 a second
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    document = json.loads(stdout)
    point = document["points"][0]
    assert document["interrupted"] and point["interrupted"]
    assert 0 < point["completed"] < 40
    assert point["completed"] + point["failed"] + point["cancelled"] == 40
    assert "interrupted: these are partial results" in stderr


# --- bench starts its own server --------------------------------------------------------------------------


def test_bench_a_model_starts_and_stops_llmkit_serve(cli, tiny_model_dir, keyless):
    document = bench_json(cli, str(tiny_model_dir), "--num-prompts", "3", *SMALL, "--max-batch-size", "2", "--detailed")
    check_bookkeeping(document)
    target = document["target"]
    assert target["kind"] == "llmkit serve" and target["started_by_bench"]
    assert "--max-batch-size 2" in target["command"] and "--max-queue 3" in target["command"]
    assert target["health"]["max_batch_size"] == 2
    port = int(re.search(r"--port (\d+)", target["command"]).group(1))
    with pytest.raises(httpx.TransportError):  # stopped after the run
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


# --- against llama-cpp-python's server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    gguf = write_tiny_gguf(tmp_path_factory.mktemp("bench-gguf") / "tiny.gguf")
    log = tmp_path_factory.mktemp("bench-llama") / "server.log"
    # one request at a time, and no interrupting a stream when the next request arrives (its default)
    with llama_cpp_server(gguf, log, "--interrupt_requests", "False", "--n_ctx", "256") as url:
        yield url


def test_bench_against_llama_cpp_python_server(cli, llama_server, keyless):
    document = bench_json(
        cli, llama_server + "/v1", "--num-prompts", "6", "--max-concurrency", "2", *SMALL, "--detailed"
    )
    check_bookkeeping(document)
    point = document["points"][0]
    assert point["completed"] == 6
    assert document["server"] == {"tokenizer": "llama-cpp-python", "ignore_eos": "sent", "usage": False}
    assert document["workload"]["prompt_builder"] == "random tokens (llama-cpp-python tokenizer)"
    assert all(r["prompt_tokens"] == 12 for r in point["requests"])  # built to the length with its tokenizer
    assert {r["output_counted_by"] for r in point["requests"]} == {"tokenizer"}
    assert point["token_counts"] == {"input": "llama-cpp-python tokenizer", "output": "llama-cpp-python tokenizer"}
    assert any("no usage" in note for note in document["notes"])


def test_the_server_tokenizer_retries_once_a_connection_the_server_closed():
    """llama-server closes idle keep-alive connections; a (de)tokenize call that meets one is sent again."""
    from llmkit.bench.client import ServerTokenizer, parse_url
    from llmkit.errors import EndpointUnreachable

    calls = []

    def handler(closing: int):
        def answer(request):
            calls.append(request.url.path)
            if len(calls) <= closing:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            return httpx.Response(200, json={"tokens": [1, 2, 3]})

        return answer

    async def encode(closing: int):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler(closing))) as http:
            tokenizer = ServerTokenizer(http, parse_url("http://test/v1"), ServerTokenizer.SHAPES[0])
            return await tokenizer.encode("hello")

    assert asyncio.run(encode(1)) == [1, 2, 3] and len(calls) == 2
    calls.clear()
    with pytest.raises(EndpointUnreachable):
        asyncio.run(encode(2))
    assert len(calls) == 2
