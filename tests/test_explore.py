"""llmkit explore: metrics by hand, sweep specs, the next-token view and sweeps on the real tiny model, the CLI."""

import csv
import io
import json
import math
import subprocess
import sys

import pytest
import torch

from llmkit.errors import InvalidParams
from llmkit.explore import (
    PRESET,
    Sample,
    distinct_n,
    grid_knobs,
    next_token_settings,
    next_token_view,
    parse_grid,
    plan_sweep,
    repetition,
    run_sweep,
    setting_metrics,
    stages,
)
from llmkit.params import parse_params

PROMPT = "The sea at night is"


# --- metrics, by hand ------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, the, cat, ran: 4 unique of 6
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(["a b", "b a"], 2) == 1.0  # n-grams never span two samples
    assert distinct_n(["one", ""], 2) is None


def test_repetition_by_hand():
    # trigrams: abc bca cab abc bca -> the last two repeat earlier ones: 2 of 5
    assert repetition("a b c a b c a") == pytest.approx(2 / 5)
    assert repetition("x x x x") == pytest.approx(1 / 2)  # xxx, xxx
    assert repetition("a b c d") == 0.0
    assert repetition("a b") is None
    assert repetition("a\nb  c\ta b c") == pytest.approx(1 / 4)  # words split on any whitespace


def test_setting_metrics_by_hand():
    samples = [
        Sample(
            seed=0,
            text="the cat sat",
            token_ids=(1, 2, 3),
            finish_reason="length",
            logprobs=(-1.0, -2.0, -3.0),
            decode_s=1.0,
            total_s=1.2,
        ),
        Sample(
            seed=1,
            text="the cat ran",
            token_ids=(4, 5),
            finish_reason="stop",
            logprobs=(-0.5, -0.5),
            decode_s=0.5,
            total_s=0.7,
        ),
    ]
    m = setting_metrics(samples)
    assert m.samples == 2
    assert m.distinct_1 == pytest.approx(4 / 6) and m.distinct_2 == pytest.approx(3 / 4)
    assert m.repetition == 0.0
    assert m.mean_logprob == pytest.approx(-7.0 / 5)  # pooled over the 5 generated tokens
    assert m.perplexity == pytest.approx(math.exp(7.0 / 5))
    assert m.mean_tokens == 2.5
    assert m.tokens_per_s == pytest.approx((2 + 1) / 1.5)  # tokens after each first / decode time


# --- sweep specs (no model) ------------------------------------------------------------------------


def test_grid_values_take_the_field_types_and_form_a_product():
    axes = parse_grid(["temperature=0.2,0.7,1.2", "top-p=0.9,1", "greedy=false", "top_k=5"])
    assert axes == {"temperature": [0.2, 0.7, 1.2], "top_p": [0.9, 1.0], "greedy": [False], "top_k": [5]}
    assert type(axes["top_k"][0]) is int and type(axes["top_p"][1]) is float
    knobs = grid_knobs(axes)
    assert len(knobs) == 6
    assert knobs[0] == {"temperature": 0.2, "top_p": 0.9, "greedy": False, "top_k": 5}
    assert knobs[1]["top_p"] == 1.0 and knobs[2]["temperature"] == 0.7  # first axis slowest
    plan = plan_sweep(knobs, samples=2, seed=10)
    assert plan.common == {"greedy": False, "top_k": 5}
    assert [s.label for s in plan.settings][:2] == ["temperature 0.2, top-p 0.9", "temperature 0.2, top-p 1.0"]
    first = plan.settings[0].runs
    assert [p.seed for p in first] == [10, 11]
    assert first[0].top_k == 5 and first[0].min_p == 0.0 and first[0].max_new_tokens == 64


def test_preset_starts_from_plain_sampling_and_greedy_runs_once():
    plan = plan_sweep(PRESET, samples=3, seed=0, fixed={"max_new_tokens": 32})
    labels = [s.label for s in plan.settings]
    assert labels == [
        "greedy",
        "temperature 0.3",
        "temperature 0.7",
        "temperature 1.0",
        "temperature 1.5",
        "top-k 10",
        "top-k 50",
        "top-p 0.9",
        "top-p 0.95",
        "min-p 0.05",
        "min-p 0.1",
    ]
    greedy = plan.settings[0].runs
    assert len(greedy) == 1 and greedy[0].is_greedy and greedy[0].seed is None
    top_p = plan.settings[labels.index("top-p 0.9")].runs
    assert [p.seed for p in top_p] == [0, 1, 2]
    assert (top_p[0].temperature, top_p[0].top_k, top_p[0].top_p, top_p[0].min_p) == (1.0, 0, 0.9, 0.0)
    assert plan.runs == 1 + 10 * 3


