"""Speculative decoding: draft k tokens, check them in one forward of the target, keep what it agrees with.

Drafts come from prompt lookup (what followed the latest earlier occurrence of the context's last n-gram,
found on device) or from a smaller draft model sharing the tokenizer. Greedy keeps a draft while it equals
the target's argmax, so the output is the target's greedy output token for token. Sampling follows Leviathan
et al. (2023): keep draft x with probability min(1, p(x) / q(x)), at the first rejection sample from
max(0, p - q) normalised, and take a bonus token from p when all k are kept (prompt lookup's q is a point
mass), so the tokens are distributed as plain sampling's.

Every function works on [B, ...] rows, each row keeping its own count, so a batched engine can call them per
slot. After a step the cache is as if only the kept tokens had been written: the verify forward writes all
k + 1, then `keep_accepted` empties the slots past each row's last kept position. With a sliding window W
the ring holds W + k slots (ModelConfig.cache_size's lookahead): a rejected token at position p + m
(1 <= m <= k) lands on the slot of p + m - (W + k) <= p - W, which no later query (at >= p + 1) sees, whereas
a W-slot ring would lose positions the next queries still need (tests/test_speculative.py shows both).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import kv_cache
from mistral_jax.model.transformer import forward
from mistral_jax.sampling import Sampling, as_key, filter_logits, filter_row, sample

PROMPT_LOOKUP = "prompt-lookup"
# Prompt lookup backs off where it does not pay, since a verify forward costs more than a decode step on a CPU
# (benchmarks/RESULTS.md) and open chat would otherwise run slower than plain: a row first drafts PROBE_TOKENS,
# and all k only after a draft that kept MIN_KEPT or more; a draft that kept fewer doubles the row's pause before
# it drafts again (1, 3, 7, .. MAX_PAUSE steps).
PROBE_TOKENS = 2
MIN_KEPT = 2
MAX_PAUSE = 63


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How to draft (static: part of the compiled programs' keys). draft_config None: prompt lookup."""

    draft_tokens: int = 4  # k, drafted and verified per step
    draft_config: ModelConfig | None = None
    max_ngram: int = 4  # prompt lookup matches the longest n-gram it finds, from max_ngram down to min_ngram
    min_ngram: int = 3  # shorter n-grams match by chance in open chat, where their drafts are mostly rejected

    def __post_init__(self):
        if self.draft_tokens < 1:
            raise UserError(f"draft_tokens must be at least 1, got {self.draft_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise UserError(f"need 1 <= min_ngram ({self.min_ngram}) <= max_ngram ({self.max_ngram})")


def from_draft(config: ModelConfig, draft, draft_tokens: int) -> tuple[Speculation, object]:
    """`generate`'s draft argument ("prompt-lookup" or (draft_config, draft_params)) -> (Speculation, params)."""
    if draft == PROMPT_LOOKUP:
        return Speculation(draft_tokens), None
    if isinstance(draft, tuple) and len(draft) == 2 and isinstance(draft[0], ModelConfig):
        draft_config, draft_params = draft
        if draft_config.vocab_size != config.vocab_size:
            raise UserError(f"the draft model's vocabulary ({draft_config.vocab_size}) differs from the model's "
                            f"({config.vocab_size}): a draft model must share the tokenizer")
        return Speculation(draft_tokens, draft_config), draft_params
    raise UserError(f"draft must be {PROMPT_LOOKUP!r} or a (ModelConfig, params) pair, got {type(draft).__name__}")


@flax.struct.dataclass
class SpeculativeState:
    """Where a speculative generation stands between two steps (a pytree: the while loop's carry)."""

    counts: jax.Array  # int32 [B]: tokens made per row; the next go to tokens[b, counts[b]:]
    tokens: jax.Array  # int32 [B, N]: the tokens made, N >= max_new_tokens + k + 1
    token: jax.Array  # int32 [B]: the latest token, not yet in the cache
    positions: jax.Array  # int32 [B]: the latest token's position
    done: jax.Array  # bool [B]: the row has made an eos token
    cache: dict  # the target's ring cache, holding everything before `token`
    history: jax.Array  # int32 [B, H]: the token at each position, -1 past `token` (prompt lookup reads it)
    draft_cache: dict | None  # the draft model's cache, like `cache` (None for prompt lookup)
    steps: jax.Array  # int32 []: target forwards after the first token
    drafted: jax.Array  # int32 [B]: draft tokens verified while the row was generating (a row without a
    # match of its own rides along with its zeros when another row drafts)
    accepted: jax.Array  # int32 [B]: ... and kept
    pause: jax.Array  # int32 [B]: prompt lookup steps left before the row drafts again (MIN_KEPT)
    backoff: jax.Array  # int32 [B]: the pause after the row's next unpaid draft; 0 once a draft paid (then all k)


# Drafting -----------------------------------------------------------------------------------------
def lookup_drafts(history, lengths, k: int, max_ngram: int, min_ngram: int):
    """Prompt lookup: the k tokens after the latest earlier occurrence of each row's last n-gram.

    history: int32 [B, H] tokens by position; lengths: int32 [B] known tokens per row. The longest n in
    [min_ngram, max_ngram] with a match wins. Where the continuation runs past the end it repeats with the
    match's period (a loop continues as a loop). -> (drafts int32 [B, k], found bool [B]).
    """
    b, h = history.shape
    starts = jnp.arange(h)[None]  # [1, H]
    padded = jnp.pad(history, ((0, 0), (0, max_ngram)), constant_values=-1)  # [B, H + max_ngram]
    first = jnp.full((b,), -1, jnp.int32)  # where the proposed tokens start
    for n in range(min_ngram, max_ngram + 1):  # a longer n-gram's match overrides a shorter one's
        ends = jnp.clip(lengths[:, None] - n + jnp.arange(n), 0, h - 1)
        suffix = jnp.take_along_axis(history, ends, axis=1)  # [B, n]
        match = (starts + n < lengths[:, None]) & (lengths[:, None] > n)  # the match is followed by a known token
        for i in range(n):
            match &= padded[:, i:i + h] == suffix[:, i:i + 1]
        latest = jnp.max(jnp.where(match, starts, -1), axis=1)  # [B]
        first = jnp.where(latest >= 0, latest + n, first)
    found = first >= 0
    period = jnp.maximum(lengths - first, 1)[:, None]  # the suffix repeats the match this many tokens later
    index = first[:, None] + jnp.arange(k)  # [B, k]
    past = index - (lengths[:, None] - 1)
    index = jnp.where(past > 0, index - period * ((past + period - 1) // period), index)
    drafts = jnp.take_along_axis(history, jnp.clip(index, 0, h - 1), axis=1)
    return jnp.where(found[:, None], jnp.maximum(drafts, 0), 0).astype(jnp.int32), found


def model_drafts(config: ModelConfig, mesh, sampling: Sampling, params, cache, token, positions, k: int, key):
    """k tokens from a draft model, one decode step each, and the distributions they were drawn from.

    token, positions: int32 [B]. Runs k + 1 steps, the last only writing the k-th draft to the cache (so it
    holds every kept token whatever the target keeps). -> (drafts int32 [B, k], q float32 [B, k, V] (None
    when greedy), cache).
    """

    def one(carry, i):
        cache, token = carry
        with sharding.activations(mesh):
            out = forward(config, params, token[:, None], (positions + i)[:, None], cache=cache)
        logits = out.logits[:, 0]  # [B, V]
        nxt = sample(logits, jax.random.fold_in(key, i), sampling)
        q = None if sampling.greedy else token_probs(logits, sampling)
        return (sharding.constrain_cache(mesh, out.cache), nxt), (nxt, q)

    (cache, _), (drafts, q) = jax.lax.scan(one, (cache, token), jnp.arange(k + 1))
    q = None if q is None else q[:k].transpose(1, 0, 2)
    return drafts[:k].T, q, cache


# Verifying and accepting --------------------------------------------------------------------------
def verify(config: ModelConfig, mesh, params, cache, token, positions, drafts):
    """The target's logits after the latest token and after each draft, in one forward writing them all.

    token, positions: int32 [B]; drafts: int32 [B, k] -> (float32 logits [B, k + 1, V], cache).
    """
    tokens = jnp.concatenate([token[:, None], drafts], axis=1)  # [B, k + 1]
    with sharding.activations(mesh):
        out = forward(config, params, tokens, positions[:, None] + jnp.arange(tokens.shape[1]), cache=cache)
    return out.logits, sharding.constrain_cache(mesh, out.cache)


def token_probs(logits, sampling: Sampling):
    """The distribution plain sampling draws from: float32 [..., V] logits -> probabilities."""
    return jax.nn.softmax(filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p), axis=-1)


def accept_greedy(logits, drafts):
    """Keep the drafts while they equal the target's argmax: logits [B, k + 1, V], drafts [B, k] ->
    (kept int32 [B], emitted int32 [B, k + 1]: a row's first kept + 1 are its new tokens)."""
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k + 1]
    kept = jnp.sum(jnp.cumprod(drafts == target[:, :-1], axis=1), axis=1).astype(jnp.int32)
    return kept, target


def accept_sampled(logits, drafts, q, key, sampling: Sampling):
    """Leviathan et al.'s rule. logits [B, k + 1, V]; drafts [B, k]; q: float32 [B, k, V], the draft's
    distributions (None: point masses at the drafts, as prompt lookup proposes) -> (kept [B], emitted [B, k + 1])."""
    return accept_probs(token_probs(logits, sampling), drafts, q, key)


def accept_probs(p, drafts, q, key):
    """`accept_sampled` given the target's distributions p: float32 [B, k + 1, V] (as `token_probs` makes them)."""
    b, k = drafts.shape
    q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype) if q is None else q
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    key_accept, key_token = jax.random.split(key)
    keep = jax.random.uniform(key_accept, (b, k)) * q_draft < p_draft  # u < p / q, i.e. probability min(1, p / q)
    kept = jnp.sum(jnp.cumprod(keep, axis=1), axis=1).astype(jnp.int32)
    rows = jnp.arange(b)
    q_next = jnp.pad(q, ((0, 0), (0, 1), (0, 0)))[rows, kept]  # [B, V]: zero after k kept (the bonus is from p)
    p_next = p[rows, kept]
    residual = jnp.maximum(p_next - q_next, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_next)  # empty only where p == q
    token = jax.random.categorical(key_token, jnp.log(residual), axis=-1).astype(jnp.int32)
    emitted = jnp.pad(drafts, ((0, 0), (0, 1))).at[rows, kept].set(token)
    return kept, emitted


