"""Next-token choice: greedy, temperature, top-k and top-p (nucleus). Settings are static (hashable)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mistral_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def as_key(key):
    """A typed PRNG key from a key or its raw data (host code passes `jax.random.key_data`: plain arrays)."""
    return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def filter_logits(logits, top_k: int, top_p: float):
    """Logits outside the top-k / the top-p nucleus set to -inf. logits: float32 [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits, key, sampling: Sampling):
    """One token per row. logits: float32 [B, V] -> int32 [B]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def filter_row(logits, temperature, top_k, top_p):
    """`filter_logits` of logits / temperature for one row whose settings are traced values: [V] -> [V]."""
    x = logits / jnp.where(temperature > 0, temperature, 1.0)  # [V]
    descending = jnp.sort(x)[::-1]
    kth = descending[jnp.clip(top_k - 1, 0, x.shape[-1] - 1)]
    x = jnp.where((top_k > 0) & (x < kth), -jnp.inf, x)
    descending = jnp.sort(x)[::-1]
    probs = jax.nn.softmax(descending)
    before = jnp.cumsum(probs) - probs  # mass strictly above each token
    cutoff = jnp.min(jnp.where(before < top_p, descending, jnp.inf))
    return jnp.where((top_p < 1.0) & (x < cutoff), -jnp.inf, x)


def _sample_row(logits, key, step, temperature, top_k, top_p):
    """`sample` for one row whose settings are traced values; the same token as `sample` with them static."""
    x = filter_row(logits, temperature, top_k, top_p)
    key = jax.random.fold_in(jax.random.wrap_key_data(key), step)
    return jax.random.categorical(key, x[None], axis=-1)[0].astype(jnp.int32)


def sample_rows(logits, keys, steps, temperature, top_k, top_p):
    """One token per row, each row with its own settings (a server's batch mixes requests).

    logits float32 [B, V]; keys uint32 [B, ...] (each row's `jax.random.key_data(jax.random.key(seed))`);
    steps int32 [B] (the row's token index, folded into its key as `generate` folds its step); temperature
    float32 [B] (0 = greedy); top_k int32 [B] (0 = off); top_p float32 [B] (1 = off) -> int32 [B].
    A row sampled alone gets the same token as `sample` of the same seed, step and settings.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: jax.vmap(_sample_row)(logits, keys, steps, temperature, top_k, top_p),
        lambda: greedy,
    )
    return jnp.where(temperature > 0, sampled, greedy)
