"""The HTTP side: OpenAI routes over the generation worker, JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .body_limit import BodyLimit
from .errors import APIError, install_error_handlers
from .schemas import (ChatCompletionRequest, CompletionRequest, Usage, chat_chunk, chat_completion,
                      completion, completion_chunk, new_id, usage_chunk)
from .worker import ClientGone, Engine, Failed, Finished, Job, Sampling, TextDelta

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "create_app"]


@dataclass(frozen=True)
class _Shape:
    """How one endpoint writes its responses."""
    id_prefix: str
    chunk_object: str
    chunk: Callable[[str, str, str, str | None], dict]  # (id, model, text, finish_reason)
    whole: Callable[[str, str, str, str, Usage], dict]  # (id, model, text, finish_reason, usage)
    opening: Callable[[str, str], dict] | None = None  # a first chunk, before any text


_CHAT = _Shape(
    "chatcmpl", "chat.completion.chunk",
    chunk=lambda id, model, text, finish: chat_chunk(id, model, {"content": text} if text else {}, finish),
    whole=chat_completion,
    opening=lambda id, model: chat_chunk(id, model, {"role": "assistant", "content": ""}))
_COMPLETION = _Shape("cmpl", "text_completion", chunk=completion_chunk, whole=completion)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# Request bodies beyond this are refused before they are read whole (BodyLimit).
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


def create_app(engine: Engine, *, model_name: str, max_tokens_limit: int,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The ASGI app serving `engine`'s model as `model_name`; it starts and stops the
    engine's worker with the app's lifespan. Bodies over max_request_bytes get 413."""
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lminf serve", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    def sampling_of(body: ChatCompletionRequest | CompletionRequest) -> Sampling:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = max_tokens_limit
        elif not 1 <= max_tokens <= max_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {max_tokens_limit}, got {max_tokens}",
                           param="max_tokens")
        return Sampling(max_tokens, body.temperature, body.top_p, body.seed, tuple(body.stop))

    async def respond(request: Request, body, prompt: str | list[dict], shape: _Shape):
        job = engine.submit(prompt, sampling_of(body))
        try:
            first = await job.next_event()
            if isinstance(first, Failed):  # refused before any output: a plain error response
                raise first.error
            if body.stream:
                events, job = stream_events(job, shape, body.include_usage), None  # it owns the job now
                return StreamingResponse(events, media_type="text/event-stream")
            return await collect(request, job, shape)
        finally:
            if job is not None:
                job.cancel()  # no-op once finished; stops the work of a cancelled request

    async def cancel_on_disconnect(request: Request, job: Job) -> None:
        """A JSON answer is written only at the end, so nothing tells the request that its
        client left; the ASGI server's http.disconnect message does. The body is read, so the
        next message can only be that one."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()
        job.emit(ClientGone())

    async def collect(request: Request, job: Job, shape: _Shape) -> dict | None:
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        parts = []
        try:
            while True:
                event = await job.next_event()
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Finished):
                    return shape.whole(new_id(shape.id_prefix), model_name, "".join(parts),
                                       event.finish_reason, event.usage)
                elif isinstance(event, ClientGone):
                    return None  # nobody is there to read an answer
                else:
                    raise event.error
        finally:
            watcher.cancel()

    async def stream_events(job: Job, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
        id = new_id(shape.id_prefix)
        try:
            if shape.opening is not None:
                yield _sse(shape.opening(id, model_name))
            while True:
                event = await job.next_event()
                if isinstance(event, TextDelta):
                    yield _sse(shape.chunk(id, model_name, event.text, None))
                elif isinstance(event, Finished):
                    yield _sse(shape.chunk(id, model_name, "", event.finish_reason))
                    if include_usage:
                        yield _sse(usage_chunk(id, shape.chunk_object, model_name, event.usage))
                    yield _sse("[DONE]")
                    return
                else:  # the status line is sent already: an error event, which OpenAI clients raise
                    yield _sse(event.error.body())
                    return
        finally:
            job.cancel()  # the client disconnected, or the stream is done

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await respond(request, body, [{"role": m.role, "content": m.text()} for m in body.messages], _CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await respond(request, body, body.prompt, _COMPLETION)

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lm-infinite"}]}

    @app.get("/health")
    async def health():
        per_conversation = engine.conversation_bytes
        return {"status": "ok", "model": model_name, "active_requests": engine.active_requests,
                "queued_requests": engine.queued_requests, "cancelled_requests": engine.cancelled_requests,
                "conversations": len(engine.store), "max_conversations": engine.store.capacity,
                "max_active_requests": engine.max_active, "max_queued_requests": engine.max_queued,
                "max_live_conversations": engine.max_live_conversations,
                "max_pinned_tokens": engine.max_pinned_tokens,
                "saved_conversations": None if engine.store.saved is None else len(engine.store.saved),
                "saved_conversation_bytes": None if engine.store.saved is None else engine.store.saved.bytes,
                "conversation_bytes": per_conversation,
                # What the kept and in-flight conversations can hold at most, beside the model.
                "max_conversation_bytes": (None if per_conversation is None
                                           else per_conversation * engine.max_live_conversations)}

    return app
