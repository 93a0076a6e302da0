"""Grouped-query attention with a per-layer sliding window (or none), reading and writing the rolling cache."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import kv_cache, linear, quant
from mistral_jax.model.constraints import constrain
from mistral_jax.model.flash_attention import flash_attention
from mistral_jax.model.layers import param_init, rope_inv_freq, rotary_embedding
from mistral_jax.model.paged_attention import AttentionMetadata, gather_pages, write_pages


def attention_mask(q_pos, k_pos, window: int | None, q_segments=None, k_segments=None):
    """Which keys each query sees: bool [B, T, S].

    Causal by position, keys at negative positions (empty cache slots, padding) are hidden, a window W
    keeps a query and the W-1 positions before it, and segments (packed examples) never mix.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= q - k < window
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


def attend(q, k, v, mask):
    """Softmax attention with query heads grouped over shared KV heads.

    q: [B, T, H, D]; k, v: [B, K, S, D] (heads-major, as the cache stores them); mask: bool [B, T, S]
    -> [B, T, H, D]. Scores in float32. The einsums run KV-head-major ([B, K, G*T, ...]): the scores leave
    the first dot in the layout that softmax and the second dot read, with no transposed copy of the
    [T, S] score matrices (a large share of XLA:CPU's prefill time in the other order: RESULTS.md).
    """
    b, t, h, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = h // kv_heads
    q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)  # [B, K, G*T, D]
    scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    keep = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, g, t, s)).reshape(b, kv_heads, g * t, s)
    probs = jax.nn.softmax(jnp.where(keep, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v)  # [B, K, G*T, D]
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def causal_block_size(length: int) -> int | None:
    """Query block for `attend_causal` on `length` tokens: at most 16 blocks of at least 64, or None.

    Smaller blocks skip more of the masked triangle (n blocks compute (n + 1) / 2n of the square); 64 beat
    128 for a 512-token SFT step on the CPU (RESULTS.md, train step).
    """
    block = max(64, length // 16)
    return block if length > block and length % block == 0 else None


def attend_causal(q, k, v, mask):
    """`attend` for keys that are the queries themselves (no cache), skipping the blocks above the diagonal.

    Query block i attends to keys 0 .. its own end only: exact when every key after a query's column is
    masked for it, i.e. positions never decrease along a segment (true of every caller: prompts, padded
    or packed SFT rows). Saves up to half the attention FLOPs.
    """
    block = causal_block_size(q.shape[1])
    if block is None:
        return attend(q, k, v, mask)
    outs = []
    for lo in range(0, q.shape[1], block):
        hi = lo + block
        outs.append(attend(q[:, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, lo:hi, :hi]))
    return jnp.concatenate(outs, axis=1)


# Keys from which attention="auto" takes a blockwise kernel: on the CPU flash took 0.63x the exact path's time at
# 12k tokens and 0.71x at 16k, with 11x-15x less memory (benchmarks/RESULTS.md, "Long context").
FLASH_MIN_KEYS = 12288


def attention_kernel(config: ModelConfig, keys: int, backend: str | None = None) -> str:
    """The kernel that attends over `keys` keys: config.attention, or for "auto" the exact XLA einsums below
    FLASH_MIN_KEYS and above them cuDNN on a GPU in bfloat16/float16, flash elsewhere."""
    if config.attention != "auto":
        return config.attention
    if keys < FLASH_MIN_KEYS:
        return "xla"
    gpu = (backend or jax.default_backend()) == "gpu"
    return "cudnn" if gpu and config.compute_dtype in (jnp.bfloat16, jnp.float16) else "flash"


def attend_cudnn(q, k, v, mask, causal: bool):
    """`attend` through `jax.nn.dot_product_attention` with cuDNN's fused kernel (GPU, bf16/fp16 only).

    The mask travels as cuDNN's bias; `causal` also lets the kernel skip the blocks above the diagonal.
    """
    if jax.default_backend() != "gpu":
        raise UserError(f"attention='cudnn' needs a GPU (jax's backend here is {jax.default_backend()!r}); use 'xla'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"attention='cudnn' needs dtype bfloat16 or float16, got {q.dtype}")
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, D], as the kernel takes them
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=causal, implementation="cudnn")
    return out.astype(q.dtype)


def paged_attention(q, kv_pages, meta: AttentionMetadata, window: int | None = None):
    """q [N, H, D] (rotated) over the cache pages of each token's sequence -> [N, H, D].

    The step's own K/V must already be written (`write_pages`). Keys at or past a sequence's kv_len, and those a
    window hides, are masked by position; padding tokens' outputs are zeros.
    """
    page_size = kv_pages.shape[1]
    keys, values = gather_pages(kv_pages, meta.page_tables, q.dtype)
    length = keys.shape[2]
    key_pos = meta.first_page[:, None] * page_size + jnp.arange(length)[None, :]  # [S, L]
    key_pos = jnp.where(key_pos < meta.kv_lens[:, None], key_pos, -1)
    query_pos = jnp.take(meta.positions, meta.query_index, mode="fill", fill_value=-1)  # [S, T]
    queries = jnp.take(q, meta.query_index, axis=0, mode="fill", fill_value=0)  # [S, T, H, D]
    mask = attention_mask(query_pos, key_pos, window)
    out = attend(queries, keys, values, mask)  # [S, T, H, D]
    return jnp.zeros_like(q).at[meta.query_index].set(out, mode="drop")


class Attention(nn.Module):
    config: ModelConfig
    window: int | None = None  # this layer's sliding window (config.layer_window), None: the whole context

    @nn.compact
    def __call__(self, x, inputs, layer_cache=None, traced_window=None, lora=None):
        """x: [B, T, D]; inputs: transformer.BlockInputs (positions, segments, the cache's slot positions, or the
        pages' AttentionMetadata with layer_cache = {"kv": this layer's pages}).

        With a cache (layer_cache = {"k", "v"}, one layer's buffers: kv_cache.py), the new keys are written
        to it and the updated layer cache is returned. inputs.cache_empty: the cache holds nothing yet (a
        prompt's first chunk), so attention skips it. traced_window: int32 scalar that replaces `window` in
        a scanned stack whose layers differ (flash_attention.NO_WINDOW for a full layer). lora: this layer's adapters
        (linear.LayerLora) when the batch carries any.
        """
        cfg = self.config
        dt, hd = cfg.compute_dtype, cfg.resolved_head_dim
        positions = inputs.positions
        window = self.window if traced_window is None else traced_window
        cache_pos, new_cache_pos = inputs.cache_pos, inputs.new_cache_pos
        if self.window is not None and traced_window is None and inputs.window_cache_pos is not None:
            cache_pos, new_cache_pos = inputs.window_cache_pos, inputs.window_new_cache_pos  # the window's ring
        init = param_init(cfg.init_std)
        d = x.shape[-1]

        def weight(name, axes, shape):
            return quant.weight(self, name, axes, shape, cfg, init)

        def dot(spec, a, w, name):
            return linear.einsum(spec, a, w, cfg, lora=(lora, "attention", name))

        wq = weight("wq", ("embed", "q_heads", "head_dim"), (d, cfg.n_heads, hd))
        wk = weight("wk", ("embed", "kv_heads", "head_dim"), (d, cfg.n_kv_heads, hd))
        wv = weight("wv", ("embed", "kv_heads", "head_dim"), (d, cfg.n_kv_heads, hd))
        wo = weight("wo", ("q_heads", "head_dim", "embed"), (cfg.n_heads, hd, d))

        x = x.astype(dt)
        q = dot("btd,dhk->bthk", x, wq, "wq")  # [B, T, H, hd]
        k = dot("btd,dhk->bthk", x, wk, "wk")  # [B, T, K, hd]
        v = dot("btd,dhk->bthk", x, wv, "wv")
        inv_freq = rope_inv_freq(cfg)
        q = constrain(rotary_embedding(q, positions, inv_freq), ("batch", "length", "act_heads", None))
        k = constrain(rotary_embedding(k, positions, inv_freq), ("batch", "length", "act_kv_heads", None))

        if inputs.pages is not None:  # a paged cache (serving): one flat row [1, N] of several sequences' tokens
            meta = inputs.pages  # or one per layer group (config.window_groups) where the layers' windows differ
            meta = meta if isinstance(meta, AttentionMetadata) else meta[cfg.window_groups.index(self.window)]
            kv_pages = write_pages(layer_cache["kv"], k[0], v[0], meta.slots)
            out = paged_attention(q[0], kv_pages, meta, window)[None]
            return dot("bthk,hkd->btd", out, wo, "wo"), {"kv": kv_pages}
        new_layer_cache = None
        if layer_cache is not None:
            new_layer_cache = kv_cache.write_layer(layer_cache, positions, k, v)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # heads-major [B, K, T, hd], as cached
        b = q.shape[0]
        if layer_cache is None or inputs.cache_empty:  # an empty cache adds nothing: the tokens see each other
            segments, kernel = inputs.segment_ids, attention_kernel(cfg, k.shape[2])
            if kernel == "flash" or (kernel == "splash" and traced_window is not None):  # splash's window is static
                out = flash_attention(q, k, v, positions, positions, window, segments, segments, causal_blocks=True)
            elif kernel == "splash":
                from mistral_jax.model.splash_attention import splash_attention  # Pallas loads only when asked

                out = splash_attention(q, k, v, positions, window, segments)
            else:
                mask = attention_mask(positions, positions, window, segments, segments)
                out = attend_cudnn(q, k, v, mask, causal=True) if kernel == "cudnn" else attend_causal(q, k, v, mask)
        elif q.shape[1] == 1:
            # One new token: its slot held a position at least `size` back, outside the window, so writing
            # first and reading the cache alone is exact, and the donated buffer is updated in place.
            mask = attention_mask(positions, new_cache_pos, window)
            keys, values = (kv_cache.read_layer(new_layer_cache, n, b, dt) for n in ("k", "v"))
            out = attend(q, keys, values, mask)
        else:
            # A chunk may overwrite slots its own first queries still need: read the old cache and the chunk.
            keys = jnp.concatenate([kv_cache.read_layer(layer_cache, "k", b, dt), k], axis=2)
            values = jnp.concatenate([kv_cache.read_layer(layer_cache, "v", b, dt), v], axis=2)
            key_positions = jnp.concatenate([cache_pos, positions], axis=1)
            kernel = attention_kernel(cfg, keys.shape[2])
            if kernel in ("flash", "splash"):  # splash masks by index: ring slots are not, so flash reads them
                out = flash_attention(q, keys, values, positions, key_positions, window)
            else:
                mask = attention_mask(positions, key_positions, window)
                attend_chunk = functools.partial(attend_cudnn, causal=False) if kernel == "cudnn" else attend
                out = attend_chunk(q, keys, values, mask)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return dot("bthk,hkd->btd", out, wo, "wo"), new_layer_cache
