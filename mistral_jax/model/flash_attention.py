"""Blockwise attention with an online softmax (as flash attention computes it), in plain JAX for every backend.

Memory is linear in the sequence: scores exist one [query block, key block] tile at a time, and the backward
pass (a custom VJP) recomputes them from the saved log-sum-exp instead of keeping them. The mask is built per
tile from positions and segment ids (causal, keys at negative positions hidden, a sliding window, packed
examples apart); a tile with no visible key is skipped, so a window's cost grows with T x W, not T squared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 128  # rows of a query block and of a key block


# The window of a layer that sees the whole context, as a number: larger than any distance between positions.
NO_WINDOW = 2**30


def tile_mask(q_pos, k_pos, q_seg, k_seg, window):
    """Which keys each query of a tile sees: bool [B, bq, bk] (attention.attention_mask, per tile).

    window: int32 scalar, possibly traced (a scanned stack whose layers differ); NO_WINDOW for none.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    return (k <= q) & (k >= 0) & (q_seg[:, :, None] == k_seg[:, None, :]) & (q - k < window)


def flash_attention(q, k, v, q_pos, k_pos, window=None, q_seg=None, k_seg=None, *,
                    causal_blocks: bool = False, block: int = BLOCK):
    """Softmax attention over grouped KV heads without materialising the [T, S] scores.

    q: [B, T, H, D]; k, v: [B, K, S, D] (heads-major, as attention.attend takes them); q_pos [B, T], k_pos
    [B, S] (negative = padding); window: None, an int or a traced int32 scalar; segments int [B, T] / [B, S] or
    None -> [B, T, H, D]. causal_blocks: the
    keys are the queries themselves with positions never decreasing along a segment (prompts, SFT rows), so
    key blocks after a query block are skipped without looking. Queries that see no key get zeros.
    """
    b, t, h, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    q_seg = jnp.zeros_like(q_pos) if q_seg is None else q_seg
    k_seg = jnp.zeros_like(k_pos) if k_seg is None else k_seg
    bq, bk = min(block, _round_up(t, 8)), min(block, _round_up(s, 8))
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    if causal_blocks and (t != s or bq != bk):
        raise ValueError("causal_blocks needs the keys to be the queries (same length and blocks)")
    pad_q, pad_k = ((0, 0), (0, tp - t)), ((0, 0), (0, sp - s))
    q_pos, q_seg = jnp.pad(q_pos, pad_q, constant_values=-1), jnp.pad(q_seg, pad_q)
    k_pos, k_seg = jnp.pad(k_pos, pad_k, constant_values=-1), jnp.pad(k_seg, pad_k)
    q = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k, v))
    window = jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)
    out = _flash(causal_blocks, bq, bk, window, q, k, v, q_pos, k_pos, q_seg, k_seg)  # [B, K, G, Tp, D]
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _key_blocks(i, n_k: int, causal_blocks: bool):
    """The key blocks query block i may see: [0, i] with causal blocks, else all."""
    return (i + 1) if causal_blocks else n_k


class _Tiles:
    """Slicing of the padded operands into tiles, and each tile's scores and mask."""

    def __init__(self, window, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg):
        self.window, self.bq, self.bk = window, bq, bk
        self.q, self.k, self.v = q, k, v
        self.q_pos, self.k_pos, self.q_seg, self.k_seg = q_pos, k_pos, q_seg, k_seg
        self.scale = q.shape[-1] ** -0.5

    def q_rows(self, x, i, axis=3):
        return jax.lax.dynamic_slice_in_dim(x, i * self.bq, self.bq, axis)

    def k_rows(self, x, j, axis=2):
        return jax.lax.dynamic_slice_in_dim(x, j * self.bk, self.bk, axis)

    def mask(self, i, j):  # [B, bq, bk]
        q_pos, q_seg = (self.q_rows(x, i, axis=1) for x in (self.q_pos, self.q_seg))
        k_pos, k_seg = (self.k_rows(x, j, axis=1) for x in (self.k_pos, self.k_seg))
        return tile_mask(q_pos, k_pos, q_seg, k_seg, self.window)

    def scores(self, i, j, mask):
        """Scaled scores of tile (i, j), -inf where masked: float32 [B, K, G, bq, bk]."""
        s = jnp.einsum("bkgqd,bksd->bkgqs", self.q_rows(self.q, i), self.k_rows(self.k, j),
                       preferred_element_type=jnp.float32) * self.scale
        return jnp.where(mask[:, None, None], s, -jnp.inf)


