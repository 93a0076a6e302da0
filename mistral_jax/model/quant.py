"""int8 weights and the int8 matmul per backend; weights quantized with qwix (QArray, quantize).

A quantized weight is two leaves: NAME (int8, the weight's shape) and NAME_scale (float32, the same rank
with the contracted axes of size 1: one symmetric absmax scale per output channel), under the weight's
logical axes, so both shard alike (a size-1 axis is replicated). Norms and the router stay float.
The matmul (ModelConfig.quant_matmul, resolved per backend as the attention kernel is):
  int8_dot: activations quantized on the fly (a scale per row and tile of ACTIVATION_TILE contracted values),
            int8 x int8 -> int32 dots, then both scales; at least two rows (XLA:CPU runs a one-row int8 dot ~10x
            slower than two: RESULTS.md, int8);
  dequant:  weight-only: the weight converted to the compute dtype before the dot, which XLA:GPU/TPU fuse
            into the matmul (XLA:CPU does not: it reads the float copy);
  auto:     int8_dot on CPU for up to INT8_DOT_MAX_ROWS rows (decode), dequant for more and on other backends
            (`lax.platform_dependent`: only the chosen one compiles).
The int8 dot is ours: qwix.einsum's int8 x int8 path scales activations per row only (+5.2% SmolLM2
perplexity, measured), and its sub-channel path refuses tiles under 128 (it dequantizes both operands instead),
which does not divide SmolLM2's 576. qwix is imported on first use (it adds seconds to start-up); a float model
never loads it. Its model-level interception (quantize_model) is not used: it rewrites flax modules' calls,
while our parameter tree, its logical axes and orbax checkpoints stay plain arrays that this file interprets.
"""

from __future__ import annotations

import functools
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError

SCALE_SUFFIX = "_scale"
# Every quantized weight's contracted axes, counted from the end (a scanned model adds a leading layer axis).
CONTRACTED = {
    "wq": (-3,), "wk": (-3,), "wv": (-3,), "wo": (-3, -2),  # [D, H, hd] ... [H, hd, D]
    "w_gate": (-2,), "w_up": (-2,), "w_down": (-2,),  # [D, F], [F, D]; experts [E, D, F], [E, F, D]
    "lm_head": (-2,),  # [D, V]
    "embedding": (-1,),  # [V, D]: a scale per row serves both the lookup and the tied head
}
MIN_INT8_ROWS = 2
# Activation scales per row and per tile of this many contracted values: per row alone, SmolLM2's activation
# outliers cost +5% perplexity; tiles of 64 cost none (RESULTS.md, int8).
ACTIVATION_TILE = 64
# auto on CPU: at most this many rows (decode) take the int8 dots; more (prefill, eval) are compute-bound, and
# the dequantized weight's float copy is read once for them all.
INT8_DOT_MAX_ROWS = 64


def _qwix():
    import qwix

    return qwix


def QArray(qvalue, scale):  # noqa: N802 - builds a qwix.QArray
    """A qwix.QArray of int8 values and their float scales."""
    return _qwix().QArray(qvalue, scale, qtype=jnp.int8)


def is_quantized(w) -> bool:
    """Whether w is a qwix.QArray (none exists before qwix is imported)."""
    return "qwix" in sys.modules and isinstance(w, sys.modules["qwix"].QArray)


def scale_shape(name: str, shape) -> tuple[int, ...]:
    axes = {a % len(shape) for a in CONTRACTED[name]}
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


@functools.partial(jax.jit, static_argnums=0)
def quantize_array(name: str, w) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scales) of weight `name` (symmetric absmax per output channel)."""
    contracted = {a % w.ndim for a in CONTRACTED[name]}
    q = _qwix().quantize(jnp.asarray(w, jnp.float32), jnp.int8,
                      channelwise_axes=tuple(i for i in range(w.ndim) if i not in contracted))
    return q.qvalue, q.scale


def quantize(config: ModelConfig, params, weights: str = "int8"):
    """(config, params) with every large matmul weight in int8 and its float32 scales (either layer layout).

    Each float weight is deleted once quantized (when it is a jax.Array), so the peak stays near the float
    model plus one weight.
    """
    qconfig = quantized_config(config, weights)

    def one(path, value):
        name = path[-1]
        if name not in CONTRACTED:
            return value
        out = QArray(*quantize_array(name, value))
        if isinstance(value, jax.Array):
            value.delete()
        return out

    return qconfig, split_scales(_map_dict(one, params))


def quantized_config(config: ModelConfig, weights: str) -> ModelConfig:
    """config with quant=`weights`; a UserError for an unknown mode or an already quantized config."""
    check_mode(weights)
    if config.quant != "none":
        raise UserError(f"the checkpoint is already quantized ({config.quant}); quantize its float original instead")
    return config.replace(quant=weights)


def _map_dict(fn, tree, path=()):
    return {k: _map_dict(fn, v, path + (k,)) if isinstance(v, dict) else fn(path + (k,), v) for k, v in tree.items()}


def split_scales(tree):
    """A tree whose quantized weights are QArray leaves -> the stored form: NAME and NAME_scale leaves."""
    out = {}
    for key, value in tree.items():
        if is_quantized(value):
            out[key], out[key + SCALE_SUFFIX] = value.qvalue, value.scale
        else:
            out[key] = split_scales(value) if isinstance(value, dict) else value
    return out


def check_mode(weights) -> None:
    if weights != "int8":
        raise UserError(f"unknown quantize mode {weights!r}; the one mode is 'int8'")


def weight(module: nn.Module, name: str, axes, shape, config: ModelConfig, init):
    """Declare weight `name` on `module`: a float array in config.param_dtype, or (config.quant == "int8")
    a QArray of int8 values and float32 scales under the same logical axes."""
    if config.quant == "none":
        return module.param(name, nn.with_logical_partitioning(init, axes), shape, config.weights_dtype)
    qvalue = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.int8)
    scale = module.param(name + SCALE_SUFFIX, nn.with_logical_partitioning(nn.initializers.ones, axes),
                         scale_shape(name, shape), jnp.float32)
    return QArray(qvalue, scale)


def absmax_int8(x):
    """x [..., N] -> (int8 [..., N], float32 scales [..., 1]): symmetric absmax over the last axis (zeros: scale 1)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def dequantize(w, dtype):
    """A weight as a float array of `dtype` (float weights are only cast)."""
    if is_quantized(w):
        return (w.qvalue.astype(dtype) * w.scale.astype(dtype)).astype(dtype)
    return w.astype(dtype)


