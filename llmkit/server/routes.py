"""Thin HTTP handlers: validate (schemas -> GenerationParams), tokenize, submit, render events.

Errors are raised, never returned: an LlmkitError becomes its own status in app.py's
handlers (400 bad value, 503 loading or queue full, 504 timeout...). A streaming request
waits for its first token before the 200 and the SSE headers go out, so queue overflow,
a timeout in the queue or a dead loop still get a real status code; an error after that
becomes a final `data: {"error": {...}}` event followed by `data: [DONE]`.

A /v1/completions body with several prompts submits one job per prompt, together (`submit_many`:
all queued or none), and merges their events as they come (`_merged`); choice index = prompt
index * n + the sequence's index. What a body asks to see besides text (`Outputs`: logprobs, echo)
travels on each job's request; the Renderer turns the Chunks' TokenLogprobs and the prompt's scores
(one PromptLogprobs event before its Chunks) into OpenAI's completions or chat logprobs shape, with
each token's text from `tokens.TokenText`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llmkit.engine.scheduling import Finished, PromptLogprobs
from llmkit.engine.types import Chunk, TokenLogprob
from llmkit.errors import GenerationFailed, InvalidParams, LlmkitError
from llmkit.server.runtime import Job, ModelHost
from llmkit.server.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    Outputs,
    TokenizeRequest,
    chat_messages,
    error_body,
    rename_error,
    timings_body,
    usage_body,
)
from llmkit.server.tokens import TokenText, check_token_ids, prompt_offsets

log = logging.getLogger("llmkit.server")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _host(request: Request) -> ModelHost:
    return request.app.state.host


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@dataclass(frozen=True)
class PromptIn:
    """One prompt of a body: its text, its token ids, and whether the client sent text (else token ids)."""

    text: str
    ids: list[int]
    from_text: bool = True
    offsets: tuple[int, ...] = ()  # where each token starts in `text`; filled for echo with logprobs


NO_OUTPUTS = Outputs()  # text only
NON_FINITE_LOGPROB = -9999.0  # what a log p of -inf (or NaN) is shown as: JSON has no infinity (vLLM's choice too)


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else NON_FINITE_LOGPROB


class Renderer:
    """Turns one body's Chunks and final Results into OpenAI (or /generate) JSON. A body with several prompts has
    n choices per prompt: choice index = prompt index * n + the sequence's index, as OpenAI numbers them."""

    def __init__(
        self,
        kind: str,
        request_id: str,
        model: str,
        n: int,
        include_usage: bool,
        *,
        prompts: Sequence[PromptIn] = (),
        outputs: Outputs = NO_OUTPUTS,
        token_text: TokenText | None = None,
    ):
        self.kind, self.model, self.n, self.include_usage = kind, model, n, include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.prompts = list(prompts) or [PromptIn("", [])]
        self.outputs = outputs
        self.token_text = token_text
        self.prompt_scores: dict[int, tuple[TokenLogprob, ...]] = {}  # prompt index -> PromptLogprobs entries
        self._echoed: set[int] = set()  # choices whose first streamed chunk (with the echoed prompt) has gone out

    @property
    def choices(self) -> int:
        return self.n * len(self.prompts)

    def _chunk(self, choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": self.object + (".chunk" if self.kind == "chat" else ""),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        body.update(more)
        return body

    def opening(self) -> list[dict[str, Any]]:
        if self.kind != "chat":
            return []
        return [
            self._chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(self.choices)
        ]

    # --- log-probabilities ------------------------------------------------------------------------

    def _echo_entries(self, prompt: int) -> list[tuple[int, TokenLogprob | None, int]]:
        """(token, its scores or None for the first, offset) for each token of an echoed prompt."""
        source = self.prompts[prompt]
        scores = self.prompt_scores.get(prompt, ())
        offsets = source.offsets or (0,) * len(source.ids)
        return [
            (token, scores[i - 1] if 0 < i <= len(scores) else None, offsets[i]) for i, token in enumerate(source.ids)
        ]

    def _completion_logprobs(self, entries: list[tuple[int, TokenLogprob | None, int]]) -> dict[str, Any]:
        """OpenAI's completions shape: tokens, token_logprobs, top_logprobs (the N most likely and the chosen
        token, by text) and text_offset; a prompt's first token has null scores."""
        assert self.token_text is not None
        text = self.token_text.text
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token, scored, offset in entries:
            tokens.append(text(token))
            offsets.append(offset)
            if scored is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(_logprob(scored.logprob))
            top = {text(alternative): _logprob(value) for alternative, value in scored.top}
            top.setdefault(text(token), _logprob(scored.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat shape: content, one {token, logprob, bytes, top_logprobs} per token."""
        assert self.token_text is not None
        tokens = self.token_text

        def described(token: int, value: float) -> dict[str, Any]:
            return {"token": tokens.text(token), "logprob": _logprob(value), "bytes": tokens.byte_list(token)}

        content = [
            {**described(e.token, e.logprob), "top_logprobs": [described(t, v) for t, v in e.top]} for e in entries
        ]
        return {"content": content, "refusal": None}

    def _choice_logprobs(
        self, prompt: int, generated: Sequence[TokenLogprob] | None, *, with_prompt: bool, shift: int
    ) -> dict[str, Any] | None:
        if self.outputs.logprobs is None:
            return None
        if self.kind == "chat":
            return self._chat_logprobs(generated or ())
        entries = self._echo_entries(prompt) if with_prompt else []
        entries += [(e.token, e, e.offset + shift) for e in generated or ()]
        return self._completion_logprobs(entries)

    # --- bodies ----------------------------------------------------------------------------------

    def chunk(self, prompt: int, chunk: Chunk, **more: Any) -> dict[str, Any]:
        index = prompt * self.n + chunk.index
        first = index not in self._echoed
        self._echoed.add(index)
        echo = self.outputs.echo and first and self.kind != "chat"
        text = (self.prompts[prompt].text if echo else "") + chunk.text
        shift = len(self.prompts[prompt].text) if self.outputs.echo else 0
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {"index": index, "delta": {"content": text} if text else {}}
        else:
            choice = {"index": index, "text": text}
        logprobs = self._choice_logprobs(prompt, chunk.logprobs, with_prompt=echo, shift=shift)
        if self.kind == "chat" and logprobs is not None and not chunk.logprobs:
            logprobs = None  # a chunk that carries no token
        choice.update(logprobs=logprobs, finish_reason=chunk.finish_reason)
        return self._chunk([choice], **more)

    def usage_chunk(self, finished: Sequence[Finished]) -> dict[str, Any]:
        return {**self._chunk([]), "usage": combined_usage(finished), "timings": combined_timings(finished)}

    def complete(self, finished: Sequence[Finished]) -> dict[str, Any]:
        choices = []
        for prompt, done in enumerate(finished):
            for c in done.result.completions:
                index = prompt * self.n + c.index
                if self.kind == "chat":
                    choices.append(
                        {
                            "index": index,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": self._choice_logprobs(prompt, c.logprobs, with_prompt=False, shift=0),
                            "finish_reason": c.finish_reason,
                        }
                    )
                    continue
                echo = self.prompts[prompt].text if self.outputs.echo else ""
                choices.append(
                    {
                        "index": index,
                        "text": echo + c.text,
                        "logprobs": self._choice_logprobs(
                            prompt, c.logprobs, with_prompt=self.outputs.echo, shift=len(echo)
                        ),
                        "finish_reason": c.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": combined_usage(finished),
            "timings": combined_timings(finished),
        }


def combined_usage(finished: Sequence[Finished]) -> dict[str, Any]:
    """Usage of a body: each prompt's tokens once, every choice's generated tokens, summed over its prompts."""
    bodies = [usage_body(done.result) for done in finished]
    usage: dict[str, Any] = {
        key: sum(body[key] for body in bodies) for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    usage["prompt_tokens_details"] = {
        "cached_tokens": sum(body["prompt_tokens_details"]["cached_tokens"] for body in bodies)
    }
    return usage


def combined_timings(finished: Sequence[Finished]) -> dict[str, Any]:
    """timings_body of one prompt; for several, one record of the body: token counts summed, ttft_ms the first
    token of any prompt, queue_ms, prompt_ms, predicted_ms and total_ms the longest, rates from those."""
    if len(finished) == 1:
        return timings_body(finished[0].result, finished[0].queue_s)
    bodies = [timings_body(done.result, done.queue_s) for done in finished]
    combined: dict[str, Any] = {
        "queue_ms": max(b["queue_ms"] for b in bodies),
        "prompt_n": sum(b["prompt_n"] for b in bodies),
        "cache_n": sum(b["cache_n"] for b in bodies),
        "prompt_ms": max(b["prompt_ms"] for b in bodies),
        "predicted_n": sum(b["predicted_n"] for b in bodies),
        "predicted_ms": max(b["predicted_ms"] for b in bodies),
        "ttft_ms": min(b["ttft_ms"] for b in bodies),
        "total_ms": max(b["total_ms"] for b in bodies),
    }
    for count, spent, rate in (
        ("prompt_n", "prompt_ms", "prompt_per_second"),
        ("predicted_n", "predicted_ms", "predicted_per_second"),
    ):
        combined[rate] = round(combined[count] / combined[spent] * 1000, 3) if combined[spent] > 0 else None
    return {key: combined[key] for key in bodies[0]}


def _record(request: Request, job: Job, finished=None) -> None:
    """Usage for the access log line (summed over a body's prompts), and the request's metrics (once per job)."""
    if job.recorded:
        return
    job.recorded = True
    metrics = request.app.state.metrics
    if finished is not None:
        result = finished.result
        usage = {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "cached_tokens": result.usage.cached_tokens,
        }
        before = getattr(request.state, "usage", None) or {}
        request.state.usage = {key: before.get(key, 0) + value for key, value in usage.items()}
        metrics.prompt_tokens.inc(result.usage.prompt_tokens)
        metrics.generation_tokens.inc(result.usage.completion_tokens)
        metrics.ttft.observe(result.timings.ttft_s)
        metrics.queue_time.observe(finished.queue_s)
    elif job.ended_by:
        request.state.ended_by = job.ended_by
        metrics.ended.labels(job.ended_by).inc()


async def _openai_answer(
    request: Request, host: ModelHost, body, *, kind: str, prompts: list[PromptIn], params, outputs: Outputs
) -> Any:
    """The shared tail of /v1/completions and /v1/chat/completions: context check, run, answer."""
    for prompt in prompts:
        if outputs.prompt_only:
            host.require_engine().check_length(len(prompt.ids), "the prompt")
        else:
            _check_context(host, prompt.ids, params, body._renames())
    if outputs.logprobs is not None and not host.require_engine().info.capabilities.decode_logprobs:
        raise InvalidParams(
            f"logprobs: the {host.require_engine().info.engine} engine does not return log-probabilities; "
            "leave logprobs out",
            field="logprobs",
        )
    if outputs.echo and outputs.prompt_logprobs is not None:
        prompts = await run_in_threadpool(_with_offsets, host, prompts)
    answer = await _run(
        request,
        kind=kind,
        prompts=prompts,
        params=params,
        outputs=outputs,
        stream=body.stream,
        include_usage=body.include_usage,
    )
    if isinstance(answer, Response):
        return answer
    renderer, finished = answer
    return renderer.complete(finished)


def _with_offsets(host: ModelHost, prompts: list[PromptIn]) -> list[PromptIn]:
    tokenizer = host.require_engine().tokenizer
    return [replace(p, offsets=tuple(prompt_offsets(tokenizer, p.text, p.ids, from_text=p.from_text))) for p in prompts]


def _check_context(host: ModelHost, ids: list[int], params, renames: dict[str, str]) -> None:
    try:
        host.check_context(len(ids), params)
    except InvalidParams as exc:
        raise rename_error(exc, renames) from None


async def _run(
    request: Request,
    *,
    kind: str,
    prompts: list[PromptIn],
    params,
    outputs: Outputs = NO_OUTPUTS,
    stream: bool = False,
    include_usage: bool = False,
):
    """Submit every prompt (one job each, batched by the scheduler), then answer with one JSON body or an SSE
    stream. Returns (Renderer, [Finished per prompt]) when not streaming."""
    host = _host(request)
    await host.prepare_constraint(params)
    try:
        jobs = host.submit_many(
            [(p.text, p.ids) for p in prompts],
            params,
            request_id=request.state.request_id,
            arrived=request.state.arrived,
            outputs=outputs,
        )
    except LlmkitError as exc:
        request.app.state.metrics.ended.labels(exc.kind).inc()
        raise
    renderer = Renderer(
        kind,
        request.state.request_id,
        host.require_engine().info.model,
        params.num_sequences,
        include_usage,
        prompts=prompts,
        outputs=outputs,
        token_text=host.token_text if outputs.logprobs is not None else None,
    )
    events = _merged(host, jobs)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, jobs))
    finished: dict[int, Finished] = {}
    try:
        first = await anext(events)
        if not stream:
            event = first
            while True:
                prompt, item = event
                if isinstance(item, PromptLogprobs):
                    renderer.prompt_scores[prompt] = item.entries
                elif isinstance(item, Finished):
                    finished[prompt] = item
                    if len(finished) == len(jobs):
                        break
                event = await anext(events)
    except BaseException as exc:
        _cancel_all(request, jobs, "error" if isinstance(exc, LlmkitError) else "disconnect")
        await events.aclose()
        raise
    finally:
        watcher.cancel()  # a stream's disconnects are seen by Starlette, which cancels the stream
    if not stream:
        await events.aclose()
        for prompt, job in enumerate(jobs):
            _record(request, job, finished[prompt])
        return renderer, [finished[prompt] for prompt in range(len(jobs))]
    return StreamingResponse(
        _stream(request, jobs, renderer, first, events), media_type="text/event-stream", headers=SSE_HEADERS
    )


def _cancel_all(request: Request, jobs: list[Job], reason: str) -> None:
    """End every job of a body that has not finished (one failed, or the client left)."""
    for job in jobs:
        job.cancel(reason)
        _record(request, job)


async def _merged(host: ModelHost, jobs: list[Job]) -> AsyncGenerator[tuple[int, Any], None]:
    """(prompt index, event) of every job, as they come; each job's events keep their order. The first error of
    any job is raised (the caller ends the others)."""
    streams = [host.events(job) for job in jobs]
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    waiting: dict[asyncio.Future, int] = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: waiting[t]):
                prompt = waiting.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                yield prompt, event
                if not isinstance(event, Finished):
                    waiting[asyncio.ensure_future(anext(streams[prompt]))] = prompt
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for events in streams:
            await events.aclose()


async def _cancel_on_disconnect(request: Request, jobs: list[Job]) -> None:
    """Until the answer starts: cancel the jobs the moment the client hangs up.

    The body has been read, so the next ASGI message is the disconnect itself; waiting for it (rather than
    polling between tokens) frees the batch rows within a step of the client leaving.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancel("disconnect")
            return


async def _stream(
    request: Request, jobs: list[Job], renderer: Renderer, first, events: AsyncGenerator
) -> AsyncIterator[bytes]:
    """SSE body. The chunk that finishes the last open choice is held back a moment, until every prompt's Result
    has arrived (they follow at once), so that it can carry the timings. A prompt that generates nothing (echo with
    max_tokens 0) gets one finishing chunk per choice when its Result comes."""
    open_choices = renderer.choices
    held: tuple[int, Chunk] | None = None
    finished: dict[int, Finished] = {}
    try:
        for opening in renderer.opening():
            yield _sse(opening)
        prompt, event = first
        while True:
            chunks: list[Chunk] = []
            if isinstance(event, PromptLogprobs):
                renderer.prompt_scores[prompt] = event.entries
            elif isinstance(event, Chunk):
                chunks = [event]
            else:  # Finished
                _record(request, jobs[prompt], event)
                finished[prompt] = event
                if renderer.outputs.prompt_only:
                    chunks = [Chunk(c.index, "", (), c.finish_reason, ()) for c in event.result.completions]
            for chunk in chunks:
                if chunk.finish_reason:
                    open_choices -= 1
                if open_choices == 0:
                    held = (prompt, chunk)
                else:
                    yield _sse(renderer.chunk(prompt, chunk))
            if len(finished) == len(jobs):
                ordered = [finished[p] for p in range(len(jobs))]
                if held is not None:
                    yield _sse(renderer.chunk(*held, timings=combined_timings(ordered)))
                if renderer.include_usage:
                    yield _sse(renderer.usage_chunk(ordered))
                break
            prompt, event = await anext(events)
        yield _sse("[DONE]")
    except Exception as exc:  # every stream that started ends with an error event and [DONE], a bug's too
        first_job = jobs[0].request
        if not isinstance(exc, LlmkitError):
            log.error(
                "stream failed (request id %s)",
                first_job.request_id,
                exc_info=exc,
                extra={"request_id": first_job.request_id},
            )
            exc = GenerationFailed("the stream failed inside the server (see the server log)")
        _cancel_all(request, jobs, "error")
        body = error_body("/v1/", str(exc), kind=exc.kind, param=getattr(exc, "field", None))
        yield _sse(body)
        yield _sse("[DONE]")
    finally:
        if not all(job.finished for job in jobs):
            _cancel_all(request, jobs, "disconnect")
        await events.aclose()


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        status, body = _host(request).health()
        return JSONResponse(body, status_code=status)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        data, content_type = request.app.state.metrics.render()
        return Response(data, media_type=content_type)

    @router.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        host = _host(request)
        name = host.engine.info.model if host.engine is not None else host.settings.model_name
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": int(host.created), "owned_by": "llmkit"}],
        }

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = body.to_params()
        outputs = body.output_options()
        host = _host(request)
        prompts = await asyncio.gather(*(_prompt_in(host, prompt) for prompt in body.prompts()))
        return await _openai_answer(
            request, host, body, kind="text", prompts=list(prompts), params=params, outputs=outputs
        )

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        params = body.to_params()
        outputs = body.output_options()
        host = _host(request)
        prompt, ids = await host.chat_ids(body.chat_messages())
        return await _openai_answer(
            request, host, body, kind="chat", prompts=[PromptIn(prompt, ids)], params=params, outputs=outputs
        )

    @router.post("/tokenize")
    @router.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        """llama-server's /tokenize (`content` -> `tokens`) and vLLM's (`prompt` or `messages` -> `tokens`,
        `count`, `max_model_len`): one answer with every key of both."""
        errors = body.problems()
        if errors:
            raise InvalidParams.from_errors(errors)
        host = _host(request)
        engine = host.require_engine()
        add_special = body.add_special_text()
        if body.messages is not None:
            text, ids = await host.chat_ids(chat_messages(body.messages))
            if add_special:
                ids = await run_in_threadpool(_encode, engine.tokenizer, text, True)
        else:  # any length the body limit lets through: count and max_model_len say whether it fits
            text = body.content if body.content is not None else body.prompt or ""
            ids = await run_in_threadpool(_encode, engine.tokenizer, text, add_special)
        answer: dict[str, Any] = {
            "tokens": [_piece(host.token_text, t) for t in ids] if body.with_pieces else ids,
            "count": len(ids),
            "max_model_len": engine.info.context_length,
        }
        if body.return_token_strs:
            answer["token_strs"] = _token_strs(engine.tokenizer, host.token_text, ids)
        return answer

    @router.post("/detokenize")
    @router.post("/v1/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        """llama-server's and vLLM's /detokenize: `tokens` in, the text as `content` (llama-server) and `prompt`
        (vLLM). Special tokens are written out."""
        host = _host(request)
        engine = host.require_engine()
        check_token_ids(body.tokens, host.vocab_size, "tokens")
        text = await run_in_threadpool(engine.tokenizer.decode, body.tokens, skip_special_tokens=False)
        return {"content": text, "prompt": text}

    @router.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        """What a client needs to use the server's tokenizer through /tokenize (vLLM's endpoint, which
        lm-evaluation-harness reads to choose it): the special tokens, the chat template, the context."""
        host = _host(request)
        engine = host.require_engine()
        tokenizer = engine.tokenizer

        def special(name: str) -> str | None:
            token = getattr(tokenizer, f"{name}_token_id", None)
            return host.token_text.text(token) if isinstance(token, int) else None

        return {
            "tokenizer_class": type(tokenizer).__name__,
            "bos_token": special("bos"),
            "eos_token": special("eos"),
            "pad_token": special("pad"),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": engine.info.context_length,
            "vocab_size": host.vocab_size,
        }

    @router.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
        """The simple API: prompt, max_length (the number of new tokens) and temperature in (any llmkit
        generation parameter too); success, generated_text (the prompt and its continuation),
        inference_time_seconds and parameters out."""
        params = body.to_params()
        host = _host(request)
        if not body.prompt.strip():
            raise InvalidParams("prompt must not be empty", field="prompt")
        ids = await host.completion_ids(body.prompt)
        _check_context(host, ids, params, body._renames())
        _, done = await _run(request, kind="generate", prompts=[PromptIn(body.prompt, ids)], params=params)
        finished = done[0]
        result = finished.result
        return {
            "success": True,
            "model": host.require_engine().info.model,
            "prompt": body.prompt,
            "generated_text": body.prompt + result.text,
            "completion": result.text,
            "completions": [
                {
                    "index": c.index,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "generated_tokens": len(c.token_ids),
                }
                for c in result.completions
            ],
            "inference_time_seconds": round(result.timings.total_s, 3),
            "parameters": {**result.params, "max_length": params.max_new_tokens},
            "seed": result.seed,
            "usage": usage_body(result),
            "timings": timings_body(result, finished.queue_s),
        }

    return router


async def _prompt_in(host: ModelHost, prompt: str | list[int]) -> PromptIn:
    """One prompt of a completions body, tokenized (a text) or checked and decoded (token ids)."""
    if isinstance(prompt, str):
        return PromptIn(prompt, await host.completion_ids(prompt))
    text, ids = await host.prompt_of_ids(prompt)
    return PromptIn(text, ids, from_text=False)


def _encode(tokenizer, text: str, add_special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def _piece(tokens: TokenText, token: int) -> dict[str, Any]:
    """llama-server's {id, piece}: the piece as text, or as its bytes when it is not whole UTF-8."""
    raw = tokens.bytes_of(token)
    try:
        piece: str | list[int] = raw.decode("utf-8")
    except UnicodeDecodeError:
        piece = list(raw)
    return {"id": token, "piece": piece}


def _token_strs(tokenizer, tokens: TokenText, ids: list[int]) -> list[str]:
    """vLLM's token_strs: each token's vocabulary entry (convert_ids_to_tokens), else its text."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        return [str(entry) for entry in convert(ids)]
    return [tokens.text(token) for token in ids]
