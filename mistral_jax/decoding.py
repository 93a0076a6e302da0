"""Inference: logits, chunked prefill, one decode step over the rolling cache, generate and generate_stream.

Prompts of different lengths share a batch by left padding: padding columns get position -1, so they
are never written to the cache nor attended to, and every row keeps its own positions. A row's tokens
are therefore the same whether it is generated alone or in a batch.

`generate` and `generate_stream` run the same step (`_advance`: decode one token per row, sample, record):
generate inside a `lax.while_loop` on device, generate_stream as a jitted call per token from Python.
The loop's bound is traced and its token buffer and cache come in buckets, so a new `max_new_tokens`
reuses the compiled programs.

Every entry point takes an optional `mesh` (see sharding.py): parameters are placed on it, the cache
is split on batch and KV heads, host inputs become global arrays (each process building its own
shards) and returned tokens are replicated, so the same calls run on one device, many, or many hosts.
The mesh is a static argument of every jitted function: one compilation per mesh and shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import sharding, speculative
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import kv_cache
from mistral_jax.model.transformer import default_positions, forward
from mistral_jax.sampling import Sampling, as_key, sample

DEFAULT_PREFILL_CHUNK = 512
# Fewest rows generate decodes per backend: XLA:GPU runs a one-row matmul far slower than a two-row one
# (benchmarks/RESULTS.md, H200), so there a lone prompt decodes beside a copy of itself, whose tokens are dropped.
MIN_DECODE_ROWS = {"gpu": 2}


@flax.struct.dataclass
class DecodeState:
    """Where a batch's generation stands between two decode steps (a pytree: the while loop's carry)."""

    step: jax.Array  # int32 []: tokens made so far; the next one goes to tokens[:, step]
    tokens: jax.Array  # int32 [B, N]: the tokens made, N >= max_new_tokens (a bucket)
    token: jax.Array  # int32 [B]: the latest token, the next step's input
    positions: jax.Array  # int32 [B]: the latest token's position
    done: jax.Array  # bool [B]: the row has made an eos token
    cache: dict  # the rolling cache (model/kv_cache.py), holding everything before `token`


# Placement under a mesh (identities when mesh is None) -------------------------------------------
def _rows(mesh, x):
    """An array whose first axis is the batch, as a global array split over the batch axes."""
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    return sharding.put(x, sharding.named(mesh, x.shape, ("batch",) + (None,) * (x.ndim - 1)))


def _replicated(mesh, x):
    """A host value as a device array: replicated over the mesh, if any."""
    return jnp.asarray(x) if mesh is None else sharding.put(np.asarray(x), sharding.replicated(mesh))


def _seed_key(seed: int, mesh):
    """The sampling key's raw data (jitted code wraps it back: `sampling.as_key`), replicated."""
    return _replicated(mesh, jax.random.key_data(jax.random.key(seed)))


def _constrain_logits(mesh, logits):  # [B, V]
    return sharding.constrain(logits, mesh, ("batch", "act_vocab"))


def _constrain_state(mesh, state: DecodeState) -> DecodeState:
    """The state's small arrays replicated (every process reads the tokens), the cache split as placed."""
    if mesh is None:
        return state
    small = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "cache"}
    small = jax.lax.with_sharding_constraint(small, sharding.replicated(mesh))
    return DecodeState(**small, cache=sharding.constrain_cache(mesh, state.cache))


# The cache and the uncached forward -------------------------------------------------------------
def init_cache(config: ModelConfig, batch_size: int, max_seq_len: int, dtype=None, mesh=None,
               lookahead: int = 0) -> dict:
    """An empty cache (model/kv_cache.py) for `batch_size` rows of at most `max_seq_len` tokens each.

    mesh: built directly split over it, each device allocating only its own shard (batch over data/fsdp;
    a scanned cache's KV heads over tensor too: see sharding.cache_shardings).
    lookahead: ring slots past a sliding window, for speculative tokens written and maybe taken back.
    """
    dtype = None if dtype is None else jnp.dtype(dtype)
    return _empty_cache(config, batch_size, max_seq_len, dtype, mesh, lookahead)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _empty_cache(config: ModelConfig, batch_size: int, max_seq_len: int, dtype, mesh, lookahead: int = 0) -> dict:
    return sharding.constrain_cache(mesh, kv_cache.zeros(config, batch_size, max_seq_len, dtype, lookahead))


