"""The ring-buffer (rolling) KV cache: position p lives in slot p mod size.

A cache is a plain dict pytree made by `init_cache`:
  k, v: [layers, batch, size, kv_heads, head_dim]  keys already rotated by RoPE
  pos:  int32 [batch, size]  the position held by each slot, -1 where empty
`size` is min(max_seq_len, sliding_window): memory stays flat however long the generation runs.
Positions are per row, so rows of a batch may be at different points (ragged prompts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mistral_jax import sharding
from mistral_jax.config import ModelConfig


def init_cache(config: ModelConfig, batch_size: int, max_seq_len: int, dtype=None, mesh=None) -> dict:
    """An empty cache for `batch_size` rows of at most `max_seq_len` tokens each.

    mesh: built directly split over it (batch over data/fsdp, KV heads over tensor; see sharding.py).
    """
    if batch_size <= 0 or max_seq_len <= 0:
        raise ValueError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
    size = config.cache_size(max_seq_len)
    dtype = jnp.dtype(dtype) if dtype is not None else config.compute_dtype
    shape = (config.n_layers, batch_size, size, config.n_kv_heads, config.resolved_head_dim)
    if mesh is not None:
        return _empty_on_mesh(config, shape, jnp.dtype(dtype), mesh)
    return _empty(shape, dtype)


def _empty(shape, dtype) -> dict:
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((shape[1], shape[2]), -1, jnp.int32),
    }


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_on_mesh(config: ModelConfig, shape, dtype, mesh) -> dict:
    """Each device allocates only its own shard of the empty cache."""
    cache = _empty(shape, dtype)
    return sharding.constrain_tree(cache, sharding.cache_shardings(config, mesh, cache))


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
