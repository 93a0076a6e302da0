"""One parsed GGUF file per process: gguf.GGUFReader walks every metadata entry in Python (seconds for a 49k-token
vocabulary), and the weight loader and the tokenizer both read the same file."""

from __future__ import annotations

import functools
import os
import pathlib

import gguf


def reader(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """The memory-mapped reader of `path`, parsed once per process while the file keeps its size and mtime."""
    path = pathlib.Path(path).resolve()
    stat = path.stat()
    return _parsed(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed(path: pathlib.Path, size: int, mtime_ns: int) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)
