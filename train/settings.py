"""TrainSettings: every setting of `mistral-jax sft` and `mistral-jax dpo` with its default and help, the flags
made from them, `resolve`. The two programs share every setting but DPO's own (group "DPO", dpo only).

Settings come from, last wins: the defaults, a JSON run config (`--config FILE`, keys named like the flags;
relative data/checkpoint/tokenizer paths resolve against the file's directory), the flags given. Settings left
None are derived by `resolve` (warmup, learning rate, LoRA alpha, save and eval periods).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from typing import Any

from mistral_jax.errors import UserError
from mistral_jax.paths import is_url, path_arg, require_local

FULL_LR, LORA_LR = 2e-5, 2e-4
PATH_KEYS = ("data", "checkpoint", "tokenizer")  # resolved against a run config file's directory
PROGRAMS = ("sft", "dpo")


def _positive(kind):
    """An argparse type: `kind` (int or float) that must be > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


POS_INT, POS_FLOAT = _positive(int), _positive(float)
BOOL_FLAG = {"action": argparse.BooleanOptionalAction}


def _setting(default: Any = None, help: str | None = None, group: str | None = None,
             programs: tuple[str, ...] = PROGRAMS, **flag: Any):
    """A field with its flag: argparse keywords (metavar, type, choices, action); "{default}" in help is filled
    in. help=None: no flag here (the distributed flags come from mistral_jax.distributed). `programs`: the
    programs that have the setting."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "flag": flag,
                                                        "programs": programs})


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One sft or dpo run's settings (flag --name-with-dashes for each field name_with_underscores)."""

    config: Any = _setting(help="JSON run config (keys like the flags); flags override it", metavar="FILE",
                           type=path_arg)
    checkpoint: Any = _setting(help="model to fine-tune: HF directory, .gguf, consolidated or orbax checkpoint "
                                    "(orbax also on gs://) (default: the embedded SmolLM2-135M-Instruct)",
                               metavar="PATH", type=path_arg)
    tokenizer: Any = _setting(help="tokenizer file or directory (default: the checkpoint's)", metavar="PATH",
                              type=path_arg)
    data: Any = _setting(help='JSONL file on local disk: sft, one {"messages": [{"role", "content"}, ...]} a line; '
                              'dpo, one {"prompt", "chosen", "rejected"} a line (text or message lists)',
                         metavar="FILE.jsonl", type=path_arg)
    output: Any = _setting(help="run directory, local or gs://: run.json, metrics.jsonl, checkpoints/",
                           metavar="DIR", type=path_arg)
    steps: int | None = _setting(help="optimizer steps; the learning-rate schedule spans them", metavar="N",
                                 type=POS_INT)
    # data
    batch_size: int = _setting(8, "rows (dpo: pairs, 2 rows each) per micro-batch, all hosts (default {default})",
                               "data", metavar="B", type=POS_INT)
    seq_len: int = _setting(2048, "tokens per row (default {default})", "data", metavar="L", type=POS_INT)
    grad_accum: int = _setting(1, "micro-batches per step (default {default})", "data", metavar="K", type=POS_INT)
    packing: bool = _setting(True, "pack several examples per row (default) or pad one per row", "data",
                             programs=("sft",), **BOOL_FLAG)
    eval_fraction: float = _setting(0.05, "held-out share of the examples, at least one (default {default}; "
                                          "0: none)", "data", metavar="F", type=float)
    seed: int = _setting(0, "shuffling, eval split and LoRA init (default {default})", "data", metavar="S", type=int)
    # optimizer
    learning_rate: float | None = _setting(None, f"peak learning rate (default {FULL_LR}, {LORA_LR} with LoRA)",
                                           "optimizer", metavar="LR", type=POS_FLOAT)
    warmup_steps: int | None = _setting(None, "linear warmup (default max(1, steps // 20))", "optimizer",
                                        metavar="W", type=int)
    min_lr_ratio: float = _setting(0.1, "cosine floor / peak (default {default})", "optimizer", metavar="R",
                                   type=float)
    weight_decay: float = _setting(0.01, "AdamW decay, not on norms (default {default})", "optimizer",
                                   metavar="WD", type=float)
    adam_b1: float = _setting(0.9, "default {default}", "optimizer", metavar="B1", type=float)
    adam_b2: float = _setting(0.999, "default {default}", "optimizer", metavar="B2", type=float)
    adam_eps: float = _setting(1e-8, "default 1e-8", "optimizer", metavar="EPS", type=float)
    max_grad_norm: float = _setting(1.0, "global-norm clipping (default {default}; 0: off)", "optimizer",
                                    metavar="G", type=float)
    compute_dtype: str = _setting("float32", "matmul dtype; weights and optimizer stay float32 (default {default})",
                                  "optimizer", choices=("float32", "bfloat16"))
    remat: bool = _setting(False, "recompute each block's activations in the backward pass (default off)",
                           "optimizer", **BOOL_FLAG)
    aux_loss_coef: float | None = _setting(None, "MoE load-balancing loss weight (default: the checkpoint's "
                                                 "router_aux_loss_coef)", "optimizer", metavar="C", type=float)
    # DPO
    beta: float = _setting(0.1, "DPO's beta: how far the policy may move from the reference (default {default})",
                           "DPO", ("dpo",), metavar="BETA", type=POS_FLOAT)
    loss: str = _setting("sigmoid", "DPO loss: sigmoid (DPO) or ipo (default {default})", "DPO", ("dpo",),
                         choices=("sigmoid", "ipo"))
    # LoRA
    lora_rank: int | None = _setting(None, "train rank-R adapters only (default: full fine-tune)", "LoRA",
                                     metavar="R", type=POS_INT)
    lora_alpha: float | None = _setting(None, "adapter scale alpha/R (default 2R)", "LoRA", metavar="A",
                                        type=POS_FLOAT)
    lora_targets: str = _setting("wq,wk,wv,wo", "comma-separated weights among wq,wk,wv,wo,w_gate,w_up,w_down "
                                                "(default {default})", "LoRA", metavar="W,...")
    # checkpoints and logging
    save_every: int | None = _setting(None, "checkpoint period (default max(1, steps // 10))",
                                      "checkpoints and logging", metavar="K", type=POS_INT)
    keep_checkpoints: int = _setting(3, "checkpoints kept (default {default})", "checkpoints and logging",
                                     metavar="K", type=POS_INT)
    eval_every: int | None = _setting(None, "eval period (default: --save-every)", "checkpoints and logging",
                                      metavar="K", type=POS_INT)
    log_every: int = _setting(10, "metrics.jsonl period (default {default})", "checkpoints and logging",
                              metavar="K", type=POS_INT)
    stop_at: int | None = _setting(None, "stop after this step with a checkpoint; the schedule still spans --steps",
                                   "checkpoints and logging", metavar="K", type=POS_INT)
    resume: bool = _setting(False, "continue from the latest complete checkpoint in --output",
                            "checkpoints and logging", action="store_true")
    # devices and hosts (flags from mistral_jax.distributed.add_distributed_flags)
    mesh: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Every setting, paths as strings (local ones as given or made absolute, URLs as given)."""
        return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in dataclasses.asdict(self).items()}


NAMES = frozenset(f.name for f in dataclasses.fields(TrainSettings))


def names(program: str) -> frozenset[str]:
    """The settings `program` ("sft" or "dpo") has."""
    return frozenset(f.name for f in dataclasses.fields(TrainSettings)
                     if program in f.metadata.get("programs", PROGRAMS))


def add_flags(parser: argparse.ArgumentParser, program: str = "sft") -> argparse.ArgumentParser:
    """A flag for every setting of `program` that has help, in field order and groups. Defaults are left out of
    the namespace (SUPPRESS) so `resolve` can tell what was given."""
    groups: dict[str | None, Any] = {None: parser}
    for field in dataclasses.fields(TrainSettings):
        help_text, group = field.metadata.get("help"), field.metadata.get("group")
        if help_text is None or program not in field.metadata["programs"]:
            continue
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument("--" + field.name.replace("_", "-"), default=argparse.SUPPRESS,
                                   help=help_text.replace("{default}", str(field.default)), **field.metadata["flag"])
    return parser


def read_run_config(path, program: str = "sft") -> dict:
    """A JSON run config of `program` as settings: keys like the flags (dashes or underscores), input paths made
    absolute (URLs kept as they are)."""
    from mistral_jax.checkpoints.errors import read_json

    require_local(path, "a run config (--config)", error=UserError)
    path = pathlib.Path(path)
    values = read_json(path)
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - names(program) - {"description"})
    if unknown:
        raise UserError(f"{path}: unknown settings {unknown}")
    values.pop("description", None)
    for key in PATH_KEYS:
        if values.get(key) is not None and not is_url(values[key]):
            values[key] = str((path.parent / values[key]).resolve())
    return values


def resolve(args: argparse.Namespace, program: str = "sft") -> TrainSettings:
    """The `program`'s run settings: defaults < run config file < given flags, derived defaults filled in."""
    given = {k: v for k, v in vars(args).items() if k in NAMES and v is not None}
    file = read_run_config(given["config"], program) if given.get("config") else {}
    s = TrainSettings(**{**file, **given})
    missing = [f"--{k}" for k in ("data", "output", "steps") if getattr(s, k) is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (as flags or in --config)")
    require_local(s.data, "JSONL data (--data)", error=UserError)  # these two before any model is loaded
    if s.checkpoint is not None:
        from mistral_jax.checkpoints.load import check_url

        check_url(s.checkpoint)
    derived = {
        "warmup_steps": max(1, s.steps // 20),
        "learning_rate": LORA_LR if s.lora_rank else FULL_LR,
        "lora_alpha": 2.0 * s.lora_rank if s.lora_rank else None,
        "save_every": s.save_every or max(1, s.steps // 10),
    }
    derived["eval_every"] = derived["save_every"]
    return dataclasses.replace(s, **{k: v for k, v in derived.items() if getattr(s, k) is None})
