"""`llmkit generate`: text from a prompt (argument, stdin or a JSONL file), streamed or as JSON."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmkit.cli import options, render
from llmkit.cli.inputs import ChatOpt, PromptArg, SystemOpt, check_system, join_prompt, load_model, read_prompt
from llmkit.engine import LoadOptions
from llmkit.errors import InvalidParams, LlmkitError, UnsupportedFeature
from llmkit.params import PARAM_NAMES, GenerationParams, check_text, parse_params

EPILOG = """Examples:

  llmkit generate "The sea at night is"

  llmkit generate Tell me a story        # the words are joined: quotes are optional

  echo "Once upon a time" | llmkit generate --max-new-tokens 40 --seed 7

  llmkit generate -m smollm2-135m --chat --system "Answer briefly." "What is a GPU?"

  llmkit generate --input-file prompts.jsonl --json | jq -r .completions[0].text

  llmkit generate -m http://127.0.0.1:8000/v1 --seed 7 "Once upon a time"   # any OpenAI-compatible server

  llmkit generate --logprobs --show-tokens "The capital of France is"   # colours and token boundaries

  llmkit generate --top-logprobs 3 --json "The capital of France is" | jq -c '.completions[0].tokens[]'
"""

TOP_LOGPROBS_MAX = 20  # llmkit serve's cap on logprobs / top_logprobs (OpenAI's chat cap), so the CLI asks no more
NON_FINITE_LOGPROB = -9999.0  # how llmkit serve writes a log p of -inf (JSON has no infinity); --json does the same


@dataclass(frozen=True)
class TokenOutput:
    """What to show of each token besides the text: --logprobs, its --top-logprobs alternatives, --show-tokens."""

    logprobs: bool = False
    top: int = 0
    show: bool = False

    @property
    def asked(self) -> int | None:
        """The engine's `logprobs` argument (how many alternatives), or None when no token view is asked for:
        --show-tokens needs the entries too, for each token's id and where its text starts."""
        return self.top if self.logprobs or self.show else None

    @property
    def flag(self) -> str:
        return "--logprobs" if self.logprobs else "--show-tokens"


@dataclass(frozen=True)
class Job:
    """One prompt to run: where it came from (for error messages) and its validated parameters."""

    prompt: str
    params: GenerationParams
    origin: str
    extra: dict[str, Any]


