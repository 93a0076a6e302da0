"""The paged model runner: one scheduler `Plan` per iteration in (decode tokens and prompt chunks of several
requests as one flat row of tokens over a paged KV cache), one sampled token per chunk out.

Each layer keeps its pages [num_pages, page_size, 2 * kv_heads, head_dim] (model/paged_attention.py); the pool's
bookkeeping (serving/pages.py) stays on the host. Programs come in two bounded families, all compiled by `warm_up`:
decodes only (one token per row: rows bucketed to powers of two up to max_batch) and mixed iterations (tokens
bucketed to powers of two up to max_num_batched_tokens, every row may hold a chunk), each per page-count bucket.
The chunk's last token is sampled through the one sampling stage (sampling.py) with its request's settings and
token index, so a request's draws equal mj.generate's wherever it runs.
"""

from __future__ import annotations

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
from mistral_jax.model import paged_attention as pa
from mistral_jax.model.transformer import forward
from mistral_jax.sampling import SamplingParams
from mistral_jax.serving.runner import Sampled, chosen_logprobs
from mistral_jax.serving.scheduler import Plan

SMALLEST_TOKENS = 16  # the smallest token bucket of a mixed iteration
SMALLEST_PAGES = 4  # the smallest page-count bucket


@flax.struct.dataclass
class PagedInputs:
    """One iteration's device inputs."""

    tokens: jax.Array  # int32 [N]: the flat token row (padding: 0)
    meta: tuple[pa.AttentionMetadata, ...]  # per layer group (config.window_groups): positions, slots, page tables
    logit_index: jax.Array  # int32 [S]: flat index of each row's last token (its logits are sampled)
    index: jax.Array  # int32 [S]: each row's token index (its draw's key): tokens its request generated so far


