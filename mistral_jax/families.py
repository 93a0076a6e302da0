"""THE family table: per model family, how each format names it and what it needs.

Every reader of "which family" asks this table: config.py (valid names), checkpoints/hf.py (config.json's
model_type and architectures, the attention pattern per layer), checkpoints/gguf.py (llama.cpp's architecture),
checkpoints/consolidated.py (params.json's keys), tokenizers/load.py and tokenizers/chat_templates.py (the chat
format of a checkpoint without a template). A new family of this shape is one entry here and one preset.
Pure data: no jax, no files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from mistral_jax.errors import UserError

ChatFormatName = Literal["mistral-instruct", "llama2"]  # tokenizers/chat_templates.py builds each
TokenizerKind = Literal["sentencepiece", "tekken", "tokenizer.json", "gguf"]  # tokenizers/load.py reads each
# Where config.json says which layers attend through a sliding window:
#   "none":        never (Llama: config.json's sliding_window, if any, is ignored, as transformers ignores it)
#   "uniform":     every layer, when sliding_window is set (Mistral, Mixtral)
#   "layer_types": per layer, config.json's `layer_types` ("sliding_attention" / "full_attention"; Ministral)
WindowPattern = Literal["none", "uniform", "layer_types"]
SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types values

# Mistral's params.json key -> ModelConfig field (the reference code's names are ModelConfig's own).
CONSOLIDATED_KEYS: Mapping[str, str] = {
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads", "head_dim": "head_dim",
    "hidden_dim": "hidden_dim", "norm_eps": "norm_eps", "rope_theta": "rope_theta", "vocab_size": "vocab_size",
    "sliding_window": "sliding_window", "max_seq_len": "max_seq_len", "max_position_embeddings": "max_seq_len",
}


@dataclasses.dataclass(frozen=True)
class FamilyInfo:
    """One family's names in every format and the defaults it brings."""

    name: str  # ModelConfig.family
    hf_model_types: tuple[str, ...]  # config.json model_type values read as this family; the first is written
    hf_architectures: tuple[str, ...]  # config.json architectures; the first is written
    gguf_architecture: str | None  # llama.cpp's general.architecture for it; None: llama.cpp writes none
    consolidated_keys: Mapping[str, str] | None  # params.json key -> ModelConfig field; None: no such format
    chat_format: ChatFormatName  # the chat format of a checkpoint that carries no template
    tokenizer_kinds: tuple[TokenizerKind, ...]  # the tokenizer files its checkpoints ship
    window_pattern: WindowPattern  # how config.json says which layers slide (above)
    moe: bool = False  # every layer a mixture of experts


FAMILIES: dict[str, FamilyInfo] = {f.name: f for f in (
    FamilyInfo("llama", ("llama",), ("LlamaForCausalLM",), "llama", None, "llama2",
               ("sentencepiece", "tokenizer.json", "gguf"), "none"),
    FamilyInfo("mistral", ("mistral",), ("MistralForCausalLM",), "llama", CONSOLIDATED_KEYS, "mistral-instruct",
               ("sentencepiece", "tekken", "tokenizer.json", "gguf"), "uniform"),
    FamilyInfo("mixtral", ("mixtral",), ("MixtralForCausalLM",), "llama", CONSOLIDATED_KEYS, "mistral-instruct",
               ("sentencepiece", "tekken", "tokenizer.json", "gguf"), "uniform", moe=True),
    FamilyInfo("ministral", ("ministral",), ("MinistralForCausalLM",), None, CONSOLIDATED_KEYS, "mistral-instruct",
               ("tekken", "tokenizer.json"), "layer_types"),
)}
NAMES: tuple[str, ...] = tuple(FAMILIES)


def get(name: str) -> FamilyInfo:
    """The entry of a family name; a UserError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known families: {', '.join(NAMES)}")
    return FAMILIES[name]


def from_hf(hf: Mapping[str, Any]) -> FamilyInfo | None:
    """The family of a transformers config.json dict (its model_type, else its architectures), or None."""
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or ()
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    if model_type is None:
        for family in FAMILIES.values():
            if set(architectures) & set(family.hf_architectures):
                return family
    return None


def hf_model_types() -> tuple[str, ...]:
    """Every config.json model_type the table reads."""
    return tuple(t for family in FAMILIES.values() for t in family.hf_model_types)


def from_gguf(architecture: str, model_name: str, n_experts: int) -> FamilyInfo | None:
    """The family of a llama.cpp file: its architecture, told apart by experts and by the model's name (llama.cpp
    writes Llama, Mistral and Mixtral all as "llama"), or None when the architecture is not in the table."""
    candidates = [f for f in FAMILIES.values() if f.gguf_architecture == architecture]
    if not candidates:
        return None
    moe = [f for f in candidates if f.moe == bool(n_experts)] or candidates
    named = [f for f in moe if f.name in model_name.lower()]
    return (named or [f for f in moe if f.name == architecture] or moe)[0]


def gguf_architectures() -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture))


def consolidated_family(moe: bool) -> FamilyInfo:
    """The family a consolidated params.json describes: params.json says only whether it is a mixture of experts
    (a per-layer pattern is not written there), so Mistral's dense or sparse entry."""
    return FAMILIES["mixtral" if moe else "mistral"]


def window_layout_from_hf(family: FamilyInfo, hf: Mapping[str, Any],
                          n_layers: int) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) for ModelConfig from config.json, as transformers reads it: layer_types is
    a tuple of SLIDING / FULL only where the layers mix the two; where all are alike, sliding_window alone says it."""
    window = hf.get("sliding_window")
    if family.window_pattern == "none" or window is None:
        return None, None
    if family.window_pattern == "uniform":
        return window, None
    types = list(hf.get("layer_types") or [SLIDING] * n_layers)  # transformers' default for a window and no list
    if len(types) != n_layers or set(types) - {SLIDING, FULL}:
        raise UserError(f"config.json: layer_types must be {n_layers} of {SLIDING!r} / {FULL!r}, got {types}")
    if len(set(types)) == 1:
        return (window if types[0] == SLIDING else None), None
    return window, tuple(types)
