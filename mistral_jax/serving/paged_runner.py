"""The paged model runner: one scheduler `Plan` per iteration in (decode tokens and prompt chunks of several
requests as one flat row of tokens over a paged KV cache), one sampled token per chunk out.

Each layer keeps its pages [num_pages, page_size, 2 * kv_heads, head_dim] (model/paged_attention.py); the pool's
bookkeeping (serving/pages.py) stays on the host. Programs come in two bounded families, all compiled by `warm_up`:
decodes only (one token per row: 1, max_batch / 2 or max_batch rows) and mixed iterations (tokens bucketed to powers
of 4 up to max_num_batched_tokens, every row may hold a chunk), each per page-count bucket (powers of 4 up to the
longest context's pages). Powers of 4 rather than 2 halve the programs (SmolLM2 at --max-seq-len 1024: 18 rather
than 45) while a step still reads at most 4x the pages its longest row holds.
The chunk's last token is sampled through the one sampling stage (sampling.py) with its request's settings, token
index, allowed-token bitmask (a grammar's, serving/constrained.py) and, where a row sets penalties, its token counts
(built on the host from what the request generated, so preemption and recomputation need no device state), so a
request's draws equal mj.generate's wherever it runs. Counts and bitmasks are traced inputs: a plan without penalties
or grammars passes device-resident neutral ones (no transfer) and a `lax.cond` skips the penalty math, so settings
coming and going compile nothing. Echoed prompt logprobs come from the slot runner's prompt scorer.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import decoding, sharding
from mistral_jax import sampling as sampling_stage
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import linear
from mistral_jax.model import paged_attention as pa
from mistral_jax.model.transformer import forward
from mistral_jax.sampling import SamplingParams
from mistral_jax.serving.adapters import AdapterTable
from mistral_jax.serving.runner import Results, Sampled, chosen_logprobs, score_prompt
from mistral_jax.serving.scheduler import Plan

SMALLEST_TOKENS = 16  # the smallest token bucket of a mixed iteration
SMALLEST_PAGES = 4  # the smallest page-count bucket
# Queries per attention row of a mixed iteration: a prompt chunk is split into rows of this many queries, each
# reading its sequence's pages, so attention costs about the tokens run (times the pages read), not every row
# padded to the longest chunk: 8 rows x 256 queries made a lone 256-token chunk of SmolLM2 take 2.0 s.
QUERY_TILE = 16


@flax.struct.dataclass
class PagedInputs:
    """One iteration's device inputs."""

    tokens: jax.Array  # int32 [N]: the flat token row (padding: 0)
    meta: tuple[pa.AttentionMetadata, ...]  # per layer group (config.window_groups): positions, slots, page tables
    logit_index: jax.Array  # int32 [S]: flat index of each row's last token (its logits are sampled)
    index: jax.Array  # int32 [S]: each row's token index (its draw's key): tokens its request generated so far
    adapters: jax.Array  # int32 [N]: each token's LoRA slot in the adapter table (0: none; unread without a table)
    allowed: jax.Array  # int32 [S, ceil(V / 32)]: each row's allowed-token bitmask (a grammar's; else all ones)
    counts: sampling_stage.TokenCounts  # [S, V] generated counts and [S, ceil(V / 32)] prompt bitmasks (penalties)


