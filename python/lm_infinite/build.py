"""What the installed extension was built with."""

from __future__ import annotations

from . import _C


def build_info() -> dict:
    """Version, compiled backends ("cpu", "cuda"), compiler, CUDA version and archs, CPU ISA
    the CPU kernels dispatch to on this machine."""
    return dict(_C.build_info())
