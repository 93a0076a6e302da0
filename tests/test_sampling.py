"""SamplingParams checks every field; top-k, top-p and min-p keep exactly the tokens they should; temperature 0 is
argmax; generate draws from NumPy's softmax(logits / T) under the top-k / top-p masks."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import mistral_jax as mj
from mistral_jax.sampling import SamplingMetadata, metadata, sample, seed_key_data, warp
from mistral_jax.serving.requests import RequestError


def _rows(n: int, vocab: int, **settings) -> SamplingMetadata:
    """n rows of one setting as the stage reads them (row i seeded seed + i)."""
    params = [mj.SamplingParams(**{**settings, "seed": settings.get("seed", 0) + i}) for i in range(n)]
    return jax.tree.map(jnp.asarray, metadata(params, vocab))


def _kept(logits, **settings):
    """Which tokens survive temperature 1 and the filters: logits [B, V] -> bool [B, V]."""
    meta = _rows(*logits.shape, temperature=1.0, **settings)
    return np.isfinite(np.asarray(warp(jnp.asarray(logits)[:, None], meta)))[:, 0]


def test_top_k_keeps_the_k_largest():
    logits = jnp.array([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = _kept(logits, top_k=2)[0]
    assert kept.tolist() == [False, True, False, False, True]


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    for top_p, expected in [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4)]:
        kept = _kept(logits, top_p=top_p)[0]
        assert kept.sum() == expected, top_p
        assert kept[:expected].all()


def test_min_p_keeps_tokens_at_least_min_p_of_the_most_likely():
    """transformers' MinPLogitsWarper: keep p >= min_p * p_max."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    for min_p, expected in [(0.05, 4), (0.11, 3), (0.3, 3), (0.31, 2), (0.61, 1), (1.0, 1)]:
        kept = _kept(logits, min_p=min_p)[0]
        assert kept.sum() == expected, min_p
        assert kept[:expected].all()


def test_samples_stay_inside_the_filters():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    allowed = _kept(logits, top_k=5, top_p=0.7)
    for i in range(20):
        meta = _rows(4, 50, temperature=1.0, top_k=5, top_p=0.7, seed=10 * i)
        tokens = np.asarray(sample(logits, meta))
        assert allowed[np.arange(4), tokens].all()


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (3, 20))
    meta = _rows(3, 20)
    assert np.asarray(sample(logits, meta)).tolist() == np.argmax(logits, -1).tolist()


def test_sampling_params_is_public_and_normalises_its_fields():
    params = mj.SamplingParams(temperature=1, top_k=2**31 - 1, seed=2**64 - 1, logit_bias={"7": -100, 3: 2.5},
                               stop="x", stop_token_ids=[4], min_p=0.1, repetition_penalty=1.3)
    assert params.logit_bias == ((3, 2.5), (7, -100.0)) and params.stop == ("x",) and params.stop_token_ids == (4,)
    assert isinstance(params.temperature, float) and hash(params) == hash(dataclasses.replace(params))
    assert params.penalized and not mj.SamplingParams().penalized and mj.SamplingParams().greedy
    assert issubclass(mj.ParamError, mj.UserError) and RequestError is mj.ParamError
    # seeds are 64 bits: the high word is kept (jax.random.key keeps only the low 32 bits without x64)
    assert seed_key_data(2**40 + 7).tolist() == [256, 7]
    assert seed_key_data(7).tolist() == np.asarray(jax.random.key_data(jax.random.key(7))).tolist()


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", "x"), ("temperature", True),
    ("temperature", 1e39), ("top_k", -2), ("top_k", 2**40), ("top_k", 2**31), ("top_k", 1.5), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1), ("seed", -1), ("seed", 2**64), ("seed", "1"),
    ("presence_penalty", "x"), ("presence_penalty", float("inf")), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0), ("repetition_penalty", float("inf")),
    ("logit_bias", {1: 101}), ("logit_bias", {-1: 1}), ("logit_bias", {"a": 1}), ("logit_bias", {1: "x"}),
    ("logit_bias", [1, 2]), ("logit_bias", 3), ("max_tokens", 0), ("stop", [""]), ("stop_token_ids", [-1]),
    ("ignore_eos", 1), ("logprobs", 21), ("logprobs", -1),
])
def test_sampling_params_refuses_each_bad_field_by_name(field, value):
    with pytest.raises(mj.ParamError) as err:
        mj.SamplingParams(**{field: value})
    assert err.value.param == field and field in str(err.value)


def test_token_ids_are_checked_against_the_vocabulary():
    mj.SamplingParams(logit_bias={31: 1}, stop_token_ids=(31,)).check_vocab(32)
    for field in ("logit_bias", "stop_token_ids"):
        with pytest.raises(mj.ParamError) as err:
            mj.SamplingParams(**{field: {32: 1} if field == "logit_bias" else (32,)}).check_vocab(32)
        assert err.value.param == field


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


def test_a_choice_keeps_the_schema_as_given():
    """for_row (n choices, batch rows) rebuilds the settings: the constraint must stay as given, property order and
    all (it is the order the JSON is generated in; sorting it changed a greedy server answer)."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "address": {"type": "string"}},
              "required": ["name", "address"]}
    params = mj.SamplingParams(response_format={"json_schema": schema})
    again = params.for_row(1)
    assert again.response_format == params.response_format
    assert list(json.loads(again.response_format)["json_schema"]["properties"]) == ["name", "address"]
