"""mistral-jax: Mistral, Mixtral and Llama 2 in JAX/Flax.

The public API, imported on first use (PEP 562), so `import mistral_jax` stays cheap: orbax, jinja2,
tokenizers and gguf load only with the function that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ModelConfig": "mistral_jax.config",
    "list_presets": "mistral_jax.config",
    "UserError": "mistral_jax.errors",
    "ParamError": "mistral_jax.errors",
    "SamplingParams": "mistral_jax.sampling",
    "CheckpointError": "mistral_jax.checkpoints.errors",
    "load": "mistral_jax.checkpoints.load",
    "load_adapter": "mistral_jax.checkpoints.load",
    "load_tokenizer": "mistral_jax.tokenizers.load",
    "Output": "mistral_jax.model.transformer",
    "forward": "mistral_jax.model.transformer",
    "init_params": "mistral_jax.model.transformer",
    "logical_axes": "mistral_jax.model.transformer",
    "stack_layers": "mistral_jax.model.layer_layout",
    "unstack_layers": "mistral_jax.model.layer_layout",
    "make_mesh": "mistral_jax.sharding",
    "shard_params": "mistral_jax.sharding",
    "DecodeState": "mistral_jax.decoding",
    "decode_step": "mistral_jax.decoding",
    "generate": "mistral_jax.decoding",
    "generate_stream": "mistral_jax.decoding",
    "init_cache": "mistral_jax.decoding",
    "logits": "mistral_jax.decoding",
    "prefill": "mistral_jax.decoding",
    "quantize": "mistral_jax.model.quant",
    "Perplexity": "mistral_jax.evaluation",
    "perplexity": "mistral_jax.evaluation",
}

__all__ = [
    "CheckpointError",
    "DecodeState",
    "ModelConfig",
    "Output",
    "ParamError",
    "Perplexity",
    "SamplingParams",
    "UserError",
    "decode_step",
    "forward",
    "generate",
    "generate_stream",
    "init_cache",
    "init_params",
    "list_presets",
    "load",
    "load_adapter",
    "load_tokenizer",
    "logical_axes",
    "logits",
    "make_mesh",
    "perplexity",
    "prefill",
    "quantize",
    "shard_params",
    "stack_layers",
    "unstack_layers",
]  # the keys of _EXPORTS


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mistral_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from mistral_jax.checkpoints.errors import CheckpointError
    from mistral_jax.checkpoints.load import load, load_adapter
    from mistral_jax.config import ModelConfig, list_presets
    from mistral_jax.decoding import (
        DecodeState,
        decode_step,
        generate,
        generate_stream,
        init_cache,
        logits,
        prefill,
    )
    from mistral_jax.errors import ParamError, UserError
    from mistral_jax.evaluation import Perplexity, perplexity
    from mistral_jax.model.layer_layout import stack_layers, unstack_layers
    from mistral_jax.model.quant import quantize
    from mistral_jax.model.transformer import Output, forward, init_params, logical_axes
    from mistral_jax.sampling import SamplingParams
    from mistral_jax.sharding import make_mesh, shard_params
    from mistral_jax.tokenizers.load import load_tokenizer
