"""How to install an optional extra (plot, llamacpp, gpu) from wherever this llmkit came from.

llmkit is not published on the package index, so `pip install 'llmkit[plot]'` fails for
everyone who installed it from a clone. The hint is built from how llmkit was installed:

- from a local folder (`pip install -e .` or `pip install .`; pip records the folder in the
  distribution's direct_url.json, PEP 610): the extra on that path,
  `pip install -e '/path/to/llmkit[plot]'`, which installs exactly what pyproject.toml asks;
- running straight from a source checkout (no install record, a pyproject.toml beside the
  package): the same, on the checkout;
- anything else (a wheel, a VCS URL, a private index, an unknown install): the extra's own
  packages, `pip install 'matplotlib>=3.7'`, which work from any index.

The extra's packages come from llmkit's installed metadata (Requires-Dist with
`extra == "..."`), so pyproject.toml stays the one place that lists them; EXTRA_PACKAGES is
the fallback when no metadata can be read. Reading the metadata takes tens of milliseconds,
so hints are built only when an error needs one, never at import.
"""

from __future__ import annotations

import json
import shlex
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlparse

DIST_NAME = "llmkit"
# What pyproject.toml's [project.optional-dependencies] lists; used only when the metadata is unreadable.
EXTRA_PACKAGES = {
    "plot": ("matplotlib>=3.7",),
    "llamacpp": ("llama-cpp-python>=0.3",),
    "gpu": ("nvidia-ml-py>=12",),
    "structured": ("llguidance>=1.9,<2",),
}


def _distributions():
    from importlib.metadata import distributions

    return list(distributions(name=DIST_NAME))


def _local_install(dists) -> tuple[Path, bool] | None:
    """(folder, editable) when pip recorded a local-folder install in direct_url.json (PEP 610)."""
    for dist in dists:
        try:
            text = dist.read_text("direct_url.json")
        except Exception:  # a damaged record is no record
            text = None
        if not text:
            continue
        try:
            record = json.loads(text)
        except ValueError:
            continue
        url = record.get("url", "")
        if "dir_info" not in record or not url.startswith("file:"):
            continue
        folder = Path(unquote(urlparse(url).path))
        if (folder / "pyproject.toml").is_file() or (folder / "setup.py").is_file():
            return folder, bool(record["dir_info"].get("editable"))
    return None


def _source_checkout() -> Path | None:
    """The checkout llmkit runs from (PYTHONPATH or the current folder), when it has a pyproject.toml."""
    import llmkit

    root = Path(llmkit.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and f'name = "{DIST_NAME}"' in pyproject.read_text(encoding="utf-8", errors="replace"):
        return root
    return None


def _extra_requirements(dists, extra: str) -> tuple[str, ...]:
    """The requirements an extra adds, from the installed metadata (markers dropped)."""
    from packaging.requirements import InvalidRequirement, Requirement

    for dist in dists:
        found = []
        for line in dist.requires or ():
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if (
                requirement.marker is not None
                and requirement.marker.evaluate({"extra": extra})
                and not requirement.marker.evaluate({"extra": ""})
            ):
                requirement.marker = None
                found.append(str(requirement))
        if found:
            return tuple(found)
    return EXTRA_PACKAGES.get(extra, ())


@cache
def install_hint(extra: str) -> str:
    """The pip command that adds an extra to this llmkit, e.g. `pip install -e '/src/llmkit[plot]'`."""
    try:
        dists = _distributions()
    except Exception:
        dists = []
    local = _local_install(dists)
    if local is None:
        checkout = _source_checkout()
        local = (checkout, True) if checkout is not None else None
    if local is not None:
        folder, editable = local
        return f"pip install {'-e ' if editable else ''}{shlex.quote(f'{folder}[{extra}]')}"
    packages = _extra_requirements(dists, extra)
    if not packages:
        raise ValueError(f"llmkit has no extra named {extra!r}")
    return "pip install " + " ".join(shlex.quote(p) for p in packages)
