"""The transformers engine on the tiny random model, loaded through load_engine."""

import pytest

from llmkit.errors import InvalidParams, UnsupportedFeature
from llmkit.params import parse_params

PROMPT = "Once upon a time"


def test_engine_info(tiny_engine, tiny_model_dir):
    info = tiny_engine.info
    assert info.source_kind == "folder"
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.context_length == 256
    assert info.parameters > 0 and info.has_chat_template


def test_greedy_is_deterministic(tiny_engine):
    params = parse_params(greedy=True, max_new_tokens=12)
    first = tiny_engine.generate(PROMPT, params)
    second = tiny_engine.generate(PROMPT, params)
    assert first.completions[0].token_ids == second.completions[0].token_ids
    assert first.text == second.text


def test_same_seed_same_text_other_seed_other_text(tiny_engine):
    a = tiny_engine.generate(PROMPT, parse_params(seed=7, max_new_tokens=20, temperature=1.5, top_k=0))
    b = tiny_engine.generate(PROMPT, parse_params(seed=7, max_new_tokens=20, temperature=1.5, top_k=0))
    c = tiny_engine.generate(PROMPT, parse_params(seed=8, max_new_tokens=20, temperature=1.5, top_k=0))
    assert a.completions[0].token_ids == b.completions[0].token_ids
    assert a.completions[0].token_ids != c.completions[0].token_ids
    assert a.seed == 7


def test_unseeded_sampling_reports_a_seed_that_reproduces(tiny_engine):
    params = parse_params(max_new_tokens=15, temperature=1.5, top_k=0)
    first = tiny_engine.generate(PROMPT, params)
    assert first.seed is not None
    again = tiny_engine.generate(PROMPT, params.model_copy(update={"seed": first.seed}))
    assert again.completions[0].token_ids == first.completions[0].token_ids


def test_sequence_in_a_batch_matches_it_alone(tiny_engine):
    batch = tiny_engine.generate(PROMPT, parse_params(seed=3, num_sequences=3, max_new_tokens=10, temperature=1.2))
    alone = tiny_engine.generate(PROMPT, parse_params(seed=4, max_new_tokens=10, temperature=1.2))
    assert len(batch.completions) == 3
    assert batch.completions[1].token_ids == alone.completions[0].token_ids


def test_stream_chunks_add_up_to_the_result(tiny_engine):
    generation = tiny_engine.stream(PROMPT, parse_params(seed=1, max_new_tokens=25, temperature=1.0))
    chunks = list(generation)
    result = generation.result
    assert "".join(c.text for c in chunks) == result.text
    assert chunks[-1].finish_reason == result.completions[0].finish_reason
    assert result.usage.completion_tokens == len(result.completions[0].token_ids)
    assert result.usage.prompt_tokens == len(tiny_engine.prompt_ids(PROMPT))


def test_max_new_tokens_and_length_finish(tiny_engine):
    # eos can be sampled by the random model: check the bound, and 'length' when the bound is hit
    result = tiny_engine.generate(PROMPT, parse_params(greedy=True, max_new_tokens=5))
    completion = result.completions[0]
    assert len(completion.token_ids) <= 5
    if len(completion.token_ids) == 5 and completion.token_ids[-1] not in tiny_engine.eos_ids:
        assert completion.finish_reason == "length"


def test_stop_cuts_before_the_stop_text(tiny_engine):
    free = tiny_engine.generate(PROMPT, parse_params(greedy=True, max_new_tokens=30)).text
    assert len(free) > 4
    stop = free[3:5]
    cut = tiny_engine.generate(PROMPT, parse_params(greedy=True, max_new_tokens=30, stop=[stop]))
    assert cut.text == free[: free.find(stop)]
    assert cut.completions[0].finish_reason == "stop"


def test_timings_relations(tiny_engine):
    result = tiny_engine.generate(PROMPT, parse_params(greedy=True, max_new_tokens=10))
    t = result.timings
    assert 0 < t.ttft_s <= t.total_s
    assert len(t.token_times_s) >= len(result.completions[0].token_ids)
    assert list(t.token_times_s) == sorted(t.token_times_s)


