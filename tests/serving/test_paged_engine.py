"""The paged engine (opt-in --page-size): every request equals mj.generate of its prompt alone, token for token,
under prefix-cache hits, preemption in a tiny pool, a sliding window decoded far past, and prompt lengths across
page and chunk boundaries; the pool ends with every page free; nothing compiles after warm-up."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import mistral_jax as mj
from mistral_jax.compile_stats import CompileStats
from mistral_jax.serving.paged_engine import PagedEngine
from mistral_jax.serving.requests import RequestError, SamplingParams
from mistral_jax.sharding import make_mesh

PAGE, CHUNK = 4, 16  # page_size and max_num_batched_tokens
SUFFIXES = [1, 3, 4, 6, 13, 17, 22, 30]  # after a 10-token system prompt: across pages (4) and chunks (16)
MAX_TOKENS = [16, 5, 12, 1, 9, 16, 3, 14]  # the tiny Mistral's window is 8: several decode past it (all of
# them in generate's one token buffer of 16: one reference program)


def _tokens(request) -> list[int]:
    return [t for event in request for t in event.token_ids]


def _model(preset: str, seed: int = 0):
    config = mj.ModelConfig.from_preset(preset)
    return mj.unstack_layers(config, mj.init_params(config, jax.random.key(seed)))


@pytest.fixture(scope="module", params=["tiny-mistral", pytest.param("tiny-mixtral", marks=pytest.mark.slow)])
def engine(request):
    config, params = _model(request.param)
    engine = PagedEngine(config, params, page_size=PAGE, max_total_tokens=512, max_num_batched_tokens=CHUNK,
                         max_batch=4, max_seq_len=64, max_queue=200).start()
    yield engine, config, params
    engine.stop()


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab_size, 10).tolist()
    return [system + rng.integers(0, vocab_size, n).tolist() for n in SUFFIXES]


def test_requests_equal_generate_alone_with_prefix_hits_and_nothing_recompiles(engine):
    engine, config, params = engine
    prompts = _prompts(config.vocab_size)
    with CompileStats() as compiled:
        first = _tokens(engine.submit(prompts[0], SamplingParams(max_tokens=MAX_TOKENS[0])))  # caches the system
        greedy = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts[1:], MAX_TOKENS[1:])]
        sampled = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.8, top_k=40, top_p=0.9, seed=i))
                   for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
        greedy, sampled = [first] + [_tokens(r) for r in greedy], [_tokens(r) for r in sampled]
    assert compiled.compilations == 0  # warm-up compiled every (tokens, rows, pages) bucket
    assert greedy == [mj.generate(config, params, [p], m)[0] for p, m in zip(prompts, MAX_TOKENS)]
    assert sampled == [mj.generate(config, params, [p], m, temperature=0.8, top_k=40, top_p=0.9, seed=i)[0]
                       for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
    metric = engine.metrics.registry.get_sample_value
    assert metric("mistral_jax_prefix_cache_hits_tokens_total") >= 8 * (len(prompts) - 1)  # two system pages each
    assert metric("mistral_jax_prefix_cache_queries_tokens_total") >= sum(map(len, prompts))
    assert engine.pool.num_used == 0 and metric("mistral_jax_kv_pages_used") == 0
    assert metric("mistral_jax_kv_pages_total") == 512 // PAGE
    assert engine.active_slots == 0 and not engine.busy


def test_a_window_bounds_the_pages_a_request_reads(engine):
    engine, config, _ = engine
    longest = engine.runner.max_pages * PAGE  # the widest page bucket, in tokens
    if config.sliding_window is None:
        assert longest >= engine.max_seq_len
    else:  # window 8 plus a chunk of 16, in pages of 4 (and one partial page): far below the 64-token context
        assert longest == 32 < engine.max_seq_len


def test_structured_output_without_a_tokenizer_is_refused_not_ignored(engine):
    engine, _, _ = engine
    with pytest.raises(RequestError) as err:  # no vocabulary to match a grammar against: a 400, never free text
        engine.submit([1, 2, 3], SamplingParams(response_format={"regex": "[0-9]+"}))
    assert err.value.param == "response_format"


def test_the_pool_is_all_free_after_many_requests_with_cancellations(engine):
    engine, config, params = engine
    rng = np.random.default_rng(5)
    prompts = _prompts(config.vocab_size, seed=1)
    requests, kept = [], []
    for i in range(100):
        prompt = prompts[i % len(prompts)]
        request = engine.submit(prompt, SamplingParams(max_tokens=int(rng.integers(1, 20))))
        requests.append(request)
        if i % 3 == 0:
            request.cancel()  # at once: often still waiting
        elif i % 3 == 1:
            kept.append((request, prompt))
    events = {}
    for i, request in enumerate(requests):
        if i % 3 == 2:
            events[i] = [next(iter(request))]  # its first token, then it is cancelled mid-flight (if not finished)
            request.cancel()
    for i, request in enumerate(requests):
        if events.get(i, [None])[-1] is None or events[i][-1].finish_reason is None:
            events.setdefault(i, []).extend(request)
    reasons = [events[i][-1].finish_reason for i in range(len(requests))]
    assert set(reasons) <= {"cancelled", "length"} and reasons.count("cancelled") >= 34
    for request, prompt in kept[:5]:
        assert request.generated == mj.generate(config, params, [prompt], request.params.max_tokens)[0]
    assert engine.pool.num_used == 0 and engine.active_slots == 0 and not engine.busy
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_preemption_in_a_tiny_pool_continues_every_stream_without_a_gap():
    config, params = _model("tiny-llama", seed=2)
    engine = PagedEngine(config, params, page_size=PAGE, max_total_tokens=48, max_num_batched_tokens=CHUNK,
                         max_batch=4, max_seq_len=32).start()  # 12 pages; four requests of up to 7 pages each
    try:
        rng = np.random.default_rng(3)
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (9, 12, 5, 10, 7, 11)]
        with CompileStats() as compiled:
            greedy = [engine.submit(p, SamplingParams(max_tokens=16)) for p in prompts]
            seeded = [engine.submit(p, SamplingParams(max_tokens=16, temperature=1.0, seed=7 + i))
                      for i, p in enumerate(prompts)]
            greedy, seeded = [_tokens(r) for r in greedy], [_tokens(r) for r in seeded]
        assert engine.preemptions > 0
        assert compiled.compilations == 0
        assert greedy == [mj.generate(config, params, [p], 16)[0] for p in prompts]
        assert seeded == [mj.generate(config, params, [p], 16, temperature=1.0, seed=7 + i)[0]
                          for i, p in enumerate(prompts)]
        assert engine.pool.num_used == 0
        with pytest.raises(RequestError) as err:  # past the context of 32 (and 13 pages): refused at once, naming
            engine.submit(list(range(50)), SamplingParams(max_tokens=1))  # max_tokens as the slot engine does
        assert err.value.param == "max_tokens"
        with pytest.raises(RequestError) as err:
            engine.submit(list(range(20)), SamplingParams(max_tokens=40))
        assert err.value.param == "max_tokens"
    finally:
        engine.stop()


def test_layers_mixing_sliding_and_full_attention_page_in_two_groups():
    """layer_types mixing a window of 8 and full attention: one page table per group, the sliding layers' pages
    outside the window freed as the request decodes far past it; every request equals mj.generate."""
    config = mj.ModelConfig.from_preset("tiny-mistral").replace(
        sliding_window=8, layer_types=("sliding_attention", "full_attention"))
    assert config.mixed_windows and config.window_groups == (8, None)
    config, params = mj.unstack_layers(config, mj.init_params(config, jax.random.key(6)))
    engine = PagedEngine(config, params, page_size=PAGE, max_total_tokens=256, max_num_batched_tokens=CHUNK,
                         max_batch=4, max_seq_len=64).start()
    try:
        prompts = _prompts(config.vocab_size, seed=3)[1::2]
        lengths = [28, 7, 25, 12]  # 28 and 25 share generate's token buffer of 32 (and 7 and 12 that of 16)
        seen = []  # (full pages, sliding pages) held by the longest request while it decodes
        longest = engine.submit(prompts[0], SamplingParams(max_tokens=lengths[0]))
        others = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.8, seed=i))
                  for i, (p, m) in enumerate(zip(prompts[1:], lengths[1:]))]
        tokens = []
        for event in longest:
            tokens += event.token_ids
            if engine.pool.holds(longest.id):
                seen.append((len(engine.pool.table(longest.id, 1).pages), len(engine.pool.table(longest.id, 0).pages)))
        assert tokens == mj.generate(config, params, [prompts[0]], lengths[0])[0]
        assert [_tokens(r) for r in others] == [mj.generate(config, params, [p], m, temperature=0.8, seed=i)[0]
                                                for i, (p, m) in enumerate(zip(prompts[1:], lengths[1:]))]
        full, sliding = max(f for f, _ in seen), max(s for _, s in seen)
        assert full >= (len(prompts[0]) + lengths[0] - 2) // PAGE  # the full layers keep every page
        assert sliding <= -(-(8 - 1 + CHUNK) // PAGE) + 1 < full  # the window's layers hold its pages alone
        assert engine.pool.num_used == 0
    finally:
        engine.stop()


@pytest.mark.slow
def test_a_mesh_of_8_devices_serves_what_one_device_does():
    """Weights placed by sharding.py's rules and each layer's pages split over its 2 KV heads (fsdp 4 x tensor 2):
    greedy and seeded requests equal mj.generate unsharded, token for token."""
    config, params = _model("tiny-mistral", seed=4)
    mesh = make_mesh(fsdp=4, tensor=2)
    engine = PagedEngine(config, params, page_size=PAGE, max_total_tokens=256, max_num_batched_tokens=CHUNK,
                         max_batch=2, max_seq_len=64, mesh=mesh).start()
    try:
        prompts = _prompts(config.vocab_size, seed=2)[::2]
        with CompileStats() as compiled:
            greedy = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts, MAX_TOKENS)]
            seeded = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.9, seed=3 + i))
                      for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
            greedy, seeded = [_tokens(r) for r in greedy], [_tokens(r) for r in seeded]
        assert compiled.compilations == 0
        pages = engine.runner.kv_pages[0]
        assert pages.sharding.spec == PartitionSpec(None, None, "tensor") and len(pages.sharding.device_set) == 8
        assert greedy == [mj.generate(config, params, [p], m)[0] for p, m in zip(prompts, MAX_TOKENS)]
        assert seeded == [mj.generate(config, params, [p], m, temperature=0.9, seed=3 + i)[0]
                          for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
        assert engine.pool.num_used == 0
    finally:
        engine.stop()