@options.load_options("load", remote=True)
@options.generation_options("generation")  # one option per GenerationParams field (llmkit/params.py's table)
@options.constraint_options("constraint")  # --json-schema, --json-object, --regex, --choice, --grammar
def generate(
    prompt: PromptArg = None,
    *,
    model: options.ModelOpt = None,
    input_file: Annotated[
        Optional[Path],
        typer.Option(
            "--input-file",
            "-f",
            help='JSONL file, one {"prompt": ...} object per line (other keys: any '
            "generation parameter, and an id echoed back); - for stdin. Writes one JSON line per result.",
        ),
    ] = None,
    generation: dict[str, Any],  # {field: value typed, or None}: the generation options, from the decorator
    constraint: Optional[dict[str, Any]] = None,  # GenerationParams.constraint from the structured-output options
    chat: ChatOpt = False,
    system: SystemOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per result.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are produced.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No timing line on stderr.")] = False,
    logprobs: Annotated[
        bool,
        typer.Option(
            "--logprobs",
            help="Colour each generated token by its probability on a terminal (a legend on stderr; plain text "
            "when piped) and give each token's log-prob in --json: the model's raw distribution before temperature "
            "and the other sampling knobs, the numbers llmkit serve returns.",
        ),
    ] = False,
    top_logprobs: Annotated[
        Optional[int],
        typer.Option(
            "--top-logprobs",
            metavar="N",
            help=f"Also the N most likely tokens at each position, in --json (0 to {TOP_LOGPROBS_MAX}; "
            "default 0: the chosen token only). Implies --logprobs.",
        ),
    ] = None,
    show_tokens: Annotated[
        bool,
        typer.Option(
            "--show-tokens",
            help="Make token boundaries visible: shaded in turn on a terminal; piped, one generated token per line "
            "(its id, a tab, the text it adds as a JSON string; with --logprobs a tab and its log-prob). "
            "The prompt's tokens go to stderr.",
        ),
    ] = False,
    load: LoadOptions,  # --device, --dtype, --quantize, --engine, --threads: from the decorator
) -> None:
    """Generate text from a prompt, streamed to the terminal; timings go to stderr."""
    typed = join_prompt(prompt)
    check_system(system, chat)
    tokens = token_output(logprobs, top_logprobs, show_tokens)
    generation = {**generation, "constraint": constraint}
    if input_file is not None:
        if typed is not None:
            raise InvalidParams("give either a PROMPT or --input-file, not both", field="prompt")
        jobs = read_jobs(input_file, generation)
    else:
        jobs = [Job(read_prompt(typed, input_file=True), parse_params(generation), "prompt", {})]

    engine = load_model(model, load, chat=chat)
    try:
        if tokens.asked is not None and not engine.info.capabilities.decode_logprobs:
            raise UnsupportedFeature(
                f"{tokens.flag} needs each token's log-prob while generating, which the {engine.info.engine} "
                "engine does not give; drop it, or use a local model or GGUF file"
            )
        for note in dict.fromkeys(note for job in jobs for note in engine.unhonoured(job.params)):
            render.warning(note)  # a server that ignores or refuses a knob the user set: the text is made without it
        if input_file is not None:
            run_batch(engine, jobs, chat=chat, system=system, quiet=quiet, tokens=tokens)
        else:
            run_one(
                engine, jobs[0], chat=chat, system=system, as_json=as_json, stream=stream, quiet=quiet, tokens=tokens
            )
    finally:
        engine.close()


def token_output(logprobs: bool, top: int | None, show: bool) -> TokenOutput:
    """Check --top-logprobs before any model loads; it implies --logprobs."""
    if top is not None and not 0 <= top <= TOP_LOGPROBS_MAX:
        raise InvalidParams(
            f"--top-logprobs must be between 0 and {TOP_LOGPROBS_MAX} (got {top})", field="top_logprobs"
        )
    return TokenOutput(logprobs or top is not None, top or 0, show)


def read_jobs(path: Path, cli_values: dict[str, Any]) -> list[Job]:
    """Parse and validate every line before the model loads, so a typo on line 900 costs nothing."""
    handle = sys.stdin if str(path) == "-" else None
    try:
        lines = (handle.read() if handle else path.read_text(encoding="utf-8")).splitlines()
    except OSError as exc:
        raise InvalidParams(f"cannot read {path}: {exc.strerror}", field="input_file") from None
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        origin = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidParams(f"{origin}: not valid JSON ({exc.msg})", field="input_file") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise InvalidParams(f'{origin}: needs a JSON object with a non-empty "prompt" string', field="input_file")
        check_text(record["prompt"], f"{origin}: the prompt", "prompt")
        overrides = {k: v for k, v in record.items() if k in PARAM_NAMES}
        unknown = set(record) - set(overrides) - {"prompt", "id"}
        if unknown:
            raise InvalidParams(
                f"{origin}: unknown key(s) {', '.join(sorted(unknown))}; use prompt, id or "
                f"generation parameters ({', '.join(PARAM_NAMES)})",
                field="input_file",
            )
        try:
            params = parse_params({**cli_values, **overrides})
        except InvalidParams as exc:
            raise InvalidParams(f"{origin}: {exc}", field=exc.field) from None
        extra = {"id": record["id"]} if "id" in record else {}
        jobs.append(Job(record["prompt"], params, origin, extra))
    if not jobs:
        raise InvalidParams(f"{path} holds no prompts", field="input_file")
    return jobs


