"""Pallas splash attention (TPU) for tokens that attend to each other: causal or sliding-window, packed segments.

Splash masks by index, not position: a query at index i sees keys at j <= i (and i - j < window), within its
segment. That equals the position mask of attention.attention_mask when positions count up by one along each
segment (prompts, padded or packed SFT rows), so padding (negative positions) gets a segment of its own. Off
a TPU the kernel runs in Pallas interpret mode: correct, slow, for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128  # splash's query and key blocks are multiples of this
PADDING_SEGMENT, TAIL_SEGMENT = -1, -2  # segments splash gives padding and the rounding tail (real ones are >= 0)


def splash_block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


def splash_kernel(heads: int, length: int, window: int | None, interpret: bool):
    """The splash MHA kernel for `heads` query heads over `length` tokens (a multiple of 128)."""
    shape = (length, length)
    mask = splash.LocalMask(shape, (window - 1, 0), 0) if window and window < length else splash.CausalMask(shape)
    block = splash_block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, positions, window: int | None = None, segments=None):
    """Self-attention of a prompt or SFT row through splash: q [B, T, H, D]; k, v [B, K, T, D] (heads-major);
    positions [B, T] (negative = padding); segments int [B, T] or None -> [B, T, H, D]."""
    b, t, h, d = q.shape
    tp = -(-t // LANES) * LANES
    segments = jnp.zeros_like(positions) if segments is None else segments
    segments = jnp.where(positions < 0, PADDING_SEGMENT, segments)
    segments = jnp.pad(segments, ((0, 0), (0, tp - t)), constant_values=TAIL_SEGMENT)  # [B, Tp]
    q = jnp.pad((q * d**-0.5).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))  # [B, H, Tp, D]
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, 0))) for x in (k, v))  # [B, K, Tp, D]
    kernel = splash_kernel(h, tp, window, interpret=jax.default_backend() != "tpu")
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segments)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, H, D]
