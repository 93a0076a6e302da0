"""Prefill + decode over the rolling cache equal the plain causal forward; generate's batching and sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import decoding, step
from mistral_jax.compile_stats import CompileStats
from mistral_jax.sampling import metadata


@pytest.fixture(scope="module", params=["scanned", "unscanned"])
def mistral(request):
    """Both layer layouts (ModelConfig.scan_layers): the unscanned one keeps a cache buffer per layer."""
    config = mj.ModelConfig.from_preset("tiny-mistral")  # sliding window 8
    params = mj.init_params(config, jax.random.key(0))
    return (config, params) if request.param == "scanned" else mj.unstack_layers(config, params)


@pytest.fixture(scope="module")
def mixtral():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    return config, mj.init_params(config, jax.random.key(0))


def test_greedy_decode_over_a_wrapping_ring_equals_full_forward(mistral):
    """40 greedy tokens through a window-8 cache: every step's logits equal the uncached causal forward's.

    The forward is causal, so column t of one pass over the final sequence is mj.logits over the prefix
    that ends at t: one compilation instead of 40.
    """
    config, params = mistral
    prompt = [3, 17, 42, 5, 99]
    cache = mj.init_cache(config, 1, len(prompt) + 40)
    assert jax.tree.leaves(cache["k"])[0].shape[-2] == 8  # the ring is bounded by the window, not by the 45 tokens
    logits, cache = decoding.prefill(config, params, cache, [prompt], [list(range(len(prompt)))], chunk_size=4)
    sequence, step_logits = list(prompt), []
    for _ in range(40):
        step_logits.append(np.asarray(logits)[0])
        sequence.append(int(np.argmax(step_logits[-1])))
        token, position = jnp.array([sequence[-1]]), jnp.array([len(sequence) - 1])
        logits, cache = decoding.decode_step(config, params, cache, token, position)
    full = np.asarray(mj.logits(config, params, [sequence]))[0, len(prompt) - 1 : -1]  # [40, V]
    assert np.max(np.abs(np.stack(step_logits) - full)) <= 1e-4 * np.max(np.abs(full))
    assert np.argmax(full, axis=-1).tolist() == sequence[len(prompt):]
    assert mj.generate(config, params, [prompt], 40) == [sequence[len(prompt):]]


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_chunked_prefill_equals_full_forward(mixtral, chunk):
    config, params = mixtral
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 21), 0, config.vocab_size))
    cache = mj.init_cache(config, 2, 30)
    positions = np.broadcast_to(np.arange(21), (2, 21))
    logits, _ = decoding.prefill(config, params, cache, tokens, positions, chunk_size=chunk)
    full = np.asarray(mj.logits(config, params, tokens))[:, -1]
    np.testing.assert_allclose(np.asarray(logits), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_decode_step_compiles_once(mistral):
    config, params = mistral
    cache = mj.init_cache(config, 2, 64)
    logits, cache = decoding.prefill(config, params, cache, [[1, 2, 3], [4, 5, 6]], [[0, 1, 2]] * 2)
    tokens, positions = jnp.array([7, 8]), jnp.array([3, 3])

    def steps(n, logits, cache, positions):
        for _ in range(n):
            positions = positions + 1
            tokens = jnp.argmax(logits, -1).astype(jnp.int32)
            logits, cache = decoding.decode_step(config, params, cache, tokens, positions)
        return jax.block_until_ready(logits), cache, positions

    logits, cache, positions = steps(2, *decoding.decode_step(config, params, cache, tokens, positions), positions)
    with CompileStats() as compiled:
        steps(50, logits, cache, positions)
    assert compiled.compilations == 0


@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-mixtral", "tiny-llama"])
def test_ragged_batch_equals_each_row_alone(preset):
    config = mj.ModelConfig.from_preset(preset)
    params = mj.init_params(config, jax.random.key(0))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33]]
    batched = mj.generate(config, params, prompts, 12)
    alone = [mj.generate(config, params, [p], 12)[0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 12 for row in batched)


def test_rows_stop_at_eos(mistral):
    config, params = mistral
    free = mj.generate(config, params, [[1, 2, 3], [9, 8]], 10)
    eos = free[0][3]  # make the 4th token of row 0 the eos
    stopped = mj.generate(config, params, [[1, 2, 3], [9, 8]], 10, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else 10
    assert stopped[1] == free[1][:cut]


def test_sampling_is_reproducible_and_seeded(mistral):
    config, params = mistral
    a = mj.generate(config, params, [[1, 2, 3]] * 2, 20, temperature=1.0, seed=3)
    b = mj.generate(config, params, [[1, 2, 3]] * 2, 20, temperature=1.0, seed=3)
    c = mj.generate(config, params, [[1, 2, 3]] * 2, 20, temperature=1.0, seed=4)
    assert a == b and a != c
    assert a[0] != a[1]  # rows draw different samples


def test_stream_yields_the_same_tokens_as_generate(mistral):
    config, params = mistral
    prompts = [[1, 2, 3], [4, 5]]
    for kwargs in ({}, {"temperature": 0.8, "top_k": 20, "seed": 1}):
        expected = mj.generate(config, params, prompts, 15, **kwargs)
        streamed = np.stack(list(decoding.generate_stream(config, params, prompts, 15, **kwargs)), axis=1)
        assert streamed.tolist() == expected


def test_context_and_prompt_errors(mistral):
    config, params = mistral
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        mj.generate(config, params, [[1] * 250], 10)
    with pytest.raises(ValueError, match="at least one token"):
        mj.generate(config, params, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside"):
        mj.generate(config, params, [[1, 999]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mj.generate(config, params, [[1, 2]], 0)


def test_a_lone_prompt_padded_to_two_rows_generates_the_same(mistral, monkeypatch):
    """MIN_DECODE_ROWS (two rows on GPUs, where XLA's one-row matmuls are slow): the copy is dropped."""
    config, params = mistral
    prompt = [[3, 17, 42, 5]]
    alone = mj.generate(config, params, prompt, 10)
    streamed = list(mj.generate_stream(config, params, prompt, 10))
    monkeypatch.setitem(decoding.MIN_DECODE_ROWS, jax.default_backend(), 2)
    assert mj.generate(config, params, prompt, 10) == alone
    padded = list(mj.generate_stream(config, params, prompt, 10))
    assert [t.shape for t in padded] == [(1,)] * 10
    assert np.stack(padded).tolist() == np.stack(streamed).tolist()


@pytest.mark.parametrize("batch", [1, 3])
def test_unscanned_decode_step_updates_the_cache_in_place(batch):
    """The optimized program of an unscanned decode step copies no cache buffer (XLA:CPU copies one per
    layer and step when the update pattern is wrong: benchmarks/RESULTS.md), and slices no weight."""
    import re

    config = mj.ModelConfig.from_preset("tiny-mistral", scan_layers=False)
    params = mj.init_params(config, jax.random.key(0))
    cache = mj.init_cache(config, batch, 64)
    ints = jnp.zeros((batch,), jnp.int32)
    rows, slots, head_dim = cache["k"][0].shape
    sampling = jax.tree.map(jnp.asarray, metadata([mj.SamplingParams()] * batch, config.vocab_size))
    generation_step = jax.jit(functools.partial(step.step, None, 0, config, None), donate_argnums=4)
    programs = {"decode_step": decoding.forward_step.lower(config, None, params, cache, ints, ints),
                "generation step": generation_step.lower(params, None, step.Rows(ints, ints, ints, ints == 0),
                                                         sampling, step.Carry(cache, None, None, None))}
    for name, lowered in programs.items():
        text = lowered.compile().as_text()
        entry = text[text.index("\nENTRY"):]
        buffer = rf"f32\[{rows},{slots},{head_dim}\]"
        assert re.findall(rf"= {buffer}\S* parameter\(", entry), name  # the pattern does match the cache buffers
        assert not re.findall(rf"= {buffer}\S* copy\(", entry), name
        assert "dynamic-slice" not in entry, name


def test_a_new_max_new_tokens_compiles_nothing(mistral):
    """generate's loop bound is traced and its token buffer and cache come in buckets: after one call, other
    lengths in the same bucket reuse every compiled program, in generate and in generate_stream."""
    config, params = mistral
    prompts = [[1, 2, 3], [4, 5]]
    first = mj.generate(config, params, prompts, 5)
    list(mj.generate_stream(config, params, prompts, 5))
    with CompileStats() as compiled:
        longer = mj.generate(config, params, prompts, 11)
        shorter = mj.generate(config, params, prompts, 3)
        streamed = np.stack(list(mj.generate_stream(config, params, prompts, 9)), axis=1)
    assert compiled.compilations == 0
    assert [row[:5] for row in longer] == first and shorter == [row[:3] for row in first]
    assert [len(row) for row in longer] == [11, 11] and streamed.tolist() == [row[:9] for row in longer]

