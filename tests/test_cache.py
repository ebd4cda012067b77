"""`llmkit cache`: the listing, and --clean removing only what llmkit can make again, in a private cache.

A chunked alias ("fake-tiny", joined from a part package, like gemma3-270m) is built here from the tiny
GGUF file as two small packages on sys.path, so the joined file and its conversion are real, and a
cleaned cache is rebuilt by a real load. Every test writes under the `cache_dir` fixture's folder only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmkit import models
from tests.tiny_gguf import start_conversion_held_mid_write, write_tiny_gguf

ALIAS = "fake-tiny"


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under a folder with its size: what must stay untouched."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.fixture()
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "outside" / "tiny.gguf")


@pytest.fixture()
def chunked_alias(tmp_path, tiny_gguf, monkeypatch):
    """An alias whose GGUF file is joined from a part package into the cache, as gemma3-270m's is."""
    site = tmp_path / "site"
    part = site / "fake_tiny_part1"
    (part / "data").mkdir(parents=True)
    (part / "__init__.py").write_text("")
    (part / "data" / "tiny.gguf.part1").write_bytes(tiny_gguf.read_bytes())
    main = site / "fake_tiny_main"
    main.mkdir()
    (main / "__init__.py").write_text(
        textwrap.dedent("""
        from pathlib import Path

        def assemble(target, overwrite=False):
            import fake_tiny_part1
            data = Path(fake_tiny_part1.__file__).parent / "data" / "tiny.gguf.part1"
            Path(target).write_bytes(data.read_bytes())
    """)
    )
    monkeypatch.syspath_prepend(str(site))
    alias = models.Alias(
        name=ALIAS,
        package="fake_tiny_main",
        pip_name="fake-tiny",
        install_hint="pip install fake-tiny",
        description="a tiny joined model",
        licence="none",
        gguf_name="fake-tiny.gguf",
        chunk_packages=("fake_tiny_part1",),
    )
    monkeypatch.setitem(models.ALIASES, ALIAS, alias)
    return alias


def load_alias() -> Path:
    return models.local_folder(models.resolve(ALIAS))


def by_name(entries) -> dict[str, models.CacheEntry]:
    return {e.name: e for e in entries}


def test_listing_says_what_uses_each_entry(cache_dir, chunked_alias, tiny_gguf):
    assert models.cache_entries() == []
    alias_folder = load_alias()
    gguf_folder = models.convert_gguf(tiny_gguf)
    entries = by_name(models.cache_entries())
    joined = entries[f"gguf/{chunked_alias.gguf_name}"]
    assert (joined.kind, joined.used_by, joined.removable) == ("joined-gguf", ALIAS, True)
    assert joined.bytes == tiny_gguf.stat().st_size
    alias_conversion = entries[f"converted/{alias_folder.name}"]
    assert (alias_conversion.kind, alias_conversion.used_by, alias_conversion.removable) == ("conversion", ALIAS, True)
    assert alias_conversion.bytes == models.folder_bytes(alias_folder)
    plain = entries[f"converted/{gguf_folder.name}"]
    assert plain.used_by == str(tiny_gguf) and plain.removable
    assert len(entries) == 3


def test_clean_removes_what_is_rebuilt_and_the_next_load_rebuilds_it(cache_dir, chunked_alias, tiny_gguf):
    from llmkit.engine import load_engine
    from llmkit.params import parse_params

    load_alias()
    outside = snapshot(tiny_gguf.parent)
    preview = models.clean_cache(dry_run=True)
    assert len(preview.removed) == 2 and preview.freed_bytes > 0
    assert len(models.cache_entries()) == 2  # a dry run removes nothing
    result = models.clean_cache()
    assert [e.name for e in result.removed] == [e.name for e in preview.removed]
    assert result.freed_bytes == preview.freed_bytes
    assert models.cache_entries() == [] and not result.failed
    assert snapshot(tiny_gguf.parent) == outside  # the source beside the cache is untouched
    engine = load_engine(ALIAS)  # joined and converted again
    assert engine.generate("hello", parse_params(greedy=True, max_new_tokens=3)).usage.completion_tokens > 0
    assert {e.kind for e in models.cache_entries()} == {"joined-gguf", "conversion"}


