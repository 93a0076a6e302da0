"""The decoder as a whole: scan over layers, remat, dtypes, logical axes, masks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.model.attention import attention_mask
from mistral_jax.model.transformer import forward, param_shapes


def _tokens(config, batch=2, length=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)


def test_sliding_window_sees_itself_and_window_minus_one_before():
    pos = jnp.arange(6)[None]
    mask = np.asarray(attention_mask(pos, pos, window=3))[0]
    for q in range(6):
        assert [k for k in range(6) if mask[q, k]] == [k for k in range(max(0, q - 2), q + 1)]


def test_padding_and_segments_are_hidden():
    pos = jnp.array([[-1, 0, 1, 0, 1]])
    seg = jnp.array([[0, 1, 1, 2, 2]])
    mask = np.asarray(attention_mask(pos, pos, None, seg, seg))[0]
    assert not mask[:, 0].any()  # padding is seen by no one
    assert mask[2, 1] and not mask[3, 1] and not mask[4, 2] and mask[4, 3]


def test_remat_changes_nothing_but_memory():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    params = mj.init_params(config, jax.random.key(0))
    tokens = _tokens(config)

    def loss(p, cfg):
        return jnp.mean(mj.logits(cfg, p, tokens) ** 2)

    def primitives(cfg):  # the rematerialising primitives (checkpoint, printed remat2) in the gradient program
        return set(re.findall(r"\b(checkpoint|remat\w*)\[", str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
            params, cfg))))

    assert not primitives(config) and primitives(config.replace(remat=True))  # recomputed only when asked
    plain, grads = jax.value_and_grad(loss)(params, config)
    remat, remat_grads = jax.value_and_grad(loss)(params, config.replace(remat=True))
    assert float(plain) == pytest.approx(float(remat), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_program_size_does_not_grow_with_depth():
    """Layers run under one scan: the traced program of 2 and 16 layers has the same number of ops."""

    def n_ops(n_layers):
        config = mj.ModelConfig.from_preset("tiny-mistral", n_layers=n_layers)
        shapes = param_shapes(config)
        tokens = jnp.zeros((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: forward(config, p, tokens, jnp.arange(8)[None]).logits)(shapes)
        return len(jaxpr.jaxpr.eqns)

    assert n_ops(2) == n_ops(16)


def test_every_parameter_has_logical_axes_of_its_rank():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    axes = mj.logical_axes(config)
    shapes = param_shapes(config)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for spec, shape in zip(flat_axes, flat_shapes):
        assert len(spec) == len(shape.shape)
        assert spec[0] in ("layers", "vocab", "embed", "norm")
    moe = axes["layers"]["moe"]
    assert tuple(moe["w_gate"]) == ("layers", "expert", "embed", "mlp")
    assert tuple(axes["layers"]["attention"]["wq"]) == ("layers", "embed", "q_heads", "head_dim")


def test_bfloat16_compute_with_float32_params():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    params = mj.init_params(config, jax.random.key(0))
    tokens = _tokens(config)
    full = np.asarray(mj.logits(config, params, tokens))
    mixed = mj.logits(config.replace(dtype="bfloat16"), params, tokens)
    assert mixed.dtype == jnp.float32
    error, scale = np.max(np.abs(np.asarray(mixed) - full)), np.max(np.abs(full))
    # bfloat16's 8-bit mantissa (relative rounding 2**-9) shows; float32's (2**-24) would stay near 1e-6 of the scale
    assert 1e-3 * scale < error < 0.05 * scale, error / scale
    bf16 = mj.ModelConfig.from_preset("tiny-llama", dtype="bfloat16", param_dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(mj.init_params(bf16, jax.random.key(0))))


def test_mixtral_forward_returns_load_balancing_loss():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    params = mj.init_params(config, jax.random.key(0))
    tokens = _tokens(config)
    aux = forward(config, params, tokens, jnp.broadcast_to(jnp.arange(12), tokens.shape)).aux
    # E * sum f_e P_e is 1 for perfectly balanced routing and at most E.
    assert 0.5 < float(aux["load_balancing_loss"]) < config.n_experts


def test_logits_refuse_bad_token_shapes():
    config = mj.ModelConfig.from_preset("tiny-llama")
    params = mj.init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        mj.logits(config, params, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        mj.logits(config, params, jnp.full((1, 3), 256, jnp.int32))


def test_causal_blocks_skip_nothing_they_need():
    """attend_causal (query blocks against the keys up to their end) equals attend over every key, with
    left padding and packed segments (positions restarting) in the rows. Padding queries see no key and
    their (unused) outputs differ; every real query's must not."""
    from mistral_jax.model.attention import attend, attend_causal, attention_mask, causal_block_size

    t = 256
    assert causal_block_size(t) == 64 and causal_block_size(100) is None
    q = jax.random.normal(jax.random.key(0), (2, t, 4, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, 2, t, 8)) for i in (1, 2))
    pos0 = np.concatenate([np.full(40, -1), np.arange(t - 40)])  # left padding
    pos1 = np.concatenate([np.arange(150), np.arange(t - 150)])  # two packed examples
    positions = np.stack([pos0, pos1])
    segments = np.stack([np.ones(t, int), np.concatenate([np.ones(150, int), np.full(t - 150, 2)])])
    for window in (None, 64):
        mask = attention_mask(positions, positions, window, segments, segments)
        real = positions >= 0
        blocked, whole = attend_causal(q, k, v, mask)[real], attend(q, k, v, mask)[real]
        np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)


