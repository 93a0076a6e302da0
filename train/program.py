"""What `mistral-jax sft` and `mistral-jax dpo` share: settings -> model, data, trainer -> the loop, and main.

A Program names what differs: its objective (train/objectives.py), how it reads its data (chats or preference
pairs) and how it reports the data's counts. Everything else (checkpoints, exact resume, meshes and processes,
URLs, LoRA) is one code path. The run directory (mistral_jax/checkpoints/run_dir.py) holds run.json,
metrics.jsonl, checkpoints/ (orbax steps) and tensorboard/ (train/logging.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from mistral_jax.errors import UserError, one_line
from mistral_jax.paths import as_path
from train.settings import TrainSettings, add_flags, resolve


@dataclasses.dataclass(frozen=True)
class Program:
    """One training program: its name, help, objective and data."""

    name: str  # "sft" or "dpo": the sub-command and the settings it has
    help: str  # one line for the sub-command list
    description: str
    objective: Callable[[TrainSettings], object]  # settings -> a train.objectives objective
    load_data: Callable  # (settings, tokenizer, vocab_size, process_index, process_count) -> train.data.SFTData
    report: Callable  # (say, stats, seq_len) -> None: the data's counts and warnings, on process 0


def add_program_flags(parser: argparse.ArgumentParser, program: Program) -> argparse.ArgumentParser:
    """Every flag of `program`: its settings' (train/settings.py) and the distributed ones."""
    from mistral_jax import distributed

    return distributed.add_distributed_flags(add_flags(parser, program.name))


def add_program_parser(subparsers, program: Program) -> argparse.ArgumentParser:
    """The program's sub-command on a parser's subparsers (mistral_jax.cli calls this)."""
    parser = subparsers.add_parser(program.name, help=program.help, description=program.description)
    return add_program_flags(parser, program)


