"""llmkit monitor and llmkit/measure.py: relations that must hold, never timings."""

import csv
import json
import threading

import pytest

from llmkit.measure import ResourceSampler, percentile, run_latency, summarize
from llmkit.monitor import PHASES, MonitorSpec, run_monitor
from llmkit.params import parse_params

SAMPLER_THREAD = "llmkit-sampler"


def sampler_threads():
    return [t for t in threading.enumerate() if t.name == SAMPLER_THREAD]


def test_summary_statistics_by_hand():
    stats = summarize([4.0, 1.0, 3.0, 2.0, None])
    assert (stats.count, stats.mean, stats.median, stats.min, stats.max) == (4, 2.5, 2.5, 1.0, 4.0)
    assert stats.p95 == pytest.approx(3.85)  # 1 + (4 - 1) * 0.95 ranks, linear interpolation
    assert stats.stddev == pytest.approx(1.2909944)
    assert percentile([10.0], 95) == 10.0
    assert summarize([None]) is None


def test_run_latency_definitions():
    latency = run_latency(prompt_tokens=10, token_times_s=[0.5, 0.6, 0.8, 1.0], e2e_s=1.1)
    assert latency.ttft_s == 0.5
    assert latency.generated_tokens == 4
    assert latency.pp_tokens_per_s == pytest.approx(20.0)
    assert latency.tg_tokens_per_s == pytest.approx(3 / 0.5)
    assert latency.tpot_s == pytest.approx((1.1 - 0.5) / 3)
    assert latency.itl_s == pytest.approx((0.1, 0.2, 0.2))
    single = run_latency(prompt_tokens=3, token_times_s=[0.2], e2e_s=0.25)
    assert single.tg_tokens_per_s is None and single.tpot_s is None and single.itl_s == ()


def test_engine_token_counts_match_the_decoded_ids(tiny_engine):
    result = tiny_engine.generate("hello", parse_params(greedy=True, max_new_tokens=12))
    latency = run_latency(result.usage.prompt_tokens, result.timings.token_times_s, result.timings.total_s)
    assert latency.generated_tokens == len(result.completions[0].token_ids) == result.usage.completion_tokens
    assert latency.ttft_s <= latency.e2e_s


def test_sampler_stops_even_when_the_block_fails():
    with pytest.raises(RuntimeError):
        with ResourceSampler(interval_s=0.01) as sampler:
            sampler.phase("work")
            assert sampler.running and sampler_threads()
            raise RuntimeError("boom")
    assert not sampler.running
    assert sampler_threads() == []
    assert sampler.phases[-1].end_s is not None


@pytest.fixture(scope="module")
def report(tiny_model_dir):
    spec = MonitorSpec(model=str(tiny_model_dir), prompt="Once upon a time", runs=3, warmup=1, max_new_tokens=8)
    with ResourceSampler() as sampler:
        result = run_monitor(spec, sampler)
    return result


def test_monitor_relations(report):
    document = report.to_dict()
    assert sampler_threads() == []
    assert [p["name"] for p in document["phases"]] == list(PHASES)
    memory = document["memory"]
    assert memory["rss_peak_inference_bytes"] >= memory["rss_after_load_bytes"] > 0
    assert memory["rss_peak_load_bytes"] >= memory["rss_before_load_bytes"] > 0
    assert len(document["runs"]) == 3
    for run in document["runs"]:
        assert 0 < run["ttft_s"] <= run["e2e_s"]
        assert 1 <= run["generated_tokens"] <= 8
        assert len(run["itl_s"]) == run["generated_tokens"] - 1
        assert run["prompt_tokens"] == document["config"]["prompt_tokens"]
    assert document["summary"]["ttft_s"]["count"] == 3
    assert document["sampler"]["samples"] > len(PHASES)


def test_json_schema_is_stable(report):
    document = json.loads(json.dumps(report.to_dict()))
    assert set(document) == {
        "schema",
        "model",
        "environment",
        "config",
        "import_already_done",
        "phases",
        "memory",
        "runs",
        "summary",
        "definitions",
        "machine_load",
        "sampler",
    }
    assert document["schema"] == "llmkit.monitor/1"
    assert set(document["machine_load"]) == {
        "cores",
        "threads",
        "load_average",
        "steal_percent",
        "others_load",
        "free_cores",
        "busy",
        "reason",
    }
    assert set(document["summary"]) == {
        "ttft_s",
        "pp_tokens_per_s",
        "tg_tokens_per_s",
        "tpot_s",
        "itl_s",
        "e2e_s",
        "generated_tokens",
    }
    assert set(document["summary"]["ttft_s"]) == {"count", "mean", "median", "p95", "stddev", "min", "max"}
    assert {
        "llmkit",
        "torch",
        "transformers",
        "device",
        "dtype",
        "torch_threads",
        "cpu_model",
        "memory_total_bytes",
    } <= set(document["environment"])
    assert set(document["definitions"]) >= {"ttft_s", "tpot_s", "itl_s", "e2e_s", "pp_tokens_per_s", "tg_tokens_per_s"}


def test_cli_json_timeline_and_plot(cli, tiny_model_dir, tmp_path):
    timeline, plot = tmp_path / "t.csv", tmp_path / "m.png"
    result = cli(
        "monitor",
        "-m",
        str(tiny_model_dir),
        "--runs",
        "2",
        "--warmup",
        "0",
        "--max-new-tokens",
        "4",
        "--json",
        "--timeline",
        str(timeline),
        "--plot",
        str(plot),
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["config"]["runs"] == 2
    rows = list(csv.DictReader(timeline.open()))
    times = [float(r["t_s"]) for r in rows]
    assert times == sorted(times)
    assert {r["phase"] for r in rows} >= set(PHASES)
    assert all(int(r["rss_bytes"]) > 0 for r in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table(cli, tiny_model_dir):
    result = cli("monitor", "-m", str(tiny_model_dir), "--runs", "1", "--warmup", "0", "--max-new-tokens", "3")
    assert result.exit_code == 0
    for text in (
        "Phases",
        "inference",
        "TTFT",
        "tg tok/s",
        "generated tokens per second",
        "llama-bench",
        "vLLM",
        "peak RSS",
    ):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "runs must be between 1"),
        (["--warmup", "-1"], "warmup must be at least 0"),
        (["--prompt", "  "], "the prompt is empty"),
        (["--device", "tpu"], "device must be"),
    ],
)
def test_bad_input_fails_before_loading(cli, tmp_path, args, message):
    result = cli("monitor", "-m", str(tmp_path / "missing.gguf"), *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_empty_prompt_file(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = cli("monitor", "-m", str(tmp_path / "missing.gguf"), "--prompt-file", str(empty))
    assert result.exit_code == 2 and "is empty" in result.stderr
