"""The lean one-token decode step (llmkit/engine/decode_step.py) computes exactly what transformers' forward does."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from llmkit.engine import load_engine
from llmkit.engine.base import BatchStep
from llmkit.engine.batch import left_padded
from llmkit.engine.decode_step import BATCH_KV_HEADROOM, DECODE_STEP_ENV, _append
from llmkit.engine.fastpath import fp16_weights_supported
from llmkit.params import GenerationParams
from tests.conftest import build_tiny_model

PROMPT = "the quick brown fox"


CONFIGURATIONS = [  # every way the engine can compute; the lean step must give transformers' bits in each
    pytest.param({"dtype": "float32"}, id="float32"),
    pytest.param({"dtype": "bfloat16"}, id="bfloat16"),
    pytest.param({"quantize": "int8"}, id="int8"),
    pytest.param({"quantize": "bf16"}, id="bf16-weights"),
    pytest.param(
        {"quantize": "fp16"},
        id="fp16-weights",
        marks=pytest.mark.skipif(not fp16_weights_supported(), reason="fbgemm's float16 kernel"),
    ),
]


def _engine(folder, monkeypatch=None, *, forward: bool = False, **options):
    if monkeypatch is not None:
        if forward:
            monkeypatch.setenv(DECODE_STEP_ENV, "forward")
        else:
            monkeypatch.delenv(DECODE_STEP_ENV, raising=False)
    return load_engine(str(folder), device="cpu", **options)


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory):
    """A tiny Gemma 3 whose sliding-window layer sees 4 tokens, so the steps below go far past its window."""
    return build_tiny_model(tmp_path_factory.mktemp("gemma") / "tiny-gemma", sliding_window=4)


@pytest.mark.parametrize("options", CONFIGURATIONS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("cache_kind", ["model's", "session's"])
def test_every_step_equals_transformers_forward_bit_for_bit(
    tiny_model_dir, tiny_gemma_dir, monkeypatch, options, rows, architecture, cache_kind
):
    folder = tiny_model_dir if architecture == "llama" else tiny_gemma_dir
    engine = _engine(folder, monkeypatch, **options)
    assert engine._lean is not None
    session_cache = cache_kind == "session's"
    assert_steps_equal_forward(engine, engine.prompt_ids(PROMPT), rows=rows, steps=40, session_cache=session_cache)


@pytest.mark.parametrize("options", CONFIGURATIONS)
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("lengths", [(3, 7, 12), (6, 6)], ids=["padded", "unpadded"])
def test_batched_steps_equal_transformers_forward_bit_for_bit(
    tiny_model_dir, tiny_gemma_dir, monkeypatch, options, architecture, lengths
):
    """The server's decode steps (rows of their own lengths, left-padded, as the batcher prefills them): every
    step's logits and the final KV through the lean batched step are the bits of transformers' forward, with and
    without padding, far past Gemma 3's 4-token sliding window."""
    folder = tiny_model_dir if architecture == "llama" else tiny_gemma_dir
    engine = _engine(folder, monkeypatch, **options)
    lean = engine._lean
    assert lean is not None
    taken = []
    real_step_batch = lean.step_batch
    monkeypatch.setattr(lean, "step_batch", lambda *args: taken.append(1) or real_step_batch(*args))
    prompt = engine.prompt_ids(PROMPT * 4)
    width = max(lengths)
    input_ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.tensor(prompt[row : row + length])
        mask[row, width - length :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits, cache = engine.forward_step(input_ids, engine.new_cache(), attention_mask=mask, position_ids=positions)
        reference_cache = copy.deepcopy(cache)
        for step in range(12):
            tokens = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones((len(lengths), 1), dtype=torch.long)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            logits, cache = engine.forward_step(tokens, cache, attention_mask=mask, position_ids=positions)
            engine._lean = None  # the reference: transformers' forward
            expected, reference_cache = engine.forward_step(
                tokens, reference_cache, attention_mask=mask, position_ids=positions
            )
            engine._lean = lean
            assert torch.equal(logits, expected), f"step {step}"
    assert len(taken) == 12
    for layer, reference in zip(cache.layers, reference_cache.layers):
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)


