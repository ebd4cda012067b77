"""`llmkit serve`: an OpenAI-compatible HTTP server with continuous batching.

    settings.py    ServerSettings, checked before anything heavy is imported
    schemas.py     request bodies mapped onto GenerationParams; responses; error bodies
    runtime.py     ModelHost: loads the model on the inference thread, runs the scheduler loop, health
    routes.py      thin handlers; Chunk -> SSE
    middleware.py  access log, body limit, API key, rate limit (pure ASGI)
    metrics.py     Prometheus metrics in the app's own registry
    logs.py        text or JSON log lines on stderr
    app.py         build_app(engine, settings) -> FastAPI
    connections.py uvicorn's h11 protocol with an idle timeout, a request read timeout and a connection cap
    serving.py     the uvicorn Server and Config: those limits, trusted proxies, a shutdown that answers

The schedulers themselves are in llmkit/engine: batch.py (the transformers engine) and
llamacpp_batch.py (llama.cpp), both over rows.py, and serial.py (one request at a time, for an
engine without a batcher), all over scheduling.py. Importing this package is
light; fastapi is imported by app.py, torch by the engine when the model loads.
"""
