"""The batched decode loop, driven step by step in-process: same tokens as the CLI engine, alone or batched."""

import pytest

from llmkit.engine.batch import BatchScheduler, Cancelled, Failed, Finished, QueueFull, RequestTimeout
from llmkit.params import parse_params
from tests.server_helpers import completions, run_steps, scheduler_request

PROMPTS = ["Once upon a time", "The sea at night is dark and quiet, and the boats rest", "Hello",
           "Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e"]
SPECS = [dict(greedy=True, max_new_tokens=20), dict(seed=3, temperature=1.0, max_new_tokens=25),
         dict(seed=5, temperature=0.9, top_p=0.9, num_sequences=2, max_new_tokens=15),
         dict(seed=7, repetition_penalty=1.3, temperature=0.7, min_p=0.05, max_new_tokens=18, stop=["e"])]


@pytest.fixture(scope="module")
def references(tiny_engine):
    return [tiny_engine.generate(p, parse_params(s)) for p, s in zip(PROMPTS, SPECS)]


def test_batched_together_equals_alone(tiny_engine, references):
    scheduler = BatchScheduler(tiny_engine)
    sinks = []
    for prompt, spec in zip(PROMPTS, SPECS):
        req, sink = scheduler_request(tiny_engine, prompt, spec)
        scheduler.submit(req)
        sinks.append(sink)
    run_steps(scheduler)
    for sink, reference in zip(sinks, references):
        assert isinstance(sink.final, Finished)
        assert completions(sink.final.result) == completions(reference)
        assert sink.final.result.seed == reference.seed
        for index, completion in enumerate(reference.completions):  # the stream adds up to the text
            assert "".join(c.text for c in sink.chunks if c.index == index) == completion.text


def test_joining_a_running_batch_equals_alone(tiny_engine, references):
    """Newcomers are prefilled and merged into a batch that is mid-generation (the KV cache left-padding path)."""
    scheduler = BatchScheduler(tiny_engine)
    sinks = {}
    for i in (0, 1):
        req, sinks[i] = scheduler_request(tiny_engine, PROMPTS[i], SPECS[i])
        scheduler.submit(req)
    for _ in range(3):
        scheduler.step()
    req, sinks[2] = scheduler_request(tiny_engine, PROMPTS[2], SPECS[2])
    scheduler.submit(req)
    for _ in range(4):
        scheduler.step()
    req, sinks[3] = scheduler_request(tiny_engine, PROMPTS[3], SPECS[3])
    scheduler.submit(req)
    run_steps(scheduler)
    for i, reference in enumerate(references):
        assert completions(sinks[i].final.result) == completions(reference), i
    assert scheduler.running_rows == 0 and scheduler._cache is None


def test_cancelled_and_expired_requests_leave_and_others_are_unaffected(tiny_engine, references):
    scheduler = BatchScheduler(tiny_engine)
    keep, keep_sink = scheduler_request(tiny_engine, PROMPTS[1], SPECS[1])
    gone, gone_sink = scheduler_request(tiny_engine, PROMPTS[0], dict(greedy=True, max_new_tokens=200))
    late, late_sink = scheduler_request(tiny_engine, PROMPTS[2], SPECS[2], deadline=0.0)  # already past its deadline
    for req in (gone, keep, late):
        scheduler.submit(req)
    scheduler.step()
    assert isinstance(late_sink.final, Failed) and isinstance(late_sink.final.error, RequestTimeout)
    scheduler.step()
    gone.cancel("disconnect")
    scheduler.step()
    assert isinstance(gone_sink.final, Failed) and isinstance(gone_sink.final.error, Cancelled)
    assert scheduler.running_rows == 1
    run_steps(scheduler)
    assert completions(keep_sink.final.result) == completions(references[1])


def test_queue_bound_and_batch_size_are_respected(tiny_engine):
    scheduler = BatchScheduler(tiny_engine, max_batch_size=2, max_queue=2)
    first, _ = scheduler_request(tiny_engine, "a", dict(seed=1, num_sequences=2, max_new_tokens=3))
    second, second_sink = scheduler_request(tiny_engine, "b", dict(greedy=True, max_new_tokens=3))
    scheduler.submit(first)
    scheduler.submit(second)
    with pytest.raises(QueueFull):
        scheduler.submit(scheduler_request(tiny_engine, "c", dict(greedy=True))[0])
    scheduler.step()
    assert scheduler.running_rows == 2 and scheduler.waiting == 1  # the second waits for room
    run_steps(scheduler)
    assert isinstance(second_sink.final, Finished)


def test_timings_count_from_arrival(tiny_engine):
    scheduler = BatchScheduler(tiny_engine)
    req, sink = scheduler_request(tiny_engine, "Hello", dict(greedy=True, max_new_tokens=4))
    scheduler.submit(req)
    run_steps(scheduler)
    finished = sink.final
    assert finished.queue_s >= 0 and finished.prefill_s > 0
    timings = finished.result.timings
    assert timings.ttft_s >= finished.queue_s and timings.total_s >= timings.ttft_s
    assert len(timings.token_times_s) == finished.result.usage.completion_tokens == 4
