"""The ring buffer: slot p mod size, bounded by the window, padding never written."""

import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.model import kv_cache


def test_size_is_bounded_by_the_window():
    config = mj.ModelConfig.from_preset("tiny-mistral")  # window 8
    assert mj.init_cache(config, 2, 10_000)["k"].shape == (2, 2, 2, 8, 16)  # [layers, batch, kv_heads, slots, head_dim]
    assert mj.init_cache(config, 2, 5)["pos"].shape == (2, 5)
    llama = mj.ModelConfig.from_preset("tiny-llama")
    assert mj.init_cache(llama, 1, 100)["v"].shape[3] == 100
    per_layer = mj.init_cache(config.replace(scan_layers=False), 2, 10_000)["k"]  # [batch * kv_heads, slots, head_dim]
    assert len(per_layer) == config.n_layers and per_layer[0].shape == (4, 8, 16)
    assert mj.init_cache(config, 1, 4, dtype="bfloat16")["k"].dtype == jnp.bfloat16


def test_write_wraps_and_drops_padding():
    buffer = jnp.full((2, 4), -1)
    positions = jnp.array([[-1, 3, 4, 5], [0, 1, 2, 3]])
    out = np.asarray(kv_cache.write(buffer, positions, positions))
    assert out.tolist() == [[4, 5, -1, 3], [0, 1, 2, 3]]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        mj.init_cache(mj.ModelConfig.from_preset("tiny-llama"), 0, 10)
