"""See what sampling parameters do: sweeps over settings, and the next-token distribution.

A sweep runs one prompt under many settings on one loaded model:

    sweep spec (the preset, or `--param NAME=V1,V2` axes) -> settings (each a validated
    GenerationParams per sample, through `parse_params`) -> `engine.generate` -> records
    (`Sweep`, `SettingRun`, `Sample`) with metrics computed by small pure functions.

Choices, and why:

- Every setting starts from plain sampling (temperature 1.0, top-k 0, top-p 1.0, min-p 0.0), not
  from `llmkit generate`'s defaults (temperature 0.8, top-k 50), so a setting is exactly the
  knobs its label names: "top-p 0.9" is top-p alone. `--param top_k=50` adds generate's top-k.
- Sample j of *every* setting uses seed `--seed + j`. Settings then share their random numbers
  (common random numbers), so two settings differ by their parameters rather than by luck, and
  any sample is reproduced alone by `llmkit generate --seed <its seed>` with its parameters.
- Greedy settings are deterministic (the seed is not used), so they run one sample.
- Samples run one at a time (not as a batch), so tokens/s means the same for every setting.

Metrics (word-level ones split the text on whitespace, so they compare across tokenizers):

- distinct-n: unique word n-grams / all word n-grams, pooled over the setting's samples
  (n-grams never cross from one sample into another); higher is more diverse.
- repetition: within one sample, the share of word trigrams that repeat an earlier trigram of
  the same sample (1 - unique/total), averaged over samples; high values mean loops.
- mean log-prob: mean over all generated tokens (the end-of-sequence token included) of
  log p(token | prompt and earlier tokens) under the unmodified model (no temperature or
  truncation), from `engine.generate_scored` (a server's own logprobs for a URL model, when it
  returns them; else none); perplexity = exp(-mean log-prob).
- tokens: mean generated tokens per sample (tokenizer counts).
- tokens/s: decode speed, as `llmkit generate` reports it: generated tokens after each sample's
  first / time from first to last token, pooled over samples.

The next-token view takes the model's logits for the token after a prompt and shows, per
setting, each stage of `sampling.next_token_probs` (temperature, then top-k, top-p, min-p):
which tokens each filter cut, the entropy and the final probabilities.

A server (a URL model) gives only its top_logprobs: the N most likely tokens, not the whole
distribution. `partial_next_token_view` shows them with the probability mass they cover. A setting
is exact when what it keeps is provably among the shown tokens (plain sampling; top-k <= N; top-p
at temperature 1 reached within them; min-p whose threshold is above the least shown token). A
temperature alone gives upper bounds (marked ≤); anything else is computed over the shown tokens
as if they were all (marked ≈). At temperature 1, top-p's cut of each shown token is exact even
when the kept set runs past them.

Importing this module is light: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, get_origin

from llmkit.errors import InvalidParams
from llmkit.params import MAX_SEQUENCES, PARAM_NAMES, GenerationParams, names_of, neutral_values, parse_params

if TYPE_CHECKING:
    import torch

# The base every setting starts from: sampling with no knob turned (each sampling knob of llmkit/params.py's
# table at its neutral value: temperature 1.0, top-k 0, top-p 1.0, min-p 0.0, ...).
PLAIN_SAMPLING: dict[str, Any] = neutral_values()

# The default sweep: one knob at a time, from the plain-sampling base.
PRESET: tuple[dict[str, Any], ...] = (
    {"greedy": True},
    {"temperature": 0.3},
    {"temperature": 0.7},
    {"temperature": 1.0},
    {"temperature": 1.5},
    {"top_k": 10},
    {"top_k": 50},
    {"top_p": 0.9},
    {"top_p": 0.95},
    {"min_p": 0.05},
    {"min_p": 0.1},
)
# The default next-token view: temperature sharpening / flattening, then what top-k and top-p cut.
NEXT_TOKEN_PRESET: tuple[dict[str, Any], ...] = (
    {"temperature": 1.0},
    {"temperature": 0.5},
    {"temperature": 1.5},
    {"top_k": 5},
    {"top_p": 0.9},
)
NEXT_TOKEN_KNOBS = ("temperature", "top_k", "top_p", "min_p")  # the filters `stages` shows, in their order

DEFAULT_SAMPLES = 3
DEFAULT_MAX_NEW_TOKENS = 32  # explore runs ~30 generations by default: keep each short
DEFAULT_SEED = 0
DEFAULT_TOP = 10
MAX_TOP = 100
MAX_SETTINGS = 64
MAX_SAMPLES = MAX_SEQUENCES
DISTINCT_N = (1, 2)
REPETITION_N = 3
# Set by their own options, not by --param: the draws of llmkit/params.py's table.
RESERVED = {"seed": "--seed (sample j of every setting uses seed + j)", "num_sequences": "--samples"}


def grid_names(model: type[GenerationParams] = GenerationParams) -> tuple[str, ...]:
    """What --param takes: every parameter of the table but the draws (seed, num_sequences), set by explore."""
    set_elsewhere = names_of("draws", model) + names_of("constraint", model)  # a constraint is not a grid axis
    return tuple(name for name in model.model_fields if name not in set_elsewhere)


GRID_NAMES = grid_names()

Progress = Callable[[int, int, str], None]  # (runs done, runs in all, what runs now)


# --- sweep specs ----------------------------------------------------------------------------------


def parse_value(name: str, raw: str) -> Any:
    """One grid value from text into the field's type (its GenerationParams annotation), bounds checked."""
    from pydantic import TypeAdapter, ValidationError

    if name not in PARAM_NAMES:
        parse_params({name: raw})  # raises the one "unknown parameter ... (known: ...)" sentence
    annotation = GenerationParams.model_fields[name].annotation
    if get_origin(annotation) is list:  # stop: each grid value is one stop sequence
        value: Any = [raw]
    elif get_origin(annotation) is dict:  # logit_bias: each grid value is ID=BIAS[;ID=BIAS...]
        from llmkit.params import parse_bias

        value = parse_bias(raw.split(";"), name)
    else:
        try:
            value = TypeAdapter(Any if annotation is None else annotation).validate_strings(raw.strip())
        except ValidationError:
            parse_params({name: raw})  # raises "top_k must be an integer (got '0.5')"
            raise InvalidParams(f"{name}: cannot read {raw!r}", field=name) from None
    parse_params({name: value})  # bounds: "temperature must be between 0.0 and 2.0 (got 5.0)"
    return value


