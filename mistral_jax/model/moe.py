"""Mixtral's sparse mixture of experts: router, top-k, grouped expert SwiGLUs, load-balancing statistics.

Tokens are sorted by the expert they are routed to, so compute grows with top_k, not with the number
of experts. Ways to run the grouped matmuls (ModelConfig.moe_dispatch):
  ragged:   `lax.ragged_dot` over the sorted rows; dropless, exact. For backends with grouped-matmul
            kernels for it (XLA:TPU); XLA:CPU, and XLA:GPU as measured, rewrite it to one dense dot of every
            row against every expert: E times the FLOPs.
  blocks:   dropless, exact (the same output as ragged to float32 rounding). Each expert's group is
            padded to whole row blocks (`block_sizes`: 256 rows and smaller) and every block is a dense
            [block, D] x [D, H] matmul with its expert's weights, in while loops that visit only the
            blocks in use; a custom VJP runs the backward the same way. Near the dense SwiGLU of the same
            active parameters on XLA:CPU; not measured on TPU.
  capacity: each expert takes at most capacity_factor * tokens * k / experts rows in a dense
            [experts, capacity, dim] buffer (one batched matmul, splits well over an `expert` mesh
            axis); rows past capacity are dropped, as in Switch / GShard.
  auto:     the default: "ragged" when lowering for TPU, "blocks" elsewhere (`lax.platform_dependent`,
            so only the chosen one is compiled).
benchmarks/RESULTS.md has each dispatch's time against the dense layer, on the CPU and on an H200.
When the batch carries LoRA adapters on the expert weights (model/linear.py's ExpertLora), every dispatch adds each
sorted row's update from its adapter's factors of its expert, before the SwiGLU (gate, up) and after it (down).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import linear, quant
from mistral_jax.model.constraints import constrain
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


def routing_totals(stats):
    """Per-layer routing_stats summed over the layer axis: {"assigned": [E], "probs": [E], "tokens": []}."""
    return jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)


def balance_loss(totals, n_experts: int, routed=None):
    """E * sum_e f_e * P_e from routing_totals; f_e (no gradient: a count) comes from `routed` (default `totals`).

    With `routed` the totals of a whole batch and `totals` one micro-batch's, the loss is linear in that
    micro-batch's probability sums, and the micro-batches' losses add up to the whole batch's.
    """
    routed = totals if routed is None else routed
    tokens = jnp.maximum(routed["tokens"], 1.0)
    return n_experts * jnp.sum(routed["assigned"] / tokens * totals["probs"] / tokens)


def load_balancing_loss(stats, n_experts: int):
    """transformers' `load_balancing_loss_func`: E * sum_e f_e * P_e over all layers' tokens.

    stats: routing_stats with a leading layer axis. f_e is the fraction of (token, slot) pairs routed
    to e, P_e the mean router probability of e, both over the tokens of every layer together.
    """
    return balance_loss(routing_totals(stats), n_experts)


def _sort_by_expert(experts, n_experts: int):
    """Order of the flattened (token, slot) pairs grouped by expert, and each group's size."""
    flat = experts.reshape(-1)  # [N * k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    return order, flat[order], group_sizes


def _grouped_swiglu_ragged(rows, sorted_experts, group_sizes, w_gate, w_up, w_down, lora=None):
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes)
    up = jax.lax.ragged_dot(rows, w_up, group_sizes)
    if lora is not None:  # each row's adapter update: its slot's factors of its expert
        gate, up = lora.add("w_gate", rows, gate, sorted_experts), lora.add("w_up", rows, up, sorted_experts)
    hidden = jax.nn.silu(gate) * up
    out = jax.lax.ragged_dot(hidden, w_down, group_sizes)
    return out if lora is None else lora.add("w_down", hidden, out, sorted_experts)


def _rank_in_group(sorted_experts, group_sizes):
    """Place of each sorted row within its expert's group: [N * k]."""
    starts = jnp.cumsum(group_sizes) - group_sizes
    return jnp.arange(sorted_experts.shape[0]) - starts[sorted_experts]


