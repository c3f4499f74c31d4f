"""Request bodies of bounded size: a larger one is refused before it is held in memory."""

from __future__ import annotations

import json

from .errors import error_body

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: a request whose body exceeds `max_bytes` gets 413 in the OpenAI error
    shape. A declared Content-Length is checked before anything is read; a chunked body is
    counted as it arrives and refused at the limit, so no request holds more than max_bytes."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        # Read the whole body here, never more than max_bytes of it, then hand it on as one
        # message; later receive() calls (the app's disconnect watch) go to the client.
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"the request body is larger than this server's limit of "
                                     f"{self.max_bytes} bytes (--max-request-mb)",
                                     type="invalid_request_error", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
