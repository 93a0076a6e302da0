"""The one place that names mesh axes: the logical-axis rules table, the mesh, and placement helpers.

Modules name logical axes only (`nn.with_logical_partitioning` on parameters, `nn.with_logical_constraint`
on activations). `RULES` maps those names onto the four mesh axes:

  data    pure data parallelism: batch rows, weights replicated
  fsdp    batch rows too, and the large non-split dimension of every big weight (ZeRO-3 style)
  expert  Mixtral's experts, one group of experts per slice
  tensor  Megatron-style: attention heads, MLP hidden units, vocabulary

A dimension that its mesh axes do not divide (2 KV heads over tensor=4, a batch of 1 over fsdp=8) is
replicated over the axes that do not fit instead of failing: `fit_spec` places parameters and the KV cache,
and resolves the model's activation hints (model/constraints.py) against each array's own shape at trace time.
This module reads the model's logical axes; the model never imports it.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import constraints, linear
from mistral_jax.model.transformer import logical_axes, param_shapes

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes, in the order they split the dimension. None: replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ("layers", None),  # the nn.scan axis: every device holds its share of every layer
    ("vocab", "tensor"),  # embedding rows and LM head columns
    ("embed", "fsdp"),  # the model dimension of every big weight
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),  # SwiGLU hidden units, dense or per expert
    ("expert", "expert"),
    ("norm", None),
    # Activations (and the KV cache).
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _fit(size: int, axes, mesh: Mesh, used=frozenset()):
    """The mesh axes of one rule that can split a dimension of `size`: None, one name or a tuple."""
    kept, split = [], 1
    for axis in _as_tuple(axes):
        if axis not in mesh.shape or axis in used or mesh.shape[axis] == 1:
            continue  # an axis of size 1 splits nothing: left out, as jit leaves it out of its outputs
        if size % (split * mesh.shape[axis]) == 0:
            kept.append(axis)
            split *= mesh.shape[axis]
    return None if not kept else kept[0] if len(kept) == 1 else tuple(kept)


def fit_spec(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules=RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

    Each dimension takes its rule's mesh axes in order, skipping an axis that an earlier dimension
    already uses, an axis of size 1, and an axis whose size (times the axes kept so far) does not
    divide the dimension: that part of the split falls back to replication rather than failing.
    """
    if len(shape) != len(names):
        raise ValueError(f"shape {tuple(shape)} and logical names {tuple(names)} differ in rank")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, names):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in the sharding table")
        axes = _fit(size, table.get(name), mesh, used)
        used.update(_as_tuple(axes))
        spec.append(axes)
    while spec and spec[-1] is None:  # the canonical form, as jit reports its outputs' shardings
        spec.pop()
    return PartitionSpec(*spec)


def named(mesh: Mesh, shape: Sequence[int], names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(shape, names, mesh))


# The mesh ------------------------------------------------------------------------------------------
def make_mesh(data: int = 1, fsdp: int | None = None, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "expert", "tensor") mesh over `devices` (default: every device of every process).

    fsdp=None takes whatever the other axes leave. The product must equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
            raise UserError(f"mesh axis {name} must be a positive integer, got {size!r}")
    if fsdp is None:
        others = data * expert * tensor
        if n % others:
            raise UserError(f"data*expert*tensor = {data}*{expert}*{tensor} = {others} does not divide the {n} devices")
        sizes["fsdp"] = n // others
    shape = tuple(int(sizes[a]) for a in MESH_AXES)
    if math.prod(shape) != n:
        described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
        raise UserError(f"mesh {described} has {math.prod(shape)} devices, but there are {n}")
    # Auto, not Explicit (jax.make_mesh's default): we give shardings ourselves, at jit boundaries and
    # with constraints, and let the compiler propagate the rest. Explicit axes would put shardings in
    # every array's type, so each einsum, gather and scan in the model would need them spelled out.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except Exception:  # noqa: BLE001 - a topology helper that cannot place these devices: plain order
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


_MESH_ITEM = re.compile(r"^\s*([A-Za-z_]+)\s*=\s*(-?\d+)\s*$")


