"""model/linear.py: each row's LoRA update, chosen by a per-row (or per-token) slot, against the merged weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax import lora
from mistral_jax.config import ModelConfig
from mistral_jax.model import linear
from mistral_jax.model.layer_layout import unstack_layers
from mistral_jax.model.transformer import forward as eager_forward
from mistral_jax.model.transformer import init_params

CONFIG = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=128)
TOL = 1e-5  # float32: x @ W + s (x @ A) @ B against x @ (W + s A @ B), logits of size ~1
# Jitted: one compilation per parameter structure and shape, where the eager forward compiled its layer scan and
# dispatched every op again on each call.
forward = jax.jit(eager_forward, static_argnums=0)


def _adapter(params, seed: int, rank: int, targets) -> lora.Adapter:
    """Random A and B (B nonzero too, so every adapter changes the logits), drawn by NumPy from lora.init's shapes:
    no compilation."""
    spec = lora.LoraSpec(rank, 2.0 * rank, tuple(targets))
    shapes = jax.eval_shape(lambda p: lora.init(p, spec, jax.random.key(seed)), params)
    rng = np.random.RandomState(seed)
    factors = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, jnp.float32), shapes)
    return lora.Adapter(factors, spec.scale, f"adapter{seed}")


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, jax.random.key(0))
    adapters = [_adapter(params, 1, 4, ("wq", "wv", "w_down")), _adapter(params, 7, 8, lora.TARGETS)]
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (3, 9)))
    return params, adapters, tokens, jnp.broadcast_to(jnp.arange(9), (3, 9))


@pytest.mark.parametrize("scanned", [True, False])
def test_per_row_adapters_equal_merged_weights(model, scanned):
    params, adapters, tokens, positions = model
    config = CONFIG
    merged = [params] + [lora.apply(CONFIG, params, a) for a in adapters]
    if not scanned:
        config, params = unstack_layers(CONFIG, params)
        merged = [unstack_layers(CONFIG, m)[1] for m in merged]
    weights, scale = lora.stack_slots(CONFIG, adapters)  # ranks 4 and 8: the first zero-padded to 8
    assert weights["layers"]["attention"]["wq"]["a"].shape == (2, 3, 64, 8)  # [L, slots, D, R]
    index = jnp.array([0, 1, 2])  # row 0: no adapter; rows 1, 2: one each
    ours = forward(config, linear.with_lora(params, linear.LoraSlots(weights, scale, index)), tokens, positions).logits
    expected = [forward(config, m, tokens, positions).logits for m in merged]
    np.testing.assert_array_equal(ours[0], expected[0][0])  # slot 0: the base model, exactly
    for row in (1, 2):
        assert np.max(np.abs(expected[row][row] - expected[0][row])) > 0.1  # the adapter matters
        np.testing.assert_allclose(ours[row], expected[row][row], atol=TOL, rtol=0)
    # Two rows, three slots: each row's factors gathered (BGMV) rather than every slot's shrink masked.
    slots = linear.LoraSlots(weights, scale, jnp.array([2, 1]))
    gathered = forward(config, linear.with_lora(params, slots), tokens[1:], positions[1:]).logits
    np.testing.assert_allclose(gathered[0], expected[2][1], atol=TOL, rtol=0)
    np.testing.assert_allclose(gathered[1], expected[1][2], atol=TOL, rtol=0)


def test_per_token_slots_as_the_paged_engine_uses(model):
    params, adapters, tokens, positions = model
    weights, scale = lora.stack_slots(CONFIG, adapters)
    index = jnp.array([[2] * 9, [1] * 9, [0] * 9])  # [B, T]: each token its own slot
    ours = forward(CONFIG, linear.with_lora(params, linear.LoraSlots(weights, scale, index)), tokens, positions).logits
    np.testing.assert_array_equal(ours[2], forward(CONFIG, params, tokens, positions).logits[2])
    for row, adapter in ((0, adapters[1]), (1, adapters[0])):
        expected = forward(CONFIG, lora.apply(CONFIG, params, adapter), tokens, positions).logits[row]
        np.testing.assert_allclose(ours[row], expected, atol=TOL, rtol=0)


def test_generate_runs_the_adapter_unmerged(model):
    params, adapters, _, _ = model
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    ours = mj.generate(CONFIG, params, prompts, 8, adapter=adapters[1])
    assert ours == mj.generate(CONFIG, lora.apply(CONFIG, params, adapters[1]), prompts, 8)
    assert ours != mj.generate(CONFIG, params, prompts, 8)


def test_adapter_above_the_table_rank_is_refused(model):
    params, adapters, _, _ = model
    with pytest.raises(mj.UserError, match="rank r=8 is above max_lora_rank=4"):
        lora.stack_slots(CONFIG, adapters, rank=4)


@pytest.mark.parametrize("dispatch", ["blocks", "ragged", "capacity"])
def test_mixture_of_experts_per_row_adapters_on_expert_weights_equal_merged(dispatch):
    # capacity_factor 2: every expert takes every row (nothing dropped), so each dispatch is exact
    config = mj.ModelConfig.from_preset("tiny-mixtral", moe_dispatch=dispatch, moe_capacity_factor=2.0)
    params = init_params(config, jax.random.key(0))
    adapters = [_adapter(params, 3, 4, ("wq", "w_up")), _adapter(params, 5, 8, ("w_gate", "w_down")),
                _adapter(params, 9, 2, lora.TARGETS)]
    weights, scale = lora.stack_slots(config, adapters)  # ranks 4, 8, 2: zero-padded to 8
    assert weights["layers"]["moe"]["w_gate"]["a"].shape == (2, 4, 4, 64, 8)  # [L, slots, E, D, R]
    assert weights["layers"]["moe"]["w_down"]["b"].shape == (2, 4, 4, 8, 64)  # [L, slots, E, R, D]
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (4, 9)))
    positions = jnp.broadcast_to(jnp.arange(9), (4, 9))
    expected = [forward(config, m, tokens, positions).logits
                for m in [params] + [lora.apply(config, params, a) for a in adapters]]

    def ours(index, t=9):
        slots = linear.LoraSlots(weights, scale, jnp.asarray(index))
        return forward(config, linear.with_lora(params, slots), tokens[:len(index), :t], positions[:len(index), :t])

    per_row = ours([0, 1, 2, 3]).logits  # 72 sorted rows, 16 (slot, expert) factors: every one's shrink masked
    per_token = ours([[3] * 9, [2] * 9, [0] * 9, [1] * 9]).logits  # the paged engine's [B, T]
    np.testing.assert_array_equal(per_row[0], expected[0][0])  # slot 0: the base model, exactly
    np.testing.assert_array_equal(per_token[2], expected[0][2])
    for row in (1, 2, 3):
        assert np.max(np.abs(expected[row][row] - expected[0][row])) > 0.1  # the adapter matters
        np.testing.assert_allclose(per_row[row], expected[row][row], atol=TOL, rtol=0)
    for row, slot in ((0, 3), (1, 2), (3, 1)):
        np.testing.assert_allclose(per_token[row], expected[slot][row], atol=TOL, rtol=0)
    one = ours([2], t=3).logits  # 6 sorted rows, fewer than the factors: each row's gathered (BGMV)
    # the merged model's logits of row 0's first 3 tokens (causal: the 6 tokens after them do not reach them)
    np.testing.assert_allclose(one[0], expected[2][0, :3], atol=TOL, rtol=0)


def test_mixture_of_experts_generate_runs_expert_adapters_unmerged():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    params = init_params(config, jax.random.key(0))
    experts = _adapter(params, 5, 4, ("wv", "w_up", "w_down"))
    assert lora.serving_targets(config) == tuple(lora.TARGETS)  # expert weights too
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    expected = mj.generate(config, lora.apply(config, params, experts), prompts, 6)
    assert mj.generate(config, params, prompts, 6, adapter=experts) == expected
    assert expected != mj.generate(config, params, prompts, 6)
