"""Small pure functions from logits to the next token.

Written out rather than borrowed from transformers' logits processors because each
request needs its own seeded `torch.Generator` (a seed must give the same text alone
or batched), and because explore shows the intermediate distributions. The order:

    logit_bias, repetition penalty, presence/frequency penalties      (on the logits; greedy reads these)
    temperature, top-n-sigma, top-k, top-p, min-p, typical-p          (next_token_probs: deterministic)
    XTC                                                               (random: each row's own generator)

logit_bias comes first and the penalties after it, as in vLLM; temperature, top-k, top-p, min-p and typical-p
in transformers' order. top-n-sigma keeps the same tokens at any temperature (max and std scale alike).
XTC reads the distribution the other filters left, as top-p and min-p do here (llama.cpp applies its
temperature last, so there XTC reads untempered probabilities). Definitions and sources: docs/sampling.md.

Penalties that count what the output holds (presence, frequency) count only generated tokens, as OpenAI and
vLLM do; repetition_penalty counts the prompt too, as transformers does. The decode loops pass `seen` (prompt +
generated ids per row) and `prompt_len` (how many of its leading ids are the prompt) whenever
`needs_history(params)`.

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


def apply_logit_bias(logits: torch.Tensor, bias: dict[str, float]) -> torch.Tensor:
    """OpenAI's logit_bias: add bias[str(id)] to token id's logit in every row (ids beyond the logits are skipped:
    the engines refuse them before decoding, Engine.check_context)."""
    if not bias:
        return logits
    pairs = [(int(key), value) for key, value in bias.items() if int(key) < logits.shape[-1]]
    if not pairs:
        return logits
    ids = torch.tensor([i for i, _ in pairs], device=logits.device)
    values = torch.tensor([v for _, v in pairs], dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, values.expand(*logits.shape[:-1], -1))


def apply_presence_frequency(
    logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logit[t] -= presence * (count[t] > 0) + frequency * count[t], where count[t] is how many
    times row's `generated` ids (rows of ids) hold t. Negative values encourage repeats."""
    if (presence == 0.0 and frequency == 0.0) or generated.shape[-1] == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, generated.long(), torch.ones_like(generated, dtype=logits.dtype))
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def needs_history(params: GenerationParams) -> bool:
    """Whether pick_tokens reads the ids seen so far (a penalty is on); the decode loops keep them only then."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def adjusted_logits(
    logits: torch.Tensor, params: GenerationParams, seen: torch.Tensor | None = None, prompt_len: int = 0
) -> torch.Tensor:
    """The logits after logit_bias and the penalties: what greedy decoding takes the argmax of."""
    logits = apply_logit_bias(logits, params.logit_bias)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        logits = apply_presence_frequency(
            logits, seen[:, prompt_len:], params.presence_penalty, params.frequency_penalty
        )
    return logits


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


def top_n_sigma_mask(logits: torch.Tensor, n: float) -> torch.Tensor:
    """Top-n-sigma (Tang et al. 2024, llama.cpp's top_n_sigma): keep tokens whose logit is at least max - n * std,
    std being the population standard deviation of the row's finite logits; n <= 0 keeps all."""
    if n <= 0.0:
        return logits
    finite = torch.isfinite(logits)
    count = finite.sum(dim=-1, keepdim=True).clamp(min=1)
    values = torch.where(finite, logits, torch.zeros_like(logits))
    mean = values.sum(dim=-1, keepdim=True) / count
    std = torch.sqrt(
        (torch.where(finite, logits - mean, torch.zeros_like(logits)) ** 2).sum(dim=-1, keepdim=True) / count
    )
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits < top - n * std, float("-inf"))


def typical_mask(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022), as transformers' TypicalLogitsWarper: rank tokens by how far
    their surprise -log p is from the entropy, keep them in that order until the mass reaches `mass` (the token
    that crosses it included); zero the rest. `probs` rows need not sum to 1 (earlier filters zeroed some)."""
    if mass >= 1.0:
        return probs
    p = probs / probs.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)
    log_p = torch.log(p)  # -inf where zeroed: those rank last (an infinite distance)
    entropy = -(torch.where(p > 0, p * log_p, torch.zeros_like(p))).sum(dim=-1, keepdim=True)
    distance = (-log_p - entropy).abs()
    ranked, order = torch.sort(distance, dim=-1)
    mass_so_far = torch.cumsum(p.gather(-1, order), dim=-1)
    last = (mass_so_far < mass).sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    cutoff = ranked.gather(-1, last)  # the distance of the token that reaches the mass
    return probs.masked_fill(distance > cutoff, 0.0)


def xtc_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """XTC ("exclude top choices", p-e-w): where two or more tokens have probability >= threshold, zero all of
    them but the least likely of those; other rows are unchanged. Deterministic: xtc_apply draws the coin."""
    above = probs >= threshold
    several = above.sum(dim=-1, keepdim=True) >= 2
    least_above = torch.where(above, probs, torch.full_like(probs, float("inf"))).min(dim=-1, keepdim=True).values
    return probs.masked_fill(several & above & (probs > least_above), 0.0)


def xtc_apply(probs: torch.Tensor, params: GenerationParams, generators: list[torch.Generator]) -> torch.Tensor:
    """XTC on the rows whose own coin (a uniform draw from the row's generator) falls at or below
    xtc_probability; no draw at all when XTC is off (probability 0, or threshold above 0.5, where no two tokens
    can both reach it), so other settings keep their random streams unchanged."""
    if params.xtc_probability <= 0.0 or params.xtc_threshold > 0.5:
        return probs
    coins = torch.stack([torch.rand((), generator=g, device=g.device).to(probs.device) for g in generators])
    excluded = xtc_mask(probs, params.xtc_threshold)
    return torch.where((coins <= params.xtc_probability)[:, None], excluded, probs)


def next_token_probs(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Distribution to sample from after temperature, top-n-sigma, top-k, top-p, min-p and typical-p (rows sum to
    1, always finite). XTC, being random, comes after this (pick_tokens)."""
    logits = finite_logits(logits.float())
    scaled = logits / max(params.temperature, MIN_TEMPERATURE)
    scaled = top_k_mask(top_n_sigma_mask(scaled, params.top_n_sigma), params.top_k)
    probs = torch.softmax(scaled, dim=-1)
    probs = min_p_mask(top_p_mask(probs, params.top_p), params.min_p)
    probs = typical_mask(probs, params.typical_p)
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
    prompt_len: int = 0,
) -> torch.Tensor:
    """One token id per row of `logits`; row i samples with generators[i]. `seen`: each row's ids so far (prompt
    then generated), needed when needs_history(params); its first `prompt_len` columns are the prompt."""
    logits = logits.float()  # penalties and argmax in float32 whatever the model computes in (argmax: 3x faster too)
    logits = adjusted_logits(logits, params, seen, prompt_len)
    if params.is_greedy or generators is None:
        return torch.argmax(logits, dim=-1)
    probs = next_token_probs(logits, params)
    if params.xtc_probability > 0.0:
        probs = normalized(xtc_apply(probs, params, generators), logits)
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
