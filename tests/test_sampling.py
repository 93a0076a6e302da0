"""top-k and top-p keep exactly the tokens they should; temperature 0 is argmax; generate draws from NumPy's
softmax(logits / T) under those masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import mistral_jax as mj
from mistral_jax.sampling import Sampling, filter_logits, sample


def test_top_k_keeps_the_k_largest():
    logits = jnp.array([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=1.0)))[0]
    assert kept.tolist() == [False, True, False, False, True]


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    for top_p, expected in [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4)]:
        kept = np.isfinite(np.asarray(filter_logits(logits, 0, top_p)))[0]
        assert kept.sum() == expected, top_p
        assert kept[:expected].all()


def test_samples_stay_inside_the_filters():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    allowed = np.isfinite(np.asarray(filter_logits(logits, 5, 0.7)))
    for i in range(20):
        tokens = np.asarray(sample(logits, jax.random.key(i), Sampling(1.0, 5, 0.7)))
        assert allowed[np.arange(4), tokens].all()


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (3, 20))
    assert np.asarray(sample(logits, jax.random.key(0), Sampling())).tolist() == np.argmax(logits, -1).tolist()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -1.0}, r"temperature must be >= 0, got -1\.0"), ({"top_k": -2}, "top_k must be >= 0, got -2"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0\.0"), ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def reference_probs(logits, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """NumPy, float64: softmax(logits / T) over the top-k tokens, then over the smallest set of those, largest
    first, whose mass reaches top_p (a token stays while the mass before it is under top_p)."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= top_p]] = False
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.6, 0, 1.0), (1.7, 12, 1.0), (0.8, 0, 0.7),
                                                             (1.4, 20, 0.8)])
def test_generate_draws_from_numpys_filtered_softmax(temperature, top_k, top_p):
    """mj.generate's 4096 tokens (256 rows of 16; every token embedded alike, so every position has the same
    logits and each token is a fresh draw from one distribution) fit NumPy's softmax of those logits / T under the
    top-k / top-p masks: chi-square, significance 0.001, a fixed seed (cells expected under 5 draws pooled); nothing
    is drawn outside the mask."""
    config = mj.ModelConfig.from_preset("tiny-llama")
    params = mj.init_params(config, jax.random.key(0))
    embedding = jnp.broadcast_to(params["embedding"][5], params["embedding"].shape)
    params = {**params, "embedding": embedding, "lm_head": 4 * params["lm_head"]}  # sharp: a few tokens carry most
    logits = np.asarray(mj.logits(config, params, [[1, 2, 3, 4]]))[0]
    np.testing.assert_allclose(logits, np.broadcast_to(logits[0], logits.shape), rtol=0, atol=1e-5)
    want = reference_probs(logits[0], temperature, top_k, top_p)
    drawn = np.ravel(mj.generate(config, params, [[1, 2, 3, 4]] * 256, 16, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=3))
    assert drawn.shape == (4096,) and want[drawn].min() > 0  # nothing outside the mask
    inside = want > 0
    counts, expected = np.bincount(drawn, minlength=len(want))[inside], want[inside] * len(drawn)
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    assert scipy.stats.chisquare(counts, expected).pvalue > 1e-3
