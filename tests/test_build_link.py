"""The extension uses the process's libstdc++, never a private copy of it.

A second copy of libstdc++'s locale code inside _C.so (what -static-libstdc++ gives) breaks
number formatting in every error message: the number is dropped, or the call crashes inside
std::ostream (the GPU build's bad-input crash, csrc/cuda/NOTES.md). setup.py names
libstdc++.so first on the link line; this checks the result.
"""

import shutil
import subprocess

import pytest

import lm_infinite._C as ext

pytestmark = pytest.mark.skipif(not (shutil.which("readelf") and shutil.which("nm")),
                                reason="needs binutils (readelf, nm)")


def test_libstdcxx_is_a_shared_dependency():
    dynamic = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "libstdc++.so" in dynamic, "libstdc++ is not NEEDED: a static copy was linked in"


def test_no_locale_code_inside_the_extension():
    symbols = subprocess.run(["nm", "-C", "--defined-only", ext.__file__], capture_output=True,
                             text=True, check=True).stdout
    own = [line for line in symbols.splitlines() if "std::locale::" in line]
    assert not own, f"_C.so defines {len(own)} std::locale symbols, e.g. {own[0]}"
