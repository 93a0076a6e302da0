"""The training loop: one jitted train step (sharded under a mesh), orbax checkpoints, metrics.jsonl,
SIGTERM (save and stop) and NaN (stop, keeping the last good checkpoint).

The state is a TrainState (train/state.py). The run directory's files (checkpoint items, metrics.jsonl) are
`mistral_jax.checkpoints.run_dir`'s; a checkpoint's step is the orbax step. Orbax writes each step to a
temporary directory and renames it when complete, so a checkpoint cut off mid-write is never listed, hence
never resumed.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm import tqdm

from mistral_jax import lora as lora_lib
from mistral_jax import sharding
from mistral_jax.checkpoints.run_dir import checkpoint_manager  # noqa: F401 (train.loop's API)
from mistral_jax.config import ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.model.moe import balance_loss
from mistral_jax.model.transformer import forward, param_shapes
from train.data import FIELDS, Batches, empty_rows
from train.logging import RunLog
from train.objectives import Sft
from train.optim import OptimConfig, accumulate_gradients, learning_rate_schedule, make_optimizer
from train.state import TrainState


class DivergedError(UserError):
    """The loss or gradient norm stopped being finite (the settings' fault, so the CLI prints it as one line)."""


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """A step's batch: grad_accum micro-batches of `rows` rows (over all hosts) of seq_len tokens."""

    grad_accum: int
    rows: int
    seq_len: int

    def __post_init__(self):
        processes = jax.process_count()
        if min(self.grad_accum, self.rows, self.seq_len) < 1 or self.rows % processes:
            raise UserError(f"need positive sizes and a batch size divisible by the {processes} processes, got {self}")

    @property
    def local_rows(self) -> int:
        """Rows of each micro-batch that this host supplies."""
        return self.rows // jax.process_count()


class Trainer:
    """The jitted train and eval steps of one model, objective (train/objectives.py: SFT by default, or DPO),
    optimizer, batch shape and (optionally) mesh.

    The frozen `base` of the state is the base model with LoRA (the adapters train on top of it) and the DPO
    reference model's weights: the base itself with LoRA (the adapters off: no second copy), a frozen copy of
    the starting weights, placed like the policy, for a full fine-tune.
    """

    def __init__(self, config: ModelConfig, optim: OptimConfig, shape: BatchShape, *,
                 lora: lora_lib.LoraSpec | None = None, aux_loss_coef: float = 0.0, mesh=None, objective=None):
        self.config, self.shape, self.lora, self.aux_loss_coef, self.mesh = config, shape, lora, aux_loss_coef, mesh
        self.objective = objective or Sft()
        self.keeps_base = bool(lora) or self.objective.uses_reference
        self.optimizer = make_optimizer(optim)
        self.schedule = learning_rate_schedule(optim)
        self._abstract = self._shapes()
        self.shardings = self._shardings() if mesh is not None else None
        train_batch = (shape.grad_accum, shape.rows, shape.seq_len)
        self.batch_sharding = self._batch_sharding(train_batch, (None, "batch", None))
        self.eval_sharding = self._batch_sharding(train_batch[1:], ("batch", None))
        self.train_step = self._jit(self._train_step, self.batch_sharding, returns_state=True)
        self.eval_step = self._jit(self._eval_step, self.eval_sharding, returns_state=False)

    def _jit(self, step_fn, batch_sharding, returns_state: bool):
        """jit a (state, batch) function; a step that returns the state donates it. Explicit shardings on a mesh."""
        donate = (0,) if returns_state else ()
        if self.mesh is None:
            return jax.jit(step_fn, donate_argnums=donate)
        metrics = sharding.replicated(self.mesh)
        return jax.jit(step_fn, donate_argnums=donate,
                       in_shardings=(self.shardings, {k: batch_sharding for k in FIELDS}),
                       out_shardings=(self.shardings, metrics) if returns_state else metrics)

    # Shapes and placement -------------------------------------------------------------------------
    def _shapes(self) -> TrainState:
        """The state as ShapeDtypeStructs (no memory used)."""
        params = param_shapes(self.config)
        trainable = jax.eval_shape(lambda: lora_lib.init(params, self.lora, jax.random.key(0))) if self.lora else params
        return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                          opt_state=jax.eval_shape(self.optimizer.init, trainable),
                          base=params if self.keeps_base else None)

    def _shardings(self) -> TrainState:
        """A NamedSharding for every leaf of the state: the sharding module's rules for params and adapters,
        the optimizer moments like their parameters, scalars replicated."""
        mesh, abstract, replicated = self.mesh, self._abstract, sharding.replicated(self.mesh)
        params = sharding.param_shardings(self.config, mesh)
        trainable = lora_lib.shardings(self.config, mesh, abstract.trainable) if self.lora else params
        opt_state = optax.tree_map_params(self.optimizer, lambda _, s: s, abstract.opt_state, trainable,
                                          transform_non_params=lambda _: replicated)
        return TrainState(step=replicated, trainable=trainable, opt_state=opt_state,
                          base=params if self.keeps_base else None)

    def _batch_sharding(self, shape, names):
        """A batch's NamedSharding from logical names (rows split over data and fsdp); None without a mesh."""
        return None if self.mesh is None else sharding.named(self.mesh, shape, names)

    def abstract_state(self):
        """ShapeDtypeStructs of the state with their target shardings (device 0 without a mesh), for restoring."""
        return sharding.abstract_arrays(self._abstract, self.shardings)

    def place_params(self, params):
        """The base parameters on the mesh (or as device arrays without one)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, params)
        return sharding.shard_params(self.config, params, self.mesh)

    def step_array(self, step: int):
        """The state's step counter, placed (replicated on the mesh)."""
        if self.mesh is None:
            return jnp.asarray(step, jnp.int32)
        return sharding.put(np.int32(step), self.shardings.step)

    def init_state(self, params, adapters=None) -> TrainState:
        """A fresh state: params (and adapters, with LoRA) placed, optimizer state initialised in place; a full
        fine-tune with a reference model keeps a copy of the params as its frozen base.

        Device arrays passed in become the state's own: train_step donates them.
        """
        params = self.place_params(params)
        base = params if self.lora else jax.tree.map(lambda x: x.copy(), params) if self.keeps_base else None
        if self.lora:
            if adapters is None:
                raise ValueError("a LoRA trainer needs adapters (mistral_jax.lora.init)")
            if self.mesh is not None:
                adapters = jax.tree.map(sharding.put, adapters, self.shardings.trainable)
        trainable = adapters if self.lora else params
        init = jax.jit(self.optimizer.init, out_shardings=None if self.mesh is None else self.shardings.opt_state)
        return TrainState(step=self.step_array(0), trainable=trainable, opt_state=init(trainable), base=base)

    def _put(self, local: dict[str, np.ndarray], global_shape, batch_sharding):
        """This host's rows -> global arrays of global_shape (split on the batch dimension across hosts)."""
        if self.mesh is None:
            return {k: jnp.asarray(local[k]) for k in FIELDS}
        return {k: jax.make_array_from_process_local_data(batch_sharding, local[k], global_shape) for k in FIELDS}

    def put_batch(self, local: dict[str, np.ndarray]):
        """This host's grad_accum * local_rows rows [N, L] -> the step's batch [K, rows, L] (micro-batch-major)."""
        k, rows, length = self.shape.grad_accum, self.shape.rows, self.shape.seq_len
        local = {name: local[name].reshape(k, self.shape.local_rows, length) for name in FIELDS}
        return self._put(local, (k, rows, length), self.batch_sharding)

    # The steps ------------------------------------------------------------------------------------
    def _model_params(self, state: TrainState, trainable):
        """The weights the forward uses: the trained params, or the base with the adapters merged in."""
        return lora_lib.merge(state.base, trainable, self.lora.scale) if self.lora else trainable

    def _reference_logits(self, state: TrainState, micro):
        """The reference model's logits [B, L, V] (no gradient), or None when the objective has no reference."""
        if not self.objective.uses_reference:
            return None
        out = forward(self.config, state.base, micro["inputs"], micro["positions"], micro["segment_ids"])
        return jax.lax.stop_gradient(out.logits)

    def _train_step(self, state: TrainState, batch):
        """One optimizer update from a [K, B, L] batch -> (new state, metrics of scalars).

        The load-balancing loss is the whole batch's, as without accumulation: with K > 1 micro-batches
        (and a coefficient) a forward-only pass over all of them first counts the experts' shares f_e, then
        each micro-batch adds its part of the router probabilities (moe.balance_loss). It is weighted by the
        objective's count, so it adds coefficient * aux to the mean objective.
        """
        moe, n_experts, objective = self.config.is_moe, self.config.n_experts, self.objective
        routed = None
        if moe and self.aux_loss_coef and self.shape.grad_accum > 1:
            routed = self._batch_routing(self._model_params(state, state.trainable), batch)
        batch_count = objective.count(batch)

        def loss_fn(trainable, micro):  # micro: FIELDS of [B, L]
            params = self._model_params(state, trainable)
            out = forward(self.config, params, micro["inputs"], micro["positions"], micro["segment_ids"])
            total, sums = objective.sums(out.logits, self._reference_logits(state, micro), micro)
            if not moe:
                return total, sums
            routing = out.aux["routing"]
            whole = jax.lax.stop_gradient(routing if routed is None else routed)
            aux_loss = balance_loss(routing, n_experts, whole)  # this micro-batch's share of the batch's
            return total + self.aux_loss_coef * aux_loss * batch_count, {**sums, "routing": routing}

        with sharding.activations(self.mesh):
            grads, sums = accumulate_gradients(loss_fn, state.trainable, batch)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
        new_state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                                  opt_state=opt_state)
        aux_loss = balance_loss(sums["routing"], n_experts) if moe else jnp.zeros((), jnp.float32)
        metrics = {**objective.metrics(sums), "aux_loss": aux_loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state.step), "input_tokens": jnp.sum(batch["positions"] >= 0)}
        return new_state, metrics

    def _batch_routing(self, params, batch):
        """moe.routing_totals of the whole [K, B, L] batch, forward only (the head on the last position only)."""

        def body(total, micro):
            out = forward(self.config, params, micro["inputs"], micro["positions"], micro["segment_ids"],
                          last_only=True)
            return jax.tree.map(jnp.add, total, out.aux["routing"]), None

        e = self.config.n_experts
        zero = {"assigned": jnp.zeros(e), "probs": jnp.zeros(e), "tokens": jnp.zeros(())}
        return jax.lax.scan(body, zero, batch)[0]

    def _eval_step(self, state: TrainState, batch):
        """The objective's sums over one [B, L] batch."""
        with sharding.activations(self.mesh):
            params = self._model_params(state, state.trainable)
            logits = forward(self.config, params, batch["inputs"], batch["positions"], batch["segment_ids"]).logits
            return self.objective.sums(logits, self._reference_logits(state, batch), batch)[1]

    def evaluate(self, state: TrainState, rows: dict[str, np.ndarray]) -> dict[str, float]:
        """The objective's eval metrics (eval_keys: SFT's token-mean loss, DPO's pair means) over all `rows` (the
        same on every host), in batches of the training rows."""
        b, local, length = self.shape.rows, self.shape.local_rows, self.shape.seq_len
        n = len(rows["inputs"])
        pad = empty_rows(-n % b, length)
        rows = {k: np.concatenate([rows[k], pad[k]]) for k in FIELDS}
        first = jax.process_index() * local
        sums = None
        for start in range(0, len(rows["inputs"]), b):
            part = {k: v[start + first: start + first + local] for k, v in rows.items()}
            out = jax.device_get(self.eval_step(state, self._put(part, (b, length), self.eval_sharding)))
            out = {k: np.float64(v) for k, v in out.items()}
            sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
        metrics = self.objective.metrics(sums)
        return {k: float(metrics[k]) for k in self.objective.eval_keys}


