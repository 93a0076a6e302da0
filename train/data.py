"""SFT data: JSONL conversations -> token rows whose loss weights cover the assistant tokens only.

One conversation a line: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}. Each is
rendered with the checkpoint's chat template; the tokens an assistant turn adds (its end-of-turn / EOS token
included) are targets, everything else is context. Examples become (input, target) pairs packed into
fixed-length rows with segment ids (attention never crosses examples, positions restart per example) or
padded one per row (positions -1). `Batches` streams rows over shuffled epochs and its state is a small
dict, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from mistral_jax.errors import UserError
from mistral_jax.paths import require_local

ROLES = ("system", "user", "assistant")
FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")


class DataError(UserError):
    """A JSONL line that is not a usable conversation, or a chat template that hides the assistant turns."""


# Reading -------------------------------------------------------------------------------------------
def parse_line(line: str, where: str) -> list[dict[str, str]]:
    """One JSONL line -> its messages, validated; `where` ("file:line") prefixes every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f'{where}: expected an object with a "messages" list')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} ({role}) needs a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | pathlib.Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) of every conversation of a JSONL file (blank lines skipped); DataError names
    the first bad line."""
    require_local(path, "JSONL data (--data)")
    path = pathlib.Path(path)
    conversations = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                conversations.append((number, parse_line(line, f"{path}:{number}")))
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations


# Tokenizing ----------------------------------------------------------------------------------------
def _is_prefix(prefix: Sequence[int], ids: Sequence[int]) -> bool:
    """Whether `ids` starts with `prefix`."""
    return len(prefix) <= len(ids) and list(ids[: len(prefix)]) == list(prefix)


def _assistant_spans(tokenizer, messages) -> tuple[list[int], list[bool]] | None:
    """Render prefixes turn by turn: the tokens an assistant message adds to the prompt before it are its span.

    None when the template does not render incrementally (an earlier render is not a prefix of a later one).
    """
    ids: list[int] = []
    mask: list[bool] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (_is_prefix(ids, prompt) and _is_prefix(prompt, turn)) or len(turn) == len(prompt):
            return None
        mask += [False] * (len(prompt) - len(ids)) + [True] * (len(turn) - len(prompt))
        ids = turn
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not _is_prefix(ids, full):
        return None
    return full, mask + [False] * (len(full) - len(ids))


def tokenize(tokenizer, messages, where: str = "conversation") -> tuple[np.ndarray, np.ndarray, bool]:
    """(token ids int32 [n], assistant mask bool [n], whether only the last assistant turn is trained).

    Some formats are not incremental (Mistral v3 moves the system prompt to the last user turn): then the
    conversation is cut after its last assistant message and only that turn is trained, earlier ones being
    context. If even that fails the template hides the assistant tokens, and DataError says so.
    """
    try:
        spans = _assistant_spans(tokenizer, messages)
        last_only = spans is None
        if last_only:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: last + 1], add_generation_prompt=False)
            if _is_prefix(prompt, full) and len(full) > len(prompt):
                spans = full, [False] * len(prompt) + [True] * (len(full) - len(prompt))
    except ValueError as err:  # the template or the tokenizer rejected the conversation
        raise DataError(f"{where}: {err}") from None
    if spans is None:
        raise DataError(
            f"{where}: the chat template does not render the prompt before an assistant message as a prefix of "
            "the conversation through it, so the assistant tokens cannot be found"
        )
    ids, mask = spans
    return np.asarray(ids, np.int32), np.asarray(mask, bool), last_only


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation as next-token pairs: inputs[i] predicts targets[i]; weights 1 on assistant targets."""

    inputs: np.ndarray  # int32 [n]
    targets: np.ndarray  # int32 [n]
    weights: np.ndarray  # float32 [n]

    def __len__(self) -> int:
        return len(self.inputs)


