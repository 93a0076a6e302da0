"""The model's tool calls read back as OpenAI `tool_calls`: after Mistral's [TOOL_CALLS] token a JSON list of
{"name", "arguments"}; in a jinja template's output, JSON objects between <tool_call> tags (Hermes / Qwen)."""

from __future__ import annotations

import json
import uuid

from mistral_jax.tokenizers.chat_templates import MistralInstruct

TAG, END_TAG = "<tool_call>", "</tool_call>"


def call_id() -> str:
    """A new call id: 9 letters and digits, the form Mistral's formats require of ids sent back to them."""
    return uuid.uuid4().hex[:9]


def _openai_call(call) -> dict | None:
    """{"name", "arguments"} (arguments an object or a JSON string) as an OpenAI tool call, None if malformed."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    given = call.get("id")
    return {"id": given if isinstance(given, str) and given else call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


class ToolCallParser:
    """Splits a generated answer into (content, tool calls) for one tokenizer's format."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        mistral = isinstance(tokenizer.chat_format, MistralInstruct)
        self.marker_id = tokenizer.vocab.special_tokens.get("[TOOL_CALLS]") if mistral else None

    def split(self, token_ids: list[int]) -> tuple[str, list[dict] | None]:
        """(the text before any call, the calls or None where there are none or they do not parse)."""
        if self.marker_id is not None:
            if self.marker_id not in token_ids:
                return self.tokenizer.decode(token_ids), None
            at = token_ids.index(self.marker_id)
            content, rest = self.tokenizer.decode(token_ids[:at]), self.tokenizer.decode(token_ids[at + 1:])
            calls = _parse_json(rest)
            calls = calls if isinstance(calls, list) else [calls]
        else:
            text = self.tokenizer.decode(token_ids)
            if TAG not in text:
                return text, None
            content, rest = text.split(TAG, 1)
            calls = [_parse_json(part.split(END_TAG, 1)[0]) for part in (TAG + rest).split(TAG)[1:]]
        parsed = [_openai_call(c) for c in calls]
        if not parsed or any(c is None for c in parsed):
            return self.tokenizer.decode(token_ids), None
        return content.strip(), parsed

    def starts_call(self, token_ids: list[int], text: str) -> bool:
        """Whether the answer so far has begun a tool call (a stream holds its text back from then on)."""
        return self.marker_id in token_ids if self.marker_id is not None else TAG in text

    def may_start_call(self, text: str) -> int:
        """How many characters at the end of `text` could be the start of a <tool_call> tag (held back)."""
        if self.marker_id is not None:
            return 0
        return max((k for k in range(1, len(TAG)) if text.endswith(TAG[:k])), default=0)


def _parse_json(text: str):
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return None


def call_schema(tool: dict) -> dict:
    """The JSON schema of one call of an OpenAI tool ({"type": "function", "function": {...}}): its name and
    arguments valid under its parameters."""
    function = tool["function"]
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_grammar(tools: list[dict], name: str | None, marker_id: int | None) -> str:
    """A lark grammar (llguidance's, with inline %json) of exactly one call of the named tool (None: any of
    `tools`), written as `ToolCallParser` reads it back: after Mistral's [TOOL_CALLS] token (`marker_id`) a JSON
    list of one call, elsewhere one JSON object between <tool_call> tags. Compact JSON, as for response_format."""
    schemas = [call_schema(t) for t in tools if name is None or t["function"]["name"] == name]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    guidance = {"x-guidance": {"whitespace_flexible": False}}
    if marker_id is not None:
        body = {"type": "array", "items": schema, "minItems": 1, "maxItems": 1, **guidance}
        return f"start: <[{marker_id}]> %json {json.dumps(body)}"
    return f"start: {json.dumps(TAG)} %json {json.dumps({**schema, **guidance})} {json.dumps(END_TAG)}"
