"""The samplers clients send (presence/frequency penalties, logit_bias, typical_p, top-n-sigma, XTC): each against a
direct computation on hand-made logits, then through every entry point on the tiny model (CLI, both OpenAI
endpoints and /generate, batched rows with their own settings, explore's grid, the llama.cpp engine)."""

import json
import math

import pytest
import torch

from llmkit.engine.sampling import (
    apply_logit_bias,
    apply_presence_frequency,
    needs_history,
    next_token_probs,
    pick_tokens,
    top_n_sigma_mask,
    typical_mask,
    xtc_apply,
    xtc_mask,
)
from llmkit.errors import InvalidParams
from llmkit.params import parse_bias, parse_params, sampling_key
from tests.server_helpers import app_client

BIASED = 200  # a plain token of the tiny model (vocabulary 400; 0 and 1 are <bos> and <eos>)
PROMPT = "Once upon a time"


# --- each sampler against a direct computation -------------------------------------------------------------


def test_logit_bias_adds_to_the_named_ids():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    out = apply_logit_bias(logits, {"0": 5.0, "3": -100.0})
    assert out.tolist() == [[6.0, 2.0, 3.0, -96.0], [5.0, 0.0, 0.0, -100.0]]
    assert apply_logit_bias(logits[0], {"1": 1.5}).tolist() == [1.0, 3.5, 3.0, 4.0]  # one row, as explore passes


def test_presence_and_frequency_penalties_count_generated_ids():
    logits = torch.zeros(2, 5)
    generated = torch.tensor([[1, 1, 3], [4, 4, 4]])
    out = apply_presence_frequency(logits, generated, presence=0.5, frequency=0.25)
    # row 0: token 1 twice -> 0.5 + 2 * 0.25, token 3 once -> 0.5 + 0.25; row 1: token 4 three times
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75, 0.0], [0.0, 0.0, 0.0, 0.0, -1.25]]
    negative = apply_presence_frequency(logits, generated, presence=-1.0, frequency=0.0)
    assert negative[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_penalties_leave_prompt_tokens_alone():
    """Token 2 fills the prompt, token 1 was generated once: only token 1 is penalized (OpenAI and vLLM)."""
    logits = torch.tensor([[0.0, 1.0, 0.9, 0.0]])
    seen = torch.tensor([[2, 2, 2, 1]])
    params = parse_params(greedy=True, presence_penalty=0.2)
    assert needs_history(params) and not needs_history(parse_params(greedy=True))
    assert pick_tokens(logits, params, None, seen, prompt_len=3).tolist() == [2]  # 0.8 < 0.9
    assert pick_tokens(logits, params, None, seen, prompt_len=0).tolist() == [1]  # counting the prompt: 0.7 < 0.8


def test_top_n_sigma_keeps_logits_within_n_std_of_the_max():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, float("-inf")]])  # finite: mean 2, population std sqrt(2.5)
    std = math.sqrt(2.5)
    inf = float("-inf")
    assert top_n_sigma_mask(logits, 1.0).tolist() == [[4.0, 3.0, inf, inf, inf]]  # threshold 4 - 1.58
    assert top_n_sigma_mask(logits, 2.0).tolist() == [[4.0, 3.0, 1.0, inf, inf]]  # threshold 4 - 3.16
    assert 4.0 - 2.0 * std > 0.0 and top_n_sigma_mask(logits, 0.0) is logits
    # the same tokens at any temperature: max and std scale alike
    assert torch.equal(torch.isinf(top_n_sigma_mask(logits / 0.3, 1.0)), torch.isinf(top_n_sigma_mask(logits, 1.0)))


def test_typical_p_by_hand():
    """p = (0.7, 0.2, 0.1): entropy 0.8018; |surprise - entropy| = 0.445, 0.808, 1.501, so tokens rank 0, 1, 2."""
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert torch.equal(typical_mask(probs, 0.5), torch.tensor([[0.7, 0.0, 0.0]]))  # token 0 alone reaches 0.5
    assert torch.equal(typical_mask(probs, 0.8), torch.tensor([[0.7, 0.2, 0.0]]))  # 0.7 < 0.8: token 1 crosses it
    assert typical_mask(probs, 1.0) is probs
    # the typical set need not hold the most likely token: with p = (0.4, 0.3, 0.3) the 0.3s are nearer the entropy
    odd = torch.tensor([[0.4, 0.3, 0.3]])
    entropy = -sum(p * math.log(p) for p in (0.4, 0.3, 0.3))
    assert abs(-math.log(0.3) - entropy) < abs(-math.log(0.4) - entropy)
    assert torch.equal(typical_mask(odd, 0.2), torch.tensor([[0.0, 0.3, 0.3]]))  # both 0.3 tie at the cutoff distance


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_matches_transformers_typical_warper(mass):
    from transformers.generation.logits_process import TypicalLogitsWarper

    logits = torch.randn(4, 60, generator=torch.Generator().manual_seed(3)) * 3
    logits[1, :30] = float("-inf")  # a row an earlier filter cut
    expected = torch.isfinite(TypicalLogitsWarper(mass)(None, logits.clone()))
    kept = typical_mask(torch.softmax(logits, dim=-1), mass) > 0
    assert torch.equal(kept, expected)


