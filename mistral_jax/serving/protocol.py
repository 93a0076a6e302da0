"""The OpenAI protocol, typed: request and response bodies (pydantic, so /openapi.json documents them), which
fields are honoured and which refused, and the one conversion of a request into the engine's SamplingParams.

Every field of OpenAI's chat and completions requests is declared here. A field that would change the answer
and that we cannot honour is refused with a 400 naming it (`REFUSED`); `user`, `metadata`, `store`,
`service_tier`, `prompt_cache_key` and `safety_identifier` change nothing about the tokens and are ignored.
Unknown fields are refused too (extra="forbid"), so a typo never silently changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mistral_jax.errors import ParamError
from mistral_jax.sampling import TOP_LOGPROBS, SamplingParams
from mistral_jax.serving.requests import RequestError

MAX_STOP = 4  # OpenAI's limit on stop strings
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _Strict(BaseModel):
    """A request part: JSON types as sent (no "1" for 1, no true for 1), no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    """A response part."""

    model_config = ConfigDict(extra="allow")


# Requests ---------------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One turn. `developer` is read as `system`; content parts must be text."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields chat and completions share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    user: str | None = None  # ignored: it names the caller, it changes no token
    # vLLM's extras
    top_k: int = Field(0, ge=-1, lt=2**31)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    structured_outputs: StructuredOutputs | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, lt=2**31)
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None  # ignored
    store: bool | None = None  # ignored: nothing is stored
    service_tier: str | None = None  # ignored: one tier
    prompt_cache_key: str | None = None  # ignored: prefixes are matched by their tokens
    safety_identifier: str | None = None  # ignored
    modalities: list[Literal["text"]] | None = None
    # refused whenever set (see REFUSED)
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions: a prompt as text or token ids, or a list of either (one choice each)."""

    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0, lt=2**31)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None
    return_tokens_as_token_ids: bool = False


class LoadLoraAdapterRequest(_Strict):
    """POST /v1/load_lora_adapter, vLLM's body: serve the adapter at lora_path as the model lora_name."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Strict):
    """POST /v1/unload_lora_adapter, vLLM's body (lora_int_id is accepted and not needed)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class TokenizeRequest(_Strict):
    """POST /tokenize, as vLLM takes it: a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[Tool] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


# Why each refused field is refused (the 400's message); a field not listed here is honoured or ignored.
REFUSED = {
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model does no separate reasoning",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated `functions` are not supported: send `tools`",
    "function_call": "the deprecated `function_call` is not supported: send `tool_choice`",
    "suffix": "insertion (a prompt suffix) is not supported",
}
_DEFAULTS = {"suffix": ""}


def refuse_unsupported(request: _Sampling) -> None:
    """A 400 naming the first field set that we cannot honour."""
    for name, why in REFUSED.items():
        value = getattr(request, name, None)
        if value is not None and value != _DEFAULTS.get(name, None):
            raise RequestError(name, f"{name}: {why}")
    if getattr(request, "best_of", None) not in (None, request.n):
        raise RequestError("best_of", "best_of: only best_of equal to n is supported (no choices are ranked)")
    if request.stream_options is not None and not request.stream:
        raise RequestError("stream_options", "stream_options is only allowed with stream: true")


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The settings of a request's n choices: choice j seeded seed + j (`SamplingParams.for_row`, generate's recipe
    for batch rows, and vLLM's for n), so choices differ and each equals a lone request with its seed. Greedy
    choices are all alike, as OpenAI returns them (vLLM refuses n > 1 with temperature 0)."""
    return [params.for_row(j) for j in range(n)]


def stop_strings(request: _Sampling) -> tuple[str, ...]:
    stop = request.stop if request.stop is not None else ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(stop) or len(stop) > MAX_STOP:
        raise RequestError("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
    return stop


def constraint(request: _Sampling) -> tuple[dict | None, str]:
    """(the request's constraint in grammars.py's one-key form or None, the field it came from): vLLM's
    structured_outputs (json / regex / choice / grammar) or response_format json_object / json_schema."""
    form = getattr(request, "response_format", None)
    form = None if form is None or form.type == "text" else form
    outputs = request.structured_outputs
    if outputs is not None and form is not None:
        raise RequestError("structured_outputs", "structured_outputs: send it or response_format, not both")
    if outputs is not None:
        given = {k: v for k, v in (("json_schema", outputs.json_), ("regex", outputs.regex),
                                   ("choice", outputs.choice), ("grammar", outputs.grammar)) if v is not None}
        if len(given) != 1:
            raise RequestError("structured_outputs", "structured_outputs: give exactly one of json, regex, choice, "
                                                     "grammar")
        return given, "structured_outputs"
    if form is None:
        return None, "response_format"
    if form.type == "json_object":
        return {"json_object": True}, "response_format"
    if form.json_schema is None or form.json_schema.schema_ is None:
        raise RequestError("response_format.json_schema.schema", "response_format: json_schema needs a schema")
    return {"json_schema": form.json_schema.schema_}, "response_format"


def sampling_params(request: ChatCompletionRequest | CompletionRequest, max_tokens: int, *,
                    logprobs: int | None, echo_logprobs: bool = False,
                    constrained: tuple[dict | None, str] | None = None) -> SamplingParams:
    """The engine's settings for a validated request (the one place OpenAI's fields become SamplingParams).
    constrained: (constraint, field) where the caller made it (a tool call's grammar), else `constraint(request)`;
    a constraint llguidance cannot compile is a 400 naming that field."""
    spec, field = constrained or constraint(request)
    try:
        return _sampling_params(request, max_tokens, logprobs, echo_logprobs, spec)
    except ParamError as err:
        if err.param != "response_format":
            raise
        raise RequestError(field, str(err).replace("response_format", field, 1)) from None


def _sampling_params(request, max_tokens: int, logprobs, echo_logprobs: bool, spec) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_k=max(request.top_k, 0),  # vLLM's -1 and 0 both mean off
        top_p=request.top_p,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        logit_bias=request.logit_bias or {},  # keys: token ids as decimal strings (JSON), SamplingParams reads them
        seed=request.seed or 0,
        stop=stop_strings(request),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        echo_logprobs=echo_logprobs,
        response_format=spec,
    )


def chat_max_tokens(request: ChatCompletionRequest, prompt_len: int, context: int) -> int:
    """max_completion_tokens, else max_tokens, else the rest of the context (an explicit value is never absent)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, name)
        if value is not None:
            return value
    return max(1, context - prompt_len)


# Responses (documented in /openapi.json; built as plain dicts) --------------------------------
class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Open):
    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Open):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Open):
    """The answer of a non-streamed chat request (streamed: chat.completion.chunk events of the same shape with
    `delta` for `message`, then `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class LegacyLogprobs(_Open):
    """Completions' logprobs as vLLM returns them: the first echoed token's logprob is null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: LegacyLogprobs | None = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Open):
    prompt: str


ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
