"""The engine over a paged KV cache (opt-in, `--page-size`): the scheduler (serving/scheduler.py) plans each
iteration, decode tokens and prompt chunks of several requests under a token budget, over a page pool with a
prefix cache; the paged runner (serving/paged_runner.py) runs the plan. Requests, events, stop handling and
metrics are the slot engine's (engine.py); only where work is planned and run differs.

A request is submitted to the scheduler when it arrives (refused at once, naming the field, if it could never fit
in the pool); when the pool runs short the newest request is preempted and later recomputed from its prompt and
the output so far, so its stream goes on without a gap. On a mesh of one process or several the plan (page tables
and all: process 0 allocates, the others only run what it sends) is broadcast as the slot engine's is.

Sampling features follow the request, not a slot: penalty counts are rebuilt on the host from the request's prompt
and output for each iteration where some row is penalized; a grammar (structured output, forced tool calls) holds a
row of grammar state (`Constraints`) from arrival to finish, so a preempted request resumes its grammar where it was;
echoed prompt logprobs are scored once, when the request is first admitted.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from mistral_jax import decoding
from mistral_jax import sampling as sampling_stage
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.serving.adapters import Adapters
from mistral_jax.serving.engine import Engine, Request
from mistral_jax.serving.paged_runner import PagedModelRunner, PagedWork
from mistral_jax.serving.pages import PagePool
from mistral_jax.serving.requests import Event, RequestError, SamplingParams
from mistral_jax.serving.scheduler import Plan as SchedulerPlan
from mistral_jax.serving.scheduler import Scheduler

log = logging.getLogger(__name__)
DEFAULT_PAGE_SIZE = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256
# Where the device reports no memory limit (the CPU): 512 MiB, 11,648 tokens of SmolLM2 in float32, at least one
# full context (the pool never holds less). Resident, not reserved: a CPU server's RSS is the pool plus weights
# plus ~64 MB per compiled program (RESULTS.md, issue 24), and 2 GiB took it past 5 GB.
DEFAULT_KV_BUDGET_BYTES = 512 << 20
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


def unsupported(config: ModelConfig, mesh=None, speculation=None, adapters: Adapters | None = None,
                max_batch: int = 8, max_total_tokens: int | None = None) -> str | None:
    """Why the paged engine cannot serve this model or setting yet (None: it can); the engine factory falls back
    to the slot engine on it."""
    if speculation is not None:
        return "speculative decoding (--draft) is not paged yet"
    if jax.process_count() > 1 and max_total_tokens is None:  # a default from each host's free memory could differ
        return "several processes page only with --max-total-tokens (every process must size its pool alike)"
    if config.kv_cache_dtype == "int8":
        return "an int8 KV cache is not paged yet (--kv-cache-dtype int8)"
    if adapters is not None and adapters.max_loras < max_batch:  # every running request's adapter stays resident
        return f"LoRA adapters are paged with --max-loras ({adapters.max_loras}) at least --max-batch ({max_batch})"
    return None


class PagedEngine(Engine):
    """`Engine` with a scheduler and a page pool in place of the slots (see the module docstring)."""

    def __init__(self, config: ModelConfig, params, tokenizer=None, *, page_size: int = DEFAULT_PAGE_SIZE,
                 max_total_tokens: int | None = None, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 max_batch: int = 8, max_seq_len: int | None = None, max_queue: int = 64, mesh=None,
                 warm_up: bool = True, adapters: Adapters | None = None) -> None:
        """max_total_tokens: the pool's capacity in tokens over all requests (default: what the device's memory
        budget holds, at most max_batch full contexts); max_batch: running requests at most. adapters: LoRA
        adapters (serving/adapters.py), at least max_batch resident, so an admitted request always finds a slot."""
        reason = unsupported(config, mesh, adapters=adapters, max_batch=max_batch, max_total_tokens=max_total_tokens)
        if reason is not None:
            raise UserError(f"the paged engine cannot serve this yet: {reason}; --page-size 0 serves it from slots")
        self.page_size, self.max_num_batched_tokens = page_size, max_num_batched_tokens
        self.max_total_tokens = max_total_tokens
        self.programs, self.warm_up_seconds = 0, 0.0
        self.preemptions = 0  # requests preempted (pages given back, recomputed later)
        self._queued_ids: set[int] = set()  # in the scheduler, never admitted yet (counted in the queue depth)
        super().__init__(config, params, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                         prefill_chunk=max_num_batched_tokens, max_queue=max_queue, mesh=mesh, warm_up=warm_up,
                         gate=False, adapters=adapters)
        self._grammar_free = list(range(self.grammar_rows))[::-1]  # free rows of grammar state (Constraints)

    def _make_runner(self, params, mesh, speculation, draft_params) -> PagedModelRunner:
        if self.max_total_tokens is None:
            budget = kv_budget_bytes() // token_bytes(self.config)  # one process (several need the flag)
            self.max_total_tokens = max(self.max_seq_len, min(self.max_batch * self.max_seq_len, budget))
            log.info("paged KV cache: %d tokens by default (%.2f GiB; --max-total-tokens sets it)",
                     self.max_total_tokens, self.max_total_tokens * token_bytes(self.config) / 2**30)
        self._new_scheduler()
        return PagedModelRunner(self.config, params, num_pages=self.pool.num_pages, page_size=self.page_size,
                                max_batch=self.max_batch, max_num_batched_tokens=self.max_num_batched_tokens,
                                max_pages_per_seq=self.pool.pages_for(self.max_seq_len, self.max_num_batched_tokens),
                                mesh=mesh, adapters=self._adapter_table(mesh))

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

    @property
    def grammar_rows(self) -> int:
        """A row of grammar state per request in flight: running or waiting (max_queue), preempted ones included."""
        return self.max_batch + self.max_queue

    def _idle_plan(self, stop: bool = False) -> PagedWork:
        return PagedWork(SchedulerPlan(()), (), (), stop=stop)

    # Submitting ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None, adapter: str | None = None,
               after: Request | None = None) -> Request:
        params = params or SamplingParams()
        if prompt and len(prompt) + params.max_tokens <= self.max_seq_len:  # past the context: the slot engine's 400
            self.pool.check_fits(len(prompt), params.max_tokens)
        return super().submit(prompt, params, on_event, adapter=adapter, after=after)

    # Scheduling ---------------------------------------------------------------------------------
    def _schedule(self) -> _Iteration | None:
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._inflight[request.id] = request
            self._queued_ids.add(request.id)
            if request.params.grammar is not None and not self._start_grammar(request):
                continue
            self.scheduler.submit(request.id, request.prompt, request.params.max_tokens, request.adapter_path,
                                  after=request.after)
            self.metrics.prompt_tokens.inc(len(request.prompt))
        self._drop_cancelled()
        plan = self.scheduler.schedule()
        if not plan.chunks and plan.preempted:  # everyone preempted this time: the next plan admits them again
            plan = self.scheduler.schedule()
        self.preemptions += len(plan.preempted)
        loads = self._pin_adapters(plan)
        for request_id, _, _ in plan.admitted:
            if request_id in self._queued_ids:
                self._queued_ids.remove(request_id)
                self._count_queued(-1)
        self._update_gauges()
        if not plan.chunks:
            return None
        requests = [self._inflight[c.request_id] for c in plan.chunks]
        admitted = {request_id for request_id, _, _ in plan.admitted}
        echo = tuple((r.id, _padded(r.prompt)) for r in requests
                     if r.id in admitted and r.params.echo_logprobs and r.prompt_logprobs is None and len(r.prompt) > 1)
        adapters = tuple(max(r.adapter_slot, 0) for r in requests)
        return _Iteration(PagedWork(plan, tuple(r.params for r in requests), tuple(len(r.generated) for r in requests),
                                    self._allowed(plan, requests), self._counts(requests), echo, adapters, loads))

    def _allowed(self, plan, requests: list[Request]) -> np.ndarray | None:
        """The chunks' bitmasks [C, ceil(V / 32)]: a constrained chunk that samples has its grammar's (None: none)."""
        rows = [(i, r.slot) for i, (c, r) in enumerate(zip(plan.chunks, requests))
                if c.sample and r.params.grammar is not None]
        if not rows:
            return None
        allowed = np.full((len(requests), sampling_stage.packed_width(self.config.vocab_size)), -1, np.int32)
        for i, row in rows:
            allowed[i] = self._constraints.bitmask[row]
        return allowed

    def _counts(self, requests: list[Request]) -> sampling_stage.TokenCounts | None:
        """Penalized rows' token counts from their prompts and outputs so far (None: no row is penalized)."""
        penalized = [r.params.penalized for r in requests]
        if not any(penalized):
            return None
        return sampling_stage.token_counts([r.prompt if p else () for r, p in zip(requests, penalized)],
                                           [r.generated if p else () for r, p in zip(requests, penalized)],
                                           self.config.vocab_size)

    def _start_grammar(self, request: Request) -> bool:
        """A row of grammar state for the request, and its first token's bitmask; a grammar the vocabulary cannot
        match fails the request alone (False)."""
        if not self._grammar_free:  # more than max_batch + max_queue in flight (preemptions): refuse, never stall
            self._finish(request, Event((), "", finish_reason="error", error="response_format: too many constrained "
                                                                             "requests in flight; retry later"))
            return False
        request.slot = self._grammar_free.pop()
        try:
            self._timed(lambda: (self._constraints.start(request.slot, request.params.grammar),
                                 self._constraints.fill([request.slot])))
        except RequestError as err:
            self._finish(request, Event((), "", finish_reason="error", error=str(err)))
            return False
        return True

    def _pin_adapters(self, plan) -> tuple[tuple[int, str], ...]:
        """Admitted requests pin their adapter's slot, preempted ones let theirs go (max_loras >= max_batch: a
        slot is always free) -> the loads this iteration runs first."""
        if self.adapters is None:
            return ()
        for request_id in plan.preempted:
            request = self._inflight.get(request_id)
            if request is not None:
                if request.adapter_slot > 0:
                    self.adapters.release(request.adapter_slot)
                request.adapter_slot = -1
        for request_id, _, _ in plan.admitted:
            request = self._inflight[request_id]
            if request.adapter_slot < 0 and not self._pin_adapter(request):
                raise RuntimeError(f"no adapter slot for request {request_id}: max_loras < max_batch")
        loads, self._loads = tuple(self._loads), []
        return loads

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
        for request_id, sampled in results.echo.items():
            if request_id in self._inflight:
                self._echoed(self._inflight[request_id], sampled)
        rows = {c.request_id: i for i, c in enumerate(plan.chunks) if c.sample}
        self.scheduler.update(plan, {request_id: int(results.decode.tokens[i]) for request_id, i in rows.items()})
        for request_id, i in rows.items():
            request = self._inflight.get(request_id)
            if request is not None:
                self._on_token(request, results.decode, i)
        self._update_gauges()

    def _finish(self, request: Request, event: Event) -> None:
        self.scheduler.finish(request.id)
        if request.id in self._queued_ids:
            self._queued_ids.remove(request.id)
            self._count_queued(-1)
        if request.slot >= 0:  # its row of grammar state
            self._constraints.release(request.slot)
            self._grammar_free.append(request.slot)
            request.slot = -1
        super()._finish(request, event)

    def _fail(self, err: Exception) -> None:
        """As the slot engine, then a fresh pool: the pages' contents (and so the prefix cache) are gone."""
        super()._fail(err)
        self._new_scheduler()


def _padded(prompt: Sequence[int]) -> np.ndarray:
    """A prompt right padded to a power of two, int32 [1, T] (the prompt scorer's buckets, as the slot engine's)."""
    tokens = np.zeros((1, decoding.round_up_pow2(len(prompt))), np.int32)
    tokens[0, :len(prompt)] = prompt
    return tokens
