"""top-k and top-p keep exactly the tokens they should; temperature 0 is argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)
