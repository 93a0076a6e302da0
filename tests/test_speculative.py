"""Speculative decoding: greedy output identical to plain greedy, the ring's bound for rejected tokens, sampled
tokens distributed as plain sampling's, one compilation for every step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import mistral_jax as mj
from mistral_jax import decoding, speculative, step
from mistral_jax.compile_stats import CompileStats
from mistral_jax.model import kv_cache
from mistral_jax.sampling import accept, metadata

# Repeats (prompt lookup finds them), a short row and a long one, so rows accept different counts.
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [20], [30, 31, 32, 33, 30, 31]]


def _state(config, params, prompts, n, draft, k, temperature=0.0, seed=0):
    """The final DecodeState of `mj.generate`'s speculative path (its counters: what was drafted and kept)."""
    return decoding.run(config, params, prompts, n, temperature=temperature, seed=seed, draft=draft, draft_tokens=k)


def _perturbed(params, scale: float):
    """The parameters plus noise: a draft model that agrees with the target only part of the time. (NumPy draws:
    jax's eager ones compiled a program for every leaf's shape.)"""
    rng = np.random.RandomState(7)
    return jax.tree.map(lambda x: jnp.asarray(x + scale * np.std(x) * rng.normal(size=x.shape), x.dtype),
                        jax.device_get(params))


@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-mixtral", "tiny-llama"])
def test_greedy_equals_plain_greedy_token_for_token(preset):
    """Prompt lookup (and, on the windowed Mistral, a draft model) gives plain greedy's 16 tokens, with drafts
    both kept and rejected along the way; rows of the batch keep different counts. (Plain generate's shapes are
    test_decoding's ragged batch's, so a whole run compiles them once.)"""
    config = mj.ModelConfig.from_preset(preset)  # tiny-mistral: a window of 8 < 12 + 16 tokens
    params = mj.init_params(config, jax.random.key(0))
    expected = mj.generate(config, params, PROMPTS, 16)
    assert mj.generate(config, params, PROMPTS, 16, draft="prompt-lookup", draft_tokens=3) == expected
    drafts = {"prompt-lookup": "prompt-lookup"}
    if preset == "tiny-mistral":
        drafts |= {"agreeing model": (config, params), "noisy model": (config, _perturbed(params, 0.2))}
    for name, draft in drafts.items():
        state = _state(config, params, PROMPTS, 16, draft, 3)
        assert np.asarray(state.tokens)[:, :16].tolist() == expected, name
        drafted, kept = int(state.drafted.sum()), int(state.accepted.sum())
        if name == "agreeing model":
            assert kept == drafted and int(state.steps) == -(-15 // 4)  # k + 1 tokens every step
        else:
            assert 0 < kept < drafted, name
            assert len(set(np.asarray(state.counts).tolist())) > 1  # the rows' counts differ


def test_rejected_tokens_leave_the_cache_as_if_never_written():
    """Window 8, k = 4, every draft rejected: with the ring at window + k slots the next step's logits equal
    the uncached forward's and no slot holds a position past the kept ones; a window-sized ring (8 slots)
    loses slots the next query needs, so the bound is not slack."""
    config = mj.ModelConfig.from_preset("tiny-mistral")
    params = mj.init_params(config, jax.random.key(0))
    prompt = list(range(40, 46))  # the first token at 6, drafts at 7..10: a window-sized ring wraps onto 0..2
    k = 4
    errors, verify = {}, jax.jit(functools.partial(step.forward_tokens, config, None))
    greedy = jax.tree.map(jnp.asarray, metadata([mj.SamplingParams()], config.vocab_size))
    for lookahead in (k, 0):
        cache = mj.init_cache(config, 1, 64, lookahead=lookahead)
        assert kv_cache.cache_size(cache) == config.sliding_window + lookahead
        logits, cache = decoding.prefill(config, params, cache, [prompt], [list(range(6))])
        token = jnp.argmax(logits, -1).astype(jnp.int32)  # position 6
        drafts = jnp.array([[1, 1, 1, 1]], jnp.int32)
        step_logits, cache = verify(params, cache, jnp.concatenate([token[:, None], drafts], 1),
                                    6 + jnp.arange(5)[None])
        kept, emitted = accept(step_logits, drafts, greedy, jnp.array([1]))
        assert int(kept[0]) == 0
        cache = speculative.keep_accepted(cache, 6 + kept)
        assert int(cache["pos"].max()) == 6
        sequence = prompt + [int(token[0]), int(emitted[0, 0])]
        next_logits, _ = decoding.decode_step(config, params, cache, emitted[:, 0], jnp.array([7]))
        full = np.asarray(mj.logits(config, params, [sequence]))[0, -1]
        errors[lookahead] = np.max(np.abs(np.asarray(next_logits)[0] - full)) / np.max(np.abs(full))
    assert errors[k] <= 1e-5
    assert errors[0] > 1e-2


def test_lookup_proposes_what_followed_the_latest_match():
    history = jnp.array([[1, 2, 3, 4, 9, 1, 2, 3, 7, 8, 1, 2, 3, -1, -1, -1],  # 1 2 3 last followed by 7 8
                         [4, 5, 4, 5, 4, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],  # a loop: continue it
                         [1, 2, 3, 4, 5, 6, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]], jnp.int32)  # no repeat
    drafts, found = speculative.lookup_drafts(history, jnp.array([13, 5, 6]), 4, max_ngram=3, min_ngram=2)
    assert found.tolist() == [True, True, False]
    assert drafts[:2].tolist() == [[7, 8, 1, 2], [5, 4, 5, 4]]


def _chi_square_p(a: np.ndarray, b: np.ndarray, vocab: int) -> float:
    """p-value of the chi-square test that two samples of tokens come from one distribution."""
    table = np.stack([np.bincount(a, minlength=vocab), np.bincount(b, minlength=vocab)])
    return scipy.stats.chi2_contingency(table[:, table.sum(0) > 0]).pvalue


def test_sampled_tokens_are_distributed_as_plain_sampling():
    """Vocabulary 16, 2048 rows, temperature 1: for new tokens 2..5 (made by verify steps), a chi-square test of
    speculative against plain sampling does not reject at significance 0.001 (fixed seeds), for prompt lookup
    (q a point mass) and a draft model (q a distribution), with drafts kept and rejected in both. The same test
    does tell plain sampling's token 2 from its token 3 (p < 0.001), so it can see a difference that size."""
    config = mj.ModelConfig.from_preset("tiny-llama", vocab_size=16, init_std=0.5, scan_layers=False)
    params = mj.init_params(config, jax.random.key(0))
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2]] * 2048
    plain = np.asarray(mj.generate(config, params, prompts, 5, temperature=1.0, seed=1))
    for name, draft in {"prompt-lookup": "prompt-lookup", "draft model": (config, _perturbed(params, 0.5))}.items():
        state = _state(config, params, prompts, 5, draft, 3, temperature=1.0, seed=2)
        assert 0 < int(state.accepted.sum()) < int(state.drafted.sum()), name
        sample = np.asarray(state.tokens)[:, :5]
        p_values = [_chi_square_p(plain[:, j], sample[:, j], 16) for j in (1, 2, 3, 4)]
        assert min(p_values) > 1e-3, (name, p_values)
    assert _chi_square_p(plain[:, 1], plain[:, 2], 16) < 1e-3