def test_bad_specs_raise_invalid_params():
    with pytest.raises(InvalidParams, match="unknown parameter 'temprature'"):
        parse_grid(["temprature=1"])
    with pytest.raises(InvalidParams, match=r"setting 'top-p 0.9': seed must be"):
        plan_sweep([{"top_p": 0.9}], samples=2, seed=2**63 - 1)


# --- engine scoring on the tiny model ---------------------------------------------------------------


def full_logits(engine, ids):
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_token_logprobs_match_a_full_forward(tiny_engine):
    ids = tiny_engine.prompt_ids(PROMPT + " and the boats rest")
    values = tiny_engine.token_logprobs(ids)
    assert len(values) == len(ids) - 1
    logits = full_logits(tiny_engine, ids)
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(values), expected, atol=1e-5)
    assert tiny_engine.token_logprobs(ids[:1]) == [] and tiny_engine.token_logprobs([]) == []
    with pytest.raises(InvalidParams, match="more than the model's context of 256"):
        tiny_engine.token_logprobs([ids[0]] * 257)


def test_next_token_logits_are_the_last_position(tiny_engine):
    logits = tiny_engine.next_token_logits(PROMPT)
    assert logits.dim() == 1 and logits.dtype == torch.float32
    assert torch.allclose(logits, full_logits(tiny_engine, tiny_engine.prompt_ids(PROMPT))[-1], atol=1e-5)


# --- the next-token view ---------------------------------------------------------------------------


def test_probabilities_are_a_tempered_softmax_summing_to_one(tiny_engine):
    logits = tiny_engine.next_token_logits(PROMPT)
    for temperature in (0.5, 1.0, 1.7):
        s = stages(logits, parse_params(temperature=temperature, top_k=0, top_p=0.8))
        assert torch.allclose(s.tempered, torch.softmax(logits / temperature, dim=-1), atol=1e-6)
        assert s.tempered.sum().item() == pytest.approx(1.0, abs=1e-5)  # before truncation
        assert s.final.sum().item() == pytest.approx(1.0, abs=1e-5)  # and after renormalising


def test_top_p_keeps_the_smallest_set_reaching_p(tiny_engine):
    logits = tiny_engine.next_token_logits(PROMPT)
    for p in (0.1, 0.5, 0.9):
        s = stages(logits, parse_params(temperature=1.0, top_k=0, top_p=p))
        kept = int((s.final > 0).sum())
        ordered, order = torch.sort(s.tempered, descending=True)
        mass = torch.cumsum(ordered.double(), 0)
        assert mass[kept - 1] >= p - 1e-6  # the kept set reaches p...
        assert kept == 1 or mass[kept - 2] < p  # ...and one token fewer does not
        assert set(order[:kept].tolist()) == set(torch.nonzero(s.final).flatten().tolist())


def test_view_records_cuts_entropy_and_top_k_one_is_greedy(tiny_engine):
    logits = tiny_engine.next_token_logits(PROMPT)
    settings = next_token_settings([{"temperature": 1.0}, {"top_k": 3}, {"top_k": 1}, {"temperature": 0.5}])
    view = next_token_view(
        logits, settings, decode=lambda i: tiny_engine.tokenizer.decode([i]), top=8, model="tiny", prompt=PROMPT
    )
    plain, top3, top1, cold = view.settings
    model_probs = [row.model_prob for row in plain.rows]
    assert model_probs == sorted(model_probs, reverse=True) and [r.rank for r in plain.rows] == list(range(1, 9))
    assert plain.rows[0].token_id == int(logits.argmax())
    assert plain.entropy_bits == pytest.approx(view.model_entropy_bits)
    p = torch.softmax(logits.double(), -1)
    assert view.model_entropy_bits == pytest.approx(float(-(p * torch.log2(p)).sum()), rel=1e-6)
    assert plain.kept_tokens == view.vocab_size and plain.cut_mass == 0.0
    assert [r.cut_by for r in top3.rows] == [None] * 3 + ["top-k"] * 5
    assert sum(r.prob for r in top3.rows[:3]) == pytest.approx(1.0, abs=1e-5)
    assert top3.kept_tokens == 3 and top3.cut_tokens["top-k"] == view.vocab_size - 3
    assert top3.cut_mass == pytest.approx(1 - sum(model_probs[:3]), abs=1e-5)
    assert top1.rows[0].prob == pytest.approx(1.0) and top1.kept_tokens == 1  # top-k 1 is greedy
    assert cold.entropy_bits < plain.entropy_bits  # a lower temperature sharpens
    assert cold.rows[0].prob > plain.rows[0].prob


# --- sweeps on the tiny model ----------------------------------------------------------------------


def texts(sweep):
    return [[s.text for s in run.samples] for run in sweep.settings]