def _running_batch(engine, rows: list[list[int]]) -> tuple[BatchStep, torch.Tensor, object]:
    """Rows prefilled as the batcher holds them, and their next step: (its inputs on a copy of their cache, what
    transformers' forward gives for it, the cache that leaves)."""
    input_ids, mask, positions = left_padded(rows)
    logits, running = engine.forward_step(input_ids, engine.new_cache(), attention_mask=mask, position_ids=positions)
    tokens = logits.argmax(-1, keepdim=True)
    mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
    step = BatchStep(tokens, _copied(engine, running), mask, mask.sum(-1, keepdim=True) - 1)
    expected, expected_cache = engine.forward_step(
        tokens, _copied(engine, running), attention_mask=mask, position_ids=step.position_ids
    )
    return step, expected, expected_cache


def _copied(engine, cache):
    copied = engine.new_cache()
    for index, layer in enumerate(cache.layers):
        copied.update(layer.keys.clone(), layer.values.clone(), index)
    return copied


@pytest.mark.parametrize("options", CONFIGURATIONS)
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("prefix", [0, 5], ids=["whole-prompts", "after-a-cached-prefix"])
def test_a_mixed_pass_computes_the_decode_step_and_the_prompts(
    tiny_model_dir, tiny_gemma_dir, monkeypatch, options, architecture, prefix
):
    """The server's pass that decodes the running rows and prefills newcomers at once (forward_mixed): the running
    rows' logits and KV are their own step's, the prompts' last logits and KV transformers' forward's, within float
    rounding (the products run over more rows at once, which some kernels block differently, and transformers
    builds the prompts' mask its own way), padded or not, far past Gemma 3's 4-token window, from scratch or after
    a restored prefix."""
    folder = tiny_model_dir if architecture == "llama" else tiny_gemma_dir
    engine = _engine(folder, monkeypatch, **options)
    lean = engine._lean
    mixed = []
    real_step_mixed = lean.step_mixed
    monkeypatch.setattr(lean, "step_mixed", lambda *args: mixed.append(1) or real_step_mixed(*args))
    prompt = engine.prompt_ids(PROMPT * 4)
    with torch.inference_mode():
        step, expected_running, expected_running_cache = _running_batch(engine, [prompt[:9], prompt[2:14], prompt[5:8]])
        prefix_cache = engine.new_cache()
        newcomers = [prompt[3:19], prompt[30:37]]  # of two lengths: the second left-padded
        if prefix:  # both start after the same cached tokens, as the prefix cache restores them, and (as the
            # batcher lays them out, with no hole between a row's prefix and the rest) compute as many tokens each
            _, prefix_cache = engine.forward_step(torch.tensor([prompt[20 : 20 + prefix]] * 2), prefix_cache)
            newcomers = [prompt[3:19], prompt[30:46]]
        newcomer_ids, newcomer_mask, newcomer_positions = left_padded(newcomers, [prefix] * 2)
        expected_prompts, expected_prompt_cache = engine.forward_step(
            newcomer_ids,
            _copied(engine, prefix_cache),
            attention_mask=newcomer_mask,
            position_ids=newcomer_positions,
        )
        prompts = BatchStep(newcomer_ids, _copied(engine, prefix_cache), newcomer_mask, newcomer_positions)
        got_running, running_cache, got_prompts, prompt_cache = engine.forward_mixed(step, prompts)
    assert mixed == [1]
    bfloat16 = "bfloat16" in (options.get("dtype"), options.get("quantize")) or options.get("quantize") == "bf16"
    tolerance = 2e-2 if bfloat16 else 1e-5  # bfloat16 products round activations for some row counts
    torch.testing.assert_close(got_running, expected_running, rtol=tolerance, atol=tolerance)
    for ours, theirs in zip(running_cache.layers, expected_running_cache.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(ours.values, theirs.values, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got_prompts, expected_prompts, rtol=tolerance, atol=tolerance)
    real = newcomer_mask.bool()  # padding columns' keys are never read
    for ours, theirs in zip(prompt_cache.layers, expected_prompt_cache.layers):
        torch.testing.assert_close(
            ours.keys.transpose(1, 2)[real], theirs.keys.transpose(1, 2)[real], rtol=tolerance, atol=tolerance
        )
        torch.testing.assert_close(
            ours.values.transpose(1, 2)[real], theirs.values.transpose(1, 2)[real], rtol=tolerance, atol=tolerance
        )


def test_without_the_lean_step_a_mixed_pass_is_two_forward_passes(tiny_model_dir, monkeypatch):
    """LLMKIT_DECODE_STEP=forward (or a model the lean step does not cover): forward_mixed runs the decode step and
    the prompts as two of transformers' forward passes, the bits of calling them one after the other."""
    engine = _engine(tiny_model_dir, monkeypatch, forward=True)
    assert engine._lean is None
    prompt = engine.prompt_ids(PROMPT * 2)
    with torch.inference_mode():
        step, expected_running, _ = _running_batch(engine, [prompt[:6], prompt[1:4]])
        newcomer = left_padded([prompt[2:9]])
        expected_prompt, _ = engine.forward_step(
            newcomer[0], engine.new_cache(), attention_mask=newcomer[1], position_ids=newcomer[2]
        )
        got_running, _, got_prompt, prompt_cache = engine.forward_mixed(
            step, BatchStep(newcomer[0], engine.new_cache(), *newcomer[1:])
        )
    assert torch.equal(got_running, expected_running) and torch.equal(got_prompt, expected_prompt)
    assert prompt_cache.get_seq_length() == 7


def test_batch_keys_grow_in_place_until_their_buffer_is_full():
    """The batched step's cache growth (decode_step._append): the same tensors torch.cat would give, written into
    spare columns of one buffer while there are any, through trims of leading columns, and copied again when
    full or when the batcher has replaced the tensors (merged or dropped rows)."""
    layer = SimpleNamespace(keys=torch.randn(2, 3, 4, 5), values=torch.randn(2, 3, 4, 5))
    reference_keys, reference_values = layer.keys.clone(), layer.values.clone()
    storages = []
    for step in range(BATCH_KV_HEADROOM + 3):
        keys, values = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5)
        _append(layer, keys, values)
        reference_keys = torch.cat([reference_keys, keys], dim=2)
        reference_values = torch.cat([reference_values, values], dim=2)
        if step == 10:  # the batcher trims leading columns that became padding in every row
            layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]
            reference_keys, reference_values = reference_keys[:, :, 2:], reference_values[:, :, 2:]
        assert torch.equal(layer.keys, reference_keys) and torch.equal(layer.values, reference_values)
        storages.append(layer.keys.untyped_storage().data_ptr())
    # one buffer for the first BATCH_KV_HEADROOM + 1 columns, then a new one
    assert len(set(storages[: BATCH_KV_HEADROOM + 1])) == 1 and storages[-1] != storages[0]
    layer.keys = layer.keys[[1, 0]]  # rows selected: a new tensor, which is never written into
    layer.values = layer.values[[1, 0]]
    selected = layer.keys.clone()
    old_buffer = layer.llmkit_kv_buffers[0]
    before = old_buffer.clone()
    _append(layer, torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5))
    assert torch.equal(layer.keys[:, :, :-1], selected) and torch.equal(old_buffer, before)
    assert layer.keys.untyped_storage().data_ptr() not in storages