def logits(config: ModelConfig, params, tokens, *, mesh=None):
    """Causal logits without a cache: int [B, T] -> float32 [B, T, vocab].

    mesh: a `jax.sharding.Mesh` from `mistral_jax.sharding.make_mesh`; the parameters are placed on it
    (unless `shard_params` already did) and the logits come back split on batch and vocabulary (across
    hosts, gather them with `jax.experimental.multihost_utils.process_allgather`).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise UserError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise UserError(f"token ids must lie in [0, {config.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    if mesh is None:
        return _logits(config, None, params, jnp.asarray(tokens, jnp.int32))
    params = sharding.ensure_params(config, params, mesh)
    return _logits(config, mesh, params, _rows(mesh, tokens.astype(np.int32)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(config, mesh, params, tokens):
    with sharding.activations(mesh):
        out = forward(config, params, tokens, default_positions(tokens)).logits
    return sharding.constrain(out, mesh, ("batch", "length", "act_vocab"))


# Prefill and one decode step --------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 1, 6), donate_argnums=3)
def _prefill_chunk(config: ModelConfig, mesh, params, cache, tokens, positions, cache_empty: bool = False):
    with sharding.activations(mesh):
        out = forward(config, params, tokens, positions, cache=cache, last_only=True, cache_empty=cache_empty)
    return _constrain_logits(mesh, out.logits[:, 0]), sharding.constrain_cache(mesh, out.cache)


def chunk_layout(length: int, cache_size: int, chunk_size: int | None = None) -> tuple[int, int, int]:
    """(chunk, number of chunks, left padding) for prefilling `length` tokens into a cache of `cache_size` slots.

    Chunks are at most the cache size (so a chunk never overwrites itself) and short prompts round up to a
    power of two, so that prompts of similar length share one compilation.
    """
    chunk = min(chunk_size or DEFAULT_PREFILL_CHUNK, cache_size, _round_up_pow2(length))
    n_chunks = math.ceil(length / chunk)
    return chunk, n_chunks, n_chunks * chunk - length  # padded on the left: the last column is the last token


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
    chunk, n_chunks, pad = chunk_layout(tokens.shape[1], kv_cache.cache_size(cache), chunk_size)
    tokens = xp.pad(tokens, ((0, 0), (pad, 0)))
    positions = xp.pad(positions, ((0, 0), (pad, 0)), constant_values=-1)
    if mesh is not None:
        params, cache = sharding.ensure_params(config, params, mesh), sharding.place_cache(mesh, cache)
    if cache_empty is None:
        cache_empty = mesh is None and not bool(jnp.any(cache["pos"] >= 0))
    logits = None
    for i in range(n_chunks):
        cols = slice(i * chunk, (i + 1) * chunk)
        chunk_tokens, chunk_positions = tokens[:, cols], positions[:, cols]
        if mesh is not None:
            chunk_tokens, chunk_positions = _rows(mesh, chunk_tokens), _rows(mesh, chunk_positions)
        logits, cache = _prefill_chunk(config, mesh, params, cache, chunk_tokens, chunk_positions,
                                       cache_empty and i == 0)
    return logits, cache


def decode_step(config: ModelConfig, params, cache, tokens, positions, *, mesh=None):
    """One token per row: tokens, positions int32 [B] -> (float32 logits [B, V], cache). Cache donated.

    Compiled once per config, mesh and shape.
    """
    if mesh is not None:
        params, cache = sharding.ensure_params(config, params, mesh), sharding.place_cache(mesh, cache)
        tokens = _rows(mesh, tokens if isinstance(tokens, jax.Array) else np.asarray(tokens, np.int32))
        positions = _rows(mesh, positions if isinstance(positions, jax.Array) else np.asarray(positions, np.int32))
    return _decode_step(config, mesh, params, cache, tokens, positions)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _decode_step(config: ModelConfig, mesh, params, cache, tokens, positions):
    with sharding.activations(mesh):
        out = forward(config, params, tokens[:, None], positions[:, None], cache=cache)
    return _constrain_logits(mesh, out.logits[:, 0]), sharding.constrain_cache(mesh, out.cache)


# The generation step, shared by generate's loop and generate_stream ----------------------------
def _first_state(mesh, sampling: Sampling, buffer: int, logits, cache, positions, seed_key, eos_ids) -> DecodeState:
    """The state after sampling the first new token from the prefill logits [B, V]."""
    token = sample(logits, jax.random.fold_in(as_key(seed_key), 0), sampling)
    tokens = jnp.zeros((logits.shape[0], buffer), jnp.int32).at[:, 0].set(token)
    state = DecodeState(jnp.int32(1), tokens, token, positions, jnp.isin(token, eos_ids), cache)
    return _constrain_state(mesh, state)


def _advance(config: ModelConfig, mesh, sampling: Sampling, params, state: DecodeState, seed_key, eos_ids):
    """One decode step: every row reads its latest token, writes it to the cache and samples the next."""
    with sharding.activations(mesh):
        out = forward(config, params, state.token[:, None], state.positions[:, None], cache=state.cache)
    token = sample(out.logits[:, 0], jax.random.fold_in(as_key(seed_key), state.step), sampling)
    state = DecodeState(state.step + 1, state.tokens.at[:, state.step].set(token), token, state.positions + 1,
                        state.done | jnp.isin(token, eos_ids), out.cache)
    return _constrain_state(mesh, state)


_start = jax.jit(_first_state, static_argnums=(0, 1, 2), donate_argnums=4)
_step = jax.jit(_advance, static_argnums=(0, 1, 2), donate_argnums=4)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=6)
def _generate(config: ModelConfig, mesh, sampling: Sampling, buffer: int, params, logits, cache, positions, seed_key,
              eos_ids, max_new_tokens) -> DecodeState:
    """The first token from the prefill logits, then `_advance` on device until every row made an eos or
    `max_new_tokens` (traced) tokens exist."""

    def more(state):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    state = _first_state(mesh, sampling, buffer, logits, cache, positions, seed_key, eos_ids)
    return jax.lax.while_loop(more, lambda s: _advance(config, mesh, sampling, params, s, seed_key, eos_ids), state)


# generate and generate_stream -------------------------------------------------------------------
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


def _eos_ids(eos_id) -> list[int]:
    return [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))


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


@dataclasses.dataclass(frozen=True)
class _Generation:
    """What generate and generate_stream share: the request's settings and its prefilled prompts."""

    config: ModelConfig
    mesh: object
    sampling: Sampling
    params: object
    seed_key: jax.Array
    eos_ids: jax.Array  # int32 [E] (a -1 when there is none)
    rows: int  # the caller's rows; any after them are MIN_DECODE_ROWS copies
    buffer: int  # the token buffer's length: max_new_tokens rounded up, so nearby lengths share programs
    logits: jax.Array  # float32 [B, V] after the last prompt token
    cache: dict  # the prompts' cache (donated by `first` or `run`: use one, once)
    positions: jax.Array  # int32 [B] the first new token's position (each prompt's length)
    prompts: tuple = ()  # the padded prompts: numpy (tokens [B, T], positions [B, T]), as prefilled

    def first(self) -> DecodeState:
        """The state holding the first new token (sampled from the prefill logits)."""
        return _start(self.mesh, self.sampling, self.buffer, self.logits, self.cache, self.positions, self.seed_key,
                      self.eos_ids)

    def step(self, state: DecodeState) -> DecodeState:
        return _step(self.config, self.mesh, self.sampling, self.params, state, self.seed_key, self.eos_ids)

    def run(self, max_new_tokens: int) -> DecodeState:
        """Every token, on device: `first`, then `step` in a while loop."""
        bound = _replicated(self.mesh, np.int32(max_new_tokens))
        return _generate(self.config, self.mesh, self.sampling, self.buffer, self.params, self.logits, self.cache,
                         self.positions, self.seed_key, self.eos_ids, bound)