def test_steps_compile_once():
    """After one call, other lengths in the bucket compile nothing (generate's loop, generate_stream's steps),
    and the stream yields generate's tokens."""
    config = mj.ModelConfig.from_preset("tiny-mistral", scan_layers=False)
    params = mj.init_params(config, jax.random.key(0))
    first = mj.generate(config, params, PROMPTS, 40, draft="prompt-lookup", draft_tokens=3)
    list(mj.generate_stream(config, params, PROMPTS, 40, draft="prompt-lookup", draft_tokens=3))
    with CompileStats() as compiled:
        longer = mj.generate(config, params, PROMPTS, 45, draft="prompt-lookup", draft_tokens=3)
        streamed = np.stack(list(mj.generate_stream(config, params, PROMPTS, 43, draft="prompt-lookup",
                                                    draft_tokens=3)), axis=1)
    assert compiled.compilations == 0
    assert [row[:40] for row in longer] == first and streamed.tolist() == [row[:43] for row in longer]


def test_draft_errors():
    config, params = mj.ModelConfig.from_preset("tiny-llama"), None  # refused before the parameters are read
    with pytest.raises(mj.UserError, match="share the tokenizer"):
        mj.generate(config, params, [[1, 2]], 4, draft=(config.replace(vocab_size=300), params))
    with pytest.raises(mj.UserError, match="draft must be"):
        mj.generate(config, params, [[1, 2]], 4, draft="ngram")
    with pytest.raises(mj.UserError, match="draft_tokens"):
        mj.generate(config, params, [[1, 2]], 4, draft="prompt-lookup", draft_tokens=0)

