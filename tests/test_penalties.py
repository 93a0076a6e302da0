"""The sampling stage's penalties, logit_bias and min_p against their references: transformers' greedy generate
with repetition_penalty on the real SmolLM2 (golden tokens, and the live package where installed), a NumPy loop
that recomputes the full forward every step for logit_bias and OpenAI's presence/frequency penalties, and a
chi-square test for min_p; rows with different settings in one call each equal that row alone; new settings
compile nothing."""

import pathlib
import sys

import jax
import numpy as np
import pytest
import scipy.stats

import mistral_jax as mj
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.compile_stats import CompileStats

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
PROMPTS = [[5, 6, 7, 5, 6, 7, 5], [9, 3], [40, 41, 42, 43, 40, 41]]
REFERENCE_LEN = 32  # the NumPy reference's forward length: the longest prompt and its new tokens fit


@pytest.fixture(scope="module")
def smollm2():
    return mj.load(default_model_path())  # the scanned layout: generate runs the unscanned one itself


def test_repetition_penalty_equals_transformers_golden_tokens(smollm2):
    """Greedy with repetition_penalty=1.3 on the real SmolLM2 gives transformers' 24 tokens (tests/fixtures/
    make_fixtures.py: greedy `generate` with RepetitionPenaltyLogitsProcessor over prompt and output), which differ
    from transformers' plain greedy tokens (stored beside them)."""
    config, params = smollm2
    golden = np.load(FIXTURES / "smollm2_repetition.npz")
    prompt, expected = golden["prompt"].tolist(), golden["tokens"].tolist()
    penalized = mj.generate(config, params, [prompt], len(expected), eos_id=config.eos_id,
                            repetition_penalty=float(golden["repetition_penalty"]))[0]
    assert penalized == expected
    assert golden["plain"].tolist() != expected


@pytest.mark.slow
def test_repetition_penalty_equals_live_transformers(smollm2, tmp_path):
    """The golden test's twin against the installed transformers, at another penalty (1.15)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(FIXTURES))
    import make_fixtures

    from mistral_jax.checkpoints import hf

    config, params = smollm2
    prompt = np.load(FIXTURES / "smollm2_repetition.npz")["prompt"].tolist()
    hf.write(config, params, tmp_path / "smollm2")
    expected = make_fixtures.smollm2_greedy_tokens(tmp_path / "smollm2", prompt, config.eos_id,
                                                   repetition_penalty=1.15)
    assert mj.generate(config, params, [prompt], len(expected), eos_id=config.eos_id,
                       repetition_penalty=1.15)[0] == expected


def _reference(config, params, prompt: list[int], n: int, bias: dict, presence: float, frequency: float,
               repetition: float) -> list[int]:
    """NumPy greedy: the full forward over the whole sequence every step (no cache), then logit_bias, the
    repetition penalty over prompt and output, OpenAI's presence and frequency penalties over the output."""
    sequence, out = list(prompt), []
    for _ in range(n):
        # right-padded to one length, so one compiled forward serves every step (causal: the padding after the
        # last token does not reach its logits)
        padded = sequence + [0] * (REFERENCE_LEN - len(sequence))
        x = np.asarray(mj.logits(config, params, [padded]))[0, len(sequence) - 1].astype(np.float64)
        for token, value in bias.items():
            x[token] += value
        seen = np.zeros(len(x), bool)
        seen[sequence] = True
        x = np.where(seen, np.where(x < 0, x * repetition, x / repetition), x)
        counts = np.bincount(out, minlength=len(x))
        x = x - frequency * counts - presence * (counts > 0)
        out.append(int(np.argmax(x)))
        sequence.append(out[-1])
    return out


@pytest.fixture(scope="module")
def tiny():
    config = mj.ModelConfig.from_preset("tiny-llama", scan_layers=False)
    return config, mj.init_params(config, jax.random.key(3))


def test_bias_and_penalties_equal_a_numpy_reference(tiny):
    """Greedy rows with logit_bias, presence, frequency and repetition penalties (each alone, and together) equal
    the NumPy loop token for token, in one batch with per-row settings, and with prompt lookup (whose verify
    steps count the drafts before each position) as without; each setting changes the tokens."""
    config, params = tiny
    n = 16
    plain = mj.generate(config, params, PROMPTS, n)
    settings = [dict(bias={7: 5.0, 3: -100.0}, presence=0.0, frequency=0.0, repetition=1.0),
                dict(bias={}, presence=1.5, frequency=0.0, repetition=1.0),
                dict(bias={}, presence=0.0, frequency=0.7, repetition=1.0),
                dict(bias={11: 2.0}, presence=-0.5, frequency=0.4, repetition=1.5)]
    for s in settings:
        params_list = [mj.SamplingParams(logit_bias=s["bias"], presence_penalty=s["presence"],
                                         frequency_penalty=s["frequency"], repetition_penalty=s["repetition"])] * 3
        expected = [_reference(config, params, p, n, **s) for p in PROMPTS]
        assert mj.generate(config, params, PROMPTS, n, sampling=params_list) == expected, s
        assert expected != plain, s
    # prompt lookup: its verify steps count the drafts before each position
    assert mj.generate(config, params, PROMPTS, n, sampling=params_list, draft="prompt-lookup",
                       draft_tokens=3) == expected


