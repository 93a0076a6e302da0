"""serving/constrained.py on SmolLM2's 49k vocabulary: grammars from each constraint kind, and decoding with
random logits masked by the bitmask always ends in an answer the constraint accepts."""

import json
import re

import jsonschema
import numpy as np
import pytest

from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.errors import ParamError
from mistral_jax.serving.constrained import Constraints, allowed, grammar, words
from mistral_jax.tokenizers import load_tokenizer

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "address": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
            "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "enum and array": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "robot"]},
        "tags": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}},
        "required": ["kind", "tags"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def constraints(tokenizer):
    return Constraints(tokenizer, batch=3)


@pytest.fixture(scope="module")
def closing(tokenizer):
    """+4 on tokens holding a quote or closing bracket: random answers end within a few dozen tokens."""
    texts = [tokenizer.decode([t]) for t in range(tokenizer.vocab_size)]
    return np.array([4.0 if any(c in t for c in '"}]') else 0.0 for t in texts])


def _decode(constraints, tokenizer, closing, spec, seed: int, row: int = 1, steps: int = 120) -> str:
    """Greedy over random logits, masked by the row's bitmask each step (what the sampling stage does on device)."""
    rng = np.random.default_rng(seed)
    constraints.start(row, grammar(spec))
    ids = []
    for _ in range(steps):
        if constraints.done(row):
            break
        mask = constraints.fill([row])
        assert mask.shape == (3, words(tokenizer.vocab_size)) and mask.dtype == np.int32
        assert (mask[[r for r in range(3) if r != row]] == -1).all()  # other rows: unconstrained
        logits = rng.normal(size=tokenizer.vocab_size) + closing
        logits[~allowed(mask[row], tokenizer.vocab_size)] = -np.inf
        token = int(np.argmax(logits))
        if token in tokenizer.stop_ids:
            break
        assert constraints.advance(row, [token])
        ids.append(token)
    constraints.release(row)
    return tokenizer.decode(ids)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate(constraints, tokenizer, closing, name):
    for seed in range(2):
        text = _decode(constraints, tokenizer, closing, {"json_schema": SCHEMAS[name]}, seed)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_regex_and_choice(constraints, tokenizer, closing):
    assert isinstance(json.loads(_decode(constraints, tokenizer, closing, {"json_object": True}, 0)), dict)
    pattern = r"[0-9]{3}-[a-z]{2}"
    assert re.fullmatch(pattern, _decode(constraints, tokenizer, closing, {"regex": pattern}, 1))
    assert _decode(constraints, tokenizer, closing, {"choice": ["yes", "no", "maybe"]}, 2) in ("yes", "no", "maybe")


def test_bitmask_bits_follow_the_packed_layout(tokenizer, constraints):
    constraints.start(0, grammar({"choice": ["{"]}))
    row = allowed(constraints.fill([0])[0], tokenizer.vocab_size)
    brace = tokenizer.encode("{", bos=False)
    assert row[brace[0]] and row.sum() >= 1
    assert not row[tokenizer.encode("hello", bos=False)[0]]
    constraints.release(0)
    assert (constraints.bitmask[0] == -1).all()


@pytest.mark.parametrize("spec", [{"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
                                  {"regex": "("}, {"choice": []}, {"choice": ["a"], "regex": "a"}])
def test_a_constraint_that_does_not_compile_is_a_param_error(spec):
    with pytest.raises(ParamError) as err:
        grammar(spec)
    assert err.value.param == "response_format"
