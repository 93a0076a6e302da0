"""TrainState: what one train step takes and returns (a frozen pytree, so jit can donate and shard it)."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """The step counter, the trained part and its optimizer state, and the frozen base params with LoRA.

    A checkpoint holds `trainable` and `opt_state` (the step is the orbax step); `base` comes from the base
    checkpoint again on resume.
    """

    step: jax.Array  # int32 []
    trainable: Any  # the model's params (full fine-tune) or the LoRA adapters
    opt_state: Any  # optax state of `trainable`
    base: Any = None  # the base params, not trained (LoRA); None for a full fine-tune
