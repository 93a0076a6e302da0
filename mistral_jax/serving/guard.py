"""Request bodies checked before any route sees them: a size limit (413), and JSON that is too deep, holds a huge
integer, invalid UTF-8 or a lone surrogate refused with a 400. Parsing runs in a thread, off the event loop."""

from __future__ import annotations

import asyncio
import json
import re

MAX_DEPTH = 64  # nesting of JSON arrays and objects
MAX_INT_DIGITS = 40  # any integer the API takes fits in far fewer
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadBody(ValueError):
    """Why a request body is refused (a 400)."""


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise BadBody(f"an integer of {len(digits)} digits; integers here have at most {MAX_INT_DIGITS}")
    return int(digits)


def check_json(raw: bytes) -> None:
    """Raise BadBody where `raw` is not a JSON document the routes can safely read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadBody(f"the body is not UTF-8: {err}") from None
    try:
        value = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as err:
        raise BadBody(f"the body is not valid JSON: {err}") from None
    except ValueError as err:  # BadBody from _parse_int, or a float json cannot read
        raise BadBody(str(err)) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack += [(child, depth + 1) for child in children if isinstance(child, dict | list | str)]
        elif isinstance(item, str) and _SURROGATE.search(item):
            raise BadBody("the body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is no character")


class BodyGuard:
    """ASGI middleware: bodies of POST requests read with a limit (413 past it) and checked by `check_json`
    (400), then handed on unchanged. `respond(send, status, message)` writes the error response."""

    def __init__(self, app, max_bytes: int, respond) -> None:
        self.app, self.max_bytes, self.respond = app, max_bytes, respond

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.respond(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.respond(send, 413, too_big)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            await asyncio.to_thread(check_json, body)
        except BadBody as err:
            return await self.respond(send, 400, str(err))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, as the app expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
