"""Inference: logits, chunked prefill, one decode step over the rolling cache, generate and generate_stream.

Prompts of different lengths share a batch by left padding: padding columns get position -1, so they
are never written to the cache nor attended to, and every row keeps its own positions. A row's tokens
are therefore the same whether it is generated alone or in a batch.

`generate` and `generate_stream` run the same step (step.py: forward each row's token and any drafts, the
sampling stage, record) and the same first-token path: generate inside a `lax.while_loop` on device,
generate_stream as a jitted call per step from Python. The loop's bound is traced and its token buffer and
cache come in buckets, so a new `max_new_tokens` reuses the compiled programs; settings are per-row arrays
(sampling.SamplingMetadata), so new settings do too.

Whatever layout the caller's parameters are in, decoding runs the unscanned one (one subtree per layer, the
fast decode layout: benchmarks/RESULTS.md); scanned parameters are split once and the split copy kept for
the next call with the same arrays (`decode_params`).

Every entry point takes an optional `mesh` (see sharding.py): parameters are placed on it, the cache
is split on batch and KV heads, host inputs become global arrays (each process building its own
shards) and returned tokens are replicated, so the same calls run on one device, many, or many hosts.
The mesh is a static argument of every jitted function: one compilation per mesh and shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import lora, sharding, speculative, step
from mistral_jax import sampling as sampling_stage
from mistral_jax.config import ModelConfig
from mistral_jax.errors import ParamError, UserError
from mistral_jax.model import kv_cache, linear
from mistral_jax.model.layer_layout import unstack_layers
from mistral_jax.model.transformer import default_positions, forward
from mistral_jax.sampling import SamplingMetadata, SamplingParams

DEFAULT_PREFILL_CHUNK = 512
# Fewest rows generate decodes per backend: XLA:GPU runs a one-row matmul far slower than a two-row one
# (benchmarks/RESULTS.md, H200), so there a lone prompt decodes beside a copy of itself, whose tokens are dropped.
MIN_DECODE_ROWS = {"gpu": 2}


@flax.struct.dataclass
class DecodeState:
    """Where a batch's generation stands between two steps (a pytree: the while loop's carry)."""

    counts: jax.Array  # int32 [B]: tokens made per row; the next go to tokens[b, counts[b]:]
    tokens: jax.Array  # int32 [B, N]: the tokens made, N >= max_new_tokens (+ k + 1 speculating; a bucket)
    token: jax.Array  # int32 [B]: the latest token, the next step's input (not yet in the cache)
    positions: jax.Array  # int32 [B]: the latest token's position
    done: jax.Array  # bool [B]: the row has made an eos token
    carry: step.Carry  # the cache, the penalties' counts, prompt lookup's state, a draft model's cache
    steps: jax.Array  # int32 []: steps after the first token
    drafted: jax.Array  # int32 [B]: draft tokens verified while the row was generating (a row without a
    # match of its own rides along with its zeros when another row drafts)
    accepted: jax.Array  # int32 [B]: ... and kept

    @property
    def cache(self) -> dict:
        return self.carry.cache


# Placement under a mesh (identities when mesh is None) -------------------------------------------
def _constrain_state(mesh, state: DecodeState) -> DecodeState:
    """The state's small arrays replicated (every process reads the tokens), the cache split as placed."""
    if mesh is None:
        return state
    small = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "carry"}
    small = jax.lax.with_sharding_constraint(small, sharding.replicated(mesh))
    carry = state.carry.replace(cache=sharding.constrain_cache(mesh, state.carry.cache))
    return DecodeState(**small, carry=carry)


# The decode layout ------------------------------------------------------------------------------
_split_lock = threading.Lock()
_split: dict = {}  # the one kept split: {"refs": weakrefs to the scanned leaves, "config", "params"}


