"""Option declarations shared by every command, so `--model` or `--temperature` reads the same everywhere.

Generation options default to None: only what the user typed reaches parse_params,
and the defaults and bounds stay in llmkit/params.py (quoted in the help text).

OTHER_NAMES are the spellings people bring from other tools, accepted beside ours: --max-tokens (the
OpenAI API's max_tokens, which `llmkit serve` speaks) and --temp (llama.cpp's). -n stays the number of
sequences (the OpenAI API's n), and its help says that llama.cpp's -n is --max-tokens here.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmkit.devices import THREADS_ENV
from llmkit.models import DEFAULT_MODEL, MODEL_ENV
from llmkit.params import GenerationParams, bounds_text

GENERATION_PANEL = "Generation parameters"
MODEL_PANEL = "Model"
OTHER_NAMES = {"max_new_tokens": ("--max-tokens",), "temperature": ("--temp",)}


def complete_model(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for -m: the aliases, with what each is (no torch: llmkit.models imports none).
    Nothing matching leaves the shell's own file completion, for folders and .gguf files."""
    from llmkit.models import ALIASES, alias_installed

    return [(name, alias.description if alias_installed(alias) else f"{alias.description} (not installed: "
             f"{alias.install_hint})") for name, alias in ALIASES.items() if name.startswith(incomplete)]


def _param_help(name: str) -> str:
    field = GenerationParams.model_fields[name]
    default = field.get_default(call_default_factory=True)
    bounds = bounds_text(name)
    return f"{field.description} ({bounds + '; ' if bounds else ''}default {default})"


ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar=MODEL_ENV, rich_help_panel=MODEL_PANEL, show_default=False,
    autocompletion=complete_model,
    help=f"Alias ({DEFAULT_MODEL}, a base model; smollm2-135m, which can chat: it has a chat template; see "
         "`llmkit models`), Hugging Face Hub id, save_pretrained folder or .gguf file. "
         f"(default: {DEFAULT_MODEL})")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", rich_help_panel=MODEL_PANEL, help="auto, cpu, cuda, cuda:N or mps (auto: CUDA when present).")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", rich_help_panel=MODEL_PANEL,
    help="auto, float32, bfloat16 or float16 (auto: $LLMKIT_DTYPE when set, else bfloat16 on CUDA and on "
         "CPUs with native BF16, else float32).")]
QuantizeOpt = Annotated[str, typer.Option(
    "--quantize", rich_help_panel=MODEL_PANEL,
    help="none or int8 (transformers engine on the CPU: int8 weights, bfloat16 compute; faster, "
         "slightly different text).")]

ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", rich_help_panel=MODEL_PANEL, show_default=False,
    help=f"CPU threads that compute: torch's intra-op threads, llama.cpp's -t and -tb (default: ${THREADS_ENV} when "
         "set, else one per physical core). On a shared or busy machine use fewer: when the load average "
         "(uptime) is near or above the number of cores, --threads 1 is often several times faster, as every "
         "step waits for its slowest thread.")]

EngineOpt = Annotated[str, typer.Option(
    "--engine", rich_help_panel=MODEL_PANEL,
    help="transformers (any model), llama.cpp (GGUF files and aliases; needs llama-cpp-python, the llamacpp "
         "extra) or auto (llama.cpp for a GGUF model on the CPU when installed).")]

MaxNewTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", *OTHER_NAMES["max_new_tokens"], rich_help_panel=GENERATION_PANEL, show_default=False,
    help=_param_help("max_new_tokens"))]
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", *OTHER_NAMES["temperature"], "-t", rich_help_panel=GENERATION_PANEL, show_default=False,
    help=_param_help("temperature"))]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", rich_help_panel=GENERATION_PANEL, show_default=False, help=_param_help("top_k"))]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", rich_help_panel=GENERATION_PANEL, show_default=False, help=_param_help("top_p"))]
MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", rich_help_panel=GENERATION_PANEL, show_default=False, help=_param_help("min_p"))]
RepetitionPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", rich_help_panel=GENERATION_PANEL, show_default=False,
    help=_param_help("repetition_penalty"))]
GreedyOpt = Annotated[Optional[bool], typer.Option(
    "--greedy", rich_help_panel=GENERATION_PANEL, show_default=False,
    help="Always take the most likely token (deterministic; ignores the sampling options).")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", rich_help_panel=GENERATION_PANEL, show_default=False,
    help="Seed for sampling: same seed and parameters, same text (default: random, reported).")]
NumSequencesOpt = Annotated[Optional[int], typer.Option(
    "--num-sequences", "-n", rich_help_panel=GENERATION_PANEL, show_default=False,
    help=_param_help("num_sequences") + " Like the OpenAI API's n; llama.cpp's -n (tokens to generate) is "
    "--max-tokens here.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", rich_help_panel=GENERATION_PANEL, show_default=False,
    help="Cut the output before this text (repeatable).")]

WideOpt = Annotated[bool, typer.Option(
    "--wide", help="Show every column of the table, even past the terminal's width (by default a table leaves "
                   "out the columns that do not fit, and says which).")]
