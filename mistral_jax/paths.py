"""Paths that may be URLs. Orbax checkpoints and sft run directories may live on gs:// (orbax reads and
writes them through `etils.epath`, as its own paths); everything else is read from local disk.

A local path is made absolute with `~` expanded; a URL (anything with "://") is left exactly as given.
A storage emulator (fake-gcs-server) named by STORAGE_EMULATOR_HOST serves gcsfs and, through
TENSORSTORE_GCS_HTTP_URL (derived from it when unset), tensorstore's arrays too.
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
EMULATOR_HOST = "STORAGE_EMULATOR_HOST"  # gcsfs's (and google-cloud-storage's) emulator address
TENSORSTORE_GCS_URL = "TENSORSTORE_GCS_HTTP_URL"  # tensorstore's GCS endpoint (orbax's arrays)


def is_url(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a URL such as gs://bucket/dir (not a local path)."""
    return path is not None and "://" in os.fspath(path)


def use_storage_emulator() -> None:
    """With STORAGE_EMULATOR_HOST set and TENSORSTORE_GCS_HTTP_URL not, point tensorstore at the same emulator
    (else orbax's arrays would go to the real GCS while gcsfs's files go to the emulator)."""
    host = os.environ.get(EMULATOR_HOST)
    if host and not os.environ.get(TENSORSTORE_GCS_URL):
        os.environ[TENSORSTORE_GCS_URL] = host if "://" in host else f"http://{host}"


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (`~` expanded), or a URL such as gs://bucket/dir left as it is."""
    text = os.fspath(path)
    if not is_url(text):
        return epath.Path(pathlib.Path(text).expanduser().absolute())
    if text.startswith("gs://"):
        use_storage_emulator()
    return epath.Path(text)


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
    (when local) not under a file and writable. Commands check their output this way before loading anything."""
    path = as_path(path)
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(f"{path} already exists and is not empty")
        if not is_url(path):
            check_writable(path, path)
        return
    if is_url(path):
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: {parent} is a file, not a directory")
    check_writable(parent, path)


def check_writable(directory, path) -> None:
    """A one-line PermissionError unless a directory can be made in local `directory` (tried, then removed:
    permission bits do not tell for root or a read-only file system)."""
    try:
        pathlib.Path(tempfile.mkdtemp(prefix=".write-check-", dir=directory)).rmdir()
    except OSError as err:
        raise PermissionError(f"{path}: cannot write in {directory} ({err.strerror or err})") from None


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