def _grouped_swiglu_capacity(rows, sorted_experts, group_sizes, w_gate, w_up, w_down, capacity: int, lora=None):
    n_experts = w_gate.shape[0]
    rank = _rank_in_group(sorted_experts, group_sizes)
    rank = jnp.where(rank < capacity, rank, capacity)  # past capacity: dropped
    buffer = jnp.zeros((n_experts, capacity, rows.shape[-1]), rows.dtype)
    buffer = buffer.at[sorted_experts, rank].set(rows, mode="drop")  # [E, C, D]
    buffer = constrain(buffer, ("act_expert", None, "act_embed"))
    gate = jnp.einsum("ecd,edf->ecf", buffer, w_gate)
    up = jnp.einsum("ecd,edf->ecf", buffer, w_up)
    if lora is not None:  # the buffer's rows (empty places: slot 0, no update) through their slot and expert
        slot = jnp.zeros((n_experts, capacity), jnp.int32).at[sorted_experts, rank].set(lora.slot, mode="drop")
        lora = lora.replace(slot=slot.reshape(-1))  # [E * C]
        expert = jnp.repeat(jnp.arange(n_experts, dtype=jnp.int32), capacity)  # [E * C]
        flat = buffer.reshape(n_experts * capacity, -1)
        gate, up = (lora.add(name, flat, y.reshape(flat.shape[0], -1), expert).reshape(y.shape)
                    for name, y in (("w_gate", gate), ("w_up", up)))
    hidden = jax.nn.silu(gate) * up
    out = jnp.einsum("ecf,efd->ecd", hidden, w_down)
    if lora is not None:
        out = lora.add("w_down", hidden.reshape(flat.shape[0], -1), out.reshape(flat.shape), expert).reshape(out.shape)
    return out.at[sorted_experts, rank].get(mode="fill", fill_value=0)  # [N * k, D]


BLOCK_MAX = 256  # rows of the largest block of the "blocks" dispatch