def test_rows_with_different_settings_each_equal_that_row_alone(tiny):
    """One call mixing greedy, sampled, biased, penalized and min_p rows: each row equals its prompt generated alone
    with its SamplingParams (sampled rows too: each row's draws are keyed by its own seed and token index), also
    with prompt lookup."""
    config, params = tiny
    rows = [mj.SamplingParams(repetition_penalty=1.8),
            mj.SamplingParams(temperature=0.9, top_k=20, seed=5, presence_penalty=1.0),
            mj.SamplingParams(temperature=1.2, min_p=0.1, top_p=0.9, seed=2**40 + 3, logit_bias={2: 3.0})]
    for draft in (None, "prompt-lookup"):
        together = mj.generate(config, params, PROMPTS, 10, sampling=rows, draft=draft)
        alone = [mj.generate(config, params, [p], 10, sampling=[s], draft=draft)[0] for p, s in zip(PROMPTS, rows)]
        assert together == alone, draft
    # one SamplingParams for every row seeds row i with seed + i
    shared = mj.generate(config, params, PROMPTS, 12, temperature=1.0, seed=7)
    assert shared == [mj.generate(config, params, [p], 12, temperature=1.0, seed=7 + i)[0]
                      for i, p in enumerate(PROMPTS)]


def test_min_p_draws_from_the_min_p_distribution():
    """Vocabulary 16, 4096 rows, temperature 1, min_p keeping 4 tokens: the first token's counts fit transformers'
    MinPLogitsWarper distribution (p >= min_p * p_max kept, renormalised; NumPy) by a chi-square test at
    significance 0.001, never leave its support, and reject the unfiltered distribution (p < 0.001)."""
    config = mj.ModelConfig.from_preset("tiny-llama", vocab_size=16, init_std=0.1, scan_layers=False)
    params = mj.init_params(config, jax.random.key(0))
    prompt = [1, 2, 3, 1, 2]
    logits = np.asarray(mj.logits(config, params, [prompt]))[0, -1].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    ratios = np.sort(p / p.max())[::-1]
    min_p = float(ratios[3] + ratios[4]) / 2  # keeps the 4 likeliest tokens
    kept = p >= min_p * p.max()
    assert kept.sum() == 4 and p[~kept].sum() > 0.05  # the filter matters here
    expected = np.where(kept, p, 0) / p[kept].sum()
    first = np.array([row[0] for row in mj.generate(config, params, [prompt] * 4096, 1, temperature=1.0,
                                                     min_p=min_p, seed=11)])
    assert kept[first].all()
    counts = np.bincount(first, minlength=16)
    assert scipy.stats.chisquare(counts[kept], expected[kept] * len(first)).pvalue > 1e-3
    assert scipy.stats.chisquare(counts, p * len(first)).pvalue < 1e-3  # the unfiltered distribution is told apart


def test_new_settings_compile_nothing(tiny):
    """After one call with penalties and one without, every other setting (temperature, top-k/p, min-p, seed,
    penalties' values, logit_bias) reuses the compiled programs, in generate and generate_stream."""
    config, params = tiny
    mj.generate(config, params, PROMPTS, 8, temperature=0.5, repetition_penalty=1.2)
    mj.generate(config, params, PROMPTS, 8)
    list(mj.generate_stream(config, params, PROMPTS, 8, presence_penalty=0.5))
    list(mj.generate_stream(config, params, PROMPTS, 8))
    with CompileStats() as compiled:
        mj.generate(config, params, PROMPTS, 8, temperature=1.3, top_k=5, top_p=0.8, min_p=0.05, seed=9,
                    logit_bias={4: -3.0})
        mj.generate(config, params, PROMPTS, 8, temperature=0.7, frequency_penalty=1.1, presence_penalty=-0.3,
                    repetition_penalty=1.4, logit_bias={1: 2.0})
        list(mj.generate_stream(config, params, PROMPTS, 8, temperature=0.9, top_k=3, seed=4))
        list(mj.generate_stream(config, params, PROMPTS, 8, repetition_penalty=2.0, logit_bias={2: 1.0}))
    assert compiled.compilations == 0
