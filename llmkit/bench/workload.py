"""What a load test sends, and when: prompts (random or read from a JSONL file) and the arrival schedule.

Random prompts are built from the target's own vocabulary when the server can tokenize
(`build_token_prompts`, given a `Tokenizer` over its /tokenize and /detokenize): token ids drawn
from those of llmkit's reference text, decoded, re-encoded and trimmed until the server counts
exactly the length asked for, as vLLM's random dataset aligns its prompts with the server. Without a
tokenizer, `build_word_prompts` draws words from the same text, as many as the length divided by the
server's own tokens per word (measured once from `usage`). Either way the counts reported are the
server's (`usage`), or the tokenizer's, never the words'.

Arrivals (`arrival_offsets`) follow vLLM's `get_request`: gaps drawn from a gamma distribution with
shape = burstiness and mean 1/rate (burstiness 1 is a Poisson process; below 1 burstier, above 1
more regular), then scaled so the n-th request goes out at n/rate exactly, so the offered rate does
not depend on the seed's luck. Everything random takes its own seeded `random.Random`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

from llmkit.errors import InvalidParams

DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 128
ALIGN_ROUNDS = 4  # encode/trim rounds before a random prompt's length is taken as it is
TOKENIZE_CONCURRENCY = 8  # prompts built at once against the server's tokenizer
APIS = ("completions", "chat")


@dataclass(frozen=True)
class LengthRange:
    """A token length, or a range of them drawn uniformly per prompt (`64`, `64:128`)."""

    low: int
    high: int

    def pick(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"

    def to_list(self) -> list[int]:
        return [self.low, self.high]


def parse_length(text: str, flag: str) -> LengthRange:
    """`128` or `64:128` (both ends included) -> LengthRange; anything else is a usage error."""
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
    if not match:
        raise InvalidParams(f"{flag} must be a token count or a range like 64:128 (got {text!r})", field=flag)
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if low < 1 or high < low:
        raise InvalidParams(f"{flag} must be at least 1, and a range must go up (got {text!r})", field=flag)
    return LengthRange(low, high)


def with_range_ratio(length: LengthRange, ratio: float, flag: str) -> LengthRange:
    """vLLM's --random-range-ratio: N becomes the range [N(1-r), N(1+r)]."""
    if not 0 <= ratio < 1:
        raise InvalidParams(f"--range-ratio must be at least 0 and below 1 (got {ratio:g})", field="range_ratio")
    if ratio == 0:
        return length
    if length.low != length.high:
        raise InvalidParams(
            f"give {flag} as one number or as a range, not a range and --range-ratio", field="range_ratio"
        )
    return LengthRange(max(1, math.floor(length.low * (1 - ratio))), math.ceil(length.low * (1 + ratio)))


@dataclass(frozen=True)
class Prompt:
    """One request's input: a text (completions, or one user message for chat) or chat messages.

    `prompt_tokens` is the server tokenizer's count when known (None otherwise); the request's
    `usage` overrides it."""

    text: str | None
    messages: tuple[dict[str, Any], ...] | None
    max_tokens: int
    prompt_tokens: int | None = None

    def body(self, api: str) -> dict[str, Any]:
        if api == "chat":
            messages = list(self.messages) if self.messages is not None else [{"role": "user", "content": self.text}]
            return {"messages": messages}
        return {"prompt": self.text}


# --- the arrival schedule -------------------------------------------------------------------------


def arrival_offsets(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """When each of `count` requests is sent, in seconds after the start: all at 0 for an infinite rate,
    else cumulative gamma gaps (shape `burstiness`, mean 1/rate) scaled to end at count/rate."""
    if count <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    if math.isinf(burstiness):
        gaps = [1.0 / rate] * count
    else:
        scale = 1.0 / (rate * burstiness)
        gaps = [rng.gammavariate(burstiness, scale) for _ in range(count)]
    offsets, total = [], 0.0
    for gap in gaps:
        total += gap
        offsets.append(total)
    if total > 0:  # vLLM's normalisation: the last request goes out at count/rate whatever the draws were
        factor = (count / rate) / total
        offsets = [offset * factor for offset in offsets]
    return offsets


# --- random prompts ---------------------------------------------------------------------------------


def reference_words() -> list[str]:
    """The words of llmkit's reference text (shipped in the package): the pool random prompts draw from."""
    return reference_text().split()


def reference_text() -> str:
    return files("llmkit").joinpath("data/reference.txt").read_text(encoding="utf-8")


def build_word_prompts(
    count: int, input_len: LengthRange, output_len: LengthRange, seed: int, tokens_per_word: float
) -> list[Prompt]:
    """`count` prompts of random reference words, about `input_len` tokens each at `tokens_per_word` (the
    server's ratio, measured once); their real token counts come back in each request's usage."""
    rng = random.Random(seed)
    words = reference_words()
    prompts = []
    for _ in range(count):
        target, max_tokens = input_len.pick(rng), output_len.pick(rng)
        size = max(1, round(target / tokens_per_word))
        prompts.append(Prompt(" ".join(rng.choice(words) for _ in range(size)), None, max_tokens))
    return prompts


class Tokenizer(Protocol):
    """The server's tokenizer, over HTTP (client.ServerTokenizer) or a fake one in tests."""

    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: Sequence[int]) -> str: ...


