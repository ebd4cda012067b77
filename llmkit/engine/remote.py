"""The remote engine: the engine contract over HTTP, against any OpenAI-compatible server.

`-m http://host:port/v1` (or https) is a model that runs on a server: vLLM, llama-server, llama_cpp.server,
Ollama, LM Studio, TGI, SGLang, llmkit's own `serve`. The server's model is `URL#name` or --remote-model,
else the only (first) one /v1/models lists; the key is --api-key, else $LLMKIT_API_KEY, else
$OPENAI_API_KEY. `load` connects and probes the server once (`probe`); the commands then ask
`info.capabilities`, never whether the engine is remote.

How the contract is kept:

- stream / generate: POST /v1/completions with the prompt text (/v1/chat/completions with the messages for
  --chat: the server applies its own chat template), streamed (SSE), each chunk's text handed on as it comes.
  Every parameter of llmkit/params.py's table that the OpenAI bodies name is sent explicitly with llmkit's
  value, so a server's own defaults never leak in (llama_cpp.server's repeat_penalty defaults to 1.1; llama.cpp
  spells repetition_penalty repeat_penalty, so both names go). An optional field the server answers 400 naming
  (llmkit serve refuses repeat_penalty, OpenAI top_k) is dropped from then on; `unhonoured` says when a
  setting the user chose is then not applied, and probes (`_knob_status`) find servers that accept top_k or
  min_p and ignore them. Greedy is temperature 0.
- Seeds: sequence i of num_sequences is its own request with seed + i, as the local engines seed sequence i;
  so against llmkit serve `--seed N` gives the text local `generate --seed N` gives (same model and dtype).
  Other servers sample with their own samplers: same seed, same server, same text, but not llmkit's.
- Stop strings are sent as `stop` (the server stops early) and matched again here with the same StopMatcher
  as the local engines, so a stop string never reaches the output even from a server that streams part of it.
- Text is never split inside a character: SSE bytes are decoded incrementally (a character cut between two
  reads is joined), and a UTF-16 surrogate pair a server escapes into two events is joined again.
- Timings are the client's: TTFT from sending the request to the first chunk that carries output, one
  timestamp per chunk after it (Timings.token_times_s holds chunk times; a server that puts several tokens in
  one chunk shows one gap for them, as vLLM's benchmark measures ITL). Token counts are the server's `usage`
  when it sends one, else its /tokenize for the prompt and the chunks (logprob entries when asked for) for the
  output.

What it cannot keep, and says: token ids (the OpenAI API returns text: a Completion's token_ids are
REMOTE_TOKEN placeholders, as many as the server counted), a character the server itself sends broken (U+FFFD
stays U+FFFD), the model's whole next-token distribution (a server returns its top_logprobs: capabilities
.logits is False, top_logprobs says how many), and memory/CPU (the server's /metrics when it has process
figures, `server_metrics`).

Scores: generate_scored asks for the generated tokens' logprobs (capabilities.generated_logprobs); next_token_top
for top_logprobs; text_logprobs for echoed prompt logprobs (compare's perplexity), after `_check_alignment` has
compared them with the log-probs the server gives the same tokens while generating them: llama_cpp.server
0.3.36 returns echoed prompt logprobs shifted by one token, which would make a perplexity of ~65,000 look
like a measurement.

Connections: one httpx pool per engine; connect 10 s, 300 s between two bytes of an answer. Retries only where
they cannot run anything twice: a connection that could not be opened (the request never left), and the
idempotent GETs (/v1/models, /health, /metrics) on a transport error or a 502/503/504. A generation request
is never retried.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from llmkit.bench.client import (
    API_KEY_ENVS,
    KEEPALIVE_EXPIRY_S,
    Endpoint,
    ServerTokenizer,
    SSEParser,
    choice_output,
    connection_problem,
    error_text,
    parse_url,
)
from llmkit.engine.base import Decode, Engine, Generation, Session, TextToken, TopTokens, check_messages
from llmkit.engine.detokenize import StopMatcher
from llmkit.engine.sequence import choose_seed
from llmkit.engine.types import Capabilities, Chunk, Completion, EngineInfo, FinishReason, Result, Timings, Usage
from llmkit.errors import (
    AuthenticationFailed,
    ContextExceeded,
    EndpointFailed,
    EndpointMissing,
    EndpointUnreachable,
    ImplausibleScores,
    InvalidParams,
    LlmkitError,
    ModelNotReady,
    UnknownModel,
    UnsupportedFeature,
    one_line,
)
from llmkit.params import GenerationParams, check_text, neutral_values, param_table

ENGINE_NAME = "remote"
REMOTE_TOKEN = -1  # a generated token's id, which the OpenAI API does not return
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # between two bytes of an answer: a long prompt's prefill on a busy server
PROBE_TIMEOUT_S = 60.0
CONNECT_RETRIES = 2  # httpx retries only a connection that could not be opened: the request was never sent
GET_RETRIES = 2
GET_RETRY_STATUSES = (502, 503, 504)
RETRY_BACKOFF_S = 0.3
LOADING_WAIT_S = 120.0  # llmkit serve answers /health 503 "loading" while its model loads: wait that long
MAX_CONNECTIONS = 4
TOP_LOGPROBS_TRIES = (20, 5, 1)  # 20: OpenAI's chat cap and vLLM's default max_logprobs; 5: OpenAI's completions
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
ALIGNMENT_PROMPTS = (PROBE_PROMPT, "Hello, world! This is a small test of", "The sea at night is")
KNOB_PROBE_TOKENS = 8
KNOB_PROBE_TEMPERATURE = 2.0  # the highest OpenAI allows: sampling this hot ignoring top_k=1 never looks greedy
KNOB_PROBE_SEED = 1
PENALTY_PROBE = 2.0  # the highest repetition_penalty llmkit accepts
PENALTY_PROMPT = "the the the the the the the the"  # greedy decoding repeats itself within a few tokens here
PENALTY_PROBE_TOKENS = 24
# Echoed prompt logprobs against the ones the server gives the same tokens while generating: the same model,
# the same context, so they agree up to kernel differences between prefill and decode (bf16 on GPUs).
ALIGNMENT_TOLERANCE = 0.05  # nats, median over the tokens checked
# llama.cpp spells repetition_penalty repeat_penalty (llama_cpp.server defaults it to 1.1): both names go.
SPELLINGS: dict[str, tuple[str, ...]] = {"repetition_penalty": ("repeat_penalty",)}
NEUTRAL = neutral_values()
EXTENSION_KNOBS = tuple(name for name, spec in param_table().items() if spec.extension and spec.kind == "sampling")
# Fields a request can go without when the server refuses them (a 400 naming one): llmkit's extensions, their
# other spellings, and stream_options (usage at the end of a stream).
DROPPABLE = (*EXTENSION_KNOBS, *(alias for aliases in SPELLINGS.values() for alias in aliases), "stream_options")
CONTEXT_IN_MESSAGE = re.compile(
    r"context(?: window| length| size)?(?: of| is)?\s*(?:\(?n_ctx\)?\s*)?[:=]?\s*(\d{2,})", re.IGNORECASE
)


def parse_model_url(reference: str, remote_model: str | None = None, api_key: str | None = None) -> Endpoint:
    """`http(s)://host:port[/prefix][/v1][#name]` -> Endpoint (--remote-model names the model when the URL does
    not); a malformed URL is one line, exit 2, before anything is sent."""
    try:
        endpoint = parse_url(reference, api_key)
    except InvalidParams as exc:
        raise InvalidParams(str(exc).replace("the target URL", "the model URL"), field="model") from None
    if remote_model is not None:
        if endpoint.model is not None and endpoint.model != remote_model:
            raise InvalidParams(
                f"the URL names model {endpoint.model!r} and --remote-model {remote_model!r}; give one", field="model"
            )
        endpoint = endpoint.with_model(remote_model)
    return endpoint


def api_key(given: str | None) -> str | None:
    if given:
        return given
    return next((os.environ[name] for name in API_KEY_ENVS if os.environ.get(name)), None)


def _json_or_text(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", errors="replace")


def context_from_message(message: str) -> int | None:
    """The context size a server's refusal states ("exceeds the model's context of 256 tokens", "Requested tokens
    (300) exceed context window of 256", vLLM's "maximum context length is 2048 tokens"), if it states one."""
    match = CONTEXT_IN_MESSAGE.search(message)
    return int(match.group(1)) if match else None


