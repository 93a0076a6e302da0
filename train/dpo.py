"""`mistral-jax dpo`: preference tuning (DPO, or IPO) of a checkpoint on JSONL pairs in TRL's formats.

The SFT program with another objective and data: the same settings and flags (plus --beta and --loss), run
directory, checkpoints, exact resume, meshes and processes (train/program.py). The reference model is the
frozen base: with LoRA the base weights without the adapters (no second copy), for a full fine-tune a frozen
float32 copy of the starting weights, sharded like the policy (`mistral-jax plan --train --dpo` counts it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from train import program
from train.objectives import Dpo

DESCRIPTION = ("Preference-tune a checkpoint (DPO or IPO, full or LoRA) on JSONL pairs "
               '{"prompt", "chosen", "rejected"}, with orbax checkpoints and exact resume.')


def _load_data(s, tokenizer, vocab_size: int, process_index: int, process_count: int):
    from train.pairs import load_pairs

    return load_pairs(s.data, tokenizer, seq_len=s.seq_len, pairs=s.batch_size, micro_batches=s.grad_accum,
                      seed=s.seed, eval_fraction=s.eval_fraction, vocab_size=vocab_size,
                      process_index=process_index, process_count=process_count)


def _report_data(say, stats: dict[str, int], seq_len: int) -> None:
    """One line of counts, and one warning line for each kind of pair that lost something."""
    say(f"data: {stats['pairs']} preference pairs, {stats['train']} train / {stats['eval']} eval; counts below of "
        f"the eval split and the {stats['checked']} first train pairs of this process")
    if stats["truncated"]:
        say(f"warning: {stats['truncated']} pairs longer than --seq-len {seq_len} + 1 tokens, prompt cut from the "
            "left (TRL's keep_end)")
    if stats["dropped"]:
        say(f"warning: {stats['dropped']} pairs without a response token within --seq-len, dropped")


DPO = program.Program("dpo", "preference tuning (DPO, IPO) on JSONL pairs (full or LoRA)", DESCRIPTION,
                      lambda s: Dpo(s.beta, s.loss), _load_data, _report_data)


def add_dpo_parser(subparsers) -> argparse.ArgumentParser:
    """The `dpo` sub-command on a parser's subparsers (mistral_jax.cli calls this)."""
    return program.add_program_parser(subparsers, DPO)


def run(args: argparse.Namespace):
    """Preference-tune as the settings say; returns the loop's LoopResult."""
    return program.run(args, DPO)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m train.dpo ...`: the dpo command alone; exit status 2 with one line for a user error."""
    return program.main(DPO, argv)


if __name__ == "__main__":
    sys.exit(main())