def test_attention_kind_is_checked():
    with pytest.raises(ValueError, match="attention"):
        mj.ModelConfig.from_preset("tiny-llama", attention="splashy")
    if jax.default_backend() != "gpu":  # the CPU run of the tests: a clear refusal, not cuDNN's own error
        config = mj.ModelConfig.from_preset("tiny-llama", attention="cudnn", dtype="bfloat16", param_dtype="bfloat16")
        with pytest.raises(ValueError, match="needs a GPU"):
            mj.logits(config, mj.init_params(config, jax.random.key(0)), np.zeros((1, 8), np.int32))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mixtral"])
def test_forward_returns_a_named_output_with_every_layer_on_request(preset):
    """Output.hidden: the embeddings and each block's output, in both layouts; the last one, normed and
    projected, gives the logits. Without return_hidden there is none (nothing extra is kept)."""
    config = mj.ModelConfig.from_preset(preset)
    params = mj.init_params(config, jax.random.key(0))
    tokens = _tokens(config)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    out = forward(config, params, tokens, positions, return_hidden=True)
    assert isinstance(out, mj.Output) and forward(config, params, tokens, positions).hidden is None
    assert out.hidden.shape == (config.n_layers + 1, 2, 12, config.dim)
    np.testing.assert_allclose(out.hidden[0], params["embedding"][tokens], rtol=1e-6)
    np.testing.assert_allclose(out.logits, mj.logits(config, params, tokens), rtol=1e-5, atol=1e-5)
    flat_config, flat_params = mj.unstack_layers(config, params)
    flat = forward(flat_config, flat_params, tokens, positions, return_hidden=True)
    np.testing.assert_allclose(flat.hidden, out.hidden, rtol=1e-5, atol=1e-5)
    x = out.hidden[-1]
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + config.norm_eps)
    normed = normed * params["final_norm"]["scale"]
    head = params["embedding"].T if config.tie_embeddings else params["lm_head"]
    np.testing.assert_allclose(normed @ head, out.logits, rtol=1e-4, atol=1e-4)
    leaves = jax.tree.leaves(jax.jit(lambda p: forward(config, p, tokens, positions))(params))
    # a pytree: logits (and the aux loss with its routing totals: assigned, probs, tokens) come back whole from jit
    assert len(leaves) == 1 + 4 * config.is_moe
