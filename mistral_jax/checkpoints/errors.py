"""The one error type for unreadable or inconsistent checkpoints (a UserError)."""

import json
import pathlib
from typing import Any

from mistral_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint is missing a file or tensor, has an unexpected one, or a shape that does not fit."""


def read_json(file: pathlib.Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; a CheckpointError naming the file when it is not one."""
    try:
        value = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return value
