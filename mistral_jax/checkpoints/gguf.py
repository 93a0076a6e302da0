"""llama.cpp GGUF files (llama architecture: Llama, Mistral, Mixtral), dequantized lazily to float32.

The tensors come back under transformers' names and layout: llama.cpp's names are mapped, the rows of
q/k that convert_hf_to_gguf permutes (for its interleaved RoPE) are put back, and stacked expert
tensors are split into the classic per-expert Mixtral names.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import gguf
import numpy as np

from mistral_jax import families, gguf_file
from mistral_jax.checkpoints import hf_layout
from mistral_jax.checkpoints.errors import CheckpointError
from mistral_jax.config import ModelConfig

Q = gguf.GGMLQuantizationType
# Q5_0 / Q5_1 are what llama.cpp's K-quant mixes fall back to for rows not a multiple of 256.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {  # blk.N.<key>.weight -> model.layers.N.<value>.weight
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}  # also ffn_gate_exps etc. (stacked)
BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)(?:\.(\d+))?\.weight")  # blk.N.kind[.expert].weight


class Source(NamedTuple):
    """Where one transformers tensor lives in the file: a GGUF tensor, which expert of a stacked one,
    and the head count to unpermute its rows by (q and k only)."""

    tensor: gguf.ReaderTensor
    expert: int | None = None
    unpermute_heads: int | None = None


def is_gguf(path) -> bool:
    """True for a file that starts with the GGUF magic bytes."""
    path = pathlib.Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


class GGUFTensors(Mapping):
    """Read-only mapping transformers name -> float32 numpy array; a tensor is dequantized when asked for."""

    def __init__(self, sources: dict[str, Source], path: pathlib.Path):
        self._sources = sources
        self._path = path

    def __getitem__(self, name: str) -> np.ndarray:
        source = self._sources[name]
        data = source.tensor.data if source.expert is None else source.tensor.data[source.expert]
        try:
            w = gguf.quants.dequantize(np.asarray(data), source.tensor.tensor_type)
        except (ValueError, NotImplementedError) as err:
            raise CheckpointError(f"{self._path}: cannot dequantize {source.tensor.name!r}: {err}") from err
        if source.unpermute_heads:
            w = hf_layout.interleaved_to_half_split(w, source.unpermute_heads)
        return np.array(w, dtype=np.float32)  # a copy: nothing keeps the memory-mapped file alive

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    """A GGUFReader (memory-mapped, nothing dequantized yet), with a CheckpointError for bad files."""
    if not is_gguf(path):
        raise CheckpointError(f"{path} is not a GGUF file (no 'GGUF' magic bytes)")
    try:
        return gguf_file.reader(path)
    except (ValueError, IndexError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read GGUF file (truncated or corrupt?): {err}") from err


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python value, or `default` when the key is absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def config_from_gguf(reader: gguf.GGUFReader, source: str) -> ModelConfig:
    """ModelConfig from llama.cpp metadata (general.architecture: one the family table names, families.py)."""
    arch = _field(reader, "general.architecture")
    if arch not in families.gguf_architectures():
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(families.gguf_architectures())})")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata '{arch}.{key}' is missing")
        return value

    tensors = {t.name: t for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])  # ggml order: [dim, vocab]
    n_experts = int(_field(reader, "llama.expert_count", 0))
    name = f"{_field(reader, 'general.name', '')} {_field(reader, 'general.basename', '')}"
    family = families.from_gguf(arch, name, n_experts).name
    key_length = _field(reader, "llama.attention.key_length")
    values = dict(
        family=family,
        vocab_size=int(vocab),
        dim=int(need("embedding_length")),
        n_layers=int(need("block_count")),
        n_heads=int(need("attention.head_count")),
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv") or need("attention.head_count")),
        head_dim=int(key_length) if key_length else None,
        hidden_dim=int(need("feed_forward_length")),
        norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        **_rope_scaling(reader, tensors, source),
        max_seq_len=int(_field(reader, "llama.context_length", 4096)),
        sliding_window=None,  # llama.cpp does not store one for the llama architecture
        tie_embeddings="output.weight" not in tensors,
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
    )
    if n_experts:
        values.update(n_experts=n_experts, n_experts_per_tok=int(need("expert_used_count")))
    try:
        config = ModelConfig(**values)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    rope_dims = _field(reader, "llama.rope.dimension_count")
    if rope_dims is not None and rope_dims != config.resolved_head_dim:
        raise CheckpointError(
            f"{source}: partial RoPE ({rope_dims} of {config.resolved_head_dim} dims) is not supported"
        )
    return config


# Meta's llama3 RoPE scaling parameters, which llama.cpp does not write: it stores their per-frequency divisors as
# the tensor rope_freqs.weight, whose largest value is the factor (the original context is read where written).
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def llama3_divisors(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """How much llama3 scaling divides each RoPE frequency: float64 [head_dim / 2] (1 where it keeps one)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))


