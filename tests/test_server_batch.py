"""The batched decode loop, driven step by step in-process: same tokens as the CLI engine, alone or batched."""

import pytest

from llmkit.engine.batch import BatchScheduler
from llmkit.engine.scheduling import Failed, Finished
from llmkit.errors import Cancelled, QueueFull, RequestTimeout
from llmkit.params import parse_params
from tests.server_helpers import completions, run_steps, scheduler_request, submit_all

PROMPTS = [
    "Once upon a time",
    "The sea at night is dark and quiet, and the boats rest",
    "Hello",
    "Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e",
]
SPECS = [
    dict(greedy=True, max_new_tokens=20),
    dict(seed=3, temperature=1.0, max_new_tokens=25),
    dict(seed=5, temperature=0.9, top_p=0.9, num_sequences=2, max_new_tokens=15),
    dict(seed=7, repetition_penalty=1.3, temperature=0.7, min_p=0.05, max_new_tokens=18, stop=["e"]),
]


@pytest.fixture(scope="module")
def references(tiny_engine):
    return [tiny_engine.generate(p, parse_params(s)) for p, s in zip(PROMPTS, SPECS)]


def test_batched_together_equals_alone(tiny_engine, references):
    scheduler = BatchScheduler(tiny_engine)
    sinks = submit_all(scheduler, tiny_engine, PROMPTS, SPECS)
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
    scheduler.submit(first)  # takes both free rows
    scheduler.submit(second)  # waits beyond them: 1 in the queue
    scheduler.submit(scheduler_request(tiny_engine, "c", dict(greedy=True, max_new_tokens=3))[0])  # 2 in the queue
    with pytest.raises(QueueFull):
        scheduler.submit(scheduler_request(tiny_engine, "d", dict(greedy=True))[0])
    scheduler.step()
    assert scheduler.running_rows == 2 and scheduler.waiting == 2  # the others wait for room
    run_steps(scheduler)
    assert isinstance(second_sink.final, Finished)


def test_a_burst_fills_free_rows_first_and_only_the_rest_counts_against_the_queue(tiny_engine):
    """--max-queue 2 with 4 free rows: 6 of a burst of 10 are accepted (4 run at the next step, 2 wait)."""
    scheduler = BatchScheduler(tiny_engine, max_batch_size=4, max_queue=2)
    outcomes = []
    for i in range(10):
        try:
            scheduler.submit(scheduler_request(tiny_engine, f"p{i}", dict(greedy=True, max_new_tokens=4))[0])
            outcomes.append("accepted")
        except QueueFull:
            outcomes.append("full")
    assert outcomes == ["accepted"] * 6 + ["full"] * 4
    scheduler.step()
    assert scheduler.running_rows == 4 and scheduler.waiting == 2
    with pytest.raises(QueueFull):  # the batch is full and 2 wait: the queue bound holds
        scheduler.submit(scheduler_request(tiny_engine, "late", dict(greedy=True))[0])
    run_steps(scheduler)
    big = scheduler_request(tiny_engine, "n", dict(seed=1, num_sequences=3, max_new_tokens=2))[0]
    scheduler.submit(big)  # 3 of 4 rows
    scheduler.submit(scheduler_request(tiny_engine, "one", dict(greedy=True, max_new_tokens=2))[0])  # the 4th row
    scheduler.submit(scheduler_request(tiny_engine, "two", dict(seed=2, num_sequences=2))[0])  # waits (1)
    scheduler.submit(scheduler_request(tiny_engine, "three", dict(greedy=True))[0])  # FIFO: waits behind it (2)
    with pytest.raises(QueueFull):
        scheduler.submit(scheduler_request(tiny_engine, "four", dict(greedy=True))[0])
    run_steps(scheduler)


POISON_SEED = 666