def decode_params(config: ModelConfig, params):
    """(config, params) in the unscanned layout that decoding runs (one subtree per layer: benchmarks/RESULTS.md).

    Scanned parameters are split once; the split copy is kept (one model's worth) for the next call with the
    same arrays, recognised by weak references, so it goes when the caller drops the scanned ones.
    """
    if not config.scan_layers:
        return config, params
    leaves = jax.tree.leaves(params)
    with _split_lock:
        refs = _split.get("refs")
        if (refs is not None and _split["config"] == config and len(refs) == len(leaves)
                and all(r() is leaf for r, leaf in zip(refs, leaves))):
            return _split["unscanned"], _split["params"]
        _split.clear()
        unscanned, split = unstack_layers(config, params)
        try:
            refs = [weakref.ref(leaf) for leaf in leaves]
        except TypeError:  # numpy leaves cannot be weakly referenced: split each time
            return unscanned, split
        _split.update(refs=refs, config=config, unscanned=unscanned, params=split)
        return unscanned, split


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
    return _logits(config, mesh, params, sharding.put_rows(mesh, tokens.astype(np.int32)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(config, mesh, params, tokens):
    with sharding.activations(mesh):
        out = forward(config, params, tokens, default_positions(tokens)).logits
    return sharding.constrain(out, mesh, ("batch", "length", "act_vocab"))


# Prefill and one decode step --------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 1, 6), donate_argnums=3)
def prefill_chunk(config: ModelConfig, mesh, params, cache, tokens, positions, cache_empty: bool = False):
    """One prefill chunk (tokens, positions int32 [B, C], placed) -> (float32 logits after its last column [B, V],
    cache). The cache is donated; compiled once per shape (twice: with cache_empty, the first chunk)."""
    logits, cache = step.forward_tokens(config, mesh, params, cache, tokens, positions, last_only=True,
                                        cache_empty=cache_empty)
    return logits[:, 0], cache


def chunk_layout(length: int, cache_size: int, chunk_size: int | None = None) -> tuple[int, int, int]:
    """(chunk, number of chunks, left padding) for prefilling `length` tokens into a cache of `cache_size` slots.

    Chunks are at most the cache size (so a chunk never overwrites itself) and short prompts round up to a
    power of two, so that prompts of similar length share one compilation.
    """
    chunk = min(chunk_size or DEFAULT_PREFILL_CHUNK, cache_size, round_up_pow2(length))
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
        chunk_tokens, chunk_positions = sharding.put_rows(mesh, (tokens[:, cols], positions[:, cols]))
        logits, cache = prefill_chunk(config, mesh, params, cache, chunk_tokens, chunk_positions,
                                      cache_empty and i == 0)
    return logits, cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def forward_step(config: ModelConfig, mesh, params, cache, tokens, positions):
    """`decode_step`'s program: tokens, positions int32 [B] (placed) -> (float32 logits [B, V], cache)."""
    logits, cache = step.forward_tokens(config, mesh, params, cache, tokens[:, None], positions[:, None])
    return logits[:, 0], cache


def decode_step(config: ModelConfig, params, cache, tokens, positions, *, mesh=None):
    """One token per row: tokens, positions int32 [B] -> (float32 logits [B, V], cache). Cache donated.

    Compiled once per config, mesh and shape.
    """
    if mesh is not None:
        params, cache = sharding.ensure_params(config, params, mesh), sharding.place_cache(mesh, cache)
        tokens, positions = sharding.put_rows(mesh, (np.asarray(tokens, np.int32) if not isinstance(tokens, jax.Array)
                                                     else tokens, np.asarray(positions, np.int32)
                                                     if not isinstance(positions, jax.Array) else positions))
    return forward_step(config, mesh, params, cache, tokens, positions)


# generate's programs: the first token, one step, the whole loop --------------------------------------
def _first_state(mesh, buffer: int, logits, carry: step.Carry, positions, sampling: SamplingMetadata,
                 eos_ids) -> DecodeState:
    """The state after the first new token of each row (step.first, from the prefill logits [B, V])."""
    token, penalties, lookup = step.first(logits, sampling, carry.penalties, carry.lookup, positions)
    b = token.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    tokens = jnp.zeros((b, buffer), jnp.int32).at[:, 0].set(token)
    state = DecodeState(zeros + 1, tokens, token, positions, jnp.isin(token, eos_ids),
                        carry.replace(penalties=penalties, lookup=lookup), jnp.int32(0), zeros, zeros)
    return _constrain_state(mesh, state)


def _record(state: DecodeState, stepped: step.Stepped, carry: step.Carry, live, eos_ids) -> DecodeState:
    """Append each row's kept + 1 emitted tokens [B, w + 1]; every row advances (finished rows harmlessly)."""
    b, width = stepped.emitted.shape
    rows, column = jnp.arange(b)[:, None], jnp.arange(width)[None]
    new = column <= stepped.kept[:, None]  # [B, w + 1]
    at = jnp.where(new, state.counts[:, None] + column, state.tokens.shape[1])
    made = stepped.kept + 1
    return DecodeState(
        counts=state.counts + made,
        tokens=state.tokens.at[rows, at].set(stepped.emitted, mode="drop"),
        token=stepped.emitted[jnp.arange(b), stepped.kept],
        positions=state.positions + made,
        done=state.done | jnp.any(new & jnp.isin(stepped.emitted, eos_ids), axis=1),
        carry=carry,
        steps=state.steps + 1,
        drafted=state.drafted + stepped.drafted,
        accepted=state.accepted + jnp.where(live, stepped.kept, 0),
    )


def _advance(spec, config: ModelConfig, mesh, params, draft_params, sampling: SamplingMetadata, state: DecodeState,
             eos_ids, limit) -> DecodeState:
    """One step.step for every row (the width chosen on device for prompt lookup), recorded."""
    live = ~state.done & (state.counts < limit)
    rows = step.Rows(state.token, state.positions, state.counts, live)

    def at_width(width, proposal=None):
        stepped, carry = step.step(spec, width, config, mesh, params, draft_params, rows, sampling, state.carry,
                                   proposal)
        return _constrain_state(mesh, _record(state, stepped, carry, live, eos_ids))

    widths = step.widths(spec)
    if len(widths) == 1:
        return at_width(widths[0])
    proposal = speculative.propose(spec, state.carry.lookup, state.positions, live)
    return jax.lax.switch(proposal.index, [functools.partial(at_width, w, proposal) for w in widths])


_start = jax.jit(_first_state, static_argnums=(0, 1), donate_argnums=3)
_step = jax.jit(_advance, static_argnums=(0, 1, 2), donate_argnums=6)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=6)
def _generate(spec, config: ModelConfig, mesh, buffer: int, params, draft_params, carry, logits, positions,
              sampling, eos_ids, limit) -> DecodeState:
    """The first token from the prefill logits, then `_advance` on device until every row made an eos or
    `limit` (traced) tokens exist."""

    def more(state):
        return jnp.any(~state.done & (state.counts < limit))

    state = _first_state(mesh, buffer, logits, carry, positions, sampling, eos_ids)
    advance = functools.partial(_advance, spec, config, mesh, params, draft_params, sampling, eos_ids=eos_ids,
                                limit=limit)
    return jax.lax.while_loop(more, advance, state)


# generate and generate_stream -------------------------------------------------------------------
def round_up_pow2(n: int, least: int = 16) -> int:
    """n rounded up to a power of two, at least `least`: the buckets shapes come in, so nearby sizes share programs."""
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


SHORTHANDS = ("temperature", "top_k", "top_p", "min_p", "seed", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "logit_bias")


def row_sampling(rows: int, sampling=None, **shorthands) -> list[SamplingParams]:
    """Each row's SamplingParams from generate's `sampling` (one for every row, or one per prompt) or its keyword
    shorthands (None: not given). One setting for every row gives row i the seed seed + i (mod 2**64), so equal
    prompts draw different samples and row i equals a lone prompt with that seed."""
    given = {name: value for name, value in shorthands.items() if value is not None}
    if sampling is not None and given:
        raise UserError(f"give sampling= or the keyword settings ({', '.join(sorted(given))}), not both")
    if sampling is None:
        sampling = SamplingParams(**given)
    if isinstance(sampling, SamplingParams):
        sampling = [sampling.for_row(i) for i in range(rows)]
    sampling = list(sampling)
    if len(sampling) != rows or not all(isinstance(s, SamplingParams) for s in sampling):
        raise UserError(f"sampling must be one SamplingParams or one per prompt ({rows}), got {len(sampling)} items")
    if any(s.response_format is not None for s in sampling):  # its grammar advances on the host after every token
        raise ParamError("response_format", "response_format: generate runs its steps on device without a "
                                            "tokenizer; constrained output runs in the serving Engine (mistral-jax "
                                            "serve, or mistral-jax generate --json-schema)")
    return sampling


@dataclasses.dataclass(frozen=True)
class _Generation:
    """A prefilled request and what generate's programs take besides: use `first`/`step` or `run`, once."""

    config: ModelConfig
    mesh: object
    spec: speculative.Speculation | None
    params: object
    draft_params: object
    sampling: SamplingMetadata  # [B], placed
    eos_ids: jax.Array  # int32 [E] (a -1 when there is none)
    rows: int  # the caller's rows; any after them are MIN_DECODE_ROWS copies
    buffer: int  # the token buffer's length: max_new_tokens (+ k + 1) rounded up, so nearby lengths share programs
    logits: jax.Array  # float32 [B, V] after the last prompt token
    carry: step.Carry  # the prompts' cache, counts and lookup state (donated by `first` or `run`)
    positions: jax.Array  # int32 [B] the first new token's position (each prompt's length)

    def first(self) -> DecodeState:
        """The state holding the first new token (sampled from the prefill logits)."""
        return _start(self.mesh, self.buffer, self.logits, self.carry, self.positions, self.sampling, self.eos_ids)

    def step(self, state: DecodeState, max_new_tokens: int) -> DecodeState:
        return _step(self.spec, self.config, self.mesh, self.params, self.draft_params, self.sampling, state,
                     self.eos_ids, sharding.put_replicated(self.mesh, np.int32(max_new_tokens)))

    def run(self, max_new_tokens: int) -> DecodeState:
        """Every token, on device: `first`, then `step` in a while loop."""
        return _generate(self.spec, self.config, self.mesh, self.buffer, self.params, self.draft_params, self.carry,
                         self.logits, self.positions, self.sampling, self.eos_ids,
                         sharding.put_replicated(self.mesh, np.int32(max_new_tokens)))


def _begin(config: ModelConfig, params, prompts, max_new_tokens: int, settings: list[SamplingParams], eos_id,
           prefill_chunk: int | None, mesh, draft, draft_tokens: int, adapter=None) -> _Generation:
    """Check the request, place the parameters, prefill the prompts (and a draft model's cache) and set up the
    rows' settings, penalty counts and prompt lookup state."""
    spec, draft_params = (None, None) if draft is None else speculative.from_draft(config, draft, draft_tokens)
    k = 0 if spec is None else spec.draft_tokens
    metadata = sampling_stage.metadata(settings, config.vocab_size)
    config, params = decode_params(config, params)
    if mesh is not None:
        params = sharding.ensure_params(config, params, mesh)
    prompts = prompts.tolist() if isinstance(prompts, np.ndarray) else list(prompts)
    rows = len(prompts)
    min_rows = MIN_DECODE_ROWS.get(jax.default_backend(), 1) if mesh is None else 1
    copies = max(0, min_rows - rows)
    prompts = prompts + prompts[-1:] * copies
    metadata = jax.tree.map(lambda x: np.concatenate([x, x[-1:].repeat(copies, 0)]), metadata)
    tokens, positions, lengths = pad_prompts(prompts, config.vocab_size)
    _check_context(config, tokens.shape[1], max_new_tokens)
    params = _with_adapter(config, params, adapter, mesh, tokens.shape[0])
    needed = tokens.shape[1] + max_new_tokens + k
    cache = init_cache(config, tokens.shape[0], cache_length(config, needed), mesh=mesh, lookahead=k)
    logits, cache = prefill(config, params, cache, tokens, positions, prefill_chunk, mesh=mesh, cache_empty=True)
    draft_cache = None
    if spec is not None and spec.draft_config is not None:
        draft_config, draft_params = decode_params(spec.draft_config, draft_params)
        spec = dataclasses.replace(spec, draft_config=draft_config)
        _check_context(draft_config, tokens.shape[1], max_new_tokens)
        if mesh is not None:
            draft_params = sharding.ensure_params(draft_config, draft_params, mesh)
        draft_cache = init_cache(draft_config, tokens.shape[0], cache_length(draft_config, needed), mesh=mesh,
                                 lookahead=k)
        _, draft_cache = prefill(draft_config, draft_params, draft_cache, tokens, positions, prefill_chunk,
                                 mesh=mesh, cache_empty=True)
    buffer = round_up_pow2(max_new_tokens + (k + 1 if k else 0))
    penalties = (sampling_stage.prompt_counts(prompts, config.vocab_size)
                 if any(s.penalized for s in settings) else None)
    lookup = None
    if spec is not None and spec.draft_config is None:
        lookup = speculative.lookup_rows(prompts, -(-(tokens.shape[1] + buffer) // 256) * 256)
    carry = step.Carry(cache, sharding.put_rows(mesh, penalties), sharding.put_rows(mesh, lookup), draft_cache)
    eos_ids = sharding.put_replicated(mesh, np.asarray(_eos_ids(eos_id) or [-1], np.int32))
    return _Generation(config, mesh, spec, params, draft_params, sharding.put_rows(mesh, metadata), eos_ids, rows,
                       buffer, logits, carry, sharding.put_rows(mesh, lengths))


def _with_adapter(config: ModelConfig, params, adapter, mesh, rows: int):
    """params carrying `adapter` as a per-row LoRA table (model/linear.py: slot 1, chosen by all `rows` rows),
    the weights untouched (None: params as given)."""
    if adapter is None:
        return params
    from mistral_jax.checkpoints.load import load_adapter  # read (a path), check it fits

    adapter = load_adapter(adapter, config, mesh=mesh)
    weights, scale = lora.stack_slots(config, [adapter])
    if not config.scan_layers:  # the decode layout: each block reads its own arrays
        weights = linear.unstack(weights)
    slots = linear.LoraSlots(weights, scale, np.ones((rows,), np.int32))
    return linear.with_lora(params, sharding.put_replicated(mesh, slots) if mesh is not None else jax.device_put(slots))


def run(config: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling=None,
        eos_id: int | Sequence[int] | None = None, prefill_chunk: int | None = None, mesh=None, draft=None,
        draft_tokens: int = 4, adapter=None, **shorthands) -> DecodeState:
    """`generate`'s final DecodeState (its tokens, per-row counts, and the drafts verified and kept)."""
    settings = row_sampling(len(prompts), sampling, **shorthands)
    gen = _begin(config, params, prompts, max_new_tokens, settings, eos_id, prefill_chunk, mesh, draft, draft_tokens,
                 adapter)
    return gen.run(max_new_tokens)


def generate(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    logit_bias: dict | None = None,
    eos_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    mesh=None,
    draft=None,
    draft_tokens: int = 4,
    adapter=None,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), up to and including the first eos.

    sampling: one `SamplingParams` for every row (row i seeded seed + i) or one per prompt; or the keyword
    shorthands (temperature 0 is greedy, the default). Its sampling fields apply; the length is max_new_tokens
    and the stop ids eos_id (max_tokens, stop and logprobs are the server's). The token loop runs on device.
    mesh: run split over a `sharding.make_mesh` mesh (on every process of a multi-host run alike).
    draft: speculative decoding (speculative.py), drafting `draft_tokens` per step by "prompt-lookup" or with
    a (config, params) draft model sharing the tokenizer: the same greedy tokens, the same sampling distribution.
    adapter: a LoRA (PEFT or sft LoRA run directory, or mj.load_adapter's result) added to every row's adapted
    matmuls unmerged (model/linear.py, the per-row path the server runs; no copy of the weights); the tokens equal
    generate's on params merged with mj.load(adapter=...).
    """
    state = run(config, params, prompts, max_new_tokens, sampling=sampling, temperature=temperature, top_k=top_k,
                top_p=top_p, min_p=min_p, seed=seed, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty, logit_bias=logit_bias,
                eos_id=eos_id, prefill_chunk=prefill_chunk, mesh=mesh, draft=draft, draft_tokens=draft_tokens,
                adapter=adapter)
    tokens = np.asarray(state.tokens)[: len(prompts), :max_new_tokens]
    return [_trim_at_eos(row, set(_eos_ids(eos_id))) for row in tokens]


def generate_stream(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    logit_bias: dict | None = None,
    eos_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    mesh=None,
    draft=None,
    draft_tokens: int = 4,
    adapter=None,
    stats: dict | None = None,
) -> Iterator[np.ndarray]:
    """Like `generate`, yielding each step's tokens (int32 [B]) as soon as they exist.

    Stops when every row has produced an eos; rows already finished keep yielding tokens the caller
    should ignore. Same settings, same tokens as `generate`. With a draft, a step makes one to k + 1 tokens per
    row, yielded one [B] column at a time once every row has it; `stats` (a dict), if given, then holds the
    draft tokens verified ("drafted") and kept ("accepted") so far, over all rows. adapter: as generate's.
    """
    settings = row_sampling(len(prompts), sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            seed=seed, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            repetition_penalty=repetition_penalty, logit_bias=logit_bias)
    gen = _begin(config, params, prompts, max_new_tokens, settings, eos_id, prefill_chunk, mesh, draft, draft_tokens,
                 adapter)
    rows, eos_ids = len(prompts), _eos_ids(eos_id)
    state, sent, finished = gen.first(), 0, np.zeros(rows, bool)
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
        state = gen.step(state, max_new_tokens)
