"""The one matmul of the model: float or int8 weights (model/quant.py), plus each row's LoRA update.

Every dense projection (attention, MLP, LM head) runs `einsum`; a mixture of experts takes its expert weights
from `expert_weights`. When the batch carries adapters (`LoraSlots`, a pytree: many adapters stacked on a slot
axis, each row choosing one by index, as BGMV does), a target weight's output gains
`scale[i] * (x @ A[i]) @ B[i]` for the row's slot i; an expert weight's (`ExpertLora`, for the rows the mixture
sorted by expert) `scale[i] * (x @ A[i, e]) @ B[i, e]`, e the row's expert. Slot 0 is the empty slot (zeros): its
rows get exactly the base model's outputs. Adapters of lower rank sit zero-padded to the table's rank. Without a
LoraSlots the program is the plain one (a static switch: its absence is the pytree's structure).

quant_matmul (ModelConfig, resolved per backend as the attention kernel is):
  int8_dot: activations quantized on the fly (a scale per row and tile of ACTIVATION_TILE contracted values),
            int8 x int8 -> int32 dots, then both scales; at least two rows (XLA:CPU runs a one-row int8 dot ~10x
            slower than two: RESULTS.md, int8);
  dequant:  weight-only: the weight converted to the compute dtype before the dot, which XLA:GPU/TPU fuse
            into the matmul (XLA:CPU does not: it reads the float copy);
  auto:     int8_dot on CPU for up to INT8_DOT_MAX_ROWS rows (decode), dequant for more and on other backends
            (`lax.platform_dependent`: only the chosen one compiles).
The int8 dot is ours: qwix.einsum's int8 x int8 path scales activations per row only (+5.2% SmolLM2
perplexity, measured), and its sub-channel path refuses tiles under 128 (it dequantizes both operands instead),
which does not divide SmolLM2's 576.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model.quant import absmax_int8, dequantize, is_quantized

MIN_INT8_ROWS = 2
# Activation scales per row and per tile of this many contracted values: per row alone, SmolLM2's activation
# outliers cost +5% perplexity; tiles of 64 cost none (RESULTS.md, int8).
ACTIVATION_TILE = 64
# auto on CPU: at most this many rows (decode) take the int8 dots; more (prefill, eval) are compute-bound, and
# the dequantized weight's float copy is read once for them all.
INT8_DOT_MAX_ROWS = 64
# Where a params tree carries its batch's adapters (decoding and serving pass them with the weights, so every
# program that takes params takes them, and one without them compiles the plain path).
LORA_KEY = "lora"


@flax.struct.dataclass
class LoraSlots:
    """The adapters a batch may use, stacked on a slot axis (slot 0: none), and each row's slot."""

    # {"layers": {module: {name: {"a": [L, N, in..., R], "b": [L, N, R, out...]}}}}, the compute dtype; N slots,
    # R the largest rank (lower ranks zero-padded); slot 0 all zeros. The unscanned layout may keep one subtree
    # per layer instead ({"layers": {"0": {module: ...}}}, `unstack`), each [N, ...]: no slice per step.
    weights: dict
    scale: jax.Array  # float32 [N]: alpha / r (or alpha / sqrt(r), rsLoRA) of each slot's adapter; slot 0: 0
    index: jax.Array  # int32 [B] (each row's slot) or [B, T] (each token's: the paged engine's flat row)


@flax.struct.dataclass
class LayerLora:
    """One layer's share of a LoraSlots, as a block's modules read it."""

    weights: dict  # {module: {name: {"a": [N, in..., R], "b": [N, R, out...]}}}
    scale: jax.Array  # float32 [N]
    index: jax.Array  # int32 [B] or [B, T]

    def factors(self, module: str, name: str):
        """(a, b) of target `module`/`name`, or None when no adapter in the table adapts it."""
        ab = self.weights.get(module, {}).get(name)
        return None if ab is None else (ab["a"], ab["b"])


def split_lora(params):
    """(params without the adapters, LoraSlots or None)."""
    if isinstance(params, dict) and LORA_KEY in params:
        return {k: v for k, v in params.items() if k != LORA_KEY}, params[LORA_KEY]
    return params, None


def with_lora(params, lora: LoraSlots | None):
    """params carrying `lora` (None: params as given)."""
    return params if lora is None else {**params, LORA_KEY: lora}


