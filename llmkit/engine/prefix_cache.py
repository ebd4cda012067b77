"""The server's prefix cache: KV snapshots of earlier requests, found again by the tokens they hold.

Requests that start alike (one system prompt, a chat whose history grows by a turn, few-shot examples) would
otherwise compute the same prefix again each time. The schedulers store a snapshot of a request's KV (its
prompt when it is prefilled, its prompt and reply when it finishes) under the token ids it covers; a later
request looks up the entry sharing the longest prefix with its prompt and computes only the rest.

Entries are whole sequences, not shared blocks: a chat's next turn supersedes its last (an entry whose ids
begin another's is dropped when the longer one is stored), so a conversation holds one entry; a system prompt
shared by many users is held once per user, which costs memory but no lookup structure. The bound is bytes
(`--prefix-cache-mb`); the least recently used entries go first. What an entry holds (`payload`) is the
scheduler's business: KV tensors for the transformers batcher (batch.py), a llama.cpp sequence state for
llama.cpp's (llamacpp_batch.py).

Touched only by the scheduler's loop thread; the counters are read by /metrics from the event loop (plain
ints, read whole).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MIN_PREFIX_TOKENS = 16  # a shorter match is not worth restoring a snapshot for, nor a prompt worth storing
DEFAULT_PREFIX_CACHE_MB = 1024


@dataclass
class PrefixEntry:
    ids: tuple[int, ...]  # the tokens whose KV `payload` holds, in order
    payload: Any
    nbytes: int


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # requests that looked for a prefix
    hits: int = 0  # ... and found one of at least MIN_PREFIX_TOKENS
    prompt_tokens: int = 0  # prompt tokens of the requests that looked
    cached_tokens: int = 0  # ... whose KV came from the cache instead of being computed
    stored: int = 0
    evicted: int = 0  # entries dropped for room (not the ones a longer entry superseded)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two token sequences share: a binary search over slice comparisons, which run in C (a
    chat history is thousands of tokens, and the server compares every entry on every request)."""
    a, b = tuple(a), tuple(b)  # a list slice never equals a tuple slice
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class PrefixCache:
    """An LRU of PrefixEntry under a byte bound; see the module docstring."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()  # least recently used first
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `ids`, and how many of its tokens to reuse: at most all but
        the last of `ids` (the first new token needs the last prompt token's logits). (None, 0) under
        MIN_PREFIX_TOKENS. The caller says what it reused in `record`."""
        key = tuple(ids)
        best, reused = None, 0
        for entry in self._entries.values():
            shared = common_prefix(entry.ids, key)
            if shared > reused:
                best, reused = entry, shared
        reused = min(reused, len(key) - 1)
        if best is None or reused < MIN_PREFIX_TOKENS:
            return None, 0
        self._entries.move_to_end(best.ids)
        return best, reused

    def record(self, prompt_tokens: int, reused: int) -> None:
        """Count one request's lookup: its prompt's length and how many of its tokens were not computed."""
        self.stats.lookups += 1
        self.stats.prompt_tokens += prompt_tokens
        if reused:
            self.stats.hits += 1
            self.stats.cached_tokens += reused

    def covers(self, ids: Sequence[int]) -> bool:
        """Some entry already holds all of `ids` (storing them would add nothing); that entry is touched."""
        key = tuple(ids)
        for entry in self._entries.values():
            if entry.ids[: len(key)] == key:
                self._entries.move_to_end(entry.ids)
                return True
        return False

    def worth_storing(self, ids: Sequence[int]) -> bool:
        return len(ids) >= MIN_PREFIX_TOKENS and not self.covers(ids)

    def store(self, ids: Sequence[int], payload: Any, nbytes: int) -> bool:
        """Keep `payload` as the KV of `ids`, dropping entries it supersedes (their ids begin `ids`) and then the
        least recently used ones until the bound holds. False (nothing kept) when it alone exceeds the bound."""
        key = tuple(ids)
        if nbytes > self.max_bytes:
            return False
        for old in [e for e in self._entries.values() if key[: len(e.ids)] == e.ids]:
            self._drop(old)
        while self._entries and self.bytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries.values())))
            self.stats.evicted += 1
        self._entries[key] = PrefixEntry(key, payload, nbytes)
        self.bytes += nbytes
        self.stats.stored += 1
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, entry: PrefixEntry) -> None:
        del self._entries[entry.ids]
        self.bytes -= entry.nbytes