@dataclasses.dataclass(frozen=True)
class PagedWork:
    """A Plan with what sampling needs per chunk (plain data)."""

    plan: Plan
    sampling: tuple[SamplingParams, ...]  # one per chunk
    index: tuple[int, ...]  # one per chunk: the token index of the token it samples
    stop: bool = False  # multi-host: process 0 is stopping, the followers stop too


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _paged_step(config: ModelConfig, mesh, params, kv_pages, inputs: PagedInputs, sampling):
    """The model over the flat row, writing K/V into the pages, and one token per row -> (Sampled arrays [S],
    kv_pages). Under a mesh the pages stay split over KV heads and the sampled tokens come back replicated."""
    with sharding.activations(mesh):
        out = forward(config, params, inputs.tokens[None], inputs.meta[0].positions[None], cache={"kv": kv_pages},
                      pages=inputs.meta, logit_index=inputs.logit_index)
    logits = out.logits[0]  # [S, V]
    token = sampling_stage.sample(logits, sampling, None, inputs.index)
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
                 max_num_batched_tokens: int, max_pages_per_seq: int, mesh=None) -> None:
        config, params = decoding.decode_params(config, params)
        self.mesh = mesh
        if mesh is not None:
            params = sharding.ensure_params(config, params, mesh)
        if config.kv_cache_dtype == "int8":
            raise UserError("an int8 KV cache is not paged yet: drop --kv-cache-dtype int8 or --page-size")
        self.dtype = jnp.dtype(config.kv_cache_dtype or config.compute_dtype)
        self.config, self.params = config, params
        self.num_pages, self.page_size, self.max_batch = num_pages, page_size, max_batch
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages = pa.bucket(max_pages_per_seq, SMALLEST_PAGES)
        self.reset()

    def reset(self) -> None:
        """Zeroed pages (after a failed iteration, whose donated pages may be gone)."""
        cfg = self.config
        shape = (self.num_pages, self.page_size, 2 * cfg.n_kv_heads, cfg.resolved_head_dim)
        where = None if self.mesh is None else sharding.page_sharding(self.mesh, shape)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=where)
        self.kv_pages = tuple(zeros() for _ in range(cfg.n_layers))

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers."""
        return sum(x.nbytes for x in self.kv_pages) // self.num_pages

    def shapes(self) -> list[tuple[int, int, int, int]]:
        """Every (tokens N, rows S, queries T, pages P) program: decodes, then mixed iterations."""
        pages = [1 << i for i in range(self.max_pages.bit_length()) if SMALLEST_PAGES <= 1 << i <= self.max_pages]
        pages = pages or [self.max_pages]
        rows = [1 << i for i in range(pa.bucket(self.max_batch).bit_length()) if 1 << i <= pa.bucket(self.max_batch)]
        mixed = [1 << i for i in range(pa.bucket(self.max_num_batched_tokens).bit_length())
                 if SMALLEST_TOKENS <= 1 << i <= pa.bucket(self.max_num_batched_tokens)]
        mixed = mixed or [pa.bucket(self.max_num_batched_tokens)]
        s = pa.bucket(self.max_batch)
        return [(r, r, 1, p) for r in rows for p in pages] + [(n, s, n, p) for n in mixed for p in pages]

    def shape_for(self, plan: Plan) -> tuple[int, int, int, int]:
        """The bucket a plan runs in."""
        pages = pa.bucket(max(len(t.pages) for c in plan.chunks for t in c.tables), SMALLEST_PAGES)
        if all(len(c.token_ids) == 1 for c in plan.chunks):
            rows = pa.bucket(len(plan.chunks))
            return rows, rows, 1, pages
        n = pa.bucket(plan.num_tokens, SMALLEST_TOKENS)
        return n, pa.bucket(self.max_batch), n, pages

    def run(self, work: PagedWork) -> Sampled:
        """Run one iteration -> one sampled token (with logprobs) per chunk, in the plan's order."""
        plan = work.plan
        if not plan.chunks:  # an idle or stopping plan (broadcast to followers): nothing to run
            return None
        n, s, t, p = self.shape_for(plan)
        meta = tuple(pa.build_metadata([(c.start, len(c.token_ids), c.tables[g].first, c.tables[g].pages)
                                        for c in plan.chunks], self.page_size, self.num_pages, tokens=n, rows=s,
                                       queries=t, pages=p) for g in range(len(self.config.window_groups)))
        tokens = np.zeros(n, np.int32)
        flat = np.concatenate([c.token_ids for c in plan.chunks]).astype(np.int32)
        tokens[:len(flat)] = flat
        ends = np.cumsum([len(c.token_ids) for c in plan.chunks]) - 1
        logit_index, index = np.zeros(s, np.int32), np.zeros(s, np.int32)
        logit_index[:len(ends)], index[:len(ends)] = ends, work.index
        params = list(work.sampling) + [SamplingParams()] * (s - len(work.sampling))
        sampled = self._run(PagedInputs(tokens, meta, logit_index, index),
                            sampling_stage.metadata(params, self.config.vocab_size))
        return Sampled(*(getattr(sampled, f.name)[:len(plan.chunks)] for f in dataclasses.fields(Sampled)))

    def _run(self, inputs: PagedInputs, sampling) -> Sampled:
        put = functools.partial(sharding.put_replicated, self.mesh)
        out, self.kv_pages = _paged_step(self.config, self.mesh, self.params, self.kv_pages, put(inputs), put(sampling))
        return Sampled(*(np.asarray(x) for x in out))

    def warm_up(self) -> int:
        """Compile every program (empty rows: nothing is written, nothing read back) -> how many."""
        shapes = self.shapes()
        sampling = sampling_stage.metadata([SamplingParams()] * pa.bucket(self.max_batch), self.config.vocab_size)
        for n, s, t, p in shapes:
            meta = (pa.build_metadata([], self.page_size, self.num_pages, tokens=n, rows=s, queries=t, pages=p),
                    ) * len(self.config.window_groups)
            inputs = PagedInputs(np.zeros(n, np.int32), meta, np.zeros(s, np.int32), np.zeros(s, np.int32))
            self._run(inputs, jax.tree.map(lambda x, s=s: x[:s], sampling))
        return len(shapes)
