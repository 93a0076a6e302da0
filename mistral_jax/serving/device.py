"""The engine's device side: one `Plan` per iteration in, its sampled tokens out (every process alike).

A plan is plain numpy and Python, so on several hosts process 0 broadcasts it and every process runs the
same programs on its shards (serving/lockstep.py). The programs: one decode step for all slots (per slot
count and cache length), one prefill chunk per power-of-two bucket, one first-token-and-insert, and a
prompt scorer per bucket for echoed logprobs; `warm_up` compiles all but the last. Speculating (prompt lookup),
the decode step is a lookup program, which picks the width, and one verify step per width (0, probe, k).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import decoding, sharding, speculative
from mistral_jax.config import ModelConfig
from mistral_jax.model import kv_cache
from mistral_jax.model.transformer import default_positions, forward
from mistral_jax.sampling import sample_rows
from mistral_jax.serving.requests import TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One request's sampling settings as the device reads them."""

    key: np.ndarray  # uint32 [K]: jax.random.key_data(jax.random.key(seed))
    temperature: float
    top_k: int
    top_p: float


@flax.struct.dataclass
class DecodeInputs:
    """One decode step's inputs for every slot; free slots decode token 0 at position 0, their output unread."""

    tokens: np.ndarray  # int32 [B]: each slot's latest token
    positions: np.ndarray  # int32 [B]: its position
    steps: np.ndarray  # int32 [B]: tokens the slot's request made so far (folded into its key)
    keys: np.ndarray  # uint32 [B, K]
    temperature: np.ndarray  # float32 [B]
    top_k: np.ndarray  # int32 [B]
    top_p: np.ndarray  # float32 [B]


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """One chunk of one request's prompt, written into that request's own one-row cache."""

    request_id: int
    tokens: np.ndarray  # int32 [1, C]
    positions: np.ndarray  # int32 [1, C] (-1 = padding)
    first: bool  # the prompt's first chunk: start from an empty cache
    slot: int = -1  # the last chunk: sample the first token and copy the row into this slot
    sampling: RowSampling | None = None  # with slot
    echo: np.ndarray | None = None  # int32 [1, T]: the prompt, right padded, when its logprobs are asked
    history: np.ndarray | None = None  # int32 [H]: with slot, when speculating: the prompt by position, -1 after


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every process does in one iteration: the decode step, then the prefill chunks, in this order."""

    decode: DecodeInputs | None = None
    prefills: tuple[PrefillChunk, ...] = ()
    dropped: tuple[int, ...] = ()  # requests cancelled mid-prefill: their one-row caches go
    stop: bool = False
    max_width: int | None = None  # prompt lookup: the widest verify this step may take (serving/gate.py)


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Tokens chosen for rows, with logprobs: numpy, readable on every process."""

    tokens: np.ndarray  # int32 [R]
    logprobs: np.ndarray  # float32 [R]
    top_ids: np.ndarray  # int32 [R, TOP_LOGPROBS]
    top_logprobs: np.ndarray  # float32 [R, TOP_LOGPROBS]


@flax.struct.dataclass
class LookupState:
    """Prompt lookup's per-slot state on device (speculative.py): what it matches in, and its back-off."""

    history: jax.Array  # int32 [B, H]: each slot's tokens by position, -1 past its latest
    pause: jax.Array  # int32 [B]: steps left before the slot drafts again
    backoff: jax.Array  # int32 [B]: its pause after its next unpaid draft; 0 once a draft paid


@dataclasses.dataclass
class Results:
    decode: Sampled | None = None  # one row per slot; speculating, [B, k + 1] tokens per slot, kept + 1 of them new
    kept: np.ndarray | None = None  # int32 [B]: speculating, the drafts each slot kept
    width: int = 0  # prompt lookup: the drafts verified per slot this step
    drafting: int = 0  # prompt lookup: the slots that had drafts this step
    first: dict = dataclasses.field(default_factory=dict)  # request id -> Sampled (one row)
    echo: dict = dataclasses.field(default_factory=dict)  # request id -> Sampled of the prompt (logprobs of 1..T-1)


