"""Server settings: one frozen record built by `llmkit serve` (or a test) and read by build_app.

Only the standard library, llmkit.errors and the scheduler's defaults (llmkit.engine.scheduling, no torch)
are imported here, so `llmkit serve` checks its options (and fails with exit 2) before fastapi, uvicorn or
torch are imported.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from llmkit.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from llmkit.engine.scheduling import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
from llmkit.errors import InvalidParams

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_GRACE_S = 30.0
DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_STALL_AFTER_S = 60.0  # /health says "stuck" when a busy loop has not finished a step for this long
DEFAULT_IDLE_TIMEOUT_S = 5.0  # uvicorn's keep-alive default, now also for a fresh connection that sends nothing
DEFAULT_READ_TIMEOUT_S = 30.0  # first byte of a request to the last byte of its body
DEFAULT_MAX_CONNECTIONS = 512  # well under the usual 1024 file descriptors per process
LOG_FORMATS = ("text", "json")
API_KEY_ENV = "LLMKIT_API_KEY"

_PERIODS = {"second": 1.0, "s": 1.0, "minute": 60.0, "min": 60.0, "m": 60.0, "hour": 3600.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class RateLimit:
    count: int
    period_s: float

    def __str__(self) -> str:
        names = {1.0: "second", 60.0: "minute", 3600.0: "hour"}
        return f"{self.count}/{names.get(self.period_s, f'{self.period_s:g}s')}"


def parse_forwarded_allow_ips(text: str | None) -> tuple[str, ...]:
    """'127.0.0.1, 10.0.0.0/8' -> ('127.0.0.1', '10.0.0.0/8'); '*' trusts every client; None or '' trusts nobody.

    Checked here because uvicorn silently treats a malformed address as a literal that never matches."""
    if not text or not text.strip():
        return ()
    entries = tuple(item.strip() for item in text.split(","))
    if entries == ("*",):
        return entries
    normalized = []
    for entry in entries:
        try:
            normalized.append(
                str(ipaddress.ip_network(entry, strict=False)) if "/" in entry else str(ipaddress.ip_address(entry))
            )
        except ValueError:
            raise InvalidParams(
                f"forwarded-allow-ips must be comma-separated IP addresses or networks "
                f"(10.0.0.0/8), or '*'; got {entry!r}",
                field="forwarded_allow_ips",
            ) from None
    return tuple(normalized)


def parse_rate_limit(text: str | None) -> RateLimit | None:
    """'60/minute' -> RateLimit(60, 60.0); also N/second and N/hour. None or '' means no limit."""
    if not text:
        return None
    match = _RATE.match(text.lower())
    if not match or match.group(2) not in _PERIODS or int(match.group(1)) < 1:
        raise InvalidParams(
            f"rate limit must look like 60/minute (N/second, N/minute or N/hour, N >= 1); got {text!r}",
            field="rate_limit",
        )
    return RateLimit(int(match.group(1)), _PERIODS[match.group(2)])


@dataclass(frozen=True)
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model_name: str = "model"  # shown while loading, before the engine reports its own name
    api_key: str | None = None  # repr=False below: never printed
    rate_limit: RateLimit | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # 0: off
    flash_attn: bool = False  # llama.cpp's batched decode with flash attention (faster; text may vary by batch)
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    grace_s: float = DEFAULT_GRACE_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    stall_after_s: float = DEFAULT_STALL_AFTER_S
    log_format: str = "text"
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    forwarded_allow_ips: tuple[str, ...] = ()  # clients whose X-Forwarded-For / -Proto are believed; () = nobody

    def __repr__(self) -> str:  # keeps the API key out of any log line or traceback that prints settings
        fields = {k: ("***" if k == "api_key" and v else v) for k, v in self.__dict__.items()}
        return "ServerSettings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    def check(self) -> ServerSettings:
        """Raise InvalidParams (exit 2) for a value that cannot work; return self."""
        if not 1 <= self.port <= 65535:
            raise InvalidParams(f"port must be between 1 and 65535 (got {self.port})", field="port")
        for name, value, low in (
            ("max_queue", self.max_queue, 0),
            ("max_batch_size", self.max_batch_size, 1),
            ("prefix_cache_mb", self.prefix_cache_mb, 0),
            ("max_body_bytes", self.max_body_bytes, 1024),
            ("max_connections", self.max_connections, 1),
        ):
            if value < low:
                raise InvalidParams(f"{name.replace('_', '-')} must be at least {low} (got {value})", field=name)
        for name, seconds in (
            ("request_timeout", self.request_timeout_s),
            ("grace_period", self.grace_s),
            ("idle_timeout", self.idle_timeout_s),
            ("read_timeout", self.read_timeout_s),
        ):
            if not seconds > 0:
                raise InvalidParams(f"{name.replace('_', '-')} must be more than 0 seconds (got {seconds})", field=name)
        if self.log_format not in LOG_FORMATS:
            raise InvalidParams(
                f"log-format must be one of {', '.join(LOG_FORMATS)} (got {self.log_format!r})", field="log_format"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidParams(
                "api-key must not be empty (unset LLMKIT_API_KEY to serve without a key)", field="api_key"
            )
        return self

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
