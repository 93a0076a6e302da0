"""The engine alone (tiny models, no HTTP): every request equals mj.generate of its prompt alone, whatever shares
the batch; slots are freed and refilled; nothing recompiles after warm-up; bad requests fail alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.compile_stats import CompileStats
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.requests import QueueFull, RequestError, SamplingParams

# Lengths cross the prefill chunk (16) and the tiny Mistral's window (8); more requests than slots.
PROMPT_LENGTHS = [3, 20, 7, 40, 11, 5, 33, 2, 17]
MAX_TOKENS = [5, 12, 30, 8, 17, 3, 25, 9, 1]


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def _tokens(request) -> list[int]:
    return [t for event in request for t in event.token_ids]


@pytest.fixture(scope="module", params=["tiny-mistral", "tiny-mixtral"])
def engine(request):
    config = mj.ModelConfig.from_preset(request.param)
    config, params = mj.unstack_layers(config, mj.init_params(config, jax.random.key(0)))
    engine = Engine(config, params, max_batch=4, max_seq_len=128, prefill_chunk=16, max_queue=24).start()
    yield engine, config, params
    engine.stop()


def test_every_request_equals_generate_alone_and_nothing_recompiles(engine):
    engine, config, params = engine
    prompts = _prompts(config.vocab_size)
    with CompileStats() as compiled:
        greedy = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts, MAX_TOKENS)]
        sampled = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.8, top_k=40, top_p=0.9, seed=i))
                   for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
        greedy, sampled = [_tokens(r) for r in greedy], [_tokens(r) for r in sampled]
        penalized = [engine.submit(p, s) for p, s in zip(prompts, _penalized(config.vocab_size))]  # queue: 24
        penalized = [_tokens(r) for r in penalized]
    assert compiled.compilations == 0  # warm-up compiled the decode step (penalized too) and every prefill bucket
    assert greedy == [mj.generate(config, params, [p], m)[0] for p, m in zip(prompts, MAX_TOKENS)]
    assert sampled == [mj.generate(config, params, [p], m, temperature=0.8, top_k=40, top_p=0.9, seed=i)[0]
                       for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
    assert penalized == [mj.generate(config, params, [p], s.max_tokens, sampling=[s])[0]
                         for p, s in zip(prompts, _penalized(config.vocab_size))]
    assert engine.active_slots == 0 and not engine.busy


def _penalized(vocab_size: int) -> list[SamplingParams]:
    """Requests with penalties, logit_bias and min_p, greedy and sampled, one per prompt."""
    return [SamplingParams(max_tokens=m, temperature=0.9 * (i % 2), min_p=0.05 * (i % 3), seed=i,
                           repetition_penalty=1.0 + 0.3 * (i % 4 == 0), presence_penalty=0.5 * (i % 3 == 1),
                           frequency_penalty=0.4 * (i % 3 == 2), logit_bias={(7 * i) % vocab_size: 4.0})
            for i, m in enumerate(MAX_TOKENS)]


def test_stop_ids_logprobs_and_cancellation(engine):
    engine, config, params = engine
    prompt = _prompts(config.vocab_size)[1]
    alone = mj.generate(config, params, [prompt], 12)[0]
    events = list(engine.submit(prompt, SamplingParams(max_tokens=12, stop_token_ids=(alone[4],), logprobs=2)))
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == alone[: alone.index(alone[4]) + 1] and events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens == len(tokens) and events[-1].prompt_tokens == len(prompt)
    logits = np.asarray(mj.logits(config, params, [prompt + tokens]))[0, len(prompt) - 1:-1]
    reference = jax.nn.log_softmax(logits)[np.arange(len(tokens)), tokens]
    np.testing.assert_allclose([e.logprobs[0].logprob for e in events], reference, atol=2e-4)
    assert all(e.logprobs[0].top[0][0] == t for e, t in zip(events, tokens))  # greedy: the top token is chosen

    long = engine.submit(prompt, SamplingParams(max_tokens=100))
    first = next(iter(long))
    assert first.finish_reason is None and engine.active_slots == 1
    long.cancel()
    assert [e.finish_reason for e in long][-1] == "cancelled"
    assert engine.active_slots == 0
    assert _tokens(engine.submit(prompt, SamplingParams(max_tokens=12))) == alone  # the freed slot serves again


def test_bad_requests_fail_alone_and_a_full_queue_refuses(engine):
    engine, config, _ = engine
    bad = [([], {}, "prompt"), ([config.vocab_size], {}, "prompt"), ([1, 2], {"max_tokens": 127}, "max_tokens")]
    for prompt, settings, param in bad:
        with pytest.raises(RequestError) as err:
            engine.submit(prompt, SamplingParams(**settings))
        assert err.value.param == param
    for settings, param in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                            ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(RequestError) as err:
            SamplingParams(**settings)
        assert err.value.param == param
    with pytest.raises(RequestError, match="tokenizer"):
        engine.submit([1, 2], SamplingParams(stop=("x",)))
    long = SamplingParams(max_tokens=120)  # outlasts the submissions below by far
    held = [engine.submit([1, 2, 3], long) for _ in range(engine.max_queue)]  # fits: nothing else is queued
    with pytest.raises(QueueFull):
        for _ in range(engine.max_batch + 1):  # the slots take at most max_batch of them off the queue
            held.append(engine.submit([1, 2, 3], long))
    for request in held:
        request.cancel()
    assert all([e.finish_reason for e in r][-1] in ("cancelled", "length") for r in held)
    assert len(_tokens(engine.submit([1, 2, 3], SamplingParams(max_tokens=4)))) == 4


def _decoded_logprobs(config, params, prompt: list[int], tokens: list[int], chunk: int) -> np.ndarray:
    """Log-probabilities of `tokens` after `prompt` through the public cache API: mj.prefill in chunks, then one
    mj.decode_step per token (the cache in config.kv_cache_dtype, as the engine keeps it)."""
    cache = mj.init_cache(config, 1, 64)
    logits, cache = mj.prefill(config, params, cache, jnp.asarray([prompt], jnp.int32),
                               jnp.arange(len(prompt))[None], chunk)
    out = [jax.nn.log_softmax(logits[0])[tokens[0]]]
    for i, token in enumerate(tokens[:-1]):
        logits, cache = mj.decode_step(config, params, cache, jnp.asarray([token]), jnp.asarray([len(prompt) + i]))
        out.append(jax.nn.log_softmax(logits[0])[tokens[i + 1]])
    return np.asarray(out)


def test_a_quantized_model_with_an_int8_cache_serves_as_it_generates():
    """int8 weights (the CPU's int8 dots, activation scales per row: a row's tokens do not depend on its batch)
    and an int8 KV cache: each request equals mj.generate alone on the same quantized model, and its logprobs
    are those of decoding through an int8 cache (a float cache's differ by far more than the tolerance)."""
    config = mj.ModelConfig.from_preset("tiny-mistral")
    config, params = mj.quantize(*mj.unstack_layers(config, mj.init_params(config, jax.random.key(1))))
    config = config.replace(kv_cache_dtype="int8")
    prompts = _prompts(config.vocab_size)[:3]  # 3, 20 and 7 tokens on 2 slots
    engine = Engine(config, params, max_batch=2, max_seq_len=64, prefill_chunk=8).start()
    try:
        events = [list(r) for r in [engine.submit(p, SamplingParams(max_tokens=10, logprobs=1)) for p in prompts]]
    finally:
        engine.stop()
    served = [[t for e in ev for t in e.token_ids] for ev in events]
    assert served == [mj.generate(config, params, [p], 10)[0] for p in prompts]
    float_cache = config.replace(kv_cache_dtype=None)
    for prompt, tokens, ev in zip(prompts, served, events):
        logprobs = np.array([e.logprobs[0].logprob for e in ev])
        np.testing.assert_allclose(logprobs, _decoded_logprobs(config, params, prompt, tokens, 8), atol=1e-5)
        assert np.max(np.abs(logprobs - _decoded_logprobs(float_cache, params, prompt, tokens, 8))) > 1e-3
