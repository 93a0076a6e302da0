"""The serving engine: continuous batching over a fixed number of decode slots (no HTTP here).

Every iteration runs one decode step for all slots, then prefill chunks of waiting prompts, at most
`prefill_chunk` tokens of them, so a long prompt stalls the streaming rows for one chunk at most. A prompt
is prefilled into a cache of its own row and copied into a free slot with its first token; a finished or
cancelled request frees its slot at once, and the next iteration refills it from the queue.

With a `Speculation` (speculative.py, prompt lookup), each decode step drafts k tokens per slot from the slot's own
prompt and output, verifies them in one forward for all slots, and keeps per slot what its own sampling settings
accept (greedy: plain greedy's tokens); the host then hands each request its one to k + 1 new tokens in order.
A gate (serving/gate.py) lets a step verify drafts only where the expected tokens per second beat a plain step,
from each width's cost timed at warm-up and the drafts kept so far (a full CPU batch of chat rarely pays).

Structured output (`SamplingParams.response_format`): the engine keeps a grammar per constrained slot
(serving/constrained.py), advances it with each sampled token on this thread (never the event loop) and fills the
slot's allowed-token bitmask for the next step, which travels with the step's inputs (traced: constrained requests
coming and going compile nothing). A grammar that ends finishes its request with "stop". Speculation is off while a
constrained slot decodes (prompt lookup's steps run at width 0); a draft-model engine refuses constrained requests.

Scheduling is host work on process 0 (`Engine`); what the devices do is a `Plan` (serving/runner.py),
broadcast to every process on a multi-host mesh so all of them run the same programs in lockstep.

    engine = Engine(config, params, tokenizer)
    engine.start()
    for event in engine.submit(prompt_ids, SamplingParams(max_tokens=32)):
        print(event.text, end="")
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from mistral_jax import decoding
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.sampling import packed_width
from mistral_jax.serving import lockstep
from mistral_jax.serving.adapters import Adapters, AdapterTable
from mistral_jax.serving.constrained import Constraints
from mistral_jax.serving.gate import WidthGate
from mistral_jax.serving.metrics import ServingMetrics
from mistral_jax.serving.requests import Event, ModelNotFound, QueueFull, RequestError, SamplingParams, TokenLogprob
from mistral_jax.serving.runner import DecodeInputs, ModelRunner, Plan, PrefillChunk, Sampled
from mistral_jax.serving.text import StopText
from mistral_jax.speculative import Speculation

log = logging.getLogger(__name__)
_IDLE_PLAN_SECONDS = 1.0  # an idle multi-host engine still sends an empty plan this often, so followers wait


class Request:
    """A submitted request. Iterate it for its `Event`s (unless submit got `on_event`); `cancel` frees its slot."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 text: StopText | None, on_event: Callable[[Event], None] | None, adapter: str | None = None) -> None:
        self.id, self.prompt, self.params, self.stop_ids, self.text = request_id, prompt, params, stop_ids, text
        self.adapter = adapter  # the LoRA adapter's name (None: the base model)
        self.adapter_path: str | None = None  # where it was read from when the request came (kept if unloaded)
        self.adapter_slot = -1  # its slot in the device table while it holds a decode slot (0: none)
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._on_event = on_event or self._events.put
        self._cancelled = threading.Event()
        self.generated: list[int] = []
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []  # the prompt's prefill chunks ([1, C] tokens, positions)
        self.next_chunk = 0
        self.slot = -1
        self.decoding = False  # holds a slot with its first token
        self.prompt_logprobs: tuple | None = None
        self.submitted = self.last_token_at = time.monotonic()
        self.finish_reason: str | None = None
        self.accepted_drafts = 0  # speculating: drafted tokens the model kept for this request
        self.after: int | None = None  # another choice of the same prompt (n > 1), whose prompt pages it may share

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine frees the slot within one step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def deliver(self, event: Event) -> None:
        try:
            self._on_event(event)
        except Exception:  # a consumer that fails (a closed event loop) must not stop the engine
            log.exception("request %d: delivering an event failed; cancelling it", self.id)
            self.cancel()