def test_xtc_removes_all_top_choices_but_the_least_likely():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.6, 0.2, 0.1, 0.1]])
    # row 0: 0.4, 0.3, 0.2 reach 0.2 -> keep 0.2 (and 0.1, below it); row 1: 0.6 and 0.2 reach it -> keep 0.2
    assert torch.equal(xtc_mask(probs, 0.2), torch.tensor([[0.0, 0.0, 0.2, 0.1], [0.0, 0.2, 0.1, 0.1]]))
    assert torch.equal(xtc_mask(probs, 0.35), probs)  # one token at most reaches it: nothing removed


def test_xtc_coin_is_each_rows_own_draw():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2)
    coins = [float(torch.rand((), generator=torch.Generator().manual_seed(s))) for s in (5, 6)]
    between = (min(coins) + max(coins)) / 2  # one coin falls at or below this probability, the other above
    params = parse_params(temperature=1.0, xtc_probability=between, xtc_threshold=0.2)
    out = xtc_apply(probs, params, [torch.Generator().manual_seed(s) for s in (5, 6)])
    for row, coin in enumerate(coins):
        expected = [0.0, 0.0, 0.2, 0.1] if coin <= between else [0.4, 0.3, 0.2, 0.1]
        assert torch.equal(out[row], torch.tensor(expected))
    # off (probability 0, or a threshold above 0.5): no draw, so the row's random stream is untouched
    generator = torch.Generator().manual_seed(5)
    for off in (dict(xtc_probability=0.0), dict(xtc_probability=1.0, xtc_threshold=0.6)):
        assert torch.equal(xtc_apply(probs[:1], parse_params(**off), [generator]), probs[:1])
    assert float(torch.rand((), generator=generator)) == coins[0]


def test_pick_tokens_with_xtc_never_draws_a_removed_top_choice():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    params = parse_params(temperature=1.0, top_k=0, xtc_probability=1.0, xtc_threshold=0.15)
    picked = {int(pick_tokens(logits, params, [torch.Generator().manual_seed(s)])[0]) for s in range(60)}
    assert picked == {2, 3}


def test_next_token_probs_applies_typical_and_top_n_sigma_in_order():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0]])
    params = parse_params(temperature=1.0, top_k=0, top_n_sigma=1.0)
    expected = torch.softmax(torch.tensor([4.0, 3.0]), dim=-1).tolist() + [0.0, 0.0]
    assert next_token_probs(logits, params)[0].tolist() == pytest.approx(expected)


def test_greedy_reads_bias_and_penalties_but_not_the_filters():
    greedy = parse_params(greedy=True, logit_bias={"3": 10.0})
    assert pick_tokens(torch.tensor([[5.0, 0.0, 0.0, 0.0]]), greedy, None).tolist() == [3]
    assert sampling_key(parse_params(greedy=True, typical_p=0.5)) == sampling_key(parse_params(greedy=True))
    assert sampling_key(parse_params(greedy=True, frequency_penalty=1.0)) != sampling_key(parse_params(greedy=True))


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field", "sentence"),
    [
        (dict(presence_penalty=2.5), "presence_penalty", "presence_penalty must be between -2.0 and 2.0 (got 2.5)"),
        (dict(frequency_penalty=-3.0), "frequency_penalty", "frequency_penalty must be between -2.0 and 2.0"),
        (dict(typical_p=0.0), "typical_p", "typical_p must be greater than 0.0 and at most 1.0 (got 0.0)"),
        (dict(top_n_sigma=11.0), "top_n_sigma", "top_n_sigma must be between 0.0 and 10.0"),
        (dict(xtc_probability=1.5), "xtc_probability", "xtc_probability must be between 0.0 and 1.0"),
        (dict(logit_bias={"a": 1.0}), "logit_bias", "logit_bias keys must be token ids"),
        (dict(logit_bias={"-1": 1.0}), "logit_bias", "logit_bias keys must be token ids"),
        (dict(logit_bias={"5": 101.0}), "logit_bias", "logit_bias values must be between -100 and 100"),
        (dict(logit_bias={"5": float("nan")}), "logit_bias", "logit_bias values must be between -100 and 100"),
    ],
)
def test_bad_values_name_their_field(values, field, sentence):
    with pytest.raises(InvalidParams) as caught:
        parse_params(values)
    assert caught.value.field == field and sentence in str(caught.value)