def parse_grid(specs: Iterable[str]) -> dict[str, list[Any]]:
    """`["temperature=0.2,0.7", "top_p=0.9,1.0"]` -> {"temperature": [0.2, 0.7], "top_p": [0.9, 1.0]}."""
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise InvalidParams(
                f"--param takes NAME=VALUE[,VALUE...], e.g. temperature=0.2,0.7 (got {spec!r})", field="param"
            )
        if name in PARAM_NAMES and name not in GRID_NAMES:
            own = RESERVED.get(name, "the option of explore that sets it")
            raise InvalidParams(f"{name} is not a grid parameter; use {own}", field=name)
        if name in axes:
            raise InvalidParams(f"--param {name} is given twice; list all its values once: {name}=A,B", field=name)
        axes[name] = [parse_value(name, part) for part in raw.split(",")]
    return axes


def grid_knobs(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, first axis slowest, as one knob dict per setting."""
    names = list(axes)
    count = math.prod(len(axes[name]) for name in names)
    if count > MAX_SETTINGS:
        raise InvalidParams(f"the grid has {count} settings, more than {MAX_SETTINGS}; use fewer values", field="param")
    return [dict(zip(names, values)) for values in itertools.product(*(axes[name] for name in names))]


def knob_label(knobs: Mapping[str, Any]) -> str:
    """{"temperature": 0.7, "top_p": 0.9} -> "temperature 0.7, top-p 0.9"; {"greedy": True} -> "greedy"."""
    parts = []
    for name, value in knobs.items():
        shown = name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(shown if value else f"no {shown}")
        elif isinstance(value, list):
            parts.append(f"{shown} {', '.join(repr(v) for v in value)}")
        else:
            parts.append(f"{shown} {value}")
    return ", ".join(parts) or "plain sampling"


def common_knobs(knob_sets: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Knobs every set has with the same value (a one-value grid axis): shown once, not in every label."""
    if len(knob_sets) < 2:
        return {}
    first = knob_sets[0]
    return {k: v for k, v in first.items() if all(k in other and other[k] == v for other in knob_sets[1:])}


def labels_for(knob_sets: Sequence[Mapping[str, Any]]) -> list[str]:
    common = common_knobs(knob_sets)
    return [knob_label({k: v for k, v in knobs.items() if k not in common}) for knobs in knob_sets]


@dataclass(frozen=True)
class Setting:
    """One row of a sweep: its knobs, its label, and one validated GenerationParams per sample."""

    label: str
    knobs: dict[str, Any]
    runs: tuple[GenerationParams, ...]


@dataclass(frozen=True)
class SweepPlan:
    settings: tuple[Setting, ...]
    seed: int
    samples: int  # per sampled setting; greedy settings run one
    common: dict[str, Any]  # knobs every setting shares (left out of the labels)

    @property
    def runs(self) -> int:
        return sum(len(s.runs) for s in self.settings)


def plan_sweep(
    knob_sets: Sequence[Mapping[str, Any]],
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
    fixed: Mapping[str, Any] | None = None,
) -> SweepPlan:
    """Validate every run of the sweep before any model loads (a bad value fails here, with its setting)."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise InvalidParams(f"samples must be between 1 and {MAX_SAMPLES} (got {samples})", field="samples")
    parse_params(seed=seed)  # "seed must be between ..."
    settings = []
    for knobs, label in zip(knob_sets, labels_for(knob_sets)):
        values = {**PLAIN_SAMPLING, **(fixed or {}), **knobs}
        try:
            base = parse_params(values)
            seeds: list[int | None] = [None] if base.is_greedy else [seed + j for j in range(samples)]
            runs = tuple(parse_params({**values, "seed": s}) for s in seeds)
        except InvalidParams as exc:
            raise InvalidParams(f"setting '{label}': {exc}", field=exc.field) from None
        settings.append(Setting(label, dict(knobs), runs))
    return SweepPlan(tuple(settings), seed, samples, common_knobs(knob_sets))


# --- metrics (pure) -------------------------------------------------------------------------------


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams over all texts (None when there are none)."""
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition(text: str, n: int = REPETITION_N) -> float | None:
    """Share of the word n-grams in `text` that repeat an earlier one of the same text (None if none)."""
    grams = ngrams(text.split(), n)
    return 1 - len(set(grams)) / len(grams) if grams else None


def mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class Sample:
    seed: int | None
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[float, ...]  # one per generated token, under the unmodified model
    decode_s: float  # first generated token to last
    total_s: float  # request start to last token

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "text": self.text,
            "tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "mean_logprob": mean_or_none(self.logprobs),
            "repetition": repetition(self.text),
        }


