"""`mistral-jax sft`: fine-tune a checkpoint on JSONL chats; `latest_params` reads a run back for export.

Settings come from, last wins: DEFAULTS, a JSON run config (`--config FILE`, keys named like the flags;
relative data/checkpoint/tokenizer paths resolve against the file's directory), the flags given.
A run directory holds run.json (model config, base checkpoint, LoRA settings, all settings),
metrics.jsonl and checkpoints/ (orbax steps). It may be a URL (--output gs://bucket/runs/x), as may an
orbax --checkpoint (and its tokenizer); the data and the run config are read from local disk.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import pathlib
import sys
from collections.abc import Sequence

from mistral_jax.paths import as_path, is_url, missing_filesystem, path_arg, require_local

DEFAULTS = {
    "config": None, "checkpoint": None, "tokenizer": None, "data": None, "output": None, "steps": None,
    "batch_size": 8, "seq_len": 2048, "grad_accum": 1, "packing": True, "eval_fraction": 0.05, "seed": 0,
    "learning_rate": None, "warmup_steps": None, "min_lr_ratio": 0.1, "weight_decay": 0.01,
    "adam_b1": 0.9, "adam_b2": 0.999, "adam_eps": 1e-8, "max_grad_norm": 1.0,
    "compute_dtype": "float32", "remat": False, "aux_loss_coef": None,
    "lora_rank": None, "lora_alpha": None, "lora_targets": "wq,wk,wv,wo",
    "save_every": None, "keep_checkpoints": 3, "eval_every": None, "log_every": 10, "stop_at": None, "resume": False,
    "mesh": None, "coordinator": None, "num_processes": None, "process_id": None,
}
PATH_KEYS = ("data", "checkpoint", "tokenizer")  # resolved against a run config file's directory
RUN_FILE = "run.json"
DESCRIPTION = "Fine-tune a checkpoint on JSONL chats (full or LoRA), with orbax checkpoints and exact resume."
FULL_LR, LORA_LR = 2e-5, 2e-4


def _positive(kind):
    """An argparse type: `kind` (int or float) that must be > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def add_sft_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every sft flag. Defaults are left out of the namespace (SUPPRESS) so `resolve` can tell what was given."""
    from mistral_jax import distributed

    d, pos_int, pos_float = DEFAULTS, _positive(int), _positive(float)

    def flag(group, *names, **kwargs):
        group.add_argument(*names, default=argparse.SUPPRESS, **kwargs)

    flag(parser, "--config", metavar="FILE", type=path_arg,
         help="JSON run config (keys like the flags); flags override it")
    flag(parser, "--checkpoint", metavar="PATH", type=path_arg,
         help="model to fine-tune: HF directory, .gguf, consolidated or orbax checkpoint (orbax also on gs://) "
              "(default: the embedded SmolLM2-135M-Instruct)")
    flag(parser, "--tokenizer", metavar="PATH", type=path_arg,
         help="tokenizer file or directory (default: the checkpoint's)")
    flag(parser, "--data", metavar="FILE.jsonl", type=path_arg,
         help='JSONL file on local disk, one {"messages": [{"role", "content"}, ...]} a line')
    flag(parser, "--output", metavar="DIR", type=path_arg,
         help="run directory, local or gs://: run.json, metrics.jsonl, checkpoints/")
    flag(parser, "--steps", metavar="N", type=pos_int, help="optimizer steps; the learning-rate schedule spans them")
    data = parser.add_argument_group("data")
    flag(data, "--batch-size", metavar="B", type=pos_int,
         help=f"rows per micro-batch, all hosts (default {d['batch_size']})")
    flag(data, "--seq-len", metavar="L", type=pos_int, help=f"tokens per row (default {d['seq_len']})")
    flag(data, "--grad-accum", metavar="K", type=pos_int, help="micro-batches per step (default 1)")
    flag(data, "--packing", action=argparse.BooleanOptionalAction,
         help="pack several examples per row (default) or pad one per row")
    flag(data, "--eval-fraction", metavar="F", type=float,
         help=f"held-out share of the conversations, at least one (default {d['eval_fraction']}; 0: none)")
    flag(data, "--seed", metavar="S", type=int, help="shuffling, eval split and LoRA init (default 0)")
    opt = parser.add_argument_group("optimizer")
    flag(opt, "--learning-rate", metavar="LR", type=pos_float,
         help=f"peak learning rate (default {FULL_LR}, {LORA_LR} with LoRA)")
    flag(opt, "--warmup-steps", metavar="W", type=int, help="linear warmup (default max(1, steps // 20))")
    flag(opt, "--min-lr-ratio", metavar="R", type=float, help="cosine floor / peak (default 0.1)")
    flag(opt, "--weight-decay", metavar="WD", type=float, help="AdamW decay, not on norms (default 0.01)")
    flag(opt, "--adam-b1", metavar="B1", type=float, help="default 0.9")
    flag(opt, "--adam-b2", metavar="B2", type=float, help="default 0.999")
    flag(opt, "--adam-eps", metavar="EPS", type=float, help="default 1e-8")
    flag(opt, "--max-grad-norm", metavar="G", type=float, help="global-norm clipping (default 1.0; 0: off)")
    flag(opt, "--compute-dtype", choices=("float32", "bfloat16"),
         help="matmul dtype; weights and optimizer stay float32 (default float32)")
    flag(opt, "--remat", action=argparse.BooleanOptionalAction,
         help="recompute each block's activations in the backward pass (default off)")
    flag(opt, "--aux-loss-coef", metavar="C", type=float,
         help="MoE load-balancing loss weight (default: the checkpoint's router_aux_loss_coef)")
    lora = parser.add_argument_group("LoRA")
    flag(lora, "--lora-rank", metavar="R", type=pos_int, help="train rank-R adapters only (default: full fine-tune)")
    flag(lora, "--lora-alpha", metavar="A", type=pos_float, help="adapter scale alpha/R (default 2R)")
    flag(lora, "--lora-targets", metavar="W,...",
         help="comma-separated weights among wq,wk,wv,wo,w_gate,w_up,w_down (default wq,wk,wv,wo)")
    run = parser.add_argument_group("checkpoints and logging")
    flag(run, "--save-every", metavar="K", type=pos_int, help="checkpoint period (default max(1, steps // 10))")
    flag(run, "--keep-checkpoints", metavar="K", type=pos_int, help="checkpoints kept (default 3)")
    flag(run, "--eval-every", metavar="K", type=pos_int, help="eval period (default: --save-every)")
    flag(run, "--log-every", metavar="K", type=pos_int, help="metrics.jsonl period (default 10)")
    flag(run, "--stop-at", metavar="K", type=pos_int,
         help="stop after this step with a checkpoint; the schedule still spans --steps")
    flag(run, "--resume", action="store_true", help="continue from the latest complete checkpoint in --output")
    distributed.add_distributed_flags(parser)
    return parser


def add_sft_parser(subparsers) -> argparse.ArgumentParser:
    """The `sft` sub-command on a parser's subparsers (mistral_jax.cli calls this)."""
    parser = subparsers.add_parser("sft", help="supervised fine-tuning on JSONL chats (full or LoRA)",
                                   description=DESCRIPTION)
    return add_sft_flags(parser)


