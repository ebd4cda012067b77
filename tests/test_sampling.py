"""Sampling functions checked against values computed by hand."""

import math

import pytest
import torch

from llmkit.engine.sampling import (
    apply_repetition_penalty,
    min_p_mask,
    next_token_probs,
    pick_tokens,
    top_k_mask,
    top_p_mask,
)
from llmkit.params import parse_params


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_mask(logits, 2).tolist() == [[-math.inf, 4.0, 3.0, -math.inf]]
    assert torch.equal(top_k_mask(logits, 0), logits)
    assert torch.equal(top_k_mask(logits, 4), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.125, 0.5, 0.25, 0.125]])  # exact in binary floating point
    # 0.5 alone < 0.7; 0.5 + 0.25 = 0.75 >= 0.7: keep exactly those two
    assert top_p_mask(probs, 0.7).tolist() == [[0.0, 0.5, 0.25, 0.0]]
    # exactly reaching p stops there
    assert top_p_mask(probs, 0.5).tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert top_p_mask(probs, 0.8).tolist() == [[0.125, 0.5, 0.25, 0.0]] or top_p_mask(probs, 0.8).tolist() == [
        [0.0, 0.5, 0.25, 0.125]
    ]  # a tie: either 0.125 completes the set
    assert torch.equal(top_p_mask(probs, 1.0), probs)


def test_min_p_relative_to_top():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    assert min_p_mask(probs, 0.5).tolist() == [[0.5, 0.25, 0.0, 0.0]]  # threshold 0.5 * 0.5 = 0.25 is kept


def test_temperature_scales_softmax_and_rows_sum_to_one():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = parse_params(temperature=0.5, top_k=0)
    expected = torch.softmax(logits / 0.5, dim=-1)
    probs = next_token_probs(logits, params)
    assert torch.allclose(probs, expected)
    assert probs.sum().item() == pytest.approx(1.0)


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[0, 1]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_is_argmax_and_top_k_one_equals_greedy():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = pick_tokens(logits, parse_params(greedy=True), None)
    assert greedy.tolist() == logits.argmax(-1).tolist()
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert pick_tokens(logits, parse_params(top_k=1, temperature=1.0), gens).tolist() == greedy.tolist()


def test_seeded_generators_reproduce():
    logits = torch.zeros(2, 1000)
    params = parse_params(temperature=1.0, top_k=0)
    first = pick_tokens(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2)])
    again = pick_tokens(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert first.tolist() == again.tolist()


def test_top_p_candidates_and_full_sort_agree():
    """Peaked rows are decided among the top candidates, flat rows fall back to ranking everything."""
    from llmkit.engine.sampling import TOP_P_CANDIDATES

    def by_full_sort(probs, p):
        ranked, order = torch.sort(probs, dim=-1, descending=True)
        keep = (torch.cumsum(ranked, dim=-1) - ranked) < p
        return probs.masked_fill(~torch.zeros_like(keep).scatter(-1, order, keep), 0.0)

    generator = torch.Generator().manual_seed(0)
    vocab = 8 * TOP_P_CANDIDATES
    peaked = torch.softmax(torch.randn(1, vocab, generator=generator) * 4, dim=-1)
    flat = torch.softmax(torch.randn(1, vocab, generator=generator) * 0.1, dim=-1)
    assert torch.topk(peaked, TOP_P_CANDIDATES).values.sum() > 0.95 > torch.topk(flat, TOP_P_CANDIDATES).values.sum()
    for probs in (peaked, flat, torch.cat([peaked, flat])):
        for p in (0.5, 0.9, 0.95):
            assert torch.equal(top_p_mask(probs, p), by_full_sort(probs, p))


# --- numerical safety: every value the schema accepts, any logits a model can produce -------------------------

EXTREMES = {
    "temperature": [1e-300, 1e-30, 1e-7, 2.0],
    "top_k": [0, 1, 100_000],
    "top_p": [1e-300, 1e-50, 1e-8, 0.5, 1.0],
    "min_p": [0.0, 1e-30, 0.999999, 1.0],
    "repetition_penalty": [0.5, 2.0],
}


def _logit_rows(vocab: int) -> torch.Tensor:
    """Ordinary rows, peaked and flat ones, huge values, and rows a broken model gives (NaN, inf, all -inf)."""
    generator = torch.Generator().manual_seed(1)
    rows = [
        torch.randn(vocab, generator=generator),
        torch.randn(vocab, generator=generator) * 1e4,
        torch.zeros(vocab),
        torch.full((vocab,), 3.0e38),
        torch.full((vocab,), float("nan")),
        torch.full((vocab,), float("-inf")),
        torch.full((vocab,), float("inf")),
    ]
    mixed = torch.randn(vocab, generator=generator)
    mixed[::3] = float("nan")
    mixed[1::5] = float("-inf")
    mixed[7] = float("inf")
    return torch.stack([*rows, mixed])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_accepted_setting_gives_a_finite_distribution_and_a_token(dtype):
    """The NaN class of bug (top_p=1e-50 emptied the distribution and torch.multinomial raised, failing every
    row of a server batch): for each extreme alone and for all of them combined, on each dtype a model computes
    in, the distribution is finite, non-negative, sums to 1, keeps a token, and sampling returns a valid id."""
    import itertools

    vocab = 300
    logits = _logit_rows(vocab).to(dtype)
    seen = torch.randint(0, vocab, (logits.shape[0], 5), generator=torch.Generator().manual_seed(2))
    settings = [{name: value} for name, values in EXTREMES.items() for value in values]
    settings += [
        dict(zip(EXTREMES, combo)) for combo in itertools.product(*(v[:1] + v[-1:] for v in EXTREMES.values()))
    ]
    for spec in settings:
        params = parse_params(spec)
        probs = next_token_probs(logits, params)
        assert torch.isfinite(probs).all() and (probs >= 0).all(), spec
        assert torch.allclose(probs.sum(-1), torch.ones(logits.shape[0]), atol=1e-5), spec
        assert ((probs > 0).sum(-1) >= 1).all(), spec
        generators = [torch.Generator().manual_seed(i) for i in range(logits.shape[0])]
        picked = pick_tokens(logits, params, generators, seen)
        assert picked.shape == (logits.shape[0],) and ((0 <= picked) & (picked < vocab)).all(), spec


def test_tiny_top_p_keeps_the_most_likely_token():
    probs = torch.tensor([[0.125, 0.5, 0.375]])
    assert top_p_mask(probs, 1e-50).tolist() == [[0.0, 0.5, 0.0]]  # p below float32's resolution: top-1, not nothing
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    gens = [torch.Generator().manual_seed(0)]
    assert pick_tokens(logits, parse_params(top_p=1e-50, temperature=2.0), gens).tolist() == [1]


def test_a_row_without_usable_mass_falls_back_to_its_most_likely_finite_token():
    logits = torch.tensor([[float("nan"), 2.0, float("nan"), 1.0], [1.0, 0.5, 0.0, 3.0]])
    probs = next_token_probs(logits, parse_params(temperature=1.0, top_k=0))
    assert probs[0, 0] == 0 and probs[0, 2] == 0  # NaN logits are impossible tokens
    assert torch.allclose(probs[1], torch.softmax(logits[1], dim=-1))  # an ordinary row is untouched
    broken = torch.full((1, 4), float("nan"))
    broken_probs = next_token_probs(broken, parse_params(temperature=1.0))
    assert broken_probs.sum() == 1 and (broken_probs >= 0).all()
