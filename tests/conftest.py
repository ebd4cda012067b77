"""Shared fixtures: a tiny random-weight model built once per session, loaded the way users load models.

The model is a 2-layer Llama with hidden size 32 and a byte-level BPE tokenizer trained
here on a few paragraphs, saved with save_pretrained; tests load it through llmkit's own
`load_engine` and CLI. No generator is mocked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Stable rich output and real tracebacks for unexpected errors (the CLI re-raises under LLMKIT_DEBUG).
os.environ.setdefault("COLUMNS", "120")
os.environ["NO_COLOR"] = "1"
os.environ["LLMKIT_NO_PROGRESS"] = "1"
# Exactness tests compare against float32 computations; tests of the faster dtypes ask for them by name,
# and tests of what `auto` picks remove this.
os.environ["LLMKIT_DTYPE"] = "float32"

CORPUS = """\
The sea at night is dark and quiet, and the boats rest in the harbour until morning.
A small language model writes a few words, then stops; a large one writes many more.
Once upon a time there was a little model that lived in a file on a laptop.
Tests should be fast, so the model is tiny and its weights are random numbers.
Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e and emoji like \U0001f600 make sure bytes are handled well.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(
    folder: Path,
    *,
    chat_template: str | None = CHAT_TEMPLATE,
    seed: int = 0,
    layers: int = 2,
    context: int = 256,
    init_std: float = 0.02,
    sliding_window: int | None = None,
) -> Path:
    """A tiny random Llama with a BPE tokenizer trained on CORPUS; `sliding_window`: a tiny Gemma 3 instead, its
    first layer attending to that many tokens, its second to all (as Gemma 3 alternates them)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if sliding_window is not None:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            **{key: getattr(config, key) for key in ("vocab_size", "hidden_size", "intermediate_size")},
            **{key: getattr(config, key) for key in ("num_attention_heads", "num_key_value_heads")},
            **{key: getattr(config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
            num_hidden_layers=2,
            head_dim=8,
            sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=context,
            initializer_range=init_std,
        )
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_configure(config):
    import llmkit.cli

    llmkit.cli.RAISE_UNEXPECTED = True


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_no_chat_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain") / "tiny-plain", chat_template=None)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from llmkit.engine import load_engine

    return load_engine(str(tiny_model_dir), device="cpu")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private LLMKIT_CACHE_DIR for tests that convert GGUF files."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LLMKIT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture()
def cli(monkeypatch):
    """Run `llmkit ...` in-process through Typer's CliRunner; returns a function of the argument list."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    monkeypatch.delenv("LLMKIT_DEBUG", raising=False)
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input, catch_exceptions=False)

    return run
