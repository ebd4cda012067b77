"""Tokens as the logprobs fields and /tokenize show them: each token's text and bytes, and where tokens start.

OpenAI's logprobs name each token by its text (`tokens`, the keys of `top_logprobs`, chat's `token`) and, on chat,
its UTF-8 `bytes`. A token is a byte string, not always whole characters: byte-level BPE (GPT-2, SmolLM2) and
SentencePiece byte fallback (Gemma, Llama) split a character that is not in the vocabulary into several tokens.
`TokenText` recovers each token's own bytes from the tokenizer (the byte-level alphabet, `<0xNN>` pieces, `▁` for
a space, llama.cpp's own pieces) and writes a token that is not whole UTF-8 as OpenAI does, `bytes:\\xe6\\x97`, so
two such tokens never share a key. Where a tokenizer gives no way to its bytes, the token's decoded text stands in.

Offsets (`text_offset`) count characters of the returned text. A generated token's offset is kept by its
SequenceState (engine/sequence.py); a prompt's come from the tokenizer's offset mapping when the tokenizer has one
and its ids are the prompt's, else from decoding the ids one at a time (IncrementalDetokenizer).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from llmkit.engine.detokenize import IncrementalDetokenizer
from llmkit.errors import InvalidParams

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_MARK = "\u2581"  # SentencePiece's visible space
TOKEN_CACHE = 1 << 16  # token ids whose text is remembered


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (each byte has one printable character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


def _decoder_kind(tokenizer) -> str:
    """ "byte_level", "sentencepiece" (▁ for spaces, <0xNN> byte fallback) or "text" (decode each token)."""
    if callable(getattr(tokenizer, "token_bytes", None)):
        return "own"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        return "text"
    try:
        described = json.dumps(json.loads(decoder.__getstate__()))
    except Exception:  # a decoder that does not describe itself
        return "text"
    if '"ByteLevel"' in described:
        return "byte_level"
    if '"ByteFallback"' in described or '"Metaspace"' in described or "\\u2581" in described:
        return "sentencepiece"
    return "text"


class TokenText:
    """Token id -> its bytes and its text for the logprobs fields (see the module docstring), remembered."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kind = _decoder_kind(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", None)
        self._added: dict[int, Any] = dict(added) if isinstance(added, dict) else {}
        self.bytes_of = functools.lru_cache(maxsize=TOKEN_CACHE)(self._bytes_of)

    def _bytes_of(self, token: int) -> bytes:
        tokenizer = self.tokenizer
        if self.kind == "own":
            return tokenizer.token_bytes(token)
        if self.kind == "text":
            return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
        if token in self._added:  # special and added tokens are stored as their text
            return str(getattr(self._added[token], "content", self._added[token])).encode("utf-8")
        piece = tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
        if self.kind == "byte_level":
            alphabet = _byte_level_alphabet()
            if all(char in alphabet for char in piece):
                return bytes(alphabet[char] for char in piece)
            return piece.encode("utf-8")
        byte = BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace(SPACE_MARK, " ").encode("utf-8")

    def text(self, token: int) -> str:
        """The token's text; a token that is not whole UTF-8 is written `bytes:\\xNN...`, as OpenAI writes it."""
        raw = self.bytes_of(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def byte_list(self, token: int) -> list[int]:
        return list(self.bytes_of(token))


def decoded_offsets(tokenizer, ids: Sequence[int]) -> list[int]:
    """Where each token's text starts in the text of `ids` decoded one token at a time (characters)."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    offsets, produced = [], 0
    for token in ids:
        offsets.append(produced)
        produced += len(detokenizer.feed(token))
    return offsets


def prompt_offsets(tokenizer, text: str, ids: Sequence[int], *, from_text: bool) -> list[int]:
    """Where each prompt token's text starts in `text` (characters, within the text): the tokenizer's offset mapping
    when the prompt came as text and the tokenizer gives the same ids with one, else the decoded ids'."""
    if from_text:
        try:
            encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            mapping = encoded["offset_mapping"]
            if list(encoded["input_ids"]) == list(ids) and len(mapping) == len(ids):
                return [min(int(start), len(text)) for start, _ in mapping]
        except Exception:  # a tokenizer without offset mapping (llama.cpp's, a slow one)
            pass
    return [min(offset, len(text)) for offset in decoded_offsets(tokenizer, ids)]


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    """InvalidParams naming `field` unless every id is a token of the model (0 to vocab_size - 1)."""
    bad = [token for token in ids if not 0 <= token < vocab_size]
    if bad:
        raise InvalidParams(
            f"{field}: token ids must be between 0 and {vocab_size - 1}, the model's vocabulary (got {bad[0]})",
            field=field,
        )
