"""`mistral-jax sft`: fine-tune a checkpoint on JSONL chats; `latest_params` reads a run back for export.

The settings and their flags are train/settings.py's. A run directory (mistral_jax/checkpoints/run_dir.py)
holds run.json, metrics.jsonl and checkpoints/ (orbax steps). It may be a URL (--output gs://bucket/runs/x),
as may an orbax --checkpoint (and its tokenizer); the data and the run config are read from local disk.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mistral_jax.errors import UserError, one_line
from mistral_jax.paths import as_path
from train.settings import SftSettings, add_flags, resolve

DESCRIPTION = "Fine-tune a checkpoint on JSONL chats (full or LoRA), with orbax checkpoints and exact resume."


def add_sft_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every sft flag: the settings' (train/settings.py) and the distributed ones."""
    from mistral_jax import distributed

    return distributed.add_distributed_flags(add_flags(parser))


def add_sft_parser(subparsers) -> argparse.ArgumentParser:
    """The `sft` sub-command on a parser's subparsers (mistral_jax.cli calls this)."""
    parser = subparsers.add_parser("sft", help="supervised fine-tuning on JSONL chats (full or LoRA)",
                                   description=DESCRIPTION)
    return add_sft_flags(parser)


def _run_info(config, checkpoint, tokenizer, s: SftSettings) -> dict:
    """What run.json holds: what latest_params and a resumed run need (model config, base checkpoint, LoRA) and
    every setting. Paths are strings: local ones absolute, URLs as given."""
    lora = {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": list(_lora_spec(s).targets)} if s.lora_rank else None
    return {"model_config": config.to_dict(), "checkpoint": str(checkpoint), "tokenizer": str(tokenizer),
            "lora": lora, "settings": s.to_json()}


def _lora_spec(s: SftSettings):
    """The LoraSpec the settings ask for, or None for a full fine-tune."""
    from mistral_jax import lora

    return lora.LoraSpec(s.lora_rank, float(s.lora_alpha), lora.parse_targets(s.lora_targets)) if s.lora_rank else None


def run(args: argparse.Namespace):
    """Fine-tune as the settings say; returns the loop's LoopResult (step reached and why it stopped).

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
    from train.data import load_data
    from train.optim import OptimConfig

    s = resolve(args)
    optim = OptimConfig(s.learning_rate, s.steps, s.warmup_steps, s.min_lr_ratio, s.weight_decay,
                        s.adam_b1, s.adam_b2, s.adam_eps, s.max_grad_norm)  # checks the schedule's settings
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
        raise UserError(f"{checkpoint} is a quantized ({quant}) checkpoint: sft trains float weights; "
                        "train from the float checkpoint it was converted from")
    spec = _lora_spec(s)
    if latest is not None and spec is None:  # the checkpoint holds every weight: no need to read the base model
        config, params = run_dir.model_config(output), None
    else:
        config, params = load(checkpoint, "float32", mesh=mesh)
    config = config.replace(dtype=s.compute_dtype, remat=bool(s.remat))
    tokenizer_path = as_path(s.tokenizer) if s.tokenizer else checkpoint
    if s.seq_len > config.max_seq_len:
        raise UserError(f"--seq-len {s.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    shape = loop.BatchShape(s.grad_accum, s.batch_size, s.seq_len)
    data = load_data(s.data, load_tokenizer(tokenizer_path, family=config.family), seq_len=s.seq_len,
                     rows=s.batch_size, micro_batches=s.grad_accum, packing=s.packing, seed=s.seed,
                     eval_fraction=s.eval_fraction, vocab_size=config.vocab_size,
                     process_index=jax.process_index(), process_count=jax.process_count())
    _report_data(say, data.stats, s.seq_len)
    aux_coef = s.aux_loss_coef if s.aux_loss_coef is not None else config.router_aux_loss_coef
    trainer = loop.Trainer(config, optim, shape, lora=spec, aux_loss_coef=aux_coef, mesh=mesh)

    if main:  # the first write: run.json before any checkpoint, so a run directory is always recognised
        run_dir.write_run_info(output, _run_info(config, checkpoint, tokenizer_path, s))
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
        _, result = loop.run_loop(trainer, state, data.train, manager, options, data.eval_rows)
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


def _report_data(say, stats: dict[str, int], seq_len: int) -> None:
    """One line of counts, and a warning for each kind of example that lost something."""
    say(f"data: {stats['conversations']} conversations, {stats['train']} train / {stats['eval']} eval; "
        f"counts below of the eval split and the {stats['checked']} first train conversations of this process")
    for key, what in (("truncated", f"longer than --seq-len {seq_len}, truncated"),
                      ("dropped", "without an assistant token within --seq-len, dropped"),
                      ("last_turn_only",
                       "trained on their last assistant turn only (the template is not incremental)")):
        if stats[key]:
            say(f"warning: {stats[key]} conversations {what}")


def latest_params(output_dir, mesh=None):
    """(config, params) of a run's latest checkpoint, LoRA adapters merged, on `mesh` or the first device
    (mistral_jax.checkpoints.load.run_params; float32, ready for checkpoints.hf.write)."""
    from mistral_jax.checkpoints.load import run_params

    return run_params(output_dir, mesh)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m train.sft ...`: the sft command alone; exit status 2 with one line for a user error."""
    parser = add_sft_flags(argparse.ArgumentParser(prog="mistral-jax sft", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        run(args)
    except Exception as err:
        if (line := one_line(err)) is None:
            raise
        print(f"mistral-jax sft: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
