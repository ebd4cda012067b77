"""The batch loop on the real shipped models: Gemma 3 (sliding-window layers) and SmolLM2 (plain Llama)."""

import pytest

from llmkit.engine.batch import BatchScheduler
from llmkit.engine.scheduling import BatchRequest, Finished
from llmkit.params import parse_params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_requests_joining_a_running_batch_get_the_engines_text(model):
    from llmkit.engine import load_engine

    engine = load_engine(model)
    jobs = [
        ("The capital of France is", dict(greedy=True, max_new_tokens=24)),
        ("A poem about rain:", dict(seed=42, temperature=0.9, max_new_tokens=20)),
        (
            "Once upon a time there was a very long prompt about a lighthouse and the sea,",
            dict(seed=7, num_sequences=2, top_p=0.9, max_new_tokens=16),
        ),
    ]
    references = [engine.generate(prompt, parse_params(spec)) for prompt, spec in jobs]
    scheduler = BatchScheduler(engine)
    finals = {}
    for i, (prompt, spec) in enumerate(jobs):
        scheduler.submit(
            BatchRequest(
                prompt,
                engine.prompt_ids(prompt),
                parse_params(spec),
                lambda event, i=i: finals.__setitem__(i, event) if isinstance(event, Finished) else None,
            )
        )
        for _ in range(3):  # the next one arrives while this one decodes
            scheduler.step()
    while scheduler.step():
        pass
    for i, reference in enumerate(references):
        assert [c.token_ids for c in finals[i].result.completions] == [c.token_ids for c in reference.completions]