def _read_run_config(path) -> dict:
    """A JSON run config as settings: keys like the flags (dashes or underscores), input paths made absolute
    (URLs kept as they are)."""
    from mistral_jax.checkpoints.errors import read_json

    require_local(path, "a run config (--config)")
    path = pathlib.Path(path)
    values = read_json(path)
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(DEFAULTS) - {"description"})
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    values.pop("description", None)
    for key in PATH_KEYS:
        if values.get(key) is not None and not is_url(values[key]):
            values[key] = str((path.parent / values[key]).resolve())
    return values


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """The run's settings: DEFAULTS < run config file < given flags, derived defaults filled in."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    file = _read_run_config(given["config"]) if given.get("config") else {}
    s = argparse.Namespace(**{**DEFAULTS, **file, **given})
    missing = [f"--{k}" for k in ("data", "output", "steps") if getattr(s, k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (as flags or in --config)")
    require_local(s.data, "JSONL data (--data)")  # these two before any model is loaded
    if s.checkpoint is not None:
        from mistral_jax.checkpoints.load import check_url

        check_url(s.checkpoint)
    if s.warmup_steps is None:
        s.warmup_steps = max(1, s.steps // 20)
    if s.learning_rate is None:
        s.learning_rate = LORA_LR if s.lora_rank else FULL_LR
    if s.lora_rank and s.lora_alpha is None:
        s.lora_alpha = 2.0 * s.lora_rank
    if s.save_every is None:
        s.save_every = max(1, s.steps // 10)
    if s.eval_every is None:
        s.eval_every = s.save_every
    return s


def _load_model(path, mesh):
    """(config, float32 params) streamed leaf by leaf onto the mesh (or device 0), never whole on one device.
    `path` may be an orbax checkpoint's URL."""
    import jax.numpy as jnp

    from mistral_jax import sharding
    from mistral_jax.checkpoints import hf_layout, orbax
    from mistral_jax.checkpoints.load import check_url, read

    check_url(path)
    if orbax.is_orbax_dir(path):
        config = orbax.read_config(path).replace(dtype="float32", param_dtype="float32")
        shardings = sharding.param_shardings(config, mesh) if mesh is not None else None
        return config, orbax.restore(path, orbax.abstract_params(config, shardings))
    config, tensors = read(path)
    config = config.replace(dtype="float32", param_dtype="float32")
    if mesh is None:
        place = lambda _, array: jnp.asarray(array)  # noqa: E731
    else:
        shardings = sharding.param_shardings(config, mesh)
        place = lambda leaf, array: sharding.put(array, functools.reduce(operator.getitem, leaf, shardings))  # noqa: E731
    return config, hf_layout.to_params(config, tensors, "float32", source=str(path), place=place)