def assert_steps_equal_forward(engine, ids: list[int], *, rows: int = 1, steps: int, session_cache: bool = False):
    """Prefill `ids` (in `rows` rows), then feed `steps` tokens through the lean step and through transformers'
    forward side by side: every step's logits and the final KV must be the same bits. The cache starts as the
    model's own (sliding-window layers keep their window) or as a session's (full layers everywhere)."""
    with torch.inference_mode():
        logits, cache = engine.forward_step(torch.tensor([ids] * rows), engine.new_cache() if session_cache else None)
        reference_cache = copy.deepcopy(cache)
        run = engine._lean.begin(cache, len(ids) + steps)
        tokens = logits.argmax(-1, keepdim=True)
        if rows > 1:  # rows that differ from each other
            tokens = (tokens + torch.arange(rows)[:, None] * 7) % engine.vocab_size
        for step in range(steps):
            with engine.step_context(rows):
                lean = run.step(tokens)
            expected, reference_cache = engine.forward_step(tokens, reference_cache)
            assert torch.equal(lean, expected), f"step {step}: max difference {(lean - expected).abs().max()}"
            tokens = expected.argmax(-1, keepdim=True)
        run.end(cache)
    assert cache.get_seq_length() == reference_cache.get_seq_length() == len(ids) + steps
    for ours, theirs in zip(cache.layers, reference_cache.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(max_new_tokens=48, temperature=0),
        GenerationParams(max_new_tokens=32, temperature=1.3, top_k=40, seed=11, num_sequences=3),
        GenerationParams(max_new_tokens=24, temperature=0.8, repetition_penalty=1.3, seed=5),
    ],
    ids=["greedy", "sampled-3-rows", "repetition-penalty"],
)
def test_generations_are_identical_with_and_without_it(tiny_model_dir, monkeypatch, params):
    lean = _engine(tiny_model_dir, monkeypatch, dtype="float32")
    forward = _engine(tiny_model_dir, monkeypatch, forward=True, dtype="float32")
    assert lean._lean is not None and forward._lean is None
    ours, theirs = lean.generate(PROMPT, params), forward.generate(PROMPT, params)
    assert [c.token_ids for c in ours.completions] == [c.token_ids for c in theirs.completions]
    assert [c.text for c in ours.completions] == [c.text for c in theirs.completions]
    assert len(ours.completions[0].token_ids) > 1  # decode steps really ran