def _accept_row(logits, drafts, q, key, step, temperature, top_k, top_p):
    """One row of `accept_rows`: logits [k + 1, V], drafts [k], q [k, V] or None, key uint32 [K] ->
    (kept [], emitted [k + 1])."""
    key = jax.random.fold_in(jax.random.wrap_key_data(key), step)
    p = jax.nn.softmax(_filter_rows(logits, temperature, top_k, top_p), axis=-1)
    kept, emitted = accept_probs(p[None], drafts[None], None if q is None else q[None], key)
    return kept[0], emitted[0]


def _filter_rows(logits, temperature, top_k, top_p):
    """`filter_row` of each of one row's positions: [N, V] -> [N, V]."""
    return jax.vmap(filter_row, in_axes=(0, None, None, None))(logits, temperature, top_k, top_p)


def accept_rows(logits, drafts, keys, steps, temperature, top_k, top_p, q=None):
    """Acceptance for rows with their own traced settings, as `sample_rows` is `sample`'s: greedy rows
    (temperature 0) as `accept_greedy`, the others by Leviathan's rule with their own key data (uint32 [B, K],
    folded with steps int32 [B]) and the draft's distributions q [B, k, V] (None: prompt lookup's point masses)
    -> (kept [B], emitted [B, k + 1])."""
    kept, emitted = accept_greedy(logits, drafts)
    hot = temperature > 0
    in_axes = (0, 0, None if q is None else 0, 0, 0, 0, 0, 0)
    kept_hot, emitted_hot = jax.lax.cond(
        jnp.any(hot),
        lambda: jax.vmap(_accept_row, in_axes)(logits, drafts, q, keys, steps, temperature, top_k, top_p),
        lambda: (kept, emitted),
    )
    return jnp.where(hot, kept_hot, kept), jnp.where(hot[:, None], emitted_hot, emitted)


