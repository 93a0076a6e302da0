"""What a client asks of the engine (`SamplingParams`, from sampling.py) and what it gets back (`Event`)."""

from __future__ import annotations

import dataclasses

from mistral_jax.errors import ParamError
from mistral_jax.sampling import TOP_LOGPROBS, SamplingParams

__all__ = ["TOP_LOGPROBS", "Event", "ModelNotFound", "QueueFull", "RequestError", "SamplingParams", "TokenLogprob"]

# The settings type and its error live with the sampling stage; the server's names for them stay here.
RequestError = ParamError  # a bad request; `param` names the field at fault (OpenAI's error.param)


class ModelNotFound(Exception):
    """A request names a model (a LoRA adapter) this server does not serve (HTTP 404)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


class QueueFull(Exception):
    """The engine's queue is full (or it is shutting down): try again later (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely alternatives at its place."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True)
class Event:
    """New output of one request: its next token(s) and the text they complete; the last has finish_reason."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first event only, when echo_logprobs
    error: str | None = None