def run_one(
    engine, job: Job, *, chat: bool, system: str | None, as_json: bool, stream: bool, quiet: bool, tokens: TokenOutput
) -> None:
    names = token_names(engine) if tokens.asked is not None else None
    if tokens.show and names is not None:
        render.prompt_tokens([(t, names.text(t)) for t in engine.prompt_ids(job.prompt, chat=chat, system=system)])
    generation = engine.stream(job.prompt, job.params, chat=chat, system=system, logprobs=tokens.asked)
    n = job.params.num_sequences
    live = stream and not as_json and n == 1
    viewed = tokens.asked is not None and (tokens.show or render.colours_tokens())  # else the text is plain
    if live:
        if not chat:
            render.prompt_echo(job.prompt)
        view = render.TokenView(colour=tokens.logprobs, boundaries=tokens.show) if viewed else None
        for chunk in generation:
            if view:
                view.feed(chunk.text, chunk.logprobs)
            else:
                render.text(chunk.text)
        if view:
            view.finish()
        else:
            render.end_text()
    else:
        for _ in generation:
            pass
    result = generation.result
    if as_json:
        render.json_line(result_record(engine, job, result, names))
    elif not live:
        for completion in result.completions:
            render.sequence_header(completion.index, n)
            if viewed:
                view = render.TokenView(colour=tokens.logprobs, boundaries=tokens.show)
                view.feed(completion.text, completion.logprobs or ())
                view.finish()
            else:
                render.text(completion.text)
                render.end_text()
    if viewed and not as_json:
        render.token_legend(colour=tokens.logprobs, boundaries=tokens.show)
    if not quiet:
        render.timing_line(result, threads=engine.info.threads)


def token_names(engine):
    """Each token's text and bytes as llmkit serve's logprobs name them (`bytes:\\xNN` for part of a character)."""
    from llmkit.server.tokens import TokenText

    return TokenText(engine.tokenizer)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else NON_FINITE_LOGPROB


def token_records(names, entries) -> list[dict[str, Any]]:
    """--json's `tokens`: every generated token (end of sequence included) with its raw log-prob, where its text
    starts in the completion's text, its own bytes, and the alternatives asked for, most likely first."""
    return [
        {
            "id": entry.token,
            "token": names.text(entry.token),
            "bytes": names.byte_list(entry.token),
            "offset": entry.offset,
            "logprob": _finite(entry.logprob),
            "top_logprobs": [
                {"id": token, "token": names.text(token), "logprob": _finite(value)} for token, value in entry.top
            ],
        }
        for entry in entries
    ]


def result_record(engine, job: Job, result, names=None) -> dict[str, Any]:
    """One --json line: the job's own fields (e.g. its id), the model, the Result and how the engine ran; with
    `names` (--logprobs, --show-tokens) each completion's tokens."""
    record = {**job.extra, "model": engine.info.model, **result.to_dict(), "engine": engine.info.setup()}
    if names is not None:
        for shown, completion in zip(record["completions"], result.completions):
            shown["tokens"] = token_records(names, completion.logprobs or ())
    return record


def run_batch(engine, jobs: list[Job], *, chat: bool, system: str | None, quiet: bool, tokens: TokenOutput) -> None:
    """One JSON line per job; a job that fails becomes an error line and the rest still run."""
    failures = 0
    names = token_names(engine) if tokens.asked is not None else None
    for job in jobs:
        try:
            generation = engine.stream(job.prompt, job.params, chat=chat, system=system, logprobs=tokens.asked)
            for _ in generation:
                pass
            result = generation.result
        except LlmkitError as exc:
            failures += 1
            render.json_line({**job.extra, "origin": job.origin, "error": str(exc)})
            continue
        render.json_line(result_record(engine, job, result, names))
        if not quiet:
            render.timing_line(result, threads=engine.info.threads)
    if failures:
        render.error(f'{failures} of {len(jobs)} prompts failed (see their "error" lines)')
        raise typer.Exit(1)
