"""OpenAI-compatible HTTP routes over the engine (FastAPI; server-sent events through sse-starlette).

POST /v1/chat/completions and /v1/completions (streamed or not, with logprobs; completions also with echo, as
lm-evaluation-harness scores log-likelihoods), GET /v1/models, /health and /metrics (Prometheus).
Bad input gets OpenAI's error object with status 400 naming the field; a full queue gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from mistral_jax.errors import UserError
from mistral_jax.serving.engine import Engine
from mistral_jax.serving.requests import TOP_LOGPROBS, Event, QueueFull, RequestError, SamplingParams, TokenLogprob

_DISCONNECT_POLL_SECONDS = 0.25


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Body:
    """The request's JSON object, read field by field: a wrong type is a RequestError naming the field."""

    def __init__(self, raw: bytes) -> None:
        try:
            self.data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(None, f"the body is not valid JSON: {err}") from None
        if not isinstance(self.data, dict):
            raise RequestError(None, "the body must be a JSON object")

    def get(self, name: str, types: type | tuple, default=None, *, check=None, why: str = ""):
        value = self.data.get(name)
        if value is None:
            return default
        allowed = types if isinstance(types, tuple) else (types,)
        wrong_bool = isinstance(value, bool) and bool not in allowed  # JSON true is no number
        if wrong_bool or not isinstance(value, allowed) or (check is not None and not check(value)):
            names = " or ".join(t.__name__ for t in allowed)
            raise RequestError(name, f"{name} must be {why or names}, got {value!r}")
        return value


def _stop_strings(body: _Body) -> tuple[str, ...]:
    stop = body.get("stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop", "stop must be a non-empty string or a list of at most 4 of them")
    return stop


def _sampling(body: _Body, prompt_len: int, context: int, default_max: int | None, **extra) -> SamplingParams:
    """SamplingParams from the body's OpenAI fields (and top_k, min_p, repetition_penalty, stop_token_ids,
    ignore_eos as vLLM takes them); SamplingParams checks each value's range and names the field."""
    number = (int, float)
    max_tokens = body.get("max_completion_tokens", int, None) or body.get("max_tokens", int, None)
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else max(1, context - prompt_len)
    if body.get("n", int, 1) != 1:
        raise RequestError("n", "only n=1 is supported")
    stop_ids = body.get("stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise RequestError("stop_token_ids", "stop_token_ids must be a list of token ids")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(body.get("temperature", number, 1.0)),
        top_k=body.get("top_k", int, 0),
        top_p=float(body.get("top_p", number, 1.0)),
        min_p=body.get("min_p", number, 0.0),
        presence_penalty=body.get("presence_penalty", number, 0.0),
        frequency_penalty=body.get("frequency_penalty", number, 0.0),
        repetition_penalty=body.get("repetition_penalty", number, 1.0),
        logit_bias=body.get("logit_bias", dict, {}),
        seed=body.get("seed", int, 0),
        stop=_stop_strings(body),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=body.get("ignore_eos", bool, False),
        **extra,
    )


