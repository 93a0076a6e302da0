"""The decoder: embed, the blocks, final norm and LM head; `forward` returns a named `Output`.

The blocks run in either layer layout (ModelConfig.scan_layers; layer_layout.py says what each is for).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.model import kv_cache, linear, quant
from mistral_jax.model.attention import Attention
from mistral_jax.model.constraints import constrain
from mistral_jax.model.flash_attention import NO_WINDOW
from mistral_jax.model.layers import RMSNorm, SwiGLU, param_init
from mistral_jax.model.moe import MoE, balance_loss, routing_totals
from mistral_jax.model.paged_attention import AttentionMetadata


@flax.struct.dataclass
class Output:
    """What `forward` returns (a pytree, so jitted functions may return it whole)."""

    logits: jax.Array  # float32 [B, T, V] ([B, 1, V] with last_only)
    cache: dict | None = None  # the updated cache, when one was given
    # a mixture of experts: "load_balancing_loss" and "routing" (moe.routing_totals, for accumulating it)
    aux: dict = dataclasses.field(default_factory=dict)
    hidden: jax.Array | None = None  # return_hidden: [n_layers + 1, B, T, D], the embeddings then each block's output


@flax.struct.dataclass
class BlockInputs:
    """What every block reads besides the residual stream (the same for all layers)."""

    positions: jax.Array  # int32 [B, T]; negative = padding
    segment_ids: jax.Array | None = None  # int32 [B, T]: packed examples never attend across segments
    cache_pos: jax.Array | None = None  # int32 [B, S]: the position in each cache slot before this call
    new_cache_pos: jax.Array | None = None  # int32 [B, S]: ... and after it
    # A cache whose sliding-window layers keep a smaller ring than the full ones (kv_cache.py, "window_pos"):
    window_cache_pos: jax.Array | None = None  # int32 [B, S_window]: the window ring's slot positions before
    window_new_cache_pos: jax.Array | None = None  # int32 [B, S_window]: ... and after this call
    cache_empty: bool = flax.struct.field(pytree_node=False, default=False)  # attend to the new tokens alone
    # a paged cache's metadata, or one per layer group (config.window_groups); then B = 1: a flat row of sequences'
    pages: AttentionMetadata | tuple[AttentionMetadata, ...] | None = None
    lora_scale: jax.Array | None = None  # float32 [N]: each adapter slot's scale (linear.LoraSlots)
    lora_index: jax.Array | None = None  # int32 [B] or [B, T]: each row's (token's) adapter slot, 0 = none


class Block(nn.Module):
    """Pre-norm residual block: attention, then a SwiGLU MLP or a mixture of experts."""

    config: ModelConfig
    keep_hidden: bool = False  # also return the output as a per-layer result (Output.hidden)
    window: int | None = None  # this layer's sliding window (config.layer_window)

    @nn.compact
    def __call__(self, x, layer_cache, inputs: BlockInputs, layer_lora=None, traced_window=None):
        """layer_lora: this layer's adapter factors (LoraSlots.weights' layer slice), when the batch carries any;
        traced_window: this layer's window as an int32 scalar, in a scanned stack whose layers differ."""
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.weights_dtype, name=name)  # noqa: E731
        attention = Attention(cfg, self.window, name="attention")
        lora = None if layer_lora is None else linear.LayerLora(layer_lora, inputs.lora_scale, inputs.lora_index)
        attn_out, new_layer_cache = attention(norm("attention_norm")(x), inputs, layer_cache, traced_window, lora)
        h = x + attn_out
        if cfg.is_moe:
            mlp_out, stats = MoE(cfg, name="moe")(norm("ffn_norm")(h), inputs.positions >= 0, lora)
        else:
            mlp = SwiGLU(cfg.hidden_dim, cfg.compute_dtype, cfg.weights_dtype, cfg.init_std, cfg, name="mlp")
            mlp_out, stats = mlp(norm("ffn_norm")(h), lora), None
        out = constrain(h + mlp_out, ("batch", "length", "act_embed"))
        return out, (new_layer_cache, stats, out if self.keep_hidden else None)


class LayerList(nn.Module):
    """The unscanned layout: blocks named "0" .. "n_layers - 1", each with its own weights and cache buffer.

    Same inputs and outputs as the scanned stack: caches {"k", "v", ...} hold tuples of per-layer buffers, and
    routing statistics and hidden states come back stacked on a leading layer axis.
    """

    config: ModelConfig
    block: type = Block
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, x, layer_caches, inputs: BlockInputs, lora_layers=None):
        """lora_layers: LoraSlots.weights["layers"] (a leading layer axis, or one subtree per layer as this layout
        keeps its weights: no slice per call), when the batch carries adapters."""
        new_buffers, results = [], []
        for i in range(self.config.n_layers):
            layer_cache = None if layer_caches is None else {n: b[i] for n, b in layer_caches.items()}
            block = self.block(self.config, self.keep_hidden, self.config.layer_window(i), name=str(i))
            layer_lora = linear.layer_weights(lora_layers, i)
            x, (new_layer_cache, *result) = block(x, layer_cache, inputs, layer_lora)
            new_buffers.append(new_layer_cache)
            results.append(result)
        new_caches = None
        if layer_caches is not None:
            new_caches = {n: tuple(layer[n] for layer in new_buffers) for n in layer_caches}
        stats, hidden = (None if r[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *r) for r in zip(*results))
        return x, (new_caches, stats, hidden)