@dataclass(frozen=True)
class Metrics:
    samples: int
    distinct_1: float | None
    distinct_2: float | None
    repetition: float | None
    mean_logprob: float | None
    perplexity: float | None
    mean_tokens: float
    tokens_per_s: float | None


def setting_metrics(samples: Sequence[Sample]) -> Metrics:
    texts = [s.text for s in samples]
    logprobs = [lp for s in samples for lp in s.logprobs]
    mean_logprob = sum(logprobs) / len(logprobs) if logprobs else None
    after_first = sum(max(len(s.token_ids) - 1, 0) for s in samples)
    decode_s = sum(s.decode_s for s in samples)
    return Metrics(
        samples=len(samples),
        distinct_1=distinct_n(texts, DISTINCT_N[0]),
        distinct_2=distinct_n(texts, DISTINCT_N[1]),
        repetition=mean_or_none(repetition(t) for t in texts),
        mean_logprob=mean_logprob,
        perplexity=math.exp(-mean_logprob) if mean_logprob is not None else None,
        mean_tokens=sum(len(s.token_ids) for s in samples) / len(samples) if samples else 0.0,
        tokens_per_s=after_first / decode_s if after_first and decode_s > 0 else None,
    )


# --- running a sweep ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingRun:
    label: str
    knobs: dict[str, Any]
    params: dict[str, Any]  # the first run's parameters, seed left out (it differs per sample)
    samples: tuple[Sample, ...]
    metrics: Metrics

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "knobs": self.knobs,
            "params": self.params,
            "metrics": asdict(self.metrics),
            "samples": [s.to_dict() for s in self.samples],
        }