def to_example(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[Example, bool]:
    """Shift a conversation into (input, target) pairs, cut to seq_len pairs; returns (example, truncated)."""
    truncated = len(ids) - 1 > seq_len
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    return Example(ids[:-1], ids[1:], mask[1:].astype(np.float32)), truncated


# Rows ----------------------------------------------------------------------------------------------
def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """n padding rows: no targets, positions -1 (hidden from attention), segment 0."""
    rows = {name: np.zeros((n, seq_len), np.int32) for name in ("inputs", "targets", "segment_ids")}
    rows["weights"] = np.zeros((n, seq_len), np.float32)
    rows["positions"] = np.full((n, seq_len), -1, np.int32)
    return rows


def make_rows(examples: Sequence[Example], seq_len: int, packing: bool) -> dict[str, np.ndarray]:
    """Examples in order -> rows [R, seq_len] of FIELDS.

    packing: greedy, an example goes into the current row if it fits, else starts the next one; segment
    ids count 1, 2, ... within a row and positions restart at 0 for each example. Otherwise one per row.
    """
    placements: list[tuple[int, int]] = []  # (row, offset) of each example
    row, used = -1, seq_len
    for example in examples:
        if not packing or used + len(example) > seq_len:
            row, used = row + 1, 0
        placements.append((row, used))
        used += len(example)
    rows = empty_rows(row + 1, seq_len)
    segment = np.zeros(row + 1, np.int32)
    for example, (r, offset) in zip(examples, placements):
        span = slice(offset, offset + len(example))
        segment[r] += 1
        rows["inputs"][r, span] = example.inputs
        rows["targets"][r, span] = example.targets
        rows["weights"][r, span] = example.weights
        rows["positions"][r, span] = np.arange(len(example))
        rows["segment_ids"][r, span] = segment[r]
    return rows


class Batches:
    """An endless stream of batches [rows, seq_len] over epochs, each epoch a seeded shuffle of the examples.

    state() = {"epoch", "position"} (rows of that epoch already served); restore(state) resumes exactly.
    """

    def __init__(self, examples: Sequence[Example], seq_len: int, rows: int, packing: bool, seed: int, shard: int = 0):
        """shard (the process index) varies the shuffle between hosts, which hold different examples."""
        if not examples:
            raise DataError("no training examples")
        self.examples, self.seq_len, self.rows, self.packing = list(examples), seq_len, rows, packing
        self.seed, self.shard = seed, shard
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None

    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        """All rows of one epoch: the examples shuffled by (seed, epoch, shard), then packed or padded."""
        if self._cache is None or self._cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, self.shard]).permutation(len(self.examples))
            self._cache = (epoch, make_rows([self.examples[i] for i in order], self.seq_len, self.packing))
        return self._cache[1]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next `rows` rows, continuing into the next epoch when this one runs out."""
        parts = []
        needed = self.rows
        while needed:
            rows = self.epoch_rows(self.epoch)
            take = min(needed, len(rows["inputs"]) - self.position)
            parts.append({k: v[self.position : self.position + take] for k, v in rows.items()})
            needed -= take
            self.position += take
            if self.position == len(rows["inputs"]):
                self.epoch, self.position = self.epoch + 1, 0
        return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}

    def state(self) -> dict[str, int]:
        """Where the stream is: JSON-ready, saved in checkpoints."""
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`: the next batch is the one that followed it."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# The whole file ------------------------------------------------------------------------------------
@dataclasses.dataclass
class SFTData:
    """This host's training stream, every host's copy of the held-out rows, and counts worth reporting."""

    train: Batches
    eval_rows: dict[str, np.ndarray] | None  # [R, seq_len] of FIELDS, or None without an eval split
    stats: dict[str, int]


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) conversation indices: a seeded random eval_fraction, at least 1 when n >= 2 and it is > 0."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n_eval = 0 if eval_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _examples(tokenizer, conversations, indices, seq_len, vocab_size, path, stats) -> list[Example]:
    """Tokenize the chosen conversations; count truncated, dropped and last-turn-only ones in `stats`."""
    examples = []
    for i in indices:
        line, messages = conversations[i]
        ids, mask, last_only = tokenize(tokenizer, messages, f"{path}:{line}")
        if ids.size and ids.max() >= vocab_size:
            raise DataError(f"{path}:{line}: token id {ids.max()} is not below the model's vocab_size {vocab_size}")
        example, truncated = to_example(ids, mask, seq_len)
        stats["truncated"] += truncated
        stats["last_turn_only"] += last_only
        if example.weights.sum() == 0:
            stats["dropped"] += 1  # no assistant token left within seq_len
            continue
        examples.append(example)
    return examples


def load_data(path, tokenizer, *, seq_len: int, rows: int, packing: bool, seed: int, eval_fraction: float,
              vocab_size: int, process_index: int = 0, process_count: int = 1) -> SFTData:
    """Read, split and tokenize a JSONL file into this host's `Batches` of `rows` rows and the eval rows.

    Every host validates every line (errors are the same everywhere) but tokenizes only its share of the
    training conversations (every process_count-th); the small eval split is tokenized by all.
    """
    conversations = read_conversations(path)
    train_idx, eval_idx = split_indices(len(conversations), eval_fraction, seed)
    stats = {"conversations": len(conversations), "train": len(train_idx), "eval": len(eval_idx),
             "truncated": 0, "dropped": 0, "last_turn_only": 0}
    own = train_idx[process_index::process_count]
    train = _examples(tokenizer, conversations, own, seq_len, vocab_size, path, stats)
    evals = _examples(tokenizer, conversations, eval_idx, seq_len, vocab_size, path, stats)
    if not train:
        raise DataError(f"{path}: no training example has an assistant token within seq_len={seq_len}")
    eval_rows = make_rows(evals, seq_len, packing) if evals else None
    return SFTData(Batches(train, seq_len, rows, packing, seed, shard=process_index), eval_rows, stats)
