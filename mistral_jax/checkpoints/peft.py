"""Hugging Face PEFT LoRA directories (adapter_config.json + adapter_model.safetensors), read and written.

PEFT keeps each adapted Linear's factors in transformers' layout, lora_A [r, in] and lora_B [out, r], and adds
scale * B @ A to the weight [out, in], with scale = lora_alpha / r (lora_alpha / sqrt(r) under use_rslora). Ours
(lora.py) are a [L, in..., r] and b [L, r, out...]: A and B are Linear weights themselves, so each converts as
hf_layout converts a base weight (transposed, heads split out). No rotary permutation: transformers' q/k rows
are in half-split RoPE order, the order our parameters hold whatever the base's format (the consolidated and
GGUF readers permute theirs into it, hf_layout.interleaved_to_half_split), so PEFT's q/k updates apply as they are.
Targets: q/k/v/o/gate/up/down of the dense families; Mixtral's attention and its experts in the classic layout our
export writes (block_sparse_moe.experts.E.w1/w3/w2, one Linear per expert: target_modules w1, w3, w2), each expert's
factors in its row of our [L, E, ...] ones. transformers >= 5 fuses the experts into tensors PEFT adapts by
`target_parameters`, refused here.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
from safetensors.numpy import save_file

from mistral_jax import lora
from mistral_jax.checkpoints import hf, hf_layout
from mistral_jax.checkpoints.errors import CheckpointError, read_json
from mistral_jax.checkpoints.safetensors_files import SafetensorsFiles
from mistral_jax.config import DTYPES, ModelConfig
from mistral_jax.model.transformer import param_shapes
from mistral_jax.paths import check_new_dir, staged_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's prefix before the transformers model's own names
FACTOR = re.compile(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight")
# Our LoRA target -> transformers' module name (PEFT's target_modules).
MODULES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w_gate": "gate_proj",
           "w_up": "up_proj", "w_down": "down_proj"}
# A mixture of experts' target -> the classic Mixtral expert Linear (block_sparse_moe.experts.E.w1).
EXPERT_MODULES = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}
# adapter_config.json fields that change what the adapter computes in ways we do not apply: any set value is refused.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "layer_replication", "rank_pattern",
               "alpha_pattern", "target_parameters", "trainable_token_indices", "alora_invocation_tokens")
# ModelConfig fields that make two bases different models, compared against a local base_model_name_or_path.
ARCHITECTURE = ("family", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "hidden_dim",
                "n_experts", "rope_theta", "norm_eps", "sliding_window", "tie_embeddings")


def is_peft_dir(path) -> bool:
    path = pathlib.Path(path).expanduser()
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _modules(config: ModelConfig, shapes) -> dict[str, tuple[tuple[str, str], tuple[int, ...], tuple[int, int]]]:
    """transformers module name (model.layers.3.self_attn.q_proj, model.layers.3.block_sparse_moe.experts.5.w1)
    -> ((module, target), its place on our factors' leading axes ((layer,) or (layer, expert)), its weight's
    [out, in]) for every weight of `config` (parameter shapes: `shapes`) a PEFT LoRA can adapt."""
    out = {}
    for leaf in hf_layout.layout(config):  # Mixtral's experts in the classic layout: a Linear per expert
        if leaf.path[0] != "layers" or leaf.path[-1] not in MODULES:
            continue
        hf_shape = leaf.hf_shape(hf_layout.get_path(shapes, leaf.path).shape[1:])
        for i in range(config.n_layers):
            names = leaf.names(i)
            for e, name in enumerate(names):
                out[name.removesuffix(".weight")] = (leaf.path[1:], (i, e) if leaf.path[1] == "moe" else (i,), hf_shape)
    return out


def _check_settings(settings: dict, where: str) -> None:
    if settings.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type is {settings['peft_type']!r}; only LORA adapters are read")
    if settings.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias={settings['bias']!r} is not supported (only bias='none')")
    for field in UNSUPPORTED:
        if settings.get(field):
            raise CheckpointError(f"{where}: {field}={settings[field]!r} is not supported")
    targets = settings.get("target_modules")
    if isinstance(targets, list):  # (a string is a regular expression: the tensors below say what it matched)
        known = [*MODULES.values(), *EXPERT_MODULES.values()]
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise CheckpointError(f"{where}: target module(s) {unknown} are not adapted here "
                                  f"(targets: {', '.join(known)})")
    for field in ("r", "lora_alpha"):
        if not isinstance(settings.get(field), int | float) or settings[field] <= 0:
            raise CheckpointError(f"{where}: {field} must be a positive number, got {settings.get(field)!r}")


def _check_base(settings: dict, config: ModelConfig, where: str) -> None:
    """The base the adapter names, where it is a local HF directory: refused when its architecture differs."""
    named = settings.get("base_model_name_or_path")
    if not named or not hf.is_hf_dir(pathlib.Path(named).expanduser()):
        return
    theirs = hf.config_from_hf(read_json(pathlib.Path(named).expanduser() / "config.json"))
    for field in ARCHITECTURE:
        if getattr(theirs, field) != getattr(config, field):
            raise CheckpointError(f"{where}: its base has {field}={getattr(theirs, field)!r}, this base "
                                  f"{getattr(config, field)!r}")


def read(path, config: ModelConfig) -> lora.Adapter:
    """The PEFT LoRA in directory `path` as an Adapter for `config`'s model (float32 host arrays, layers it leaves
    out zero). Refused with one line naming what differs when it was made for another base: a tensor or target
    module this model lacks, a shape, or (when it names a local base directory) the base's architecture."""
    path = pathlib.Path(path).expanduser()
    settings = read_json(path / CONFIG_FILE)
    where = f"{path} (a PEFT adapter for {settings.get('base_model_name_or_path') or 'an unnamed base'})"
    _check_settings(settings, where)
    _check_base(settings, config, where)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (pickled adapter_model.bin files are never loaded: save it with safetensors)" if (
            path / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{where}: {WEIGHTS_FILE} is missing{hint}")
    tensors = SafetensorsFiles.from_files([weights])
    config = config.replace(scan_layers=True)  # adapters are stacked on a layer axis whatever the params' layout
    shapes = param_shapes(config)
    modules = _modules(config, shapes)
    factors: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = FACTOR.fullmatch(key)
        if match is None or match[1] not in modules:
            raise CheckpointError(f"{where}: tensor {key!r} adapts no q/k/v/o/gate/up/down (or expert w1/w3/w2) "
                                  f"weight of this {config.family} base ({config.n_layers} layers)")
        factors.setdefault(match[1], {})[match[2]] = key
    if not factors:
        raise CheckpointError(f"{where}: {WEIGHTS_FILE} holds no LoRA factors")
    rank = settings["r"]
    scale = settings["lora_alpha"] / (math.sqrt(rank) if settings.get("use_rslora") else rank)
    adapters: dict = {}
    for module, keys in sorted(factors.items()):
        if set(keys) != {"A", "B"}:
            (has,) = keys
            raise CheckpointError(f"{where}: {module} has lora_{has} but not lora_{'B' if has == 'A' else 'A'}")
        (parent, name), place, (n_out, n_in) = modules[module]
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        if a.shape != (rank, n_in) or b.shape != (n_out, rank):
            raise CheckpointError(f"{where}: {module} has lora_A {list(a.shape)}, lora_B {list(b.shape)}; this base's "
                                  f"{module} [out, in] is {[n_out, n_in]}, so r={rank} needs {[rank, n_in]}, "
                                  f"{[n_out, rank]}")
        if name not in adapters.setdefault(parent, {}):
            adapters[parent][name] = _zeros(shapes, parent, name, rank)
        pair = adapters[parent][name]
        pair["a"][place] = a.astype(np.float32).T.reshape(pair["a"].shape[len(place):])
        pair["b"][place] = b.astype(np.float32).T.reshape(pair["b"].shape[len(place):])
    return lora.Adapter({"layers": adapters}, float(scale), source=where)