def take(w, ids, dtype):
    """Rows `ids` of an embedding table [V, D], float or quantized: [..., D] in `dtype`."""
    if is_quantized(w):
        return jnp.take(w.qvalue, ids, axis=0).astype(dtype) * jnp.take(w.scale, ids, axis=0).astype(dtype)
    return jnp.take(w, ids, axis=0).astype(dtype)


def einsum(spec: str, x, w, config: ModelConfig, preferred_element_type=None):
    """jnp.einsum(spec, x, w) with x [B, T, ...] in the compute dtype and w a float or quantized weight.

    Every spec here contracts all of x's axes after (B, T), and its output is (B, T) then w's free axes in order.
    """
    dt = config.compute_dtype
    x = x.astype(dt)
    if not is_quantized(w):
        return jnp.einsum(spec, x, w.astype(dt), preferred_element_type=preferred_element_type)
    out_dtype = preferred_element_type or dt

    def dequant():
        return jnp.einsum(spec, x, dequantize(w, dt), preferred_element_type=preferred_element_type).astype(out_dtype)

    def int8_dot():
        return _int8_dot(spec, x, w).astype(out_dtype)

    rows = x.shape[0] * x.shape[1]
    if config.quant_matmul == "auto":
        return jax.lax.platform_dependent(cpu=int8_dot if rows <= INT8_DOT_MAX_ROWS else dequant, default=dequant)
    if config.quant_matmul == "int8_dot" and jax.default_backend() != "cpu":
        raise UserError(f"quant_matmul='int8_dot' is the CPU kernel; on {jax.default_backend()} use 'dequant' "
                        "(weight-only, fused into the matmul) or 'auto'")
    return int8_dot() if config.quant_matmul == "int8_dot" else dequant()


def _int8_dot(spec: str, x, w):
    """x's rows quantized on the fly per tile of ACTIVATION_TILE contracted values, padded to MIN_INT8_ROWS rows;
    int8 x int8 -> int32 dots per tile, then the tiles' scales, summed, and the weight's scales."""
    x_subs, w_subs = spec.split("->")[0].split(",")
    b, t = x.shape[:2]
    c, n_contracted = math.prod(x.shape[2:]), x.ndim - 2
    leading = w_subs[0] in x_subs  # w is [C..., O...] (else [O..., C], the tied embedding)
    free = w.shape[n_contracted:] if leading else w.shape[: w.ndim - n_contracted]
    o = math.prod(free)
    rows = x.reshape(b * t, c).astype(jnp.float32)
    n = max(b * t, MIN_INT8_ROWS)
    if n > b * t:
        rows = jnp.concatenate([rows] * n, axis=0)[:n]  # copies of the row: their scales are the row's own
    tile = ACTIVATION_TILE if c % ACTIVATION_TILE == 0 else c
    xq, scale = absmax_int8(rows.reshape(n, c // tile, tile))  # [N, G, g], [N, G, 1]
    if leading:
        acc = jnp.einsum("ngk,gko->gno", xq, w.qvalue.reshape(c // tile, tile, o), preferred_element_type=jnp.int32)
    else:
        acc = jnp.einsum("ngk,ogk->gno", xq, w.qvalue.reshape(o, c // tile, tile), preferred_element_type=jnp.int32)
    y = jnp.einsum("gno,ng->no", acc.astype(jnp.float32), scale[..., 0]) * w.scale.reshape(1, o)  # [N, O]
    return y[: b * t].reshape(b, t, *free)