# Checkpoints (the manager: run_dir.checkpoint_manager) ------------------------------------------
def gather_data_state(local_state: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every process's stream indices in row order, for the checkpoint: {"streams": [R ints]}, the same table
    whatever the number of processes (train/data.py), so a run resumes on any number of them."""
    if jax.process_count() == 1:
        return {"streams": list(local_state["streams"])}
    table = multihost_utils.process_allgather(np.asarray(local_state["streams"], np.int64))  # [P, R / P]
    return {"streams": [int(i) for i in np.asarray(table).reshape(-1)]}


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_state: dict) -> int:
    """Start an async save of `state` at its step (the arrays are copied before this returns); the step."""
    step = int(jax.device_get(state.step))
    manager.save(step, force=True, args=ocp.args.Composite(
        trainable=ocp.args.StandardSave(state.trainable),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=ocp.args.JsonSave(data_state),
    ))
    return step


def restore_checkpoint(manager: ocp.CheckpointManager, trainer: Trainer, step: int,
                       base_params=None) -> tuple[TrainState, dict]:
    """(state, the data streams' table) from checkpoint `step`, placed as the trainer shards them.

    The base params (LoRA's base, DPO's reference) are not in the checkpoint: pass them (placed like a fresh
    state's).
    """
    abstract = trainer.abstract_state()
    restored = manager.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(abstract.trainable),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        data=ocp.args.JsonRestore(),
    ))
    base = None
    if trainer.keeps_base:
        if base_params is None:
            raise ValueError("resuming a LoRA or DPO run needs the base params")
        base = trainer.place_params(base_params)
    state = TrainState(step=trainer.step_array(step), trainable=restored["trainable"],
                       opt_state=restored["opt_state"], base=base)
    return state, restored["data"]


# The loop ------------------------------------------------------------------------------------------
class StopSignal:
    """SIGTERM sets a flag that the loop checks after every step (installed from the main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def handle(self, signum=None, frame=None) -> None:
        """The SIGTERM handler: only asks the loop to stop after the step in flight."""
        self.requested = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self.handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """Whether any host was asked to stop (all hosts must save the same step)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How long to train and how often to log, evaluate and save."""

    output_dir: pathlib.Path  # or a URL (an epath.Path)
    steps: int  # what the schedule spans
    stop_at: int | None = None  # stop (with a checkpoint) after this step
    save_every: int = 200
    eval_every: int = 200
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """Where a run ended and why."""

    step: int
    status: str  # "finished", "stopped" (--stop-at) or "preempted" (SIGTERM)
    loss: float | None  # the last step's training loss


def _finite(metrics: dict[str, float]) -> bool:
    """Whether the step's loss and gradient norm are finite numbers."""
    return math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


def run_loop(trainer: Trainer, state: TrainState, batches: Batches, manager: ocp.CheckpointManager,
             options: LoopOptions, eval_rows: dict[str, np.ndarray] | None = None, stop: StopSignal | None = None,
             log: RunLog | None = None):
    """Train from state's step to options.steps (or stop_at), logging, evaluating and checkpointing -> (state, result).

    Metrics are read back every step so a non-finite loss stops the run before anything is saved from it.
    `log` (process 0's; by default a RunLog of options.output_dir: metrics.jsonl and TensorBoard) drops the
    records after the state's step (from a run killed since its last checkpoint). The loop closes it.
    """
    main = jax.process_index() == 0
    step = int(jax.device_get(state.step))
    end = min(options.steps, options.stop_at or options.steps)
    status, loss = ("finished" if end == options.steps else "stopped"), None
    if log is None and main:
        log = RunLog(options.output_dir, resume_step=step, program=trainer.objective.name)
    bar = tqdm(total=options.steps, initial=step, disable=not main, desc=trainer.objective.name, unit="step",
               dynamic_ncols=True)
    window_tokens, window_seconds = 0.0, 0.0  # train-step time only: not data, eval or saving
    stop = stop or StopSignal()
    try:
        with stop:
            while step < end:
                batch = trainer.put_batch(next(batches))
                started = time.perf_counter()
                state, metrics = trainer.train_step(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                window_seconds += time.perf_counter() - started
                step += 1
                if not _finite(metrics):
                    manager.wait_until_finished()
                    raise DivergedError(
                        f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}; stopped. The last "
                        f"good checkpoint is step {manager.latest_step()} (try a lower --learning-rate)")
                loss, window_tokens = metrics["loss"], window_tokens + metrics["input_tokens"]
                record = {}
                if step % options.log_every == 0 or step == end:
                    record = {"step": step, **{k: metrics[k] for k in trainer.objective.log_keys},
                              "learning_rate": metrics["learning_rate"], "grad_norm": metrics["grad_norm"],
                              "tokens_per_second": window_tokens / window_seconds}
                    if trainer.config.is_moe:
                        record["aux_loss"] = metrics["aux_loss"]
                    window_tokens, window_seconds = 0.0, 0.0
                if eval_rows is not None and (step % options.eval_every == 0 or step == end):
                    evaluated = trainer.evaluate(state, eval_rows)
                    record.update(step=step, **{f"eval_{k}": v for k, v in evaluated.items()})
                if record and log:
                    log.write(record)
                preempted = stop.agreed()
                if step % options.save_every == 0 or step == end or preempted:
                    save_checkpoint(manager, state, gather_data_state(batches.state()))
                    if log:
                        log.flush()  # on a URL the lines up to the checkpoint reach storage now
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if preempted:
                    status = "preempted"
                    break
    finally:
        manager.wait_until_finished()
        bar.close()
        if log:
            log.close()
    return state, LoopResult(step, status, loss)