def test_parse_bias_reads_cli_pairs():
    assert parse_bias(["42=5", " 7=-100"]) == {"42": 5.0, "7": -100.0}
    with pytest.raises(InvalidParams, match="TOKEN_ID=BIAS"):
        parse_bias(["42"])


# --- the tiny model: CLI ------------------------------------------------------------------------------------


def test_cli_options_parse_and_bias_forces_the_token(cli, tiny_model_dir, tiny_engine):
    result = cli(
        "generate", "-m", str(tiny_model_dir), "--seed", "3", "--max-tokens", "5", "--json",
        "--logit-bias", f"{BIASED}=100", "--presence-penalty", "0.5", "--frequency-penalty", "0.5",
        "--typical-p", "0.9", "--top-n-sigma", "2", "--xtc-probability", "0.5", "--xtc-threshold", "0.1", PROMPT,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = json.loads(result.stdout)["completions"][0]["text"]
    assert text == tiny_engine.tokenizer.decode([BIASED] * 5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--presence-penalty", "5"], "presence_penalty must be between -2.0 and 2.0 (got 5.0)"),
        (["--logit-bias", "abc"], "logit_bias takes TOKEN_ID=BIAS"),
        (["--logit-bias", "5=500"], "logit_bias values must be between -100 and 100"),
        (["--typical-p", "0"], "typical_p must be greater than 0.0"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(cli, args, message):
    result = cli("generate", "-m", "nowhere-model", *args, "hi")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_bias_outside_the_vocabulary_exits_2(cli, tiny_model_dir):
    result = cli("generate", "-m", str(tiny_model_dir), "--logit-bias", "400=1", "hi")
    assert result.exit_code == 2
    assert "logit_bias names token 400, outside the model's vocabulary (ids 0 to 399)" in result.output


# --- the tiny model: HTTP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_engine):
    with app_client(tiny_engine) as test_client:
        yield test_client


SAMPLERS = {
    "presence_penalty": 0.8,
    "frequency_penalty": 0.6,
    "typical_p": 0.9,
    "top_n_sigma": 1.5,
    "xtc_probability": 0.5,
    "xtc_threshold": 0.05,
}


def test_http_accepts_the_openai_names_on_every_endpoint(client, tiny_engine):
    expected = tiny_engine.generate(PROMPT, parse_params(seed=4, max_new_tokens=8, **SAMPLERS)).text
    body = {"max_tokens": 8, "seed": 4, **SAMPLERS}
    answer = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == expected
    generate = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "seed": 4, **SAMPLERS})
    assert generate.status_code == 200, generate.text
    assert generate.json()["completion"] == expected
    chat = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "logit_bias": {str(BIASED): 100}, **body},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == tiny_engine.tokenizer.decode([BIASED] * 8)


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/completions", {"presence_penalty": 3}, "presence_penalty", "presence_penalty must be between -2.0"),
        ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias", "logit_bias keys must be token ids"),
        ("/v1/completions", {"logit_bias": {"5": -200}}, "logit_bias", "logit_bias values must be between -100"),
        ("/v1/completions", {"logit_bias": {"4000": 1}}, "logit_bias", "outside the model's vocabulary"),
        ("/v1/chat/completions", {"typical_p": 2}, "typical_p", "typical_p must be greater than 0.0"),
        ("/v1/chat/completions", {"logit_bias": {"4000": 1}}, "logit_bias", "outside the model's vocabulary"),
    ],
)
def test_http_bad_values_are_a_400_naming_the_field(client, path, body, param, message):
    head = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    answer = client.post(path, json={**head, "max_tokens": 2, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_generate_endpoint_bad_value_names_the_field(client):
    answer = client.post("/generate", json={"prompt": "hi", "frequency_penalty": -9})
    assert answer.status_code == 400 and answer.json()["field"] == "frequency_penalty"


# --- the tiny model: batched rows keep their own settings ----------------------------------------------------

BATCH_SPECS = [
    dict(seed=1, max_new_tokens=10, logit_bias={str(BIASED): 100.0}),
    dict(seed=1, max_new_tokens=10),
    dict(seed=1, max_new_tokens=10, presence_penalty=-2.0, frequency_penalty=-2.0),  # repeats encouraged
    dict(seed=1, max_new_tokens=10, xtc_probability=1.0, xtc_threshold=0.02, num_sequences=2),
    dict(seed=2, max_new_tokens=10, typical_p=0.5, top_n_sigma=1.0),
    dict(greedy=True, max_new_tokens=10, frequency_penalty=-2.0),
]


def test_batched_rows_with_different_samplers_equal_alone(tiny_engine):
    from llmkit.engine.batch import BatchScheduler
    from llmkit.engine.scheduling import Finished
    from tests.server_helpers import completions, run_steps, scheduler_request

    alone = [tiny_engine.generate(PROMPT, parse_params(spec)) for spec in BATCH_SPECS]
    scheduler = BatchScheduler(tiny_engine)
    sinks = []
    for spec in BATCH_SPECS:
        request, sink = scheduler_request(tiny_engine, PROMPT, spec)
        scheduler.submit(request)
        sinks.append(sink)
    run_steps(scheduler)
    for sink, reference in zip(sinks, alone):
        assert isinstance(sink.final, Finished)
        assert completions(sink.final.result) == completions(reference)
    assert list(alone[0].completions[0].token_ids) == [BIASED] * 10  # the biased row: its token every step
    assert BIASED not in alone[1].completions[0].token_ids  # its neighbour, same seed, is not biased
    assert len(set(alone[2].completions[0].token_ids)) < 10 == len(set(alone[1].completions[0].token_ids))
    greedy = tiny_engine.generate(PROMPT, parse_params(greedy=True, max_new_tokens=10)).completions[0].token_ids
    assert len(set(alone[5].completions[0].token_ids)) < len(set(greedy))  # greedy reads the penalties too


# --- explore and llama.cpp ----------------------------------------------------------------------------------


def test_explore_grid_takes_the_new_knobs():
    from llmkit.explore import GRID_NAMES, parse_grid

    assert {"presence_penalty", "logit_bias", "typical_p", "top_n_sigma", "xtc_probability"} <= set(GRID_NAMES)
    axes = parse_grid(["xtc_probability=0,0.5", f"logit_bias={BIASED}=10;7=-100", "typical_p=0.5,1"])
    assert axes == {
        "xtc_probability": [0.0, 0.5],
        "logit_bias": [{str(BIASED): 10.0, "7": -100.0}],
        "typical_p": [0.5, 1.0],
    }
    with pytest.raises(InvalidParams, match="frequency_penalty must be between"):
        parse_grid(["frequency_penalty=4"])


def test_llamacpp_engine_samples_through_the_same_samplers(tmp_path):
    pytest.importorskip("llama_cpp")
    from llmkit.engine import load_engine
    from tests.tiny_gguf import write_tiny_gguf

    llama = load_engine(str(write_tiny_gguf(tmp_path / "tiny.gguf")), engine="llama.cpp")
    target = 5 if llama.vocab_size > 5 else llama.vocab_size - 1
    forced = llama.generate("hello world", parse_params(seed=1, max_new_tokens=6, logit_bias={str(target): 100.0}))
    assert list(forced.completions[0].token_ids) == [target] * 6
    params = parse_params(seed=2, max_new_tokens=6, presence_penalty=1.0, xtc_probability=0.5, typical_p=0.9)
    assert llama.generate("hello world", params).text == llama.generate("hello world", params).text
    with pytest.raises(InvalidParams, match="outside the model's vocabulary"):
        llama.generate("hello world", parse_params(logit_bias={str(llama.vocab_size): 1.0}))


def test_remote_engine_sends_the_openai_names():
    from types import SimpleNamespace

    from llmkit.engine.remote import EXTENSION_KNOBS, RemoteEngine

    fake = SimpleNamespace(probe=SimpleNamespace(refused={"xtc_threshold"}))
    params = parse_params(seed=1, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"7": -100.0}, typical_p=0.9)
    body = RemoteEngine._fields(fake, params, 1)  # type: ignore[arg-type]
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == 0.25
    assert body["logit_bias"] == {"7": -100.0} and body["typical_p"] == 0.9 and body["xtc_probability"] == 0.0
    assert "xtc_threshold" not in body  # refused by this server: dropped, and `unhonoured` names it
    assert "logit_bias" not in RemoteEngine._fields(fake, parse_params(seed=1), 1)  # type: ignore[arg-type]
    assert {"typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold"} <= set(EXTENSION_KNOBS)