def _chosen(logits, tokens):
    """logits float32 [R, V], tokens int32 [R] -> (tokens, their logprobs [R], top ids [R, N], top logprobs [R, N])."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids.astype(jnp.int32), top_logprobs


def _replicate(mesh, tree):
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _decode(config: ModelConfig, mesh, params, cache, inputs: DecodeInputs):
    with sharding.activations(mesh):
        out = forward(config, params, inputs.tokens[:, None], inputs.positions[:, None], cache=cache)
    logits = out.logits[:, 0]  # [B, V]
    tokens = sample_rows(logits, inputs.keys, inputs.steps, inputs.temperature, inputs.top_k, inputs.top_p)
    return _replicate(mesh, _chosen(logits, tokens)), sharding.constrain_cache(mesh, out.cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _lookup(spec: speculative.Speculation, mesh, lookup: LookupState, positions):
    """Every slot's prompt lookup drafts [B, k], whether it drafts [B], and the width index to verify at ([]:
    replicated, every process reads it)."""
    drafts, found = speculative.lookup_drafts(lookup.history, positions + 1, spec.draft_tokens, spec.max_ngram,
                                              spec.min_ngram)
    drafting = found & (lookup.pause == 0) & (positions > 0)  # a free slot decodes at position 0
    index = speculative.lookup_width_index(spec.draft_tokens, drafting, lookup.backoff)
    return drafts, drafting, _replicate(mesh, (index, jnp.sum(drafting)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
def _speculate(spec: speculative.Speculation, width: int, config: ModelConfig, mesh, params, cache,
               lookup: LookupState, inputs: DecodeInputs, drafts, drafting):
    """`_decode` verifying `width` of each slot's drafts [B, k] in one forward, each slot keeping what its own
    sampling settings accept. The host picks the width (`_lookup`): a switch on device would copy the cache.
    -> ((kept [B], Sampled arrays [B, k + 1, ...]), cache, lookup)."""
    k = spec.draft_tokens
    b = inputs.tokens.shape[0]
    drafts = drafts[:, :width]
    logits, cache = speculative.verify(config, mesh, params, cache, inputs.tokens, inputs.positions, drafts)
    kept, emitted = speculative.accept_rows(logits, drafts, inputs.keys, inputs.steps, inputs.temperature,
                                            inputs.top_k, inputs.top_p)  # [B], [B, w + 1]
    chosen = _chosen(logits.reshape(b * (width + 1), -1), emitted.reshape(-1))
    chosen = [jnp.pad(x.reshape(b, width + 1, *x.shape[1:]), [(0, 0), (0, k - width)] + [(0, 0)] * (x.ndim - 1))
              for x in chosen]  # [B, k + 1, ...]
    pause, backoff = speculative.back_off(drafting, kept, width, lookup.pause, lookup.backoff)
    cache = speculative.keep_accepted(cache, inputs.positions + kept)
    column = jnp.arange(k + 1)[None]
    at = jnp.where(column <= kept[:, None], inputs.positions[:, None] + 1 + column, lookup.history.shape[1])
    history = lookup.history.at[jnp.arange(b)[:, None], at].set(chosen[0], mode="drop")
    lookup = LookupState(history, pause, backoff)
    return _replicate(mesh, (kept, chosen)), sharding.constrain_cache(mesh, cache), lookup


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5, 7))
def _speculate_with_model(spec: speculative.Speculation, config: ModelConfig, mesh, params, draft_params, cache,
                          inputs: DecodeInputs, draft_cache):
    """`_decode` with k drafts per slot from the draft model (its own cache rows), verified in one forward, each slot
    keeping what its own settings accept (Leviathan's rule with the draft's q). -> ((kept, Sampled arrays [B, k + 1,
    ...]), cache, draft_cache)."""
    k, b = spec.draft_tokens, inputs.tokens.shape[0]
    drafts, q, draft_cache = speculative.model_drafts_rows(spec.draft_config, mesh, draft_params, draft_cache,
                                                           inputs.tokens, inputs.positions, k, inputs.keys,
                                                           inputs.steps, inputs.temperature, inputs.top_k,
                                                           inputs.top_p)
    logits, cache = speculative.verify(config, mesh, params, cache, inputs.tokens, inputs.positions, drafts)
    kept, emitted = speculative.accept_rows(logits, drafts, inputs.keys, inputs.steps, inputs.temperature,
                                            inputs.top_k, inputs.top_p, q)
    chosen = _chosen(logits.reshape(b * (k + 1), -1), emitted.reshape(-1))
    chosen = [x.reshape(b, k + 1, *x.shape[1:]) for x in chosen]  # [B, k + 1, ...]
    last = inputs.positions + kept
    cache, draft_cache = (sharding.constrain_cache(mesh, speculative.keep_accepted(c, last))
                          for c in (cache, draft_cache))
    return _replicate(mesh, (kept, chosen)), cache, draft_cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _insert_rows(mesh, cache, row_cache, slot):
    """A prefilled one-row cache copied into `slot` (the draft model's, beside `_insert_first`)."""
    return sharding.constrain_cache(mesh, kv_cache.insert_rows(cache, row_cache, slot))


@functools.partial(jax.jit, donate_argnums=0)
def _insert_history(lookup: LookupState, slot, row, token):
    """A new request's slot: its history row int32 [H] (the prompt, then -1) with its first token int32 [] after."""
    row = row.at[jnp.sum(row >= 0)].set(token)
    return LookupState(jax.lax.dynamic_update_slice(lookup.history, row[None], (slot, 0)),
                       lookup.pause.at[slot].set(0), lookup.backoff.at[slot].set(1))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=1)
