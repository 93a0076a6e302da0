"""Our own format: the parameter pytree as an orbax checkpoint plus the ModelConfig as JSON.

Layout: DIR/mistral_jax_config.json and DIR/params/ (orbax StandardCheckpointer). Restoring takes
target shardings, so a checkpoint saved on one mesh restores onto any other (or none). Paths are
`etils.epath` paths, as orbax's own: `gs://bucket/dir` works where the file system is reachable.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable

import orbax.checkpoint as ocp
from etils import epath

from mistral_jax.checkpoints.errors import CheckpointError
from mistral_jax.config import ModelConfig
from mistral_jax.paths import as_path, check_new_dir, is_url, staged_dir

CONFIG_FILE = "mistral_jax_config.json"
PARAMS_DIR = "params"
UNFINISHED_FILE = "mistral_jax_unfinished"  # a URL being written (see write)


def is_orbax_dir(path) -> bool:
    path = as_path(path)
    return path.is_dir() and (path / CONFIG_FILE).exists()


def check_destination(path) -> None:
    """Raise a one-line OSError unless `write` can write `path`: missing, an empty directory, or (a URL) the
    remains of a write that never finished."""
    if not _unfinished(as_path(path)):
        check_new_dir(path)


def write(config: ModelConfig, params, path, extra_files: Iterable[pathlib.Path] = ()) -> epath.Path:
    """Save params (any sharding), config and `extra_files` (tokenizer files) under `path`, which must not
    exist yet. Always saved in the scanned layout.

    A local `path` is written under a temporary name beside it and renamed at the end. A URL is written in
    place, marked unfinished until its config is written last; a rerun replaces such remains.
    """
    from mistral_jax.model.layer_layout import stack_layers

    config, params = stack_layers(config, params)
    path = as_path(path)
    check_destination(path)
    if not is_url(path):
        with staged_dir(path) as tmp:
            _write_into(epath.Path(tmp), config, params, extra_files)
        return path
    if _unfinished(path):
        path.rmtree()
    path.mkdir(parents=True, exist_ok=True)
    (path / UNFINISHED_FILE).write_text("")
    _write_into(path, config, params, extra_files)
    (path / UNFINISHED_FILE).unlink()
    return path


def _unfinished(path: epath.Path) -> bool:
    """Whether URL `path` holds what a write killed before its end left (local writes leave none)."""
    return is_url(path) and (path / UNFINISHED_FILE).exists() and not (path / CONFIG_FILE).exists()


def _write_into(path: epath.Path, config: ModelConfig, params, extra_files: Iterable[pathlib.Path]) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    for file in extra_files:
        (path / pathlib.Path(file).name).write_bytes(pathlib.Path(file).read_bytes())
    # The config goes last: a directory without it is never taken for a checkpoint.
    (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def stored_quant(path) -> str:
    """The quantization of a checkpoint as stored, read from its config alone: "none" unless `path` is a quantized
    orbax checkpoint (the one format that holds int8 weights), so a command can refuse one before loading it."""
    return read_config(path).quant if is_orbax_dir(path) else "none"


def read_config(path) -> ModelConfig:
    path = as_path(path)
    try:
        return ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path / CONFIG_FILE} is not a valid config: {err}") from err


def restore(path, abstract_params) -> dict:
    """Params restored into `abstract_params` (a ShapeDtypeStruct pytree whose shardings say where
    each array goes; dtypes are cast on restore)."""
    params_dir = as_path(path) / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{path} is not an orbax checkpoint: {params_dir} is missing")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params_dir, abstract_params)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        raise CheckpointError(f"{params_dir} is not a readable orbax checkpoint: {err}") from err


def abstract_params(config: ModelConfig, shardings=None):
    """ShapeDtypeStructs of config's params, placed by `shardings` (a matching pytree) or on device 0."""
    from mistral_jax.model.transformer import param_shapes
    from mistral_jax.sharding import abstract_arrays

    return abstract_arrays(param_shapes(config), shardings)