def layer_weights(layers: dict | None, i: int):
    """Layer i's factors from LoraSlots.weights["layers"]: its own subtree (the unscanned layout, `unstack`) or a
    slice of the stacked arrays."""
    if layers is None:
        return None
    if str(i) in layers:
        return layers[str(i)]
    return jax.tree.map(lambda w: w[i], layers)


def unstack(weights: dict) -> dict:
    """LoraSlots.weights with the layer axis split into one subtree per layer ({"layers": {"0": ..., ...}}), as
    the unscanned layout keeps its weights: each block reads its own arrays, no slice of the table per step."""
    layers = weights["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return {"layers": {str(i): jax.tree.map(lambda w, i=i: w[i], layers) for i in range(n)}}


def einsum(spec: str, x, w, config: ModelConfig, preferred_element_type=None, lora=None):
    """jnp.einsum(spec, x, w) with x [B, T, ...] in the compute dtype and w a float or quantized weight, plus
    each row's low-rank update when `lora` = (LayerLora, module, name) names an adapted target.

    Every spec here contracts all of x's axes after (B, T), and its output is (B, T) then w's free axes in order.
    """
    dt = config.compute_dtype
    x = x.astype(dt)
    y = _base(spec, x, w, config, preferred_element_type)
    if lora is None:
        return y
    slots, module, name = lora
    if slots is None or slots.factors(module, name) is None:
        return y
    a, b = slots.factors(module, name)
    return y + update(x, a, b, slots.scale, slots.index).astype(y.dtype)


def update(x, a, b, scale, index):
    """scale[i] * (x @ A[i]) @ B[i] per row (index [B]) or per token (index [B, T]). With more slots than rows,
    each row's factors are gathered (BGMV); otherwise every slot's shrink is computed, masked to the row's (token's)
    slot, then one expand over all slots' ranks: it reads each slot's factors once, where a gather copies them per
    row (decode of a full batch: fewer bytes).

    x [B, T, in...]; a [N, in..., R]; b [N, R, out...]; scale float32 [N] -> [B, T, out...] in x's dtype.
    """
    bsz, t = x.shape[:2]
    n, rank = a.shape[0], a.shape[-1]
    out_shape = b.shape[2:]
    xf = x.reshape(bsz, t, math.prod(x.shape[2:]))  # [B, T, IN]
    a2 = a.reshape(n, -1, rank).astype(x.dtype)  # [N, IN, R]
    b2 = b.reshape(n, rank, -1).astype(x.dtype)  # [N, R, OUT]
    if index.ndim == 1 and n > bsz:
        h = jnp.einsum("bti,bir->btr", xf, a2[index])  # [B, T, R]
        h = h * scale[index].astype(x.dtype)[:, None, None]
        y = jnp.einsum("btr,bro->bto", h, b2[index])  # [B, T, OUT]
    else:
        h = jnp.einsum("bti,nir->btnr", xf, a2)  # [B, T, N, R]
        index = index[:, None] if index.ndim == 1 else index  # [B, 1] or [B, T]
        pick = jax.nn.one_hot(index, n, dtype=x.dtype) * scale.astype(x.dtype)  # [B, 1 or T, N]
        h = (h * pick[..., None]).reshape(bsz, t, n * rank)
        y = jnp.einsum("btk,ko->bto", h, b2.reshape(n * rank, -1))  # [B, T, OUT]
    return y.reshape(bsz, t, *out_shape)


def expert_weights(weights, config: ModelConfig):
    """A mixture of experts' stacked weights (float or int8, [E, ...]) as the grouped matmuls read them: the
    compute dtype (int8 experts dequantized whole)."""
    return tuple(dequantize(w, config.compute_dtype) for w in weights)


EXPERT_TARGETS = ("w_gate", "w_up", "w_down")  # a mixture of experts' stacked weights [E, in, out]


@flax.struct.dataclass
class ExpertLora:
    """The adapters of a mixture of experts' stacked weights, for its rows sorted by expert: row m's update through
    weight `name` is scale[s] * (x @ A[s, e]) @ B[s, e], s its slot and e its expert."""

    factors: dict  # {name: {"a": [N, E, in, R], "b": [N, E, R, out]}}: the adapted ones of EXPERT_TARGETS
    scale: jax.Array  # float32 [N]
    slot: jax.Array  # int32 [M]: each sorted row's slot (0: none)

    def add(self, name: str, x, y, expert, slot=None):
        """y [M, out] plus the update of x [M, in] through `name` (y itself when no adapter adapts it): row m
        through slot[m] (default self.slot) of expert[m] (int32 [M], or one expert for every row). Slot and expert
        index one stacked table, so `update` gathers each row's factors or masks every one's, as for dense rows."""
        ab = self.factors.get(name)
        if ab is None:
            return y
        a, b = ab["a"], ab["b"]
        n, e = a.shape[:2]
        index = (self.slot if slot is None else slot) * e + expert  # [M] into the N * E stacked factors
        a, b = a.reshape(n * e, *a.shape[2:]), b.reshape(n * e, *b.shape[2:])
        return y + update(x[:, None], a, b, jnp.repeat(self.scale, e), index)[:, 0].astype(y.dtype)

    def one_expert(self, e) -> ExpertLora:
        """Expert e's factors alone ([N, 1, ...]: `add` with expert 0), sliced once for all its rows."""
        return self.replace(factors=jax.tree.map(lambda w: jax.lax.dynamic_slice_in_dim(w, e, 1, axis=1),
                                                 self.factors))


def expert_lora(lora, shape: tuple[int, int], token) -> ExpertLora | None:
    """The expert adapters of `lora` = (LayerLora or None, module) for rows sorted by expert, row m being token
    token[m] (int32 [M], into the flattened [B, T] = `shape`); None when no adapter in the table adapts an expert
    weight (the plain program)."""
    slots, module = lora
    factors = {} if slots is None else {n: ab for n in EXPERT_TARGETS
                                        if (ab := slots.weights.get(module, {}).get(n)) is not None}
    if not factors:
        return None
    index = slots.index if slots.index.ndim == 2 else slots.index[:, None]  # [B, T] or [B, 1]
    return ExpertLora(factors, slots.scale, jnp.broadcast_to(index, shape).reshape(-1)[token])


def _base(spec: str, x, w, config: ModelConfig, preferred_element_type):
    dt = config.compute_dtype
    if not is_quantized(w):
        return jnp.einsum(spec, x, w.astype(dt), preferred_element_type=preferred_element_type)
    out_dtype = preferred_element_type or dt

    def dequant():
        return jnp.einsum(spec, x, dequantize(w, dt), preferred_element_type=preferred_element_type).astype(out_dtype)

    def int8_dot():
        return _int8_dot(spec, x, w).astype(out_dtype)

    rows = x.shape[0] * x.shape[1]
    if config.quant_matmul == "auto":
        return jax.lax.platform_dependent(cpu=int8_dot if rows <= INT8_DOT_MAX_ROWS else dequant, default=dequant)
    if config.quant_matmul == "int8_dot" and jax.default_backend() != "cpu":
        raise UserError(f"quant_matmul='int8_dot' is the CPU kernel; on {jax.default_backend()} use 'dequant' "
                        "(weight-only, fused into the matmul) or 'auto'")
    return int8_dot() if config.quant_matmul == "int8_dot" else dequant()


def _int8_dot(spec: str, x, w):
    """x's rows quantized on the fly per tile of ACTIVATION_TILE contracted values, padded to MIN_INT8_ROWS rows;
    int8 x int8 -> int32 dots per tile, then the tiles' scales, summed, and the weight's scales."""
    x_subs, w_subs = spec.split("->")[0].split(",")
    b, t = x.shape[:2]
    c, n_contracted = math.prod(x.shape[2:]), x.ndim - 2
    leading = w_subs[0] in x_subs  # w is [C..., O...] (else [O..., C], the tied embedding)
    free = w.shape[n_contracted:] if leading else w.shape[: w.ndim - n_contracted]
    o = math.prod(free)
    rows = x.reshape(b * t, c).astype(jnp.float32)
    n = max(b * t, MIN_INT8_ROWS)
    if n > b * t:
        rows = jnp.concatenate([rows] * n, axis=0)[:n]  # copies of the row: their scales are the row's own
    tile = ACTIVATION_TILE if c % ACTIVATION_TILE == 0 else c
    xq, scale = absmax_int8(rows.reshape(n, c // tile, tile))  # [N, G, g], [N, G, 1]
    if leading:
        acc = jnp.einsum("ngk,gko->gno", xq, w.qvalue.reshape(c // tile, tile, o), preferred_element_type=jnp.int32)
    else:
        acc = jnp.einsum("ngk,ogk->gno", xq, w.qvalue.reshape(o, c // tile, tile), preferred_element_type=jnp.int32)
    y = jnp.einsum("gno,ng->no", acc.astype(jnp.float32), scale[..., 0]) * w.scale.reshape(1, o)  # [N, O]
    return y[: b * t].reshape(b, t, *free)
