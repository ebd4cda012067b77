"""What every engine shares: prompts, the context limit, and stream/generate around its decode loop.

An engine subclass provides `tokenizer` (the slice of the Hugging Face tokenizer interface used
here), `info` (EngineInfo) and `_decode(...)`; everything a command or the server calls on top of
that lives here once, so the transformers and llama.cpp engines cannot drift apart.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator

from llmkit.engine.sequence import choose_seed
from llmkit.engine.types import Chunk, EngineInfo, Result
from llmkit.errors import InvalidParams, UnsupportedFeature, one_line
from llmkit.params import GenerationParams, check_text


class Generation:
    """An iterator of Chunks; after it is exhausted, `.result` holds the Result."""

    def __init__(self, chunks: Iterator[Chunk]):
        self._chunks = chunks
        self.result: Result | None = None

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        """Stop early (a cancelled server request): the decode loop ends where it is, with no Result."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


PROMPT_CHARS_SLACK = 2  # normalizers that merge characters (NFKC, accent stripping) make tokens cover a little more
HEAD_CHARS_PER_TOKEN = 8  # a long text's first context x 8 characters are tokenized first (English: ~4 per token)


def longest_token_chars(tokenizer) -> int | None:
    """Characters in the longest vocabulary entry (byte-level and SentencePiece entries are at least as long as
    the text they stand for); None when the tokenizer does not list its vocabulary."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = get_vocab() if callable(get_vocab) else None
    return max(map(len, vocab), default=0) or None if vocab else None


class Engine:
    tokenizer: object
    info: EngineInfo

    # --- prompts ----------------------------------------------------------------------------

    @functools.cached_property
    def max_prompt_chars(self) -> int | None:
        """A prompt longer than this many characters cannot fit the context, without tokenizing it: no token
        covers more characters than the longest vocabulary entry. None when either is unknown."""
        longest = longest_token_chars(self.tokenizer)
        limit = self.info.context_length
        return limit * longest * PROMPT_CHARS_SLACK if limit and longest else None

    def check_prompt_chars(self, chars: int, field: str = "prompt") -> None:
        """Refuse a text that cannot fit the context before spending time tokenizing it. A text of at most
        context x PROMPT_CHARS_SLACK characters is under any such bound, so the bound (a scan of the whole
        vocabulary: 0.3 s for 262k entries) is only computed for longer ones."""
        limit = self.info.context_length
        if not limit or chars <= limit * PROMPT_CHARS_SLACK:
            return
        bound = self.max_prompt_chars
        if bound is not None and chars > bound:
            raise InvalidParams(f"{field} has {chars} characters, more than the model's context of "
                                f"{self.info.context_length} tokens can hold (at most {bound} characters); "
                                "shorten it", field=field)

    def prompt_ids(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt; with chat=True, through the model's chat template."""
        check_text(prompt, "the prompt", "prompt")
        check_text(system or "", "the system prompt", "system")
        self.check_prompt_chars(len(prompt) + len(system or ""))
        if chat:
            if not self.info.has_chat_template:
                from llmkit.models import no_chat_template

                raise UnsupportedFeature(no_chat_template(self.info.model))
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return self.chat_ids(messages, field="prompt")[1]
        ids = self.encode(prompt, "prompt", add_special_tokens=True)
        if not ids:
            raise InvalidParams("prompt is empty after tokenization; give some text", field="prompt")
        return ids

    def chat_ids(self, messages: list[dict[str, str]], field: str = "messages") -> tuple[str, list[int]]:
        """(the text the chat template makes of `messages`, its token ids)."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's TemplateError: e.g. roles that must alternate
            raise InvalidParams(f"{field}: the model's chat template rejected them: {one_line(exc)}",
                                field=field) from None
        ids = self.encode(text, field, add_special_tokens=False)
        if not ids:
            raise InvalidParams(f"{field} are empty after applying the chat template", field=field)
        return text, ids

    def encode(self, text: str, field: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`. A text far longer than the context is judged by its head first: if the first
        context x HEAD_CHARS_PER_TOKEN characters already hold more tokens than the context, the whole cannot
        fit, and the rest (megabytes, seconds of CPU, hundreds of MB of token records) is never tokenized."""
        limit = self.info.context_length
        head_chars = (limit or 0) * HEAD_CHARS_PER_TOKEN
        if limit and len(text) > head_chars:
            head = self.tokenizer(text[:head_chars], add_special_tokens=add_special_tokens)["input_ids"]
            if len(head) > limit + 1:  # + 1: the last token of the head may merge with what follows it
                raise InvalidParams(f"{field} has more than {limit} tokens, the model's context (its first "
                                    f"{head_chars} characters alone are {len(head)} tokens); shorten it",
                                    field=field)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_context(self, prompt_tokens: int, params: GenerationParams) -> None:
        limit = self.info.context_length
        if limit and prompt_tokens + params.max_new_tokens > limit:
            raise InvalidParams(
                f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {limit} tokens; shorten the prompt or lower max_new_tokens",
                field="max_new_tokens")

    def check_length(self, tokens: int, what: str) -> None:
        """For scoring: `what` (e.g. 'the prompt') must fit in the context on its own."""
        limit = self.info.context_length
        if limit and tokens > limit:
            raise InvalidParams(f"{what} has {tokens} tokens, more than the model's context of {limit} "
                                "tokens; shorten it", field="prompt")

    # --- generation -------------------------------------------------------------------------

    def stream(self, prompt: str, params: GenerationParams, *, chat: bool = False,
               system: str | None = None) -> Generation:
        """Start generating; iterate the returned Generation for Chunks, then read `.result`."""
        started = time.perf_counter()
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        self.check_context(len(ids), params)
        return self.stream_ids(prompt, ids, params, seed=choose_seed(params), started=started)

    def stream_ids(self, prompt: str, ids: list[int], params: GenerationParams, *, seed: int | None,
                   started: float) -> Generation:
        """stream() for ids made and checked elsewhere: the server tokenizes (and applies chat templates) on
        its own thread, and its timings count from `started`, the request's arrival."""
        generation = Generation(iter(()))
        generation._chunks = self._decode(generation, prompt, ids, params, seed, started)
        return generation

    def generate(self, prompt: str, params: GenerationParams, *, chat: bool = False,
                 system: str | None = None) -> Result:
        generation = self.stream(prompt, params, chat=chat, system=system)
        for _ in generation:
            pass
        assert generation.result is not None
        return generation.result

    def _decode(self, generation: Generation, prompt: str, ids: list[int], params: GenerationParams,
                seed: int | None, started: float) -> Iterator[Chunk]:
        """Yield Chunks for `ids`; set generation.result at the end."""
        raise NotImplementedError
