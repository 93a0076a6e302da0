"""Speculative decoding: draft k tokens, check them in one forward of the target, keep what it agrees with.

Drafts come from prompt lookup (what followed the latest earlier occurrence of the context's last n-gram,
found on device) or from a smaller draft model sharing the tokenizer. Greedy keeps a draft while it equals
the target's argmax, so the output is the target's greedy output token for token. Sampling follows Leviathan
et al. (2023): keep draft x with probability min(1, p(x) / q(x)), at the first rejection sample from
max(0, p - q) normalised, and take a bonus token from p when all k are kept (prompt lookup's q is a point
mass), so the tokens are distributed as plain sampling's.

This module drafts (`propose` for prompt lookup, `model_drafts` for a draft model) and chooses the verify width
(`choose_width`); step.py verifies and accepts (sampling.accept). Every function works on [B, ...] rows, each row
keeping its own count, so generate and the engine call the same ones. After a step the cache is as if only the kept
tokens had been written: the verify forward writes all k + 1, then `keep_accepted` empties the slots past each row's
last kept position. With a sliding window W the ring holds W + k slots (ModelConfig.cache_size's lookahead): a
rejected token at position p + m (1 <= m <= k) lands on the slot of p + m - (W + k) <= p - W, which no later query
(at >= p + 1) sees, whereas a W-slot ring would lose positions the next queries still need
(tests/test_speculative.py shows both).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import sampling as sampling_stage
from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import kv_cache
from mistral_jax.model.transformer import forward
from mistral_jax.sampling import SamplingMetadata, TokenCounts

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
class Lookup:
    """Prompt lookup's per-row state on device: what it matches in, and its back-off (MIN_KEPT)."""

    history: jax.Array  # int32 [B, H]: each row's tokens by position, -1 past its latest
    pause: jax.Array  # int32 [B]: steps left before the row drafts again
    backoff: jax.Array  # int32 [B]: its pause after its next unpaid draft; 0 once a draft paid (then all k)


def lookup_rows(prompts, length: int) -> Lookup:
    """A new row's lookup state per prompt (numpy): the prompt by position, -1 after; it may draft at once."""
    history = np.full((len(prompts), length), -1, np.int32)
    for row, prompt in enumerate(prompts):
        history[row, : len(prompt)] = prompt
    b = len(prompts)
    return Lookup(history, np.zeros(b, np.int32), np.ones(b, np.int32))


def record_tokens(lookup: Lookup | None, positions, tokens, new) -> Lookup | None:
    """The history with tokens int32 [B, J] written at positions[:, None] + j where new (bool [B, J])."""
    if lookup is None:
        return None
    b, h = lookup.history.shape
    at = jnp.where(new, positions[:, None] + jnp.arange(tokens.shape[1]), h)
    return lookup.replace(history=lookup.history.at[jnp.arange(b)[:, None], at].set(tokens, mode="drop"))


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


def model_drafts(config: ModelConfig, mesh, params, cache, token, positions, k: int, sampling: SamplingMetadata,
                 counts, penalties: TokenCounts | None):
    """k tokens per row from a draft model, one decode step each, drawn with each row's own settings and keys (key
    purpose DRAFT + i at the row's token index counts [B]), and the distributions they were drawn from.

    token, positions: int32 [B]. Runs k + 1 steps, the last only writing the k-th draft to the cache (so it holds
    every kept token whatever the target keeps). -> (drafts int32 [B, k], q float32 [B, k, V], cache).
    """
    live = jnp.ones(token.shape, bool)

    def one(carry, i):
        cache, token, penalties = carry
        with sharding.activations(mesh):
            out = forward(config, params, token[:, None], (positions + i)[:, None], cache=cache)
        x = sampling_stage.adjust(out.logits, sampling, penalties)[:, 0]
        nxt, q = sampling_stage.draw(x, sampling, counts, sampling_stage.DRAFT + i)
        penalties = sampling_stage.count(penalties, nxt[:, None], live[:, None])
        return (sharding.constrain_cache(mesh, out.cache), nxt, penalties), (nxt, q)

    (cache, _, _), (drafts, q) = jax.lax.scan(one, (cache, token, penalties), jnp.arange(k + 1))
    return drafts[:k].T, q[:k].transpose(1, 0, 2), cache


# Keeping ------------------------------------------------------------------------------------------------
def keep_accepted(cache: dict, last_positions) -> dict:
    """The cache with every slot past each row's last kept position (int32 [B]) emptied."""
    return kv_cache.drop_positions_after(cache, last_positions)


# Choosing the width -------------------------------------------------------------------------------------
@flax.struct.dataclass
class Proposal:
    """Prompt lookup's drafts for one step and the width to verify them at."""

    drafts: jax.Array  # int32 [B, k]
    drafting: jax.Array  # bool [B]: the row found a match and may draft (not paused, live)
    index: jax.Array  # int32 []: into lookup_widths(k), as choose_width picks it


def propose(spec: Speculation, lookup: Lookup, positions, live) -> Proposal:
    """Each row's drafts from its history (positions int32 [B]: the latest token's; live bool [B]: rows still
    generating) and the verify width this step takes."""
    drafts, found = lookup_drafts(lookup.history, positions + 1, spec.draft_tokens, spec.max_ngram, spec.min_ngram)
    drafting = found & (lookup.pause == 0) & live
    return Proposal(drafts, drafting, choose_width(spec.draft_tokens, drafting, lookup.backoff))


def back_off(drafting, kept, width: int, pause, backoff):
    """Each row's (pause, backoff) [B] after a step that verified `width` drafts, of which the rows `drafting`
    (bool [B]) drafted their own: a draft that kept under MIN_KEPT doubles the pause, one that paid clears it."""
    unpaid = drafting & (kept < min(MIN_KEPT, width))
    backoff = jnp.where(drafting, jnp.where(unpaid, jnp.minimum(2 * backoff + 1, MAX_PAUSE), 0), backoff)
    return jnp.where(unpaid, backoff, jnp.maximum(pause - 1, 0)), backoff


def lookup_widths(k: int) -> tuple[int, ...]:
    """The widths prompt lookup verifies at: 0 (a plain decode step), PROBE_TOKENS where it is less than k, k."""
    return (0, k) if k <= PROBE_TOKENS else (0, PROBE_TOKENS, k)


def choose_width(k: int, drafting, backoff):
    """The one choice of the verify width: an index into `lookup_widths(k)` (int32 []): 0 where no row drafts,
    PROBE_TOKENS where no drafting row has paid yet (backoff > 0), else k. generate switches on it on device; the
    engine reads it back and may narrow it (serving/gate.py), since a switch there would copy the cache."""
    if k <= PROBE_TOKENS:
        return jnp.any(drafting).astype(jnp.int32)
    return jnp.where(jnp.any(drafting & (backoff == 0)), 2, jnp.where(jnp.any(drafting), 1, 0)).astype(jnp.int32)
