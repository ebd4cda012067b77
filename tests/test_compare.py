"""llmkit compare: two tiny models and two bad references, each in its own worker process."""

import csv
import io
import json
import math
import os

import pytest
import torch

from llmkit.compare import CompareSpec, perplexity_of, sliding_windows
from tests.conftest import build_tiny_model

SHORT_TEXT = "The sea at night is dark and quiet. A small model writes a few words."
LONG_TEXT = " ".join(["Once upon a time there was a little model that lived in a file on a laptop."] * 12)


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("second") / "tiny-3-layers", seed=1, layers=3)


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken") / "raises-at-load"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    return folder


@pytest.fixture(scope="module")
def compared(tiny_model_dir, second_model, broken_model, tmp_path_factory):
    """One real compare run (the CLI, JSON output) shared by the tests below."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    text_file = tmp_path_factory.mktemp("text") / "short.txt"
    text_file.write_text(SHORT_TEXT)
    models = [str(tiny_model_dir), str(second_model), str(broken_model), "/no/such/model.gguf"]
    result = CliRunner().invoke(
        app,
        [
            "compare",
            *models,
            "--runs",
            "2",
            "--warmup",
            "0",
            "--max-new-tokens",
            "5",
            "--text-file",
            str(text_file),
            "--format",
            "json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def direct_nll(model_dir, text, window=None, stride=None):
    """Total NLL and predicted-token count computed here, straight from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    window = window or len(ids)
    stride = stride or window
    scored = set()
    total = 0.0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            chunk = torch.tensor([ids[begin : begin + window]])
            logprobs = torch.log_softmax(model(chunk).logits[0].float(), dim=-1)
            for offset in range(1, chunk.shape[1]):
                position = begin + offset
                if position not in scored:
                    scored.add(position)
                    total -= logprobs[offset - 1, ids[position]].item()
            if begin + window >= len(ids):
                break
    assert scored == set(range(1, len(ids)))
    return total, len(scored)


def test_rows_and_errors(compared, tiny_model_dir, second_model, broken_model):
    rows = {row["model"]: row for row in compared["rows"]}
    assert list(rows) == [str(tiny_model_dir), str(second_model), str(broken_model), "/no/such/model.gguf"]
    good = [rows[str(tiny_model_dir)], rows[str(second_model)]]
    assert all(row["ok"] for row in good)
    assert good[0]["parameters"] < good[1]["parameters"]  # the second has 3 layers
    for row in good:
        assert row["ttft_s"] > 0 and row["peak_rss_bytes"] > 0 and row["disk_bytes"] > 0
        assert row["load_s"] > 0 and row["sample"] is not None
        assert row["perplexity"] > 1 and row["bits_per_byte"] > 0
    assert max(row["relative_speed"] for row in good) == 1.0
    assert not rows[str(broken_model)]["ok"] and "cannot load" in rows[str(broken_model)]["error"]
    assert not rows["/no/such/model.gguf"]["ok"] and "no such file" in rows["/no/such/model.gguf"]["error"]


def test_each_model_ran_in_its_own_process(compared):
    pids = [row["worker_pid"] for row in compared["rows"] if row["ok"]]
    assert len(set(pids)) == len(pids) == 2
    assert os.getpid() not in pids


def test_perplexity_and_bits_per_byte_match_a_direct_computation(compared, tiny_model_dir):
    row = next(r for r in compared["rows"] if r["model"] == str(tiny_model_dir))
    total, predicted = direct_nll(tiny_model_dir, SHORT_TEXT)
    assert row["scoring"]["predicted_tokens"] == predicted
    assert row["perplexity"] == pytest.approx(math.exp(total / predicted), rel=1e-4)
    assert row["bits_per_byte"] == pytest.approx(total / math.log(2) / len(SHORT_TEXT.encode()), rel=1e-4)


