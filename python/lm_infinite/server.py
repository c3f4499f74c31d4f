"""Deprecated alias of lm_infinite.apps.server (`lminf serve`'s HTTP server): re-exports it,
and its modules as lm_infinite.server.app, .worker, ..."""

import sys
import warnings

from .apps import server as _server
from .apps.server import Engine, app, body_limit, conversations, create_app, errors, saved, schemas, text, worker

__all__ = ["Engine", "create_app"]

for _module in (app, body_limit, conversations, errors, saved, schemas, text, worker):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

warnings.warn(f"lm_infinite.server moved to {_server.__name__}", DeprecationWarning, stacklevel=2)
