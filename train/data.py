"""SFT data: JSONL conversations -> token rows whose loss weights cover the assistant tokens only.

One conversation a line: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}. Each is
rendered with the checkpoint's chat template; the tokens an assistant turn adds (its end-of-turn / EOS token
included) are targets, everything else is context. Examples become (input, target) pairs packed into
fixed-length rows with segment ids (attention never crosses examples, positions restart per example) or
padded one per row (positions -1).

The stream goes through grain and never holds the file: a first pass validates every line and keeps only its
byte offset; a grain MapDataset over those offsets is shuffled by seed (reshuffled each epoch) and repeated.
Global row j of every micro-batch is fed by stream j, the elements j, j + R, j + 2R, ... of that sequence (R
rows a micro-batch), packed greedily: so the global batch of every step is the same whatever the number of
processes, and each process reads and tokenizes only the streams of its rows. A stream's state is the index
of its next element; `Batches` (a thin layer: the process's streams stacked into step batches) saves the
table of every stream's index, so a run resumes exactly, on any number of processes.
"""

from __future__ import annotations

import array
import dataclasses
import json
import pathlib
from collections.abc import Iterator, Sequence

import grain
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
    messages = check_messages(record["messages"], where, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, nothing to train on")
    return messages


def check_messages(messages, where: str, field: str) -> list[dict[str, str]]:
    """A non-empty list of {"role", "content"} messages under `field`, validated and stripped of other keys."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "{field}" must be a non-empty list')
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} ({role}) needs a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def iter_conversations(path: str | pathlib.Path) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) of every conversation of a JSONL file, streamed (blank lines skipped); DataError
    names the first bad line."""
    for number, _, messages in _scan(path):
        yield number, messages


def _scan(path, parse=parse_line) -> Iterator[tuple[int, int, list[dict[str, str]]]]:
    """(line number, byte offset, parse(line)) of every non-blank line, one line in memory at a time."""
    require_local(path, "JSONL data (--data)")
    path = pathlib.Path(path)
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x})") from None
            if line.strip():
                yield number, offset, parse(line, f"{path}:{number}")
            offset += len(raw)


def index_lines(path, parse=parse_line, what: str = "conversations") -> tuple[np.ndarray, np.ndarray]:
    """Validate every line of a JSONL file with `parse` -> (line numbers int64 [N], byte offsets int64 [N]) of its
    examples (`what` they are, for the error when there are none)."""
    numbers, offsets = array.array("q"), array.array("q")
    for number, offset, _ in _scan(path, parse):
        numbers.append(number)
        offsets.append(offset)
    if not numbers:
        raise DataError(f"{path}: no {what}")
    return np.frombuffer(numbers, np.int64), np.frombuffer(offsets, np.int64)


class JsonlLines:
    """A grain data source: example i is the line at offsets[i], read from disk and parsed when asked for."""

    def __init__(self, path, numbers: np.ndarray, offsets: np.ndarray, parse=parse_line):
        self.path, self.numbers, self.offsets, self.parse = pathlib.Path(path), numbers, offsets, parse
        self._handle = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        """(line number, parse(line)) of example i."""
        if self._handle is None:
            self._handle = self.path.open("rb")
        self._handle.seek(int(self.offsets[i]))
        number = int(self.numbers[i])
        return number, self.parse(self._handle.readline().decode("utf-8"), f"{self.path}:{number}")


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


# Streams -------------------------------------------------------------------------------------------
class RowStream:
    """Rows [seq_len] packed (or padded) from the examples of a grain MapDataset, in order; None elements
    (dropped conversations) are skipped. state() is the index of the next element, so it is exact at row ends."""

    def __init__(self, examples: grain.MapDataset, seq_len: int, packing: bool, patience: int):
        self.examples, self.seq_len, self.packing, self.patience = examples, seq_len, packing, patience
        self.index = 0
        self._pending: tuple[int, Example | None] | None = None  # the example that did not fit the last row

    def _example(self, index: int) -> Example | None:
        if self._pending is None or self._pending[0] != index:
            self._pending = index, self.examples[index]
        return self._pending[1]

    def next_row(self) -> dict[str, np.ndarray]:
        """The next row of FIELDS [1, seq_len]: examples that fit, greedily (one with packing off)."""
        row, used, skipped = [], 0, 0
        while True:
            example = self._example(self.index)
            if example is None:
                skipped += 1
                if skipped > self.patience:
                    raise DataError("no conversation of this data stream has an assistant token within seq_len")
                self.index += 1
                continue
            if row and (not self.packing or used + len(example) > self.seq_len):
                return make_rows(row, self.seq_len, self.packing)
            row.append(example)
            used += len(example)
            self.index += 1