def _write_run_info(output, config, checkpoint, tokenizer, s) -> None:
    """OUTPUT/run.json: what latest_params and a resumed run need (model config, base checkpoint, LoRA) and every
    setting. Paths are strings: local ones absolute, URLs as given."""
    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in vars(s).items() if k in DEFAULTS}
    lora = {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": list(_lora_spec(s).targets)} if s.lora_rank else None
    info = {"model_config": config.to_dict(), "checkpoint": str(checkpoint), "tokenizer": str(tokenizer),
            "lora": lora, "settings": settings}
    (as_path(output) / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _lora_spec(s):
    """The LoraSpec the settings ask for, or None for a full fine-tune."""
    from train import lora

    return lora.LoraSpec(s.lora_rank, float(s.lora_alpha), lora.parse_targets(s.lora_targets)) if s.lora_rank else None


def run(args: argparse.Namespace):
    """Fine-tune as the settings say; returns the loop's LoopResult (step reached and why it stopped)."""
    import jax

    from mistral_jax import distributed
    from mistral_jax.checkpoints.embedded import default_model_path
    from mistral_jax.tokenizers import load_tokenizer
    from train import lora, loop
    from train.data import load_data
    from train.optim import OptimConfig

    s = resolve(args)
    mesh = distributed.setup(s)
    main = distributed.is_main_process()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if main else (lambda text: None)  # noqa: E731
    output = as_path(s.output)  # the same on every process: orbax writes each one's shards under it
    checkpoint = as_path(s.checkpoint) if s.checkpoint else default_model_path()
    manager = loop.checkpoint_manager(output, keep=s.keep_checkpoints)
    try:
        latest = manager.latest_step()
        if latest is not None and not s.resume:
            raise ValueError(f"{output} already has checkpoints (latest step {latest}); pass --resume or another --output")
        spec = _lora_spec(s)
        if latest is not None and spec is None:  # the checkpoint holds every weight: no need to read the base model
            config, params = run_model_config(output), None
        else:
            config, params = _load_model(checkpoint, mesh)
        config = config.replace(dtype=s.compute_dtype, remat=bool(s.remat))
        tokenizer_path = as_path(s.tokenizer) if s.tokenizer else checkpoint
        if s.seq_len > config.max_seq_len:
            raise ValueError(f"--seq-len {s.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
        shape = loop.BatchShape(s.grad_accum, s.batch_size, s.seq_len)
        data = load_data(s.data, load_tokenizer(tokenizer_path, family=config.family), seq_len=s.seq_len,
                         rows=s.grad_accum * shape.local_rows, packing=s.packing, seed=s.seed,
                         eval_fraction=s.eval_fraction, vocab_size=config.vocab_size,
                         process_index=jax.process_index(), process_count=jax.process_count())
        _report_data(say, data.stats, s.seq_len)

        optim = OptimConfig(s.learning_rate, s.steps, s.warmup_steps, s.min_lr_ratio, s.weight_decay,
                            s.adam_b1, s.adam_b2, s.adam_eps, s.max_grad_norm)
        aux_coef = s.aux_loss_coef if s.aux_loss_coef is not None else config.router_aux_loss_coef
        trainer = loop.Trainer(config, optim, shape, lora=spec, aux_loss_coef=aux_coef, mesh=mesh)
        if latest is not None:
            state, data_state = loop.restore_checkpoint(manager, trainer, latest, base_params=params)
            data.train.restore(data_state)
            say(f"resuming from step {latest}")
        else:
            if s.resume:
                say(f"--resume: no checkpoint in {output / loop.CHECKPOINTS_DIR} yet, starting from step 0")
            state = trainer.init_state(params, lora.init(params, spec, jax.random.key(s.seed)) if spec else None)
        del params
        if main:
            _write_run_info(output, config, checkpoint, tokenizer_path, s)
        options = loop.LoopOptions(output, s.steps, s.stop_at, s.save_every, s.eval_every, s.log_every)
        _, result = loop.run_loop(trainer, state, data.train, manager, options, data.eval_rows)
    finally:
        manager.close()
    say(f"{result.status} at step {result.step}" + (f", loss {result.loss:.4f}" if result.loss is not None else "")
        + f"; checkpoints in {output / loop.CHECKPOINTS_DIR}")
    return result


def _report_data(say, stats: dict[str, int], seq_len: int) -> None:
    """One line of counts, and a warning for each kind of example that lost something."""
    say(f"data: {stats['conversations']} conversations, {stats['train']} train / {stats['eval']} eval")
    for key, what in (("truncated", f"longer than --seq-len {seq_len}, truncated"),
                      ("dropped", "without an assistant token within --seq-len, dropped"),
                      ("last_turn_only", "trained on their last assistant turn only (the template is not incremental)")):
        if stats[key]:
            say(f"warning: {stats[key]} conversations {what}")


def latest_params(output_dir, mesh=None):
    """(config, params) of a run's latest checkpoint, LoRA adapters merged, on `mesh` (sharded as
    `mistral_jax.sharding` places parameters) or, without one, on the host's first device.

    The config is the trained model's with float32 weights and compute (ready for checkpoints.hf.write).
    `output_dir` may be a URL (gs://...), as may the base checkpoint of a LoRA run.
    """
    import jax

    from mistral_jax import sharding
    from mistral_jax.checkpoints import orbax
    from mistral_jax.model.transformer import logical_axes
    from train import lora, loop

    output = as_path(output_dir)
    info = run_info(output)
    config = run_model_config(output).replace(dtype="float32", remat=False)
    manager = loop.checkpoint_manager(output, read_only=True)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{output / loop.CHECKPOINTS_DIR} holds no complete checkpoint")
        shardings = sharding.param_shardings(config, mesh) if mesh is not None else None
        if not info["lora"]:
            return config, _restore_trainable(manager, step, orbax.abstract_params(config, shardings))
        spec = lora.LoraSpec(info["lora"]["rank"], info["lora"]["alpha"], tuple(info["lora"]["targets"]))
        _, base = _load_model(info["checkpoint"], mesh)
        abstract = jax.eval_shape(lambda: lora.init(base, spec, jax.random.key(0)))
        placed = None
        if mesh is not None:  # as the trainer shards them
            axes = lora.logical_axes(logical_axes(config), abstract)
            placed = jax.tree.map(lambda x, names: sharding.named(mesh, x.shape, tuple(names)), abstract, axes)
        target = sharding.abstract_arrays(abstract, placed)
        adapters = _restore_trainable(manager, step, target)
        if mesh is None:
            return config, lora.merge(base, adapters, spec.scale)
        merge = jax.jit(lambda b, a: lora.merge(b, a, spec.scale), out_shardings=shardings, donate_argnums=0)
        return config, merge(base, adapters)  # each merged weight computed shard by shard, where it stays
    finally:
        manager.close()


def is_run_dir(path) -> bool:
    """Whether `path` (local or a URL) is an sft run directory (it holds run.json)."""
    return (as_path(path) / RUN_FILE).is_file()


def run_info(output) -> dict:
    """A run directory's run.json: model config, base checkpoint and tokenizer paths, LoRA settings."""
    path = as_path(output) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{output} is not an sft run directory: {RUN_FILE} is missing")
    return json.loads(path.read_text())


def run_model_config(output):
    """The trained model's ModelConfig (float32 weights) from a run directory's run.json."""
    from mistral_jax.config import ModelConfig

    return ModelConfig.from_dict(run_info(output)["model_config"])


def _restore_trainable(manager, step: int, target):
    """Only the trained part (params or adapters) of checkpoint `step`, placed like `target`."""
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(target)))["trainable"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m train.sft ...`: the sft command alone; exit status 2 with one line for a user error."""
    parser = add_sft_flags(argparse.ArgumentParser(prog="mistral-jax sft", description=DESCRIPTION))
    args = parser.parse_args(argv)
    from mistral_jax.checkpoints.errors import CheckpointError

    try:
        run(args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"mistral-jax sft: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # gs:// without gcsfs
        if (line := missing_filesystem(err)) is None:
            raise
        print(f"mistral-jax sft: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
