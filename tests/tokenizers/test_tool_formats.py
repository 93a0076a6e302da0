"""Tool prompts: Mistral v3 and v7 token for token as mistral-common's encode_chat_completion with tools, and
jinja templates given `tools` as transformers' apply_chat_template(tools=...) renders them; and the calls read back
from generated tokens (Mistral's [TOOL_CALLS] JSON list, <tool_call> tags) as OpenAI tool_calls."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_jax.errors import UserError
from mistral_jax.serving.tools import ToolCallParser
from mistral_jax.tokenizers import load_tokenizer
from mistral_jax.tokenizers.base import Tokenizer
from mistral_jax.tokenizers.chat_templates import JinjaTemplate

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CONVERSATIONS = {
    "tools listed": [{"role": "user", "content": "Weather in Paris?"}],
    "a call and its result": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("abc123XYZ", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": '{"temp": 21, "sky": "clear"}'},
    ],
    "two calls, text results, then a new question": [
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            _call("call00001", "get_weather", {"city": "Oslo", "unit": "c"}), _call("call00002", "get_time", {})]},
        {"role": "tool", "tool_call_id": "call00001", "content": "cloudy, 4 degrees"},
        {"role": "tool", "tool_call_id": "call00002", "content": "12:00"},
        {"role": "assistant", "content": "Cloudy and 4 degrees at noon."},
        {"role": "user", "content": "And in Rome? Ünïcödé 🙂"},
    ],
}


@pytest.mark.parametrize("version", [3, 7])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tool_prompts_equal_mistral_common(mistral_file: Callable[[int | str], Path], version: int, name: str):
    path = mistral_file(version)
    messages, tools = CONVERSATIONS[name], [WEATHER, TIME]
    reference = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens
    tokenizer = load_tokenizer(path)
    assert tokenizer.supports_tools
    ids = tokenizer.apply_chat_template(messages, tools=tools)
    assert ids == expected
    specials = tokenizer.vocab.special_tokens
    assert ids.count(specials["[AVAILABLE_TOOLS]"]) == 1
    assert ids.count(specials["[TOOL_RESULTS]"]) == sum(m["role"] == "tool" for m in messages)


def test_formats_without_tools_refuse_them(mistral_file: Callable[[int | str], Path], smollm2):
    for tokenizer in (load_tokenizer(mistral_file(1)), smollm2):
        assert not tokenizer.supports_tools
        with pytest.raises(UserError, match="no tool format"):
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER])


# A template in the style of Hermes / Qwen 2.5: tools as JSON in the system turn, calls in <tool_call> tags.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these tools:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": \
{{ c.function.arguments }}}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
MESSAGES = CONVERSATIONS["a call and its result"]


def test_jinja_templates_get_tools_as_transformers_passes_them():
    template = JinjaTemplate(TOOL_TEMPLATE)
    assert template.supports_tools(None) and not JinjaTemplate("{{ messages }}").supports_tools(None)
    text = template.render(MESSAGES, True, "", "", tools=[WEATHER])
    assert json.dumps(WEATHER, ensure_ascii=False) in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "You may call" not in template.render(MESSAGES, True, "", "")  # no tools: `tools` is None, as there


def test_jinja_tools_render_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")))
    hf.chat_template = TOOL_TEMPLATE
    for tools in ([WEATHER, TIME], None):
        expected = hf.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)
        assert JinjaTemplate(TOOL_TEMPLATE).render(MESSAGES, True, "", "", tools=tools) == expected


# Reading calls back ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mistral(mistral_file):
    return load_tokenizer(mistral_file(7))


def test_mistral_tool_calls_token_and_json_list(mistral):
    marker = mistral.vocab.special_tokens["[TOOL_CALLS]"]
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
    ids = [*mistral.vocab.encode_text("Let me check."), marker,
           *mistral.vocab.encode_text(json.dumps(calls)), mistral.eos_id]
    parser = ToolCallParser(mistral)
    content, parsed = parser.split(ids)
    assert content == "Let me check." and [c["function"]["name"] for c in parsed] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in parsed] == [{"city": "Paris"}, {}]
    assert all(c["type"] == "function" and len(c["id"]) == 9 and c["id"].isalnum() for c in parsed)
    assert parser.starts_call(ids, content) and not parser.starts_call(ids[:3], "Let")
    plain = mistral.vocab.encode_text("No tools needed.")
    assert parser.split(plain) == ("No tools needed.", None)
    broken = [marker, *mistral.vocab.encode_text('[{"name": "get_weather", "argu')]  # cut off: stays text
    assert parser.split(broken)[1] is None


def test_tagged_tool_calls(smollm2):
    tokenizer = Tokenizer(smollm2.vocab, JinjaTemplate("{{ tools }}{{ messages }}"), "test")
    parser = ToolCallParser(tokenizer)
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n<tool_call>{"name": "g"}</tool_call>'
    content, calls = parser.split(tokenizer.encode(text, bos=False))
    assert content == "Sure." and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", '{"x": 1}'), ("g", "{}")]
    assert parser.may_start_call("Sure. <tool_") == len("<tool_") and parser.may_start_call("Sure.") == 0
    assert parser.split(tokenizer.encode("<tool_call>not json</tool_call>", bos=False))[1] is None
