"""Prefill (chunked), one jitted decode step over the rolling cache, and the on-device generate loop.

Prompts of different lengths share a batch by left padding: padding columns get position -1, so they
are never written to the cache nor attended to, and every row keeps its own positions. A row's tokens
are therefore the same whether it is generated alone or in a batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.config import ModelConfig
from mistral_jax.model.transformer import forward
from mistral_jax.rolling_cache import cache_size, init_cache
from mistral_jax.sampling import Sampling, sample

DEFAULT_PREFILL_CHUNK = 512


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill_chunk(config: ModelConfig, params, cache, tokens, positions):
    logits, cache, _ = forward(config, params, tokens, positions, cache=cache, last_only=True)
    return logits[:, 0], cache


def prefill(config: ModelConfig, params, cache, tokens, positions, chunk_size: int | None = None):
    """Write prompt tokens [B, T] at `positions` [B, T] (-1 = padding) into the cache, chunk by chunk.

    Returns (float32 logits after the last column [B, V], cache). Chunks are at most the cache size (so
    a chunk never overwrites itself); every chunk has the same shape, so this compiles once, and short
    prompts round up to a power of two so that prompts of similar length share one compilation.
    """
    tokens, positions = jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)
    batch, length = tokens.shape
    chunk = min(chunk_size or DEFAULT_PREFILL_CHUNK, cache_size(cache), _round_up_pow2(length))
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length  # padded on the left, so the last column stays the last real token
    tokens = jnp.pad(tokens, ((0, 0), (pad, 0)))
    positions = jnp.pad(positions, ((0, 0), (pad, 0)), constant_values=-1)
    logits = None
    for i in range(n_chunks):
        cols = slice(i * chunk, (i + 1) * chunk)
        logits, cache = _prefill_chunk(config, params, cache, tokens[:, cols], positions[:, cols])
    return logits, cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step(config: ModelConfig, params, cache, tokens, positions):
    """One token per row: tokens, positions int32 [B] -> (float32 logits [B, V], cache). Cache donated."""
    logits, cache, _ = forward(config, params, tokens[:, None], positions[:, None], cache=cache)
    return logits[:, 0], cache


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
        raise ValueError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    tokens = np.zeros((len(prompts), width), np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt {row} has token ids outside [0, {vocab_size})")
        tokens[row, width - len(ids):] = ids
        positions[row, width - len(ids):] = np.arange(len(ids))
    return tokens, positions, lengths


def _eos_array(eos_id) -> jnp.ndarray:
    ids = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    return jnp.asarray(ids or [-1], jnp.int32)


def _step_key(seed_key, step):
    return jax.random.fold_in(seed_key, step)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_loop(config: ModelConfig, sampling: Sampling, max_new_tokens: int, params, cache, logits, positions, seed_key, eos_ids):
    """Sample the first token from the prefill logits, then decode on device until every row hit eos."""
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
        token = sample(logits[:, 0], _step_key(seed_key, step), sampling)
        out = out.at[:, step].set(token)
        return step + 1, out, done | jnp.isin(token, eos_ids), cache, token, positions + 1

    state = (jnp.int32(1), out, done, cache, first, positions)
    step, out, *_ = jax.lax.while_loop(cond, body, state)
    return out, step


def _check_context(config: ModelConfig, prompt_len: int, max_new_tokens: int):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > config.max_seq_len:
        raise ValueError(
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


def _start(config, params, prompts, max_new_tokens, prefill_chunk):
    tokens, positions, lengths = pad_prompts(prompts, config.vocab_size)
    _check_context(config, tokens.shape[1], max_new_tokens)
    cache = init_cache(config, tokens.shape[0], cache_length(config, tokens.shape[1] + max_new_tokens))
    logits, cache = prefill(config, params, cache, tokens, positions, prefill_chunk)
    return logits, cache, jnp.asarray(lengths)


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
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), up to and including the first eos."""
    sampling = Sampling(temperature, top_k, top_p)
    logits, cache, lengths = _start(config, params, prompts, max_new_tokens, prefill_chunk)
    out, _ = _decode_loop(config, sampling, max_new_tokens, params, cache, logits, lengths, jax.random.key(seed), _eos_array(eos_id))
    eos_ids = set(np.asarray(_eos_array(eos_id)).tolist())
    return [_trim_at_eos(row, eos_ids) for row in np.asarray(out)]


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _stream_step(config: ModelConfig, sampling: Sampling, params, cache, token, positions, seed_key, step):
    logits, cache = forward(config, params, token[:, None], positions[:, None], cache=cache)[:2]
    return sample(logits[:, 0], _step_key(seed_key, step), sampling), cache


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
) -> Iterator[np.ndarray]:
    """Like `generate`, yielding each step's tokens (int32 [B]) as soon as they exist.

    Stops when every row has produced an eos; rows already finished keep yielding tokens the caller
    should ignore. Same seed, same tokens as `generate`.
    """
    sampling = Sampling(temperature, top_k, top_p)
    logits, cache, positions = _start(config, params, prompts, max_new_tokens, prefill_chunk)
    seed_key, eos = jax.random.key(seed), _eos_array(eos_id)
    token = jax.jit(sample, static_argnums=2)(logits, _step_key(seed_key, 0), sampling)
    done = jnp.isin(token, eos)
    yield np.asarray(token)
    for step in range(1, max_new_tokens):
        if bool(jnp.all(done)):
            return
        token, cache = _stream_step(config, sampling, params, cache, token, positions, seed_key, jnp.int32(step))
        positions = positions + 1
        done = done | jnp.isin(token, eos)
        yield np.asarray(token)
