"""python -m lm_infinite.apps.cli: the same as the lminf console script."""

import sys

from . import main

sys.exit(main())
