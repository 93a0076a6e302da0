"""Which engine serves: the paged one by default (serving/paged_engine.py: a page pool, prefix caching, ragged
batches), the slot engine (serving/engine.py) with `page_size=0` or where the paged engine cannot serve yet
(`paged_engine.unsupported`: speculation, a mesh, an int8 KV cache, mixed layer windows), said in one logged line."""

from __future__ import annotations

import logging

from mistral_jax import decoding
from mistral_jax.config import ModelConfig
from mistral_jax.serving import paged_engine
from mistral_jax.serving.adapters import Adapters
from mistral_jax.serving.engine import Engine
from mistral_jax.speculative import Speculation

log = logging.getLogger(__name__)


def make_engine(config: ModelConfig, params, tokenizer=None, *, page_size: int = paged_engine.DEFAULT_PAGE_SIZE,
                max_total_tokens: int | None = None,
                max_num_batched_tokens: int = paged_engine.DEFAULT_MAX_NUM_BATCHED_TOKENS, max_batch: int = 8,
                max_seq_len: int | None = None, prefill_chunk: int = decoding.DEFAULT_PREFILL_CHUNK,
                max_queue: int = 64, mesh=None, speculation: Speculation | None = None, draft_params=None,
                warm_up: bool = True, adapters: Adapters | None = None) -> Engine:
    """A paged engine of `page_size`-token pages (max_total_tokens, max_num_batched_tokens: its pool and token
    budget), else (page_size 0, or what it cannot serve) the slot engine (prefill_chunk, speculation); adapters:
    the served LoRA adapters (serving/adapters.py)"""
    reason = "--page-size 0" if page_size == 0 else paged_engine.unsupported(config, mesh, speculation,
                                                                             adapters, max_batch, max_total_tokens)
    if reason is None:
        return paged_engine.PagedEngine(config, params, tokenizer, page_size=page_size,
                                        max_total_tokens=max_total_tokens,
                                        max_num_batched_tokens=max_num_batched_tokens, max_batch=max_batch,
                                        max_seq_len=max_seq_len, max_queue=max_queue, mesh=mesh, warm_up=warm_up,
                                        adapters=adapters)
    if page_size:
        log.warning("serving from slots rather than pages: %s", reason)
    return Engine(config, params, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                  prefill_chunk=prefill_chunk, max_queue=max_queue, mesh=mesh, warm_up=warm_up,
                  speculation=speculation, draft_params=draft_params, adapters=adapters)
