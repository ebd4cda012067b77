"""The core engines: load a model once, then stream, generate, score.

Two engines keep one contract (`Engine` in base.py: prompt_ids, stream, generate, check_context,
next_token_logits, token_logprobs, info, tokenizer): transformers for every model, and
llama.cpp for GGUF files (extra `llmkit[llamacpp]`). `auto` picks llama.cpp for a GGUF
model (an alias or a .gguf file) on the CPU when it is installed and no --dtype or
--quantize asks for transformers, else transformers. Importing this package is light;
torch, transformers and llama_cpp load in `load_engine`.
"""

from llmkit.engine.types import Chunk, Completion, EngineInfo, Result, Timings, Usage
from llmkit.errors import InvalidParams

ENGINES = ("transformers", "llama.cpp", "auto")
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

        raise UnsupportedFeature(f"the llama.cpp engine needs llama-cpp-python: {install_hint('llamacpp')} "
                                 "(it compiles for several minutes)")


def check_load_options(*, device: str, dtype: str, quantize: str, engine: str, threads: int | None = None) -> None:
    """Every load option checked before anything heavy is imported (exit 2 without loading); threads: --threads,
    or $LLMKIT_THREADS when it is None."""
    from llmkit.devices import check_device, check_dtype, check_quantize, requested_threads

    check_device(device)
    check_dtype(dtype)
    check_quantize(quantize)
    check_engine(engine)
    requested_threads(threads)


def choose_engine(name: str, model=None, *, device="auto", dtype="auto", quantize="none") -> tuple[str, str]:
    """(engine, why) for an engine name; resolves `auto`, passes the others through."""
    check_engine(name)
    if name != "auto":
        return name, "set by --engine; default transformers"
    from llmkit.models import resolve

    source = resolve(model)
    if source.kind not in ("alias", "gguf"):
        return "transformers", f"auto: {source.name} is a {source.kind} model, not a GGUF file"
    if dtype != "auto" or quantize != "none":
        return "transformers", "auto: --dtype/--quantize ask for transformers"
    from llmkit.engine.llamacpp import llamacpp_installed

    if not llamacpp_installed():
        from llmkit.extras import install_hint

        return "transformers", f"auto: llama-cpp-python is not installed ({install_hint('llamacpp')})"
    if device not in ("auto", "cpu"):
        return "transformers", f"auto: device {device} (the llama.cpp engine runs on the CPU)"
    if device == "auto":
        from llmkit.devices import resolve_device

        if resolve_device("auto") != "cpu":
            return "transformers", "auto: a GPU is present (the llama.cpp engine runs on the CPU)"
    return "llama.cpp", "auto: a GGUF model on the CPU with llama-cpp-python installed"


def prepare(model=None, *, engine=DEFAULT_ENGINE, progress=None, device="auto", dtype="auto", quantize="none"):
    """One-time work before a load (a GGUF conversion for transformers, joining a chunked alias),
    so that measurements of the load itself exclude it."""
    engine = choose_engine(engine, model, device=device, dtype=dtype, quantize=quantize)[0]
    if engine == "llama.cpp":
        from llmkit.engine.llamacpp import gguf_path_for

        return gguf_path_for(model, progress)
    from llmkit.models import local_folder, resolve

    return local_folder(resolve(model), progress)


def load_engine(model=None, *, device="auto", dtype="auto", quantize="none", progress=None,
                engine=DEFAULT_ENGINE, threads=None):
    """Load `model` (alias, folder, .gguf file or Hub id) once with the named engine (or `auto`).

    threads: CPU threads that compute (None: $LLMKIT_THREADS when set, else the engine's default); set on the
    calling thread, so load on the thread that will generate."""
    import dataclasses

    engine, why = choose_engine(engine, model, device=device, dtype=dtype, quantize=quantize)
    if engine == "llama.cpp":
        from llmkit.engine.llamacpp import LlamaCppEngine

        loaded = LlamaCppEngine.load(model, device=device, dtype=dtype, quantize=quantize, progress=progress,
                                     threads=threads)
    else:
        from llmkit.engine.transformers import TransformersEngine

        loaded = TransformersEngine.load(model, device=device, dtype=dtype, quantize=quantize, progress=progress,
                                         threads=threads)
    loaded.info = dataclasses.replace(loaded.info, choices={"engine": f"{engine} ({why})", **loaded.info.choices})
    return loaded


__all__ = ["Chunk", "Completion", "ENGINES", "EngineInfo", "Result", "Timings", "Usage", "check_engine",
           "check_load_options", "choose_engine", "load_engine", "prepare"]
