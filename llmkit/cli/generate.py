"""`llmkit generate`: text from a prompt (argument, stdin or a JSONL file), streamed or as JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmkit.cli import options, render
from llmkit.cli.inputs import ChatOpt, PromptArg, SystemOpt, check_system, join_prompt, load_model, read_prompt
from llmkit.engine import LoadOptions
from llmkit.errors import InvalidParams, LlmkitError
from llmkit.params import PARAM_NAMES, GenerationParams, check_text, parse_params

EPILOG = """Examples:

  llmkit generate "The sea at night is"

  llmkit generate Tell me a story        # the words are joined: quotes are optional

  echo "Once upon a time" | llmkit generate --max-new-tokens 40 --seed 7

  llmkit generate -m smollm2-135m --chat --system "Answer briefly." "What is a GPU?"

  llmkit generate --input-file prompts.jsonl --json | jq -r .completions[0].text

  llmkit generate -m http://127.0.0.1:8000/v1 --seed 7 "Once upon a time"   # any OpenAI-compatible server
"""


@dataclass(frozen=True)
class Job:
    """One prompt to run: where it came from (for error messages) and its validated parameters."""

    prompt: str
    params: GenerationParams
    origin: str
    extra: dict[str, Any]


@options.load_options("load", remote=True)
@options.generation_options("generation")  # one option per GenerationParams field (llmkit/params.py's table)
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
    chat: ChatOpt = False,
    system: SystemOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per result.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are produced.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No timing line on stderr.")] = False,
    load: LoadOptions,  # --device, --dtype, --quantize, --engine, --threads: from the decorator
) -> None:
    """Generate text from a prompt, streamed to the terminal; timings go to stderr."""
    typed = join_prompt(prompt)
    check_system(system, chat)
    if input_file is not None:
        if typed is not None:
            raise InvalidParams("give either a PROMPT or --input-file, not both", field="prompt")
        jobs = read_jobs(input_file, generation)
    else:
        jobs = [Job(read_prompt(typed, input_file=True), parse_params(generation), "prompt", {})]

    engine = load_model(model, load, chat=chat)
    try:
        for note in dict.fromkeys(note for job in jobs for note in engine.unhonoured(job.params)):
            render.warning(note)  # a server that ignores or refuses a knob the user set: the text is made without it
        if input_file is not None:
            run_batch(engine, jobs, chat=chat, system=system, quiet=quiet)
        else:
            run_one(engine, jobs[0], chat=chat, system=system, as_json=as_json, stream=stream, quiet=quiet)
    finally:
        engine.close()


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


def run_one(engine, job: Job, *, chat: bool, system: str | None, as_json: bool, stream: bool, quiet: bool) -> None:
    generation = engine.stream(job.prompt, job.params, chat=chat, system=system)
    n = job.params.num_sequences
    live = stream and not as_json and n == 1
    if live:
        if not chat:
            render.prompt_echo(job.prompt)
        for chunk in generation:
            render.text(chunk.text)
        render.end_text()
    else:
        for _ in generation:
            pass
    result = generation.result
    if as_json:
        render.json_line(result_record(engine, job, result))
    elif not live:
        for completion in result.completions:
            render.sequence_header(completion.index, n)
            render.text(completion.text)
            render.end_text()
    if not quiet:
        render.timing_line(result, threads=engine.info.threads)


def result_record(engine, job: Job, result) -> dict[str, Any]:
    """One --json line: the job's own fields (e.g. its id), the model, the Result and how the engine ran."""
    return {**job.extra, "model": engine.info.model, **result.to_dict(), "engine": engine.info.setup()}


def run_batch(engine, jobs: list[Job], *, chat: bool, system: str | None, quiet: bool) -> None:
    """One JSON line per job; a job that fails becomes an error line and the rest still run."""
    failures = 0
    for job in jobs:
        try:
            result = engine.generate(job.prompt, job.params, chat=chat, system=system)
        except LlmkitError as exc:
            failures += 1
            render.json_line({**job.extra, "origin": job.origin, "error": str(exc)})
            continue
        render.json_line(result_record(engine, job, result))
        if not quiet:
            render.timing_line(result, threads=engine.info.threads)
    if failures:
        render.error(f'{failures} of {len(jobs)} prompts failed (see their "error" lines)')
        raise typer.Exit(1)
