"""SentencePiece backend: Mistral/Llama 2 `tokenizer.model` files (and GGUF "llama" vocabularies rebuilt as one)."""

from collections.abc import Sequence
from pathlib import Path

import sentencepiece

from mistral_jax.tokenizers.vocab import Vocab


class SentencePieceVocab(Vocab):
    """A `sentencepiece` model; its control pieces (<s>, </s>, [INST], ...) are the special tokens.

    `sentencepiece` never produces a control piece when encoding text, so `encode_text` is injection-safe as is.
    """

    def __init__(self, model_proto: bytes, *, add_bos: bool = True) -> None:
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.add_bos = add_bos
        self.special_tokens = {
            self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)
        }

    def encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def save_model_file(self, directory: Path) -> dict[str, str]:
        (directory / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        return {"tokenizer_class": "LlamaTokenizer"}