def _begin(config: ModelConfig, params, prompts, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
           seed: int, eos_id, prefill_chunk: int | None, mesh, lookahead: int = 0) -> _Generation:
    """Check the request, place the parameters and prefill the prompts (lookahead: init_cache's)."""
    sampling = Sampling(temperature, top_k, top_p)
    if mesh is not None:
        params = sharding.ensure_params(config, params, mesh)
    prompts = prompts.tolist() if isinstance(prompts, np.ndarray) else list(prompts)
    rows = len(prompts)
    min_rows = MIN_DECODE_ROWS.get(jax.default_backend(), 1) if mesh is None else 1
    prompts = prompts + prompts[-1:] * max(0, min_rows - rows)
    tokens, positions, lengths = pad_prompts(prompts, config.vocab_size)
    _check_context(config, tokens.shape[1], max_new_tokens)
    needed = tokens.shape[1] + max_new_tokens + lookahead
    cache = init_cache(config, tokens.shape[0], cache_length(config, needed), mesh=mesh, lookahead=lookahead)
    logits, cache = prefill(config, params, cache, tokens, positions, prefill_chunk, mesh=mesh, cache_empty=True)
    seed_key, eos_ids = _seed_key(seed, mesh), _replicated(mesh, np.asarray(_eos_ids(eos_id) or [-1], np.int32))
    lengths = jnp.asarray(lengths) if mesh is None else _rows(mesh, lengths)
    return _Generation(config, mesh, sampling, params, seed_key, eos_ids, rows, _round_up_pow2(max_new_tokens),
                       logits, cache, lengths, (tokens, positions))


