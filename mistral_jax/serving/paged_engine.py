"""The engine over a paged KV cache (opt-in, `--page-size`): the scheduler (serving/scheduler.py) plans each
iteration, decode tokens and prompt chunks of several requests under a token budget, over a page pool with a
prefix cache; the paged runner (serving/paged_runner.py) runs the plan. Requests, events, stop handling and
metrics are the slot engine's (engine.py); only where work is planned and run differs.

A request is submitted to the scheduler when it arrives (refused at once, naming the field, if it could never fit
in the pool); when the pool runs short the newest request is preempted and later recomputed from its prompt and
the output so far, so its stream goes on without a gap. On a mesh of one process or several the plan (page tables
and all: process 0 allocates, the others only run what it sends) is broadcast as the slot engine's is.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mistral_jax.config import ModelConfig
from mistral_jax.serving.engine import Engine, Request
from mistral_jax.serving.paged_runner import PagedModelRunner, PagedWork
from mistral_jax.serving.pages import PagePool
from mistral_jax.serving.requests import Event, RequestError, SamplingParams
from mistral_jax.serving.scheduler import Plan as SchedulerPlan
from mistral_jax.serving.scheduler import Scheduler

log = logging.getLogger(__name__)
DEFAULT_PAGE_SIZE = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256
DEFAULT_KV_BUDGET_BYTES = 2 << 30  # where the device reports no memory limit (the CPU)
KV_BUDGET_FRACTION = 0.8  # of a device's free memory after the weights, for the pages


@dataclasses.dataclass(frozen=True)
class _Iteration:
    plan: PagedWork  # what the runner runs (the engine's loop hands `.plan` to runner.run)


def kv_budget_bytes() -> int:
    """Bytes the pool may take by default: a share of the device's free memory, or DEFAULT_KV_BUDGET_BYTES."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * KV_BUDGET_FRACTION)
    return DEFAULT_KV_BUDGET_BYTES


def token_bytes(config: ModelConfig) -> int:
    """K and V bytes of one token over all layers in the paged cache."""
    dtype = np.dtype(config.kv_cache_dtype or config.compute_dtype)
    return 2 * config.n_layers * config.n_kv_heads * config.resolved_head_dim * dtype.itemsize


