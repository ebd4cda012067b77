"""Small pure functions from logits to the next token.

Written out rather than borrowed from transformers' logits processors because each
request needs its own seeded `torch.Generator` (a seed must give the same text alone
or batched), and because explore shows the intermediate distributions. The order
matches transformers: repetition penalty, temperature, top-k, top-p, min-p.

Every value GenerationParams accepts is numerically safe here, whatever the model's dtype:
each filter keeps at least the most likely token, NaN logits count as impossible tokens, and a
row whose distribution still comes out empty or non-finite (a model that produced NaN or inf
everywhere) falls back to its most likely token. So `torch.multinomial` never sees a bad row and
one request's extreme settings cannot raise inside a batch that other requests share.
"""

from __future__ import annotations

import torch

from llmkit.params import GenerationParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens in `seen` (rows of ids): divide positive logits, multiply negative."""
    if penalty == 1.0:
        return logits
    picked = torch.gather(logits, 1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


MIN_TEMPERATURE = 1e-6  # temperatures below this divide by it instead (the distribution is already one-hot)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN becomes -inf (never picked) and +inf the largest finite value, so softmax and top-k stay defined."""
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=big)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (k <= 0 or k >= vocab keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


TOP_P_CANDIDATES = 1024  # top-p first looks among this many most likely tokens (topk: 78 us vs 7 ms to sort 49k)


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p; zero the rest.

    The set almost always lies among the TOP_P_CANDIDATES most likely tokens, so those are ranked
    first; only rows whose candidates do not reach p rank the whole vocabulary. Same result either way.
    """
    if p >= 1.0:
        return probs
    ranked, order = torch.topk(probs, min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)  # sorted, descending
    if ranked.shape[-1] < probs.shape[-1] and not bool((ranked.sum(dim=-1) >= p).all()):
        ranked, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(ranked, dim=-1) - ranked
    keep_ranked = mass_before < p  # the mass before this token had not reached p yet
    keep_ranked[..., 0] = True  # the most likely token always stays (p below float32's resolution keeps nothing)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep_ranked)
    return probs.masked_fill(~keep, 0.0)


def min_p_mask(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Zero tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return probs
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return probs.masked_fill(probs < threshold, 0.0)


def next_token_probs(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Distribution to sample from after temperature, top-k, top-p and min-p (rows sum to 1, always finite)."""
    logits = finite_logits(logits.float())
    scaled = top_k_mask(logits / max(params.temperature, MIN_TEMPERATURE), params.top_k)
    probs = torch.softmax(scaled, dim=-1)
    probs = min_p_mask(top_p_mask(probs, params.top_p), params.min_p)
    return normalized(probs, logits)


def normalized(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum to 1; a row with no finite positive mass becomes one-hot on its most likely token."""
    total = probs.sum(dim=-1, keepdim=True)
    usable = torch.isfinite(total) & (total > 0)
    if bool(usable.all()):
        return probs / total
    fallback = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(usable, probs / total.where(usable, torch.ones_like(total)), fallback)


def pick_tokens(
    logits: torch.Tensor,
    params: GenerationParams,
    generators: list[torch.Generator] | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row of `logits`; row i samples with generators[i]."""
    logits = logits.float()  # penalties and argmax in float32 whatever the model computes in (argmax: 3x faster too)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.is_greedy or generators is None:
        return torch.argmax(logits, dim=-1)
    probs = next_token_probs(logits, params)
    picked = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(picked)


MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's and vLLM's default cap)


def raw_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """Per row of `logits` [rows, vocab]: (log p of tokens[row], its `top` most likely tokens as (id, log p), most
    likely first), under the model's raw distribution: the log-softmax of the logits themselves, before any of the
    transforms above (no penalty, temperature or filter touches them), in float32.

    Written as logit - logsumexp(logits), the very formula of the engines' `token_logprobs`, so a prompt scored here
    and there gives the same numbers. Costs one logsumexp (and one topk when `top` > 0) per row: no forward pass.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = (logits.gather(1, tokens.to(logits.device).long()[:, None]) - lse).squeeze(1).tolist()
    if top <= 0:
        return [(value, ()) for value in chosen]
    values, ids = torch.topk(logits, min(top, logits.shape[-1]), dim=-1)
    tops = (values - lse).tolist()
    return [(value, tuple(zip(row_ids, row_values))) for value, row_ids, row_values in zip(chosen, ids.tolist(), tops)]
