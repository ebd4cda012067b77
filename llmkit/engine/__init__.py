"""The core engines: load a model once, then stream, generate, score.

Three engines keep one contract (`Engine` in base.py: prompt_ids, stream, generate, check_context,
next_token_logits, token_logprobs, info, tokenizer): transformers for every model,
llama.cpp for GGUF files (extra `llmkit[llamacpp]`), and remote for a URL: any
OpenAI-compatible server (remote.py), chosen by the reference itself, whatever --engine
says unless it names a local engine. `auto` picks llama.cpp for a GGUF model (an alias or a
.gguf file) on the CPU when it is installed and no --dtype or --quantize asks for
transformers, else transformers. Importing this package is light; torch, transformers,
llama_cpp and httpx load in `load_engine`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmkit.engine.types import Chunk, Completion, EngineInfo, Result, Timings, Usage
from llmkit.errors import InvalidParams

if TYPE_CHECKING:
    from llmkit.engine.base import Engine
    from llmkit.models import Progress

ENGINES = ("transformers", "llama.cpp", "auto", "remote")
REMOTE_ENGINE = "remote"  # a URL's engine: the model runs on the server
DEFAULT_ENGINE = "transformers"


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise InvalidParams(f"engine must be one of {', '.join(ENGINES)} (got {name!r})", field="engine")
    if name == "llama.cpp":
        require_llamacpp()
    return name


def require_llamacpp() -> None:
    """--engine llama.cpp without llama-cpp-python: one line (exit 2) before any model loads and before
    `serve` opens its port. find_spec looks without importing (llama_cpp loads only with a model), and
    so does llmkit.engine.llamacpp.llamacpp_installed, which this mirrors without importing torch."""
    from importlib.util import find_spec

    if find_spec("llama_cpp") is None:
        from llmkit.errors import UnsupportedFeature
        from llmkit.extras import install_hint

        raise UnsupportedFeature(
            f"the llama.cpp engine needs llama-cpp-python: {install_hint('llamacpp')} (it compiles for several minutes)"
        )


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: every command's --device, --dtype, --quantize, --engine and --threads, checked
    once, when the record is made, before anything heavy is imported (a bad value is InvalidParams, exit 2).
    Engines take one and trust it; what depends on the machine (a CUDA index that does not exist, int8 off
    the CPU) is found when the engine resolves the device."""

    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    quantize: str = "auto"  # auto, none, int8, bf16 or fp16 (devices.choose_quantize says what auto picks)
    engine: str = DEFAULT_ENGINE  # transformers, llama.cpp, auto or remote (a URL's, whatever this says)
    threads: int | None = None  # CPU threads that compute; None: $LLMKIT_THREADS when set, else the engine's default
    remote_model: str | None = None  # for a URL: the server's model to use (URL#name says it too)
    api_key: str | None = field(default=None, repr=False)  # for a URL; None: $LLMKIT_API_KEY, else $OPENAI_API_KEY
    batch_rows: int = 1  # the most sequences one step carries: serve's --max-batch-size (devices.choose_quantize)

    def __post_init__(self) -> None:
        from llmkit.devices import check_device, check_dtype, check_quantize, requested_threads

        check_device(self.device)
        check_dtype(self.dtype)
        check_quantize(self.quantize)
        check_engine(self.engine)
        requested_threads(self.threads)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_local(self) -> LoadOptions:
        """These options without the remote ones (what a local model's worker gets: no key travels further)."""
        return dataclasses.replace(self, remote_model=None, api_key=None)


def check_load_options(**settings: Any) -> LoadOptions:
    """LoadOptions(**settings): every load option checked before anything heavy is imported (exit 2)."""
    return LoadOptions(**settings)


