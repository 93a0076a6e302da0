"""serving/scheduler.py, played against a cache of token ids: every query must see exactly its own sequence's
tokens through its page tables, and outputs must equal an unscheduled run, under budgets, prefix hits,
preemption and cancellations."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from mistral_jax.serving.pages import PagePool
from mistral_jax.serving.requests import RequestError
from mistral_jax.serving.scheduler import Plan, Scheduler

VOCAB = 50


def next_token(tokens) -> int:
    """A stand-in model: a function of the whole sequence, so a lost, repeated or misplaced token shows."""
    return (sum(int(t) * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % VOCAB


def alone(prompt, max_tokens) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class TokenCache:
    """The device's side of a plan with token ids for K/V: writes each chunk into its pages, then checks that each
    query position reads exactly the positions its window shows, holding its own sequence's tokens."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.token = np.full(pool.num_pages * pool.page_size, -1)
        self.position = np.full(pool.num_pages * pool.page_size, -1)

    def slot(self, table, p: int) -> int:
        logical = p // self.pool.page_size
        assert table.first <= logical < table.end, f"position {p} is outside pages {table.first}..{table.end - 1}"
        return table.pages[logical - table.first] * self.pool.page_size + p % self.pool.page_size

    def run(self, plan: Plan, scheduler: Scheduler) -> dict[int, int]:
        assert plan.num_tokens <= scheduler.max_num_batched_tokens
        assert len({c.request_id for c in plan.chunks}) == len(plan.chunks)
        sequences = {c.request_id: scheduler.find(c.request_id).tokens for c in plan.chunks}
        for chunk in plan.chunks:  # a step writes every chunk's K/V first ...
            assert chunk.token_ids == sequences[chunk.request_id][chunk.start:chunk.end]
            for table in chunk.tables:
                for p in range(chunk.start, chunk.end):
                    slot = self.slot(table, p)
                    self.token[slot], self.position[slot] = chunk.token_ids[p - chunk.start], p
        sampled = {}
        for chunk in plan.chunks:  # ... then every query reads its pages
            tokens = sequences[chunk.request_id]
            for window, table in zip(self.pool.windows, chunk.tables):
                for q in range(chunk.start, chunk.end):
                    seen = [self.slot(table, p) for p in range(0 if window is None else max(0, q - window + 1), q + 1)]
                    assert self.position[seen].tolist() == list(range(q + 1 - len(seen), q + 1))
                    assert self.token[seen].tolist() == list(tokens[q + 1 - len(seen):q + 1])
            if chunk.sample:
                sampled[chunk.request_id] = next_token(tokens[:chunk.end])
        return sampled


def drain(scheduler: Scheduler, cache: TokenCache, steps: int = 10_000) -> dict[int, list[int]]:
    outputs = {}
    for _ in range(steps):
        if not scheduler.running and not scheduler.waiting:
            return outputs
        plan = scheduler.schedule()
        for rid in scheduler.update(plan, cache.run(plan, scheduler)):
            outputs[rid] = None
        for seq in list(scheduler.running):
            if seq.request_id in outputs:
                raise AssertionError("a finished request still runs")
    raise AssertionError("the scheduler did not drain")