def _draw_row(logits, key, step, i, temperature, top_k, top_p):
    """A draft model's token for one row with traced settings (argmax when greedy) and its distribution [V]."""
    x = filter_row(logits, temperature, top_k, top_p)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key), step), 1 + i)  # not the accept key
    token = jnp.where(temperature > 0, jax.random.categorical(key, x), jnp.argmax(logits)).astype(jnp.int32)
    return token, jax.nn.softmax(x)


def model_drafts_rows(config: ModelConfig, mesh, params, cache, token, positions, k: int, keys, steps, temperature,
                      top_k, top_p):
    """`model_drafts` for rows with their own traced settings and keys (as `accept_rows` takes them) ->
    (drafts int32 [B, k], q float32 [B, k, V], cache)."""

    def one(carry, i):
        cache, token = carry
        with sharding.activations(mesh):
            out = forward(config, params, token[:, None], (positions + i)[:, None], cache=cache)
        nxt, q = jax.vmap(_draw_row, (0, 0, 0, None, 0, 0, 0))(out.logits[:, 0], keys, steps, i, temperature, top_k,
                                                               top_p)
        return (sharding.constrain_cache(mesh, out.cache), nxt), (nxt, q)

    (cache, _), (drafts, q) = jax.lax.scan(one, (cache, token), jnp.arange(k + 1))
    return drafts[:k].T, q[:k].transpose(1, 0, 2), cache