def test_greedy_is_seed_independent_and_top_k_one_equals_greedy(tiny_engine):
    knobs = [{"greedy": True}, {"top_k": 1}]
    one = run_sweep(tiny_engine, PROMPT, plan_sweep(knobs, samples=3, seed=0, fixed={"max_new_tokens": 8}))
    other = run_sweep(tiny_engine, PROMPT, plan_sweep(knobs, samples=3, seed=9, fixed={"max_new_tokens": 8}))
    greedy, top1 = one.settings
    assert len(greedy.samples) == 1 and greedy.samples[0].seed is None
    assert greedy.samples[0].text == other.settings[0].samples[0].text  # greedy samples are identical
    assert [s.seed for s in top1.samples] == [0, 1, 2]
    assert {s.token_ids for s in top1.samples} == {greedy.samples[0].token_ids}  # every seed
    assert top1.metrics.mean_logprob == pytest.approx(greedy.metrics.mean_logprob)
    assert top1.metrics.distinct_1 == pytest.approx(greedy.metrics.distinct_1 / 3)  # three identical samples


def test_generated_tokens_are_scored_under_the_unmodified_model(tiny_engine):
    sweep = run_sweep(tiny_engine, PROMPT, plan_sweep([{"greedy": True}], fixed={"max_new_tokens": 6}))
    sample = sweep.settings[0].samples[0]
    assert len(sample.logprobs) == len(sample.token_ids) == 6
    prompt_ids = tiny_engine.prompt_ids(PROMPT)
    logits = full_logits(tiny_engine, prompt_ids + list(sample.token_ids))
    best = torch.log_softmax(logits, dim=-1).max(dim=-1).values[len(prompt_ids) - 1 : -1]
    assert torch.allclose(torch.tensor(sample.logprobs), best, atol=1e-5)  # greedy took the argmax each step
    metrics = sweep.settings[0].metrics
    assert metrics.mean_logprob == pytest.approx(sum(sample.logprobs) / 6)
    assert metrics.perplexity == pytest.approx(math.exp(-metrics.mean_logprob))


def test_same_seed_same_sweep(tiny_engine):
    knobs = [{"temperature": 1.5}, {"top_p": 0.9}]

    def sweep(seed):
        return run_sweep(tiny_engine, PROMPT, plan_sweep(knobs, samples=3, seed=seed, fixed={"max_new_tokens": 8}))

    first, again, other = sweep(3), sweep(3), sweep(4)
    assert texts(first) == texts(again)
    assert [[s.logprobs for s in run.samples] for run in first.settings] == [
        [s.logprobs for s in run.samples] for run in again.settings
    ]
    assert texts(first) != texts(other)
    # sample j uses seed + j, so `llmkit generate --seed 4` with the same knobs gives sample 1 alone
    alone = tiny_engine.generate(PROMPT, parse_params(temperature=1.5, top_k=0, seed=4, max_new_tokens=8))
    assert alone.text == first.settings[0].samples[1].text


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "temprature=0.5"], "unknown parameter 'temprature'"),
        (["--param", "temperature=0.5,9"], "temperature must be between 0.0 and 2.0 (got 9.0)"),
        (["--param", "top_k=0.5"], "top_k must be an integer (got '0.5')"),
        (["--param", "temperature"], "--param takes NAME=VALUE"),
        (["--param", "seed=1,2"], "use --seed"),
        (["--param", "top_p=0.9", "--param", "top_p=1"], "given twice"),
        (["--param", "greedy=true", "--param", "num_sequences=2"], "use --samples"),
        (["--samples", "0"], "samples must be between 1 and 16"),
        (["--max-new-tokens", "0"], "max_new_tokens must be between 1 and 4096"),
        (
            ["--param", "temperature=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "--param", "top_k=1,2,3,4,5,6,7,8"],
            "more than 64",
        ),
        (["--json", "--csv"], "choose one of --json and --csv"),
        (["--system", "x"], "--system needs --chat"),
        (["next-token", "--top-p", "0"], "top_p must be greater than 0.0 and at most 1.0 (got 0.0)"),
        (["next-token", "--temperature", "0.5,hot"], "temperature must be a number (got 'hot')"),
        (["next-token", "--top", "0"], "--top must be between 1 and 100"),
    ],
)
def test_bad_parameters_exit_2_before_loading(cli, tmp_path, args, message):
    bogus = ["-m", str(tmp_path / "no-such-model.gguf")]
    if args[0] == "next-token":
        result = cli("explore", "next-token", *bogus, *args[1:], "hi")
    else:
        result = cli("explore", *bogus, *args, "hi")
    assert result.exit_code == 2, result.output
    assert message in result.stderr  # the bogus model path was never reached
    assert len(result.stderr.strip().splitlines()) == 1


