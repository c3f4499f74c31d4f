"""`lminf serve`: an OpenAI-compatible HTTP server whose conversations never run out of context.

app: the routes; worker: the thread that runs the model, requests interleaved token by token;
conversations: the LambdaStreams kept between requests and found again by prefix; text:
incremental decoding and stop strings; schemas and errors: the OpenAI wire format.
Needs the `serve` extra (fastapi, uvicorn).
"""

from .app import create_app
from .worker import Engine

__all__ = ["Engine", "create_app"]
