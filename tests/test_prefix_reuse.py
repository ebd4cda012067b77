"""Prefix reuse in a conversation (engine.session()): each turn computes only the tokens after what the kept
KV cache already holds, and gives exactly the tokens a recompute from scratch gives, on both local engines."""

from __future__ import annotations

import pytest

from llmkit.engine import load_engine
from llmkit.engine.base import Session
from llmkit.engine.prefix_cache import common_prefix
from llmkit.engine.types import Result
from llmkit.errors import InvalidParams
from llmkit.params import parse_params
from tests.conftest import CHAT_TEMPLATE

GREEDY = {"max_new_tokens": 8, "greedy": True}
SEEDED = {"max_new_tokens": 8, "temperature": 1.0, "seed": 7}
QUESTIONS = ["hello world", "The quick brown fox?", "Once upon a time", "Tell me about the sea."]


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def engine(request, tiny_engine, tmp_path_factory):
    if request.param == "transformers":
        return tiny_engine
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from tests.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "chat.gguf", chat_template=CHAT_TEMPLATE)
    return load_engine(str(path), engine="llama.cpp")


def finish(generation) -> Result:
    text = "".join(chunk.text for chunk in generation if chunk.index == 0)
    assert text == generation.result.text
    return generation.result


def recomputed(engine, messages, values, **kwargs) -> Result:
    return finish(Session(engine).stream(messages, parse_params(values), **kwargs))


def converse(session, values, turns: int = 3, **kwargs) -> list[tuple[list[dict[str, str]], Result]]:
    """`turns` turns through `session`: (the history each turn was given, its Result)."""
    messages = [{"role": "system", "content": "Tests should be fast."}]
    record = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        result = finish(session.stream(list(messages), parse_params(values), **kwargs))
        record.append((list(messages), result))
        messages.append({"role": "assistant", "content": result.text})
    return record


@pytest.mark.parametrize("values", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_conversation_gives_the_recomputed_tokens_and_reuses_the_history(engine, values):
    record = converse(engine.session(), values)
    # Recomputed afterwards: llama.cpp's one context would otherwise be overwritten between the turns.
    for turn, (messages, result) in enumerate(record):
        expected = recomputed(engine, messages, values)
        assert result.completions[0].token_ids == expected.completions[0].token_ids
        assert result.text == expected.text and result.seed == expected.seed
        assert expected.usage.cached_tokens == 0
        if turn == 0:
            assert result.usage.cached_tokens == 0
        else:  # the whole previous prompt at least (its reply as the template writes it may tokenize apart)
            assert result.usage.cached_tokens >= record[turn - 1][1].usage.prompt_tokens
            assert result.usage.cached_tokens < result.usage.prompt_tokens
            assert result.to_dict()["usage"]["prompt_tokens_details"] == {"cached_tokens": result.usage.cached_tokens}
    assert "prompt_tokens_details" not in record[0][1].to_dict()["usage"]


def test_logprobs_and_several_sequences_in_a_session(engine):
    session = engine.session()
    record = converse(session, GREEDY, turns=2, logprobs=2)
    messages, result = record[-1]
    expected = recomputed(engine, messages, GREEDY, logprobs=2)
    assert result.usage.cached_tokens > 0
    got, want = result.completions[0].logprobs, expected.completions[0].logprobs
    assert got is not None and want is not None
    assert [entry.token for entry in got] == [entry.token for entry in want]
    assert [entry.logprob for entry in got] == pytest.approx([entry.logprob for entry in want], abs=1e-4)
    several = {**SEEDED, "num_sequences": 2}
    history = [*messages, {"role": "assistant", "content": result.text}, {"role": "user", "content": "again"}]
    turn = finish(session.stream(history, parse_params(several)))
    again = recomputed(engine, history, several)
    assert [c.token_ids for c in turn.completions] == [c.token_ids for c in again.completions]


def test_an_edited_history_reuses_only_the_common_prefix(engine):
    session = engine.session()
    first = [{"role": "system", "content": "Tests should be fast."}, {"role": "user", "content": "hello world"}]
    finish(session.stream(first, parse_params(GREEDY)))
    edited = [{"role": "system", "content": "Tests should be slow."}, {"role": "user", "content": "hello world"}]
    result = finish(session.stream(edited, parse_params(GREEDY)))
    shared = common_prefix(engine.chat_ids(first)[1], engine.chat_ids(edited)[1])
    assert 0 < result.usage.cached_tokens == shared < result.usage.prompt_tokens
    assert result.completions[0].token_ids == recomputed(engine, edited, GREEDY).completions[0].token_ids
    # The same prompt again: all of it but the last token, whose logits the first new token needs (llama.cpp: but
    # the last two, so that the last token is not computed alone by another kernel than a whole prompt's).
    same = finish(session.stream(edited, parse_params(GREEDY)))
    assert same.usage.cached_tokens == same.usage.prompt_tokens - (2 if engine.info.engine == "llama.cpp" else 1)
    assert same.completions[0].token_ids == result.completions[0].token_ids


def test_reset_forgets_and_other_calls_in_between_stay_exact(engine):
    session = engine.session()
    record = converse(session, GREEDY, turns=2)
    messages, last = record[-1]
    history = [*messages, {"role": "assistant", "content": last.text}, {"role": "user", "content": "more"}]
    session.reset()
    after_reset = finish(session.stream(history, parse_params(GREEDY)))
    assert after_reset.usage.cached_tokens == 0
    # Another request on the engine (llama.cpp: its one context) between two turns of the session.
    engine.generate("The sea at night", parse_params(max_new_tokens=4))
    history += [{"role": "assistant", "content": after_reset.text}, {"role": "user", "content": "and then?"}]
    result = finish(session.stream(history, parse_params(SEEDED)))
    expected = recomputed(engine, history, SEEDED)
    assert result.completions[0].token_ids == expected.completions[0].token_ids


def test_a_turn_past_the_context_is_refused_and_the_session_goes_on(engine):
    session = engine.session()
    record = converse(session, GREEDY, turns=1)
    messages, result = record[0]
    too_long = [*messages, {"role": "assistant", "content": result.text}, {"role": "user", "content": "fox " * 300}]
    with pytest.raises(InvalidParams, match="context"):
        session.stream(too_long, parse_params(GREEDY))
    history = [*messages, {"role": "assistant", "content": result.text}, {"role": "user", "content": "ok"}]
    turn = finish(session.stream(history, parse_params(GREEDY)))
    assert turn.usage.cached_tokens >= result.usage.prompt_tokens
    assert turn.completions[0].token_ids == recomputed(engine, history, GREEDY).completions[0].token_ids


def test_the_base_session_recomputes(tiny_engine):
    session = Session(tiny_engine)
    record = converse(session, GREEDY, turns=2)
    assert [result.usage.cached_tokens for _, result in record] == [0, 0]
