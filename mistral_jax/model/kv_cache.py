"""The ring-buffer (rolling) KV cache: position p lives in slot p mod size.

A cache is a plain dict pytree (`zeros` here; `mistral_jax.init_cache` builds one on a mesh):
  k, v: keys (already rotated by RoPE) and values, heads-major so that attention reads them as stored:
        [layers, batch, kv_heads, size, head_dim]     for a scanned model (config.scan_layers);
        a tuple of `layers` buffers [batch * kv_heads, size, head_dim] otherwise (rows batch-major),
        which a donated decode step updates in place (layer_layout.py says why the rows stay merged)
  pos:  int32 [batch, size]  the position held by each slot, -1 where empty
`size` is min(max_seq_len, sliding_window): memory stays flat however long the generation runs.
Positions are per row, so rows of a batch may be at different points (ragged prompts).
"""

from __future__ import annotations

import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError


def layer_shape(config: ModelConfig, batch_size: int, max_seq_len: int,
                lookahead: int = 0) -> tuple[int, int, int, int]:
    """[batch, kv_heads, size, head_dim] of one layer's K (or V) for `batch_size` rows of `max_seq_len` tokens
    (lookahead: ModelConfig.cache_size)."""
    if batch_size <= 0 or max_seq_len <= 0:
        raise UserError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
    return batch_size, config.n_kv_heads, config.cache_size(max_seq_len, lookahead), config.resolved_head_dim


def zeros(config: ModelConfig, batch_size: int, max_seq_len: int, dtype=None, lookahead: int = 0) -> dict:
    """An empty cache in the layout of config.scan_layers (dtype: default the compute dtype)."""
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(config.compute_dtype)
    b, kv_heads, size, head_dim = layer_shape(config, batch_size, max_seq_len, lookahead)
    if config.scan_layers:
        k, v = (jnp.zeros((config.n_layers, b, kv_heads, size, head_dim), dtype) for _ in range(2))
    else:
        k, v = (tuple(jnp.zeros((b * kv_heads, size, head_dim), dtype) for _ in range(config.n_layers))
                for _ in range(2))
    return {"k": k, "v": v, "pos": jnp.full((b, size), -1, jnp.int32)}


def cache_size(cache: dict) -> int:
    return cache["pos"].shape[-1]


def ring_slots(positions, size: int):
    """Ring slot of each position; a negative (padding) position gets slot `size`, which a dropping scatter skips."""
    return jnp.where(positions >= 0, positions % size, size)


def write(buffer, positions, values):
    """Store values[b, t] at slot positions[b, t] mod size of buffer[b]; negative positions are dropped.

    buffer: [B, S, ...]; positions: int [B, T] with T <= S; values: [B, T, ...].
    """
    slots = ring_slots(positions, buffer.shape[1])
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
        rows = rows.at[jnp.arange(batch * kv_heads), slots].set(values.reshape(batch * kv_heads, -1),
                                                               mode="promise_in_bounds")
        return rows.reshape(buffer.shape)
    slots = ring_slots(positions, size)
    updated = heads_view(buffer, batch).at[jnp.arange(batch)[:, None], :, slots].set(values, mode="drop")
    return updated.reshape(buffer.shape)


def advance_positions(cache_pos, positions):
    """The cache's slot positions after writing the tokens at `positions` ([B, T])."""
    return write(cache_pos, positions, positions)
