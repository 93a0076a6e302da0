"""The ring-buffer (rolling) KV cache: position p lives in slot p mod size.

A cache is a plain dict pytree made by `init_cache`:
  k, v: [layers, batch, size, kv_heads, head_dim]  keys already rotated by RoPE
  pos:  int32 [batch, size]  the position held by each slot, -1 where empty
`size` is min(max_seq_len, sliding_window): memory stays flat however long the generation runs.
Positions are per row, so rows of a batch may be at different points (ragged prompts).
"""

from __future__ import annotations

import jax.numpy as jnp

from mistral_jax.config import ModelConfig


def init_cache(config: ModelConfig, batch_size: int, max_seq_len: int, dtype=None) -> dict:
    """An empty cache for `batch_size` rows of at most `max_seq_len` tokens each."""
    if batch_size <= 0 or max_seq_len <= 0:
        raise ValueError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
    size = config.cache_size(max_seq_len)
    dtype = jnp.dtype(dtype) if dtype is not None else config.compute_dtype
    shape = (config.n_layers, batch_size, size, config.n_kv_heads, config.resolved_head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch_size, size), -1, jnp.int32),
    }


def cache_size(cache: dict) -> int:
    return cache["pos"].shape[-1]


def write(buffer, positions, values):
    """Store values[b, t] at slot positions[b, t] mod size of buffer[b]; negative positions are dropped.

    buffer: [B, S, ...]; positions: int [B, T] with T <= S; values: [B, T, ...].
    """
    size = buffer.shape[1]
    slots = jnp.where(positions >= 0, positions % size, size)  # slot `size` is out of range: dropped
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")


def advance_positions(cache_pos, positions):
    """The cache's slot positions after writing the tokens at `positions` ([B, T])."""
    return write(cache_pos, positions, positions)
