"""`llmkit serve`: the model over HTTP (OpenAI-compatible API, the simple /generate API, health, metrics).

The simple API is `POST /generate`: {"prompt", "max_length", "temperature"} in; {"success",
"generated_text", "inference_time_seconds", "parameters"} out: the contract of the Flask
server llmkit serve replaces (benchmarks/flask_reference.py), kept so its clients work unchanged.

Options are checked and the model reference resolved before fastapi, uvicorn or torch
are imported, so `--help` and a bad option answer at once (exit 2). The socket opens
first and the model loads in the background; SIGTERM or Ctrl-C stop accepting
connections, let in-flight requests finish for --grace-period seconds, end what is left with
a 503 or a final error event, then exit 0 (server/serving.py). With --log-format json every
line the process writes is JSON, errors at startup included.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from typing import Annotated, Optional

import typer

from llmkit.cli import options, render
from llmkit.engine import LoadOptions
from llmkit.errors import ModelLoadError, PortInUse
from llmkit.server import settings as server_settings
from llmkit.server.settings import ServerSettings, parse_forwarded_allow_ips, parse_rate_limit

SERVER_PANEL = "Server"
LIMITS_PANEL = "Limits and security"
CONNECTIONS_PANEL = "Connections"

EPILOG = """Examples:

  llmkit serve -m smollm2-135m

  llmkit serve -m smollm2-135m --engine llama.cpp

  curl -s localhost:8000/v1/completions -H 'content-type: application/json' -d '{"prompt": "The sea", "max_tokens": 20}'

  LLMKIT_API_KEY=secret llmkit serve --host 0.0.0.0 --rate-limit 60/minute --log-format json

  llmkit serve --forwarded-allow-ips 127.0.0.1   # behind a reverse proxy on this machine