def _zeros(shapes, module: str, name: str, rank: int) -> dict[str, np.ndarray]:
    """Zero factors for every layer of one target: a [L, (E,) in..., r], b [L, (E,) r, out...]."""
    shape = shapes["layers"][module][name].shape
    _, n_in, n_out = lora.TARGETS[name]
    lead = len(shape) - n_in - n_out
    return {"a": np.zeros((*shape[: lead + n_in], rank), np.float32),
            "b": np.zeros((*shape[:lead], rank, *shape[lead + n_in:]), np.float32)}


def write(config: ModelConfig, adapter: lora.Adapter, out_dir, base_model: str, dtype: str = "float32") -> pathlib.Path:
    """A PEFT LoRA directory of `adapter` (for `config`'s model), which peft.PeftModel.from_pretrained loads onto
    the base's transformers model; `base_model` goes in base_model_name_or_path (Mixtral's experts as the classic
    per-expert w1/w3/w2 modules, as our export writes the base). Written to a temporary directory renamed at the end;
    `out_dir` must not exist yet (or be empty)."""
    config = config.replace(scan_layers=True)
    adapter.check_fits(config)
    out_dir = pathlib.Path(out_dir).expanduser()
    check_new_dir(out_dir)
    tensors, targets = {}, set()
    for module, ((parent, name), place, (n_out, n_in)) in _modules(config, param_shapes(config)).items():
        pair = adapter.weights["layers"].get(parent, {}).get(name)
        if pair is None:
            continue
        a, b = np.asarray(pair["a"][place], np.float32), np.asarray(pair["b"][place], np.float32)
        rank = a.shape[-1]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(n_in, rank).T)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, n_out).T)
        targets.add(module.rsplit(".", 1)[-1])  # q_proj ... or an expert's w1, w3, w2
    np_dtype = np.dtype(DTYPES[dtype])
    tensors = {key: value.astype(np_dtype) for key, value in tensors.items()}
    rank = adapter.rank
    alpha = adapter.scale * rank
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "use_rslora": False,
        "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    with staged_dir(out_dir) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir
