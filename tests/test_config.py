import dataclasses
import pathlib

import jax
import pytest

import mistral_jax as mj
from mistral_jax.config import preset_reference_params
from mistral_jax.errors import UserError
from mistral_jax.model.transformer import param_shapes

FULL_SIZE = [p for p in mj.list_presets() if not p.startswith("tiny-")]


def test_presets_listed():
    presets = mj.list_presets()
    for name in ("mistral-7b-v0.1", "mistral-7b-instruct-v0.2", "mixtral-8x7b-v0.1", "mixtral-8x7b-instruct-v0.1",
                 "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat",
                 "smollm2-135m-instruct", "tiny-mistral", "tiny-mixtral", "tiny-llama"):
        assert name in presets


@pytest.mark.parametrize("name", FULL_SIZE)
def test_parameter_count_matches_published_figure(name):
    """Counted from the model's own parameter shapes (no memory used), not from a formula."""
    config = mj.ModelConfig.from_preset(name)
    shapes = param_shapes(config)
    total = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    reference = preset_reference_params(name)
    # Published figures are rounded to 3 significant digits.
    assert total / 1e9 == pytest.approx(reference["total"], rel=5e-3), total
    if config.is_moe:
        moe = shapes["layers"]["moe"]
        per_expert = sum(moe[w].size for w in ("w_gate", "w_up", "w_down")) // config.n_experts
        active = total - per_expert * (config.n_experts - config.n_experts_per_tok)
        assert active / 1e9 == pytest.approx(reference["active"], rel=5e-3), active
    assert total == config.param_counts()["total"]
    if "exact" in reference:  # the count the published safetensors hold, to the parameter
        assert total == reference["exact"]


NEW_FAMILY_PRESETS = [
    "mistral-7b-v0.3", "mistral-7b-instruct-v0.3", "mixtral-8x22b-v0.1", "mixtral-8x22b-instruct-v0.1",
    "mistral-nemo-12b-base-2407", "mistral-nemo-12b-instruct-2407", "ministral-8b-instruct-2410",
    "llama-3.1-8b", "llama-3.1-8b-instruct", "llama-3.1-70b", "llama-3.1-70b-instruct", "llama-3.2-1b",
    "llama-3.2-1b-instruct", "llama-3.2-3b", "llama-3.2-3b-instruct",
]


def test_todays_presets_are_there_with_exact_counts():
    assert set(NEW_FAMILY_PRESETS) <= set(mj.list_presets())
    for name in NEW_FAMILY_PRESETS:
        assert "exact" in preset_reference_params(name), name


def test_new_preset_semantics():
    nemo = mj.ModelConfig.from_preset("mistral-nemo-12b-instruct-2407")
    assert nemo.resolved_head_dim * nemo.n_heads != nemo.dim and nemo.vocab_size == 131072
    llama32 = mj.ModelConfig.from_preset("llama-3.2-1b")
    assert (llama32.tie_embeddings, llama32.rope_scaling, llama32.rope_factor) == (True, "llama3", 32.0)
    assert mj.ModelConfig.from_preset("llama-3.1-8b-instruct").eos_id == 128009  # <|eot_id|>
    big = mj.ModelConfig.from_preset("mixtral-8x22b-instruct-v0.1")
    assert (big.n_heads, big.n_kv_heads, big.vocab_size, big.max_seq_len) == (48, 8, 32768, 65536)


def test_preset_semantics():
    v01 = mj.ModelConfig.from_preset("mistral-7b-v0.1")
    assert (v01.sliding_window, v01.rope_theta) == (4096, 1e4)
    v02 = mj.ModelConfig.from_preset("mistral-7b-instruct-v0.2")
    assert (v02.sliding_window, v02.rope_theta, v02.max_seq_len) == (None, 1e6, 32768)
    mixtral = mj.ModelConfig.from_preset("mixtral-8x7b-v0.1")
    assert (mixtral.n_experts, mixtral.n_experts_per_tok, mixtral.rope_theta) == (8, 2, 1e6)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="tiny-mistral"):
        mj.ModelConfig.from_preset("no-such-model")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 6, "n_kv_heads": 4}, "must divide"),
        ({"dim": 65, "n_heads": 4}, "not divisible"),
        ({"n_experts": 2, "n_experts_per_tok": 3}, "n_experts_per_tok"),
        ({"dtype": "int8"}, "dtype"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"moe_dispatch": "dense"}, "moe_dispatch"),
    ],
)
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        mj.ModelConfig.from_preset("tiny-llama", **changes)


def test_config_is_frozen_and_hashable():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 3
    assert hash(config) == hash(mj.ModelConfig.from_preset("tiny-mixtral"))


def test_config_mistakes_are_user_errors():
    """The CLI prints a UserError as one line; a bad preset, value or field is the user's, not a bug."""
    with pytest.raises(UserError, match="unknown preset"):
        mj.ModelConfig.from_preset("no-such-model")
    with pytest.raises(UserError, match="invalid ModelConfig"):
        mj.ModelConfig.from_preset("tiny-llama", sliding_window=0)
    with pytest.raises(UserError, match="unknown ModelConfig fields"):
        mj.ModelConfig.from_dict({**mj.ModelConfig.from_preset("tiny-llama").to_dict(), "no_such_field": 1})


def test_readme_lists_every_preset():
    """README's families table names every full-size preset (alone or as NAME and its "-instruct" twin)."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Families and presets"):readme.index("## Speed")]
    for name in FULL_SIZE:
        base = name.removesuffix("-instruct").removesuffix("-chat")  # "NAME (+ -instruct)" lists both
        assert any(f" {n}{end}" in table for n in (name, base) for end in (",", " ")), name
