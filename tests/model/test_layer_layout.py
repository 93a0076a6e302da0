"""Scanned and unscanned layer layouts: the same model, converted both ways, loaded and exported."""

import jax
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.checkpoints import hf


@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-mixtral", "tiny-llama"])
def test_unstacked_model_computes_the_same_and_stacks_back_exactly(preset):
    config = mj.ModelConfig.from_preset(preset)
    params = mj.init_params(config, jax.random.key(0))
    flat, stacked = mj.unstack_layers(config, params)
    assert not flat.scan_layers and sorted(stacked["layers"], key=int) == [str(i) for i in range(config.n_layers)]
    assert stacked["layers"]["1"]["attention"]["wq"].shape == params["layers"]["attention"]["wq"].shape[1:]
    norm_scale = stacked["layers"]["1"]["attention_norm"]["scale"]
    np.testing.assert_array_equal(norm_scale, params["layers"]["attention_norm"]["scale"][1])
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 13), 0, config.vocab_size))
    expected = mj.logits(config, params, tokens)
    np.testing.assert_allclose(mj.logits(flat, stacked, tokens), expected, rtol=1e-6, atol=1e-6)
    assert mj.generate(flat, stacked, [[1, 2, 3], [4, 5]], 6) == mj.generate(config, params, [[1, 2, 3], [4, 5]], 6)
    back_config, back = mj.stack_layers(flat, stacked)
    assert back_config == config
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_unscanned_parameter_tree_matches_init_and_logical_axes():
    config = mj.ModelConfig.from_preset("tiny-mixtral").replace(scan_layers=False)
    stacked = config.replace(scan_layers=True)
    _, converted = mj.unstack_layers(stacked, mj.init_params(stacked, jax.random.key(0)))
    fresh = mj.init_params(config, jax.random.key(0))
    assert jax.tree.structure(converted) == jax.tree.structure(fresh)
    axes = mj.logical_axes(config)
    assert tuple(axes["layers"]["0"]["moe"]["w_gate"]) == ("expert", "embed", "mlp")  # no "layers" axis


def test_load_unscanned_and_export_writes_the_stacked_checkpoint(tmp_path):
    config = mj.ModelConfig.from_preset("tiny-llama")
    params = mj.init_params(config, jax.random.key(3))
    hf.write(config, params, tmp_path / "src")
    flat, loaded = mj.load(tmp_path / "src", scan_layers=False)
    assert not flat.scan_layers and "0" in loaded["layers"]
    hf.write(flat, loaded, tmp_path / "out")  # stacked back on the way out
    again_config, again = mj.load(tmp_path / "out")
    assert again_config.scan_layers
    jax.tree.map(np.testing.assert_array_equal, again, params)