def _forward(window, causal_blocks, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg):
    """(out [B, K, G, Tp, D] in q's dtype, log-sum-exp float32 [B, K, G, Tp]; +inf where a query sees nothing)."""
    tiles = _Tiles(window, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg)
    n_q, n_k = q.shape[3] // bq, k.shape[2] // bk
    stats = q.shape[:3] + (bq,)

    def query_block(i, carry):
        out, lse = carry

        def key_block(j, acc):
            def visit(acc):
                m, total, o = acc  # running max, softmax denominator, weighted values
                s = tiles.scores(i, j, mask)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), tiles.k_rows(v, j),
                                preferred_element_type=jnp.float32)
                return m_new, total * correction + jnp.sum(p, axis=-1), o * correction[..., None] + pv

            mask = tiles.mask(i, j)
            return jax.lax.cond(jnp.any(mask), visit, lambda acc: acc, acc)

        init = (jnp.full(stats, -jnp.inf), jnp.zeros(stats), jnp.zeros(stats + (q.shape[-1],)))
        m, total, o = jax.lax.fori_loop(0, _key_blocks(i, n_k, causal_blocks), key_block, init)
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        o = o / total[..., None]
        block_lse = jnp.where(seen, m + jnp.log(total), jnp.inf)
        out = jax.lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), i * bq, 3)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, block_lse, i * bq, 3)

    init = (jnp.zeros_like(q), jnp.zeros(q.shape[:4], jnp.float32))
    return jax.lax.fori_loop(0, n_q, query_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(causal_blocks, bq, bk, window, q, k, v, q_pos, k_pos, q_seg, k_seg):
    return _forward(window, causal_blocks, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg)[0]


def _flash_fwd(causal_blocks, bq, bk, window, q, k, v, q_pos, k_pos, q_seg, k_seg):
    out, lse = _forward(window, causal_blocks, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg)
    return out, (window, q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(causal_blocks, bq, bk, residuals, d_out):
    """The flash attention backward: each tile's probabilities recomputed from the log-sum-exp; one pass over
    query blocks for dq, one over key blocks for dk and dv."""
    window, q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
    tiles = _Tiles(window, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg)
    n_q, n_k = q.shape[3] // bq, k.shape[2] // bk
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B, K, G, Tp]

    def tile_grads(i, j, mask):
        """(p, ds) of tile (i, j): probabilities and the scores' gradient, float32 [B, K, G, bq, bk]."""
        p = jnp.exp(tiles.scores(i, j, mask) - tiles.q_rows(lse, i)[..., None])
        dp = jnp.einsum("bkgqd,bksd->bkgqs", tiles.q_rows(d_out, i), tiles.k_rows(v, j).astype(jnp.float32))
        return p, p * (dp - tiles.q_rows(delta, i)[..., None])

    def dq_block(i, dq):
        def key_block(j, acc):
            def visit(acc):
                _, ds = tile_grads(i, j, mask)
                return acc + jnp.einsum("bkgqs,bksd->bkgqd", ds, tiles.k_rows(k, j).astype(jnp.float32))

            mask = tiles.mask(i, j)
            return jax.lax.cond(jnp.any(mask), visit, lambda acc: acc, acc)

        acc = jax.lax.fori_loop(0, _key_blocks(i, n_k, causal_blocks), key_block,
                                jnp.zeros(q.shape[:3] + (bq, q.shape[-1])))
        return jax.lax.dynamic_update_slice_in_dim(dq, acc * tiles.scale, i * bq, 3)

    def dkv_block(j, carry):
        def query_block(i, acc):
            def visit(acc):
                dk, dv = acc
                p, ds = tile_grads(i, j, mask)
                dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p, tiles.q_rows(d_out, i))
                dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, tiles.q_rows(q, i).astype(jnp.float32))
                return dk, dv

            mask = tiles.mask(i, j)
            return jax.lax.cond(jnp.any(mask), visit, lambda acc: acc, acc)

        dk, dv = carry
        zeros = jnp.zeros(k.shape[:2] + (bk, k.shape[-1]))
        dk_j, dv_j = jax.lax.fori_loop(j if causal_blocks else 0, n_q, query_block, (zeros, zeros))
        return (jax.lax.dynamic_update_slice_in_dim(dk, dk_j * tiles.scale, j * bk, 2),
                jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, 2))

    dq = jax.lax.fori_loop(0, n_q, dq_block, jnp.zeros(q.shape, jnp.float32))
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, n_k, dkv_block, (zeros, zeros))
    return None, dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
