"""Server logging on stderr: one line per event, as text or JSON (`--log-format json`).

Access lines carry the request id, method, path, status, latency and token counts; never
headers, prompts or generated text, so an API key or a user's data cannot end up in a log.
uvicorn's own loggers go through the same handler so the stream has one format.
"""

from __future__ import annotations

import json
import logging
import sys
import time

# color_message: uvicorn's copy of the message with ANSI colour codes, meant for terminals only.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
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
    for name in ("llmkit", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # llmkit.access replaces it
