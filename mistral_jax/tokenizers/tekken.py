"""Mistral's tekken tokenizer (`tekken.json`: Nemo, Ministral, Pixtral), read as mistral-common reads it.

A tekken file is a tiktoken BPE (byte tokens ranked by merge order, a split pattern) behind a block of special
tokens: ids 0 .. num_special - 1 are control tokens, id num_special + r is the BPE token of rank r, and the
vocabulary is cut to `default_vocab_size`. tiktoken (what mistral-common itself runs) does the BPE.
"""

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from mistral_jax.errors import UserError
from mistral_jax.tokenizers.vocab import Vocab

# The control tokens of files that list none (tekken versions up to v7), in id order; the rest up to
# num_special are fillers "<SPECIAL_{id}>" (mistral-common's layout).
DEFAULT_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)


def is_tekken_file(path: Path) -> bool:
    """A tekken file by its name, as Mistral ships them (tekken.json, mistral-common's tekken_YYMMDD.json)."""
    return path.suffix == ".json" and path.name.startswith("tekken")


class TekkenVocab(Vocab):
    """A tekken.json vocabulary: tiktoken BPE for text, the special-token block for control tokens."""

    def __init__(self, data: bytes, source: str = "tekken.json") -> None:
        try:
            model = json.loads(data)
            config = model["config"]
            num_special, vocab_size = config["default_num_special_tokens"], config["default_vocab_size"]
            self.version = config["version"]  # "v3", "v7", ...: the instruct format the file is for
            ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in model["vocab"][: vocab_size - num_special]}
            pattern = config["pattern"]
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{source}: not a tekken tokenizer file ({error!r})") from error
        specials = model.get("special_tokens")
        names = [t["token_str"] for t in specials] if specials is not None else list(DEFAULT_SPECIAL_TOKENS)
        names += [f"<SPECIAL_{i}>" for i in range(len(names), num_special)]
        self._data = data
        self._bpe = tiktoken.Encoding(name=f"tekken:{source}", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={})
        self._num_special = num_special
        self._special_names = names
        self.vocab_size = vocab_size
        self.special_tokens = {name: i for i, name in enumerate(names)}
        self.bos_id, self.eos_id = self.special_tokens.get("<s>"), self.special_tokens.get("</s>")
        self.add_bos = True

    def encode_text(self, text: str) -> list[int]:
        return [rank + self._num_special for rank in self._bpe.encode_ordinary(text)]

    def decode(self, ids: Sequence[int]) -> str:
        ranks = [i - self._num_special for i in ids if i >= self._num_special]
        return self._bpe.decode_bytes(ranks).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        if token_id < self._num_special:
            return self._special_names[token_id]
        return self._bpe.decode_single_token_bytes(token_id - self._num_special).decode("utf-8", errors="replace")

    def save_model_file(self, directory: Path) -> dict[str, str]:
        (directory / "tekken.json").write_bytes(self._data)
        return {}
