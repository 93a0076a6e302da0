"""An sft run directory and its files: run.json, metrics.jsonl and checkpoints/ (orbax steps).

run.json holds the trained model's config, the base checkpoint, the tokenizer, the LoRA settings and every
setting. A checkpoint step holds the trained part ("trainable": the params, or the LoRA adapters),
"opt_state" and "data" (every host's iterator state, JSON). The directory may be a URL (gs://bucket/run).
Here because `mistral_jax.load(run_dir)` reads runs and mistral_jax never imports the SFT program (train/).
"""

from __future__ import annotations

import json
import time

import orbax.checkpoint as ocp

from mistral_jax.errors import UserError
from mistral_jax.paths import as_path, check_new_dir, check_writable, is_url

RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
ITEMS = ("trainable", "opt_state", "data")  # the items of each checkpoint step


def is_run_dir(path) -> bool:
    """Whether `path` (local or a URL) is an sft run directory (it holds run.json)."""
    return (as_path(path) / RUN_FILE).is_file()


def run_info(path) -> dict:
    """A run directory's run.json: model config, base checkpoint and tokenizer paths, LoRA settings, settings."""
    file = as_path(path) / RUN_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an sft run directory: {RUN_FILE} is missing")
    return json.loads(file.read_text())


def write_run_info(path, info: dict) -> None:
    """Write run.json (creating the directory): `info` as run_info returns it."""
    path = as_path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def model_config(path):
    """The trained model's ModelConfig (float32 weights) from a run directory's run.json."""
    from mistral_jax.config import ModelConfig

    return ModelConfig.from_dict(run_info(path)["model_config"])


def tokenizer_source(path) -> str:
    """The tokenizer file or directory (or URL) the run trained with."""
    return run_info(path)["tokenizer"]


def lora_spec(info: dict):
    """The run's LoraSpec (from run_info), or None for a full fine-tune."""
    from mistral_jax import lora

    spec = info.get("lora")
    return lora.LoraSpec(spec["rank"], float(spec["alpha"]), tuple(spec["targets"])) if spec else None


def check_output(path) -> None:
    """A one-line error unless `path` may hold a run: absent (not under a file), empty, or already a run
    directory. Nothing is written."""
    if is_run_dir(path):
        if not is_url(path):
            check_writable(as_path(path), path)
        return
    try:
        check_new_dir(path)
    except FileExistsError:
        raise UserError(f"--output {path} is not empty and is not an sft run directory (no {RUN_FILE}); "
                        "choose a new or empty directory") from None


# Checkpoints ---------------------------------------------------------------------------------------
def checkpoint_manager(path, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """Orbax manager of RUN/checkpoints (RUN local or a URL such as gs://bucket/run): async saves, the last
    `keep` kept (None: all). A writable one creates the directory."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           save_interval_steps=0 if read_only else 1, enable_async_checkpointing=True)
    return ocp.CheckpointManager(as_path(path) / CHECKPOINTS_DIR, options=options, item_names=ITEMS)


def latest_step(path) -> int | None:
    """The latest complete checkpoint step of a run, None when there is none (nothing is created)."""
    if not (as_path(path) / CHECKPOINTS_DIR).is_dir():
        return None
    manager = checkpoint_manager(path, read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def restore_trainable(manager: ocp.CheckpointManager, step: int, target):
    """Only the trained part (params or adapters) of checkpoint `step`, placed like `target` (ShapeDtypeStructs)."""
    return manager.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(target)))["trainable"]


# Metrics -------------------------------------------------------------------------------------------
def _step_of(line: str) -> int | None:
    """A metrics line's step; None for a line cut off mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl, one JSON record a line.

    On a local disk the file is appended to and each line is on disk once `write` returns. On a URL
    (gs://..., whose objects cannot be appended to) the lines are kept, those of an earlier run included,
    and the file is rewritten at `flush` (the loop calls it at every checkpoint), at `close`, and at most
    every `flush_seconds` otherwise: never once a line. Lines after the last checkpoint are the ones a
    resumed run drops anyway.
    `resume_step`: the step a run continues from; records after it (written by a run killed before it could
    save them in a checkpoint) are dropped, so no step is logged twice.
    """

    def __init__(self, path, append: bool | None = None, resume_step: int | None = None, flush_seconds: float = 60.0):
        self.path = as_path(path)
        self.append = not is_url(path) if append is None else append
        self.flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._file = None
        self._unflushed = False
        self._flushed_at = time.monotonic()
        if self.path.exists() and (resume_step is not None or not self.append):
            lines = self.path.read_text().splitlines(keepends=True)
            kept = lines
            if resume_step is not None:
                kept = [line for line in lines if (step := _step_of(line)) is not None and step <= resume_step]
            if kept != lines:
                self.path.write_text("".join(kept))
            self._lines = [] if self.append else kept
        if self.append:
            self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        self._unflushed = True
        if time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """On a URL, rewrite the file with every line so far (a no-op when nothing is new or when appending)."""
        if self._file is None and self._unflushed:
            self.path.write_text("".join(self._lines))
            self._unflushed, self._flushed_at = False, time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
