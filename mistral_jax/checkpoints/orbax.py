"""Our own format: the parameter pytree as an orbax checkpoint plus the ModelConfig as JSON.

Layout: DIR/mistral_jax_config.json and DIR/params/ (orbax StandardCheckpointer). Restoring takes
target shardings, so a checkpoint saved on one mesh restores onto any other (or none).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterable

import jax
import orbax.checkpoint as ocp

from mistral_jax.checkpoints.errors import CheckpointError, read_json
from mistral_jax.config import ModelConfig

CONFIG_FILE = "mistral_jax_config.json"
PARAMS_DIR = "params"


def is_orbax_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def write(config: ModelConfig, params, path, extra_files: Iterable[pathlib.Path] = ()) -> pathlib.Path:
    """Save params (any sharding), config and `extra_files` (tokenizer files) under `path`, which must not
    exist yet."""
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    for file in extra_files:
        shutil.copy(file, path / pathlib.Path(file).name)
    # The config goes last: a directory without it is never taken for a checkpoint.
    (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return path


def read_config(path: pathlib.Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(read_json(path / CONFIG_FILE))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a valid config: {err}") from err


def restore(path: pathlib.Path, abstract_params) -> dict:
    """Params restored into `abstract_params` (a ShapeDtypeStruct pytree whose shardings say where
    each array goes; dtypes are cast on restore)."""
    params_dir = pathlib.Path(path).expanduser().absolute() / PARAMS_DIR
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

    shapes = param_shapes(config)
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
