"""llmkit: generate, explore, monitor, compare and serve language models on your own machine.

The public API is small and light to import; torch loads only in `load_engine`:

    from llmkit import GenerationParams, load_engine
    engine = load_engine("gemma3-270m")
    result = engine.generate("The sea is", GenerationParams(max_new_tokens=20, seed=1))
"""

from llmkit.engine import Chunk, Completion, EngineInfo, LoadOptions, Result, Timings, Usage, load_engine
from llmkit.engine.base import Engine, Generation
from llmkit.errors import LlmkitError
from llmkit.params import GenerationParams, parse_params

__version__ = "0.1.0"

__all__ = [
    "Chunk",
    "Completion",
    "Engine",
    "EngineInfo",
    "Generation",
    "GenerationParams",
    "LlmkitError",
    "LoadOptions",
    "Result",
    "Timings",
    "Usage",
    "load_engine",
    "parse_params",
    "__version__",
]
