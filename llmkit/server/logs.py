"""Server logging on stderr: one line per event, as text or JSON (`--log-format json`).

Access lines carry the request id, method, path, status, latency and token counts; never
headers, prompts or generated text, so an API key or a user's data cannot end up in a log.
uvicorn's own loggers go through the same handler so the stream has one format.

In JSON mode every line the process writes must be JSON, so the same handler also takes the
root logger (asyncio, libraries), Python warnings, uncaught exceptions in any thread, and
the loggers of transformers and huggingface_hub (which keep stderr handlers of their own);
`llmkit serve` sends its banner and its errors through it as well (render.messages_to_log).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

OWN_LOGGERS = ("llmkit", "uvicorn", "uvicorn.error")
LIBRARY_LOGGERS = ("transformers", "huggingface_hub")  # each writes to stderr through a handler of its own

# color_message: uvicorn's copy of the message with ANSI colour codes, meant for terminals only.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")


def _uvicorn_name(record: logging.LogRecord) -> bool:
    if record.name == "uvicorn.error":  # uvicorn's general logger, despite its name
        record.name = "uvicorn"
    return True


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_uvicorn_name)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # llmkit.access replaces it
    if log_format == "json":
        _everything_through(handler)


def _everything_through(handler: logging.Handler) -> None:
    """What would otherwise reach stderr as plain text: other loggers, warnings, uncaught exceptions."""
    logging.getLogger().handlers[:] = [handler]  # the root logger: asyncio and any library that propagates
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger -> the root logger
    crashes = logging.getLogger("llmkit.crash")

    def log_uncaught(exc_type, exc, tb, thread: str | None = None) -> None:
        where = f" in thread {thread}" if thread else ""
        crashes.critical("uncaught %s%s: %s", exc_type.__name__, where, exc, exc_info=(exc_type, exc, tb))

    def log_uncaught_in_thread(args) -> None:
        if not issubclass(args.exc_type, SystemExit):  # as the default hook: a thread's exit is not a crash
            log_uncaught(args.exc_type, args.exc_value, args.exc_traceback, args.thread.name if args.thread else None)

    sys.excepthook = log_uncaught
    threading.excepthook = log_uncaught_in_thread


def route_library_logging() -> None:
    """transformers and huggingface_hub attach stderr handlers of their own when imported: import them now and
    send their records to the root logger's handler instead (JSON mode; the model loads right after)."""
    import transformers.utils.logging  # noqa: F401  (imports huggingface_hub too; both set up their loggers)

    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
