"""The decoder: embed, the blocks, final norm and LM head; `forward` and `logits`.

The blocks run in one of two layouts (ModelConfig.scan_layers), as MaxText's `scan_layers`:
  scanned (default: training, sharding plans, checkpoints): every block's weights stacked on a leading
      `layers` axis under nn.scan, so compile time does not grow with depth;
  unscanned (inference): params["layers"]["0"], ["1"], ... one subtree per layer, and one cache buffer
      per layer, run as an unrolled loop. XLA:CPU copies each layer's slice of a stacked weight on every
      step of a scanned decode; separate buffers are read in place (benchmarks/RESULTS.md).
`layer_layout.stack_layers` / `unstack_layers` convert a model between the two.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import rolling_cache
from mistral_jax.config import ModelConfig
from mistral_jax.model.attention import Attention
from mistral_jax.model.layers import RMSNorm, SwiGLU, param_init
from mistral_jax.model.moe import MoE, load_balancing_loss


class Block(nn.Module):
    """Pre-norm residual block: attention, then a SwiGLU MLP or a mixture of experts."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, ctx):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.weights_dtype, name=name)  # noqa: E731
        attn_out, new_layer_cache = Attention(cfg, name="attention")(
            norm("attention_norm")(x), ctx["positions"], ctx["segment_ids"], layer_cache, ctx["cache_pos"], ctx["new_cache_pos"],
            ctx["cache_empty"],
        )
        h = x + attn_out
        if cfg.is_moe:
            mlp_out, stats = MoE(cfg, name="moe")(norm("ffn_norm")(h), ctx["positions"] >= 0)
        else:
            mlp_out, stats = SwiGLU(cfg.hidden_dim, cfg.compute_dtype, cfg.weights_dtype, cfg.init_std, name="mlp")(norm("ffn_norm")(h)), None
        out = nn.with_logical_constraint(h + mlp_out, ("batch", "length", "act_embed"))
        return out, (new_layer_cache, stats)


class LayerList(nn.Module):
    """The unscanned layout: blocks named "0" .. "n_layers - 1", each with its own weights and cache buffer.

    Same inputs and outputs as the scanned stack: caches {"k", "v"} hold tuples of per-layer buffers,
    and routing statistics come back stacked on a leading layer axis.
    """

    config: ModelConfig
    block: type = Block

    @nn.compact
    def __call__(self, x, layer_caches, ctx):
        keys, values, stats = [], [], []
        for i in range(self.config.n_layers):
            layer_cache = None if layer_caches is None else {"k": layer_caches["k"][i], "v": layer_caches["v"][i]}
            x, (new_layer_cache, layer_stats) = self.block(self.config, name=str(i))(x, layer_cache, ctx)
            if new_layer_cache is not None:
                keys.append(new_layer_cache["k"])
                values.append(new_layer_cache["v"])
            stats.append(layer_stats)
        new_caches = {"k": tuple(keys), "v": tuple(values)} if layer_caches is not None else None
        stats = None if stats[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *stats)
        return x, (new_caches, stats)


class Transformer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids=None, cache=None, last_only=False, cache_empty=False):
        """tokens, positions: int [B, T] -> (logits float32 [B, T, V], new cache or None, aux dict).

        last_only: logits for the last column only ([B, 1, V]), as prefill needs. cache_empty: the cache
        holds nothing yet; attention then reads the tokens alone (they are still written to it).
        """
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.weights_dtype
        embedding = self.param(
            "embedding", nn.with_logical_partitioning(param_init(cfg.init_std), ("vocab", "embed")), (cfg.vocab_size, cfg.dim), pdt
        )
        x = jnp.take(embedding, tokens, axis=0).astype(dt)  # [B, T, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        ctx = {"positions": positions, "segment_ids": segment_ids, "cache_pos": None, "new_cache_pos": None,
               "cache_empty": cache_empty}
        layer_caches = None
        if cache is not None:
            ctx["cache_pos"] = cache["pos"]
            ctx["new_cache_pos"] = rolling_cache.advance_positions(cache["pos"], positions)
            layer_caches = {"k": cache["k"], "v": cache["v"]}

        block = Block
        if cfg.remat:
            block = nn.remat(Block, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        if cfg.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, (new_layer_caches, stats) = blocks(cfg, name="layers")(x, layer_caches, ctx)
        else:
            x, (new_layer_caches, stats) = LayerList(cfg, block, name="layers")(x, layer_caches, ctx)

        if last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x)
        if cfg.tie_embeddings:  # read the [V, D] table as it is stored: `embedding.T` costs XLA:CPU a copy per call
            logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dt), preferred_element_type=jnp.float32)
        else:
            head = self.param("lm_head", nn.with_logical_partitioning(param_init(cfg.init_std), ("embed", "vocab")), (cfg.dim, cfg.vocab_size), pdt)
            logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

        new_cache = None
        if cache is not None:
            new_cache = {"k": new_layer_caches["k"], "v": new_layer_caches["v"], "pos": ctx["new_cache_pos"]}
        aux = {}
        if cfg.is_moe:
            aux["load_balancing_loss"] = load_balancing_loss(stats, cfg.n_experts)
        return logits, new_cache, aux


def forward(config: ModelConfig, params, tokens, positions, segment_ids=None, cache=None, last_only=False,
            cache_empty=False):
    """Pure forward pass: (logits float32 [B, T, V], new cache or None, aux dict).

    Without a cache, attention skips the blocks above the diagonal: positions must not decrease along a
    segment (true of prompts, padded or packed rows). cache_empty: see Transformer.
    """
    return Transformer(config).apply({"params": params}, tokens, positions, segment_ids, cache, last_only, cache_empty)


def default_positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)


def logits(config: ModelConfig, params, tokens, *, mesh=None):
    """Causal logits without a cache: int [B, T] -> float32 [B, T, vocab].

    mesh: a `jax.sharding.Mesh` from `mistral_jax.sharding.make_mesh`; the parameters are placed on it
    (unless `shard_params` already did) and the logits come back split on batch and vocabulary (across
    hosts, gather them with `jax.experimental.multihost_utils.process_allgather`).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    if mesh is None:
        return _logits_jit(config, None, params, jnp.asarray(tokens, jnp.int32))
    from mistral_jax import sharding  # sharding reads this module's logical axes: import on use

    params = sharding.ensure_params(config, params, mesh)
    tokens = sharding.put(tokens.astype(np.int32), sharding.named(mesh, tokens.shape, ("batch", None)))
    return _logits_jit(config, mesh, params, tokens)


@jax.jit(static_argnums=(0, 1))
def _logits_jit(config, mesh, params, tokens):
    if mesh is None:
        return forward(config, params, tokens, default_positions(tokens))[0]
    from mistral_jax import sharding

    with sharding.activations(config, mesh, tokens.shape[0]):
        out = forward(config, params, tokens, default_positions(tokens))[0]
    return sharding.constrain(out, mesh, ("batch", "length", "act_vocab"))


def _boxed_init(config: ModelConfig, rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(rng, tokens, default_positions(tokens))["params"]


def init_params(config: ModelConfig, rng):
    """Random parameters (a plain pytree of arrays in config.param_dtype)."""
    return nn.meta.unbox(jax.jit(_boxed_init, static_argnums=0)(config, rng))


def logical_axes(config: ModelConfig):
    """The logical axis names of every parameter, as a pytree of PartitionSpec (no memory used)."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: ModelConfig):
    """Shapes and dtypes of every parameter (jax.ShapeDtypeStruct pytree), without allocating."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))
