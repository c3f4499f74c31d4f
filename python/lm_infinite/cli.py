"""Deprecated alias of lm_infinite.apps.cli (the `lminf` command line), kept so that
`python -m lm_infinite.cli` and `from lm_infinite.cli import main` still work."""

import sys
import warnings

from .apps.cli import build_parser, main

__all__ = ["build_parser", "main"]

warnings.warn("lm_infinite.cli moved to lm_infinite.apps.cli (python -m lm_infinite.apps.cli, or the lminf "
              "command)", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    sys.exit(main())