def test_sweep_table_json_and_csv(cli, tiny_model_dir):
    base = [
        "explore",
        "-m",
        str(tiny_model_dir),
        "--param",
        "temperature=0.5,1.5",
        "--samples",
        "2",
        "--max-new-tokens",
        "5",
        "--seed",
        "7",
    ]
    table = cli(*base, PROMPT)
    assert table.exit_code == 0, table.stderr
    assert "temperature 0.5" in table.stdout and "dist-1" in table.stdout and "ppl" in table.stdout
    assert "2 settings · 4 generations" in table.stderr and "generations" not in table.stdout

    document = json.loads(cli(*base, "--json", PROMPT).stdout)
    assert document["prompt"] == PROMPT and document["seed"] == 7 and document["samples"] == 2
    assert [s["label"] for s in document["settings"]] == ["temperature 0.5", "temperature 1.5"]
    first = document["settings"][0]
    assert [x["seed"] for x in first["samples"]] == [7, 8]
    assert set(first["metrics"]) == {
        "samples",
        "distinct_1",
        "distinct_2",
        "repetition",
        "mean_logprob",
        "perplexity",
        "mean_tokens",
        "tokens_per_s",
    }
    assert first["params"]["temperature"] == 0.5 and first["params"]["top_k"] == 0

    rows = list(csv.DictReader(io.StringIO(cli(*base, "--csv", PROMPT).stdout)))
    assert [r["setting"] for r in rows] == ["temperature 0.5", "temperature 1.5"]
    assert float(rows[0]["perplexity"]) == pytest.approx(first["metrics"]["perplexity"], rel=1e-6)
    assert rows[0]["example"] == first["samples"][0]["text"] and rows[0]["seeds"] == "7 8"

    explicit = json.loads(cli("explore", "sweep", *base[1:], "--json", PROMPT).stdout)  # the long form
    assert [[x["text"] for x in s["samples"]] for s in explicit["settings"]] == [
        [x["text"] for x in s["samples"]] for s in document["settings"]
    ]


def test_default_preset_through_the_cli(cli, tiny_model_dir):
    result = cli("explore", "-m", str(tiny_model_dir), "--samples", "1", "--max-new-tokens", "3", "--json", PROMPT)
    assert result.exit_code == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    assert [s["label"] for s in settings][:3] == ["greedy", "temperature 0.3", "temperature 0.7"]
    assert len(settings) == len(PRESET)


def test_a_prompt_named_next_token_needs_the_explicit_command(cli, tiny_model_dir):
    args = ["-m", str(tiny_model_dir), "--param", "greedy=true", "--max-new-tokens", "2", "--json"]
    assert json.loads(cli("explore", "sweep", "next-token", *args).stdout)["prompt"] == "next-token"
    assert json.loads(cli("explore", *args, "--", "next-token").stdout)["prompt"] == "next-token"


def test_next_token_table_json_and_plot(cli, tiny_model_dir, tmp_path):
    table = cli("explore", "next-token", "-m", str(tiny_model_dir), PROMPT)
    assert table.exit_code == 0, table.stderr
    for expected in ("Next token after", "top-k 5", "top-p 0.9", "cut: top-k", "entropy bits", "tokens kept"):
        assert expected in table.stdout

    result = cli(
        "explore",
        "next-token",
        "-m",
        str(tiny_model_dir),
        "--temperature",
        "0.5,1",
        "--top-k",
        "0",
        "--top-k",
        "3",
        "--top",
        "5",
        "--json",
        "--plot",
        str(tmp_path / "next.png"),
        PROMPT,
    )
    assert result.exit_code == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["common"] == {} and view["prompt"] == PROMPT
    assert [s["label"] for s in view["settings"]] == [
        "temperature 0.5, top-k 0",
        "temperature 0.5, top-k 3",
        "temperature 1.0, top-k 0",
        "temperature 1.0, top-k 3",
    ]
    assert all(len(s["rows"]) == 5 for s in view["settings"])
    assert [r["cut_by"] for r in view["settings"][1]["rows"]] == [None] * 3 + ["top-k"] * 2
    assert (tmp_path / "next.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in result.stderr


def test_explore_help_and_argument_errors_do_not_import_torch():
    probe = (
        "import sys\nfrom llmkit.cli import app\n"
        "for argv in (['explore', '--help'], ['explore', 'next-token', '--help'],\n"
        "             ['explore', '--param', 'temprature=1', 'x'],\n"
        "             ['explore', 'next-token', '--top-p', '0', 'x']):\n"
        "    try:\n        app(argv, prog_name='llmkit')\n    except SystemExit:\n        pass\n"
        "print('TORCH' if 'torch' in sys.modules or 'transformers' in sys.modules else 'LIGHT')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "LIGHT", out.stdout + out.stderr
