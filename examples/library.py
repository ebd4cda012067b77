"""llmkit as a library: load an engine once, then generate and stream with parameters.

python examples/library.py
"""

from llmkit import GenerationParams, load_engine

engine = load_engine("gemma3-270m")  # any alias, Hub id, save_pretrained folder or .gguf file
print(f"loaded {engine.info.model} on {engine.info.device} ({engine.info.dtype}) in {engine.info.load_s:.1f} s")

# A whole result at once: text, token counts and timings.
params = GenerationParams(max_new_tokens=30, temperature=0.7, top_p=0.9, seed=7, stop=["\n\n"])
result = engine.generate("Three things to pack for a hike:", params)
print(result.text)
print(f"{result.usage.completion_tokens} tokens, {result.timings.decode_tokens_per_s:.1f} tok/s")

# Streaming: chunks arrive as tokens are decoded; the Result is there once the stream ends.
generation = engine.stream("The sea at night is", GenerationParams(max_new_tokens=20, greedy=True))
for chunk in generation:
    print(chunk.text, end="", flush=True)
print(f"\n(finish: {generation.result.completions[0].finish_reason})")
