"""Fuzz the ops' whole argument space; each batch of examples runs in a subprocess, so that a
crash (SIGABRT, SIGSEGV) fails this test instead of killing the suite. Bounded for CI: a fixed
number of examples per batch and a timeout per batch. LMINF_FUZZ_EXAMPLES scales it up."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("fuzz_ops_child.py")
EXAMPLES = int(os.environ.get("LMINF_FUZZ_EXAMPLES", "200"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_ops_never_crash_and_match_the_reference(seed):
    done = subprocess.run([sys.executable, str(CHILD), str(seed), str(EXAMPLES)], capture_output=True,
                          text=True, timeout=300)
    last_example = "\n".join(line for line in done.stderr.splitlines() if line.startswith("example "))[-2000:]
    assert done.returncode == 0, f"exit {done.returncode}; last examples:\n{last_example}\n{done.stderr[-4000:]}"
    match = re.search(r"fuzz: (\d+) examples, (\d+) refused", done.stdout)
    assert match and int(match.group(1)) >= EXAMPLES, done.stdout
    print(match.group(0))
