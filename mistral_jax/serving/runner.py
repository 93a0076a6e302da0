"""The engine's model runner: one `Plan` per iteration in, its sampled tokens out (every process alike).

A plan is plain numpy and Python, so on several hosts process 0 broadcasts it and every process runs the
same programs on its shards (serving/lockstep.py). The programs are step.py's: one generation step for all
slots (per width and whether a slot is penalized), one prefill chunk per power-of-two bucket, one first-token
path that inserts a prefilled row into its slot (its cache, its settings, its penalty counts and lookup
history), and a prompt scorer per bucket for echoed logprobs. Speculating by prompt lookup, a small program
proposes the drafts and chooses the width (speculative.choose_width), which the host reads back (the engine's
gate may narrow it) to run the step at that width: a switch on device would copy the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import decoding, sharding, speculative, step
from mistral_jax import sampling as sampling_stage
from mistral_jax.config import ModelConfig
from mistral_jax.model import kv_cache, linear
from mistral_jax.model.transformer import default_positions, forward
from mistral_jax.sampling import TOP_LOGPROBS, SamplingParams
from mistral_jax.serving.adapters import AdapterTable


@flax.struct.dataclass
class DecodeInputs:
    """One step's inputs for every slot; free slots decode token 0 at position 0, their output unread."""

    tokens: np.ndarray  # int32 [B]: each slot's latest token
    positions: np.ndarray  # int32 [B]: its position
    counts: np.ndarray  # int32 [B]: tokens the slot's request made so far (its draws' key index)
    live: np.ndarray  # bool [B]: the slot holds a decoding request
    allowed: np.ndarray  # int32 [B, ceil(V / 32)]: each slot's allowed-token bitmask (its grammar's; else all ones)
    adapters: np.ndarray  # int32 [B]: each slot's LoRA slot in the adapter table (0: none; unread without a table)


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """One chunk of one request's prompt, written into that request's own one-row cache."""

    request_id: int
    tokens: np.ndarray  # int32 [1, C]
    positions: np.ndarray  # int32 [1, C] (-1 = padding)
    first: bool  # the prompt's first chunk: start from an empty cache
    slot: int = -1  # the last chunk: sample the first token and copy the row into this slot
    sampling: SamplingParams | None = None  # with slot
    prompt: tuple[int, ...] = ()  # with slot: the whole prompt (penalty counts, prompt lookup's history)
    echo: np.ndarray | None = None  # int32 [1, T]: the prompt, right padded, when its logprobs are asked
    allowed: np.ndarray | None = None  # int32 [1, ceil(V / 32)]: with slot, the first token's bitmask (a grammar's)
    adapter: int = 0  # the request's LoRA slot in the adapter table (0: none)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every process does in one iteration: the decode step, then the prefill chunks, in this order."""

    decode: DecodeInputs | None = None
    prefills: tuple[PrefillChunk, ...] = ()
    dropped: tuple[int, ...] = ()  # requests cancelled mid-prefill: their one-row caches go
    stop: bool = False
    max_width: int | None = None  # prompt lookup: the widest verify this step may take (serving/gate.py)
    penalize: bool = False  # some decoding slot has penalties: the step keeps and reads the token counts
    loads: tuple[tuple[int, str], ...] = ()  # (adapter table slot, adapter path) to load first (serving/adapters.py)


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Tokens chosen for rows, with logprobs: numpy, readable on every process."""

    tokens: np.ndarray  # int32 [R]
    logprobs: np.ndarray  # float32 [R]
    top_ids: np.ndarray  # int32 [R, TOP_LOGPROBS]
    top_logprobs: np.ndarray  # float32 [R, TOP_LOGPROBS]


@dataclasses.dataclass
class Results:
    decode: Sampled | None = None  # one row per slot; speculating, [B, k + 1] tokens per slot, kept + 1 of them new
    kept: np.ndarray | None = None  # int32 [B]: speculating, the drafts each slot kept
    width: int = 0  # prompt lookup: the drafts verified per slot this step
    drafting: int = 0  # prompt lookup: the slots that had drafts this step
    first: dict = dataclasses.field(default_factory=dict)  # request id -> Sampled (one row)
    echo: dict = dataclasses.field(default_factory=dict)  # request id -> Sampled of the prompt (logprobs of 1..T-1)


def chosen_logprobs(logits, tokens):
    """logits float32 [R, V], tokens int32 [R] -> (tokens, their logprobs [R], top ids [R, N], top logprobs [R, N])."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids.astype(jnp.int32), top_logprobs


