"""The paged engine's sampling features, in a pool small enough that requests are preempted and recomputed:
penalties equal mj.generate with the same settings token for token (greedy and seeded, penalized rows beside plain
ones), echoed prompt logprobs and grammar-constrained answers equal the slot engine's, and none of them compiles
anything after warm-up. A tiny Llama with SmolLM2's 49k vocabulary, so the grammars match a real tokenizer."""

import re

import jax
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.compile_stats import CompileStats
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.paged_engine import PagedEngine
from mistral_jax.serving.requests import SamplingParams
from mistral_jax.tokenizers import load_tokenizer

PENALTIES = [dict(presence_penalty=1.5), dict(frequency_penalty=0.9), dict(repetition_penalty=1.8),
             dict(presence_penalty=-0.5, frequency_penalty=0.4, repetition_penalty=1.3), {}]


def _tokens(request) -> list[int]:
    return [t for event in request for t in event.token_ids]


@pytest.fixture(scope="module")
def model():
    tokenizer = load_tokenizer(default_model_path())
    config = mj.ModelConfig.from_preset("tiny-llama").replace(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    config, params = mj.unstack_layers(config, mj.init_params(config, jax.random.key(4)))
    paged = PagedEngine(config, params, tokenizer, page_size=8, max_total_tokens=48, max_num_batched_tokens=16,
                        max_batch=4, max_seq_len=32, max_queue=32).start()  # 6 pages: 4 requests of 4 preempt
    # (pages of 8: one page-count bucket, 4 programs to warm up; pages of 4 made 8)
    yield config, params, tokenizer, paged
    paged.stop()


def _prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


def test_penalties_equal_generate_with_the_same_settings(model):
    config, params, _, engine = model
    prompts = _prompts(config.vocab_size, (9, 12, 5, 10, 7))
    settings = [dict(max_tokens=16, ignore_eos=True, **penalty) for penalty in PENALTIES]
    preempted = engine.preemptions
    with CompileStats() as compiled:
        greedy = [engine.submit(p, SamplingParams(**s)) for p, s in zip(prompts, settings)]
        seeded = [engine.submit(p, SamplingParams(temperature=0.9, seed=3 + i, **s))
                  for i, (p, s) in enumerate(zip(prompts, settings))]
        greedy, seeded = [_tokens(r) for r in greedy], [_tokens(r) for r in seeded]
    assert compiled.compilations == 0
    assert engine.preemptions > preempted  # some were recomputed from their prompt and output so far
    assert greedy == [mj.generate(config, params, [p], 16, **penalty)[0] for p, penalty in zip(prompts, PENALTIES)]
    assert seeded == [mj.generate(config, params, [p], 16, temperature=0.9, seed=3 + i, **penalty)[0]
                      for i, (p, penalty) in enumerate(zip(prompts, PENALTIES))]
    plain = [mj.generate(config, params, [p], 16)[0] for p in prompts[:4]]
    assert all(g != q for g, q in zip(greedy[:4], plain))  # every penalty changed its greedy answer


@pytest.fixture(scope="module")
def slots(model):
    config, params, tokenizer, _ = model
    engine = Engine(config, params, tokenizer, max_batch=4, max_seq_len=32).start()
    yield engine
    engine.stop()


def test_echoed_prompt_logprobs_equal_the_slot_engines(model, slots):
    config, _, _, engine = model
    prompts = _prompts(config.vocab_size, (1, 9, 17, 6), seed=1)
    with CompileStats() as compiled:  # the scorer's buckets compile on first use, in both engines alike
        [_tokens(slots.submit(p, SamplingParams(max_tokens=2, echo_logprobs=True))) for p in prompts]
    expected = [next(iter(slots.submit(p, SamplingParams(max_tokens=2, echo_logprobs=True)))) for p in prompts]
    with CompileStats() as again:
        events = [list(engine.submit(p, SamplingParams(max_tokens=2, echo_logprobs=True))) for p in prompts]
    assert compiled.compilations > 0 and again.compilations == 0
    for first, (event, *_) in zip(expected, events):
        assert event.prompt_logprobs == first.prompt_logprobs and event.token_ids == first.token_ids
    assert events[0][0].prompt_logprobs is None and len(events[2][0].prompt_logprobs) == 17
    assert [e.prompt_logprobs for e in events[1][1:]] == [None]  # on the first event only


def test_grammar_constrained_answers_equal_the_slot_engines(model, slots):
    config, _, tokenizer, engine = model
    prompts = _prompts(config.vocab_size, (8, 11, 5, 9, 12, 7), seed=2)
    formats = [{"regex": "[0-9]{3}-[a-z]{2,4}"}, {"choice": ["yes", "no", "maybe"]}, {"json_object": True},
               {"regex": "[0-9]{18}"}, None, {"regex": "[1-9]{17}x"}]  # the digits' answers hold 17 tokens or more
    settings = [SamplingParams(max_tokens=20, response_format=f, temperature=0.7 * (i % 2), seed=i)
                for i, f in enumerate(formats)]
    expected = [list(slots.submit(p, s)) for p, s in zip(prompts, settings)]
    preempted = engine.preemptions
    with CompileStats() as compiled:
        requests = [engine.submit(p, s) for p, s in zip(prompts * 2, settings * 2)]  # all at once: preemption
        events = [list(r) for r in requests]
    assert compiled.compilations == 0
    assert engine.preemptions > preempted
    for answer, (got, want) in enumerate(zip(events, expected * 2)):
        assert [e.token_ids for e in got] == [e.token_ids for e in want], answer
        assert got[-1].finish_reason == want[-1].finish_reason
    text = ["".join(e.text for e in answer) for answer in events]
    assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", text[0]) and text[1] in ("yes", "no", "maybe")
    assert re.fullmatch("[0-9]{18}", text[3]) and re.fullmatch("[1-9]{17}x", text[5])
    assert engine.pool.num_used == 0 and not engine.busy
