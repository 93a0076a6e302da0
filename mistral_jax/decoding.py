"""Prefill (chunked), one jitted decode step over the rolling cache, and the on-device generate loop.

Prompts of different lengths share a batch by left padding: padding columns get position -1, so they
are never written to the cache nor attended to, and every row keeps its own positions. A row's tokens
are therefore the same whether it is generated alone or in a batch.

Every entry point takes an optional `mesh` (see sharding.py): parameters are placed on it, the cache
is split on batch and KV heads, host inputs become global arrays (each process building its own
shards) and returned tokens are replicated, so the same calls run on one device, many, or many hosts.
The mesh is a static argument of every jitted function: one compilation per mesh and shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model.transformer import forward
from mistral_jax.rolling_cache import cache_size, init_cache
from mistral_jax.sampling import Sampling, sample

DEFAULT_PREFILL_CHUNK = 512
# Fewest rows generate decodes per backend: XLA:GPU runs a one-row matmul far below a two-row one (H200,
# Mistral 7B bfloat16: 9.4 ms per step for one row, 4.5 ms for two; benchmarks/RESULTS.md), so a lone
# prompt decodes beside a copy of itself there, and the copy's tokens are dropped.
MIN_DECODE_ROWS = {"gpu": 2}


# Placement under a mesh (all identities when mesh is None) ----------------------------------------
def _rows(mesh, x):
    """An array whose first axis is the batch, as a global array split over the batch axes."""
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    return sharding.put(x, sharding.named(mesh, x.shape, ("batch",) + (None,) * (x.ndim - 1)))


def _replicated(mesh, x):
    return sharding.put(np.asarray(x), sharding.replicated(mesh))


def _place_cache(config, mesh, cache):
    return jax.tree.map(sharding.put, cache, sharding.cache_shardings(config, mesh, cache))


def _seed_key(seed: int, mesh):
    """The sampling key; under a mesh its raw data, replicated (jitted code wraps it back: `_as_key`)."""
    key = jax.random.key(seed)
    return key if mesh is None else _replicated(mesh, jax.random.key_data(key))


def _as_key(key):
    return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _constrain_cache(config, mesh, cache):
    return cache if mesh is None else sharding.constrain_tree(cache, sharding.cache_shardings(config, mesh, cache))


def _constrain_logits(mesh, logits):  # [B, V]
    return sharding.constrain(logits, mesh, ("batch", "act_vocab"))


def _constrain_replicated(mesh, x):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnums=(0, 1, 6), donate_argnums=3)
def _prefill_chunk(config: ModelConfig, mesh, params, cache, tokens, positions, cache_empty: bool = False):
    with sharding.activations(config, mesh, tokens.shape[0]):
        logits, cache, _ = forward(config, params, tokens, positions, cache=cache, last_only=True, cache_empty=cache_empty)
    return _constrain_logits(mesh, logits[:, 0]), _constrain_cache(config, mesh, cache)


def prefill(config: ModelConfig, params, cache, tokens, positions, chunk_size: int | None = None, *, mesh=None,
            cache_empty: bool | None = None):
    """Write prompt tokens [B, T] at `positions` [B, T] (-1 = padding) into the cache, chunk by chunk.

    Returns (float32 logits after the last column [B, V], cache). Chunks are at most the cache size (so
    a chunk never overwrites itself); every chunk has the same shape, so this compiles once (twice with
    an empty cache: its first chunk attends to itself alone, not to the empty slots), and short
    prompts round up to a power of two so that prompts of similar length share one compilation.
    mesh: run split over it (the cache and parameters are placed on it if they are not already).
    cache_empty: whether the cache holds nothing yet; None: read it off the cache (without a mesh).
    """
    xp = jnp if mesh is None else np  # under a mesh, chunks go from the host straight to their shards
    tokens, positions = xp.asarray(tokens, xp.int32), xp.asarray(positions, xp.int32)
    batch, length = tokens.shape
    chunk = min(chunk_size or DEFAULT_PREFILL_CHUNK, cache_size(cache), _round_up_pow2(length))
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length  # padded on the left, so the last column stays the last real token
    tokens = xp.pad(tokens, ((0, 0), (pad, 0)))
    positions = xp.pad(positions, ((0, 0), (pad, 0)), constant_values=-1)
    if mesh is not None:
        params, cache = sharding.ensure_params(config, params, mesh), _place_cache(config, mesh, cache)
    if cache_empty is None:
        cache_empty = mesh is None and not bool(jnp.any(cache["pos"] >= 0))
    logits = None
    for i in range(n_chunks):
        cols = slice(i * chunk, (i + 1) * chunk)
        chunk_tokens, chunk_positions = tokens[:, cols], positions[:, cols]
        if mesh is not None:
            chunk_tokens, chunk_positions = _rows(mesh, chunk_tokens), _rows(mesh, chunk_positions)
        logits, cache = _prefill_chunk(config, mesh, params, cache, chunk_tokens, chunk_positions, cache_empty and i == 0)
    return logits, cache


def decode_step(config: ModelConfig, params, cache, tokens, positions, *, mesh=None):
    """One token per row: tokens, positions int32 [B] -> (float32 logits [B, V], cache). Cache donated.

    Compiled once per config, mesh and shape.
    """
    if mesh is not None:
        params, cache = sharding.ensure_params(config, params, mesh), _place_cache(config, mesh, cache)
        tokens = _rows(mesh, tokens if isinstance(tokens, jax.Array) else np.asarray(tokens, np.int32))
        positions = _rows(mesh, positions if isinstance(positions, jax.Array) else np.asarray(positions, np.int32))
    return _decode_step(config, mesh, params, cache, tokens, positions)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _decode_step(config: ModelConfig, mesh, params, cache, tokens, positions):
    with sharding.activations(config, mesh, tokens.shape[0]):
        logits, cache, _ = forward(config, params, tokens[:, None], positions[:, None], cache=cache)
    return _constrain_logits(mesh, logits[:, 0]), _constrain_cache(config, mesh, cache)


def _round_up_pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def cache_length(config: ModelConfig, needed: int, multiple: int = 256) -> int:
    """Cache length for `needed` tokens, rounded up so that nearby requests share compiled programs."""
    return max(needed, min(-(-needed // multiple) * multiple, config.max_seq_len))


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int):
    """Left-pad token lists into (tokens [B, T], positions [B, T], lengths [B]) numpy arrays."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = prompts.tolist()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    tokens = np.zeros((len(prompts), width), np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise UserError(f"prompt {row} has token ids outside [0, {vocab_size})")
        tokens[row, width - len(ids):] = ids
        positions[row, width - len(ids):] = np.arange(len(ids))
    return tokens, positions, lengths