@dataclass(frozen=True)
class Sweep:
    model: str
    prompt: str
    prompt_tokens: int
    seed: int
    samples: int  # requested per sampled setting; greedy settings run one
    common: dict[str, Any]  # knobs every setting shares
    settings: tuple[SettingRun, ...]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        """The --json schema: full texts, per-sample seeds and every metric."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "prompt_tokens": self.prompt_tokens,
            "seed": self.seed,
            "samples": self.samples,
            "common": self.common,
            "elapsed_s": self.elapsed_s,
            "settings": [s.to_dict() for s in self.settings],
        }

    def rows(self) -> list[dict[str, Any]]:
        """The --csv rows: one per setting, its parameters and metrics, and its first sample's text."""
        rows = []
        for run in self.settings:
            params = {
                name: run.params[name]
                for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "greedy", "max_new_tokens")
            }
            rows.append(
                {
                    "setting": run.label,
                    **params,
                    **asdict(run.metrics),
                    "seeds": " ".join(str(s.seed) for s in run.samples if s.seed is not None),
                    "example": run.samples[0].text if run.samples else "",
                }
            )
        return rows


def run_sweep(
    engine,
    prompt: str,
    plan: SweepPlan,
    *,
    chat: bool = False,
    system: str | None = None,
    progress: Progress | None = None,
) -> Sweep:
    """Generate every run of every setting with `engine.generate`, score it, and compute the metrics."""
    started = time.perf_counter()
    total = plan.runs
    done = 0
    results = []
    prompt_tokens = 0
    for setting in plan.settings:
        samples = []
        for j, params in enumerate(setting.runs):
            if progress:
                where = f" · sample {j + 1}/{len(setting.runs)}" if len(setting.runs) > 1 else ""
                progress(done, total, f"{setting.label}{where}")
            result, scores = engine.generate_scored(prompt, params, chat=chat, system=system)
            completion = result.completions[0]
            prompt_tokens = result.usage.prompt_tokens
            samples.append(
                Sample(
                    seed=result.seed,
                    text=completion.text,
                    token_ids=completion.token_ids,
                    finish_reason=completion.finish_reason,
                    logprobs=tuple(scores[0] or ()),  # none from a server that returns no logprobs
                    decode_s=result.timings.decode_s,
                    total_s=result.timings.total_s,
                )
            )
            done += 1
        shared = setting.runs[0].model_dump(exclude={"seed"})  # what every run of the setting has in common
        results.append(SettingRun(setting.label, setting.knobs, shared, tuple(samples), setting_metrics(samples)))
    if progress:
        progress(done, total, "done")
    return Sweep(
        model=engine.info.model,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        seed=plan.seed,
        samples=plan.samples,
        common=plan.common,
        settings=tuple(results),
        elapsed_s=time.perf_counter() - started,
    )


# --- the next-token view --------------------------------------------------------------------------


def next_token_settings(knob_sets: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any], GenerationParams]]:
    """(label, knobs, params) per setting, validated from the plain-sampling base before any load."""
    settings = []
    for knobs, label in zip(knob_sets, labels_for(knob_sets)):
        try:
            params = parse_params({**PLAIN_SAMPLING, **knobs})
        except InvalidParams as exc:
            raise InvalidParams(f"setting '{label}': {exc}", field=exc.field) from None
        settings.append((label, dict(knobs), params))
    return settings


@dataclass(frozen=True)
class Stages:
    """The distribution after each step of `sampling.next_token_probs` (1-D tensors over the vocabulary)."""

    tempered: torch.Tensor  # softmax(logits / temperature): sums to 1, nothing cut yet
    after_top_k: torch.Tensor  # renormalised over the top-k survivors
    after_top_p: torch.Tensor  # renormalised over what top-k and top-p kept
    final: torch.Tensor  # what sampling draws from: sums to 1


