"""Ministral's interleaved sliding and full layers through the ring cache and chunked prefill, against transformers."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import decoding
from mistral_jax.model import kv_cache

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "ministral_layer_types"


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE / "reference.npz")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoding_past_the_window_equals_transformers(reference, scan_layers):
    """Prefill 5 tokens in chunks of 2, then decode the other 7 one by one (12 tokens, window 4): every column's
    logits equal transformers' full forward. Unscanned, the sliding layers' rings hold 4 slots and the full
    layer's 12; scanned, every ring holds 12 and the window is applied per layer."""
    config, params = mj.load(FIXTURE, scan_layers=scan_layers)
    assert config.layer_windows == (4, None, 4)
    tokens, expected = reference["tokens"], reference["logits"]  # [B, T], [B, T, V]
    batch, length = tokens.shape
    cache = mj.init_cache(config, batch, length)
    sizes = [buffer.shape[-2] for buffer in (cache["k"] if not scan_layers else [cache["k"][i] for i in range(3)])]
    assert sizes == ([4, 12, 4] if not scan_layers else [12, 12, 12])
    assert ("window_pos" in cache) is (not scan_layers) and kv_cache.cache_size(cache) == (4 if not scan_layers else 12)
    prompt = 5
    positions = np.broadcast_to(np.arange(length), tokens.shape)
    logits, cache = decoding.prefill(config, params, cache, tokens[:, :prompt], positions[:, :prompt], chunk_size=2)
    got = [np.asarray(logits)]
    for t in range(prompt, length):
        logits, cache = decoding.decode_step(config, params, cache, jnp.asarray(tokens[:, t]),
                                             jnp.asarray(positions[:, t]))
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)  # [B, 1 + length - prompt, V]: logits after columns prompt-1 .. length-1
    want = expected[:, prompt - 1:]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_the_full_layer_sees_past_the_window():
    """Switch the pattern off (every layer sliding) and the logits past the window move: the full layer matters."""
    config, params = mj.load(FIXTURE)
    reference = np.load(FIXTURE / "reference.npz")
    all_sliding = config.replace(layer_types=None)
    ours = np.asarray(mj.logits(all_sliding, params, reference["tokens"]))
    assert np.max(np.abs(ours[:, 5:] - reference["logits"][:, 5:])) > 1e-2
    np.testing.assert_allclose(ours[:, :4], reference["logits"][:, :4], atol=1e-4)  # within the window: alike


def test_chunked_prefill_in_one_chunk_and_many_agree(reference):
    config, params = mj.load(FIXTURE, scan_layers=False)
    tokens = reference["tokens"]
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    last = []
    for chunk in (3, 4):  # a chunk that straddles window boundaries, and one the size of the window ring
        logits, _ = decoding.prefill(config, params, mj.init_cache(config, 2, 12), tokens, positions, chunk_size=chunk)
        last.append(np.asarray(logits))
    for logits in last:
        np.testing.assert_allclose(logits, reference["logits"][:, -1], atol=1e-4 * np.abs(logits).max())


def test_layer_types_are_validated():
    base = mj.ModelConfig.from_preset("tiny-mistral")
    with pytest.raises(ValueError, match="layer_types"):
        base.replace(layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="sliding_window"):
        base.replace(sliding_window=None, layer_types=("full_attention",) * base.n_layers)
    mixed = base.replace(family="ministral", layer_types=("full_attention", "sliding_attention"))
    assert mixed.layer_windows == (None, 8) and mixed.mixed_windows and not base.mixed_windows
    assert mixed.cache_size(100) == 100 and mixed.cache_size(100, window=8) == 8 and mixed.kv_slots(100) == 108


@pytest.mark.parametrize("scan_layers", [True, False])
def test_flash_attention_takes_each_layers_window(reference, scan_layers):
    """Blockwise attention with the window traced per layer (scanned) or fixed per layer (unscanned)."""
    config, params = mj.load(FIXTURE, scan_layers=scan_layers, attention="flash")
    ours = np.asarray(mj.logits(config, params, reference["tokens"]))
    assert np.max(np.abs(ours - reference["logits"])) <= 1e-4 * np.max(np.abs(reference["logits"]))


def test_training_gradients_through_flash_equal_the_exact_kernels(reference):
    """The custom VJP takes the traced per-layer window too (scanned stack, as training runs it)."""
    import jax

    from mistral_jax.model.transformer import default_positions, forward

    config, params = mj.load(FIXTURE)
    tokens = jnp.asarray(reference["tokens"])

    def loss(params, kernel):
        logits = forward(config.replace(attention=kernel), params, tokens, default_positions(tokens)).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    grads = {k: grad(params, k) for k in ("flash", "xla")}
    for got, want in zip(jax.tree.leaves(grads["flash"]), jax.tree.leaves(grads["xla"])):
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())))
