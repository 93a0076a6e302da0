"""Chat formats (Mistral instruct v1/v3/v7, Llama 2, checkpoint jinja) that never turn message text into control ids."""

import datetime
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox

from mistral_jax import families
from mistral_jax.errors import UserError
from mistral_jax.tokenizers.errors import UnsupportedTokenizer
from mistral_jax.tokenizers.vocab import Span, Vocab

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant")


class ChatFormat(Protocol):
    """Turns a conversation (and the tools it may call) into prompt token ids."""

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]: ...

    def supports_tools(self, vocab: Vocab) -> bool:
        """Whether the format lists tools and encodes tool calls and results."""
        ...


def check_message(message: Mapping[str, Any], tools: bool = False) -> None:
    """Raise a UserError naming what a message holds that the chat format cannot encode (tool calls and results
    where it has no tool format, images)."""
    role, content = message.get("role"), message.get("content")
    if (role == "tool" or message.get("tool_calls")) and not tools:
        raise UserError("this chat format has no tool format: tool calls and tool results cannot be encoded")
    if isinstance(content, list):
        raise UserError("content parts (images, audio) are not supported; a message's content must be a str")
    if content is None and message.get("tool_calls"):  # OpenAI's assistant turn that only calls tools
        return
    if role not in (*ROLES, "tool") or not isinstance(content, str):
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

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        control_tokens, v7 = self.uses_control_tokens(vocab), self.uses_system_prompt_tokens(vocab)
        if v7 and not control_tokens:
            raise UnsupportedTokenizer("a tokenizer with [SYSTEM_PROMPT] but no [INST]/[/INST] tokens is not Mistral's")
        uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if uses_tools and not self.supports_tools(vocab):
            raise UserError("this Mistral tokenizer has no tool tokens ([AVAILABLE_TOOLS], [TOOL_CALLS], ...)")
        turns = _mistral_turns(messages, v7)
        system = "" if v7 else "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
        system_turn = (users[-1] if control_tokens else users[0]) if system else None
        specials, eos = vocab.special_tokens, _require(vocab.eos_id, "EOS")
        ids = [_require(vocab.bos_id, "BOS")]
        for i, turn in enumerate(turns):
            role, content = turn["role"], turn["content"]
            if role == "system":
                ids += [specials["[SYSTEM_PROMPT]"], *vocab.encode_text(content), specials["[/SYSTEM_PROMPT]"]]
            elif role == "user":
                if i == system_turn:
                    content = f"{system}\n\n{content}"
                if tools and i == users[-1]:
                    listed = json.dumps([_mistral_tool(t) for t in tools], ensure_ascii=False)
                    ids += [specials["[AVAILABLE_TOOLS]"], *vocab.encode_text(listed), specials["[/AVAILABLE_TOOLS]"]]
                if control_tokens:
                    ids += [specials["[INST]"], *vocab.encode_text(content), specials["[/INST]"]]
                else:
                    ids += vocab.encode_text(f"[INST] {content} [/INST]")
            elif role == "tool":
                ids += _mistral_tool_result(vocab, turn, v7)
            else:
                calls = turn.get("tool_calls")
                if calls and content and not v7:
                    raise UserError("an assistant message has both content and tool_calls, which v3 cannot encode")
                if not content and not calls:
                    raise UserError("an assistant message has empty content")
                if content:
                    ids += vocab.encode_text(content.rstrip(" ") if control_tokens else content)
                if calls:
                    ids += [specials["[TOOL_CALLS]"], *vocab.encode_text(json.dumps(calls, ensure_ascii=False))]
                ids.append(eos)
        return ids

    @staticmethod
    def supports_tools(vocab: Vocab) -> bool:
        """The tokenizer carries the tool control tokens (v2 and later)."""
        return all(t in vocab.special_tokens for t in MISTRAL_TOOL_TOKENS)


MISTRAL_TOOL_TOKENS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


def _json_or_text(text: str | None):
    """A JSON string's value, or the string itself where it is not JSON (as mistral-common reads contents)."""
    try:
        return json.loads(text or "")
    except json.JSONDecodeError:
        return text


