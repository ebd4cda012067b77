"""Option declarations shared by every command, so `--model` or `--temperature` reads the same everywhere.

Generation options default to None: only what the user typed reaches parse_params,
and the defaults and bounds stay in llmkit/params.py (quoted in the help text).

The generation options are not written here one by one: `generation_options` reads the table in
llmkit/params.py (each field's flags, aliases and help) and adds one option per field to a command, so a
new parameter reaches `llmkit generate` without an edit here. `param_option` is one field's option, for a
command that takes a single knob.

OTHER_NAMES are the spellings people bring from other tools, accepted beside ours (from the table): --max-tokens
(the OpenAI API's max_tokens, which `llmkit serve` speaks) and --temp (llama.cpp's). -n stays the number of
sequences (the OpenAI API's n), and its help says that llama.cpp's -n is --max-tokens here.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Optional, Union, get_args, get_origin

import typer

from llmkit.devices import THREADS_ENV
from llmkit.models import DEFAULT_MODEL, MODEL_ENV
from llmkit.params import GenerationParams, bounds_text, param_table, parse_bias

GENERATION_PANEL = "Generation parameters"
MODEL_PANEL = "Model"
OTHER_NAMES = {name: spec.cli_aliases for name, spec in param_table().items() if spec.cli_aliases}


def complete_model(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for -m: the aliases, with what each is (no torch: llmkit.models imports none).
    Nothing matching leaves the shell's own file completion, for folders and .gguf files."""
    from llmkit.models import ALIASES, alias_installed

    return [
        (
            name,
            alias.description
            if alias_installed(alias)
            else f"{alias.description} (not installed: {alias.install_hint})",
        )
        for name, alias in ALIASES.items()
        if name.startswith(incomplete)
    ]


def _param_help(name: str, model: type[GenerationParams] = GenerationParams) -> str:
    spec = param_table(model)[name]
    if spec.cli_help is not None:
        return spec.cli_help + spec.cli_note
    field = model.model_fields[name]
    default = field.get_default(call_default_factory=True)
    bounds = bounds_text(name, model)
    return f"{field.description} ({bounds + '; ' if bounds else ''}default {default})" + spec.cli_note


def _cli_type(annotation: Any) -> Any:
    """Optional[the field's type], None meaning 'not typed': `int | None` -> Optional[int], list[str] stays, a dict
    (logit_bias) is a repeatable KEY=VALUE option (list[str], read by _typed)."""
    if get_origin(annotation) is dict:
        return Optional[list[str]]
    if get_origin(annotation) is Union or isinstance(annotation, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = members[0] if len(members) == 1 else Union[tuple(members)]
    return Optional[annotation]


def param_option(name: str, model: type[GenerationParams] = GenerationParams) -> Any:
    """The Annotated type of the option that sets field `name`: its flags, short flag and help from the table."""
    spec = param_table(model)[name]
    flags = (f"--{name.replace('_', '-')}", *spec.cli_aliases, *((spec.short,) if spec.short else ()))
    annotation = model.model_fields[name].annotation
    metavar = "ID=BIAS" if get_origin(annotation) is dict else None  # logit_bias: not Typer's <list[str]>
    return Annotated[
        _cli_type(annotation),
        typer.Option(
            *flags,
            rich_help_panel=GENERATION_PANEL,
            show_default=False,
            help=_param_help(name, model),
            metavar=metavar,
        ),
    ]


def _typed(value: Any, name: str = "", model: type[GenerationParams] = GenerationParams) -> Any:
    """An option's value as parse_params takes it: None when not typed (an empty repeatable option too); a dict
    field's ID=BIAS items become its dict."""
    if isinstance(value, (list, tuple)):
        if value and name in model.model_fields and get_origin(model.model_fields[name].annotation) is dict:
            return parse_bias(value, name)
        return list(value) or None
    return value


def _expand(
    command: Callable, into: str, added: list[inspect.Parameter], build: Callable[[dict[str, Any]], Any]
) -> Callable:
    """`command` with its parameter `into` replaced by the keyword-only options `added`; when it runs, it gets
    `into` = build({option name: value}). Typer reads the new signature, so the options appear where `into`
    stands in --help."""
    signature = inspect.signature(command, eval_str=True)
    names = [parameter.name for parameter in added]
    taken = set(signature.parameters) & set(names)
    if into not in signature.parameters or taken:
        raise TypeError(
            f"{command.__name__} needs a parameter {into!r} and no parameter named like one of its "
            f"options (clashes: {', '.join(sorted(taken)) or 'none'})"
        )
    parameters = []
    for parameter in signature.parameters.values():
        parameters.extend(added if parameter.name == into else [parameter])

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        built = build({name: kwargs.pop(name, None) for name in names})  # before kwargs is passed on
        return command(*args, **kwargs, **{into: built})

    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return run


def generation_options(
    into: str = "generation",
    *,
    names: Sequence[str] | None = None,
    option: Callable[[str, type[GenerationParams]], Any] = param_option,
    model: type[GenerationParams] = GenerationParams,
) -> Callable[[Callable], Callable]:
    """Decorator: the command's parameter `into` becomes one keyword-only option per field of the table
    (`names`: only these), each declared by `option(name, model)`; the command gets `into` as a dict
    {field: value or None}, ready for parse_params, with the options in field order."""
    table = param_table(model)
    fields = tuple(names or (name for name in model.model_fields if table[name].kind != "constraint"))
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option(name, model))
        for name in fields
    ]
    return lambda command: _expand(
        command, into, added, lambda values: {name: _typed(value, name, model) for name, value in values.items()}
    )


