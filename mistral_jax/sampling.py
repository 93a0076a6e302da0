"""Next-token choice: `SamplingParams` (the one public settings type, validated once) and the sampling stage.

Sampling keeps the old static `Sampling` below until the per-row stage replaces it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.errors import ParamError, UserError

TOP_LOGPROBS = 20  # alternatives computed for every token (OpenAI's limit); a request may ask for up to this many
MAX_TOP_K = 2**31 - 1  # top_k is an int32 on device; any value at or above the vocabulary means no filter
MAX_SEED = 2**64  # seeds are 64 bits: the two 32-bit words of a threefry key (see `seed_key_data`)
MAX_BIAS = 100.0  # logit_bias values lie in [-MAX_BIAS, MAX_BIAS] (OpenAI's range)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _token_id(key, param: str) -> int:
    """A token id given as an int or (JSON object keys) a decimal string."""
    if isinstance(key, str) and key.strip().lstrip("+").isdigit():
        key = int(key)
    if not _is_int(key) or key < 0:
        raise ParamError(param, f"{param} keys must be token ids (non-negative integers), got {key!r}")
    return int(key)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One row's (or request's) generation settings, checked once here; a wrong one raises ParamError naming it.

    temperature 0 is greedy; top_k 0 (or any value at or above the vocabulary), top_p 1 and min_p 0 switch those
    filters off. presence/frequency penalties follow OpenAI (over the generated tokens), repetition_penalty
    transformers' RepetitionPenaltyLogitsProcessor (over prompt and generated tokens; 1 is off), min_p transformers'
    MinPLogitsWarper. logit_bias maps token ids to a bias in [-100, 100] added to their logits (stored as sorted
    (id, bias) pairs). seed: any integer in [0, 2**64).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending; a mapping is accepted
    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not returned
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's own end-of-turn ids (unless ignore_eos)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N >= 0: each token's logprob and the top N alternatives
    echo_logprobs: bool = False  # also the prompt's tokens' logprobs (completions with echo)

    def __post_init__(self):
        def number(name: str, ok, why: str):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or abs(value) > FLOAT32_MAX or not ok(value):
                raise ParamError(name, f"{name} must be {why}, got {value!r}")
            object.__setattr__(self, name, float(value))

        def integer(name: str, low: int, high: int, why: str):
            value = getattr(self, name)
            if not _is_int(value) or not low <= value < high:
                raise ParamError(name, f"{name} must be {why}, got {value!r}")
            object.__setattr__(self, name, int(value))

        number("temperature", lambda v: v >= 0, "a finite number >= 0")
        integer("top_k", 0, MAX_TOP_K + 1, f"an integer in [0, {MAX_TOP_K}] (0 or >= the vocabulary: no filter)")
        number("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
        number("min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        integer("seed", 0, MAX_SEED, "an integer in [0, 2**64)")
        number("presence_penalty", lambda v: abs(v) <= MAX_PENALTY, f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        number("frequency_penalty", lambda v: abs(v) <= MAX_PENALTY, f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        number("repetition_penalty", lambda v: v > 0, "a finite number > 0 (1 is off)")
        integer("max_tokens", 1, 2**31, "an integer >= 1")
        self._check_logit_bias()
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ParamError("stop", f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ParamError("stop_token_ids", f"stop_token_ids must be token ids, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        for name in ("ignore_eos", "echo_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= TOP_LOGPROBS):
            raise ParamError("logprobs", f"logprobs must be between 0 and {TOP_LOGPROBS}, got {self.logprobs!r}")

    def _check_logit_bias(self):
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = bias.items()
        elif not isinstance(bias, (tuple, list)):
            raise ParamError("logit_bias", f"logit_bias must map token ids to numbers, got {bias!r}")
        pairs = {}
        for item in bias:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ParamError("logit_bias", f"logit_bias must map token ids to numbers, got {item!r}")
            token, value = _token_id(item[0], "logit_bias"), item[1]
            if not _is_number(value) or not math.isfinite(value) or abs(value) > MAX_BIAS:
                raise ParamError("logit_bias", f"logit_bias values must be numbers in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                                               f"got {value!r} for token {token}")
            pairs[token] = float(value)
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items())))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the penalties need token counts (presence, frequency or repetition set)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids this names lie in the vocabulary (the sizes are known only with a model)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids)):
            if any(t >= vocab_size for t in ids):
                raise ParamError(name, f"{name} token ids must lie in [0, {vocab_size})")


def seed_key_data(seed: int) -> np.ndarray:
    """A 64-bit seed as threefry key data uint32 [2] (high word, low word); equal to
    `jax.random.key_data(jax.random.key(seed))` for seeds below 2**32 (jax.random.key drops the high word)."""
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


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