def keep_accepted(cache: dict, last_positions) -> dict:
    """The cache with every slot past each row's last kept position (int32 [B]) emptied."""
    return kv_cache.drop_positions_after(cache, last_positions)


# One step and the loop ------------------------------------------------------------------------------
def first_state(sampling: Sampling, buffer: int, logits, cache, positions, history, draft_cache, seed_key,
                eos_ids) -> SpeculativeState:
    """The state after sampling the first new token from the prefill logits [B, V] (as decoding does).

    positions: int32 [B] the first token's position (each prompt's length); history: int32 [B, H] the prompts by
    position, -1 elsewhere.
    """
    b = logits.shape[0]
    token = sample(logits, jax.random.fold_in(as_key(seed_key), 0), sampling)
    tokens = jnp.zeros((b, buffer), jnp.int32).at[:, 0].set(token)
    history = history.at[jnp.arange(b), positions].set(token, mode="drop")
    zeros = jnp.zeros((b,), jnp.int32)
    return SpeculativeState(zeros + 1, tokens, token, positions, jnp.isin(token, eos_ids), cache, history,
                            draft_cache, jnp.int32(0), zeros, zeros, zeros, zeros + 1)


def _check(config, mesh, sampling, params, state: SpeculativeState, drafts, q, key):
    """Verify `drafts` [B, w] (w may be 0: a plain decode step) -> (kept [B], emitted [B, w + 1], cache)."""
    logits, cache = verify(config, mesh, params, state.cache, state.token, state.positions, drafts)
    if sampling.greedy:
        kept, emitted = accept_greedy(logits, drafts)
    else:
        kept, emitted = accept_sampled(logits, drafts, q, key, sampling)
    return kept, emitted, keep_accepted(cache, state.positions + kept)


def _record(state: SpeculativeState, kept, emitted, cache, draft_cache, drafted, eos_ids, limit) -> SpeculativeState:
    """Append each row's kept + 1 emitted tokens [B, w + 1]; every row advances (finished rows harmlessly)."""
    b, width = emitted.shape
    rows, column = jnp.arange(b)[:, None], jnp.arange(width)[None]
    new = column <= kept[:, None]  # [B, w + 1]
    at_count = jnp.where(new, state.counts[:, None] + column, state.tokens.shape[1])
    at_position = jnp.where(new, state.positions[:, None] + 1 + column, state.history.shape[1])
    active = ~state.done & (state.counts < limit)
    made = kept + 1
    return SpeculativeState(
        counts=state.counts + made,
        tokens=state.tokens.at[rows, at_count].set(emitted, mode="drop"),
        token=emitted[jnp.arange(b), kept],
        positions=state.positions + made,
        done=state.done | jnp.any(new & jnp.isin(emitted, eos_ids), axis=1),
        cache=cache,
        history=state.history.at[rows, at_position].set(emitted, mode="drop"),
        draft_cache=draft_cache,
        steps=state.steps + 1,
        drafted=state.drafted + jnp.where(active, drafted, 0),
        accepted=state.accepted + jnp.where(active, kept, 0),
        pause=state.pause,
        backoff=state.backoff,
    )


