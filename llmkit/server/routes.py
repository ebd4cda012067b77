"""Thin HTTP handlers: validate (schemas -> GenerationParams), tokenize, submit, render events.

Errors are raised, never returned: an LlmkitError becomes its own status in app.py's
handlers (400 bad value, 503 loading or queue full, 504 timeout...). A streaming request
waits for its first token before the 200 and the SSE headers go out, so queue overflow,
a timeout in the queue or a dead loop still get a real status code; an error after that
becomes a final `data: {"error": {...}}` event followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmkit.engine.types import Chunk
from llmkit.errors import GenerationFailed, InvalidParams, LlmkitError
from llmkit.server.runtime import Job, ModelHost
from llmkit.server.schemas import (
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    error_body,
    rename_error,
    timings_body,
    usage_body,
)

log = logging.getLogger("llmkit.server")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _host(request: Request) -> ModelHost:
    return request.app.state.host


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class Renderer:
    """Turns one request's Chunks and final Result into OpenAI (or /generate) JSON."""

    def __init__(self, kind: str, request_id: str, model: str, n: int, include_usage: bool):
        self.kind, self.model, self.n, self.include_usage = kind, model, n, include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

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
            for i in range(self.n)
        ]

    def chunk(self, chunk: Chunk, **more: Any) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": chunk.index, "delta": {"content": chunk.text} if chunk.text else {}}
        else:
            choice = {"index": chunk.index, "text": chunk.text}
        choice.update(logprobs=None, finish_reason=chunk.finish_reason)
        return self._chunk([choice], **more)

    def usage_chunk(self, finished) -> dict[str, Any]:
        return {
            **self._chunk([]),
            "usage": usage_body(finished.result),
            "timings": timings_body(finished.result, finished.queue_s),
        }

    def complete(self, finished) -> dict[str, Any]:
        result = finished.result
        if self.kind == "chat":
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in result.completions
            ]
        else:
            choices = [
                {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                for c in result.completions
            ]
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_body(result),
            "timings": timings_body(result, finished.queue_s),
        }


def _record(request: Request, job: Job, finished=None) -> None:
    """Usage for the access log line, and the request's metrics (once per request)."""
    if job.recorded:
        return
    job.recorded = True
    metrics = request.app.state.metrics
    if finished is not None:
        result = finished.result
        request.state.usage = usage_body(result)
        metrics.prompt_tokens.inc(result.usage.prompt_tokens)
        metrics.generation_tokens.inc(result.usage.completion_tokens)
        metrics.ttft.observe(result.timings.ttft_s)
        metrics.queue_time.observe(finished.queue_s)
    elif job.ended_by:
        request.state.ended_by = job.ended_by
        metrics.ended.labels(job.ended_by).inc()


async def _openai_answer(
    request: Request, host: ModelHost, body, *, kind: str, prompt: str, ids: list[int], params
) -> Any:
    """The shared tail of /v1/completions and /v1/chat/completions: context check, run, answer."""
    _check_context(host, ids, params, body._renames())
    answer = await _run(
        request, kind=kind, prompt=prompt, ids=ids, params=params, stream=body.stream, include_usage=body.include_usage
    )
    if isinstance(answer, Response):
        return answer
    renderer, finished = answer
    return renderer.complete(finished)


def _check_context(host: ModelHost, ids: list[int], params, renames: dict[str, str]) -> None:
    try:
        host.check_context(len(ids), params)
    except InvalidParams as exc:
        raise rename_error(exc, renames) from None


async def _run(
    request: Request,
    *,
    kind: str,
    prompt: str,
    ids: list[int],
    params,
    stream: bool = False,
    include_usage: bool = False,
):
    """Submit, then answer with one JSON body or an SSE stream. Returns (Renderer, Finished) when not streaming."""
    host = _host(request)
    try:
        job = host.submit(prompt, ids, params, request_id=request.state.request_id, arrived=request.state.arrived)
    except LlmkitError as exc:
        request.app.state.metrics.ended.labels(exc.kind).inc()
        raise
    renderer = Renderer(
        kind, request.state.request_id, host.require_engine().info.model, params.num_sequences, include_usage
    )
    events = host.events(job)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        first = await anext(events)
        if not stream:
            finished = first
            while isinstance(finished, Chunk):
                finished = await anext(events)
    except BaseException:
        job.cancel("disconnect")
        _record(request, job)
        await events.aclose()
        raise
    finally:
        watcher.cancel()  # a stream's disconnects are seen by Starlette, which cancels the stream
    if not stream:
        await events.aclose()
        _record(request, job, finished)
        return renderer, finished
    return StreamingResponse(
        _stream(request, job, renderer, first, events), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Until the answer starts: cancel the job the moment the client hangs up.

    The body has been read, so the next ASGI message is the disconnect itself; waiting for it (rather than
    polling between tokens) frees the batch row within a step of the client leaving.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel("disconnect")
            return


async def _stream(
    request: Request, job: Job, renderer: Renderer, first, events: AsyncGenerator
) -> AsyncIterator[bytes]:
    """SSE body. The chunk that finishes the last open sequence is held back a moment, until the Result
    arrives (it follows at once), so that it can carry the timings."""
    open_sequences = renderer.n
    held: Chunk | None = None
    try:
        for opening in renderer.opening():
            yield _sse(opening)
        event = first
        while True:
            if isinstance(event, Chunk):
                if event.finish_reason:
                    open_sequences -= 1
                if open_sequences == 0:
                    held = event
                else:
                    yield _sse(renderer.chunk(event))
            else:  # Finished
                _record(request, job, event)
                timings = timings_body(event.result, event.queue_s)
                if held is not None:
                    yield _sse(renderer.chunk(held, timings=timings))
                if renderer.include_usage:
                    yield _sse(renderer.usage_chunk(event))
                break
            event = await anext(events)
        yield _sse("[DONE]")
    except Exception as exc:  # every stream that started ends with an error event and [DONE], a bug's too
        if not isinstance(exc, LlmkitError):
            log.error(
                "stream failed (request id %s)",
                job.request.request_id,
                exc_info=exc,
                extra={"request_id": job.request.request_id},
            )
            exc = GenerationFailed("the stream failed inside the server (see the server log)")
        _record(request, job)
        body = error_body("/v1/", str(exc), kind=exc.kind, param=getattr(exc, "field", None))
        yield _sse(body)
        yield _sse("[DONE]")
    finally:
        if not job.finished:
            job.cancel("disconnect")
            _record(request, job)
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
        prompt = body.prompt_text()
        host = _host(request)
        ids = await host.completion_ids(prompt)
        return await _openai_answer(request, host, body, kind="text", prompt=prompt, ids=ids, params=params)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        params = body.to_params()
        host = _host(request)
        prompt, ids = await host.chat_ids(body.chat_messages())
        return await _openai_answer(request, host, body, kind="chat", prompt=prompt, ids=ids, params=params)

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
        _, finished = await _run(request, kind="generate", prompt=body.prompt, ids=ids, params=params)
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