@pytest.mark.parametrize("windows, num_pages", [((None,), 24), ((12,), 10), ((None, 9), 24)])
def test_random_traffic_matches_unscheduled_runs(windows, num_pages):
    rng = np.random.default_rng(len(windows) + (windows[-1] or 0))
    pool = PagePool(num_pages=num_pages, page_size=4, windows=windows)
    scheduler = Scheduler(pool, max_num_seqs=5, max_num_batched_tokens=20)
    cache = TokenCache(pool)
    systems = [list(rng.integers(0, VOCAB, n)) for n in (9, 13)]  # shared prefixes: prefix hits
    submitted, expected, finished, cancelled, preemptions = 0, {}, {}, 0, 0
    while submitted < 200 or scheduler.running or scheduler.waiting:
        if submitted < 200 and rng.random() < 0.4:
            after = submitted - 1 if submitted and submitted - 1 in expected and rng.random() < 0.2 else None
            prompt = list(expected[after][0].prompt) if after is not None else (
                systems[rng.integers(2)][: rng.integers(0, 14)] + list(rng.integers(0, VOCAB, rng.integers(1, 12))))
            max_tokens = int(rng.integers(1, 25))
            try:
                seq = scheduler.submit(submitted, prompt, max_tokens, after=after)  # after: another of n choices
                expected[submitted] = (seq, alone(prompt, max_tokens))
            except RequestError as err:
                assert err.param == "max_tokens"
            submitted += 1
        live = scheduler.running + scheduler.waiting
        if live and rng.random() < 0.03:  # a cancel or disconnect, at any point
            scheduler.finish(live[rng.integers(len(live))].request_id)
            cancelled += 1
        plan = scheduler.schedule()
        preemptions += len(plan.preempted)
        assert len(scheduler.running) <= scheduler.max_num_seqs
        for rid in scheduler.update(plan, cache.run(plan, scheduler)):
            finished[rid] = expected[rid][0].output
    for rid, output in finished.items():
        assert output == expected[rid][1], rid
    assert len(finished) + cancelled >= 150 and preemptions > 0 and scheduler.prefix_hits_tokens > 0
    assert pool.num_used == 0 and pool.num_free == pool.num_pages


def test_budget_mixes_decodes_with_chunks_of_several_prompts():
    scheduler = Scheduler(PagePool(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    cache = TokenCache(scheduler.pool)
    for rid in range(3):
        scheduler.submit(rid, [rid + 1] * 3, max_tokens=10)
    plan = scheduler.schedule()
    assert [(c.request_id, c.start, len(c.token_ids), c.sample) for c in plan.chunks] == [
        (0, 0, 3, True), (1, 0, 3, True), (2, 0, 3, True)]
    scheduler.update(plan, cache.run(plan, scheduler))
    scheduler.submit(3, list(range(10)), max_tokens=4)
    scheduler.submit(4, list(range(20, 40)), max_tokens=4)
    plan = scheduler.schedule()  # 3 decode tokens, all 10 of prompt 3 and the first 3 of prompt 4
    assert [(c.request_id, c.start, len(c.token_ids), c.sample) for c in plan.chunks] == [
        (0, 3, 1, True), (1, 3, 1, True), (2, 3, 1, True), (3, 0, 10, True), (4, 0, 3, False)]
    assert plan.num_tokens == 16 and [a[0] for a in plan.admitted] == [3, 4]
    scheduler.update(plan, cache.run(plan, scheduler))
    plan = scheduler.schedule()  # decodes first (now four), then the rest of prompt 4 under the budget
    assert [(c.request_id, c.start, len(c.token_ids)) for c in plan.chunks] == [
        (0, 4, 1), (1, 4, 1), (2, 4, 1), (3, 10, 1), (4, 3, 12)]


def test_the_newest_request_is_preempted_and_recomputed():
    pool = PagePool(num_pages=6, page_size=4)
    scheduler = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=32)
    cache = TokenCache(pool)
    old = scheduler.submit(0, [1, 2, 3, 4, 5], max_tokens=14)  # at most 18 tokens in the cache: 5 pages
    new = scheduler.submit(1, [7, 8, 9], max_tokens=12)  # 14 tokens, 4 pages: both cannot grow to the end
    plans = []
    while scheduler.running or scheduler.waiting:
        plans.append(scheduler.schedule())
        scheduler.update(plans[-1], cache.run(plans[-1], scheduler))
    preempting = [p for p in plans if p.preempted]
    assert preempting and all(p.preempted == (1,) for p in preempting)
    assert new.preemptions >= 1 and old.preemptions == 0
    assert old.output == alone(old.prompt, 14) and new.output == alone(new.prompt, 12)  # no gap after recompute
    assert pool.num_used == 0


def test_a_prefix_hit_starts_past_the_cached_pages():
    pool = PagePool(num_pages=32, page_size=4)
    scheduler = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    cache = TokenCache(pool)
    system = list(range(10, 21))  # 11 tokens: 2 full pages
    scheduler.submit(0, system + [1], max_tokens=2)
    drain(scheduler, cache)
    second = scheduler.submit(1, system + [2, 3], max_tokens=3)
    plan = scheduler.schedule()
    assert plan.admitted == ((1, 13, 8),) and plan.chunks[0].start == 8 and len(plan.chunks[0].token_ids) == 5
    scheduler.update(plan, cache.run(plan, scheduler))
    drain(scheduler, cache)
    assert second.output == alone(second.prompt, 3)
    assert (scheduler.prefix_queries_tokens, scheduler.prefix_hits_tokens) == (12 + 13, 8)


def test_admission_refuses_what_can_never_fit():
    scheduler = Scheduler(PagePool.from_tokens(64, 16), max_num_seqs=2, max_num_batched_tokens=64)
    with pytest.raises(RequestError) as err:
        scheduler.submit(0, [1] * 60, max_tokens=10)
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestError) as err:
        scheduler.submit(0, [1] * 70, max_tokens=1, prompt_param="messages")
    assert err.value.param == "messages"
    assert not scheduler.waiting
    with pytest.raises(RequestError) as err:
        Scheduler(PagePool(4, 4), max_num_seqs=8, max_num_batched_tokens=4)
    assert err.value.param == "max_num_batched_tokens"


