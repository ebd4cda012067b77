"""Every error a user or an HTTP client sees, in one module.

Every failure llmkit expects (bad parameter, unknown model, no network, bad file,
out of memory, a full server queue) is an LlmkitError whose message is one sentence saying
what to do. Each class carries its `exit_code` (the CLI's one red line, cli/__init__.py),
its `http_status` and its `kind` (the server's JSON error `type`, server/app.py). Anything
else is a bug and keeps its traceback.

Exit codes, one rule (click's and POSIX's usage-error convention, as llm and uv use it):

- 2: the command cannot work as typed, and llmkit could tell: an unknown option or a flag
  given a value, a value out of range, an unusable prompt or --input-file, a model that is
  not there (no such file or folder, a mistyped alias, an alias whose package is not
  installed, a Hub id the Hub says does not exist), an engine whose library is not installed,
  --chat on a model without a chat template. Nothing ran (or nothing more will); change the
  command, or install what the message names.
- 1: the command was valid but running it failed: the Hub cannot be reached (so a Hub id
  cannot be checked: it may exist), a model file that will not load, out of memory, a port
  in use, some prompts of an --input-file failed, every model in `compare` failed, a bug.
- 0: success (`compare` with at least one model that ran; `generate | head` closing the pipe).
- 130: interrupted (Ctrl-C).

So an unknown model and a missing file are both 2; a model llmkit could not look up is 1.
"""

from __future__ import annotations


class LlmkitError(Exception):
    """Base class: `str(error)` is the user-facing sentence."""

    exit_code = 1
    http_status = 500
    kind = "llmkit_error"


class InvalidParams(LlmkitError):
    """A value the user gave is out of range or inconsistent; raised before any model loads.

    `errors` holds every bad field as (field, sentence); with several, the message joins the sentences
    with "; " and `field` is the first one's (the CLI prints the message, the server names `field` as its
    `param` and lists `errors`)."""

    exit_code = 2
    http_status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, field: str | None = None, *, errors: list[tuple[str | None, str]] | None = None):
        super().__init__(message)
        self.field = field
        self.errors = list(errors) if errors else [(field, message)]

    @classmethod
    def from_errors(cls, errors) -> InvalidParams:
        """One InvalidParams for several (field, sentence) pairs, in the order given (at least one)."""
        errors = list(errors)
        return cls("; ".join(message for _, message in errors), errors[0][0], errors=errors)


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


class ContextExceeded(InvalidParams):
    """A text longer than the model's context; `context` is that context in tokens when the engine (or the server's
    refusal) says it, so a caller that splits texts into windows can size them."""

    def __init__(self, message: str, context: int | None = None, field: str | None = "prompt"):
        super().__init__(message, field)
        self.context = context


class ImplausibleScores(LlmkitError):
    """A server's log-probs fail a sanity check (e.g. prompt log-probs shifted by one token): no figure is made of
    them rather than a plausible-looking wrong one."""

    http_status = 502
    kind = "implausible_scores"

    def __init__(self, message: str, short: str = "implausible log-probs"):
        super().__init__(message)
        self.short = short  # for a table cell: "n/a (<short>)"


# --- talking to a server: a URL model (engine/remote.py) or `llmkit bench`'s target ---------------------


class EndpointUnreachable(LlmkitError):
    """Nothing answered at the server's address (refused, unknown host, timed out, TLS failed)."""

    kind = "endpoint_unreachable"


class EndpointFailed(LlmkitError):
    """The server answered, but not as an OpenAI-compatible server would (a 5xx, or a body we cannot read)."""

    kind = "endpoint_failed"


class AuthenticationFailed(LlmkitError):
    """401/403: the key is missing or wrong; the user fixes it with --api-key."""

    exit_code = 2
    kind = "authentication_failed"


class EndpointMissing(LlmkitError):
    """The server has no such route (e.g. no /v1/chat/completions); another --api may work."""

    exit_code = 2
    kind = "endpoint_missing"


class PortInUse(LlmkitError):
    """`llmkit serve` cannot listen on its address (in use, or not allowed)."""


# --- how a served request can end, besides the errors above (the server's JSON `type` is `kind`) ---------


class ModelNotReady(LlmkitError):
    """The server's model is still loading, failed to load, or the server is stopping."""

    http_status = 503
    kind = "model_not_ready"


class QueueFull(LlmkitError):
    """Every batch row and queue place is taken (--max-batch-size, --max-queue): retry later."""

    http_status = 503
    kind = "queue_full"


class ShuttingDown(LlmkitError):
    """The server stopped taking requests (SIGTERM), or stopped before this one finished."""

    http_status = 503
    kind = "shutting_down"


class RequestTimeout(LlmkitError):
    """The request ran past the server's --request-timeout."""

    http_status = 504
    kind = "timeout"


class Cancelled(LlmkitError):
    """The client went away; nobody reads this error, it only closes the request."""

    http_status = 499
    kind = "cancelled"


class GenerationFailed(LlmkitError):
    """An unexpected error inside the model's forward pass or a request's own decoding (a bug); logged with its
    traceback, and the server goes on."""

    kind = "server_error"


def one_line(text: object, limit: int = 300) -> str:
    """A library's multi-line exception text, squeezed into the one line our errors promise."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
