"""DPO data: JSONL preference pairs in TRL's formats -> two token rows a pair (chosen, then rejected).

One pair a line, as TRL's DPOTrainer reads them: {"prompt": str, "chosen": str, "rejected": str}, or the
conversational form {"prompt": [messages so far], "chosen": [assistant message(s)], "rejected": [...]}
rendered with the checkpoint's chat template. Tokenized as TRL does: the prompt alone (with the generation
prompt), and prompt + each response (text: with EOS appended); the response starts where those diverge. Loss
weights cover the response tokens only. A sequence longer than seq_len + 1 tokens keeps its last seq_len + 1
(TRL's truncation_mode="keep_end": the prompt is cut from the left), and is counted.

Streaming, eval split, per-process shards and exact resume are train/data.py's: global stream j feeds pair j of
every micro-batch, so a micro-batch of P pairs is 2P rows [chosen 0, rejected 0, chosen 1, ...].
"""

from __future__ import annotations

import json

import numpy as np

from train.data import (
    DataError,
    Example,
    JsonlLines,
    SFTData,
    check_messages,
    index_lines,
    make_rows,
    split_indices,
    stream_batches,
)

KEYS = ("prompt", "chosen", "rejected")


def parse_pair(line: str, where: str) -> dict:
    """One JSONL line -> {"prompt", "chosen", "rejected"}, all text or all message lists; errors name `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or any(k not in record for k in KEYS):
        raise DataError(f'{where}: expected an object with "prompt", "chosen" and "rejected"')
    if all(isinstance(record[k], str) for k in KEYS):
        for k in ("chosen", "rejected"):
            if not record[k]:
                raise DataError(f'{where}: "{k}" is empty')
        return {k: record[k] for k in KEYS}
    if not all(isinstance(record[k], list) for k in KEYS):
        raise DataError(f'{where}: "prompt", "chosen" and "rejected" must be all strings or all message lists')
    pair = {k: check_messages(record[k], where, k) for k in KEYS}
    for k in ("chosen", "rejected"):
        if any(m["role"] != "assistant" for m in pair[k]):
            raise DataError(f'{where}: "{k}" must hold assistant messages only')
    return pair


def common_prefix_length(a, b) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def tokenize_pair(tokenizer, pair: dict, where: str = "pair") -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) as TRL's DPOTrainer makes them."""
    try:
        if isinstance(pair["prompt"], str):
            prompt = tokenizer.encode(pair["prompt"])
            full = [tokenizer.encode(pair["prompt"] + pair[k], eos=True) for k in ("chosen", "rejected")]
        else:
            prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True)
            full = [tokenizer.apply_chat_template(pair["prompt"] + pair[k], add_generation_prompt=False)
                    for k in ("chosen", "rejected")]
    except ValueError as err:  # the template or the tokenizer rejected the pair
        raise DataError(f"{where}: {err}") from None
    n = min(common_prefix_length(prompt, ids) for ids in full)
    return list(prompt[:n]), list(full[0][n:]), list(full[1][n:])


def pair_rows(prompt, chosen, rejected, seq_len: int) -> tuple[dict[str, np.ndarray], bool]:
    """Rows [2, seq_len] of FIELDS (chosen, rejected; padded, one sequence a row), and whether either was cut.

    Each of prompt + response keeps its last seq_len + 1 tokens; weights are 1 on response targets.
    """
    examples, cut = [], False
    for response in (chosen, rejected):
        ids = np.asarray([*prompt, *response], np.int32)
        mask = np.arange(len(ids)) >= len(prompt)
        cut |= len(ids) > seq_len + 1
        ids, mask = ids[-(seq_len + 1):], mask[-(seq_len + 1):]
        examples.append(Example(ids[:-1], ids[1:], mask[1:].astype(np.float32)))
    return make_rows(examples, seq_len, packing=False), cut


class PairStream:
    """Row pairs [2, seq_len] from the elements of a grain MapDataset in order (None: a dropped pair, skipped).
    `index` is the next element: the stream's whole state."""

    def __init__(self, examples, patience: int):
        self.examples, self.patience = examples, patience
        self.index = 0

    def next_row(self) -> dict[str, np.ndarray]:
        """The next pair's two rows."""
        for _ in range(self.patience + 1):
            rows = self.examples[self.index]
            self.index += 1
            if rows is not None:
                return rows
        raise DataError("no preference pair of this data stream has a response token within seq_len")


class _Tokenize:
    """(line number, pair) -> its two rows, or None without a response token; counts in `stats` while
    `counting` (train.data.stream_batches turns it off)."""

    def __init__(self, tokenizer, seq_len: int, vocab_size: int, path, stats: dict[str, int]):
        self.tokenizer, self.seq_len, self.vocab_size = tokenizer, seq_len, vocab_size
        self.path, self.stats = path, stats
        self.counting = True

    def __call__(self, item) -> dict[str, np.ndarray] | None:
        line, pair = item
        where = f"{self.path}:{line}"
        prompt, chosen, rejected = tokenize_pair(self.tokenizer, pair, where)
        top = max([*prompt, *chosen, *rejected], default=0)
        if top >= self.vocab_size:
            raise DataError(f"{where}: token id {top} is not below the model's vocab_size {self.vocab_size}")
        rows, cut = pair_rows(prompt, chosen, rejected, self.seq_len)
        kept = bool((rows["weights"].sum(axis=1) > 0).all())
        if self.counting:
            self.stats["truncated"] += cut
            self.stats["dropped"] += not kept
        return rows if kept else None


def load_pairs(path, tokenizer, *, seq_len: int, pairs: int, seed: int, eval_fraction: float, vocab_size: int,
               micro_batches: int = 1, process_index: int = 0, process_count: int = 1, check: int = 1024) -> SFTData:
    """Index, split and stream a preference JSONL file: this host's `Batches` of its share of `pairs` global
    pairs a micro-batch (2 rows each), and every host's eval rows; as train.data.load_data does for chats."""
    numbers, offsets = index_lines(path, parse_pair, "preference pairs")
    train_idx, eval_idx = split_indices(len(offsets), eval_fraction, seed)
    stats = {"pairs": len(offsets), "train": len(train_idx), "eval": len(eval_idx), "truncated": 0, "dropped": 0}
    to_rows = _Tokenize(tokenizer, seq_len, vocab_size, path, stats)
    every = JsonlLines(path, numbers, offsets, parse_pair)
    evals = [rows for i in eval_idx if (rows := to_rows(every[i])) is not None]
    source = JsonlLines(path, numbers[train_idx], offsets[train_idx], parse_pair)
    batches = stream_batches(source, to_rows, lambda rows: PairStream(rows, patience=100 * len(train_idx)),
                             rows=pairs, micro_batches=micro_batches, seed=seed, process_index=process_index,
                             process_count=process_count, check=check)
    if not stats["kept"] and process_count == 1:
        raise DataError(f"{path}: no preference pair has a response token within seq_len={seq_len}")
    eval_rows = ({k: np.concatenate([r[k] for r in evals]) for k in evals[0]} if evals else None)
    return SFTData(batches, eval_rows, stats)