def parse_mesh(text: str) -> dict[str, int]:
    """Parse a --mesh value: "data=1,fsdp=2,expert=2,tensor=2" -> {"data": 1, "fsdp": 2, ...}.

    Axes left out take make_mesh's defaults (fsdp fills the devices).
    """
    if not text or not text.strip():
        raise UserError(f"empty mesh; expected e.g. 'data=1,fsdp=2,expert=2,tensor=2' over axes {', '.join(MESH_AXES)}")
    out: dict[str, int] = {}
    for item in text.split(","):
        match = _MESH_ITEM.match(item)
        if not match:
            raise UserError(f"bad mesh item {item.strip()!r} in {text!r}; expected AXIS=SIZE, e.g. tensor=2")
        name, size = match.group(1), int(match.group(2))
        if name not in MESH_AXES:
            raise UserError(f"unknown mesh axis {name!r} in {text!r}; axes are {', '.join(MESH_AXES)}")
        if name in out:
            raise UserError(f"mesh axis {name!r} given twice in {text!r}")
        if size < 1:
            raise UserError(f"mesh axis {name} must be a positive integer, got {size}")
        out[name] = size
    return out


# Parameters ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _param_layout(config: ModelConfig):
    return param_shapes(config), logical_axes(config)


@functools.lru_cache(maxsize=64)
def param_shardings(config: ModelConfig, mesh: Mesh):
    """A pytree of NamedSharding, one per parameter, from its logical axes and `RULES`."""
    shapes, logical = _param_layout(config)
    return jax.tree.map(lambda s, names: named(mesh, s.shape, tuple(names)), shapes, logical)


def put(x, sharding: NamedSharding):
    """Place `x` (numpy, or a jax.Array) with `sharding`, each process building only its own shards.

    Works across hosts as long as every process holds the same value for `x`.
    """
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if not x.is_fully_addressable or sharding.is_fully_addressable:  # device to device
            return jax.device_put(x, sharding)
    x = np.asarray(x)  # to the host once: indexing a device array per shard would compile each slice
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index], dtype=x.dtype)


def abstract_arrays(shapes, shardings=None):
    """ShapeDtypeStructs of `shapes` (a pytree of arrays or structs) placed by `shardings` (a matching pytree),
    or on this process's first device without one: restore targets for orbax."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings)


def shard_params(config: ModelConfig, params, mesh: Mesh):
    """Place a parameter pytree (host numpy or jax arrays) on `mesh` following `RULES`."""
    shardings = param_shardings(config, mesh)
    shapes, _ = _param_layout(config)
    if jax.tree.structure(params) != jax.tree.structure(shapes):
        paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
        got, want = paths(params), paths(shapes)
        raise UserError(
            f"parameter tree does not match the {config.family} config: missing {sorted(want - got)}, "
            f"unexpected {sorted(got - want)}"
        )

    def place(path, x, spec, sharding):
        if tuple(x.shape) != tuple(spec.shape):
            raise UserError(f"parameter {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}, expected {spec.shape}")
        return put(x, sharding)

    return jax.tree_util.tree_map_with_path(place, params, shapes, shardings)


def ensure_params(config: ModelConfig, params, mesh: Mesh):
    """`params` if already placed by `shard_params` on this mesh, else placed now (a per-row adapter table they
    carry, model/linear.py, rides along as it is)."""
    params, lora = linear.split_lora(params)
    return linear.with_lora(_ensure_params(config, params, mesh), lora)


def _ensure_params(config: ModelConfig, params, mesh: Mesh):
    shardings = param_shardings(config, mesh)
    leaves, want = jax.tree.leaves(params), jax.tree.leaves(shardings)
    if len(leaves) == len(want) and all(
        isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, want)
    ):
        return params
    return shard_params(config, params, mesh)


# The KV cache --------------------------------------------------------------------------------------
CACHE_AXES = {  # a scanned model's cache (model/kv_cache.py)
    "k": ("layers", "batch", "kv_heads", None, "head_dim"),
    "v": ("layers", "batch", "kv_heads", None, "head_dim"),
    "k_scale": ("layers", "batch", "kv_heads", None, None),  # an int8 cache's scales: [..., size, 1]
    "v_scale": ("layers", "batch", "kv_heads", None, None),
    "pos": ("batch", None),
    "window_pos": ("batch", None),  # an unscanned cache whose window layers keep smaller rings
}


def cache_shardings(mesh: Mesh, cache) -> dict:
    """k, v split on batch over (data, fsdp) and on KV heads over tensor, where they divide; pos on batch.

    `cache` may hold arrays or ShapeDtypeStructs. An unscanned model's per-layer buffers [B*K, S, D] (rows
    batch-major) split on batch alone: a block of whole batch rows is a contiguous run of rows, a block of
    heads within them is not.
    """
    pos = named(mesh, cache["pos"].shape, CACHE_AXES["pos"])

    def kv(name):
        if isinstance(cache[name], (tuple, list)):
            rows = pos.spec[0] if len(pos.spec) else None
            return tuple(NamedSharding(mesh, PartitionSpec(rows, None, None)) for _ in cache[name])
        return named(mesh, cache[name].shape, CACHE_AXES[name])

    positions = {name: named(mesh, cache[name].shape, CACHE_AXES[name]) for name in ("pos", "window_pos")
                 if name in cache}
    return {**{name: kv(name) for name in cache if name not in positions}, **positions}


def constrain_cache(mesh: Mesh | None, cache):
    """Inside a traced function: the cache kept split as `cache_shardings` says; identity without a mesh."""
    return cache if mesh is None else constrain_tree(cache, cache_shardings(mesh, cache))


def place_cache(mesh: Mesh, cache):
    """A cache's arrays placed as `cache_shardings` says (kept where they already are)."""
    return jax.tree.map(put, cache, cache_shardings(mesh, cache))


