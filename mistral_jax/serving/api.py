"""OpenAI-compatible HTTP routes over the engine (FastAPI; server-sent events through sse-starlette).

POST /v1/chat/completions and /v1/completions (streamed or not, with logprobs; completions also with echo, as
lm-evaluation-harness scores log-likelihoods), /tokenize and /detokenize, GET /tokenizer_info (vLLM's, for
evaluation clients), /v1/models, /health and /metrics (Prometheus). Bodies are typed in serving/protocol.py and
checked by serving/guard.py first; bad input gets OpenAI's error object with a 4xx naming the field, a full queue
gets 503 with Retry-After. Tokenizing and template rendering run in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from mistral_jax.errors import UserError
from mistral_jax.serving import protocol
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.engine import Request as EngineRequest
from mistral_jax.serving.guard import BodyGuard
from mistral_jax.serving.protocol import ChatCompletionRequest, CompletionRequest
from mistral_jax.serving.requests import Event, ModelNotFound, QueueFull, RequestError, SamplingParams, TokenLogprob
from mistral_jax.serving.tools import ToolCallParser, call_grammar

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
_LOGPROB_FLOOR = -9999.0  # what -inf is sent as (JSON has no infinity), as OpenAI and vLLM send it


def _error_body(message: str, param: str | None, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers=None):
    return JSONResponse(_error_body(message, param, kind), status_code=status, headers=headers)


async def _send_error(send, status: int, message: str) -> None:
    """An error response written straight to ASGI (BodyGuard's, before any route runs)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps(_error_body(message, None, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names a param: messages[0].content."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "json-", "list[", "str", "int", "literal[")):  # union branch names
            out += f".{part}" if out else part
    return out or None


def _logprob(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


class _Submitted:
    """The requests of one HTTP request (its prompts' n choices each, choice index = prompt * n + j) and the one
    queue of their (choice index, event) pairs, filled from the engine's thread."""

    def __init__(self, requests: list[EngineRequest], events: asyncio.Queue) -> None:
        self.requests, self.events = requests, events

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()  # a no-op once finished; frees the slot or pages of a client that left


class _Streams:
    """Engine events into asyncio: one queue per HTTP request, tagged with each event's choice index."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], n: int = 1,
               adapter: str | None = None) -> _Submitted:
        """Each prompt's n choices submitted on LoRA `adapter` (None: the base) (choice j of prompt i:
        params[i].for_row(j), sharing choice 0's prompt pages), or none of them (a full queue or a bad prompt
        cancels those already in)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        submitted = _Submitted([], events)
        try:
            for i, (prompt, settings) in enumerate(zip(prompts, params)):
                first = None
                for j, choice in enumerate(protocol.choice_params(settings, n)):
                    def put(event: Event, index: int = i * n + j) -> None:
                        loop.call_soon_threadsafe(events.put_nowait, (index, event))
                    request = self.engine.submit(prompt, choice, put, adapter=adapter, after=first)
                    submitted.requests.append(request)
                    first = first or request
        except (QueueFull, UserError):
            submitted.cancel()
            raise
        return submitted

    async def events(self, submitted: _Submitted) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) of every choice as they come, until all finished; cancels them all if the consumer
        stops early. A stream's response (sse_starlette) listens for the client's disconnect and stops it."""
        open_ = len(submitted.requests)
        try:
            while open_:
                index, event = await submitted.events.get()
                open_ -= event.finish_reason is not None
                yield index, event
        finally:
            submitted.cancel()

    async def collect(self, http: Request, submitted: _Submitted) -> list[list[Event]] | None:
        """Each choice's events, or None where the client went away before all finished (a watcher, the request's
        one listener for the disconnect, cancels them: the engine finishes them within a step)."""
        async def cancel_when_gone() -> bool:
            while (await http.receive())["type"] != "http.disconnect":
                pass
            submitted.cancel()
            return True

        watcher = asyncio.ensure_future(cancel_when_gone())
        out: list[list[Event]] = [[] for _ in submitted.requests]
        try:
            async for index, event in self.events(submitted):
                out[index].append(event)
        finally:
            gone = watcher.done() and watcher.result()
            watcher.cancel()
        return None if gone else out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict | str) -> dict:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload)}


class _LegacyLogprobs:
    """Completions' logprobs as vLLM writes them: per token its text, logprob (None for the first prompt token),
    a {text: logprob} dict of the chosen token and the top N, and its text offset (counting on across chunks)."""

    def __init__(self, token_text: Callable[[int], str], top: int, offset: int = 0) -> None:
        self.token_text, self.top, self.offset = token_text, top, offset

    def __call__(self, entries: list[tuple[int, TokenLogprob | None]]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in entries:
            text = self.token_text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if lp is None else _logprob(lp.logprob))
            out["top_logprobs"].append(None if lp is None else {
                self.token_text(i): _logprob(v) for i, v in ((lp.token_id, lp.logprob), *lp.top[:self.top])})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


class _ChatDeltas:
    """One chat choice's stream: its text held back while it may be starting a tool call, the call sent whole once
    it parses."""

    def __init__(self, parser: ToolCallParser | None, calls_of) -> None:
        self.parser, self.calls_of = parser, calls_of
        self.ids, self.text, self.sent, self.calling = [], "", "", False

    def feed(self, event: Event) -> list[tuple[dict, list[Event], str | None]]:
        """The deltas an event makes: (delta, the events whose logprobs it carries, finish_reason)."""
        parser = self.parser
        self.ids += event.token_ids
        self.text += event.text
        self.calling = self.calling or (parser is not None and parser.starts_call(self.ids, self.text))
        text = self.text
        ready = self.sent if self.calling else text[:len(text) - (parser.may_start_call(text) if parser else 0)]
        delta, self.sent = ready[len(self.sent):], ready
        done = event.finish_reason is not None
        if done and self.calling and (parsed := self.calls_of(self.ids))[1] is not None:
            calls = [{"index": i, **call} for i, call in enumerate(parsed[1])]
            return [({"content": delta}, [event], None)] * bool(delta) + [({"tool_calls": calls}, [], "tool_calls")]
        delta += text[len(self.sent):] if done else ""
        return [({"content": delta} if delta else {}, [event], event.finish_reason)]


class _Api:
    """What the routes do, over one engine and tokenizer; the routes in `create_app` only call these."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, drain_seconds: float) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.drain_seconds = drain_seconds
        self.streams = _Streams(engine)

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter `model` names (None: the base model's name, or no name); ModelNotFound (404) else."""
        if model is None or model == self.model_name:
            return None
        adapters = self.engine.adapters
        if adapters is None or model not in adapters:
            raise ModelNotFound(model)
        return model

    def models(self, created: int) -> dict:
        """GET /v1/models: the base, then each adapter with the base as its `parent` (vLLM's cards)."""
        card = {"object": "model", "created": created, "owned_by": "mistral-jax",
                "max_model_len": self.engine.max_seq_len}
        data = [{"id": self.model_name, **card, "root": self.model_name, "parent": None}]
        adapters = self.engine.adapters
        for name in [] if adapters is None else adapters.names():
            data.append({"id": name, **card, "root": adapters.paths.get(name), "parent": self.model_name})
        return {"object": "list", "data": data}

    async def load_adapter(self, body: protocol.LoadLoraAdapterRequest) -> Response:
        """POST /v1/load_lora_adapter: read and check the adapter (in a thread), then serve it by name."""
        adapters = self.engine.adapters
        if adapters is None:
            raise RequestError("lora_name", "this server was started without LoRA adapters (give --lora-modules or "
                                            "--max-loras to serve some)")
        try:
            await asyncio.to_thread(adapters.add, body.lora_name, body.lora_path)
        except FileNotFoundError as err:
            raise RequestError("lora_path", f"lora_path: {err}") from None
        except UserError as err:
            raise RequestError("lora_name" if "already loaded" in str(err) else "lora_path", str(err)) from None
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    def unload_adapter(self, body: protocol.UnloadLoraAdapterRequest) -> Response:
        """POST /v1/unload_lora_adapter: stop serving the adapter (requests running on it finish)."""
        adapters = self.engine.adapters
        try:
            if adapters is None:
                raise KeyError(body.lora_name)
            adapters.remove(body.lora_name)
        except KeyError:
            raise ModelNotFound(body.lora_name) from None
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    def need_tokenizer(self, param: str | None, what: str) -> None:
        if self.tokenizer is None:
            raise RequestError(param, f"this server has no tokenizer: {what}")

    def token_text(self, token_id: int, as_ids: bool = False) -> str:
        """A token as logprobs name it: its text, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""
        if as_ids or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    async def structured(self, params: SamplingParams) -> None:
        """The engine's grammar matchers built (once, ~1 s) off the event loop before a constrained request."""
        if params.grammar is not None:
            self.need_tokenizer("response_format", "structured output needs one")
            await asyncio.to_thread(self.engine.structured)

    def stream(self, chunks: AsyncIterator[dict]) -> EventSourceResponse:
        return EventSourceResponse(chunks, ping=15, shutdown_grace_period=self.drain_seconds)

    # chat ---------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[protocol.ChatMessage], tools: list[protocol.Tool] | None = None) -> list[int]:
        """The conversation's prompt ids (run in a thread: templates and tokenizers are slow on big inputs)."""
        turns = []
        for m in messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                p.text for p in m.content)
            turn = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            if m.tool_calls:
                turn["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                turn["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                turn["name"] = m.name
            turns.append(turn)
        try:
            return self.tokenizer.apply_chat_template(turns, tools=[t.model_dump() for t in tools or ()] or None)
        except UserError as err:
            raise RequestError("tools" if tools and not self.tokenizer.supports_tools else "messages",
                               str(err)) from None

    def chat_logprobs(self, logprobs: tuple[TokenLogprob, ...], top: int) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}
        return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top[:top]]}
                for lp in logprobs]

    def tool_parser(self, body: ChatCompletionRequest) -> tuple[ToolCallParser | None, dict | None]:
        """(the parser of the answer's tool calls where the request lets the model call tools, else None; the
        grammar constraint of a forced call: tool_choice `required` or a named function, on any model)."""
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
        if choice != "none" and not body.tools:
            raise RequestError("tool_choice", "tool_choice needs tools")
        if choice == "none":
            return None, None
        if choice == "auto":
            if not self.tokenizer.supports_tools:
                raise RequestError("tools", "this model's chat template has no tool format, so it cannot call tools")
            return ToolCallParser(self.tokenizer), None
        name = None if choice == "required" else choice.function.name
        if name is not None and name not in [t.function.name for t in body.tools]:
            raise RequestError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        if protocol.constraint(body)[0] is not None:
            raise RequestError("response_format", "response_format: a forced tool call is already constrained")
        parser = ToolCallParser(self.tokenizer)
        grammar = call_grammar([t.model_dump() for t in body.tools], name, parser.marker_id)
        return parser, {"grammar": grammar}

    async def chat(self, http: Request, body: ChatCompletionRequest):
        adapter = self.check_model(body.model)
        protocol.refuse_unsupported(body)
        self.need_tokenizer(None, "use /v1/completions with token ids")
        parser, forced = self.tool_parser(body)
        # A forced call on a template without a tool format: the grammar alone carries the tools' schemas.
        shown = body.tools if forced is None or self.tokenizer.supports_tools else None
        prompt = await asyncio.to_thread(self.chat_prompt, body.messages, shown)
        top = body.top_logprobs or 0
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError("top_logprobs", "top_logprobs needs logprobs: true")
        max_tokens = protocol.chat_max_tokens(body, len(prompt), self.engine.max_seq_len)
        params = protocol.sampling_params(body, max_tokens, logprobs=top if body.logprobs else None,
                                          constrained=None if forced is None else (forced, "tools"))
        await self.structured(params)
        self.check_n(body.n, 1)
        submitted = self.streams.submit([prompt], [params], body.n, adapter)  # a full queue or bad prompt fails here
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": adapter or self.model_name}

        def choice(index: int, content: dict, events: list[Event], key: str, finish: str | None) -> dict:
            logprobs = [lp for e in events for lp in e.logprobs]
            return {"index": index, key: content, "finish_reason": finish,
                    "logprobs": {"content": self.chat_logprobs(logprobs, top)} if body.logprobs else None}

        def calls_of(ids: list[int]) -> tuple[str, list[dict] | None]:
            content, calls = parser.split(ids)
            return content, None if calls is None else calls[:1] if not body.parallel_tool_calls else calls

        def answer(index: int, events: list[Event]) -> dict:
            message, finish = {"role": "assistant", "content": "".join(e.text for e in events)}, None
            if parser is not None:
                content, calls = calls_of([t for e in events for t in e.token_ids])
                if calls is not None:
                    message, finish = {"role": "assistant", "content": content or None, "tool_calls": calls}, \
                        "tool_calls"
            return choice(index, message, events, "message", finish or events[-1].finish_reason)

        if not body.stream:
            results = await self.streams.collect(http, submitted)
            if results is None:
                return Response(status_code=499)
            usage = _usage(len(prompt), sum(events[-1].completion_tokens for events in results))
            return {**head, "object": "chat.completion", "usage": usage,
                    "choices": [answer(i, events) for i, events in enumerate(results)]}
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def chunks() -> AsyncIterator[dict]:
            chunk = {**head, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}
            for index in range(body.n):
                yield _sse({**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]})
            streams = [_ChatDeltas(parser, calls_of) for _ in range(body.n)]
            done = 0
            async for index, event in self.streams.events(submitted):
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": event.error, "type": "server_error"}})
                    return
                for delta, events, finish in streams[index].feed(event):
                    yield _sse({**chunk, "choices": [choice(index, delta, events, "delta", finish)]})
                done += event.finish_reason is not None
                if done == body.n and include_usage:
                    usage = _usage(len(prompt), sum(len(s.ids) for s in streams))
                    yield _sse({**chunk, "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return self.stream(chunks())

    def check_n(self, n: int, prompts: int) -> None:
        """n choices of each prompt must fit in the engine's queue at once (a 400 naming n, never a 503)."""
        if n * prompts > self.engine.max_queue:
            raise RequestError("n", f"n: {n} choices of {prompts} prompt(s) exceed the server's queue of "
                                    f"{self.engine.max_queue} requests (--max-queue)")

    # completions --------------------------------------------------------------------------------
    def completion_prompts(self, prompt) -> list[list[int]]:
        """Token ids of each prompt (run in a thread)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise RequestError("prompt", "prompt must not be empty")
        out = []
        for p in prompt:
            if isinstance(p, str):
                self.need_tokenizer("prompt", "send token ids")
                p = self.tokenizer.encode(p)
            if not p:
                raise RequestError("prompt", "the prompt is empty")
            if max(p) >= self.engine.config.vocab_size:
                raise RequestError("prompt", f"token ids must lie in [0, {self.engine.config.vocab_size})")
            out.append(list(p))
        return out

    async def completions(self, http: Request, body: CompletionRequest):
        adapter = self.check_model(body.model)
        protocol.refuse_unsupported(body)
        prompts = await asyncio.to_thread(self.completion_prompts, body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise RequestError("max_tokens", "max_tokens 0 is only allowed with echo (the prompt's logprobs alone)")
        prompt_only = body.max_tokens == 0  # scored, not continued: the one token sampled is dropped
        max_tokens = 1 if prompt_only else body.max_tokens
        top = body.logprobs
        params = [protocol.sampling_params(body, max_tokens, logprobs=top, echo_logprobs=body.echo and top is not None)
                  for _ in prompts]
        await self.structured(params[0])
        self.check_n(body.n, len(prompts))
        submitted = self.streams.submit(prompts, params, body.n, adapter)  # choice i * n + j: prompt i's j-th
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": adapter or self.model_name,
                "object": "text_completion"}
        as_ids = body.return_tokens_as_token_ids

        def choice(index: int, events: list[Event], first: bool, logprobs: _LegacyLogprobs | None) -> dict:
            prompt = prompts[index // body.n]
            echo = body.echo and first
            kept = [] if prompt_only else events
            text = (self.tokenizer.decode(prompt) if echo and self.tokenizer is not None else "")
            scored = events[0].prompt_logprobs or (None,) * len(prompt)  # a 1-token prompt has no scores
            entries = list(zip(prompt, scored)) if echo and top is not None else []
            entries += [(lp.token_id, lp) for e in kept for lp in e.logprobs]
            return {"index": index, "text": text + "".join(e.text for e in kept),
                    "finish_reason": events[-1].finish_reason, "logprobs": None if logprobs is None else logprobs(
                        entries)}

        def completion_tokens(event: Event) -> int:
            return 0 if prompt_only else event.completion_tokens

        def legacy() -> _LegacyLogprobs | None:
            return None if top is None else _LegacyLogprobs(lambda t: self.token_text(t, as_ids), top)

        prompt_tokens = sum(len(p) for p in prompts)
        if not body.stream:
            results = await self.streams.collect(http, submitted)
            if results is None:
                return Response(status_code=499)
            usage = _usage(prompt_tokens, sum(completion_tokens(events[-1]) for events in results))
            return {**head, "usage": usage, "choices": [choice(i, events, True, legacy())
                                                        for i, events in enumerate(results)]}
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def chunks() -> AsyncIterator[dict]:
            count = len(submitted.requests)
            first, logprobs, last = [True] * count, [legacy() for _ in range(count)], [None] * count
            chunk = {**head, **({"usage": None} if include_usage else {})}
            async for index, event in self.streams.events(submitted):
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": event.error, "type": "server_error"}})
                    return
                yield _sse({**chunk, "choices": [choice(index, [event], first[index], logprobs[index])]})
                first[index], last[index] = False, event if event.finish_reason is not None else None
                if include_usage and all(e is not None for e in last):
                    usage = _usage(prompt_tokens, sum(completion_tokens(e) for e in last))
                    yield _sse({**chunk, "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return self.stream(chunks())

    # tokenizer routes (vLLM's) ------------------------------------------------------------------
    def tokenize(self, body: protocol.TokenizeRequest) -> dict:
        self.check_model(body.model)
        self.need_tokenizer(None, "it cannot tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("prompt", "send exactly one of prompt and messages")
        if body.messages is not None:
            ids = self.chat_prompt(body.messages, body.tools)
        else:  # as vLLM (a Hugging Face tokenizer) does: special-token strings in the prompt are special tokens
            t = self.tokenizer
            ids = t.vocab.encode_spans([(body.prompt, True)])
            if body.add_special_tokens and t.vocab.add_bos and t.bos_id is not None:
                ids.insert(0, t.bos_id)
        strs = [self.tokenizer.vocab.id_to_piece(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: protocol.DetokenizeRequest) -> dict:
        self.check_model(body.model)
        self.need_tokenizer(None, "it cannot detokenize")
        if body.tokens and max(body.tokens) >= self.tokenizer.vocab_size:
            raise RequestError("tokens", f"token ids must lie in [0, {self.tokenizer.vocab_size})")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def tokenizer_info(self) -> dict:
        self.need_tokenizer(None, "it has no tokenizer to describe")
        t = self.tokenizer
        piece = t.vocab.id_to_piece
        template = getattr(t.chat_format, "source", None)
        return {"tokenizer_class": type(t.vocab).__name__, "model_max_length": self.engine.max_seq_len,
                "vocab_size": t.vocab_size, "bos_token": None if t.bos_id is None else piece(t.bos_id),
                "eos_token": None if t.eos_id is None else piece(t.eos_id), "add_bos_token": bool(t.vocab.add_bos),
                "chat_template": template}


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               drain_seconds: float = 30.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               enable_lora_loading: bool = False) -> FastAPI:
    """The FastAPI application serving `engine` under the model id `model_name`.

    drain_seconds: on the server's shutdown, how long open streams may run on before they are cut.
    max_request_bytes: a larger body is refused with 413 before it is read to the end.
    enable_lora_loading: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's) exist.
    """
    app = FastAPI(title="mistral-jax", docs_url=None, redoc_url=None)
    api = _Api(engine, tokenizer, model_name, drain_seconds)
    app.add_middleware(BodyGuard, max_bytes=max_request_bytes, respond=_send_error)
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path not in ("/health",):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(first["loc"]))
        return _error(400, f"{param or 'body'}: {first['msg']}", param)

    @app.exception_handler(RequestError)
    async def bad_request(_, err: RequestError):
        return _error(400, str(err), err.param)

    @app.exception_handler(UserError)
    async def user_error(_, err: UserError):
        return _error(400, str(err))

    @app.exception_handler(ModelNotFound)
    async def not_found(_, err: ModelNotFound):
        return JSONResponse({"error": {"message": str(err), "type": "invalid_request_error", "param": "model",
                                       "code": "model_not_found"}}, status_code=404)

    @app.exception_handler(QueueFull)
    async def queue_full(_, err: QueueFull):
        return _error(503, str(err), kind="server_busy", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_slots": engine.active_slots}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return api.models(created)

    if enable_lora_loading:
        @app.post("/v1/load_lora_adapter", responses=protocol.ERRORS)
        async def load_lora_adapter(body: protocol.LoadLoraAdapterRequest):
            return await api.load_adapter(body)

        @app.post("/v1/unload_lora_adapter", responses=protocol.ERRORS)
        async def unload_lora_adapter(body: protocol.UnloadLoraAdapterRequest):
            return api.unload_adapter(body)

    @app.post("/v1/chat/completions", responses={200: {"model": protocol.ChatCompletion}, **protocol.ERRORS})
    async def chat_completions(http: Request, body: ChatCompletionRequest):
        return await api.chat(http, body)

    @app.post("/v1/completions", responses={200: {"model": protocol.Completion}, **protocol.ERRORS})
    async def completions(http: Request, body: CompletionRequest):
        return await api.completions(http, body)

    @app.post("/tokenize", responses={200: {"model": protocol.TokenizeResponse}, **protocol.ERRORS})
    async def tokenize(body: protocol.TokenizeRequest):
        return await asyncio.to_thread(api.tokenize, body)

    @app.post("/detokenize", responses={200: {"model": protocol.DetokenizeResponse}, **protocol.ERRORS})
    async def detokenize(body: protocol.DetokenizeRequest):
        return await asyncio.to_thread(api.detokenize, body)

    @app.get("/tokenizer_info", responses=protocol.ERRORS)
    async def tokenizer_info():
        return api.tokenizer_info()

    return app