def stages(logits: torch.Tensor, params: GenerationParams) -> Stages:
    """Each step of next_token_probs, obtained by running it with the later steps switched off."""
    from llmkit.engine.sampling import apply_logit_bias, next_token_probs

    logits = apply_logit_bias(logits.float(), params.logit_bias)  # the first token: no penalty has anything to count

    def upto(**off: Any) -> torch.Tensor:
        return next_token_probs(logits, params.model_copy(update=off))

    return Stages(
        tempered=upto(top_k=0, top_p=1.0, min_p=0.0, top_n_sigma=0.0, typical_p=1.0),
        after_top_k=upto(top_p=1.0, min_p=0.0, typical_p=1.0),  # top-n-sigma, a cut like top-k, counts with it
        after_top_p=upto(min_p=0.0, typical_p=1.0),
        final=next_token_probs(logits, params),
    )


def entropy_bits(probs: torch.Tensor) -> float:
    import torch

    p = probs[probs > 0].double()
    return max(0.0, float(-(p * torch.log2(p)).sum()))  # one token at p = 1 gives -0.0, not a negative


@dataclass(frozen=True)
class TokenRow:
    rank: int  # by the model's own probability (temperature 1, nothing cut)
    token_id: int | None  # None: a server's top_logprobs name tokens by their text only
    token: str
    model_prob: float
    tempered_prob: float  # after temperature, before truncation
    prob: float  # what this setting samples it with
    cut_by: str | None  # "top-k", "top-p" or "min-p" when a filter removed it


@dataclass(frozen=True)
class SettingView:
    label: str
    knobs: dict[str, Any]
    params: dict[str, Any]
    entropy_bits: float
    kept_tokens: int | None  # None: unknown (a partial view whose setting keeps tokens beyond the shown ones)
    cut_tokens: dict[str, int]  # per filter (a partial view: among the shown tokens)
    cut_mass: float | None  # tempered probability removed by the filters (None: unknown, in a partial view)
    rows: tuple[TokenRow, ...]
    exact: bool = True  # False: a partial view's probabilities are bounds or approximations (mark says which)
    mark: str = ""  # partial views: "" exact, "≤" upper bounds (a temperature alone), "≈" over the shown tokens alone


