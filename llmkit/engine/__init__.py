"""The core engine: load a model once, then stream, generate, score.

Importing this package is light; torch and transformers load in `load_engine`.
"""

from llmkit.engine.types import Chunk, Completion, EngineInfo, Result, Timings, Usage


def load_engine(model=None, *, device="auto", dtype="auto", progress=None):
    """Load `model` (alias, folder, .gguf file or Hub id) once and return a TransformersEngine."""
    from llmkit.engine.engine import TransformersEngine

    return TransformersEngine.load(model, device=device, dtype=dtype, progress=progress)


__all__ = ["Chunk", "Completion", "EngineInfo", "Result", "Timings", "Usage", "load_engine"]
