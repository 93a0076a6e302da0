"""The ring-buffer (rolling) KV cache: position p lives in slot p mod size.

A cache is a plain dict pytree made by `init_cache`:
  k, v: keys (already rotated by RoPE) and values, heads-major so that attention reads them as stored:
        [layers, batch, kv_heads, size, head_dim]     for a scanned model (config.scan_layers);
        a tuple of `layers` buffers [batch * kv_heads, size, head_dim] otherwise (rows batch-major),
        which a donated decode step updates in place: XLA:CPU copies a whole buffer on every step
        where a dot reads it through a reshape (a batch of 1 is one: RESULTS.md), so the rows stay merged
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

    mesh: built directly split over it (batch over data/fsdp; a scanned cache's KV heads over tensor too:
    see sharding.cache_shardings).
    """
    if batch_size <= 0 or max_seq_len <= 0:
        raise ValueError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
    size = config.cache_size(max_seq_len)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(config.compute_dtype)
    layer_shape = (batch_size, config.n_kv_heads, size, config.resolved_head_dim)
    return _empty(config, layer_shape, dtype, mesh)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty(config: ModelConfig, layer_shape, dtype, mesh) -> dict:
    """Zeros, built on device; under a mesh each device allocates only its own shard."""
    if config.scan_layers:
        k, v = (jnp.zeros((config.n_layers, *layer_shape), dtype) for _ in range(2))
    else:
        rows = (layer_shape[0] * layer_shape[1], *layer_shape[2:])
        k, v = (tuple(jnp.zeros(rows, dtype) for _ in range(config.n_layers)) for _ in range(2))
    cache = {"k": k, "v": v, "pos": jnp.full(layer_shape[:1] + layer_shape[2:3], -1, jnp.int32)}
    if mesh is None:
        return cache
    return sharding.constrain_tree(cache, sharding.cache_shardings(config, mesh, cache))


def cache_size(cache: dict) -> int:
    return cache["pos"].shape[-1]


def _slots_or_dropped(positions, size: int):
    """Ring slot of each position; negative positions get slot `size`, out of range: a scatter drops them."""
    return jnp.where(positions >= 0, positions % size, size)


def write(buffer, positions, values):
    """Store values[b, t] at slot positions[b, t] mod size of buffer[b]; negative positions are dropped.

    buffer: [B, S, ...]; positions: int [B, T] with T <= S; values: [B, T, ...].
    """
    slots = _slots_or_dropped(positions, buffer.shape[1])
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")


def heads_view(buffer, batch: int):
    """A layer's K or V buffer as [B, K, S, D], whichever layout stores it."""
    return buffer if buffer.ndim == 4 else buffer.reshape(batch, -1, *buffer.shape[1:])


def write_heads(buffer, positions, values):
    """`write` for one layer's K or V buffer ([B, K, S, D] or [B*K, S, D]) and new values [B, T, K, D].

    One token per row (T == 1, a decode step, whose positions are never negative) is one in-bounds
    scatter of B*K rows, which XLA:CPU applies to a donated [B*K, S, D] buffer in place (the test
    `test_unscanned_decode_step_updates_the_cache_in_place` checks the compiled program). Prompt chunks,
    which may hold padding (negative positions), use the dropping form.
    """
    batch, t, kv_heads, _ = values.shape
    size = buffer.shape[-2]
    values = values.astype(buffer.dtype)
    if t == 1:
        slots = jnp.repeat(positions[:, 0] % size, kv_heads)  # [B*K]
        rows = buffer.reshape(batch * kv_heads, *buffer.shape[-2:])
        rows = rows.at[jnp.arange(batch * kv_heads), slots].set(values.reshape(batch * kv_heads, -1), mode="promise_in_bounds")
        return rows.reshape(buffer.shape)
    slots = _slots_or_dropped(positions, size)
    updated = heads_view(buffer, batch).at[jnp.arange(batch)[:, None], :, slots].set(values, mode="drop")
    return updated.reshape(buffer.shape)


def advance_positions(cache_pos, positions):
    """The cache's slot positions after writing the tokens at `positions` ([B, T])."""
    return write(cache_pos, positions, positions)
