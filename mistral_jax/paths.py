"""Paths that may be URLs. Orbax checkpoints and sft run directories may live on gs:// (orbax reads and
writes them through `etils.epath`, as its own paths); everything else is read from local disk.

A local path is made absolute with `~` expanded; a URL (anything with "://") is left exactly as given.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

from mistral_jax.errors import UserError

CHECKPOINT_HINT = "copy it to local disk or convert it to orbax on gs:// first"


def is_url(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a URL such as gs://bucket/dir (not a local path)."""
    return path is not None and "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (`~` expanded), or a URL such as gs://bucket/dir left as it is."""
    text = os.fspath(path)
    return epath.Path(text) if is_url(text) else epath.Path(pathlib.Path(text).expanduser().absolute())


def path_arg(text: str) -> pathlib.Path | epath.Path:
    """An argparse type: a URL as an `epath.Path` (pathlib would turn gs://b/x into gs:/b/x), else a pathlib.Path."""
    return epath.Path(text) if is_url(text) else pathlib.Path(text)


def require_local(path, what: str, hint: str = "copy it to local disk first",
                  error: type[Exception] = UserError) -> None:
    """Raise `error` when `path` is a URL: `what` (e.g. "a GGUF file") is read from local disk only."""
    if is_url(path):
        raise error(f"{path}: {what} is read from local disk only; {hint}")


def check_new_dir(path) -> None:
    """Raise a one-line OSError unless `path` can become a new directory: missing or an empty directory, and
    (when local) not under a file. Commands check their output this way before loading anything."""
    path = as_path(path)
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(f"{path} already exists and is not empty")
        return
    if is_url(path):
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: {parent} is a file, not a directory")


@contextlib.contextmanager
def staged_dir(path) -> Iterator[pathlib.Path]:
    """A temporary directory beside local `path` to write into, renamed onto `path` (missing or empty) when the
    block ends and removed if it raises: an interrupted or killed write never leaves a half-written `path`."""
    path = pathlib.Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; give it the mode of a normally made directory
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