def test_sliding_window_on_a_text_longer_than_the_context(tiny_engine, tiny_model_dir):
    assert len(tiny_engine.tokenizer(LONG_TEXT)["input_ids"]) > tiny_engine.info.context_length
    scored = perplexity_of(tiny_engine, LONG_TEXT, window=64, stride=24)
    assert scored.windows > 1
    total, predicted = direct_nll(tiny_model_dir, LONG_TEXT, window=64, stride=24)
    assert scored.predicted_tokens == predicted
    assert scored.nll_nats == pytest.approx(total, rel=1e-4)
    # the window is capped at the model's context, so a huge --window still works
    capped = perplexity_of(tiny_engine, LONG_TEXT, window=10_000, stride=5_000)
    assert capped.window == tiny_engine.info.context_length and capped.windows > 1


def test_sliding_windows_count_every_position_once():
    for length, window, stride in [(10, 4, 2), (100, 32, 16), (5, 8, 4), (33, 10, 9)]:
        counted = []
        for begin, end, new in sliding_windows(length, window, stride):
            assert end - begin <= window and new <= end - begin - (1 if begin == 0 else 0) + (begin > 0)
            counted.extend(range(end - new, end))
        assert counted == list(range(1, length))


def test_every_format_parses(compared, tiny_model_dir, second_model):
    from llmkit.cli import render

    spec = CompareSpec(models=tuple(r["model"] for r in compared["rows"]), text="x")
    rows = compared["rows"]
    records = list(csv.DictReader(io.StringIO(render.compare_output(rows, spec, "csv", to_file=True))))
    assert [r["model"] for r in records] == [r["model"] for r in rows]
    assert records[0]["ok"] == "True" and records[3]["error"]
    markdown = render.compare_output(rows, spec, "markdown", to_file=True).splitlines()
    assert markdown[0].startswith("| model |") and markdown[1].startswith("|---|")
    assert sum(1 for line in markdown if line.startswith("| ") and str(tiny_model_dir) in line) == 1
    assert any("Failed" in line for line in markdown)
    table = render.compare_output(rows, spec, "table", to_file=True)
    assert "perplexity" in table and "failed:" in table
    assert json.loads(render.compare_output(rows, spec, "json", to_file=True))["rows"] == rows


def test_table_output_file_and_plot(cli, tiny_model_dir, tmp_path):
    report, plot = tmp_path / "report.md", tmp_path / "compare.png"
    result = cli(
        "compare",
        str(tiny_model_dir),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--max-new-tokens",
        "3",
        "--format",
        "markdown",
        "--output",
        str(report),
        "--plot",
        str(plot),
    )
    assert result.exit_code == 0, result.stderr
    assert report.read_text().startswith("| model |")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_exit_1_when_every_model_fails(cli, tmp_path):
    result = cli("compare", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "--runs", "1")
    assert result.exit_code == 1
    assert result.stdout == ""  # no empty table: nothing was compared
    failures = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(failures) == 2 and "a.gguf" in failures[0] and "b.gguf" in failures[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "runs must be at least 1"),
        (["--warmup", "-2"], "warmup must be at least 0"),
        (["--window", "1"], "window must be at least 2"),
        (["--window", "16", "--stride", "16"], "stride must be between 1 and window - 1"),
        (["--format", "xml"], "format must be one of"),
        (["--max-new-tokens", "0"], "max_new_tokens must be between 1"),
        (["--prompt", " "], "the prompt is empty"),
    ],
)
def test_bad_arguments_exit_2_before_loading(cli, tmp_path, args, message):
    result = cli("compare", "gemma3-270m", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_empty_text_file(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = cli("compare", "gemma3-270m", "--text-file", str(empty))
    assert result.exit_code == 2 and "is empty" in result.stderr


def test_a_hub_models_disk_size_is_its_cached_snapshot(tmp_path, monkeypatch):
    """compare's disk column for a Hub id: the snapshot folder in the local Hugging Face cache (files behind
    symlinks counted), and unknown (None) when the id is not cached."""
    import huggingface_hub.constants

    from llmkit.compare import _disk_bytes
    from llmkit.models import resolve

    repo = tmp_path / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "blobs").mkdir()
    (repo / "blobs" / "weights").write_bytes(b"x" * 1000)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(repo / "blobs" / "weights")
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert _disk_bytes(resolve("someone/tiny")) == 1002
    assert _disk_bytes(resolve("someone/absent")) is None