def choose_engine(model: str | None, options: LoadOptions) -> tuple[str, str]:
    """(engine, why) for options.engine; resolves `auto`, passes the others through; a URL is the remote engine's."""
    name = options.engine
    from llmkit.models import is_url

    if is_url(model):
        if name == "llama.cpp":
            raise InvalidParams(
                "--engine llama.cpp loads a GGUF file here; a URL is served by its own server: drop --engine",
                field="engine",
            )
        return REMOTE_ENGINE, "a URL: an OpenAI-compatible server runs the model"
    if name == REMOTE_ENGINE:
        raise InvalidParams(
            "--engine remote is for a URL (-m http://host:port/v1); give one, or pick a local engine", field="engine"
        )
    if options.remote_model is not None:
        raise InvalidParams(
            "--remote-model names a model on a server: use it with -m http://host:port/v1", field="model"
        )
    if name != "auto":
        return name, "set by --engine; default transformers"
    from llmkit.models import resolve

    source = resolve(model)
    if source.kind not in ("alias", "gguf"):
        return "transformers", f"auto: {source.name} is a {source.kind} model, not a GGUF file"
    from llmkit.devices import quantize_asked

    if options.dtype != "auto" or quantize_asked(options.quantize):
        return "transformers", "auto: --dtype/--quantize ask for transformers"
    from llmkit.engine.llamacpp import llamacpp_installed

    if not llamacpp_installed():
        from llmkit.extras import install_hint

        return "transformers", f"auto: llama-cpp-python is not installed ({install_hint('llamacpp')})"
    if options.device not in ("auto", "cpu"):
        return "transformers", f"auto: device {options.device} (the llama.cpp engine runs on the CPU)"
    if options.device == "auto":
        from llmkit.devices import resolve_device

        if resolve_device("auto") != "cpu":
            return "transformers", "auto: a GPU is present (the llama.cpp engine runs on the CPU)"
    return "llama.cpp", "auto: a GGUF model on the CPU with llama-cpp-python installed"


def _options(options: LoadOptions | None, settings: dict[str, Any]) -> LoadOptions:
    if options is not None and settings:
        raise TypeError(f"give LoadOptions or keyword settings, not both (got {', '.join(settings)})")
    return options if options is not None else LoadOptions(**settings)


def prepare(
    model: str | None = None, options: LoadOptions | None = None, *, progress: Progress | None = None, **settings: Any
) -> Any:
    """One-time work before a load (a GGUF conversion for transformers, joining a chunked alias),
    so that measurements of the load itself exclude it. settings: LoadOptions fields, when no options."""
    options = _options(options, settings)
    engine = choose_engine(model, options)[0]
    if engine == REMOTE_ENGINE:
        return None  # nothing to prepare: the server has its model
    if engine == "llama.cpp":
        from llmkit.engine.llamacpp import gguf_path_for

        return gguf_path_for(model, progress)
    from llmkit.models import local_folder, resolve

    return local_folder(resolve(model), progress)


def load_engine(
    model: str | None = None, options: LoadOptions | None = None, *, progress: Progress | None = None, **settings: Any
) -> Engine:
    """Load `model` (alias, folder, .gguf file or Hub id) once, as `options` say, or connect to the server at a URL
    (http://host:port/v1[#model]); or with LoadOptions fields as keywords: load_engine("smollm2-135m",
    dtype="float32", threads=2).

    The threads are set on the calling thread, so load on the thread that will generate."""
    options = _options(options, settings)
    engine, why = choose_engine(model, options)
    loaded: Engine
    if engine == REMOTE_ENGINE:
        from llmkit.engine.remote import RemoteEngine

        loaded = RemoteEngine.load(model, options, progress=progress)
    elif engine == "llama.cpp":
        from llmkit.engine.llamacpp import LlamaCppEngine

        loaded = LlamaCppEngine.load(model, options, progress=progress)
    else:
        from llmkit.engine.transformers import TransformersEngine

        loaded = TransformersEngine.load(model, options, progress=progress)
    loaded.info = dataclasses.replace(loaded.info, choices={"engine": f"{engine} ({why})", **loaded.info.choices})
    return loaded


__all__ = [
    "Chunk",
    "Completion",
    "ENGINES",
    "REMOTE_ENGINE",
    "EngineInfo",
    "LoadOptions",
    "Result",
    "Timings",
    "Usage",
    "check_engine",
    "check_load_options",
    "choose_engine",
    "load_engine",
    "prepare",
]