def test_logprobs_are_identical_with_and_without_it(tiny_model_dir, monkeypatch):
    params = GenerationParams(max_new_tokens=20, temperature=0.9, seed=3)
    outputs = []
    for forward in (False, True):
        engine = _engine(tiny_model_dir, monkeypatch, forward=forward, dtype="float32")
        stream = engine.stream(PROMPT, params, logprobs=3)
        chunks = list(stream)
        outputs.append([(t.token, t.logprob, t.top) for chunk in chunks for t in chunk.logprobs])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 20


def _chat(engine, params, questions):
    """Each turn's Result of a conversation asking `questions` in turn, the replies kept in the history."""
    session, messages, results = engine.session(), [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        stream = session.stream(messages, params)
        for _chunk in stream:
            pass
        results.append(stream.result)
        messages.append({"role": "assistant", "content": stream.result.text})
    return results


def test_a_chat_session_goes_on_from_the_cache_it_hands_back(tiny_model_dir, monkeypatch):
    params = GenerationParams(max_new_tokens=12, temperature=0)
    questions = ["the quick brown fox", "jumps over the lazy dog", "a lazy dog"]
    lean = _chat(_engine(tiny_model_dir, monkeypatch, dtype="float32"), params, questions)
    forward = _chat(_engine(tiny_model_dir, monkeypatch, forward=True, dtype="float32"), params, questions)
    assert [r.completions[0].token_ids for r in lean] == [r.completions[0].token_ids for r in forward]
    assert [r.usage.cached_tokens for r in lean] == [r.usage.cached_tokens for r in forward]
    assert lean[1].usage.cached_tokens > 0 and lean[2].usage.cached_tokens > 0  # later turns reused the KV


def test_choices_say_which_step_runs(tiny_model_dir, tiny_gemma_dir, monkeypatch):
    assert "llmkit's one-token step (llama)" in _engine(tiny_model_dir, monkeypatch).info.choices["decode_step"]
    forward = _engine(tiny_model_dir, monkeypatch, forward=True)
    assert forward.info.choices["decode_step"] == f"transformers' forward ({DECODE_STEP_ENV}=forward)"
    gemma = _engine(tiny_gemma_dir, monkeypatch)
    assert "llmkit's one-token step (gemma3_text)" in gemma.info.choices["decode_step"]


def test_a_run_refuses_to_write_past_its_buffers(tiny_engine):
    ids = tiny_engine.prompt_ids(PROMPT)
    with torch.inference_mode():
        logits, cache = tiny_engine.forward_step(torch.tensor([ids]), None)
        run = tiny_engine._lean.begin(cache, len(ids) + 1)
        tokens = logits.argmax(-1, keepdim=True)
        run.step(tokens)
        with pytest.raises(RuntimeError, match="sized for"):
            run.step(tokens)
