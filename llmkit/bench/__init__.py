"""`llmkit bench`: load-test any OpenAI-compatible endpoint, measured the way `vllm bench serve` measures.

The package is the client side of a load test, with no torch and no model in it:

  workload.py  what is sent and when: random prompts (built with the server's own tokenizer when it has
               /tokenize, else from words) or a JSONL file; the seeded arrival schedule (Poisson / gamma)
  client.py    the target (a URL, its model, its key), the streaming request and its SSE parsing, and the
               probes run once before a measurement (models, tokenizer, which optional fields it accepts)
  metrics.py   one record per request, and a point's summary: throughput, TTFT/TPOT/ITL/E2E, goodput
  runner.py    the load loop for one point (concurrency limit, arrivals), warm-up, the sweep, Ctrl-C
  local.py     `llmkit bench MODEL`: llmkit's own `serve` started on a free port and stopped after
  ceiling.py   how fast this client itself can go, measured by benchmarks/bench_ceiling.py
  plot.py      throughput against latency across a sweep (matplotlib, optional)

Definitions follow vLLM's benchmarks/serve so figures are comparable (docs/bench.md has them all):
TTFT send -> first output chunk; TPOT (E2E - TTFT) / (output tokens - 1); ITL the gaps between output
chunks; E2E send -> last chunk; throughputs over the point's wall time; goodput = requests/s that met
every SLO. Rendering is in llmkit/cli/render_bench.py, the command in llmkit/cli/bench.py.
"""