def block_sizes(n_rows: int, n_experts: int) -> tuple[int, ...]:
    """Row counts of the "blocks" dispatch's blocks, largest first: B, B / 2, B / 4, B / 8 (down to 1).

    B is the power of two at most the mean group n_rows / n_experts, and at most BLOCK_MAX. A group is
    padded to a multiple of the smallest size (fewer than B / 8 wasted rows) and runs as any number of
    B-row blocks, then at most one block of each smaller size: large blocks run near XLA:CPU's matmul
    peak, the small ones keep the padding small.
    """
    big = 2 ** min(BLOCK_MAX.bit_length() - 1, max(0, (n_rows // n_experts).bit_length() - 1))
    return tuple(big >> i for i in range(min(3, big.bit_length() - 1) + 1))


def _grouped_swiglu_blocks(rows, sorted_experts, group_sizes, w_gate, w_up, w_down, lora=None):
    """Each expert's group padded with zero rows to whole blocks; every block a dense SwiGLU of its expert. With
    `lora` (linear.ExpertLora) each row adds its slot's update of its expert's weights (a serving path: the
    forward loops, no custom VJP)."""
    n_rows, n_experts = rows.shape[0], w_gate.shape[0]
    blocks = block_sizes(n_rows, n_experts)
    unit = blocks[-1]
    counts = (group_sizes + unit - 1) // unit * unit  # [E] padded rows per expert
    first = jnp.cumsum(counts) - counts  # [E] padded row of each expert's first row
    dest = first[sorted_experts] + _rank_in_group(sorted_experts, group_sizes)  # [N * k]
    n_padded = (n_rows + n_experts * (unit - 1)) // unit * unit  # static bound of sum(counts)
    padded = jnp.zeros((n_padded, rows.shape[-1]), rows.dtype).at[dest].set(rows)  # [R, D]
    if lora is None:
        return _expert_blocks(blocks, padded, counts, first, w_gate, w_up, w_down)[dest]
    lora = lora.replace(slot=jnp.zeros((n_padded,), jnp.int32).at[dest].set(lora.slot))  # padding rows: slot 0
    return _blocks_forward(blocks, padded, counts, first, (w_gate, w_up, w_down), save=False, lora=lora)[0][dest]


def _each_expert(counts, weights, body, carry):
    """carry = body(e, (w[e] for w in weights), carry) for each expert e with rows, in a while loop.

    The weights are sliced once per expert (a copy on XLA:CPU), and only for experts that have rows.
    """
    active = jnp.argsort(counts == 0, stable=True)  # experts with rows first

    def step(i, carry):
        e = active[i]
        return body(e, tuple(jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in weights), carry)

    return jax.lax.fori_loop(0, jnp.count_nonzero(counts), step, carry)


def _each_block(blocks, start, n_rows, body, carry):
    """carry = body(row, size, carry) over blocks tiling rows [start, start + n_rows), largest first.

    n_rows (dynamic) is a multiple of blocks[-1]: blocks of blocks[0] rows, then at most one of each
    smaller size.
    """
    for size in blocks:
        n = n_rows // size
        carry = jax.lax.fori_loop(0, n, lambda j, c, start=start, size=size: body(start + j * size, size, c), carry)
        start, n_rows = start + n * size, n_rows - n * size
    return carry


def _blocks_forward(blocks, x, counts, first, weights, save: bool, lora=None):
    """x: [R, D] -> y [R, D], and with save the gate and up projections [R, H] for the backward. lora: the rows'
    adapters (linear.ExpertLora, a slot per row of x)."""

    def expert(e, w, carry):
        w_gate, w_up, w_down = w
        own = None if lora is None else lora.one_expert(e)  # this expert's factors, sliced once

        def block(row, size, carry):
            xb = jax.lax.dynamic_slice_in_dim(x, row, size)  # [size, D]
            gate, up = xb @ w_gate, xb @ w_up  # [size, H]
            if own is None:
                new = (jax.nn.silu(gate) * up) @ w_down, gate, up
            else:
                slot = jax.lax.dynamic_slice_in_dim(own.slot, row, size)  # [size]
                gate, up = own.add("w_gate", xb, gate, 0, slot), own.add("w_up", xb, up, 0, slot)
                hidden = jax.nn.silu(gate) * up
                new = own.add("w_down", hidden, hidden @ w_down, 0, slot), gate, up
            return tuple(jax.lax.dynamic_update_slice_in_dim(c, v, row, 0) for c, v in zip(carry, new))

        return _each_block(blocks, first[e], counts[e], block, carry)

    hidden = jnp.zeros((x.shape[0], weights[0].shape[-1]), x.dtype)
    return _each_expert(counts, weights, expert, (jnp.zeros_like(x),) + ((hidden, hidden) if save else ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _expert_blocks(blocks, x, counts, first, w_gate, w_up, w_down):
    """SwiGLU of expert e on rows [first[e], first[e] + counts[e]) of x: [R, D] -> [R, D].

    Dynamic trip counts (while loops) keep the work to the rows in use; the custom VJP runs the backward
    as the same loops, since JAX cannot reverse-differentiate a while loop.
    """
    return _blocks_forward(blocks, x, counts, first, (w_gate, w_up, w_down), save=False)[0]


def _expert_blocks_fwd(blocks, x, counts, first, w_gate, w_up, w_down):
    weights = (w_gate, w_up, w_down)
    y, gate, up = _blocks_forward(blocks, x, counts, first, weights, save=True)
    return y, (x, counts, first, weights, gate, up)


def _expert_blocks_bwd(blocks, residuals, dy):
    x, counts, first, weights, gate, up = residuals

    def expert(e, w, carry):
        w_gate, w_up, w_down = w

        def block(row, size, carry):
            dx, dw = carry
            xb, g, u, dyb = (jax.lax.dynamic_slice_in_dim(a, row, size) for a in (x, gate, up, dy))
            sig = jax.nn.sigmoid(g)
            dh = dyb @ w_down.T  # [size, H]
            dg = dh * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
            du = dh * g * sig
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dg @ w_gate.T + du @ w_up.T, row, 0)
            return dx, (dw[0] + xb.T @ dg, dw[1] + xb.T @ du, dw[2] + (g * sig * u).T @ dyb)

        zeros = tuple(jnp.zeros_like(a) for a in w)  # this expert's weight gradients, summed over its blocks
        dx, dw_e = _each_block(blocks, first[e], counts[e], block, (carry[0], zeros))
        return dx, tuple(jax.lax.dynamic_update_index_in_dim(a, v, e, 0) for a, v in zip(carry[1], dw_e))

    zeros = (jnp.zeros_like(x), tuple(jnp.zeros_like(w) for w in weights))
    dx, dw = _each_expert(counts, weights, expert, zeros)
    return (dx, None, None) + dw


_expert_blocks.defvjp(_expert_blocks_fwd, _expert_blocks_bwd)


def expert_capacity(n_tokens: int, config: ModelConfig) -> int:
    per_expert = n_tokens * config.n_experts_per_tok / config.n_experts
    return max(1, min(n_tokens, math.ceil(config.moe_capacity_factor * per_expert)))


class MoE(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, valid, lora=None):
        """x: [B, T, D]; valid: bool [B, T] -> (y [B, T, D], routing_stats). lora: this layer's linear.LayerLora."""
        cfg = self.config
        dt, pdt, init = cfg.compute_dtype, cfg.weights_dtype, param_init(cfg.init_std)
        b, t, d = x.shape
        e, f, k = cfg.n_experts, cfg.hidden_dim, cfg.n_experts_per_tok
        router = self.param("router", nn.with_logical_partitioning(init, ("embed", None)), (d, e), pdt)
        w_gate = quant.weight(self, "w_gate", ("expert", "embed", "mlp"), (e, d, f), cfg, init)
        w_up = quant.weight(self, "w_up", ("expert", "embed", "mlp"), (e, d, f), cfg, init)
        w_down = quant.weight(self, "w_down", ("expert", "mlp", "embed"), (e, f, d), cfg, init)

        tokens = x.reshape(b * t, d).astype(dt)  # [N, D]
        weights, experts, probs = route(jnp.dot(tokens, router.astype(dt)), k)
        stats = routing_stats(probs, experts, valid.reshape(-1))

        order, sorted_experts, group_sizes = _sort_by_expert(experts, e)
        rows = tokens[order // k]  # [N * k, D], grouped by expert
        w = linear.expert_weights((w_gate, w_up, w_down), cfg)
        rows_lora = linear.expert_lora((lora, "moe"), (b, t), order // k)  # None: no adapter on expert weights
        capacity = expert_capacity(b * t, cfg)
        grouped = {  # each: [N * k, D] rows grouped by expert -> their expert's SwiGLU, [N * k, D]
            "ragged": lambda: _grouped_swiglu_ragged(rows, sorted_experts, group_sizes, *w, lora=rows_lora),
            "blocks": lambda: _grouped_swiglu_blocks(rows, sorted_experts, group_sizes, *w, lora=rows_lora),
            "capacity": lambda: _grouped_swiglu_capacity(rows, sorted_experts, group_sizes, *w, capacity,
                                                         lora=rows_lora),
            # Chosen when lowering, per platform: only the chosen branch is compiled.
            "auto": lambda: jax.lax.platform_dependent(tpu=grouped["ragged"], default=grouped["blocks"]),
        }
        if cfg.moe_dispatch not in grouped:
            raise UserError(f"unknown moe_dispatch {cfg.moe_dispatch!r}")
        out_sorted = grouped[cfg.moe_dispatch]()
        out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(b * t, k, d)
        y = jnp.einsum("nkd,nk->nd", out, weights.astype(dt))
        return y.reshape(b, t, d), stats