class Transformer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids=None, cache=None, last_only=False, cache_empty=False,
                 return_hidden=False, pages=None, logit_index=None, lora=None) -> Output:
        """tokens, positions: int [B, T] -> Output; see `forward`."""
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.weights_dtype
        embedding = quant.weight(self, "embedding", ("vocab", "embed"), (cfg.vocab_size, cfg.dim), cfg,
                                 param_init(cfg.init_std))
        x = quant.take(embedding, tokens, dt)  # [B, T, D]
        x = constrain(x, ("batch", "length", "act_embed"))

        inputs, layer_caches = BlockInputs(positions, segment_ids, cache_empty=cache_empty), None
        lora_layers = None
        if lora is not None:  # adapters ride along: every block reads its layer's factors and the rows' slots
            inputs = inputs.replace(lora_scale=lora.scale, lora_index=lora.index)
            lora_layers = lora.weights["layers"]
        if pages is not None:  # a paged cache {"kv": per-layer pages}: no ring positions to advance
            inputs, layer_caches = inputs.replace(pages=pages), dict(cache)
        elif cache is not None:
            new_pos = kv_cache.advance_positions(cache["pos"], positions)
            inputs = inputs.replace(cache_pos=cache["pos"], new_cache_pos=new_pos)
            if "window_pos" in cache:
                inputs = inputs.replace(window_cache_pos=cache["window_pos"],
                                        window_new_cache_pos=kv_cache.advance_positions(cache["window_pos"], positions))
            layer_caches = {name: cache[name] for name in kv_cache.buffer_names(cache)}

        embedded, block = x, Block
        if cfg.remat:
            block = nn.remat(Block, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        if cfg.scan_layers:
            # Layers that differ in window (layer_types) share one program: each gets its window as a scanned
            # int32, and every layer's ring holds the whole context (the unscanned layout sizes them apart).
            windows = ()
            if cfg.mixed_windows:
                windows = (jnp.array([NO_WINDOW if w is None else w for w in cfg.layer_windows], jnp.int32),)
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, 0, *(0 for _ in windows)),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            window = None if cfg.mixed_windows else cfg.sliding_window
            x, (new_layer_caches, stats, hidden) = blocks(cfg, return_hidden, window, name="layers")(
                x, layer_caches, inputs, lora_layers, *windows)
        else:
            x, (new_layer_caches, stats, hidden) = LayerList(cfg, block, return_hidden, name="layers")(
                x, layer_caches, inputs, lora_layers)
        if return_hidden:
            hidden = jnp.concatenate([embedded[None], hidden], axis=0)  # [L + 1, B, T, D]

        if last_only:
            x = x[:, -1:]
        elif logit_index is not None:  # only the columns that are sampled from reach the LM head
            x = jnp.take(x, logit_index, axis=1)
        x = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x)
        if cfg.tie_embeddings:  # the [V, D] table read as it is stored: `embedding.T` costs XLA:CPU a copy per call
            logits = linear.einsum("btd,vd->btv", x, embedding, cfg, preferred_element_type=jnp.float32)
        else:
            head = quant.weight(self, "lm_head", ("embed", "vocab"), (cfg.dim, cfg.vocab_size), cfg,
                                param_init(cfg.init_std))
            logits = linear.einsum("btd,dv->btv", x, head, cfg, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "act_vocab"))

        new_cache = None
        if pages is not None:
            new_cache = new_layer_caches
        elif cache is not None:
            new_cache = {**new_layer_caches, "pos": inputs.new_cache_pos}
            if "window_pos" in cache:
                new_cache["window_pos"] = inputs.window_new_cache_pos
        aux = {}
        if cfg.is_moe:
            routing = routing_totals(stats)
            aux = {"load_balancing_loss": balance_loss(routing, cfg.n_experts), "routing": routing}
        return Output(logits, new_cache, aux, hidden)


def forward(config: ModelConfig, params, tokens, positions, segment_ids=None, cache=None, *, last_only=False,
            cache_empty=False, return_hidden=False, pages: AttentionMetadata | tuple | None = None,
            logit_index=None) -> Output:
    """The pure forward pass: tokens, positions int [B, T] -> Output(logits, cache, aux, hidden).

    cache: a cache (kv_cache.py) the tokens are written to; Output.cache is the updated one. Without a
    cache, attention skips the blocks above the diagonal: positions must not decrease along a segment (true
    of prompts, padded or packed rows). last_only: logits for the last column only ([B, 1, V]), as prefill
    needs. cache_empty: the cache holds nothing yet, so attention reads the tokens alone (they are still
    written to it). return_hidden: Output.hidden holds the residual stream after every layer. pages: the
    cache is paged ({"kv": per-layer pages}, model/paged_attention.py; one metadata, or one per layer group where
    layer windows differ) and tokens [1, N] is a flat row of several sequences' tokens. logit_index: int32 [S], the
    columns whose logits are returned ([B, S, V]). params may carry the batch's adapters (linear.with_lora: a
    LoraSlots, each row's own adapter added to the adapted matmuls).
    """
    params, lora = linear.split_lora(params)
    return Transformer(config).apply({"params": params}, tokens, positions, segment_ids, cache, last_only,
                                     cache_empty, return_hidden, pages, logit_index, lora)


def default_positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)


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
