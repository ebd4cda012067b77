"""What every engine shares: prompts, the context limit, and stream/generate around its decode loop.

An engine subclass provides `tokenizer` (the slice of the Hugging Face tokenizer interface used
here), `info` (EngineInfo) and `_decode(...)`; everything a command or the server calls on top of
that lives here once, so the transformers and llama.cpp engines cannot drift apart.
"""

from __future__ import annotations

import time
from typing import Iterator

from llmkit.engine.sequence import choose_seed
from llmkit.engine.types import Chunk, EngineInfo, Result
from llmkit.errors import InvalidParams, UnsupportedFeature
from llmkit.params import GenerationParams


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


class Engine:
    tokenizer: object
    info: EngineInfo

    # --- prompts ----------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt; with chat=True, through the model's chat template."""
        if chat:
            if not self.info.has_chat_template:
                raise UnsupportedFeature(f"model {self.info.model} has no chat template; drop --chat "
                                         "or pick a chat model (e.g. smollm2-135m)")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise InvalidParams("prompt is empty after tokenization; give some text", field="prompt")
        return list(ids)

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
