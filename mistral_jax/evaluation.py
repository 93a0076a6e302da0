"""Perplexity over strided windows, as transformers' perplexity guide computes it (huggingface.co/docs/
transformers/perplexity): windows of `seq_len` tokens start every `stride` tokens, and each scores only the
tokens the previous window did not reach, every one with up to seq_len - 1 tokens of context.

Every window is padded to seq_len, so the scoring step compiles once whatever the texts' lengths. Optional
per-token weights (a chat file's assistant mask) pick which targets count. With config.kv_cache_dtype set (an
int8 cache, say), each window runs through a KV cache in chunks of KV_CHUNK tokens, as a chunked prefill does:
every query reads the earlier chunks' keys and values from the cache, in its dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import kv_cache
from mistral_jax.model.transformer import default_positions, forward

KV_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """What `perplexity` measured."""

    perplexity: float  # exp(nll / tokens)
    nll: float  # summed negative log-likelihood (nats) of the scored tokens
    tokens: int  # tokens scored
    windows: int
    seconds: float  # wall time of the scoring (the first window's compilation included)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_second": self.tokens_per_second}


def windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over `length` tokens: tokens [first, end) are scored, each
    predicted from the ones before it inside [begin, end)."""
    out, prev_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + seq_len, length)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == length:
            break
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _window_nll(config: ModelConfig, mesh, params, tokens, weights):
    """tokens int32 [B, L], weights float32 [B, L] (weight of predicting tokens[:, j] from those before it)
    -> (weighted nll sum, weight sum)."""
    with sharding.activations(mesh):
        logits = _window_logits(config, params, tokens)[:, :-1]  # [B, L-1, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, L-1]
    return jnp.sum(nll * weights[:, 1:]), jnp.sum(weights[:, 1:])


def _window_logits(config: ModelConfig, params, tokens):
    """tokens [B, L] -> logits [B, L, V]: one causal forward, or (config.kv_cache_dtype) chunks through a cache."""
    positions = default_positions(tokens)
    if config.kv_cache_dtype is None:
        return forward(config, params, tokens, positions).logits
    b, length = tokens.shape
    chunks = [x.reshape(b, length // KV_CHUNK, KV_CHUNK).transpose(1, 0, 2) for x in (tokens, positions)]  # [N, B, C]

    def step(cache, chunk):
        out = forward(config, params, *chunk, cache=cache)
        return out.cache, out.logits  # [B, C, V]

    _, logits = jax.lax.scan(step, kv_cache.zeros(config, b, length), chunks)  # [N, B, C, V]
    return logits.transpose(1, 0, 2, 3).reshape(b, length, -1)


def perplexity(config: ModelConfig, params, tokens, *, weights=None, seq_len: int = 1024, stride: int = 512,
               mesh=None, progress: bool = False) -> Perplexity:
    """Perplexity of one token sequence [n], or of several (a list; scored apart, pooled).

    weights: per-token (0/1) target weights in the same shape (default: every token); seq_len: the window
    (at most config.max_seq_len); stride: tokens between window starts (<= seq_len); progress: a tqdm bar.
    """
    single = len(tokens) == 0 or np.ndim(tokens[0]) == 0
    sequences = [np.asarray(tokens)] if single else [np.asarray(t) for t in tokens]
    if weights is None:
        masks = [np.ones(len(s), np.float32) for s in sequences]
    else:
        masks = [np.asarray(weights, np.float32)] if single else [np.asarray(w, np.float32) for w in weights]
    _check(config, sequences, masks, seq_len, stride)
    if mesh is not None:
        params = sharding.ensure_params(config, params, mesh)
    plan = [(i, w) for i, s in enumerate(sequences) for w in windows(len(s), seq_len, stride)]
    nll = count = 0.0
    width = seq_len if config.kv_cache_dtype is None else -(-seq_len // KV_CHUNK) * KV_CHUNK  # whole chunks
    start = time.perf_counter()
    for i, (begin, end, first) in tqdm(plan, desc="perplexity", unit="window", disable=not progress, leave=False):
        row = np.zeros((1, width), np.int32)
        row[0, : end - begin] = sequences[i][begin:end]
        weight = np.zeros((1, width), np.float32)
        weight[0, first - begin: end - begin] = masks[i][first:end]
        if mesh is not None:
            row, weight = (sharding.put(x, sharding.replicated(mesh)) for x in (row, weight))
        window_nll, window_count = _window_nll(config, mesh, params, row, weight)
        nll, count = nll + float(window_nll), count + float(window_count)
    seconds = time.perf_counter() - start
    if count == 0:
        raise UserError("no tokens to score: every target weight is 0 (or every text is a single token)")
    return Perplexity(math.exp(nll / count), nll, int(count), len(plan), seconds)


def _check(config: ModelConfig, sequences: Sequence[np.ndarray], masks: Sequence[np.ndarray], seq_len: int,
           stride: int) -> None:
    if not 2 <= seq_len <= config.max_seq_len:
        raise UserError(f"seq_len must be in [2, {config.max_seq_len}] (the model's context), got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise UserError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if not sequences or any(s.ndim != 1 or len(s) < 2 for s in sequences):
        raise UserError("tokens must be one sequence of at least 2 token ids, or a list of such sequences")
    if len(masks) != len(sequences) or any(m.shape != s.shape for m, s in zip(masks, sequences)):
        raise UserError("weights must have the shape of tokens")
    low, high = min(int(s.min()) for s in sequences), max(int(s.max()) for s in sequences)
    if low < 0 or high >= config.vocab_size:
        raise UserError(f"token ids must lie in [0, {config.vocab_size}), got [{low}, {high}]")
