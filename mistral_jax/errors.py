"""UserError: the one base class for mistakes in what a user gave (inputs, settings, paths, checkpoints).

The CLI prints a UserError as one line with exit status 2; anything else is a bug and raises with its
traceback. UserError is a ValueError, so code that catches ValueError keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong or missing; the message says what and how to fix it."""


def one_line(err: BaseException) -> str | None:
    """The line a command prints for an error the user caused, or None for a bug (let it raise).

    A UserError; an OSError about a path (one with a file name, or one we raised with a message, such as
    "no such checkpoint: PATH"); an ImportError for a URL's missing file system package (gs:// without gcsfs).
    """
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError) and (err.filename is not None or err.errno is None):
        if err.filename is not None and err.strerror:
            target = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else f"{err.filename}"
            return f"{target}: {err.strerror}"
        return str(err)
    if isinstance(err, ImportError):
        return missing_filesystem(err)
    return None


# What etils.epath (fsspec) needs to reach each kind of URL; tpu/install.sh installs gcsfs.
FILESYSTEM_PACKAGES = ("gcsfs", "s3fs", "adlfs")


def missing_filesystem(err: ImportError) -> str | None:
    """One line for an ImportError raised because a URL's file system package is not installed (else None)."""
    text = str(err)
    package = next((name for name in FILESYSTEM_PACKAGES if name in text), None)
    return f"{text.rstrip('.')} (pip install {package})" if package else None



class ParamError(UserError):
    """A wrong setting; `param` names the field at fault (the server reports it as OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
