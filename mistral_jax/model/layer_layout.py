"""The two layer layouts of one model (ModelConfig.scan_layers, as MaxText's `scan_layers`), and converting.

Scanned (the default: training, sharding plans, checkpoints): every block's weights stacked on a leading
    [n_layers] axis of params["layers"] and run under nn.scan, so compile time does not grow with depth;
    the cache keeps one [layers, batch, kv_heads, size, head_dim] buffer per K and V.
Unscanned (inference): params["layers"] is {"0": layer 0's subtree, "1": ...}, run as an unrolled loop,
    with one cache buffer [batch * kv_heads, size, head_dim] per layer. A scanned decode step on XLA:CPU
    copies each layer's slice of every stacked weight, and the stacked cache, on every token; separate
    buffers are read, and a donated one updated, in place (benchmarks/RESULTS.md has the measurements).
    The rows of a layer's buffer stay merged (batch * kv_heads): XLA:CPU copies a whole buffer on every step
    where a dot reads it through a reshape.
Everything else (embedding, final norm, head) is shared as is. Checkpoint writers stack a model first, so
checkpoints stay in one layout; `load(..., scan_layers=False)` splits one as it loads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig


def unstack_layers(config: ModelConfig, params, *, donate: bool = False):
    """(config with scan_layers=False, params with one subtree per layer).

    Each layer's slice keeps the stacked leaf's sharding (minus the layer axis). donate=True deletes
    every stacked leaf once it is split, so the peak stays near one model plus one leaf.
    """
    if not config.scan_layers:
        return config, params
    n = config.n_layers

    def split(leaf):
        parts = _split_fn(leaf.sharding if isinstance(leaf, jax.Array) else None, n)(leaf)
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
        return parts

    stacked = jax.tree.map(split, params["layers"])  # every leaf -> tuple of n arrays
    is_parts = lambda x: isinstance(x, tuple)  # noqa: E731
    layers = {str(i): jax.tree.map(lambda parts, i=i: parts[i], stacked, is_leaf=is_parts) for i in range(n)}
    return config.replace(scan_layers=False), {**params, "layers": layers}


def stack_layers(config: ModelConfig, params):
    """(config with scan_layers=True, params stacked on a leading layers axis): the inverse."""
    if config.scan_layers:
        return config, params
    layers = [params["layers"][str(i)] for i in range(config.n_layers)]
    return config.replace(scan_layers=True), {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


@functools.lru_cache(maxsize=64)  # one program per (sharding, n): a fresh jit per leaf would compile per load
def _split_fn(sharding, n: int):
    if sharding is None or not hasattr(sharding, "spec"):
        return jax.jit(lambda a: tuple(a[i] for i in range(n)))
    part = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.jit(lambda a: tuple(a[i] for i in range(n)), out_shardings=(part,) * n)