def _rope_scaling(reader: gguf.GGUFReader, tensors: Mapping[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig's RoPE scaling fields: "linear" from the metadata, "llama3" from rope_freqs.weight."""
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        return {"rope_scaling": "linear", "rope_factor": _f32(_field(reader, "llama.rope.scaling.factor", 1.0))}
    if scaling not in ("none", None):
        raise CheckpointError(f"{source}: rope scaling {scaling!r} is not supported (supported: linear, llama3)")
    if "rope_freqs.weight" not in tensors:
        return {}
    divisors = np.asarray(tensors["rope_freqs.weight"].data, np.float64).reshape(-1)
    if np.all(divisors == 1.0):
        return {}
    head_dim = 2 * divisors.size
    theta = float(_field(reader, "llama.rope.freq_base", 10000.0))
    original = int(_field(reader, "llama.rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT))
    fields = dict(rope_scaling="llama3", rope_factor=_f32(divisors.max()), rope_low_freq_factor=LLAMA3_LOW_FREQ_FACTOR,
                  rope_high_freq_factor=LLAMA3_HIGH_FREQ_FACTOR, rope_original_max_seq_len=original)
    expected = llama3_divisors(head_dim, theta, fields["rope_factor"], LLAMA3_LOW_FREQ_FACTOR,
                               LLAMA3_HIGH_FREQ_FACTOR, original)
    if not np.allclose(divisors, expected, rtol=1e-4):
        raise CheckpointError(f"{source}: rope_freqs.weight is not llama3 RoPE scaling (factor "
                              f"{fields['rope_factor']}, frequency factors 1 / 4, original context {original}); other "
                              "per-frequency factors are not supported")
    return fields


def _sources(reader: gguf.GGUFReader, config: ModelConfig, source: str) -> dict[str, Source]:
    """transformers name -> where it lives in the file, for every tensor of the file."""
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}
    out: dict[str, Source] = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{source}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which is not supported "
                f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})"
            )
        if t.name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[t.name]] = Source(t)
            continue
        if t.name == "rope_freqs.weight":  # llama3 RoPE scaling, read into the config (_rope_scaling)
            continue
        match = BLOCK_TENSOR.fullmatch(t.name)
        if match is None:
            raise CheckpointError(f"{source}: unexpected GGUF tensor {t.name!r}")
        layer, kind, expert = match.groups()
        prefix = f"model.layers.{layer}."
        stacked = kind.removesuffix("_exps")
        if stacked != kind and stacked in EXPERT_NAMES:  # one tensor for all experts, numpy [E, out, in]
            for e in range(t.data.shape[0]):
                out[f"{prefix}block_sparse_moe.experts.{e}.{EXPERT_NAMES[stacked]}.weight"] = Source(t, expert=e)
        elif expert is not None and kind in EXPERT_NAMES:  # older files: one tensor per expert
            out[f"{prefix}block_sparse_moe.experts.{expert}.{EXPERT_NAMES[kind]}.weight"] = Source(t)
        elif expert is None and kind in BLOCK_NAMES:
            out[f"{prefix}{BLOCK_NAMES[kind]}.weight"] = Source(t, unpermute_heads=heads.get(kind))
        else:
            raise CheckpointError(f"{source}: unexpected GGUF tensor {t.name!r}")
    return out


def _check_complete(config: ModelConfig, names: Mapping[str, Source], source: str) -> None:
    """Raise a CheckpointError naming the first tensor the model needs that the file lacks."""
    for leaf in hf_layout.layout(config):
        for i in range(config.n_layers) if leaf.per_layer else [None]:
            missing = [n for n in leaf.names(i) if n not in names]
            if missing:
                raise CheckpointError(f"{source}: GGUF file has no tensor for {missing[0]!r}")


def read(path) -> tuple[ModelConfig, GGUFTensors]:
    """(config, lazily dequantized transformers-named float32 tensors) of a llama.cpp GGUF file."""
    path = pathlib.Path(path)
    reader = _open(path)
    config = config_from_gguf(reader, str(path))
    sources = _sources(reader, config, str(path))
    _check_complete(config, sources, str(path))
    return config, GGUFTensors(sources, path)
