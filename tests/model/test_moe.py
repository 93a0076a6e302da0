"""The sorted, grouped expert dispatch equals the plain per-token mixture it replaces."""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.model.moe import MoE, block_sizes, expert_capacity, load_balancing_loss, route, routing_stats


def dense_reference(x, p, top_k, capacity=None):
    """Every token through its top-k experts one by one (numpy, float64). capacity: each expert takes only its
    first `capacity` assignments in order (token by token, a token's experts best first); the rest are dropped."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = x @ np.asarray(p["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    taken = np.zeros(probs.shape[1], int)  # assignments each expert has received so far
    for n in range(x.shape[0]):
        chosen = np.argsort(-probs[n], kind="stable")[:top_k]
        weights = probs[n, chosen] / probs[n, chosen].sum()
        for e, w in zip(chosen, weights):
            taken[e] += 1
            if capacity is not None and taken[e] > capacity:
                continue
            g = x[n] @ np.asarray(p["w_gate"][e], np.float64)
            u = x[n] @ np.asarray(p["w_up"][e], np.float64)
            out[n] += w * ((g / (1 + np.exp(-g))) * u) @ np.asarray(p["w_down"][e], np.float64)
    return out


@pytest.mark.parametrize("dispatch", ["ragged", "blocks", "capacity"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatch_equals_dense_mixture(dispatch, top_k):
    config = mj.ModelConfig.from_preset("tiny-mixtral", n_experts_per_tok=top_k, moe_dispatch=dispatch,
                                        moe_capacity_factor=float(4 / top_k))  # capacity = every token: no drop
    x = jax.random.normal(jax.random.key(1), (2, 7, config.dim))
    valid = jnp.ones((2, 7), bool)
    params = MoE(config).init(jax.random.key(0), x, valid)["params"]
    params = flax.linen.meta.unbox(params)
    y, _ = MoE(config).apply({"params": params}, x, valid)
    ref = dense_reference(x, params, top_k)
    np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), ref, rtol=1e-4, atol=1e-5)


def output_and_grads(config, params, x, valid):
    """MoE output, and the gradients of a fixed random projection of it w.r.t. the parameters and x."""
    module = MoE(config)
    cotangent = jax.random.normal(jax.random.key(9), x.shape)

    def objective(p, x):
        return jnp.sum(module.apply({"params": p}, x, valid)[0] * cotangent)

    return module.apply({"params": params}, x, valid)[0], jax.grad(objective, argnums=(0, 1))(params, x)


def one_sided_router(params, x):
    """Router and tokens that send every token to experts 0 and 1 (experts 2.. get nothing)."""
    router = jnp.zeros_like(params["router"]).at[0, 0].set(10.0).at[0, 1].set(5.0)
    return {**params, "router": router}, x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)


@pytest.mark.parametrize("case", ["random", "padding rows", "one-sided", "top-1", "single token"])
def test_blocks_equal_ragged_outputs_and_gradients(case):
    config = mj.ModelConfig.from_preset("tiny-mixtral", n_experts_per_tok=1 if case == "top-1" else 2)
    shapes = {"random": (2, 37), "padding rows": (3, 20), "one-sided": (2, 23), "top-1": (2, 29),
              "single token": (1, 1)}
    shape = shapes[case]
    x = jax.random.normal(jax.random.key(1), (*shape, config.dim))
    valid = jnp.ones(shape, bool)
    if case == "padding rows":
        valid = valid.at[1, 12:].set(False).at[2, :].set(False)
        x = jnp.where(valid[..., None], x, 0.0)
    params = flax.linen.meta.unbox(MoE(config).init(jax.random.key(0), x, valid)["params"])
    if case == "one-sided":
        params, x = one_sided_router(params, x)
        _, experts, _ = route(x.reshape(-1, config.dim) @ params["router"], 2)
        assert set(np.unique(np.asarray(experts))) == {0, 1}
    y, grads = output_and_grads(config.replace(moe_dispatch="blocks"), params, x, valid)
    y_ref, grads_ref = output_and_grads(config.replace(moe_dispatch="ragged"), params, x, valid)
    for got, ref in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_ref, grads_ref))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    if case == "one-sided":  # experts without tokens get exactly zero gradients
        assert not np.any(np.asarray(grads[0]["w_gate"][2:]))


def test_block_sizes_follow_the_mean_group():
    assert block_sizes(2048, 8) == (256, 128, 64, 32)  # mean group 256
    assert block_sizes(16384, 8) == (256, 128, 64, 32)  # capped
    assert block_sizes(148, 4) == (32, 16, 8, 4)  # mean 37
    assert block_sizes(2, 8) == (1,)  # decoding one token
    assert block_sizes(24, 8) == (2, 1)


def test_auto_dispatch_is_the_default_and_blocks_on_cpu():
    config = mj.ModelConfig.from_preset("tiny-mixtral")
    assert config.moe_dispatch == "auto"
    x = jax.random.normal(jax.random.key(1), (2, 9, config.dim))
    valid = jnp.ones((2, 9), bool)
    params = flax.linen.meta.unbox(MoE(config).init(jax.random.key(0), x, valid)["params"])
    auto = jax.jit(lambda p: MoE(config).apply({"params": p}, x, valid)[0])
    if jax.default_backend() == "cpu":
        assert "ragged" not in auto.lower(params).compile().as_text()
        blocks, _ = MoE(config.replace(moe_dispatch="blocks")).apply({"params": params}, x, valid)
        np.testing.assert_array_equal(np.asarray(auto(params)), np.asarray(blocks))


def test_capacity_drops_overflow_rows_only():
    config = mj.ModelConfig.from_preset("tiny-mixtral", moe_dispatch="capacity", moe_capacity_factor=0.5)
    x = jax.random.normal(jax.random.key(1), (1, 16, config.dim))
    valid = jnp.ones((1, 16), bool)
    boxed = MoE(config).init(jax.random.key(0), x, valid)["params"]
    params = flax.linen.meta.unbox(boxed)
    y, _ = MoE(config).apply({"params": params}, x, valid)
    full, _ = MoE(config.replace(moe_dispatch="ragged")).apply({"params": params}, x, valid)
    assert expert_capacity(16, config) == 4  # 0.5 * 16 tokens * 2 / 4 experts
    same = np.all(np.isclose(np.asarray(y), np.asarray(full), atol=1e-5), axis=-1)
    assert 0 < same.sum() < 16  # some tokens lost an expert to the capacity limit, others did not
    ref = dense_reference(x, params, 2, capacity=4)  # which ones: each expert's assignments past 4, in token order
    np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), ref, rtol=1e-4, atol=1e-5)


def test_load_balancing_loss_matches_transformers_formula():
    """transformers' load_balancing_loss_func on the concatenation of every layer's router logits."""
    rng = np.random.default_rng(0)
    layers, n, e, k = 3, 10, 4, 2
    logits = rng.normal(size=(layers, n, e)).astype(np.float32)
    valid = np.ones(n, bool)
    stats = []
    for layer_logits in logits:
        _, experts, probs = route(jnp.asarray(layer_logits), k)
        stats.append(routing_stats(probs, experts, jnp.asarray(valid)))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    ours = float(load_balancing_loss(stacked, e))

    flat = logits.reshape(-1, e)
    probs = np.exp(flat) / np.exp(flat).sum(-1, keepdims=True)
    selected = np.argsort(-probs, axis=-1)[:, :k]
    expert_mask = np.eye(e)[selected]  # [N, k, E]
    tokens_per_expert = expert_mask.mean(0)  # [k, E]
    router_prob_per_expert = probs.mean(0)  # [E]
    reference = e * np.sum(tokens_per_expert * router_prob_per_expert[None])
    assert ours == pytest.approx(reference, rel=1e-5)
