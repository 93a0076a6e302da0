"""LoRA adapters served over one base: the registry of names (process 0's host side) and the device table.

`Adapters` (the engine's): each known adapter's name and path, checked against the base when added, and which
of the table's `max_loras` slots holds which adapter: a request pins its adapter's slot while it runs; one that
needs an adapter not resident takes the least recently used unpinned slot (its load travels in the plan), or waits
when every slot is pinned. Slot 0 is the empty slot (no adapter): the base model's rows.

`AdapterTable` (the runner's, on every process): the stacked factors on device, of fixed shape
[L, max_loras + 1, ..., max_lora_rank] per target (lora.slot_shapes), so loading an adapter into a slot is one
donated in-place update and no program ever recompiles for it. A plan's loads name (slot, path): every process
reads the adapter itself (the plan stays small).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import lora, sharding
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model import linear

DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 16  # vLLM's default


def parse_modules(specs) -> dict[str, str]:
    """vLLM's `--lora-modules NAME=PATH ...` -> {name: path}; a UserError naming the bad entry."""
    out: dict[str, str] = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora-modules: {spec!r} is not NAME=PATH")
        if name in out:
            raise UserError(f"--lora-modules: the name {name!r} is given twice")
        out[name] = path
    return out


def read(config: ModelConfig, path: str, max_lora_rank: int) -> lora.Adapter:
    """The adapter at `path` (a PEFT directory or an sft LoRA run), checked against the base and the table: a
    UserError of one line naming what differs (a weight's shape, a target, the rank)."""
    from mistral_jax.checkpoints.load import load_adapter  # checkpoints/load.py: a PEFT dir or a run, checked

    adapter = load_adapter(path, config)
    lora.slot_weights(adapter, lora.slot_shapes(config, lora.serving_targets(config), 1, max_lora_rank, jnp.float32))
    return adapter


class Adapters:
    """The served adapters by name and the device slot of each resident one (process 0; thread-safe)."""

    def __init__(self, config: ModelConfig, modules: dict[str, str] | None = None, *,
                 max_loras: int = DEFAULT_MAX_LORAS, max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> None:
        if max_loras < 1 or max_lora_rank < 1:
            raise UserError(f"--max-loras ({max_loras}) and --max-lora-rank ({max_lora_rank}) must be positive")
        self.config, self.max_loras, self.max_lora_rank = config, max_loras, max_lora_rank
        self.paths: dict[str, str] = {}
        self._lock = threading.Lock()
        # path -> the slot holding it, least recently used first (by path: a request keeps the adapter it was
        # submitted with, even if its name is unloaded or given to another path meanwhile)
        self._resident: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._pins: collections.Counter[int] = collections.Counter()  # slot -> requests running on it
        for name, path in (modules or {}).items():
            self.add(name, path)

    def add(self, name: str, path: str) -> None:
        """Serve `path` as `name` (read and checked now; a UserError if it does not fit the base)."""
        with self._lock:
            if name in self.paths:
                raise UserError(f"lora_name: the adapter {name!r} is already loaded")
        read(self.config, path, self.max_lora_rank)
        with self._lock:
            self.paths[name] = str(path)

    def remove(self, name: str) -> None:
        """Stop serving `name` (requests already submitted on it finish; its slot is reused once they do)."""
        with self._lock:
            del self.paths[name]

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def names(self) -> list[str]:
        with self._lock:
            return list(self.paths)

    def path(self, name: str | None) -> str | None:
        """Where adapter `name` is read from (None: the base); KeyError if it is not served."""
        return None if name is None else self.paths[name]

    def acquire(self, path: str | None) -> tuple[int, tuple[int, str] | None] | None:
        """A running request's slot for the adapter at `path` (None: 0, the base) pinned, and the (slot, path) to
        load there first if it is not resident; None when every slot is pinned by other adapters' requests (wait)."""
        if path is None:
            return 0, None
        with self._lock:
            slot, load = self._resident.get(path), None
            if slot is None:
                pinned = {s for s, n in self._pins.items() if n > 0}
                free = [s for s in range(1, self.max_loras + 1) if s not in self._resident.values()]
                if not free:  # evict the least recently used resident adapter whose slot no request uses
                    victim = next((p for p, s in self._resident.items() if s not in pinned), None)
                    if victim is None:
                        return None
                    free = [self._resident.pop(victim)]
                slot, load = free[0], (free[0], path)
                self._resident[path] = slot
            self._resident.move_to_end(path)
            self._pins[slot] += 1
            return slot, load

    def release(self, slot: int) -> None:
        """A request on `slot` finished."""
        if slot > 0:
            with self._lock:
                self._pins[slot] -= 1

    def forget_loads(self) -> None:
        """The device table was rebuilt empty (the runner's reset): every adapter must be loaded again."""
        with self._lock:
            self._resident.clear()


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _put_slot(weights, scale, slot, one, one_scale):
    """The table (weights per layer [N, ...], scale [N]; donated) with adapter `one` ([L, ...] per factor) and its
    scale written at slot `slot` (traced: any slot, one program)."""
    one = linear.unstack(one)
    return jax.tree.map(lambda t, w: t.at[slot].set(w.astype(t.dtype)), weights, one), scale.at[slot].set(one_scale)


@dataclasses.dataclass
class AdapterTable:
    """The adapters on device: a fixed-shape LoraSlots table, one subtree per layer (the decode layout's);
    `load` writes one slot in place."""

    config: ModelConfig
    max_loras: int
    max_lora_rank: int
    mesh: object = None  # a jax Mesh: the table is replicated over it (every device reads any row's adapter)

    def __post_init__(self):
        self.shapes = lora.slot_shapes(self.config, lora.serving_targets(self.config), self.max_loras + 1,
                                       self.max_lora_rank, self.config.compute_dtype)
        self.reset()

    def reset(self) -> None:
        zeros = linear.unstack(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.shapes))  # per layer
        self.weights, self.scale = sharding.put_replicated(self.mesh, (zeros, np.zeros((self.max_loras + 1,),
                                                                                        np.float32)))
        self._cache: dict[str, lora.Adapter] = {}

    def warm_up(self) -> None:
        """Compile `load`'s program now (writing zeros to the empty slot 0)."""
        zeros = jax.tree.map(lambda s: np.zeros(s.shape[:1] + s.shape[2:], s.dtype), self.shapes)
        self.weights, self.scale = _put_slot(self.weights, self.scale, jnp.int32(0), zeros, jnp.float32(0.0))

    def load(self, slot: int, path: str) -> None:
        """Adapter `path` into slot `slot` (read once per process, then kept on the host)."""
        adapter = self._cache.get(path)
        if adapter is None:
            adapter = self._cache[path] = read(self.config, path, self.max_lora_rank)
        one = lora.slot_weights(adapter, self.shapes)
        self.weights, self.scale = _put_slot(self.weights, self.scale, jnp.int32(slot), one,
                                             jnp.float32(adapter.scale))

    def slots(self, index) -> linear.LoraSlots:
        """The table with each row's (int32 [B]) or token's (int32 [B, T]) slot."""
        return linear.LoraSlots(self.weights, self.scale, index)
