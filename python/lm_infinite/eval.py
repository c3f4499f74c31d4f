"""Deprecated alias of lm_infinite.apps.eval (perplexity and passkey evaluation): re-exports
its modules as lm_infinite.eval.corpus, .methods, .passkey, .perplexity and .report."""

import sys
import warnings

from .apps import eval as _eval
from .apps.eval import corpus, methods, passkey, perplexity, report

__all__ = ["corpus", "methods", "passkey", "perplexity", "report"]

for _module in (corpus, methods, passkey, perplexity, report):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

warnings.warn(f"lm_infinite.eval moved to {_eval.__name__}", DeprecationWarning, stacklevel=2)
