"""ModelConfig: the one frozen description of a model, and the named presets in `configs/models/`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Literal, get_args

import jax.numpy as jnp

from mistral_jax import families
from mistral_jax.errors import UserError

Family = str  # a name in families.FAMILIES (the family table), checked by ModelConfig
RopeScaling = Literal["linear", "llama3"]  # see mistral_jax/model/layers.py
MoeDispatch = Literal["auto", "ragged", "blocks", "capacity"]  # see mistral_jax/model/moe.py
AttentionKernel = Literal["auto", "xla", "cudnn", "flash", "splash"]  # see mistral_jax/model/attention.py
Quant = Literal["none", "int8"]  # see mistral_jax/model/quant.py
QuantMatmul = Literal["auto", "int8_dot", "dequant"]
KV_CACHE_DTYPES = ("int8",)  # besides DTYPES
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def configs_dir() -> pathlib.Path:
    """The `configs/` tree (model presets, SFT run configs): inside the wheel as `mistral_jax/_configs`, in a
    source checkout beside the package."""
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (here / "_configs", here.parent / "configs"):
        if (candidate / "models").is_dir():
            return candidate
    raise FileNotFoundError(f"configs/ not found next to {here}")


def _presets_dir() -> pathlib.Path:
    return configs_dir() / "models"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a Llama / Mistral / Mixtral / Ministral decoder.

    The field names follow Mistral's reference code (dim, n_layers, hidden_dim, ...). `n_experts == 0`
    means a dense SwiGLU MLP; otherwise every layer is a top-`n_experts_per_tok` mixture of experts.
    """

    family: Family = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling as transformers' rope_parameters: None (plain), "linear" (every frequency / rope_factor) or
    # "llama3" (low frequencies / rope_factor, high ones kept, a smooth blend between, by the wavelengths of
    # rope_original_max_seq_len / rope_low_freq_factor and / rope_high_freq_factor).
    rope_scaling: RopeScaling | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 4096
    sliding_window: int | None = None  # a query sees itself and the window-1 tokens before it
    # The attention pattern per layer, as transformers' layer_types: "sliding_attention" layers see
    # sliding_window, "full_attention" ones the whole context. None: every layer alike (sliding_window or not).
    layer_types: tuple[str, ...] | None = None
    tie_embeddings: bool = False
    # Mixture of experts.
    n_experts: int = 0
    n_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    moe_dispatch: MoeDispatch = "auto"
    moe_capacity_factor: float = 2.0  # only for moe_dispatch="capacity": tokens past it are dropped
    # Special tokens (informational: tokenizers are authoritative).
    bos_id: int = 1
    eos_id: int = 2
    # Numerics: parameters are stored in param_dtype, matmuls run in dtype; softmax and norms in float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    init_std: float = 0.02
    # Layer layout: True stacks every block's weights under nn.scan (training, checkpoints), False keeps one
    # subtree and cache buffer per layer (decoding). model/layer_layout.py says why, and converts.
    scan_layers: bool = True
    # Attention kernel for prompts and training (a decode step always uses the XLA einsums): "xla", "cudnn"
    # (GPU only, bfloat16/float16: jax.nn.dot_product_attention's fused cuDNN kernel), "flash" (blockwise with
    # an online softmax, any backend: memory linear in the sequence; model/flash_attention.py), "splash"
    # (Pallas, TPU; interpret mode elsewhere; prefill chunks that read a cache take flash;
    # model/splash_attention.py) or "auto" (xla for short sequences, flash or cuDNN for long ones:
    # attention.attention_kernel).
    attention: AttentionKernel = "auto"
    # int8 (model/quant.py): quant="int8" stores every large matmul weight in int8 with float32 scales per output
    # channel; quant_matmul picks the int8 matmul ("int8_dot": int8 x int8 dots, the CPU's; "dequant": weight-only,
    # fused on GPU/TPU; "auto": per backend). kv_cache_dtype: the cache's dtype (None: dtype; "int8": with a
    # float32 scale per token and KV head, model/kv_cache.py).
    quant: Quant = "none"
    quant_matmul: QuantMatmul = "auto"
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim is None and self.dim % self.n_heads:
            problems.append(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); set head_dim")
        if self.head_dim is not None and self.head_dim % 2:
            problems.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.family not in families.NAMES:
            problems.append(f"family must be one of {families.NAMES}, got {self.family!r}")
        if self.layer_types is not None:
            kinds = (families.SLIDING, families.FULL)
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(kinds):
                problems.append(f"layer_types must be {self.n_layers} (n_layers) of {kinds}, got {self.layer_types}")
            elif self.sliding_window is None:
                problems.append("layer_types needs a sliding_window for its sliding_attention layers")
        if self.rope_scaling is not None and self.rope_scaling not in get_args(RopeScaling):
            problems.append(f"rope_scaling must be None or one of {get_args(RopeScaling)}, got {self.rope_scaling!r}")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            problems.append("rope_high_freq_factor must exceed rope_low_freq_factor")
        if self.rope_factor <= 0:
            problems.append(f"rope_factor must be positive, got {self.rope_factor}")
        if self.n_experts < 0 or (self.n_experts and not 0 < self.n_experts_per_tok <= self.n_experts):
            problems.append(f"need 0 < n_experts_per_tok ({self.n_experts_per_tok}) <= n_experts ({self.n_experts})")
        if self.moe_dispatch not in get_args(MoeDispatch):
            problems.append(f"moe_dispatch must be one of {get_args(MoeDispatch)}, got {self.moe_dispatch!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.attention not in get_args(AttentionKernel):
            problems.append(f"attention must be one of {get_args(AttentionKernel)}, got {self.attention!r}")
        for name, kind in (("quant", Quant), ("quant_matmul", QuantMatmul)):
            if getattr(self, name) not in get_args(kind):
                problems.append(f"{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in (*DTYPES, *KV_CACHE_DTYPES):
            problems.append(f"kv_cache_dtype must be None or one of {sorted(DTYPES) + list(KV_CACHE_DTYPES)}, "
                            f"got {self.kv_cache_dtype!r}")
        if problems:
            raise UserError("invalid ModelConfig: " + "; ".join(problems))

    # Derived quantities --------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weights_dtype(self):
        return DTYPES[self.param_dtype]

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: it sees the whole context)."""
        if self.layer_types is not None and self.layer_types[layer] == families.FULL:
            return None
        return self.sliding_window

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return tuple(self.layer_window(i) for i in range(self.n_layers))

    @property
    def window_groups(self) -> tuple[int | None, ...]:
        """The distinct layer windows, in the order layers first use them: a paged cache's layer groups."""
        return tuple(dict.fromkeys(self.layer_windows))

    @property
    def mixed_windows(self) -> bool:
        """Some layers slide and others see the whole context (layer_types mixes the two)."""
        return len(set(self.layer_windows)) > 1

    def cache_size(self, max_seq_len: int, lookahead: int = 0, window: int | None | str = "all") -> int:
        """Slots of the rolling KV cache: the window bounds it, however long the generation.

        lookahead: slots past the window for tokens written ahead and maybe taken back (speculative.py).
        window: that of one layer (ModelConfig.layer_window); "all": the largest any layer needs.
        """
        windows = self.layer_windows if window == "all" else (window,)
        if any(w is None for w in windows):
            return max_seq_len
        return min(max_seq_len, max(windows) + lookahead)

    def kv_slots(self, max_seq_len: int, lookahead: int = 0) -> int:
        """Cache slots summed over the layers, each layer's ring as the unscanned layout sizes it."""
        return sum(self.cache_size(max_seq_len, lookahead, w) for w in self.layer_windows)

    def param_counts(self) -> dict[str, int]:
        """Total parameters, and those a single token uses (fewer for a mixture of experts)."""
        d, hd = self.dim, self.resolved_head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        expert = 3 * d * self.hidden_dim
        router = d * self.n_experts if self.is_moe else 0
        experts_total = expert * max(self.n_experts, 1) + router
        experts_active = expert * (self.n_experts_per_tok if self.is_moe else 1) + router
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        norms = self.n_layers * 2 * d + d
        return {
            "total": embed + norms + self.n_layers * (attn + experts_total),
            "active": embed + norms + self.n_layers * (attn + experts_active),
        }

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Presets -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown ModelConfig fields: {unknown}")
        if values.get("layer_types") is not None:  # a JSON list; the config stays hashable with a tuple
            values = {**values, "layer_types": tuple(values["layer_types"])}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        path = _presets_dir() / f"{name}.json"
        if not path.is_file():
            raise UserError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
        values = json.loads(path.read_text())
        values.pop("description", None)
        values.pop("reference_params", None)
        return cls.from_dict({**values, **overrides})


def list_presets() -> list[str]:
    return sorted(p.stem for p in _presets_dir().glob("*.json"))


def preset_reference_params(name: str) -> dict[str, float]:
    """The published parameter counts a preset file records (billions), for checks and docs."""
    values = json.loads((_presets_dir() / f"{name}.json").read_text())
    return values.get("reference_params", {})
