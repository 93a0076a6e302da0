"""Chat formats (Mistral instruct v1/v3/v7, Llama 2, checkpoint jinja) that never turn message text into control ids."""

import datetime
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.sandbox

from mistral_jax import families
from mistral_jax.errors import UserError
from mistral_jax.tokenizers.errors import UnsupportedTokenizer
from mistral_jax.tokenizers.vocab import Span, Vocab

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant")


class ChatFormat(Protocol):
    """Turns a conversation into prompt token ids."""

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]: ...


def check_message(message: Mapping[str, Any]) -> None:
    """Raise a UserError naming what a message holds that no chat format here encodes (tool calls, images)."""
    role, content = message.get("role"), message.get("content")
    if role == "tool" or message.get("tool_calls"):
        raise UserError("tool calls and tool results are not supported in chat messages; only text turns are")
    if isinstance(content, list):
        raise UserError("content parts (images, audio) are not supported; a message's content must be a str")
    if role not in ROLES or not isinstance(content, str):
        raise UserError(f"a message needs a role in {ROLES} and a str content, got {message!r}")


def _require(token_id: int | None, what: str) -> int:
    if token_id is None:
        raise UserError(f"this chat format needs a {what} token, and the tokenizer has none")
    return token_id


class MistralInstruct:
    """Mistral's instruct format exactly as mistral-common encodes it (v1, v2/v3 with control tokens, and v7;
    sentencepiece and tekken vocabularies alike).

    Consecutive user (or assistant) messages are merged with "\\n\\n", empty ones skipped. Up to v3, all system
    messages are joined with "\\n\\n" and prepended to the first user message (v1) or the last one (v2/v3), and a
    conversation that does not start with a user message gets an empty one first. v7 keeps each system message
    where it stands, as [SYSTEM_PROMPT] text [/SYSTEM_PROMPT], and adds no empty user message. v1 spells
    [INST]/[/INST] as text, later versions use the control tokens and strip trailing spaces off answers. Every
    answer ends with EOS. `add_generation_prompt` changes nothing: a prompt ending in a user turn ends with [/INST].
    """

    @staticmethod
    def uses_control_tokens(vocab: Vocab) -> bool:
        """v2/v3/v7 layout (True) or v1 (False): later tokenizers carry [INST]/[/INST] as control tokens."""
        return "[INST]" in vocab.special_tokens and "[/INST]" in vocab.special_tokens

    @staticmethod
    def uses_system_prompt_tokens(vocab: Vocab) -> bool:
        """v7 layout: the file says v7 or later (tekken), or, where it says no version, the tokenizer carries
        [SYSTEM_PROMPT]/[/SYSTEM_PROMPT] control tokens (tekken v3 files carry them unused)."""
        if vocab.version is not None:
            return int(vocab.version.removeprefix("v").split("m")[0]) >= 7
        return "[SYSTEM_PROMPT]" in vocab.special_tokens and "[/SYSTEM_PROMPT]" in vocab.special_tokens

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        control_tokens, v7 = self.uses_control_tokens(vocab), self.uses_system_prompt_tokens(vocab)
        if v7 and not control_tokens:
            raise UnsupportedTokenizer("a tokenizer with [SYSTEM_PROMPT] but no [INST]/[/INST] tokens is not Mistral's")
        turns: list[tuple[str, str]] = []
        for role, group in itertools.groupby(messages, key=lambda m: m["role"]):
            if role != "system":
                turns.append((role, "\n\n".join(m["content"] for m in group if m["content"])))
            elif v7:  # each system message is its own block, empty ones included
                turns += [(role, m["content"]) for m in group]
        if not turns or (not v7 and turns[0][0] != "user"):
            turns.insert(0, ("user", ""))
        system = "" if v7 else "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        system_turn = (users[-1] if control_tokens else users[0]) if system else None
        specials, eos = vocab.special_tokens, _require(vocab.eos_id, "EOS")
        ids = [_require(vocab.bos_id, "BOS")]
        for i, (role, content) in enumerate(turns):
            if role == "system":
                ids += [specials["[SYSTEM_PROMPT]"], *vocab.encode_text(content), specials["[/SYSTEM_PROMPT]"]]
            elif role == "user":
                if i == system_turn:
                    content = f"{system}\n\n{content}"
                if control_tokens:
                    ids += [specials["[INST]"], *vocab.encode_text(content), specials["[/INST]"]]
                else:
                    ids += vocab.encode_text(f"[INST] {content} [/INST]")
            else:
                if not content:
                    raise UserError("an assistant message has empty content")
                ids += [*vocab.encode_text(content.rstrip(" ") if control_tokens else content), eos]
        return ids


