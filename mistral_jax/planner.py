"""Memory per device on an abstract mesh: params, optimizer state, KV cache and activations.

Everything is computed from the real sharding rules (`sharding.fit_spec`) on a
`jax.sharding.AbstractMesh` and from parameter shapes made by `jax.eval_shape`: no device, no memory,
so a TPU pod slice can be planned on a laptop.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from mistral_jax import sharding
from mistral_jax.config import DTYPES, ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import quant
from mistral_jax.model.attention import attention_kernel
from mistral_jax.model.flash_attention import BLOCK
from mistral_jax.model.transformer import logical_axes, param_shapes

GIB = 1024**3
# HBM per chip, GiB.
CHIPS = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "H100": 80}
# Share of a chip's memory a plan may use: XLA needs the rest for temporaries and fragmentation.
USABLE = 0.9


def abstract_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1) -> AbstractMesh:
    sizes = (data, fsdp, expert, tensor)
    return AbstractMesh(sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes))


def per_device_elements(shape, spec, mesh) -> int:
    """Elements of the largest shard of an array of `shape` split by `spec` over `mesh`."""
    count = 1
    for i, size in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        split = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        count *= -(-size // split)
    return count


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device of each part of a run; `fits` says which chips hold it (at 90% of HBM)."""

    preset: str
    mesh: dict
    total_params: int
    active_params: int
    params_bytes_per_device: int
    optimizer_bytes_per_device: int
    gradient_bytes_per_device: int
    reference_bytes_per_device: int  # DPO's frozen reference copy (full fine-tune); LoRA's reference is the base
    kv_cache_bytes_per_device: int
    activation_bytes_per_device: int
    seq_len: int
    attention: str  # the kernel over seq_len keys (attention.attention_kernel): "xla" keeps the scores
    kv_bytes_per_token: int  # K and V of one token over every layer, whole model, in the cache's dtype
    kv_bytes_per_sequence: int  # one row's cache at seq_len: each layer's window bounds its ring

    @property
    def total_bytes_per_device(self) -> int:
        return (self.params_bytes_per_device + self.optimizer_bytes_per_device + self.gradient_bytes_per_device
                + self.reference_bytes_per_device + self.kv_cache_bytes_per_device + self.activation_bytes_per_device)

    @property
    def fits(self) -> dict[str, bool]:
        return {chip: self.total_bytes_per_device <= USABLE * gib * GIB for chip, gib in CHIPS.items()}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes_per_device": self.total_bytes_per_device, "fits": self.fits}


