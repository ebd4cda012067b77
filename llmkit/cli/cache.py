"""`llmkit cache`: what llmkit keeps on disk (GGUF -> safetensors conversions, GGUF files joined from
an alias's part packages), what uses each entry, and cleaning it.

Cleaning follows uv (`uv cache clean`) and pip (`pip cache purge`): `--clean` removes at once, without a
prompt, and says what it freed, because it removes only what llmkit makes again by itself on the next
load (or leftovers nothing loads); `--dry-run` shows what would go, as `brew cleanup --dry-run` does.
It never touches package files, anything outside the cache folder, an entry whose source is gone (it
may be the last copy), or a conversion or join still being written (its process is alive). The listing
and the cleaning live in llmkit/models.py; this module parses and hands records to render.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from llmkit.cli import render

EPILOG = """Examples:

  llmkit cache

  llmkit cache --clean --dry-run

  llmkit cache --clean

  llmkit cache --json | jq '.entries[] | select(.removable) | .path'
"""


def cache(
    *,
    clean: Annotated[
        bool,
        typer.Option(
            "--clean",
            help="Remove every entry llmkit can make again (conversions, joined GGUF files) and leftovers "
            "of interrupted runs; never a conversion in progress, package files or anything else.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="With --clean (or alone): show what would be removed and freed, remove nothing."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document instead of text.")] = False,
) -> None:
    """List what llmkit keeps in its cache, with sizes and what uses each entry; --clean frees the space.

    The cache is $LLMKIT_CACHE_DIR, else the platform's cache folder (~/.cache/llmkit on Linux).

    A cleaned entry is made again on the next load that needs it (a GGUF model's first load is slow).
    """
    from llmkit.models import ALIASES, alias_package_bytes, cache_dir, cache_entries, clean_cache

    if clean or dry_run:
        result = clean_cache(dry_run=dry_run)
        if as_json:
            render.json_document(
                {
                    "cache_dir": result.root,
                    "dry_run": result.dry_run,
                    "freed_bytes": result.freed_bytes,
                    "removed": [asdict(e) for e in result.removed],
                    "kept": [asdict(e) for e in result.kept],
                    "failed": [{**asdict(e), "error": message} for e, message in result.failed],
                }
            )
        else:
            render.cache_cleaned(result)
        if result.failed:
            raise typer.Exit(1)
        return

    entries = cache_entries()
    packages = [(alias.name, size) for alias in ALIASES.values() if (size := alias_package_bytes(alias)) is not None]
    if as_json:
        render.json_document(
            {
                "cache_dir": str(cache_dir()),
                "total_bytes": sum(e.bytes for e in entries),
                "removable_bytes": sum(e.bytes for e in entries if e.removable),
                "entries": [asdict(e) for e in entries],
                "packages": [{"alias": name, "bytes": size} for name, size in packages],
            }
        )
    else:
        render.cache_table(entries, str(cache_dir()), packages)
