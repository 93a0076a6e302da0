"""The paged groundwork end to end, without a model: the scheduler's plans, turned into AttentionMetadata, write K/V
into the pool's pages and attend over them; every query's output equals dense attention over its sequence."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model import paged_attention as pa
from mistral_jax.model.attention import attend, attention_mask, paged_attention
from mistral_jax.serving.paged_runner import attention_rows, row_count
from mistral_jax.serving.pages import PagePool
from mistral_jax.serving.scheduler import Scheduler

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE, VOCAB, LONGEST = 4, 2, 8, 4, 16, 48
ROWS, TOKENS = 4, 16  # max_num_seqs and max_num_batched_tokens: fixed buckets, only the page count varies


def embeddings(seed=0):
    """q, k, v of a token at a position: functions of (token, position) only, so shared prefixes share pages."""
    rng = np.random.default_rng(seed)
    tables = [rng.normal(size=(n, width)).astype(np.float32) for n in (VOCAB, LONGEST) for width in (
        HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)]
    def qkv(tokens, positions):
        tokens, positions = np.asarray(tokens), np.asarray(positions)
        q, k, v = (tables[i][tokens] + tables[3 + i][positions] for i in range(3))
        return q.reshape(-1, HEADS, HEAD_DIM), k.reshape(-1, KV_HEADS, HEAD_DIM), v.reshape(-1, KV_HEADS, HEAD_DIM)
    return qkv


@functools.partial(jax.jit, static_argnames="window")
def dense(q, k, v, starts, lengths, window):
    """attention.attend per row over its whole sequence's K/V [R, L, K, D] (padded past `lengths`)."""
    key_pos = jnp.arange(k.shape[1])[None]
    mask = attention_mask(starts[:, None] + jnp.arange(q.shape[1])[None], jnp.where(key_pos < lengths[:, None],
                                                                                     key_pos, -1), window)
    return attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


@functools.partial(jax.jit, static_argnames="window", donate_argnums=0)
def step(kv_pages, q, k, v, meta, window):
    kv_pages = pa.write_pages(kv_pages, k, v, meta.slots)
    return kv_pages, paged_attention(q, kv_pages, meta, window)


@pytest.mark.parametrize("window, num_pages, tile", [(None, 20, TOKENS), (7, 8, TOKENS), (7, 8, 3)])
def test_plans_attend_exactly_over_pages(window, num_pages, tile):
    """tile: queries per attention row (the runner's QUERY_TILE): a chunk longer than it is split into rows."""
    rng = np.random.default_rng(3)
    qkv = embeddings()
    pool = PagePool(num_pages=num_pages, page_size=PAGE_SIZE, windows=(window,))
    scheduler = Scheduler(pool, max_num_seqs=ROWS, max_num_batched_tokens=TOKENS)
    kv_pages = jnp.zeros((pool.num_pages, PAGE_SIZE, 2 * KV_HEADS, HEAD_DIM), jnp.float32)
    system = list(rng.integers(0, VOCAB, 9))
    submitted, page_buckets, hits, preempted = 0, set(), 0, 0
    before = step._cache_size()
    while submitted < 40 or scheduler.running or scheduler.waiting:
        if submitted < 40 and rng.random() < 0.5:
            prompt = system[: rng.integers(0, 10)] + list(rng.integers(0, VOCAB, rng.integers(1, 8)))
            scheduler.submit(submitted, prompt, max_tokens=int(rng.integers(1, LONGEST - len(prompt))))
            submitted += 1
        plan = scheduler.schedule()
        hits += sum(hit for *_, hit in plan.admitted)
        preempted += len(plan.preempted)
        if not plan.chunks:
            continue
        rows = attention_rows(plan.chunks, 0, tile)
        assert len(rows) <= row_count(TOKENS, ROWS, tile)
        pages = pa.bucket(max(len(r[3]) for r in rows))
        page_buckets.add(pages)
        meta = pa.build_metadata(rows, PAGE_SIZE, pool.num_pages, tokens=TOKENS, rows=row_count(TOKENS, ROWS, tile),
                                 queries=tile, pages=pages)
        n = plan.num_tokens
        tokens = np.concatenate([c.token_ids for c in plan.chunks])
        q, k, v = (np.zeros((TOKENS, *x.shape[1:]), np.float32) for x in qkv(tokens[:1], [0]))
        q[:n], k[:n], v[:n] = qkv(tokens, meta.positions[:n])
        kv_pages, out = step(kv_pages, q, k, v, jax.tree.map(jnp.asarray, meta), window=window)
        # the reference: each chunk's sequence from position 0, computed afresh
        ref_q = np.zeros((ROWS, TOKENS, HEADS, HEAD_DIM), np.float32)
        ref_k, ref_v = (np.zeros((ROWS, LONGEST, KV_HEADS, HEAD_DIM), np.float32) for _ in range(2))
        for i, c in enumerate(plan.chunks):
            sequence = scheduler.find(c.request_id).tokens[:c.end]
            ref_q[i, :len(c.token_ids)], _, _ = qkv(c.token_ids, range(c.start, c.end))
            _, ref_k[i, :c.end], ref_v[i, :c.end] = qkv(sequence, range(c.end))
        starts = np.array([c.start for c in plan.chunks] + [0] * (ROWS - len(plan.chunks)))
        ends = np.array([c.end for c in plan.chunks] + [0] * (ROWS - len(plan.chunks)))
        ref = np.asarray(dense(ref_q, ref_k, ref_v, starts, ends, window=window))
        expected = np.concatenate([ref[i, :len(c.token_ids)] for i, c in enumerate(plan.chunks)])
        np.testing.assert_allclose(np.asarray(out[:n]), expected, rtol=0, atol=1e-6)
        scheduler.update(plan, {c.request_id: int(rng.integers(0, VOCAB)) for c in plan.chunks if c.sample})
    assert hits > 0 and preempted > 0
    assert step._cache_size() - before == len(page_buckets)  # one program per page-count bucket, none per step
    assert pool.num_used == 0