CONSTRAINT_PANEL = "Structured output"
JsonSchemaOpt = Annotated[
    Optional[str],
    typer.Option(
        "--json-schema",
        rich_help_panel=CONSTRAINT_PANEL,
        show_default=False,
        help="The output must be JSON valid under this JSON schema: a file, or the schema itself.",
    ),
]
JsonObjectOpt = Annotated[
    bool,
    typer.Option(
        "--json-object",
        rich_help_panel=CONSTRAINT_PANEL,
        help="The output must be a JSON object (any). Not --json, which prints the result as a JSON document.",
    ),
]
RegexOpt = Annotated[
    Optional[str],
    typer.Option(
        "--regex",
        rich_help_panel=CONSTRAINT_PANEL,
        show_default=False,
        help="The output must match this regular expression (all of it).",
    ),
]
ChoiceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--choice",
        rich_help_panel=CONSTRAINT_PANEL,
        show_default=False,
        help="The output must be one of these comma-separated texts: --choice yes,no,maybe.",
    ),
]
GrammarOpt = Annotated[
    Optional[str],
    typer.Option(
        "--grammar",
        rich_help_panel=CONSTRAINT_PANEL,
        show_default=False,
        help="The output must match this grammar (Lark, or llama.cpp's GBNF): a file, or the grammar itself.",
    ),
]
CONSTRAINT_FLAGS = {
    "json_schema": "--json-schema",
    "json_object": "--json-object",
    "regex": "--regex",
    "choice": "--choice",
    "grammar": "--grammar",
}


def read_constraint(values: dict[str, Any]) -> dict[str, Any] | None:
    """The constraint options as GenerationParams' `constraint` value ({kind, value}), or None when none was given.
    A file is read here, so a missing one is exit 2 before any model loads; the spec itself is checked by
    parse_params (llmkit/engine/constrain.py `problems`)."""
    from pathlib import Path

    from llmkit.errors import InvalidParams

    given = [kind for kind, value in values.items() if value not in (None, False)]
    if len(given) > 1:
        flags = " and ".join(CONSTRAINT_FLAGS[kind] for kind in given)
        raise InvalidParams(f"give one constraint, not {flags}", field=given[1])
    if not given:
        return None
    kind = given[0]
    value = values[kind]
    if kind == "json_object":
        return {"kind": kind}
    if kind == "choice":
        options = tuple(option.strip() for option in value.split(","))
        if not all(options):
            raise InvalidParams("--choice takes non-empty texts separated by commas (got an empty one)", field=kind)
        return {"kind": kind, "value": options}
    if kind in ("json_schema", "grammar"):
        looks_inline = value.lstrip().startswith("{") if kind == "json_schema" else "\n" in value or ":" in value
        path = Path(value)
        if not looks_inline or _is_file(path):
            try:
                value = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise InvalidParams(
                    f"{CONSTRAINT_FLAGS[kind]}: cannot read {value!r} ({exc.strerror or exc}); "
                    f"give a file or the {'schema' if kind == 'json_schema' else 'grammar'} itself",
                    field=kind,
                ) from None
        if kind == "json_schema":
            from llmkit.engine.constrain import parse_json_schema

            value = parse_json_schema(value, field=kind)
    return {"kind": kind, "value": value}


def _is_file(path: Any) -> bool:
    try:
        return bool(path.is_file())
    except OSError:  # a schema too long to be a file name
        return False


def constraint_options(into: str = "constraint") -> Callable[[Callable], Callable]:
    """Decorator: the command's parameter `into` becomes the structured-output options (--json-schema,
    --json-object, --regex, --choice, --grammar); the command gets `into` = the `constraint` value for
    parse_params, or None. Declared here, not derived from the table like generation_options: two of them read
    files, one is a flag and one splits a list, and all five set one field."""
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in (
            ("json_schema", JsonSchemaOpt, None),
            ("json_object", JsonObjectOpt, False),
            ("regex", RegexOpt, None),
            ("choice", ChoiceOpt, None),
            ("grammar", GrammarOpt, None),
        )
    ]
    return lambda command: _expand(command, into, added, read_constraint)