class Llama2Chat:
    """Llama 2 chat as Meta's reference `chat_completion` builds it.

    An optional leading system message is wrapped in <<SYS>> and prepended to the first user message; each
    (user, answer) pair is `BOS "[INST] {user} [/INST] {answer} " EOS` and a final user turn is
    `BOS "[INST] {user} [/INST]"`, contents stripped. Roles must alternate user/assistant. `add_generation_prompt`
    changes nothing: a prompt ending in a user turn already ends with [/INST].
    """

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        dialog = [(m["role"], m["content"]) for m in messages]
        if dialog and dialog[0][0] == "system":
            if len(dialog) < 2:
                raise UserError("Llama 2 chat needs a user message after the system message")
            dialog = [(dialog[1][0], f"<<SYS>>\n{dialog[0][1]}\n<</SYS>>\n\n{dialog[1][1]}"), *dialog[2:]]
        roles = [role for role, _ in dialog]
        if not dialog or any(role != "user" for role in roles[::2]) or any(r != "assistant" for r in roles[1::2]):
            raise UserError(f"Llama 2 chat needs alternating user/assistant messages after a system one, got {roles}")
        bos, eos = _require(vocab.bos_id, "BOS"), _require(vocab.eos_id, "EOS")
        ids: list[int] = []
        for (_, user), (_, answer) in zip(dialog[::2], dialog[1::2]):
            ids += [bos, *vocab.encode_text(f"[INST] {user.strip()} [/INST] {answer.strip()} "), eos]
        if len(dialog) % 2:
            ids += [bos, *vocab.encode_text(f"[INST] {dialog[-1][1].strip()} [/INST]")]
        return ids


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


# Placeholders for message contents: private-use characters, which neither trim nor any template adds.
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class JinjaTemplate:
    """A chat template carried by the checkpoint, rendered as transformers renders it.

    To keep message text from becoming special tokens, the template is rendered twice: with the real contents
    and with each non-empty content replaced by a sentinel. The sentinel rendering tells which characters the
    template wrote; only there are special-token strings turned into ids. Templates that transform contents
    beyond stripping whitespace are refused rather than guessed.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
        """The prompt text, exactly as transformers' `apply_chat_template(..., tokenize=False)`."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        except jinja2.TemplateError as error:
            raise UserError(f"the chat template rejected the conversation: {error}") from error

    def render_spans(
        self, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str, eos_token: str
    ) -> list[Span]:
        """The rendered prompt as (text, written_by_template) spans."""
        contents = [m["content"] for m in messages]
        real = self.render(messages, add_generation_prompt, bos_token, eos_token)
        marked_messages = [{**m, "content": f"\ue000{i}\ue001" if m["content"] else ""} for i, m in enumerate(messages)]
        parts = _SENTINEL.split(self.render(marked_messages, add_generation_prompt, bos_token, eos_token))
        spans: list[Span] = []
        pos = 0
        for k, part in enumerate(parts):
            if k % 2 == 0:
                if not real.startswith(part, pos):
                    raise UserError("the chat template renders differently depending on message text; unsupported")
                spans.append((part, True))
                pos += len(part)
                continue
            content = contents[int(part)]
            for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                if real.startswith(candidate, pos) and real.startswith(parts[k + 1], pos + len(candidate)):
                    spans.append((candidate, False))
                    pos += len(candidate)
                    break
            else:
                raise UserError("the chat template transforms message text beyond stripping it; unsupported")
        if pos != len(real):
            raise UserError("the chat template renders differently depending on message text; unsupported")
        return [span for span in spans if span[0]]

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        bos = "" if vocab.bos_id is None else vocab.id_to_piece(vocab.bos_id)
        eos = "" if vocab.eos_id is None else vocab.id_to_piece(vocab.eos_id)
        return vocab.encode_spans(self.render_spans(messages, add_generation_prompt, bos, eos))


def default_chat_format(family: str | None) -> ChatFormat | None:
    """The format for a checkpoint without a template: the family table's (families.py) chat format."""
    if family is None:
        return None
    formats = {"mistral-instruct": MistralInstruct, "llama2": Llama2Chat}
    return formats[families.get(family).chat_format]()