def plan(config: ModelConfig, mesh_sizes: dict, *, preset: str = "", dtype: str = "bfloat16", batch: int = 1,
         seq_len: int = 4096, train: bool = False, lora_rank: int = 0, remat: bool = True, dpo: bool = False) -> Plan:
    """Memory per device of inference (params + KV cache + activations) or SFT (with `train`: float32
    master weights, AdamW moments and gradients, or LoRA adapters only with `lora_rank`).

    `dpo` (with `train`): `batch` counts pairs, 2 rows each; a full fine-tune also holds the reference model,
    a frozen float32 copy of the weights sharded like them (train/loop.py); with LoRA the reference is the
    base without the adapters, nothing more. The reference's forward keeps no activations for a backward.
    """
    if dpo and not train:
        raise UserError("a DPO plan is a training plan: pass train (--train) too")
    mesh = abstract_mesh(**mesh_sizes)
    shapes, names = _shapes_and_axes(config)
    specs = jax.tree.map(lambda s, n: sharding.fit_spec(s.shape, tuple(n), mesh), shapes, names)
    compute_bytes = np.dtype(DTYPES[dtype]).itemsize
    if train and config.quant != "none":
        raise UserError(f"training plans float weights; this config is quantized ({config.quant})")
    leaves = list(zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(specs, is_leaf=_is_spec),
                      strict=True))
    per_device = sum(per_device_elements(s.shape, spec, mesh) for (_, s), spec in leaves)
    stored_bytes = sum(per_device_elements(s.shape, spec, mesh) * _stored_itemsize(path, s.dtype, compute_bytes)
                       for (path, s), spec in leaves)
    counts = config.param_counts()  # of the float model: quantized weights' scales are not parameters

    optimizer = gradients = kv_cache = reference = 0
    if train and lora_rank:
        params_bytes = per_device * compute_bytes  # the frozen base
        adapters = _lora_elements_per_device(config, mesh, lora_rank)
        params_bytes += adapters * 4
        optimizer, gradients = 2 * adapters * 4, adapters * 4
    elif train:
        params_bytes = per_device * 4  # float32 master weights
        optimizer, gradients = 2 * per_device * 4, per_device * 4
        reference = per_device * 4 if dpo else 0
    else:
        params_bytes = stored_bytes
        cache_shape = (config.n_layers, batch, config.n_kv_heads, config.cache_size(seq_len), config.resolved_head_dim)
        cache_spec = sharding.fit_spec(cache_shape, sharding.CACHE_AXES["k"], mesh)
        kv_values = 2 * per_device_elements(cache_shape, cache_spec, mesh)
        kv_cache = round(kv_values * _kv_bytes_per_value(config, compute_bytes))
    kernel = attention_kernel(config, seq_len)
    rows = 2 * batch if dpo else batch
    activations = _activation_bytes(config, mesh, rows, seq_len, compute_bytes, train, remat, kernel != "xla")
    kv_per_token = round(2 * config.n_layers * config.n_kv_heads * config.resolved_head_dim
                         * _kv_bytes_per_value(config, compute_bytes))
    return Plan(preset, dict(mesh.shape), counts["total"], counts["active"], params_bytes, optimizer, gradients,
                reference, kv_cache, activations, seq_len, kernel, kv_per_token,
                kv_per_token * config.kv_slots(seq_len) // config.n_layers)


def _stored_itemsize(path, dtype, compute_bytes: int) -> int:
    """Bytes per element of a parameter held for inference: quantized weights' int8 values and float32 scales
    as stored (model/quant.py), every other weight in the compute dtype."""
    if np.dtype(dtype) == np.int8 or str(getattr(path[-1], "key", "")).endswith(quant.SCALE_SUFFIX):
        return np.dtype(dtype).itemsize
    return compute_bytes


def _kv_bytes_per_value(config: ModelConfig, compute_bytes: int) -> float:
    """Bytes per cached K or V value: the cache dtype, an int8 cache with its float32 scale per token and head."""
    if config.kv_cache_dtype == "int8":
        return 1 + 4 / config.resolved_head_dim
    return np.dtype(DTYPES[config.kv_cache_dtype]).itemsize if config.kv_cache_dtype else compute_bytes


@functools.lru_cache(maxsize=8)
def _shapes_and_axes(config: ModelConfig):
    """(param shapes, logical axes) of a config: traced once, not once per candidate mesh of `recommend`."""
    return param_shapes(config), logical_axes(config)


def _is_spec(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def _lora_elements_per_device(config: ModelConfig, mesh, rank: int) -> int:
    """A [in, r] and B [r, out] per attention projection and layer, split like the weight's in/out dims."""
    hd, d = config.resolved_head_dim, config.dim
    outs = (config.n_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd)
    per_layer = sum(rank * (d + out) for out in outs) + rank * (config.n_heads * hd + d)
    return config.n_layers * per_layer // max(1, mesh.shape["fsdp"])


def _activation_bytes(config: ModelConfig, mesh, batch: int, seq_len: int, nbytes: int, train: bool,
                      remat: bool, blockwise: bool) -> int:
    """An estimate (not a measurement) of live activations per device.

    Tokens are split over data*fsdp, heads and hidden units over tensor. Training keeps per layer what
    the backward pass needs (Korthikanti et al.'s ~34*dim + 5*heads*seq per token at 2 bytes, scaled to
    `nbytes`; a blockwise kernel (`blockwise`: flash, splash, cuDNN) keeps a float32 log-sum-exp per head
    instead of the scores, so memory is linear in seq), or only the layer inputs plus one layer's worth
    under remat, and float32 logits and their gradient. Inference holds one prefill chunk's largest
    intermediates: its scores against the cache, or one tile of them per head when blockwise.
    """
    rows = max(1, batch // (mesh.shape["data"] * mesh.shape["fsdp"]))
    tensor = mesh.shape["tensor"]
    heads = max(1, config.n_heads // tensor)
    vocab = -(-config.vocab_size // tensor)
    tokens = rows * seq_len
    if train:
        scores = 8 * heads if blockwise else 5 * heads * seq_len * nbytes // 2  # bytes per token
        per_layer = tokens * (34 * config.dim // tensor * nbytes // 2 + scores)
        kept = tokens * config.dim * nbytes * config.n_layers + per_layer if remat else per_layer * config.n_layers
        return kept + 2 * tokens * vocab * 4
    chunk = rows * min(seq_len, 512)
    keys = BLOCK if blockwise else config.cache_size(seq_len)
    scores = rows * heads * min(seq_len, 512) * keys * 4
    return chunk * (vocab * 4 + 3 * (-(-config.hidden_dim // tensor)) * nbytes) + scores


def candidate_meshes(config: ModelConfig, devices: int):
    """Every (data, fsdp, expert, tensor) over `devices` worth trying: expert divides the expert count,
    tensor divides the KV heads (at most 8), the rest goes to fsdp and data."""
    splits_experts = lambda e: e == 1 or (config.is_moe and config.n_experts % e == 0)  # noqa: E731
    experts = [e for e in range(1, devices + 1) if devices % e == 0 and splits_experts(e)]
    for expert in experts:
        for tensor in (t for t in range(1, min(8, devices // expert) + 1) if (devices // expert) % t == 0):
            if config.n_kv_heads % tensor:
                continue
            rest = devices // (expert * tensor)
            for data in (d for d in range(1, rest + 1) if rest % d == 0):
                yield {"data": data, "fsdp": rest // data, "expert": expert, "tensor": tensor}


def recommend(config: ModelConfig, devices: int, **plan_kwargs) -> Plan:
    """Among the plans within 5% of the least memory per device, the one that communicates least:
    for inference the most tensor and expert parallelism (weights stay put, each decode step moves only
    activations), for training the least tensor parallelism (fsdp gathers weights once per step)."""
    plans = [plan(config, mesh, **plan_kwargs) for mesh in candidate_meshes(config, devices)]
    least = min(p.total_bytes_per_device for p in plans)
    near = [p for p in plans if p.total_bytes_per_device <= 1.05 * least]
    if plan_kwargs.get("train"):
        return min(near, key=lambda p: (p.mesh["tensor"], -p.mesh["expert"], p.total_bytes_per_device))
    return min(near, key=lambda p: (-p.mesh["tensor"], -p.mesh["expert"], p.total_bytes_per_device))


def format_plan(p: Plan) -> str:
    """A short human-readable report."""
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    rows = [("params", p.params_bytes_per_device), ("optimizer state", p.optimizer_bytes_per_device),
            ("gradients", p.gradient_bytes_per_device), ("DPO reference copy", p.reference_bytes_per_device),
            ("KV cache", p.kv_cache_bytes_per_device),
            ("activations (estimate)", p.activation_bytes_per_device), ("total", p.total_bytes_per_device)]
    lines = [f"{p.preset or 'model'}: {p.total_params / 1e9:.2f}B parameters ({p.active_params / 1e9:.2f}B active) "
             f"on mesh {mesh}"]
    lines += [f"  {name:<24}{value / GIB:9.2f} GiB per device" for name, value in rows if value or name == "total"]
    lines.append(f"  at {p.seq_len} tokens: attention {p.attention!r}; KV cache {p.kv_bytes_per_token / 1024:.0f} KiB "
                 f"per token, {p.kv_bytes_per_sequence / GIB:.2f} GiB per sequence (whole model, before sharding)")
    lines.append("  fits: " + ", ".join(f"{chip} ({gib} GiB) {'yes' if ok else 'no'}"
                                        for (chip, gib), ok in zip(CHIPS.items(), p.fits.values())))
    return "\n".join(lines)