class PagedEngine(Engine):
    """`Engine` with a scheduler and a page pool in place of the slots (see the module docstring)."""

    def __init__(self, config: ModelConfig, params, tokenizer=None, *, page_size: int = DEFAULT_PAGE_SIZE,
                 max_total_tokens: int | None = None, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 max_batch: int = 8, max_seq_len: int | None = None, max_queue: int = 64, mesh=None,
                 warm_up: bool = True) -> None:
        """max_total_tokens: the pool's capacity in tokens over all requests (default: what the device's memory
        budget holds, at most max_batch full contexts); max_batch: running requests at most."""
        self.page_size, self.max_num_batched_tokens = page_size, max_num_batched_tokens
        self.max_total_tokens = max_total_tokens
        self.programs, self.warm_up_seconds = 0, 0.0
        self.preemptions = 0  # requests preempted (pages given back, recomputed later)
        self._queued_ids: set[int] = set()  # in the scheduler, never admitted yet (counted in the queue depth)
        super().__init__(config, params, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                         prefill_chunk=max_num_batched_tokens, max_queue=max_queue, mesh=mesh, warm_up=warm_up,
                         gate=False)

    def _make_runner(self, params, mesh, speculation, draft_params) -> PagedModelRunner:
        if self.max_total_tokens is None:
            budget = kv_budget_bytes() // token_bytes(self.config)
            if jax.process_count() > 1:  # every process allocates alike: process 0's budget sizes every pool
                budget = int(multihost_utils.broadcast_one_to_all(np.int64(budget)))
            self.max_total_tokens = max(self.max_seq_len, min(self.max_batch * self.max_seq_len, budget))
            log.info("paged KV cache: %d tokens by default (%.2f GiB; --max-total-tokens sets it)",
                     self.max_total_tokens, self.max_total_tokens * token_bytes(self.config) / 2**30)
        self._new_scheduler()
        return PagedModelRunner(self.config, params, num_pages=self.pool.num_pages, page_size=self.page_size,
                                max_batch=self.max_batch, max_num_batched_tokens=self.max_num_batched_tokens,
                                max_pages_per_seq=self.pool.pages_for(self.max_seq_len, self.max_num_batched_tokens),
                                mesh=mesh)

    def _new_scheduler(self) -> None:
        self.pool = PagePool.from_tokens(self.max_total_tokens, self.page_size, self.config.window_groups)
        self.scheduler = Scheduler(self.pool, self.max_batch, self.max_num_batched_tokens)
        self.metrics.kv_pages_total.set(self.pool.num_pages)
        self.metrics.kv_pages_used.set(0)
        self._prefix_counted = (0, 0)  # the scheduler's prefix counts already added to the metrics

    def warm_up(self) -> None:
        """Compile every (tokens, rows, pages) program now (self.programs of them, in self.warm_up_seconds)."""
        start = time.perf_counter()
        self.programs = self.runner.warm_up()
        self.warm_up_seconds = time.perf_counter() - start

    @property
    def active_slots(self) -> int:
        return len(self.scheduler.running)

    def _idle_plan(self, stop: bool = False) -> PagedWork:
        return PagedWork(SchedulerPlan(()), (), (), stop=stop)

    # Submitting ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None, after: Request | None = None) -> Request:
        params = params or SamplingParams()
        if params.penalized:
            raise RequestError("presence_penalty", "penalties are not paged yet (this server runs --page-size)")
        if params.echo_logprobs:
            raise RequestError("echo", "prompt logprobs are not paged yet (this server runs --page-size)")
        if params.grammar is not None:
            raise RequestError("response_format", "response_format: structured output is not paged yet (this server "
                                                  "runs --page-size)")
        if prompt:
            self.pool.check_fits(len(prompt), params.max_tokens)
        return super().submit(prompt, params, on_event, after)

    # Scheduling ---------------------------------------------------------------------------------
    def _schedule(self) -> _Iteration | None:
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._inflight[request.id] = request
            self._queued_ids.add(request.id)
            self.scheduler.submit(request.id, request.prompt, request.params.max_tokens, after=request.after)
            self.metrics.prompt_tokens.inc(len(request.prompt))
        self._drop_cancelled()
        plan = self.scheduler.schedule()
        if not plan.chunks and plan.preempted:  # everyone preempted this time: the next plan admits them again
            plan = self.scheduler.schedule()
        self.preemptions += len(plan.preempted)
        for request_id, _, _ in plan.admitted:
            if request_id in self._queued_ids:
                self._queued_ids.remove(request_id)
                self._count_queued(-1)
        self._update_gauges()
        if not plan.chunks:
            return None
        sampling = tuple(self._inflight[c.request_id].params for c in plan.chunks)
        index = tuple(len(self._inflight[c.request_id].generated) for c in plan.chunks)
        return _Iteration(PagedWork(plan, sampling, index))

    def _update_gauges(self) -> None:
        queries, hits = self.scheduler.prefix_queries_tokens, self.scheduler.prefix_hits_tokens
        self.metrics.prefix_cache_queries_tokens.inc(queries - self._prefix_counted[0])
        self.metrics.prefix_cache_hits_tokens.inc(hits - self._prefix_counted[1])
        self._prefix_counted = (queries, hits)
        self.metrics.kv_pages_used.set(self.pool.num_used)
        self.metrics.active_slots.set(self.active_slots)

    def _drop_cancelled(self) -> list[int]:
        for request in [r for r in self._inflight.values() if r.cancelled]:
            self._finish(request, Event((), "", finish_reason="cancelled"))
        return []

    # Results ------------------------------------------------------------------------------------
    def _consume(self, work: _Iteration, results) -> None:
        plan = work.plan.plan
        rows = {c.request_id: i for i, c in enumerate(plan.chunks) if c.sample}
        self.scheduler.update(plan, {request_id: int(results.tokens[i]) for request_id, i in rows.items()})
        for request_id, i in rows.items():
            request = self._inflight.get(request_id)
            if request is not None:
                self._on_token(request, results, i)
        self._update_gauges()

    def _finish(self, request: Request, event: Event) -> None:
        self.scheduler.finish(request.id)
        if request.id in self._queued_ids:
            self._queued_ids.remove(request.id)
            self._count_queued(-1)
        super()._finish(request, event)

    def _fail(self, err: Exception) -> None:
        """As the slot engine, then a fresh pool: the pages' contents (and so the prefix cache) are gone."""
        super()._fail(err)
        self._new_scheduler()