def load_options(
    into: str = "load", *, engine: bool = True, deferred: bool = False, remote: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator: the command's parameter `into` becomes --device, --dtype, --quantize, --engine (unless
    `engine` is False: compare takes several) and --threads, and with `remote` --remote-model and --api-key (for
    a URL model); the command gets one LoadOptions, checked (a bad value exits 2 before anything loads).
    `deferred`: it gets a function that makes the LoadOptions instead, for a command that must set up its error
    output first (serve --log-format json)."""
    from llmkit.engine import DEFAULT_ENGINE, LoadOptions

    declared = {
        "device": (DeviceOpt, "auto"),
        "dtype": (DtypeOpt, "auto"),
        "quantize": (QuantizeOpt, "auto"),
        "engine": (EngineOpt, DEFAULT_ENGINE),
        "threads": (ThreadsOpt, None),
    }
    if not engine:
        del declared["engine"]
    if remote:
        declared.update(remote_model=(RemoteModelOpt, None), api_key=(ApiKeyOpt, None))
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in declared.items()
    ]
    if deferred:
        return lambda command: _expand(command, into, added, lambda values: functools.partial(LoadOptions, **values))
    return lambda command: _expand(command, into, added, lambda values: LoadOptions(**values))


MODEL_HELP = (
    f"Alias ({DEFAULT_MODEL}, a base model; smollm2-135m, which can chat: it has a chat template; see "
    "`llmkit models`), Hugging Face Hub id, save_pretrained folder or .gguf file"
)


def _model_option(help_text: str) -> Any:
    return typer.Option(
        "--model",
        "-m",
        envvar=MODEL_ENV,
        rich_help_panel=MODEL_PANEL,
        show_default=False,
        autocompletion=complete_model,
        help=f"{help_text}. (default: {DEFAULT_MODEL})",
    )


ModelOpt = Annotated[
    Optional[str],
    _model_option(
        f"{MODEL_HELP}, or an OpenAI-compatible server's URL (http://host:port/v1, URL#name for one of its models; "
        "docs/remote.md)"
    ),
]
# serve loads the model itself: a URL is refused there
ServedModelOpt = Annotated[Optional[str], _model_option(MODEL_HELP)]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", rich_help_panel=MODEL_PANEL, help="auto, cpu, cuda, cuda:N or mps (auto: CUDA when present)."
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        rich_help_panel=MODEL_PANEL,
        help="auto, float32, bfloat16 or float16 (auto: $LLMKIT_DTYPE when set, else bfloat16 on CUDA and on "
        "CPUs with native BF16, else float32).",
    ),
]
QuantizeOpt = Annotated[
    str,
    typer.Option(
        "--quantize",
        rich_help_panel=MODEL_PANEL,
        help="auto, none, int8, bf16 or fp16 (transformers engine on the CPU; faster, slightly different text). "
        "int8: int8 weights, bfloat16 compute. bf16 / fp16: bfloat16 / float16 weights, float32 compute. "
        "auto: on CPUs without native BF16 when --dtype is auto, bf16 (fp16 for batches of more than 4 rows "
        "where fbgemm runs, else none), else none.",
    ),
]

ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
        help="CPU threads that compute: torch's intra-op threads, llama.cpp's -t and -tb (default: "
        f"${THREADS_ENV} when set, else one per physical core). On a shared or busy machine use fewer: when the "
        "load average (uptime) is near or above the number of cores, --threads 1 is often several times faster, "
        "as every step waits for its slowest thread.",
    ),
]

EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        rich_help_panel=MODEL_PANEL,
        help="transformers (any model), llama.cpp (GGUF files and aliases; needs llama-cpp-python, the llamacpp "
        "extra) or auto (llama.cpp for a GGUF model on the CPU when installed).",
    ),
]

RemoteModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--remote-model",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
        help="For a URL model: the model on the server to use (as URL#name does; default: the server's first in "
        "/v1/models).",
    ),
]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option(
        "--api-key",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
        help="For a URL model: the server's Bearer key (default: $LLMKIT_API_KEY, else $OPENAI_API_KEY; prefer "
        "them: a command line is visible to other users).",
    ),
]

WideOpt = Annotated[
    bool,
    typer.Option(
        "--wide",
        help="Show every column of the table, even past the terminal's width (by default a table leaves "
        "out the columns that do not fit, and says which).",
    ),
]