@dataclass(frozen=True)
class NextTokenView:
    model: str
    prompt: str
    prompt_tokens: int
    vocab_size: int | None  # None: unknown (a server)
    model_entropy_bits: float  # a partial view: a lower bound (the tokens not shown taken as one)
    common: dict[str, Any]  # knobs every setting shares (left out of the labels)
    settings: tuple[SettingView, ...]
    partial: bool = False  # only the top tokens a server returned (top_logprobs), not the whole distribution
    shown_mass: float | None = None  # partial: the probability the shown tokens cover (temperature 1)
    cap: int | None = None  # partial: the most tokens the server returns
    asked: int | None = None  # partial: how many were asked for, when fewer came back (merged: same text)
    constraint: str | None = None  # the constraint every setting samples under (--json-schema ...), if any
    constraint_removed_tokens: int | None = None  # tokens its mask removed before the knobs act
    constraint_removed_mass: float | None = None  # the model's probability (temperature 1) those tokens held

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cut_by(token: int, cuts: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """The first filter whose mask removed `token`, or None when it survived them all."""
    return next((name for name, mask in cuts if mask[token]), None)


def next_token_view(
    logits: torch.Tensor,
    settings: Sequence[tuple[str, dict[str, Any], GenerationParams]],
    *,
    decode: Callable[[int], str],
    top: int = DEFAULT_TOP,
    model: str = "",
    prompt: str = "",
    prompt_tokens: int = 0,
    allowed: torch.Tensor | None = None,
    constraint: str | None = None,
) -> NextTokenView:
    """The top tokens of the model's distribution and, per setting, what each sampling step does to them.
    `allowed` (a bool mask over the vocabulary, from a constraint named `constraint`): the settings sample from
    those tokens alone, and the view says how many tokens and how much of the model's probability it removed."""
    import torch

    logits = logits.float().reshape(-1)
    model_probs = torch.softmax(logits, dim=-1)
    removed_tokens = removed_mass = None
    unmasked = logits
    if allowed is not None:
        removed_tokens = int((~allowed).sum())
        removed_mass = float(model_probs[~allowed].sum())
        logits = logits.masked_fill(~allowed, float("-inf"))  # a constraint comes first: the knobs act on the rest
    top_ids = torch.topk(model_probs, min(top, logits.shape[0])).indices.tolist()
    ranks = {i: r + 1 for r, i in enumerate(top_ids)}
    if allowed is not None:  # also the most likely tokens the constraint keeps: what the settings sample from
        kept = torch.topk(model_probs.masked_fill(~allowed, -1.0), min(top, logits.shape[0])).indices.tolist()
        extra = [i for i in kept if i not in ranks and bool(allowed[i])]
        for i in extra:
            ranks[i] = int((model_probs > model_probs[i]).sum()) + 1
        top_ids = sorted(ranks, key=ranks.__getitem__)
    names = {i: decode(i) for i in top_ids}
    views = []
    for label, knobs, params in settings:
        s = stages(logits, params)
        cut_k = (s.tempered > 0) & (s.after_top_k == 0)
        cut_p = (s.after_top_k > 0) & (s.after_top_p == 0)
        cut_min = (s.after_top_p > 0) & (s.final == 0)
        cuts = (("top-k", cut_k), ("top-p", cut_p), ("min-p", cut_min))

        rows = tuple(
            TokenRow(
                rank=ranks[i],
                token_id=i,
                token=names[i],
                model_prob=float(model_probs[i]),
                tempered_prob=float(s.tempered[i]),
                prob=float(s.final[i]),
                cut_by="constraint" if allowed is not None and not allowed[i] else _cut_by(i, cuts),
            )
            for i in top_ids
        )
        views.append(
            SettingView(
                label=label,
                knobs=knobs,
                params={name: getattr(params, name) for name in NEXT_TOKEN_KNOBS},
                entropy_bits=entropy_bits(s.final),
                kept_tokens=int((s.final > 0).sum()),
                cut_tokens={"top-k": int(cut_k.sum()), "top-p": int(cut_p.sum()), "min-p": int(cut_min.sum())},
                cut_mass=float(s.tempered[s.final == 0].sum()),
                rows=rows,
            )
        )
    return NextTokenView(
        model=model,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        vocab_size=int(unmasked.shape[0]),
        model_entropy_bits=entropy_bits(model_probs),
        common=common_knobs([knobs for _, knobs, _ in settings]),
        settings=tuple(views),
        constraint=constraint,
        constraint_removed_tokens=removed_tokens,
        constraint_removed_mass=removed_mass,
    )


# --- the next-token view from a server's top tokens -----------------------------------------------------


def _partial_setting(
    probs: Sequence[float], logits: torch.Tensor, params: GenerationParams, complete: bool = True
) -> tuple[list[float], list[str | None], str, int | None, float | None, list[float]]:
    """(final probabilities, the filter that cut each, mark, tokens kept, tempered mass cut, tempered probabilities)
    of one setting over the N most likely tokens alone (`probs`, descending, at temperature 1; `logits` their log p).

    mark "": exact, as what the setting keeps is provably among them (the module docstring says when); "≤": a
    temperature alone, each probability an upper bound (the tokens not shown add at least rest^(1/T) to the
    normaliser when T > 1, at least nothing when T < 1); "≈": computed over the shown tokens as if they were all."""
    n = len(probs)
    temperature, k, top_p, min_p = params.temperature, params.top_k, params.top_p, params.min_p
    rest = max(0.0, 1.0 - sum(probs))
    no_k = k <= 0 or k > n  # top-k cuts none of the shown tokens
    if temperature == 1.0 and k <= 0 and top_p >= 1.0 and min_p <= 0.0:  # plain sampling: the model's own
        return list(probs), [None] * n, "", None, 0.0, list(probs)
    cut_by: list[str | None]
    if temperature == 1.0 and k <= 0 and top_p < 1.0 and complete:
        # At temperature 1, top-p's decision for a shown token reads only the more likely tokens: all shown.
        before, cut_by = 0.0, []
        for p in probs:
            cut_by.append(None if before < top_p else "top-p")
            before += p
        for i, p in enumerate(probs):
            if cut_by[i] is None and min_p > 0 and p < min_p * probs[0]:
                cut_by[i] = "min-p"
        kept_mass = sum(p for p, cut in zip(probs, cut_by) if cut is None)
        if before >= top_p or any(cut == "min-p" for cut in cut_by):  # every token not shown is cut too
            final = [p / kept_mass if cut is None else 0.0 for p, cut in zip(probs, cut_by)]
            return final, cut_by, "", sum(cut is None for cut in cut_by), 1.0 - kept_mass, list(probs)
        # the kept set runs past the shown tokens, with a mass of about top_p
        final = [p / max(top_p, kept_mass) if cut is None else 0.0 for p, cut in zip(probs, cut_by)]
        return final, cut_by, "≈", None, None, list(probs)
    s = stages(logits, params)
    cut_k = (s.tempered > 0) & (s.after_top_k == 0)
    cut_p = (s.after_top_k > 0) & (s.after_top_p == 0)
    cut_min = (s.after_top_p > 0) & (s.final == 0)
    cut_by = [_cut_by(i, (("top-k", cut_k), ("top-p", cut_p), ("min-p", cut_min))) for i in range(n)]
    final = [float(v) for v in s.final]
    tempered = [float(v) for v in s.tempered]
    exact = complete and (
        1 <= k <= n or (top_p >= 1.0 and no_k and min_p > 0 and min_p**temperature * probs[0] > probs[-1])
    )
    if exact:
        kept = sum(v > 0 for v in final)
        cut_mass = 1.0 - sum(p for p, v in zip(probs, final) if v > 0) if temperature == 1.0 else None
        return final, cut_by, "", kept, cut_mass, tempered
    if complete and no_k and top_p >= 1.0 and min_p <= 0.0:  # a temperature alone: bounds from above
        weights = [p ** (1 / temperature) for p in probs]
        floor = sum(weights) + (rest ** (1 / temperature) if temperature > 1.0 else 0.0)
        bounds = [w / floor for w in weights]
        return bounds, [None] * n, "≤", None, None, bounds
    return final, cut_by, "≈", None, None, tempered


def partial_next_token_view(
    top: Any,
    settings: Sequence[tuple[str, dict[str, Any], GenerationParams]],
    *,
    model: str = "",
    prompt: str = "",
) -> NextTokenView:
    """next_token_view for an engine that returns only its most likely tokens (`top`: engine.next_token_top, a
    server's top_logprobs): the shown tokens, the mass they cover, each setting exact or marked (≤ bounds, ≈)."""
    import torch

    probs = [math.exp(value) for value in top.logprobs]
    logits = torch.tensor(top.logprobs, dtype=torch.float32)
    covered = min(1.0, sum(probs))
    views = []
    for label, knobs, params in settings:
        final, cut_by, mark, kept, cut_mass, tempered = _partial_setting(probs, logits, params, top.complete)
        rows = tuple(
            TokenRow(
                rank=r + 1,
                token_id=top.token_ids[r],
                token=top.tokens[r],
                model_prob=probs[r],
                tempered_prob=tempered[r],
                prob=final[r],
                cut_by=cut_by[r],
            )
            for r in range(len(probs))
        )
        plain = kept is None and not mark  # the model's own distribution: its entropy is bounded, not known
        views.append(
            SettingView(
                label=label,
                knobs=knobs,
                params={name: getattr(params, name) for name in NEXT_TOKEN_KNOBS},
                entropy_bits=_entropy_with_rest(probs) if plain else _entropy(final),
                kept_tokens=kept,
                cut_tokens={name: sum(cut == name for cut in cut_by) for name in ("top-k", "top-p", "min-p")},
                cut_mass=cut_mass,
                rows=rows,
                exact=not mark,
                mark=mark,
            )
        )
    return NextTokenView(
        model=model,
        prompt=prompt,
        prompt_tokens=top.prompt_tokens,
        vocab_size=top.vocab_size,
        model_entropy_bits=_entropy_with_rest(probs),
        common=common_knobs([knobs for _, knobs, _ in settings]),
        settings=tuple(views),
        partial=True,
        shown_mass=covered,
        cap=top.cap,
        asked=None if top.complete else top.asked,
    )


def _entropy(probs: Sequence[float]) -> float:
    return max(0.0, -sum(p * math.log2(p) for p in probs if p > 0))


def _entropy_with_rest(probs: Sequence[float]) -> float:
    """A lower bound of the entropy of a distribution whose top tokens are `probs`: the rest taken as one token."""
    rest = max(0.0, 1.0 - sum(probs))
    return _entropy([*probs, rest])
