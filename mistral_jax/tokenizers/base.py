"""`Tokenizer`: one interface over every backend for encoding prompts, chat formatting and streaming decode."""

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mistral_jax import families
from mistral_jax.errors import UserError
from mistral_jax.tokenizers.chat_templates import ChatFormat, JinjaTemplate, Message, check_message
from mistral_jax.tokenizers.vocab import Vocab

# Special tokens that end an assistant turn in common chat formats; those in the vocabulary join EOS as stop ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class DecodeStream:
    """Turns token ids, fed one at a time, into text pieces whose concatenation is the decoded text.

    Each step decodes a short window that starts at the previous piece boundary, so sentencepiece's
    leading-space handling sees a real preceding token, and holds text back while it ends in an incomplete
    UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of the ids whose text has been returned

    def step(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its chat format and the ids that end generation."""

    def __init__(self, vocab: Vocab, chat_format: ChatFormat | None, source: str) -> None:
        """`source` names where the tokenizer came from, for error messages."""
        self.vocab = vocab
        self.chat_format = chat_format
        self.source = source
        stops = [] if vocab.eos_id is None else [vocab.eos_id]
        stops += [vocab.special_tokens[t] for t in END_OF_TURN_TOKENS if t in vocab.special_tokens]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it stay text.

        `bos` prepends BOS where the tokenizer's convention uses one (sentencepiece models, GGUF
        `add_bos_token`, tokenizer_config `add_bos_token` or the tokenizer.json post-processor); `eos` appends EOS.
        """
        ids = self.vocab.encode_text(text)
        if bos and self.vocab.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise UserError(f"{self.source}: the tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special/control tokens left out."""
        return self.vocab.decode([int(i) for i in ids])

    def decode_stream(self) -> DecodeStream:
        """A fresh incremental decoder for one generated sequence."""
        return DecodeStream(self.vocab.decode)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Prompt ids of a conversation of {"role": "system"|"user"|"assistant", "content": str} messages, and
        where the format has tools, OpenAI's tools ({"type": "function", "function": {...}}), role "tool" messages
        ({"tool_call_id"}) and assistant "tool_calls".

        Message text never becomes a control token, whatever it spells.
        """
        if self.chat_format is None:
            raise UserError(
                f"{self.source}: the checkpoint carries no chat template; "
                f"pass family= one of {families.NAMES} to load_tokenizer to pick a default one"
            )
        tools_ok = self.supports_tools
        if tools and not tools_ok:
            raise UserError(f"{self.source}: this chat format has no tool format, so it cannot list tools")
        for message in messages:
            check_message(message, tools_ok)
        return self.chat_format.encode(self.vocab, messages, add_generation_prompt, tools)

    @property
    def supports_tools(self) -> bool:
        """The chat format lists tools and encodes tool calls and results (Mistral v2+, templates reading tools)."""
        return self.chat_format is not None and self.chat_format.supports_tools(self.vocab)

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        """Write the files transformers loads a tokenizer from (tokenizer.json or tokenizer.model, plus
        tokenizer_config.json with BOS/EOS, add_bos_token and the jinja chat template, if any)."""
        directory = Path(directory)
        config = self.vocab.save_model_file(directory)
        config["add_bos_token"] = bool(self.vocab.add_bos)
        config["add_eos_token"] = False
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if token_id is not None:
                config[key] = self.vocab.id_to_piece(token_id)
        if isinstance(self.chat_format, JinjaTemplate):
            config["chat_template"] = self.chat_format.source
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return sorted(p for p in directory.iterdir() if p.name.startswith("tokenizer"))
