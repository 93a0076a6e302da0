"""LoRA: low-rank adapters on the stacked attention and MLP weights, merged functionally before the forward.

A target weight W [lead..., in..., out...] (lead = layers, or layers and experts) gets A [lead..., in..., r]
and B [lead..., r, out...], B zero so training starts from the base model; the model runs on
W + (alpha / r) * A @ B, and only A and B are trained. Adapters are a nested dict mirroring the params,
each target leaf replaced by {"a", "b"}; an `Adapter` is such a tree with its scale, as read from a run or a
PEFT directory (checkpoints/load.py's load_adapter). Pure math plus where the adapters live on a mesh; the SFT
program (train/) trains them, `mistral_jax.checkpoints.load` merges them into a base model.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mistral_jax.errors import UserError

# Target name -> (its module in the params tree, number of input dims, number of output dims).
TARGETS = {
    "wq": (("attention",), 1, 2),  # [L, D, H, hd]
    "wk": (("attention",), 1, 2),  # [L, D, K, hd]
    "wv": (("attention",), 1, 2),
    "wo": (("attention",), 2, 1),  # [L, H, hd, D]
    "w_gate": (("mlp", "moe"), 1, 1),  # [L, D, F] or [L, E, D, F]
    "w_up": (("mlp", "moe"), 1, 1),
    "w_down": (("mlp", "moe"), 1, 1),  # [L, F, D] or [L, E, F, D]
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and target weights of the adapters; the update is scaled by alpha / rank."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(f"unknown LoRA targets {unknown}; choose from {', '.join(TARGETS)}")
        if self.rank < 1:
            raise UserError(f"LoRA rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """'wq,wk,wv,wo' -> ("wq", "wk", "wv", "wo")."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _targets(params, spec: LoraSpec) -> list[tuple[str, str]]:
    """(module, name) of each target in `params` (any pytree with the params' layout)."""
    layers = params["layers"]
    found = []
    for name in spec.targets:
        module = next((m for m in TARGETS[name][0] if name in layers.get(m, {})), None)
        if module is None:
            raise UserError(f"LoRA target {name} is not a weight of this model")
        found.append((module, name))
    return found


def init(params, spec: LoraSpec, rng):
    """Fresh adapters for `params` (arrays or ShapeDtypeStructs): A ~ N(0, 1/fan_in), B = 0, float32."""
    adapters: dict = {}
    for module, name in _targets(params, spec):
        shape = params["layers"][module][name].shape  # [lead..., in..., out...]
        _, n_in, n_out = TARGETS[name]
        lead = len(shape) - n_in - n_out
        in_shape = shape[lead: lead + n_in]
        rng, key = jax.random.split(rng)
        a = jax.random.normal(key, (*shape[:lead], *in_shape, spec.rank), jnp.float32)
        adapters.setdefault(module, {})[name] = {
            "a": a / math.sqrt(math.prod(in_shape)),
            "b": jnp.zeros((*shape[:lead], spec.rank, *shape[lead + n_in:]), jnp.float32),
        }
    return {"layers": adapters}


def delta(a, b, n_in: int):
    """A @ B over the rank: a [lead..., in..., r], b [lead..., r, out...] -> [lead..., in..., out...]."""
    lead = a.ndim - 1 - n_in
    lead_shape, in_shape, out_shape = a.shape[:lead], a.shape[lead:-1], b.shape[lead + 1:]
    a2 = a.reshape(*lead_shape, math.prod(in_shape), a.shape[-1])  # [lead..., IN, r]
    b2 = b.reshape(*lead_shape, b.shape[lead], math.prod(out_shape))  # [lead..., r, OUT]
    return jnp.matmul(a2, b2).reshape(*lead_shape, *in_shape, *out_shape)


def merge(params, adapters, scale: float):
    """params with W + scale * A @ B for every adapted weight (a new tree holding new arrays for the adapted
    weights only; params itself is untouched). The params may be scanned or unscanned (model/layer_layout.py)."""
    layers = params["layers"]
    if "0" in layers:  # unscanned: one subtree per layer, the adapters' leading axis split to match
        return {**params, "layers": {i: _merge_layer(layer, adapters["layers"], scale, int(i))
                                     for i, layer in layers.items()}}
    return {**params, "layers": _merge_layer(layers, adapters["layers"], scale, None)}


