"""The ring-buffer (rolling) KV cache: position p lives in slot p mod size.

A cache is a plain dict pytree (`zeros` here; `mistral_jax.init_cache` builds one on a mesh):
  k, v: keys (already rotated by RoPE) and values, heads-major so that attention reads them as stored:
        [layers, batch, kv_heads, size, head_dim]     for a scanned model (config.scan_layers);
        a tuple of `layers` buffers [batch * kv_heads, size, head_dim] otherwise (rows batch-major),
        which a donated decode step updates in place (layer_layout.py says why the rows stay merged)
  pos:  int32 [batch, size]  the position held by each slot, -1 where empty
  window_pos: int32 [batch, window size]  only where the layers' rings differ in size: an unscanned cache of a
        model whose layer_types mix sliding and full layers keeps each sliding layer's ring at its window
        (+ lookahead) and each full layer's at the context; `pos` is then the full rings', this the window rings'.
        (A scanned cache stacks one size: every layer holds the context, the window applied by the mask.)
  k_scale, v_scale: only in an int8 cache (config.kv_cache_dtype="int8", as MaxText's quantize_kvcache): k and v
        hold int8 values and these their float32 scales, one per token and KV head (symmetric absmax over
        head_dim), in k's layout with head_dim 1: [layers, batch, kv_heads, size, 1] or [batch * kv_heads, size, 1]
`size` is min(max_seq_len, sliding_window): memory stays flat however long the generation runs.
POSITION_NAMES lists the slot-position arrays; `layer_sizes` says each layer's ring.
Positions are per row, so rows of a batch may be at different points (ragged prompts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import quant


def layer_shape(config: ModelConfig, batch_size: int, max_seq_len: int,
                lookahead: int = 0) -> tuple[int, int, int, int]:
    """[batch, kv_heads, size, head_dim] of one layer's K (or V) for `batch_size` rows of `max_seq_len` tokens
    (lookahead: ModelConfig.cache_size)."""
    if batch_size <= 0 or max_seq_len <= 0:
        raise UserError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
    return batch_size, config.n_kv_heads, config.cache_size(max_seq_len, lookahead), config.resolved_head_dim


POSITION_NAMES = ("pos", "window_pos")


def layer_sizes(config: ModelConfig, max_seq_len: int, lookahead: int = 0) -> tuple[int, ...]:
    """Ring slots of each layer in config's layout: scanned, all alike (the largest); unscanned, each layer's own."""
    if config.scan_layers:
        return (config.cache_size(max_seq_len, lookahead),) * config.n_layers
    return tuple(config.cache_size(max_seq_len, lookahead, w) for w in config.layer_windows)


def zeros(config: ModelConfig, batch_size: int, max_seq_len: int, dtype=None, lookahead: int = 0) -> dict:
    """An empty cache in the layout of config.scan_layers (dtype: default config.kv_cache_dtype, else the compute
    dtype; int8 adds the scales). lookahead: slots beyond the window for speculative drafts (speculative.py)."""
    dtype = jnp.dtype(dtype if dtype is not None else config.kv_cache_dtype or config.compute_dtype)
    b, kv_heads, size, head_dim = layer_shape(config, batch_size, max_seq_len, lookahead)
    sizes = layer_sizes(config, max_seq_len, lookahead)

    def buffers(width, dtype):
        if config.scan_layers:
            return jnp.zeros((config.n_layers, b, kv_heads, size, width), dtype)
        return tuple(jnp.zeros((b * kv_heads, n, width), dtype) for n in sizes)

    cache = {"k": buffers(head_dim, dtype), "v": buffers(head_dim, dtype), "pos": jnp.full((b, size), -1, jnp.int32)}
    if min(sizes) != size:
        cache["window_pos"] = jnp.full((b, min(sizes)), -1, jnp.int32)
    if dtype == jnp.int8:
        cache.update(k_scale=buffers(1, jnp.float32), v_scale=buffers(1, jnp.float32))
    return cache


def buffer_names(cache: dict) -> tuple[str, ...]:
    """The per-layer buffers of a cache: k, v and, in an int8 cache, their scales."""
    return tuple(name for name in ("k", "v", "k_scale", "v_scale") if name in cache)


def quantize_heads(values):
    """values [B, T, K, D] -> (int8 [B, T, K, D], float32 scales [B, T, K, 1]): symmetric absmax per token and head."""
    return quant.absmax_int8(values)


def write_layer(layer_cache: dict, positions, keys, values) -> dict:
    """One layer's cache ({k, v} or, int8, with their scales) after writing keys and values [B, T, K, D]."""
    if "k_scale" not in layer_cache:
        return {"k": write_heads(layer_cache["k"], positions, keys),
                "v": write_heads(layer_cache["v"], positions, values)}
    out = {}
    for name, x in (("k", keys), ("v", values)):
        q, scale = quantize_heads(x)
        out[name] = write_heads(layer_cache[name], positions, q)
        out[name + "_scale"] = write_heads(layer_cache[name + "_scale"], positions, scale)
    return out


def read_layer(layer_cache: dict, name: str, batch: int, dtype):
    """One layer's K or V ("k", "v") as [B, K, S, D] in `dtype`, dequantized from an int8 cache."""
    x = heads_view(layer_cache[name], batch)
    if name + "_scale" not in layer_cache:
        return x.astype(dtype)
    return (x.astype(jnp.float32) * heads_view(layer_cache[name + "_scale"], batch)).astype(dtype)


def cache_size(cache: dict) -> int:
    """The smallest ring of a cache: a prefill chunk must fit it."""
    return min(cache[name].shape[-1] for name in POSITION_NAMES if name in cache)


def drop_positions_after(cache: dict, last_positions) -> dict:
    """`cache` with every slot holding a position past its row's last_positions [B] marked empty (-1)."""
    return {**cache, **{name: jnp.where(cache[name] > last_positions[:, None], -1, cache[name])
                        for name in POSITION_NAMES if name in cache}}


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


def insert_rows(cache: dict, rows: dict, first_row):
    """`cache` with `rows` (a cache of fewer rows, same layout and size) written over rows first_row, ... .

    first_row may be traced: one compiled program serves every slot of a server's batch.
    """
    def put(buffer, new):
        axis = 1 if buffer.ndim == 5 else 0  # scanned [L, B, K, S, D]; merged [B*K, S, D]; pos [B, S]
        start = [0] * buffer.ndim
        start[axis] = first_row * (new.shape[axis] // rows["pos"].shape[0])  # merged rows hold K per batch row
        return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)

    return jax.tree.map(put, cache, rows)