def _run_info(config, checkpoint, tokenizer, s: TrainSettings, program: Program) -> dict:
    """What run.json holds: what latest_params and a resumed run need (model config, base checkpoint, LoRA), the
    program and every setting. Paths are strings: local ones absolute, URLs as given."""
    lora = {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": list(_lora_spec(s).targets)} if s.lora_rank else None
    return {"model_config": config.to_dict(), "checkpoint": str(checkpoint), "tokenizer": str(tokenizer),
            "lora": lora, "program": program.name, "settings": s.to_json()}


def _lora_spec(s: TrainSettings):
    """The LoraSpec the settings ask for, or None for a full fine-tune."""
    from mistral_jax import lora

    return lora.LoraSpec(s.lora_rank, float(s.lora_alpha), lora.parse_targets(s.lora_targets)) if s.lora_rank else None


def run(args: argparse.Namespace, program: Program):
    """Train as the settings say; returns the loop's LoopResult (step reached and why it stopped).

    Every input and the output directory are checked, the model and data loaded, before anything is written.
    """
    import jax

    from mistral_jax import distributed, lora
    from mistral_jax.checkpoints import run_dir
    from mistral_jax.checkpoints.embedded import default_model_path
    from mistral_jax.checkpoints.load import load
    from mistral_jax.checkpoints.orbax import stored_quant
    from mistral_jax.tokenizers import load_tokenizer
    from train import loop
    from train.logging import RunLog
    from train.optim import OptimConfig

    s = resolve(args, program.name)
    optim = OptimConfig(s.learning_rate, s.steps, s.warmup_steps, s.min_lr_ratio, s.weight_decay,
                        s.adam_b1, s.adam_b2, s.adam_eps, s.max_grad_norm)  # checks the schedule's settings
    objective = program.objective(s)
    output = as_path(s.output)  # the same on every process: orbax writes each one's shards under it
    run_dir.check_output(output)
    mesh = distributed.setup(s)
    main = distributed.is_main_process()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if main else (lambda text: None)  # noqa: E731
    checkpoint = as_path(s.checkpoint) if s.checkpoint else default_model_path()
    latest = _agreed_latest_step(output)
    if latest is not None and not s.resume:
        raise UserError(f"{output} already has checkpoints (latest step {latest}); pass --resume or another --output")
    if (quant := stored_quant(checkpoint)) != "none":  # refused before the weights are read
        raise UserError(f"{checkpoint} is a quantized ({quant}) checkpoint: {program.name} trains float weights; "
                        "train from the float checkpoint it was converted from")
    spec = _lora_spec(s)
    if latest is not None and spec is None and not objective.uses_reference:
        config, params = run_dir.model_config(output), None  # the checkpoint holds every weight the run needs
    else:
        config, params = load(checkpoint, "float32", mesh=mesh)
    config = config.replace(dtype=s.compute_dtype, remat=bool(s.remat))
    tokenizer_path = as_path(s.tokenizer) if s.tokenizer else checkpoint
    if s.seq_len > config.max_seq_len:
        raise UserError(f"--seq-len {s.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    shape = loop.BatchShape(s.grad_accum, s.batch_size * objective.rows_per_example, s.seq_len)
    tokenizer = load_tokenizer(tokenizer_path, family=config.family)
    data = program.load_data(s, tokenizer, config.vocab_size, jax.process_index(), jax.process_count())
    program.report(say, data.stats, s.seq_len)
    aux_coef = s.aux_loss_coef if s.aux_loss_coef is not None else config.router_aux_loss_coef
    trainer = loop.Trainer(config, optim, shape, lora=spec, aux_loss_coef=aux_coef, mesh=mesh, objective=objective)

    if main:  # the first write: run.json before any checkpoint, so a run directory is always recognised
        run_dir.write_run_info(output, _run_info(config, checkpoint, tokenizer_path, s, program))
    manager = run_dir.checkpoint_manager(output, keep=s.keep_checkpoints)
    try:
        if latest is not None:
            state, data_state = loop.restore_checkpoint(manager, trainer, latest, base_params=params)
            data.train.restore(data_state)
            say(f"resuming from step {latest}")
        else:
            if s.resume:
                say(f"--resume: no checkpoint in {output / run_dir.CHECKPOINTS_DIR} yet, starting from step 0")
            state = trainer.init_state(params, lora.init(params, spec, jax.random.key(s.seed)) if spec else None)
        del params
        options = loop.LoopOptions(output, s.steps, s.stop_at, s.save_every, s.eval_every, s.log_every)
        log = RunLog(output, resume_step=latest or 0, settings=s.to_json(), program=program.name) if main else None
        _, result = loop.run_loop(trainer, state, data.train, manager, options, data.eval_rows, log=log)
    finally:
        manager.close()
    say(f"{result.status} at step {result.step}" + (f", loss {result.loss:.4f}" if result.loss is not None else "")
        + f"; checkpoints in {output / run_dir.CHECKPOINTS_DIR}")
    return result


def _agreed_latest_step(output) -> int | None:
    """The run's latest checkpoint step as process 0 saw it, before any process writes: without the barrier a
    slow process could look after process 0 had created checkpoints/ (or saved) and see another run."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from mistral_jax.checkpoints import run_dir

    latest = run_dir.latest_step(output)
    if jax.process_count() == 1:
        return latest
    agreed = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if latest is None else latest)))
    return None if agreed < 0 else agreed


def main(program: Program, argv: Sequence[str] | None = None) -> int:
    """`python -m train.<program> ...`: the command alone; exit status 2 with one line for a user error."""
    parser = add_program_flags(argparse.ArgumentParser(prog=f"mistral-jax {program.name}",
                                                       description=program.description), program)
    args = parser.parse_args(argv)
    try:
        run(args, program)
    except Exception as err:
        if (line := one_line(err)) is None:
            raise
        print(f"mistral-jax {program.name}: error: {line}", file=sys.stderr)
        return 2
    return 0
