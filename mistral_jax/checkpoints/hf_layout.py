"""The map between transformers' tensor names/layout and our parameter pytree, both ways.

Every checkpoint reader hands us tensors named and laid out as transformers' Llama / Mistral / Mixtral
(`model.layers.3.self_attn.q_proj.weight`, [out, in]); this file is the only place that knows both.
Our layout: linear weights are [in, out] with heads split out ([dim, heads, head_dim]), every block's
weights stacked on a leading layer axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from mistral_jax.checkpoints.errors import CheckpointError
from mistral_jax.config import DTYPES, ModelConfig
from mistral_jax.model.transformer import param_shapes

# Tensors some checkpoints carry that hold nothing we need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter of ours and the transformers tensor(s) it comes from.

    names(layer) lists the HF tensors (layer is None for unstacked leaves); hf_shape(shape) is the shape
    each must have for our per-layer `shape`; to_ours(tensors, shape) builds our per-layer array;
    to_hf(array) gives the HF tensors back (None: this layout is read, not written).
    """

    path: tuple[str, ...]
    names: Callable[[int | None], list[str]]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_ours: Callable[[list[np.ndarray], tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]] | None
    per_layer: bool = True


def _linear(path, name, n_in_axes=1):
    """HF Linear weight [out, in] <-> ours [*in_axes, *out_axes]."""
    return Leaf(
        path,
        lambda i: [name.format(i=i)],
        lambda shape: (math.prod(shape[n_in_axes:]), math.prod(shape[:n_in_axes])),
        lambda ts, shape: ts[0].T.reshape(shape),
        lambda a: [a.reshape(math.prod(a.shape[:n_in_axes]), -1).T],
        per_layer="{i}" in name,
    )


def _same(path, name):
    return Leaf(path, lambda i: [name.format(i=i)], tuple, lambda ts, shape: ts[0], lambda a: [a],
                per_layer="{i}" in name)


def _experts_classic(path, w, n_experts):
    """block_sparse_moe.experts.E.wN.weight [out, in] each <-> ours [experts, in, out]."""
    name = "model.layers.{i}.block_sparse_moe.experts.{e}." + w + ".weight"
    return Leaf(
        path,
        lambda i: [name.format(i=i, e=e) for e in range(n_experts)],
        lambda shape: (shape[2], shape[1]),
        lambda ts, shape: np.stack([t.T for t in ts]),
        lambda a: [a[e].T for e in range(n_experts)],
    )