@dataclasses.dataclass(frozen=True)
class PagedWork:
    """A Plan with what sampling needs per chunk (plain data)."""

    plan: Plan
    sampling: tuple[SamplingParams, ...]  # one per chunk
    index: tuple[int, ...]  # one per chunk: the token index of the token it samples
    allowed: np.ndarray | None = None  # int32 [C, ceil(V / 32)]: the chunks' bitmasks (None: no grammar)
    counts: sampling_stage.TokenCounts | None = None  # numpy [C, V] and [C, ceil(V / 32)] (None: no penalties)
    echo: tuple[tuple[int, np.ndarray], ...] = ()  # (request id, its prompt int32 [1, T] right padded): score it
    adapters: tuple[int, ...] = ()  # one per chunk: its request's LoRA slot (empty: none)
    loads: tuple[tuple[int, str], ...] = ()  # (adapter table slot, adapter path) to load first
    stop: bool = False  # multi-host: process 0 is stopping, the followers stop too


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _paged_step(config: ModelConfig, mesh, params, kv_pages, inputs: PagedInputs, sampling, lora=None):
    """The model over the flat row, writing K/V into the pages, and one token per row -> (Sampled arrays [S],
    kv_pages). Under a mesh the pages stay split over KV heads and the sampled tokens come back replicated. lora:
    the adapter table (linear.LoraSlots without its index), each token choosing its slot."""
    if lora is not None:
        params = linear.with_lora(params, lora.replace(index=inputs.adapters[None]))
    with sharding.activations(mesh):
        out = forward(config, params, inputs.tokens[None], inputs.meta[0].positions[None], cache={"kv": kv_pages},
                      pages=inputs.meta, logit_index=inputs.logit_index)
    logits = out.logits[0]  # [S, V]
    sampling = sampling.replace(allowed=inputs.allowed)
    penalized = jnp.any((sampling.presence != 0) | (sampling.frequency != 0) | (sampling.repetition != 1))
    x = jax.lax.cond(penalized, lambda: sampling_stage.adjust(logits[:, None], sampling, inputs.counts),
                     lambda: sampling_stage.adjust(logits[:, None], sampling, None))  # [S, 1, V]
    token = sampling_stage.accept(x, jnp.zeros((x.shape[0], 0), jnp.int32), sampling, inputs.index)[1][:, 0]
    sampled, kv_pages = chosen_logprobs(logits, token), out.cache["kv"]
    if mesh is not None:
        sampled = jax.lax.with_sharding_constraint(sampled, sharding.replicated(mesh))
        kv_pages = tuple(jax.lax.with_sharding_constraint(x, sharding.page_sharding(mesh, x.shape))
                         for x in kv_pages)
    return sampled, kv_pages


