"""The core engines: load a model once, then stream, generate, score.

Two engines share one interface (prompt_ids, stream, generate, check_context,
next_token_logits, token_logprobs, info, tokenizer): transformers for every model, and
llama.cpp for GGUF files (extra `llmkit[llamacpp]`). Importing this package is light;
torch, transformers and llama_cpp load in `load_engine`.
"""

from llmkit.engine.types import Chunk, Completion, EngineInfo, Result, Timings, Usage
from llmkit.errors import InvalidParams

ENGINES = ("transformers", "llama.cpp")
DEFAULT_ENGINE = "transformers"


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise InvalidParams(f"engine must be one of {', '.join(ENGINES)} (got {name!r})", field="engine")
    return name


def prepare(model=None, *, engine=DEFAULT_ENGINE, progress=None):
    """One-time work before a load (a GGUF conversion for transformers, joining a chunked alias),
    so that measurements of the load itself exclude it."""
    check_engine(engine)
    if engine == "llama.cpp":
        from llmkit.engine.llamacpp import gguf_path_for

        return gguf_path_for(model, progress)
    from llmkit.models import local_folder, resolve

    return local_folder(resolve(model), progress)


def load_engine(model=None, *, device="auto", dtype="auto", progress=None, engine=DEFAULT_ENGINE):
    """Load `model` (alias, folder, .gguf file or Hub id) once with the named engine."""
    check_engine(engine)
    if engine == "llama.cpp":
        from llmkit.engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine.load(model, device=device, dtype=dtype, progress=progress)
    from llmkit.engine.engine import TransformersEngine

    return TransformersEngine.load(model, device=device, dtype=dtype, progress=progress)


__all__ = ["Chunk", "Completion", "ENGINES", "EngineInfo", "Result", "Timings", "Usage", "check_engine",
           "load_engine", "prepare"]
