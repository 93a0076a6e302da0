"""RMSNorm, rotary position embedding and the SwiGLU MLP."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.model import linear, quant
from mistral_jax.model.constraints import constrain


def param_init(std: float):
    return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(config: ModelConfig):
    """RoPE's inverse frequencies theta^(-2i/d), float32 [D/2], scaled as config.rope_scaling says.

    "linear" divides every frequency by rope_factor; "llama3" divides those whose wavelength exceeds
    original_max / low_freq_factor, keeps those below original_max / high_freq_factor and blends linearly in
    original_max / wavelength between them (transformers' `_compute_llama3_parameters`, in float32 as it).
    """
    d = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(d // 2, dtype=jnp.float32) * 2.0 / d))
    if config.rope_scaling == "linear":
        return inv_freq / config.rope_factor
    if config.rope_scaling == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_context = config.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return jnp.where(medium, blended, scaled)
    return inv_freq


def rotary_embedding(x, positions, inv_freq):
    """Rotate pairs (i, i + d/2) of the last axis by position * inv_freq[i] (transformers' layout).

    x: [B, T, H, D]; positions: int [B, T]; inv_freq: float32 [D/2] (rope_inv_freq). Returned in x's dtype;
    the rotation runs in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # [B, T, 1, D/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(x @ gate) * (x @ up))."""

    hidden_dim: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    init_std: float
    config: ModelConfig | None = None  # given: its quant says whether the weights are int8 (model/quant.py)

    @nn.compact
    def __call__(self, x, lora=None):  # [B, T, D]; lora: this layer's linear.LayerLora, when adapters ride along
        d = x.shape[-1]
        init = param_init(self.init_std)
        def weight(name, axes, shape):
            if self.config is not None:
                return quant.weight(self, name, axes, shape, self.config, init)
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

        def dot(spec, a, w, name):
            if self.config is not None:
                return linear.einsum(spec, a, w, self.config, lora=(lora, "mlp", name))
            return jnp.einsum(spec, a, w.astype(self.dtype))

        w_gate = weight("w_gate", ("embed", "mlp"), (d, self.hidden_dim))
        w_up = weight("w_up", ("embed", "mlp"), (d, self.hidden_dim))
        w_down = weight("w_down", ("mlp", "embed"), (self.hidden_dim, d))
        x = x.astype(self.dtype)
        gate = dot("btd,df->btf", x, w_gate, "w_gate")
        up = dot("btd,df->btf", x, w_up, "w_up")
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dot("btf,fd->btd", h, w_down, "w_down")