# Speculative decoding (speculative.py) -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Speculation:
    """A prefilled request (its cache sized for k tokens ahead) and what speculative.py's programs take besides."""

    gen: _Generation
    spec: speculative.Speculation
    draft_params: object
    draft_cache: dict | None  # the draft model's prefilled cache (donated, like gen.cache: use one, once)
    history: jax.Array  # int32 [B, H]: the prompts' tokens by position, -1 elsewhere
    buffer: int  # the token buffer: max_new_tokens + k + 1 rounded up

    def first(self) -> speculative.SpeculativeState:
        g = self.gen
        return speculative.start(g.sampling, self.buffer, g.logits, g.cache, g.positions, self.history,
                                 self.draft_cache, g.seed_key, g.eos_ids)

    def step(self, state: speculative.SpeculativeState, max_new_tokens: int) -> speculative.SpeculativeState:
        g = self.gen
        return speculative.step(self.spec, g.config, g.mesh, g.sampling, g.params, self.draft_params, state,
                                g.seed_key, g.eos_ids, _replicated(g.mesh, np.int32(max_new_tokens)))

    def run(self, max_new_tokens: int) -> speculative.SpeculativeState:
        g = self.gen
        return speculative.run(self.spec, g.config, g.mesh, g.sampling, self.buffer, g.params, g.logits, g.cache,
                               g.positions, self.draft_cache, self.draft_params, self.history, g.seed_key, g.eos_ids,
                               _replicated(g.mesh, np.int32(max_new_tokens)))


