"""Mixtral's sparse mixture of experts: router, top-k, grouped expert SwiGLUs, load-balancing statistics.

Tokens are sorted by the expert they are routed to, so compute grows with top_k, not with the number
of experts. Two ways to run the grouped matmuls:
  ragged:   `lax.ragged_dot` over the sorted rows; dropless, exact.
  capacity: each expert takes at most capacity_factor * tokens * k / experts rows in a dense
            [experts, capacity, dim] buffer (one batched matmul, splits well over an `expert` mesh
            axis); rows past capacity are dropped, as in Switch / GShard.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.model.layers import param_init


def route(router_logits, top_k: int):
    """Top-k experts per token and their weights (softmax over the k selected, as Mixtral).

    router_logits: [N, E] -> (weights float32 [N, k], experts int32 [N, k], probs float32 [N, E]).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_probs, experts = jax.lax.top_k(probs, top_k)
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def routing_stats(probs, experts, valid):
    """Per-layer sums that `load_balancing_loss` combines over layers.

    probs: [N, E]; experts: [N, k]; valid: bool [N] (padding excluded).
    """
    n_experts = probs.shape[-1]
    w = valid.astype(jnp.float32)
    assigned = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum(axis=1)  # [N, E]
    return {
        "assigned": jnp.einsum("n,ne->e", w, assigned),
        "probs": jnp.einsum("n,ne->e", w, probs),
        "tokens": jnp.sum(w),
    }


def load_balancing_loss(stats, n_experts: int):
    """transformers' `load_balancing_loss_func`: E * sum_e f_e * P_e over all layers' tokens.

    stats: routing_stats with a leading layer axis. f_e is the fraction of (token, slot) pairs routed
    to e, P_e the mean router probability of e, both over the tokens of every layer together.
    """
    tokens = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
    assigned = jnp.sum(stats["assigned"], axis=0) / tokens
    probs = jnp.sum(stats["probs"], axis=0) / tokens
    return n_experts * jnp.sum(assigned * probs)


def _sort_by_expert(experts, n_experts: int):
    """Order of the flattened (token, slot) pairs grouped by expert, and each group's size."""
    flat = experts.reshape(-1)  # [N * k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    return order, flat[order], group_sizes


def _grouped_swiglu_ragged(rows, group_sizes, w_gate, w_up, w_down):
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes)
    up = jax.lax.ragged_dot(rows, w_up, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def _grouped_swiglu_capacity(rows, sorted_experts, group_sizes, w_gate, w_up, w_down, capacity: int):
    n_experts = w_gate.shape[0]
    starts = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(rows.shape[0]) - starts[sorted_experts]  # place within the expert's group
    rank = jnp.where(rank < capacity, rank, capacity)  # past capacity: dropped
    buffer = jnp.zeros((n_experts, capacity, rows.shape[-1]), rows.dtype)
    buffer = buffer.at[sorted_experts, rank].set(rows, mode="drop")  # [E, C, D]
    buffer = nn.with_logical_constraint(buffer, ("act_expert", None, "act_embed"))
    gate = jnp.einsum("ecd,edf->ecf", buffer, w_gate)
    up = jnp.einsum("ecd,edf->ecf", buffer, w_up)
    out = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down)
    return out.at[sorted_experts, rank].get(mode="fill", fill_value=0)  # [N * k, D]


def expert_capacity(n_tokens: int, config: ModelConfig) -> int:
    per_expert = n_tokens * config.n_experts_per_tok / config.n_experts
    return max(1, min(n_tokens, math.ceil(config.moe_capacity_factor * per_expert)))


class MoE(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, valid):
        """x: [B, T, D]; valid: bool [B, T] -> (y [B, T, D], routing_stats)."""
        cfg = self.config
        dt, pdt, init = cfg.compute_dtype, cfg.weights_dtype, param_init(cfg.init_std)
        b, t, d = x.shape
        e, f, k = cfg.n_experts, cfg.hidden_dim, cfg.n_experts_per_tok
        router = self.param("router", nn.with_logical_partitioning(init, ("embed", None)), (d, e), pdt)
        w_gate = self.param("w_gate", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")), (e, d, f), pdt)
        w_up = self.param("w_up", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")), (e, d, f), pdt)
        w_down = self.param("w_down", nn.with_logical_partitioning(init, ("expert", "mlp", "embed")), (e, f, d), pdt)

        tokens = x.reshape(b * t, d).astype(dt)  # [N, D]
        weights, experts, probs = route(jnp.dot(tokens, router.astype(dt)), k)
        stats = routing_stats(probs, experts, valid.reshape(-1))

        order, sorted_experts, group_sizes = _sort_by_expert(experts, e)
        rows = tokens[order // k]  # [N * k, D], grouped by expert
        w = (w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))
        if cfg.moe_dispatch == "ragged":
            out_sorted = _grouped_swiglu_ragged(rows, group_sizes, *w)
        elif cfg.moe_dispatch == "capacity":
            out_sorted = _grouped_swiglu_capacity(rows, sorted_experts, group_sizes, *w, expert_capacity(b * t, cfg))
        else:
            raise ValueError(f"unknown moe_dispatch {cfg.moe_dispatch!r}")
        out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(b * t, k, d)
        y = jnp.einsum("nkd,nk->nd", out, weights.astype(dt))
        return y.reshape(b, t, d), stats
