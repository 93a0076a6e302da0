"""Hugging Face model directories: config.json plus model.safetensors or sharded safetensors with index."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterable
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from mistral_jax import families
from mistral_jax.checkpoints import hf_layout
from mistral_jax.checkpoints.errors import CheckpointError, read_json
from mistral_jax.checkpoints.safetensors_files import SafetensorsFiles, open_safetensors_dir
from mistral_jax.config import ModelConfig
from mistral_jax.paths import check_new_dir, staged_dir

ROPE_TYPES = ("default", "linear", "llama3")  # rope_type values read (model/layers.py computes each)


def rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE fields from the classic `rope_theta` + `rope_scaling` or the newer `rope_parameters`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    fields: dict[str, Any] = {"rope_theta": float(theta) if theta is not None else 10000.0}
    if kind != "default":
        fields.update(rope_scaling=kind, rope_factor=float(params["factor"]))
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_seq_len=int(params.get("original_max_position_embeddings")
                                                    or hf.get("max_position_embeddings", 8192)))
    return fields


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers config.json dict (a model_type in the family table, families.py)."""
    family = families.from_hf(hf)
    if family is None:
        raise CheckpointError(f"{source}: unknown model_type {hf.get('model_type')!r}; "
                              f"supported: {', '.join(families.hf_model_types())}")
    try:
        dim, heads = hf["hidden_size"], hf["num_attention_heads"]
        values = dict(
            family=family.name,
            vocab_size=hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            # None when it is the default dim // heads, so equal architectures give equal configs.
            head_dim=hf["head_dim"] if hf.get("head_dim") and hf["head_dim"] * heads != dim else None,
            hidden_dim=hf["intermediate_size"],
        )
        sliding_window, layer_types = families.window_layout_from_hf(family, hf, values["n_layers"])
    except KeyError as err:
        raise CheckpointError(f"{source}: required field {err.args[0]!r} is missing") from err
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    eos = hf.get("eos_token_id")
    values.update(
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        **rope_fields(hf),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        sliding_window=sliding_window,
        layer_types=layer_types,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
    )
    if family.moe:
        values.update(
            n_experts=hf.get("num_local_experts", 8),
            n_experts_per_tok=hf.get("num_experts_per_tok", 2),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.02)),
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: attention_bias / mlp_bias checkpoints are not supported")
    try:
        return ModelConfig(**values)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A transformers config.json dict for `config` (inverse of config_from_hf)."""
    family = families.get(config.family)
    hf = {
        "architectures": [family.hf_architectures[0]],
        "model_type": family.hf_model_types[0],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "intermediate_size": config.hidden_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "torch_dtype": config.param_dtype,
    }
    if config.rope_scaling is not None:
        rope = {"rope_type": config.rope_scaling, "rope_theta": config.rope_theta, "factor": config.rope_factor}
        if config.rope_scaling == "llama3":
            rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                        original_max_position_embeddings=config.rope_original_max_seq_len)
        hf["rope_parameters"] = rope
    if family.window_pattern != "none":
        hf["sliding_window"] = config.sliding_window
    elif config.sliding_window is not None:
        raise CheckpointError(f"a {config.family} config.json has no sliding window; this config has "
                              f"{config.sliding_window}")
    if family.window_pattern == "layer_types":
        hf["layer_types"] = list(config.layer_types or [families.SLIDING if config.sliding_window else
                                                        families.FULL] * config.n_layers)
    elif config.layer_types is not None:
        raise CheckpointError(f"a {config.family} config.json has no layer_types; use family 'ministral'")
    if config.is_moe:
        hf.update(num_local_experts=config.n_experts, num_experts_per_tok=config.n_experts_per_tok,
                  router_aux_loss_coef=config.router_aux_loss_coef)
    return hf


def is_hf_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read(path: pathlib.Path) -> tuple[ModelConfig, SafetensorsFiles]:
    """(config, lazily read transformers-named tensors) of a Hugging Face model directory."""
    config_file = path / "config.json"
    config = config_from_hf(read_json(config_file), source=str(config_file))
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        hint = ""
        if any(path.glob("*.bin")):
            hint = " (only PyTorch .bin weights? convert them to safetensors; pickles are never loaded)"
        raise CheckpointError(f"no safetensors weights in {path}{hint}")
    return config, open_safetensors_dir(path)


DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def write(config: ModelConfig, params, out_dir, extra_files: Iterable[pathlib.Path] = (),
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> pathlib.Path:
    """Write an HF model directory: config.json, safetensors shards (+ index when more than one), and
    `extra_files` (tokenizer files) copied beside them.

    Everything goes to a temporary directory beside `out_dir`, renamed at the end: an interrupted
    export leaves no half-written model. `out_dir` must not exist yet (or be empty).
    """
    from mistral_jax.model.layer_layout import stack_layers

    config, params = stack_layers(config, params)
    out_dir = pathlib.Path(out_dir).expanduser()
    check_new_dir(out_dir)
    with staged_dir(out_dir) as tmp:
        _write_shards(config, params, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
        for file in extra_files:
            shutil.copyfile(file, tmp / pathlib.Path(file).name)  # not the source's mode bits (read-only packages)
    return out_dir


def _write_shards(config: ModelConfig, params, directory: pathlib.Path, max_shard_bytes: int) -> list[str]:
    """Save tensors in shards of at most max_shard_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[dict[str, np.ndarray]] = []
    files: list[pathlib.Path] = []
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            files.append(directory / f"shard-{len(files)}.tmp")
            save_file(current, files[-1], metadata={"format": "pt"})
            shards.append({name: None for name in current})
        current, size = {}, 0

    tensors = hf_layout.iter_hf_tensors(config, params)
    for name, tensor in tqdm(tensors, desc="saving", unit="tensor", leave=False, disable=None):
        if size and size + tensor.nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    if len(files) == 1:
        files[0].rename(directory / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    weight_map = {}
    for file, name, shard in zip(files, names, shards):
        file.rename(directory / name)
        weight_map.update({tensor: name for tensor in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
