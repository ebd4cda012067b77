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
    assert top_p_mask(probs, 0.8).tolist() == [[0.125, 0.5, 0.25, 0.0]] or \
        top_p_mask(probs, 0.8).tolist() == [[0.0, 0.5, 0.25, 0.125]]  # a tie: either 0.125 completes the set
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