@dataclasses.dataclass
class _Work:
    """What one iteration's plan covers, to read its results back."""

    plan: Plan
    decoding: list[int]  # slots whose request the decode step advanced


class Engine:
    """Slots, queue and scheduler over one `ModelRunner`. `start()` runs it in a thread (process 0);
    other processes of a multi-host mesh call `follow()`."""

    def __init__(self, config: ModelConfig, params, tokenizer=None, *, max_batch: int = 8,
                 max_seq_len: int | None = None, prefill_chunk: int = decoding.DEFAULT_PREFILL_CHUNK,
                 max_queue: int = 64, mesh=None, warm_up: bool = True, speculation: Speculation | None = None,
                 draft_params=None, gate: bool | WidthGate = True, adapters: Adapters | None = None) -> None:
        """speculation: speculative decoding per slot, by prompt lookup or (speculation.draft_config, draft_params).
        gate: prompt lookup verifies drafts only where that is expected to pay (serving/gate.py): True times the
        widths at warm-up, a WidthGate brings its own costs, False verifies wherever slots draft.
        adapters: LoRA adapters a request may pick by name (serving/adapters.py), resident in a device table."""
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise RequestError(None, "max_batch, max_queue and prefill_chunk must be positive")
        draft_config = None if speculation is None else speculation.draft_config
        if draft_config is not None and draft_config.vocab_size != config.vocab_size:
            raise UserError(f"the draft model's vocabulary ({draft_config.vocab_size}) differs from the model's "
                            f"({config.vocab_size}): a draft model must share the tokenizer")
        self.config, self.tokenizer = config, tokenizer
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.metrics = ServingMetrics()
        self.adapters = adapters
        self._loads: list[tuple[int, str]] = []  # adapter loads the next plan carries
        self.runner = self._make_runner(params, mesh, speculation, draft_params)
        self._multihost = jax.process_count() > 1
        self._slots: list[Request | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: list[Request] = []  # slot reserved, chunks left to plan
        self._inflight: dict[int, Request] = {}
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._queued = 0  # submitted, not yet given a slot
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._accepting = True
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._stop_ids = frozenset(getattr(tokenizer, "stop_ids", ()) or ())
        self._gate = gate if isinstance(gate, WidthGate) else None
        self._time_widths = gate is True  # the gate is built from warm-up's timings
        self._constraints: Constraints | None = None  # built with the first constrained request (structured())
        self._unconstrained = np.full((max_batch, packed_width(config.vocab_size)), -1, np.int32)
        self.mask_seconds = 0.0  # host time advancing grammars and filling bitmasks (benchmarks read it)
        self.constrained_steps = 0  # decode steps with a constrained slot
        if warm_up:
            self.warm_up()

    def _make_runner(self, params, mesh, speculation, draft_params):
        """The device side: the slots' ModelRunner (a paged engine makes its own)."""
        return ModelRunner(self.config, params, max_batch=self.max_batch, max_seq_len=self.max_seq_len, mesh=mesh,
                           speculation=speculation, draft_params=draft_params, adapters=self._adapter_table(mesh))

    def _adapter_table(self, mesh=None) -> AdapterTable | None:
        """The device table of the adapters, replicated over `mesh` (None without any: the plain programs)."""
        a = self.adapters
        return None if a is None else AdapterTable(self.config, a.max_loras, a.max_lora_rank, mesh)

    # Submitting ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None, adapter: str | None = None,
               after: Request | None = None) -> Request:
        """Queue a request of prompt token ids, on LoRA `adapter` (a name; None: the base). Raises RequestError
        (bad input), ModelNotFound (an adapter not served) or QueueFull (try later). after: an earlier request with
        the same prompt (another of n choices): a paged engine shares its prompt's pages; the slots run the two as
        separate rows."""
        params = params or SamplingParams()
        try:
            adapter_path = None if adapter is None else self.adapters.path(adapter)
        except (AttributeError, KeyError):  # no adapters served, or not this one
            raise ModelNotFound(adapter) from None
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RequestError("prompt", "the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise RequestError("prompt", f"token ids must lie in [0, {self.config.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise RequestError("max_tokens", f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} "
                                             f"exceed the context of {self.max_seq_len} tokens")
        params.check_vocab(self.config.vocab_size)
        if params.grammar is not None:
            if self.runner.draft_config is not None:
                raise RequestError("response_format", "response_format: structured output is not supported with a "
                                                      "draft model (its drafts are not checked against the grammar)")
            self.structured()
        if params.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need a tokenizer; this engine has none")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._stop_ids)
        text = StopText(self.tokenizer.decode_stream(), params.stop) if self.tokenizer is not None else None
        request = Request(next(self._ids), prompt, params, stop_ids, text, on_event, adapter)
        request.adapter_path = adapter_path
        if after is not None:
            if after.prompt != prompt or after.adapter != adapter:
                raise ValueError("after: a request sharing its prompt must have the same prompt and adapter")
            request.after = after.id
        with self._lock:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if self._queued >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._queued += 1
            self.metrics.queue_depth.set(self._queued)
        self._inbox.put(request)
        self._wake.set()
        return request

    def structured(self) -> Constraints:
        """The grammar matcher of every slot, built once (~1 s for a 49k vocabulary: call it off the event loop)."""
        with self._lock:
            if self._constraints is None:
                if self.tokenizer is None:
                    raise RequestError("response_format", "response_format: structured output needs a tokenizer")
                self._constraints = Constraints(self.tokenizer, self.grammar_rows)
            return self._constraints

    @property
    def grammar_rows(self) -> int:
        """Rows of grammar state: one per slot (a paged engine keeps one per request in flight)."""
        return self.max_batch

    # Running ------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the scheduler in a background thread (process 0 of a multi-host mesh)."""
        self._thread = threading.Thread(target=self._run, name="mistral-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; let what is in flight finish for up to `timeout` seconds, cancel the rest."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            time.sleep(0.01)
        self._stop_requested.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def busy(self) -> bool:
        return bool(self._queued or self._inflight)

    @property
    def active_slots(self) -> int:
        return sum(r is not None for r in self._slots)

    def follow(self) -> None:
        """Processes other than 0: run process 0's plans until it stops."""
        while True:
            plan = lockstep.broadcast(None)
            if plan.stop:
                return
            self.runner.run(plan)

    def _idle_plan(self, stop: bool = False):
        """What followers run when process 0 has nothing to do (or stops): its runner's empty plan."""
        return Plan(stop=stop)

    def _run(self) -> None:
        while True:
            if self._stop_requested.is_set():
                self._cancel_all()
                if self._multihost:
                    lockstep.broadcast(self._idle_plan(stop=True))
                return
            work = self._schedule()
            if work is None:
                self._wake.wait(_IDLE_PLAN_SECONDS)
                self._wake.clear()
                if self._multihost:
                    lockstep.broadcast(self._idle_plan())
                continue
            plan = lockstep.broadcast(work.plan) if self._multihost else work.plan
            try:
                results = self.runner.run(plan)
            except Exception as err:  # a device failure fails what the plan carried, and the engine goes on
                log.exception("an engine iteration failed")
                self._fail(err)
                continue
            self._consume(work, results)

    def warm_up(self) -> None:
        """Compile the decode step and every prefill bucket now rather than on the first requests."""
        chunks = sorted({decoding.chunk_layout(1 << n, self.runner.cache_size, self.prefill_chunk)[0]
                         for n in range(self.max_seq_len.bit_length())})
        sampling, prompt = SamplingParams(), (0,)
        first = [PrefillChunk(-1, np.zeros((1, c), np.int32), np.arange(c, dtype=np.int32)[None], True, 0, sampling,
                              prompt) for c in chunks]
        c = chunks[-1]
        if 2 * c <= self.max_seq_len:  # a prompt of several chunks: the later ones attend to the cache too
            first += [PrefillChunk(-2, np.zeros((1, c), np.int32), np.arange(c, dtype=np.int32)[None], True),
                      PrefillChunk(-2, np.zeros((1, c), np.int32), np.arange(c, 2 * c, dtype=np.int32)[None], False,
                                   0, sampling, prompt)]
        self.runner.run(Plan(prefills=tuple(first)))
        if self.runner.adapters is not None:
            self.runner.adapters.warm_up()
        costs = self.runner.warm_up(self._decode_inputs([])[0], repeats=3 if self._time_widths else 0)
        if costs is not None and self._time_widths:
            self._gate = WidthGate(costs)

    # Scheduling ---------------------------------------------------------------------------------
    def _schedule(self) -> _Work | None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        dropped = self._drop_cancelled()
        deferred = []  # waiting for an adapter slot that requests running on other adapters all hold
        while self._waiting and None in self._slots:
            request = self._waiting.popleft()
            if not self._pin_adapter(request):
                deferred.append(request)
                continue
            request.slot = self._slots.index(None)
            self._slots[request.slot] = request
            self._inflight[request.id] = request
            self._prefilling.append(request)
            self._count_queued(-1)
            self._chunk(request)
            if request.params.grammar is not None:
                self._start_grammar(request)
        self._waiting.extendleft(reversed(deferred))
        self.metrics.active_slots.set(self.active_slots)
        decode, rows = self._decode_inputs([i for i, r in enumerate(self._slots) if r is not None and r.decoding])
        prefills, budget = [], self.prefill_chunk
        for request in list(self._prefilling):
            while request.next_chunk < len(request.chunks) and (not prefills or budget > 0):
                prefills.append(self._next_chunk(request))
                budget -= prefills[-1].tokens.shape[1]
            if request.next_chunk == len(request.chunks):
                self._prefilling.remove(request)
            if budget <= 0:
                break
        if not rows and not prefills and not dropped:
            return None
        max_width = self._gate.max_width(len(rows)) if self._gate is not None and rows else None
        if self.runner.speculation is not None and any(self._slots[i].params.grammar is not None for i in rows):
            max_width = 0  # speculation off while a constrained slot decodes: drafts are not checked by grammars
        self.constrained_steps += any(self._slots[i].params.grammar is not None for i in rows)
        penalize = any(self._slots[i].params.penalized for i in rows)
        loads, self._loads = tuple(self._loads), []
        return _Work(Plan(decode if rows else None, tuple(prefills), tuple(dropped), max_width=max_width,
                          penalize=penalize, loads=loads), rows)

    def _pin_adapter(self, request: Request) -> bool:
        """Give an admitted request its adapter's table slot (its load, if any, rides in the next plan); False when
        it must wait for one (every slot held by requests running on other adapters)."""
        if self.adapters is None:
            request.adapter_slot = 0
            return True
        got = self.adapters.acquire(request.adapter_path)
        if got is None:
            return False
        request.adapter_slot, load = got
        if load is not None:
            self._loads.append(load)
        return True

    def _chunk(self, request: Request) -> None:
        chunk, n_chunks, pad = decoding.chunk_layout(len(request.prompt), self.runner.cache_size, self.prefill_chunk)
        tokens = np.pad(np.asarray(request.prompt, np.int32), (pad, 0))
        positions = np.pad(np.arange(len(request.prompt), dtype=np.int32), (pad, 0), constant_values=-1)
        request.chunks = [(tokens[None, i * chunk:(i + 1) * chunk], positions[None, i * chunk:(i + 1) * chunk])
                          for i in range(n_chunks)]
        self.metrics.prompt_tokens.inc(len(request.prompt))

    def _next_chunk(self, request: Request) -> PrefillChunk:
        i = request.next_chunk
        request.next_chunk += 1
        last = request.next_chunk == len(request.chunks)
        p = request.params
        echo = None
        if i == 0 and p.echo_logprobs and len(request.prompt) > 1:
            echo = np.zeros((1, decoding.round_up_pow2(len(request.prompt))), np.int32)
            echo[0, : len(request.prompt)] = request.prompt
        allowed = None
        if last and p.grammar is not None:
            allowed = self._constraints.bitmask[request.slot:request.slot + 1].copy()
        return PrefillChunk(request.id, *request.chunks[i], first=i == 0, slot=request.slot if last else -1,
                            sampling=p if last else None, prompt=tuple(request.prompt) if last else (), echo=echo,
                            allowed=allowed, adapter=request.adapter_slot)

    def _decode_inputs(self, rows: list[int]) -> tuple[DecodeInputs, list[int]]:
        b = self.max_batch
        tokens, positions, counts = (np.zeros(b, np.int32) for _ in range(3))
        live, adapters = np.zeros(b, bool), np.zeros(b, np.int32)
        for i in rows:
            r = self._slots[i]
            adapters[i] = r.adapter_slot
            tokens[i], positions[i] = r.generated[-1], len(r.prompt) + len(r.generated) - 1
            counts[i], live[i] = len(r.generated), True
        allowed = self._unconstrained if self._constraints is None else self._constraints.bitmask.copy()
        return DecodeInputs(tokens, positions, counts, live, allowed, adapters), rows

    def _drop_cancelled(self) -> list[int]:
        dropped = []
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._count_queued(-1)
            self._finish(request, Event((), "", finish_reason="cancelled"))
        for request in [r for r in self._inflight.values() if r.cancelled]:
            if request in self._prefilling:
                self._prefilling.remove(request)
            if request.next_chunk > 0 and not request.decoding:
                dropped.append(request.id)
            self._finish(request, Event((), "", finish_reason="cancelled"))
        return dropped

    def _count_queued(self, delta: int) -> None:
        with self._lock:
            self._queued += delta
            self.metrics.queue_depth.set(self._queued)

    # Results ------------------------------------------------------------------------------------
    def _consume(self, work: _Work, results) -> None:
        if self._gate is not None and results.kept is not None:
            self._gate.observe(results.width, results.drafting, int(np.sum(results.kept)))
        for slot in work.decoding:
            request = self._slots[slot]
            if request is None:
                continue
            if results.kept is None:
                self._on_token(request, results.decode, slot)
                continue
            kept = int(results.kept[slot])
            self.metrics.accepted_draft_tokens.inc(kept)
            request.accepted_drafts += kept
            for column in range(kept + 1):  # past a stop or max_tokens the rest is dropped, never streamed
                self._on_token(request, _column(results.decode, column), slot)
                if request.finish_reason is not None:
                    break
        for chunk in work.plan.prefills:
            request = self._inflight.get(chunk.request_id)
            if request is None:
                continue
            if chunk.request_id in results.echo:
                self._echoed(request, results.echo[chunk.request_id])
            if chunk.slot >= 0:  # the prompt's last chunk: its first token
                request.decoding = True
                self._on_token(request, results.first[chunk.request_id], 0)

    def _echoed(self, request: Request, sampled: Sampled) -> None:
        """The prompt's logprobs (the first token has none), from the scorer's rows for tokens 1..T-1."""
        request.prompt_logprobs = (None, *_logprobs(sampled, len(request.prompt) - 1))

    def _on_token(self, request: Request, sampled: Sampled, row: int) -> None:
        token = int(sampled.tokens[row])
        request.generated.append(token)
        now = time.monotonic()
        first = len(request.generated) == 1
        (self.metrics.time_to_first_token if first else self.metrics.inter_token_latency).observe(
            now - request.last_token_at)
        request.last_token_at = now
        self.metrics.generation_tokens.inc()
        finish, text, error = None, "", None
        if token in request.stop_ids:
            finish, text = "stop", request.text.flush() if request.text else ""
        elif request.text is not None:
            text, hit = request.text.add(token)
            finish = "stop" if hit else None
        if finish is None and request.params.grammar is not None:
            finish, error = self._timed(lambda: self._advance(request, token))
            text += request.text.flush() if finish is not None and request.text else ""
        if finish is None and len(request.generated) >= request.params.max_tokens:
            finish, text = "length", text + (request.text.flush() if request.text else "")
        logprobs = () if request.params.logprobs is None else (_logprob(sampled, row),)
        event = Event((token,), text, logprobs, finish, len(request.prompt), len(request.generated),
                      request.prompt_logprobs if len(request.generated) == 1 else None, error)
        if finish is None:
            request.deliver(event)
        else:
            self._finish(request, event)

    def _start_grammar(self, request: Request) -> None:
        """The request's grammar in its slot, and the bitmask of its first token; one the vocabulary cannot match
        (a special token it lacks) fails the request alone."""
        try:
            self._timed(lambda: (self._constraints.start(request.slot, request.params.grammar),
                                 self._constraints.fill([request.slot])))
        except RequestError as err:
            self._prefilling.remove(request)
            self._finish(request, Event((), "", finish_reason="error", error=str(err)))

    def _advance(self, request: Request, token: int) -> tuple[str | None, str | None]:
        """Feed a constrained request's new token to its grammar and fill its next bitmask -> (finish, error)."""
        constraints = self._constraints
        if not constraints.advance(request.slot, [token]):
            return "error", f"token {token} broke the request's grammar"
        if constraints.done(request.slot):
            return "stop", None
        constraints.fill([request.slot])
        return None, None

    def _timed(self, work):
        start = time.perf_counter()
        try:
            return work()
        finally:
            self.mask_seconds += time.perf_counter() - start

    def _finish(self, request: Request, event: Event) -> None:
        if request.adapter_slot > 0 and self.adapters is not None:
            self.adapters.release(request.adapter_slot)
        request.adapter_slot = -1
        if request.slot >= 0 and self._slots[request.slot] is request:
            self._slots[request.slot] = None
            if request.params.grammar is not None:
                self._constraints.release(request.slot)
        self._inflight.pop(request.id, None)
        request.finish_reason = event.finish_reason
        self.metrics.requests.labels(event.finish_reason).inc()
        self.metrics.active_slots.set(self.active_slots)
        request.deliver(dataclasses.replace(event, prompt_tokens=len(request.prompt),
                                            completion_tokens=len(request.generated)))

    def _fail(self, err: Exception) -> None:
        """A failed iteration: its cache may be donated and gone, so every request in flight fails; new ones run."""
        for request in list(self._inflight.values()):
            if request in self._prefilling:
                self._prefilling.remove(request)
            self._finish(request, Event((), "", finish_reason="error", error=f"{type(err).__name__}: {err}"))
        self.runner.reset()
        if self.adapters is not None:
            self.adapters.forget_loads()  # the runner's table is empty again

    def _cancel_all(self) -> None:
        for request in [*self._waiting, *self._inflight.values()]:
            request.cancel()
        self._drop_cancelled()
        self._prefilling.clear()


def _column(sampled: Sampled, column: int) -> Sampled:
    """One of a speculative step's k + 1 token columns: [B, k + 1, ...] arrays -> [B, ...]."""
    return Sampled(*(getattr(sampled, f.name)[:, column] for f in dataclasses.fields(Sampled)))


def _logprob(sampled: Sampled, row: int) -> TokenLogprob:
    top = tuple((int(i), float(v)) for i, v in zip(sampled.top_ids[row], sampled.top_logprobs[row]))
    return TokenLogprob(int(sampled.tokens[row]), float(sampled.logprobs[row]), top)


def _logprobs(sampled: Sampled, n: int) -> tuple[TokenLogprob, ...]:
    return tuple(_logprob(sampled, row) for row in range(n))
