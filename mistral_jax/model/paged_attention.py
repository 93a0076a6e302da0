"""Attention over each sequence's own pages of a paged KV cache, through XLA (serving; the pool is serving/pages.py).

A batch is a flat list of N tokens from S sequences (decode tokens and prompt chunks mixed). One layer's cache is
`kv_pages` [num_pages, page_size, 2 * kv_heads, head_dim] with K and V interleaved by head (K at even heads, V at
odd: the layout of jax's ragged paged attention kernel, so a TPU path reads the same buffer). Each step writes the
new tokens' K/V into their slots first, then every sequence's queries attend to the pages of its table only, so
the cost follows the pages the batch holds, not the longest context the server allows. Shapes (N, S, T, P) come
from a bounded set of buckets (`bucket`), so a server compiles a fixed set of programs. The attention itself is
attention.paged_attention (attention.py reads this metadata; this module stays below it).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class AttentionMetadata:
    """Where a step's tokens go and which pages each sequence reads, for one layer group (one window)."""

    positions: jax.Array  # int32 [N]: each token's position in its sequence (-1: padding token)
    slots: jax.Array  # int32 [N]: flat cache slot (page * page_size + offset) for its K/V; out of range: dropped
    query_index: jax.Array  # int32 [S, T]: flat token index of sequence s's query t; N where padding
    page_tables: jax.Array  # int32 [S, P]: page ids of logical pages first_page, first_page + 1, ...; 0 as padding
    first_page: jax.Array  # int32 [S]: logical page number of page_tables[:, 0] (> 0 once a window freed pages)
    kv_lens: jax.Array  # int32 [S]: tokens in the sequence's cache after this step's writes (0: padding row)


def bucket(n: int, smallest: int = 1) -> int:
    """The bucket a size n falls into: the next power of two, at least `smallest` (bounded sets of shapes)."""
    size = smallest
    while size < n:
        size *= 2
    return size


def build_metadata(sequences: Sequence[tuple[int, int, int, Sequence[int]]], page_size: int, num_pages: int,
                   tokens: int, rows: int, queries: int, pages: int) -> AttentionMetadata:
    """Host-side (NumPy) metadata for sequences (start, new tokens, first_page, page ids), in that order in the
    flat token list, padded to `tokens` [N], `rows` [S], `queries` [T] and `pages` [P] (buckets)."""
    positions = np.full(tokens, -1, np.int32)
    slots = np.full(tokens, num_pages * page_size, np.int32)  # out of range: a dropping scatter skips it
    query_index = np.full((rows, queries), tokens, np.int32)
    page_tables = np.zeros((rows, pages), np.int32)
    first_page = np.zeros(rows, np.int32)
    kv_lens = np.zeros(rows, np.int32)
    flat = 0
    if len(sequences) > rows:
        raise ValueError(f"{len(sequences)} sequences exceed the row bucket {rows}")
    for row, (start, count, first, table) in enumerate(sequences):
        if count > queries or flat + count > tokens or len(table) > pages:
            raise ValueError(f"sequence {row} ({count} tokens, {len(table)} pages) exceeds its bucket")
        where = np.arange(start, start + count)
        logical = where // page_size - first
        if count and (logical.min() < 0 or logical.max() >= len(table)):
            raise ValueError(f"sequence {row}'s positions {start}..{start + count - 1} are outside its pages")
        positions[flat:flat + count] = where
        slots[flat:flat + count] = np.asarray(table, np.int64)[logical] * page_size + where % page_size
        query_index[row, :count] = np.arange(flat, flat + count)
        page_tables[row, :len(table)] = table
        first_page[row], kv_lens[row] = first, start + count
        flat += count
    return AttentionMetadata(positions, slots, query_index, page_tables, first_page, kv_lens)


def combine_heads(k, v):
    """K and V [..., K, D] -> one [..., 2K, D], interleaved by head (K at even heads, V at odd)."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def write_pages(kv_pages, k, v, slots):
    """`kv_pages` [num_pages, page_size, 2K, D] after writing new keys and values k, v [N, K, D] at `slots` [N]
    (out-of-range slots, padding tokens, are dropped)."""
    num_pages, page_size = kv_pages.shape[:2]
    flat = kv_pages.reshape(num_pages * page_size, *kv_pages.shape[2:])
    kv = combine_heads(k, v).astype(kv_pages.dtype)
    if slots.shape[0] == 1:  # never one index: XLA:CPU rewrites a one-index scatter as a dynamic update of a slice
        # it reads first, and copied the whole pool twice per layer to keep the old values: one request decoding
        # alone took 1.26 s a step with a 2 GiB pool (SmolLM2, 46,592 tokens) against 32 ms with this dropped twin
        slots, kv = jnp.concatenate([slots, jnp.full((1,), flat.shape[0], slots.dtype)]), jnp.concatenate([kv, kv])
    flat = flat.at[slots].set(kv, mode="drop")
    return flat.reshape(kv_pages.shape)


def gather_pages(kv_pages, page_tables, dtype):
    """Each sequence's pages read by table: (keys, values), each [S, K, P * page_size, D] in `dtype`.

    The gather reads whole pages as rows of a 2-D view, a plainer gather for XLA:CPU than one over the 4-D pool
    (1.6 ms against 7.5 ms for 8 sequences of 64 pages of 16 tokens, 3 KV heads of 64, in one run on a loaded
    2-core machine; other runs were closer).
    """
    rows, pages = page_tables.shape
    num_pages, page_size, heads2, head_dim = kv_pages.shape
    kv = kv_pages.reshape(num_pages, -1).at[page_tables].get(mode="clip")  # [S, P, page_size * 2K * D]
    kv = kv.reshape(rows, pages * page_size, heads2 // 2, 2, head_dim).transpose(3, 0, 2, 1, 4)  # [2, S, K, L, D]
    kv = kv.astype(dtype)
    return kv[0], kv[1]
