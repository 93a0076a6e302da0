"""mistral-jax: Mistral, Mixtral and Llama 2 in JAX/Flax."""

from mistral_jax.checkpoints import load
from mistral_jax.checkpoints.errors import CheckpointError
from mistral_jax.config import ModelConfig, list_presets
from mistral_jax.decoding import decode_step, generate, generate_stream, prefill
from mistral_jax.model.layer_layout import stack_layers, unstack_layers
from mistral_jax.model.transformer import forward, init_params, logical_axes, logits
from mistral_jax.rolling_cache import init_cache
from mistral_jax.sharding import make_mesh, shard_params
from mistral_jax.tokenizers import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "decode_step",
    "forward",
    "generate",
    "generate_stream",
    "init_cache",
    "init_params",
    "list_presets",
    "load",
    "load_tokenizer",
    "logical_axes",
    "logits",
    "make_mesh",
    "prefill",
    "shard_params",
    "stack_layers",
    "unstack_layers",
]