def _experts_fused(path, part):
    """transformers >= 5: mlp.experts.gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""
    if part == "down":
        names = lambda i: [f"model.layers.{i}.mlp.experts.down_proj"]  # noqa: E731
        return Leaf(path, names, lambda s: (s[0], s[2], s[1]), lambda ts, shape: ts[0].transpose(0, 2, 1), None)

    def to_ours(ts, shape):
        f = shape[2]
        rows = ts[0][:, :f] if part == "gate" else ts[0][:, f:]
        return rows.transpose(0, 2, 1)

    names = lambda i: [f"model.layers.{i}.mlp.experts.gate_up_proj"]  # noqa: E731
    return Leaf(path, names, lambda s: (s[0], 2 * s[2], s[1]), to_ours, None)


def layout(config: ModelConfig, fused_experts: bool = False) -> list[Leaf]:
    """The leaves of `config`'s parameter tree, each tied to its transformers tensors."""
    layer = "model.layers.{i}."
    leaves = [
        _same(("embedding",), "model.embed_tokens.weight"),
        _same(("final_norm", "scale"), "model.norm.weight"),
        _same(("layers", "attention_norm", "scale"), layer + "input_layernorm.weight"),
        _same(("layers", "ffn_norm", "scale"), layer + "post_attention_layernorm.weight"),
        _linear(("layers", "attention", "wq"), layer + "self_attn.q_proj.weight"),
        _linear(("layers", "attention", "wk"), layer + "self_attn.k_proj.weight"),
        _linear(("layers", "attention", "wv"), layer + "self_attn.v_proj.weight"),
        _linear(("layers", "attention", "wo"), layer + "self_attn.o_proj.weight", n_in_axes=2),
    ]
    if not config.tie_embeddings:
        leaves.append(_linear(("lm_head",), "lm_head.weight"))
    if not config.is_moe:
        leaves += [
            _linear(("layers", "mlp", "w_gate"), layer + "mlp.gate_proj.weight"),
            _linear(("layers", "mlp", "w_up"), layer + "mlp.up_proj.weight"),
            _linear(("layers", "mlp", "w_down"), layer + "mlp.down_proj.weight"),
        ]
    elif fused_experts:
        leaves += [
            _linear(("layers", "moe", "router"), layer + "mlp.gate.weight"),
            _experts_fused(("layers", "moe", "w_gate"), "gate"),
            _experts_fused(("layers", "moe", "w_up"), "up"),
            _experts_fused(("layers", "moe", "w_down"), "down"),
        ]
    else:
        leaves += [
            _linear(("layers", "moe", "router"), layer + "block_sparse_moe.gate.weight"),
            _experts_classic(("layers", "moe", "w_gate"), "w1", config.n_experts),
            _experts_classic(("layers", "moe", "w_up"), "w3", config.n_experts),
            _experts_classic(("layers", "moe", "w_down"), "w2", config.n_experts),
        ]
    return leaves


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows [heads * head_dim, in] from the reference's interleaved RoPE pairs (2i, 2i+1), as Mistral's
    consolidated files and llama.cpp store them, to transformers' half-split pairs (i, i + head_dim/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def has_fused_experts(names) -> bool:
    return any(n.endswith(".mlp.experts.gate_up_proj") for n in names)


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def leaf_arrays(config: ModelConfig, tensors: Mapping[str, np.ndarray], leaf: Leaf, shape, dtype, source: str):
    """Our array for one leaf (stacked over layers where it is per-layer), checked against `shape`."""

    def one(i, target_shape):
        names = leaf.names(i)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CheckpointError(f"{source}: missing tensor {missing[0]!r} (needed for {'/'.join(leaf.path)})")
        raw = [tensors[n] for n in names]
        expected = leaf.hf_shape(tuple(target_shape))
        for name, tensor in zip(names, raw):
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{source}: shape mismatch for tensor {name!r}: got {tuple(tensor.shape)}, "
                                      f"the config expects {expected}")
        return leaf.to_ours(raw, target_shape).astype(dtype, copy=False)

    if leaf.per_layer:
        return np.stack([one(i, shape[1:]) for i in range(config.n_layers)])
    return one(None, shape)


def to_params(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype: str = "float32",
              source: str = "checkpoint", place: Callable[[tuple[str, ...], np.ndarray], object] | None = None):
    """Our parameter pytree from transformers-named tensors, built one leaf at a time.

    `place(path, array)` turns each finished host array into what the tree holds (a device array with
    its sharding, say) before the next leaf is read, so host memory holds one leaf, never the model
    twice; without it the tree holds numpy arrays of `dtype`. Raises CheckpointError for a missing
    tensor, an unexpected one, or a shape that does not fit, before reading any weights.
    """
    np_dtype = np.dtype(DTYPES[dtype])
    shapes = param_shapes(config)
    leaves = layout(config, fused_experts=has_fused_experts(tensors))
    used = {name for leaf in leaves for i in (range(config.n_layers) if leaf.per_layer else [None])
            for name in leaf.names(i)}
    extra = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if config.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(f"{source}: unexpected tensor(s) {extra[:5]}{more}: does the config match the weights?")
    params: dict = {}
    for leaf in tqdm(leaves, desc="loading", unit="tensor", leave=False, disable=None):
        array = leaf_arrays(config, tensors, leaf, get_path(shapes, leaf.path).shape, np_dtype, source)
        _set(params, leaf.path, place(leaf.path, array) if place else array)
        del array
    return params


def iter_hf_tensors(config: ModelConfig, params):
    """(transformers name, numpy array) pairs from our parameters, one leaf on the host at a time
    (classic per-expert layout for Mixtral)."""
    for leaf in layout(config, fused_experts=False):
        array = np.asarray(jax.device_get(get_path(params, leaf.path)))
        for i in range(config.n_layers) if leaf.per_layer else [None]:
            per_layer = array[i] if leaf.per_layer else array
            for name, tensor in zip(leaf.names(i), leaf.to_hf(per_layer)):
                yield name, np.ascontiguousarray(tensor)


def from_params(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """transformers-named tensors from our parameters."""
    return dict(iter_hf_tensors(config, params))
