"""Structured output end to end on the embedded SmolLM2: the real server (uvicorn on loopback, in this process so
its compilations are counted) with the `openai` client, over one engine that the tests also call alone. JSON-schema
answers validate; forced tool calls (named, `required`) carry valid arguments, streamed as non-streamed; the server
answers as the engine alone; constrained requests coming and going compile nothing; bad constraints are 400s."""

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

import mistral_jax as mj
from mistral_jax import speculative
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.compile_stats import CompileStats
from mistral_jax.errors import ParamError
from mistral_jax.serving.engine import Engine
from mistral_jax.tokenizers import load_tokenizer
from tests.serving.live import KEY, MODEL, serving_in_process

pytestmark = pytest.mark.slow

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "enum and array": {"type": "object", "properties": {
        "animal": {"enum": ["cat", "dog", "robot"]},
        "legs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
                 "maxItems": 4}},
        "required": ["animal", "legs"], "additionalProperties": False},
    "required and optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 16}, "done": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8}},
        "required": ["title", "done"], "additionalProperties": False},
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["a", "b"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def served():
    """(engine, tokenizer, openai client) of a server on a loopback port over an engine of 4 slots."""
    config, params = mj.load(default_model_path())
    tokenizer = load_tokenizer(default_model_path())
    engine = Engine(config, params, tokenizer, max_batch=4, max_seq_len=384, prefill_chunk=128).start()
    with serving_in_process(engine, tokenizer) as url:
        yield engine, tokenizer, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    engine.stop()


def _ask(client, content: str, max_tokens: int = MAX_TOKENS, **extra):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=max_tokens, **extra)


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": re.sub(r"\W", "_", name), "schema": SCHEMAS[name],
                                                   "strict": True}}


def test_constrained_answers_validate_batched_with_free_text_and_compile_nothing(served):
    engine, _, client = served
    jobs = [(f"Describe a {name} thing as JSON.", {"response_format": _schema_format(name)}) for name in SCHEMAS]
    jobs += [("Give me a JSON object about cats.", {"response_format": {"type": "json_object"}}),
             ("Is the sky blue?", {"extra_body": {"structured_outputs": {"choice": ["yes", "no", "unsure"]}}}),
             ("Write a date.", {"extra_body": {"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}}}),
             ("Say hello.", {})]  # free text in the same batch: its mask is all ones
    with CompileStats() as compiled, concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _ask(client, job[0], **job[1]).choices[0], jobs))
    assert compiled.compilations == 0  # the bitmask is a traced input: grammars come and go, nothing compiles
    for name, answer in zip(SCHEMAS, answers):
        assert answer.finish_reason == "stop"  # the grammar ended the answer
        jsonschema.validate(json.loads(answer.message.content), SCHEMAS[name])
    assert isinstance(json.loads(answers[3].message.content), dict)
    assert answers[4].message.content in ("yes", "no", "unsure")
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", answers[5].message.content)
    assert engine.active_slots == 0


def test_server_answers_as_the_engine_alone(served):
    engine, tokenizer, client = served
    content, schema = "Describe a person as JSON.", SCHEMAS["nested"]
    answer = _ask(client, content, response_format=_schema_format("nested")).choices[0].message.content
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}])
    sampling = mj.SamplingParams(max_tokens=MAX_TOKENS, response_format={"json_schema": schema})
    alone = [t for event in engine.submit(prompt, sampling) for t in event.token_ids]
    assert tokenizer.decode(alone) == answer
    plain = [t for event in engine.submit(prompt, mj.SamplingParams(max_tokens=len(alone))) for t in event.token_ids]
    assert plain != alone  # the constraint changed the greedy answer (SmolLM2 writes prose here)
    with pytest.raises(ParamError, match="response_format") as err:  # generate's loop runs on device: refused
        mj.generate(engine.config, engine.runner.params, [prompt], 8, sampling=sampling)
    assert err.value.param == "response_format"


def _call(choice) -> tuple[str, dict]:
    (call,) = choice.message.tool_calls
    return call.function.name, json.loads(call.function.arguments)


def _streamed_call(client, **request) -> tuple[str, dict, str]:
    name, arguments, finish = None, "", None
    for chunk in client.chat.completions.create(model=MODEL, temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                **request):
        delta = chunk.choices[0].delta if chunk.choices else None
        for call in (delta.tool_calls or []) if delta else []:
            name = call.function.name or name
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason if chunk.choices and chunk.choices[0].finish_reason else finish
    return name, json.loads(arguments), finish


def test_forced_tool_calls_carry_valid_arguments_streamed_as_not(served):
    _, _, client = served
    messages = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
    named = dict(messages=messages, tools=[WEATHER, ADD], tool_choice={"type": "function",
                                                                     "function": {"name": "add"}})
    required = dict(messages=messages, tools=[WEATHER, ADD], tool_choice="required")
    for request, names in ((named, {"add"}), (required, {"add", "get_weather"})):
        choice = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=MAX_TOKENS, **request).choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        name, arguments = _call(choice)
        assert name in names
        jsonschema.validate(arguments, PARAMETERS[name])
        assert _streamed_call(client, **request) == (name, arguments, "tool_calls")


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_a_constraint_that_does_not_compile_is_a_400_naming_it(served, extra, param):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "Hi", **extra)
    assert err.value.body["param"] == param
    assert _ask(client, "Hi", max_tokens=2).choices[0].finish_reason == "length"  # the server goes on


def test_sampling_params_compile_the_constraint_once_at_construction():
    p = mj.SamplingParams(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[
        "nested"]}})
    assert json.loads(p.response_format) == {"json_schema": SCHEMAS["nested"]} and p.grammar
    assert p == mj.SamplingParams(response_format={"json_schema": SCHEMAS["nested"]})  # the forms agree
    assert mj.SamplingParams(response_format={"type": "text"}).grammar is None
    for bad in ({"json_schema": {"type": "bogus"}}, {"regex": "("}, {"choice": []}, {"json_object": True, "regex": "a"},
                {"type": "xml"}, "not json"):
        with pytest.raises(ParamError) as err:
            mj.SamplingParams(response_format=bad)
        assert err.value.param == "response_format"


def test_speculation_is_off_for_constrained_rows(served):
    """Prompt lookup on: an answer that copies its prompt keeps drafts when free, none when constrained (its steps
    run at width 0), and the constrained answer is the plain engine's."""
    plain, tokenizer, _ = served
    # The served engine's weights (no second load); no warm-up: this test counts no compilations (warm-up's
    # programs are test_engine_speculative's), so only the programs its two requests run compile.
    engine = Engine(plain.runner.config, plain.runner.params, tokenizer, max_batch=2, max_seq_len=128,
                    prefill_chunk=128, speculation=speculative.Speculation(2), gate=False, warm_up=False).start()
    try:
        record = '{"name":"Anna","address":{"city":"Paris","zip":75001}}'
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"Repeat exactly: {record} {record}"}])
        sampling = mj.SamplingParams(max_tokens=40, response_format={"json_schema": SCHEMAS["nested"]})
        free = engine.submit(prompt, mj.SamplingParams(max_tokens=40))
        free_tokens = [t for e in free for t in e.token_ids]
        constrained = engine.submit(prompt, sampling)
        tokens = [t for e in constrained for t in e.token_ids]
        assert free.accepted_drafts > 0 and constrained.accepted_drafts == 0
        assert tokens == [t for e in plain.submit(prompt, sampling) for t in e.token_ids]
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMAS["nested"])
        assert free_tokens == [t for e in plain.submit(prompt, mj.SamplingParams(max_tokens=40)) for t in e.token_ids]
    finally:
        engine.stop()
