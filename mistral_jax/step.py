"""The one generation step: forward each row's latest token and its drafts over the cache, sample, record.

`step` runs in generate's `lax.while_loop`, in generate_stream (one jitted call per step) and as the engine's
per-iteration program (serving/runner.py). Width 0 is a plain decode step; width w > 0 verifies w drafts per row,
from prompt lookup (`speculative.propose`, which also chooses the width) or a draft model. The sampling stage
(sampling.py) picks the tokens; the step keeps the cache, the penalties' token counts and prompt lookup's history
as if only the kept tokens had been written. `first` is the one first-token path (from the prefill logits).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax import sampling as sampling_stage
from mistral_jax import sharding, speculative
from mistral_jax.config import ModelConfig
from mistral_jax.model.transformer import forward
from mistral_jax.sampling import SamplingMetadata, TokenCounts
from mistral_jax.speculative import Lookup, Proposal, Speculation


@flax.struct.dataclass
class Rows:
    """What a step reads per row."""

    token: jax.Array  # int32 [B]: the latest token, not yet in the cache
    positions: jax.Array  # int32 [B]: its position
    counts: jax.Array  # int32 [B]: tokens the row made so far, the index of its next one (its draws' keys)
    live: jax.Array  # bool [B]: the row is generating (others, finished or free slots, ride along unread)


@flax.struct.dataclass
class Carry:
    """The device state a step reads and writes (donated): None where unused."""

    cache: dict  # the target's cache (model/kv_cache.py), holding everything before each row's token
    penalties: TokenCounts | None  # None where no row is penalized (sampling.py)
    lookup: Lookup | None  # prompt lookup's history and back-off
    draft_cache: dict | None  # a draft model's cache, like `cache`


@flax.struct.dataclass
class Stepped:
    """What a step made."""

    kept: jax.Array  # int32 [B]: drafts kept; a row's new tokens are emitted[:, :kept + 1]
    emitted: jax.Array  # int32 [B, w + 1]
    logits: jax.Array  # float32 [B, w + 1, V]: the model's logits at each verified position (for logprobs)
    drafted: jax.Array  # int32 [B]: drafts verified per live row


def forward_tokens(config: ModelConfig, mesh, params, cache, tokens, positions, *, last_only: bool = False,
                   cache_empty: bool = False):
    """The model over the cache: tokens, positions int32 [B, T] -> (float32 logits [B, T, V] (T = 1 with
    last_only), cache). Prefill chunks, decode steps and verify steps all run this."""
    with sharding.activations(mesh):
        out = forward(config, params, tokens, positions, cache=cache, last_only=last_only, cache_empty=cache_empty)
    logits = sharding.constrain(out.logits.astype(jnp.float32), mesh, ("batch", "length", "act_vocab"))
    return logits, sharding.constrain_cache(mesh, out.cache)


def first(logits, sampling: SamplingMetadata, penalties: TokenCounts | None, lookup: Lookup | None, positions):
    """The first new token of each row from its prefill logits [B, V] (token index 0), counted for the penalties
    and written at positions (int32 [B]: each prompt's length) into prompt lookup's history. -> (token int32 [B],
    penalties, lookup)."""
    token = sampling_stage.sample(logits, sampling, penalties)
    new = jnp.ones(token.shape + (1,), bool)
    return (token, sampling_stage.count(penalties, token[:, None], new),
            speculative.record_tokens(lookup, positions, token[:, None], new))


def step(spec: Speculation | None, width: int, config: ModelConfig, mesh, params, draft_params, rows: Rows,
         sampling: SamplingMetadata, carry: Carry, proposal: Proposal | None = None) -> tuple[Stepped, Carry]:
    """One step for every row: draft (a draft model's `width` tokens, or prompt lookup's `proposal`), forward the
    latest token and the drafts in one pass, accept per row with its own settings, keep what was accepted."""
    b = rows.token.shape[0]
    q, draft_cache = None, carry.draft_cache
    if width == 0:
        drafts, drafting = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), bool)
    elif spec.draft_config is not None:
        drafts, q, draft_cache = speculative.model_drafts(spec.draft_config, mesh, draft_params, draft_cache,
                                                          rows.token, rows.positions, width, sampling, rows.counts,
                                                          carry.penalties)
        drafting = rows.live
    else:
        drafts, drafting = proposal.drafts[:, :width], proposal.drafting
    tokens = jnp.concatenate([rows.token[:, None], drafts], axis=1)  # [B, w + 1]
    logits, cache = forward_tokens(config, mesh, params, carry.cache, tokens,
                                   rows.positions[:, None] + jnp.arange(width + 1))
    x = sampling_stage.adjust(logits, sampling, carry.penalties, drafts)
    kept, emitted = sampling_stage.accept(x, drafts, sampling, rows.counts, q)
    new = jnp.arange(width + 1)[None] <= kept[:, None]  # [B, w + 1]
    lookup = carry.lookup
    if width > 0:
        last = rows.positions + kept
        cache = sharding.constrain_cache(mesh, speculative.keep_accepted(cache, last))
        if draft_cache is not None:
            draft_cache = sharding.constrain_cache(mesh, speculative.keep_accepted(draft_cache, last))
    if lookup is not None:
        lookup = speculative.record_tokens(lookup, rows.positions + 1, emitted, new)
        pause, backoff = speculative.back_off(drafting, kept, width, lookup.pause, lookup.backoff)
        lookup = lookup.replace(pause=pause, backoff=backoff)
    penalties = sampling_stage.count(carry.penalties, emitted, new)
    drafted = jnp.where(rows.live, width, 0).astype(jnp.int32)
    return Stepped(kept, emitted, logits, drafted), Carry(cache, penalties, lookup, draft_cache)


def widths(spec: Speculation | None) -> tuple[int, ...]:
    """The widths a generation's steps verify at: 0 without speculation, k with a draft model, prompt lookup's
    `lookup_widths` (0, probe, k) otherwise."""
    if spec is None:
        return (0,)
    if spec.draft_config is not None:
        return (spec.draft_tokens,)
    return speculative.lookup_widths(spec.draft_tokens)