class PagedModelRunner:
    """The per-layer KV pages and the programs over them; under a mesh (one process or several, in lockstep) the
    weights are placed by sharding.py's rules and each layer's pages split over its KV heads."""

    def __init__(self, config: ModelConfig, params, *, num_pages: int, page_size: int, max_batch: int,
                 max_num_batched_tokens: int, max_pages_per_seq: int, mesh=None,
                 adapters: AdapterTable | None = None) -> None:
        config, params = decoding.decode_params(config, params)
        self.adapters = adapters  # the LoRA table (None: the plain programs)
        self.mesh = mesh
        if mesh is not None:
            params = sharding.ensure_params(config, params, mesh)
        if config.kv_cache_dtype == "int8":
            raise UserError("an int8 KV cache is not paged yet: drop --kv-cache-dtype int8 or --page-size")
        self.dtype = jnp.dtype(config.kv_cache_dtype or config.compute_dtype)
        self.config, self.params = config, params
        self.speculation = self.draft_config = None  # as the slot runner's: no speculation here yet
        self.num_pages, self.page_size, self.max_batch = num_pages, page_size, max_batch
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages = pa.bucket(max_pages_per_seq, SMALLEST_PAGES)
        self._neutrals: dict[int, tuple] = {}  # row bucket -> device all-ones bitmasks and empty counts
        self.reset()

    def reset(self) -> None:
        """Zeroed pages (after a failed iteration, whose donated pages may be gone)."""
        cfg = self.config
        shape = (self.num_pages, self.page_size, 2 * cfg.n_kv_heads, cfg.resolved_head_dim)
        where = None if self.mesh is None else sharding.page_sharding(self.mesh, shape)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=where)
        self.kv_pages = tuple(zeros() for _ in range(cfg.n_layers))
        if self.adapters is not None:
            self.adapters.reset()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers."""
        return sum(x.nbytes for x in self.kv_pages) // self.num_pages

    def shapes(self) -> list[tuple[int, int, int, int]]:
        """Every (tokens N, sampled rows S, queries per attention row T, pages P) program: decodes, then mixed
        iterations (attention_rows(N, S, T) attention rows)."""
        s = pa.bucket(self.max_batch)
        return ([(r, r, 1, p) for r in self.decode_rows for p in self.page_buckets]
                + [(n, s, min(n, QUERY_TILE), p) for n in self.token_buckets for p in self.page_buckets])

    @functools.cached_property
    def page_buckets(self) -> tuple[int, ...]:
        """Page counts a row may read: powers of 4 from SMALLEST_PAGES, then the longest context's (few programs,
        and a step reads at most 4x the pages its longest row holds)."""
        return _ladder(SMALLEST_PAGES, self.max_pages, 4)

    @functools.cached_property
    def decode_rows(self) -> tuple[int, ...]:
        """Row counts of decode-only iterations: one request alone, half the batch, the whole batch."""
        s = pa.bucket(self.max_batch)
        return tuple(sorted({1, max(1, s // 2), s}))

    @functools.cached_property
    def token_buckets(self) -> tuple[int, ...]:
        """Token counts of mixed iterations: powers of 4 from SMALLEST_TOKENS up to the budget's bucket."""
        return _ladder(SMALLEST_TOKENS, pa.bucket(self.max_num_batched_tokens), 4)

    def shape_for(self, plan: Plan) -> tuple[int, int, int, int]:
        """The bucket a plan runs in."""
        pages = _fit(self.page_buckets, max(len(t.pages) for c in plan.chunks for t in c.tables))
        if all(len(c.token_ids) == 1 for c in plan.chunks):
            rows = _fit(self.decode_rows, len(plan.chunks))
            return rows, rows, 1, pages
        n = _fit(self.token_buckets, plan.num_tokens)
        return n, pa.bucket(self.max_batch), min(n, QUERY_TILE), pages

    def run(self, work: PagedWork) -> Results:
        """Run one iteration -> Results: `decode`, one sampled token (with logprobs) per chunk in the plan's order;
        `echo`, the asked prompts' logprobs by request id."""
        plan = work.plan
        if not plan.chunks:  # an idle or stopping plan (broadcast to followers): nothing to run
            return None
        for slot, path in work.loads:
            self.adapters.load(slot, path)
        n, s, t, p = self.shape_for(plan)
        meta = tuple(pa.build_metadata(attention_rows(plan.chunks, g, t), self.page_size, self.num_pages, tokens=n,
                                       rows=row_count(n, s, t), queries=t, pages=p)
                     for g in range(len(self.config.window_groups)))
        tokens = np.zeros(n, np.int32)
        flat = np.concatenate([c.token_ids for c in plan.chunks]).astype(np.int32)
        tokens[:len(flat)] = flat
        ends = np.cumsum([len(c.token_ids) for c in plan.chunks]) - 1
        logit_index, index = np.zeros(s, np.int32), np.zeros(s, np.int32)
        logit_index[:len(ends)], index[:len(ends)] = ends, work.index
        adapters = np.zeros(n, np.int32)
        if work.adapters:
            per_token = np.repeat(np.asarray(work.adapters, np.int32), [len(c.token_ids) for c in plan.chunks])
            adapters[:len(per_token)] = per_token
        params = list(work.sampling) + [SamplingParams()] * (s - len(work.sampling))
        allowed, counts = self._neutral(s)
        pad = functools.partial(_pad_rows, rows=s)
        if work.allowed is not None:
            allowed = pad(work.allowed, fill=-1)
        if work.counts is not None:
            counts = jax.tree.map(pad, work.counts)
        sampled = self._run(PagedInputs(tokens, meta, logit_index, index, adapters, allowed, counts),
                            sampling_stage.metadata(params, self.config.vocab_size))
        results = Results(decode=Sampled(*(getattr(sampled, f.name)[:len(plan.chunks)]
                                           for f in dataclasses.fields(Sampled))))
        slot_of = dict(zip((c.request_id for c in plan.chunks), work.adapters))
        for request_id, prompt in work.echo:
            params = self.params if self.adapters is None else linear.with_lora(self.params, self.adapters.slots(
                sharding.put_replicated(self.mesh, np.full((1,), slot_of.get(request_id, 0), np.int32))))
            results.echo[request_id] = Sampled(*(np.asarray(x) for x in score_prompt(
                self.config, self.mesh, params, sharding.put_replicated(self.mesh, prompt))))
        return results

    def _neutral(self, rows: int) -> tuple[jax.Array, sampling_stage.TokenCounts]:
        """Device-resident all-ones bitmasks and empty counts for `rows` rows (made once per row bucket)."""
        if rows not in self._neutrals:
            v = self.config.vocab_size
            self._neutrals[rows] = (jnp.full((rows, sampling_stage.packed_width(v)), -1, jnp.int32),
                                    jax.tree.map(jnp.asarray, sampling_stage.prompt_counts([[]] * rows, v)))
        return self._neutrals[rows]

    def _run(self, inputs: PagedInputs, sampling) -> Sampled:
        lora = None if self.adapters is None else self.adapters.slots(None)
        put = functools.partial(sharding.put_replicated, self.mesh)
        out, self.kv_pages = _paged_step(self.config, self.mesh, self.params, self.kv_pages, put(inputs), put(sampling),
                                         lora)
        return Sampled(*(np.asarray(x) for x in out))

    def warm_up(self) -> int:
        """Compile every program (empty rows: nothing is written, nothing read back) -> how many."""
        shapes = self.shapes()
        sampling = sampling_stage.metadata([SamplingParams()] * pa.bucket(self.max_batch), self.config.vocab_size)
        for n, s, t, p in shapes:
            meta = (pa.build_metadata([], self.page_size, self.num_pages, tokens=n, rows=row_count(n, s, t),
                                      queries=t, pages=p),
                    ) * len(self.config.window_groups)
            inputs = PagedInputs(np.zeros(n, np.int32), meta, np.zeros(s, np.int32), np.zeros(s, np.int32),
                                 np.zeros(n, np.int32), *self._neutral(s))
            self._run(inputs, jax.tree.map(lambda x, s=s: x[:s], sampling))
        if self.adapters is not None:
            self.adapters.warm_up()
        return len(shapes)