async def build_token_prompts(
    tokenizer: Tokenizer, count: int, input_len: LengthRange, output_len: LengthRange, seed: int
) -> list[Prompt]:
    """`count` prompts of random tokens of the server's own vocabulary, each re-encoded by the server and
    trimmed or topped up until it counts the length asked for (or ALIGN_ROUNDS tries have passed)."""
    rng = random.Random(seed)
    added = await tokenizer.encode("")  # what the tokenizer adds to every text (a BOS): not prompt tokens
    skip = set(added)
    pool = sorted(set(await tokenizer.encode(reference_text())) - skip)
    if not pool:
        raise ValueError("the server's tokenizer returned no tokens for the reference text")
    plan = [(input_len.pick(rng), output_len.pick(rng), random.Random(rng.random())) for _ in range(count)]
    limit = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

    async def one(target: int, max_tokens: int, own: random.Random) -> Prompt:
        async with limit:
            text = await tokenizer.decode([own.choice(pool) for _ in range(target)])
            for _ in range(ALIGN_ROUNDS):
                ids = without_added(await tokenizer.encode(text), added)
                if len(ids) == target:
                    break
                ids = ids[:target] if len(ids) > target else ids + [own.choice(pool) for _ in range(target - len(ids))]
                text = await tokenizer.decode(ids)
            else:
                ids = without_added(await tokenizer.encode(text), added)
            return Prompt(text, None, max_tokens, prompt_tokens=len(ids))

    return list(await asyncio.gather(*(one(*step) for step in plan)))


async def count_prompt_tokens(tokenizer: Tokenizer, prompts: list[Prompt]) -> list[Prompt]:
    """The prompts with their text's token count by the server's tokenizer (for a server that sends no usage)."""
    limit = asyncio.Semaphore(TOKENIZE_CONCURRENCY)
    added = await tokenizer.encode("")
    counts: dict[str, int] = {}

    async def one(text: str) -> None:
        async with limit:
            counts[text] = len(without_added(await tokenizer.encode(text), added))

    await asyncio.gather(*(one(text) for text in {p.text for p in prompts if p.text is not None}))
    return [
        Prompt(p.text, p.messages, p.max_tokens, counts.get(p.text) if p.text is not None else None) for p in prompts
    ]


def without_added(ids: list[int], added: list[int]) -> list[int]:
    """A text's ids without those the tokenizer puts before every text (a BOS): a prompt's length leaves them out."""
    return ids[len(added) :] if added and ids[: len(added)] == added else ids


# --- a JSONL file of prompts ------------------------------------------------------------------------


def read_dataset(path: Path, default_max_tokens: int) -> list[Prompt]:
    """Lines `{"prompt": "..."}` or `{"messages": [...]}`, each with an optional `max_tokens`; blank lines are
    skipped. Any other shape is a usage error naming the line (exit 2, before anything is sent)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidParams(f"--dataset: no such file: {path}", field="dataset") from None
    except IsADirectoryError:
        raise InvalidParams(f"--dataset: {path} is a folder, not a JSONL file", field="dataset") from None
    except UnicodeDecodeError:
        raise InvalidParams(
            f"--dataset: {path} is not UTF-8 text (it should be JSONL: one JSON object per line)", field="dataset"
        ) from None
    except OSError as exc:
        raise InvalidParams(f"--dataset: cannot read {path} ({exc.strerror})", field="dataset") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--dataset {path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError:
            raise InvalidParams(
                f"{where} is not JSON; the file should be JSONL, one object per line like "
                '{"prompt": "..."} or {"messages": [...]}',
                field="dataset",
            ) from None
        prompts.append(_dataset_prompt(record, where, default_max_tokens))
    if not prompts:
        raise InvalidParams(f"--dataset {path} has no prompts", field="dataset")
    return prompts


def _dataset_prompt(record: Any, where: str, default_max_tokens: int) -> Prompt:
    if not isinstance(record, dict):
        raise InvalidParams(f'{where} must be a JSON object with "prompt" or "messages"', field="dataset")
    unknown = sorted(set(record) - {"prompt", "messages", "max_tokens"})
    if unknown:
        raise InvalidParams(
            f"{where} has unknown keys: {', '.join(unknown)} (known: prompt, messages, max_tokens)", field="dataset"
        )
    if ("prompt" in record) == ("messages" in record):
        raise InvalidParams(f'{where} needs exactly one of "prompt" and "messages"', field="dataset")
    max_tokens = record.get("max_tokens", default_max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidParams(
            f"{where}: max_tokens must be a whole number of at least 1 (got {max_tokens!r})", field="dataset"
        )
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise InvalidParams(f"{where}: prompt must be a non-empty string", field="dataset")
        return Prompt(record["prompt"], None, max_tokens)
    messages = record["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise InvalidParams(
            f'{where}: messages must be a non-empty list of {{"role": ..., "content": ...}} objects with string values',
            field="dataset",
        )
    return Prompt(None, tuple(messages), max_tokens)


def cycle_to(prompts: list[Prompt], count: int | None) -> list[Prompt]:
    """The dataset's prompts in file order, repeated or cut to `count` (None: each once)."""
    if count is None:
        return list(prompts)
    return [prompts[i % len(prompts)] for i in range(count)]


def resolve_api(api: str | None, prompts: Sequence[Prompt] | None) -> str:
    """--api, or chat when the dataset holds messages, else completions; messages on --api completions are refused."""
    has_messages = prompts is not None and any(p.messages is not None for p in prompts)
    if api is None:
        return "chat" if has_messages else "completions"
    if api not in APIS:
        raise InvalidParams(f"--api must be completions or chat (got {api!r})", field="api")
    if api == "completions" and has_messages:
        raise InvalidParams(
            "the --dataset has chat messages, which /v1/completions cannot take; use --api chat (or leave --api out)",
            field="api",
        )
    return api
