"""Conversations kept on disk (lminf serve --state-dir): found again after a restart or a crash.

One file per conversation, LambdaStream.save's format, named after the conversation's prefix
key: `<tokens>-<blake2b digest of the tokens, hex>.lminf`. A conversation is written after each
request (atomically: a crash leaves the previous turn's file or the new one), and its previous
file is then removed, so one conversation holds one file. The files take at most `max_bytes`:
beyond, the least recently written are removed first.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from lm_infinite.streaming import LambdaStream

__all__ = ["SUFFIX", "SavedConversations"]

log = logging.getLogger("lm_infinite.server")

SUFFIX = ".lminf"


def _file_name(key) -> str:
    return f"{key.length}-{key.digest.hex()}{SUFFIX}"


def _key_of(name: str):
    """The PrefixKey a file name stands for, or None for a file that is not ours."""
    from .conversations import PrefixKey

    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    length, _, digest = name[:-len(SUFFIX)].partition("-")
    try:
        return PrefixKey(int(length), bytes.fromhex(digest))
    except ValueError:
        return None


class SavedConversations:
    """The state directory's files, indexed by prefix key, oldest first. Only the generation
    worker uses it (no lock)."""

    def __init__(self, directory, max_bytes: int, load: Callable[[Path], LambdaStream]) -> None:
        if max_bytes < 0:
            raise ValueError(f"SavedConversations: max_bytes must be >= 0, got {max_bytes}")
        self.directory, self.max_bytes, self._load = Path(directory), max_bytes, load
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a write that a crash cut short
                continue
            key = _key_of(entry.name)
            if key is not None and entry.is_file():
                stat = entry.stat()
                found.append((stat.st_mtime_ns, key, stat.st_size))
        # key -> file size, least recently written first.
        self._files: OrderedDict = OrderedDict((key, size) for _, key, size in sorted(found))
        self.bytes = sum(self._files.values())
        self._evict()

    def __len__(self) -> int:
        return len(self._files)

    def keys(self):
        return self._files.keys()

    def path(self, key) -> Path:
        return self.directory / _file_name(key)

    def save(self, key, stream: LambdaStream) -> bool:
        """Write the stream as `key`'s file; False (logged) if the disk refuses it."""
        path = self.path(key)
        try:
            stream.save(path)
            size = path.stat().st_size
        except OSError as error:
            log.warning("could not save a conversation to %s: %s", path, error)
            return False
        self.bytes += size - self._files.pop(key, 0)
        self._files[key] = size
        if size > self.max_bytes:
            log.warning("a conversation's file (%d bytes) exceeds --max-state-mb: it is not kept", size)
        self._evict()
        return True

    def load(self, key) -> LambdaStream | None:
        """The stream saved as `key`, or None (logged, and forgotten) if it cannot be read:
        a file removed meanwhile, or one saved from another model or with other settings."""
        path = self.path(key)
        try:
            return self._load(path)
        except (OSError, ValueError) as error:
            log.warning("could not load the saved conversation %s: %s", path, error)
            self.bytes -= self._files.pop(key, 0)
            return None

    def remove(self, key) -> None:
        self.bytes -= self._files.pop(key, 0)
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._files:
            self.remove(next(iter(self._files)))
