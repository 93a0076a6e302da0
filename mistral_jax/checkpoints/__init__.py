"""Checkpoint formats. Each reader returns (ModelConfig, tensors) with tensors in transformers' names and
layout; `hf_layout` turns those into our parameter pytree and back. `load` picks the reader."""

from mistral_jax.checkpoints.load import load

__all__ = ["load"]