def _eos_array(eos_id) -> jnp.ndarray:
    ids = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    return jnp.asarray(ids or [-1], jnp.int32)


def _step_key(seed_key, step):
    return jax.random.fold_in(seed_key, step)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _decode_loop(
    config: ModelConfig, mesh, sampling: Sampling, max_new_tokens: int, params, cache, logits, positions, seed_key, eos_ids
):
    """Sample the first token from the prefill logits, then decode on device until every row hit eos."""
    with sharding.activations(config, mesh, logits.shape[0]):
        seed_key = _as_key(seed_key)
        out, step = _decode_loop_body(config, mesh, sampling, max_new_tokens, params, cache, logits, positions, seed_key, eos_ids)
    return _constrain_replicated(mesh, out), _constrain_replicated(mesh, step)


def _decode_loop_body(config, mesh, sampling, max_new_tokens, params, cache, logits, positions, seed_key, eos_ids):
    batch = logits.shape[0]
    first = sample(logits, _step_key(seed_key, 0), sampling)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, out, done, cache, token, positions = state
        logits, cache = forward(config, params, token[:, None], positions[:, None], cache=cache)[:2]
        cache = _constrain_cache(config, mesh, cache)
        token = sample(logits[:, 0], _step_key(seed_key, step), sampling)
        out = out.at[:, step].set(token)
        return step + 1, out, done | jnp.isin(token, eos_ids), cache, token, positions + 1

    state = (jnp.int32(1), out, done, cache, first, positions)
    step, out, *_ = jax.lax.while_loop(cond, body, state)
    return out, step


