"""The `Vocab` interface every tokenizer backend implements, so chat formats and `Tokenizer` stay backend-agnostic."""

import abc
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# A piece of rendered chat text and whether it came from the template (True) or from a message (False).
Span = tuple[str, bool]


class Vocab(abc.ABC):
    """A tokenizer backend: plain-text encoding that never yields special ids, plus the special-token table.

    Subclasses set `vocab_size`, `bos_id`, `eos_id`, `add_bos` (whether BOS is prepended by convention) and
    `special_tokens` (the control/special token strings, mapped to their ids) in their constructor.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    special_tokens: Mapping[str, int]
    version: str | None = None  # mistral-common's tokenizer version, where the file says it (tekken: "v3", "v7")

    @abc.abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`, where special-token strings stay ordinary text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special/control tokens left out."""

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of one token id."""

    @abc.abstractmethod
    def save_model_file(self, directory: Path) -> dict[str, str]:
        """Write the model file transformers reads (tokenizer.json or tokenizer.model) into `directory`;
        returns the tokenizer_config.json entries that go with it."""

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        # Longest alternative first, so that at each position the longest special token wins (as HF does).
        strings = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, strings))) if strings else None

    def encode_spans(self, spans: Sequence[Span]) -> list[int]:
        """Encode concatenated spans, turning special-token strings into ids only inside template spans.

        Text between two template-emitted special tokens is encoded as one piece, as HF tokenizers split text
        at special tokens and tokenize the pieces in between independently.
        """
        ids: list[int] = []
        pending: list[str] = []

        def flush() -> None:
            text = "".join(pending)
            pending.clear()
            if text:
                ids.extend(self.encode_text(text))

        for text, from_template in spans:
            if not from_template or self._special_pattern is None:
                pending.append(text)
                continue
            start = 0
            for match in self._special_pattern.finditer(text):
                pending.append(text[start : match.start()])
                flush()
                ids.append(self.special_tokens[match.group()])
                start = match.end()
            pending.append(text[start:])
        flush()
        return ids
