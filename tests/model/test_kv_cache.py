"""The ring buffer: slot p mod size, bounded by the window, padding never written."""

import jax
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
    with pytest.raises(ValueError, match="batch_size and max_seq_len must be positive, got 0, 10"):
        mj.init_cache(mj.ModelConfig.from_preset("tiny-llama"), 0, 10)


def test_int8_cache_holds_scales_per_token_and_head_and_decodes_near_float():
    """kv_cache_dtype="int8": int8 K/V plus float32 scales [.., size, 1]; bytes (D + 4) / 2D of bfloat16's;
    a decode step's logits within 2% (relative norm) of the float cache's, through the window's wrap."""
    config = mj.ModelConfig.from_preset("tiny-mistral", scan_layers=False)  # window 8: the prompt wraps the ring
    int8 = config.replace(kv_cache_dtype="int8")
    cache = mj.init_cache(int8, 2, 64)
    assert cache["k"][0].dtype == jnp.int8 and cache["k_scale"][0].shape == (4, 8, 1)
    nbytes = lambda c: sum(x.nbytes for n in ("k", "v", "k_scale", "v_scale") if n in c for x in c[n])  # noqa: E731
    assert nbytes(cache) / nbytes(mj.init_cache(config, 2, 64, dtype="bfloat16")) == (16 + 4) / 32
    params = mj.init_params(config, jax.random.key(0))
    tokens = jnp.array([[1, 2, 3, 4, 5, 9, 11, 13, 17, 19], [7, 8, 6, 5, 4, 3, 2, 1, 9, 9]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    logits = []
    for c in (int8, config):
        _, filled = mj.prefill(c, params, mj.init_cache(c, 2, 64), tokens, positions)
        logits.append(np.asarray(mj.decode_step(c, params, filled, tokens[:, -1], positions[:, -1] + 1)[0]))
    error = np.linalg.norm(logits[0] - logits[1]) / np.linalg.norm(logits[1])
    assert 0 < error < 0.02, error
