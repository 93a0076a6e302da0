"""int8 weights, quantized with qwix (QArray, quantize); the matmul that reads them is model/linear.py's.

A quantized weight is two leaves: NAME (int8, the weight's shape) and NAME_scale (float32, the same rank
with the contracted axes of size 1: one symmetric absmax scale per output channel), under the weight's
logical axes, so both shard alike (a size-1 axis is replicated). Norms and the router stay float.
qwix is imported on first use (it adds seconds to start-up); a float model
never loads it. Its model-level interception (quantize_model) is not used: it rewrites flax modules' calls,
while our parameter tree, its logical axes and orbax checkpoints stay plain arrays that this file interprets.
"""

from __future__ import annotations

import functools
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
