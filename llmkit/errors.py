"""Errors a user can act on.

Every failure llmkit expects (bad parameter, unknown model, no network, bad file,
out of memory) is an LlmkitError whose message is one sentence saying what to do.
The CLI turns them into one red line and an exit code; the server into a 4xx/5xx
JSON body. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LlmkitError(Exception):
    """Base class: `str(error)` is the user-facing sentence."""

    exit_code = 1
    http_status = 500
    kind = "llmkit_error"


class InvalidParams(LlmkitError):
    """A value the user gave is out of range or inconsistent; raised before any model loads."""

    exit_code = 2
    http_status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnknownModel(LlmkitError):
    """The model reference names nothing we can find."""

    exit_code = 2
    http_status = 404
    kind = "model_not_found"


class ModelUnavailableOffline(LlmkitError):
    """A Hub id that is not in the local cache while the Hub cannot be reached."""

    http_status = 503
    kind = "model_unavailable"


class ModelLoadError(LlmkitError):
    """The model was found but could not be loaded (corrupt file, unsupported architecture...)."""

    kind = "model_load_error"


class OutOfMemory(LlmkitError):
    """The model or the request did not fit in memory."""

    http_status = 507
    kind = "out_of_memory"


class UnsupportedFeature(LlmkitError):
    """The model or engine cannot do what was asked (e.g. --chat without a chat template)."""

    exit_code = 2
    http_status = 400
    kind = "invalid_request_error"


def one_line(text: object, limit: int = 300) -> str:
    """A library's multi-line exception text, squeezed into the one line our errors promise."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