def _check_context(config: ModelConfig, prompt_len: int, max_new_tokens: int):
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > config.max_seq_len:
        raise UserError(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
            f"{config.max_seq_len} tokens"
        )


def _trim_at_eos(row: np.ndarray, eos_ids: set[int]) -> list[int]:
    out = []
    for token in row.tolist():
        out.append(token)
        if token in eos_ids:
            break
    return out


def _with_min_rows(prompts, mesh):
    """(prompts, how many are the caller's): padded with copies of the last up to MIN_DECODE_ROWS."""
    prompts = prompts.tolist() if isinstance(prompts, np.ndarray) else list(prompts)
    rows = MIN_DECODE_ROWS.get(jax.default_backend(), 1) if mesh is None else 1
    return prompts + prompts[-1:] * max(0, rows - len(prompts)), len(prompts)


def _start(config, params, prompts, max_new_tokens, prefill_chunk, mesh):
    tokens, positions, lengths = pad_prompts(prompts, config.vocab_size)
    _check_context(config, tokens.shape[1], max_new_tokens)
    cache = init_cache(config, tokens.shape[0], cache_length(config, tokens.shape[1] + max_new_tokens), mesh=mesh)
    logits, cache = prefill(config, params, cache, tokens, positions, prefill_chunk, mesh=mesh, cache_empty=True)
    return logits, cache, (jnp.asarray(lengths) if mesh is None else _rows(mesh, lengths))


def generate(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    *,
    mesh=None,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), up to and including the first eos.

    mesh: run split over a `sharding.make_mesh` mesh (on every process of a multi-host run alike).
    """
    sampling = Sampling(temperature, top_k, top_p)
    if mesh is not None:
        params = sharding.ensure_params(config, params, mesh)
    prompts, n = _with_min_rows(prompts, mesh)
    logits, cache, lengths = _start(config, params, prompts, max_new_tokens, prefill_chunk, mesh)
    eos = _eos_array(eos_id) if mesh is None else _replicated(mesh, _eos_array(eos_id))
    out, _ = _decode_loop(config, mesh, sampling, max_new_tokens, params, cache, logits, lengths, _seed_key(seed, mesh), eos)
    eos_ids = set(np.asarray(_eos_array(eos_id)).tolist())
    return [_trim_at_eos(row, eos_ids) for row in np.asarray(out)[:n]]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _first_token(mesh, sampling: Sampling, logits, seed_key):
    return _constrain_replicated(mesh, sample(logits, _step_key(_as_key(seed_key), 0), sampling))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=4)
def _stream_step(config: ModelConfig, mesh, sampling: Sampling, params, cache, token, positions, seed_key, step):
    with sharding.activations(config, mesh, token.shape[0]):
        logits, cache = forward(config, params, token[:, None], positions[:, None], cache=cache)[:2]
    token = sample(logits[:, 0], _step_key(_as_key(seed_key), step), sampling)
    return _constrain_replicated(mesh, token), _constrain_cache(config, mesh, cache), positions + 1


def generate_stream(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    *,
    mesh=None,
) -> Iterator[np.ndarray]:
    """Like `generate`, yielding each step's tokens (int32 [B]) as soon as they exist.

    Stops when every row has produced an eos; rows already finished keep yielding tokens the caller
    should ignore. Same seed, same tokens as `generate`.
    """
    sampling = Sampling(temperature, top_k, top_p)
    if mesh is not None:
        params = sharding.ensure_params(config, params, mesh)
    prompts, n = _with_min_rows(prompts, mesh)
    logits, cache, positions = _start(config, params, prompts, max_new_tokens, prefill_chunk, mesh)
    seed_key, eos = _seed_key(seed, mesh), np.asarray(_eos_array(eos_id))
    token = _first_token(mesh, sampling, logits, seed_key)
    host_token = np.asarray(token)[:n]
    done = np.isin(host_token, eos)
    yield host_token
    for step in range(1, max_new_tokens):
        if done.all():
            return
        step_array = jnp.int32(step) if mesh is None else _replicated(mesh, np.int32(step))
        token, cache, positions = _stream_step(config, mesh, sampling, params, cache, token, positions, seed_key, step_array)
        host_token = np.asarray(token)[:n]
        done |= np.isin(host_token, eos)
        yield host_token
