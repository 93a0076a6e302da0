"""Optimisation: AdamW with linear warmup and cosine decay, global-norm clipping, the SFT loss, and gradient
accumulation weighted by token counts (k micro-batches give exactly the gradient of one k-times batch)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mistral_jax.errors import UserError

NO_DECAY = ("scale", "bias")  # RMSNorm scales (and biases, where a model has them) are not decayed


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Hyperparameters of the optimizer and its schedule; total_steps is what the schedule spans."""

    learning_rate: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.1  # the cosine ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise UserError(f"need steps >= 1 and 0 <= warmup steps <= steps, got warmup {self.warmup_steps} "
                             f"of {self.total_steps} steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min lr ratio must be in [0, 1], got {self.min_lr_ratio}")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate of update `count` (0-based): warmup to the peak over warmup_steps, then cosine down.

    Update n (1-based) uses (n / warmup) * peak while warming up, so the first update already moves; the
    cosine reaches peak * min_lr_ratio at update total_steps.
    """
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup, decay = cfg.warmup_steps, max(cfg.total_steps - cfg.warmup_steps, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step <= warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """True for every parameter AdamW decays: all but those whose path ends in a norm scale or a bias."""

    def decays(path, _):
        return not (path and getattr(path[-1], "key", None) in NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the schedule with decay masked off norms and biases."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


def token_loss_sum(logits, targets, weights):
    """Summed cross-entropy over weighted targets, and their count: logits [B, T, V]; targets, weights [B, T].

    Log-softmax in float32 whatever the compute dtype.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T]
    return jnp.sum(ce * weights), jnp.sum(weights)


def accumulate_gradients(loss_fn: Callable, trainable, micro_batches):
    """Gradient of the mean objective over K micro-batches together, one micro-batch at a time.

    loss_fn(trainable, micro) -> (objective_sum, sums): the objective summed over what it averages (target
    tokens for SFT, pairs for DPO: train/objectives.py), and a pytree of sums to add up over micro-batches, with
    that count under "count". Gradients and sums add up over a scan and the gradient is divided by the total
    count at the end, so K micro-batches equal one batch of K times the rows (up to float rounding).
    micro_batches: pytree of [K, B, ...].
    Returns (grads, sums over all micro-batches).
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def body(carry, micro):
        grads, sums = carry
        g, sums_k = grad_fn(trainable, micro)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, sums_k)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(loss_fn, trainable, first)[1])
    (grads, sums), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, trainable), zero_sums), micro_batches)
    total = jnp.maximum(sums["count"], 1.0)
    return jax.tree.map(lambda g: g / total, grads), sums