def page_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """One layer's paged KV cache [num_pages, page_size, 2 * kv_heads, head_dim] (K and V interleaved by head,
    model/paged_attention.py) split over its KV heads as the activations' kv heads are; a head's K and V stay on
    one device (replicated where the tensor axis does not divide the heads)."""
    pages, size, heads2, dim = shape
    spec = fit_spec((pages, size, heads2 // 2, dim), (None, None, "act_kv_heads", None), mesh)
    return NamedSharding(mesh, spec)


# Activations ---------------------------------------------------------------------------------------
def activations(mesh: Mesh | None):
    """Inside a traced function: resolve the model's activation hints (`constraints.constrain`) on `mesh`.

    Each hint becomes a `with_sharding_constraint` fitted to that array's shape (`fit_spec`), so a dimension
    its mesh axes do not divide is replicated. Entered at trace time inside jit (the mesh is a static
    argument, part of what a compilation is keyed on); without a mesh the hints are no-ops.
    """
    if mesh is None:
        return constraints.resolving(None)
    return constraints.resolving(lambda x, names: jax.lax.with_sharding_constraint(x, named(mesh, x.shape, names)))


def constrain(x, mesh: Mesh | None, names: Sequence[str | None]):
    """`with_sharding_constraint` by logical names, fitted to x's shape; identity without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named(mesh, x.shape, names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_rows(mesh: Mesh | None, x):
    """A host array (or tree of them) whose first axis is the batch, as global arrays split over the batch axes
    (plain device arrays without a mesh)."""
    def one(x):
        if mesh is None:
            return jnp.asarray(x)
        x = x if isinstance(x, jax.Array) else np.asarray(x)
        return put(x, named(mesh, x.shape, ("batch",) + (None,) * (x.ndim - 1)))
    return jax.tree.map(one, x)


def put_replicated(mesh: Mesh | None, x):
    """A host value (or tree of them) as device arrays: replicated over the mesh, if any."""
    return jax.tree.map(lambda x: jnp.asarray(x) if mesh is None else put(np.asarray(x), replicated(mesh)), x)


def constrain_tree(tree, shardings: Mapping | None):
    if shardings is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, shardings)
