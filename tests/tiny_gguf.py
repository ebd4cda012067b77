"""A tiny llama GGUF file, written on the spot, for tests.

Tests of llmkit's GGUF -> safetensors cache conversion need a real GGUF file to convert, but the real
models are 100-250 MB and take a long time to convert. `write_tiny_gguf` writes a valid
llama-architecture GGUF of about 200 KB instead: random float32 weights, 2 layers, and a byte-level
BPE tokenizer trained here on a few lines of text, all deterministic for a given seed. It loads, as
users load theirs, through
`AutoTokenizer/AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` in about a second.

`truncate_copy` writes the first part of a file, to stand in for an interrupted download.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from gguf import GGUFWriter, TokenType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["write_tiny_gguf", "truncate_copy"]

VOCAB_SIZE = 320  # 256 byte tokens, one special token, the rest merges
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 64
CONTEXT = 256
EOS = "<|endoftext|>"

_TEXT = [
    "hello world",
    "Hello, world! This is a tiny model for tests.",
    "The quick brown fox jumps over the lazy dog.",
    "A small language model writes a few words, then stops.",
    "Tests should be fast, so the model is very small and the weights are random.",
    "Once upon a time there was a little model that lived in a file.",
]


def _train_tokenizer() -> tuple[list[str], list[str]]:
    """Train a byte-level BPE on `_TEXT`; return its tokens (in id order) and merges ("a b")."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TEXT, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_tiny_gguf(
    path: pathlib.Path, *, seed: int = 0, chat_template: str | None = None, user_defined: tuple[str, ...] = ()
) -> pathlib.Path:
    """Write a tiny random-weight llama GGUF (float32, with a gpt2-style tokenizer) to `path`;
    `chat_template` (Jinja) goes into tokenizer.chat_template, as chat models' files carry one;
    `user_defined` tokens are appended with GGUF's USER_DEFINED type (as Gemma 3 marks its markers)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, merges = _train_tokenizer()
    tokens = tokens + list(user_defined)
    eos_id = tokens.index(EOS)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama-test")
    writer.add_file_type(0)  # ALL_F32
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)

    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            TokenType.CONTROL if t == EOS else TokenType.USER_DEFINED if t in user_defined else TokenType.NORMAL
            for t in tokens
        ]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    # numpy shapes are PyTorch's (out_features, in_features); GGUFWriter reverses them into ggml order.
    writer.add_tensor("token_embd.weight", weight(len(tokens), HIDDEN))
    for i in range(LAYERS):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{blk}.attn_q.weight", weight(HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(HIDDEN, HEADS * HEAD_DIM))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(INTERMEDIATE, HIDDEN))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(INTERMEDIATE, HIDDEN))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(HIDDEN, INTERMEDIATE))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.add_tensor("output.weight", weight(len(tokens), HIDDEN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate_copy(src: pathlib.Path, dst: pathlib.Path, keep_fraction: float = 0.5) -> pathlib.Path:
    """Copy the first `keep_fraction` of `src` to `dst`, like a download cut off part-way."""
    data = pathlib.Path(src).read_bytes()
    dst = pathlib.Path(dst)
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst


def start_conversion_held_mid_write(gguf_path, cache_dir):
    """A real process converting `gguf_path` into `cache_dir`, stopped after writing part of its staging folder
    (it prints "writing" then, and sleeps); the caller kills it. Returns the Popen."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from llmkit import models

        def slow_write(gguf_path, staging, progress):
            (staging / "config.json").write_text("{{}}")  # a partial folder
            print("writing", flush=True)
            time.sleep(60)

        models._write_conversion = slow_write
        models.convert_gguf(Path({str(gguf_path)!r}))
    """)
    env = {**os.environ, "LLMKIT_CACHE_DIR": str(cache_dir)}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    assert process.stdout.readline().strip() == "writing"
    return process