def _begin_speculative(begin_args: tuple, draft, draft_tokens: int) -> _Speculation:
    """`_begin` (begin_args: its arguments) with room for k tokens ahead, and the draft model's prefill."""
    config, _, _, max_new_tokens, *_, prefill_chunk, mesh = begin_args
    spec, draft_params = speculative.from_draft(config, draft, draft_tokens)
    k = spec.draft_tokens
    gen = _begin(*begin_args, lookahead=k)
    tokens, positions = gen.prompts
    draft_cache = None
    if spec.draft_config is not None:
        draft_config = spec.draft_config
        _check_context(draft_config, tokens.shape[1], max_new_tokens)
        if mesh is not None:
            draft_params = sharding.ensure_params(draft_config, draft_params, mesh)
        needed = tokens.shape[1] + max_new_tokens + k
        draft_cache = init_cache(draft_config, tokens.shape[0], cache_length(draft_config, needed), mesh=mesh,
                                 lookahead=k)
        _, draft_cache = prefill(draft_config, draft_params, draft_cache, tokens, positions, prefill_chunk,
                                 mesh=mesh, cache_empty=True)
    buffer = _round_up_pow2(max_new_tokens + k + 1)
    history = np.full((tokens.shape[0], -(-(tokens.shape[1] + buffer) // 256) * 256), -1, np.int32)
    rows, columns = np.nonzero(positions >= 0)
    history[rows, positions[rows, columns]] = tokens[rows, columns]
    history = jnp.asarray(history) if mesh is None else _rows(mesh, history)
    return _Speculation(gen, spec, draft_params, draft_cache, history, buffer)


def _stream_speculative(run: _Speculation, rows: int, max_new_tokens: int, eos_ids: list[int],
                        stats: dict | None) -> Iterator[np.ndarray]:
    """generate_stream's columns from speculative steps: column t once every row has made t + 1 tokens."""
    state, sent, finished = run.first(), 0, np.zeros(rows, bool)
    while True:
        if stats is not None:
            stats.update(drafted=int(np.asarray(state.drafted)[:rows].sum()),
                         accepted=int(np.asarray(state.accepted)[:rows].sum()))
        ready = min(int(np.asarray(state.counts)[:rows].min()), max_new_tokens)
        for column in np.asarray(state.tokens)[:rows, sent:ready].T:
            yield column
            finished |= np.isin(column, eos_ids)
            if finished.all():
                return
        sent = ready
        if sent >= max_new_tokens:
            return
        state = run.step(state, max_new_tokens)


def generate(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    mesh=None,
    draft=None,
    draft_tokens: int = 4,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), up to and including the first eos.

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. The token loop runs on device.
    mesh: run split over a `sharding.make_mesh` mesh (on every process of a multi-host run alike).
    draft: speculative decoding (speculative.py), drafting `draft_tokens` per step by "prompt-lookup" or with
    a (config, params) draft model sharing the tokenizer: the same greedy tokens, the same sampling distribution.
    """
    args = (config, params, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id, prefill_chunk, mesh)
    if draft is None:
        run = _begin(*args)
    else:
        run = _begin_speculative(args, draft, draft_tokens)
    tokens = np.asarray(run.run(max_new_tokens).tokens)[: len(prompts), :max_new_tokens]
    return [_trim_at_eos(row, set(_eos_ids(eos_id))) for row in tokens]


def generate_stream(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    mesh=None,
    draft=None,
    draft_tokens: int = 4,
    stats: dict | None = None,
) -> Iterator[np.ndarray]:
    """Like `generate`, yielding each step's tokens (int32 [B]) as soon as they exist.

    Stops when every row has produced an eos; rows already finished keep yielding tokens the caller
    should ignore. Same seed, same tokens as `generate`. With a draft, a step makes one to k + 1 tokens per
    row, yielded one [B] column at a time once every row has it; `stats` (a dict), if given, then holds the
    draft tokens verified ("drafted") and kept ("accepted") so far, over all rows.
    """
    args = (config, params, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id, prefill_chunk, mesh)
    if draft is not None:
        yield from _stream_speculative(_begin_speculative(args, draft, draft_tokens), len(prompts), max_new_tokens,
                                       _eos_ids(eos_id), stats)
        return
    run = _begin(*args)
    state = run.first()
    while True:
        yield np.asarray(state.token)[: run.rows]
        if int(state.step) >= max_new_tokens or np.asarray(state.done)[: run.rows].all():
            return
        state = run.step(state)
