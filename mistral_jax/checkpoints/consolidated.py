"""Mistral's own download format: `params.json` plus `consolidated.safetensors` (mistral-inference names).

Tensors come back under transformers' names, lazily: q/k rows are moved from the reference's
interleaved RoPE layout to transformers' half-split one, everything else is renamed only.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from mistral_jax import families
from mistral_jax.checkpoints import hf_layout
from mistral_jax.checkpoints.errors import CheckpointError, read_json
from mistral_jax.checkpoints.safetensors_files import open_safetensors_dir
from mistral_jax.config import ModelConfig

REQUIRED_FIELDS = ("dim", "n_layers", "n_heads", "norm_eps")
# Mistral 7B v0.1's params.json has no rope_theta: the reference code's default then applies.
DEFAULT_ROPE_THETA = 10000.0

GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {  # layers.N.<key> -> model.layers.N.<value>
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
LAYER_TENSOR = re.compile(r"layers\.(\d+)\.(.+)")
EXPERT_TENSOR = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def is_consolidated_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()


class RenamedTensors(Mapping):
    """transformers name -> array, each read from the underlying files and transformed when asked for."""

    def __init__(self, files: Mapping[str, np.ndarray], sources: dict[str, tuple[str, Callable | None]]):
        self._files, self._sources = files, sources

    def __getitem__(self, name: str) -> np.ndarray:
        original, transform = self._sources[name]
        tensor = self._files[original]
        return transform(tensor) if transform else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def config_from_params(params: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], source: str) -> ModelConfig:
    """ModelConfig from params.json; hidden_dim and vocab_size fall back to the tensors' shapes."""
    missing = [f for f in REQUIRED_FIELDS if f not in params]
    if missing:
        raise CheckpointError(f"{source}: required field(s) {missing} missing")
    moe = params.get("moe") or {}
    family = families.consolidated_family(bool(moe))
    values: dict[str, Any] = {"family": family.name}
    for key, field in family.consolidated_keys.items():
        if params.get(key) is not None and field not in values:
            values[field] = params[key]
    hidden = params.get("hidden_dim") or _shape(
        shapes, "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.experts.0.w1.weight"
    )[0]
    vocab = params.get("vocab_size") if params.get("vocab_size", -1) > 0 else _shape(shapes, "tok_embeddings.weight")[0]
    values.update(
        vocab_size=int(vocab),
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        head_dim=params.get("head_dim") if params.get("head_dim", 0) * params["n_heads"] != params["dim"] else None,
        hidden_dim=int(hidden),
        norm_eps=float(params["norm_eps"]),
        rope_theta=float(params.get("rope_theta") or DEFAULT_ROPE_THETA),
        max_seq_len=int(values.get("max_seq_len") or 32768),
        tie_embeddings="output.weight" not in shapes,
    )
    if moe:
        values.update(n_experts=moe["num_experts"], n_experts_per_tok=moe["num_experts_per_tok"])
    try:
        return ModelConfig(**values)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _shape(shapes: Mapping[str, tuple[int, ...]], *names: str) -> tuple[int, ...]:
    for name in names:
        if name in shapes:
            return shapes[name]
    raise CheckpointError(f"cannot infer the config: no tensor {names[0]!r}")


def _sources(config: ModelConfig, names, source: str) -> dict[str, tuple[str, Callable | None]]:
    heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}
    out: dict[str, tuple[str, Callable | None]] = {}
    for name in names:
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = (name, None)
            continue
        match = LAYER_TENSOR.fullmatch(name)
        if match is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if expert := EXPERT_TENSOR.fullmatch(rest):
            out[f"{prefix}block_sparse_moe.experts.{expert[1]}.{expert[2]}.weight"] = (name, None)
        elif rest in LAYER_NAMES:
            n = heads.get(rest)
            transform = (lambda w, n=n: hf_layout.interleaved_to_half_split(w, n)) if n else None
            out[prefix + LAYER_NAMES[rest]] = (name, transform)
        else:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}")
    return out


def read(path: pathlib.Path) -> tuple[ModelConfig, RenamedTensors]:
    """(config, lazily read transformers-named tensors) of a consolidated Mistral directory."""
    params_file = path / "params.json"
    params = read_json(params_file)
    files = open_safetensors_dir(path, stem="consolidated")
    shapes = {name: files.shape(name) for name in files}
    config = config_from_params(params, shapes, str(params_file))
    return config, RenamedTensors(files, _sources(config, files, str(path)))