def test_cancelling_frees_pages_at_once():
    pool = PagePool(num_pages=16, page_size=4)
    scheduler = Scheduler(pool, max_num_seqs=1, max_num_batched_tokens=8)
    cache = TokenCache(pool)
    scheduler.submit(0, list(range(12)), max_tokens=5)
    scheduler.submit(1, list(range(5)), max_tokens=5)
    plan = scheduler.schedule()
    scheduler.update(plan, cache.run(plan, scheduler))
    assert [s.request_id for s in scheduler.running] == [0] and pool.num_used == 2
    assert scheduler.finish(0) and pool.num_used == 0
    assert scheduler.finish(1) and not scheduler.finish(1)
    assert scheduler.schedule().chunks == ()


def test_choices_of_one_prompt_share_its_pages():
    pool = PagePool(num_pages=32, page_size=4)
    scheduler = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    cache = TokenCache(pool)
    prompt = list(range(30, 40))  # 10 tokens: 2 full pages and a partial one
    choices = [scheduler.submit(0, prompt, max_tokens=5)]
    choices += [scheduler.submit(rid, prompt, max_tokens=5, after=0) for rid in (1, 2)]
    plan = scheduler.schedule()
    assert [(c.request_id, c.start, len(c.token_ids)) for c in plan.chunks] == [(0, 0, 10)]  # the others wait
    scheduler.update(plan, cache.run(plan, scheduler))
    plan = scheduler.schedule()
    assert plan.admitted == ((1, 10, 8), (2, 10, 8))
    shared = pool.table(0).pages[:2]
    assert pool.table(1).pages[:2] == shared == pool.table(2).pages[:2] and pool.refcount(shared[0]) == 3
    scheduler.update(plan, cache.run(plan, scheduler))
    drain(scheduler, cache)
    assert all(c.output == alone(prompt, 5) for c in choices)


def test_a_plan_is_plain_data():
    scheduler = Scheduler(PagePool(8, 4, windows=(None, 5)), max_num_seqs=2, max_num_batched_tokens=8)
    scheduler.submit(0, [1, 2, 3, 4, 5, 6], max_tokens=3)
    plan = scheduler.schedule()
    assert pickle.loads(pickle.dumps(plan)) == plan  # what lockstep.broadcast sends to every process
    assert len(plan.chunks[0].tables) == 2


def test_a_windowed_prompt_alone_starts_with_chunks_that_fit():
    pool = PagePool(num_pages=4, page_size=4, windows=(12,))  # a window's 12 tokens plus a page: all of it
    scheduler = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=20)
    cache = TokenCache(pool)
    seq = scheduler.submit(0, list(range(40)), max_tokens=6)
    plan = scheduler.schedule()
    assert plan.chunks and len(plan.chunks[0].token_ids) < 20  # 20 tokens would need 5 pages
    scheduler.update(plan, cache.run(plan, scheduler))
    drain(scheduler, cache)
    assert seq.output == alone(seq.prompt, 6) and pool.num_used == 0
