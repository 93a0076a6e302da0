"""Where a run's curves go (process 0 only): metrics.jsonl (the record resume and `mistral-jax plot` read),
TensorBoard event files under RUN/tensorboard/ (tensorboardX), and W&B when configured.

TensorBoard tags are TRL's (the HF Trainer's): "train/loss", "train/rewards/margins", "eval/loss", ... On a
URL (gs://...) the event file is written locally and copied up at every flush (checkpoint) and at close. A
resumed run starts a new event file that purges the steps after its checkpoint (TensorBoard's purge_step),
as metrics.jsonl drops them.
W&B: when the `wandb` package is installed and WANDB_PROJECT or WANDB_API_KEY (or WANDB_MODE) is set, every
record is also logged there (wandb.init takes the rest from its environment variables).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from mistral_jax.checkpoints.run_dir import METRICS_FILE, MetricsLog
from mistral_jax.paths import as_path, is_url

TENSORBOARD_DIR = "tensorboard"
WANDB_VARIABLES = ("WANDB_PROJECT", "WANDB_API_KEY", "WANDB_MODE")


def tag(key: str) -> str:
    """A metrics.jsonl key -> its TensorBoard tag: "eval_loss" -> "eval/loss", "loss" -> "train/loss"."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardLog:
    """Scalars of each record into an event file under `directory` (local or a URL)."""

    def __init__(self, directory, resume_step: int = 0):
        from tensorboardX import SummaryWriter

        self.target = as_path(directory)
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="tensorboard-")) if is_url(directory) else self.target
        self.writer = SummaryWriter(str(self.local), purge_step=resume_step + 1 if resume_step else None,
                                    flush_secs=30)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(tag(key), value, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.local != self.target:  # a URL: copy the event files up (each is small, rewritten whole)
            self.target.mkdir(parents=True, exist_ok=True)
            for file in self.local.iterdir():
                (self.target / file.name).write_bytes(file.read_bytes())

    def close(self) -> None:
        self.writer.close()
        self.flush()
        if self.local != self.target:
            shutil.rmtree(self.local, ignore_errors=True)


def start_wandb(config: dict | None, program: str):
    """A W&B run when the package is installed and its environment says to use it; else None."""
    if not any(os.environ.get(name) for name in WANDB_VARIABLES):
        return None
    try:
        import wandb
    except ImportError:
        return None
    return wandb.init(config=config, job_type=program)


class RunLog:
    """metrics.jsonl, TensorBoard and (if configured) W&B, written together; `flush` at every checkpoint.

    `resume_step`: the step a run continues from; what an earlier run logged after it is dropped.
    """

    def __init__(self, output_dir, resume_step: int = 0, settings: dict | None = None, program: str = "sft"):
        output = as_path(output_dir)
        self.metrics = MetricsLog(output / METRICS_FILE, resume_step=resume_step)
        self.tensorboard = TensorBoardLog(output / TENSORBOARD_DIR, resume_step)
        self.wandb = start_wandb(settings, program)

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        self.tensorboard.write(record)
        if self.wandb is not None:
            self.wandb.log({tag(k): v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def flush(self) -> None:
        self.metrics.flush()
        self.tensorboard.flush()

    def close(self) -> None:
        self.metrics.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