def test_chat_template_is_applied(tiny_engine):
    ids = tiny_engine.prompt_ids("hi", chat=True, system="be brief")
    text = tiny_engine.tokenizer.decode(ids)
    assert "<|system|>be brief" in text and "<|user|>hi" in text and text.endswith("<|assistant|>")
    result = tiny_engine.generate("hi", parse_params(greedy=True, max_new_tokens=3), chat=True, system="be brief")
    assert result.usage.prompt_tokens == len(ids)


def test_chat_without_template_is_a_clear_error(tiny_model_no_chat_dir):
    from llmkit.engine import load_engine

    engine = load_engine(str(tiny_model_no_chat_dir))
    with pytest.raises(UnsupportedFeature, match="has no chat template"):
        engine.generate("hi", parse_params(greedy=True), chat=True)


def test_prompt_over_the_context_is_rejected(tiny_engine):
    with pytest.raises(InvalidParams, match="exceeds the model's context of 256 tokens"):
        tiny_engine.generate("word " * 300, parse_params(max_new_tokens=10))


# --- prompts that cannot work are refused before the expensive part -------------------------------


def test_text_that_is_not_unicode_is_refused_naming_the_field(tiny_engine):
    with pytest.raises(InvalidParams, match="the prompt is not valid Unicode at character 2") as bad:
        tiny_engine.prompt_ids("ab\ud800")
    assert bad.value.field == "prompt"
    with pytest.raises(InvalidParams, match="the system prompt is not valid Unicode") as bad_system:
        tiny_engine.prompt_ids("ok", chat=True, system="\udfff")
    assert bad_system.value.field == "system"


def test_a_long_prompt_is_judged_by_its_head_and_its_length_before_it_is_tokenized(tiny_engine, monkeypatch):
    from llmkit.engine.base import HEAD_CHARS_PER_TOKEN

    limit = tiny_engine.info.context_length
    assert tiny_engine.max_prompt_chars is not None
    too_long_to_fit = "x" * (tiny_engine.max_prompt_chars + 1)
    seen = []
    real_tokenizer = tiny_engine.tokenizer

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(real_tokenizer, name)

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return real_tokenizer(text, **kwargs)

    monkeypatch.setattr(tiny_engine, "tokenizer", CountingTokenizer())
    with pytest.raises(InvalidParams, match="characters, more than the model's context"):
        tiny_engine.prompt_ids(too_long_to_fit)
    assert seen == []  # refused by its length alone

    head_chars = limit * HEAD_CHARS_PER_TOKEN
    assert head_chars < tiny_engine.max_prompt_chars
    words = ("the quick brown fox " * 1000)[: (head_chars + tiny_engine.max_prompt_chars) // 2]  # within the bound
    with pytest.raises(InvalidParams, match=f"more than {limit} tokens, the model's context") as bad:
        tiny_engine.prompt_ids(words)
    assert bad.value.field == "prompt"
    assert seen == [head_chars]  # only the head was tokenized
    _, ids = tiny_engine.chat_ids([{"role": "user", "content": "hello"}])
    assert ids  # an ordinary prompt goes through whole


def test_a_short_prompt_does_not_pay_for_the_vocabulary_scan(tiny_model_dir):
    """The character bound scans the whole vocabulary (0.3 s for Gemma's 262k entries, which landed in every
    CLI command's TTFT); a prompt too short to reach any such bound must not compute it."""
    from llmkit.engine import load_engine

    engine = load_engine(str(tiny_model_dir), device="cpu")
    engine.prompt_ids("Once upon a time")
    engine.prompt_ids("hello", chat=True, system="be brief")
    assert "max_prompt_chars" not in engine.__dict__  # the cached_property was never computed
    engine.check_prompt_chars(engine.info.context_length * 10)
    assert "max_prompt_chars" in engine.__dict__