"""


@options.load_options("make_load_options", deferred=True)
def serve(
    *,
    model: options.ServedModelOpt = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", rich_help_panel=SERVER_PANEL, help="Address to bind; 0.0.0.0 exposes the server to the network."
        ),
    ] = server_settings.DEFAULT_HOST,
    port: Annotated[
        int, typer.Option("--port", "-p", rich_help_panel=SERVER_PANEL, help="TCP port.")
    ] = server_settings.DEFAULT_PORT,
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            rich_help_panel=SERVER_PANEL,
            help="Sequences decoded together in one forward pass (a request with n=k takes k). "
            "The llama.cpp engine allocates its KV cache at start: max(this, 16) sequences of the "
            "model's context (at most 4096 tokens).",
        ),
    ] = server_settings.DEFAULT_MAX_BATCH_SIZE,
    flash_attn: Annotated[
        bool,
        typer.Option(
            "--flash-attn",
            rich_help_panel=SERVER_PANEL,
            help="llama.cpp engine: decode with llama.cpp's flash attention, 10-20% faster here; a seeded "
            "request's text may then depend on what it is batched with and on the prefix cache.",
        ),
    ] = False,
    prefix_cache_mb: Annotated[
        int,
        typer.Option(
            "--prefix-cache-mb",
            rich_help_panel=SERVER_PANEL,
            help="Memory for the KV of earlier requests, so that one starting the same way (a system prompt, a "
            "chat's history) computes only the rest; least recently used first out. 0 turns it off.",
        ),
    ] = server_settings.DEFAULT_PREFIX_CACHE_MB,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            rich_help_panel=LIMITS_PANEL,
            help="Requests that may wait for room in the batch; beyond it: 503 with Retry-After.",
        ),
    ] = server_settings.DEFAULT_MAX_QUEUE,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            rich_help_panel=LIMITS_PANEL,
            help="Seconds from arrival to the last token; beyond it generation stops and the answer is 504.",
        ),
    ] = server_settings.DEFAULT_REQUEST_TIMEOUT_S,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar=server_settings.API_KEY_ENV,
            rich_help_panel=LIMITS_PANEL,
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health. Prefer the environment "
            "variable: a command line is visible to other users.",
        ),
    ] = None,
    rate_limit: Annotated[
        Optional[str],
        typer.Option(
            "--rate-limit",
            rich_help_panel=LIMITS_PANEL,
            show_default=False,
            help="Requests per client address, e.g. 60/minute (N/second, N/minute, N/hour); beyond it: 429.",
        ),
    ] = None,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            "--max-body-bytes", rich_help_panel=LIMITS_PANEL, help="Largest request body accepted; beyond it: 413."
        ),
    ] = server_settings.DEFAULT_MAX_BODY_BYTES,
    grace_period: Annotated[
        float,
        typer.Option(
            "--grace-period",
            rich_help_panel=SERVER_PANEL,
            help="Seconds in-flight requests get to finish after SIGTERM or Ctrl-C; then each one left is answered "
            "503, or its stream ends with an error event and [DONE].",
        ),
    ] = server_settings.DEFAULT_GRACE_S,
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            rich_help_panel=SERVER_PANEL,
            help="text or json: one JSON object per line on stderr for everything the server writes, banner and "
            "errors included.",
        ),
    ] = "text",
    idle_timeout: Annotated[
        float,
        typer.Option(
            "--idle-timeout",
            rich_help_panel=CONNECTIONS_PANEL,
            help="Seconds a connection may stay open with no request in progress (a new one before its first byte, "
            "a keep-alive one between requests); then it is closed.",
        ),
    ] = server_settings.DEFAULT_IDLE_TIMEOUT_S,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout",
            rich_help_panel=CONNECTIONS_PANEL,
            help="Seconds from a request's first byte to the last byte of its body; a request not received whole "
            "by then has its connection closed.",
        ),
    ] = server_settings.DEFAULT_READ_TIMEOUT_S,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections",
            rich_help_panel=CONNECTIONS_PANEL,
            help="Open connections at most; a new one beyond it is answered 503 (Connection: close) and closed.",
        ),
    ] = server_settings.DEFAULT_MAX_CONNECTIONS,
    forwarded_allow_ips: Annotated[
        Optional[str],
        typer.Option(
            "--forwarded-allow-ips",
            rich_help_panel=CONNECTIONS_PANEL,
            show_default=False,
            help="Proxies whose X-Forwarded-For/-Proto are believed: comma-separated addresses or networks "
            "(10.0.0.0/8), or '*'. Default: nobody, so the client address (rate limit, access log) is the "
            "connection's own.",
        ),
    ] = None,
    make_load_options: Callable[
        ..., LoadOptions
    ],  # --device, --dtype, --quantize, --engine, --threads: from the decorator
) -> None:
    """Serve a model over HTTP: OpenAI-compatible completions and chat, with continuous batching."""
    if log_format == "json":  # from here on every line is JSON, a bad option's error included
        _log_as_json()
    settings = ServerSettings(
        host=host,
        port=port,
        model_name=model or "model",
        api_key=api_key,
        rate_limit=parse_rate_limit(rate_limit),
        max_queue=max_queue,
        max_batch_size=max_batch_size,
        prefix_cache_mb=prefix_cache_mb,
        flash_attn=flash_attn,
        request_timeout_s=request_timeout,
        grace_s=grace_period,
        max_body_bytes=max_body_bytes,
        log_format=log_format,
        idle_timeout_s=idle_timeout,
        read_timeout_s=read_timeout,
        max_connections=max_connections,
        forwarded_allow_ips=parse_forwarded_allow_ips(forwarded_allow_ips),
    ).check()
    load_options = make_load_options(batch_rows=settings.max_batch_size)  # --quantize auto depends on it
    if flash_attn and load_options.engine == "transformers":
        from llmkit.errors import InvalidParams

        raise InvalidParams(
            "--flash-attn applies to the llama.cpp engine: add --engine llama.cpp (or auto, for a GGUF model)",
            field="flash_attn",
        )
    from llmkit.models import is_url, resolve, shown_url

    if model and is_url(model):
        from llmkit.errors import UnsupportedFeature

        raise UnsupportedFeature(
            f"llmkit serve serves a model it loads itself; {shown_url(model)} is already a server: point clients at "
            "it directly, or serve a local model (-m an alias, folder or .gguf file)"
        )
    source = resolve(model)  # an unknown model fails here, before anything heavy loads
    settings = ServerSettings(**{**settings.__dict__, "model_name": source.name})
    _check_port_free(settings)
    if not settings.is_loopback and not settings.api_key:
        render.warning(
            f"listening on {settings.host} without an API key: anyone who can reach this machine "
            f"can use the model; set {server_settings.API_KEY_ENV}"
        )

    from llmkit.server import logs
    from llmkit.server.app import build_app
    from llmkit.server.serving import build_server

    logs.configure(settings.log_format)

    def load():
        from llmkit.engine import load_engine

        if settings.log_format == "json":
            logs.route_library_logging()
        return load_engine(model, load_options)

    app = build_app(load, settings)
    server = build_server(app, settings)
    model_host = app.state.host
    model_host.on_fatal = lambda message: setattr(server, "should_exit", True)

    render.serve_banner(
        settings.url,
        settings.model_name,
        api_key=bool(settings.api_key),
        rate_limit=str(settings.rate_limit) if settings.rate_limit else None,
        max_batch_size=settings.max_batch_size,
        engine=load_options.engine,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        threads=_threads_asked(load_options.threads),
        prefix_cache_mb=settings.prefix_cache_mb,
        flash_attn=settings.flash_attn,
    )
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal with the handler that was
    # installed before it started; a no-op handler there makes a graceful stop exit 0 instead of dying by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if model_host.state == "error":
        raise ModelLoadError(model_host.error or "the model could not be loaded")
    render.serve_stopped()


def _threads_asked(threads: int | None) -> int | None:
    """--threads, else $LLMKIT_THREADS (None: the engine's default, known once the model has loaded)."""
    from llmkit.devices import requested_threads

    return requested_threads(threads)[0]


def _log_as_json() -> None:
    from llmkit.server import logs

    logs.configure("json")
    render.messages_to_log(logging.getLogger("llmkit.server"))


def _check_port_free(settings: ServerSettings) -> None:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            raise PortInUse(
                f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}); pick another "
                "--port or stop the program using it"
            ) from None