class Batches:
    """This process's batches: `micro_batches` micro-batches of its rows of the global `rows`, micro-batch-major
    [micro_batches * local rows, seq_len]. Row j of every micro-batch comes from stream j.

    state() = {"streams": [next index of each of this process's streams]}; train.loop.gather_data_state makes
    the table of all of them that a checkpoint holds and `restore` takes.
    """

    def __init__(self, streams: dict[int, RowStream], rows: int, micro_batches: int):
        """streams: this process's, by global row; rows: the global rows of a micro-batch."""
        self.streams, self.rows, self.micro_batches = streams, rows, micro_batches

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [stream.next_row() for _ in range(self.micro_batches) for stream in self.streams.values()]
        return {k: np.concatenate([r[k] for r in rows]) for k in FIELDS}

    def state(self) -> dict[str, list[int]]:
        """The next element of each of this process's streams, in row order: JSON-ready."""
        return {"streams": [stream.index for stream in self.streams.values()]}

    def restore(self, table: dict[str, list[int]]) -> None:
        """Continue from the table of every stream (all processes' states concatenated in process order)."""
        if "streams" not in table:  # saved before the data moved to per-row grain streams
            raise DataError(f"the checkpoint's data state ({', '.join(sorted(table)) or 'empty'}) is from an older "
                            "mistral-jax; resume it with that version, or start a new run from its exported weights")
        indices = table["streams"]
        if len(indices) != self.rows:
            raise DataError(f"the data state has {len(indices)} rows a micro-batch; this run has {self.rows}")
        for j, stream in self.streams.items():
            stream.index = int(indices[j])


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


class _Tokenize:
    """(line number, messages) -> Example, or None when no assistant token is left within seq_len; counts what
    it tokenized in `stats` while `counting`."""

    def __init__(self, tokenizer, seq_len: int, vocab_size: int, path, stats: dict[str, int]):
        self.tokenizer, self.seq_len, self.vocab_size = tokenizer, seq_len, vocab_size
        self.path, self.stats = path, stats
        self.counting = True

    def __call__(self, item) -> Example | None:
        line, messages = item
        ids, mask, last_only = tokenize(self.tokenizer, messages, f"{self.path}:{line}")
        if ids.size and ids.max() >= self.vocab_size:
            raise DataError(f"{self.path}:{line}: token id {ids.max()} is not below the model's vocab_size "
                            f"{self.vocab_size}")
        example, truncated = to_example(ids, mask, self.seq_len)
        kept = example.weights.sum() > 0
        if self.counting:
            self.stats["truncated"] += truncated
            self.stats["last_turn_only"] += last_only
            self.stats["dropped"] += not kept  # no assistant token left within seq_len
        return example if kept else None


def load_data(path, tokenizer, *, seq_len: int, rows: int, packing: bool, seed: int, eval_fraction: float,
              vocab_size: int, micro_batches: int = 1, process_index: int = 0, process_count: int = 1,
              check: int = 1024) -> SFTData:
    """Index, split and stream a JSONL file: this host's `Batches` of its share of `rows` global rows a
    micro-batch, and the eval rows.

    Every host validates every line (errors are the same everywhere). Each tokenizes the small eval split and,
    up front, the first `check` conversations of its streams (template and vocabulary errors and the counts
    before training, without a pass over a large file); the rest only as it is trained on.
    """
    numbers, offsets = index_lines(path)
    train_idx, eval_idx = split_indices(len(offsets), eval_fraction, seed)
    stats = {"conversations": len(offsets), "train": len(train_idx), "eval": len(eval_idx),
             "truncated": 0, "dropped": 0, "last_turn_only": 0}
    to_examples = _Tokenize(tokenizer, seq_len, vocab_size, path, stats)
    every = JsonlLines(path, numbers, offsets)
    evals = [e for i in eval_idx if (e := to_examples(every[i])) is not None]
    source = JsonlLines(path, numbers[train_idx], offsets[train_idx])
    batches = stream_batches(source, to_examples, lambda examples: RowStream(examples, seq_len, packing,
                                                                             patience=100 * len(train_idx)),
                             rows=rows, micro_batches=micro_batches, seed=seed, process_index=process_index,
                             process_count=process_count, check=check)
    if not stats["kept"] and process_count == 1:
        raise DataError(f"{path}: no training example has an assistant token within seq_len={seq_len}")
    eval_rows = make_rows(evals, seq_len, packing) if evals else None
    return SFTData(batches, eval_rows, stats)


def stream_batches(source, to_examples, new_stream, *, rows: int, micro_batches: int, seed: int, process_index: int,
                   process_count: int, check: int) -> Batches:
    """This process's `Batches` over a grain source of training examples: shuffled by seed (reshuffled each
    epoch), global stream j its elements j, j + rows, ... mapped through `to_examples` (None: skipped) into
    `new_stream(examples)` (RowStream, or train/pairs.py's PairStream). The first `check` elements of this
    process's share of the first epoch are made now (errors and to_examples' counts up front); then
    to_examples.counting is turned off and to_examples.stats gets "kept", "own" and "checked"."""
    if rows % process_count:
        raise DataError(f"{rows} rows a micro-batch do not split over {process_count} processes")
    n = len(source)
    order = grain.MapDataset.source(source).shuffle(seed=seed).repeat()  # reshuffled every epoch
    local = rows // process_count
    own = range(process_index * local, (process_index + 1) * local)
    streams = {j: new_stream(order[j::rows].map(to_examples)) for j in own}
    first_epoch = [(j, i) for i in range(-(-n // rows)) for j in own if j + i * rows < n]
    checked = first_epoch[:check]  # (stream, element) pairs: this process's share of the first epoch, in order
    kept = sum(streams[j].examples[i] is not None for j, i in checked)
    to_examples.counting = False
    to_examples.stats.update(kept=kept, own=len(first_epoch), checked=len(checked))
    return Batches(streams, rows, micro_batches)