def _merge_layer(layers, adapters, scale: float, index: int | None):
    layers = dict(layers)
    for module, weights in adapters.items():
        layers[module] = dict(layers[module])
        for name, ab in weights.items():
            w = layers[module][name]
            a, b = (ab["a"], ab["b"]) if index is None else (ab["a"][index], ab["b"][index])
            layers[module][name] = (w + scale * delta(a, b, TARGETS[name][1])).astype(w.dtype)
    return layers


@flax.struct.dataclass
class Adapter:
    """One loaded LoRA adapter (a pytree: its weights are the leaves): the model runs on W + scale * A @ B for
    every weight in `weights`."""

    weights: dict  # {"layers": {module: {name: {"a": [L, (E,) in..., r], "b": [L, (E,) r, out...]}}}}, float32
    scale: float = flax.struct.field(pytree_node=False)
    source: str = flax.struct.field(pytree_node=False, default="adapter")  # where it came from, for messages

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name for weights in self.weights["layers"].values() for name in weights)

    @property
    def rank(self) -> int:
        return max(ab["a"].shape[-1] for weights in self.weights["layers"].values() for ab in weights.values())

    def check_fits(self, config) -> None:
        """A UserError (one line, naming the weight and both shapes) unless every factor fits `config`'s model."""
        from mistral_jax.model.transformer import param_shapes

        layers = param_shapes(config.replace(scan_layers=True))["layers"]  # adapters: stacked on a layer axis
        for module, weights in self.weights["layers"].items():
            for name, ab in weights.items():
                if name not in layers.get(module, {}):
                    raise UserError(f"{self.source}: adapts {module}/{name}, which this {config.family} model lacks")
                shape = layers[module][name].shape  # [L, (E,) in..., out...]
                _, n_in, n_out = TARGETS[name]
                lead, rank = len(shape) - n_in - n_out, ab["a"].shape[-1]
                want_a, want_b = (*shape[: lead + n_in], rank), (*shape[:lead], rank, *shape[lead + n_in:])
                if tuple(ab["a"].shape) != want_a or tuple(ab["b"].shape) != want_b:
                    raise UserError(f"{self.source}: its {name} factors are A {list(ab['a'].shape)}, B "
                                    f"{list(ab['b'].shape)}; this base's {name} {list(shape)} needs A {list(want_a)}, "
                                    f"B {list(want_b)}")


def apply(config, params, adapter: Adapter):
    """params with `adapter` merged (only the adapted weights are new arrays): how generate runs one adapter."""
    if config.quant != "none":
        raise UserError(f"an adapter merges into float weights; these are quantized ({config.quant}): merge it into "
                        "the float model (mj.load(base, adapter=..., quantize=...) quantizes after merging)")
    adapter.check_fits(config)
    return merge(params, adapter.weights, adapter.scale)


def logical_axes(param_axes, adapters):
    """PartitionSpecs of logical names for the adapters, from the base weights' (`model.logical_axes`).

    A keeps W's lead and input names, B its lead and output names; the rank dimension is never split.
    """
    out: dict = {}
    for module, weights in adapters["layers"].items():
        for name in weights:
            names = tuple(param_axes["layers"][module][name])  # [lead..., in..., out...]
            _, n_in, n_out = TARGETS[name]
            lead = len(names) - n_in - n_out
            out.setdefault(module, {})[name] = {
                "a": PartitionSpec(*names[: lead + n_in], None),
                "b": PartitionSpec(*names[:lead], None, *names[lead + n_in:]),
            }
    return {"layers": out}


def shardings(config, mesh, adapters):
    """A NamedSharding for every adapter leaf (`adapters`: arrays or ShapeDtypeStructs) on `mesh`, from the base
    weights' logical names: how the trainer places them and how a run's checkpoint restores them."""
    from mistral_jax import sharding
    from mistral_jax.model.transformer import logical_axes as param_logical_axes

    axes = logical_axes(param_logical_axes(config), adapters)
    return jax.tree.map(lambda x, names: sharding.named(mesh, x.shape, tuple(names)), adapters, axes)


def serving_targets(config) -> tuple[str, ...]:
    """The targets a per-row adapter table covers for `config`'s model: every attention and MLP weight, a mixture
    of experts' stacked expert weights included (model/linear.py's ExpertLora)."""
    return tuple(TARGETS)