def _chat_messages(body: _Body) -> list[dict]:
    messages = body.get("messages", list, None)
    if not messages:
        raise RequestError("messages", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError("messages", f"messages[{i}] must be an object")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(p.get("text", "") for p in content)
        out.append({**m, "content": content})
    return out


class _Streams:
    """Engine events into asyncio: a queue per request, filled from the engine's thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(self, prompt: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request = self.engine.submit(prompt, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        return request, events

    async def events(self, http: Request, submitted):
        """Every event of a request `submit` made; cancels it if the client goes away first."""
        request, events = submitted
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancel()  # a no-op once finished; frees the slot of a client that left

    async def collect(self, http: Request, submitted) -> list[Event] | None:
        """All of a request's events, or None where the client went away before it finished."""
        events = [event async for event in self.events(http, submitted)]
        return events if events and events[-1].finish_reason is not None else None


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               drain_seconds: float = 30.0) -> FastAPI:
    """The FastAPI application serving `engine` under the model id `model_name`.

    drain_seconds: on the server's shutdown, how long open streams may run on before they are cut.
    """
    app = FastAPI(title="mistral-jax", docs_url=None, redoc_url=None)
    streams = _Streams(engine)
    created = int(time.time())

    def token_text(token_id: int, as_ids: bool = False) -> str:
        """A token as logprobs name it: its text, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""
        if as_ids or tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.decode([token_id])

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path not in ("/health",):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def bad_request(_, err: RequestError):
        return _error(400, str(err), err.param)

    @app.exception_handler(UserError)
    async def user_error(_, err: UserError):
        return _error(400, str(err))

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
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "mistral-jax",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    def check_model(body: _Body) -> None:
        model = body.get("model", str, model_name)
        if model != model_name:
            raise RequestError("model", f"unknown model {model!r}; this server serves {model_name!r}")

    def usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def chat_logprobs(logprobs: tuple[TokenLogprob, ...], top: int) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top[:top]]}
                for lp in logprobs]

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        body = _Body(await http.body())
        check_model(body)
        if tokenizer is None:
            raise RequestError(None, "this server has no tokenizer: use /v1/completions with token ids")
        messages = _chat_messages(body)
        try:
            prompt = tokenizer.apply_chat_template(messages)
        except UserError as err:
            raise RequestError("messages", str(err)) from None
        want_logprobs = body.get("logprobs", bool, False)
        top = body.get("top_logprobs", int, 0, check=lambda n: 0 <= n <= TOP_LOGPROBS,
                       why=f"an integer in [0, {TOP_LOGPROBS}]")
        params = _sampling(body, len(prompt), engine.max_seq_len, None, logprobs=top if want_logprobs else None)
        request_id, stream = f"chatcmpl-{uuid.uuid4().hex}", body.get("stream", bool, False)
        submitted = streams.submit(prompt, params)  # a full queue or a bad prompt fails here, before any stream
        head = {"id": request_id, "created": int(time.time()), "model": model_name}

        def choice(delta_or_message: dict, event: Event, key: str) -> dict:
            out = {"index": 0, key: delta_or_message, "finish_reason": event.finish_reason,
                   "logprobs": {"content": chat_logprobs(event.logprobs, top)} if want_logprobs else None}
            return out

        if not stream:
            events = await streams.collect(http, submitted)
            if events is None:
                return Response(status_code=499)
            last = events[-1]
            last = Event((), "", tuple(lp for e in events for lp in e.logprobs), last.finish_reason,
                         last.prompt_tokens, last.completion_tokens)
            text = "".join(e.text for e in events)
            return {**head, "object": "chat.completion", "usage": usage(last),
                    "choices": [choice({"role": "assistant", "content": text}, last, "message")]}

        async def chunks() -> AsyncIterator[dict]:
            chunk = {**head, "object": "chat.completion.chunk"}
            yield {"data": json.dumps({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                             "finish_reason": None, "logprobs": None}]})}
            async for event in streams.events(http, submitted):
                if event.finish_reason == "error":
                    yield {"data": json.dumps({"error": {"message": event.error, "type": "server_error"}})}
                    return
                body = {**chunk, "choices": [choice({"content": event.text} if event.text else {}, event, "delta")]}
                if event.finish_reason is not None:
                    body["usage"] = usage(event)
                yield {"data": json.dumps(body)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(chunks(), ping=15, shutdown_grace_period=drain_seconds)

    def completion_prompts(body: _Body) -> list[list[int]]:
        prompt = body.data.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt", "prompt must be a string, a list of token ids, or a list of either")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if tokenizer is None:
                    raise RequestError("prompt", "this server has no tokenizer: send token ids")
                out.append(tokenizer.encode(p))
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                out.append(p)
            else:
                raise RequestError("prompt", "prompt must be a non-empty string or a non-empty list of token ids")
            if not out[-1]:
                raise RequestError("prompt", "the prompt is empty")
            if min(out[-1]) < 0 or max(out[-1]) >= engine.config.vocab_size:
                raise RequestError("prompt", f"token ids must lie in [0, {engine.config.vocab_size})")
        return out

    def completion_logprobs(prompt: list[int], prompt_logprobs, logprobs: list[TokenLogprob], top: int,
                            as_ids: bool) -> dict:
        entries = [(t, None if lp is None else lp) for t, lp in zip(prompt, prompt_logprobs or ())]
        entries += [(lp.token_id, lp) for lp in logprobs]
        tokens = [token_text(t, as_ids) for t, _ in entries]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else lp.logprob for _, lp in entries],
            "top_logprobs": [None if lp is None else {token_text(i, as_ids): v for i, v in lp.top[:top]}
                             for _, lp in entries],
            "text_offset": offsets,
        }

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = _Body(await http.body())
        check_model(body)
        prompts = completion_prompts(body)
        echo = body.get("echo", bool, False)
        top = body.get("logprobs", int, None, check=lambda n: 0 <= n <= TOP_LOGPROBS,
                       why=f"an integer in [0, {TOP_LOGPROBS}]")
        stream = body.get("stream", bool, False)
        as_ids = body.get("return_tokens_as_token_ids", bool, False)
        if stream and len(prompts) > 1:
            raise RequestError("prompt", "stream takes a single prompt")
        params = [_sampling(body, len(p), engine.max_seq_len, 16, logprobs=top, echo_logprobs=echo and top is not None)
                  for p in prompts]
        submitted = []
        try:
            for p, s in zip(prompts, params):
                submitted.append(streams.submit(p, s))
        except QueueFull:
            for request, _ in submitted:
                request.cancel()
            raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
                "object": "text_completion"}

        if not stream:
            async def one(i: int) -> dict | None:
                events = await streams.collect(http, submitted[i])
                if events is None:
                    return None
                first, last = events[0], events[-1]
                prefix = tokenizer.decode(prompts[i]) if echo and tokenizer is not None else ""
                lp = None
                if top is not None:
                    lp = completion_logprobs(prompts[i] if echo else [], first.prompt_logprobs if echo else None,
                                             [lp for e in events for lp in e.logprobs], top, as_ids)
                return {"index": i, "text": prefix + "".join(e.text for e in events),
                        "finish_reason": last.finish_reason, "logprobs": lp, "usage": usage(last)}

            choices = await asyncio.gather(*(one(i) for i in range(len(prompts))))
            if any(c is None for c in choices):
                return Response(status_code=499)
            total = {k: sum(c["usage"][k] for c in choices) for k in choices[0]["usage"]}
            return {**head, "usage": total, "choices": [{k: v for k, v in c.items() if k != "usage"} for c in choices]}

        async def chunks() -> AsyncIterator[dict]:
            first = True
            async for event in streams.events(http, submitted[0]):
                if event.finish_reason == "error":
                    yield {"data": json.dumps({"error": {"message": event.error, "type": "server_error"}})}
                    return
                text = event.text
                if first and echo and tokenizer is not None:
                    text = tokenizer.decode(prompts[0]) + text
                lp = None
                if top is not None:
                    lp = completion_logprobs(prompts[0] if first and echo else [],
                                             event.prompt_logprobs if first and echo else None, list(event.logprobs),
                                             top, as_ids)
                first = False
                out = {**head, "choices": [{"index": 0, "text": text, "finish_reason": event.finish_reason,
                                            "logprobs": lp}]}
                if event.finish_reason is not None:
                    out["usage"] = usage(event)
                yield {"data": json.dumps(out)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(chunks(), ping=15, shutdown_grace_period=drain_seconds)

    return app