def speculative_step(spec: Speculation, config: ModelConfig, mesh, sampling: Sampling, params, draft_params,
                     state: SpeculativeState, seed_key, eos_ids, limit) -> SpeculativeState:
    """Draft, verify and keep, for every row at once. limit: int32 [] tokens wanted (rows past it are not counted
    in the acceptance statistics). Prompt lookup runs a plain decode step when no row found a match."""
    key = jax.random.fold_in(as_key(seed_key), state.steps + 1)
    key_draft, key_check = jax.random.split(key)
    k = spec.draft_tokens
    if spec.draft_config is not None:
        drafts, q, draft_cache = model_drafts(spec.draft_config, mesh, sampling, draft_params, state.draft_cache,
                                              state.token, state.positions, k, key_draft)
        kept, emitted, cache = _check(config, mesh, sampling, params, state, drafts, q, key_check)
        draft_cache = keep_accepted(draft_cache, state.positions + kept)
        return _record(state, kept, emitted, cache, draft_cache, k, eos_ids, limit)

    drafts, found = lookup_drafts(state.history, state.positions + 1, k, spec.max_ngram, spec.min_ngram)
    drafting = found & (state.pause == 0) & ~state.done & (state.counts < limit)

    def verify_width(width, state):
        kept, emitted, cache = _check(config, mesh, sampling, params, state, drafts[:, :width], None, key_check)
        pause, backoff = back_off(drafting, kept, width, state.pause, state.backoff)
        return _record(state.replace(pause=pause, backoff=backoff), kept, emitted, cache, None, width, eos_ids, limit)

    return by_lookup_width(k, drafting, state.backoff, verify_width, state)


def back_off(drafting, kept, width: int, pause, backoff):
    """Each row's (pause, backoff) [B] after a step that verified `width` drafts, of which the rows `drafting`
    (bool [B]) drafted their own: a draft that kept under MIN_KEPT doubles the pause, one that paid clears it."""
    unpaid = drafting & (kept < min(MIN_KEPT, width))
    backoff = jnp.where(drafting, jnp.where(unpaid, jnp.minimum(2 * backoff + 1, MAX_PAUSE), 0), backoff)
    return jnp.where(unpaid, backoff, jnp.maximum(pause - 1, 0)), backoff


def lookup_widths(k: int) -> tuple[int, ...]:
    """The widths prompt lookup verifies at: 0 (a plain decode step), PROBE_TOKENS where it is less than k, k."""
    return (0, k) if k <= PROBE_TOKENS else (0, PROBE_TOKENS, k)


def lookup_width_index(k: int, drafting, backoff):
    """Which of `lookup_widths(k)` this step verifies (int32 []): 0 where no row drafts, PROBE_TOKENS where no
    drafting row has paid yet (backoff > 0), else k."""
    if k <= PROBE_TOKENS:
        return jnp.any(drafting).astype(jnp.int32)
    return jnp.where(jnp.any(drafting & (backoff == 0)), 2, jnp.where(jnp.any(drafting), 1, 0)).astype(jnp.int32)


def by_lookup_width(k: int, drafting, backoff, verify_width, *operands):
    """verify_width(width, *operands) at the width `lookup_width_index` picks, as one switch on device."""
    branches = [functools.partial(verify_width, w) for w in lookup_widths(k)]
    return jax.lax.switch(lookup_width_index(k, drafting, backoff), branches, *operands)


def generate_loop(spec: Speculation, config: ModelConfig, mesh, sampling: Sampling, params, draft_params,
                  state: SpeculativeState, seed_key, eos_ids, limit) -> SpeculativeState:
    """`speculative_step` on device until every row made an eos or `limit` (traced) tokens."""

    def more(state):
        return jnp.any(~state.done & (state.counts < limit))

    step = functools.partial(speculative_step, spec, config, mesh, sampling, params, draft_params,
                             seed_key=seed_key, eos_ids=eos_ids, limit=limit)
    return jax.lax.while_loop(more, step, state)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(7, 9))
def run(spec: Speculation, config: ModelConfig, mesh, sampling: Sampling, buffer: int, params, logits, cache,
        positions, draft_cache, draft_params, history, seed_key, eos_ids, limit) -> SpeculativeState:
    """The whole generation on device: the first token from the prefill logits, then the loop."""
    state = first_state(sampling, buffer, logits, cache, positions, history, draft_cache, seed_key, eos_ids)
    return generate_loop(spec, config, mesh, sampling, params, draft_params, state, seed_key, eos_ids, limit)


start = jax.jit(first_state, static_argnums=(0, 1), donate_argnums=(3, 6))
step = jax.jit(speculative_step, static_argnums=(0, 1, 2, 3), donate_argnums=6)
