"""Lazy, tensor-by-tensor access to one or several safetensors files (never pickle, never all at once)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open

from mistral_jax.checkpoints.errors import CheckpointError, read_json


class SafetensorsFiles(Mapping):
    """A read-only mapping name -> numpy array over safetensors files; each tensor is read when asked for."""

    def __init__(self, weight_map: dict[str, pathlib.Path]):
        self._weight_map = weight_map
        self._handles: dict[pathlib.Path, object] = {}

    @classmethod
    def from_files(cls, files: list[pathlib.Path]) -> SafetensorsFiles:
        weight_map = {}
        for file in files:
            for name in _open(file).keys():
                if name in weight_map:
                    raise CheckpointError(f"tensor {name!r} appears in both {weight_map[name]} and {file}")
                weight_map[name] = file
        return cls(weight_map)

    @classmethod
    def from_index(cls, index_path: pathlib.Path) -> SafetensorsFiles:
        """Sharded checkpoints: `*.safetensors.index.json` names the file holding each tensor."""
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} is not a safetensors index (no weight_map)")
        files = {name: index_path.parent / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"shard(s) named in {index_path} are missing: {', '.join(missing)}")
        return cls(files)

    def _handle(self, file: pathlib.Path):
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._weight_map:
            raise KeyError(name)
        file = self._weight_map[name]
        try:
            # A fresh handle per tensor, dropped right after: the file's memory map (whose touched pages
            # count as resident memory) never outlives one tensor's read.
            return _open(file).get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {err}") from err

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._weight_map[name]).get_slice(name).get_shape())

    def file_of(self, name: str) -> pathlib.Path:
        return self._weight_map[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)


def _open(file: pathlib.Path):
    if not file.is_file():
        raise CheckpointError(f"safetensors file not found: {file}")
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def open_safetensors_dir(directory: pathlib.Path, stem: str = "model") -> SafetensorsFiles:
    """`{stem}.safetensors.index.json` if present, else `{stem}.safetensors`, else every `*.safetensors`."""
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        return SafetensorsFiles.from_index(index)
    single = directory / f"{stem}.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    return SafetensorsFiles.from_files(files)
