"""Hugging Face `tokenizers` backend: `tokenizer.json` files and GGUF byte-level BPE vocabularies built in memory."""

from collections.abc import Sequence
from pathlib import Path

import tokenizers

from mistral_jax.tokenizers.vocab import Span, Vocab


class HFVocab(Vocab):
    """A `tokenizers.Tokenizer`; its added tokens marked special are the special tokens."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None, add_bos: bool | None
    ) -> None:
        """`add_bos=None` infers it from the tokenizer's post-processor (does it prepend `bos_id`?)."""
        self._tok = tokenizer
        # A copy that treats special-token strings as plain text, for user-controlled text.
        self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.special_tokens = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        if add_bos is None:
            full, plain = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
            add_bos = bos_id is not None and len(full) > len(plain) and full[0] == bos_id
        self.add_bos = add_bos

    def encode_text(self, text: str) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it): a server's other threads run on
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_spans(self, spans: Sequence[Span]) -> list[int]:
        """Encode the whole text as transformers does, unless a special token landed outside the template's spans.

        Encoding the full string keeps the library's exact behaviour at segment borders (Metaspace's
        prepend_scheme="first", added tokens that strip spaces). When message text spells a special token, fall
        back to the generic split, which only honours special tokens inside template spans.
        """
        encoding = self._tok.encode_batch(["".join(text for text, _ in spans)], add_special_tokens=False)[0]
        template_ranges: list[tuple[int, int]] = []
        start = 0
        for text, from_template in spans:
            if from_template and template_ranges and template_ranges[-1][1] == start:
                template_ranges[-1] = (template_ranges[-1][0], start + len(text))
            elif from_template:
                template_ranges.append((start, start + len(text)))
            start += len(text)
        special_ids = set(self.special_tokens.values())
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets):
            if token_id in special_ids and not any(lo <= begin and end <= hi for lo, hi in template_ranges):
                return super().encode_spans(spans)
        return encoding.ids

    def to_json(self) -> str:
        """The tokenizer.json text (grammar libraries build their token tables from it)."""
        return self._tok.to_str()

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return piece

    def save_model_file(self, directory: Path) -> dict[str, str]:
        self._tok.save(str(directory / "tokenizer.json"))
        return {"tokenizer_class": "PreTrainedTokenizerFast"}
