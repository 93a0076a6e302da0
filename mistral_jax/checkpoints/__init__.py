"""Checkpoint formats. Each reader returns (ModelConfig, tensors) with tensors in transformers' names and
layout; `hf_layout` turns those into our parameter pytree and back. `load.load` (`mj.load`) picks the reader.

Nothing is imported here: `from mistral_jax.checkpoints import hf_layout` must not load orbax or gguf.
"""
