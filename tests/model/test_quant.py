"""int8 weights (model/quant.py): quantized logits near the float ones, the stored format, loading, sharding."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import sharding
from mistral_jax.checkpoints import orbax

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (2, 11), 0, 256))
# Relative error ||logits_int8 - logits_float|| / ||logits_float|| of random tiny models (measured 0.021 to 0.038).
LOGITS_RTOL = 0.06


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("preset,kernels", [("tiny-mistral", ("int8_dot", "dequant")), ("tiny-mixtral", ("int8_dot",)),
                                             ("tiny-llama", ("dequant",))])
def test_quantized_logits_are_near_float(preset, kernels):
    config = mj.ModelConfig.from_preset(preset)
    params = mj.init_params(config, jax.random.key(0))
    ref = mj.logits(config, params, TOKENS)
    qconfig, qparams = mj.quantize(config, params)
    attention = qparams["layers"]["attention"]
    assert qconfig.quant == "int8" and attention["wq"].dtype == jnp.int8 and attention["wo"].dtype == jnp.int8
    assert attention["wq_scale"].shape == (config.n_layers, 1, config.n_heads, 16)  # one per output channel
    assert attention["wo_scale"].shape == (config.n_layers, 1, 1, config.dim)
    assert qparams["layers"]["attention_norm"]["scale"].dtype == jnp.float32
    if config.is_moe:
        moe = qparams["layers"]["moe"]
        assert moe["w_up"].dtype == jnp.int8 and moe["router"].dtype == jnp.float32
    errors = {kernel: relative_error(mj.logits(qconfig.replace(quant_matmul=kernel), qparams, TOKENS), ref)
              for kernel in kernels}
    assert all(1e-4 < e < LOGITS_RTOL for e in errors.values()), errors
    with pytest.raises(mj.UserError, match="already quantized"):
        mj.quantize(qconfig, qparams)
    with pytest.raises(mj.UserError, match="unknown quantize mode 'int4'"):
        mj.quantize(config, params, weights="int4")


def test_load_quantizes_leaf_by_leaf_and_sharded_equals_unsharded(tmp_path):
    """mj.load(quantize="int8") == mj.quantize(mj.load()); on a mesh the int8 weights and their scales take the
    weights' logical axes and a tiny Mixtral makes the same tokens; an orbax copy restores as it is elsewhere."""
    fixture = FIXTURES / "mixtral_top2"
    config, params = mj.quantize(*mj.load(fixture))
    qconfig, loaded = mj.load(fixture, quantize="int8")
    assert qconfig == config
    config = config.replace(kv_cache_dtype="int8")  # the int8 cache's scales split like K and V on the mesh
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    want_tokens = mj.generate(config, params, prompts, 6)

    mesh = mj.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    _, placed = mj.load(fixture, quantize="int8", mesh=mesh, scan_layers=False)
    moe = placed["layers"]["0"]["moe"]
    assert moe["w_gate"].sharding.spec == sharding.fit_spec(moe["w_gate"].shape, ("expert", "embed", "mlp"), mesh)
    assert moe["w_gate_scale"].sharding.spec == sharding.fit_spec(moe["w_gate_scale"].shape,
                                                                  ("expert", "embed", "mlp"), mesh)
    assert len(moe["w_gate"].sharding.device_set) == 8
    unscanned = config.replace(scan_layers=False)
    assert mj.generate(unscanned, placed, prompts, 6, mesh=mesh) == want_tokens

    orbax.write(unscanned, placed, tmp_path / "int8")
    other = mj.make_mesh(data=2, fsdp=1, expert=4, tensor=1)
    restored_config, restored = mj.load(tmp_path / "int8", mesh=other)
    assert restored_config.quant == "int8" and restored["layers"]["attention"]["wq"].dtype == jnp.int8
    assert mj.generate(restored_config, restored, prompts, 6, mesh=other) == want_tokens
    with pytest.raises(mj.UserError, match="already quantized"):
        mj.load(tmp_path / "int8", quantize="int8")
    with pytest.raises(mj.UserError, match="unknown quantize mode"):
        mj.load(fixture, quantize="fp8")
