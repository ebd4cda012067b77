"""uvicorn, configured for llmkit: bounded connections, forwarding headers only from trusted proxies, and a
shutdown that ends every request with an answer.

uvicorn's graceful shutdown waits `timeout_graceful_shutdown` for running requests and then cancels
their tasks: a stream is cut with no terminal event and each cancelled task logs a CancelledError
traceback. LlmkitServer instead, when shutdown begins, marks the model host as stopping (/health
503 "shutting_down", new requests refused) and, once --grace-period has passed, fails what is still
running with ShuttingDown: a stream ends with an error event and `data: [DONE]`, a request waiting
for its answer gets a 503. uvicorn's own timeout comes SHUTDOWN_MARGIN_S later, so it only cancels
what could not even be answered (a client that stopped reading).
"""

from __future__ import annotations

import asyncio

import uvicorn

from llmkit.server.connections import bounded_protocol
from llmkit.server.settings import ServerSettings

SHUTDOWN_MARGIN_S = 3.0  # after --grace-period: the step in progress ends, the aborted requests' last bytes go out


class LlmkitServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, model_host, grace_s: float):
        super().__init__(config)
        self.model_host, self.grace_s = model_host, grace_s

    async def shutdown(self, sockets=None) -> None:
        self.model_host.begin_shutdown()
        abort = asyncio.get_running_loop().call_later(self.grace_s, self.model_host.abort_requests)
        try:
            await super().shutdown(sockets)
        finally:
            abort.cancel()


def build_server(app, settings: ServerSettings) -> LlmkitServer:
    protocol = bounded_protocol(
        idle_timeout_s=settings.idle_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        max_connections=settings.max_connections,
    )
    trusted = ",".join(settings.forwarded_allow_ips)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        ws="none",
        lifespan="on",
        # uvicorn annotates these two as int but uses them as seconds for call_later and
        # wait_for, so a fraction works (and the tests use one)
        log_config=None,
        access_log=False,
        timeout_keep_alive=settings.idle_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.grace_s + SHUTDOWN_MARGIN_S,  # type: ignore[arg-type]
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )
    return LlmkitServer(config, app.state.host, settings.grace_s)