def attention_rows(chunks, group: int, queries: int) -> list[tuple[int, int, int, list[int]]]:
    """The chunks as attention rows of at most `queries` tokens, in flat order: (start, count, first page, page
    ids of layer group `group`); a chunk's rows share its page table, and causality hides each row's later keys."""
    rows = []
    for c in chunks:
        table = c.tables[group]
        for j in range(0, len(c.token_ids), queries):
            rows.append((c.start + j, min(queries, len(c.token_ids) - j), table.first, table.pages))
    return rows


def row_count(tokens: int, sequences: int, queries: int) -> int:
    """Attention rows enough for any `tokens` tokens of at most `sequences` chunks split `queries` at a time:
    sum(ceil(c_i / T)) <= (N + S (T - 1)) / T."""
    return (tokens + sequences * (queries - 1)) // queries


def _ladder(smallest: int, largest: int, factor: int) -> tuple[int, ...]:
    """smallest, smallest * factor, ... below largest, then largest (just `largest` where it is the smaller)."""
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= factor
    return (*sizes, largest)


def _fit(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket holding n."""
    return buckets[bisect.bisect_left(buckets, n)]


def _pad_rows(x: np.ndarray, rows: int, fill: int = 0) -> np.ndarray:
    """x [C, ...] padded with `fill` to [rows, ...]."""
    return np.pad(x, ((0, rows - len(x)),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
