"""`mistral-jax sft`: fine-tune a checkpoint on JSONL chats; `latest_params` reads a run back for export.

The settings and their flags are train/settings.py's, the program around them train/program.py's (shared with
`mistral-jax dpo`). A run directory (mistral_jax/checkpoints/run_dir.py) holds run.json, metrics.jsonl,
tensorboard/ and checkpoints/ (orbax steps). It may be a URL (--output gs://bucket/runs/x), as may an orbax
--checkpoint (and its tokenizer); the data and the run config are read from local disk.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from train import program
from train.objectives import Sft

DESCRIPTION = "Fine-tune a checkpoint on JSONL chats (full or LoRA), with orbax checkpoints and exact resume."


def _load_data(s, tokenizer, vocab_size: int, process_index: int, process_count: int):
    from train.data import load_data

    return load_data(s.data, tokenizer, seq_len=s.seq_len, rows=s.batch_size, micro_batches=s.grad_accum,
                     packing=s.packing, seed=s.seed, eval_fraction=s.eval_fraction, vocab_size=vocab_size,
                     process_index=process_index, process_count=process_count)


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


SFT = program.Program("sft", "supervised fine-tuning on JSONL chats (full or LoRA)", DESCRIPTION,
                      lambda s: Sft(), _load_data, _report_data)


def add_sft_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every sft flag: the settings' (train/settings.py) and the distributed ones."""
    return program.add_program_flags(parser, SFT)


def add_sft_parser(subparsers) -> argparse.ArgumentParser:
    """The `sft` sub-command on a parser's subparsers (mistral_jax.cli calls this)."""
    return program.add_program_parser(subparsers, SFT)


def run(args: argparse.Namespace):
    """Fine-tune as the settings say; returns the loop's LoopResult (step reached and why it stopped)."""
    return program.run(args, SFT)


def latest_params(output_dir, mesh=None):
    """(config, params) of a run's latest checkpoint, LoRA adapters merged, on `mesh` or the first device
    (mistral_jax.checkpoints.load.run_params; float32, ready for checkpoints.hf.write). Any run: sft or dpo."""
    from mistral_jax.checkpoints.load import run_params

    return run_params(output_dir, mesh)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m train.sft ...`: the sft command alone; exit status 2 with one line for a user error."""
    return program.main(SFT, argv)


if __name__ == "__main__":
    sys.exit(main())
