"""The scheduler: which requests run in an iteration and how many of their tokens, under a token budget (NumPy only).

Each iteration carries, within `max_num_batched_tokens`, first one decode token of every running request that has
one, then chunks of the running requests still prefilling, then chunks of waiting prompts (several may start in
one iteration), oldest first, while fewer than `max_num_seqs` run. A new request starts from the longest prefix
the page pool has cached. When the pool runs out, the newest running request is preempted: its pages go back and
it waits again, to be recomputed (prompt and output so far) later, so its output continues without a gap.
`schedule` returns a `Plan` (plain data, which a multi-host server broadcasts); `update` records what it sampled.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence

from mistral_jax.serving.pages import PagePool, PageTable
from mistral_jax.serving.requests import RequestError


@dataclasses.dataclass(eq=False)
class SequenceState:
    """One request as the scheduler tracks it."""

    request_id: int
    prompt: tuple[int, ...]
    max_tokens: int
    arrival: int  # submission order: the newest is preempted first
    adapter: str | None = None  # part of the prefix cache's key
    after: int | None = None  # a request with the same prompt (n > 1): start once its prompt is cached, sharing it
    output: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # leading tokens whose K/V are in the cache
    preemptions: int = 0

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + tuple(self.output)

    @property
    def pending(self) -> int:
        """Tokens to compute before the next one can be sampled."""
        return len(self.prompt) + len(self.output) - self.computed


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request that this iteration computes, and the pages they read and write."""

    request_id: int
    start: int  # position of token_ids[0]
    token_ids: tuple[int, ...]  # a prompt chunk, or the latest token when decoding
    sample: bool  # the chunk reaches the sequence's last token: sample the next one
    tables: tuple[PageTable, ...]  # one per layer group (PagePool.windows), covering positions start .. end - 1

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One iteration's work: decode tokens and prompt chunks of several requests."""

    chunks: tuple[ScheduledChunk, ...]  # decodes first, then prefill chunks, each request at most once
    preempted: tuple[int, ...] = ()  # requests whose pages went back; they wait to be recomputed
    admitted: tuple[tuple[int, int, int], ...] = ()  # (request id, tokens looked up, tokens found cached)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    """Waiting and running requests over one PagePool (see the module docstring)."""

    def __init__(self, pool: PagePool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1:
            raise RequestError("max_batch", f"max_batch must be positive, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise RequestError("max_num_batched_tokens", f"max_num_batched_tokens ({max_num_batched_tokens}) must "
                                                         f"hold one decode token per running request ({max_num_seqs})")
        self.pool, self.max_num_seqs, self.max_num_batched_tokens = pool, max_num_seqs, max_num_batched_tokens
        self.waiting: list[SequenceState] = []  # by arrival, oldest first (preempted requests rejoin in order)
        self.running: list[SequenceState] = []  # by arrival
        self._arrivals = 0
        self.prefix_queries_tokens = 0  # mistral_jax_prefix_cache_queries_tokens
        self.prefix_hits_tokens = 0  # mistral_jax_prefix_cache_hits_tokens

    # Requests -------------------------------------------------------------------------------------
    def submit(self, request_id: int, prompt: Sequence[int], max_tokens: int, adapter: str | None = None,
               prompt_param: str = "prompt", after: int | None = None) -> SequenceState:
        """Queue a request; a RequestError (naming the field) if it could never fit in the pool.

        after: the id of a request with the same prompt (another of n choices); this one waits until that one's
        prompt pages are cached, then shares them (all but the prompt's last partial page).
        """
        if not prompt:
            raise RequestError(prompt_param, "the prompt is empty")
        if max_tokens < 1:
            raise RequestError("max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
        if self.find(request_id) is not None:
            raise ValueError(f"request {request_id} is already scheduled")
        self.pool.check_fits(len(prompt), max_tokens, prompt_param)
        seq = SequenceState(request_id, tuple(int(t) for t in prompt), max_tokens, self._arrivals, adapter, after)
        self._arrivals += 1
        self.waiting.append(seq)
        return seq

    def find(self, request_id: int) -> SequenceState | None:
        return next((s for s in self.running + self.waiting if s.request_id == request_id), None)

    def finish(self, request_id: int) -> bool:
        """The request ended (stop, cancel, disconnect): drop it and free its pages. False if unknown."""
        for queue in (self.running, self.waiting):
            for i, seq in enumerate(queue):
                if seq.request_id == request_id:
                    del queue[i]
                    if self.pool.holds(request_id):
                        self.pool.release(request_id)
                    return True
        return False

    # Planning -------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """The next iteration's Plan (empty when nothing waits or runs)."""
        counts: dict[int, int] = {}  # request id -> tokens scheduled (a preempted request's are given back)
        preempted: list[int] = []
        decoding = [s for s in self.running if s.pending == 1]
        prefilling = [s for s in self.running if s.pending > 1]
        for seq in decoding + prefilling:
            budget = self.max_num_batched_tokens - sum(counts.values())
            if seq not in self.running or budget == 0:  # preempted meanwhile, or no budget left
                continue
            count = self._reserve_running(seq, min(seq.pending, budget), counts, preempted)
            if count:
                counts[seq.request_id] = count
        budget = self.max_num_batched_tokens - sum(counts.values())
        admitted = []
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs or preempted:
                break
            if self._sibling_prefilling(seq):
                continue  # its prompt is being computed by another choice: share it next iteration
            tokens = seq.tokens
            hit = self.pool.open(seq.request_id, tokens, seq.adapter)
            count = min(len(tokens) - hit, budget)
            while not self.pool.reserve(seq.request_id, hit, hit + count):
                if self.running or count == 1:  # wait for pages to come back
                    count = 0
                    break
                count //= 2  # alone, a windowed prompt may need smaller chunks than the budget allows
            if not count:
                self.pool.release(seq.request_id)
                break
            self.waiting.remove(seq)
            seq.computed = hit
            self.running.insert(bisect.bisect([s.arrival for s in self.running], seq.arrival), seq)
            counts[seq.request_id] = count
            budget -= count
            admitted.append((seq.request_id, len(tokens), hit))
            self.prefix_queries_tokens += len(tokens)
            self.prefix_hits_tokens += hit
        order = [s for s in decoding + prefilling if s.request_id in counts]
        order += [s for s in self.running if s.request_id in counts and s not in order]
        return Plan(tuple(self._chunk(s, counts[s.request_id]) for s in order), tuple(preempted), tuple(admitted))

    def _sibling_prefilling(self, seq: SequenceState) -> bool:
        """Whether the request `seq` shares its prompt with is admitted and still computing that prompt."""
        sibling = None if seq.after is None else next((s for s in self.running if s.request_id == seq.after), None)
        return sibling is not None and sibling.computed < len(seq.prompt)

    def _reserve_running(self, seq: SequenceState, count: int, counts: dict[int, int], preempted: list[int]) -> int:
        """Reserve pages for `count` tokens of a running request, preempting the newest requests while the pool is
        short (a chunk shrinks before its own request is preempted). Returns the tokens reserved (0: preempted)."""
        while not self.pool.reserve(seq.request_id, seq.computed, seq.computed + count):
            victim = self.running[-1]
            if victim is seq and count > 1:
                count //= 2
                continue
            self._preempt(victim, counts, preempted)
            if victim is seq:
                return 0
        return count

    def _preempt(self, seq: SequenceState, counts: dict[int, int], preempted: list[int]) -> None:
        self.running.remove(seq)
        self.pool.release(seq.request_id)
        counts.pop(seq.request_id, None)
        seq.computed, seq.preemptions = 0, seq.preemptions + 1
        self.waiting.insert(bisect.bisect([s.arrival for s in self.waiting], seq.arrival), seq)
        preempted.append(seq.request_id)

    def _chunk(self, seq: SequenceState, count: int) -> ScheduledChunk:
        start = seq.computed
        return ScheduledChunk(seq.request_id, start, seq.tokens[start:start + count], start + count == len(seq.tokens),
                              tuple(self.pool.table(seq.request_id, g) for g in range(len(self.pool.windows))))

    # Results --------------------------------------------------------------------------------------
    def update(self, plan: Plan, sampled: Mapping[int, int]) -> list[int]:
        """Record a plan's run: its tokens' K/V are written, and `sampled` holds the new token of each chunk that
        samples. Returns the requests that reached max_tokens (finished, their pages freed)."""
        finished = []
        for chunk in plan.chunks:
            seq = next((s for s in self.running if s.request_id == chunk.request_id), None)
            if seq is None:  # finished (cancelled) while the plan ran
                continue
            seq.computed = chunk.end
            self.pool.commit(seq.request_id, seq.tokens[:seq.computed])
            if chunk.sample:
                seq.output.append(int(sampled[seq.request_id]))
                if len(seq.output) >= seq.max_tokens:
                    self.finish(seq.request_id)
                    finished.append(seq.request_id)
        return finished