def test_a_request_whose_sampling_fails_leaves_alone_and_its_batch_mates_finish(tiny_engine, references, monkeypatch):
    """A row forced to fail while sampling, in the same sampling group as a healthy request (same settings)
    and batched with others: only it fails; the others give exactly the text they give alone."""
    import llmkit.engine.rows as rows

    real_pick = rows.pick_tokens

    def poisoned_pick(logits, params, generators, seen=None, prompt_len=0):
        if any(g.initial_seed() == POISON_SEED for g in generators or []):
            raise RuntimeError("poisoned row")
        return real_pick(logits, params, generators, seen, prompt_len)

    monkeypatch.setattr(rows, "pick_tokens", poisoned_pick)
    scheduler = BatchScheduler(tiny_engine)
    sinks = []
    for prompt, spec in zip(PROMPTS, SPECS):
        req, sink = scheduler_request(tiny_engine, prompt, spec)
        sinks.append(sink)
        scheduler.submit(req)
        if len(sinks) == 2:  # right after SPECS[1] (seed 3, temperature 1.0): the same sampling group
            poison, poison_sink = scheduler_request(tiny_engine, "poison", {**SPECS[1], "seed": POISON_SEED})
            scheduler.submit(poison)
    run_steps(scheduler)
    assert isinstance(poison_sink.final, Failed) and poison_sink.final.error.kind == "server_error"
    assert "other requests were not affected" in str(poison_sink.final.error)
    for sink, reference in zip(sinks, references):
        assert isinstance(sink.final, Finished)
        assert completions(sink.final.result) == completions(reference)
    assert scheduler.failures.requests == 1 and scheduler.failures.steps == 0
    assert scheduler.running_rows == 0 and scheduler._cache is None


def test_a_request_whose_text_handling_fails_leaves_alone(tiny_engine, references, monkeypatch):
    """The same class one step later: the failure is in turning tokens into text (stop strings here)."""
    from llmkit.engine.detokenize import StopMatcher

    real_feed = StopMatcher.feed

    def poisoned_feed(self, text):
        if "POISON" in self.stops:
            raise ValueError("poisoned stop matcher")
        return real_feed(self, text)

    monkeypatch.setattr(StopMatcher, "feed", poisoned_feed)
    scheduler = BatchScheduler(tiny_engine)
    healthy = [scheduler_request(tiny_engine, p, s) for p, s in zip(PROMPTS, SPECS)]
    poison, poison_sink = scheduler_request(tiny_engine, "x", dict(greedy=True, max_new_tokens=30, stop=["POISON"]))
    for req, _ in healthy[:2]:
        scheduler.submit(req)
    scheduler.step()  # the first two are decoding when the poisoned one joins
    scheduler.submit(poison)
    for req, _ in healthy[2:]:
        scheduler.submit(req)
    run_steps(scheduler)
    assert isinstance(poison_sink.final, Failed)
    for (_, sink), reference in zip(healthy, references):
        assert completions(sink.final.result) == completions(reference)


def test_a_failed_forward_pass_fails_its_batch_is_counted_and_the_next_batch_works(
    tiny_engine, references, monkeypatch
):
    scheduler = BatchScheduler(tiny_engine)
    real_step = tiny_engine.forward_step
    calls = {"n": 0}

    def flaky_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the forward pass broke")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "forward_step", flaky_step)
    first = [scheduler_request(tiny_engine, p, s) for p, s in zip(PROMPTS[:2], SPECS[:2])]
    for req, _ in first:
        scheduler.submit(req)
    run_steps(scheduler)
    assert all(isinstance(sink.final, Failed) and sink.final.error.kind == "server_error" for _, sink in first)
    assert scheduler.failures.steps == 1 and scheduler.failures.steps_in_a_row == 1
    assert scheduler.failures.last[1] == "step" and "forward pass broke" in scheduler.failures.last[2]
    req, sink = scheduler_request(tiny_engine, PROMPTS[0], SPECS[0])
    scheduler.submit(req)
    run_steps(scheduler)
    assert completions(sink.final.result) == completions(references[0])
    assert scheduler.failures.steps_in_a_row == 0  # a step worked again


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