def _mistral_turns(messages: Sequence[Message], v7: bool) -> list[dict[str, Any]]:
    """mistral-common's normalizer: runs of user (or assistant) messages merged with "\n\n" (empty contents
    skipped, tool calls concatenated with their arguments re-serialized), tool results one each (JSON content
    re-serialized up to v3), system messages kept in place (v7) or left to the system prompt; an empty user turn
    first unless the conversation starts with one (v7: only if there is nothing else)."""
    turns: list[dict[str, Any]] = []
    for role, group in itertools.groupby(messages, key=lambda m: m["role"]):
        group = list(group)
        if role in ("user", "assistant"):
            turn: dict[str, Any] = {"role": role, "content": "\n\n".join(m["content"] for m in group if m["content"])}
            calls = [call for m in group for call in m.get("tool_calls") or ()]
            if calls:
                turn["tool_calls"] = [_mistral_call(call) for call in calls]
            turns.append(turn)
        elif role == "tool":
            turns += [{"role": "tool", "content": m["content"] if v7 else _reserialized(m["content"]),
                       "tool_call_id": m.get("tool_call_id")} for m in group]
        elif v7:  # each system message is its own block, empty ones included
            turns += [{"role": role, "content": m["content"]} for m in group]
    if not turns or (not v7 and turns[0]["role"] != "user"):
        turns.insert(0, {"role": "user", "content": ""})
    return turns


def _reserialized(text: str | None) -> str:
    """JSON text as mistral-common normalizes it (json.dumps of its value; "{}" for none), other text as is."""
    if not text:
        return "{}"
    value = _json_or_text(text)
    return text if value is text else json.dumps(value, ensure_ascii=False)


def _mistral_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as [TOOL_CALLS] lists it: name, arguments as JSON (not a string), id."""
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise UserError(f"tool calls need a function with a name, got {dict(call)!r}")
    out = {"name": function["name"], "arguments": _json_or_text(_reserialized(function.get("arguments")))}
    if call.get("id") and call["id"] != "null":
        out["id"] = call["id"]
    return out


def _mistral_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool as [AVAILABLE_TOOLS] lists it (mistral-common's Tool without `strict`)."""
    function = tool["function"]
    return {"type": "function", "function": {"name": function["name"], "description": function.get("description") or "",
                                             "parameters": function.get("parameters") or {}}}


def _mistral_tool_result(vocab: Vocab, turn: Mapping[str, Any], v7: bool) -> list[int]:
    call_id, specials = turn.get("tool_call_id"), vocab.special_tokens
    if not call_id:
        raise UserError("a tool message needs the tool_call_id of the call it answers")
    if v7:
        return [specials["[TOOL_RESULTS]"], *vocab.encode_text(call_id), specials["[TOOL_CONTENT]"],
                *vocab.encode_text(turn["content"] or ""), specials["[/TOOL_RESULTS]"]]
    result = json.dumps({"content": _json_or_text(turn["content"]), "call_id": call_id}, ensure_ascii=False)
    return [specials["[TOOL_RESULTS]"], *vocab.encode_text(result), specials["[/TOOL_RESULTS]"]]


class Llama2Chat:
    """Llama 2 chat as Meta's reference `chat_completion` builds it.

    An optional leading system message is wrapped in <<SYS>> and prepended to the first user message; each
    (user, answer) pair is `BOS "[INST] {user} [/INST] {answer} " EOS` and a final user turn is
    `BOS "[INST] {user} [/INST]"`, contents stripped. Roles must alternate user/assistant. `add_generation_prompt`
    changes nothing: a prompt ending in a user turn already ends with [/INST].
    """

    def supports_tools(self, vocab: Vocab) -> bool:
        return False

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        if tools:
            raise UserError("Llama 2 chat has no tool format")
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
        self._reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))

    def supports_tools(self, vocab: Vocab) -> bool:
        """The template reads `tools` (transformers passes the tools' JSON schemas under that name)."""
        return self._reads_tools

    def render(self, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str, eos_token: str,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text, exactly as transformers' `apply_chat_template(..., tools=..., tokenize=False)`."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                tools=[dict(t) for t in tools] if tools else None,
            )
        except jinja2.TemplateError as error:
            raise UserError(f"the chat template rejected the conversation: {error}") from error

    def render_spans(
        self, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str, eos_token: str,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Span]:
        """The rendered prompt as (text, written_by_template) spans."""
        contents = [m["content"] for m in messages]
        real = self.render(messages, add_generation_prompt, bos_token, eos_token, tools)
        marked_messages = [{**m, "content": f"\ue000{i}\ue001" if m["content"] else ""} for i, m in enumerate(messages)]
        parts = _SENTINEL.split(self.render(marked_messages, add_generation_prompt, bos_token, eos_token, tools))
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

    def encode(self, vocab: Vocab, messages: Sequence[Message], add_generation_prompt: bool,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        bos = "" if vocab.bos_id is None else vocab.id_to_piece(vocab.bos_id)
        eos = "" if vocab.eos_id is None else vocab.id_to_piece(vocab.eos_id)
        return vocab.encode_spans(self.render_spans(messages, add_generation_prompt, bos, eos, tools))


def default_chat_format(family: str | None) -> ChatFormat | None:
    """The format for a checkpoint without a template: the family table's (families.py) chat format."""
    if family is None:
        return None
    formats = {"mistral-instruct": MistralInstruct, "llama2": Llama2Chat}
    return formats[families.get(family).chat_format]()