def test_clean_keeps_what_it_cannot_rebuild(cache_dir, chunked_alias, tiny_gguf, tmp_path, monkeypatch):
    load_alias()
    # a conversion whose source GGUF is gone: it may be the last copy
    lone = tmp_path / "outside" / "lone.gguf"
    write_tiny_gguf(lone, seed=3)
    orphan = models.convert_gguf(lone)
    lone.unlink()
    # a file and a folder llmkit did not write
    (cache_dir / "notes.txt").write_text("mine")
    (cache_dir / "converted" / "my-own-folder").mkdir()
    # a conversion folder that is a symlink to a folder outside the cache
    elsewhere = tmp_path / "outside" / "kept-model"
    elsewhere.mkdir()
    (elsewhere / models.CONVERSION_MARKER).write_text(json.dumps({"source": str(tiny_gguf)}))
    (elsewhere / "model.safetensors").write_bytes(b"0" * 1000)
    link = cache_dir / "converted" / "linked-0123456789abcdef-v2"
    link.symlink_to(elsewhere, target_is_directory=True)
    outside = snapshot(tmp_path / "outside")
    packages = snapshot(tmp_path / "site")
    # the alias's packages gone: its joined file cannot be joined again
    monkeypatch.setattr(models, "alias_installed", lambda alias: False)

    result = models.clean_cache()
    kept = by_name(result.kept)
    assert f"converted/{orphan.name}" in kept and "is gone" in kept[f"converted/{orphan.name}"].reason
    assert kept["notes.txt"].kind == "unknown" and "converted/my-own-folder" in kept
    assert "cannot be joined again" in kept[f"gguf/{chunked_alias.gguf_name}"].reason
    assert orphan.is_dir() and (cache_dir / "notes.txt").is_file() and (cache_dir / "gguf").is_dir()
    assert "converted/linked-0123456789abcdef-v2" in {e.name for e in result.removed}
    assert not link.exists() and snapshot(tmp_path / "outside") == outside  # only the link went
    assert snapshot(tmp_path / "site") == packages


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_entries_of_live_processes_are_kept(cache_dir, chunked_alias):
    joined = models.assemble_alias(chunked_alias)
    converted = cache_dir / "converted"
    converted.mkdir()
    stem = joined.name[: -len(".gguf")]
    live = converted / f"{models.STAGING_PREFIX}{os.getpid()}-abcd1234-{stem}-0123456789abcdef-v2"
    live.mkdir()
    (live / "config.json").write_text("{}")
    dead = converted / f"{models.STAGING_PREFIX}{dead_pid()}-abcd1234-other-0123456789abcdef-v2"
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    old_style = joined.parent / f"{models.STAGING_PREFIX}{'f' * 32}-fake-tiny.gguf"  # no pid in older names
    old_style.write_bytes(b"partial")
    abandoned = joined.parent / f"{models.STAGING_PREFIX}{'e' * 32}-old.gguf"
    abandoned.write_bytes(b"partial")
    os.utime(abandoned, (1, 1))

    result = models.clean_cache()
    kept, removed = by_name(result.kept), {e.name for e in result.removed}
    assert f"converted/{live.name}" in kept and "being written" in kept[f"converted/{live.name}"].reason
    assert f"gguf/{old_style.name}" in kept  # recent, so perhaps still being joined
    # the joined file a running conversion reads stays
    assert "in progress" in kept[f"gguf/{joined.name}"].reason and joined.is_file()
    assert removed == {f"converted/{dead.name}", f"gguf/{abandoned.name}"}
    assert live.is_dir() and not dead.exists() and not abandoned.exists()


def test_a_conversion_in_progress_in_another_process_survives_clean(cache_dir, tiny_gguf, cli):
    """A real converting process (held mid-write) and a real `llmkit cache --clean` beside it."""
    proc = start_conversion_held_mid_write(tiny_gguf, cache_dir)
    try:
        staging = next((cache_dir / "converted").iterdir())
        result = cli("cache", "--clean")
        assert result.exit_code == 0, result.stderr
        assert staging.is_dir() and f"kept converted/{staging.name}" in result.stdout
        assert "being written by pid" in result.stdout
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    result = cli("cache", "--clean")  # its process is gone: a leftover now
    assert f"removed converted/{staging.name}" in result.stdout and not staging.exists()


def test_cli_listing_clean_dry_run_and_json(cache_dir, chunked_alias, cli):
    folder = load_alias()
    listing = cli("cache")
    assert listing.exit_code == 0
    assert f"converted/{folder.name}" in listing.stdout and f"gguf/{chunked_alias.gguf_name}" in listing.stdout
    assert f"safetensors conversion for {ALIAS}" in listing.stdout
    document = json.loads(cli("cache", "--json").stdout)
    assert document["cache_dir"] == str(cache_dir)
    assert document["total_bytes"] == document["removable_bytes"] == sum(e["bytes"] for e in document["entries"]) > 0
    assert {e["kind"] for e in document["entries"]} == {"conversion", "joined-gguf"}
    assert {p["alias"] for p in document["packages"]} >= {ALIAS}

    dry = cli("cache", "--clean", "--dry-run")
    assert dry.exit_code == 0 and "Would remove 2 entries" in dry.stdout and "would remove converted/" in dry.stdout
    assert folder.is_dir()
    dry_json = json.loads(cli("cache", "--dry-run", "--json").stdout)
    assert dry_json["dry_run"] is True and dry_json["freed_bytes"] == document["removable_bytes"]

    cleaned = json.loads(cli("cache", "--clean", "--json").stdout)
    assert cleaned["dry_run"] is False and cleaned["freed_bytes"] == document["removable_bytes"]
    assert {e["name"] for e in cleaned["removed"]} == {e["name"] for e in document["entries"]}
    assert not folder.exists() and json.loads(cli("cache", "--json").stdout)["entries"] == []
    assert "Removed 0 entries, freed 0 B" in cli("cache", "--clean").stdout


def test_models_shows_the_cache_total(cache_dir, chunked_alias, cli):
    load_alias()
    total = sum(e.bytes for e in models.cache_entries())
    document = json.loads(cli("models", "--json").stdout)
    assert document["cache_bytes"] == document["cache_removable_bytes"] == total > 0
    from llmkit.cli.render import human_bytes

    assert f"{human_bytes(total)} in all" in cli("models").stdout


def test_cache_cli_in_a_subprocess(cache_dir, tiny_gguf):
    models.convert_gguf(tiny_gguf)
    env = {**os.environ, "LLMKIT_CACHE_DIR": str(cache_dir), "COLUMNS": "80"}
    listing = subprocess.run(
        [sys.executable, "-m", "llmkit", "cache"], capture_output=True, text=True, env=env, timeout=60
    )
    assert listing.returncode == 0 and "1 entry" in listing.stdout
    assert max(len(line.rstrip()) for line in listing.stdout.splitlines()) <= 80
    cleaned = subprocess.run(
        [sys.executable, "-m", "llmkit", "cache", "--clean"], capture_output=True, text=True, env=env, timeout=60
    )
    assert cleaned.returncode == 0 and "Removed 1 entry, freed" in cleaned.stdout
    assert models.cached_conversions() == [] and tiny_gguf.is_file()
