"""The engine contract (llmkit/engine/base.py) is enough on its own: an engine written against it alone (here a
character-level one, no torch model) streams, generates, and is served; the server picks its scheduler from
the engine's capabilities, never from its name."""

from __future__ import annotations

import time

import pytest
import torch

from llmkit.engine.base import BatchingEngine, Engine
from llmkit.engine.sampling import pick_tokens
from llmkit.engine.sequence import SequenceState, build_result
from llmkit.engine.types import EngineInfo
from llmkit.params import GenerationParams

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
EOS = len(ALPHABET)


class CharTokenizer:
    """One token per character of ALPHABET, and an end-of-sequence token."""

    bos_token_id = None
    eos_token_id = EOS

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ALPHABET.index(c) for c in text.lower() if c in ALPHABET]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i] for i in ids if i < EOS)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return " ".join(m["content"] for m in messages) + " "


class NextLetterEngine(Engine):
    """Predicts the letter after the last one (a cycle): a third engine that knows nothing of transformers."""

    def __init__(self):
        self.tokenizer = CharTokenizer()
        self.info = EngineInfo(
            model="next-letter",
            source_kind="test",
            location="-",
            engine="next-letter",
            device="cpu",
            dtype="-",
            parameters=0,
            context_length=64,
            has_chat_template=True,
            load_s=0.0,
        )

    def _logits(self, last: int) -> torch.Tensor:
        logits = torch.full((1, EOS + 1), -5.0)
        logits[0, (last + 1) % EOS] = 5.0
        return logits

    def _decode(self, prompt, ids, params, seed, started):
        sequences = [SequenceState.start(i, self.tokenizer, ids, params) for i in range(params.num_sequences)]
        generators = [
            torch.Generator().manual_seed(seed + i) if seed is not None else None for i in range(params.num_sequences)
        ]
        lasts, token_times = [ids[-1]] * params.num_sequences, []
        while not all(s.finish_reason for s in sequences):
            logits = torch.cat([self._logits(last) for last in lasts])
            tokens = pick_tokens(logits, params, generators).tolist()
            token_times.append(time.perf_counter() - started)
            for i, (seq, token) in enumerate(zip(sequences, tokens)):
                chunk = seq.advance(token, frozenset({EOS}))
                lasts[i] = token
                if chunk is not None:
                    yield chunk
        return build_result(prompt, ids, params, seed, sequences, token_times)

    def next_token_logits(self, prompt, *, chat=False, system=None):
        return self._logits(self.prompt_ids(prompt, chat=chat, system=system)[-1])[0]

    def token_logprobs(self, ids):
        return [self._logits(a).log_softmax(-1)[0, b].item() for a, b in zip(ids, ids[1:])]


def test_an_engine_must_implement_the_contract():
    class Incomplete(Engine):
        def next_token_logits(self, prompt, *, chat=False, system=None):
            raise NotImplementedError

    with pytest.raises(TypeError, match="_decode"):
        Incomplete()
    with pytest.raises(TypeError, match="forward_step"):
        type("NoForward", (BatchingEngine,), {})()


def test_a_third_engine_streams_and_generates_from_the_contract_alone():
    engine = NextLetterEngine()
    params = GenerationParams(greedy=True, max_new_tokens=4)
    generation = engine.stream("abc", params)
    with pytest.raises(RuntimeError, match="not finished"):
        _ = generation.result
    text = "".join(chunk.text for chunk in generation)
    assert text == "defg"
    assert generation.done and generation.result.completions[0].text == "defg"
    assert generation.result.usage.prompt_tokens == 3 and generation.result.usage.completion_tokens == 4
    assert engine.generate("xy", params).completions[0].text == "z .a"
    assert engine.generate("a", GenerationParams(max_new_tokens=3, stop=["c"], greedy=True)).text == "b"
    assert engine.token_logprobs([0, 1])[0] > -0.01
    assert engine.info.capabilities.batching is False


def test_the_server_serves_a_third_engine_one_request_at_a_time():
    from fastapi.testclient import TestClient

    from llmkit.engine.serial import SerialScheduler
    from llmkit.server.app import build_app
    from llmkit.server.settings import ServerSettings

    app = build_app(NextLetterEngine(), ServerSettings())
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert isinstance(app.state.host.scheduler, SerialScheduler)
        body = {"prompt": "hij", "max_tokens": 3, "temperature": 0}
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == "klm"


def test_the_server_batches_an_engine_that_says_it_batches(tiny_engine):
    from llmkit.engine.batch import BatchScheduler
    from llmkit.server.runtime import ModelHost
    from llmkit.server.settings import ServerSettings

    assert tiny_engine.info.capabilities.batching
    assert isinstance(ModelHost(tiny_engine, ServerSettings())._scheduler_for(tiny_engine), BatchScheduler)


def test_a_request_whose_decode_cannot_start_fails_alone():
    """An engine without decode_logprobs asked for them (a caller that skipped the server's check) fails that request
    with one error; the next request is served."""
    from llmkit.engine.scheduling import Failed, Finished
    from llmkit.engine.serial import SerialScheduler
    from llmkit.errors import UnsupportedFeature
    from tests.server_helpers import run_steps, scheduler_request

    engine = NextLetterEngine()
    scheduler = SerialScheduler(engine)
    wants, wants_sink = scheduler_request(engine, "ab", {"max_new_tokens": 2, "greedy": True}, logprobs=1)
    plain, plain_sink = scheduler_request(engine, "ab", {"max_new_tokens": 2, "greedy": True})
    scheduler.submit(wants)
    scheduler.submit(plain)
    run_steps(scheduler)
    assert isinstance(wants_sink.final, Failed) and isinstance(wants_sink.final.error, UnsupportedFeature)
    assert isinstance(plain_sink.final, Finished) and plain_sink.final.result.completions[0].text == "cd"
