"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["APIError", "error_body", "install_error_handlers"]

log = logging.getLogger("lm_infinite.server")


class APIError(Exception):
    """A request the server refuses, with what the client needs to fix it."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _validation_message(error: dict) -> tuple[str, str | None]:
    """(message, param) for one pydantic error; loc is ("body", field, ...)."""
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
    path = [str(part) for part in error["loc"][1:]]
    param = ".".join(path) or None
    return (f"{param}: {error['msg']}" if param else error["msg"]), param


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers a malformed request with 400, not FastAPI's 422.
    messages, params = zip(*(_validation_message(e) for e in exc.errors()))
    return JSONResponse(error_body("; ".join(messages), type="invalid_request_error", param=params[0]),
                        status_code=400)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Unknown routes and methods: the framework's 404 and 405, in the OpenAI shape.
    return JSONResponse(error_body(str(exc.detail), type="invalid_request_error"),
                        status_code=exc.status_code, headers=exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
