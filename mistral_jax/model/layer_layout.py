"""Convert a model between the scanned and unscanned layer layouts (ModelConfig.scan_layers).

Scanned: params["layers"] leaves carry a leading [n_layers] axis. Unscanned: params["layers"] is
{"0": layer 0's subtree, "1": ...}. Everything else (embedding, final norm, head) is shared as is.
Checkpoint writers and training take the scanned layout; inference on CPU wants the unscanned one.
"""

from __future__ import annotations

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
    layers = {str(i): jax.tree.map(lambda parts: parts[i], stacked, is_leaf=lambda x: isinstance(x, tuple)) for i in range(n)}
    return config.replace(scan_layers=False), {**params, "layers": layers}


def stack_layers(config: ModelConfig, params):
    """(config with scan_layers=True, params stacked on a leading layers axis): the inverse."""
    if config.scan_layers:
        return config, params
    layers = [params["layers"][str(i)] for i in range(config.n_layers)]
    return config.replace(scan_layers=True), {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def _split_fn(sharding, n: int):
    if sharding is None or not hasattr(sharding, "spec"):
        return jax.jit(lambda a: tuple(a[i] for i in range(n)))
    part = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.jit(lambda a: tuple(a[i] for i in range(n)), out_shardings=(part,) * n)
