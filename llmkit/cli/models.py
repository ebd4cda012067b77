"""`llmkit models`: the aliases, whether they are installed and cached, and their sizes on disk."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from llmkit.cli import options, render


def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document instead of a table.")] = False,
    wide: options.WideOpt = False,
) -> None:
    """List model aliases that work offline, which are installed and cached, and their sizes.

    Any Hugging Face Hub id, save_pretrained folder or .gguf file works as a model too (llmkit generate -m ...).
    """
    from llmkit.models import ALIASES, alias_status, cache_dir, cache_entries, cached_conversions

    statuses = [alias_status(alias) for alias in ALIASES.values()]
    conversions = cached_conversions()
    entries = cache_entries()
    cache_bytes = sum(e.bytes for e in entries)
    removable_bytes = sum(e.bytes for e in entries if e.removable)
    if as_json:
        render.json_document(
            {
                "cache_dir": str(cache_dir()),
                "cache_bytes": cache_bytes,
                "cache_removable_bytes": removable_bytes,
                "aliases": [asdict(s) for s in statuses],
                "conversions": [{"path": str(p), "bytes": size} for p, size in conversions],
            }
        )
    else:
        render.models_table(
            statuses, conversions, str(cache_dir()), wide=wide, cache_bytes=cache_bytes, removable_bytes=removable_bytes
        )