def _insert_first(mesh, cache, row_cache, slot, logits, key, temperature, top_k, top_p):
    """The request's first token from its prefill logits [1, V], and its one-row cache copied into `slot`."""
    token = sample_rows(logits, key[None], jnp.zeros(1, jnp.int32), temperature[None], top_k[None], top_p[None])
    cache = kv_cache.insert_rows(cache, row_cache, slot)
    return _replicate(mesh, _chosen(logits, token)), sharding.constrain_cache(mesh, cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_prompt(config: ModelConfig, mesh, params, tokens):
    """Logprobs of tokens[:, 1:] given what precedes each, from one causal pass: tokens int32 [1, T]."""
    with sharding.activations(mesh):
        logits = forward(config, params, tokens, default_positions(tokens)).logits[0, :-1]  # [T-1, V]
    return _replicate(mesh, _chosen(logits, tokens[0, 1:]))


def _sampled(arrays) -> Sampled:
    return Sampled(*(np.asarray(a) for a in arrays))


class Device:
    """The slots' cache and the one-row caches of prompts being prefilled; runs plans."""

    def __init__(self, config: ModelConfig, params, *, max_batch: int, max_seq_len: int, mesh=None,
                 speculation: speculative.Speculation | None = None, draft_params=None) -> None:
        self.config, self.mesh, self.max_seq_len, self.speculation = config, mesh, max_seq_len, speculation
        self.lookahead = 0 if speculation is None else speculation.draft_tokens  # ring slots for rejected drafts
        self.params = params if mesh is None else sharding.ensure_params(config, params, mesh)
        self.draft_config = None if speculation is None else speculation.draft_config
        if self.draft_config is not None and mesh is not None:
            draft_params = sharding.ensure_params(self.draft_config, draft_params, mesh)
        self.draft_params = draft_params
        self.max_batch = max_batch
        self.reset()
        self.cache_size = kv_cache.cache_size(self.cache)  # a prefill chunk fits both models' rings
        if self.draft_cache is not None:
            self.cache_size = min(self.cache_size, kv_cache.cache_size(self.draft_cache))

    def reset(self) -> None:
        """Empty caches (after a failed iteration, whose donated cache may be gone)."""
        self.cache = self._empty_cache(self.max_batch)
        self._rows: dict[int, dict] = {}
        self.lookup = self.draft_cache = None
        if self.draft_config is not None:
            self.draft_cache = self._empty_cache(self.max_batch, self.draft_config)
            self._draft_rows: dict[int, dict] = {}
        elif self.speculation is not None:
            b = self.max_batch
            self.lookup = LookupState(self._put(np.full((b, self.history_length), -1, np.int32)),
                                      self._put(np.zeros(b, np.int32)), self._put(np.ones(b, np.int32)))

    @property
    def history_length(self) -> int:
        """Positions a slot's history holds: the context, and the drafts written past it and maybe taken back."""
        return self.max_seq_len + self.lookahead

    def _empty_cache(self, rows: int, config: ModelConfig | None = None) -> dict:
        # Speculating, a slot writes up to k positions past its last token (past max_seq_len near the end).
        return decoding.init_cache(config or self.config, rows, self.max_seq_len + self.lookahead, mesh=self.mesh,
                                   lookahead=self.lookahead)

    def _put(self, x):
        """A host array as a device array, split over the batch axes under a mesh."""
        return jax.numpy.asarray(x) if self.mesh is None else decoding._rows(self.mesh, np.asarray(x))

    def run(self, plan: Plan) -> Results:
        results = Results()
        if plan.decode is not None:
            inputs = DecodeInputs(*(self._put(getattr(plan.decode, f.name))
                                    for f in dataclasses.fields(DecodeInputs)))
            if self.speculation is None:
                out, self.cache = _decode(self.config, self.mesh, self.params, self.cache, inputs)
                results.decode = _sampled(out)
            elif self.draft_config is not None:
                (kept, out), self.cache, self.draft_cache = _speculate_with_model(
                    self.speculation, self.config, self.mesh, self.params, self.draft_params, self.cache, inputs,
                    self.draft_cache)
                results.decode, results.kept = _sampled(out), np.asarray(kept)
            else:
                drafts, drafting, (index, count) = _lookup(self.speculation, self.mesh, self.lookup,
                                                           inputs.positions)
                widths = speculative.lookup_widths(self.speculation.draft_tokens)
                width = widths[int(index)]
                if plan.max_width is not None:  # the engine's gate: the widest allowed width under the lookup's
                    width = max(w for w in widths if w <= min(width, plan.max_width))
                kept, out = self._speculate(width, inputs, drafts, drafting)
                results.decode, results.kept = _sampled(out), np.asarray(kept)
                results.width, results.drafting = width, int(count)
        for chunk in plan.prefills:
            self._prefill(chunk, results)
        for request_id in plan.dropped:
            self._rows.pop(request_id, None)
            if self.draft_cache is not None:
                self._draft_rows.pop(request_id, None)
        return results

    def _speculate(self, width: int, inputs: DecodeInputs, drafts, drafting):
        (kept, out), self.cache, self.lookup = _speculate(self.speculation, width, self.config, self.mesh,
                                                          self.params, self.cache, self.lookup, inputs, drafts,
                                                          drafting)
        return kept, out

    def warm_up_speculation(self, inputs: DecodeInputs, repeats: int = 3) -> dict[int, float] | None:
        """Compile the speculative step at every width (free slots only: what they write is never read), then
        time each: {width: seconds, best of `repeats` after the compiling call} for the gate (None with a draft
        model: one program, compiled by the engine's warm-up plan)."""
        if self.draft_config is not None:
            return None
        inputs = DecodeInputs(*(self._put(getattr(inputs, f.name)) for f in dataclasses.fields(DecodeInputs)))
        drafts, drafting, _ = _lookup(self.speculation, self.mesh, self.lookup, inputs.positions)
        widths = speculative.lookup_widths(self.speculation.draft_tokens)
        costs = dict.fromkeys(widths, float("inf"))
        for _ in range(1 + repeats):  # the first round compiles
            for width in widths:
                start = time.perf_counter()
                jax.block_until_ready(self._speculate(width, inputs, drafts, drafting))
                costs[width] = min(costs[width], time.perf_counter() - start)
        return costs

    def _prefill(self, chunk: PrefillChunk, results: Results) -> None:
        if chunk.echo is not None:
            results.echo[chunk.request_id] = _sampled(
                _score_prompt(self.config, self.mesh, self.params, self._put(chunk.echo)))
        if chunk.first:
            row = self._empty_cache(1)
        else:
            row = self._rows.pop(chunk.request_id)
        tokens, positions = self._put(chunk.tokens), self._put(chunk.positions)
        logits, row = decoding._prefill_chunk(self.config, self.mesh, self.params, row, tokens, positions, chunk.first)
        if self.draft_cache is not None:  # the draft model's own row, prefilled alike
            draft_row = (self._empty_cache(1, self.draft_config) if chunk.first
                         else self._draft_rows.pop(chunk.request_id))
            _, draft_row = decoding._prefill_chunk(self.draft_config, self.mesh, self.draft_params, draft_row, tokens,
                                                   positions, chunk.first)
            if chunk.slot < 0:
                self._draft_rows[chunk.request_id] = draft_row
            else:
                self.draft_cache = _insert_rows(self.mesh, self.draft_cache, draft_row,
                                                decoding._replicated(self.mesh, np.int32(chunk.slot)))
        if chunk.slot < 0:
            self._rows[chunk.request_id] = row
            return
        s = chunk.sampling
        put = functools.partial(decoding._replicated, self.mesh)
        out, self.cache = _insert_first(self.mesh, self.cache, row, put(np.int32(chunk.slot)), logits, put(s.key),
                                        put(np.float32(s.temperature)), put(np.int32(s.top_k)),
                                        put(np.float32(s.top_p)))
        if self.lookup is not None:
            self.lookup = _insert_history(self.lookup, put(np.int32(chunk.slot)), put(chunk.history), out[0][0])
        results.first[chunk.request_id] = _sampled(out)
