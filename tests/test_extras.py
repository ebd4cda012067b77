"""Install hints for the optional extras work where llmkit was installed from (llmkit is not on the index)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import PathDistribution

import pytest

from llmkit import extras

METADATA = """\
Metadata-Version: 2.4
Name: llmkit
Version: 0.1.0
Requires-Dist: torch>=2.4
Provides-Extra: plot
Requires-Dist: matplotlib>=3.7; extra == "plot"
Provides-Extra: llamacpp
Requires-Dist: llama-cpp-python>=0.3; extra == "llamacpp"
"""


def fake_dist(tmp_path, name: str, direct_url: dict | None) -> PathDistribution:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "METADATA").write_text(METADATA)
    if direct_url is not None:
        (folder / "direct_url.json").write_text(json.dumps(direct_url))
    return PathDistribution(folder)


@pytest.fixture()
def installed_as(tmp_path, monkeypatch):
    """installed_as(direct_url or None, checkout=False): llmkit's metadata as pip would have written it."""

    def install(direct_url, checkout: bool = False):
        extras.install_hint.cache_clear()
        dists = [fake_dist(tmp_path, f"d{len(list(tmp_path.iterdir()))}.dist-info", direct_url)]
        monkeypatch.setattr(extras, "_distributions", lambda: dists)
        monkeypatch.setattr(extras, "_source_checkout", lambda: tmp_path / "checkout" if checkout else None)

    yield install
    extras.install_hint.cache_clear()


def test_editable_install_from_a_clone_gets_the_extra_on_its_path(tmp_path, installed_as):
    project = tmp_path / "src" / "my llmkit"
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "llmkit"\n')
    installed_as({"url": project.as_uri(), "dir_info": {"editable": True}})
    assert extras.install_hint("plot") == f"pip install -e '{project}[plot]'"  # quoted: the path has a space
    installed_as({"url": project.as_uri(), "dir_info": {}})
    assert extras.install_hint("llamacpp") == f"pip install '{project}[llamacpp]'"


def test_other_installs_get_the_packages_themselves(tmp_path, installed_as):
    installed_as({"url": "https://example.org/llmkit-0.1.0-py3-none-any.whl", "archive_info": {}})
    assert extras.install_hint("plot") == "pip install 'matplotlib>=3.7'"
    installed_as(None)  # no record: an index, or unknown
    assert extras.install_hint("llamacpp") == "pip install 'llama-cpp-python>=0.3'"
    installed_as({"url": (tmp_path / "gone").as_uri(), "dir_info": {"editable": True}})  # the clone was deleted
    assert extras.install_hint("plot") == "pip install 'matplotlib>=3.7'"
    with pytest.raises(ValueError):
        extras.install_hint("nonsense")


def test_running_from_a_checkout_without_an_install_record(tmp_path, installed_as):
    installed_as(None, checkout=True)
    assert extras.install_hint("plot") == f"pip install -e '{tmp_path / 'checkout'}[plot]'"


def test_this_install_never_gets_the_index_form():
    extras.install_hint.cache_clear()
    for extra in ("plot", "llamacpp", "gpu"):
        hint = extras.install_hint(extra)
        assert hint.startswith("pip install ") and "'llmkit[" not in hint


def test_every_pip_hint_in_llmkit_goes_through_the_helper():
    """No message hard-codes `pip install 'llmkit[...]'` (the package index refuses it)."""
    from pathlib import Path

    import llmkit

    offenders = [
        str(p)
        for p in Path(llmkit.__file__).parent.rglob("*.py")
        if "pip install 'llmkit[" in p.read_text() and p.name != "extras.py"
    ]
    assert offenders == []


def test_plot_without_matplotlib_names_a_command_that_works(cli, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec now says: not installed
    extras.install_hint.cache_clear()
    result = cli("monitor", "-m", str(tiny_model_dir), "--plot", str(tmp_path / "m.png"))
    assert result.exit_code == 2
    assert f"--plot needs matplotlib: {extras.install_hint('plot')}" in " ".join(result.stderr.split())
    assert "'llmkit[plot]'" not in result.stderr


def test_llamacpp_engine_hint(monkeypatch, tmp_path):
    from llmkit.engine import llamacpp
    from llmkit.errors import UnsupportedFeature

    monkeypatch.setattr(llamacpp, "llamacpp_installed", lambda: False)
    extras.install_hint.cache_clear()
    with pytest.raises(UnsupportedFeature) as caught:
        llamacpp.LlamaCppEngine.load(str(tmp_path / "x.gguf"))
    assert extras.install_hint("llamacpp") in str(caught.value) and "'llmkit[" not in str(caught.value)
