"""Long texts every Python has: pydoc's topic documentation, then the standard library's sources."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

__all__ = ["InputTooLarge", "check_text_file", "default_corpus_tokens", "file_tokens", "read_text_file",
           "read_text_stream"]


def _pydoc_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values())


def _stdlib_sources():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        yield path.read_text(encoding="utf-8", errors="replace")


def default_corpus_tokens(tokenizer, n_tokens: int, *, repeat: bool = False) -> torch.Tensor:
    """The first n_tokens tokens (int64 [n_tokens]) of pydoc's topics (about 113K tokens for
    SmolLM2) followed, for longer runs, by the standard library's top-level modules; with
    repeat=True, the whole corpus again as often as needed (a repetition millions of tokens
    back is far outside any LM-Infinite window)."""
    pieces = [tokenizer(_pydoc_text(), return_tensors="pt").input_ids[0]]
    total = pieces[0].numel()
    sources = _stdlib_sources()
    while total < n_tokens:
        source = next(sources, None)
        if source is None and repeat:
            whole = torch.cat(pieces)
            return whole.repeat(-(-n_tokens // whole.numel()))[:n_tokens]
        if source is None:
            raise ValueError(f"the default corpus has only {total} tokens; asked for {n_tokens}")
        pieces.append(tokenizer("\n\n" + source, return_tensors="pt").input_ids[0])
        total += pieces[-1].numel()
    return torch.cat(pieces)[:n_tokens]


class InputTooLarge(ValueError):
    """A text beyond the size the caller allows, refused before it is read whole."""


def read_text_file(path: str | Path, what: str = "text file", max_bytes: int | None = None) -> str:
    """The text of a file, with an error that says what is wrong with the path; a file over
    max_bytes is refused before anything is read."""
    check_text_file(path, what, max_bytes)
    return Path(path).read_text(encoding="utf-8", errors="replace")


def read_text_stream(stream, what: str, max_bytes: int | None = None) -> str:
    """The text of a binary stream (stdin's buffer), read in bounded memory: at most
    max_bytes + 1 bytes are ever held, and more than max_bytes is refused."""
    data = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise InputTooLarge(f"{what} is larger than the input limit of {_mib(max_bytes)}")
    return data.decode("utf-8", errors="replace")


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:g} MiB"


def check_text_file(path: str | Path, what: str = "text file", max_bytes: int | None = None) -> None:
    """Raise an OSError saying what is wrong with a path to be read as text (InputTooLarge
    for a file over max_bytes: its size, sparse or not, is known before reading)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise OSError(f"{what} {str(path)!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {str(path)!r} is not readable")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise InputTooLarge(f"{what} {str(path)!r} is {_mib(size)}, over the input limit of {_mib(max_bytes)}")


def file_tokens(paths, tokenizer, max_bytes: int | None = None) -> torch.Tensor:
    """The tokens of the given text files, concatenated (int64 [tokens]); files of more than
    max_bytes together are refused before they are read."""
    if max_bytes is not None:
        total = sum(Path(path).stat().st_size for path in paths if Path(path).is_file())
        if total > max_bytes:
            raise InputTooLarge(f"the text files are {_mib(total)} together, over the input limit "
                                f"of {_mib(max_bytes)}")
    texts = [read_text_file(path, max_bytes=max_bytes) for path in paths]
    text = "\n\n".join(texts)
    if not text.strip():
        raise ValueError(f"the text in {', '.join(map(str, paths))} is empty")
    return tokenizer(text, return_tensors="pt").input_ids[0]
