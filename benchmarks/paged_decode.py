"""Start-up and one paged decode iteration of SmolLM2-135M's shapes (float32, random weights, CPU): 8 requests of 90 to
127 tokens each, in a pool sized for --max-seq-len 1024 and for 32768 (8 full contexts, capped by the default memory
budget), against the ring slots' decode step (at 1024 by default: 8 rows of 32768 take 12 GB). The paged program
depends on the pages the rows hold, not on --max-seq-len; the slots' step reads the whole ring. Start-up: how many
programs the paged runner's warm-up compiles (its buckets) and in how many seconds.

    python benchmarks/paged_decode.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import mistral_jax as mj
from mistral_jax.compile_stats import CompileStats
from mistral_jax.sampling import SamplingParams, packed_width, token_counts
from mistral_jax.serving import paged_engine
from mistral_jax.serving.paged_runner import PagedModelRunner, PagedWork
from mistral_jax.serving.pages import PagePool
from mistral_jax.serving.runner import DecodeInputs, ModelRunner, Plan
from mistral_jax.serving.scheduler import Scheduler

ROWS, CONTEXT, PAGE = 8, 90, 16  # 90 + up to 37 decodes stay in 8 pages: one page bucket


def paged(config, params, max_seq_len: int, repeats: int,
          warm_up: bool = True) -> tuple[float, float, int, int, tuple[float, float]]:
    """(seconds per decode iteration, plain and penalized; pages in the pool, programs compiled at warm-up, warm-up
    wall and CPU seconds)."""
    budget = paged_engine.DEFAULT_KV_BUDGET_BYTES // paged_engine.token_bytes(config)
    tokens = max(max_seq_len, min(ROWS * max_seq_len, budget))
    pool = PagePool.from_tokens(tokens, PAGE)
    scheduler = Scheduler(pool, ROWS, 256)
    runner = PagedModelRunner(config, params, num_pages=pool.num_pages, page_size=PAGE, max_batch=ROWS,
                              max_num_batched_tokens=256, max_pages_per_seq=pool.pages_for(max_seq_len, 256))
    start, cpu = time.perf_counter(), time.process_time()
    programs = runner.warm_up() if warm_up else 0  # without: only the programs the iterations below run compile
    warm_up = time.perf_counter() - start, time.process_time() - cpu  # wall and CPU seconds (a loaded machine)
    rng = np.random.default_rng(0)
    for i in range(ROWS):
        scheduler.submit(i, rng.integers(0, config.vocab_size, CONTEXT).tolist(), max_tokens=max_seq_len - CONTEXT)
    sampling = (SamplingParams(),) * ROWS
    while True:
        plan = scheduler.schedule()
        out = runner.run(PagedWork(plan, sampling, (0,) * len(plan.chunks)))
        scheduler.update(plan, {c.request_id: int(t) for c, t in zip(plan.chunks, out.decode.tokens)})
        if len(plan.chunks) == ROWS and all(len(c.token_ids) == 1 for c in plan.chunks):
            break
    penalized = (SamplingParams(repetition_penalty=1.1, presence_penalty=0.5),) * ROWS
    best = {False: float("inf"), True: float("inf")}  # plain, penalized (counts rebuilt on the host, timed too)
    with CompileStats() as compiled:
        for i in range(2 * repeats):
            plan, penalize = scheduler.schedule(), bool(i % 2)
            start = time.perf_counter()
            counts = None
            if penalize:
                seqs = [scheduler.find(c.request_id) for c in plan.chunks]
                counts = token_counts([q.prompt for q in seqs], [q.output for q in seqs], config.vocab_size)
            out = runner.run(PagedWork(plan, penalized if penalize else sampling, (0,) * ROWS, counts=counts))
            best[penalize] = min(best[penalize], time.perf_counter() - start)
            scheduler.update(plan, {c.request_id: int(t) for c, t in zip(plan.chunks, out.decode.tokens)})
    assert compiled.compilations == 0, "a timed decode iteration compiled"
    return best[False], best[True], pool.num_pages, programs, warm_up


def slots(config, params, max_seq_len: int, repeats: int) -> float:
    runner = ModelRunner(config, params, max_batch=ROWS, max_seq_len=max_seq_len)
    inputs = DecodeInputs(np.zeros(ROWS, np.int32), np.full(ROWS, CONTEXT, np.int32), np.zeros(ROWS, np.int32),
                          np.ones(ROWS, bool), np.full((ROWS, packed_width(config.vocab_size)), -1, np.int32))
    runner.run(Plan(decode=inputs))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(Plan(decode=inputs))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--lengths", default="1024,32768")
    parser.add_argument("--no-warm-up", action="store_true", help="time the decode only (compile what it runs)")
    parser.add_argument("--slots", default="1024", help="lengths at which to time the ring slots' decode step too")
    args = parser.parse_args()
    config = mj.ModelConfig.from_preset("smollm2-135m-instruct")
    params = mj.init_params(config, jax.random.key(0))
    for length in map(int, args.lengths.split(",")):
        step, penalized, pages, programs, warm_up = paged(config, params, length, args.repeats, not args.no_warm_up)
        line = f"--max-seq-len {length}: {programs} programs in {warm_up[0]:.1f} s ({warm_up[1]:.1f} CPU s); " \
               f"paged decode of {ROWS} x " \
               f"{CONTEXT} tokens {step * 1e3:.1f} ms, penalized {penalized * 1e3:.1f} ms (pool {pages} pages of " \
               f"{PAGE})"
        if str(length) in args.slots.split(","):
            line += f"; ring slots {slots(config, params, length, args.repeats) * 1e3:.1f} ms"
        print(line, flush=True)


if __name__ == "__main__":
    main()
