"""Constraints on an answer as llguidance grammars: what `SamplingParams(response_format=...)` takes, checked and
compiled once (the serving engine's serving/constrained.py matches them against a vocabulary, token by token).

A constraint is one of {"json_schema": schema}, {"json_object": True}, {"regex": str}, {"choice": [str, ...]},
{"grammar": lark text}, or OpenAI's response_format {"type": "json_object"} / {"type": "json_schema",
"json_schema": {"name": ..., "schema": {...}, "strict": ...}} ({"type": "text"} is no constraint).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mistral_jax.errors import ParamError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def llguidance():
    import llguidance  # only constrained requests need it
    import llguidance.numpy

    return llguidance


def constraint(spec: Any, param: str = "response_format") -> dict | None:
    """A constraint in its one-key form (None: unconstrained) from any form above, or its JSON text."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise ParamError(param, f"{param}: not a JSON object: {spec[:80]!r}") from None
    if not isinstance(spec, Mapping):
        raise ParamError(param, f"{param} must be a mapping, got {type(spec).__name__}")
    if "type" in spec:  # OpenAI's response_format
        kind = spec["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return {"json_object": True}
        if kind == "json_schema":
            body = spec.get("json_schema")
            if not isinstance(body, Mapping) or body.get("schema") is None:
                raise ParamError(param, f"{param}: json_schema needs a schema")
            return {"json_schema": body["schema"]}
        raise ParamError(param, f"{param}: unknown type {kind!r}")
    given = {k: v for k, v in spec.items() if v is not None}
    if len(given) != 1 or next(iter(given)) not in KINDS:
        raise ParamError(param, f"{param}: give exactly one of {', '.join(KINDS)}")
    return dict(given)


def grammar(spec: Mapping[str, Any], param: str = "response_format") -> str:
    """An llguidance grammar for a constraint in its one-key form; a ParamError naming `param` where it does not
    compile."""
    lg = llguidance()
    if len(spec) != 1:
        raise ParamError(param, f"{param}: give exactly one of {', '.join(KINDS)}")
    (kind, value), = spec.items()
    try:
        if kind in ("json_schema", "json_object"):  # compact JSON: a small model cannot loop on whitespace
            schema = value if kind == "json_schema" else {"type": "object"}
            schema = json.loads(schema) if isinstance(schema, str) else schema
            text = lg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            text = lg.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            if not value or not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
                raise ParamError(param, f"{param}: choice must be a non-empty list of strings")
            text = lg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        elif kind == "grammar":
            text = lg.LLMatcher.grammar_from_lark(value)
        else:
            raise ParamError(param, f"{param}: unknown constraint {kind!r}")
    except ParamError:
        raise
    except Exception as err:  # whatever llguidance makes of a client's schema or regex is the client's error
        raise ParamError(param, f"{param}: the {kind} does not compile: {err}") from None
    failed, messages = lg.LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        raise ParamError(param, f"{param}: the {kind} does not compile: {'; '.join(messages)}")
    return text
