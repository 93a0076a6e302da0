"""serving/pages.py: pages under random admit/grow/finish/cancel, prefix hits, LRU eviction, window freeing."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from mistral_jax.serving.pages import PagePool, chain_keys
from mistral_jax.serving.requests import RequestError


def check_invariants(pool: PagePool, holders: dict[int, None]) -> None:
    """Refcounts equal the tables holding each page, never negative; free, idle and held pages partition the pool."""
    held = collections.Counter()
    for rid in holders:
        for group in range(len(pool.windows)):
            held.update(pool.table(rid, group).pages)
    refs = [pool.refcount(p) for p in range(pool.num_pages)]
    assert min(refs) >= 0
    assert refs == [held[p] for p in range(pool.num_pages)]
    assert pool.num_used == len(held)
    idle = pool.evictable()
    assert not set(idle) & set(held) and len(set(idle)) == len(idle)
    assert pool.num_free + len(held) == pool.num_pages


def advance(pool: PagePool, rid: int, tokens: list[int], computed: int, chunk: int) -> int | None:
    """Compute the next chunk of a request (reserve, then commit); None when the pool is short."""
    end = min(len(tokens), computed + chunk)
    if not pool.reserve(rid, computed, end):
        return None
    pool.commit(rid, tokens[:end])
    return end


@pytest.mark.parametrize("windows", [(None,), (24,), (None, 10)])
def test_random_traffic_returns_every_page(windows):
    rng = np.random.default_rng(sum(w or 0 for w in windows))
    pool = PagePool(num_pages=40, page_size=8, windows=windows)
    prefixes = [list(rng.integers(0, 50, size=n)) for n in (16, 20, 40)]  # shared system prompts: hits happen
    live: dict[int, tuple[list[int], int, int]] = {}  # rid -> (tokens, computed, max length)
    next_id, hits = 0, 0
    while next_id < 200 or live:
        op = rng.random()
        if op < 0.3 and next_id < 200 and len(live) < 6:
            prompt = prefixes[rng.integers(3)][: rng.integers(1, 41)] + list(rng.integers(0, 50, rng.integers(1, 30)))
            max_tokens = int(rng.integers(1, 40))
            try:
                pool.check_fits(len(prompt), max_tokens)
            except RequestError:
                next_id += 1
                continue
            hit = pool.open(next_id, prompt)
            assert hit % pool.page_size == 0 and hit <= len(prompt) - 1
            hits += hit > 0
            live[next_id] = (prompt, hit, len(prompt) + max_tokens - 1)
            next_id += 1
        elif live:
            rid = list(live)[rng.integers(len(live))]
            tokens, computed, limit = live[rid]
            if op < 0.4:  # cancelled (or disconnected) at any point
                pool.release(rid)
                del live[rid]
            else:
                end = advance(pool, rid, tokens, computed, int(rng.integers(1, 17)))
                if end is None:  # pool short: preempt this request (pages freed; it recomputes later)
                    pool.release(rid)
                    del live[rid]
                elif end >= limit:
                    pool.release(rid)  # finished
                    del live[rid]
                else:
                    if end == len(tokens):
                        tokens = tokens + [int(rng.integers(0, 50))]  # the sampled token joins the sequence
                    live[rid] = (tokens, end, limit)
        check_invariants(pool, live)
    assert hits > 10
    assert pool.num_used == 0 and pool.num_free == pool.num_pages
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))


def test_identical_prefixes_share_identical_pages():
    pool = PagePool(num_pages=32, page_size=4)
    prompt = list(range(100, 114))  # 3 full pages and 2 tokens
    assert pool.open(0, prompt) == 0
    assert advance(pool, 0, prompt, 0, len(prompt)) == len(prompt)
    first = pool.table(0).pages
    assert pool.open(1, prompt) == 12
    assert pool.table(1).pages == first[:3]
    assert [pool.refcount(p) for p in first[:3]] == [2, 2, 2]
    pool.release(0)
    pool.release(1)
    assert pool.open(2, prompt + [7, 8]) == 12 and pool.table(2).pages == first[:3]  # unheld pages stay cached
    assert pool.open(3, prompt[:8] + [0] + prompt[9:]) == 8 and pool.table(3).pages == first[:2]  # differs on page 3
    assert pool.open(4, prompt, adapter="lora-a") == 0  # another adapter: another chain
    assert pool.open(5, prompt[:12]) == 8  # the last token is always computed: the hit stops a page short


def test_eviction_is_least_recently_used_tail_first():
    pool = PagePool(num_pages=8, page_size=2)
    chains = {}
    for rid, prompt in enumerate(([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])):
        pool.open(rid, prompt)
        advance(pool, rid, prompt, 0, len(prompt))
        chains[rid] = pool.table(rid).pages
    pool.release(1)  # released first: older
    pool.release(0)
    # cached (full) pages: 2 per request; each request's third page was partial and went to the free list
    assert pool.evictable() == [chains[1][1], chains[1][0], chains[0][1], chains[0][0]]
    assert pool.open(2, [1, 2, 3, 4, 0]) == 4  # touching request 0's chain makes it the most recent
    pool.release(2)
    assert pool.evictable() == [chains[1][1], chains[1][0], chains[0][1], chains[0][0]]
    pool.open(3, list(range(20, 32)))
    assert pool.reserve(3, 0, 12)  # 6 pages: the 4 free ones, then request 1's chain is evicted, its tail first
    assert pool.evictable() == [chains[0][1], chains[0][0]]
    assert sorted(pool.table(3).pages[-2:]) == sorted(chains[1][:2])
    assert not pool.reserve(3, 12, 18)  # 3 more pages: only 2 left
    assert pool.table(3).end == 6 and pool.evictable() == [chains[0][1], chains[0][0]]  # a refusal takes nothing
    assert pool.open(4, [6, 7, 8, 9, 10]) == 0
    assert pool.open(5, [1, 2, 3, 4, 5]) == 4


def test_eviction_order_follows_last_use():
    pool = PagePool(num_pages=6, page_size=2)
    prompts = {rid: [10 * rid + 1, 10 * rid + 2, 0] for rid in range(3)}  # one cached page each
    pages = {}
    for rid, prompt in prompts.items():
        pool.open(rid, prompt)
        advance(pool, rid, prompt, 0, 3)
        pages[rid] = pool.table(rid).pages[0]
    for rid in (2, 0, 1):
        pool.release(rid)
    assert pool.evictable() == [pages[2], pages[0], pages[1]]
    pool.open(9, prompts[2])  # a hit on request 2's page: in use again
    pool.release(9)
    assert pool.evictable() == [pages[0], pages[1], pages[2]]
    pool.open(10, list(range(50, 58)))
    assert pool.reserve(10, 0, 8)  # 3 free pages, then the LRU page (request 0's) is evicted
    assert pool.evictable() == [pages[1], pages[2]]
    assert pool.open(11, prompts[0]) == 0 and pool.open(12, prompts[1]) == 2


def test_window_frees_pages_outside_it():
    window, ps = 10, 4
    pool = PagePool(num_pages=12, page_size=ps, windows=(window,))
    tokens = list(range(3))
    pool.open(0, tokens)
    computed = 0
    for _ in range(200):  # decode far past the window with a pool that holds 48 tokens
        end = advance(pool, 0, tokens, computed, len(tokens) - computed)
        assert end is not None
        table = pool.table(0)
        assert len(table.pages) <= -(-window // ps) + 1
        assert table.first == max(0, computed - window + 1) // ps  # exactly the pages queries from `computed` read
        computed, tokens = end, tokens + [len(tokens)]
    assert pool.slots(0, computed - 1, computed).tolist() == [
        table.pages[-1] * ps + (computed - 1) % ps]
    pool.release(0)
    assert pool.num_used == 0


def test_windowed_hit_takes_only_the_window():
    pool = PagePool(num_pages=32, page_size=4, windows=(None, 6))
    prompt = list(range(30))
    pool.open(0, prompt)
    for start in range(0, 30, 5):  # chunked prefill: the windowed group drops pages as it goes
        advance(pool, 0, prompt, start, 5)
    assert pool.table(0, 1).first == (25 - 6 + 1) // 4  # what queries from the last chunk's start read
    assert pool.open(1, prompt) == 28
    full, windowed = pool.table(1, 0), pool.table(1, 1)
    assert full.first == 0 and full.pages == pool.table(0, 0).pages[:7]
    assert windowed.first == (28 - 6 + 1) // 4 and windowed.end == 7
    assert windowed.pages == pool.table(0, 1).pages[: 7 - windowed.first]


def test_a_request_that_can_never_fit_is_refused_naming_the_field():
    pool = PagePool.from_tokens(max_total_tokens=64, page_size=16)
    assert pool.num_pages == 4 and pool.capacity_tokens == 64
    pool.check_fits(40, 25)  # 64 tokens in the cache: fits exactly
    with pytest.raises(RequestError) as err:
        pool.check_fits(40, 26)
    assert err.value.param == "max_tokens" and "--max-total-tokens" in str(err.value)
    with pytest.raises(RequestError) as err:
        pool.check_fits(65, 1, prompt_param="messages")
    assert err.value.param == "messages"
    windowed = PagePool.from_tokens(64, 16, windows=(20,))
    windowed.check_fits(40, 10_000)  # a window needs only its own pages, however long the request
    with pytest.raises(RequestError) as err:
        PagePool.from_tokens(8, 16)
    assert err.value.param == "max_total_tokens"


def test_chain_keys_are_a_chain():
    tokens = list(range(12))
    keys = chain_keys(tokens, 4)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert chain_keys(tokens, 4, start=keys[0], skip=1) == keys[1:]
    assert chain_keys([0, 1, 2, 3] + tokens[4:], 4) == keys
    assert chain_keys([9] + tokens[1:], 4)[2] != keys[2]  # a page's key depends on every token before it