def join_surrogates(text: str) -> str:
    """A UTF-16 surrogate pair that arrived as two JSON escapes becomes its character; a lone half becomes U+FFFD."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# --- the connection --------------------------------------------------------------------------------------


class Http:
    """One httpx connection pool to one server, with the timeouts and the only retries that are safe."""

    def __init__(self, endpoint: Endpoint):
        import httpx

        self.httpx = httpx
        self.endpoint = endpoint
        self.shown = _shown_root(endpoint)
        limits = httpx.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(retries=CONNECT_RETRIES, limits=limits),
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            headers=endpoint.headers(),
            trust_env=True,  # HTTPS_PROXY, NO_PROXY and SSL_CERT_FILE, as curl and the openai SDK read them
        )

    def url(self, path: str) -> str:
        return self.endpoint.root + path

    def unreachable(self, exc: BaseException) -> EndpointUnreachable:
        problem = connection_problem(exc)
        hint = "; is the server running on that address and port?" if problem == "connection refused" else ""
        return EndpointUnreachable(f"cannot reach {self.shown}: {problem}{hint}")

    def get(self, path: str) -> tuple[int, Any]:
        """GET with retries (idempotent): a transport error or a 502/503/504 is tried again GET_RETRIES times."""
        for attempt in range(GET_RETRIES + 1):
            try:
                response = self.client.get(self.url(path), timeout=PROBE_TIMEOUT_S)
            except (self.httpx.TransportError, OSError) as exc:
                if attempt == GET_RETRIES:
                    raise self.unreachable(exc) from None
            else:
                if response.status_code not in GET_RETRY_STATUSES or attempt == GET_RETRIES:
                    return response.status_code, _json_or_text(response.content)
            time.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> tuple[int, Any]:
        """POST once (never retried: the server may have started generating)."""
        try:
            response = self.client.post(self.url(path), json=body, timeout=timeout_s or READ_TIMEOUT_S)
        except self.httpx.TimeoutException as exc:
            raise EndpointFailed(f"{self.shown} did not answer in time ({type(exc).__name__})") from None
        except (self.httpx.TransportError, OSError) as exc:
            raise self.unreachable(exc) from None
        return response.status_code, _json_or_text(response.content)

    @contextmanager
    def stream(self, path: str, body: dict[str, Any]) -> Iterator[Any]:
        """POST with a streamed answer: yields the response (status checked by the caller), closed on exit."""
        try:
            request = self.client.build_request("POST", self.url(path), json=body)
            response = self.client.send(request, stream=True)
        except self.httpx.TimeoutException as exc:
            raise EndpointFailed(f"{self.shown} did not answer in time ({type(exc).__name__})") from None
        except (self.httpx.TransportError, OSError) as exc:
            raise self.unreachable(exc) from None
        try:
            yield response
        finally:
            response.close()

    def events(self, response) -> Iterator[tuple[dict[str, Any], float]]:
        """Each SSE event of a 200 answer as (parsed JSON, perf_counter when its bytes arrived), up to [DONE]."""
        parser = SSEParser()
        try:
            for raw in response.iter_bytes():
                now = time.perf_counter()
                for data in parser.feed(raw):
                    event = self._event(data)
                    if event is None:
                        return
                    yield event, now
            for data in parser.close():
                event = self._event(data)
                if event is None:
                    return
                yield event, time.perf_counter()
        except self.httpx.TimeoutException:
            raise EndpointFailed(
                f"{self.shown} stopped answering mid-stream (nothing for {READ_TIMEOUT_S:g} s)"
            ) from None
        except self.httpx.TransportError as exc:
            raise EndpointFailed(
                f"the connection to {self.shown} broke mid-stream: {connection_problem(exc)}"
            ) from None

    def _event(self, data: str) -> dict[str, Any] | None:
        if data == "[DONE]":
            return None
        try:
            event = json.loads(data)
        except ValueError:
            raise EndpointFailed(f"{self.shown} sent an SSE event that is not JSON: {one_line(data, 80)}") from None
        if not isinstance(event, dict):
            return {}
        if event.get("error"):
            message, kind = error_text(event, "error event")
            raise EndpointFailed(
                f"{self.shown} ended the answer with an error{f' ({kind})' if kind else ''}: {message}"
            )
        return event

    def close(self) -> None:
        self.client.close()


def _shown_root(endpoint: Endpoint) -> str:
    from llmkit.models import shown_url

    return shown_url(endpoint.root)


# --- what the probe found ----------------------------------------------------------------------------------


@dataclass
class Probe:
    """What the server offers, found on connect (and, for the costlier checks, the first time a command needs it)."""

    models: list[str] | None = None  # /v1/models; None: no such list
    model: str | None = None  # the name sent in every body
    context_length: int | None = None  # vLLM's max_model_len, when /v1/models says it
    health: dict[str, Any] | None = None  # /health's JSON (llmkit serve and llama-server say what runs)
    health_status: int | None = None
    tokenizer: str | None = None  # which /tokenize shape answered (ServerTokenizer.SHAPES)
    completions: bool = True  # POST /v1/completions exists
    logprobs: bool = False  # completions return the generated tokens' logprobs
    top_logprobs: int | None = None  # the most top_logprobs asked for and given (TOP_LOGPROBS_TRIES)
    echo: bool = False  # completions with echo return the prompt's logprobs
    missing: dict[str, str] = field(default_factory=dict)  # capability -> why not, in words
    refused: set[str] = field(default_factory=set)  # optional body fields the server answered 400 naming
    knobs: dict[str, str] = field(
        default_factory=dict
    )  # extension knob -> honoured / ignored / refused / no effect seen
    greedy_baseline: str | None = None
    alignment: str | None = None  # "ok" or why the echoed prompt logprobs are not to be trusted
    alignment_short: str = ""  # the same in a few words, for a table cell
    chat_top_logprobs: int | None = None


class RemoteTokenizer:
    """The Tokenizer slice over the server's /tokenize and /detokenize (vLLM's, llama-server's or
    llama-cpp-python's shape), or, without them, a tokenizer that says in one line that there is none."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __init__(self, engine: RemoteEngine, shape: tuple | None):
        self.engine = engine
        self.shape = shape

    def _missing(self) -> UnsupportedFeature:
        return UnsupportedFeature(
            f"the server at {self.engine.http.shown} offers no /tokenize, so llmkit cannot tokenize text with its "
            "tokenizer; token counts come from the answers' usage"
        )

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        if self.shape is None:
            raise self._missing()
        answer = self.engine._tokenizer_post(self.shape[1], self.shape[2](self.engine.probe.model, text))
        return {"input_ids": [int(t) for t in answer["tokens"]]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.shape is None:
            raise self._missing()
        answer = self.engine._tokenizer_post(self.shape[3], self.shape[4](self.engine.probe.model, list(ids)))
        for key in ServerTokenizer.TEXT_KEYS:
            if isinstance(answer.get(key), str):
                return answer[key]
        raise EndpointFailed(f"{self.engine.http.shown}{self.shape[3]} answered without the text")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        raise UnsupportedFeature("a server applies its own chat template: llmkit sends it the messages")


# --- one sequence's text ------------------------------------------------------------------------------------


class _Sequence:
    """What arrived for one sequence: joined surrogate halves, stop strings held back and cut, token counts."""

    def __init__(self, index: int, stops: Sequence[str]):
        self.index = index
        self.stops = StopMatcher(stops)
        self.pending = ""  # a high surrogate waiting for its other half
        self.text = ""
        self.chunks = 0
        self.logprobs: list[float] = []
        self.server_finish: str | None = None
        self.stopped = False  # a stop string matched here
        self.stopped_at_limit = False  # max_new_tokens output chunks (or logprob entries) arrived

    @property
    def stopped_early(self) -> bool:
        """The stream was closed here, before the server's own end (and its usage)."""
        return self.stopped or self.stopped_at_limit

    def feed(self, piece: str) -> str:
        piece = self.pending + piece
        self.pending = ""
        if piece and "\ud800" <= piece[-1] <= "\udbff":
            self.pending, piece = piece[-1], piece[:-1]
        text, hit = self.stops.feed(join_surrogates(piece))
        self.stopped = hit
        self.text += text
        return text

    def finish(self) -> str:
        text = "" if self.stopped else self.stops.flush(join_surrogates(self.pending))
        self.pending = ""
        self.text += text
        return text


def _finish_reason(sequence: _Sequence, tokens: int, limit: int) -> FinishReason:
    if sequence.stopped or sequence.server_finish == "stop":
        return "stop"
    if sequence.server_finish == "length" or tokens >= limit:
        return "length"
    return "stop"


def _logprob_values(choice: dict[str, Any]) -> list[float]:
    """The generated tokens' log-probs a chunk or answer carries: completions' token_logprobs, chat's content."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("token_logprobs"), list):
        return [float(v) for v in logprobs["token_logprobs"] if isinstance(v, (int, float))]
    if isinstance(logprobs.get("content"), list):
        return [float(e["logprob"]) for e in logprobs["content"] if isinstance(e, dict) and "logprob" in e]
    return []


# --- the engine ------------------------------------------------------------------------------------------------


class RemoteEngine(Engine):
    """The Engine contract over HTTP. It holds no model and computes nothing: capabilities.logits and
    local_resources are False, and what the scores need is what the probe found."""

    tokenizer: RemoteTokenizer

    def __init__(self, http: Http, probe: Probe, info: EngineInfo):
        self.http = http
        self.probe = probe
        self.info = info
        shape = next((s for s in ServerTokenizer.SHAPES if s[0] == probe.tokenizer), None)
        self.tokenizer = RemoteTokenizer(self, shape)

    # --- connecting --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, reference: str | None, options, *, progress=None) -> RemoteEngine:
        if reference is None:
            raise InvalidParams("give the server's URL: -m http://host:port/v1", field="model")
        from llmkit.devices import quantize_asked

        for name, asked in (
            ("--device", options.device != "auto"),
            ("--dtype", options.dtype != "auto"),
            ("--quantize", quantize_asked(options.quantize)),
        ):
            if asked:
                raise UnsupportedFeature(f"{name} is the server's setting, not llmkit's: drop it for a URL model")
        if options.threads is not None:
            raise UnsupportedFeature("--threads is the server's setting, not llmkit's: drop it for a URL model")
        endpoint = parse_model_url(reference, options.remote_model, api_key(options.api_key))
        started = time.perf_counter()
        http = Http(endpoint)
        if progress:
            progress(f"connecting to {http.shown}", 0, None)
        try:
            probe = probe_server(http, progress)
        except BaseException:
            http.close()
            raise
        info = _info(http, probe, time.perf_counter() - started)
        return cls(http, probe, info)

    def close(self) -> None:
        self.http.close()

    def _refresh(self) -> None:
        """The capability record (and what choices says of it) again, after a probe learnt more."""
        choices = {**self.info.choices, "capabilities": _info(self.http, self.probe, 0.0).choices["capabilities"]}
        self.info = replace(self.info, capabilities=_capabilities(self.probe), choices=choices)

    # --- bodies --------------------------------------------------------------------------------------------

    def _fields(self, params: GenerationParams, seed: int | None) -> dict[str, Any]:
        """Every parameter the OpenAI bodies name, with llmkit's value (greedy: temperature 0 and the knobs greedy
        decoding reads), minus the optional fields this server refuses."""
        if params.constraint is not None:  # structured output is enforced by the local engines' decode loops
            raise UnsupportedFeature(
                "structured output (--json-schema, --regex, --choice, --grammar) works with local models only"
            )
        body: dict[str, Any] = {}
        for name, spec in param_table(type(params)).items():
            if spec.openai is None or spec.kind == "draws":
                continue  # seed and n: one request per sequence, seeded here
            value = getattr(params, name)
            if name in ("stop", "logit_bias"):  # left out when empty
                if value:
                    body[spec.openai] = list(value) if name == "stop" else dict(value)
                continue
            if params.is_greedy and spec.greedy_ignores:
                continue
            for key in (spec.openai, *SPELLINGS.get(name, ())):
                body[key] = value
        if params.is_greedy:
            body["temperature"] = 0.0
        elif seed is not None:
            body["seed"] = seed
        return {key: value for key, value in body.items() if key not in self.probe.refused}

    def _body(self, fields: dict[str, Any], *, prompt: str | None = None, messages=None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.probe.model} if self.probe.model else {}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        body.update(fields)
        return {key: value for key, value in body.items() if key not in self.probe.refused}

    def _refused_field(self, status: int, answer: Any, body: dict[str, Any]) -> str | None:
        """The optional field a 400/422 names, when the body had it: then the request goes again without it."""
        if status not in (400, 422):
            return None
        candidates = [name for name in DROPPABLE if name in body and name not in self.probe.refused]
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict) and error.get("param") in candidates:
            return str(error["param"])
        text = answer if isinstance(answer, str) else json.dumps(answer)
        return next((name for name in candidates if re.search(rf"\b{re.escape(name)}\b", text)), None)

    def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST, dropping each optional field the server refuses, until it answers otherwise."""
        while True:
            status, answer = self.http.post("/v1" + path, body)
            refused = self._refused_field(status, answer, body)
            if refused is None:
                return status, answer
            self.probe.refused.add(refused)
            body = {key: value for key, value in body.items() if key != refused}

    def _fail(self, status: int, answer: Any, what: str) -> LlmkitError:
        """The one-line error for a non-200 answer to `what`."""
        message, kind = error_text(answer, f"HTTP {status}")
        shown = self.http.shown
        if status in (401, 403):
            given = "the key given was refused" if self.http.endpoint.api_key else "no key was given"
            return AuthenticationFailed(
                f"{shown} answered {status} ({message}): {given}; pass --api-key KEY or set "
                f"{API_KEY_ENVS[0]} (or {API_KEY_ENVS[1]})"
            )
        if status == 404:
            if "model" in message.lower() and self.probe.model:
                return UnknownModel(f"{shown} does not serve model {self.probe.model!r}: {message}")
            return EndpointMissing(f"{shown} has no {what} ({message})")
        if status in (400, 413, 422):
            if "context" in message.lower() or "too long" in message.lower() or status == 413:
                return ContextExceeded(f"the server refused the request: {message}", context_from_message(message))
            return InvalidParams(f"the server refused the request: {message}")
        if status == 503:
            return ModelNotReady(f"{shown} is not ready (503: {message}); try again in a moment")
        return EndpointFailed(f"{shown} answered {status}{f' {kind}' if kind else ''} to {what}: {message}")

    # --- generation ----------------------------------------------------------------------------------------

    def stream(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        chat: bool = False,
        system: str | None = None,
        logprobs: int | None = None,
    ) -> Generation:
        """Send the prompt text (or, with chat, the messages: the server applies its template) and stream."""
        if logprobs is not None:  # capabilities.decode_logprobs is False: no token ids or offsets to hang them on
            raise UnsupportedFeature(f"the {self.info.engine} engine does not return log-probs while generating")
        started = time.perf_counter()
        check_text(prompt, "the prompt", "prompt")
        check_text(system or "", "the system prompt", "system")
        return Generation(
            self._run(prompt, params, chat=chat, system=system, seed=choose_seed(params), started=started)
        )

    def session(self) -> RemoteSession:
        """A conversation (`llmkit chat`): each turn sends the whole messages list to /v1/chat/completions; the
        server applies its template and keeps (or not) its own prefix cache."""
        return RemoteSession(self)

    def _decode(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        seed: int | None,
        started: float,
        *,
        logprobs: int | None = None,  # never asked: capabilities.decode_logprobs is False (`llmkit serve` refuses URLs)
    ) -> Decode:
        return (yield from self._run(prompt, params, chat=False, system=None, seed=seed, started=started))

    def generate_scored(
        self, prompt: str, params: GenerationParams, *, chat: bool = False, system: str | None = None
    ) -> tuple[Result, list[list[float] | None]]:
        """generate(), with the generated tokens' log-probs as the server reports them (None when it reports none)."""
        started = time.perf_counter()
        scores: list[list[float] | None] = []
        want = self.probe.logprobs
        run = self._run(
            prompt,
            params,
            chat=chat,
            system=system,
            seed=choose_seed(params),
            started=started,
            scores=scores if want else None,
        )
        generation = Generation(run)
        for _ in generation:
            pass
        result = generation.result
        return result, scores if want else [None] * len(result.completions)

    def _run(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        chat: bool,
        system: str | None,
        seed: int | None,
        started: float,
        scores: list[list[float] | None] | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> Decode:
        if chat:
            path, what = "/chat/completions", "POST /v1/chat/completions"
            if messages is None:  # a whole conversation comes from RemoteSession; else the prompt and system
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}
                ]
        else:
            if not self.probe.completions:
                raise EndpointMissing(f"{self.http.shown} has no POST /v1/completions (a chat-only server): use --chat")
            path, what, messages = "/completions", "POST /v1/completions", None
        times: list[float] = []
        sequences: list[_Sequence] = []
        counts: list[int] = []
        prompt_tokens: int | None = None
        cached_tokens = 0
        for index in range(params.num_sequences):
            fields = self._fields(params, None if seed is None else seed + index)
            fields.update(stream=True, stream_options={"include_usage": True})
            if scores is not None:
                fields.update({"logprobs": True} if chat else {"logprobs": 1})
            body = self._body(fields, prompt=prompt, messages=messages)
            sequence = _Sequence(index, params.stop)
            sequences.append(sequence)
            usage: dict[str, Any] | None = None
            with self._open(path, body, what) as response:
                for event, now in self.http.events(response):
                    for choice in event.get("choices") or ():
                        if not isinstance(choice, dict):
                            continue
                        piece = choice_output(choice)
                        if piece is not None and max(sequence.chunks, len(sequence.logprobs)) >= params.max_new_tokens:
                            # the length limit holds here too: llama_cpp.server streams past max_tokens when asked
                            # for logprobs; output beyond the limit is dropped and the stream closed
                            sequence.stopped_at_limit = True
                            sequence.server_finish = "length"
                            break
                        if scores is not None:  # the closing chunk may carry one too: the end-of-sequence token's
                            sequence.logprobs.extend(_logprob_values(choice))
                        if piece is not None:
                            times.append(now - started)
                            sequence.chunks += 1
                            text = sequence.feed(piece)
                            if sequence.stopped:
                                break
                            if text:
                                yield Chunk(index, text)
                        if choice.get("finish_reason"):
                            sequence.server_finish = str(choice["finish_reason"])
                    if sequence.stopped_early:
                        break  # closing the stream tells the server to stop
                    if isinstance(event.get("usage"), dict):
                        usage = event["usage"]
            tokens = sequence.chunks
            if sequence.logprobs and len(sequence.logprobs) >= tokens:
                tokens = len(sequence.logprobs)
            if usage and isinstance(usage.get("completion_tokens"), int) and not sequence.stopped_early:
                tokens = usage["completion_tokens"]
            if prompt_tokens is None and usage and isinstance(usage.get("prompt_tokens"), int):
                prompt_tokens = usage["prompt_tokens"]
                details = usage.get("prompt_tokens_details")  # OpenAI's report of the server's prefix cache
                if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                    cached_tokens = details["cached_tokens"]
            counts.append(tokens)
            text = sequence.finish()
            reason = _finish_reason(sequence, tokens, params.max_new_tokens)
            yield Chunk(index, text, (), reason)
            if scores is not None:
                scores.append(sequence.logprobs[:tokens] if sequence.logprobs else None)
        if prompt_tokens is None:
            prompt_tokens = self._count_prompt(prompt, chat)
        if not times:
            times = [time.perf_counter() - started]  # no output at all (an immediate stop): one timestamp, the end
        completions = tuple(
            Completion(s.index, s.text, _finish_reason(s, n, params.max_new_tokens), (REMOTE_TOKEN,) * n)
            for s, n in zip(sequences, counts)
        )
        return Result(
            prompt,
            completions,
            Usage(prompt_tokens, sum(counts), cached_tokens),
            _timings(times, prompt_tokens, counts),
            seed,
            params.model_dump(),
        )

    @contextmanager
    def _open(self, path: str, body: dict[str, Any], what: str) -> Iterator[Any]:
        """A streamed POST that answered 200 (each optional field the server refuses is dropped and the request
        sent again: a refusal means nothing was generated)."""
        while True:
            with self.http.stream("/v1" + path, body) as response:
                if response.status_code == 200:
                    yield response
                    return
                answer = _json_or_text(response.read())
            refused = self._refused_field(response.status_code, answer, body)
            if refused is None:
                raise self._fail(response.status_code, answer, what)
            self.probe.refused.add(refused)
            body = {key: value for key, value in body.items() if key != refused}

    def _count_prompt(self, prompt: str, chat: bool) -> int:
        """The prompt's tokens when the answer had no usage: the server's /tokenize (not for chat: the template is
        the server's), else 0, which the timing line shows as it is."""
        if chat or self.tokenizer.shape is None:
            return 0
        try:
            return len(self.tokenizer(prompt)["input_ids"])
        except (EndpointFailed, KeyError, TypeError, ValueError):
            return 0

    # --- what the contract asks that a server cannot give -------------------------------------------------------

    def prompt_ids(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """The server's tokens for the prompt (its /tokenize); chat prompts are the server's to template."""
        check_text(prompt, "the prompt", "prompt")
        if chat:
            raise UnsupportedFeature("a server applies its own chat template, so llmkit cannot tokenize a chat prompt")
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise InvalidParams("prompt is empty after tokenization; give some text", field="prompt")
        return list(ids)

    def next_token_logits(self, prompt: str, *, chat: bool = False, system: str | None = None):
        raise UnsupportedFeature(
            f"the server at {self.http.shown} gives at most its top_logprobs, not the model's whole next-token "
            "distribution (use next_token_top)"
        )

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        raise UnsupportedFeature(
            f"the server at {self.http.shown} scores texts (echo), not token ids (use text_logprobs)"
        )

    # --- scores ---------------------------------------------------------------------------------------------

    def next_token_top(self, prompt: str, top: int, *, chat: bool = False, system: str | None = None) -> TopTokens:
        """The server's top_logprobs for the first generated token (greedy, so nothing but the prompt decides it)."""
        check_text(prompt, "the prompt", "prompt")
        greedy = GenerationParams(greedy=True, max_new_tokens=1)
        if chat:
            cap = self._chat_top_logprobs()
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            fields = {**self._fields(greedy, None), "logprobs": True, "top_logprobs": min(top, cap)}
            status, answer = self._post("/chat/completions", self._body(fields, messages=messages))
        else:
            if not self.probe.top_logprobs:
                raise UnsupportedFeature(self.missing_line("top_logprobs", "explore next-token"))
            cap = self.probe.top_logprobs
            fields = {**self._fields(greedy, None), "logprobs": min(top, cap)}
            status, answer = self._post("/completions", self._body(fields, prompt=prompt))
        if status != 200:
            raise self._fail(status, answer, "the next-token request")
        choice = answer["choices"][0]
        pairs = _top_pairs(choice)
        if not pairs:
            raise UnsupportedFeature(self.missing_line("top_logprobs", "explore next-token"))
        asked = min(top, cap)
        pairs = sorted(pairs, key=lambda pair: -pair[1])[:asked]
        usage = answer.get("usage") or {}
        prompt_tokens = int(usage["prompt_tokens"]) if isinstance(usage.get("prompt_tokens"), int) else 0
        return TopTokens(
            tokens=tuple(token for token, _ in pairs),
            logprobs=tuple(value for _, value in pairs),
            token_ids=(None,) * len(pairs),
            prompt_tokens=prompt_tokens,
            vocab_size=None,
            cap=cap,
            asked=asked,
        )

    def _chat_top_logprobs(self) -> int:
        """How many top_logprobs /v1/chat/completions gives (probed the first time --chat asks)."""
        if self.probe.chat_top_logprobs is None:
            greedy = GenerationParams(greedy=True, max_new_tokens=1)
            self.probe.chat_top_logprobs = 0
            for count in TOP_LOGPROBS_TRIES:
                fields = {**self._fields(greedy, None), "logprobs": True, "top_logprobs": count}
                status, answer = self._post(
                    "/chat/completions", self._body(fields, messages=[{"role": "user", "content": "Hello"}])
                )
                if status == 200 and _top_pairs(answer["choices"][0]):
                    self.probe.chat_top_logprobs = count
                    break
                if status == 200:
                    break
                self.probe.missing["top_logprobs"] = _refusal(status, answer, "top_logprobs")
        if not self.probe.chat_top_logprobs:
            raise UnsupportedFeature(self.missing_line("top_logprobs", "explore next-token --chat"))
        return self.probe.chat_top_logprobs

    def text_logprobs(self, text: str) -> list[TextToken]:
        """The server's tokens of `text` with their echoed log-probs (the first, unpredicted, has None), once the
        echoed log-probs passed `_check_alignment`."""
        if not self.probe.echo:
            raise UnsupportedFeature(self.missing_line("prompt_logprobs", "perplexity"))
        self._check_alignment()
        tokens, _ = self._echo(text)
        return tokens

    def _echo(self, text: str) -> tuple[list[TextToken], list[dict[str, float] | None]]:
        """One echo request: the prompt's tokens with log-probs, and the top_logprobs at each."""
        greedy = GenerationParams(greedy=True, max_new_tokens=1)
        body = self._body({**self._fields(greedy, None), "echo": True, "logprobs": 1}, prompt=text)
        status, answer = self._post("/completions", body)
        if status != 200:
            raise self._fail(status, answer, "the echo request")
        choice = answer["choices"][0]
        logprobs = choice.get("logprobs") or {}
        texts = [str(t) for t in logprobs.get("tokens") or []]
        values = list(logprobs.get("token_logprobs") or [])
        offsets = list(logprobs.get("text_offset") or [])
        tops = list(logprobs.get("top_logprobs") or [None] * len(texts))
        usage = answer.get("usage") or {}
        count = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else None
        if count is None or count > len(texts):
            count = sum(1 for offset in offsets if isinstance(offset, int) and offset < len(text)) or len(texts)
        texts, values, offsets, tops = texts[:count], values[:count], offsets[:count], tops[:count]
        starts = _offsets(texts, offsets, text)
        tokens = [
            TextToken(t, start, float(v) if isinstance(v, (int, float)) else None)
            for t, start, v in zip(texts, starts, values)
        ]
        return tokens, [top if isinstance(top, dict) else None for top in tops]

    def _check_alignment(self) -> None:
        """Echoed prompt log-probs must agree with the ones the server gives the same tokens while generating them
        (greedy, after the same text): a server that shifts them by one token, or computes them otherwise, gets
        ImplausibleScores instead of a perplexity. Done once; the verdict is kept."""
        if self.probe.alignment is None:
            self.probe.alignment, self.probe.alignment_short = self._alignment_verdict()
            self._refresh()
        if self.probe.alignment != "ok":
            raise ImplausibleScores(self.probe.alignment, self.probe.alignment_short)

    def _alignment_verdict(self) -> tuple[str, str]:
        """("ok", "") or (why the echoed prompt log-probs are not to be trusted, the same in a few words)."""
        unchecked = "prompt logprobs could not be checked"
        deltas: list[float] = []
        shifted = checked_shift = 0
        for prompt in ALIGNMENT_PROMPTS:
            greedy = GenerationParams(greedy=True, max_new_tokens=KNOB_PROBE_TOKENS)
            status, answer = self._post(
                "/completions", self._body({**self._fields(greedy, None), "logprobs": 1}, prompt=prompt)
            )
            if status != 200:
                message, _ = error_text(answer, f"HTTP {status}")
                why = (
                    f"the server's generated-token log-probs could not be read to check its prompt log-probs: {message}"
                )
                return why, unchecked
            logprobs = answer["choices"][0].get("logprobs") or {}
            pieces = [str(t) for t in logprobs.get("tokens") or []]
            values = [v for v in logprobs.get("token_logprobs") or []]
            if len(pieces) != len(values) or not pieces:
                continue
            echoed, tops = self._echo(prompt + "".join(pieces))
            # Walk the generated tokens and the echoed ones after the prompt together, while they are the same
            # tokens at the same places: past the first difference (a token that is not plain text, such as a
            # byte token's "bytes:\\xb7" or "", or text that tokenizes otherwise), the contexts differ.
            j = next((i for i, token in enumerate(echoed) if token.offset == len(prompt)), len(echoed))
            start = len(prompt)
            for i, (piece, value) in enumerate(zip(pieces, values)):
                if not _plain(piece) or value is None or j >= len(echoed):
                    break
                token = echoed[j]
                if token.offset != start or token.text != piece or token.logprob is None:
                    break
                deltas.append(abs(token.logprob - float(value)))
                top = tops[j]
                if i + 1 < len(pieces) and _plain(pieces[i + 1]) and values[i + 1] is not None and top:
                    checked_shift += 1
                    after = top.get(pieces[i + 1])
                    if after is not None and abs(after - float(values[i + 1])) <= ALIGNMENT_TOLERANCE / 10:
                        shifted += 1
                start += len(piece)
                j += 1
            if len(deltas) >= 3:
                break
        if not deltas:
            why = "could not check the server's prompt log-probs: no echoed token lined up with a generated one"
            return why, unchecked
        median = statistics.median(deltas)
        if checked_shift and shifted * 2 >= checked_shift and median > ALIGNMENT_TOLERANCE / 10:
            why = (
                "the server's echoed prompt log-probs are shifted by one token: each token comes with the log-prob of "
                "the distribution after it, not the one that predicts it (llama_cpp.server 0.3.x does this), so no "
                "perplexity is made of them"
            )
            return why, "prompt logprobs shifted by one token"
        if median > ALIGNMENT_TOLERANCE:
            why = (
                "the server's echoed prompt log-probs disagree with the log-probs it gives the same tokens while "
                f"generating them (by {median:.2f} nats, median), so no perplexity is made of them"
            )
            return why, "prompt logprobs fail the sanity check"
        return "ok", ""

    # --- what the server applies -------------------------------------------------------------------------------

    def unhonoured(self, params: GenerationParams) -> list[str]:
        """A sentence per extension knob set away from neutral that the server refuses or ignores (probed the
        first time a request sets it)."""
        notes = []
        for name in EXTENSION_KNOBS:
            value = getattr(params, name)
            if value == NEUTRAL[name] or (params.is_greedy and param_table()[name].greedy_ignores):
                continue
            status = self._knob_status(name)
            if status in ("refused", "ignored"):
                notes.append(f"the server at {self.http.shown} {status} {name}, so {name}={value} is not applied")
        return notes

    def _knob_status(self, name: str) -> str:
        if name not in self.probe.knobs:
            spellings = (name, *SPELLINGS.get(name, ()))
            if all(s in self.probe.refused for s in spellings):
                self.probe.knobs[name] = "refused"
            else:
                self.probe.knobs[name] = self._probe_knob(name)
            self._refresh()
        return self.probe.knobs[name]

    def _probe_knob(self, name: str) -> str:
        """top_k=1 or min_p=1 at temperature 2 must give the greedy text; repetition_penalty 2 must change the greedy
        text of a prompt that invites repeats (a server that does not change it is "no effect seen", not blamed)."""
        strict = {"top_k": 1, "min_p": 1.0}.get(name)
        if name == "repetition_penalty":
            baseline = self._probe_text(
                GenerationParams(greedy=True, max_new_tokens=PENALTY_PROBE_TOKENS), PENALTY_PROMPT
            )
            params = GenerationParams(
                greedy=True, max_new_tokens=PENALTY_PROBE_TOKENS, repetition_penalty=PENALTY_PROBE
            )
            status = "honoured" if self._probe_text(params, PENALTY_PROMPT) != baseline else "no effect seen"
        elif strict is not None:
            if self.probe.greedy_baseline is None:
                self.probe.greedy_baseline = self._probe_text(
                    GenerationParams(greedy=True, max_new_tokens=KNOB_PROBE_TOKENS), PROBE_PROMPT
                )
            values = {**NEUTRAL, "temperature": KNOB_PROBE_TEMPERATURE, name: strict}
            params = GenerationParams(**values, max_new_tokens=KNOB_PROBE_TOKENS)
            status = "honoured" if self._probe_text(params, PROBE_PROMPT) == self.probe.greedy_baseline else "ignored"
        else:
            return "untested"
        if all(s in self.probe.refused for s in (name, *SPELLINGS.get(name, ()))):
            status = "refused"
        return status

    def _probe_text(self, params: GenerationParams, prompt: str) -> str:
        body = self._body(self._fields(params, KNOB_PROBE_SEED), prompt=prompt)
        path = "/completions" if self.probe.completions else "/chat/completions"
        if not self.probe.completions:
            body.pop("prompt")
            body["messages"] = [{"role": "user", "content": prompt}]
        status, answer = self._post(path, body)
        if status != 200:
            raise self._fail(status, answer, "a probe request")
        choice = answer["choices"][0]
        return str(choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content"))

    def missing_line(self, capability: str, needed_by: str) -> str:
        """One line: what the command needs, that this server lacks it, and why (what it answered)."""
        what = {
            "top_logprobs": "the server's top_logprobs",
            "prompt_logprobs": "prompt log-probs (echo with logprobs)",
            "generated_logprobs": "the generated tokens' logprobs",
        }.get(capability, capability)
        why = self.probe.missing.get(capability)
        return f"{needed_by} needs {what}, and the server at {self.http.shown} has none" + (f" ({why})" if why else "")

    # --- the server's own figures ---------------------------------------------------------------------------------

    def server_metrics(self) -> dict[str, float] | None:
        """The server's Prometheus /metrics, flattened (measure.parse_prometheus); None when it has none."""
        from llmkit.measure import parse_prometheus

        try:
            status, answer = self.http.get("/metrics")
        except EndpointUnreachable:
            return None
        if status != 200 or not isinstance(answer, str) or "# TYPE" not in answer and "# HELP" not in answer:
            return None
        return parse_prometheus(answer)

    def _tokenizer_post(self, path: str, body: dict[str, Any]) -> Any:
        status, answer = self.http.post(path, body, timeout_s=PROBE_TIMEOUT_S)
        if status != 200 or not isinstance(answer, dict):
            raise EndpointFailed(f"{self.http.shown}{path} answered {status}")
        return answer


# --- probing -----------------------------------------------------------------------------------------------------


class RemoteSession(Session):
    """A conversation with a server: nothing is kept here between turns (the server caches prefixes itself)."""

    engine: RemoteEngine

    def stream(
        self,
        messages: list[dict[str, str]],
        params: GenerationParams,
        *,
        logprobs: int | None = None,
        fit_context: bool = False,  # the server knows its context; it answers a history too long for it
    ) -> Generation:
        if logprobs is not None:
            raise UnsupportedFeature(f"the {self.engine.info.engine} engine does not return log-probs while generating")
        check_messages(messages)
        started = time.perf_counter()
        last = messages[-1].get("content", "")
        run = self.engine._run(
            last, params, chat=True, system=None, seed=choose_seed(params), started=started, messages=messages
        )
        return Generation(run)

    def reset(self) -> None:
        """Nothing to forget: every turn carries the whole conversation."""


def probe_server(http: Http, progress=None) -> Probe:
    """On connect: /v1/models (and the model to use), /health, a tokenizer, and one tiny completion each for
    logprobs (with as many top_logprobs as it gives, up to 20) and for echo. Each refused optional field is
    remembered, so later requests go without it."""
    probe = Probe()
    status, body = http.get("/v1/models")
    _check_auth(http, status, body)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
        items = [item for item in body["data"] if isinstance(item, dict) and "id" in item]
        probe.models = [str(item["id"]) for item in items]
        lengths = {str(item["id"]): item.get("max_model_len") for item in items}
    else:
        lengths = {}
    probe.model = _choose_model(http, probe.models)
    if isinstance(lengths.get(probe.model or ""), int):
        probe.context_length = lengths[probe.model or ""]
    probe.health_status, probe.health = _health(http, progress)
    probe.tokenizer = _find_tokenizer(http, probe.model)
    engine = RemoteEngine(http, probe, _info(http, probe, 0.0))
    _probe_completions(engine)
    return probe


def _check_auth(http: Http, status: int, body: Any) -> None:
    if status in (401, 403):
        message, _ = error_text(body, "unauthorized")
        given = "the key given was refused" if http.endpoint.api_key else "no key was given"
        raise AuthenticationFailed(
            f"{http.shown} answered {status} ({message}): {given}; pass --api-key KEY or set "
            f"{API_KEY_ENVS[0]} (or {API_KEY_ENVS[1]})"
        )


def _choose_model(http: Http, models: list[str] | None) -> str | None:
    wanted = http.endpoint.model
    if wanted:
        if models is not None and wanted not in models:
            listed = ", ".join(models[:10]) or "none"
            raise UnknownModel(
                f"model {wanted!r} is not served at {http.shown} (it serves: {listed}); pick one with URL#name or "
                "--remote-model"
            )
        return wanted
    return models[0] if models else None


def _health(http: Http, progress=None) -> tuple[int | None, dict[str, Any] | None]:
    """/health's status and JSON; while a server says it is loading its model (503), wait for it."""
    deadline = time.monotonic() + LOADING_WAIT_S
    while True:
        status, body = http.get("/health")
        loading = status == 503 and isinstance(body, dict) and body.get("status") == "loading"
        if not loading or time.monotonic() > deadline:
            break
        if progress:
            progress(f"waiting for {http.shown} to load its model", 0, None)
        time.sleep(0.5)
    if status == 503:
        message, _ = error_text(body, "not ready")
        raise ModelNotReady(f"{http.shown} is not ready (/health answered 503: {message}); try again in a moment")
    return (status, body if isinstance(body, dict) else None) if status != 404 else (None, None)


def _find_tokenizer(http: Http, model: str | None) -> str | None:
    """The first /tokenize shape whose tokenize and detokenize both answer sensibly (ServerTokenizer.SHAPES)."""
    for shape in ServerTokenizer.SHAPES:
        try:
            status, answer = http.post(shape[1], shape[2](model, "Hello there"), timeout_s=PROBE_TIMEOUT_S)
            if status != 200 or not isinstance(answer, dict) or not answer.get("tokens"):
                continue
            ids = [int(t) for t in answer["tokens"]]
            status, answer = http.post(shape[3], shape[4](model, ids), timeout_s=PROBE_TIMEOUT_S)
        except (EndpointUnreachable, EndpointFailed, ValueError, TypeError):
            continue
        if status == 200 and isinstance(answer, dict):
            text = next((answer[k] for k in ServerTokenizer.TEXT_KEYS if isinstance(answer.get(k), str)), "")
            if "Hello" in text:
                return shape[0]
    return None


def _refusal(status: int, answer: Any, name: str) -> str:
    message, _ = error_text(answer, f"HTTP {status}")
    return f"it answered {status} to {name}: {message}"


def _probe_completions(engine: RemoteEngine) -> None:
    """The completions endpoint, logprobs with top_logprobs (20, else 5, else 1), and echo with prompt logprobs."""
    probe = engine.probe
    greedy = GenerationParams(greedy=True, max_new_tokens=1)
    plain = {**engine._fields(greedy, None)}
    for name in EXTENSION_KNOBS:  # learn now which optional fields it refuses, at values that change nothing
        for key in (name, *SPELLINGS.get(name, ())):
            plain.setdefault(key, NEUTRAL[name])
    status, answer = engine._post("/completions", engine._body(plain, prompt=PROBE_PROMPT))
    if status == 404:
        probe.completions = False
        probe.missing.update(
            {
                "completions": "it has no POST /v1/completions",
                "generated_logprobs": "no /v1/completions to ask",
                "top_logprobs": "no /v1/completions to ask (with --chat, /v1/chat/completions is asked)",
                "prompt_logprobs": "echo needs /v1/completions",
            }
        )
        return
    if status != 200:
        raise engine._fail(status, answer, "a first small completion")
    for count in TOP_LOGPROBS_TRIES:
        status, answer = engine._post("/completions", engine._body({**plain, "logprobs": count}, prompt=PROBE_PROMPT))
        if status != 200:
            probe.missing["generated_logprobs"] = probe.missing["top_logprobs"] = _refusal(status, answer, "logprobs")
            continue
        choice = (answer.get("choices") or [{}])[0]
        if _logprob_values(choice):
            probe.logprobs = True
            probe.missing.pop("generated_logprobs", None)
            if _top_pairs(choice):
                probe.top_logprobs = count
                probe.missing.pop("top_logprobs", None)
            else:
                probe.missing["top_logprobs"] = "its logprobs come without top_logprobs"
        else:
            probe.missing["generated_logprobs"] = probe.missing["top_logprobs"] = "it ignores logprobs"
        break
    body = engine._body({**plain, "echo": True, "logprobs": 1}, prompt=PROBE_PROMPT)
    status, answer = engine._post("/completions", body)
    if status != 200:
        probe.missing["prompt_logprobs"] = _refusal(status, answer, "echo with logprobs")
        return
    logprobs = ((answer.get("choices") or [{}])[0]).get("logprobs") or {}
    values = [v for v in logprobs.get("token_logprobs") or [] if isinstance(v, (int, float))]
    if len(values) >= 3:  # without echo, one generated token has one
        probe.echo = True
    else:
        probe.missing["prompt_logprobs"] = "it ignores echo or returns no prompt logprobs"


def _plain(piece: str) -> bool:
    """A token whose text is its text: not empty, not a byte token ("bytes:\\xb7", vLLM's and llmkit serve's
    name for part of a character) and not a broken character."""
    return bool(piece) and not piece.startswith("bytes:") and "\ufffd" not in piece


def _top_pairs(choice: dict[str, Any]) -> list[tuple[str, float]]:
    """(token, log p) of the first position's top_logprobs: completions' dict or chat's list."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list) and tops and isinstance(tops[0], dict):
        return [(str(token), float(value)) for token, value in tops[0].items() if isinstance(value, (int, float))]
    content = logprobs.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        entries = content[0].get("top_logprobs") or []
        return [(str(e["token"]), float(e["logprob"])) for e in entries if isinstance(e, dict) and "logprob" in e]
    return []


def _offsets(texts: list[str], given: list[Any], prompt: str) -> list[int]:
    """Where each echoed token starts in the prompt: from the token texts when they spell it (after any special
    tokens the server puts first, whose texts are not in the prompt), else the server's text_offset."""
    for skip in range(min(len(texts), 3)):
        if "".join(texts[skip:]) == prompt:
            starts, at = [0] * skip, 0
            for text in texts[skip:]:
                starts.append(at)
                at += len(text)
            return starts
    if len(given) == len(texts) and all(isinstance(v, int) for v in given):
        return [int(v) for v in given]
    starts, at = [], 0
    for text in texts:
        starts.append(min(at, len(prompt)))
        at += len(text)
    return starts


def _timings(times: list[float], prompt_tokens: int, counts: list[int]) -> Timings:
    ttft, total = times[0], times[-1]
    decode = total - ttft
    after_first = sum(counts) - len(counts)
    return Timings(
        ttft_s=ttft,
        total_s=total,
        decode_s=decode,
        prefill_tokens_per_s=prompt_tokens / ttft if ttft > 0 else 0.0,
        decode_tokens_per_s=after_first / decode if decode > 0 and after_first > 0 else None,
        token_times_s=tuple(times),
    )


def _capabilities(probe: Probe) -> Capabilities:
    missing = dict(probe.missing)
    if probe.alignment not in (None, "ok"):
        missing["prompt_logprobs"] = probe.alignment or ""
    return Capabilities(
        batching=False,
        logits=False,
        generated_logprobs=probe.logprobs,
        prompt_logprobs=probe.echo and probe.alignment in (None, "ok"),
        top_logprobs=probe.top_logprobs,
        local_resources=False,
        missing=missing,
    )


def _server_text(probe: Probe) -> str:
    health = probe.health or {}
    parts = [str(health[key]) for key in ("engine", "device", "dtype") if health.get(key)]
    if health.get("threads"):
        parts.append(f"{health['threads']} threads")
    if parts:
        return f"llmkit serve ({', '.join(parts)})" if "max_batch_size" in health else ", ".join(parts)
    return "/health " + (f"answered {probe.health_status}" if probe.health_status else "not offered")


def _info(http: Http, probe: Probe, load_s: float) -> EngineInfo:
    health = probe.health or {}
    top = f" (top {probe.top_logprobs})" if probe.top_logprobs else ""
    offered = [
        f"logprobs {'yes' + top if probe.logprobs else 'no'}",
        f"echo {'yes' if probe.echo else 'no'}",
        f"tokenizer {probe.tokenizer or 'none'}",
    ]
    if probe.refused:
        offered.append(f"refuses {', '.join(sorted(probe.refused))}")
    if probe.knobs:
        offered.append(", ".join(f"{name} {status}" for name, status in sorted(probe.knobs.items())))
    if probe.models is None:
        chosen = "the server's own (no /v1/models)" if not probe.model else "as given (no /v1/models)"
    elif http.endpoint.model:
        chosen = "as given"
    else:
        chosen = f"the first of {len(probe.models)} in /v1/models"
    return EngineInfo(
        model=probe.model or http.shown,
        source_kind="url",
        location=http.shown + "/v1",
        engine=ENGINE_NAME,
        device="remote",
        dtype=str(health.get("dtype") or "server's"),
        parameters=0,
        context_length=probe.context_length,
        has_chat_template=True,
        load_s=load_s,
        threads=None,
        choices={
            "server": f"{http.shown}: {_server_text(probe)}",
            "model": f"{probe.model or '(none named)'}: {chosen}",
            "capabilities": " · ".join(offered),
            "timings": "measured here, on the client: TTFT to the first chunk with output, one time per chunk",
        },
        capabilities=_capabilities(probe),
    )