def slot_shapes(config, targets, slots: int, rank: int, dtype) -> dict:
    """ShapeDtypeStructs of a per-row adapter table (linear.LoraSlots.weights): `slots` slots of rank `rank` for
    each target, the layer axis leading: A [L, N, (E,) in..., R], B [L, N, (E,) R, out...] (E: a mixture of
    experts' expert axis)."""
    from mistral_jax.model.transformer import param_shapes

    layers = param_shapes(config.replace(scan_layers=True))["layers"]
    out: dict = {}
    for module, name in _targets({"layers": layers}, LoraSpec(rank, rank, tuple(targets))):
        shape = layers[module][name].shape  # [L, (E,) in..., out...]
        _, n_in, n_out = TARGETS[name]
        lead = len(shape) - n_in - n_out
        out.setdefault(module, {})[name] = {
            "a": jax.ShapeDtypeStruct((shape[0], slots, *shape[1: lead + n_in], rank), dtype),
            "b": jax.ShapeDtypeStruct((shape[0], slots, *shape[1:lead], rank, *shape[lead + n_in:]), dtype),
        }
    return {"layers": out}


def slot_weights(adapter: Adapter, shapes: dict) -> dict:
    """One adapter's factors in one slot of a table shaped `shapes` (slot_shapes, any slot count): A [L, (E,) in...,
    R], B [L, (E,) R, out...] in the table's dtype, lower ranks zero-padded, targets it lacks all zeros (a UserError if
    it adapts a weight the table lacks or its rank is above the table's). Host (numpy) arrays: padding any rank
    compiles nothing."""
    layers = shapes["layers"]
    for module, weights in adapter.weights["layers"].items():
        for name in weights:
            if name not in layers.get(module, {}):
                raise UserError(f"{adapter.source}: adapts {module}/{name}, which per-row adapters do not cover here "
                                f"(covered: {', '.join(n for m in layers.values() for n in m)})")
    table_rank = next(iter(next(iter(layers.values())).values()))["a"].shape[-1]
    if adapter.rank > table_rank:
        raise UserError(f"{adapter.source}: its rank r={adapter.rank} is above max_lora_rank={table_rank}")
    out: dict = {}
    for module, weights in layers.items():
        for name, ab in weights.items():
            a_shape = ab["a"].shape[:1] + ab["a"].shape[2:]
            b_shape = ab["b"].shape[:1] + ab["b"].shape[2:]
            got = adapter.weights["layers"].get(module, {}).get(name)
            if got is None:
                a, b = np.zeros(a_shape, ab["a"].dtype), np.zeros(b_shape, ab["b"].dtype)
            else:
                pad, lead = table_rank - got["a"].shape[-1], got["a"].ndim - 1 - TARGETS[name][1]  # lead: L, (E)
                a = np.pad(np.asarray(got["a"]), [(0, 0)] * (got["a"].ndim - 1) + [(0, pad)])
                b = np.pad(np.asarray(got["b"]), [(0, 0)] * lead + [(0, pad)] + [(0, 0)] * (got["b"].ndim - lead - 1))
                a, b = a.astype(ab["a"].dtype), b.astype(ab["b"].dtype)
            out.setdefault(module, {})[name] = {"a": a, "b": b}
    return {"layers": out}


def stack_slots(config, adapters, rank: int | None = None, dtype=None):
    """(weights, scale) of a per-row table holding `adapters` in slots 1.. (slot 0 empty): linear.LoraSlots'
    first two fields. rank: the table's (default the largest adapter's); targets: those the adapters adapt."""
    rank = rank or max(a.rank for a in adapters)
    targets = tuple(dict.fromkeys(t for a in adapters for t in a.targets))
    shapes = slot_shapes(config, targets, len(adapters) + 1, rank, dtype or config.compute_dtype)
    per_slot = [slot_weights(a, shapes) for a in adapters]
    weights = jax.tree.map(lambda s, *ws: jnp.stack([jnp.zeros(s.shape[:1] + s.shape[2:], s.dtype), *ws], axis=1),
                           shapes, *per_slot)
    scale = jnp.asarray([0.0] + [a.scale for a in adapters], jnp.float32)
    return weights, scale