def _replicate(mesh, tree):
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _propose(spec: speculative.Speculation, mesh, lookup: speculative.Lookup, inputs: DecodeInputs):
    """Every slot's prompt lookup proposal; its width index and drafting count replicated (every process reads
    them to pick the same program)."""
    proposal = speculative.propose(spec, lookup, inputs.positions, inputs.live)
    return proposal, _replicate(mesh, (proposal.index, jnp.sum(proposal.drafting)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=7)
def _step(spec, width: int, config: ModelConfig, mesh, penalize: bool, params, draft_params, carry: step.Carry,
          sampling, inputs: DecodeInputs, proposal):
    """step.step for every slot at `width` -> ((kept [B], Sampled arrays [B, w + 1, ...]), carry). Without
    `penalize` the token counts pass through untouched (no slot reads them; a new request resets its row)."""
    counts = carry.penalties
    sampling = sampling.replace(allowed=inputs.allowed)  # this step's bitmasks (traced: grammars come and go freely)
    rows = step.Rows(inputs.tokens, inputs.positions, inputs.counts, inputs.live)
    stepped, carry = step.step(spec, width, config, mesh, params, draft_params, rows, sampling,
                               carry.replace(penalties=counts if penalize else None), proposal)
    b, w = stepped.emitted.shape
    picked = chosen_logprobs(stepped.logits.reshape(b * w, -1), stepped.emitted.reshape(-1))
    picked = [x.reshape(b, w, *x.shape[1:]) for x in picked]  # [B, w + 1, ...]
    return _replicate(mesh, (stepped.kept, picked)), carry.replace(penalties=carry.penalties if penalize else counts)


def _put_row(big, row, slot):
    """`big` [B, ...] with `row` [1, ...] written at row `slot` (traced)."""
    return jax.lax.dynamic_update_slice(big, row.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _insert(mesh, carry: step.Carry, sampling, row_cache, row_sampling, row_counts, row_lookup, slot, logits,
            position):
    """The one first-token path for a request (step.first from its prefill logits [1, V], its own settings and
    counts), then its row (cache, settings, counts, lookup history) copied into `slot`."""
    token, row_counts, row_lookup = step.first(logits, row_sampling, row_counts, row_lookup, position[None])
    put = functools.partial(jax.tree.map, lambda big, row: _put_row(big, row, slot))
    carry = carry.replace(cache=sharding.constrain_cache(mesh, kv_cache.insert_rows(carry.cache, row_cache, slot)),
                          penalties=put(carry.penalties, row_counts),
                          lookup=None if carry.lookup is None else put(carry.lookup, row_lookup))
    return _replicate(mesh, chosen_logprobs(logits, token)), carry, put(sampling, row_sampling)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _insert_draft_row(mesh, cache, row_cache, slot):
    """A draft model's prefilled one-row cache copied into `slot`."""
    return sharding.constrain_cache(mesh, kv_cache.insert_rows(cache, row_cache, slot))


@functools.partial(jax.jit, static_argnums=(0, 1))
def score_prompt(config: ModelConfig, mesh, params, tokens):
    """Logprobs of tokens[:, 1:] given what precedes each, from one causal pass: tokens int32 [1, T]."""
    with sharding.activations(mesh):
        logits = forward(config, params, tokens, default_positions(tokens)).logits[0, :-1]  # [T-1, V]
    return _replicate(mesh, chosen_logprobs(logits, tokens[0, 1:]))


def _sampled(arrays) -> Sampled:
    return Sampled(*(np.asarray(a) for a in arrays))


class ModelRunner:
    """The slots' cache, settings, penalty counts and lookup state, and the one-row caches of prompts being
    prefilled; runs plans."""

    def __init__(self, config: ModelConfig, params, *, max_batch: int, max_seq_len: int, mesh=None,
                 speculation: speculative.Speculation | None = None, draft_params=None,
                 adapters: AdapterTable | None = None) -> None:
        """adapters: the LoRA table rows choose from (DecodeInputs.adapters, PrefillChunk.adapter); None: the plain
        programs, no adapter math."""
        config, params = decoding.decode_params(config, params)
        self.adapters = adapters
        if speculation is not None and speculation.draft_config is not None:
            draft_config, draft_params = decoding.decode_params(speculation.draft_config, draft_params)
            speculation = dataclasses.replace(speculation, draft_config=draft_config)
        self.config, self.mesh, self.max_seq_len, self.speculation = config, mesh, max_seq_len, speculation
        self.lookahead = 0 if speculation is None else speculation.draft_tokens  # ring slots for rejected drafts
        self.params = params if mesh is None else sharding.ensure_params(config, params, mesh)
        self.draft_config = None if speculation is None else speculation.draft_config
        if self.draft_config is not None and mesh is not None:
            draft_params = sharding.ensure_params(self.draft_config, draft_params, mesh)
        self.draft_params = draft_params
        self.max_batch = max_batch
        self.reset()
        self.cache_size = kv_cache.cache_size(self.carry.cache)  # a prefill chunk fits both models' rings
        if self.carry.draft_cache is not None:
            self.cache_size = min(self.cache_size, kv_cache.cache_size(self.carry.draft_cache))

    def reset(self) -> None:
        """Empty caches (after a failed iteration, whose donated state may be gone)."""
        b, v = self.max_batch, self.config.vocab_size
        self._rows: dict[int, dict] = {}
        self._draft_rows: dict[int, dict] = {}
        lookup = None
        if self.speculation is not None and self.draft_config is None:
            lookup = self._put(speculative.lookup_rows([[]] * b, self.history_length))
        draft_cache = None if self.draft_config is None else self._empty_cache(b, self.draft_config)
        self.carry = step.Carry(self._empty_cache(b), self._put(sampling_stage.prompt_counts([[]] * b, v)), lookup,
                                draft_cache)
        self.sampling = self._put(sampling_stage.metadata([SamplingParams()] * b, v))
        if self.adapters is not None:
            self.adapters.reset()

    def _params(self, index):
        """The weights, carrying the adapter table and each row's slot (index int32 [B], placed) when there is one."""
        return self.params if self.adapters is None else linear.with_lora(self.params, self.adapters.slots(index))

    @property
    def history_length(self) -> int:
        """Positions a slot's history holds: the context, and the drafts written past it and maybe taken back."""
        return self.max_seq_len + self.lookahead

    @property
    def widths(self) -> tuple[int, ...]:
        return step.widths(self.speculation)

    def _empty_cache(self, rows: int, config: ModelConfig | None = None) -> dict:
        # Speculating, a slot writes up to k positions past its last token (past max_seq_len near the end).
        return decoding.init_cache(config or self.config, rows, self.max_seq_len + self.lookahead, mesh=self.mesh,
                                   lookahead=self.lookahead)

    def _put(self, tree):
        """Host arrays as device arrays, split over the batch axes under a mesh."""
        return sharding.put_rows(self.mesh, tree)

    def run(self, plan: Plan) -> Results:
        results = Results()
        for slot, path in plan.loads:
            self.adapters.load(slot, path)
        if plan.decode is not None:
            inputs = self._put(plan.decode)
            width, proposal = self.widths[-1], None
            if self.speculation is not None and self.draft_config is None:
                proposal, (index, count) = _propose(self.speculation, self.mesh, self.carry.lookup, inputs)
                width = self.widths[int(index)]
                if plan.max_width is not None:  # the engine's gate: the widest allowed width under the lookup's
                    width = max(w for w in self.widths if w <= min(width, plan.max_width))
                results.width, results.drafting = width, int(count)
            kept, out = self._step(width, plan.penalize, inputs, proposal)
            out = [np.asarray(x) for x in out]  # numpy before slicing: a device slice would compile
            results.decode = Sampled(*(x[:, 0] for x in out) if self.speculation is None else out)
            results.kept = None if self.speculation is None else np.asarray(kept)
        for chunk in plan.prefills:
            self._prefill(chunk, results)
        for request_id in plan.dropped:
            self._rows.pop(request_id, None)
            self._draft_rows.pop(request_id, None)
        return results

    def _step(self, width: int, penalize: bool, inputs: DecodeInputs, proposal):
        (kept, out), self.carry = _step(self.speculation, width, self.config, self.mesh, penalize,
                                        self._params(inputs.adapters),
                                        self.draft_params, self.carry, self.sampling, inputs, proposal)
        return kept, out

    def warm_up(self, inputs: DecodeInputs, repeats: int = 3) -> dict[int, float] | None:
        """Compile the step at every width, penalized or not (free slots only: what they write is never read),
        and with prompt lookup time each width: {width: seconds, best of `repeats` after the compiling call}
        for the gate (None otherwise)."""
        inputs = self._put(inputs)
        proposal = None
        if self.speculation is not None and self.draft_config is None:
            proposal, _ = _propose(self.speculation, self.mesh, self.carry.lookup, inputs)
        for width in self.widths:
            jax.block_until_ready(self._step(width, True, inputs, proposal))
        if proposal is None:
            jax.block_until_ready(self._step(self.widths[-1], False, inputs, proposal))
            return None
        costs = dict.fromkeys(self.widths, float("inf"))
        for _ in range(1 + repeats):  # the first round compiles
            for width in self.widths:
                start = time.perf_counter()
                jax.block_until_ready(self._step(width, False, inputs, proposal))
                costs[width] = min(costs[width], time.perf_counter() - start)
        return costs

    def _prefill(self, chunk: PrefillChunk, results: Results) -> None:
        params = self._params(self._put(np.full((1,), chunk.adapter, np.int32)))
        if chunk.echo is not None:
            results.echo[chunk.request_id] = _sampled(
                score_prompt(self.config, self.mesh, params, self._put(chunk.echo)))
        row = self._empty_cache(1) if chunk.first else self._rows.pop(chunk.request_id)
        tokens, positions = self._put((chunk.tokens, chunk.positions))
        logits, row = decoding.prefill_chunk(self.config, self.mesh, params, row, tokens, positions, chunk.first)
        put = functools.partial(sharding.put_replicated, self.mesh)
        if self.carry.draft_cache is not None:  # the draft model's own row, prefilled alike
            draft_row = (self._empty_cache(1, self.draft_config) if chunk.first
                         else self._draft_rows.pop(chunk.request_id))
            _, draft_row = decoding.prefill_chunk(self.draft_config, self.mesh, self.draft_params, draft_row, tokens,
                                                  positions, chunk.first)
            if chunk.slot < 0:
                self._draft_rows[chunk.request_id] = draft_row
            else:
                self.carry = self.carry.replace(draft_cache=_insert_draft_row(
                    self.mesh, self.carry.draft_cache, draft_row, put(np.int32(chunk.slot))))
        if chunk.slot < 0:
            self._rows[chunk.request_id] = row
            return
        v = self.config.vocab_size
        row_sampling = sampling_stage.metadata([chunk.sampling], v)
        if chunk.allowed is not None:
            row_sampling = row_sampling.replace(allowed=chunk.allowed)
        row_sampling = self._put(row_sampling)
        row_counts = self._put(sampling_stage.prompt_counts([chunk.prompt], v))
        row_lookup = (None if self.carry.lookup is None
                      else self._put(speculative.lookup_rows([chunk.prompt], self.history_length)))
        out, self.carry, self.sampling = _insert(self.mesh, self.carry, self.sampling, row, row_sampling, row_counts,
                                                 row_lookup, put(np.int32(chunk.slot)), logits,
                                                 put(np.int32(len(chunk.prompt))))
        results.first[chunk.request_id] = _sampled(out)
